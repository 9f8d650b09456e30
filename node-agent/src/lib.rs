//! The node agent: the only writer of traffic redirection on a node.
//!
//! - [`pods`]: this node's pods from a source (a local file or Kubernetes) and the pure
//!   enrollment rule;
//! - [`enroll`]: the manager that makes each pod either fully captured or not enrolled;
//! - [`redirect`]: the in-pod ruleset as a pure plan, applied atomically, checked for drift;
//!   and the host's probe SNAT rule;
//! - [`netns_find`]: locating a pod's network namespace (path, CNI report, or IP search);
//! - [`zds`]: the ZDS server that hands pods to ztunnel;
//! - [`http`], [`metrics`], [`config`], [`app`]: operations and wiring.

#![forbid(unsafe_code)]

pub mod app;
pub mod cni;
pub mod config;
pub mod enroll;
pub mod http;
pub mod install;
pub mod metrics;
pub mod netns_find;
pub mod pods;
pub mod redirect;
pub mod zds;
