//! The manager's decisions with fake doers: what it asks of the rules, the netns finder and
//! ztunnel, in which order, and the state each pod ends in. The fakes never touch a kernel:
//! every netns they hand out is the test's own, which nothing enters.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_netns::NetNs;
use mesh_zds::client::WorkloadInfo;
use tokio::sync::watch;

use super::*;
use crate::netns_find::FindError;
use crate::pods::{DATAPLANE_MODE, MODE_AMBIENT, NamespaceInfo};
use crate::redirect::ApplyError;
use crate::redirect::inspect::InspectError;

/// Every call the fakes saw, in order, as short strings (`apply`, `add ns/p`, ...).
type Calls = Arc<Mutex<Vec<String>>>;

fn own_netns() -> NetNs {
    NetNs::open("/proc/self/ns/net").expect("the test's own netns")
}

#[derive(Debug, Default)]
struct FakeRules {
    calls: Calls,
    fail_apply: AtomicBool,
    fail_remove: AtomicBool,
    /// What `check` answers once rules were applied (`Intact` unless set).
    drifted: Mutex<Option<String>>,
    applied: AtomicBool,
    dns_served: AtomicBool,
}

impl Rules for FakeRules {
    async fn check(&self, _: &Arc<NetNs>, _: Options) -> Result<Check, ApplyError> {
        self.calls.lock().unwrap().push("check".into());
        Ok(
            match (
                self.applied.load(Ordering::SeqCst),
                self.drifted.lock().unwrap().clone(),
            ) {
                (false, _) => Check::Missing,
                (true, Some(what)) => Check::Drifted(what),
                (true, None) => Check::Intact,
            },
        )
    }

    async fn apply(&self, _: &Arc<NetNs>, _: Options) -> Result<(), ApplyError> {
        self.calls.lock().unwrap().push("apply".into());
        if self.fail_apply.load(Ordering::SeqCst) {
            return Err(ApplyError::Failed {
                command: "nft".into(),
                stderr: "no space left".into(),
            });
        }
        self.applied.store(true, Ordering::SeqCst);
        *self.drifted.lock().unwrap() = None;
        Ok(())
    }

    async fn remove(&self, _: &Arc<NetNs>) -> Result<(), ApplyError> {
        self.calls.lock().unwrap().push("remove".into());
        if self.fail_remove.load(Ordering::SeqCst) {
            return Err(ApplyError::Failed {
                command: "nft".into(),
                stderr: "busy".into(),
            });
        }
        self.applied.store(false, Ordering::SeqCst);
        Ok(())
    }

    async fn migrate_queued_connections(&self, _: &Arc<NetNs>) -> Result<bool, InspectError> {
        Ok(true)
    }

    async fn dns_served(&self, _: &Arc<NetNs>) -> Result<(), InspectError> {
        self.calls.lock().unwrap().push("dns?".into());
        if self.dns_served.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(InspectError::DnsNotServed { missing: "UDP" })
        }
    }
}

#[derive(Debug, Default)]
struct FakeLocate {
    calls: Calls,
    /// Pods (uids) whose netns is nowhere to be found.
    lost: Mutex<HashSet<String>>,
    containers: Mutex<BTreeMap<String, PathBuf>>,
}

impl Locate for FakeLocate {
    async fn find(&self, pod: &PodInfo) -> Result<NetNs, FindError> {
        self.calls.lock().unwrap().push(format!("find {}", pod.uid));
        if self.lost.lock().unwrap().contains(&pod.uid) {
            return Err(FindError::NotFound(pod.uid.clone()));
        }
        Ok(own_netns())
    }

    fn remember_container(&self, container_id: &str, netns: &Path) {
        let mut known = self.containers.lock().unwrap();
        known.insert(container_id.into(), netns.into());
    }

    fn forget_container(&self, container_id: &str) {
        self.containers.lock().unwrap().remove(container_id);
    }

    fn retain_containers(&self, valid: &HashSet<String>) {
        self.containers
            .lock()
            .unwrap()
            .retain(|c, _| valid.contains(c));
    }
}

#[derive(Debug)]
struct FakeZtunnel {
    calls: Calls,
    connected: watch::Sender<usize>,
    acked: Arc<Mutex<HashSet<String>>>,
    kept: Arc<Mutex<HashSet<String>>>,
}

impl Ztunnel for FakeZtunnel {
    async fn add(&self, uid: &str, _: WorkloadInfo, _: Arc<NetNs>) -> Result<(), ZdsError> {
        self.calls.lock().unwrap().push(format!("add {uid}"));
        if *self.connected.borrow() == 0 {
            return Err(ZdsError::NoZtunnel);
        }
        self.acked.lock().unwrap().insert(uid.into());
        Ok(())
    }

    async fn del(&self, uid: &str) -> Result<(), ZdsError> {
        self.calls.lock().unwrap().push(format!("del {uid}"));
        self.acked.lock().unwrap().remove(uid);
        Ok(())
    }

    fn keep(&self, uid: &str, _: WorkloadInfo) {
        self.kept.lock().unwrap().insert(uid.into());
    }

    fn connected(&self) -> usize {
        *self.connected.borrow()
    }

    fn watch_connected(&self) -> watch::Receiver<usize> {
        self.connected.subscribe()
    }

    fn acked(&self, uid: &str) -> bool {
        self.acked.lock().unwrap().contains(uid)
    }
}

struct Fixture {
    m: Manager<FakeRules, FakeLocate, FakeZtunnel>,
    calls: Calls,
}

impl Fixture {
    /// A manager with one connected ztunnel and default policy.
    fn new() -> Self {
        Self::with_policy(Policy::default())
    }

    fn with_policy(policy: Policy) -> Self {
        let calls = Calls::default();
        let rules = FakeRules {
            calls: calls.clone(),
            dns_served: AtomicBool::new(true),
            ..Default::default()
        };
        let locate = FakeLocate {
            calls: calls.clone(),
            ..Default::default()
        };
        let zds = FakeZtunnel {
            calls: calls.clone(),
            connected: watch::channel(1).0,
            acked: Default::default(),
            kept: Default::default(),
        };
        let m = Manager::new(
            policy,
            Arc::new(rules),
            Arc::new(locate),
            zds,
            Arc::new(Metrics::default()),
            Arc::new(NoStatus),
            Arc::new(Mutex::new(Shared::default())),
            Marks::load(None).expect("in-memory record"),
            Duration::from_secs(3600),
        );
        Self { m, calls }
    }

    /// The calls since the last look.
    fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    fn state(&self, uid: &str) -> Option<PodState> {
        self.m.tracked.get(uid).map(|t| t.state.clone())
    }

    fn pending_step(&self, uid: &str) -> Option<Step> {
        match self.state(uid) {
            Some(PodState::Pending { step, .. }) => Some(step),
            _ => None,
        }
    }
}

fn pod(name: &str, namespace: &str) -> PodInfo {
    PodInfo {
        uid: format!("{namespace}/{name}"),
        name: name.into(),
        namespace: namespace.into(),
        service_account: "default".into(),
        ips: vec!["198.18.1.11".parse().unwrap()],
        ..Default::default()
    }
}

fn namespace(name: &str, ambient: bool) -> NamespaceInfo {
    let mut labels = BTreeMap::new();
    if ambient {
        labels.insert(DATAPLANE_MODE.to_string(), MODE_AMBIENT.to_string());
    }
    NamespaceInfo {
        name: name.into(),
        labels,
    }
}

fn set<const N: usize>(pods: [PodInfo; N], namespaces: &[NamespaceInfo]) -> PodSet {
    PodSet {
        pods: pods.into(),
        namespaces: namespaces.to_vec(),
    }
}

fn cni(pod: &PodInfo, container: &str) -> CniPod {
    CniPod {
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        uid: Some(pod.uid.clone()),
        container_id: container.into(),
        netns: PathBuf::from(format!("/run/netns/{container}")),
        ips: vec!["198.18.1.99".parse().unwrap()],
    }
}

#[tokio::test]
async fn sync_enrolls_in_order_rules_then_ztunnel_then_the_mark() {
    let mut f = Fixture::new();
    let p = pod("p", "shop");
    f.m.sync(set([p.clone()], &[namespace("shop", true)])).await;
    // A pod never enrolled has nothing to check: its rules are installed straight away.
    assert_eq!(f.take_calls(), ["find shop/p", "apply", "add shop/p"]);
    assert_eq!(f.state("shop/p"), Some(PodState::Enrolled));
    assert!(f.m.marks.contains("shop/p"));
    // The same set again changes nothing.
    f.m.sync(set([p], &[namespace("shop", true)])).await;
    assert!(f.take_calls().is_empty());
}

#[tokio::test]
async fn a_pod_outside_ambient_namespaces_is_never_touched() {
    let mut f = Fixture::new();
    let sets = [
        set([pod("p", "plain")], &[namespace("plain", false)]),
        set([pod("p", "kube-system")], &[namespace("kube-system", true)]),
    ];
    for s in sets {
        f.m.sync(s).await;
    }
    assert!(f.take_calls().is_empty());
    assert!(f.m.tracked.is_empty());
}

#[tokio::test]
async fn without_ztunnel_a_pod_is_pending_and_enrolled_once_one_connects() {
    let mut f = Fixture::new();
    f.m.zds.connected.send_replace(0);
    f.m.sync(set([pod("p", "shop")], &[namespace("shop", true)]))
        .await;
    assert_eq!(f.pending_step("shop/p"), Some(Step::Ztunnel));
    assert!(
        !f.m.marks.contains("shop/p"),
        "marked before ztunnel had it"
    );
    assert!(
        f.m.tracked["shop/p"].retry_at.is_some(),
        "no retry scheduled"
    );
    f.take_calls();

    f.m.zds.connected.send_replace(1);
    f.m.tracked.get_mut("shop/p").unwrap().retry_at = Some(Instant::now());
    f.m.retry_due().await;
    assert_eq!(f.state("shop/p"), Some(PodState::Enrolled));
    // The netns found on the first attempt is reused; the rules go in again as one
    // transaction (a pod not yet marked has nothing to check against).
    assert_eq!(f.take_calls(), ["apply", "add shop/p"]);
}

#[tokio::test]
async fn a_failed_rule_install_leaves_the_pod_pending_and_never_reaches_ztunnel() {
    let mut f = Fixture::new();
    f.m.redirector.fail_apply.store(true, Ordering::SeqCst);
    f.m.sync(set([pod("p", "shop")], &[namespace("shop", true)]))
        .await;
    assert_eq!(f.take_calls(), ["find shop/p", "apply"]);
    match f.state("shop/p") {
        Some(PodState::Pending { step, reason }) => {
            assert_eq!(step, Step::Rules);
            assert_eq!(reason, "installing redirection: nft failed: no space left");
        }
        other => panic!("{other:?}"),
    }
    assert!(!f.m.marks.contains("shop/p"));
}

#[tokio::test]
async fn a_pod_whose_netns_is_lost_is_pending_and_kept_in_ztunnel() {
    let mut f = Fixture::new();
    f.m.finder.lost.lock().unwrap().insert("shop/p".into());
    f.m.sync(set([pod("p", "shop")], &[namespace("shop", true)]))
        .await;
    assert_eq!(f.take_calls(), ["find shop/p"]);
    assert_eq!(f.pending_step("shop/p"), Some(Step::Netns));
    // A ztunnel that already serves it (an agent restart) must keep doing so.
    assert!(f.m.zds.kept.lock().unwrap().contains("shop/p"));
}

#[tokio::test]
async fn with_dns_capture_a_pod_is_not_enrolled_until_its_dns_proxy_listens() {
    let mut f = Fixture::with_policy(Policy {
        dns_capture: true,
        ..Policy::default()
    });
    f.m.redirector.dns_served.store(false, Ordering::SeqCst);
    f.m.sync(set([pod("p", "shop")], &[namespace("shop", true)]))
        .await;
    assert_eq!(
        f.take_calls(),
        ["find shop/p", "apply", "add shop/p", "dns?"]
    );
    assert_eq!(f.pending_step("shop/p"), Some(Step::Dns));
    assert!(!f.m.marks.contains("shop/p"));
}

#[tokio::test]
async fn a_pod_that_leaves_goes_out_of_ztunnel_and_its_rules_go() {
    let mut f = Fixture::new();
    let p = pod("p", "shop");
    f.m.sync(set([p.clone()], &[namespace("shop", true)])).await;
    f.take_calls();
    // Its namespace is taken out of the mesh.
    f.m.sync(set([p], &[namespace("shop", false)])).await;
    assert_eq!(f.take_calls(), ["del shop/p", "remove"]);
    assert!(f.m.tracked.is_empty());
    assert!(!f.m.marks.contains("shop/p"));
}

#[tokio::test]
async fn an_undecidable_pod_keeps_what_it_has() {
    let mut f = Fixture::new();
    let p = pod("p", "shop");
    f.m.sync(set([p.clone()], &[namespace("shop", true)])).await;
    f.take_calls();
    // The source lags: the pod is listed, its namespace not (yet, or any more).
    f.m.sync(set([p], &[])).await;
    assert!(f.take_calls().is_empty());
    assert_eq!(f.state("shop/p"), Some(PodState::Enrolled));
}

#[tokio::test]
async fn drift_is_repaired() {
    let mut f = Fixture::new();
    f.m.sync(set([pod("p", "shop")], &[namespace("shop", true)]))
        .await;
    f.take_calls();
    *f.m.redirector.drifted.lock().unwrap() = Some("chain output".into());
    f.m.check_drift().await;
    assert_eq!(f.take_calls(), ["check", "apply"]);
    assert_eq!(f.m.metrics.rule_repairs.get(), 1);
    f.m.check_drift().await;
    assert_eq!(f.take_calls(), ["check"]);
}

#[tokio::test]
async fn cni_add_answers_only_once_the_pod_is_enrolled() {
    let mut f = Fixture::new();
    let p = pod("p", "shop");
    let plain = pod("q", "plain");
    let namespaces = [namespace("shop", true), namespace("plain", false)];
    f.m.sync(set([], &namespaces)).await;

    // Not (yet) in the pod source: an error the plugin retries, never "not in the mesh".
    assert!(matches!(
        f.m.cni_add(cni(&p, "c1")).await,
        Err(CniFailure::UnknownPod(_))
    ));
    f.m.sync(set([p.clone(), plain.clone()], &namespaces)).await;
    assert_eq!(f.state("shop/p"), Some(PodState::Enrolled));
    f.take_calls();
    assert_eq!(
        f.m.cni_add(cni(&plain, "c2")).await,
        Ok(CniOutcome::NotInMesh(
            "neither pod nor namespace is in ambient mode"
        ))
    );

    // The sandbox the runtime names replaces what the source knew: its netns, its addresses.
    assert_eq!(f.m.cni_add(cni(&p, "c1")).await, Ok(CniOutcome::Enrolled));
    assert_eq!(
        f.take_calls(),
        ["del shop/p", "remove", "find shop/p", "apply", "add shop/p"]
    );
    let t = &f.m.tracked["shop/p"];
    assert_eq!(t.pod.netns, NetnsHint::Path("/run/netns/c1".into()));
    assert_eq!(t.container.as_deref(), Some("c1"));
    // The same ADD again (a runtime retry) is answered from what is there.
    assert_eq!(f.m.cni_add(cni(&p, "c1")).await, Ok(CniOutcome::Enrolled));
    assert!(f.take_calls().is_empty());
}

#[tokio::test]
async fn cni_add_fails_closed() {
    let mut f = Fixture::new();
    let p = pod("p", "shop");
    f.m.sync(set([], &[namespace("shop", true)])).await;
    f.m.current.pods.push(p.clone());

    // No ztunnel: refused before anything is installed.
    f.m.zds.connected.send_replace(0);
    assert_eq!(f.m.cni_add(cni(&p, "c1")).await, Err(CniFailure::NoZtunnel));
    assert!(f.take_calls().is_empty());

    // Rules that do not go in: the reason, and ztunnel never hears of the pod.
    f.m.zds.connected.send_replace(1);
    f.m.redirector.fail_apply.store(true, Ordering::SeqCst);
    let answer = f.m.cni_add(cni(&p, "c1")).await;
    assert_eq!(
        answer,
        Err(CniFailure::Failed(
            "installing redirection: nft failed: no space left".into()
        ))
    );
    assert!(!f.take_calls().iter().any(|c| c.starts_with("add")));
}

#[tokio::test]
async fn cni_del_unenrolls_and_the_dying_sandbox_is_never_enrolled_again() {
    let mut f = Fixture::new();
    let p = pod("p", "shop");
    let namespaces = [namespace("shop", true)];
    f.m.sync(set([], &namespaces)).await;
    f.m.current.pods.push(p.clone());
    assert_eq!(f.m.cni_add(cni(&p, "c1")).await, Ok(CniOutcome::Enrolled));
    f.take_calls();

    f.m.cni_del("c1").await;
    assert_eq!(f.take_calls(), ["del shop/p", "remove"]);
    assert_eq!(f.pending_step("shop/p"), Some(Step::Sandbox));
    assert!(!f.m.marks.contains("shop/p"));
    assert!(f.m.finder.containers.lock().unwrap().is_empty());
    // The pod source still lists the pod: it waits for a new sandbox's ADD.
    f.m.sync(set([p.clone()], &namespaces)).await;
    assert!(f.take_calls().is_empty());
    // CHECK on the gone sandbox says what is missing.
    assert!(matches!(
        f.m.cni_check(cni(&p, "c1")).await,
        Err(CniFailure::Missing(_))
    ));
    // A new sandbox's ADD enrolls it again.
    assert_eq!(f.m.cni_add(cni(&p, "c2")).await, Ok(CniOutcome::Enrolled));
}

#[tokio::test]
async fn cni_gc_deletes_sandboxes_the_runtime_no_longer_has() {
    let mut f = Fixture::new();
    let (p, q) = (pod("p", "shop"), pod("q", "shop"));
    f.m.sync(set([], &[namespace("shop", true)])).await;
    f.m.current.pods.extend([p.clone(), q.clone()]);
    for (pod, c) in [(&p, "c1"), (&q, "c2")] {
        assert_eq!(f.m.cni_add(cni(pod, c)).await, Ok(CniOutcome::Enrolled));
    }
    f.take_calls();
    let valid: HashSet<String> = ["c2".to_string()].into();
    assert_eq!(f.m.cni_gc(&valid).await, 1);
    assert_eq!(f.take_calls(), ["del shop/p", "remove"]);
    assert_eq!(f.state("shop/q"), Some(PodState::Enrolled));
    assert_eq!(f.pending_step("shop/p"), Some(Step::Sandbox));
}

#[tokio::test]
async fn rules_of_a_pod_that_left_while_the_agent_was_down_go_even_if_the_first_try_fails() {
    let mut f = Fixture::new();
    // The record says the pod was enrolled; it now lives in a namespace outside the mesh.
    f.m.marks.set("plain/p", true).await;
    f.m.redirector.fail_remove.store(true, Ordering::SeqCst);
    let plain = [namespace("plain", false)];
    f.m.sync(set([pod("p", "plain")], &plain)).await;
    assert_eq!(f.take_calls(), ["find plain/p", "remove"]);
    assert!(
        f.m.marks.recorded("plain/p"),
        "forgotten before its rules went"
    );
    // Tried again at the drift check, until it works; then never again.
    f.m.check_drift().await;
    assert_eq!(f.take_calls(), ["find plain/p", "remove"]);
    f.m.redirector.fail_remove.store(false, Ordering::SeqCst);
    f.m.check_drift().await;
    assert_eq!(f.take_calls(), ["find plain/p", "remove"]);
    assert!(!f.m.marks.recorded("plain/p"));
    f.m.check_drift().await;
    assert!(f.take_calls().is_empty());
}
