//! The local mesh's report: one row per path from ztunnel's access events, the DNS answers,
//! the load summary, and the text `local-mesh` prints.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::apps::{connect, echo_roundtrip, payload};
use crate::lab::Pod;

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Row {
    pub label: String,
    /// `ipv4` or `ipv6`: the family the flow used.
    pub family: &'static str,
    pub source: String,
    pub destination: String,
    /// SPIFFE ids as ztunnel logged them (`None`: no identity on that side).
    pub client_identity: Option<String>,
    pub server_identity: Option<String>,
    /// Whether the hop between the nodes (or pods) was mutual TLS, per the access log.
    pub mtls: bool,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Connect plus a 64 KiB echo round trip, as the client saw it.
    pub latency: Duration,
    /// The row expects L4 policy to deny this flow.
    pub expect_denied: bool,
    /// ztunnel logged the flow as denied by policy (`response_flags` `DENY`).
    pub denied: bool,
    /// As expected: the echo came back intact, or a flow expected to be denied was, and never
    /// reached the app.
    pub ok: bool,
    pub error: Option<String>,
}

/// The load pods' flows, summarised.
#[derive(Debug, Clone)]
pub struct LoadSummary {
    pub flows: usize,
    pub ok: usize,
    pub mtls: usize,
    pub p50: Duration,
    pub p99: Duration,
}

/// One DNS query from a mesh pod, captured to ztunnel's DNS proxy.
#[derive(Debug, Clone)]
pub struct DnsRow {
    pub name: String,
    /// `A` or `AAAA`.
    pub qtype: &'static str,
    pub answer: String,
    /// `ztunnel` for a mesh name, `upstream` for one ztunnel forwarded.
    pub answered_by: &'static str,
    /// The expected address came back, from the expected place.
    pub ok: bool,
}

/// What the run found.
#[derive(Debug, Clone)]
pub struct Report {
    pub nodes: usize,
    pub rows: Vec<Row>,
    pub dns: Vec<DnsRow>,
    pub load: Option<LoadSummary>,
    /// Each pod's full CNI ADD (the chain, enrollment included).
    pub cni_adds: Vec<Duration>,
}

impl Report {
    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| !r.ok).count()
            + self.dns.iter().filter(|r| !r.ok).count()
            + self.load.as_ref().map_or(0, |l| l.flows - l.ok)
    }
}

pub(super) struct Measured {
    pub(super) ok: bool,
    pub(super) latency: Duration,
    error: Option<String>,
}

pub(super) fn exchange(from: &Pod, to: SocketAddr) -> Measured {
    let data = payload("local-mesh", 64 * 1024);
    let started = Instant::now();
    let result = connect(from, to, Duration::from_secs(5)).and_then(|s| echo_roundtrip(s, &data));
    let latency = started.elapsed();
    match result {
        Ok(got) if got == data => Measured {
            ok: true,
            latency,
            error: None,
        },
        Ok(got) => Measured {
            ok: false,
            latency,
            error: Some(format!(
                "echo differed ({} of {} bytes)",
                got.len(),
                data.len()
            )),
        },
        Err(e) => Measured {
            ok: false,
            latency,
            error: Some(e.to_string()),
        },
    }
}

/// The access event of the proxy that saw the client's side of a flow: the source pod's
/// ztunnel (outbound), or for a client outside the mesh the server's (inbound-plaintext).
/// Flows are told apart by source address and destination port.
pub(super) fn find_event<'a>(events: &'a [Value], from: &Pod, to: SocketAddr) -> Option<&'a Value> {
    let ip = from.ip_like(to.ip()).unwrap_or(from.ip);
    // `src.addr` is `ip:port`, brackets around IPv6: all of it but the port.
    let src = SocketAddr::new(ip, 0).to_string();
    let src = src.strip_suffix('0').unwrap_or(&src);
    let port = format!(":{}", to.port());
    events.iter().rev().find(|e| {
        let dir = e["direction"].as_str().unwrap_or_default();
        let dst = e["dst.addr"].as_str().unwrap_or_default();
        e["src.addr"].as_str().is_some_and(|s| s.starts_with(src))
            && (dir == "outbound" || dir == "inbound-plaintext")
            && dst.ends_with(&port)
    })
}

pub(super) fn row(
    label: &str,
    from: &Pod,
    to: SocketAddr,
    to_name: &str,
    event: Option<&Value>,
    m: Measured,
    expect_denied: bool,
) -> Row {
    let id = |key: &str| {
        event
            .and_then(|e| e[key].as_str())
            .filter(|s| s.starts_with("spiffe://"))
            .map(str::to_string)
    };
    let num = |key: &str| {
        event
            .and_then(|e| e[key].as_u64().or_else(|| e[key].as_str()?.parse().ok()))
            .unwrap_or(0)
    };
    let denied = event.is_some_and(|e| e["response_flags"] == "DENY");
    let ok = match (expect_denied, event) {
        (_, None) => false,
        (false, Some(_)) => m.ok,
        (true, Some(_)) => denied && !m.ok,
    };
    let error = if event.is_none() {
        Some("no access log entry".to_string())
    } else if expect_denied && !ok {
        Some("expected a policy denial".to_string())
    } else if expect_denied {
        None
    } else {
        m.error
    };
    Row {
        label: label.to_string(),
        family: if to.is_ipv6() { "ipv6" } else { "ipv4" },
        source: from.name.clone(),
        destination: to_name.to_string(),
        client_identity: id("src.identity"),
        server_identity: id("dst.identity"),
        mtls: event.is_some_and(|e| e["security"] == "mtls"),
        bytes_sent: num("bytes_sent"),
        bytes_received: num("bytes_received"),
        latency: m.latency,
        expect_denied,
        denied,
        ok,
        error,
    }
}

/// `spiffe://<td>/ns/<ns>/sa/<sa>` as `ns/sa`.
pub fn short_id(id: &str) -> String {
    id.split_once("/ns/")
        .map(|(_, rest)| rest.replace("/sa/", "/"))
        .unwrap_or_else(|| id.to_string())
}

/// The report as a person reads it.
pub fn render(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<26} {:<4} {:<9} {:<14} {:<30} {:<5} {:<7} {:>15} {:>9}",
        "path",
        "ip",
        "source",
        "destination",
        "identities (client -> server)",
        "mTLS",
        "policy",
        "bytes out/in",
        "latency"
    );
    for r in &report.rows {
        let ids = format!(
            "{} -> {}",
            r.client_identity.as_deref().map_or("-".into(), short_id),
            r.server_identity.as_deref().map_or("-".into(), short_id)
        );
        let _ = writeln!(
            out,
            "{:<26} {:<4} {:<9} {:<14} {:<30} {:<5} {:<7} {:>15} {:>7.2}ms{}",
            r.label,
            r.family.trim_start_matches("ip"),
            r.source,
            r.destination,
            ids,
            if r.mtls { "yes" } else { "no" },
            if r.denied { "DENIED" } else { "allowed" },
            format!("{}/{}", r.bytes_sent, r.bytes_received),
            r.latency.as_secs_f64() * 1000.0,
            r.error
                .as_ref()
                .map_or(String::new(), |e| format!("  FAILED: {e}"))
        );
    }
    if !report.dns.is_empty() {
        let _ = writeln!(
            out,
            "\nDNS from frontend (port 53 captured to ztunnel's DNS proxy on 15053):"
        );
        for d in &report.dns {
            let _ = writeln!(
                out,
                "  {:<34} {:<4} -> {:<16} answered by {}{}",
                d.name,
                d.qtype,
                d.answer,
                d.answered_by,
                if d.ok { "" } else { "  FAILED" }
            );
        }
    }
    if let Some(l) = &report.load {
        let _ = writeln!(
            out,
            "\nload: {} pods, each to its twin on the next node: {}/{} ok, {} over mTLS, latency p50 {:.2}ms p99 {:.2}ms",
            l.flows,
            l.ok,
            l.flows,
            l.mtls,
            l.p50.as_secs_f64() * 1000.0,
            l.p99.as_secs_f64() * 1000.0
        );
    }
    let mut adds = report.cni_adds.clone();
    adds.sort();
    if !adds.is_empty() {
        let _ = writeln!(
            out,
            "\nCNI ADD ({} pods on {} nodes, bridge + host-local + ambient-cni, enrollment included): median {:.1}ms, max {:.1}ms",
            adds.len(),
            report.nodes,
            adds[adds.len() / 2].as_secs_f64() * 1000.0,
            adds[adds.len() - 1].as_secs_f64() * 1000.0
        );
    }
    let _ = writeln!(
        out,
        "identities are SPIFFE ids shown as namespace/service-account (through the waypoint: the waypoint's); latency is connect + a 64 KiB echo round trip"
    );
    out
}
