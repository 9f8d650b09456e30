//! The client against an in-process delta ADS server (tonic, TLS, built from the same
//! protos): initial push, incremental add and remove, NACK of a malformed resource while the
//! rest apply, reconnect with resource versions, token rotation.

use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Streaming};

use super::*;
use crate::proto::discovery::Resource;
use crate::proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use crate::state::StateHandle;

const T: Duration = Duration::from_secs(5);

/// One client stream as the test sees it.
struct Session {
    token: Option<String>,
    requests: mpsc::UnboundedReceiver<DeltaDiscoveryRequest>,
    responses: mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, tonic::Status>>,
}

impl Session {
    async fn request(&mut self) -> DeltaDiscoveryRequest {
        tokio::time::timeout(T, self.requests.recv())
            .await
            .expect("a request in time")
            .expect("stream open")
    }

    fn push(&self, type_url: &str, nonce: &str, resources: Vec<Resource>, removed: &[&str]) {
        let _ = self.responses.send(Ok(DeltaDiscoveryResponse {
            type_url: type_url.into(),
            nonce: nonce.into(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }));
    }
}

struct Fake {
    sessions: mpsc::UnboundedSender<Session>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Fake {
    type DeltaAggregatedResourcesStream =
        UnboundedReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut inbound = req.into_inner();
        let (req_tx, requests) = mpsc::unbounded_channel();
        let (responses, resp_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if req_tx.send(m).is_err() {
                    break;
                }
            }
        });
        let _ = self.sessions.send(Session {
            token,
            requests,
            responses,
        });
        Ok(Response::new(UnboundedReceiverStream::new(resp_rx)))
    }
}

fn workload(uid: &str, ip: [u8; 4], version: &str) -> Resource {
    let w = wl::Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "ns".into(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        service_account: "sa".into(),
        ..Default::default()
    };
    resource(
        uid,
        version,
        ADDRESS_TYPE,
        wl::Address {
            r#type: Some(wl::address::Type::Workload(w)),
        }
        .encode_to_vec(),
    )
}

fn resource(name: &str, version: &str, type_url: &str, value: Vec<u8>) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(prost_types::Any {
            type_url: type_url.into(),
            value,
        }),
        ..Default::default()
    }
}

struct Setup {
    sessions: mpsc::UnboundedReceiver<Session>,
    state: StateHandle,
    status: Arc<XdsStatus>,
    token: PathBuf,
    _dir: tempfile::TempDir,
    client: tokio::task::JoinHandle<()>,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let root = dir.path().join("root.pem");
    std::fs::write(&root, cert.cert.pem()).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t1\n").unwrap();
    let identity =
        tonic::transport::Identity::from_pem(cert.cert.pem(), cert.signing_key.serialize_pem());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (sessions_tx, sessions) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .unwrap()
            .add_service(AggregatedDiscoveryServiceServer::new(Fake {
                sessions: sessions_tx,
            }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let state = StateHandle::default();
    let status = Arc::new(XdsStatus::default());
    let config = XdsConfig {
        address: format!("https://{addr}"),
        root_cert: root,
        token_file: Some(token.clone()),
        node_id: "ztunnel~198.18.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
            .into(),
        metadata: BTreeMap::from([("NODE_NAME".to_string(), "node-a".to_string())]),
        trust_domain: "cluster.local".into(),
    };
    let client = tokio::spawn(run(config, Sources::new(state.clone()), status.clone()));
    Setup {
        sessions,
        state,
        status,
        token,
        _dir: dir,
        client,
    }
}

async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..(T.as_millis() / 10) {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn pushes_apply_bad_resources_are_nacked_and_reconnects_resume() {
    let mut s = setup().await;
    let mut session = tokio::time::timeout(T, s.sessions.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(session.token.as_deref(), Some("Bearer t1"));
    // Initial requests: both types, wildcard, with the node.
    let first = session.request().await;
    let second = session.request().await;
    let mut types = [first.type_url.clone(), second.type_url.clone()];
    types.sort();
    assert_eq!(
        types,
        [AUTHORIZATION_TYPE.to_string(), ADDRESS_TYPE.to_string()]
    );
    let node = first.node.as_ref().unwrap();
    assert!(node.id.starts_with("ztunnel~"));
    assert!(first.initial_resource_versions.is_empty());
    assert!(!s.status.synced.load(Ordering::Acquire));

    // Initial push: one good workload, one with a 5-byte address.
    let mut bad = workload("bad", [0; 4], "1");
    if let Some(any) = bad.resource.as_mut() {
        let mut a = wl::Address::decode(any.value.as_slice()).unwrap();
        if let Some(wl::address::Type::Workload(w)) = a.r#type.as_mut() {
            w.addresses = vec![vec![1, 2, 3, 4, 5]];
        }
        any.value = a.encode_to_vec();
    }
    session.push(
        ADDRESS_TYPE,
        "n1",
        vec![workload("w1", [198, 18, 0, 1], "1"), bad],
        &[],
    );
    let nack = session.request().await;
    assert_eq!(nack.response_nonce, "n1");
    let detail = nack.error_detail.expect("a NACK");
    assert!(
        detail.message.contains("bad:") && detail.message.contains("5 bytes"),
        "{}",
        detail.message
    );
    assert!(eventually(|| s.state.load().workloads.contains_key("w1")).await);
    assert!(!s.state.load().workloads.contains_key("bad"));

    // Policies: a clean push is ACKed and completes the first sync.
    let policy = sec::Authorization {
        name: "deny-all".into(),
        namespace: "ns".into(),
        scope: sec::Scope::Namespace as i32,
        action: sec::Action::Deny as i32,
        rules: vec![sec::Rule::default()],
        ..Default::default()
    };
    session.push(
        AUTHORIZATION_TYPE,
        "n2",
        vec![resource(
            "ns/deny-all",
            "1",
            AUTHORIZATION_TYPE,
            policy.encode_to_vec(),
        )],
        &[],
    );
    let ack = session.request().await;
    assert_eq!(
        (ack.response_nonce.as_str(), ack.error_detail),
        ("n2", None)
    );
    assert!(eventually(|| s.status.synced.load(Ordering::Acquire)).await);
    assert_eq!(s.state.load().policies.len(), 1);

    // Incremental: w2 added, w1 removed.
    session.push(
        ADDRESS_TYPE,
        "n3",
        vec![workload("w2", [198, 18, 0, 2], "7")],
        &["w1"],
    );
    let ack = session.request().await;
    assert_eq!(ack.response_nonce, "n3");
    assert!(ack.error_detail.is_none());
    let state = s.state.load();
    assert!(state.workloads.contains_key("w2") && !state.workloads.contains_key("w1"));
    assert!(
        state
            .workload_by_ip("198.18.0.2".parse().unwrap())
            .is_some()
    );

    // The token rotates, the control plane goes away: the client reconnects with the new
    // token and the versions it holds, and keeps serving the old config meanwhile.
    std::fs::write(&s.token, "t2").unwrap();
    let _ = session
        .responses
        .send(Err(tonic::Status::unavailable("istiod restarting")));
    drop(session);
    let mut again = tokio::time::timeout(T, s.sessions.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.token.as_deref(), Some("Bearer t2"));
    assert!(
        s.state.load().workloads.contains_key("w2"),
        "config lost while disconnected"
    );
    let mut versions = BTreeMap::new();
    for _ in 0..2 {
        let r = again.request().await;
        versions.insert(r.type_url.clone(), r.initial_resource_versions.clone());
    }
    assert_eq!(
        versions[ADDRESS_TYPE],
        std::collections::HashMap::from([("w2".to_string(), "7".to_string())])
    );
    assert_eq!(
        versions[AUTHORIZATION_TYPE],
        std::collections::HashMap::from([("ns/deny-all".to_string(), "1".to_string())])
    );
    s.client.abort();
}

#[tokio::test]
async fn resources_of_the_wrong_type_or_without_a_body_are_refused() {
    let mut s = setup().await;
    let mut session = tokio::time::timeout(T, s.sessions.recv())
        .await
        .unwrap()
        .unwrap();
    session.request().await;
    session.request().await;
    let mut no_body = workload("empty", [198, 18, 0, 9], "1");
    no_body.resource = None;
    let wrong = resource("p", "1", AUTHORIZATION_TYPE, vec![]);
    let garbage = resource("junk", "1", ADDRESS_TYPE, vec![0xff, 0xff, 0xff]);
    session.push(
        ADDRESS_TYPE,
        "n1",
        vec![
            no_body,
            wrong,
            garbage,
            workload("ok", [198, 18, 0, 3], "1"),
        ],
        &[],
    );
    let nack = session.request().await;
    let msg = nack.error_detail.expect("NACK").message;
    for name in ["empty:", "p:", "junk:"] {
        assert!(msg.contains(name), "{name} not named in {msg}");
    }
    assert!(eventually(|| s.state.load().workloads.contains_key("ok")).await);
    // An unknown type is NACKed too, and the stream goes on.
    session.push("type.googleapis.com/something.Else", "n2", vec![], &[]);
    let nack = session.request().await;
    assert!(nack.error_detail.unwrap().message.contains("unknown type"));
    s.client.abort();
}

/// A policy that cannot be read never vanishes: a bad DENY still denies everything in its
/// scope, a bad ALLOW still closes its scope (it admits nothing itself), a body that does not
/// even decode closes the namespace its name gives. The NACK and the status say so, and a
/// readable version replaces the stand-in.
#[tokio::test]
async fn refused_policies_are_enforced_as_fail_closed_stand_ins() {
    use crate::state::policy::{Action, Scope};
    let mut s = setup().await;
    let mut session = tokio::time::timeout(T, s.sessions.recv())
        .await
        .unwrap()
        .unwrap();
    session.request().await;
    session.request().await;
    let bad_port = |name: &str, scope: sec::Scope, action: sec::Action| sec::Authorization {
        name: name.into(),
        namespace: "ns".into(),
        scope: scope as i32,
        action: action as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    destination_ports: vec![70000],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    let deny = bad_port("deny", sec::Scope::Namespace, sec::Action::Deny);
    let allow = bad_port("allow", sec::Scope::WorkloadSelector, sec::Action::Allow);
    let mut unknown_action = bad_port("odd", sec::Scope::Global, sec::Action::Allow);
    unknown_action.action = 9;
    unknown_action.rules.clear();
    let push = |session: &Session, nonce: &str, deny: &sec::Authorization| {
        session.push(
            AUTHORIZATION_TYPE,
            nonce,
            vec![
                resource("ns/deny", "1", AUTHORIZATION_TYPE, deny.encode_to_vec()),
                resource("ns/allow", "1", AUTHORIZATION_TYPE, allow.encode_to_vec()),
                resource(
                    "ns/odd",
                    "1",
                    AUTHORIZATION_TYPE,
                    unknown_action.encode_to_vec(),
                ),
                resource("ns2/junk", "1", AUTHORIZATION_TYPE, vec![0xff, 0xff]),
            ],
            &[],
        );
    };
    push(&session, "n1", &deny);
    let nack = session.request().await;
    let msg = nack.error_detail.expect("NACK").message;
    assert!(
        msg.contains("ns/deny:") && msg.contains("enforced as a DENY of everything"),
        "{msg}"
    );
    assert!(
        msg.contains("ns/allow:") && msg.contains("an ALLOW that matches nothing"),
        "{msg}"
    );
    assert!(eventually(|| s.status.refused_policies.load(Ordering::Acquire) == 4).await);
    let state = s.state.load();
    let shape = |name: &str| {
        let p = state.policies.iter().find(|p| p.name == name).expect(name);
        (p.namespace.clone(), p.scope, p.action, p.rules.len())
    };
    let cases = [
        ("deny", ("ns", Scope::Namespace, Action::Deny, 1)),
        ("allow", ("ns", Scope::WorkloadSelector, Action::Allow, 0)),
        ("odd", ("ns", Scope::Global, Action::Deny, 1)),
        ("junk", ("ns2", Scope::Namespace, Action::Deny, 1)),
    ];
    for (name, (ns, scope, action, rules)) in cases {
        assert_eq!(
            shape(name),
            (ns.to_string(), scope, action, rules),
            "{name}"
        );
    }
    // The DENY stand-ins match any connection; the ALLOW stand-in matches none.
    let peer = "198.18.0.9".parse().unwrap();
    let conn = crate::state::authz::Connection::new(None, peer, "198.18.0.1:80".parse().unwrap());
    for p in &state.policies {
        let want = p.action == Action::Deny;
        assert_eq!(crate::state::authz::matches(p, &conn), want, "{}", p.name);
    }

    // A readable DENY replaces its stand-in.
    let mut fixed = deny.clone();
    fixed.rules[0].clauses[0].matches[0].destination_ports = vec![9000];
    push(&session, "n2", &fixed);
    session.request().await;
    assert!(eventually(|| s.status.refused_policies.load(Ordering::Acquire) == 3).await);
    s.client.abort();
}
