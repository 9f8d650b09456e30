//! The node agent end to end with our ztunnel: pods from a standalone pod file on two
//! simulated nodes, enrolled by the real agent process, talking over HBONE; and what happens
//! when pods go, processes restart, or someone else touches the rules.

use std::time::Duration;

use mesh_testbed::apps::{
    EchoServer, Kubelet, connect, echo_roundtrip, has_rules, proxied, unproxied,
};
use mesh_testbed::lab::Pod;
use mesh_testbed::mesh::{Scene, eventually};

const T: Duration = Duration::from_secs(10);

/// Both nodes run the real agent and ztunnel; a1 (node a) and b1 (node b) are in the pod files.
fn scene() -> Scene {
    let mut s = Scene::new();
    s.run_with_agents(&[]);
    for node in ["a", "b"] {
        let ready = eventually(T, || s.m.agent_get(node, "/readyz").0 == 200);
        assert!(
            ready,
            "agent on {node} never became ready: {:?}",
            s.m.agent_get(node, "/readyz")
        );
    }
    assert!(eventually(T, || proxied(&s.a1) && proxied(&s.b1)));
    s
}

fn hbone_works(s: &mut Scene, what: &str) {
    let before =
        s.m.ztunnel_log("b")
            .matches("direction=inbound pod")
            .count();
    let got = connect(&s.a1, s.b1.addr(8080), T).and_then(|c| echo_roundtrip(c, what.as_bytes()));
    assert_eq!(got.ok().as_deref(), Some(what.as_bytes()), "{what}");
    assert!(
        eventually(T, || s
            .m
            .ztunnel_log("b")
            .matches("direction=inbound pod")
            .count()
            > before),
        "{what}: not over HBONE"
    );
}

#[test]
fn agent_enrolls_pods_that_then_talk_over_hbone() {
    let mut s = scene();
    let _server = EchoServer::start(&s.b1, 8080);
    hbone_works(&mut s, "enrolled by the agent");
    // ztunnel listens (what `scene` waits for) a moment before the agent records the pod as
    // enrolled: wait for the record, then read the rest.
    let enrolled = || {
        s.m.agent_get("a", "/pods")
            .1
            .contains("\"state\": \"enrolled\"")
    };
    assert!(eventually(T, enrolled), "{}", s.m.agent_get("a", "/pods").1);
    let (status, _) = s.m.agent_get("a", "/pods");
    assert_eq!(status, 200);
    let (_, metrics) = s.m.agent_get("a", "/metrics");
    assert!(
        metrics.contains("ambient_agent_pods_enrolled 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ambient_agent_zds_connections 1"),
        "{metrics}"
    );
}

#[test]
fn removing_a_pod_removes_its_proxy_and_rules() {
    let s = scene();
    assert!(has_rules(&s.a1));
    s.m.write_pods("a", &[], "");
    assert!(eventually(T, || unproxied(&s.a1)), "proxy still up");
    assert!(eventually(T, || !has_rules(&s.a1)), "rules left behind");
    // The nft table and the policy route go in two steps; wait for both.
    let rule = || s.a1.ns.exec("ip", &["rule", "list"]);
    assert!(
        eventually(T, || !rule().contains("lookup 100")),
        "policy rule left behind: {}",
        rule()
    );
}

#[test]
fn restarting_the_agent_keeps_traffic_flowing_and_resends_the_snapshot() {
    let mut s = scene();
    let _server = EchoServer::start(&s.b1, 8080);
    hbone_works(&mut s, "before");
    s.m.lab.stop("agent-a");
    // ztunnel keeps serving while its agent is away.
    hbone_works(&mut s, "agent down");
    s.m.start_agent("a", &[]);
    assert!(eventually(T, || s
        .m
        .ztunnel_log("a")
        .matches("connected to the node agent")
        .count()
        >= 2));
    assert!(eventually(T, || s
        .m
        .agent_log("a")
        .contains("snapshot acknowledged")));
    assert!(eventually(T, || s.m.agent_get("a", "/readyz").0 == 200));
    // The restarted agent found the rules intact and did not reinstall them.
    assert!(!s.m.agent_log("a").contains("rules are gone"));
    hbone_works(&mut s, "agent back");
}

#[test]
fn restarting_ztunnel_gets_every_pod_back() {
    let mut s = scene();
    let _server = EchoServer::start(&s.b1, 8080);
    s.m.lab.stop("ztunnel-b");
    assert!(eventually(T, || unproxied(&s.b1)));
    assert!(eventually(T, || s.m.agent_get("b", "/readyz").0 == 503));
    s.m.start_ztunnel("b", &[]);
    assert!(
        eventually(T, || proxied(&s.b1)),
        "b1 not served after ztunnel restart"
    );
    hbone_works(&mut s, "after ztunnel restart");
}

#[test]
fn rules_flushed_behind_the_agent_are_repaired() {
    let mut s = scene();
    let _server = EchoServer::start(&s.b1, 8080);
    s.a1.ns
        .exec("nft", &["delete", "table", "inet", "ztunnel-redirect"]);
    assert!(!has_rules(&s.a1));
    assert!(eventually(T, || has_rules(&s.a1)), "rules not repaired");
    assert!(eventually(T, || s.m.agent_log("a").contains("repairing")));
    let (_, metrics) = s.m.agent_get("a", "/metrics");
    assert!(
        metrics.contains("ambient_agent_rule_repairs_total 1"),
        "{metrics}"
    );
    // And a rule added to our table by someone else is removed again.
    s.a1.ns.exec(
        "nft",
        &[
            "add",
            "rule",
            "inet",
            "ztunnel-redirect",
            "output-nat",
            "tcp",
            "dport",
            "9",
            "accept",
        ],
    );
    assert!(eventually(T, || !s
        .a1
        .ns
        .exec("nft", &["list", "table", "inet", "ztunnel-redirect"])
        .contains("dport 9")));
    hbone_works(&mut s, "after repair");
}

#[test]
fn only_the_kubelet_gets_the_probe_bypass_and_keeps_it_over_an_agent_restart() {
    let mut s = Scene::new();
    let kubelet = Kubelet::new(s.m.lab.id());
    let probe_args = ["--probe-cgroup", kubelet.path.as_str()];
    s.m.write_config(&[&s.wa, &s.wb], &[]);
    s.m.write_pods("a", &[&s.wa], "");
    s.m.start_agent("a", &probe_args);
    s.m.start_ztunnel("a", &[]);
    assert!(eventually(T, || proxied(&s.a1)));
    let server = EchoServer::start(&s.a1, 8080);
    let node = s.m.lab.node("a").ns.clone();

    // The kubelet's probe skips the proxy: the app sees the probe address.
    let got = kubelet.probe(&node, s.a1.addr(8080), "probe");
    assert_eq!(got.unwrap(), "probe");
    assert_eq!(server.peers()[0].ip().to_string(), "169.254.7.127");

    // Any other process on the node goes through ztunnel (and its policy) like everyone else.
    let other = Pod::with_ip("node-a", "a", &node, "198.19.0.1".parse().unwrap());
    let got = connect(&other, s.a1.addr(8080), T).and_then(|c| echo_roundtrip(c, b"other"));
    assert_eq!(got.unwrap(), b"other");
    assert_ne!(server.peers()[1].ip().to_string(), "169.254.7.127");
    assert!(
        eventually(T, || s.m.ztunnel_log("a").contains("direction=inbound")),
        "the host process did not go through ztunnel: {}",
        s.m.ztunnel_log("a")
    );

    // The agent restarts while no ztunnel can take the pod back: the pod is not re-confirmed,
    // yet its probes keep working because the new host table kept the old set's elements.
    s.m.lab.stop("ztunnel-a");
    s.m.lab.stop("agent-a");
    s.m.start_agent("a", &probe_args);
    let pods = s.m.agent_get("a", "/pods").1;
    assert!(!pods.contains("\"state\": \"enrolled\""), "{pods}");
    let got = kubelet.probe(&node, s.a1.addr(8080), "after restart");
    assert_eq!(got.unwrap(), "after restart");
    assert_eq!(server.peers()[2].ip().to_string(), "169.254.7.127");
}

#[test]
fn without_a_kubelet_no_host_process_skips_the_proxy() {
    // The lab's agents see no /proc, so `auto` finds no kubelet: nobody gets the bypass.
    let mut s = scene();
    let server = EchoServer::start(&s.a1, 8080);
    let host =
        s.m.lab
            .node("a")
            .ns
            .exec("nft", &["list", "table", "inet", "ztunnel-host"]);
    assert!(!host.contains("snat"), "{host}");
    let node = s.m.lab.node("a").ns.clone();
    let other = Pod::with_ip("node-a", "a", &node, "198.19.0.1".parse().unwrap());
    let got = connect(&other, s.a1.addr(8080), T).and_then(|c| echo_roundtrip(c, b"probe"));
    assert_eq!(got.unwrap(), b"probe");
    assert_ne!(server.peers()[0].ip().to_string(), "169.254.7.127");
    assert!(
        s.m.agent_log("a")
            .contains("no kubelet to give the probe bypass to")
    );
}

#[test]
fn a_pod_that_left_the_mesh_while_the_agent_was_down_is_cleaned_up_not_black_holed() {
    let mut s = scene();
    let _server = EchoServer::start(&s.b1, 8080);
    assert!(has_rules(&s.a1));
    // While the agent is down, a1's namespace leaves ambient mode; ztunnel keeps running.
    s.m.lab.stop("agent-a");
    let file = s.m.pod_file("a");
    let yaml = std::fs::read_to_string(&file)
        .unwrap()
        .replace("labels: {istio.io/dataplane-mode: ambient}", "labels: {}");
    std::fs::write(&file, yaml).unwrap();
    s.m.start_agent("a", &[]);
    assert!(
        eventually(T, || !has_rules(&s.a1)),
        "rules of a pod that left the mesh stay: {}",
        s.m.agent_log("a")
    );
    assert!(eventually(T, || unproxied(&s.a1)));
    assert!(
        s.m.agent_log("a")
            .contains("pod left the mesh while the agent was down")
    );
    // Its traffic flows as for any pod outside the mesh (not into a ztunnel that dropped it).
    let got = connect(&s.a1, s.b1.addr(8080), T).and_then(|c| echo_roundtrip(c, b"outside"));
    assert_eq!(got.unwrap(), b"outside");
    // The record forgot it: a later restart has nothing to clean.
    s.m.lab.stop("agent-a");
    s.m.start_agent("a", &[]);
    assert!(eventually(T, || s.m.agent_get("a", "/readyz").0 == 200));
    assert_eq!(
        s.m.agent_log("a")
            .matches("pod left the mesh while the agent was down")
            .count(),
        0,
        "{}",
        s.m.agent_log("a")
    );
}

#[test]
fn rules_lost_while_the_agent_was_down_are_reported_and_reinstalled() {
    let mut s = scene();
    let _server = EchoServer::start(&s.b1, 8080);
    // A node reboot loses every pod's rules; the agent restarts with its record of which pods
    // it had enrolled.
    s.m.lab.stop("agent-a");
    s.a1.ns
        .exec("nft", &["delete", "table", "inet", "ztunnel-redirect"]);
    s.a1.ns
        .exec("ip", &["-4", "rule", "del", "priority", "32764"]);
    s.a1.ns
        .exec("ip", &["-6", "rule", "del", "priority", "32764"]);
    s.m.start_agent("a", &[]);
    assert!(eventually(T, || has_rules(&s.a1)));
    assert!(
        eventually(T, || s.m.agent_log("a").contains("rules are gone")),
        "{}",
        s.m.agent_log("a")
    );
    let (_, metrics) = s.m.agent_get("a", "/metrics");
    assert!(
        metrics.contains("ambient_agent_rule_repairs_total 1"),
        "{metrics}"
    );
    hbone_works(&mut s, "after reboot repair");
}

#[test]
fn a_netns_path_that_is_not_a_netns_keeps_the_pod_pending_with_the_reason() {
    let mut s = Scene::new();
    s.m.write_config(&[&s.wa], &[]);
    let bogus = s.m.lab.dir().join("not-a-netns");
    std::fs::write(&bogus, "").unwrap();
    let extra = format!(
        "- {{name: ghost, namespace: ns-a, ips: [\"198.18.1.99\"], netns: {}}}\n",
        bogus.display()
    );
    s.m.write_pods("a", &[&s.wa], &extra);
    s.m.start_agent("a", &[]);
    s.m.start_ztunnel("a", &[]);
    assert!(
        eventually(T, || proxied(&s.a1)),
        "the good pod must still be enrolled"
    );
    assert!(eventually(T, || s
        .m
        .agent_get("a", "/pods")
        .1
        .contains("not a network namespace")));
    let (_, pods) = s.m.agent_get("a", "/pods");
    assert!(pods.contains("\"state\": \"pending\""), "{pods}");
    let settled = eventually(T, || {
        let (_, metrics) = s.m.agent_get("a", "/metrics");
        metrics.contains("ambient_agent_pods_pending 1")
            && metrics.contains("ambient_agent_pods_enrolled 1")
    });
    assert!(settled, "{}", s.m.agent_get("a", "/metrics").1);
}

#[test]
fn a_pod_known_only_by_its_ip_is_found_by_searching_the_node() {
    let mut s = Scene::new();
    s.m.write_config(&[&s.wa], &[]);
    // No netns path: the agent must find the namespace that holds the pod's address.
    let yaml = format!(
        "namespaces: [{{name: ns-a, labels: {{istio.io/dataplane-mode: ambient}}}}]\n\
         pods: [{{name: a1, namespace: ns-a, uid: {}, serviceAccount: client, ips: [\"{}\"]}}]\n",
        s.wa.uid(),
        s.a1.ip
    );
    std::fs::write(s.m.pod_file("a"), yaml).unwrap();
    s.m.start_agent("a", &[]);
    s.m.start_ztunnel("a", &[]);
    assert!(eventually(T, || proxied(&s.a1)), "{}", s.m.agent_log("a"));
    assert!(has_rules(&s.a1));
}
