//! Data-plane worker threads, each running a single-threaded runtime.
//!
//! A connection is accepted, proxied and closed on one worker; the HBONE connections it uses
//! come from that worker's pool. The control thread only creates sockets and hands them over.
//!
//! Every worker has its own listeners (`SO_REUSEPORT`), so the kernel spreads new connections
//! by a hash of their addresses. That is fine for app connections, which are many, but an
//! inbound HBONE connection carries every stream a peer's worker sends here, and a node has
//! few of them: two that hash onto the same worker leave the other idle while one core does
//! all the decryption. So an inbound HBONE connection is moved, once, right after its
//! accept, to the worker serving the fewest; its streams then stay on that worker.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::limits::{OverLimit, Slot};
use super::pool::{Pool, PoolEntry};
use super::socket::{self, ListenerKind};
use super::{Pod, ProxyInputs, dns, inbound, outbound, plaintext, spin};
use crate::drain::ConnGuard;
use crate::metrics::FailureLabels;

/// What each worker knows of every other: where to send work, and how much each serves.
#[derive(Debug)]
struct Peer {
    handle: tokio::runtime::Handle,
    pool: Arc<Pool>,
    /// Inbound HBONE connections served on this worker.
    hbone: AtomicUsize,
}

#[derive(Debug)]
struct Thread {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The set of worker threads.
#[derive(Debug)]
pub struct Workers {
    peers: Arc<[Peer]>,
    threads: Vec<Thread>,
    inputs: Arc<ProxyInputs>,
}

/// One worker's share of the work (`/debug/workers`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WorkerLoad {
    pub worker: usize,
    /// Inbound HBONE connections it serves, of every pod.
    pub inbound_hbone: usize,
}

/// Resolves when all of a pod's accept loops have ended and their sockets are closed.
#[derive(Debug)]
pub struct ListenersClosed(mpsc::Receiver<()>);

impl ListenersClosed {
    pub async fn wait(mut self) {
        // Every loop holds a sender; the channel closes when the last one drops.
        let _ = self.0.recv().await;
    }
}

/// The listeners of one pod, one set per worker.
pub type PodListeners = Vec<Vec<(ListenerKind, std::net::TcpListener)>>;

impl Workers {
    pub fn start(count: usize, inputs: Arc<ProxyInputs>) -> io::Result<Self> {
        let mut peers = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        let busy_poll = inputs.config.busy_poll;
        for i in 0..count {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(spin::before_park)
                .build()?;
            let handle = rt.handle().clone();
            let pool = Arc::new(Pool::new(inputs.clone()));
            let (stop, stopped) = oneshot::channel::<()>();
            let sweeper = pool.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ztunnel-worker-{i}"))
                .spawn(move || {
                    spin::configure(busy_poll);
                    rt.block_on(async move {
                        tokio::spawn(spin::Spinner);
                        tokio::spawn(sweeper.sweep_forever());
                        let _ = stopped.await;
                    });
                })?;
            peers.push(Peer {
                handle,
                pool,
                hbone: AtomicUsize::new(0),
            });
            threads.push(Thread {
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Self {
            peers: peers.into(),
            threads,
            inputs,
        })
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Starts accepting for `pod` on every worker. `listeners` has one set per worker; the
    /// DNS proxy, if given its sockets, runs on the first. The returned handle resolves once
    /// every listener is closed (after the pod drains).
    pub fn serve_pod(
        &self,
        pod: &Arc<Pod>,
        listeners: PodListeners,
        dns: Option<dns::DnsSockets>,
    ) -> ListenersClosed {
        let (open, closed) = mpsc::channel::<()>(1);
        if let (Some(sockets), Some(first)) = (dns, self.peers.first()) {
            first.handle.spawn(dns::serve(
                sockets,
                pod.clone(),
                self.inputs.clone(),
                open.clone(),
            ));
        }
        for (me, set) in listeners.into_iter().enumerate().take(self.peers.len()) {
            for (kind, listener) in set {
                self.peers[me].handle.spawn(accept_loop(
                    kind,
                    listener,
                    pod.clone(),
                    self.inputs.clone(),
                    Worker {
                        me,
                        peers: self.peers.clone(),
                    },
                    open.clone(),
                ));
            }
        }
        ListenersClosed(closed)
    }

    /// Every pooled HBONE connection, across workers.
    pub fn pool_entries(&self) -> Vec<PoolEntry> {
        self.peers.iter().flat_map(|w| w.pool.entries()).collect()
    }

    /// What each worker serves, for the admin view.
    pub fn loads(&self) -> Vec<WorkerLoad> {
        self.peers
            .iter()
            .enumerate()
            .map(|(worker, p)| WorkerLoad {
                worker,
                inbound_hbone: p.hbone.load(Ordering::Relaxed),
            })
            .collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for t in &mut self.threads {
            if let Some(stop) = t.stop.take() {
                let _ = stop.send(());
            }
        }
        for t in &mut self.threads {
            if let Some(t) = t.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// The worker an accept loop runs on, and the others it may hand connections to.
#[derive(Debug, Clone)]
struct Worker {
    me: usize,
    peers: Arc<[Peer]>,
}

impl Worker {
    /// The same set of workers, seen from worker `me`.
    fn with_me(&self, me: usize) -> Worker {
        Worker {
            me,
            peers: self.peers.clone(),
        }
    }

    /// The worker serving the fewest inbound HBONE connections, this one on a tie.
    fn least_hbone(&self) -> usize {
        least_loaded(
            self.peers.iter().map(|p| p.hbone.load(Ordering::Relaxed)),
            self.me,
        )
    }
}

/// The index of the smallest of `loads`; `me` when it is among the smallest (no move for
/// nothing), else the first.
fn least_loaded(loads: impl Iterator<Item = usize>, me: usize) -> usize {
    loads
        .enumerate()
        .min_by_key(|&(i, load)| (load, i != me))
        .map_or(me, |(i, _)| i)
}

/// Counts one inbound HBONE connection against the worker serving it while it lives.
#[derive(Debug)]
struct HboneLoad(Worker);

impl HboneLoad {
    fn on(worker: Worker) -> Self {
        worker.peers[worker.me]
            .hbone
            .fetch_add(1, Ordering::Relaxed);
        Self(worker)
    }
}

impl Drop for HboneLoad {
    fn drop(&mut self) {
        self.0.peers[self.0.me]
            .hbone
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// What an accepted connection carries to the worker that serves it: the drain and cap
/// bookkeeping is released when the connection ends, wherever that is.
#[derive(Debug)]
struct Accepted {
    kind: ListenerKind,
    peer: std::net::SocketAddr,
    pod: Arc<Pod>,
    inputs: Arc<ProxyInputs>,
    guard: ConnGuard,
    slot: Slot,
    /// For an inbound HBONE connection, counted against its worker from the moment it is
    /// picked, so the next accept anywhere already sees it.
    load: Option<HboneLoad>,
}

impl Accepted {
    /// Serves `tcp` to completion on the current worker, whose HBONE pool is `pool`.
    async fn serve(self, tcp: TcpStream, pool: Arc<Pool>) {
        let Accepted {
            kind,
            peer,
            pod,
            inputs,
            guard,
            slot,
            load,
        } = self;
        let work = std::pin::pin!(async {
            match kind {
                ListenerKind::Outbound => outbound::serve(tcp, peer, &pod, &inputs, &pool).await,
                ListenerKind::InboundPlaintext => plaintext::serve(tcp, peer, &pod, &inputs).await,
                // Boxed: its TLS and HTTP/2 handshakes would otherwise size every
                // connection's task, idle or not (once per HBONE connection, not stream).
                ListenerKind::Hbone => {
                    Box::pin(inbound::serve(tcp, peer, pod.clone(), inputs.clone())).await
                }
            }
        });
        pod.drain.run_until_cut(work).await;
        drop(guard);
        drop(slot);
        drop(load);
    }
}

async fn accept_loop(
    kind: ListenerKind,
    listener: std::net::TcpListener,
    pod: Arc<Pod>,
    inputs: Arc<ProxyInputs>,
    worker: Worker,
    _open: mpsc::Sender<()>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(pod = %pod.name(), ?kind, error = %e, "cannot register listener");
            return;
        }
    };
    loop {
        let (tcp, peer) = tokio::select! {
            () = pod.drain.accepting_stopped() => return,
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and similar: back off instead of spinning.
                    tracing::warn!(pod = %pod.name(), ?kind, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        spin::activity();
        let slot = match inputs.limits.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(over) => {
                refuse_over_limit(kind, tcp, peer, &pod, &inputs, over);
                continue;
            }
        };
        let (target, load) = match kind {
            ListenerKind::Hbone => {
                let target = worker.least_hbone();
                (target, Some(HboneLoad::on(worker.with_me(target))))
            }
            _ => (worker.me, None),
        };
        let accepted = Accepted {
            kind,
            peer,
            pod: pod.clone(),
            inputs: inputs.clone(),
            guard: pod.drain.track(),
            slot,
            load,
        };
        if target == worker.me {
            tokio::spawn(accepted.serve(tcp, worker.peers[worker.me].pool.clone()));
            continue;
        }
        // Moved before anything is read: the socket leaves this worker's reactor and joins
        // the target's, where the TLS handshake and every stream then run.
        let std = match tcp.into_std() {
            Ok(std) => std,
            Err(e) => {
                tracing::warn!(pod = %pod.name(), %peer, error = %e, "cannot hand an HBONE connection to another worker");
                continue;
            }
        };
        let there = &worker.peers[target];
        let pool = there.pool.clone();
        there.handle.spawn(async move {
            match TcpStream::from_std(std) {
                Ok(tcp) => accepted.serve(tcp, pool).await,
                Err(e) => {
                    tracing::warn!(pod = %accepted.pod.name(), %peer, error = %e, "cannot register a handed-over HBONE connection");
                }
            }
        });
    }
}

/// Resets a connection that is over a cap, counts it, and logs (at most once a second).
fn refuse_over_limit(
    kind: ListenerKind,
    tcp: TcpStream,
    peer: std::net::SocketAddr,
    pod: &Pod,
    inputs: &ProxyInputs,
    over: OverLimit,
) {
    socket::reset(tcp);
    let direction = match kind {
        ListenerKind::Outbound => "outbound",
        ListenerKind::InboundPlaintext => "inbound_plaintext",
        ListenerKind::Hbone => "inbound",
    };
    inputs
        .metrics
        .failures
        .get_or_create(&FailureLabels {
            direction,
            reason: "connection_limit",
        })
        .inc();
    if inputs.limits.should_log() {
        tracing::warn!(pod = %pod.name(), ?kind, %peer, limit = %over, "connection refused: over the connection limit");
    }
}

#[cfg(test)]
mod tests {
    use super::least_loaded;

    #[test]
    fn the_least_loaded_worker_is_picked_and_ties_stay_put() {
        let cases: [(&[usize], usize, usize); 7] = [
            // (loads, this worker, picked)
            (&[0, 0], 0, 0),
            (&[0, 0], 1, 1),
            (&[1, 0], 0, 1),
            (&[0, 1], 1, 0),
            (&[3, 1, 1], 0, 1),
            (&[3, 1, 1], 2, 2),
            (&[5], 0, 0),
        ];
        for (loads, me, want) in cases {
            assert_eq!(
                least_loaded(loads.iter().copied(), me),
                want,
                "loads {loads:?} seen from worker {me}"
            );
        }
    }
}
