use hickory_proto::op::Query;
use hickory_proto::rr::Name;

use super::*;

fn state() -> State {
    crate::state::local::parse(
        r#"
workloads:
- {name: db-0, namespace: ns, workloadIps: [198.18.1.7], hostname: db-0.db.ns.svc.cluster.local, services: {"ns/db.ns.svc.cluster.local": {5432: 5432}}}
- {name: db-1, namespace: ns, workloadIps: [198.18.1.8], services: {"ns/db.ns.svc.cluster.local": {5432: 5432}}}
services:
- {name: echo, namespace: ns, hostname: echo.ns.svc.cluster.local, vips: ["/198.19.0.1", "/fd00::1", "net2/198.19.9.1"]}
- {name: echo, namespace: other, hostname: echo.other.svc.cluster.local, vips: [198.19.0.2]}
- {name: shared, namespace: ns, hostname: shared.example, vips: [198.19.0.3]}
- {name: shared, namespace: other, hostname: shared.example, vips: [198.19.0.4]}
- {name: ext, namespace: other, hostname: api.example.com, vips: [198.19.0.5]}
- {name: db, namespace: ns, hostname: db.ns.svc.cluster.local, ports: {5432: 5432}}
"#,
        "cluster.local",
    )
    .unwrap()
}

const CLIENT: Client<'static> = Client {
    namespace: "ns",
    network: "",
    cluster_domain: "cluster.local",
};

fn ask(name: &str, ty: RecordType) -> Option<Vec<String>> {
    let mut request = Message::new();
    request.set_id(4242).set_recursion_desired(true);
    request.add_query(Query::query(Name::from_ascii(name).unwrap(), ty));
    let response = answer(&state(), &request, &CLIENT)?;
    assert_eq!(response.id(), 4242);
    assert!(response.authoritative());
    assert_eq!(response.queries(), request.queries());
    Some(
        response
            .answers()
            .iter()
            .map(|r| {
                assert_eq!(r.ttl(), TTL);
                assert_eq!(r.name(), &Name::from_ascii(name).unwrap());
                r.data().to_string()
            })
            .collect(),
    )
}

#[test]
fn mesh_names_are_answered_and_others_forwarded() {
    use RecordType::{A, AAAA, MX, TXT};
    let v = |s: &[&str]| Some(s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
    let cases: Vec<(&str, &str, RecordType, Option<Vec<String>>)> = vec![
        (
            "full name",
            "echo.ns.svc.cluster.local.",
            A,
            v(&["198.19.0.1"]),
        ),
        (
            "case-insensitive",
            "ECHO.ns.svc.cluster.local.",
            A,
            v(&["198.19.0.1"]),
        ),
        ("AAAA", "echo.ns.svc.cluster.local.", AAAA, v(&["fd00::1"])),
        (
            "other network's VIP left out",
            "echo.ns.svc.cluster.local.",
            A,
            v(&["198.19.0.1"]),
        ),
        // `echo.other` asked from ns, with ns's first search domain appended by the resolver.
        (
            "search domain stripped",
            "echo.other.ns.svc.cluster.local.",
            A,
            v(&["198.19.0.2"]),
        ),
        (
            "svc search domain",
            "echo.other.svc.cluster.local.",
            A,
            v(&["198.19.0.2"]),
        ),
        (
            "a non-cluster hostname, own namespace first",
            "shared.example.",
            A,
            v(&["198.19.0.3"]),
        ),
        (
            "non-cluster hostname with a search domain",
            "api.example.com.ns.svc.cluster.local.",
            A,
            v(&["198.19.0.5"]),
        ),
        (
            "workload hostname",
            "db-0.db.ns.svc.cluster.local.",
            A,
            v(&["198.18.1.7"]),
        ),
        (
            "headless service: its endpoints",
            "db.ns.svc.cluster.local.",
            A,
            v(&["198.18.1.7", "198.18.1.8"]),
        ),
        (
            "known, no address of that family",
            "db-0.db.ns.svc.cluster.local.",
            AAAA,
            v(&[]),
        ),
        ("unknown name", "example.org.", A, None),
        (
            "unknown in the cluster domain",
            "nope.ns.svc.cluster.local.",
            A,
            None,
        ),
        ("other record types", "echo.ns.svc.cluster.local.", MX, None),
        ("TXT", "echo.ns.svc.cluster.local.", TXT, None),
    ];
    for (what, name, ty, want) in cases {
        assert_eq!(ask(name, ty), want, "{what}");
    }
}

#[test]
fn odd_requests_are_forwarded_not_answered() {
    let state = state();
    let q = Query::query(
        Name::from_ascii("echo.ns.svc.cluster.local.").unwrap(),
        RecordType::A,
    );
    // Two questions.
    let mut two = Message::new();
    two.add_query(q.clone()).add_query(q.clone());
    assert!(answer(&state, &two, &CLIENT).is_none());
    // A response, not a query.
    let mut resp = Message::new();
    resp.set_message_type(MessageType::Response)
        .add_query(q.clone());
    assert!(answer(&state, &resp, &CLIENT).is_none());
    // Class CH.
    let mut chaos = q;
    chaos.set_query_class(DNSClass::CH);
    let mut m = Message::new();
    m.add_query(chaos);
    assert!(answer(&state, &m, &CLIENT).is_none());
}
