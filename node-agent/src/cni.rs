//! The CNI event server: the node agent's side of the plugin's request, on
//! `<run dir>/pluginevent.sock` (Istio's path and `/cmdadd` body, so Istio's plugin works too).
//!
//! | request | answer |
//! |---|---|
//! | `POST /cmdadd` | 200 `{"enrolled": true}` once the pod is enrolled; 200 `{"enrolled": false, "reason"}` for a pod not meant for the mesh; 503 while the agent cannot protect pods (not synced, no ztunnel); 500 with the failing step; 400 for a malformed body |
//! | `POST /cmdcheck` | 200 when enrolled and intact (or not in the mesh); 409 with what is missing |
//! | `POST /cmddel` | 200 once the sandbox's pod has left ztunnel and its rules are gone |
//! | `POST /cmdgc` | `{"ValidContainerIDs": [...]}`: every sandbox the plugin enrolled that is not listed is handled as deleted; 200 `{"removed": n}` |
//! | `GET /readyz` | as the HTTP endpoint's readiness |
//!
//! A pod the agent has not seen yet (its watch lags the runtime) is retried for a few seconds
//! before the answer is given.

use std::convert::Infallible;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request as HttpRequest, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use mesh_contract::cni_event::{self, Answer, Event, SOCKET};

use crate::enroll::{CniFailure, CniOutcome, CniPod, Request};
use crate::http::Endpoints;
use crate::metrics::{Metrics, ResultLabel};

/// How long an ADD waits for the pod source to show an unknown pod.
pub const UNKNOWN_POD_GRACE: Duration = Duration::from_secs(5);
const MAX_BODY: usize = 64 * 1024;

/// The pod an ADD or CHECK names, with its addresses parsed.
fn pod_of(event: &Event) -> Result<CniPod, String> {
    let name = event
        .pod_name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or("PodName is missing")?;
    let ips = event
        .ips
        .iter()
        .map(|e| {
            e.address
                .ip
                .parse::<IpAddr>()
                .map_err(|_| format!("IP {:?} is not an address", e.address.ip))
        })
        .collect::<Result<_, _>>()?;
    Ok(CniPod {
        name,
        namespace: event.pod_namespace.clone().unwrap_or_default(),
        uid: event.pod_uid.clone(),
        container_id: event.container_id.clone().unwrap_or_default(),
        netns: event.netns.clone().map(PathBuf::from).unwrap_or_default(),
        ips,
    })
}

/// Fuzz entry point (`fuzz/`, replayed by `tests/tests/fuzz_corpora.rs`): bytes as the body of
/// a plugin request. A body that parses into a pod names it and carries only addresses.
pub fn fuzz_request_body(data: &[u8]) {
    if let Ok(body) = serde_json::from_slice::<Event>(data)
        && let Ok(pod) = pod_of(&body)
    {
        assert!(!pod.name.is_empty());
        assert_eq!(pod.ips.len(), body.ips.len());
    }
}

/// Shared by every connection.
#[derive(Debug)]
pub struct CniServer {
    pub requests: mpsc::Sender<Request>,
    pub endpoints: Arc<Endpoints>,
    pub metrics: Arc<Metrics>,
}

fn reply(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(body).expect("answers serialize");
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

impl CniServer {
    fn count(&self, result: &str) {
        self.metrics
            .cni_requests
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    async fn ask(
        &self,
        make: impl Fn(oneshot::Sender<Result<CniOutcome, CniFailure>>) -> Request,
    ) -> Result<CniOutcome, CniFailure> {
        let (tx, rx) = oneshot::channel();
        if self.requests.send(make(tx)).await.is_err() {
            return Err(CniFailure::Failed(
                "the enrollment manager has stopped".into(),
            ));
        }
        rx.await.unwrap_or_else(|_| {
            Err(CniFailure::Failed(
                "the enrollment manager dropped the request".into(),
            ))
        })
    }

    async fn add(&self, body: &Event) -> Response<Full<Bytes>> {
        let pod = match pod_of(body) {
            Ok(p) => p,
            Err(why) => {
                self.count("invalid");
                return reply(StatusCode::BAD_REQUEST, &Answer::error(why));
            }
        };
        if pod.netns.as_os_str().is_empty() {
            self.count("invalid");
            return reply(StatusCode::BAD_REQUEST, &Answer::error("Netns is missing"));
        }
        let (ready, why) = self.endpoints.ready();
        if !ready && !self.endpoints.synced() {
            self.count("unavailable");
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &Answer::error(format!("the node agent is {}", why.trim())),
            );
        }
        let deadline = Instant::now() + UNKNOWN_POD_GRACE;
        let result = loop {
            let result = self
                .ask(|reply| Request::CniAdd {
                    pod: pod.clone(),
                    reply,
                })
                .await;
            match result {
                Err(CniFailure::UnknownPod(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => break other,
            }
        };
        match result {
            Ok(CniOutcome::Enrolled) => {
                self.count("enrolled");
                reply(StatusCode::OK, &Answer::enrolled())
            }
            Ok(CniOutcome::NotInMesh(why)) => {
                self.count("not_in_mesh");
                reply(StatusCode::OK, &Answer::not_in_mesh(why))
            }
            Err(CniFailure::NoZtunnel) => {
                self.count("unavailable");
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &Answer::error(
                        "no ztunnel is connected to the node agent on this node, so the pod cannot be protected; start ztunnel (the ztunnel DaemonSet pod)",
                    ),
                )
            }
            Err(
                CniFailure::UnknownPod(why) | CniFailure::Failed(why) | CniFailure::Missing(why),
            ) => {
                self.count("failed");
                reply(StatusCode::INTERNAL_SERVER_ERROR, &Answer::error(why))
            }
        }
    }

    async fn check(&self, body: &Event) -> Response<Full<Bytes>> {
        let pod = match pod_of(body) {
            Ok(p) => p,
            Err(why) => return reply(StatusCode::BAD_REQUEST, &Answer::error(why)),
        };
        match self
            .ask(|reply| Request::CniCheck {
                pod: pod.clone(),
                reply,
            })
            .await
        {
            Ok(CniOutcome::Enrolled) => reply(StatusCode::OK, &Answer::enrolled()),
            Ok(CniOutcome::NotInMesh(why)) => reply(StatusCode::OK, &Answer::not_in_mesh(why)),
            Err(
                CniFailure::Missing(why) | CniFailure::UnknownPod(why) | CniFailure::Failed(why),
            ) => reply(StatusCode::CONFLICT, &Answer::missing(why)),
            Err(CniFailure::NoZtunnel) => reply(
                StatusCode::CONFLICT,
                &Answer::missing("no ztunnel is connected"),
            ),
        }
    }

    async fn handle(self: Arc<Self>, req: HttpRequest<Incoming>) -> Response<Full<Bytes>> {
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        if method == Method::GET && path == cni_event::path::READY {
            let (ok, text) = self.endpoints.ready();
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return reply(status, &text);
        }
        if method != Method::POST {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                &Answer::error("POST /cmdadd, /cmdcheck, /cmddel or /cmdgc"),
            );
        }
        let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    &Answer::error(format!("body: {e}")),
                );
            }
        };
        let body: Event = match serde_json::from_slice(&bytes) {
            Ok(b) => b,
            Err(e) => {
                self.count("invalid");
                return reply(
                    StatusCode::BAD_REQUEST,
                    &Answer::error(format!("body is not a CNI request: {e}")),
                );
            }
        };
        match path.as_str() {
            cni_event::path::ADD => self.add(&body).await,
            cni_event::path::CHECK => self.check(&body).await,
            cni_event::path::DEL => {
                // Answered once the pod is out of ztunnel and its rules are gone, so the runtime
                // removes the netns only after nothing of ours is left in it.
                if let Some(container_id) = body.container_id.filter(|c| !c.is_empty()) {
                    let (done, removed) = oneshot::channel();
                    let request = Request::CniDel { container_id, done };
                    if self.requests.send(request).await.is_ok() {
                        let _ = removed.await;
                    }
                }
                reply(StatusCode::OK, &Answer::default())
            }
            cni_event::path::GC => {
                let Some(valid) = body.valid_container_ids else {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        &Answer::error("ValidContainerIDs is missing"),
                    );
                };
                let (done, removed) = oneshot::channel();
                let request = Request::CniGc {
                    valid: valid.into_iter().collect(),
                    done,
                };
                if self.requests.send(request).await.is_err() {
                    return reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &Answer::error("the agent is stopping"),
                    );
                }
                let removed = removed.await.unwrap_or(0);
                reply(
                    StatusCode::OK,
                    &Answer {
                        removed: Some(removed),
                        ..Answer::default()
                    },
                )
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                &Answer::error("POST /cmdadd, /cmdcheck, /cmddel or /cmdgc"),
            ),
        }
    }
}

/// Binds `<run_dir>/pluginevent.sock` (replacing a stale one) and serves until dropped.
pub fn serve(
    run_dir: &Path,
    server: Arc<CniServer>,
) -> std::io::Result<impl Future<Output = ()> + use<>> {
    std::fs::create_dir_all(run_dir)?;
    let path = run_dir.join(SOCKET);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    // Only root (the runtime) may ask for enrollment decisions.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(async move {
        crate::http::accept_loop("cni", listener, |stream| {
            let server = server.clone();
            let svc = hyper::service::service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(server.handle(req).await) }
            });
            async move {
                let _ = crate::http::http1()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            }
        })
        .await
    })
}
