use super::*;
use crate::state::Upstream;
use crate::state::policy::{Action, Scope, StringMatch};

/// Istio's own example shapes (workloads with services maps, VIPs with network prefixes,
/// tagged string matches) must load unchanged.
const ISTIO_STYLE: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/echo-hbone
  name: echo-hbone
  namespace: default
  serviceAccount: echo
  trustDomain: cluster.local
  workloadIps: ["198.18.1.2"]
  protocol: HBONE
  node: node-a
  locality: {region: r1, zone: z1, subzone: ""}
  authorizationPolicies: ["default/only-frontend"]
  services:
    "default/echo.example": {80: 8080}
- uid: cluster1//v1/Pod/default/echo-tcp
  name: echo-tcp
  namespace: default
  serviceAccount: echo
  workloadIps: ["198.18.1.3"]
  protocol: TCP
  services: {}
services:
- name: echo
  namespace: default
  hostname: echo.example
  vips: ["/198.19.100.1", "198.19.100.2"]
  ports: {80: 8080}
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/echo"]
  loadBalancer: {routingPreferences: [Zone, Region], mode: Failover, healthPolicy: OnlyHealthy}
policies:
- name: only-frontend
  namespace: default
  scope: WorkloadSelector
  action: Allow
  dryRun: false
  rules:
  - - - principals: [!Exact "cluster.local/ns/default/sa/frontend"]
      - namespaces: [!Prefix "team-"]
        sourceIps: ["10.0.0.0/8"]
    - - notDestinationPorts: [15000]
- name: block
  namespace: default
  scope: Namespace
  action: Deny
  rules: [[[{destinationPorts: [9999], principals: [!Presence []]}]]]
"#;

#[test]
fn istio_style_file_loads() {
    let state = parse(ISTIO_STYLE, "cluster.local").unwrap();
    assert_eq!(state.workloads.len(), 2);
    assert_eq!(state.services.len(), 1);
    assert_eq!(state.policies.len(), 2);
    let p = &state.policies[0];
    assert_eq!(
        (p.scope, p.action),
        (Scope::WorkloadSelector, Action::Allow)
    );
    assert_eq!(
        p.rules[0][0][0].principals,
        vec![StringMatch::Exact(
            "cluster.local/ns/default/sa/frontend".into()
        )]
    );
    let svc = &state.services["default/echo.example"];
    assert_eq!(svc.endpoints.len(), 1);
    assert_eq!(svc.vips.len(), 2);
    // Through the VIP to the HBONE endpoint, on the mapped target port, expecting both the
    // workload's identity and the service's SAN (deduplicated).
    match state.resolve(
        "198.19.100.2:80".parse().unwrap(),
        &lb::Origin::default(),
        |_| 0,
    ) {
        Upstream::Hbone { authority, hop, .. } => {
            assert_eq!(authority, "198.18.1.2:8080".parse().unwrap());
            assert_eq!(hop.identities.len(), 1);
            assert_eq!(
                hop.identities[0].to_string(),
                "spiffe://cluster.local/ns/default/sa/echo"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn defaults_fill_identity_and_uid() {
    let state = parse(
        "workloads:\n- name: a\n  namespace: ns\n  workloadIps: [198.18.1.9]\n  protocol: HBONE\n",
        "example.org",
    )
    .unwrap();
    let w = &state.workloads["ns/a"];
    assert_eq!(
        w.identity.to_string(),
        "spiffe://example.org/ns/ns/sa/default"
    );
    assert!(parse("", "td").unwrap().workloads.is_empty());
    assert!(parse("{}", "td").unwrap().workloads.is_empty());
}

#[test]
fn routing_fields_load() {
    let state = parse(
        r#"
workloads:
- name: a
  namespace: ns
  workloadIps: [198.18.1.9]
  waypoint: {destination: "ns/waypoint.ns.svc", hboneMtlsPort: 15008}
  networkGateway: {destination: "net2/198.18.9.1", hboneMtlsPort: 15009}
  applicationTunnel: {protocol: PROXY, port: 9000}
  locality: {region: r1, zone: z1}
  capacity: 4
services:
- name: s
  namespace: ns
  hostname: s.ns
  waypoint: {destination: "198.19.0.50", hboneMtlsPort: 15008}
  loadBalancer: {routingPreferences: [Region, Zone], mode: Failover, healthPolicy: AllowAll}
"#,
        "cluster.local",
    )
    .unwrap();
    let w = &state.workloads["ns/a"];
    assert_eq!(
        w.waypoint.as_ref().map(ToString::to_string).as_deref(),
        Some("ns/waypoint.ns.svc:15008")
    );
    assert_eq!(
        w.network_gateway
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some("net2/198.18.9.1:15009")
    );
    assert_eq!(
        w.application_tunnel,
        Some(ApplicationTunnel {
            protocol: AppTunnelProtocol::Proxy,
            port: Some(9000)
        })
    );
    assert_eq!(
        (w.locality.region.as_str(), w.locality.zone.as_str()),
        ("r1", "z1")
    );
    assert_eq!(w.capacity, 4);
    let s = &state.services["ns/s.ns"];
    assert_eq!(
        s.waypoint.as_ref().map(ToString::to_string).as_deref(),
        Some("198.19.0.50:15008")
    );
    let lb = s.load_balancer.as_ref().unwrap();
    assert_eq!(lb.mode, lb::Mode::Failover);
    assert_eq!(lb.routing_preferences, [lb::Scope::Region, lb::Scope::Zone]);
    assert_eq!(lb.health_policy, lb::HealthPolicy::AllowAll);
}

#[test]
fn bad_files_name_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        ("unknown top-level key", "bogus: 1", "bogus"),
        (
            "waypoint destination that is neither an address nor a hostname",
            "workloads: [{namespace: a, name: x, workloadIps: [], waypoint: {destination: nowhere, hboneMtlsPort: 15008}}]",
            "workloads[0].waypoint.destination",
        ),
        (
            "gateway on port 0",
            "workloads: [{namespace: a, name: x, workloadIps: [], networkGateway: {destination: 198.18.0.1, hboneMtlsPort: 0}}]",
            "workloads[0].networkGateway.hboneMtlsPort",
        ),
        (
            "unknown application tunnel protocol",
            "workloads: [{namespace: a, name: x, workloadIps: [], applicationTunnel: {protocol: SOCKS}}]",
            "workloads[0].applicationTunnel.protocol",
        ),
        (
            "unknown routing preference",
            "services: [{name: s, namespace: a, hostname: s.a, loadBalancer: {routingPreferences: [Nearby]}}]",
            "services[0].loadBalancer.routingPreferences[0]",
        ),
        (
            "unknown load-balancing mode",
            "services: [{name: s, namespace: a, hostname: s.a, loadBalancer: {mode: Sometimes}}]",
            "services[0].loadBalancer.mode",
        ),
        (
            "unknown locality key",
            "workloads: [{namespace: a, name: x, workloadIps: [], locality: {planet: earth}}]",
            "workloads[0].locality",
        ),
        (
            "unknown workload key",
            "workloads: [{namespace: a, workloadIps: [], workloadIp: 1.2.3.4, name: x}]",
            "workloads[0].workloadIp",
        ),
        (
            "bad protocol",
            "workloads: [{namespace: a, name: x, workloadIps: [], protocol: QUIC}]",
            "workloads[0].protocol",
        ),
        (
            "bad ip",
            "workloads: [{namespace: a, name: x, workloadIps: [300.1.1.1]}]",
            "workloads[0].workloadIps[0]",
        ),
        (
            "missing namespace",
            "workloads: [{name: x, workloadIps: []}]",
            "workloads[0]",
        ),
        (
            "no uid or name",
            "workloads: [{namespace: a, workloadIps: []}]",
            "workloads[0].uid",
        ),
        (
            "duplicate uid",
            "workloads: [{namespace: a, name: x, workloadIps: []}, {namespace: a, name: x, workloadIps: []}]",
            "workloads[1].uid",
        ),
        (
            "bad identity",
            "workloads: [{namespace: 'a b', name: x, workloadIps: []}]",
            "workloads[0].identity",
        ),
        (
            "service key without slash",
            "workloads: [{namespace: a, name: x, workloadIps: [], services: {svc: {80: 80}}}]",
            "workloads[0].services.svc",
        ),
        (
            "port out of range",
            "services: [{name: s, namespace: a, hostname: h, ports: {70000: 1}}]",
            "services[0].ports",
        ),
        (
            "bad vip",
            "services: [{name: s, namespace: a, hostname: h, vips: [/nope]}]",
            "services[0].vips[0]",
        ),
        (
            "bad san",
            "services: [{name: s, namespace: a, hostname: h, subjectAltNames: [foo]}]",
            "services[0].subjectAltNames",
        ),
        (
            "misspelled match key",
            "policies: [{name: p, namespace: a, scope: Global, action: Deny, rules: [[[{notPrincipal: []}]]]}]",
            "policies[0].rules[0][0][0]",
        ),
        (
            "bad cidr",
            "policies: [{name: p, namespace: a, scope: Global, action: Deny, rules: [[[{sourceIps: [10.0.0.0/40]}]]]}]",
            "policies[0].rules[0][0][0].sourceIps[0]",
        ),
        (
            "unknown action",
            "policies: [{name: p, namespace: a, scope: Global, action: Audit, rules: []}]",
            "policies[0].action",
        ),
        (
            "unknown scope",
            "policies: [{name: p, namespace: a, scope: Cluster, action: Deny, rules: []}]",
            "policies[0].scope",
        ),
        (
            "port out of range in a match",
            "policies: [{name: p, namespace: a, scope: Global, action: Deny, rules: [[[{destinationPorts: [70000]}]]]}]",
            "policies[0].rules[0][0][0].destinationPorts[0]",
        ),
        (
            "match at the wrong depth",
            "policies: [{name: p, namespace: a, scope: Global, action: Deny, rules: [[{principals: []}]]}]",
            "policies[0].rules[0][0]",
        ),
        (
            "untagged string match",
            "policies: [{name: p, namespace: a, scope: Global, action: Deny, rules: [[[{principals: [bob]}]]]}]",
            "policies[0].rules[0][0][0].principals[0]",
        ),
        (
            "duplicate policy",
            "policies: [{name: p, namespace: a, scope: Global, action: Deny, rules: []}, {name: p, namespace: a, scope: Namespace, action: Allow, rules: []}]",
            "policies[1]",
        ),
        ("not a map", "- a\n- b", "(top level)"),
        ("huge nesting", &"[".repeat(10_000), ""),
    ];
    for (name, text, want_path) in cases {
        match parse(text, "cluster.local") {
            Err(LocalConfigError::Invalid { path, message }) => {
                assert!(
                    path.starts_with(want_path),
                    "{name}: path {path:?} ({message})"
                );
                assert!(!message.is_empty(), "{name}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn watch_reloads_and_keeps_old_state_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    let one = "workloads: [{name: a, namespace: ns, workloadIps: [198.18.0.1]}]";
    std::fs::write(&file, one).unwrap();
    let handle = crate::state::StateHandle::default();
    let sources = Sources::new(handle.clone());
    sources.set(Source::LocalFile, load(&file, "td").unwrap());
    let task = tokio::spawn(watch(
        file.clone(),
        "td".into(),
        sources,
        Duration::from_millis(20),
    ));
    let wait_for = |n: usize| {
        let handle = handle.clone();
        async move {
            for _ in 0..200 {
                if handle.load().workloads.len() == n {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        }
    };
    // A rename over the file (how ConfigMaps and careful editors update) is picked up.
    let two = "workloads: [{name: a, namespace: ns, workloadIps: [198.18.0.1]}, {name: b, namespace: ns, workloadIps: [198.18.0.2]}]";
    std::fs::write(dir.path().join("tmp"), two).unwrap();
    std::fs::rename(dir.path().join("tmp"), &file).unwrap();
    assert!(wait_for(2).await);
    // A broken file is ignored; the two workloads stay.
    std::fs::write(&file, "workloads: [{name: c}]").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(handle.load().workloads.len(), 2);
    task.abort();
}
