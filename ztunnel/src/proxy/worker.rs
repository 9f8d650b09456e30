//! Data-plane worker threads, each running a single-threaded runtime.
//!
//! A connection is accepted, proxied and closed on one worker; the HBONE connections it uses
//! come from that worker's pool. The control thread only creates sockets and hands them over.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use super::limits::OverLimit;
use super::pool::{Pool, PoolEntry};
use super::socket::{self, ListenerKind};
use super::{Pod, ProxyInputs, dns, inbound, outbound, plaintext, spin};
use crate::metrics::FailureLabels;

#[derive(Debug)]
struct Worker {
    handle: tokio::runtime::Handle,
    pool: Arc<Pool>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The set of worker threads.
#[derive(Debug)]
pub struct Workers {
    workers: Vec<Worker>,
    inputs: Arc<ProxyInputs>,
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
        let mut workers = Vec::with_capacity(count);
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
            workers.push(Worker {
                handle,
                pool,
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Self { workers, inputs })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
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
        if let (Some(sockets), Some(first)) = (dns, self.workers.first()) {
            first.handle.spawn(dns::serve(
                sockets,
                pod.clone(),
                self.inputs.clone(),
                open.clone(),
            ));
        }
        for (worker, set) in self.workers.iter().zip(listeners) {
            for (kind, listener) in set {
                worker.handle.spawn(accept_loop(
                    kind,
                    listener,
                    pod.clone(),
                    self.inputs.clone(),
                    worker.pool.clone(),
                    open.clone(),
                ));
            }
        }
        ListenersClosed(closed)
    }

    /// Every pooled HBONE connection, across workers.
    pub fn pool_entries(&self) -> Vec<PoolEntry> {
        self.workers.iter().flat_map(|w| w.pool.entries()).collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(stop) = w.stop.take() {
                let _ = stop.send(());
            }
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

async fn accept_loop(
    kind: ListenerKind,
    listener: std::net::TcpListener,
    pod: Arc<Pod>,
    inputs: Arc<ProxyInputs>,
    pool: Arc<Pool>,
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
        let guard = pod.drain.track();
        let pod = pod.clone();
        let inputs = inputs.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            let work = std::pin::pin!(async {
                match kind {
                    ListenerKind::Outbound => {
                        outbound::serve(tcp, peer, &pod, &inputs, &pool).await
                    }
                    ListenerKind::InboundPlaintext => {
                        plaintext::serve(tcp, peer, &pod, &inputs).await
                    }
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
        });
    }
}

/// Resets a connection that is over a cap, counts it, and logs (at most once a second).
fn refuse_over_limit(
    kind: ListenerKind,
    tcp: tokio::net::TcpStream,
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
