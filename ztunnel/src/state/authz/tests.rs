use super::*;

fn pol(yaml: &str) -> Authorization {
    serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"))
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).unwrap()
}

const DST: &str = "198.18.1.2:8080";

fn conn<'a>(src: Option<&'a Identity>, src_ip: &str, dst: &str) -> Connection<'a> {
    Connection::new(src, src_ip.parse().unwrap(), dst.parse().unwrap())
}

fn allowed(policies: &[Authorization], c: &Connection<'_>) -> bool {
    evaluate(policies, c).decision == Decision::Allow
}

/// One policy in each row: (policy, source identity, source ip, destination, allowed?).
#[test]
fn single_policy_table() {
    let frontend = id("web", "frontend");
    let other = id("team-a", "worker");
    let rows: &[(&str, Option<&Identity>, &str, &str, bool)] = &[
        // No policies at all: allow.
        ("", Some(&frontend), "198.18.0.9", DST, true),
        // ALLOW by namespace.
        (
            "{action: Allow, rules: [[[{namespaces: [!Exact web]}]]]}",
            Some(&frontend),
            "198.18.0.9",
            DST,
            true,
        ),
        (
            "{action: Allow, rules: [[[{namespaces: [!Exact web]}]]]}",
            Some(&other),
            "198.18.0.9",
            DST,
            false,
        ),
        (
            "{action: Allow, rules: [[[{namespaces: [!Prefix team-]}]]]}",
            Some(&other),
            "198.18.0.9",
            DST,
            true,
        ),
        (
            "{action: Allow, rules: [[[{namespaces: [!Suffix -a]}]]]}",
            Some(&other),
            "198.18.0.9",
            DST,
            true,
        ),
        (
            "{action: Allow, rules: [[[{namespaces: [!Presence []]}]]]}",
            Some(&other),
            "198.18.0.9",
            DST,
            true,
        ),
        (
            "{action: Allow, rules: [[[{namespaces: [!Presence []]}]]]}",
            None,
            "198.18.0.9",
            DST,
            false,
        ),
        // DENY by principal, with and without the scheme.
        (
            "{action: Deny, rules: [[[{principals: [!Exact cluster.local/ns/web/sa/frontend]}]]]}",
            Some(&frontend),
            "198.18.0.9",
            DST,
            false,
        ),
        (
            "{action: Deny, rules: [[[{principals: [!Exact 'spiffe://cluster.local/ns/web/sa/frontend']}]]]}",
            Some(&frontend),
            "198.18.0.9",
            DST,
            false,
        ),
        (
            "{action: Deny, rules: [[[{principals: [!Exact cluster.local/ns/web/sa/frontend]}]]]}",
            Some(&other),
            "198.18.0.9",
            DST,
            true,
        ),
        (
            "{action: Deny, rules: [[[{principals: [!Prefix cluster.local/ns/team-]}]]]}",
            Some(&other),
            "198.18.0.9",
            DST,
            false,
        ),
        // notPrincipals: everyone else is denied, plaintext peers included.
        (
            "{action: Deny, rules: [[[{notPrincipals: [!Exact cluster.local/ns/web/sa/frontend]}]]]}",
            Some(&frontend),
            "198.18.0.9",
            DST,
            true,
        ),
        (
            "{action: Deny, rules: [[[{notPrincipals: [!Exact cluster.local/ns/web/sa/frontend]}]]]}",
            Some(&other),
            "198.18.0.9",
            DST,
            false,
        ),
        (
            "{action: Deny, rules: [[[{notPrincipals: [!Exact cluster.local/ns/web/sa/frontend]}]]]}",
            None,
            "198.18.0.9",
            DST,
            false,
        ),
        // An identity rule never allows a plaintext peer.
        (
            "{action: Allow, rules: [[[{principals: [!Presence []]}]]]}",
            None,
            "198.18.0.9",
            DST,
            false,
        ),
        (
            "{action: Allow, rules: [[[{serviceAccounts: [{namespace: web, serviceAccount: frontend}]}]]]}",
            Some(&frontend),
            "198.18.0.9",
            DST,
            true,
        ),
        (
            "{action: Allow, rules: [[[{serviceAccounts: [{namespace: web, serviceAccount: frontend}]}]]]}",
            None,
            "198.18.0.9",
            DST,
            false,
        ),
        (
            "{action: Deny, rules: [[[{notServiceAccounts: [{namespace: web, serviceAccount: frontend}]}]]]}",
            Some(&other),
            "198.18.0.9",
            DST,
            false,
        ),
        (
            "{action: Deny, rules: [[[{notNamespaces: [!Exact web]}]]]}",
            Some(&frontend),
            "198.18.0.9",
            DST,
            true,
        ),
        // Ports.
        (
            "{action: Deny, rules: [[[{destinationPorts: [8080]}]]]}",
            Some(&frontend),
            "198.18.0.9",
            DST,
            false,
        ),
        (
            "{action: Deny, rules: [[[{destinationPorts: [9090]}]]]}",
            Some(&frontend),
            "198.18.0.9",
            DST,
            true,
        ),
        (
            "{action: Deny, rules: [[[{notDestinationPorts: [8080]}]]]}",
            Some(&frontend),
            "198.18.0.9",
            DST,
            true,
        ),
        (
            "{action: Deny, rules: [[[{notDestinationPorts: [8080]}]]]}",
            Some(&frontend),
            "198.18.0.9",
            "198.18.1.2:22",
            false,
        ),
        // Addresses.
        (
            "{action: Allow, rules: [[[{sourceIps: [198.18.0.0/24]}]]]}",
            None,
            "198.18.0.9",
            DST,
            true,
        ),
        (
            "{action: Allow, rules: [[[{sourceIps: [198.18.0.0/24]}]]]}",
            None,
            "198.18.5.9",
            DST,
            false,
        ),
        (
            "{action: Deny, rules: [[[{notSourceIps: [198.18.0.0/24]}]]]}",
            None,
            "198.18.5.9",
            DST,
            false,
        ),
        (
            "{action: Allow, rules: [[[{destinationIps: [198.18.1.2]}]]]}",
            None,
            "198.18.5.9",
            DST,
            true,
        ),
        (
            "{action: Deny, rules: [[[{notDestinationIps: [198.18.1.0/24]}]]]}",
            None,
            "198.18.5.9",
            DST,
            true,
        ),
        (
            "{action: Allow, rules: [[[{sourceIps: ['fd00::/8']}]]]}",
            None,
            "198.18.5.9",
            DST,
            false,
        ),
        // Within a match, every condition must hold.
        (
            "{action: Deny, rules: [[[{namespaces: [!Exact web], destinationPorts: [9090]}]]]}",
            Some(&frontend),
            "198.18.0.9",
            DST,
            true,
        ),
        (
            "{action: Deny, rules: [[[{namespaces: [!Exact web], destinationPorts: [8080]}]]]}",
            Some(&frontend),
            "198.18.0.9",
            DST,
            false,
        ),
        // A clause: any match. A rule: all clauses.
        (
            "{action: Allow, rules: [[[{namespaces: [!Exact x]}, {destinationPorts: [8080]}]]]}",
            Some(&frontend),
            "198.18.0.9",
            DST,
            true,
        ),
        (
            "{action: Allow, rules: [[[{namespaces: [!Exact web]}], [{destinationPorts: [9090]}]]]}",
            Some(&frontend),
            "198.18.0.9",
            DST,
            false,
        ),
        // A policy: any rule.
        (
            "{action: Allow, rules: [[[{namespaces: [!Exact x]}]], [[{destinationPorts: [8080]}]]]}",
            Some(&frontend),
            "198.18.0.9",
            DST,
            true,
        ),
        // Empty rules match nothing (ALLOW nothing); a rule with no clauses matches everything.
        (
            "{action: Allow, rules: []}",
            Some(&frontend),
            "198.18.0.9",
            DST,
            false,
        ),
        (
            "{action: Allow, rules: [[]]}",
            None,
            "198.18.0.9",
            DST,
            true,
        ),
        (
            "{action: Deny, rules: [[]]}",
            Some(&frontend),
            "198.18.0.9",
            DST,
            false,
        ),
        // An empty match matches everything.
        (
            "{action: Deny, rules: [[[{}]]]}",
            None,
            "198.18.0.9",
            DST,
            false,
        ),
        // Dry run never decides.
        (
            "{action: Deny, dryRun: true, rules: [[]]}",
            Some(&frontend),
            "198.18.0.9",
            DST,
            true,
        ),
        (
            "{action: Allow, dryRun: true, rules: []}",
            Some(&frontend),
            "198.18.0.9",
            DST,
            true,
        ),
    ];
    for (i, (body, src, src_ip, dst, want)) in rows.iter().enumerate() {
        let policies: Vec<Authorization> = if body.is_empty() {
            vec![]
        } else {
            let full = format!(
                "{{name: p, namespace: web, scope: Global, {}",
                body.trim_start_matches('{')
            );
            vec![pol(&full)]
        };
        let c = conn(*src, src_ip, dst);
        assert_eq!(
            allowed(&policies, &c),
            *want,
            "row {i}: {body} from {src:?}"
        );
    }
}

#[test]
fn deny_wins_over_allow_and_allow_needs_one_match() {
    let frontend = id("web", "frontend");
    let c = conn(Some(&frontend), "198.18.0.9", DST);
    let allow_web = pol(
        "{name: a, namespace: web, scope: Global, action: Allow, rules: [[[{namespaces: [!Exact web]}]]]}",
    );
    let allow_x = pol(
        "{name: b, namespace: web, scope: Global, action: Allow, rules: [[[{namespaces: [!Exact x]}]]]}",
    );
    let deny_port = pol(
        "{name: d, namespace: web, scope: Global, action: Deny, rules: [[[{destinationPorts: [8080]}]]]}",
    );
    assert!(allowed(&[allow_web.clone(), allow_x.clone()], &c));
    assert_eq!(
        evaluate(std::slice::from_ref(&allow_x), &c).decision,
        Decision::Deny(DenyReason::NoAllowMatch(1))
    );
    assert_eq!(
        evaluate(&[allow_web, deny_port, allow_x], &c).decision,
        Decision::Deny(DenyReason::DenyPolicy("web/d".into()))
    );
}

#[test]
fn dry_run_reports_what_it_would_have_done() {
    let frontend = id("web", "frontend");
    let c = conn(Some(&frontend), "198.18.0.9", DST);
    let dry =
        pol("{name: d, namespace: web, scope: Global, action: Deny, dryRun: true, rules: [[]]}");
    let v = evaluate(&[dry], &c);
    assert_eq!(v.decision, Decision::Allow);
    assert_eq!(
        v.dry_run,
        Some(Decision::Deny(DenyReason::DenyPolicy("web/d".into())))
    );
    let v = evaluate(&[], &c);
    assert_eq!(v.dry_run, None);
}

#[test]
fn scope_decides_which_policies_apply() {
    let deny_all = |name: &str, ns: &str, scope: &str| {
        pol(&format!(
            "{{name: {name}, namespace: {ns}, scope: {scope}, action: Deny, rules: [[]]}}"
        ))
    };
    let index = PolicyIndex::new(&[
        deny_all("ns-wide", "a", "Namespace"),
        deny_all("picked", "b", "WorkloadSelector"),
        deny_all("ns-b-wide", "b", "Namespace"),
    ]);
    let c = conn(None, "198.18.0.9", DST);
    let in_a = Destination {
        namespace: "a",
        selected: &[],
    };
    let in_c = Destination {
        namespace: "c",
        selected: &[],
    };
    let picked = ["b/picked".to_string()];
    let c_picked = Destination {
        namespace: "c",
        selected: &picked,
    };
    // A selector key naming a namespace policy does not attach it a second way.
    let wrong_kind = ["b/ns-b-wide".to_string(), "b/missing".to_string()];
    let c_wrong = Destination {
        namespace: "c",
        selected: &wrong_kind,
    };
    assert!(matches!(
        index.authorize(in_a, &c).decision,
        Decision::Deny(_)
    ));
    assert_eq!(index.authorize(in_c, &c).decision, Decision::Allow);
    assert!(matches!(
        index.authorize(c_picked, &c).decision,
        Decision::Deny(_)
    ));
    assert_eq!(index.authorize(c_wrong, &c).decision, Decision::Allow);

    let global = PolicyIndex::new(&[deny_all("all", "istio-system", "Global")]);
    assert!(matches!(
        global.authorize(in_c, &c).decision,
        Decision::Deny(_)
    ));
}

/// The indexed decision (scope, then port prefilter) equals the plain evaluation of every
/// applicable policy, on random policy sets and connections, including which DENY policy is
/// named and what dry-run policies would have done.
#[test]
fn the_port_index_decides_like_the_plain_evaluation() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let ports = [80u16, 8080, 9000];
    let ids = [id("a", "x"), id("b", "y"), id("c", "z")];
    for round in 0..300 {
        let mut policies = Vec::new();
        for n in 0..rng.random_range(0..8) {
            let mut rules = Vec::new();
            for _ in 0..rng.random_range(0..3) {
                let mut clauses = Vec::new();
                for _ in 0..rng.random_range(0..3) {
                    let mut matches = Vec::new();
                    for _ in 0..rng.random_range(0..3) {
                        let mut m = RbacMatch::default();
                        if rng.random_bool(0.6) {
                            m.destination_ports = (0..rng.random_range(1..3))
                                .map(|_| ports[rng.random_range(0..3)])
                                .collect();
                        }
                        if rng.random_bool(0.3) {
                            m.not_destination_ports = vec![ports[rng.random_range(0..3)]];
                        }
                        if rng.random_bool(0.4) {
                            m.namespaces = vec![StringMatch::Exact(
                                ["a", "b", "c"][rng.random_range(0..3)].into(),
                            )];
                        }
                        matches.push(m);
                    }
                    clauses.push(matches);
                }
                rules.push(clauses);
            }
            let scope =
                [Scope::Global, Scope::Namespace, Scope::WorkloadSelector][rng.random_range(0..3)];
            policies.push(Authorization {
                name: format!("p{n}"),
                namespace: ["web", "other"][rng.random_range(0..2)].into(),
                scope,
                action: if rng.random_bool(0.5) {
                    Action::Allow
                } else {
                    Action::Deny
                },
                rules,
                dry_run: rng.random_bool(0.2),
            });
        }
        let index = PolicyIndex::new(&policies);
        let selected: Vec<String> = policies
            .iter()
            .filter(|_| rng.random_bool(0.5))
            .map(key)
            .collect();
        let dst = Destination {
            namespace: "web",
            selected: &selected,
        };
        for port in ports {
            for src in [None, Some(&ids[0]), Some(&ids[1]), Some(&ids[2])] {
                let c = Connection::new(
                    src,
                    "198.18.0.9".parse().unwrap(),
                    SocketAddr::new("198.18.1.2".parse().unwrap(), port),
                );
                let plain = evaluate(index.applicable(dst), &c);
                assert_eq!(
                    index.authorize(dst, &c),
                    plain,
                    "round {round}, port {port}, src {src:?}: {policies:#?}"
                );
            }
        }
    }
}

#[test]
fn port_sets_follow_the_rule_structure() {
    let ports = |yaml: &str| {
        ports_of(&pol(&format!(
            "{{name: p, namespace: n, scope: Global, action: Deny, rules: {yaml}}}"
        )))
        .map(|s| s.into_iter().collect::<Vec<_>>())
    };
    assert_eq!(ports("[]"), Some(vec![]), "no rules: matches nothing");
    assert_eq!(
        ports("[[]]"),
        None,
        "a rule without clauses matches anything"
    );
    assert_eq!(ports("[[[{destinationPorts: [80]}]]]"), Some(vec![80]));
    assert_eq!(
        ports("[[[{destinationPorts: [80]}, {}]]]"),
        None,
        "a clause with an unlimited match"
    );
    assert_eq!(
        ports("[[[{destinationPorts: [80, 81]}], [{destinationPorts: [81, 82]}]]]"),
        Some(vec![81]),
        "clauses intersect"
    );
    assert_eq!(
        ports("[[[{destinationPorts: [80]}]], [[{destinationPorts: [90]}]]]"),
        Some(vec![80, 90]),
        "rules unite"
    );
    assert_eq!(ports("[[[{destinationPorts: [80]}]], [[{}]]]"), None);
    assert_eq!(
        ports("[[[]]]"),
        Some(vec![]),
        "an empty clause matches nothing"
    );
}
