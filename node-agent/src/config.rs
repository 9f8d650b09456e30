//! The agent's configuration, parsed once from flags and environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_contract::paths;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the CNI plugin is installed (shared by `run --install-cni` and `uninstall-cni`).
#[derive(Clone, Debug, clap::Args)]
pub struct CniInstall {
    /// The host's CNI binary directory.
    #[arg(long, env = "AGENT_CNI_BIN_DIR", default_value = paths::CNI_BIN_DIR)]
    pub cni_bin_dir: PathBuf,

    /// The host's CNI configuration directory.
    #[arg(long, env = "AGENT_CNI_CONF_DIR", default_value = paths::CNI_CONF_DIR)]
    pub cni_conf_dir: PathBuf,

    /// The plugin binary to install (default: `ambient-cni` next to this executable).
    #[arg(long, env = "AGENT_CNI_PLUGIN")]
    pub cni_plugin: Option<PathBuf>,

    /// Namespaces the plugin passes through without asking the agent. The agent's own
    /// namespace (`POD_NAMESPACE`, set by the DaemonSet) is added, so it and ztunnel can
    /// always start.
    #[arg(
        long,
        env = "AGENT_CNI_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system,istio-system"
    )]
    pub cni_exclude_namespaces: Vec<String>,

    /// The plugin's log level (`plugin_log_level`).
    #[arg(long, default_value = "warn")]
    pub cni_log_level: String,
}

impl CniInstall {
    /// The installer these settings describe, for an agent whose run dir is `run_dir`.
    pub fn installer(&self, run_dir: &std::path::Path) -> crate::install::Installer {
        let binary = self.cni_plugin.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join(crate::install::PLUGIN_TYPE)))
                .unwrap_or_else(|| crate::install::PLUGIN_TYPE.into())
        });
        let mut exclude = self.cni_exclude_namespaces.clone();
        if let Ok(own) = std::env::var("POD_NAMESPACE")
            && !own.is_empty()
            && !exclude.contains(&own)
        {
            exclude.push(own);
        }
        crate::install::Installer {
            binary,
            bin_dir: self.cni_bin_dir.clone(),
            conf_dir: self.cni_conf_dir.clone(),
            entry: crate::install::entry(run_dir, &exclude, &self.cni_log_level),
        }
    }
}

/// Settings for `node-agent run`.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Standalone pod source: a YAML file of this node's pods and namespaces (see
    /// `pods::file`). Without it the agent watches Kubernetes.
    #[arg(long, env = "AGENT_POD_FILE")]
    pub pod_file: Option<PathBuf>,

    /// This node's name (Kubernetes source: only pods scheduled here are watched).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Kubeconfig for the Kubernetes source; without it the in-cluster service account is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// The ZDS socket ztunnel connects to.
    #[arg(long, env = "AGENT_ZDS_SOCKET", default_value = paths::ZDS_SOCKET)]
    pub zds_socket: PathBuf,

    /// Run directory holding the CNI event socket.
    #[arg(long, env = "AGENT_RUN_DIR", default_value = paths::AGENT_RUN_DIR)]
    pub run_dir: PathBuf,

    /// Persistent directory for the record of enrolled pods (survives restarts, so rules
    /// lost with a reboot are noticed and reported).
    #[arg(
        long,
        env = "AGENT_STATE_DIR",
        default_value = "/var/lib/ambient-agent"
    )]
    pub state_dir: PathBuf,

    /// Address of the `/readyz`, `/metrics` and `/pods` endpoint.
    #[arg(long, env = "AGENT_HTTP_ADDR", default_value = "127.0.0.1:8000")]
    pub http_addr: SocketAddr,

    /// The host's /proc (searched for pods' network namespaces).
    #[arg(long, env = "AGENT_PROC_DIR", default_value = "/proc")]
    pub proc_dir: PathBuf,

    /// Directories of netns bind mounts, also searched.
    #[arg(
        long = "netns-dir",
        env = "AGENT_NETNS_DIRS",
        value_delimiter = ',',
        default_value = "/run/netns,/var/run/netns"
    )]
    pub netns_dirs: Vec<PathBuf>,

    /// Namespaces never enrolled.
    #[arg(
        long,
        env = "AGENT_EXCLUDED_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system"
    )]
    pub excluded_namespaces: Vec<String>,

    /// Capture pods' DNS to ztunnel's DNS proxy (port 15053) unless a pod says otherwise.
    /// A pod is not enrolled while nothing serves 15053 in it (its DNS would be lost); this
    /// project's ztunnel serves it unless run with `--dns-proxy false`. Off by default, as in
    /// Istio.
    #[arg(long, env = "AGENT_DNS_CAPTURE")]
    pub dns_capture: bool,

    /// How often every enrolled pod's rules are checked for drift.
    #[arg(long, env = "AGENT_DRIFT_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drift_interval: Duration,

    /// How often the pod file is checked for changes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub pod_file_poll: Duration,

    /// Who gets the kubelet's probe bypass (SNAT to 169.254.7.127, no policy): `auto` (the
    /// cgroup v2 of the process named `kubelet`; nobody if none is found), a cgroup v2 path
    /// such as `/system.slice/kubelet.service`, `any` (every process on the node, as Istio
    /// does) or `none` (probes go through ztunnel and policy).
    #[arg(long, env = "AGENT_PROBE_CGROUP", default_value = "auto")]
    pub probe_cgroup: String,

    /// Do not manage the host's probe SNAT rule (for nodes where something else does).
    #[arg(long, env = "AGENT_NO_HOST_PROBE_RULE")]
    pub no_host_probe_rule: bool,

    /// Install the CNI plugin: its binary into --cni-bin-dir and its entry into the primary
    /// config in --cni-conf-dir, kept in place while the agent runs.
    #[arg(long, env = "AGENT_INSTALL_CNI")]
    pub install_cni: bool,

    #[command(flatten)]
    pub cni: CniInstall,

    #[arg(long, env = "AGENT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `info,node_agent=debug`.
    #[arg(long, env = "AGENT_LOG", default_value = "info")]
    pub log: String,
}
