//! ztunnel: the node's zero-trust L4 tunnel.
//!
//! For every pod the node agent enrolls (over ZDS), ztunnel listens inside the pod's network
//! namespace, captures its TCP in and out, and carries it to the destination node over HBONE
//! (mutual TLS with SPIFFE identities + HTTP/2 CONNECT on 15008).
//!
//! - [`inpod`]: ZDS client and the set of pod proxies;
//! - [`proxy`]: the data path (listeners, HBONE client and server, pool, copy);
//! - [`identity`], [`tls`]: SPIFFE identities, the local and Istio CAs, certificates and rustls
//!   setup;
//! - [`state`]: workloads, services and policies, from the local config file and istiod;
//! - [`xds`]: istiod's protos, their conversion and the delta ADS client;
//! - [`admin`], [`metrics`], [`readiness`] (over [`http`]), [`accesslog`], [`logging`]: what
//!   operators see;
//! - [`drain`], [`errors`], [`config`], [`app`]: operations and wiring.
//!
//! The library exists so tests and benchmarks can use the same types; the binary is `main.rs`.

#![forbid(unsafe_code)]

pub mod accesslog;
pub mod admin;
pub mod app;
pub mod config;
pub mod drain;
pub mod errors;
pub mod http;
pub mod identity;
pub mod inpod;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod readiness;
pub mod state;
pub mod tls;
pub mod xds;
