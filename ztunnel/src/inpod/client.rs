//! The ZDS client: ztunnel's side of the conversation with the node agent.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mesh_zds::client::{self, ClientSession};
use mesh_zds::transport::{RecvError, SeqPacket};

use super::manager::PodManager;
use crate::drain::Drain;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Whether the current connection has delivered its snapshot (for readiness).
#[derive(Debug, Default)]
pub struct ZdsStatus {
    pub connected: AtomicBool,
    pub snapshot_received: AtomicBool,
}

/// Connects to the node agent at `path` and serves it until the process drains; reconnects
/// with backoff whenever the connection fails. Pod proxies keep running across reconnects.
pub async fn run(path: PathBuf, pods: Arc<PodManager>, drain: Drain, status: Arc<ZdsStatus>) {
    let mut backoff = BACKOFF_START;
    let mut logged_wait = false;
    loop {
        let sock = tokio::select! {
            () = drain.accepting_stopped() => return,
            r = SeqPacket::connect(&path) => r,
        };
        let sock = match sock {
            Ok(s) => s,
            Err(e) => {
                if !logged_wait {
                    tracing::warn!(
                        socket = %path.display(),
                        error = %e,
                        "waiting for the node agent's ZDS socket (is the node agent running?)"
                    );
                    logged_wait = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        logged_wait = false;
        backoff = BACKOFF_START;
        status.connected.store(true, Ordering::Release);
        tracing::info!(socket = %path.display(), "connected to the node agent");
        let result = tokio::select! {
            () = drain.accepting_stopped() => return,
            r = serve(&sock, &pods, &status) => r,
        };
        status.connected.store(false, Ordering::Release);
        status.snapshot_received.store(false, Ordering::Release);
        match result {
            Ok(()) => tracing::info!("node agent closed the ZDS connection; reconnecting"),
            Err(e) => tracing::warn!(error = %e, "ZDS connection failed; reconnecting"),
        }
        tokio::time::sleep(BACKOFF_START).await;
    }
}

async fn serve(
    sock: &SeqPacket,
    pods: &Arc<PodManager>,
    status: &ZdsStatus,
) -> std::io::Result<()> {
    sock.send(&ClientSession::hello(), &[]).await?;
    let mut session = ClientSession::new();
    loop {
        let result = match sock.recv().await {
            Ok(dgram) => match session.on_request(&dgram.data, dgram.fds) {
                Ok(cmd) => pods.handle(cmd).await,
                Err(e) => Err(format!("malformed request: {e}")),
            },
            Err(RecvError::Closed) => return Ok(()),
            Err(RecvError::Io(e)) => return Err(e),
            // The datagram is consumed and its descriptors closed; say why and carry on.
            Err(e @ (RecvError::Truncated | RecvError::ControlTruncated)) => Err(e.to_string()),
        };
        if let Err(reason) = &result {
            tracing::warn!(%reason, "NACK to the node agent");
        }
        if session.snapshot_done() {
            status.snapshot_received.store(true, Ordering::Release);
        }
        sock.send(&client::ack(result), &[]).await?;
    }
}
