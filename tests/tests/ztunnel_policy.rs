//! L4 authorization end to end: two simulated nodes, real ztunnels, policies from the local
//! config. Each scenario is checked where an operator would look: the client's view, the
//! access log and the metrics (with Istio's `response_flags`).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use mesh_testbed::apps::{EchoServer, connect, echo_roundtrip, payload};
use mesh_testbed::lab::Pod;
use mesh_testbed::mesh::{Mesh, Workload, config_yaml, eventually};
use mesh_testbed::metrics::{Sample, scrape};

const T: Duration = Duration::from_secs(5);

/// Whether a full echo round trip from `from` to `to` works.
fn reaches(from: &Pod, to: SocketAddr) -> bool {
    let data = payload("POLICY-PROBE", 4096);
    let Ok(s) = connect(from, to, T) else {
        return false;
    };
    s.set_read_timeout(Some(T)).unwrap();
    echo_roundtrip(s, &data).is_ok_and(|got| got == data)
}

const POLICIES: &str = r#"policies:
- name: allow-ns-a
  namespace: ns-b
  scope: WorkloadSelector
  action: Allow
  rules: [[[{namespaces: [!Exact ns-a]}]]]
- name: deny-other
  namespace: ns-d
  scope: Namespace
  action: Deny
  rules: [[[{principals: [!Exact cluster.local/ns/ns-c/sa/other]}]]]
- name: deny-admin-port
  namespace: ns-d
  scope: Namespace
  action: Deny
  rules: [[[{destinationPorts: [9000]}]]]
"#;

const CUT_CLIENT: &str = r#"- name: cut-client
  namespace: ns-d
  scope: Namespace
  action: Deny
  rules: [[[{principals: [!Prefix cluster.local/ns/ns-a/]}]]]
"#;

fn count(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

#[test]
fn policy_scenarios_across_two_nodes() {
    let mut m = Mesh::new(&["a", "b"]);
    let a1 = m.lab.add_pod("a", "a1");
    let a2 = m.lab.add_pod("a", "a2");
    let x1 = m.lab.add_pod("a", "x1"); // outside the mesh: a plaintext peer
    let b1 = m.lab.add_pod("b", "b1");
    let b2 = m.lab.add_pod("b", "b2");
    let wa1 = Workload::mesh(&a1, "ns-a", "client");
    let wa2 = Workload::mesh(&a2, "ns-c", "other");
    let mut wb1 = Workload::mesh(&b1, "ns-b", "server");
    wb1.policies = vec!["ns-b/allow-ns-a".into()];
    let wb2 = Workload::mesh(&b2, "ns-d", "db");
    let base = config_yaml(&[&wa1, &wa2, &wb1, &wb2], &[]);
    m.write_config_text(&format!("{base}{POLICIES}"));
    m.start_ztunnel("a", &[]);
    m.start_ztunnel("b", &[]);
    for w in [&wa1, &wa2, &wb1, &wb2] {
        m.enroll(w);
    }
    let _s1 = EchoServer::start(&b1, 8080);
    let s2 = EchoServer::start(&b2, 8080);
    let s2_admin = EchoServer::start(&b2, 9000);

    // Allow by namespace: only ns-a reaches b1; a plaintext peer has no namespace.
    assert!(reaches(&a1, b1.addr(8080)), "ns-a must reach b1");
    assert!(!reaches(&a2, b1.addr(8080)), "ns-c must not reach b1");
    assert!(
        !reaches(&x1, b1.addr(8080)),
        "a plaintext peer must not reach b1"
    );
    // Deny by principal, and by port.
    assert!(reaches(&a1, b2.addr(8080)));
    assert!(!reaches(&a2, b2.addr(8080)), "ns-c/other is denied on b2");
    assert!(!reaches(&a1, b2.addr(9000)), "port 9000 is denied on b2");
    assert_eq!(
        s2_admin.peers().len(),
        0,
        "a denied connection reached the app"
    );

    // A policy change cuts a live connection that it now denies.
    let mut live = connect(&a1, b2.addr(8080), T).unwrap();
    live.set_read_timeout(Some(T)).unwrap();
    let hello = payload("LIVE", 1000);
    live.write_all(&hello).unwrap();
    let mut back = vec![0; hello.len()];
    live.read_exact(&mut back).unwrap();
    assert_eq!(back, hello);
    let peers_before = s2.peers().len();
    m.write_config_text(&format!("{base}{POLICIES}{CUT_CLIENT}"));
    let mut rest = Vec::new();
    let started = std::time::Instant::now();
    let ended = live.read_to_end(&mut rest);
    assert!(
        started.elapsed() < T,
        "the live connection was not cut: {ended:?}"
    );
    assert!(rest.is_empty(), "data after the cut: {} bytes", rest.len());
    assert!(
        !reaches(&a1, b2.addr(8080)),
        "new connections are denied too"
    );
    assert_eq!(s2.peers().len(), peers_before);

    // The access log names each denial and its policy, with the response flag.
    let log_has =
        |m: &mut Mesh, needle: &str| eventually(T, || m.ztunnel_log("b").contains(needle));
    for needle in [
        "reason=denied by policy ns-d/deny-other",
        "reason=denied by policy ns-d/deny-admin-port",
        "reason=no ALLOW policy matched",
        "reason=closed after a policy change: denied by policy ns-d/cut-client",
    ] {
        assert!(
            log_has(&mut m, needle),
            "no {needle:?} in:\n{}",
            m.ztunnel_log("b")
        );
    }
    let log = m.ztunnel_log("b");
    assert!(
        log.lines()
            .any(|l| l.contains("direction=inbound-plaintext")
                && l.contains("response_flags=DENY")
                && l.contains(&format!("src.addr={}", x1.ip))),
        "plaintext denial not logged:\n{log}"
    );

    // Metrics on the destination node count the same events.
    let b = m.lab.node("b").ns.clone();
    let dst = scrape(&b, "127.0.0.1:15020".parse().unwrap());
    let closed = "istio_tcp_connections_closed_total";
    let deny = ("response_flags", "DENY");
    let reporter = ("reporter", "destination");
    let other = (
        "source_principal",
        "spiffe://cluster.local/ns/ns-c/sa/other",
    );
    assert_eq!(
        count(
            &dst,
            closed,
            &[reporter, deny, other, ("destination_workload", "b2")]
        ),
        1.0
    );
    assert_eq!(
        count(
            &dst,
            closed,
            &[reporter, deny, other, ("destination_workload", "b1")]
        ),
        1.0
    );
    assert_eq!(
        count(
            &dst,
            closed,
            &[
                reporter,
                deny,
                ("source_principal", "unknown"),
                ("connection_security_policy", "unknown")
            ]
        ),
        1.0,
        "the plaintext denial"
    );
    assert!(
        count(
            &dst,
            closed,
            &[
                reporter,
                ("response_flags", "-"),
                ("source_workload", "a1"),
                ("source_workload_namespace", "ns-a")
            ]
        ) >= 2.0
    );
    let failures = "ztunnel_connection_failures_total";
    assert_eq!(count(&dst, failures, &[("reason", "policy_denied")]), 5.0);
    assert_eq!(count(&dst, failures, &[("reason", "policy_revoked")]), 1.0);
    assert_eq!(count(&dst, "ztunnel_policy_revocations_total", &[]), 1.0);
    // And the source node sees the peer's 401 as a denial too.
    let a = m.lab.node("a").ns.clone();
    let src = scrape(&a, "127.0.0.1:15020".parse().unwrap());
    assert!(
        count(
            &src,
            closed,
            &[("reporter", "source"), deny, ("destination_workload", "b2")]
        ) >= 2.0
    );
    assert!(
        count(
            &src,
            failures,
            &[("direction", "outbound"), ("reason", "peer_denied")]
        ) >= 3.0
    );
}

#[test]
fn dry_run_policies_only_log() {
    let mut m = Mesh::new(&["a", "b"]);
    let a1 = m.lab.add_pod("a", "a1");
    let b1 = m.lab.add_pod("b", "b1");
    let wa = Workload::mesh(&a1, "ns-a", "client");
    let wb = Workload::mesh(&b1, "ns-b", "server");
    let base = config_yaml(&[&wa, &wb], &[]);
    m.write_config_text(&format!(
        "{base}policies:\n- {{name: would-deny, namespace: ns-b, scope: Namespace, action: Deny, dryRun: true, rules: [[]]}}\n"
    ));
    m.start_ztunnel("a", &[]);
    m.start_ztunnel("b", &[]);
    m.enroll(&wa);
    m.enroll(&wb);
    let _server = EchoServer::start(&b1, 8080);
    assert!(reaches(&a1, b1.addr(8080)), "a dry-run DENY must not deny");
    assert!(eventually(T, || m
        .ztunnel_log("b")
        .contains("dry_run=deny (denied by policy ns-b/would-deny)")));
}
