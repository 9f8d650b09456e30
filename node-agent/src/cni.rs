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
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::enroll::{CniFailure, CniOutcome, CniPod, Request};
use crate::http::Endpoints;
use crate::metrics::{Metrics, ResultLabel};

/// The socket's file name in the run directory.
pub const SOCKET: &str = "pluginevent.sock";
/// How long an ADD waits for the pod source to show an unknown pod.
pub const UNKNOWN_POD_GRACE: Duration = Duration::from_secs(5);
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Address {
    #[serde(rename = "IP")]
    ip: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct IpEntry {
    address: Address,
}

/// The plugin's request body (Istio's fields, plus ours that Istio's plugin omits).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Body {
    #[serde(default)]
    netns: Option<String>,
    #[serde(default)]
    pod_name: Option<String>,
    #[serde(default)]
    pod_namespace: Option<String>,
    #[serde(default, rename = "PodUID")]
    pod_uid: Option<String>,
    #[serde(default, rename = "ContainerID")]
    container_id: Option<String>,
    #[serde(default, rename = "IPs")]
    ips: Vec<IpEntry>,
    #[serde(default, rename = "ValidContainerIDs")]
    valid_container_ids: Option<Vec<String>>,
}

impl Body {
    fn pod(&self) -> Result<CniPod, String> {
        let name = self
            .pod_name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or("PodName is missing")?;
        let ips = self
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
            namespace: self.pod_namespace.clone().unwrap_or_default(),
            uid: self.pod_uid.clone(),
            container_id: self.container_id.clone().unwrap_or_default(),
            netns: self.netns.clone().map(PathBuf::from).unwrap_or_default(),
            ips,
        })
    }
}

/// Fuzz entry point (`fuzz/`, replayed by `tests/tests/fuzz_corpora.rs`): bytes as the body of
/// a plugin request. A body that parses into a pod names it and carries only addresses.
pub fn fuzz_request_body(data: &[u8]) {
    if let Ok(body) = serde_json::from_slice::<Body>(data)
        && let Ok(pod) = body.pod()
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

fn reply(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
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

    async fn add(&self, body: &Body) -> Response<Full<Bytes>> {
        let pod = match body.pod() {
            Ok(p) => p,
            Err(why) => {
                self.count("invalid");
                return reply(StatusCode::BAD_REQUEST, &json!({ "error": why }));
            }
        };
        if pod.netns.as_os_str().is_empty() {
            self.count("invalid");
            return reply(
                StatusCode::BAD_REQUEST,
                &json!({ "error": "Netns is missing" }),
            );
        }
        let (ready, why) = self.endpoints.ready();
        if !ready && !self.endpoints.synced() {
            self.count("unavailable");
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({ "error": format!("the node agent is {}", why.trim()) }),
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
                reply(StatusCode::OK, &json!({ "enrolled": true }))
            }
            Ok(CniOutcome::NotInMesh(why)) => {
                self.count("not_in_mesh");
                reply(StatusCode::OK, &json!({ "enrolled": false, "reason": why }))
            }
            Err(CniFailure::NoZtunnel) => {
                self.count("unavailable");
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({ "error": "no ztunnel is connected to the node agent on this node, so the pod cannot be protected; start ztunnel (the ztunnel DaemonSet pod)" }),
                )
            }
            Err(
                CniFailure::UnknownPod(why) | CniFailure::Failed(why) | CniFailure::Missing(why),
            ) => {
                self.count("failed");
                reply(StatusCode::INTERNAL_SERVER_ERROR, &json!({ "error": why }))
            }
        }
    }

    async fn check(&self, body: &Body) -> Response<Full<Bytes>> {
        let pod = match body.pod() {
            Ok(p) => p,
            Err(why) => return reply(StatusCode::BAD_REQUEST, &json!({ "error": why })),
        };
        match self
            .ask(|reply| Request::CniCheck {
                pod: pod.clone(),
                reply,
            })
            .await
        {
            Ok(CniOutcome::Enrolled) => reply(StatusCode::OK, &json!({ "enrolled": true })),
            Ok(CniOutcome::NotInMesh(why)) => {
                reply(StatusCode::OK, &json!({ "enrolled": false, "reason": why }))
            }
            Err(
                CniFailure::Missing(why) | CniFailure::UnknownPod(why) | CniFailure::Failed(why),
            ) => reply(StatusCode::CONFLICT, &json!({ "reason": why })),
            Err(CniFailure::NoZtunnel) => reply(
                StatusCode::CONFLICT,
                &json!({ "reason": "no ztunnel is connected" }),
            ),
        }
    }

    async fn handle(self: Arc<Self>, req: HttpRequest<Incoming>) -> Response<Full<Bytes>> {
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        if method == Method::GET && path == "/readyz" {
            let (ok, text) = self.endpoints.ready();
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return reply(status, &json!(text));
        }
        if method != Method::POST {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({ "error": "POST /cmdadd, /cmdcheck, /cmddel or /cmdgc" }),
            );
        }
        let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    &json!({ "error": format!("body: {e}") }),
                );
            }
        };
        let body: Body = match serde_json::from_slice(&bytes) {
            Ok(b) => b,
            Err(e) => {
                self.count("invalid");
                return reply(
                    StatusCode::BAD_REQUEST,
                    &json!({ "error": format!("body is not a CNI request: {e}") }),
                );
            }
        };
        match path.as_str() {
            "/cmdadd" => self.add(&body).await,
            "/cmdcheck" => self.check(&body).await,
            "/cmddel" => {
                // Answered once the pod is out of ztunnel and its rules are gone, so the runtime
                // removes the netns only after nothing of ours is left in it.
                if let Some(container_id) = body.container_id.filter(|c| !c.is_empty()) {
                    let (done, removed) = oneshot::channel();
                    let request = Request::CniDel { container_id, done };
                    if self.requests.send(request).await.is_ok() {
                        let _ = removed.await;
                    }
                }
                reply(StatusCode::OK, &json!({}))
            }
            "/cmdgc" => {
                let Some(valid) = body.valid_container_ids else {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        &json!({ "error": "ValidContainerIDs is missing" }),
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
                        &json!({ "error": "the agent is stopping" }),
                    );
                }
                let removed = removed.await.unwrap_or(0);
                reply(StatusCode::OK, &json!({ "removed": removed }))
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                &json!({ "error": "POST /cmdadd, /cmdcheck, /cmddel or /cmdgc" }),
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
