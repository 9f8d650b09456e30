//! In-pod redirection against the real kernel: the node agent's rules applied in network
//! namespaces, checked as installed state and as what they do to real traffic.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use mesh_netns::NetNs;
use mesh_testbed::apps::{EchoServer, connect, echo_roundtrip};
use mesh_testbed::lab::{Lab, Pod};
use node_agent::redirect::{Check, Options, Redirector, TABLE, plan};
use socket2::{Domain, SockRef, Socket, Type};

const T: Duration = Duration::from_secs(5);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Everything the rules can leave behind in a netns, as text.
fn installed(pod: &Pod) -> String {
    let mut s = pod.ns.exec("nft", &["list", "ruleset"]);
    for fam in ["-4", "-6"] {
        s += &pod
            .ns
            .exec("ip", &[fam, "rule", "list", "priority", "32764"]);
        let routes = pod.ns.exec("ip", &[fam, "route", "show", "table", "all"]);
        s.extend(
            routes
                .lines()
                .filter(|l| l.contains("table 100"))
                .map(|l| format!("{l}\n")),
        );
    }
    s
}

fn ns(pod: &Pod) -> Arc<NetNs> {
    Arc::new(pod.ns.open())
}

#[test]
fn apply_is_idempotent_and_remove_leaves_nothing() {
    let mut lab = Lab::new();
    lab.add_node("a");
    let rt = rt();
    let r = Redirector::new();
    let variants = [
        // IPv6 is the pod's own: asking for v4 only in a pod with IPv6 still captures both,
        // and a pod with IPv6 switched off gets IPv4 rules only (see below).
        (
            "v4-asked",
            Options {
                ipv6: false,
                ..Options::default()
            },
        ),
        ("dual", Options::default()),
        ("no-ipv6", Options::default()),
        (
            "dns",
            Options {
                dns_capture: true,
                ..Options::default()
            },
        ),
        (
            "bypass",
            Options {
                capture_inbound: false,
                ..Options::default()
            },
        ),
    ];
    for (name, opts) in variants {
        let pod = lab.add_pod("a", &format!("p-{name}"));
        let pod_ipv6 = name != "no-ipv6";
        if !pod_ipv6 {
            pod.ns
                .exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        }
        let before = installed(&pod);
        rt.block_on(r.apply(&ns(&pod), opts)).unwrap();
        let once = installed(&pod);
        // What the agent replayed over netlink lists exactly as the plan does when `nft`
        // itself installs it.
        let effective = Options {
            ipv6: pod_ipv6,
            ..opts
        };
        let direct = lab.add_pod("a", &format!("d-{name}"));
        let script = lab.dir().join(format!("{name}.nft"));
        std::fs::write(&script, plan(&effective).table()).unwrap();
        direct.ns.exec("nft", &["-f", script.to_str().unwrap()]);
        let list = |p: &Pod| p.ns.exec("nft", &["list", "table", "inet", TABLE]);
        assert_eq!(list(&pod), list(&direct), "{name}: replay differs from nft");
        rt.block_on(r.apply(&ns(&pod), opts)).unwrap();
        assert_eq!(
            installed(&pod),
            once,
            "{name}: second apply changed something"
        );
        assert_eq!(
            rt.block_on(r.check(&ns(&pod), opts)).unwrap(),
            Check::Intact,
            "{name}"
        );
        assert!(once.contains("lookup 100"), "{name}: {once}");
        let families = if pod_ipv6 { 2 } else { 1 };
        assert_eq!(once.contains("ip6 daddr"), pod_ipv6, "{name}: {once}");
        assert_eq!(
            once.matches("local default dev lo table 100").count(),
            families,
            "{name}: {once}"
        );
        assert_eq!(
            once.matches("fwmark 0x111/0xfff lookup 100").count(),
            families,
            "{name}: {once}"
        );
        rt.block_on(r.remove(&ns(&pod))).unwrap();
        assert_eq!(installed(&pod), before, "{name}: remove left something");
        assert_eq!(
            rt.block_on(r.check(&ns(&pod), opts)).unwrap(),
            Check::Missing,
            "{name}"
        );
        rt.block_on(r.remove(&ns(&pod))).unwrap();
    }
}

#[test]
fn drift_is_detected_and_repaired() {
    let mut lab = Lab::new();
    lab.add_node("a");
    let pod = lab.add_pod("a", "p");
    let rt = rt();
    let r = Redirector::new();
    let opts = Options::default();
    let apply = || rt.block_on(r.apply(&ns(&pod), opts)).unwrap();
    let check = || rt.block_on(r.check(&ns(&pod), opts)).unwrap();
    // (what, command, the chain the drift report must name)
    let tampering: [(&str, &[&str], &str); 6] = [
        (
            "rule flushed",
            &["nft", "flush", "chain", "inet", TABLE, "output-nat"],
            "output-nat",
        ),
        (
            "rule added",
            &[
                "nft",
                "add",
                "rule",
                "inet",
                TABLE,
                "output-nat",
                "tcp",
                "dport",
                "9",
                "accept",
            ],
            "output-nat",
        ),
        (
            "rule inserted first",
            &[
                "nft",
                "insert",
                "rule",
                "inet",
                TABLE,
                "prerouting-nat",
                "tcp",
                "dport",
                "9",
                "accept",
            ],
            "prerouting-nat",
        ),
        (
            "chain added",
            &["nft", "add", "chain", "inet", TABLE, "extra"],
            "extra",
        ),
        (
            "table deleted",
            &["nft", "delete", "table", "inet", TABLE],
            "",
        ),
        (
            "policy rule deleted",
            &["ip", "-4", "rule", "del", "priority", "32764"],
            "",
        ),
    ];
    for (what, cmd, chain) in tampering {
        apply();
        assert_eq!(check(), Check::Intact);
        pod.ns.exec(cmd[0], &cmd[1..]);
        match check() {
            Check::Drifted(why) => assert!(why.contains(chain), "{what}: {why}"),
            other => panic!("{what} went unnoticed: {other:?}"),
        }
        apply();
        assert_eq!(check(), Check::Intact, "{what} not repaired");
    }
}

fn listen(pod: &Pod, addr: SocketAddr) -> TcpListener {
    pod.ns
        .open()
        .run(|| {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            if addr.is_ipv6() {
                s.set_only_v6(true).unwrap();
            }
            s.bind(&addr.into()).unwrap();
            s.listen(16).unwrap();
            s.into()
        })
        .unwrap()
}

fn orig_dst(s: &std::net::TcpStream) -> SocketAddr {
    let r = SockRef::from(s);
    let a = if s.local_addr().unwrap().is_ipv4() {
        r.original_dst_v4()
    } else {
        r.original_dst_v6()
    };
    a.unwrap().as_socket().unwrap()
}

#[test]
fn traffic_is_captured_and_marked_traffic_is_not() {
    let mut lab = Lab::new();
    lab.add_node("a");
    let p = lab.add_pod("a", "p");
    let q = lab.add_pod("a", "q");
    let rt = rt();
    rt.block_on(Redirector::new().apply(&ns(&p), Options::default()))
        .unwrap();
    let outbound = listen(&p, "0.0.0.0:15001".parse().unwrap());
    let inbound = listen(&p, "0.0.0.0:15006".parse().unwrap());
    let hbone = listen(&p, "0.0.0.0:15008".parse().unwrap());
    let q_server = EchoServer::start(&q, 9000);

    // The pod's own outbound TCP lands on 15001, with the original destination intact.
    let mut c = connect(&p, q.addr(9000), T).unwrap();
    let (accepted, _) = outbound.accept().unwrap();
    assert_eq!(orig_dst(&accepted), q.addr(9000));
    c.write_all(b"x").unwrap();
    assert!(q_server.peers().is_empty(), "captured traffic leaked to q");

    // A socket carrying ztunnel's mark goes straight through.
    let marked =
        p.ns.open()
            .run(|| Socket::new(Domain::IPV4, Type::STREAM, None).unwrap())
            .unwrap();
    marked.set_mark(0x539).unwrap();
    marked.connect_timeout(&q.addr(9000).into(), T).unwrap();
    let got = echo_roundtrip(marked.into(), b"marked").unwrap();
    assert_eq!(got, b"marked");
    assert_eq!(q_server.peers()[0].ip(), p.ip);

    // Inbound plaintext to an app port lands on 15006; HBONE to 15008 is not redirected.
    let _c2 = connect(&q, p.addr(8080), T).unwrap();
    let (accepted, _) = inbound.accept().unwrap();
    assert_eq!(orig_dst(&accepted), p.addr(8080));
    let _c3 = connect(&q, p.addr(15008), T).unwrap();
    let (accepted, peer) = hbone.accept().unwrap();
    assert_eq!(peer.ip(), q.ip);
    assert_eq!(accepted.local_addr().unwrap(), p.addr(15008));
    // Loopback traffic inside the pod is left alone.
    let lo_server = EchoServer::start(&p, 7000);
    let local: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    assert_eq!(
        echo_roundtrip(connect(&p, local, T).unwrap(), b"lo").unwrap(),
        b"lo"
    );
    drop(lo_server);
}

#[test]
fn options_bypass_inbound_and_capture_dns() {
    let mut lab = Lab::new();
    lab.add_node("a");
    let p = lab.add_pod("a", "p");
    let q = lab.add_pod("a", "q");
    let rt = rt();
    let opts = Options {
        dns_capture: true,
        capture_inbound: false,
        ..Options::default()
    };
    rt.block_on(Redirector::new().apply(&ns(&p), opts)).unwrap();
    // Inbound bypass: q reaches p's app directly.
    let app = EchoServer::start(&p, 8080);
    assert_eq!(
        echo_roundtrip(connect(&q, p.addr(8080), T).unwrap(), b"in").unwrap(),
        b"in"
    );
    assert_eq!(app.peers()[0].ip(), q.ip);
    // DNS capture: the pod's UDP to any resolver lands on 15053.
    let dns =
        p.ns.open()
            .run(|| std::net::UdpSocket::bind("0.0.0.0:15053").unwrap())
            .unwrap();
    dns.set_read_timeout(Some(T)).unwrap();
    let client =
        p.ns.open()
            .run(|| std::net::UdpSocket::bind("0.0.0.0:0").unwrap())
            .unwrap();
    client.send_to(b"query", "198.18.250.250:53").unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = dns.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"query");
}

#[test]
fn ipv6_traffic_is_captured_too() {
    let mut lab = Lab::new();
    lab.add_node("a");
    let p = lab.add_pod("a", "p");
    p.ns.exec(
        "ip",
        &[
            "-6",
            "addr",
            "add",
            "fd00:18::11/128",
            "dev",
            "eth0",
            "nodad",
        ],
    );
    p.ns.exec("ip", &["-6", "route", "add", "fd00::/16", "dev", "eth0"]);
    let rt = rt();
    rt.block_on(Redirector::new().apply(&ns(&p), Options::default()))
        .unwrap();
    let outbound = listen(&p, "[::]:15001".parse().unwrap());
    let dst: SocketAddr = "[fd00:99::1]:80".parse().unwrap();
    let sock =
        p.ns.open()
            .run(|| Socket::new(Domain::IPV6, Type::STREAM, None).unwrap())
            .unwrap();
    sock.connect_timeout(&dst.into(), T).unwrap();
    let (accepted, _) = outbound.accept().unwrap();
    assert_eq!(orig_dst(&accepted), dst);
    let mut s: std::net::TcpStream = sock.into();
    s.write_all(b"6").unwrap();
    let mut a = accepted;
    let mut b = [0u8; 1];
    a.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"6");
}

#[test]
fn probe_set_elements_are_added_and_removed_over_netlink_for_both_families() {
    use node_agent::redirect::host::{self, ProbeSource};
    let mut lab = Lab::new();
    let node = lab.add_node("a").ns;
    let ips: Vec<std::net::IpAddr> =
        vec!["198.18.9.2".parse().unwrap(), "fd00::9:2".parse().unwrap()];
    let sets = || node.exec("nft", &["list", "table", "inet", host::HOST_TABLE]);
    node.open()
        .run(|| {
            host::install(&ProbeSource::AnyLocal).unwrap();
            host::add(&ips).unwrap();
            // Adding what is there, and removing what is not, are fine.
            host::add(&ips).unwrap();
            let listed = sets();
            assert!(listed.contains("elements = { 198.18.9.2 }"), "{listed}");
            assert!(listed.contains("elements = { fd00::9:2 }"), "{listed}");
            host::remove(&ips).unwrap();
            host::remove(&ips).unwrap();
            assert!(!sets().contains("elements"), "{}", sets());
            host::uninstall().unwrap();
        })
        .unwrap();
}
