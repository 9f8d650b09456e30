//! The plugin's network config from stdin: a serde struct for what is written, checked into
//! the [`Config`] the commands use. A field of the wrong type is reported with its name,
//! what it must be and the value found there (serde_path_to_error finds the field).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::MAX_STDIN;
use crate::spec::{self, CniError, code};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Level {
    Debug,
    Info,
    Warn,
    Error,
    None,
}

/// The plugin's configuration, from stdin.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) cni_version: String,
    pub(crate) run_dir: PathBuf,
    pub(crate) enabled: bool,
    pub(crate) exclude: Vec<String>,
    pub(crate) level: Level,
    pub(crate) timeout: Duration,
    pub(crate) prev_result: Option<Value>,
    /// GC's `cni.dev/valid-attachments`: the sandbox container ids still attached.
    pub(crate) valid_attachments: Option<Vec<String>>,
}

/// The network config as it is written. Fields this plugin does not know are the runtime's
/// or other plugins' and are ignored; `null` means absent, as in Go's decoder.
#[derive(Debug, serde::Deserialize)]
struct RawConfig {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    cni_agent_run_dir: Option<PathBuf>,
    ambient_enabled: Option<bool>,
    exclude_namespaces: Option<Vec<String>>,
    plugin_log_level: Option<Level>,
    agent_timeout_seconds: Option<u64>,
    #[serde(rename = "prevResult")]
    prev_result: Option<serde_json::Map<String, Value>>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Debug, serde::Deserialize)]
struct Attachment {
    #[serde(rename = "containerID")]
    container_id: String,
}

/// What each field must be, in the words of the error the runtime shows.
fn expected(field: &str) -> &'static str {
    match field {
        "ambient_enabled" => "a boolean",
        "exclude_namespaces" => "a list of strings",
        "plugin_log_level" => "debug, info, warn, error or none",
        "agent_timeout_seconds" => "a whole number of seconds from 1 to 600",
        "prevResult" => "an object",
        "cni.dev/valid-attachments" => "a list of {containerID, ifname} objects",
        _ => "a string",
    }
}

fn field_error(field: &str, got: &Value) -> CniError {
    CniError::new(
        code::INVALID_CONFIG,
        format!(
            "invalid network config: {field} must be {}",
            expected(field)
        ),
        format!("{field} = {got}"),
    )
}

/// The config's field a decoding error is in, and the value found there (the list item, for
/// an item of a list).
fn failing_field(v: &Value, path: &serde_path_to_error::Path) -> (String, Value) {
    use serde_path_to_error::Segment;
    let mut segments = path.iter();
    let field = match segments.next() {
        Some(Segment::Map { key }) => key.clone(),
        _ => return ("config".into(), v.clone()),
    };
    let mut at = &v[field.as_str()];
    for s in segments {
        at = match s {
            Segment::Seq { index } => &at[*index],
            Segment::Map { key } => &at[key.as_str()],
            _ => break,
        };
    }
    (field, at.clone())
}

pub(crate) fn parse_config(stdin: &[u8]) -> Result<Config, CniError> {
    if stdin.len() > MAX_STDIN {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "invalid network config: larger than 1 MiB",
            format!("{} bytes on stdin", stdin.len()),
        ));
    }
    let v: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE_FAILURE,
            "cannot decode the network config on stdin as JSON",
            e.to_string(),
        )
    })?;
    if !v.is_object() {
        return Err(CniError::new(
            code::DECODE_FAILURE,
            "the network config is not a JSON object",
            v.to_string(),
        ));
    }
    // An unknown version is reported as such, whatever else the config holds.
    let incompatible = |version: &str| {
        CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("incompatible CNI version {version}"),
            format!("supported: {}", spec::SUPPORTED.join(", ")),
        )
    };
    if let Some(version) = v["cniVersion"].as_str()
        && !spec::supported(version)
    {
        return Err(incompatible(version));
    }
    let raw: RawConfig = serde_path_to_error::deserialize(&v).map_err(|e| {
        let (field, got) = failing_field(&v, e.path());
        field_error(&field, &got)
    })?;
    let missing = |field: &str| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("invalid network config: {field} is missing"),
            "",
        )
    };
    let cni_version = raw.cni_version.ok_or_else(|| missing("cniVersion"))?;
    raw.kind.ok_or_else(|| missing("type"))?;
    let timeout = match raw.agent_timeout_seconds {
        None => Duration::from_secs(30),
        Some(s) if (1..=600).contains(&s) => Duration::from_secs(s),
        Some(s) => return Err(field_error("agent_timeout_seconds", &json!(s))),
    };
    let valid_attachments = match raw.valid_attachments {
        None => None,
        Some(list) => Some(
            list.into_iter()
                .enumerate()
                .map(|(i, a)| {
                    if a.container_id.is_empty() {
                        Err(field_error(
                            "cni.dev/valid-attachments",
                            &v["cni.dev/valid-attachments"][i],
                        ))
                    } else {
                        Ok(a.container_id)
                    }
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    Ok(Config {
        cni_version,
        run_dir: raw
            .cni_agent_run_dir
            .unwrap_or_else(|| mesh_contract::paths::AGENT_RUN_DIR.into()),
        enabled: raw.ambient_enabled.unwrap_or(true),
        exclude: raw
            .exclude_namespaces
            .unwrap_or_else(|| vec!["kube-system".to_string()]),
        level: raw.plugin_log_level.unwrap_or(Level::Warn),
        timeout,
        prev_result: raw.prev_result.map(Value::Object),
        valid_attachments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_the_field_what_it_must_be_and_what_was_there() {
        let base = r#""cniVersion":"1.1.0","type":"ambient-cni""#;
        for (extra, msg, details) in [
            (
                r#""ambient_enabled":"yes""#,
                "ambient_enabled must be a boolean",
                r#"ambient_enabled = "yes""#,
            ),
            (
                r#""exclude_namespaces":["a",7]"#,
                "exclude_namespaces must be a list of strings",
                "exclude_namespaces = 7",
            ),
            (
                r#""plugin_log_level":"loud""#,
                "plugin_log_level must be debug, info, warn, error or none",
                r#"plugin_log_level = "loud""#,
            ),
            (
                r#""agent_timeout_seconds":601"#,
                "agent_timeout_seconds must be a whole number of seconds from 1 to 600",
                "agent_timeout_seconds = 601",
            ),
            (
                r#""agent_timeout_seconds":1.5"#,
                "agent_timeout_seconds must be a whole number",
                "agent_timeout_seconds = 1.5",
            ),
            (
                r#""cni.dev/valid-attachments":[{"containerID":"a"},{"ifname":"eth0"}]"#,
                "cni.dev/valid-attachments must be a list of {containerID, ifname} objects",
                r#"cni.dev/valid-attachments = {"ifname":"eth0"}"#,
            ),
            (
                r#""cni.dev/valid-attachments":[{"containerID":""}]"#,
                "cni.dev/valid-attachments must be",
                r#"cni.dev/valid-attachments = {"containerID":""}"#,
            ),
            (
                r#""cni_agent_run_dir":["/run"]"#,
                "cni_agent_run_dir must be a string",
                r#"cni_agent_run_dir = ["/run"]"#,
            ),
        ] {
            let stdin = format!("{{{base},{extra}}}");
            let e = parse_config(stdin.as_bytes()).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{extra}");
            assert!(e.msg.contains(msg), "{extra}: {}", e.msg);
            assert_eq!(e.details, details, "{extra}");
        }
        // Fields of other plugins and nulls are fine; defaults fill in.
        let c = parse_config(
            br#"{"cniVersion":"1.0.0","type":"t","name":"n","ipam":{},"ambient_enabled":null}"#,
        )
        .unwrap();
        assert!(c.enabled && c.exclude == ["kube-system"] && c.level == Level::Warn);
        assert_eq!(c.timeout, Duration::from_secs(30));
        // An unknown version is said to be one, even beside a bad field.
        let e =
            parse_config(br#"{"cniVersion":"9.9.9","type":"t","ambient_enabled":1}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
    }
}
