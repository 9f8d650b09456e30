//! The metrics endpoint, served on `--metrics-addr` (Istio's 15020) as OpenMetrics text: the
//! data path's counters ([`crate::metrics`]) plus what is a reading rather than an event (pod
//! proxies, certificate expiry, ZDS and xDS state, process figures), taken at scrape time by
//! [`Readings`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::{Registry, Unit};

use crate::http::{Handler, reply, text};
use crate::identity::manager::CertManager;
use crate::inpod::client::ZdsStatus;
use crate::inpod::manager::PodManager;
use crate::metrics::Metrics;
use crate::xds::client::XdsStatus;

/// Values read when Prometheus scrapes.
#[derive(Debug)]
pub struct Readings {
    pub pods: Arc<PodManager>,
    pub certs: Arc<CertManager>,
    pub zds: Arc<ZdsStatus>,
    /// With `--xds-address`: the stream's status.
    pub xds: Option<Arc<XdsStatus>>,
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    let m = encoder.encode_descriptor(name, help, unit, g.metric_type())?;
    g.encode(m)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabel {
    identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

impl Collector for Readings {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pods = self.pods.status();
        let by_state: Family<StateLabel, Gauge> = Family::default();
        for state in ["running", "pending"] {
            by_state
                .get_or_create(&StateLabel { state })
                .set(pods.iter().filter(|p| p.state == state).count() as i64);
        }
        let m = encoder.encode_descriptor(
            "ztunnel_pod_proxies",
            "Enrolled pods by proxy state",
            None,
            by_state.metric_type(),
        )?;
        by_state.encode(m)?;

        let expiry: Family<IdentityLabel, Gauge<f64, std::sync::atomic::AtomicU64>> =
            Family::default();
        for (identity, issued) in self.certs.snapshot() {
            if let Some(issued) = issued {
                let at = issued
                    .cert
                    .not_after
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                expiry
                    .get_or_create(&IdentityLabel {
                        identity: identity.to_string(),
                    })
                    .set(at.as_secs_f64());
            }
        }
        let m = encoder.encode_descriptor(
            "ztunnel_certificate_expiry_timestamp",
            "When each workload certificate held expires (Unix time)",
            Some(&Unit::Seconds),
            expiry.metric_type(),
        )?;
        expiry.encode(m)?;

        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        gauge(
            &mut encoder,
            "ztunnel_zds_connected",
            "1 while connected to the node agent's ZDS socket",
            None,
            flag(self.zds.connected.load(Ordering::Acquire)),
        )?;
        gauge(
            &mut encoder,
            "ztunnel_zds_snapshot_received",
            "1 once the node agent's snapshot of this node's pods arrived",
            None,
            flag(self.zds.snapshot_received.load(Ordering::Acquire)),
        )?;
        if let Some(xds) = &self.xds {
            gauge(
                &mut encoder,
                "ztunnel_xds_synced",
                "1 once istiod's first push of workloads and policies was applied",
                None,
                flag(xds.synced.load(Ordering::Acquire)),
            )?;
            gauge(
                &mut encoder,
                "ztunnel_xds_refused_policies",
                "Policies from istiod that could not be read, each enforced as a fail-closed stand-in",
                None,
                xds.refused_policies.load(Ordering::Acquire) as f64,
            )?;
        }
        process(&mut encoder)
    }
}

/// Process figures from /proc, with the usual `process_` names.
fn process(encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge(
            encoder,
            "process_open_fds",
            "Open file descriptors",
            None,
            fds.count() as f64,
        )?;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|v| v * 1024.0)
    };
    if let Some(rss) = kib("VmRSS:") {
        gauge(
            encoder,
            "process_resident_memory",
            "Resident memory",
            Some(&Unit::Bytes),
            rss,
        )?;
    }
    if let Some(vsz) = kib("VmSize:") {
        gauge(
            encoder,
            "process_virtual_memory",
            "Virtual memory",
            Some(&Unit::Bytes),
            vsz,
        )?;
    }
    if let Some(threads) = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        gauge(encoder, "process_threads", "OS threads", None, threads)?;
    }
    Ok(())
}

/// The registry served on the metrics port: counters plus scrape-time readings.
pub fn registry(metrics: &Arc<Metrics>, readings: Readings) -> Registry {
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    registry.register_collector(Box::new(readings));
    let start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let g: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    g.set(start);
    registry.register_with_unit(
        "process_start_time",
        "When the process started (Unix time)",
        Unit::Seconds,
        g,
    );
    registry
}

/// Renders `registry` as OpenMetrics text.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    text
}

/// The metrics endpoint: `GET /metrics` (and Istio's `/stats/prometheus`).
pub fn handler(registry: Arc<Registry>) -> Handler {
    Arc::new(move |req, _peer| match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics" | "/stats/prometheus") => reply(
            hyper::StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(&registry),
        ),
        _ => text(
            hyper::StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics",
        ),
    })
}
