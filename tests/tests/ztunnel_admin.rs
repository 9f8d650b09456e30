//! ztunnel's operator surfaces against running processes: the admin endpoint and the
//! `ztunnel-admin` CLI, the metrics scrape (parsed by Prometheus' own parser), and the admin
//! port's refusal of non-local clients.

use std::io::{Read, Write};
use std::time::Duration;

use mesh_testbed::apps::{EchoServer, connect, payload};
use mesh_testbed::lab::Ns;
use mesh_testbed::mesh::{Scene, eventually};
use mesh_testbed::metrics::scrape;

const T: Duration = Duration::from_secs(5);

/// Runs `ztunnel-admin args` inside `ns`: (success, stdout, stderr).
fn cli(ns: &Ns, args: &[&str]) -> (bool, String, String) {
    let out = ns
        .open()
        .command(mesh_testbed::binary("ztunnel-admin"))
        .args(args)
        .output()
        .expect("ztunnel-admin");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(ns: &Ns, args: &[&str]) -> String {
    let (success, out, err) = cli(ns, args);
    assert!(success, "ztunnel-admin {args:?} failed: {err}");
    out
}

#[test]
fn admin_endpoint_cli_and_metrics_on_a_running_ztunnel() {
    let mut s = Scene::new();
    s.m.write_config(&[&s.wa, &s.wb], &[]);
    s.m.start_ztunnel("a", &[]);
    // Node b's admin listens on every address, as a careless operator might set it.
    s.m.start_ztunnel("b", &["--admin-addr", "0.0.0.0:15000"]);
    s.m.enroll(&s.wa);
    s.m.enroll(&s.wb);
    let _server = EchoServer::start(&s.b1, 8080);
    let a = s.m.lab.node("a").ns.clone();
    let b = s.m.lab.node("b").clone();

    // One live connection so the connection and pool views have something to show.
    let mut live = connect(&s.a1, s.b1.addr(8080), T).unwrap();
    live.set_read_timeout(Some(T)).unwrap();
    let data = payload("ADMIN", 100);
    live.write_all(&data).unwrap();
    let mut back = vec![0; data.len()];
    live.read_exact(&mut back).unwrap();

    // config_dump: everything, certificates without keys.
    let (status, dump) = a
        .http_get("127.0.0.1:15000".parse().unwrap(), "/config_dump")
        .unwrap();
    assert_eq!(status, 200, "{dump}");
    assert!(
        !dump.contains("PRIVATE KEY"),
        "a key leaked into config_dump"
    );
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["workloads"].as_array().unwrap().len(), 2);
    let cert = &dump["certificates"][0];
    assert_eq!(cert["identity"], "spiffe://cluster.local/ns/ns-a/sa/client");
    assert_eq!(cert["state"], "valid");
    assert!(
        cert["chain"][0]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert!(cert["expires_in_seconds"].as_i64().unwrap() > 3600);
    assert_eq!(dump["pods"][0]["state"], "running");
    assert_eq!(dump["zds"]["connected"], true);

    // The CLI's tables.
    let workloads = ok(&a, &["workloads"]);
    assert!(workloads.starts_with("NAMESPACE"), "{workloads}");
    assert!(
        workloads.contains("ns-b") && workloads.contains(&s.b1.ip.to_string()),
        "{workloads}"
    );
    let certs = ok(&a, &["certs"]);
    assert!(
        certs.contains("spiffe://cluster.local/ns/ns-a/sa/client  valid"),
        "{certs}"
    );
    let pods = ok(&a, &["pods"]);
    assert!(pods.contains("a1") && pods.contains("running"), "{pods}");
    let conns = ok(&a, &["connections"]);
    assert!(
        conns.contains("outbound") && conns.contains(&s.b1.addr(8080).to_string()),
        "{conns}"
    );
    let pool = ok(&a, &["pool"]);
    assert!(pool.contains(&format!("{}:15008", s.b1.ip)), "{pool}");
    assert!(ok(&a, &["policies"]).contains("(none)"));
    let json = ok(&a, &["--json", "services"]);
    assert!(
        serde_json::from_str::<serde_json::Value>(&json).is_ok(),
        "{json}"
    );
    // The server side lists the inbound connection with the client's identity.
    let inbound = ok(&b.ns, &["connections"]);
    assert!(
        inbound.contains("inbound") && inbound.contains("spiffe://cluster.local/ns/ns-a/sa/client"),
        "{inbound}"
    );

    // Log level: read, change one module, refuse nonsense.
    assert_eq!(ok(&a, &["log"]).trim(), "info,ztunnel=debug");
    assert_eq!(
        ok(&a, &["log", "ztunnel::proxy=trace"]).trim(),
        "info,ztunnel=debug,ztunnel::proxy=trace"
    );
    let (success, _, err) = cli(&a, &["log", "ztunnel::proxy=loud"]);
    assert!(!success && err.contains("not a level"), "{err}");
    assert_eq!(ok(&a, &["log", "info"]).trim(), "info");
    let (status, _) = a
        .http_get("127.0.0.1:15000".parse().unwrap(), "/nope")
        .unwrap();
    assert_eq!(status, 404);

    // Metrics: valid OpenMetrics with Istio's names and the readings.
    drop(live);
    assert!(eventually(T, || {
        let m = scrape(&a, "127.0.0.1:15020".parse().unwrap());
        m.iter()
            .any(|x| x.name == "istio_tcp_connections_closed_total")
    }));
    let m = scrape(&a, "127.0.0.1:15020".parse().unwrap());
    let value = |name: &str| m.iter().find(|x| x.name == name).map(|x| x.value);
    let opened = m
        .iter()
        .find(|x| x.name == "istio_tcp_connections_opened_total")
        .expect("opened counter");
    assert_eq!(opened.label("reporter"), Some("source"));
    assert_eq!(opened.label("source_workload"), Some("a1"));
    assert_eq!(opened.label("destination_workload_namespace"), Some("ns-b"));
    assert_eq!(
        opened.label("destination_principal"),
        Some("spiffe://cluster.local/ns/ns-b/sa/server")
    );
    assert_eq!(
        opened.label("connection_security_policy"),
        Some("mutual_tls")
    );
    assert_eq!(opened.label("request_protocol"), Some("tcp"));
    let sent = m
        .iter()
        .find(|x| x.name == "istio_tcp_received_bytes_total")
        .expect("bytes counter");
    assert_eq!(sent.value, 100.0, "request bytes of the closed connection");
    assert_eq!(value("ztunnel_zds_connected"), Some(1.0));
    assert!(value("process_open_fds").unwrap() > 5.0);
    assert!(value("process_resident_memory_bytes").unwrap() > 1e6);
    assert!(m.iter().any(|x| x.name == "ztunnel_pod_proxies"
        && x.label("state") == Some("running")
        && x.value == 1.0));
    assert!(
        m.iter()
            .any(|x| x.name == "ztunnel_certificate_expiry_timestamp_seconds"
                && x.label("identity") == Some("spiffe://cluster.local/ns/ns-a/sa/client"))
    );

    // The admin port refuses a client on another node even when bound wide...
    let remote = std::net::SocketAddr::new(b.ip, 15000);
    let (status, body) = a.http_get(remote, "/config_dump").unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(!body.contains("workloads"));
    // ...and answers on the node itself.
    let (status, _) =
        b.ns.http_get("127.0.0.1:15000".parse().unwrap(), "/config_dump")
            .unwrap();
    assert_eq!(status, 200);
    // Node a's admin is on loopback only: nothing listens on its node address.
    let node_a_ip = s.m.lab.node("a").ip;
    assert!(
        b.ns.http_get(std::net::SocketAddr::new(node_a_ip, 15000), "/")
            .is_err()
    );

    // quitquitquit drains and exits cleanly.
    ok(&a, &["quit"]);
    let status = s.m.lab.process("ztunnel-a").wait_timeout(T);
    assert!(
        status.is_some_and(|s| s.success()),
        "ztunnel did not exit cleanly: {status:?}"
    );
    assert!(
        s.m.ztunnel_log("a")
            .contains("drain requested through /quitquitquit")
    );
}

#[test]
fn cli_says_what_is_wrong_when_ztunnel_is_not_there() {
    let s = Scene::new();
    let a = s.m.lab.node("a").ns.clone();
    let (success, _, err) = cli(&a, &["workloads"]);
    assert!(!success);
    assert!(err.contains("is ztunnel running here?"), "{err}");
}

/// Sends `request` as raw bytes to `addr` inside `ns` and returns whatever comes back.
fn raw(ns: &Ns, addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = ns
        .open()
        .run(|| std::net::TcpStream::connect_timeout(&addr, T))
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn hostile_admin_requests_get_errors_and_the_endpoint_survives() {
    let mut s = Scene::new();
    s.m.write_config(&[&s.wa], &[]);
    s.m.start_ztunnel("a", &[]);
    let a = s.m.lab.node("a").ns.clone();
    let admin: std::net::SocketAddr = "127.0.0.1:15000".parse().unwrap();
    let req = |line: &str| format!("{line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let long_path = format!("/{}", "A".repeat(200_000));
    let cases: Vec<(String, &str)> = vec![
        ("GARBAGE\r\n\r\n".to_string(), "400"),
        (req("POST /logging"), "400 Bad Request"),
        (
            req("POST /logging?level=info%2C%5Bbad"),
            "invalid log filter",
        ),
        (req("POST /logging?a%3D%3D=info"), "is not a module path"),
        (req("POST /logging?ztunnel=%FF%FE"), "is not a level"),
        (req("GET /quitquitquit"), "405"),
        (req("DELETE /config_dump"), "404"),
        (req(&format!("GET {long_path}")), "HTTP/1.1 4"),
    ];
    for (request, want) in cases {
        let got = raw(&a, admin, request.as_bytes());
        assert!(got.contains(want), "{:.60}... answered {got:.300}", request);
    }
    // Still serving, and the log filter was never changed by the bad requests.
    let (status, _) = a.http_get(admin, "/config_dump").unwrap();
    assert_eq!(status, 200);
    assert_eq!(ok(&a, &["log"]).trim(), "info,ztunnel=debug");
    assert!(
        s.m.lab
            .process("ztunnel-a")
            .wait_timeout(Duration::ZERO)
            .is_none()
    );
}
