//! Time the ambient plugin adds to a pod's CNI ADD, enrollment included: the reference
//! `bridge` plugin's ADD alone (the chain without us) against `bridge` then `ambient-cni` (the
//! chain with us, which returns only after the node agent installed the pod's rules and
//! ztunnel acknowledged it), interleaved in one run on one simulated node.
//!
//! Run: `./x bench-cni` (or `cargo build --release --bins && cargo bench -p benches --bench
//! cni_add -- [--iterations N]`).

use std::path::Path;
use std::time::Duration;

use benches::median;
use mesh_testbed::cni::{Sandbox, exec_plugin};
use mesh_testbed::mesh::{Mesh, eventually};
use serde_json::{Value, json};

const NETWORK: &str = "benchnet";
const BRIDGE: &str = "/usr/lib/cni/bridge";

fn exec(
    ns: &mesh_testbed::lab::Ns,
    plugin: &str,
    command: &str,
    sandbox: &Sandbox,
    config: &Value,
) -> (Duration, Value) {
    let (out, elapsed) = exec_plugin(
        ns,
        Path::new(plugin),
        command,
        sandbox,
        "/usr/lib/cni",
        config,
    );
    assert!(
        out.status.success(),
        "{plugin} {command}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        elapsed,
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
    )
}

fn main() {
    let mut iterations = 30;
    let argv: Vec<String> = std::env::args().collect();
    if let Some(i) = argv.iter().position(|a| a == "--iterations") {
        iterations = argv
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .expect("--iterations N");
    }
    let mut m = Mesh::new(&["a"]);
    m.log = std::env::var("BENCH_LOG").unwrap_or("warn".into());
    let node = m.lab.node("a").clone();
    let pods: Vec<String> = (0..iterations).map(|i| format!("bench-{i}")).collect();
    let mut yaml = String::from(
        "namespaces: [{name: bench, labels: {istio.io/dataplane-mode: ambient}}]\npods:\n",
    );
    for p in &pods {
        yaml += &format!("- {{name: {p}, namespace: bench, uid: bench/{p}}}\n");
    }
    std::fs::write(m.pod_file("a"), yaml).unwrap();
    m.start_agent("a", &[]);
    m.start_ztunnel("a", &[]);
    assert!(eventually(Duration::from_secs(20), || m
        .agent_get("a", "/readyz")
        .0
        == 200));
    let run_dir = m.lab.dir().join("a-run");
    let ipam = m.lab.dir().join("ipam");
    let bridge = json!({
        "cniVersion": "1.0.0", "name": NETWORK, "type": "bridge", "bridge": "cni-bench",
        "isGateway": true, "ipMasq": false,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.18.200.0/24"}]], "dataDir": ipam}
    });
    let ambient = |prev: &Value| {
        json!({
            "cniVersion": "1.0.0", "name": NETWORK, "type": "ambient-cni",
            "cni_agent_run_dir": run_dir, "prevResult": prev
        })
    };
    let plugin = mesh_testbed::binary("ambient-cni").display().to_string();
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for (i, pod) in pods.iter().enumerate() {
        for ours in [false, true] {
            let tag = if ours { "w" } else { "o" };
            // A fresh netns with `lo` up, as the runtime hands it to the chain.
            let netns = m.lab.add_netns("a", &format!("s{i}{tag}"));
            let sandbox = Sandbox {
                container_id: format!("c{i}{tag}"),
                netns: netns.path(),
                namespace: "bench".into(),
                name: pod.clone(),
            };
            let (t_bridge, prev) = exec(&node.ns, BRIDGE, "ADD", &sandbox, &bridge);
            if ours {
                let (t_ours, _) = exec(&node.ns, &plugin, "ADD", &sandbox, &ambient(&prev));
                with.push((t_bridge + t_ours).as_secs_f64() * 1e3);
                exec(&node.ns, &plugin, "DEL", &sandbox, &ambient(&prev));
            } else {
                without.push(t_bridge.as_secs_f64() * 1e3);
            }
            exec(&node.ns, BRIDGE, "DEL", &sandbox, &bridge);
        }
    }
    without.sort_by(f64::total_cmp);
    with.sort_by(f64::total_cmp);
    let (a, b) = (median(&without), median(&with));
    println!();
    println!(
        "{:<44} {:>10}",
        "CNI ADD, median of",
        format!("{iterations} pods")
    );
    println!(
        "{:<44} {:>8.2} ms",
        "bridge + host-local (the chain without us)", a
    );
    println!(
        "{:<44} {:>8.2} ms",
        "... then ambient-cni, enrollment included", b
    );
    println!(
        "{:<44} {:>8.2} ms  ({:.2}x)",
        "added by ambient-cni",
        b - a,
        b / a
    );
}
