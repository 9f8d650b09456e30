//! Installing the CNI plugin on the host: its binary into the CNI bin dir, its entry into the
//! configuration kubelet uses.
//!
//! The configuration kubelet uses is the first valid file in the conf dir in lexical order
//! (`*.conf`, `*.conflist`, `*.json`, as libcni lists them). Our entry is appended to that
//! file's `plugins` (a `.conf` is wrapped into a `.conflist` of the same stem, which replaces
//! it), keeping the file's mode, never twice. The installer then keeps watching: when another
//! component rewrites the file or a new file takes precedence, the entry is put back. With no
//! valid config yet it waits and says so in logs and readiness, because a chained plugin alone
//! cannot give a pod a network. Uninstall removes the entry and the binary; an agent stopping
//! (upgrade, reboot) leaves both, so new pods stay blocked rather than start unprotected.
//!
//! Deciding what the files should contain is pure ([`primary`], [`with_entry`],
//! [`without_entry`]); writing them is atomic (temp file + rename in the same directory).

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};

/// The plugin's `type` (and binary name).
pub const PLUGIN_TYPE: &str = "ambient-cni";

/// Why installing failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A config file that kubelet could use.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub file: String,
    pub config: Value,
    pub is_list: bool,
}

fn valid(file: &str, text: &str) -> Option<Candidate> {
    let config: Value = serde_json::from_str(text).ok()?;
    let obj = config.as_object()?;
    let is_list = file.ends_with(".conflist");
    if is_list {
        let plugins = obj.get("plugins")?.as_array()?;
        if plugins.is_empty()
            || !plugins.iter().all(|p| {
                p.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| !t.is_empty())
            })
        {
            return None;
        }
    } else if obj
        .get("type")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return None;
    }
    Some(Candidate {
        file: file.to_string(),
        config,
        is_list,
    })
}

/// The file kubelet would use among `(name, contents)`, with the reason for each file skipped.
pub fn primary(files: &[(String, String)]) -> (Option<Candidate>, Vec<String>) {
    let mut names: Vec<&(String, String)> = files
        .iter()
        .filter(|(n, _)| n.ends_with(".conf") || n.ends_with(".conflist") || n.ends_with(".json"))
        .collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    let mut skipped = Vec::new();
    for (name, text) in names {
        match valid(name, text) {
            Some(c) => return (Some(c), skipped),
            None => skipped.push(format!("{name}: not a valid CNI config")),
        }
    }
    (None, skipped)
}

/// The entry this agent installs.
pub fn entry(run_dir: &Path, exclude_namespaces: &[String], log_level: &str) -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "cni_agent_run_dir": run_dir,
        "ambient_enabled": true,
        "exclude_namespaces": exclude_namespaces,
        "plugin_log_level": log_level,
    })
}

fn is_ours(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// The conflist that `candidate` becomes with exactly one copy of `ours`, appended last.
pub fn with_entry(candidate: &Candidate, ours: &Value) -> Value {
    if candidate.is_list {
        let mut list = candidate.config.clone();
        let plugins = list["plugins"].as_array_mut().expect("validated");
        plugins.retain(|p| !is_ours(p));
        plugins.push(ours.clone());
        list
    } else {
        json!({
            "cniVersion": candidate.config.get("cniVersion").cloned().unwrap_or(json!("0.3.1")),
            "name": candidate.config.get("name").cloned().unwrap_or(json!("k8s-pod-network")),
            "plugins": [candidate.config.clone(), ours.clone()],
        })
    }
}

/// `config` without our entry (for uninstall).
pub fn without_entry(config: &Value) -> Option<Value> {
    let plugins = config.get("plugins")?.as_array()?;
    if !plugins.iter().any(is_ours) {
        return None;
    }
    let mut out = config.clone();
    out["plugins"]
        .as_array_mut()
        .expect("checked")
        .retain(|p| !is_ours(p));
    Some(out)
}

fn has_entry(candidate: &Candidate, ours: &Value) -> bool {
    candidate.is_list
        && candidate.config["plugins"]
            .as_array()
            .is_some_and(|p| p.iter().filter(|x| is_ours(x)).count() == 1 && p.last() == Some(ours))
}

/// Writes `data` to `path` atomically with `mode`: a temporary file, synced, renamed over
/// `path`, then the directory synced, so after a crash or power loss `path` holds either the
/// old or the new contents, never a torn mix.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = fs::File::create(&tmp).map_err(io("creating", &tmp))?;
    f.write_all(data).map_err(io("writing", &tmp))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io("setting the mode of", &tmp))?;
    f.sync_all().map_err(io("syncing", &tmp))?;
    fs::rename(&tmp, path).map_err(io("renaming over", path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing the directory", dir))
}

/// What the installer is waiting for, for readiness.
#[derive(Debug, Default)]
pub struct InstallState {
    waiting: Mutex<Option<String>>,
}

impl InstallState {
    pub fn waiting_for(&self) -> Option<String> {
        self.waiting.lock().expect("not poisoned").clone()
    }

    fn set(&self, waiting: Option<String>) {
        *self.waiting.lock().expect("not poisoned") = waiting;
    }
}

/// The installer's settings.
#[derive(Debug, Clone)]
pub struct Installer {
    pub binary: PathBuf,
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub entry: Value,
}

/// What one pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pass {
    /// The entry was already in place.
    Intact(String),
    /// The entry was written into this file.
    Inserted(String),
    /// No valid primary config exists yet.
    NoPrimary,
}

impl Installer {
    /// Copies the plugin binary into the bin dir (temp file + rename), if it differs.
    pub fn install_binary(&self) -> Result<(), InstallError> {
        let data = fs::read(&self.binary).map_err(io("reading the plugin binary", &self.binary))?;
        let dest = self.bin_dir.join(PLUGIN_TYPE);
        if fs::read(&dest).is_ok_and(|old| old == data) {
            return Ok(());
        }
        fs::create_dir_all(&self.bin_dir).map_err(io("creating", &self.bin_dir))?;
        write_atomic(&dest, &data, 0o755)
    }

    fn read_dir(&self) -> Result<Vec<(String, String)>, InstallError> {
        let mut files = Vec::new();
        let entries = match fs::read_dir(&self.conf_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(files),
            Err(e) => return Err(io("listing", &self.conf_dir)(e)),
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !e.path().is_file() {
                continue;
            }
            if let Ok(text) = fs::read_to_string(e.path()) {
                files.push((name, text));
            }
        }
        Ok(files)
    }

    /// One reconcile pass over the conf dir.
    pub fn pass(&self) -> Result<Pass, InstallError> {
        let files = self.read_dir()?;
        let (candidate, skipped) = primary(&files);
        for s in skipped {
            tracing::debug!(skipped = %s, "CNI config ignored");
        }
        let Some(candidate) = candidate else {
            return Ok(Pass::NoPrimary);
        };
        if has_entry(&candidate, &self.entry) {
            return Ok(Pass::Intact(candidate.file));
        }
        let path = self.conf_dir.join(&candidate.file);
        let mode = fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644);
        let updated = with_entry(&candidate, &self.entry);
        let text = serde_json::to_string_pretty(&updated).expect("JSON");
        let target = if candidate.is_list {
            path.clone()
        } else {
            // A .conf becomes a .conflist of the same stem; the .conf goes so it does not win.
            path.with_extension("conflist")
        };
        write_atomic(&target, text.as_bytes(), mode)?;
        if target != path {
            fs::remove_file(&path).map_err(io("removing the wrapped", &path))?;
        }
        Ok(Pass::Inserted(
            target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ))
    }

    /// Installs and keeps the installation in place until dropped.
    pub async fn run(self, state: std::sync::Arc<InstallState>, every: Duration) {
        if let Err(e) = self.install_binary() {
            tracing::error!(
                error = &e as &dyn std::error::Error,
                "cannot install the CNI plugin binary"
            );
            state.set(Some(format!(
                "the CNI plugin binary to be installed in {}",
                self.bin_dir.display()
            )));
        }
        let mut waited = 0u32;
        loop {
            match self.pass() {
                Ok(Pass::Intact(_)) => state.set(None),
                Ok(Pass::Inserted(file)) => {
                    tracing::info!(file = %file, dir = %self.conf_dir.display(), "CNI plugin entry installed");
                    state.set(None);
                    let _ = self.install_binary();
                }
                Ok(Pass::NoPrimary) => {
                    let msg = format!(
                        "a primary CNI config in {} (the cluster's network plugin has not written one)",
                        self.conf_dir.display()
                    );
                    if waited.is_multiple_of(10) {
                        tracing::warn!(dir = %self.conf_dir.display(), "no primary CNI config yet: pods on this node cannot get a network until the cluster's CNI writes one; waiting");
                    }
                    waited += 1;
                    state.set(Some(msg));
                }
                Err(e) => {
                    tracing::error!(
                        error = &e as &dyn std::error::Error,
                        "CNI config install failed"
                    );
                    state.set(Some(format!(
                        "the CNI config in {} to be writable",
                        self.conf_dir.display()
                    )));
                }
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Removes our entry from every config in the conf dir and the binary. Best effort and
    /// complete: everything removable is removed, and the first failure reported.
    pub fn uninstall(&self) -> Result<(), InstallError> {
        let mut first = None;
        for (name, text) in self.read_dir().unwrap_or_default() {
            let Ok(config) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if let Some(cleaned) = without_entry(&config) {
                let path = self.conf_dir.join(&name);
                let mode = fs::metadata(&path)
                    .map(|m| m.permissions().mode() & 0o7777)
                    .unwrap_or(0o644);
                if let Err(e) = write_atomic(
                    &path,
                    serde_json::to_string_pretty(&cleaned)
                        .expect("JSON")
                        .as_bytes(),
                    mode,
                ) {
                    first.get_or_insert(e);
                }
            }
        }
        let bin = self.bin_dir.join(PLUGIN_TYPE);
        match fs::remove_file(&bin) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                first.get_or_insert(io("removing", &bin)(e));
            }
            _ => {}
        }
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests;
