//! The enrollment manager: makes each pod on the node either fully captured by ztunnel or not
//! enrolled at all.
//!
//! It runs as one task that owns all per-pod state. Inputs are the pod source's full pod set
//! (re-read whenever it changes), enrollment requests from the CNI plugin, ztunnel connecting,
//! retry timers and a periodic drift check. Enrolling follows one order — find the netns,
//! install (or verify and repair) the rules, hand the pod to ztunnel and wait for the ack,
//! then mark it enrolled — and a failure part-way leaves the pod `pending` with a retry
//! scheduled; it is never reported enrolled early.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_contract::Chain;
use mesh_netns::NetNs;
use mesh_zds::client::WorkloadInfo;
use tokio::sync::{mpsc, oneshot, watch};

mod doers;
mod marks;
mod requests;
mod status;
#[cfg(test)]
mod tests;

pub use doers::{Locate, Rules, Ztunnel};
pub use marks::{Marks, MarksError};
pub use requests::{CniFailure, CniOutcome, CniPod, Request};
pub use status::{NoStatus, PodState, PodStatus, Shared, StatusSink, Step};

use crate::metrics::Metrics;
use crate::netns_find::Finder;
use crate::pods::{Decision, NetnsHint, PodInfo, PodSet, Policy, REDIRECTION, decide};
use crate::redirect::host::HostProbes;
use crate::redirect::{Check, Options, Redirector};
use crate::zds::{ZdsError, ZdsServer};

const RETRY_START: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Tracked {
    pod: PodInfo,
    opts: Options,
    netns: Option<Arc<NetNs>>,
    /// The sandbox container the CNI plugin enrolled this pod for. While set, the netns path
    /// and addresses the runtime reported win over a pod source that does not give them.
    container: Option<String>,
    /// The runtime deleted that sandbox: the pod waits for a new one's ADD and is never
    /// enrolled again from the pod source (that would reach into the dying netns).
    sandbox_gone: bool,
    state: PodState,
    failures: u32,
    retry_at: Option<Instant>,
}

/// The manager's inputs and collaborators: the agent's own doers by default, fakes in its
/// unit tests.
#[derive(Debug)]
pub struct Manager<R = Redirector, F = Finder, Z = ZdsServer> {
    pub policy: Policy,
    pub redirector: Arc<R>,
    pub finder: Arc<F>,
    pub zds: Z,
    pub metrics: Arc<Metrics>,
    pub status: Arc<dyn StatusSink>,
    pub shared: Arc<Mutex<Shared>>,
    pub marks: Marks,
    pub drift_interval: Duration,
    /// The host's probe SNAT rule and sets, maintained here (none when something else owns
    /// the host rules). Behind a lock only to be moved onto blocking threads.
    pub host_probes: Option<Arc<Mutex<HostProbes>>>,
    tracked: BTreeMap<String, Tracked>,
    /// Pods that left the mesh while the agent was down whose rules could not be removed at
    /// start: tried again at every drift check until they go (or the pod is wanted again).
    left_behind: BTreeMap<String, PodInfo>,
    current: PodSet,
    synced: bool,
}

fn info(pod: &PodInfo) -> WorkloadInfo {
    WorkloadInfo {
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        service_account: pod.service_account.clone(),
        dns_nameservers: pod.dns_nameservers.clone(),
    }
}

impl<R: Rules, F: Locate, Z: Ztunnel> Manager<R, F, Z> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        policy: Policy,
        redirector: Arc<R>,
        finder: Arc<F>,
        zds: Z,
        metrics: Arc<Metrics>,
        status: Arc<dyn StatusSink>,
        shared: Arc<Mutex<Shared>>,
        marks: Marks,
        drift_interval: Duration,
    ) -> Self {
        Self {
            policy,
            redirector,
            finder,
            zds,
            metrics,
            status,
            shared,
            marks,
            drift_interval,
            host_probes: None,
            tracked: BTreeMap::new(),
            left_behind: BTreeMap::new(),
            current: PodSet::default(),
            synced: false,
        }
    }

    /// Runs until the pod source ends. `first_sync` fires once the first pod set has been
    /// reconciled (rules verified or repaired), which is when the agent starts serving ZDS.
    pub async fn run(
        mut self,
        mut pods: watch::Receiver<Option<PodSet>>,
        mut requests: mpsc::Receiver<Request>,
        first_sync: oneshot::Sender<()>,
    ) {
        let mut first_sync = Some(first_sync);
        let mut connected = self.zds.watch_connected();
        let mut drift = tokio::time::interval(self.drift_interval);
        drift.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The initial set, if the source already has one.
        let initial = pods.borrow_and_update().clone();
        if let Some(set) = initial {
            self.sync(set).await;
            self.prune_probe_sets().await;
            self.publish();
            if let Some(tx) = first_sync.take() {
                let _ = tx.send(());
            }
        }
        loop {
            let next_retry = self.tracked.values().filter_map(|t| t.retry_at).min();
            let sleep = async {
                match next_retry {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = pods.changed() => {
                    if changed.is_err() {
                        tracing::warn!("pod source ended");
                        return;
                    }
                    let set = pods.borrow_and_update().clone();
                    if let Some(set) = set {
                        self.sync(set).await;
                        if first_sync.is_some() {
                            self.prune_probe_sets().await;
                        }
                        if let Some(tx) = first_sync.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                () = sleep => self.retry_due().await,
                _ = drift.tick() => self.check_drift().await,
                Some(req) = requests.recv() => self.handle(req).await,
                Ok(()) = connected.changed() => {
                    let n = *connected.borrow_and_update();
                    self.metrics.zds_connections.set(n as i64);
                    if n > 0 {
                        // Pods waiting for a ztunnel can go now.
                        let now = Instant::now();
                        for t in self.tracked.values_mut() {
                            if matches!(t.state, PodState::Pending { .. }) {
                                t.retry_at = Some(now);
                            }
                        }
                    }
                }
            }
            self.publish();
        }
    }

    /// After the first sync: the host's probe sets kept over a restart lose the addresses
    /// of pods that are no longer enrolled here.
    async fn prune_probe_sets(&self) {
        if self.host_probes.is_none() {
            return;
        }
        let keep: Vec<_> = self
            .tracked
            .values()
            .flat_map(|t| t.pod.ips.iter().copied())
            .collect();
        let r = tokio::task::spawn_blocking(move || crate::redirect::host::retain(&keep)).await;
        if let Ok(Err(e)) = r {
            tracing::warn!(step = "probe-rule", error = %Chain(&e), "stale probe SNAT addresses not removed");
        }
    }

    fn publish(&self) {
        let pods: Vec<PodStatus> = self
            .tracked
            .iter()
            .map(|(uid, t)| PodStatus {
                uid: uid.clone(),
                namespace: t.pod.namespace.clone(),
                name: t.pod.name.clone(),
                state: t.state.clone(),
            })
            .collect();
        let enrolled = pods
            .iter()
            .filter(|p| p.state == PodState::Enrolled)
            .count();
        self.metrics.pods_enrolled.set(enrolled as i64);
        self.metrics
            .pods_pending
            .set((pods.len() - enrolled) as i64);
        let mut shared = self.shared.lock().expect("not poisoned");
        shared.synced = self.synced;
        shared.pods = pods;
    }

    /// Brings tracked pods in line with the source's current set.
    async fn sync(&mut self, set: PodSet) {
        let namespaces: HashMap<&str, _> = set
            .namespaces
            .iter()
            .map(|n| (n.name.as_str(), n))
            .collect();
        let mut wanted: BTreeMap<String, (PodInfo, Options)> = BTreeMap::new();
        let mut skipped = Vec::new();
        for pod in &set.pods {
            match decide(
                pod,
                namespaces.get(pod.namespace.as_str()).copied(),
                &self.policy,
            ) {
                Decision::Enroll(opts) => {
                    wanted.insert(pod.uid.clone(), (pod.clone(), opts));
                }
                // Not knowing is no reason to take a pod out of the mesh: it keeps what it has.
                Decision::Unknown(_) => {
                    if let Some(t) = self.tracked.get(&pod.uid) {
                        wanted.insert(pod.uid.clone(), (t.pod.clone(), t.opts));
                    }
                }
                Decision::Skip(_) => skipped.push(pod.clone()),
            }
        }
        if !self.synced {
            self.clean_up_left(skipped, &set).await;
        }
        let gone: Vec<String> = self
            .tracked
            .keys()
            .filter(|uid| !wanted.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            self.unenroll(&uid).await;
        }
        for (uid, (mut pod, opts)) in wanted {
            match self.tracked.get_mut(&uid) {
                Some(t) => {
                    if t.container.is_some() {
                        // What the runtime reported for its sandbox stays unless the source
                        // says otherwise.
                        if !matches!(pod.netns, NetnsHint::Path(_)) {
                            pod.netns = t.pod.netns.clone();
                        }
                        if pod.ips.is_empty() {
                            pod.ips = t.pod.ips.clone();
                        }
                    }
                    if t.pod == pod && t.opts == opts {
                        continue;
                    }
                    if t.pod.netns != pod.netns {
                        t.netns = None;
                    }
                    t.pod = pod;
                    t.opts = opts;
                    if t.sandbox_gone {
                        continue;
                    }
                    tracing::info!(%uid, pod = %t.pod.name, "pod changed; re-enrolling");
                    t.failures = 0;
                    self.enroll(&uid).await;
                }
                None => {
                    self.tracked.insert(
                        uid.clone(),
                        Tracked {
                            pod,
                            opts,
                            netns: None,
                            container: None,
                            sandbox_gone: false,
                            state: PodState::pending(Step::Starting, "starting"),
                            failures: 0,
                            retry_at: None,
                        },
                    );
                    self.enroll(&uid).await;
                }
            }
        }
        self.current = set;
        self.synced = true;
    }

    /// At startup: pods this agent enrolled (its record, or the pod's redirection
    /// annotation) that left the mesh while it was down still have their rules, which now
    /// lead to a ztunnel that no longer serves them. Their rules, annotation and record are
    /// removed; records of pods that no longer exist are dropped.
    async fn clean_up_left(&mut self, skipped: Vec<PodInfo>, set: &PodSet) {
        for pod in skipped {
            let annotated = pod.annotations.contains_key(REDIRECTION);
            if !self.marks.recorded(&pod.uid) && !annotated {
                continue;
            }
            self.remove_left(pod).await;
        }
        let existing: HashSet<&str> = set.pods.iter().map(|p| p.uid.as_str()).collect();
        for uid in self.marks.recorded_uids() {
            if !existing.contains(uid.as_str()) && !self.left_behind.contains_key(&uid) {
                self.marks.set(&uid, false).await;
            }
        }
    }

    /// Removes the rules of a pod that is not (or no longer) meant for the mesh; a failure
    /// keeps it in [`Manager::left_behind`] for the next drift check.
    async fn remove_left(&mut self, pod: PodInfo) {
        match self.finder.find(&pod).await {
            Ok(ns) => {
                if let Err(e) = self.redirector.remove(&Arc::new(ns)).await {
                    self.metrics.failure("remove");
                    tracing::warn!(uid = %pod.uid, pod = %pod.name, step = "rules", error = %Chain(&e), "removing the redirection of a pod that left the mesh failed; retrying at the next drift check");
                    self.left_behind.insert(pod.uid.clone(), pod);
                    return;
                }
            }
            // No netns: the sandbox is gone, and its rules with it.
            Err(e) => {
                tracing::debug!(uid = %pod.uid, error = %Chain(&e), "no netns for a pod that left the mesh")
            }
        }
        self.left_behind.remove(&pod.uid);
        self.marks.set(&pod.uid, false).await;
        self.status.record(&pod, None);
        tracing::info!(uid = %pod.uid, pod = %pod.name, namespace = %pod.namespace, "pod left the mesh while the agent was down; its redirection is removed");
    }

    async fn retry_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .tracked
            .iter()
            .filter(|(_, t)| t.retry_at.is_some_and(|at| at <= now))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in due {
            self.enroll(&uid).await;
        }
    }

    fn pending(&mut self, uid: &str, step: Step, reason: String) {
        let Some(t) = self.tracked.get_mut(uid) else {
            return;
        };
        t.failures += 1;
        let wait = (RETRY_START * 2u32.saturating_pow(t.failures.min(8) - 1)).min(RETRY_MAX);
        t.retry_at = Some(Instant::now() + wait);
        tracing::warn!(uid, pod = %t.pod.name, namespace = %t.pod.namespace, step = step.as_str(), %reason, retry_in = ?wait, "enrollment pending");
        let state = PodState::pending(step, reason);
        if t.state != state {
            self.metrics.failure(step.as_str());
        }
        t.state = state;
        let pod = t.pod.clone();
        self.status.record(&pod, Some("pending"));
    }

    /// One enrollment attempt: netns, rules, ztunnel, mark.
    async fn enroll(&mut self, uid: &str) {
        let Some(t) = self.tracked.get_mut(uid) else {
            return;
        };
        t.retry_at = None;
        let pod = t.pod.clone();
        let opts = t.opts;
        let netns = match &t.netns {
            Some(ns) => ns.clone(),
            None => match self.finder.find(&pod).await {
                Ok(ns) => {
                    let ns = Arc::new(ns);
                    self.tracked.get_mut(uid).expect("tracked").netns = Some(ns.clone());
                    ns
                }
                Err(e) => {
                    // A ztunnel that already serves this pod (agent restart) must keep it.
                    self.zds.keep(uid, info(&pod));
                    let reason = format!("network namespace: {}", Chain(&e));
                    return self.pending(uid, Step::Netns, reason);
                }
            },
        };
        let marked = self.marks.contains(uid)
            || pod
                .annotations
                .get(REDIRECTION)
                .is_some_and(|v| v == "enabled");
        // A pod never enrolled (a fresh sandbox at CNI ADD) has nothing to compare: the
        // transaction replaces whatever is there, so listing the table first would only cost
        // an `nft` run on the pod's start-up path.
        let check = if marked {
            self.redirector.check(&netns, opts).await
        } else {
            Ok(Check::Missing)
        };
        match check {
            Ok(Check::Intact) => {}
            Ok(check) => {
                match (&check, marked) {
                    (Check::Missing, false) => {
                        tracing::info!(uid, pod = %pod.name, "installing redirection")
                    }
                    (Check::Missing, true) => {
                        self.metrics.rule_repairs.inc();
                        tracing::warn!(uid, pod = %pod.name, "pod was enrolled but its rules are gone (node reboot?); reinstalling");
                    }
                    (Check::Drifted(what), _) => {
                        self.metrics.rule_repairs.inc();
                        tracing::warn!(uid, pod = %pod.name, drift = %what, "redirection changed behind the agent's back; repairing");
                    }
                    (Check::Intact, _) => {}
                }
                if let Err(e) = self.redirector.apply(&netns, opts).await {
                    return self.pending(
                        uid,
                        Step::Rules,
                        format!("installing redirection: {}", Chain(&e)),
                    );
                }
            }
            Err(e) => {
                return self.pending(
                    uid,
                    Step::Rules,
                    format!("checking redirection: {}", Chain(&e)),
                );
            }
        }
        match self.redirector.migrate_queued_connections(&netns).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(
                    uid,
                    "kernel without tcp_migrate_req: a ztunnel hand-over may reset queued connections"
                )
            }
            Err(e) => {
                tracing::warn!(uid, pod = %pod.name, error = %Chain(&e), "cannot set tcp_migrate_req")
            }
        }
        match self.zds.add(uid, info(&pod), netns.clone()).await {
            Ok(()) => {}
            Err(ZdsError::NoZtunnel) => {
                return self.pending(uid, Step::Ztunnel, "waiting for ztunnel to connect".into());
            }
            Err(e) => return self.pending(uid, Step::Ztunnel, format!("ztunnel: {}", Chain(&e))),
        }
        // ztunnel has opened its listeners: with DNS capture, one must serve 15053.
        if opts.dns_capture
            && let Err(e) = self.redirector.dns_served(&netns).await
        {
            return self.pending(uid, Step::Dns, Chain(&e).to_string());
        }
        if self.host_probes.is_some() {
            let ips = pod.ips.clone();
            let r = tokio::task::spawn_blocking(move || crate::redirect::host::add(&ips)).await;
            if let Ok(Err(e)) = r {
                tracing::warn!(uid, pod = %pod.name, step = "probe-rule", error = %Chain(&e), "probe SNAT set not updated");
            }
        }
        let t = self.tracked.get_mut(uid).expect("tracked");
        let was = std::mem::replace(&mut t.state, PodState::Enrolled);
        t.failures = 0;
        self.marks.set(uid, true).await;
        self.status.record(&pod, Some("enabled"));
        if was != PodState::Enrolled {
            tracing::info!(uid, pod = %pod.name, namespace = %pod.namespace, "pod enrolled");
        }
    }

    async fn unenroll(&mut self, uid: &str) {
        let Some(t) = self.tracked.remove(uid) else {
            return;
        };
        if let Err(e) = self.zds.del(uid).await {
            tracing::warn!(uid, pod = %t.pod.name, step = "ztunnel", error = %Chain(&e), "ztunnel did not confirm removal");
        }
        if let Some(ns) = &t.netns
            && let Err(e) = self.redirector.remove(ns).await
        {
            self.metrics.failure("remove");
            tracing::warn!(uid, pod = %t.pod.name, step = "rules", error = %Chain(&e), "removing redirection failed");
        }
        if self.host_probes.is_some() {
            let ips = t.pod.ips.clone();
            let _ = tokio::task::spawn_blocking(move || crate::redirect::host::remove(&ips)).await;
        }
        self.marks.set(uid, false).await;
        self.status.record(&t.pod, None);
        tracing::info!(uid, pod = %t.pod.name, namespace = %t.pod.namespace, "pod unenrolled");
    }

    async fn check_drift(&mut self) {
        // Pods wanted again are the enrollment's business now.
        let retry: Vec<PodInfo> = std::mem::take(&mut self.left_behind)
            .into_values()
            .filter(|p| !self.tracked.contains_key(&p.uid))
            .collect();
        for pod in retry {
            self.remove_left(pod).await;
        }
        if let Some(probes) = self.host_probes.clone() {
            let r =
                tokio::task::spawn_blocking(move || probes.lock().expect("not poisoned").refresh())
                    .await;
            if let Ok(Err(e)) = r {
                self.metrics.failure("probe-rule");
                tracing::warn!(step = "probe-rule", error = %Chain(&e), "probe rule not refreshed");
            }
        }
        let enrolled: Vec<String> = self
            .tracked
            .iter()
            .filter(|(_, t)| t.state == PodState::Enrolled)
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in enrolled {
            let Some(t) = self.tracked.get(&uid) else {
                continue;
            };
            let (Some(ns), opts, name) = (t.netns.clone(), t.opts, t.pod.name.clone()) else {
                continue;
            };
            match self.redirector.check(&ns, opts).await {
                Ok(Check::Intact) => {}
                Ok(check) => {
                    self.metrics.rule_repairs.inc();
                    tracing::warn!(%uid, pod = %name, drift = ?check, "redirection drifted; repairing");
                    if let Err(e) = self.redirector.apply(&ns, opts).await {
                        self.pending(
                            &uid,
                            Step::Rules,
                            format!("repairing redirection: {}", Chain(&e)),
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(%uid, pod = %name, error = %Chain(&e), "drift check failed")
                }
            }
        }
    }

    async fn handle(&mut self, req: Request) {
        match req {
            Request::CniAdd { pod, reply } => {
                let result = self.cni_add(pod).await;
                let _ = reply.send(result);
            }
            Request::CniCheck { pod, reply } => {
                let result = self.cni_check(pod).await;
                let _ = reply.send(result);
            }
            Request::CniDel { container_id, done } => {
                self.cni_del(&container_id).await;
                let _ = done.send(());
            }
            Request::CniGc { valid, done } => {
                let removed = self.cni_gc(&valid).await;
                let _ = done.send(removed);
            }
        }
    }

    /// The source's pod the plugin names.
    fn find_source_pod(&self, cni: &CniPod) -> Result<PodInfo, CniFailure> {
        let matches: Vec<&PodInfo> = self
            .current
            .pods
            .iter()
            .filter(|p| {
                p.name == cni.name && (cni.namespace.is_empty() || p.namespace == cni.namespace)
            })
            .filter(|p| cni.uid.as_ref().is_none_or(|u| u.is_empty() || *u == p.uid))
            .collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(CniFailure::UnknownPod(format!(
                "the agent does not know pod {}{}{} (yet)",
                cni.namespace,
                if cni.namespace.is_empty() { "" } else { "/" },
                cni.name
            ))),
            _ => Err(CniFailure::Failed(format!(
                "pod name {} is ambiguous without a namespace",
                cni.name
            ))),
        }
    }

    /// Enrolls the pod a CNI ADD names, if the pod source knows it and it belongs in the mesh.
    async fn cni_add(&mut self, cni: CniPod) -> Result<CniOutcome, CniFailure> {
        self.finder
            .remember_container(&cni.container_id, &cni.netns);
        let mut pod = self.find_source_pod(&cni)?;
        let ns = self
            .current
            .namespaces
            .iter()
            .find(|n| n.name == pod.namespace);
        let opts = match decide(&pod, ns, &self.policy) {
            Decision::Skip(why) => return Ok(CniOutcome::NotInMesh(why)),
            // Retried like a pod the source has not shown; then a clear error, and the runtime
            // retries the sandbox. Never "not in the mesh": the app would start uncaptured.
            Decision::Unknown(why) => return Err(CniFailure::UnknownPod(why.to_string())),
            Decision::Enroll(opts) => opts,
        };
        if self.zds.connected() == 0 {
            return Err(CniFailure::NoZtunnel);
        }
        // The runtime's netns and addresses for this sandbox are authoritative.
        pod.netns = NetnsHint::Path(cni.netns.clone());
        if pod.ips.is_empty() {
            pod.ips = cni.ips.clone();
        }
        let uid = pod.uid.clone();
        let same_sandbox = self.tracked.get(&uid).is_some_and(|t| {
            t.container.as_deref() == Some(cni.container_id.as_str())
                && t.state == PodState::Enrolled
        });
        if !same_sandbox {
            if self.tracked.contains_key(&uid) {
                // A new sandbox for a known pod: the old one's proxy and rules go first.
                self.unenroll(&uid).await;
            }
            self.tracked.insert(
                uid.clone(),
                Tracked {
                    pod,
                    opts,
                    netns: None,
                    container: Some(cni.container_id.clone()),
                    sandbox_gone: false,
                    state: PodState::pending(Step::Starting, "starting"),
                    failures: 0,
                    retry_at: None,
                },
            );
            self.enroll(&uid).await;
        }
        match self.tracked.get(&uid).map(|t| t.state.clone()) {
            Some(PodState::Enrolled) => Ok(CniOutcome::Enrolled),
            Some(PodState::Pending { reason, .. }) => Err(CniFailure::Failed(reason)),
            None => Err(CniFailure::Failed("pod vanished during enrollment".into())),
        }
    }

    async fn cni_check(&mut self, cni: CniPod) -> Result<CniOutcome, CniFailure> {
        let pod = self.find_source_pod(&cni)?;
        let ns = self
            .current
            .namespaces
            .iter()
            .find(|n| n.name == pod.namespace);
        match decide(&pod, ns, &self.policy) {
            Decision::Skip(why) => return Ok(CniOutcome::NotInMesh(why)),
            Decision::Unknown(why) => return Err(CniFailure::UnknownPod(why.to_string())),
            Decision::Enroll(_) => {}
        }
        let Some(t) = self.tracked.get(&pod.uid) else {
            return Err(CniFailure::Missing("the pod is not enrolled".into()));
        };
        let (Some(netns), opts, state) = (t.netns.clone(), t.opts, t.state.clone()) else {
            return Err(CniFailure::Missing(format!("not enrolled: {:?}", t.state)));
        };
        if let PodState::Pending { reason, .. } = state {
            return Err(CniFailure::Missing(reason));
        }
        // Rules without a ztunnel behind them black-hole the pod: not "intact".
        if !self.zds.acked(&pod.uid) {
            return Err(CniFailure::Missing(
                "no live ztunnel serves the pod (none connected, or it has not acknowledged the pod)"
                    .into(),
            ));
        }
        match self.redirector.check(&netns, opts).await {
            Ok(Check::Intact) => Ok(CniOutcome::Enrolled),
            Ok(Check::Missing) => Err(CniFailure::Missing("redirection rules are missing".into())),
            Ok(Check::Drifted(what)) => Err(CniFailure::Missing(what)),
            Err(e) => Err(CniFailure::Failed(Chain(&e).to_string())),
        }
    }

    /// The sandbox is gone: its pod leaves ztunnel and its rules go (the pod itself may come
    /// back with a new sandbox).
    /// Handles every sandbox the plugin enrolled that the runtime no longer lists as a DEL
    /// (a DEL it never sent, e.g. while the agent was down); how many.
    async fn cni_gc(&mut self, valid: &HashSet<String>) -> usize {
        self.finder.retain_containers(valid);
        let stale: BTreeSet<String> = self
            .tracked
            .values()
            .filter(|t| !t.sandbox_gone)
            .filter_map(|t| t.container.clone())
            .filter(|c| !valid.contains(c))
            .collect();
        for container in &stale {
            tracing::info!(container = %container, "sandbox not among the runtime's valid attachments (GC)");
            self.cni_del(container).await;
        }
        stale.len()
    }

    async fn cni_del(&mut self, container_id: &str) {
        self.finder.forget_container(container_id);
        let uids: Vec<String> = self
            .tracked
            .iter()
            .filter(|(_, t)| t.container.as_deref() == Some(container_id))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in uids {
            tracing::info!(%uid, container = container_id, "sandbox deleted");
            let Some(t) = self.tracked.get(&uid) else {
                continue;
            };
            let (pod, opts) = (t.pod.clone(), t.opts);
            self.unenroll(&uid).await;
            // The pod stays known but waits for a new sandbox's ADD: enrolling it again from
            // the pod source would reach into a netns the runtime is tearing down (and keep
            // it alive in ztunnel).
            self.tracked.insert(
                uid,
                Tracked {
                    pod,
                    opts,
                    netns: None,
                    container: Some(container_id.to_string()),
                    sandbox_gone: true,
                    state: PodState::pending(
                        Step::Sandbox,
                        "sandbox deleted by the runtime; waiting for a new one",
                    ),
                    failures: 0,
                    retry_at: None,
                },
            );
        }
    }
}
