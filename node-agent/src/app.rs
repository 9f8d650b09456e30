//! Process wiring for `node-agent run` and `node-agent uninstall-cni`.
//!
//! Startup fails fast on what would otherwise fail per pod (no `nft`, an unreadable pod
//! file, sockets that cannot be created). Then: the pod source, the enrollment manager's
//! first pass (each enrolled pod's rules verified or repaired), and only then the ZDS server,
//! so a ztunnel's snapshot reflects the node as it really is. SIGTERM stops the agent without
//! touching any pod: an upgrade or restart must not unprotect them.

use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use mesh_contract::Chain;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};

use std::time::Duration;

use crate::cni::{self, CniServer};
use crate::config::Config;
use crate::enroll::{Manager, Marks, NoStatus, Shared, StatusSink};
use crate::http::{self, Endpoints};
use crate::install::InstallState;
use crate::metrics::Metrics;
use crate::netns_find::Finder;
use crate::pods::{Policy, file, kube};
use crate::redirect::{self, Redirector};
use crate::zds::ZdsServer;

/// Removes the plugin's config entries and binary (a real uninstall; upgrades keep them).
pub fn uninstall_cni(cni: &crate::config::CniInstall) -> anyhow::Result<()> {
    cni.installer(std::path::Path::new(mesh_contract::paths::AGENT_RUN_DIR))
        .uninstall()
        .context("uninstalling the CNI plugin")
}

pub fn run(config: Config) -> anyhow::Result<()> {
    redirect::check_nft()
        .context("the agent writes redirection with the `nft` binary (apt-get install nftables)")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    rt.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let (pods, status, source): (_, Arc<dyn StatusSink>, String) = match &config.pod_file {
        Some(pod_file) => {
            let (pods, watcher) = file::watch(pod_file.clone(), config.pod_file_poll)
                .with_context(|| format!("pod file {}", pod_file.display()))?;
            tokio::spawn(watcher);
            (
                pods,
                Arc::new(NoStatus),
                format!("file {}", pod_file.display()),
            )
        }
        None => {
            let Some(node) = config.node_name.clone() else {
                bail!(
                    "--node-name (or NODE_NAME) is required to watch Kubernetes; or pass --pod-file"
                );
            };
            let client = kube::client(config.kubeconfig.as_deref()).await?;
            let (pods, watcher) = kube::watch_node(client.clone(), &node);
            tokio::spawn(watcher);
            (
                pods,
                kube::PodAnnotator::new(client),
                format!("kubernetes node {node}"),
            )
        }
    };

    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "creating the state directory {}",
            config.state_dir.display()
        )
    })?;
    let probes = if config.no_host_probe_rule {
        None
    } else {
        let probes = redirect::host::HostProbes::install(&config.probe_cgroup, &config.proc_dir)
            .context("--probe-cgroup")?;
        Some(Arc::new(Mutex::new(probes)))
    };
    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let marks_file = config.state_dir.join("enrolled.json");
    let marks = Marks::load(Some(marks_file.clone())).unwrap_or_else(|e| {
        metrics.state_file_errors.inc();
        tracing::error!(error = %Chain(&e), "the enrollment record is unreadable; moving it aside and treating every pod as enrolled before");
        Marks::damaged(marks_file)
    });
    let zds = ZdsServer::new();
    let shared = Arc::new(Mutex::new(Shared::default()));
    let mut manager = Manager::new(
        Policy {
            excluded_namespaces: config.excluded_namespaces.iter().cloned().collect(),
            dns_capture: config.dns_capture,
        },
        Arc::new(Redirector::new()),
        Arc::new(Finder::new(
            config.proc_dir.clone(),
            config.netns_dirs.clone(),
        )),
        zds.clone(),
        metrics.clone(),
        status,
        shared.clone(),
        marks,
        config.drift_interval,
    );
    manager.host_probes = probes;
    let install = config
        .install_cni
        .then(|| Arc::new(InstallState::default()));
    if let Some(state) = &install {
        let installer = config.cni.installer(&config.run_dir);
        installer
            .install_binary()
            .context("installing the CNI plugin binary")?;
        tokio::spawn(installer.run(state.clone(), Duration::from_secs(1)));
    }
    let endpoints = Arc::new(Endpoints {
        shared,
        zds: zds.clone(),
        registry,
        install,
    });
    let listener = http::bind(config.http_addr)
        .await
        .with_context(|| format!("binding {}", config.http_addr))?;
    tokio::spawn(http::serve(listener, endpoints.clone()));
    let (requests, requests_rx) = mpsc::channel(64);
    let cni_server = cni::serve(
        &config.run_dir,
        Arc::new(CniServer {
            requests,
            endpoints,
            metrics: metrics.clone(),
        }),
    )
    .with_context(|| format!("serving CNI requests in {}", config.run_dir.display()))?;
    tokio::spawn(cni_server);
    let (first_sync, synced) = oneshot::channel();
    let manager = tokio::spawn(manager.run(pods, requests_rx, first_sync));
    let _ = synced.await;
    let zds_loop = zds
        .serve(&config.zds_socket)
        .with_context(|| format!("serving ZDS on {}", config.zds_socket.display()))?;
    tokio::spawn(zds_loop);
    tracing::info!(
        zds = %config.zds_socket.display(),
        http = %config.http_addr,
        pods = %source,
        "node agent started"
    );

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        r = manager => {
            r.context("enrollment manager")?;
            bail!("the pod source ended");
        }
    }
    tracing::info!("stopping; enrolled pods keep their redirection");
    let _ = std::fs::remove_file(&config.zds_socket);
    Ok(())
}
