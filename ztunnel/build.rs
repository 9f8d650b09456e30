//! Generates the Istio control-plane messages and gRPC stubs (delta xDS, the CA) from the
//! `.proto` files in `proto/`. Servers are generated too: tests run an in-process control
//! plane built from the same definitions.

fn main() {
    let protos = [
        "../proto/istio_workload.proto",
        "../proto/istio_authorization.proto",
        "../proto/envoy_discovery.proto",
        "../proto/istio_ca.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let result = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&protos, &["../proto"]);
    if let Err(e) = result {
        // protoc comes from the system (apt: protobuf-compiler); say so instead of a bare panic.
        eprintln!(
            "error: compiling the control-plane protos failed: {e}\nhint: apt-get install protobuf-compiler"
        );
        std::process::exit(1);
    }
}
