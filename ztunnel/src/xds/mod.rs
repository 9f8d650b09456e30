//! Istio control-plane mode: the messages istiod speaks and their conversion into the same
//! [`crate::state`] model the local config feeds.
//!
//! - [`proto`]: generated from `proto/` (Istio's and Envoy's field numbers);
//! - [`client`]: the delta ADS stream, applying resources as the control plane's source;
//! - [`convert`]: `istio.workload.Address` and `istio.security.Authorization` to state types,
//!   rejecting a malformed resource on its own with a reason (the NACK's text).

pub mod client;
pub mod convert;

/// Generated messages and gRPC stubs.
#[allow(missing_debug_implementations, clippy::all, unused_qualifications)]
pub mod proto {
    pub mod workload {
        tonic::include_proto!("istio.workload");
    }
    pub mod security {
        tonic::include_proto!("istio.security");
    }
    pub mod discovery {
        tonic::include_proto!("envoy.service.discovery.v3");
    }
    pub mod ca {
        tonic::include_proto!("istio.v1.auth");
    }
}

/// Type URL of workloads and services.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of L4 policies.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
