//! The delta ADS client: one gRPC stream to istiod carrying `istio.workload.Address` and
//! `istio.security.Authorization`, applied as the control plane's [`Parts`].
//!
//! Each response is applied resource by resource: good ones go in, bad ones are named in a
//! NACK (`error_detail`, gRPC code 3) while the rest stay applied. Resource versions are kept
//! across reconnects and sent as `initial_resource_versions`, so a reconnect does not make
//! istiod resend what is unchanged. The bearer token is re-read from its file for every
//! stream, so a rotated projected token is picked up. The last known resources keep serving
//! while disconnected; reconnects back off from 100 ms to 15 s.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::convert::{self, AddressResource};
use super::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use crate::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status};
use crate::proto::{security as sec, workload as wl};
use crate::state::parts::{Parts, Source, Sources};
use crate::state::policy::Authorization;

/// Where and who to connect as.
#[derive(Debug, Clone)]
pub struct XdsConfig {
    /// `https://host:port` (istiod's 15012).
    pub address: String,
    /// PEM roots that sign the control plane's serving certificate.
    pub root_cert: PathBuf,
    /// Bearer token file (a projected service-account token); read for every stream.
    pub token_file: Option<PathBuf>,
    /// Node id istiod keys this proxy by.
    pub node_id: String,
    /// Node metadata (string values).
    pub metadata: BTreeMap<String, String>,
    /// Trust domain for workloads that leave it out.
    pub trust_domain: String,
}

/// What readiness and metrics read, and what the ZDS client waits for.
#[derive(Debug, Default)]
pub struct XdsStatus {
    pub connected: AtomicBool,
    /// Both resource types have arrived at least once.
    pub synced: AtomicBool,
    /// Policies refused and enforced as fail-closed stand-ins right now.
    pub refused_policies: std::sync::atomic::AtomicUsize,
    synced_now: tokio::sync::Notify,
}

impl XdsStatus {
    /// Records that both resource types have arrived; true the first time.
    pub fn mark_synced(&self) -> bool {
        let first = !self.synced.swap(true, Ordering::AcqRel);
        if first {
            self.synced_now.notify_waiters();
        }
        first
    }

    /// Returns once istiod's first push of both resource types has been applied.
    pub async fn wait_synced(&self) {
        loop {
            let notified = self.synced_now.notified();
            if self.synced.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

/// Resources known, by name, with their versions.
#[derive(Debug, Default)]
struct Store {
    addresses: BTreeMap<String, (String, AddressResource)>,
    policies: BTreeMap<String, (String, Authorization)>,
    /// Policies that could not be read; each is in `policies` as its fail-closed stand-in
    /// ([`convert::refused_authorization`]).
    refused_policies: std::collections::BTreeSet<String>,
}

impl Store {
    fn parts(&self) -> Parts {
        let mut parts = Parts::default();
        for (_, r) in self.addresses.values() {
            match r {
                AddressResource::Workload(w) => parts
                    .workloads
                    .push((w.workload.clone(), w.services.clone())),
                AddressResource::Service(s) => parts.services.push((**s).clone()),
            }
        }
        parts.policies = self.policies.values().map(|(_, p)| p.clone()).collect();
        parts
    }

    fn versions(&self, type_url: &str) -> std::collections::HashMap<String, String> {
        match type_url {
            ADDRESS_TYPE => self
                .addresses
                .iter()
                .map(|(n, (v, _))| (n.clone(), v.clone()))
                .collect(),
            _ => self
                .policies
                .iter()
                .map(|(n, (v, _))| (n.clone(), v.clone()))
                .collect(),
        }
    }

    /// Applies one response; returns the refusals (`name: reason`). A refused policy is kept
    /// as its fail-closed stand-in, and the refusal says so.
    fn apply(&mut self, resp: &DeltaDiscoveryResponse, trust_domain: &str) -> Vec<String> {
        let mut refused = Vec::new();
        for r in &resp.resources {
            let body = match &r.resource {
                None => Err("no resource body".to_string()),
                Some(any) if any.type_url != resp.type_url => Err(format!(
                    "type {} in a {} response",
                    any.type_url, resp.type_url
                )),
                Some(any) => Ok(any.value.as_slice()),
            };
            let result = match resp.type_url.as_str() {
                ADDRESS_TYPE => body
                    .and_then(|b| wl::Address::decode(b).map_err(|e| e.to_string()))
                    .and_then(|a| convert::address(&a, trust_domain))
                    .map(|a| {
                        self.addresses
                            .insert(r.name.clone(), (r.version.clone(), a));
                    }),
                _ => self.apply_policy(&r.name, &r.version, body),
            };
            if let Err(why) = result {
                refused.push(format!("{}: {why}", r.name));
            }
        }
        for name in &resp.removed_resources {
            if resp.type_url == ADDRESS_TYPE {
                self.addresses.remove(name);
            } else {
                self.policies.remove(name);
                self.refused_policies.remove(name);
            }
        }
        refused
    }

    fn apply_policy(
        &mut self,
        name: &str,
        version: &str,
        body: Result<&[u8], String>,
    ) -> Result<(), String> {
        let decoded = body.and_then(|b| sec::Authorization::decode(b).map_err(|e| e.to_string()));
        let converted = decoded
            .as_ref()
            .map_err(Clone::clone)
            .and_then(convert::authorization);
        let (policy, result) = match converted {
            Ok(p) => {
                self.refused_policies.remove(name);
                (p, Ok(()))
            }
            Err(why) => {
                let stand_in = convert::refused_authorization(name, decoded.as_ref().ok());
                let what = match stand_in.action {
                    crate::state::policy::Action::Allow => "an ALLOW that matches nothing",
                    crate::state::policy::Action::Deny => "a DENY of everything",
                };
                tracing::warn!(policy = name, reason = %why, stand_in = what, "policy refused; enforcing a fail-closed stand-in");
                self.refused_policies.insert(name.to_string());
                (
                    stand_in,
                    Err(format!(
                        "{why} (enforced as {what} in its scope until a valid version arrives)"
                    )),
                )
            }
        };
        self.policies
            .insert(name.to_string(), (version.to_string(), policy));
        result
    }
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("connecting to {0}")]
    Connect(String, #[source] tonic::transport::Error),
    #[error("reading the root certificate {0}")]
    Roots(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Token(#[from] crate::grpc::TokenError),
    #[error("control plane")]
    Grpc(#[from] tonic::Status),
    #[error("TLS configuration")]
    Tls(#[source] tonic::transport::Error),
    #[error("the control plane closed the stream")]
    Closed,
}

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

/// Runs the client until the process ends, publishing into `sources`.
pub async fn run(config: XdsConfig, sources: Sources, status: Arc<XdsStatus>) {
    let mut store = Store::default();
    let mut backoff = BACKOFF_START;
    loop {
        let mut progressed = false;
        let err = stream(&config, &sources, &status, &mut store, &mut progressed).await;
        status.connected.store(false, Ordering::Release);
        if progressed {
            backoff = BACKOFF_START;
        }
        tracing::warn!(
            address = %config.address,
            error = %mesh_contract::Chain(&err),
            retry_in = ?backoff,
            "xDS stream ended; the last known config stays in force"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn node(config: &XdsConfig) -> Node {
    use prost_types::value::Kind;
    let fields = config
        .metadata
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                prost_types::Value {
                    kind: Some(Kind::StringValue(v.clone())),
                },
            )
        })
        .collect();
    Node {
        id: config.node_id.clone(),
        cluster: String::new(),
        metadata: Some(prost_types::Struct { fields }),
    }
}

async fn stream(
    config: &XdsConfig,
    sources: &Sources,
    status: &XdsStatus,
    store: &mut Store,
    progressed: &mut bool,
) -> StreamError {
    match stream_inner(config, sources, status, store, progressed).await {
        Ok(()) => StreamError::Closed,
        Err(e) => e,
    }
}

async fn stream_inner(
    config: &XdsConfig,
    sources: &Sources,
    status: &XdsStatus,
    store: &mut Store,
    progressed: &mut bool,
) -> Result<(), StreamError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let roots = std::fs::read(&config.root_cert)
        .map_err(|e| StreamError::Roots(config.root_cert.clone(), e))?;
    let endpoint = Endpoint::from_shared(config.address.clone())
        .map_err(|e| StreamError::Connect(config.address.clone(), e))?
        .connect_timeout(Duration::from_secs(10))
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(roots)))
        .map_err(StreamError::Tls)?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| StreamError::Connect(config.address.clone(), e))?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);

    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    for type_url in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        let _ = tx
            .send(DeltaDiscoveryRequest {
                node: Some(node(config)),
                type_url: type_url.to_string(),
                initial_resource_versions: store.versions(type_url),
                ..Default::default()
            })
            .await;
    }
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(file) = &config.token_file {
        crate::grpc::attach_token(&mut request, file)?;
    }
    let mut responses = client
        .delta_aggregated_resources(request)
        .await?
        .into_inner();
    status.connected.store(true, Ordering::Release);
    tracing::info!(address = %config.address, "xDS stream open");
    let mut seen = (false, false);
    while let Some(resp) = responses.message().await? {
        let refused = match resp.type_url.as_str() {
            ADDRESS_TYPE | AUTHORIZATION_TYPE => store.apply(&resp, &config.trust_domain),
            other => vec![format!("unknown type {other}")],
        };
        match resp.type_url.as_str() {
            ADDRESS_TYPE => seen.0 = true,
            AUTHORIZATION_TYPE => seen.1 = true,
            _ => {}
        }
        sources.set(Source::ControlPlane, store.parts());
        status
            .refused_policies
            .store(store.refused_policies.len(), Ordering::Release);
        *progressed = true;
        if seen == (true, true) && status.mark_synced() {
            tracing::info!(
                addresses = store.addresses.len(),
                policies = store.policies.len(),
                "first xDS push applied"
            );
        }
        let error_detail = (!refused.is_empty()).then(|| {
            tracing::warn!(type_url = %resp.type_url, refused = ?refused, "NACK: resources refused; the rest applied");
            Status {
                code: 3, // INVALID_ARGUMENT
                message: refused.join("; "),
            }
        });
        let ack = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail,
            ..Default::default()
        };
        if tx.send(ack).await.is_err() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
