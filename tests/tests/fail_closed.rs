//! States in which an enrolled pod's traffic could slip out unprotected or unauthorized, each
//! driven end to end on simulated nodes with real processes: ztunnel before istiod's first
//! push, a pod with no workload entry, plaintext aimed at an address that is not the pod's,
//! a CNI ADD that races the namespace watch. Each test fails if the code fails open.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_testbed::apps::{EchoServer, connect, echo_roundtrip, has_rules, proxied};
use mesh_testbed::cni::{Sandbox, exec_plugin};
use mesh_testbed::control_plane::ControlPlane;
use mesh_testbed::lab::Pod;
use mesh_testbed::mesh::{Mesh, Scene, Workload, eventually};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

/// A full echo round trip from `from` to `to` succeeded.
fn reaches(from: &Pod, to: SocketAddr) -> bool {
    let data = b"FAIL-CLOSED-PROBE".to_vec();
    connect(from, to, Duration::from_secs(3))
        .and_then(|s| echo_roundtrip(s, &data))
        .is_ok_and(|got| got == data)
}

/// In Istio mode, before istiod's first push every destination would look unknown
/// (plaintext passthrough) and every pod policy-free (allow-all). ztunnel must not take pods
/// until it has that push: the pod stays pending with its rules in place, its traffic fails
/// instead of leaving in plaintext, and it is enrolled once the push arrives.
#[test]
fn istio_mode_takes_no_pod_before_the_first_push() {
    let mut m = Mesh::new(&["a", "b"]);
    let a1 = m.lab.add_pod("a", "a1");
    let b1 = m.lab.add_pod("b", "b1");
    let wa = Workload::mesh(&a1, "ns-a", "client");
    let wb = Workload::mesh(&b1, "ns-b", "server");
    let node_a = m.lab.node("a").clone();
    let cp = ControlPlane::start(&node_a.ns, node_a.ip, m.lab.dir());
    cp.set_workloads(&[&wa, &wb]);
    cp.hold();
    let server = EchoServer::start(&b1, 8080);
    m.write_pods("a", &[&wa], "");
    m.start_agent("a", &[]);
    let root = cp.root_cert().display().to_string();
    m.start_ztunnel("a", &["--xds-address", &cp.url(), "--xds-root-cert", &root]);

    assert!(
        eventually(T, || m
            .ztunnel_log("a")
            .contains("waiting for istiod's first push")),
        "{}",
        m.ztunnel_log("a")
    );
    assert!(
        eventually(T, || has_rules(&a1)),
        "the agent installed no rules"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(!proxied(&a1), "ztunnel took the pod before the first push");
    let (_, pods) = m.agent_get("a", "/pods");
    assert!(
        pods.contains("pending") && !pods.contains("\"enrolled\""),
        "{pods}"
    );
    // b1 is a mesh workload to istiod; to a ztunnel that guessed, it would be passthrough.
    assert!(!reaches(&a1, b1.addr(8080)), "traffic left before sync");
    assert!(
        server.peers().is_empty(),
        "plaintext reached {:?}",
        server.peers()
    );

    cp.release();
    assert!(eventually(T, || proxied(&a1)), "{}", m.ztunnel_log("a"));
    assert!(eventually(T, || m.agent_get("a", "/readyz").0 == 200));
    assert!(server.peers().is_empty());
}

/// An enrolled pod whose workload entry has not arrived yet cannot have its selector
/// policies applied, so nothing may reach it (not allow-all) until the entry is there.
#[test]
fn a_pod_without_a_workload_entry_takes_no_inbound() {
    let mut s = Scene::new();
    s.m.write_config(&[&s.wa], &[]);
    s.m.start_ztunnel("a", &[]);
    s.m.start_ztunnel("b", &[]);
    s.m.enroll(&s.wa);
    s.m.enroll(&s.wb);
    let server = EchoServer::start(&s.b1, 8080);

    // To a1's ztunnel b1 is unknown (passthrough), so it arrives on b1's plaintext port.
    assert!(!reaches(&s.a1, s.b1.addr(8080)));
    assert!(server.peers().is_empty(), "{:?}", server.peers());
    assert!(
        eventually(T, || s
            .m
            .ztunnel_log("b")
            .contains("reason=the destination pod has no workload entry yet")),
        "{}",
        s.m.ztunnel_log("b")
    );

    s.m.write_config(&[&s.wa, &s.wb], &[]);
    assert!(
        eventually(T, || reaches(&s.a1, s.b1.addr(8080))),
        "the entry arrived but traffic still fails"
    );
}

/// A packet routed to the pod for another address (here one on the pod's loopback) is
/// captured like any inbound one; ztunnel must not connect onward to that address.
#[test]
fn plaintext_inbound_to_an_address_that_is_not_the_pods_is_refused() {
    let mut s = Scene::new();
    let x1 = s.m.lab.add_pod("a", "x1"); // outside the mesh
    s.run(&[]);
    let server = EchoServer::start(&s.b1, 8080);
    let other: std::net::IpAddr = "198.18.2.200".parse().unwrap();
    s.b1.ns
        .ip(&["addr", "add", &format!("{other}/32"), "dev", "lo"]);
    let node_b = s.m.lab.node("b").clone();
    let route = node_b
        .ns
        .exec("ip", &["route", "get", &s.b1.ip.to_string()]);
    let dev = route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .unwrap_or_else(|| panic!("no device in {route:?}"))
        .to_string();
    node_b
        .ns
        .ip(&["route", "add", &format!("{other}/32"), "dev", &dev]);

    // The pod's own address works in plaintext ...
    assert!(reaches(&x1, s.b1.addr(8080)));
    let seen = server.peers().len();
    // ... the other address is refused.
    assert!(!reaches(&x1, SocketAddr::new(other, 8080)));
    assert_eq!(server.peers().len(), seen, "reached the app via {other}");
    assert!(
        eventually(T, || s.m.ztunnel_log("b").contains(&format!(
            "destination {other}:8080 is not this pod's address"
        ))),
        "{}",
        s.m.ztunnel_log("b")
    );
}

/// Runs `ambient-cni` on `pod`'s node as the runtime would for its sandbox (namespace `ns`).
fn cni(m: &Mesh, pod: &Pod, ns: &str, command: &str) -> std::process::Output {
    let sandbox = Sandbox {
        container_id: format!("{}-sandbox", pod.name),
        netns: pod.ns.path(),
        namespace: ns.into(),
        name: pod.name.clone(),
    };
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "fail-closed",
        "type": "ambient-cni",
        "cni_agent_run_dir": m.agent_run_dir(&pod.node),
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": pod.ns.path()}],
            "ips": [{"address": format!("{}/32", pod.ip), "interface": 0}],
        },
    });
    let plugin = mesh_testbed::binary("ambient-cni");
    let node = m.lab.node(&pod.node);
    exec_plugin(&node.ns, &plugin, command, &sandbox, "/usr/lib/cni", &conf).0
}

/// Pod `a1` of ambient namespace `shop` (uid `shop/a1`) in node a's pod file, the real
/// agent and ztunnel on node a, and a CNI ADD for it that succeeds.
fn enroll_by_cni(m: &mut Mesh, a1: &Pod) {
    std::fs::write(
        m.pod_file("a"),
        format!(
            "namespaces: [{{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}]\npods:\n- {{name: a1, namespace: shop, uid: shop/a1, serviceAccount: app, ips: [\"{}\"]}}\n",
            a1.ip
        ),
    )
    .unwrap();
    m.start_agent("a", &[]);
    m.start_ztunnel("a", &[]);
    assert!(eventually(T, || m.agent_get("a", "/readyz").0 == 200));
    let add = cni(m, a1, "shop", "ADD");
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stdout)
    );
}

/// A CNI ADD for a pod whose namespace the agent has not seen yet (its namespace watch lags
/// the runtime) is not "not in the mesh": it fails with a clear error, and succeeds once the
/// namespace is known.
#[test]
fn cni_add_before_the_namespace_is_known_fails_until_it_is() {
    let mut m = Mesh::new(&["a"]);
    let a1 = m.lab.add_pod("a", "a1");
    let pods = |namespaces: &str| {
        format!(
            "namespaces: {namespaces}\npods:\n- {{name: a1, namespace: late, uid: late/a1, serviceAccount: app, ips: [\"{}\"]}}\n",
            a1.ip
        )
    };
    std::fs::write(m.pod_file("a"), pods("[]")).unwrap();
    m.start_agent("a", &[]);
    m.start_ztunnel("a", &[]);
    assert!(eventually(T, || m.agent_get("a", "/readyz").0 == 200));

    let out = cni(&m, &a1, "late", "ADD");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "ADD passed: {stdout}");
    assert!(
        stdout.contains("namespace is not known to the node agent yet"),
        "{stdout}"
    );
    assert!(!proxied(&a1));

    std::fs::write(
        m.pod_file("a"),
        pods("[{name: late, labels: {istio.io/dataplane-mode: ambient}}]"),
    )
    .unwrap();
    let added = eventually(Duration::from_secs(20), || {
        cni(&m, &a1, "late", "ADD").status.success()
    });
    assert!(added, "ADD still fails: {}", m.agent_log("a"));
    assert!(proxied(&a1) && has_rules(&a1));
}

/// The netns path and addresses the CNI plugin reported are kept when the pod source updates
/// the pod without them (no re-search of the node), and a pod whose sandbox the runtime
/// deleted is not enrolled again from the pod source: it waits for a new sandbox's ADD.
#[test]
fn what_cni_reported_is_kept_and_a_deleted_sandbox_is_not_re_enrolled() {
    let mut m = Mesh::new(&["a"]);
    let a1 = m.lab.add_pod("a", "a1");
    let pods = |labels: &str, ips: &str| {
        format!(
            "namespaces: [{{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}]\npods:\n- {{name: a1, namespace: shop, uid: shop/a1, serviceAccount: app, labels: {labels}, ips: [{ips}]}}\n"
        )
    };
    let file = m.pod_file("a");
    let write = |yaml: String| {
        std::fs::write(file.with_extension("tmp"), yaml).unwrap();
        std::fs::rename(file.with_extension("tmp"), &file).unwrap();
    };
    // The API server does not know the pod's address yet when the runtime runs CNI ADD.
    write(pods("{}", ""));
    m.start_agent("a", &[]);
    m.start_ztunnel("a", &[]);
    assert!(eventually(T, || m.agent_get("a", "/readyz").0 == 200));
    let out = cni(&m, &a1, "shop", "ADD");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(proxied(&a1));

    // The agent could no longer find this netns by searching; it must not need to.
    let link = m.lab.node_netns_dir("a").join("a1");
    std::fs::remove_file(&link).unwrap();
    write(pods("{v: '2'}", &format!("\"{}\"", a1.ip)));
    std::thread::sleep(Duration::from_millis(1500));
    let (_, status) = m.agent_get("a", "/pods");
    assert!(
        status.contains("enrolled") && !status.contains("pending"),
        "{status}\n{}",
        m.agent_log("a")
    );
    std::os::unix::fs::symlink(a1.ns.path(), &link).unwrap();

    let out = cni(&m, &a1, "shop", "DEL");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!proxied(&a1) && !has_rules(&a1));
    // The pod source changes the pod again: still no enrollment into the deleted sandbox.
    write(pods("{v: '3'}", &format!("\"{}\"", a1.ip)));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !proxied(&a1) && !has_rules(&a1),
        "re-enrolled after DEL: {}",
        m.agent_log("a")
    );
    // A new sandbox's ADD brings it back.
    let out = cni(&m, &a1, "shop", "ADD");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(proxied(&a1));
}

/// Over ZDS the agent hands out pods' network namespaces, so only ztunnel's user may use it:
/// the socket is 0600, and a peer of another uid that reaches it anyway (here the mode is
/// loosened by hand) is refused before anything is sent.
#[test]
fn zds_hands_no_netns_to_a_peer_of_another_user() {
    use std::os::unix::fs::PermissionsExt;
    let mut m = Mesh::new(&["a"]);
    let a1 = m.lab.add_pod("a", "a1");
    let wa = Workload::mesh(&a1, "ns-a", "client");
    m.write_config(&[&wa], &[]);
    m.write_pods("a", &[&wa], "");
    m.start_agent("a", &[]);
    m.start_ztunnel("a", &[]);
    assert!(eventually(T, || proxied(&a1)), "{}", m.agent_log("a"));

    let sock = m.zds_socket("a");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "ZDS socket mode {mode:o}");
    let loosen = |path: &std::path::Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    loosen(m.lab.dir(), 0o711);
    loosen(&sock, 0o666);
    // ztunnel's hello, then whatever the agent sends: a netns descriptor would be a leak.
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
s.settimeout(5)
try:
    s.send(b"\x08\x01")
    data, anc, _, _ = s.recvmsg(1024, socket.CMSG_SPACE(4 * 16))
except (BrokenPipeError, ConnectionResetError):
    data, anc = b"", []
except socket.timeout:
    print("silent")
    sys.exit(0)
print("closed" if not data and not anc else "sent %d bytes and %d descriptor messages" % (len(data), len(anc)))
"#;
    let out = std::process::Command::new("setpriv")
        // Debian's python3 (./x installs it): one under /root would not run as nobody.
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["/usr/bin/python3", "-c"])
        .arg(script)
        .arg(&sock)
        .output()
        .expect("setpriv and /usr/bin/python3");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.trim() == "closed",
        "a peer running as nobody: {said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        eventually(T, || m.agent_log("a").contains("refused a ZDS connection")),
        "{}",
        m.agent_log("a")
    );
    // ztunnel itself is still served.
    assert!(proxied(&a1));
}

/// CNI CHECK says the pod is intact only while a ztunnel serves it: with rules in place and
/// no ztunnel the pod's traffic goes nowhere, and the runtime must hear so.
#[test]
fn cni_check_fails_while_no_ztunnel_serves_the_pod() {
    let mut m = Mesh::new(&["a"]);
    let a1 = m.lab.add_pod("a", "a1");
    let wa = Workload::mesh(&a1, "shop", "app");
    m.write_config(&[&wa], &[]);
    enroll_by_cni(&mut m, &a1);
    assert!(cni(&m, &a1, "shop", "CHECK").status.success());

    m.lab.stop("ztunnel-a");
    let failed = eventually(T, || {
        let out = cni(&m, &a1, "shop", "CHECK");
        !out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("no live ztunnel serves the pod")
    });
    assert!(failed, "CHECK passed with no ztunnel: {}", m.agent_log("a"));
    assert!(
        has_rules(&a1),
        "the rules stay: traffic is held, not let out"
    );

    m.start_ztunnel("a", &[]);
    assert!(
        eventually(T, || cni(&m, &a1, "shop", "CHECK").status.success()),
        "{}",
        m.agent_log("a")
    );
}

/// With DNS capture on, the pod's port 53 goes to 15053. While nothing serves 15053 in the
/// pod (a ztunnel run without its DNS proxy) the pod is not called enrolled: it stays pending
/// with the reason, rather than starting with its DNS going nowhere. Once something serves
/// UDP and TCP there, it is enrolled. (With the proxy on, `ztunnel_dns.rs` shows it served.)
#[test]
fn dns_capture_is_refused_while_nothing_serves_15053() {
    let mut s = Scene::new();
    s.m.write_config(&[&s.wa, &s.wb], &[]);
    s.m.write_pods("a", &[&s.wa], "");
    s.m.start_agent("a", &["--dns-capture"]);
    s.m.start_ztunnel("a", &["--dns-proxy", "false"]);
    let pending = || {
        let (_, pods) = s.m.agent_get("a", "/pods");
        pods.contains("DNS capture is on but nothing serves UDP or TCP on port 15053")
    };
    assert!(eventually(T, pending), "{}", s.m.agent_get("a", "/pods").1);
    assert!(
        proxied(&s.a1),
        "ztunnel should serve the pod's TCP meanwhile"
    );
    let (_, pods) = s.m.agent_get("a", "/pods");
    assert!(!pods.contains("\"state\": \"enrolled\""), "{pods}");

    // A stand-in DNS proxy in the pod.
    let (_udp, _tcp) =
        s.a1.ns
            .open()
            .run(|| {
                (
                    std::net::UdpSocket::bind("127.0.0.1:15053").unwrap(),
                    std::net::TcpListener::bind("127.0.0.1:15053").unwrap(),
                )
            })
            .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || s
            .m
            .agent_get("a", "/pods")
            .1
            .contains("\"state\": \"enrolled\"")),
        "{}",
        s.m.agent_get("a", "/pods").1
    );
}

/// UDP of an enrolled pod (other than DNS with capture on) is not captured: ztunnel carries
/// TCP only, as Istio's does, so a pod's UDP leaves as it would outside the mesh. This pins
/// that down so a change to it is deliberate (README, "Reliability").
#[test]
fn udp_of_an_enrolled_pod_passes_uncaptured() {
    let mut s = Scene::new();
    s.run_with_agents(&[]);
    let server =
        s.b1.ns
            .open()
            .run(|| std::net::UdpSocket::bind("0.0.0.0:9999"))
            .unwrap()
            .unwrap();
    server.set_read_timeout(Some(T)).unwrap();
    let client =
        s.a1.ns
            .open()
            .run(|| std::net::UdpSocket::bind("0.0.0.0:0"))
            .unwrap()
            .unwrap();
    client.set_read_timeout(Some(T)).unwrap();
    client.send_to(b"datagram", s.b1.addr(9999)).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = server.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"datagram");
    // It arrives from the pod itself, not through a proxy.
    assert_eq!(from.ip(), s.a1.ip);
    server.send_to(b"reply", from).unwrap();
    let (n, _) = client.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"reply");
}

/// CNI GC: a sandbox the plugin enrolled that the runtime no longer lists in
/// `cni.dev/valid-attachments` (its DEL was lost, e.g. while the agent was down) is removed
/// as if the DEL had come: out of ztunnel, rules gone, not enrolled again from the pod
/// source. Listed sandboxes are left alone.
#[test]
fn cni_gc_removes_sandboxes_the_runtime_no_longer_lists() {
    let mut m = Mesh::new(&["a"]);
    let a1 = m.lab.add_pod("a", "a1");
    enroll_by_cni(&mut m, &a1);
    assert!(proxied(&a1));

    let gc = |valid: &[&str]| {
        let sandbox = Sandbox {
            container_id: String::new(),
            netns: Default::default(),
            namespace: String::new(),
            name: String::new(),
        };
        let attachments: Vec<_> = valid
            .iter()
            .map(|c| json!({"containerID": c, "ifname": "eth0"}))
            .collect();
        let conf = json!({
            "cniVersion": "1.1.0",
            "name": "fail-closed",
            "type": "ambient-cni",
            "cni_agent_run_dir": m.agent_run_dir("a"),
            "cni.dev/valid-attachments": attachments,
        });
        let plugin = mesh_testbed::binary("ambient-cni");
        exec_plugin(
            &m.lab.node("a").ns,
            &plugin,
            "GC",
            &sandbox,
            "/usr/lib/cni",
            &conf,
        )
        .0
    };
    let out = gc(&["a1-sandbox", "someone-else"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        proxied(&a1) && has_rules(&a1),
        "a listed sandbox was collected"
    );

    let out = gc(&["someone-else"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !proxied(&a1) && !has_rules(&a1),
        "GC left the sandbox enrolled"
    );
    let (_, pods) = m.agent_get("a", "/pods");
    assert!(pods.contains("sandbox deleted by the runtime"), "{pods}");
    assert!(
        m.agent_log("a")
            .contains("not among the runtime's valid attachments")
    );
}
