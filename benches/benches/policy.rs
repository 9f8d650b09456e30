//! L4 policy evaluation cost: nanoseconds per authorization decision with 10, 1,000 and
//! 10,000 policies loaded, each beside the same run's 10-policy figure (the baseline).
//!
//! The policy set is shaped like a large cluster's: one namespace per 10 policies, half of
//! them namespace-wide and half attached to workloads by selector, plus two global ones; each
//! has two rules over principals, namespaces, CIDRs and ports. A decision goes through
//! `State::authorize`, the data path's call. "all global" puts every policy in the
//! destination's scope (the port prefilter still skips policies about other ports); "global,
//! any port" also drops the port conditions, so every policy is evaluated: the worst case,
//! where cost grows with the list.
//!
//! Run: `./x bench-policy` (or `cargo bench -p benches --bench policy -- [--decisions N]`).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use ztunnel::identity::Identity;
use ztunnel::state::authz::Connection;
use ztunnel::state::policy::{Action, Authorization, Cidr, RbacMatch, Scope, StringMatch};
use ztunnel::state::{Protocol, State, Workload};

/// How the policy set is shaped.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// Cluster-like: a namespace per 10 policies, half namespace-wide, half by selector.
    ByScope,
    /// Every policy global, each limited to a destination port.
    AllGlobal,
    /// Every policy global and none limited to a port: every policy is evaluated.
    AllGlobalAnyPort,
}

fn policy(i: usize, scope: Scope, any_port: bool) -> Authorization {
    let ns = format!("ns-{}", i / 10);
    let rule = |n: usize| {
        vec![
            vec![RbacMatch {
                principals: vec![StringMatch::Exact(format!(
                    "cluster.local/ns/client-{n}/sa/sa-{n}"
                ))],
                namespaces: vec![StringMatch::Prefix(format!("team-{n}-"))],
                ..Default::default()
            }],
            vec![RbacMatch {
                source_ips: vec![Cidr {
                    addr: IpAddr::V4(Ipv4Addr::new(10, (n % 250) as u8, 0, 0)),
                    prefix: 16,
                }],
                destination_ports: if any_port {
                    Vec::new()
                } else {
                    vec![8000 + (n % 1000) as u16]
                },
                not_destination_ports: vec![15000],
                ..Default::default()
            }],
        ]
    };
    Authorization {
        name: format!("p-{i}"),
        namespace: ns,
        scope,
        action: if i.is_multiple_of(3) {
            Action::Deny
        } else {
            Action::Allow
        },
        rules: vec![rule(i), rule(i + 1)],
        dry_run: false,
    }
}

fn workload(i: usize, policies: Vec<String>) -> Workload {
    let ns = format!("ns-{i}");
    Workload {
        workload_ips: vec![IpAddr::V4(Ipv4Addr::new(
            198,
            18,
            (i / 250) as u8,
            (i % 250) as u8 + 1,
        ))],
        protocol: Protocol::Hbone,
        node: "n".into(),
        authorization_policies: policies,
        ..Workload::new(
            &format!("uid-{i}"),
            Identity::new("cluster.local", &ns, "default").unwrap(),
        )
    }
}

/// A state with `n` policies, and the destinations decisions are made for.
fn state(n: usize, shape: Shape) -> (State, Vec<Workload>) {
    let all_global = shape != Shape::ByScope;
    let any_port = shape == Shape::AllGlobalAnyPort;
    let mut policies = Vec::with_capacity(n + 2);
    for i in 0..n {
        let scope = if all_global {
            Scope::Global
        } else if i % 2 == 0 {
            Scope::Namespace
        } else {
            Scope::WorkloadSelector
        };
        policies.push(policy(i, scope, any_port));
    }
    if !all_global {
        policies.push(policy(n, Scope::Global, any_port));
        policies.push(policy(n + 1, Scope::Global, any_port));
    }
    let namespaces = n.div_ceil(10).max(1);
    let workloads: Vec<Workload> = (0..namespaces)
        .map(|ns| {
            let selected = (0..10)
                .map(|k| ns * 10 + k)
                .filter(|i| i % 2 == 1 && *i < n)
                .map(|i| format!("ns-{ns}/p-{i}"))
                .collect();
            workload(ns, selected)
        })
        .collect();
    (
        State::new(workloads.clone(), Vec::new(), policies),
        workloads,
    )
}

fn ns_per_decision(n: usize, shape: Shape, decisions: usize) -> f64 {
    let (state, workloads) = state(n, shape);
    let client = Identity::new("cluster.local", "team-7-x", "client").unwrap();
    let conns: Vec<(String, String, SocketAddr)> = workloads
        .iter()
        .map(|w| {
            (
                w.uid.clone(),
                w.namespace.clone(),
                SocketAddr::new(w.workload_ips[0], 8080),
            )
        })
        .collect();
    let src: IpAddr = "10.7.1.2".parse().unwrap();
    let mut allowed = 0usize;
    // Warm up, then measure.
    for round in [decisions / 10, decisions] {
        allowed = 0;
        let start = Instant::now();
        for i in 0..round {
            let (uid, ns, dst) = &conns[i % conns.len()];
            let conn = Connection::new(Some(&client), src, *dst);
            let v = state.authorize(black_box(uid), ns, &conn);
            allowed += usize::from(v.decision == ztunnel::state::authz::Decision::Allow);
        }
        if round == decisions {
            black_box(allowed);
            return start.elapsed().as_nanos() as f64 / decisions as f64;
        }
    }
    black_box(allowed);
    unreachable!()
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let decisions = argv
        .iter()
        .position(|a| a == "--decisions")
        .and_then(|i| argv.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    println!("L4 policy evaluation, {decisions} decisions per row");
    println!(
        "{:<16} {:>9} {:>14} {:>12}",
        "scoping", "policies", "ns/decision", "vs 10"
    );
    for (shape, label) in [
        (Shape::ByScope, "by scope"),
        (Shape::AllGlobal, "all global"),
        (Shape::AllGlobalAnyPort, "global, any port"),
    ] {
        let base = ns_per_decision(10, shape, decisions);
        for n in [10, 1_000, 10_000] {
            let ns = if n == 10 {
                base
            } else {
                ns_per_decision(n, shape, decisions)
            };
            println!("{label:<16} {n:>9} {ns:>14.0} {:>11.2}x", ns / base);
        }
    }
}
