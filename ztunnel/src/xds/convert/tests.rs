//! Golden payloads: resources written byte by byte with Istio's field numbers (not with the
//! generated encoder), decoded by the generated types and converted. A field-number slip in
//! `proto/` fails here.

use prost::Message;

use super::*;

/// Protobuf wire encoding, by hand.
mod wire {
    pub fn varint(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }
    /// Field `n` as a varint.
    pub fn num(n: u64, v: u64) -> Vec<u8> {
        let mut out = varint(n << 3);
        out.extend(varint(v));
        out
    }
    /// Field `n`, length-delimited.
    pub fn bytes(n: u64, b: &[u8]) -> Vec<u8> {
        let mut out = varint((n << 3) | 2);
        out.extend(varint(b.len() as u64));
        out.extend_from_slice(b);
        out
    }
    pub fn string(n: u64, s: &str) -> Vec<u8> {
        bytes(n, s.as_bytes())
    }
    pub fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }
}
use wire::{bytes, cat, num, string};

fn port(service: u64, target: u64) -> Vec<u8> {
    cat(&[num(1, service), num(2, target)])
}

fn golden_workload() -> Vec<u8> {
    let port_list = bytes(1, &port(80, 8080));
    let services_entry = cat(&[string(1, "ns-b/echo.ns-b.svc"), bytes(2, &port_list)]);
    let workload = cat(&[
        string(20, "cluster1//v1/Pod/ns-a/pod-a"),
        string(1, "pod-a"),
        string(2, "ns-a"),
        bytes(3, &[198, 18, 1, 2]),
        bytes(3, &[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]),
        string(4, "net1"),
        num(5, 1), // HBONE
        string(7, "client"),
        string(9, "node-a"),
        string(10, "pod-a-canonical"),
        string(11, "v1"),
        num(12, 2), // POD
        string(13, "pod-a-deploy"),
        string(16, "ns-a/allow-web"),
        num(17, 1), // UNHEALTHY
        string(18, "cluster1"),
        bytes(22, &services_entry),
    ]);
    bytes(1, &workload) // Address.workload
}

#[test]
fn golden_workload_decodes_to_the_expected_state() {
    let addr = wl::Address::decode(golden_workload().as_slice()).unwrap();
    let AddressResource::Workload(got) = address(&addr, "cluster.local").unwrap() else {
        panic!("not a workload");
    };
    let w = &got.workload;
    assert_eq!(w.uid, "cluster1//v1/Pod/ns-a/pod-a");
    assert_eq!((w.name.as_str(), w.namespace.as_str()), ("pod-a", "ns-a"));
    assert_eq!(
        w.workload_ips,
        vec![
            "198.18.1.2".parse::<IpAddr>().unwrap(),
            "fd00::2".parse().unwrap()
        ]
    );
    assert_eq!(w.network, "net1");
    assert_eq!(w.protocol, Protocol::Hbone);
    assert_eq!(
        w.identity.to_string(),
        "spiffe://cluster.local/ns/ns-a/sa/client",
        "trust domain defaults, service account from field 7"
    );
    assert_eq!(w.node, "node-a");
    assert_eq!(w.canonical_name, "pod-a-canonical");
    assert_eq!(w.canonical_revision, "v1");
    assert_eq!(w.workload_type, "pod");
    assert_eq!(w.workload_name, "pod-a-deploy");
    assert_eq!(w.authorization_policies, vec!["ns-a/allow-web".to_string()]);
    assert_eq!(w.status, HealthStatus::Unhealthy);
    assert_eq!(w.cluster_id, "cluster1");
    assert_eq!(
        got.services,
        BTreeMap::from([(
            "ns-b/echo.ns-b.svc".to_string(),
            BTreeMap::from([(80, 8080)])
        )])
    );
}

#[test]
fn golden_service_decodes_to_the_expected_state() {
    let svc = cat(&[
        string(1, "echo"),
        string(2, "ns-b"),
        string(3, "echo.ns-b.svc"),
        bytes(4, &cat(&[string(1, "net1"), bytes(2, &[198, 19, 0, 1])])),
        bytes(5, &port(80, 8080)),
        bytes(5, &port(443, 0)),
        string(6, "spiffe://cluster.local/ns/ns-b/sa/echo"),
    ]);
    let addr = wl::Address::decode(bytes(2, &svc).as_slice()).unwrap();
    let AddressResource::Service(s) = address(&addr, "cluster.local").unwrap() else {
        panic!("not a service");
    };
    assert_eq!((s.name.as_str(), s.namespace.as_str()), ("echo", "ns-b"));
    assert_eq!(s.hostname, "echo.ns-b.svc");
    assert_eq!(
        s.vips,
        vec![NetworkAddress {
            network: "net1".into(),
            address: "198.19.0.1".parse().unwrap()
        }]
    );
    assert_eq!(s.ports, BTreeMap::from([(80, 8080), (443, 0)]));
    assert_eq!(
        s.subject_alt_names,
        vec!["spiffe://cluster.local/ns/ns-b/sa/echo".to_string()]
    );
    assert!(s.endpoints.is_empty());
}

/// Waypoint, network gateway, application tunnel, locality and capacity on a workload;
/// waypoint and load balancing on a service: Istio's field numbers, byte by byte.
#[test]
fn golden_routing_fields_decode_to_the_expected_state() {
    let gw_address = |network: &str, ip: &[u8], port: u64| {
        cat(&[
            bytes(2, &cat(&[string(1, network), bytes(2, ip)])),
            num(3, port),
        ])
    };
    let gw_hostname = |ns: &str, host: &str, port: u64| {
        cat(&[
            bytes(1, &cat(&[string(1, ns), string(2, host)])),
            num(3, port),
        ])
    };
    let workload = cat(&[
        string(20, "uid-w"),
        string(2, "ns-a"),
        string(21, "db-0.db.ns-a.svc.cluster.local"),
        bytes(8, &gw_address("net1", &[198, 19, 0, 9], 15008)),
        bytes(
            19,
            &gw_hostname("istio-system", "eastwest.istio-system.svc", 15009),
        ),
        bytes(23, &cat(&[num(1, 1), num(2, 9000)])), // PROXY, port 9000
        bytes(
            24,
            &cat(&[
                string(1, "region-1"),
                string(2, "zone-a"),
                string(3, "rack-7"),
            ]),
        ),
        bytes(27, &num(1, 3)), // UInt32Value { value: 3 }
    ]);
    let addr = wl::Address::decode(bytes(1, &workload).as_slice()).unwrap();
    let AddressResource::Workload(got) = address(&addr, "cluster.local").unwrap() else {
        panic!("not a workload");
    };
    let w = &got.workload;
    assert_eq!(
        w.waypoint,
        Some(GatewayAddress {
            destination: GatewayDestination::Address(NetworkAddress {
                network: "net1".into(),
                address: "198.19.0.9".parse().unwrap(),
            }),
            hbone_mtls_port: 15008,
        })
    );
    assert_eq!(
        w.network_gateway,
        Some(GatewayAddress {
            destination: GatewayDestination::Hostname(NamespacedHostname {
                namespace: "istio-system".into(),
                hostname: "eastwest.istio-system.svc".into(),
            }),
            hbone_mtls_port: 15009,
        })
    );
    assert_eq!(
        w.application_tunnel,
        Some(ApplicationTunnel {
            protocol: AppTunnelProtocol::Proxy,
            port: Some(9000),
        })
    );
    assert_eq!(
        w.locality,
        Locality {
            region: "region-1".into(),
            zone: "zone-a".into(),
            subzone: "rack-7".into(),
        }
    );
    assert_eq!(w.capacity, 3);
    assert_eq!(w.hostname, "db-0.db.ns-a.svc.cluster.local");
    // Unset capacity is 1, as istiod means it.
    let bare = wl::Address::decode(bytes(1, &cat(&[string(20, "u"), string(2, "ns")])).as_slice())
        .unwrap();
    let AddressResource::Workload(bare) = address(&bare, "cluster.local").unwrap() else {
        panic!("not a workload");
    };
    assert_eq!(bare.workload.capacity, 1);
    assert_eq!(bare.workload.waypoint, None);

    let svc = cat(&[
        string(2, "ns-b"),
        string(3, "echo.ns-b.svc"),
        bytes(7, &gw_hostname("ns-b", "waypoint.ns-b.svc", 15008)),
        bytes(
            8,
            &cat(&[
                num(1, 6), // NETWORK
                num(1, 1), // REGION
                num(1, 2), // ZONE
                num(2, 2), // FAILOVER
                num(3, 1), // ALLOW_ALL
            ]),
        ),
    ]);
    let addr = wl::Address::decode(bytes(2, &svc).as_slice()).unwrap();
    let AddressResource::Service(s) = address(&addr, "cluster.local").unwrap() else {
        panic!("not a service");
    };
    assert_eq!(
        s.waypoint.as_ref().map(|w| w.to_string()),
        Some("ns-b/waypoint.ns-b.svc:15008".to_string())
    );
    assert_eq!(
        s.load_balancer,
        Some(LoadBalancer {
            routing_preferences: vec![lb::Scope::Network, lb::Scope::Region, lb::Scope::Zone],
            mode: lb::Mode::Failover,
            health_policy: lb::HealthPolicy::AllowAll,
        })
    );
}

#[test]
fn golden_authorization_decodes_to_the_expected_policy() {
    let exact = bytes(1, b"cluster.local/ns/ns-a/sa/client");
    let presence = bytes(4, &[]);
    let cidr = cat(&[bytes(1, &[10, 0, 0, 0]), num(2, 8)]);
    // destination_ports packed (proto3's default) and not_destination_ports unpacked: a
    // decoder must take both.
    let packed_ports = bytes(9, &cat(&[wire::varint(9000), wire::varint(9001)]));
    let m = cat(&[
        bytes(3, &exact),                                           // principals
        bytes(2, &presence),                                        // not_namespaces
        bytes(5, &cidr),                                            // source_ips
        packed_ports,                                               // destination_ports
        num(10, 15000),                                             // not_destination_ports
        bytes(11, &cat(&[string(1, "ns-a"), string(2, "client")])), // service_accounts
    ]);
    let clause = bytes(2, &m);
    let rule = bytes(1, &clause);
    let auth = cat(&[
        string(1, "deny-admin"),
        string(2, "ns-b"),
        num(3, 2), // WORKLOAD_SELECTOR
        num(4, 1), // DENY
        bytes(5, &rule),
        num(6, 1), // dry_run
    ]);
    let a = sec::Authorization::decode(auth.as_slice()).unwrap();
    let p = authorization(&a).unwrap();
    assert_eq!(
        (p.name.as_str(), p.namespace.as_str()),
        ("deny-admin", "ns-b")
    );
    assert_eq!(p.scope, Scope::WorkloadSelector);
    assert_eq!(p.action, Action::Deny);
    assert!(p.dry_run);
    assert_eq!(p.rules.len(), 1);
    assert_eq!(p.rules[0].len(), 1);
    let m = &p.rules[0][0][0];
    assert_eq!(
        m.principals,
        vec![StringMatch::Exact("cluster.local/ns/ns-a/sa/client".into())]
    );
    assert_eq!(m.not_namespaces, vec![StringMatch::Presence(Vec::new())]);
    assert_eq!(m.source_ips, vec!["10.0.0.0/8".parse().unwrap()]);
    assert_eq!(m.destination_ports, vec![9000, 9001]);
    assert_eq!(m.not_destination_ports, vec![15000]);
    assert_eq!(
        m.service_accounts,
        vec![ServiceAccountMatch {
            namespace: "ns-a".into(),
            service_account: "client".into()
        }]
    );
    assert!(m.namespaces.is_empty() && m.not_principals.is_empty());
}

#[test]
fn malformed_resources_are_refused_with_a_reason() {
    let workload =
        |parts: &[Vec<u8>]| wl::Address::decode(bytes(1, &cat(parts)).as_slice()).unwrap();
    let base = || vec![string(20, "uid-1"), string(2, "ns")];
    let cases: Vec<(&str, wl::Address, &str)> = vec![
        ("empty address", wl::Address::default(), "neither"),
        ("no uid", workload(&[string(2, "ns")]), "no uid"),
        ("no namespace", workload(&[string(20, "u")]), "no namespace"),
        (
            "5-byte address",
            workload(&[base(), vec![bytes(3, &[1, 2, 3, 4, 5])]].concat()),
            "5 bytes",
        ),
        (
            "unknown tunnel protocol",
            workload(&[base(), vec![num(5, 7)]].concat()),
            "tunnel protocol",
        ),
        (
            "bad service account",
            workload(&[base(), vec![string(7, "a/b")]].concat()),
            "service account",
        ),
        (
            "service key without namespace",
            workload(
                &[
                    base(),
                    vec![bytes(22, &cat(&[string(1, "nohost"), bytes(2, &[])]))],
                ]
                .concat(),
            ),
            "service key",
        ),
        (
            "target port out of range",
            workload(
                &[
                    base(),
                    vec![bytes(
                        22,
                        &cat(&[string(1, "a/b"), bytes(2, &bytes(1, &port(80, 70000)))]),
                    )],
                ]
                .concat(),
            ),
            "not a TCP port",
        ),
        (
            "waypoint without a destination",
            workload(&[base(), vec![bytes(8, &num(3, 15008))]].concat()),
            "waypoint has no destination",
        ),
        (
            "waypoint without a port",
            workload(&[base(), vec![bytes(8, &bytes(2, &bytes(2, &[10, 0, 0, 1])))]].concat()),
            "no HBONE port",
        ),
        (
            "waypoint with a 3-byte address",
            workload(
                &[
                    base(),
                    vec![bytes(
                        8,
                        &cat(&[bytes(2, &bytes(2, &[10, 0, 0])), num(3, 15008)]),
                    )],
                ]
                .concat(),
            ),
            "3 bytes",
        ),
        (
            "network gateway hostname without a namespace",
            workload(
                &[
                    base(),
                    vec![bytes(
                        19,
                        &cat(&[bytes(1, &string(2, "gw.example")), num(3, 15008)]),
                    )],
                ]
                .concat(),
            ),
            "needs a namespace",
        ),
        (
            "unknown application tunnel protocol",
            workload(&[base(), vec![bytes(23, &num(1, 5))]].concat()),
            "unknown protocol 5",
        ),
        (
            "application tunnel port out of range",
            workload(&[base(), vec![bytes(23, &cat(&[num(1, 1), num(2, 70000)]))]].concat()),
            "not a TCP port",
        ),
    ];
    for (name, resource, want) in cases {
        match address(&resource, "cluster.local") {
            Err(e) => assert!(e.contains(want), "{name}: {e}"),
            Ok(r) => panic!("{name}: accepted {r:?}"),
        }
    }

    let service = |parts: &[Vec<u8>]| {
        let svc = cat(&[&[string(2, "ns"), string(3, "svc.ns")][..], parts].concat());
        wl::Address::decode(bytes(2, &svc).as_slice()).unwrap()
    };
    let cases: Vec<(&str, wl::Address, &str)> = vec![
        (
            "unknown routing scope",
            service(&[bytes(8, &num(1, 9))]),
            "unknown scope 9",
        ),
        (
            "unspecified routing scope",
            service(&[bytes(8, &num(1, 0))]),
            "unknown scope 0",
        ),
        (
            "unknown load-balancing mode",
            service(&[bytes(8, &num(2, 7))]),
            "unknown mode 7",
        ),
        (
            "unknown health policy",
            service(&[bytes(8, &num(3, 4))]),
            "unknown health policy 4",
        ),
        (
            "service waypoint without a port",
            service(&[bytes(
                7,
                &bytes(1, &cat(&[string(1, "ns"), string(2, "wp")])),
            )]),
            "no HBONE port",
        ),
    ];
    for (name, resource, want) in cases {
        match address(&resource, "cluster.local") {
            Err(e) => assert!(e.contains(want) && e.contains("svc.ns"), "{name}: {e}"),
            Ok(r) => panic!("{name}: accepted {r:?}"),
        }
    }

    let auth = |parts: &[Vec<u8>]| sec::Authorization::decode(cat(parts).as_slice()).unwrap();
    let named = || vec![string(1, "p"), string(2, "ns")];
    let in_match = |m: Vec<u8>| bytes(5, &bytes(1, &bytes(2, &m)));
    let cases: Vec<(&str, sec::Authorization, &str)> = vec![
        ("no name", auth(&[string(2, "ns")]), "name"),
        (
            "unknown action",
            auth(&[named(), vec![num(4, 2)]].concat()),
            "unknown action",
        ),
        (
            "unknown scope",
            auth(&[named(), vec![num(3, 9)]].concat()),
            "unknown scope",
        ),
        (
            "string match without a type",
            auth(&[named(), vec![in_match(bytes(3, &[]))]].concat()),
            "no match type",
        ),
        (
            "prefix longer than the address",
            auth(
                &[
                    named(),
                    vec![in_match(bytes(
                        5,
                        &cat(&[bytes(1, &[10, 0, 0, 0]), num(2, 33)]),
                    ))],
                ]
                .concat(),
            ),
            "prefix length 33",
        ),
        (
            "3-byte CIDR",
            auth(
                &[
                    named(),
                    vec![in_match(bytes(
                        7,
                        &cat(&[bytes(1, &[10, 0, 0]), num(2, 8)]),
                    ))],
                ]
                .concat(),
            ),
            "3 bytes",
        ),
        (
            "port out of range",
            auth(&[named(), vec![in_match(num(9, 65536))]].concat()),
            "not a TCP port",
        ),
    ];
    for (name, resource, want) in cases {
        match authorization(&resource) {
            Err(e) => assert!(
                e.contains(want) && e.contains("ns/p") || name == "no name",
                "{name}: {e}"
            ),
            Ok(r) => panic!("{name}: accepted {r:?}"),
        }
    }
}

/// A golden authorization payload for mutation.
fn golden_authorization() -> Vec<u8> {
    let m = cat(&[
        bytes(3, &bytes(1, b"cluster.local/ns/ns-a/sa/client")),
        bytes(5, &cat(&[bytes(1, &[10, 0, 0, 0]), num(2, 8)])),
        num(9, 9000),
    ]);
    cat(&[
        string(1, "p"),
        string(2, "ns"),
        num(3, 1),
        num(4, 1),
        bytes(5, &bytes(1, &bytes(2, &m))),
    ])
}

#[test]
fn fuzz_entry_points_survive_random_and_mutated_inputs() {
    // What the fuzz targets in fuzz/ run, on stable: every prefix and single-byte
    // mutation of the golden payloads, and random byte strings.
    use rand::{Rng, SeedableRng};
    assert!(
        authorization(&sec::Authorization::decode(golden_authorization().as_slice()).unwrap())
            .is_ok()
    );
    type Target = fn(&[u8]);
    let targets: [(Target, Vec<u8>); 2] = [
        (fuzz_address, golden_workload()),
        (fuzz_authorization, golden_authorization()),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (target, golden) in targets {
        for end in 0..=golden.len() {
            target(&golden[..end]);
        }
        for i in 0..golden.len() {
            for flip in [0x01, 0x5a, 0x80, 0xff] {
                let mut g = golden.clone();
                g[i] ^= flip;
                target(&g);
            }
        }
        for _ in 0..20_000 {
            let len = rng.random_range(0..64);
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            target(&data);
        }
    }
}
