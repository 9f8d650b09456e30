//! Test utilities shared by the integration tests, benchmarks and the local mesh.
//!
//! - [`lab`]: simulated nodes and pods as network namespaces joined by veth links and
//!   bridges, every name unique to the test and everything removed on drop (even on panic);
//! - [`agent`]: a stand-in node agent that speaks ZDS and installs redirection, for tests of
//!   ztunnel alone;
//! - [`apps`]: echo servers and clients living in pod namespaces;
//! - [`capture`]: packet capture on a link and a small pcap reader;
//! - [`certs`]: crafted certificates (expired, several identities, foreign CA, ...);
//! - [`mesh`]: nodes running real ztunnel processes with a CA and a local config;
//! - [`kube_mock`]: an in-process Kubernetes API server speaking list/watch JSON;
//! - [`demo`]: the local mesh (`local-mesh`) and its report;
//! - [`cni`]: container networks on simulated nodes and a minimal CNI runtime driving them;
//! - [`podman`]: a real CNI runtime (podman + reference plugins) inside simulated nodes;
//! - [`relay`]: a stand-in waypoint or network gateway (an HBONE server that logs and forwards).
//!
//! Everything here needs root; [`require_root`] fails loudly without it.

#![forbid(unsafe_code)]

pub mod agent;
pub mod apps;
pub mod capture;
pub mod certs;
pub mod cni;
pub mod control_plane;
pub mod demo;
pub mod kube_mock;
pub mod lab;
pub mod mesh;
pub mod metrics;
pub mod podman;
pub mod relay;

/// Why this machine cannot host a lab.
pub fn preflight() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "needs root (network namespaces, veth links, nftables): run it as root, \
                    e.g. `sudo ./x test`"
                .into(),
        );
    }
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        let found = std::process::Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Err(format!("`{tool}` is missing: apt-get install {package}"));
        }
    }
    if !std::path::Path::new("/proc/self/ns/net").exists() {
        return Err("this kernel has no network namespaces".into());
    }
    let nft = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    if !nft.status.success() {
        return Err(format!(
            "this kernel does not offer nftables ({}): load the nf_tables module",
            String::from_utf8_lossy(&nft.stderr).trim()
        ));
    }
    Ok(())
}

/// Panics with a clear message unless the process can create network namespaces.
pub fn require_root() {
    if let Err(why) = preflight() {
        panic!("this test {why}");
    }
}

/// Path of a workspace binary built next to the running test.
pub fn binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace --bins`, \
         or use `./x test`)",
        path.display()
    );
    path
}
