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
//! - [`xds`]: converting istiod's resources and the delta ADS client; [`proto`]: the
//!   generated messages, shared with the CA client; [`grpc`]: the token both send;
//! - [`admin`], [`scrape`] (the metrics endpoint), [`readiness`] (over [`http`]), [`logging`]:
//!   what operators see; [`metrics`] holds the counters the data path updates, and its access
//!   log is [`proxy::accesslog`];
//! - [`drain`], [`config`], [`app`]: operations and wiring (errors are printed with
//!   [`mesh_contract::Chain`]).
//!
//! The library exists so tests and benchmarks can use the same types; the binary is `main.rs`.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod drain;
pub mod grpc;
pub mod http;
pub mod identity;
pub mod inpod;
pub mod logging;
pub mod metrics;
pub mod proto;
pub mod proxy;
pub mod readiness;
pub mod scrape;
pub mod state;
pub mod tls;
pub mod xds;
