//! What ztunnel's two gRPC clients, xDS ([`crate::xds`]) and the Istio CA
//! ([`crate::identity::istio_ca`]), share: the bearer token istiod checks.

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
