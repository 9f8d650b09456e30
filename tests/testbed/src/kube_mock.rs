//! An in-process Kubernetes API server that speaks the real list/watch JSON for pods and
//! namespaces, applies field selectors on `spec.nodeName`, and records status patches. Enough
//! for kube-rs watchers and the agent's annotation writes; nothing more.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::lab::Ns;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

#[derive(Debug)]
struct Watcher {
    kind: &'static str,
    node: Option<String>,
    tx: mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    pods: BTreeMap<(String, String), Value>,
    namespaces: BTreeMap<String, Value>,
    watchers: Vec<Watcher>,
    patches: Vec<(String, String, Value)>,
}

impl State {
    fn bump(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    fn notify(&mut self, kind: &'static str, event: &str, mut object: Value) {
        let rv = self.bump();
        object["metadata"]["resourceVersion"] = json!(rv);
        let node = object["spec"]["nodeName"].as_str().map(str::to_string);
        let line = json!({"type": event, "object": object}).to_string() + "\n";
        self.watchers.retain(|w| {
            if w.kind != kind || (w.node.is_some() && w.node != node) {
                return !w.tx.is_closed();
            }
            w.tx.send(Ok(Frame::data(Bytes::from(line.clone()))))
                .is_ok()
        });
    }
}

/// A running mock API server.
#[derive(Debug, Clone)]
pub struct KubeMock {
    state: Arc<Mutex<State>>,
    pub addr: SocketAddr,
}

fn node_selector(query: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        if k != "fieldSelector" {
            return None;
        }
        let v = v
            .replace("%3D", "=")
            .replace("%3d", "=")
            .replace("%2F", "/");
        v.strip_prefix("spec.nodeName=").map(str::to_string)
    })
}

fn not_found() -> Response<Body> {
    full(
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "code": 404}),
    )
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("response")
}

impl KubeMock {
    /// Serves on 127.0.0.1 inside `ns` (so processes in that netns can reach it).
    pub fn start(ns: &Ns) -> Self {
        let listener = ns
            .open()
            .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
            .expect("netns")
            .expect("bind mock API server");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let mock = Self {
            state: Arc::default(),
            addr,
        };
        let served = mock.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let mock = served.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let mock = mock.clone();
                            async move { Ok::<_, Infallible>(mock.handle(req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        });
        mock
    }

    /// Writes a kubeconfig pointing at this server.
    pub fn kubeconfig(&self, path: &std::path::Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: mock\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: mock\n  context:\n    cluster: mock\n    user: mock\n\
             current-context: mock\nusers:\n- name: mock\n  user: {{}}\n",
            self.addr
        );
        std::fs::write(path, text).expect("kubeconfig");
    }

    pub fn set_namespace(&self, name: &str, labels: &Value) {
        let mut st = self.state.lock().expect("state");
        let event = if st.namespaces.contains_key(name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "uid": format!("ns-{name}"), "labels": labels}});
        st.namespaces.insert(name.into(), obj.clone());
        st.notify("namespaces", event, obj);
    }

    /// Adds or replaces a pod object (given as JSON; kind/apiVersion are filled in).
    pub fn set_pod(&self, mut pod: Value) {
        pod["apiVersion"] = json!("v1");
        pod["kind"] = json!("Pod");
        let key = (
            pod["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            pod["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        let mut st = self.state.lock().expect("state");
        let event = if st.pods.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.pods.insert(key, pod.clone());
        st.notify("pods", event, pod);
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let mut st = self.state.lock().expect("state");
        if let Some(pod) = st.pods.remove(&(namespace.into(), name.into())) {
            st.notify("pods", "DELETED", pod);
        }
    }

    /// Status patches received: (namespace, pod, patch body).
    pub fn patches(&self) -> Vec<(String, String, Value)> {
        self.state.lock().expect("state").patches.clone()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let watch = query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1");
        let kind = match path.as_str() {
            "/api/v1/pods" => Some("pods"),
            "/api/v1/namespaces" => Some("namespaces"),
            _ => None,
        };
        if req.method() == hyper::Method::PATCH {
            let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            // api/v1/namespaces/{ns}/pods/{name}/status
            if let ["api", "v1", "namespaces", ns, "pods", name, "status"] = parts.as_slice() {
                let (ns, name) = (ns.to_string(), name.to_string());
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let patch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let mut st = self.state.lock().expect("state");
                st.patches.push((ns.clone(), name.clone(), patch.clone()));
                let Some(pod) = st.pods.get_mut(&(ns.clone(), name.clone())) else {
                    return not_found();
                };
                if let Some(anns) = patch["metadata"]["annotations"].as_object() {
                    for (k, v) in anns {
                        if v.is_null() {
                            if let Some(m) = pod["metadata"]["annotations"].as_object_mut() {
                                m.remove(k);
                            }
                        } else {
                            pod["metadata"]["annotations"][k] = v.clone();
                        }
                    }
                }
                let updated = pod.clone();
                st.notify("pods", "MODIFIED", updated.clone());
                return full(StatusCode::OK, &updated);
            }
            return not_found();
        }
        let Some(kind) = kind else {
            return not_found();
        };
        let node = if kind == "pods" {
            node_selector(&query)
        } else {
            None
        };
        let mut st = self.state.lock().expect("state");
        if watch {
            let (tx, rx) = mpsc::unbounded_channel();
            st.watchers.push(Watcher { kind, node, tx });
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|f| (f, rx))
            });
            return Response::builder()
                .header("content-type", "application/json")
                .body(StreamBody::new(stream).boxed())
                .expect("response");
        }
        let rv = st.bump();
        let items: Vec<Value> = if kind == "pods" {
            st.pods
                .values()
                .filter(|p| node.is_none() || p["spec"]["nodeName"].as_str() == node.as_deref())
                .cloned()
                .collect()
        } else {
            st.namespaces.values().cloned().collect()
        };
        let list_kind = if kind == "pods" {
            "PodList"
        } else {
            "NamespaceList"
        };
        full(
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": list_kind, "metadata": {"resourceVersion": rv}, "items": items}),
        )
    }
}
