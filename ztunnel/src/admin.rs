//! The admin endpoint (`--admin-addr`, Istio's 127.0.0.1:15000): what ztunnel knows and is
//! doing, for a person in an incident and for the `ztunnel-admin` CLI.
//!
//! - `GET /config_dump`: workloads, services, policies, certificates (identity, serial,
//!   validity, chain; never keys), pod proxies, ZDS state;
//! - `GET /logging`, `POST /logging?level=<filter>` or `POST /logging?<module>=<level>`;
//! - `POST /quitquitquit`: drain and exit, as on SIGTERM;
//! - `GET /debug/connections`: live connections per pod with peers and identities;
//! - `GET /debug/pool`: pooled HBONE connections per worker;
//! - `GET /debug/workers`: what each worker thread serves (inbound HBONE connections).
//!
//! Peers that are not loopback get 403 unless `--admin-allow-remote`: binding a wider
//! address by mistake must not publish the mesh's inventory.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use hyper::{Method, StatusCode};
use serde::Serialize;
use tokio::sync::Notify;

use crate::http::{Handler, json, text};
use crate::identity::manager::Issued;
use crate::inpod::client::ZdsStatus;
use crate::inpod::manager::PodManager;
use crate::logging::LogControl;
use crate::proxy::ProxyInputs;
use crate::proxy::worker::Workers;

/// Everything the admin views read.
#[derive(Debug)]
pub struct Admin {
    pub inputs: Arc<ProxyInputs>,
    pub pods: Arc<PodManager>,
    pub workers: Arc<Workers>,
    pub zds: Arc<ZdsStatus>,
    pub log: LogControl,
    /// Notified by `/quitquitquit`.
    pub quit: Arc<Notify>,
    pub allow_remote: bool,
}

/// A certificate as the admin view shows it.
#[derive(Debug, Serialize)]
pub struct CertView {
    pub identity: String,
    /// `pending` until the first certificate arrives, then `valid` or `expired`.
    pub state: &'static str,
    pub serial: Option<String>,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    /// Seconds until `not_after` (negative once expired).
    pub expires_in_seconds: Option<i64>,
    /// PEM, leaf first.
    pub chain: Vec<String>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn cert_view(identity: String, issued: Option<&Issued>) -> CertView {
    let Some(issued) = issued else {
        return CertView {
            identity,
            state: "pending",
            serial: None,
            not_before: None,
            not_after: None,
            expires_in_seconds: None,
            chain: Vec::new(),
        };
    };
    let c = &issued.cert;
    let now = SystemTime::now();
    let left = match c.not_after.duration_since(now) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    CertView {
        identity,
        state: if c.expired(now) { "expired" } else { "valid" },
        serial: Some(c.serial.clone()),
        not_before: Some(rfc3339(c.not_before)),
        not_after: Some(rfc3339(c.not_after)),
        expires_in_seconds: Some(left),
        chain: c
            .chain
            .iter()
            .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())))
            .collect(),
    }
}

impl Admin {
    fn config_dump(&self) -> serde_json::Value {
        let state = self.inputs.state.load();
        let certs: Vec<CertView> = self
            .inputs
            .certs
            .snapshot()
            .into_iter()
            .map(|(id, issued)| cert_view(id.to_string(), issued.as_deref()))
            .collect();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "trustDomain": self.inputs.config.trust_domain,
            "workloads": state.workloads.values().collect::<Vec<_>>(),
            "services": state.services.values().collect::<Vec<_>>(),
            "policies": state.policies,
            "certificates": certs,
            "pods": self.pods.status(),
            "zds": {
                "connected": self.zds.connected.load(Ordering::Acquire),
                "snapshotReceived": self.zds.snapshot_received.load(Ordering::Acquire),
            },
        })
    }

    fn logging(&self, method: &Method, query: Option<&str>) -> hyper::Response<crate::http::Body> {
        if method == Method::GET {
            return text(StatusCode::OK, self.log.filter());
        }
        let Some(query) = query.filter(|q| !q.is_empty()) else {
            return text(
                StatusCode::BAD_REQUEST,
                "POST /logging?level=<filter> or /logging?<module>=<level>",
            );
        };
        let mut result = Ok(String::new());
        for (k, v) in query_pairs(query) {
            result = if k == "level" {
                self.log.set(&v)
            } else {
                self.log.set_module(&k, &v)
            };
            if result.is_err() {
                break;
            }
        }
        match result {
            Ok(filter) => {
                tracing::info!(%filter, "log filter changed through the admin endpoint");
                text(StatusCode::OK, filter)
            }
            Err(e) => text(StatusCode::BAD_REQUEST, e),
        }
    }

    fn answer(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        peer: SocketAddr,
    ) -> hyper::Response<crate::http::Body> {
        if !self.allow_remote && !peer.ip().to_canonical().is_loopback() {
            tracing::warn!(%peer, path, "admin request from a non-local peer refused");
            return text(
                StatusCode::FORBIDDEN,
                "the admin endpoint only answers local clients (see --admin-allow-remote)",
            );
        }
        match (method, path) {
            (&Method::GET, "/") => text(
                StatusCode::OK,
                "/config_dump\n/logging\n/quitquitquit (POST)\n/debug/connections\n/debug/pool\n/debug/workers",
            ),
            (&Method::GET, "/config_dump") => json(&self.config_dump()),
            (&Method::GET | &Method::POST, "/logging") => self.logging(method, query),
            (&Method::POST, "/quitquitquit") => {
                tracing::info!(%peer, "drain requested through /quitquitquit");
                self.quit.notify_one();
                text(StatusCode::OK, "draining")
            }
            (&Method::GET, "/debug/connections") => json(&self.inputs.conns.snapshot()),
            (&Method::GET, "/debug/pool") => json(&self.workers.pool_entries()),
            (&Method::GET, "/debug/workers") => json(&self.workers.loads()),
            (_, "/quitquitquit") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
            _ => text(StatusCode::NOT_FOUND, "not found; GET / lists the views"),
        }
    }

    pub fn handler(self: Arc<Self>) -> Handler {
        Arc::new(move |req, peer| {
            self.answer(req.method(), req.uri().path(), req.uri().query(), peer)
        })
    }
}

/// A query string's `key=value` pairs, percent- and `+`-decoded (bad escapes stay as written,
/// invalid UTF-8 is replaced).
fn query_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_decode() {
        let value = |v: &str| query_pairs(&format!("level={v}"))[0].1.clone();
        assert_eq!(
            value("info%2Cztunnel%3A%3Aproxy%3Ddebug"),
            "info,ztunnel::proxy=debug"
        );
        assert_eq!(value("a+b"), "a b");
        assert_eq!(value("100%"), "100%");
        assert_eq!(value("%zz%4"), "%zz%4");
        assert_eq!(value("%E2%9C%93"), "✓");
        assert_eq!(value("%✓✓"), "%✓✓");
    }
}
