//! Process wiring for `ztunnel run`: startup checks, runtimes, and orderly shutdown.
//!
//! The control runtime (the main thread) runs ZDS, certificate renewal, config reloads (and
//! closing connections a new policy denies) and the readiness, metrics and admin endpoints;
//! the data plane runs on [`crate::proxy::worker`] threads. Startup fails fast, with the fix in
//! the message, for anything that would otherwise fail per connection later: missing
//! capabilities, an unreadable CA, a bad config file, a ZDS socket path that cannot exist.

use std::sync::Arc;

use anyhow::{Context, bail};

use tokio::sync::Notify;

use crate::admin::Admin;
use crate::config::Config;
use crate::drain::Drain;
use crate::identity::Identity;
use crate::identity::ca::{CertificateSource, LocalCa};
use crate::identity::istio_ca::IstioCa;
use crate::identity::manager::CertManager;
use crate::inpod::client::{self, ZdsStatus};
use crate::inpod::manager::PodManager;
use crate::logging::LogControl;
use crate::metrics::Metrics;
use crate::proxy::ProxyInputs;
use crate::proxy::worker::Workers;
use crate::state::parts::{Parts, Source, Sources};
use crate::state::{StateHandle, local};
use crate::tls::{self, TlsContext};
use crate::xds::{self, client::XdsStatus};

/// Linux capabilities the data path needs, with what each is for.
const REQUIRED_CAPS: [(u32, &str, &str); 2] = [
    (
        12,
        "CAP_NET_ADMIN",
        "SO_MARK and IP_TRANSPARENT on pod sockets",
    ),
    (21, "CAP_SYS_ADMIN", "entering pod network namespaces"),
];

fn effective_caps() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff in /proc/self/status")?;
    u64::from_str_radix(line.trim(), 16).context("parsing CapEff")
}

/// The required capabilities absent from an effective set, each with what it is for.
fn missing_capabilities(effective: u64) -> Vec<String> {
    REQUIRED_CAPS
        .iter()
        .filter(|(bit, _, _)| effective & (1 << bit) == 0)
        .map(|(_, name, why)| format!("{name} ({why})"))
        .collect()
}

fn check_capabilities() -> anyhow::Result<()> {
    let missing = missing_capabilities(effective_caps()?);
    if !missing.is_empty() {
        bail!(
            "missing capabilities: {}; run as root or grant them to the container",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Runs ztunnel until SIGTERM/SIGINT (or `/quitquitquit`), then drains.
pub fn run(config: Config, log: LogControl) -> anyhow::Result<()> {
    check_capabilities()?;
    if config.xds_address.is_some() && config.xds_root_cert.is_none() {
        bail!(
            "--xds-address needs --xds-root-cert (XDS_ROOT_CA): the roots that sign istiod's certificate"
        );
    }
    Identity::new(&config.trust_domain, "probe", "probe")
        .with_context(|| format!("invalid --trust-domain {:?}", config.trust_domain))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the control runtime")?;
    // The Istio CA's gRPC channel starts its worker on the current runtime.
    let entered = rt.enter();
    let ca: Arc<dyn CertificateSource> = match (&config.ca_address, &config.ca_dir) {
        (Some(address), _) => {
            let roots = config
                .ca_root_cert
                .as_ref()
                .or(config.xds_root_cert.as_ref())
                .context("--ca-address needs --ca-root-cert (CA_ROOT_CA) or --xds-root-cert")?;
            let token = Some(config.token_file.clone()).filter(|f| f.exists());
            Arc::new(
                IstioCa::new(address, roots, token, &config.cluster_id)
                    .with_context(|| format!("the Istio CA at {address}"))?,
            )
        }
        (None, Some(dir)) => Arc::new(LocalCa::load_dir(dir).with_context(|| {
            format!(
                "loading the local CA from {} (create one with `ztunnel generate-ca --dir {}`)",
                dir.display(),
                dir.display()
            )
        })?),
        (None, None) => bail!(
            "no certificate authority: give --ca-dir (a local CA) or --ca-address (Istio's CA)"
        ),
    };
    let initial = match &config.local_config {
        Some(file) => local::load(file, &config.trust_domain)
            .with_context(|| format!("local config {}", file.display()))?,
        None => Parts::default(),
    };
    match config.zds_socket.parent() {
        Some(dir) if dir.as_os_str().is_empty() || dir.is_dir() => {}
        Some(dir) => bail!(
            "the ZDS socket directory {} does not exist (is the node agent's run dir mounted?)",
            dir.display()
        ),
        None => bail!(
            "--zds-socket {} is not a file path",
            config.zds_socket.display()
        ),
    }

    drop(entered);
    rt.block_on(serve(Arc::new(config), ca, initial, log))
}

/// Binds one of the HTTP endpoints and runs it on the control runtime.
async fn endpoint(
    what: &str,
    flag: &str,
    addr: std::net::SocketAddr,
    handler: crate::http::Handler,
) -> anyhow::Result<()> {
    let server = crate::http::serve(addr, handler)
        .await
        .with_context(|| format!("binding the {what} endpoint {addr} ({flag})"))?;
    tokio::spawn(server);
    Ok(())
}

async fn serve(
    config: Arc<Config>,
    ca: Arc<dyn CertificateSource>,
    initial: Parts,
    log: LogControl,
) -> anyhow::Result<()> {
    let certs = Arc::new(CertManager::new(
        ca,
        config.cert_lifetime,
        tls::provider(),
        tokio::runtime::Handle::current(),
    ));
    let tls = TlsContext::new(certs.roots(), &config.trust_domain)?;
    let state = StateHandle::default();
    let sources = Sources::new(state.clone());
    sources.set(Source::LocalFile, initial);
    if let Some(file) = &config.local_config {
        tokio::spawn(local::watch(
            file.clone(),
            config.trust_domain.clone(),
            sources.clone(),
            config.config_poll,
        ));
    }
    let metrics = Arc::new(Metrics::default());
    let inputs = Arc::new(ProxyInputs {
        config: config.clone(),
        state,
        certs: certs.clone(),
        tls,
        metrics: metrics.clone(),
        conns: Arc::default(),
        limits: Arc::new(crate::proxy::limits::ConnLimits::new(
            config.max_connections,
            config.max_connections_per_source,
        )),
    });
    tokio::spawn(revoke_on_change(inputs.clone()));
    if !config.node_name.is_empty() {
        tokio::spawn(prefetch_certificates(
            inputs.clone(),
            config.node_name.clone(),
        ));
    }
    let xds = config.xds_address.as_ref().map(|address| {
        let status = Arc::new(XdsStatus::default());
        tokio::spawn(xds::client::run(
            xds_config(&config, address),
            sources.clone(),
            status.clone(),
        ));
        status
    });
    let workers = Arc::new(
        Workers::start(config.worker_count(), inputs.clone()).context("starting workers")?,
    );
    let drain = Drain::new();
    let pods = PodManager::new(inputs.clone(), workers.clone(), drain.clone());
    let status = Arc::new(ZdsStatus::default());
    endpoint(
        "readiness",
        "--readiness-addr",
        config.readiness_addr,
        crate::readiness::handler(status.clone(), certs.clone(), xds.clone()),
    )
    .await?;
    let registry = Arc::new(crate::scrape::registry(
        &metrics,
        crate::scrape::Readings {
            pods: pods.clone(),
            certs: certs.clone(),
            zds: status.clone(),
            xds: xds.clone(),
        },
    ));
    endpoint(
        "metrics",
        "--metrics-addr",
        config.metrics_addr,
        crate::scrape::handler(registry),
    )
    .await?;
    let quit = Arc::new(Notify::new());
    let admin = Arc::new(Admin {
        inputs: inputs.clone(),
        pods: pods.clone(),
        workers: workers.clone(),
        zds: status.clone(),
        log,
        quit: quit.clone(),
        allow_remote: config.admin_allow_remote,
    });
    endpoint("admin", "--admin-addr", config.admin_addr, admin.handler()).await?;
    // In Istio mode no pod is taken before istiod's first push: until then every destination
    // would look unknown (plaintext passthrough) and every pod would have no policies
    // (allow-all). Without a ZDS connection the node agent reports no ztunnel, so CNI ADD
    // fails with "try again later" and no app starts uncaptured; pods an older ztunnel
    // serves stay with it.
    let zds = tokio::spawn({
        let (path, pods, drain) = (config.zds_socket.clone(), pods.clone(), drain.clone());
        async move {
            if let Some(xds) = xds {
                if !xds.synced.load(std::sync::atomic::Ordering::Acquire) {
                    tracing::info!("waiting for istiod's first push before taking pods over ZDS");
                }
                xds.wait_synced().await;
            }
            client::run(path, pods, drain, status).await;
        }
    });
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        workers = workers.len(),
        zds = %config.zds_socket.display(),
        trust_domain = %config.trust_domain,
        readiness = %config.readiness_addr,
        metrics = %config.metrics_addr,
        admin = %config.admin_addr,
        "ztunnel started"
    );

    tokio::select! {
        r = wait_for_signal() => r?,
        () = quit.notified() => {}
    }
    tracing::info!(deadline = ?config.drain_timeout, "draining");
    let cut = pods.drain_all(config.drain_timeout).await;
    zds.abort();
    tracing::info!(connections_cut = cut, "drained; exiting");
    Ok(())
}

/// How this ztunnel introduces itself to istiod.
fn xds_config(config: &Config, address: &str) -> xds::client::XdsConfig {
    let ns = &config.pod_namespace;
    xds::client::XdsConfig {
        address: address.to_string(),
        root_cert: config.xds_root_cert.clone().unwrap_or_default(),
        token_file: Some(config.token_file.clone()).filter(|f| f.exists()),
        node_id: format!(
            "ztunnel~{}~{}.{ns}~{ns}.svc.cluster.local",
            config.instance_ip, config.pod_name
        ),
        metadata: [
            ("NAMESPACE", ns.clone()),
            ("NODE_NAME", config.node_name.clone()),
            ("CLUSTER_ID", config.cluster_id.clone()),
            ("ISTIO_VERSION", env!("CARGO_PKG_VERSION").to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        trust_domain: config.trust_domain.clone(),
    }
}

/// Keeps certificates for the workloads the control plane places on this node, so a pod's
/// certificate is usually ready before its first connection (or even its ZDS add).
async fn prefetch_certificates(inputs: Arc<ProxyInputs>, node: String) {
    let mut held: std::collections::HashMap<Identity, crate::identity::manager::CertHandle> =
        std::collections::HashMap::new();
    let mut changes = inputs.state.subscribe();
    loop {
        let state = inputs.state.load();
        let wanted: std::collections::HashSet<&Identity> = state
            .workloads
            .values()
            .filter(|w| w.node == node && w.protocol == crate::state::Protocol::Hbone)
            .map(|w| &w.identity)
            .collect();
        held.retain(|id, _| wanted.contains(id));
        for id in wanted {
            if !held.contains_key(id) {
                held.insert(id.clone(), inputs.certs.track(id));
            }
        }
        drop(state);
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// After every state change, closes live inbound connections the new policies deny.
async fn revoke_on_change(inputs: Arc<ProxyInputs>) {
    let mut changes = inputs.state.subscribe();
    while changes.changed().await.is_ok() {
        let cut = inputs.conns.recheck(&inputs.state.load());
        if cut > 0 {
            inputs.metrics.policy_revocations.inc_by(cut as u64);
            tracing::info!(
                connections = cut,
                "closing connections the new policies deny"
            );
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_capabilities_are_named_with_their_purpose() {
        assert!(missing_capabilities(u64::MAX).is_empty());
        let none = missing_capabilities(0);
        assert_eq!(none.len(), 2);
        assert!(none[0].starts_with("CAP_NET_ADMIN (SO_MARK"));
        let only_net_admin = missing_capabilities(1 << 12);
        assert_eq!(
            only_net_admin,
            vec!["CAP_SYS_ADMIN (entering pod network namespaces)".to_string()]
        );
    }
}
