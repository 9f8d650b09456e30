//! The small HTTP/1 servers ztunnel runs beside the data path: readiness, metrics, admin.
//! Each answers from in-memory state, so a handler is a plain function of the request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub type Body = Full<Bytes>;

/// A request handler: the request (body ignored) and the peer's address.
pub type Handler =
    Arc<dyn Fn(&Request<hyper::body::Incoming>, SocketAddr) -> Response<Body> + Send + Sync>;

/// A response with `status`, a content type and `body`.
pub fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

/// Plain text, newline-terminated.
pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut body = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    reply(status, "text/plain; charset=utf-8", body)
}

/// Pretty JSON of `value`.
pub fn json(value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            reply(StatusCode::OK, "application/json", body)
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding JSON: {e}"),
        ),
    }
}

/// Most connections one of these servers serves at once; more wait to be accepted, so a
/// flood of idle connections costs a bounded number of tasks and descriptors.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's headers (a slow-header client is cut).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest one connection may live, keep-alive included.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Binds `addr`; the returned future serves until dropped.
pub async fn serve(
    addr: SocketAddr,
    handler: Handler,
) -> std::io::Result<impl Future<Output = ()>> {
    let listener = TcpListener::bind(addr).await?;
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    Ok(async move {
        loop {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let Ok((stream, peer)) = listener.accept().await else {
                // Out of descriptors: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let resp = handler(&req, peer);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .max_buf_size(64 * 1024)
                    .serve_connection(TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
                drop(permit);
            });
        }
    })
}
