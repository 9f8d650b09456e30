//! ztunnel's configuration, parsed once from flags and environment into typed values.
//!
//! Everything the process reads from outside at startup is here; nothing else reads the
//! environment. Tests construct [`Config`] values directly.

use std::path::PathBuf;
use std::time::Duration;

use mesh_contract::{DEFAULT_TRUST_DOMAIN, paths};

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Settings for `ztunnel run`.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// The node agent's ZDS socket (SOCK_SEQPACKET).
    #[arg(long, env = "ZTUNNEL_ZDS_SOCKET", default_value = paths::ZDS_SOCKET)]
    pub zds_socket: PathBuf,

    /// Workloads, services and policies in Istio's local-config YAML; reloaded on change.
    /// Without it every destination is unknown (passthrough, or refused in registry-only mode).
    #[arg(long, env = "ZTUNNEL_LOCAL_CONFIG")]
    pub local_config: Option<PathBuf>,

    /// Directory holding the local CA (`ca-cert.pem`, `ca-key.pem`); create one with
    /// `ztunnel generate-ca`.
    #[arg(long, env = "ZTUNNEL_CA_DIR", required_unless_present = "ca_address")]
    pub ca_dir: Option<PathBuf>,

    /// Istio control plane mode: istiod's xDS address (`https://istiod.istio-system.svc:15012`);
    /// workloads, services and policies then come from it (merged with `--local-config`, if
    /// given, the control plane winning clashes).
    #[arg(long, env = "XDS_ADDRESS")]
    pub xds_address: Option<String>,

    /// PEM roots that sign istiod's serving certificate (required with `--xds-address`).
    #[arg(long, env = "XDS_ROOT_CA")]
    pub xds_root_cert: Option<PathBuf>,

    /// Istio control plane mode: the CA that signs workload certificates
    /// (`https://istiod.istio-system.svc:15012`); replaces `--ca-dir`.
    #[arg(long, env = "CA_ADDRESS", conflicts_with = "ca_dir")]
    pub ca_address: Option<String>,

    /// PEM roots of the Istio CA: they sign its serving certificate and every workload
    /// certificate (default: `--xds-root-cert`).
    #[arg(long, env = "CA_ROOT_CA")]
    pub ca_root_cert: Option<PathBuf>,

    /// This ztunnel's pod, namespace and address, and the node and cluster it runs in: its
    /// identity towards the control plane (node id `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`).
    #[arg(long, env = "POD_NAME", default_value = "ztunnel")]
    pub pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub pod_namespace: String,
    #[arg(long, env = "INSTANCE_IP", default_value = "0.0.0.0")]
    pub instance_ip: std::net::IpAddr,
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// The network this node is on (Istio's `NETWORK`). An endpoint on another network is
    /// reached through that network's gateway (double HBONE), never directly.
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,

    /// Istio control plane mode: the projected service-account token (audience `istio-ca`)
    /// presented to xDS and the CA; re-read for every connection. Not sent when missing.
    #[arg(
        long,
        env = "ZTUNNEL_TOKEN_FILE",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    pub token_file: PathBuf,

    /// Where the kubelet's readiness probe reads `GET /healthz/ready`.
    #[arg(long, env = "ZTUNNEL_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: std::net::SocketAddr,

    /// Where Prometheus scrapes `GET /metrics` (Istio's 15020).
    #[arg(long, env = "ZTUNNEL_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: std::net::SocketAddr,

    /// The admin endpoint (`/config_dump`, `/logging`, `/quitquitquit`, `/debug/...`) that
    /// `ztunnel-admin` reads. Loopback by default: it lists the mesh's workloads and policies.
    #[arg(long, env = "ZTUNNEL_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: std::net::SocketAddr,

    /// Let the admin endpoint answer non-loopback peers (otherwise they get 403 even when
    /// `--admin-addr` is a wider address).
    #[arg(long, env = "ZTUNNEL_ADMIN_ALLOW_REMOTE")]
    pub admin_allow_remote: bool,

    /// SPIFFE trust domain of this mesh.
    #[arg(long, env = "ZTUNNEL_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Lifetime of workload certificates; they are renewed at half-life.
    #[arg(long, env = "ZTUNNEL_CERT_LIFETIME", default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_lifetime: Duration,

    /// Data-plane worker threads (default: one per CPU).
    #[arg(long, env = "ZTUNNEL_WORKERS")]
    pub workers: Option<usize>,

    /// Refuse connections to destinations that are not known workloads or services, instead
    /// of passing them through as plain TCP.
    #[arg(long, env = "ZTUNNEL_REGISTRY_ONLY")]
    pub registry_only: bool,

    /// On SIGTERM (or a pod's removal), how long in-flight connections may run on.
    #[arg(long, env = "ZTUNNEL_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// How often the local config file is checked for changes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub config_poll: Duration,

    /// Pooled HBONE connections with no streams are closed after this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub pool_idle_timeout: Duration,

    /// Inbound HBONE connections that carry no stream for this long are closed (GOAWAY), so
    /// idle peers do not hold their place under the connection caps forever. Longer than
    /// `--pool-idle-timeout`, so a peer's own pool normally closes first.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub hbone_idle_timeout: Duration,

    /// Inbound HBONE connections are PINGed this often; one whose peer has not answered by
    /// the next PING is closed (a peer that vanished without a FIN or RST).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub hbone_keepalive: Duration,

    /// TCP congestion control for HBONE connections, in and out (`cubic`, `bbr`, ...; see
    /// `/proc/sys/net/ipv4/tcp_available_congestion_control`). Unset, they keep the pod's
    /// default, which a pod inherits from its node. Sockets to apps in the same pod never
    /// use the pod's default: they run over loopback, where pacing (BBR) only costs CPU.
    #[arg(long, env = "ZTUNNEL_HBONE_CONGESTION_CONTROL", value_parser = parse_congestion_control)]
    pub hbone_congestion_control: Option<String>,

    /// After traffic, how long a worker keeps polling its sockets instead of sleeping, so a
    /// quick reply is picked up without a thread wake-up (0 disables). Trades CPU and
    /// connection rate for round-trip latency; see README, Performance.
    #[arg(long, env = "ZTUNNEL_BUSY_POLL", default_value = "0s", value_parser = humantime::parse_duration)]
    pub busy_poll: Duration,

    /// Most concurrent streams on one pooled HBONE connection before another is opened.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub pool_max_streams: u32,

    /// Most connections the pod listeners (15001, 15006, 15008) hold open at once, in all;
    /// past it new ones are reset. Keep it under the process's descriptor limit (each
    /// connection needs two).
    #[arg(long, env = "ZTUNNEL_MAX_CONNECTIONS", default_value_t = 100_000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections: usize,

    /// Most connections one source address may hold open at once on the pod listeners.
    #[arg(long, env = "ZTUNNEL_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 10_000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections_per_source: usize,

    /// Serve DNS on 127.0.0.1:15053 (and [::1]) in every enrolled pod: mesh names from the
    /// state, the rest forwarded to `--dns-upstream`. The node agent's DNS capture sends a
    /// pod's port-53 traffic here.
    #[arg(long, env = "ZTUNNEL_DNS_PROXY", default_value_t = true, action = clap::ArgAction::Set)]
    pub dns_proxy: bool,

    /// Resolvers the DNS proxy forwards other names to, tried in order (default: the
    /// nameservers of ztunnel's own /etc/resolv.conf, which in a pod is the cluster DNS).
    #[arg(long = "dns-upstream", env = "ZTUNNEL_DNS_UPSTREAM", value_delimiter = ',', default_values_t = system_resolvers())]
    pub dns_upstreams: Vec<std::net::SocketAddr>,

    /// The cluster's DNS suffix, for the search domains pods append.
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// Log format.
    #[arg(long, env = "ZTUNNEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `info,access=off,ztunnel::proxy=debug`.
    #[arg(long, env = "ZTUNNEL_LOG", default_value = "info")]
    pub log: String,
}

/// The nameservers in /etc/resolv.conf, port 53.
fn system_resolvers() -> Vec<std::net::SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|text| parse_resolv_conf(&text))
        .unwrap_or_default()
}

/// `nameserver` lines of a resolv.conf; other lines and unparseable addresses are skipped.
pub fn parse_resolv_conf(text: &str) -> Vec<std::net::SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| {
            rest.trim()
                .split('%')
                .next()?
                .parse::<std::net::IpAddr>()
                .ok()
        })
        .map(|ip| std::net::SocketAddr::new(ip, 53))
        .collect()
}

/// A congestion control this kernel offers, named as it takes names: ASCII letters, digits,
/// `_` and `-`, shorter than `TCP_CA_NAME_MAX` (16). Checked here, so a mistyped name stops
/// ztunnel at start instead of failing every HBONE connection.
fn parse_congestion_control(name: &str) -> Result<String, String> {
    let valid = !name.is_empty()
        && name.len() < 16
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err(
            "expected a congestion control name: 1 to 15 ASCII letters, digits, '_' or '-'"
                .to_string(),
        );
    }
    crate::proxy::socket::check_congestion_control(name).map_err(|e| e.to_string())?;
    Ok(name.to_string())
}

impl Config {
    /// Worker threads to run.
    pub fn worker_count(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_congestion_control;

    #[test]
    fn congestion_control_names_are_checked_against_the_kernel() {
        // reno is built into every Linux kernel.
        assert_eq!(parse_congestion_control("reno").unwrap(), "reno");
        let unknown = parse_congestion_control("nosuchcc").unwrap_err();
        assert!(
            unknown.contains("\"nosuchcc\" is not available") && unknown.contains("reno"),
            "{unknown}"
        );
        for bad in [
            "",
            "cubic bbr",
            "../cubic",
            "averyveryverylongname",
            "c\u{e9}",
        ] {
            let err = parse_congestion_control(bad).unwrap_err();
            assert!(err.contains("1 to 15 ASCII"), "{bad:?}: {err}");
        }
    }
}
