//! The HBONE connection pool of one worker.
//!
//! Connections are keyed by (source identity, expected destination identities, next hop,
//! source IP): a connection is only reused when its TLS handshake proved exactly what a new
//! stream would need. Each carries at most `max_streams` streams; past that a new connection
//! opens. Only one connection per key is being established at a time, so a burst of new
//! streams waits for it rather than opening many. Connections with no streams close after
//! the idle timeout; dead ones (GOAWAY, PING timeout, I/O error) leave the pool at once.
//!
//! The pool belongs to one worker thread and is only used from tasks on that thread, so the
//! locks here are never contended; they exist to satisfy `Send`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::SendStream;
use h2::client::SendRequest;
use rustls_pki_types::ServerName;

use super::copy::Incoming;
use super::readahead::ReadAhead;
use super::{HANDSHAKE_TIMEOUT, Pod, ProxyError, ProxyInputs, socket};
use crate::identity::Identity;

/// HTTP/2 settings from SPEC §5.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Per-stream send buffer h2 may hold before applying backpressure to the app read.
pub const SEND_BUFFER: usize = 1024 * 1024;
/// How much encrypted data rustls may queue before the socket must take it; large, so one
/// `writev` carries many records (rustls' default of 64 KiB means a syscall per 64 KiB).
pub const TLS_BUFFER: usize = 1024 * 1024;
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The HTTP/2 client side of an HBONE connection: SPEC §5 windows and frames, no push.
pub fn h2_client() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .enable_push(false);
    b
}

/// What a pooled connection proved, and so which streams it may carry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_identity: Identity,
    /// Sorted, so the same set always gives the same key.
    pub dst_identities: Vec<Identity>,
    pub next_hop: SocketAddr,
    pub src_ip: IpAddr,
}

impl PoolKey {
    pub fn new(
        src_identity: Identity,
        mut dst_identities: Vec<Identity>,
        next_hop: SocketAddr,
        src_ip: IpAddr,
    ) -> Self {
        dst_identities.sort();
        dst_identities.dedup();
        Self {
            src_identity,
            dst_identities,
            next_hop,
            src_ip,
        }
    }
}

#[derive(Debug)]
struct PooledConn {
    id: u64,
    sender: SendRequest<Bytes>,
    streams: AtomicUsize,
    dead: Arc<AtomicBool>,
    idle_since: Mutex<Option<Instant>>,
}

impl PooledConn {
    fn usable(&self, max: usize) -> bool {
        !self.dead.load(Ordering::Acquire) && self.streams.load(Ordering::Acquire) < max
    }
}

/// Why a stream could not be opened.
enum Refused {
    /// The connection is going away (GOAWAY received); nothing was sent on it.
    GoingAway(Lease),
    Failed(ProxyError),
}

/// Holds one stream slot on a pooled connection; releasing the last marks it idle.
#[derive(Debug)]
pub struct Lease(Arc<PooledConn>);

impl Lease {
    pub fn connection_id(&self) -> u64 {
        self.0.id
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().expect("not poisoned") = Some(Instant::now());
        }
    }
}

#[derive(Debug, Default)]
struct KeyConns {
    conns: Vec<Arc<PooledConn>>,
    /// Held while a new connection for this key is being established.
    opening: Arc<tokio::sync::Mutex<()>>,
}

/// One worker's pool.
#[derive(Debug)]
pub struct Pool {
    inputs: Arc<ProxyInputs>,
    keys: Mutex<HashMap<PoolKey, KeyConns>>,
    next_id: AtomicU64,
    max_streams: usize,
    idle_timeout: Duration,
}

/// Pool contents, for the admin view and tests.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PoolEntry {
    pub next_hop: SocketAddr,
    pub src_identity: String,
    pub connection_id: u64,
    pub streams: usize,
}

impl Pool {
    pub fn new(inputs: Arc<ProxyInputs>) -> Self {
        let max_streams = inputs.config.pool_max_streams as usize;
        let idle_timeout = inputs.config.pool_idle_timeout;
        Self {
            inputs,
            keys: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            max_streams,
            idle_timeout,
        }
    }

    /// Takes a stream slot on a usable connection for `key`, if there is one.
    fn checkout(
        &self,
        key: &PoolKey,
    ) -> Result<(SendRequest<Bytes>, Lease), Arc<tokio::sync::Mutex<()>>> {
        let mut keys = self.keys.lock().expect("not poisoned");
        let entry = keys.entry(key.clone()).or_default();
        entry.conns.retain(|c| !c.dead.load(Ordering::Acquire));
        // The least loaded usable connection spreads streams when several exist.
        let best = entry
            .conns
            .iter()
            .filter(|c| c.usable(self.max_streams))
            .min_by_key(|c| c.streams.load(Ordering::Acquire));
        match best {
            Some(conn) => {
                conn.streams.fetch_add(1, Ordering::AcqRel);
                *conn.idle_since.lock().expect("not poisoned") = None;
                Ok((conn.sender.clone(), Lease(conn.clone())))
            }
            None => Err(entry.opening.clone()),
        }
    }

    /// Opens a CONNECT stream for `req` over a pooled (or new) connection. The peer's answer
    /// is left pending in the returned [`Incoming`], so data can flow before it arrives.
    ///
    /// A pooled connection whose peer has just sent GOAWAY (a draining ztunnel) refuses new
    /// streams locally, before anything is sent: that connection is marked dead and the
    /// stream is opened once more on a fresh one, so a rolling update loses no connection.
    /// `req` builds the CONNECT request (a second time only for that retry).
    pub async fn open(
        &self,
        key: &PoolKey,
        pod: &Pod,
        req: impl Fn() -> http::Request<()>,
    ) -> Result<(SendStream<Bytes>, Incoming, Lease), ProxyError> {
        match self.try_open(key, pod, req()).await {
            Err(Refused::GoingAway(lease)) => {
                lease.0.dead.store(true, Ordering::Release);
                drop(lease);
                tracing::debug!(peer = %key.next_hop, "pooled HBONE connection is going away; opening the stream on a new one");
                match self.try_open(key, pod, req()).await {
                    Ok(opened) => Ok(opened),
                    Err(Refused::GoingAway(_)) => Err(ProxyError::Timeout(
                        "an HBONE connection that is not going away",
                    )),
                    Err(Refused::Failed(e)) => Err(e),
                }
            }
            Err(Refused::Failed(e)) => Err(e),
            Ok(opened) => Ok(opened),
        }
    }

    async fn try_open(
        &self,
        key: &PoolKey,
        pod: &Pod,
        req: http::Request<()>,
    ) -> Result<(SendStream<Bytes>, Incoming, Lease), Refused> {
        let (sender, lease) = match self.checkout(key) {
            Ok(found) => found,
            Err(opening) => {
                let _guard = opening.lock().await;
                // Someone else may have opened one while we waited.
                match self.checkout(key) {
                    Ok(found) => found,
                    Err(_) => {
                        // Boxed: the handshakes run once per connection; inline, they would
                        // size every stream's task.
                        let conn = Box::pin(self.connect(key, pod))
                            .await
                            .map_err(Refused::Failed)?;
                        conn.streams.fetch_add(1, Ordering::AcqRel);
                        let sender = conn.sender.clone();
                        let mut keys = self.keys.lock().expect("not poisoned");
                        keys.entry(key.clone())
                            .or_default()
                            .conns
                            .push(conn.clone());
                        (sender, Lease(conn))
                    }
                }
            }
        };
        // A peer that never grants a stream (its concurrency limit reached) must not hold the
        // app's connection forever.
        let ready = tokio::time::timeout(HANDSHAKE_TIMEOUT, sender.ready())
            .await
            .map_err(|_| {
                Refused::Failed(ProxyError::Timeout("the wait for a free HBONE stream"))
            })?;
        let mut sender = match ready {
            Ok(sender) => sender,
            Err(e) if e.is_go_away() => return Err(Refused::GoingAway(lease)),
            Err(e) => return Err(Refused::Failed(e.into())),
        };
        match sender.send_request(req, false) {
            Ok((response, send)) => Ok((send, Incoming::Pending(response), lease)),
            Err(e) if e.is_go_away() => Err(Refused::GoingAway(lease)),
            Err(e) => Err(Refused::Failed(e.into())),
        }
    }

    async fn connect(&self, key: &PoolKey, pod: &Pod) -> Result<Arc<PooledConn>, ProxyError> {
        let addr = key.next_hop;
        let config = self
            .inputs
            .tls
            .client_config(pod.cert.clone(), key.dst_identities.clone())?;
        let handshake = async {
            let tcp = socket::connect(
                pod,
                addr,
                socket::Toward::Hbone(self.inputs.config.hbone_congestion_control.as_deref()),
            )
            .await?;
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::IpAddress(addr.ip().into()), ReadAhead::new(tcp))
                .await
                .map_err(|source| ProxyError::Tls { addr, source })?;
            tls.get_mut().1.set_buffer_limit(Some(TLS_BUFFER));
            tls.get_mut().0.allow_growth();
            let (sender, conn) = h2_client().handshake::<_, Bytes>(tls).await?;
            Ok::<_, ProxyError>((sender, conn))
        };
        let (sender, conn) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| ProxyError::Timeout("HBONE handshake"))??;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let dead = Arc::new(AtomicBool::new(false));
        tokio::spawn(drive(conn, id, addr, dead.clone()));
        tracing::debug!(conn = id, peer = %addr, identity = ?key.dst_identities, "HBONE connection established");
        Ok(Arc::new(PooledConn {
            id,
            sender,
            streams: AtomicUsize::new(0),
            dead,
            idle_since: Mutex::new(None),
        }))
    }

    /// Drops connections idle past the timeout and dead ones. Their drivers finish once the
    /// last sender is gone (after a GOAWAY).
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut keys = self.keys.lock().expect("not poisoned");
        for entry in keys.values_mut() {
            entry.conns.retain(|c| {
                if c.dead.load(Ordering::Acquire) {
                    return false;
                }
                let idle = *c.idle_since.lock().expect("not poisoned");
                idle.is_none_or(|t| now.duration_since(t) < self.idle_timeout)
            });
        }
        keys.retain(|_, e| !e.conns.is_empty() || Arc::strong_count(&e.opening) > 1);
    }

    /// Runs [`Pool::sweep`] periodically until the task is dropped.
    pub async fn sweep_forever(self: Arc<Self>) {
        let every =
            (self.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            tokio::time::sleep(every).await;
            self.sweep();
        }
    }

    pub fn entries(&self) -> Vec<PoolEntry> {
        let keys = self.keys.lock().expect("not poisoned");
        let mut out: Vec<PoolEntry> = keys
            .iter()
            .flat_map(|(k, e)| {
                e.conns.iter().map(|c| PoolEntry {
                    next_hop: k.next_hop,
                    src_identity: k.src_identity.to_string(),
                    connection_id: c.id,
                    streams: c.streams.load(Ordering::Acquire),
                })
            })
            .collect();
        out.sort_by_key(|e| e.connection_id);
        out
    }
}

/// Polls one client connection to completion, sending keepalive PINGs; a PING unanswered
/// within [`PING_TIMEOUT`] closes it.
async fn drive<T>(
    mut conn: h2::client::Connection<T, Bytes>,
    id: u64,
    peer: SocketAddr,
    dead: Arc<AtomicBool>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut ping = conn.ping_pong();
    let result = loop {
        let tick = tokio::time::sleep(PING_INTERVAL);
        tokio::select! {
            r = &mut conn => break r.map_err(|e| e.to_string()),
            () = tick => {
                let Some(pp) = ping.as_mut() else { continue };
                let pong = tokio::time::timeout(PING_TIMEOUT, pp.ping(h2::Ping::opaque()));
                tokio::select! {
                    r = &mut conn => break r.map_err(|e| e.to_string()),
                    answered = pong => match answered {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => break Err(e.to_string()),
                        Err(_) => break Err("keepalive PING unanswered".to_string()),
                    },
                }
            }
        }
    };
    dead.store(true, Ordering::Release);
    match result {
        Ok(()) => tracing::debug!(conn = id, %peer, "HBONE connection closed"),
        Err(e) => tracing::debug!(conn = id, %peer, error = %e, "HBONE connection ended"),
    }
}
