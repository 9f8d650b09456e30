//! How long a node agent restart takes to re-verify and re-send a node full of enrolled
//! pods: N pods (default 500) enrolled by the real agent with the real ztunnel, then the
//! agent is killed and started again; timed from the new process's start until it reports
//! every pod enrolled again and `/readyz` answers 200. The same restart with one pod is
//! the baseline, measured in the same run.
//!
//! Run: `cargo build --release --bins && cargo bench -p benches --bench agent_restart --
//! [--pods N]`.

use std::time::{Duration, Instant};

use mesh_testbed::mesh::{Mesh, eventually};

fn pods_arg() -> usize {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == "--pods")
        .and_then(|i| argv.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

fn enrolled(m: &Mesh, n: usize) -> bool {
    let (_, metrics) = m.agent_get("a", "/metrics");
    metrics.contains(&format!("ambient_agent_pods_enrolled {n}\n"))
        && m.agent_get("a", "/readyz").0 == 200
}

/// Seconds from a fresh agent process to all `n` pods enrolled and ready.
fn restart(m: &mut Mesh, n: usize) -> f64 {
    m.lab.stop("agent-a");
    let started = Instant::now();
    m.start_agent("a", &[]);
    assert!(
        eventually(Duration::from_secs(120), || enrolled(m, n)),
        "the agent did not re-enroll {n} pods: {}",
        m.agent_get("a", "/pods").1
    );
    started.elapsed().as_secs_f64()
}

fn run(n: usize) -> f64 {
    let mut m = Mesh::new(&["a"]);
    m.log = "warn".into();
    let mut y = String::from(
        "namespaces:\n- {name: bench, labels: {istio.io/dataplane-mode: ambient}}\npods:\n",
    );
    for i in 0..n {
        let ns = m.lab.add_netns("a", &format!("p{i}"));
        y += &format!(
            "- {{name: p{i}, namespace: bench, uid: bench/p{i}, serviceAccount: sa, ips: [\"198.18.{}.{}\"], netns: {}}}\n",
            100 + i / 250,
            i % 250 + 1,
            ns.path().display()
        );
    }
    std::fs::write(m.pod_file("a"), y).expect("pod file");
    m.start_agent("a", &[]);
    m.start_ztunnel("a", &[]);
    assert!(
        eventually(Duration::from_secs(300), || enrolled(&m, n)),
        "{n} pods were not enrolled"
    );
    // Median of three restarts.
    let mut t: Vec<f64> = (0..3).map(|_| restart(&mut m, n)).collect();
    t.sort_by(f64::total_cmp);
    t[1]
}

fn main() {
    benches::raise_fd_limit();
    let n = pods_arg();
    eprintln!("agent restart: 1 pod, then {n} pods (median of 3 restarts each)");
    let one = run(1);
    let many = run(n);
    println!();
    println!(
        "{:<44} {:>10}",
        "agent restart, re-verified and re-sent", "seconds"
    );
    println!("{:<44} {:>10.2}", "1 pod (baseline)", one);
    println!(
        "{:<44} {:>10.2}  (bar <= 2 s{})",
        format!("{n} pods"),
        many,
        if many <= 2.0 { "" } else { ", not met" }
    );
}
