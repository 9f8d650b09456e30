//! ztunnel across changes: agent reconnects and snapshots, re-created sandboxes, config
//! reloads, and graceful shutdown.

use std::io::{Read, Write};
use std::time::Duration;

use mesh_testbed::apps::{EchoServer, connect, echo_roundtrip, listen, listening_ports};
use mesh_testbed::mesh::{Mesh, Scene, Workload, eventually};

const T: Duration = Duration::from_secs(5);
const PROXY_PORTS: [u16; 3] = [15001, 15006, 15008];

fn serving(pod: &mesh_testbed::lab::Pod) -> bool {
    let ports = listening_ports(pod);
    PROXY_PORTS.iter().all(|p| ports.contains(p))
}

fn not_serving(pod: &mesh_testbed::lab::Pod) -> bool {
    let ports = listening_ports(pod);
    !PROXY_PORTS.iter().any(|p| ports.contains(p))
}

#[test]
fn snapshot_after_reconnect_stops_pods_it_does_not_name() {
    let mut m = Mesh::new(&["a"]);
    let a1 = m.lab.add_pod("a", "a1");
    let a2 = m.lab.add_pod("a", "a2");
    let w1 = Workload::mesh(&a1, "ns", "one");
    let w2 = Workload::mesh(&a2, "ns", "two");
    m.write_config(&[&w1, &w2], &[]);
    m.start_ztunnel("a", &[]);
    m.enroll(&w1);
    m.enroll(&w2);
    assert!(serving(&a1) && serving(&a2));

    // The agent restarts: ztunnel reconnects and gets a snapshot naming only a1 (re-sent with
    // the same netns, so its proxy is kept, not restarted) and keeping nothing else.
    let agent = m.agent("a");
    agent.disconnect();
    agent.accept(Duration::from_secs(10));
    agent
        .add(&a1, &w1.uid(), &w1.namespace, &w1.service_account)
        .unwrap();
    agent.snapshot_sent().unwrap();
    assert!(serving(&a1), "a1 must keep its proxy");
    assert!(
        eventually(T, || not_serving(&a2)),
        "a2 was not in the snapshot"
    );
    let _server = EchoServer::start(&a1, 8080);
    let x = m.lab.add_pod("a", "x");
    assert_eq!(
        echo_roundtrip(connect(&x, a1.addr(8080), T).unwrap(), b"up").unwrap(),
        b"up"
    );
    let log = m.ztunnel_log("a");
    assert!(log.contains("already served in the same netns"), "{log}");
}

#[test]
fn keep_in_a_snapshot_preserves_a_pod() {
    let mut m = Mesh::new(&["a"]);
    let a1 = m.lab.add_pod("a", "a1");
    let w1 = Workload::mesh(&a1, "ns", "one");
    m.write_config(&[&w1], &[]);
    m.start_ztunnel("a", &[]);
    m.enroll(&w1);
    let agent = m.agent("a");
    agent.disconnect();
    agent.accept(Duration::from_secs(10));
    agent.keep(&w1.uid()).unwrap();
    agent.snapshot_sent().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(serving(&a1), "a kept pod must keep its proxy");
}

#[test]
fn re_added_pod_with_a_new_netns_gets_a_new_proxy() {
    let mut m = Mesh::new(&["a"]);
    let old = m.lab.add_pod("a", "old");
    let new = m.lab.add_pod("a", "new");
    let w = Workload::mesh(&old, "ns", "sa");
    m.write_config(&[&w], &[]);
    m.start_ztunnel("a", &[]);
    m.enroll(&w);
    assert!(serving(&old));
    // Same uid, different sandbox.
    m.agent("a")
        .add(&new, &w.uid(), &w.namespace, &w.service_account)
        .unwrap();
    assert!(not_serving(&old), "the old sandbox's listeners must close");
    assert!(serving(&new));
}

#[test]
fn config_reload_takes_effect_and_a_bad_file_keeps_the_old_one() {
    let Scene {
        mut m,
        a1,
        b1,
        wa,
        wb,
    } = Scene::new();
    // At first only a1 is known: a1 -> b1 is passthrough, arriving at b1 as plaintext, where
    // b1 (enrolled, but with no workload entry) refuses it.
    m.write_config(&[&wa], &[]);
    m.start_ztunnel("a", &[]);
    m.start_ztunnel("b", &[]);
    m.enroll(&wa);
    m.enroll(&wb);
    let _server = EchoServer::start(&b1, 8080);
    let first = connect(&a1, b1.addr(8080), T).and_then(|c| echo_roundtrip(c, b"1"));
    assert!(first.is_err(), "{first:?}");
    assert!(eventually(T, || m
        .ztunnel_log("b")
        .contains("direction=inbound-plaintext")));

    // Once b1 is in the registry, the same connection goes over HBONE.
    m.write_config(&[&wa, &wb], &[]);
    // Both nodes must have read the new file: b refuses inbound until it knows b1.
    for node in ["a", "b"] {
        assert!(eventually(T, || m
            .ztunnel_log(node)
            .contains("local config reloaded")));
    }
    assert_eq!(
        echo_roundtrip(connect(&a1, b1.addr(8080), T).unwrap(), b"2").unwrap(),
        b"2"
    );
    assert!(eventually(T, || m
        .ztunnel_log("b")
        .contains("direction=inbound pod")));

    // A broken file is rejected, naming the field, and HBONE continues.
    std::fs::write(
        &m.config,
        "workloads: [{name: x, namespace: y, workloadIps: [], protocol: HTTP9}]",
    )
    .unwrap();
    assert!(eventually(T, || m
        .ztunnel_log("a")
        .contains("workloads[0].protocol")));
    assert_eq!(
        echo_roundtrip(connect(&a1, b1.addr(8080), T).unwrap(), b"3").unwrap(),
        b"3"
    );
    let inbound = m.ztunnel_log("b").matches("direction=inbound pod").count();
    assert_eq!(inbound, 2, "the third connection must still be tunnelled");
}

#[test]
fn sigterm_drains_in_flight_connections_then_exits() {
    let mut s = Scene::new();
    s.run(&[]);
    let Scene { mut m, a1, b1, .. } = s;
    let _server = EchoServer::start(&b1, 8080);
    let mut conn = connect(&a1, b1.addr(8080), T).unwrap();
    let mut buf = [0u8; 3];
    conn.write_all(b"one").unwrap();
    conn.read_exact(&mut buf).unwrap();

    let started = std::time::Instant::now();
    m.lab
        .process("ztunnel-a")
        .signal(nix::sys::signal::Signal::SIGTERM);
    // New connections are refused once the listeners close...
    assert!(
        eventually(T, || not_serving(&a1)),
        "listeners stayed open after SIGTERM"
    );
    assert!(
        connect(&a1, b1.addr(8080), T)
            .and_then(|s| echo_roundtrip(s, b"new"))
            .is_err()
    );
    // ...while the one in flight keeps working until it ends.
    conn.write_all(b"two").unwrap();
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"two");
    drop(conn);
    let status = m
        .lab
        .process("ztunnel-a")
        .wait_timeout(Duration::from_secs(10))
        .expect("ztunnel did not exit after draining");
    assert!(status.success(), "exit status {status:?}");
    // It left as soon as the last connection closed, well before the 5 s deadline.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert!(m.ztunnel_log("a").contains("connections_cut=0"));
}

/// A connection still open at the drain deadline is reset on both ends, the pod's own socket
/// and the app's on the far node, so neither can take the cut for a complete transfer.
#[test]
fn connections_open_at_the_drain_deadline_are_reset_on_both_ends() {
    let mut s = Scene::new();
    s.run(&["--drain-timeout", "1s"]);
    let Scene { mut m, a1, b1, .. } = s;
    let server = listen(&b1, 8080);
    let far_end = std::thread::spawn(move || {
        let (mut conn, _) = server.accept().unwrap();
        conn.set_read_timeout(Some(T)).unwrap();
        let mut buf = [0u8; 3];
        conn.read_exact(&mut buf).unwrap();
        conn.write_all(&buf).unwrap();
        conn.read_to_end(&mut Vec::new())
    });
    let mut conn = connect(&a1, b1.addr(8080), T).unwrap();
    conn.set_read_timeout(Some(T)).unwrap();
    let mut buf = [0u8; 3];
    conn.write_all(b"one").unwrap();
    conn.read_exact(&mut buf).unwrap();

    m.lab
        .process("ztunnel-a")
        .signal(nix::sys::signal::Signal::SIGTERM);
    let near = conn.read_to_end(&mut Vec::new());
    assert_eq!(
        near.as_ref().map_err(std::io::Error::kind).err(),
        Some(std::io::ErrorKind::ConnectionReset),
        "the pod's connection ended with {near:?}, not a reset"
    );
    let far = far_end.join().unwrap();
    assert_eq!(
        far.as_ref().map_err(std::io::Error::kind).err(),
        Some(std::io::ErrorKind::ConnectionReset),
        "the far app's connection ended with {far:?}, not a reset"
    );
    m.lab
        .process("ztunnel-a")
        .wait_timeout(Duration::from_secs(10))
        .expect("ztunnel did not exit after the deadline");
    assert!(m.ztunnel_log("a").contains("connections_cut=1"));
}

#[test]
fn readiness_waits_for_the_agents_snapshot() {
    let mut m = Mesh::new(&["a"]);
    let node = m.lab.node("a").ns.clone();
    let ready = || node.http_get("127.0.0.1:15021".parse().unwrap(), "/healthz/ready");
    let sock = m.zds_socket("a");
    let mut agent = mesh_testbed::agent::FakeAgent::bind(&sock);
    // ztunnel up, but no agent session yet.
    let bin = mesh_testbed::binary("ztunnel");
    let ca = m.ca_dir.to_string_lossy().into_owned();
    let args: Vec<String> = [
        "run",
        "--ca-dir",
        &ca,
        "--zds-socket",
        &sock.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    m.lab.spawn("ztunnel-a", &node, &bin, &args, &[]);
    assert!(
        eventually(T, || ready().is_ok()),
        "readiness endpoint never came up"
    );
    let (status, body) = ready().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("waiting for"), "{body}");
    agent.accept(T);
    let (status, body) = ready().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("snapshot"), "{body}");
    agent.snapshot_sent().unwrap();
    assert!(
        eventually(T, || ready().is_ok_and(|(s, _)| s == 200)),
        "not ready after the snapshot: {:?}",
        ready()
    );
    let (status, _) = node
        .http_get("127.0.0.1:15021".parse().unwrap(), "/nope")
        .unwrap();
    assert_eq!(status, 404);
}
