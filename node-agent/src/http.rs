//! The agent's HTTP endpoint: `/readyz`, `/metrics` (Prometheus text) and `/pods` (JSON
//! enrollment status of every pod the agent tracks).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

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

/// Serves the endpoints on `addr` until the future is dropped.
pub async fn serve(listener: TcpListener, endpoints: Arc<Endpoints>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let resp = endpoints.respond(req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds the endpoint address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
