//! The CNI plugin's requests to the node agent and the agent's answers (SPEC §4): JSON bodies
//! over HTTP/1.1 on `<run dir>/pluginevent.sock`, with Istio's field names so either side can
//! be Istio's. Both programs serialize and parse these types; neither writes the JSON by hand.

use serde::{Deserialize, Serialize};

/// The socket's file name in the agent's run directory.
pub const SOCKET: &str = "pluginevent.sock";

/// The request paths.
pub mod path {
    /// Enroll the pod; answered once it is enrolled (or is not meant for the mesh).
    pub const ADD: &str = "/cmdadd";
    /// Is the pod's redirection intact?
    pub const CHECK: &str = "/cmdcheck";
    /// The sandbox is gone; answered once nothing of ours is left in it.
    pub const DEL: &str = "/cmddel";
    /// Every sandbox not listed is gone.
    pub const GC: &str = "/cmdgc";
    /// Can the agent enroll pods now (`GET`)?
    pub const READY: &str = "/readyz";
}

/// The body of every `POST`. ADD sends the pod fields and its addresses, CHECK and DEL the
/// pod fields, GC only [`Event::valid_container_ids`]. Absent fields are left out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Event {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, rename = "PodUID", skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(
        default,
        rename = "ContainerID",
        skip_serializing_if = "Option::is_none"
    )]
    pub container_id: Option<String>,
    #[serde(default, rename = "IPs", skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<PodIp>,
    #[serde(
        default,
        rename = "ValidContainerIDs",
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_container_ids: Option<Vec<String>>,
}

/// One of the pod's addresses, as the chained plugins configured it (Go's `net.IPNet` shape).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PodIp {
    #[serde(default)]
    pub interface: String,
    pub address: IpNet,
    #[serde(default)]
    pub gateway: String,
}

/// An address and its mask (base64 of the mask bytes, as Go encodes `net.IPMask`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpNet {
    #[serde(rename = "IP")]
    pub ip: String,
    #[serde(rename = "Mask", default)]
    pub mask: String,
}

/// The agent's answer. Which fields are set depends on the request and the status:
///
/// | request | status | fields |
/// |---|---|---|
/// | ADD, CHECK | 200 | `enrolled`, and `reason` when it is false (not meant for the mesh) |
/// | CHECK | 409 | `reason`: what is missing |
/// | GC | 200 | `removed` |
/// | any | 4xx, 5xx | `error` |
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Answer {
    pub fn enrolled() -> Self {
        Self {
            enrolled: Some(true),
            ..Self::default()
        }
    }

    pub fn not_in_mesh(reason: impl Into<String>) -> Self {
        Self {
            enrolled: Some(false),
            reason: Some(reason.into()),
            ..Self::default()
        }
    }

    pub fn missing(reason: impl Into<String>) -> Self {
        Self {
            reason: Some(reason.into()),
            ..Self::default()
        }
    }

    pub fn error(error: impl Into<String>) -> Self {
        Self {
            error: Some(error.into()),
            ..Self::default()
        }
    }

    /// What the agent said about a failure: its reason or error, or "" if neither.
    pub fn why(&self) -> &str {
        self.reason
            .as_deref()
            .or(self.error.as_deref())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_field_names_round_trip_and_absent_fields_are_left_out() {
        let add = Event {
            netns: Some("/var/run/netns/cni-1".into()),
            pod_name: Some("web".into()),
            pod_namespace: Some("shop".into()),
            pod_uid: Some("u-1".into()),
            container_id: Some("c1".into()),
            ips: vec![PodIp {
                interface: "eth0".into(),
                address: IpNet {
                    ip: "198.18.0.5".into(),
                    mask: "////AA==".into(),
                },
                gateway: "198.18.0.1".into(),
            }],
            valid_container_ids: None,
        };
        let text = serde_json::to_string(&add).unwrap();
        assert_eq!(
            text,
            r#"{"Netns":"/var/run/netns/cni-1","PodName":"web","PodNamespace":"shop","PodUID":"u-1","ContainerID":"c1","IPs":[{"Interface":"eth0","Address":{"IP":"198.18.0.5","Mask":"////AA=="},"Gateway":"198.18.0.1"}]}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), add);
        let gc = Event {
            valid_container_ids: Some(vec!["c1".into()]),
            ..Event::default()
        };
        assert_eq!(
            serde_json::to_string(&gc).unwrap(),
            r#"{"ValidContainerIDs":["c1"]}"#
        );
        assert_eq!(
            serde_json::to_string(&Answer::enrolled()).unwrap(),
            r#"{"enrolled":true}"#
        );
        assert_eq!(Answer::error("x").why(), "x");
    }
}
