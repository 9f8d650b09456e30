//! The ambient CNI plugin: a chained CNI plugin that sets nothing up itself. On ADD it asks
//! the node agent to enroll the pod and returns only when the agent says the pod is protected
//! (redirection installed, ztunnel acknowledged) or not meant for the mesh, so no app
//! container ever starts unprotected and no init container is needed. It has no Kubernetes
//! client: the agent decides from its own view of the node's pods.
//!
//! The logic here is pure over its inputs (the `CNI_*` environment, stdin, an [`agent::Agent`])
//! so the spec conformance tests run without sockets; `main.rs` wires the real ones.
//!
//! Configuration fields (besides the spec's `cniVersion`, `name`, `type`, `prevResult`):
//!
//! | field | default | meaning |
//! |---|---|---|
//! | `cni_agent_run_dir` | `/var/run/istio-cni` | the agent's run dir, holding `pluginevent.sock` |
//! | `ambient_enabled` | `true` | `false` passes every pod through untouched |
//! | `exclude_namespaces` | `["kube-system"]` | pods in these namespaces pass through untouched (the installer adds the agent's own) |
//! | `plugin_log_level` | `warn` | `debug`, `info`, `warn`, `error` or `none`, to stderr |
//! | `agent_timeout_seconds` | `30` | how long ADD waits for the agent |

#![forbid(unsafe_code)]

pub mod agent;
mod config;
mod fuzz;
pub mod spec;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_contract::cni_event::{Event, IpNet, PodIp, SOCKET, path};
use serde_json::{Value, json};

pub use fuzz::fuzz_invocation;

use agent::{Agent, AgentError};
use config::{Config, Level, parse_config};
use spec::{CniError, LATEST, code};

/// The most stdin the plugin reads; more is a configuration error, not an allocation.
pub const MAX_STDIN: usize = 1 << 20;

/// What the process prints on stdout and its exit status.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub stdout: String,
    pub exit: i32,
    /// Lines for stderr (the runtime logs them), already filtered by level.
    pub log: Vec<String>,
}

/// The `CNI_*` environment, validated for one command.
#[derive(Debug)]
struct Env {
    container_id: String,
    netns: Option<String>,
    args: BTreeMap<String, String>,
}

fn env_error(var: &str, why: &str) -> CniError {
    CniError::new(
        code::INVALID_ENV,
        format!("invalid environment: {var} {why}"),
        var.to_string(),
    )
}

fn parse_env(env: &BTreeMap<String, String>, command: Command) -> Result<Env, CniError> {
    let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
    let container_id =
        get("CNI_CONTAINERID").ok_or_else(|| env_error("CNI_CONTAINERID", "is missing"))?;
    if !container_id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return Err(env_error(
            "CNI_CONTAINERID",
            "has characters outside [A-Za-z0-9_.-]",
        ));
    }
    get("CNI_IFNAME").ok_or_else(|| env_error("CNI_IFNAME", "is missing"))?;
    get("CNI_PATH").ok_or_else(|| env_error("CNI_PATH", "is missing"))?;
    let netns = get("CNI_NETNS");
    if netns.is_none() && command != Command::Del {
        return Err(env_error("CNI_NETNS", "is missing"));
    }
    let mut args = BTreeMap::new();
    if let Some(raw) = get("CNI_ARGS") {
        for pair in raw.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                env_error("CNI_ARGS", &format!("entry {pair:?} is not KEY=VALUE"))
            })?;
            args.insert(k.to_string(), v.to_string());
        }
    }
    Ok(Env {
        container_id,
        netns,
        args,
    })
}

struct Run<'a> {
    agent: &'a dyn Agent,
    log: Vec<String>,
    level: Level,
}

impl Run<'_> {
    fn log(&mut self, level: Level, msg: &str) {
        if level >= self.level && self.level != Level::None {
            self.log
                .push(format!("ambient-cni {:?}: {msg}", level).to_lowercase());
        }
    }
}

/// Runs one invocation: `env` is the process environment (only `CNI_*` matters), `stdin` the
/// network config.
pub fn run(env: &BTreeMap<String, String>, stdin: &[u8], agent: &dyn Agent) -> Output {
    let mut r = Run {
        agent,
        log: Vec::new(),
        level: Level::Warn,
    };
    // Errors are reported in the config's version when it is known and supported.
    let version = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .filter(|v| spec::supported(v))
        .unwrap_or_else(|| LATEST.to_string());
    match dispatch(&mut r, env, stdin) {
        Ok(stdout) => Output {
            stdout,
            exit: 0,
            log: r.log,
        },
        Err(e) => {
            r.log(Level::Error, &format!("{}: {}", e.msg, e.details));
            Output {
                stdout: e.to_json(&version).to_string(),
                exit: 1,
                log: r.log,
            }
        }
    }
}

/// `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl std::str::FromStr for Command {
    type Err = CniError;

    fn from_str(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(env_error(
                    "CNI_COMMAND",
                    &format!("{other:?} is not ADD, DEL, CHECK, VERSION, STATUS or GC"),
                ));
            }
        })
    }
}

impl Command {
    fn name(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }
}

fn dispatch(
    r: &mut Run<'_>,
    env: &BTreeMap<String, String>,
    stdin: &[u8],
) -> Result<String, CniError> {
    let command: Command = env
        .get("CNI_COMMAND")
        .filter(|c| !c.is_empty())
        .ok_or_else(|| env_error("CNI_COMMAND", "is missing"))?
        .parse()?;
    if command == Command::Version {
        let requested = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| {
                v.get("cniVersion")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .filter(|v| spec::supported(v))
            .unwrap_or_else(|| LATEST.into());
        return Ok(
            json!({ "cniVersion": requested, "supportedVersions": spec::SUPPORTED }).to_string(),
        );
    }
    let config = parse_config(stdin)?;
    r.level = config.level;
    match command {
        Command::Status | Command::Gc if config.cni_version != "1.1.0" => Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{} needs CNI 1.1.0, the config says {}",
                command.name(),
                config.cni_version
            ),
            "",
        )),
        Command::Check if config.cni_version.starts_with("0.3.") => Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CHECK needs CNI 0.4.0 or later, the config says {}",
                config.cni_version
            ),
            "",
        )),
        Command::Version => unreachable!("answered above"),
        Command::Status => status(r, &config).map(|()| String::new()),
        Command::Gc => gc(r, &config).map(|()| String::new()),
        Command::Add => add(r, &config, &parse_env(env, command)?),
        Command::Del => {
            del(r, &config, &parse_env(env, command)?);
            Ok(String::new())
        }
        Command::Check => check(r, &config, &parse_env(env, command)?).map(|()| String::new()),
    }
}

fn socket(config: &Config) -> PathBuf {
    config.run_dir.join(SOCKET)
}

/// What the agent said, as a spec error when it is not a yes.
fn agent_failure(config: &Config, e: AgentError) -> CniError {
    match e {
        AgentError::NotRunning { socket, why } => CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "the ambient node agent is not running on this node ({}: {why})",
                socket.display()
            ),
            "start the node agent (the node-agent DaemonSet pod) on this node; pods in the mesh \
             cannot start unprotected. To start pods without the mesh, set ambient_enabled: false \
             or list the namespace in exclude_namespaces in the CNI config",
        ),
        AgentError::Timeout { socket, after } => CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "the ambient node agent did not answer within {}s ({})",
                after.as_secs(),
                socket.display()
            ),
            format!(
                "raise agent_timeout_seconds (now {}) if enrollment is slow; check the node agent's log",
                config.timeout.as_secs()
            ),
        ),
        AgentError::Garbled(why) => CniError::new(
            code::TRY_AGAIN_LATER,
            "the ambient node agent answered garbage",
            why,
        ),
        AgentError::Io(e) => CniError::new(
            code::IO_FAILURE,
            "talking to the ambient node agent failed",
            e.to_string(),
        ),
    }
}

/// Mask bytes for a prefix length, base64-encoded (the shape of Go's `net.IPMask` in JSON,
/// which Istio's agent expects).
fn mask_b64(v6: bool, prefix: u8) -> String {
    let len = if v6 { 16 } else { 4 };
    let mut bytes = vec![0u8; len];
    for (i, b) in bytes.iter_mut().enumerate() {
        let bits = (prefix as usize).saturating_sub(i * 8).min(8);
        *b = if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
    }
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        out.extend(std::iter::repeat_n('=', 3 - chunk.len()));
    }
    out
}

/// The pod's addresses from the previous plugin's result.
fn pod_ips(prev: &Value) -> Result<Vec<PodIp>, CniError> {
    let interfaces = prev["interfaces"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    for (i, ip) in prev["ips"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let Some(addr) = ip["address"].as_str() else {
            return Err(CniError::new(
                code::DECODE_FAILURE,
                format!("prevResult.ips[{i}].address is missing"),
                ip.to_string(),
            ));
        };
        let (host, prefix) = addr.split_once('/').unwrap_or((addr, ""));
        let parsed: IpAddr = host.parse().map_err(|_| {
            CniError::new(
                code::DECODE_FAILURE,
                format!("prevResult.ips[{i}].address is not an IP"),
                addr.to_string(),
            )
        })?;
        let max = if parsed.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = if prefix.is_empty() {
            max
        } else {
            prefix.parse().ok().filter(|p| *p <= max).ok_or_else(|| {
                CniError::new(
                    code::DECODE_FAILURE,
                    format!("prevResult.ips[{i}].address has a bad prefix"),
                    addr.to_string(),
                )
            })?
        };
        let interface = ip["interface"]
            .as_u64()
            .and_then(|n| interfaces.get(n as usize))
            .and_then(|i| i["name"].as_str())
            .unwrap_or("eth0");
        out.push(PodIp {
            interface: interface.to_string(),
            address: IpNet {
                ip: parsed.to_string(),
                mask: mask_b64(parsed.is_ipv6(), prefix),
            },
            gateway: ip["gateway"].as_str().unwrap_or_default().to_string(),
        });
    }
    Ok(out)
}

fn add(r: &mut Run<'_>, config: &Config, env: &Env) -> Result<String, CniError> {
    let prev = config.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "invalid network config: no prevResult; the ambient plugin must be chained after the plugin that sets up the pod's network",
            "",
        )
    })?;
    let source_version = prev["cniVersion"]
        .as_str()
        .unwrap_or(&config.cni_version)
        .to_string();
    if !spec::supported(&source_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("prevResult has unsupported version {source_version}"),
            format!("supported: {}", spec::SUPPORTED.join(", ")),
        ));
    }
    let out = spec::convert_result(prev, &config.cni_version)?.to_string();
    let namespace = env
        .args
        .get("K8S_POD_NAMESPACE")
        .cloned()
        .unwrap_or_default();
    let name = env.args.get("K8S_POD_NAME").cloned().unwrap_or_default();
    if !config.enabled {
        r.log(
            Level::Debug,
            &format!("{namespace}/{name}: ambient disabled in the CNI config"),
        );
        return Ok(out);
    }
    if config.exclude.contains(&namespace) {
        r.log(
            Level::Debug,
            &format!("{namespace}/{name}: namespace excluded"),
        );
        return Ok(out);
    }
    if name.is_empty() {
        return Err(env_error("CNI_ARGS", "has no K8S_POD_NAME"));
    }
    let request = Event {
        netns: env.netns.clone(),
        pod_name: Some(name.clone()),
        pod_namespace: Some(namespace.clone()),
        pod_uid: env.args.get("K8S_POD_UID").cloned(),
        container_id: Some(env.container_id.clone()),
        ips: pod_ips(prev)?,
        ..Event::default()
    };
    let reply = r
        .agent
        .call(
            &socket(config),
            "POST",
            path::ADD,
            Some(&request),
            config.timeout,
        )
        .map_err(|e| agent_failure(config, e))?;
    let answer = reply.answer();
    let reason = answer.why().to_string();
    match reply.status {
        200 => {
            let enrolled = answer.enrolled.unwrap_or(true);
            r.log(
                Level::Info,
                &format!(
                    "{namespace}/{name}: {}",
                    if enrolled {
                        "enrolled"
                    } else {
                        "not in the mesh"
                    }
                ),
            );
            Ok(out)
        }
        400 => Err(CniError::new(
            code::INVALID_CONFIG,
            format!("the node agent rejected the request: {reason}"),
            serde_json::to_string(&request).unwrap_or_default(),
        )),
        status => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "the ambient node agent could not enroll {namespace}/{name}: {}",
                if reason.is_empty() {
                    format!("HTTP {status}")
                } else {
                    reason
                }
            ),
            "the runtime will retry; the node agent's log and /pods endpoint say which step is waiting",
        )),
    }
}

fn del(r: &mut Run<'_>, config: &Config, env: &Env) {
    // Never fails: the sandbox is going away whether or not the agent is there to hear it.
    let request = Event {
        container_id: Some(env.container_id.clone()),
        netns: env.netns.clone(),
        pod_name: env.args.get("K8S_POD_NAME").cloned(),
        pod_namespace: env.args.get("K8S_POD_NAMESPACE").cloned(),
        ..Event::default()
    };
    if let Err(e) = r.agent.call(
        &socket(config),
        "POST",
        path::DEL,
        Some(&request),
        Duration::from_secs(5),
    ) {
        r.log(
            Level::Info,
            &format!(
                "DEL not delivered to the node agent: {}",
                agent_failure(config, e)
            ),
        );
    }
}

fn check(r: &mut Run<'_>, config: &Config, env: &Env) -> Result<(), CniError> {
    config.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "invalid network config: CHECK needs a prevResult",
            "",
        )
    })?;
    let namespace = env
        .args
        .get("K8S_POD_NAMESPACE")
        .cloned()
        .unwrap_or_default();
    if !config.enabled || config.exclude.contains(&namespace) {
        return Ok(());
    }
    let request = Event {
        container_id: Some(env.container_id.clone()),
        netns: env.netns.clone(),
        pod_name: env.args.get("K8S_POD_NAME").cloned(),
        pod_namespace: Some(namespace),
        ..Event::default()
    };
    let reply = r
        .agent
        .call(
            &socket(config),
            "POST",
            path::CHECK,
            Some(&request),
            config.timeout,
        )
        .map_err(|e| agent_failure(config, e))?;
    match reply.status {
        200 => Ok(()),
        409 => Err(CniError::new(
            code::REDIRECTION_MISSING,
            "the pod is in the mesh but its traffic redirection is missing",
            reply.answer().why(),
        )),
        status => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!("the node agent answered HTTP {status}"),
            reply.body.to_string(),
        )),
    }
}

/// GC: the agent forgets every sandbox it enrolled that is not among the valid attachments
/// (as if its DEL had come). Without the list there is nothing to compare against, so
/// nothing is collected.
fn gc(r: &mut Run<'_>, config: &Config) -> Result<(), CniError> {
    let Some(valid) = &config.valid_attachments else {
        return Ok(());
    };
    let reply = r
        .agent
        .call(
            &socket(config),
            "POST",
            path::GC,
            Some(&Event {
                valid_container_ids: Some(valid.clone()),
                ..Event::default()
            }),
            config.timeout,
        )
        .map_err(|e| agent_failure(config, e))?;
    if reply.status == 200 {
        Ok(())
    } else {
        Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "the ambient node agent refused GC: {}",
                reply.answer().why()
            ),
            "",
        ))
    }
}

fn status(r: &mut Run<'_>, config: &Config) -> Result<(), CniError> {
    if !config.enabled {
        return Ok(());
    }
    let reply = r
        .agent
        .call(
            &socket(config),
            "GET",
            path::READY,
            None,
            Duration::from_secs(5),
        )
        .map_err(|e| {
            CniError::new(
                code::NOT_AVAILABLE,
                agent_failure(config, e).msg,
                "new pods cannot be enrolled",
            )
        })?;
    if reply.status == 200 {
        Ok(())
    } else {
        Err(CniError::new(
            code::NOT_AVAILABLE,
            format!(
                "the ambient node agent is not ready: {}",
                reply.body.as_str().unwrap_or_default().trim()
            ),
            "new pods cannot be enrolled until it is",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_encode_like_go() {
        assert_eq!(mask_b64(false, 16), "//8AAA==");
        assert_eq!(mask_b64(false, 24), "////AA==");
        assert_eq!(mask_b64(false, 32), "/////w==");
        assert_eq!(mask_b64(false, 0), "AAAAAA==");
        assert_eq!(mask_b64(true, 64), "//////////8AAAAAAAAAAA==");
    }
}
