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

/// Why a bearer token could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading the token {0}")]
    Read(std::path::PathBuf, #[source] std::io::Error),
    #[error("the token in {0} is not a valid header value")]
    Invalid(std::path::PathBuf),
}

/// Adds `authorization: Bearer <token>` from `file`, read now (so a rotated token is used
/// from the next call on).
pub fn attach_token<T>(
    request: &mut tonic::Request<T>,
    file: &std::path::Path,
) -> Result<(), TokenError> {
    let token = std::fs::read_to_string(file).map_err(|e| TokenError::Read(file.into(), e))?;
    let value = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| TokenError::Invalid(file.into()))?;
    request.metadata_mut().insert("authorization", value);
    Ok(())
}
