use super::lb::Origin;
use super::*;

mod routing;

fn workload(uid: &str, ip: &str, protocol: Protocol, status: HealthStatus) -> Workload {
    Workload {
        workload_ips: vec![ip.parse().unwrap()],
        protocol,
        status,
        ..Workload::new(uid, Identity::new("cluster.local", "ns", uid).unwrap())
    }
}

fn service(vip: &str, ports: &[(u16, u16)], endpoints: &[(&str, &[(u16, u16)])]) -> Service {
    Service {
        name: "svc".into(),
        namespace: "ns".into(),
        hostname: "svc.ns".into(),
        vips: vec![NetworkAddress {
            network: String::new(),
            address: vip.parse().unwrap(),
        }],
        ports: ports.iter().copied().collect(),
        subject_alt_names: vec![],
        endpoints: endpoints
            .iter()
            .map(|(uid, p)| Endpoint {
                workload_uid: uid.to_string(),
                port: p.iter().copied().collect(),
                status: HealthStatus::Healthy,
            })
            .collect(),
        waypoint: None,
        load_balancer: None,
    }
}

fn kind(u: &Upstream) -> String {
    match u {
        Upstream::Hbone {
            hop,
            authority,
            waypoint: true,
            ..
        } => format!("waypoint {} for {authority}", hop.addr),
        Upstream::Hbone { authority, .. } => format!("hbone {authority}"),
        Upstream::Gateway {
            gateway, authority, ..
        } => format!("gateway {} for {authority}", gateway.addr),
        Upstream::Tcp { target, .. } => format!("tcp {target}"),
        Upstream::Passthrough => "passthrough".into(),
        Upstream::Unroutable { reason, .. } => format!("unroutable: {reason}"),
    }
}

#[test]
fn resolution_table() {
    use HealthStatus::*;
    use Protocol::*;
    let state = State::new(
        vec![
            workload("mesh", "198.18.1.2", Hbone, Healthy),
            workload("plain", "198.18.1.3", Tcp, Healthy),
            workload("sick", "198.18.1.4", Hbone, Unhealthy),
            // Shares an IP with "mesh" but does not speak HBONE: must not shadow it.
            workload("shadow", "198.18.1.2", Tcp, Healthy),
        ],
        vec![
            service("198.19.0.10", &[(80, 8080), (81, 0)], &[("mesh", &[])]),
            service("198.19.0.11", &[(80, 8080)], &[("plain", &[(80, 9090)])]),
            service(
                "198.19.0.12",
                &[(80, 8080)],
                &[("sick", &[]), ("gone", &[])],
            ),
        ],
        vec![],
    );
    let cases = [
        ("198.18.1.2:5000", "hbone 198.18.1.2:5000"),
        ("198.18.1.3:5000", "tcp 198.18.1.3:5000"),
        ("198.18.9.9:5000", "passthrough"),
        ("198.19.0.10:80", "hbone 198.18.1.2:8080"),
        ("198.19.0.10:81", "hbone 198.18.1.2:81"),
        ("198.19.0.10:82", "unroutable: service has no such port"),
        ("198.19.0.11:80", "tcp 198.18.1.3:9090"),
        ("198.19.0.12:80", "unroutable: no healthy endpoints"),
    ];
    for (dst, want) in cases {
        let got = kind(&state.resolve(dst.parse().unwrap(), &Origin::default(), |_| 0));
        assert_eq!(got, want, "{dst}");
    }
}

#[test]
fn endpoint_choice_uses_the_picker() {
    let state = State::new(
        vec![
            workload("a", "198.18.1.2", Protocol::Hbone, HealthStatus::Healthy),
            workload("b", "198.18.1.3", Protocol::Hbone, HealthStatus::Healthy),
        ],
        vec![service(
            "198.19.0.10",
            &[(80, 80)],
            &[("a", &[]), ("b", &[])],
        )],
        vec![],
    );
    let dst = "198.19.0.10:80".parse().unwrap();
    let origin = Origin::default();
    assert_eq!(
        kind(&state.resolve(dst, &origin, |_| 0)),
        "hbone 198.18.1.2:80"
    );
    assert_eq!(
        kind(&state.resolve(dst, &origin, |n| n - 1)),
        "hbone 198.18.1.3:80"
    );
}

/// A pod the state has no entry for cannot have its selector policies applied: its inbound
/// is denied (never allow-all) until the entry arrives, by uid or by address.
#[test]
fn a_pod_without_a_workload_entry_is_denied_inbound() {
    let known = workload(
        "known",
        "198.18.1.2",
        Protocol::Hbone,
        HealthStatus::Healthy,
    );
    let state = State::new(vec![known], vec![], vec![]);
    let peer: IpAddr = "198.18.9.9".parse().unwrap();
    let to =
        |ip: &str| authz::Connection::new(None, peer, SocketAddr::new(ip.parse().unwrap(), 80));
    let deny = authz::Decision::Deny(authz::DenyReason::UnknownDestination);
    let cases = [
        (
            "known by uid",
            "known",
            "ns",
            "198.18.1.2",
            authz::Decision::Allow,
        ),
        (
            "known by address, same namespace",
            "other-uid",
            "ns",
            "198.18.1.2",
            authz::Decision::Allow,
        ),
        (
            "address of a workload in another namespace",
            "other-uid",
            "elsewhere",
            "198.18.1.2",
            deny.clone(),
        ),
        (
            "unknown uid and address",
            "new-pod",
            "ns",
            "198.18.1.7",
            deny,
        ),
    ];
    for (name, uid, ns, ip, want) in cases {
        assert_eq!(state.authorize(uid, ns, &to(ip)).decision, want, "{name}");
    }
}
