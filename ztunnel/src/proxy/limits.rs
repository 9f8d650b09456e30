//! Connection caps: how many connections ztunnel's pod listeners (15001, 15006, 15008) hold at
//! once in all, and from one source address. A flood from one peer then exhausts its own
//! share, not the node's descriptors or every other pod's service; what is over a cap is
//! reset at once, counted in `ztunnel_connection_failures{reason="connection_limit"}` and
//! logged at most once a second.
//!
//! The count is shared by every worker (one lock taken at accept and at close, never per
//! byte), so the caps hold however the kernel spreads connections across workers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Which cap a connection hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OverLimit {
    #[error("{0} connections open in all")]
    Total(usize),
    #[error("{0} connections open from this source")]
    PerSource(usize),
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// The caps and the current counts.
#[derive(Debug)]
pub struct ConnLimits {
    max_total: usize,
    max_per_source: usize,
    counts: Mutex<Counts>,
    /// When a refusal was last logged (seconds since the epoch).
    last_log: AtomicU64,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<ConnLimits>,
    src: IpAddr,
}

impl ConnLimits {
    pub fn new(max_total: usize, max_per_source: usize) -> Self {
        Self {
            max_total,
            max_per_source,
            counts: Mutex::default(),
            last_log: AtomicU64::new(0),
        }
    }

    /// Admits a connection from `src`, or says which cap it is over.
    pub fn admit(self: &Arc<Self>, src: IpAddr) -> Result<Slot, OverLimit> {
        let mut c = self.counts.lock().expect("not poisoned");
        if c.total >= self.max_total {
            return Err(OverLimit::Total(self.max_total));
        }
        let from_src = c.by_source.entry(src).or_default();
        if *from_src >= self.max_per_source {
            return Err(OverLimit::PerSource(self.max_per_source));
        }
        *from_src += 1;
        c.total += 1;
        Ok(Slot {
            limits: self.clone(),
            src,
        })
    }

    /// Whether a refusal should be logged now (at most one a second).
    pub fn should_log(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_log.swap(now, Ordering::Relaxed) != now
    }

    /// Connections open now: in all, and from `src`.
    pub fn open(&self, src: IpAddr) -> (usize, usize) {
        let c = self.counts.lock().expect("not poisoned");
        (c.total, c.by_source.get(&src).copied().unwrap_or(0))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.limits.counts.lock().expect("not poisoned");
        c.total -= 1;
        if let Some(n) = c.by_source.get_mut(&self.src) {
            *n -= 1;
            if *n == 0 {
                c.by_source.remove(&self.src);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_per_source_and_in_all_and_free_on_drop() {
        let limits = Arc::new(ConnLimits::new(3, 2));
        let a: IpAddr = [198, 18, 0, 1].into();
        let b: IpAddr = [198, 18, 0, 2].into();
        let a1 = limits.admit(a).unwrap();
        let _a2 = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), OverLimit::PerSource(2));
        let _b1 = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).unwrap_err(), OverLimit::Total(3));
        drop(a1);
        assert_eq!(limits.open(a), (2, 1));
        let _a3 = limits.admit(a).unwrap();
        assert_eq!(limits.open(b), (3, 1));
    }

    #[test]
    fn sources_with_nothing_open_are_forgotten() {
        let limits = Arc::new(ConnLimits::new(10, 10));
        for i in 0..100u8 {
            drop(limits.admit([198, 18, 1, i].into()).unwrap());
        }
        assert!(limits.counts.lock().unwrap().by_source.is_empty());
    }
}
