//! `local-mesh`: a real multi-node mesh on one machine, driven end to end, with a report.
//!
//! Two simulated nodes (network namespaces joined by veth links), each running a real
//! `ztunnel` process with a local CA; pods in two namespaces with distinct service accounts,
//! plus one pod outside the mesh. Until the node agent ships, a stand-in agent installs each
//! pod's redirection and hands its netns to ztunnel over ZDS. Traffic then flows across and
//! within nodes, and the report is built from ztunnel's own access log. Everything is removed
//! on exit, including on Ctrl-C.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_testbed::apps::{EchoServer, connect, echo_roundtrip, payload};
use mesh_testbed::lab::{Pod, purge};
use mesh_testbed::mesh::{Mesh, Service, Workload};
use nix::sys::signal::{SigSet, Signal};

fn step(msg: &str) {
    eprintln!("• {msg}");
}

struct Flow {
    label: &'static str,
    from: Pod,
    to: SocketAddr,
    to_name: String,
    /// Where the access log for this flow is written.
    log_node: &'static str,
    direction: &'static str,
}

struct Outcome {
    ok: bool,
    bytes: usize,
    first_byte: Duration,
    error: Option<String>,
}

fn run(flow: &Flow) -> Outcome {
    let data = payload("local-mesh", 64 * 1024);
    let started = Instant::now();
    let result =
        connect(&flow.from, flow.to, Duration::from_secs(5)).and_then(|s| echo_roundtrip(s, &data));
    let elapsed = started.elapsed();
    match result {
        Ok(got) => Outcome {
            ok: got == data,
            bytes: got.len(),
            first_byte: elapsed,
            error: (got != data).then(|| "echo differed".into()),
        },
        Err(e) => Outcome {
            ok: false,
            bytes: 0,
            first_byte: elapsed,
            error: Some(e.to_string()),
        },
    }
}

/// Access-log events of one ztunnel, by source address.
fn access_log(m: &mut Mesh, node: &str) -> HashMap<(String, String), serde_json::Value> {
    let mut out = HashMap::new();
    for line in m.ztunnel_log(node).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["target"] != "access" {
            continue;
        }
        let key = (
            v["src.addr"].as_str().unwrap_or_default().to_string(),
            v["direction"].as_str().unwrap_or_default().to_string(),
        );
        out.insert(key, v);
    }
    out
}

fn main() {
    if let Err(why) = mesh_testbed::preflight() {
        eprintln!("local-mesh: {why}");
        std::process::exit(2);
    }
    // Ctrl-C and SIGTERM go to a thread that removes the lab, since the main thread cannot
    // unwind from a signal.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().expect("block signals");

    step("creating two nodes, a local CA and the mesh config");
    let mut m = Mesh::new(&["node-a", "node-b"]);
    m.log = "info".into();
    let lab_id = m.lab.id().to_string();
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            eprintln!("\nlocal-mesh: {sig:?}: removing everything it created");
            purge(&lab_id);
            std::process::exit(130);
        }
    });

    let frontend = m.lab.add_pod("node-a", "frontend");
    let outsider = m.lab.add_pod("node-a", "outsider");
    let backend = m.lab.add_pod("node-b", "backend");
    let db = m.lab.add_pod("node-b", "db");
    let w_frontend = Workload::mesh(&frontend, "shop", "frontend");
    let w_backend = Workload::mesh(&backend, "shop", "backend");
    let w_db = Workload::mesh(&db, "data", "db");
    let vip = "198.19.100.10";
    let svc = Service {
        name: "backend".into(),
        namespace: "shop".into(),
        vip: vip.into(),
        port: 80,
        target_port: 8080,
        endpoints: vec!["backend".into()],
    };
    m.write_config(&[&w_frontend, &w_backend, &w_db], &[svc]);

    step("starting ztunnel on node-a and node-b");
    for node in ["node-a", "node-b"] {
        m.start_ztunnel(node, &["--log-format", "json"]);
    }
    step(
        "enrolling frontend (shop/frontend), backend (shop/backend), db (data/db); outsider stays out",
    );
    for w in [&w_frontend, &w_backend, &w_db] {
        m.enroll(w);
    }
    let _servers = [
        EchoServer::start(&backend, 8080),
        EchoServer::start(&db, 5432),
        EchoServer::start(&outsider, 9090),
    ];

    let flows = [
        Flow {
            label: "pod to pod, across nodes",
            from: frontend.clone(),
            to: backend.addr(8080),
            to_name: "backend".into(),
            log_node: "node-a",
            direction: "outbound",
        },
        Flow {
            label: "through a service VIP",
            from: frontend.clone(),
            to: format!("{vip}:80").parse().expect("vip"),
            to_name: "backend (svc)".into(),
            log_node: "node-a",
            direction: "outbound",
        },
        Flow {
            label: "across namespaces",
            from: frontend.clone(),
            to: db.addr(5432),
            to_name: "db".into(),
            log_node: "node-a",
            direction: "outbound",
        },
        Flow {
            label: "within one node",
            from: backend.clone(),
            to: db.addr(5432),
            to_name: "db".into(),
            log_node: "node-b",
            direction: "outbound",
        },
        Flow {
            label: "from outside the mesh",
            from: outsider.clone(),
            to: backend.addr(8080),
            to_name: "backend".into(),
            log_node: "node-b",
            direction: "inbound-plaintext",
        },
        Flow {
            label: "to outside the mesh",
            from: frontend,
            to: outsider.addr(9090),
            to_name: "outsider".into(),
            log_node: "node-a",
            direction: "outbound",
        },
    ];
    step("driving 64 KiB echo exchanges over each path");
    let outcomes: Vec<Outcome> = flows.iter().map(run).collect();
    std::thread::sleep(Duration::from_millis(300));
    let logs: HashMap<&str, _> = ["node-a", "node-b"]
        .into_iter()
        .map(|n| (n, access_log(&mut m, n)))
        .collect();

    println!();
    println!(
        "{:<26} {:<10} {:<14} {:<44} {:<6} {:>15} {:>9}",
        "path",
        "source",
        "destination",
        "identities (client -> server)",
        "mTLS",
        "bytes out/in",
        "latency"
    );
    let mut failures = 0;
    for (flow, outcome) in flows.iter().zip(&outcomes) {
        // The client's address as the proxy saw it is the key into the access log.
        let entry = logs[flow.log_node]
            .iter()
            .find(|((src, dir), v)| {
                src.starts_with(&format!("{}:", flow.from.ip))
                    && dir == flow.direction
                    && v["dst.addr"].as_str().is_some_and(|d| {
                        d.ends_with(&format!(":{}", flow.to.port())) || flow.direction != "outbound"
                    })
            })
            .map(|(_, v)| v.clone());
        let (client_id, server_id, mtls, bytes) = match &entry {
            Some(v) => (
                short(v["src.identity"].as_str().unwrap_or("-")),
                short(v["dst.identity"].as_str().unwrap_or("-")),
                if v["security"] == "mtls" { "yes" } else { "no" },
                format!("{}/{}", v["bytes_sent"], v["bytes_received"]),
            ),
            None => ("?".into(), "?".into(), "?", "-".into()),
        };
        // A plaintext peer has no identity, and passthrough presents none.
        let ids = format!("{client_id} -> {server_id}");
        println!(
            "{:<26} {:<10} {:<14} {:<44} {:<6} {:>15} {:>7.2}ms",
            flow.label,
            flow.from.name,
            flow.to_name,
            ids,
            mtls,
            bytes,
            outcome.first_byte.as_secs_f64() * 1000.0
        );
        if !outcome.ok {
            failures += 1;
            println!(
                "  !! {} failed: {}",
                flow.label,
                outcome.error.as_deref().unwrap_or("?")
            );
        }
        let _ = outcome.bytes;
    }
    println!();
    println!(
        "identities are SPIFFE ids (spiffe://cluster.local/ns/<ns>/sa/<sa>) shown as ns/sa; latency is a 64 KiB echo round trip"
    );
    step("removing nodes, pods, processes and files");
    drop(m);
    if failures > 0 {
        eprintln!("local-mesh: {failures} path(s) failed");
        std::process::exit(1);
    }
}

fn short(id: &str) -> String {
    id.strip_prefix("spiffe://cluster.local/ns/")
        .map(|rest| rest.replace("/sa/", "/"))
        .unwrap_or_else(|| id.to_string())
}
