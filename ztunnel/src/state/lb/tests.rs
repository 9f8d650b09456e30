use std::sync::Arc;

use super::*;
use crate::identity::Identity;
use crate::state::{Locality, Protocol};

fn at(uid: &str, region: &str, zone: &str, node: &str, capacity: u32) -> Workload {
    Workload {
        workload_ips: vec!["198.18.0.1".parse().unwrap()],
        protocol: Protocol::Hbone,
        node: node.into(),
        locality: Locality {
            region: region.into(),
            zone: zone.into(),
            subzone: String::new(),
        },
        capacity,
        ..Workload::new(uid, Identity::new("cluster.local", "ns", "sa").unwrap())
    }
}

fn endpoint(uid: &str, status: HealthStatus) -> Endpoint {
    Endpoint {
        workload_uid: uid.into(),
        port: Default::default(),
        status,
    }
}

fn policy(mode: Mode, prefs: &[Scope]) -> LoadBalancer {
    LoadBalancer {
        routing_preferences: prefs.to_vec(),
        mode,
        health_policy: HealthPolicy::OnlyHealthy,
    }
}

/// Every endpoint each policy may pick, drawing every point of the weight range.
#[test]
fn load_balancing_table() {
    use Scope::*;
    let me = at("me", "r1", "z1", "n1", 1);
    let mut sick = at("sick", "r1", "z1", "n1", 1);
    sick.status = HealthStatus::Unhealthy;
    let workloads = [
        at("same-zone", "r1", "z1", "n2", 1),
        at("same-region", "r1", "z2", "n3", 1),
        at("far", "r2", "z9", "n4", 2),
        at("empty", "r1", "z1", "n1", 0),
        sick,
    ]
    .map(Arc::new);
    let endpoints: Vec<Endpoint> = workloads
        .iter()
        .map(|w| endpoint(&w.uid, HealthStatus::Healthy))
        .collect();
    let origin = Origin {
        workload: Some(&me),
        network: "",
    };
    let allow_all = LoadBalancer {
        health_policy: HealthPolicy::AllowAll,
        ..policy(Mode::Strict, &[Region, Zone])
    };
    let strict_node = policy(Mode::Strict, &[Node]);
    let failover = policy(Mode::Failover, &[Region, Zone]);
    let failover_other_region = policy(Mode::Failover, &[Region, Zone, Node]);
    let strict_region = policy(Mode::Strict, &[Region]);
    let standard = policy(Mode::Standard, &[Region, Zone]);
    let cases: Vec<(&str, Option<&LoadBalancer>, &[&str])> = vec![
        // Weighted by capacity: far twice, empty (0) and sick never.
        (
            "no policy",
            None,
            &["same-zone", "same-region", "far", "far"],
        ),
        (
            "standard ignores preferences",
            Some(&standard),
            &["same-zone", "same-region", "far", "far"],
        ),
        ("failover: best tier only", Some(&failover), &["same-zone"]),
        (
            "failover: longest leading match",
            Some(&failover_other_region),
            &["same-zone"],
        ),
        (
            "strict region",
            Some(&strict_region),
            &["same-zone", "same-region"],
        ),
        (
            "allow-all admits the unhealthy",
            Some(&allow_all),
            &["same-zone", "sick"],
        ),
    ];
    let candidates = || endpoints.iter().zip(workloads.iter());
    for (name, policy, want) in cases {
        let mut got = Vec::new();
        for point in 0..want.len() as u64 {
            match choose(policy, candidates(), &origin, |total| {
                assert_eq!(total, want.len() as u64, "{name}: total weight");
                point
            }) {
                Choice::Endpoint((_, w)) => got.push(w.uid.as_str()),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert_eq!(got, want, "{name}");
    }
    // Strict with nothing matching refuses; so does everything at capacity 0.
    assert_eq!(
        choose(Some(&strict_node), candidates().take(3), &origin, |_| 0),
        Choice::None("no endpoint matches the strict routing preferences")
    );
    assert_eq!(
        choose(None, candidates().skip(3).take(1), &origin, |_| 0),
        Choice::None("no endpoint has capacity")
    );
    assert_eq!(
        choose(None, candidates().skip(4), &origin, |_| 0),
        Choice::None("no healthy endpoints")
    );
    // An unhealthy endpoint entry (the local config's) counts even on a healthy workload.
    let down = [endpoint("same-zone", HealthStatus::Unhealthy)];
    assert_eq!(
        choose(None, down.iter().zip(workloads.iter()), &origin, |_| 0),
        Choice::None("no healthy endpoints")
    );
    // Passthrough picks nothing; an unknown origin matches no locality, so strict refuses.
    assert_eq!(
        choose(
            Some(&policy(Mode::Passthrough, &[])),
            candidates(),
            &origin,
            |_| 0
        ),
        Choice::Passthrough
    );
    assert!(matches!(
        choose(
            Some(&strict_region),
            candidates(),
            &Origin::default(),
            |_| 0
        ),
        Choice::None(_)
    ));
}

#[test]
fn names_parse_in_istio_spellings() {
    assert_eq!("FAILOVER".parse::<Mode>(), Ok(Mode::Failover));
    assert_eq!("Failover".parse::<Mode>(), Ok(Mode::Failover));
    assert_eq!("UNSPECIFIED_MODE".parse::<Mode>(), Ok(Mode::Standard));
    assert_eq!("Subzone".parse::<Scope>(), Ok(Scope::Subzone));
    assert_eq!(
        "ALLOW_ALL".parse::<HealthPolicy>(),
        Ok(HealthPolicy::AllowAll)
    );
    assert_eq!(
        "AllowAll".parse::<HealthPolicy>(),
        Ok(HealthPolicy::AllowAll)
    );
    let e = "nearby".parse::<Scope>().unwrap_err();
    assert!(e.to_string().contains("nearby"), "{e}");
}
