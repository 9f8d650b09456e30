//! The DNS proxy end to end: the real node agent captures a pod's DNS (port 53) into
//! ztunnel's 15053 in the pod; real resolver tools in the pod (dig, and glibc's resolver
//! through getent with the pod's own search domains) get mesh names answered by ztunnel and
//! other names forwarded to the pod's own upstream resolver (dnsmasq in another pod), which the
//! agent learnt from the pod and passed to ztunnel over ZDS.

use std::time::Duration;

use mesh_testbed::apps::{proxied, start_dnsmasq};
use mesh_testbed::mesh::{Mesh, Service, Workload, eventually};

const T: Duration = Duration::from_secs(10);
/// Where the pod thinks its resolver is; capture sends port 53 to ztunnel whatever the address.
const POD_RESOLVER: &str = "198.18.200.53";

fn dig(pod: &mesh_testbed::lab::Pod, args: &[&str]) -> String {
    let server = format!("@{POD_RESOLVER}");
    let mut full = vec![server.as_str(), "+short", "+time=2", "+tries=1"];
    full.extend_from_slice(args);
    let (_, out) = pod.ns.exec_etc("dig", &full);
    out.trim().to_string()
}

#[test]
fn pod_dns_is_answered_for_the_mesh_and_forwarded_for_the_rest() {
    let mut m = Mesh::new(&["a", "b"]);
    let a1 = m.lab.add_pod("a", "a1");
    let b1 = m.lab.add_pod("b", "b1");
    let up = m.lab.add_pod("b", "up");
    let wa = Workload::mesh(&a1, "ns-a", "client");
    let wb = Workload::mesh(&b1, "ns-b", "server");
    let svc = Service::echo("198.19.100.1");
    m.write_config(&[&wa, &wb], &[svc]);

    // The upstream resolver: dnsmasq, knowing one outside name, logging every query.
    start_dnsmasq(&mut m.lab, &up, "outside.example", &["198.18.77.7"]);

    // a1 brings its own nameserver (`dnsPolicy: None`): the agent hands it to ztunnel, whose
    // own upstream here answers nothing, so only the pod's own can resolve outside names.
    m.write_pods("a", &[&wa], "");
    let pods = std::fs::read_to_string(m.pod_file("a")).unwrap().replace(
        &format!("netns: {}}}", a1.ns.path().display()),
        &format!(
            "netns: {}, dnsNameservers: [\"{}\"]}}",
            a1.ns.path().display(),
            up.ip
        ),
    );
    assert!(pods.contains("dnsNameservers"), "{pods}");
    std::fs::write(m.pod_file("a"), pods).unwrap();
    m.start_agent("a", &["--dns-capture"]);
    m.start_ztunnel("a", &["--dns-upstream", "127.0.0.1:9"]);
    assert!(eventually(T, || proxied(&a1)), "a1 was not enrolled");
    let rules = a1.ns.exec("nft", &["list", "ruleset"]);
    assert!(rules.contains("dport 53"), "no DNS capture in a1: {rules}");

    // A mesh service, by its full name, over UDP and TCP; AAAA of a v4-only name is empty.
    assert_eq!(dig(&a1, &["echo.ns-b.svc.cluster.local"]), "198.19.100.1");
    assert_eq!(
        dig(&a1, &["+tcp", "echo.ns-b.svc.cluster.local"]),
        "198.19.100.1"
    );
    assert_eq!(dig(&a1, &["AAAA", "echo.ns-b.svc.cluster.local"]), "");
    // An outside name: forwarded to dnsmasq, its answer relayed.
    assert_eq!(dig(&a1, &["outside.example"]), "198.18.77.7");
    assert_eq!(dig(&a1, &["+tcp", "outside.example"]), "198.18.77.7");
    assert!(
        eventually(T, || m
            .lab
            .process("dnsmasq")
            .log_text()
            .contains("query[A] outside.example")),
        "dnsmasq never saw the forwarded query"
    );
    assert!(
        !m.lab.process("dnsmasq").log_text().contains("echo.ns-b"),
        "a mesh name leaked upstream"
    );

    // glibc's resolver with the pod's own search domains: `echo.ns-b` from ns-a.
    a1.ns.write_etc(
        "resolv.conf",
        &format!(
            "nameserver {POD_RESOLVER}\nsearch ns-a.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:2 attempts:1\n"
        ),
    );
    let (ok, out) = a1.ns.exec_etc("getent", &["ahostsv4", "echo.ns-b"]);
    assert!(ok && out.contains("198.19.100.1"), "getent: {out:?}");
    let (ok, out) = a1.ns.exec_etc("getent", &["ahostsv4", "outside.example"]);
    assert!(ok && out.contains("198.18.77.7"), "getent: {out:?}");

    // Garbage gets FORMERR with its id back, not silence.
    let reply = a1
        .ns
        .open()
        .run(|| {
            let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            udp.set_read_timeout(Some(T)).unwrap();
            udp.send_to(&[0xab, 0xcd, 0xff, 0xff, 0, 1], (POD_RESOLVER, 53))
                .unwrap();
            let mut buf = [0u8; 512];
            let n = udp.recv(&mut buf).expect("a reply to garbage");
            buf[..n].to_vec()
        })
        .unwrap();
    assert_eq!(
        &reply[..2],
        &[0xab, 0xcd],
        "the reply carries the query's id"
    );
    assert_eq!(reply[3] & 0x0f, 1, "FORMERR");
    // With the upstream gone, an outside name gets SERVFAIL; mesh names still resolve.
    m.lab.stop("dnsmasq");
    let (_, out) = a1.ns.exec_etc(
        "dig",
        &[
            &format!("@{POD_RESOLVER}"),
            "+time=8",
            "+tries=1",
            "outside.example",
        ],
    );
    assert!(out.contains("status: SERVFAIL"), "{out}");
    assert_eq!(dig(&a1, &["echo.ns-b.svc.cluster.local"]), "198.19.100.1");
}
