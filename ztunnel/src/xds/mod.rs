//! Istio control-plane mode: the messages istiod speaks and their conversion into the same
//! [`crate::state`] model the local config feeds (the messages themselves are [`crate::proto`]).
//!
//! - [`client`]: the delta ADS stream, applying resources as the control plane's source;
//! - [`convert`]: `istio.workload.Address` and `istio.security.Authorization` to state types,
//!   rejecting a malformed resource on its own with a reason (the NACK's text).

pub mod client;
pub mod convert;

/// Type URL of workloads and services.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of L4 policies.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
