//! Workload identities and the certificates that prove them.
//!
//! [`Identity`] is a SPIFFE id (`spiffe://<trust domain>/ns/<namespace>/sa/<service account>`),
//! parsed and validated once; everything else passes the typed value around. [`ca`] mints
//! certificates from a CA on disk (the embedded default), [`manager`] keeps one current
//! certificate per identity in use and renews it at half-life. Private keys never leave these
//! modules except as rustls signing keys, and are never logged.

pub mod ca;
pub mod istio_ca;
pub mod manager;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Why a string is not a usable SPIFFE identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with spiffe://")]
    Scheme(String),
    #[error(
        "identity {0:?} is not of the form spiffe://<trust domain>/ns/<namespace>/sa/<service account>"
    )]
    Shape(String),
    #[error("{field} {value:?} in an identity: {why}")]
    Segment {
        field: &'static str,
        value: String,
        why: &'static str,
    },
}

/// A workload's SPIFFE identity. Shared, not copied: every connection's log and tracker
/// entry names one or two, and a clone is a reference count, not three strings.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(Arc<Parts>);

#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Parts {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("trust_domain", &self.0.trust_domain)
            .field("namespace", &self.0.namespace)
            .field("service_account", &self.0.service_account)
            .finish()
    }
}

const MAX_SEGMENT: usize = 253;

fn check(field: &'static str, value: &str, allow_upper: bool) -> Result<(), IdentityError> {
    let err = |why| IdentityError::Segment {
        field,
        value: value.to_string(),
        why,
    };
    if value.is_empty() {
        return Err(err("must not be empty"));
    }
    if value.len() > MAX_SEGMENT {
        return Err(err("longer than 253 characters"));
    }
    if value == "." || value == ".." {
        return Err(err("must not be a dot segment"));
    }
    let ok = |c: char| {
        c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || matches!(c, '-' | '.' | '_')
            || (allow_upper && c.is_ascii_uppercase())
    };
    if !value.chars().all(ok) {
        return Err(err("may only hold letters, digits, '-', '.' and '_'"));
    }
    Ok(())
}

impl Identity {
    /// Builds an identity from its parts, validating each (SPIFFE: the trust domain is lower
    /// case; path segments are letters, digits, `-`, `.`, `_`).
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        check("trust domain", trust_domain, false)?;
        check("namespace", namespace, true)?;
        check("service account", service_account, true)?;
        Ok(Self(Arc::new(Parts {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })))
    }

    pub fn trust_domain(&self) -> &str {
        &self.0.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.0.service_account
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::Scheme(s.to_string()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => Identity::new(td, ns, sa),
            _ => Err(IdentityError::Shape(s.to_string())),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.0.trust_domain, self.0.namespace, self.0.service_account
        )
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
    }

    #[test]
    fn rejects_malformed_identities() {
        let cases = [
            ("http://cluster.local/ns/a/sa/b", "scheme"),
            ("spiffe://cluster.local/ns/a", "shape"),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "shape"),
            ("spiffe://cluster.local/sa/a/ns/b", "shape"),
            ("spiffe:///ns/a/sa/b", "segment"),
            ("spiffe://Cluster.Local/ns/a/sa/b", "segment"),
            ("spiffe://td/ns//sa/b", "segment"),
            ("spiffe://td/ns/a b/sa/b", "segment"),
            ("spiffe://td/ns/../sa/b", "segment"),
            ("spiffe://td/ns/a/sa/b%2f", "segment"),
        ];
        for (input, kind) in cases {
            let err = input.parse::<Identity>().unwrap_err();
            let got = match err {
                IdentityError::Scheme(_) => "scheme",
                IdentityError::Shape(_) => "shape",
                IdentityError::Segment { .. } => "segment",
            };
            assert_eq!(got, kind, "{input}: {err}");
        }
        let long = "a".repeat(254);
        assert!(Identity::new("td", &long, "sa").is_err());
    }
}
