//! In-pod mode: pods arrive over ZDS with their network namespaces, and ztunnel serves each
//! from inside its netns.
//!
//! [`client`] speaks ZDS to the node agent (connect with backoff, hello, snapshot, live
//! updates, one ack per request). [`manager`] owns the set of pod proxies: starts one per
//! add, replaces it when the netns changes, drains it on delete, reconciles after a snapshot
//! and retries pods whose start failed.

pub mod client;
pub mod manager;
