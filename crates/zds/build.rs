fn main() {
    let proto = "../../proto/zds.proto";
    println!("cargo:rerun-if-changed={proto}");
    if let Err(e) = prost_build::Config::new().compile_protos(&[proto], &["../../proto"]) {
        // protoc comes from the system (apt: protobuf-compiler); say so instead of a bare panic.
        eprintln!("error: compiling {proto} failed: {e}\nhint: apt-get install protobuf-compiler");
        std::process::exit(1);
    }
}
