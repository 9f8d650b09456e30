//! Graceful shutdown: stop accepting, let in-flight connections finish, then cut them.
//!
//! A [`Drain`] is a pair of cancellation signals plus a count of live connections. The process
//! has one; each pod proxy has a child, so removing a pod drains only its connections while a
//! process drain reaches every pod.
//!
//! A connection still open at the deadline is reset on both sides (RST on TCP, `RST_STREAM`
//! on HBONE), never closed with a FIN its peer could take for a complete transfer: copies
//! watch [`Drain::cut_signal`] and reset their sockets themselves, and [`Drain::drain`] waits
//! (up to [`RESET_GRACE`]) for them to have done so before it returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How long connections cut at the deadline get to reset their sockets before the drain
/// returns (and the process may exit, which would close them with a FIN).
pub const RESET_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
struct Count {
    live: AtomicUsize,
    zero: Notify,
}

/// Drain signals and live-connection count for one scope (process or pod).
#[derive(Debug, Clone, Default)]
pub struct Drain {
    stop_accepting: CancellationToken,
    terminate: CancellationToken,
    counts: Vec<Arc<Count>>,
}

impl Drain {
    pub fn new() -> Self {
        Self {
            counts: vec![Arc::default()],
            ..Default::default()
        }
    }

    /// A scope inside this one: signalled when this one is, counted in both.
    pub fn child(&self) -> Self {
        let mut counts = vec![Arc::default()];
        counts.extend(self.counts.iter().cloned());
        Self {
            stop_accepting: self.stop_accepting.child_token(),
            terminate: self.terminate.child_token(),
            counts,
        }
    }

    /// Registers a live connection until the guard drops.
    pub fn track(&self) -> ConnGuard {
        for c in &self.counts {
            c.live.fetch_add(1, Ordering::AcqRel);
        }
        ConnGuard {
            counts: self.counts.clone(),
        }
    }

    pub fn live(&self) -> usize {
        self.counts[0].live.load(Ordering::Acquire)
    }

    /// Resolves when listeners should close.
    pub async fn accepting_stopped(&self) {
        self.stop_accepting.cancelled().await
    }

    /// Resolves when in-flight connections must end now.
    pub async fn terminated(&self) {
        self.terminate.cancelled().await
    }

    /// A signal that fires when this scope terminates: what a connection's copy watches so it
    /// can reset both of its sides at the deadline.
    pub fn cut_signal(&self) -> CancellationToken {
        self.terminate.child_token()
    }

    pub fn is_stopping(&self) -> bool {
        self.stop_accepting.is_cancelled()
    }

    /// Stops accepting, waits up to `deadline` for live connections to finish, then
    /// terminates the rest. Returns how many were cut.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.stop_accepting.cancel();
        let _ = tokio::time::timeout(deadline, self.idle()).await;
        let cut = self.live();
        self.terminate.cancel();
        if cut > 0 {
            let _ = tokio::time::timeout(RESET_GRACE, self.idle()).await;
        }
        cut
    }

    /// Runs one connection's `work` to its end. When this scope terminates first, the work
    /// gets [`RESET_GRACE`] to reset its sockets and end by itself before it is dropped.
    ///
    /// `work` is pinned by the caller (`std::pin::pin!(async { .. })`): a future taken by
    /// value would be stored twice in this one's state (the argument and its pinned move),
    /// doubling every connection's task.
    pub async fn run_until_cut<F: Future<Output = ()>>(&self, mut work: std::pin::Pin<&mut F>) {
        tokio::select! {
            () = work.as_mut() => {}
            () = self.terminated() => {
                let _ = tokio::time::timeout(RESET_GRACE, work).await;
            }
        }
    }

    /// Resolves when no connection is live in this scope.
    async fn idle(&self) {
        let count = &self.counts[0];
        loop {
            let notified = count.zero.notified();
            if count.live.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Stops accepting and terminates at once.
    pub fn shutdown_now(&self) {
        self.stop_accepting.cancel();
        self.terminate.cancel();
    }
}

/// One live connection; dropping it updates the counts.
#[derive(Debug)]
pub struct ConnGuard {
    counts: Vec<Arc<Count>>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        for c in &self.counts {
            if c.live.fetch_sub(1, Ordering::AcqRel) == 1 {
                c.zero.notify_waiters();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_connections_then_terminates() {
        let process = Drain::new();
        let pod = process.child();
        let g1 = pod.track();
        let g2 = pod.track();
        assert_eq!((process.live(), pod.live()), (2, 2));
        drop(g1);
        let waiter = {
            let pod = pod.clone();
            tokio::spawn(async move { pod.drain(Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(pod.is_stopping() && !process.is_stopping());
        drop(g2);
        assert_eq!(waiter.await.unwrap(), 0);
        assert_eq!(process.live(), 0);
    }

    #[tokio::test]
    async fn deadline_cuts_stragglers_and_parent_reaches_children() {
        let process = Drain::new();
        let pod = process.child();
        let _g = pod.track();
        let cut = process.drain(Duration::from_millis(20)).await;
        assert_eq!(cut, 1);
        // Cancellation propagated to the child.
        tokio::time::timeout(Duration::from_secs(1), pod.terminated())
            .await
            .unwrap();
    }
}
