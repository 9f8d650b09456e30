//! The readiness endpoint: `GET /healthz/ready` on `--readiness-addr` (Istio's port 15021, in
//! ztunnel's own netns), for the kubelet's probe. 200 once ztunnel is connected to the node
//! agent and has taken its snapshot of the node's pods; until then 503 with what it still
//! waits for. Every other path is 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::inpod::client::ZdsStatus;

/// What readiness still waits for, or `None` when ready.
pub fn waiting_for(zds: &ZdsStatus) -> Option<&'static str> {
    if !zds.connected.load(Ordering::Acquire) {
        Some("a connection to the node agent's ZDS socket")
    } else if !zds.snapshot_received.load(Ordering::Acquire) {
        Some("the node agent's snapshot of this node's pods")
    } else {
        None
    }
}

fn answer(req: &Request<Incoming>, zds: &ZdsStatus) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz/ready") => match waiting_for(zds) {
            None => (StatusCode::OK, "ready\n".to_string()),
            Some(what) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: waiting for {what}\n"),
            ),
        },
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

/// Binds `addr`; the returned future serves until dropped.
pub async fn serve(
    addr: SocketAddr,
    zds: Arc<ZdsStatus>,
) -> std::io::Result<impl Future<Output = ()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let zds = zds.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let zds = zds.clone();
                    async move { Ok::<_, Infallible>(answer(&req, &zds)) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_it_waits_for() {
        let zds = ZdsStatus::default();
        assert!(waiting_for(&zds).unwrap().contains("connection"));
        zds.connected.store(true, Ordering::Release);
        assert!(waiting_for(&zds).unwrap().contains("snapshot"));
        zds.snapshot_received.store(true, Ordering::Release);
        assert_eq!(waiting_for(&zds), None);
    }
}
