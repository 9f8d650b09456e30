//! The manifests as the tests see them: objects loaded from YAML, each container of a
//! DaemonSet or Job with its pod, and its settings parsed by the binary's own config struct.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Container, PodSpec, Volume, VolumeMount};
use serde::Deserialize;
use serde_json::Value;

use super::{DIR, NAMESPACE, NOT_FLAGS};

#[derive(Debug, Clone)]
pub struct Object {
    pub file: String,
    pub value: Value,
}

impl Object {
    pub fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }

    pub fn typed<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_value(self.value.clone())
            .unwrap_or_else(|e| panic!("{} {}/{}: {e}", self.file, self.kind(), self.name()))
    }
}

pub fn load(file: &str) -> Vec<Object> {
    let text = std::fs::read_to_string(Path::new(DIR).join(file))
        .unwrap_or_else(|e| panic!("daemonset/{file}: {e}"));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Object {
            file: file.to_string(),
            value: Value::deserialize(doc).unwrap_or_else(|e| panic!("daemonset/{file}: {e}")),
        })
        .filter(|o| !o.value.is_null())
        .collect()
}

pub fn load_all(files: &[&str]) -> Vec<Object> {
    files.iter().flat_map(|f| load(f)).collect()
}

/// A container of a DaemonSet or Job with its pod.
#[derive(Debug, Clone)]
pub struct Workload {
    pub file: String,
    pub kind: String,
    pub name: String,
    pub pod: PodSpec,
    pub container: Container,
}

impl Workload {
    pub fn what(&self) -> String {
        format!(
            "daemonset/{} {}/{} container {}",
            self.file, self.kind, self.name, self.container.name
        )
    }

    /// (binary, subcommand) from the container's command.
    pub fn program(&self) -> (String, String) {
        let command = self.container.command.clone().unwrap_or_default();
        let binary = command.first().map(|c| {
            Path::new(c)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        });
        match (binary, command.get(1)) {
            (Some(b), Some(s)) => (b, s.clone()),
            _ => panic!("{}: command must be [binary, subcommand]", self.what()),
        }
    }

    /// Environment as the container would see it, with field references resolved the way the
    /// kubelet would on a node called `node-1`.
    pub fn env(&self) -> Vec<(String, String)> {
        self.container
            .env
            .iter()
            .flatten()
            .map(|e| {
                let value = match (&e.value, &e.value_from) {
                    (Some(v), None) => v.clone(),
                    (None, Some(from)) => {
                        match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                            Some("spec.nodeName") => "node-1".into(),
                            Some("metadata.namespace") => NAMESPACE.into(),
                            Some("metadata.name") => "ztunnel-x7k2p".into(),
                            Some("status.podIP") => "10.244.1.9".into(),
                            other => panic!("{}: {} comes from {other:?}", self.what(), e.name),
                        }
                    }
                    _ => panic!("{}: {} has no value", self.what(), e.name),
                };
                (e.name.clone(), value)
            })
            .collect()
    }

    /// The mount holding container path `path` (the longest mountPath above it) and its
    /// volume.
    pub fn mount_for(&self, path: &Path) -> (&VolumeMount, &Volume) {
        let mount = self
            .container
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| path.starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("{}: nothing mounted at {}", self.what(), path.display()));
        let volume = self
            .pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap_or_else(|| panic!("{}: no volume {}", self.what(), mount.name));
        (mount, volume)
    }

    /// Where container path `path` is on the host, when it is on a hostPath volume.
    pub fn host_path(&self, path: &Path) -> Option<PathBuf> {
        let (mount, volume) = self.mount_for(path);
        let host = volume.host_path.as_ref()?;
        let rest = path
            .strip_prefix(&mount.mount_path)
            .expect("under the mount");
        Some(if rest.as_os_str().is_empty() {
            PathBuf::from(&host.path)
        } else {
            Path::new(&host.path).join(rest)
        })
    }
}

pub fn workloads(objects: &[Object]) -> Vec<Workload> {
    let mut out = Vec::new();
    for o in objects {
        let pod = match o.kind() {
            "DaemonSet" => o.typed::<DaemonSet>().spec.and_then(|s| s.template.spec),
            "Job" => o.typed::<Job>().spec.and_then(|s| s.template.spec),
            _ => continue,
        }
        .unwrap_or_else(|| panic!("{} {}: no pod spec", o.file, o.name()));
        for container in pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten())
        {
            out.push(Workload {
                file: o.file.clone(),
                kind: o.kind().to_string(),
                name: o.name().to_string(),
                pod: pod.clone(),
                container: container.clone(),
            });
        }
    }
    out
}

#[derive(Debug, clap::Parser)]
pub struct ZtunnelRun {
    #[command(flatten)]
    pub config: ztunnel::config::Config,
}

#[derive(Debug, clap::Parser)]
pub struct AgentRun {
    #[command(flatten)]
    pub config: node_agent::config::Config,
}

#[derive(Debug, clap::Parser)]
pub struct AgentUninstall {
    #[command(flatten)]
    pub cni: node_agent::config::CniInstall,
}

/// A container's settings, parsed by the binary's own config struct.
#[derive(Debug)]
pub enum Program {
    Ztunnel(Box<ztunnel::config::Config>),
    Agent(Box<node_agent::config::Config>),
    Uninstall(node_agent::config::CniInstall),
}

/// Every env name of `P`'s flags.
pub fn env_names<P: CommandFactory>() -> BTreeSet<String> {
    P::command()
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect()
}

/// A flag's default value, as clap will fill it in.
pub fn default_of<P: CommandFactory>(long: &str) -> String {
    let cmd = P::command();
    let arg = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .unwrap_or_else(|| panic!("no flag --{long}"));
    arg.get_default_values()
        .iter()
        .map(|v| v.to_string_lossy())
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses `env` plus `args` the way the binary would, without reading this process's own
/// environment: each variable becomes the flag it stands for.
fn parse<P: clap::Parser>(env: &[(String, String)], args: &[String]) -> Result<P, String> {
    let mut argv = vec!["test".to_string()];
    let cmd = P::command();
    for (name, value) in env {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
            .ok_or_else(|| format!("{name} is not the env of any flag"))?;
        let long = arg
            .get_long()
            .ok_or_else(|| format!("{name}: flag without --long"))?;
        if arg.get_action().takes_values() {
            argv.push(format!("--{long}={value}"));
        } else {
            // clap's reading of a boolean flag's variable: falsey words and empty are false.
            let falsey = ["", "n", "no", "f", "false", "off", "0"];
            if !falsey.contains(&value.to_ascii_lowercase().as_str()) {
                argv.push(format!("--{long}"));
            }
        }
    }
    argv.extend(args.iter().cloned());
    let cmd = cmd.mut_args(|a| a.env(None::<&'static str>));
    let matches = cmd.try_get_matches_from(&argv).map_err(|e| e.to_string())?;
    P::from_arg_matches(&matches).map_err(|e| e.to_string())
}

impl Workload {
    /// The container's settings through the binary's own parser; env names that are not
    /// flags of that binary (apart from [`NOT_FLAGS`]) are errors.
    pub fn parsed(&self) -> Program {
        let (binary, sub) = self.program();
        let env: Vec<(String, String)> = self
            .env()
            .into_iter()
            .filter(|(name, _)| {
                !NOT_FLAGS
                    .iter()
                    .any(|(b, n, _, _)| *b == binary && n == name)
            })
            .collect();
        let mut args: Vec<String> =
            self.container.command.clone().unwrap_or_default()[2..].to_vec();
        args.extend(self.container.args.clone().unwrap_or_default());
        let parsed = match (binary.as_str(), sub.as_str()) {
            ("ztunnel", "run") => {
                parse::<ZtunnelRun>(&env, &args).map(|p| Program::Ztunnel(Box::new(p.config)))
            }
            ("node-agent", "run") => {
                parse::<AgentRun>(&env, &args).map(|p| Program::Agent(Box::new(p.config)))
            }
            ("node-agent", "uninstall-cni") => {
                parse::<AgentUninstall>(&env, &args).map(|p| Program::Uninstall(p.cni))
            }
            other => panic!("{}: unknown program {other:?}", self.what()),
        };
        parsed.unwrap_or_else(|e| panic!("{}: {e}", self.what()))
    }
}
