//! Waypoints and network gateways in resolution: where each destination goes, from where.

use super::*;

fn named(mut s: Service, name: &str) -> Service {
    s.name = name.into();
    s.hostname = format!("{name}.ns");
    s
}

fn at_address(ip: &str, port: u16) -> GatewayAddress {
    GatewayAddress {
        destination: GatewayDestination::Address(NetworkAddress {
            network: String::new(),
            address: ip.parse().unwrap(),
        }),
        hbone_mtls_port: port,
    }
}

fn at_hostname(host: &str, port: u16) -> GatewayAddress {
    GatewayAddress {
        destination: GatewayDestination::Hostname(NamespacedHostname {
            namespace: "ns".into(),
            hostname: host.into(),
        }),
        hbone_mtls_port: port,
    }
}

fn topology() -> State {
    use HealthStatus::Healthy;
    use Protocol::Hbone;
    let mut pod_w = workload("pod-w", "198.18.1.7", Hbone, Healthy);
    pod_w.waypoint = Some(at_hostname("wp.ns", 15008));
    let mut far = workload("far", "198.18.2.1", Hbone, Healthy);
    far.workload_ips.clear(); // known only through its gateway
    far.network = "net2".into();
    far.network_gateway = Some(at_address("198.18.9.1", 15009));
    let mut far_ip = workload("far-ip", "198.18.2.2", Hbone, Healthy);
    far_ip.network = "net2".into();
    let mut svc_w = named(
        service("198.19.0.20", &[(80, 8080)], &[("mesh", &[])]),
        "svc-w",
    );
    svc_w.waypoint = Some(at_address("198.19.0.50", 15008));
    let mut svc_gone = named(
        service("198.19.0.21", &[(80, 8080)], &[("mesh", &[])]),
        "svc-gone",
    );
    svc_gone.waypoint = Some(at_address("198.19.0.99", 15008));
    let mut svc_far = named(
        service("198.19.0.30", &[(80, 8080)], &[("far", &[])]),
        "far",
    );
    svc_far.subject_alt_names = vec!["spiffe://cluster.local/ns/ns/sa/far-svc".into()];
    State::new(
        vec![
            workload("mesh", "198.18.1.2", Hbone, Healthy),
            workload("wp-pod", "198.18.1.50", Hbone, Healthy),
            workload("gw", "198.18.9.1", Hbone, Healthy),
            pod_w,
            far,
            far_ip,
        ],
        vec![
            named(
                service("198.19.0.50", &[(15008, 15008)], &[("wp-pod", &[])]),
                "wp",
            ),
            svc_w,
            svc_gone,
            svc_far,
            named(
                service("198.19.0.31", &[(80, 8080)], &[("far-ip", &[])]),
                "far-nogw",
            ),
        ],
        vec![],
    )
}

#[test]
fn waypoints_and_gateways_table() {
    let state = topology();
    let local = Origin::default();
    let from_waypoint = Origin {
        workload: state.workloads.get("wp-pod").map(|w| &**w),
        network: "",
    };
    let cases = [
        (
            "service waypoint",
            &local,
            "198.19.0.20:80",
            "waypoint 198.18.1.50:15008 for 198.19.0.20:80",
        ),
        (
            "workload waypoint by hostname",
            &local,
            "198.18.1.7:9000",
            "waypoint 198.18.1.50:15008 for 198.18.1.7:9000",
        ),
        (
            "unknown waypoint refuses",
            &local,
            "198.19.0.21:80",
            "unroutable: waypoint unknown or without endpoints",
        ),
        (
            "the waypoint itself goes on to the service's endpoint",
            &from_waypoint,
            "198.19.0.20:80",
            "hbone 198.18.1.2:8080",
        ),
        (
            "and to the workload",
            &from_waypoint,
            "198.18.1.7:9000",
            "hbone 198.18.1.7:9000",
        ),
        (
            "remote endpoint through its gateway",
            &local,
            "198.19.0.30:80",
            "gateway 198.18.9.1:15009 for far.ns:80",
        ),
        (
            "remote endpoint without a gateway refuses",
            &local,
            "198.19.0.31:80",
            "unroutable: endpoint is on another network without a gateway",
        ),
        (
            "a remote pod address is not dialled",
            &local,
            "198.18.2.2:80",
            "unroutable: workload is on another network; reach it through a service",
        ),
    ];
    for (name, origin, dst, want) in cases {
        let got = kind(&state.resolve(dst.parse().unwrap(), origin, |_| 0));
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn waypoint_and_gateway_hops_prove_the_right_identities() {
    let state = topology();
    let id = |sa: &str| Identity::new("cluster.local", "ns", sa).unwrap();
    match state.resolve("198.19.0.20:80".parse().unwrap(), &Origin::default(), |_| 0) {
        Upstream::Hbone { hop, workload, .. } => {
            assert_eq!(hop.identities, vec![id("wp-pod")]);
            assert_eq!(workload.uid, "wp-pod");
        }
        other => panic!("{other:?}"),
    }
    match state.resolve("198.19.0.30:80".parse().unwrap(), &Origin::default(), |_| 0) {
        Upstream::Gateway {
            gateway,
            identities,
            ..
        } => {
            assert_eq!(gateway.identities, vec![id("gw")], "outer: the gateway");
            assert_eq!(
                identities,
                vec![id("far-svc"), id("far")],
                "inner: the service's SANs and its endpoints on that network, never the gateway"
            );
        }
        other => panic!("{other:?}"),
    }
}
