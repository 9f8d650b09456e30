//! CNI spec facts: versions, error codes, and converting results between versions.

use serde_json::{Value, json};

/// Versions this plugin speaks, oldest first.
pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest supported version, used when the request names none we know.
pub const LATEST: &str = "1.1.0";

/// Error codes from the CNI spec (and ours from 100 up).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot currently handle ADDs.
    pub const NOT_AVAILABLE: u32 = 50;
    /// CHECK: the pod should be in the mesh but its redirection is not in place.
    pub const REDIRECTION_MISSING: u32 = 100;
}

/// A spec error object; `Display` is the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON the spec asks for on stdout.
    pub fn to_json(&self, version: &str) -> Value {
        json!({ "cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details })
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

pub fn supported(version: &str) -> bool {
    SUPPORTED.contains(&version)
}

/// Whether results of `version` carry a per-IP `"version"` field (before 1.0.0).
fn ips_have_version(version: &str) -> bool {
    version.starts_with("0.")
}

/// Converts a result (e.g. a `prevResult`) to `target`. Fields that both versions share are
/// kept as they are; each IP gains or loses the pre-1.0 `"version"` field.
pub fn convert_result(result: &Value, target: &str) -> Result<Value, CniError> {
    let Some(obj) = result.as_object() else {
        return Err(CniError::new(
            code::DECODE_FAILURE,
            "prevResult is not an object",
            result.to_string(),
        ));
    };
    let mut out = obj.clone();
    out.insert("cniVersion".into(), json!(target));
    if let Some(ips) = out.get_mut("ips") {
        let Some(list) = ips.as_array_mut() else {
            return Err(CniError::new(
                code::DECODE_FAILURE,
                "prevResult.ips is not a list",
                ips.to_string(),
            ));
        };
        for (i, ip) in list.iter_mut().enumerate() {
            let Some(entry) = ip.as_object_mut() else {
                return Err(CniError::new(
                    code::DECODE_FAILURE,
                    format!("prevResult.ips[{i}] is not an object"),
                    ip.to_string(),
                ));
            };
            if ips_have_version(target) {
                let addr = entry
                    .get("address")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let family = if addr.contains(':') { "6" } else { "4" };
                entry.insert("version".into(), json!(family));
            } else {
                entry.remove("version");
            }
        }
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/run/netns/x"}],
            "ips": [{"address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 0},
                    {"address": "fd00::5/64", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.1.0.1"]}
        })
    }

    #[test]
    fn conversion_round_trips_between_every_pair_of_versions() {
        for from in SUPPORTED {
            let start = convert_result(&v1(), from).unwrap();
            for to in SUPPORTED {
                let converted = convert_result(&start, to).unwrap();
                assert_eq!(converted["cniVersion"], to);
                let ip0 = &converted["ips"][0];
                let ip1 = &converted["ips"][1];
                if to.starts_with("0.") {
                    assert_eq!(
                        (ip0["version"].as_str(), ip1["version"].as_str()),
                        (Some("4"), Some("6"))
                    );
                } else {
                    assert!(ip0.get("version").is_none());
                }
                // Everything else survives untouched.
                assert_eq!(converted["interfaces"], v1()["interfaces"]);
                assert_eq!(converted["routes"], v1()["routes"]);
                assert_eq!(converted["dns"], v1()["dns"]);
                assert_eq!(ip0["gateway"], "10.1.0.1");
                let back = convert_result(&converted, "1.0.0").unwrap();
                assert_eq!(back, v1(), "{from} -> {to} -> 1.0.0");
            }
        }
    }

    #[test]
    fn malformed_results_are_decode_errors() {
        for bad in [json!([]), json!({"ips": 3}), json!({"ips": [1]})] {
            assert_eq!(
                convert_result(&bad, "1.0.0").unwrap_err().code,
                code::DECODE_FAILURE
            );
        }
    }
}
