//! What the manager asks of the world, as traits: the rules in a pod's netns ([`Rules`]),
//! finding that netns ([`Locate`]) and ztunnel over ZDS ([`Ztunnel`]). The agent wires in
//! [`Redirector`], [`Finder`] and [`ZdsServer`]; the manager's unit tests wire in fakes, so
//! every decision it makes (what is enrolled, what stays pending, what is never reported
//! enrolled) is tested without a kernel or a ztunnel.

use std::collections::HashSet;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use mesh_netns::NetNs;
use mesh_zds::client::WorkloadInfo;
use tokio::sync::watch;

use crate::netns_find::{FindError, Finder};
use crate::pods::PodInfo;
use crate::redirect::inspect::{self, InspectError};
use crate::redirect::{ApplyError, Check, Options, Redirector};
use crate::zds::{ZdsError, ZdsServer};

/// A pod's redirection, and what the agent reads and sets beside it in the pod's netns.
pub trait Rules: Send + Sync + 'static {
    fn check(
        &self,
        netns: &Arc<NetNs>,
        opts: Options,
    ) -> impl Future<Output = Result<Check, ApplyError>> + Send;

    /// Installs (or replaces) the rules for `opts` as one transaction.
    fn apply(
        &self,
        netns: &Arc<NetNs>,
        opts: Options,
    ) -> impl Future<Output = Result<(), ApplyError>> + Send;

    fn remove(&self, netns: &Arc<NetNs>) -> impl Future<Output = Result<(), ApplyError>> + Send;

    /// Lets a draining ztunnel's queued connections move to the new one (false: the kernel
    /// cannot).
    fn migrate_queued_connections(
        &self,
        netns: &Arc<NetNs>,
    ) -> impl Future<Output = Result<bool, InspectError>> + Send;

    /// Ok when ztunnel's DNS proxy listens in the pod.
    fn dns_served(
        &self,
        netns: &Arc<NetNs>,
    ) -> impl Future<Output = Result<(), InspectError>> + Send;
}

/// Finding a pod's network namespace, and the sandboxes the CNI plugin reported.
pub trait Locate: Send + Sync + 'static {
    fn find(&self, pod: &PodInfo) -> impl Future<Output = Result<NetNs, FindError>> + Send;
    fn remember_container(&self, container_id: &str, netns: &Path);
    fn forget_container(&self, container_id: &str);
    /// Forgets every sandbox not in `valid` (CNI GC).
    fn retain_containers(&self, valid: &HashSet<String>);
}

/// The ztunnels connected over ZDS.
pub trait Ztunnel: Send + Sync + 'static {
    /// Hands the pod to the newest ztunnel; Ok once it acknowledged.
    fn add(
        &self,
        uid: &str,
        info: WorkloadInfo,
        netns: Arc<NetNs>,
    ) -> impl Future<Output = Result<(), ZdsError>> + Send;
    fn del(&self, uid: &str) -> impl Future<Output = Result<(), ZdsError>> + Send;
    /// A pod whose netns cannot be opened now: a reconnecting ztunnel keeps serving it.
    fn keep(&self, uid: &str, info: WorkloadInfo);
    fn connected(&self) -> usize;
    fn watch_connected(&self) -> watch::Receiver<usize>;
    /// Whether a live ztunnel has acknowledged `uid`.
    fn acked(&self, uid: &str) -> bool;
}

impl Rules for Redirector {
    async fn check(&self, netns: &Arc<NetNs>, opts: Options) -> Result<Check, ApplyError> {
        Redirector::check(self, netns, opts).await
    }

    async fn apply(&self, netns: &Arc<NetNs>, opts: Options) -> Result<(), ApplyError> {
        Redirector::apply(self, netns, opts).await
    }

    async fn remove(&self, netns: &Arc<NetNs>) -> Result<(), ApplyError> {
        Redirector::remove(self, netns).await
    }

    async fn migrate_queued_connections(&self, netns: &Arc<NetNs>) -> Result<bool, InspectError> {
        inspect::migrate_queued_connections(netns).await
    }

    async fn dns_served(&self, netns: &Arc<NetNs>) -> Result<(), InspectError> {
        inspect::dns_served(netns).await
    }
}

impl Locate for Finder {
    async fn find(&self, pod: &PodInfo) -> Result<NetNs, FindError> {
        Finder::find(self, pod).await
    }

    fn remember_container(&self, container_id: &str, netns: &Path) {
        Finder::remember_container(self, container_id, netns)
    }

    fn forget_container(&self, container_id: &str) {
        Finder::forget_container(self, container_id)
    }

    fn retain_containers(&self, valid: &HashSet<String>) {
        Finder::retain_containers(self, valid)
    }
}

impl Ztunnel for ZdsServer {
    async fn add(&self, uid: &str, info: WorkloadInfo, netns: Arc<NetNs>) -> Result<(), ZdsError> {
        ZdsServer::add(self, uid, info, netns).await
    }

    async fn del(&self, uid: &str) -> Result<(), ZdsError> {
        ZdsServer::del(self, uid).await
    }

    fn keep(&self, uid: &str, info: WorkloadInfo) {
        ZdsServer::keep(self, uid, info)
    }

    fn connected(&self) -> usize {
        ZdsServer::connected(self)
    }

    fn watch_connected(&self) -> watch::Receiver<usize> {
        ZdsServer::watch_connected(self)
    }

    fn acked(&self, uid: &str) -> bool {
        ZdsServer::acked(self, uid)
    }
}
