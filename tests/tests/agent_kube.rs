//! The node agent's Kubernetes path against an in-process API server speaking the real
//! list/watch JSON: enrollment follows namespace labels and pod deletion, and odd objects do
//! not upset it.

use std::time::Duration;

use mesh_testbed::apps::{has_rules, proxied};
use mesh_testbed::kube_mock::KubeMock;
use mesh_testbed::lab::Pod;
use mesh_testbed::mesh::{Mesh, Workload, eventually};
use serde_json::json;

const T: Duration = Duration::from_secs(15);

fn pod_json(pod: &Pod, namespace: &str, node: &str, uid: &str) -> serde_json::Value {
    json!({
        "metadata": {"name": pod.name, "namespace": namespace, "uid": uid, "labels": {"app": pod.name}},
        "spec": {"nodeName": node, "serviceAccountName": "client", "containers": [{"name": "app", "image": "x"}]},
        "status": {"phase": "Running", "podIP": pod.ip.to_string(), "podIPs": [{"ip": pod.ip.to_string()}]}
    })
}

#[test]
fn namespace_labels_and_pod_deletion_drive_enrollment() {
    let mut m = Mesh::new(&["a"]);
    let a1 = m.lab.add_pod("a", "a1");
    let other = m.lab.add_pod("a", "other");
    m.write_config(&[&Workload::mesh(&a1, "shop", "client")], &[]);
    let api = KubeMock::start(&m.lab.node("a").ns);
    api.set_namespace("shop", &json!({}));
    api.set_pod(pod_json(&a1, "shop", "node-a", "uid-a1"));
    // Scheduled elsewhere: the field selector must keep it out even with an ambient label.
    let mut elsewhere = pod_json(&other, "shop", "node-z", "uid-other");
    elsewhere["metadata"]["labels"]["istio.io/dataplane-mode"] = json!("ambient");
    api.set_pod(elsewhere);
    // Odd objects the agent must shrug off.
    api.set_pod(json!({"metadata": {"name": "no-uid", "namespace": "shop"}, "spec": {"nodeName": "node-a", "containers": []}}));
    api.set_pod(json!({
        "metadata": {"name": "bad-ip", "namespace": "shop", "uid": "uid-bad"},
        "spec": {"nodeName": "node-a", "containers": []},
        "status": {"podIP": "999.1.2.3"}
    }));
    let kubeconfig = m.lab.dir().join("kubeconfig");
    api.kubeconfig(&kubeconfig);
    m.start_agent_kube("a", &kubeconfig, "node-a");
    m.start_ztunnel("a", &[]);
    assert!(
        eventually(T, || m.agent_get("a", "/readyz").0 == 200),
        "{}",
        m.agent_log("a")
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(!has_rules(&a1), "enrolled without any ambient label");
    assert!(!has_rules(&other), "enrolled a pod of another node");
    assert!(m.agent_log("a").contains("ignoring a pod object"));

    // The namespace opts in: the running pod is enrolled and the fact recorded on it.
    api.set_namespace("shop", &json!({"istio.io/dataplane-mode": "ambient"}));
    assert!(
        eventually(T, || proxied(&a1) && has_rules(&a1)),
        "{}",
        m.agent_log("a")
    );
    assert!(eventually(T, || api
        .patches()
        .iter()
        .any(|(_, name, p)| name == "a1"
            && p["metadata"]["annotations"]["ambient.istio.io/redirection"]
                == "enabled")));
    assert!(!has_rules(&other));

    // And opts out again: unenrolled, annotation removed.
    api.set_namespace("shop", &json!({}));
    assert!(
        eventually(T, || !has_rules(&a1) && !proxied(&a1)),
        "{}",
        m.agent_log("a")
    );
    assert!(eventually(T, || api.patches().iter().any(
        |(_, name, p)| {
            name == "a1" && p["metadata"]["annotations"]["ambient.istio.io/redirection"].is_null()
        }
    )));

    // Back in, then the pod is deleted: everything goes.
    api.set_namespace("shop", &json!({"istio.io/dataplane-mode": "ambient"}));
    assert!(eventually(T, || proxied(&a1)));
    api.delete_pod("shop", "a1");
    assert!(
        eventually(T, || !has_rules(&a1) && !proxied(&a1)),
        "{}",
        m.agent_log("a")
    );
}

#[test]
fn pod_label_none_opts_out_of_an_ambient_namespace() {
    let mut m = Mesh::new(&["a"]);
    let a1 = m.lab.add_pod("a", "a1");
    let api = KubeMock::start(&m.lab.node("a").ns);
    api.set_namespace("shop", &json!({"istio.io/dataplane-mode": "ambient"}));
    let mut pod = pod_json(&a1, "shop", "node-a", "uid-a1");
    pod["metadata"]["labels"]["istio.io/dataplane-mode"] = json!("none");
    api.set_pod(pod.clone());
    let kubeconfig = m.lab.dir().join("kubeconfig");
    api.kubeconfig(&kubeconfig);
    m.start_agent_kube("a", &kubeconfig, "node-a");
    m.start_ztunnel("a", &[]);
    assert!(eventually(T, || m.agent_get("a", "/readyz").0 == 200));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!has_rules(&a1));
    // Removing the opt-out label enrolls it.
    pod["metadata"]["labels"] = json!({});
    api.set_pod(pod);
    assert!(
        eventually(T, || has_rules(&a1) && proxied(&a1)),
        "{}",
        m.agent_log("a")
    );
}
