//! The agent's HTTP endpoint: `/readyz`, `/metrics` (Prometheus text) and `/pods` (JSON
//! enrollment status of every pod the agent tracks).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::enroll::Shared;
use crate::zds::ZdsServer;

/// What the endpoints read.
#[derive(Debug)]
pub struct Endpoints {
    pub shared: Arc<Mutex<Shared>>,
    pub zds: ZdsServer,
    pub registry: Registry,
    /// The CNI installer's state, when the agent installs the plugin.
    pub install: Option<Arc<crate::install::InstallState>>,
}

impl Endpoints {
    /// Whether the pod source has delivered its first full set.
    pub fn synced(&self) -> bool {
        self.shared.lock().expect("not poisoned").synced
    }

    /// Readiness: the pod source has synced, at least one ztunnel is connected and (when the
    /// agent installs the plugin) the plugin is in the node's CNI config. The body says what
    /// is still missing.
    pub fn ready(&self) -> (bool, String) {
        let synced = self.synced();
        let ztunnels = self.zds.connected();
        let mut waiting = Vec::new();
        if !synced {
            waiting.push("pod source sync".to_string());
        }
        if ztunnels == 0 {
            waiting.push("a ztunnel to connect over ZDS".to_string());
        }
        if let Some(install) = &self.install
            && let Some(missing) = install.waiting_for()
        {
            waiting.push(missing);
        }
        if waiting.is_empty() {
            (
                true,
                format!("ready: pod source synced, {ztunnels} ztunnel(s) connected\n"),
            )
        } else {
            (
                false,
                format!("not ready: waiting for {}\n", waiting.join(", ")),
            )
        }
    }

    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        let (status, content_type, body) = match path {
            "/readyz" => {
                let (ok, text) = self.ready();
                let status = if ok {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (status, "text/plain", text)
            }
            "/metrics" => {
                let mut text = String::new();
                match prometheus_client::encoding::text::encode(&mut text, &self.registry) {
                    Ok(()) => (
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        text,
                    ),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        e.to_string(),
                    ),
                }
            }
            "/pods" => {
                let shared = self.shared.lock().expect("not poisoned");
                let body = serde_json::to_string_pretty(&shared.pods).unwrap_or_default();
                (StatusCode::OK, "application/json", body + "\n")
            }
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /readyz, /metrics or /pods\n".into(),
            ),
        };
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts")
    }
}

/// Most connections one of the agent's HTTP servers serves at once; more wait to be accepted.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest one connection may live: longer than a CNI ADD may wait for its pod.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// The pause after a failed accept (out of descriptors, say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// HTTP/1 as the agent's servers speak it: headers must arrive within
/// [`HEADER_READ_TIMEOUT`], and a request head may not exceed 64 KiB.
pub fn http1() -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(64 * 1024);
    b
}

/// A listening socket the servers accept from.
pub trait Accept {
    type Stream;
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Accept for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Accept for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Accepts connections forever (at most [`MAX_CONNECTIONS`] at a time, each ended after
/// [`CONNECTION_LIFETIME`]) and hands each to `serve`. A failed accept is logged and retried
/// after a pause.
pub async fn accept_loop<L: Accept, F>(
    server: &'static str,
    listener: L,
    serve: impl Fn(L::Stream) -> F,
) where
    F: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        match listener.accept_one().await {
            Ok(stream) => {
                let conn = serve(stream);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(server, error = %e, "accept failed; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Serves the endpoints on `addr` until the future is dropped.
pub async fn serve(listener: TcpListener, endpoints: Arc<Endpoints>) {
    accept_loop("http", listener, |stream| {
        let endpoints = endpoints.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let resp = endpoints.respond(req.uri().path());
            async move { Ok::<_, Infallible>(resp) }
        });
        async move {
            let _ = http1()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
    .await
}

/// Binds the endpoint address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
