//! `ztunnel-admin`: reads ztunnel's admin endpoint and prints what a person scans in an
//! incident (workloads, services, policies, certificates with expiry, pods, connections,
//! pooled HBONE connections) as tables; `--json` prints the endpoint's JSON instead.

#![forbid(unsafe_code)]

use std::net::SocketAddr;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(name = "ztunnel-admin", version, about = "Inspect a running ztunnel")]
struct Cli {
    /// ztunnel's admin address (`--admin-addr` of `ztunnel run`).
    #[arg(long, env = "ZTUNNEL_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    addr: SocketAddr,
    /// Print the JSON the endpoint returned instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// Workloads ztunnel knows (from the local config or the control plane).
    Workloads,
    /// Services and their endpoints.
    Services,
    /// L4 authorization policies.
    Policies,
    /// Workload certificates held, with expiry.
    Certs,
    /// Pods enrolled on this node and their proxy state.
    Pods,
    /// Live connections per pod, with peers and identities.
    Connections,
    /// Pooled HBONE connections.
    Pool,
    /// Show the log filter, or set it: `info`, `debug`, or `module=level`.
    Log { filter: Option<String> },
    /// Drain and exit (POST /quitquitquit).
    Quit,
}

async fn request(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.with_context(|| {
        format!("connecting to ztunnel's admin endpoint {addr} (is ztunnel running here? see --addr)")
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = sender
        .send_request(req)
        .await
        .context("sending the request")?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        bail!("{method} {path}: {status}: {}", body.trim());
    }
    Ok(body)
}

/// A left-aligned table with a header row; empty cells print as `-`.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| {
            r.into_iter()
                .map(|c| if c.is_empty() { "-".to_string() } else { c })
                .collect()
        })
        .collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: &mut dyn Iterator<Item = &str>, out: &mut String| {
        let parts: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied(), &mut out);
    for r in &rows {
        line(&mut r.iter().map(String::as_str), &mut out);
    }
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    out
}

/// A JSON value as a cell: strings bare, arrays joined with commas, null empty.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k}:{}", cell(v)))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

/// A waypoint or gateway as `destination:port`; empty when unset.
fn gateway(g: &Value) -> String {
    if g.is_null() {
        return String::new();
    }
    format!("{}:{}", cell(&g["destination"]), cell(&g["hboneMtlsPort"]))
}

fn rows(list: &Value, f: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    list.as_array()
        .map(|a| a.iter().map(f).collect())
        .unwrap_or_default()
}

/// `3d4h`, `5m12s`, or `expired 2m ago`.
fn human_seconds(secs: i64) -> String {
    let (ago, s) = (secs < 0, secs.unsigned_abs());
    let text = match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    };
    if ago {
        format!("expired {text} ago")
    } else {
        text
    }
}

fn render(what: &What, dump: &Value) -> String {
    match what {
        What::Workloads => table(
            &[
                "NAMESPACE",
                "NAME",
                "IPS",
                "PROTOCOL",
                "NODE",
                "NETWORK",
                "LOCALITY",
                "WAYPOINT",
                "SERVICE ACCOUNT",
                "POLICIES",
            ],
            rows(&dump["workloads"], |w| {
                let l = &w["locality"];
                let locality = [&l["region"], &l["zone"], &l["subzone"]]
                    .map(cell)
                    .join("/");
                vec![
                    cell(&w["namespace"]),
                    cell(&w["name"]),
                    cell(&w["workloadIps"]),
                    cell(&w["protocol"]),
                    cell(&w["node"]),
                    cell(&w["network"]),
                    locality.trim_matches('/').to_string(),
                    gateway(&w["waypoint"]),
                    cell(&w["serviceAccount"]),
                    cell(&w["authorizationPolicies"]),
                ]
            }),
        ),
        What::Services => table(
            &[
                "NAMESPACE",
                "HOSTNAME",
                "VIPS",
                "PORTS",
                "ENDPOINTS",
                "WAYPOINT",
                "LOAD BALANCING",
            ],
            rows(&dump["services"], |s| {
                let vips = rows(&s["vips"], |v| vec![cell(&v["address"])]);
                let lb = &s["loadBalancer"];
                let lb = if lb.is_null() {
                    String::new()
                } else {
                    format!(
                        "{}({}) {}",
                        cell(&lb["mode"]),
                        cell(&lb["routingPreferences"]),
                        cell(&lb["healthPolicy"])
                    )
                };
                vec![
                    cell(&s["namespace"]),
                    cell(&s["hostname"]),
                    vips.concat().join(","),
                    cell(&s["ports"]),
                    s["endpoints"].as_array().map_or(0, Vec::len).to_string(),
                    gateway(&s["waypoint"]),
                    lb,
                ]
            }),
        ),
        What::Policies => table(
            &["NAMESPACE", "NAME", "SCOPE", "ACTION", "RULES", "DRY RUN"],
            rows(&dump["policies"], |p| {
                vec![
                    cell(&p["namespace"]),
                    cell(&p["name"]),
                    cell(&p["scope"]),
                    cell(&p["action"]),
                    p["rules"].as_array().map_or(0, Vec::len).to_string(),
                    cell(&p["dryRun"]),
                ]
            }),
        ),
        What::Certs => table(
            &["IDENTITY", "STATE", "SERIAL", "NOT AFTER", "EXPIRES IN"],
            rows(&dump["certificates"], |c| {
                vec![
                    cell(&c["identity"]),
                    cell(&c["state"]),
                    cell(&c["serial"]),
                    cell(&c["not_after"]),
                    c["expires_in_seconds"]
                        .as_i64()
                        .map(human_seconds)
                        .unwrap_or_default(),
                ]
            }),
        ),
        What::Pods => table(
            &["NAMESPACE", "NAME", "UID", "STATE", "IDENTITY"],
            rows(&dump["pods"], |p| {
                vec![
                    cell(&p["namespace"]),
                    cell(&p["name"]),
                    cell(&p["uid"]),
                    cell(&p["state"]),
                    cell(&p["identity"]),
                ]
            }),
        ),
        What::Connections => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            table(
                &[
                    "POD",
                    "DIRECTION",
                    "SOURCE",
                    "SOURCE IDENTITY",
                    "DESTINATION",
                    "DESTINATION IDENTITY",
                    "AGE",
                ],
                rows(dump, |c| {
                    vec![
                        cell(&c["pod"]),
                        cell(&c["direction"]),
                        cell(&c["src"]),
                        cell(&c["src_identity"]),
                        cell(&c["dst"]),
                        cell(&c["dst_identity"]),
                        c["started"]
                            .as_i64()
                            .map(|t| human_seconds(now - t))
                            .unwrap_or_default(),
                    ]
                }),
            )
        }
        What::Pool => table(
            &["NEXT HOP", "SOURCE IDENTITY", "CONNECTION", "STREAMS"],
            rows(dump, |p| {
                vec![
                    cell(&p["next_hop"]),
                    cell(&p["src_identity"]),
                    cell(&p["connection_id"]),
                    cell(&p["streams"]),
                ]
            }),
        ),
        What::Log { .. } | What::Quit => cell(dump),
    }
}

async fn run(cli: Cli) -> anyhow::Result<String> {
    let (method, path) = match &cli.what {
        What::Connections => ("GET", "/debug/connections".to_string()),
        What::Pool => ("GET", "/debug/pool".to_string()),
        What::Log { filter: None } => ("GET", "/logging".to_string()),
        What::Log { filter: Some(f) } => {
            let query = match f.split_once('=') {
                Some((module, level)) => format!("{}={}", encode(module), encode(level)),
                None => format!("level={}", encode(f)),
            };
            ("POST", format!("/logging?{query}"))
        }
        What::Quit => ("POST", "/quitquitquit".to_string()),
        _ => ("GET", "/config_dump".to_string()),
    };
    let body = request(cli.addr, method, &path).await?;
    if matches!(cli.what, What::Log { .. } | What::Quit) {
        return Ok(body);
    }
    let value: Value =
        serde_json::from_str(&body).with_context(|| format!("{path} did not return JSON"))?;
    if cli.json {
        return Ok(serde_json::to_string_pretty(&value)? + "\n");
    }
    Ok(render(&cli.what, &value))
}

/// Query-string encoding (`application/x-www-form-urlencoded`), as the admin endpoint decodes.
fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ztunnel-admin: error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(out) => {
            print!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ztunnel-admin: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_fill_blanks() {
        let t = table(
            &["A", "LONGER"],
            vec![
                vec!["xyz".into(), String::new()],
                vec!["q".into(), "r".into()],
            ],
        );
        assert_eq!(t, "A    LONGER\nxyz  -\nq    r\n");
        assert_eq!(table(&["A"], vec![]), "A\n(none)\n");
    }

    /// A dump as `/config_dump` serializes the state: waypoint, network and locality on
    /// workloads, waypoint and load balancing on services.
    #[test]
    fn routing_columns_show_waypoints_locality_and_load_balancing() {
        let state = ztunnel::state::local::parse(
            r#"
workloads:
- name: a
  namespace: ns
  workloadIps: [198.18.1.9]
  network: net1
  locality: {region: r1, zone: z1}
  waypoint: {destination: "ns/wp.ns.svc", hboneMtlsPort: 15008}
services:
- name: s
  namespace: ns
  hostname: s.ns
  waypoint: {destination: "/198.19.0.50", hboneMtlsPort: 15008}
  loadBalancer: {routingPreferences: [Region, Zone], mode: Failover}
"#,
            "cluster.local",
        )
        .unwrap();
        let dump = serde_json::json!({
            "workloads": state.workloads.values().collect::<Vec<_>>(),
            "services": state.services.values().collect::<Vec<_>>(),
        });
        let workloads = render(&What::Workloads, &dump);
        assert!(workloads.contains("net1"), "{workloads}");
        assert!(workloads.contains("r1/z1"), "{workloads}");
        assert!(workloads.contains("ns/wp.ns.svc:15008"), "{workloads}");
        let services = render(&What::Services, &dump);
        assert!(services.contains("/198.19.0.50:15008"), "{services}");
        assert!(
            services.contains("FAILOVER(REGION,ZONE) ONLY_HEALTHY"),
            "{services}"
        );
    }

    #[test]
    fn durations_read_like_a_person_writes_them() {
        assert_eq!(human_seconds(59), "59s");
        assert_eq!(human_seconds(3599), "59m59s");
        assert_eq!(human_seconds(90_000), "1d1h");
        assert_eq!(human_seconds(-120), "expired 2m0s ago");
    }

    #[test]
    fn certificate_rows_show_expiry_and_never_keys() {
        let dump = serde_json::json!({"certificates": [{
            "identity": "spiffe://cluster.local/ns/a/sa/b", "state": "valid", "serial": "0a",
            "not_after": "2026-12-02T00:00:00Z", "expires_in_seconds": 7200, "chain": ["PEM"]
        }]});
        let out = render(&What::Certs, &dump);
        assert!(
            out.contains("spiffe://cluster.local/ns/a/sa/b  valid"),
            "{out}"
        );
        assert!(out.contains("2h0m"), "{out}");
    }

    #[test]
    fn log_filters_are_encoded() {
        assert_eq!(encode("info,a::b=debug"), "info%2Ca%3A%3Ab%3Ddebug");
    }
}
