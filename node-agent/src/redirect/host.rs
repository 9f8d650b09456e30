//! The node-level probe rule: the kubelet connecting to an enrolled pod is SNATed to
//! 169.254.7.127 (SPEC §3), which the pod's own rules accept before any redirect, so health
//! probes reach the app without passing through ztunnel or policy.
//!
//! Only the kubelet gets that bypass, not every process on the node: an `output` chain labels
//! the connections of sockets created in the kubelet's cgroup (v2) with a conntrack label,
//! and only labelled connections are SNATed. Other host processes reach the pod through its
//! inbound capture and are subject to policy like anyone else. [`ProbeSource`] says who
//! counts as the kubelet.
//!
//! One nftables table in the agent's (the host's) netns holds a set of enrolled pod IPs per
//! family; enrolling or removing a pod adds or deletes its elements. A restarted agent swaps
//! in the new table with the old sets' elements already in it, so probes never stop.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use mesh_contract::{Chain, PROBE_SNAT_V4, PROBE_SNAT_V6};

use super::ApplyError;

/// The host table (family `inet`).
pub const HOST_TABLE: &str = "ztunnel-host";

/// The conntrack label bit (of 128) that marks a connection the kubelet opened to a pod.
/// Labels, unlike the packet and conntrack marks, are left alone by kube-proxy and the
/// common CNIs.
pub const PROBE_CT_LABEL: u8 = 101;

/// Where nft looks up cgroup v2 paths (`socket cgroupv2` takes a path relative to it).
const NFT_CGROUP_BASE: &str = "/sys/fs/cgroup";

/// Why the probe rule's source could not be resolved or installed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "probe cgroup {0:?} is not an absolute cgroup v2 path like /system.slice/kubelet.service"
    )]
    NotAbsolute(String),
    #[error("probe cgroup / is the root and holds every process; say `any` if that is meant")]
    Root,
    #[error("probe cgroup {path}: {} is not a cgroup v2 directory", dir.display())]
    NotCgroup { path: String, dir: PathBuf },
    #[error(
        "the cgroup v2 filesystem is mounted at {}, outside {NFT_CGROUP_BASE} where nft looks",
        .0.display()
    )]
    OutsideNftBase(PathBuf),
    #[error("reading /proc/self/mountinfo")]
    Mountinfo(#[source] std::io::Error),
    #[error("no cgroup v2 filesystem is mounted")]
    NoCgroup2,
    #[error("no kubelet found: reading {}", .0.display())]
    Proc(PathBuf, #[source] std::io::Error),
    #[error("no process named kubelet under {}", .0.display())]
    NoKubelet(PathBuf),
    #[error("the kubelet is in no cgroup v2")]
    KubeletNotInCgroup2,
    #[error(
        "the kubelet's cgroup ({0}) is outside this agent's cgroup namespace and its place on the host is unknown; pass --probe-cgroup with its path on the host"
    )]
    OutsideCgroupNamespace(String),
    #[error("installing the host probe rule")]
    Install(#[from] ApplyError),
}

/// Whose connections to an enrolled pod are treated as kubelet probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeSource {
    /// Processes in this cgroup v2 or below it.
    Cgroup {
        /// As in `/proc/<pid>/cgroup`, e.g. `/system.slice/kubelet.service`.
        path: String,
        /// The same directory relative to [`NFT_CGROUP_BASE`], as nft wants it.
        nft_path: String,
        /// Depth of `path` below the cgroup v2 root.
        level: usize,
    },
    /// Every process on the node (Istio's rule; opt-in only).
    AnyLocal,
    /// Nobody: probes go through ztunnel and policy like any other connection.
    Nobody,
}

impl std::fmt::Display for ProbeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeSource::Cgroup { path, .. } => write!(f, "cgroup {path}"),
            ProbeSource::AnyLocal => f.write_str("any local process"),
            ProbeSource::Nobody => f.write_str("nobody"),
        }
    }
}

impl ProbeSource {
    /// Resolves `--probe-cgroup`: `any`, `none`, `auto` (the cgroup of the process named
    /// `kubelet` under `proc_dir`), or a cgroup v2 path. `auto` without a kubelet is
    /// [`ProbeSource::Nobody`] and says why; anything else that cannot be resolved is an error.
    pub fn resolve(spec: &str, proc_dir: &Path) -> Result<(Self, Option<ProbeError>), ProbeError> {
        match spec {
            "any" => Ok((ProbeSource::AnyLocal, None)),
            "none" => Ok((ProbeSource::Nobody, None)),
            "auto" => match kubelet_cgroup(proc_dir) {
                Ok(path) => Ok((Self::cgroup(&path, &cgroup2_mount()?)?, None)),
                Err(why) => Ok((ProbeSource::Nobody, Some(why))),
            },
            path => Ok((Self::cgroup(path, &cgroup2_mount()?)?, None)),
        }
    }

    /// A cgroup v2 `path` on the cgroup2 filesystem mounted at `mount`.
    fn cgroup(path: &str, mount: &Path) -> Result<Self, ProbeError> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        if !path.starts_with('/') || parts.iter().any(|p| *p == "." || *p == "..") {
            return Err(ProbeError::NotAbsolute(path.into()));
        }
        if parts.is_empty() {
            return Err(ProbeError::Root);
        }
        let dir = mount.join(parts.join("/"));
        if !dir.join("cgroup.procs").exists() {
            return Err(ProbeError::NotCgroup {
                path: path.into(),
                dir,
            });
        }
        let rel = mount
            .strip_prefix(NFT_CGROUP_BASE)
            .map_err(|_| ProbeError::OutsideNftBase(mount.into()))?;
        let nft_path = rel.join(parts.join("/")).to_string_lossy().into_owned();
        Ok(ProbeSource::Cgroup {
            path: path.to_string(),
            nft_path,
            level: parts.len(),
        })
    }
}

/// The host rule as installed, and what it was resolved from, so it can follow the kubelet:
/// systemd gives a restarted unit a new cgroup (a new id, which nft rules hold), and with
/// `auto` a kubelet started after the agent is found later.
#[derive(Debug)]
pub struct HostProbes {
    spec: String,
    proc_dir: PathBuf,
    installed: ProbeSource,
    /// The inode (the cgroup id) of the cgroup the rule names.
    cgroup_id: Option<u64>,
}

impl HostProbes {
    /// Resolves `spec` (see [`ProbeSource::resolve`]) and installs the host table.
    pub fn install(spec: &str, proc_dir: &Path) -> Result<Self, ProbeError> {
        let mut me = Self {
            spec: spec.to_string(),
            proc_dir: proc_dir.to_path_buf(),
            installed: ProbeSource::Nobody,
            cgroup_id: None,
        };
        let (source, why) = ProbeSource::resolve(spec, proc_dir)?;
        match why {
            Some(why) => {
                tracing::warn!(reason = %Chain(&why), "no kubelet to give the probe bypass to: probes go through ztunnel and policy")
            }
            None => tracing::info!(source = %source, "probe bypass"),
        }
        me.apply(source)?;
        Ok(me)
    }

    /// Who gets the bypass now.
    pub fn source(&self) -> &ProbeSource {
        &self.installed
    }

    fn apply(&mut self, source: ProbeSource) -> Result<(), ApplyError> {
        install(&source)?;
        self.cgroup_id = cgroup_id(&source);
        self.installed = source;
        Ok(())
    }

    /// Resolves the spec again and reinstalls the table (keeping its elements) if the cgroup
    /// it names has changed. True when it did.
    pub fn refresh(&mut self) -> Result<bool, ProbeError> {
        let source = match ProbeSource::resolve(&self.spec, &self.proc_dir) {
            Ok((source, _)) => source,
            // A kubelet restarting right now: keep the rule until it is back.
            Err(e) if self.spec == "auto" => {
                tracing::debug!(error = %Chain(&e), "kubelet not resolvable now");
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        if source == self.installed && cgroup_id(&source) == self.cgroup_id {
            return Ok(false);
        }
        tracing::info!(source = %source, was = %self.installed, "the kubelet's cgroup changed; probe rule reinstalled");
        self.apply(source)?;
        Ok(true)
    }
}

fn cgroup_id(source: &ProbeSource) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    match source {
        ProbeSource::Cgroup { nft_path, .. } => {
            std::fs::metadata(Path::new(NFT_CGROUP_BASE).join(nft_path))
                .ok()
                .map(|m| m.ino())
        }
        _ => None,
    }
}

/// Where the cgroup v2 filesystem is mounted (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on hybrid hosts).
fn cgroup2_mount() -> Result<PathBuf, ProbeError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(ProbeError::Mountinfo)?;
    cgroup2_in_mountinfo(&info).ok_or(ProbeError::NoCgroup2)
}

fn cgroup2_in_mountinfo(info: &str) -> Option<PathBuf> {
    info.lines().find_map(|line| {
        // `id parent major:minor root mountpoint options... - fstype source superoptions`
        let (head, tail) = line.split_once(" - ")?;
        (tail.split_whitespace().next()? == "cgroup2")
            .then(|| head.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// The cgroup v2 path of the process named `kubelet` under `proc_dir`.
fn kubelet_cgroup(proc_dir: &Path) -> Result<String, ProbeError> {
    let entries = std::fs::read_dir(proc_dir).map_err(|e| ProbeError::Proc(proc_dir.into(), e))?;
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let is_kubelet =
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim_end() == "kubelet");
        if !is_kubelet {
            continue;
        }
        let path = cgroup_of(&e.path()).ok_or(ProbeError::KubeletNotInCgroup2)?;
        return absolute_cgroup(&path, cgroup_of(&proc_dir.join("1")).as_deref());
    }
    Err(ProbeError::NoKubelet(proc_dir.into()))
}

/// The cgroup v2 path of process directory `pid` (`/proc/<pid>`), as this process sees it.
fn cgroup_of(pid: &Path) -> Option<String> {
    let cgroups = std::fs::read_to_string(pid.join("cgroup")).ok()?;
    cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// `path` (the kubelet's cgroup as this process sees it) from the root of the host's
/// hierarchy. Inside a container with its own cgroup namespace it reads like
/// `/../../../system.slice/kubelet.service`: climbing as many levels as the host's init
/// (`init`, seen the same way) needs reaches the host's root, so the rest is the path.
fn absolute_cgroup(path: &str, init: Option<&str>) -> Result<String, ProbeError> {
    let ups = |p: &str| p.split('/').skip(1).take_while(|c| *c == "..").count();
    let climbs = ups(path);
    if climbs == 0 {
        return Ok(path.to_string());
    }
    match init {
        Some(init) if ups(init) == climbs => {
            let rest: Vec<&str> = path.split('/').skip(1 + climbs).collect();
            Ok(format!("/{}", rest.join("/")))
        }
        _ => Err(ProbeError::OutsideCgroupNamespace(path.into())),
    }
}

/// The table definition, with `elements` already in its sets.
pub fn host_table(probe: &ProbeSource, elements: &[IpAddr]) -> String {
    let set = |v6: bool| {
        let ips: Vec<String> = elements
            .iter()
            .filter(|ip| ip.is_ipv6() == v6)
            .map(ToString::to_string)
            .collect();
        if ips.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", ips.join(", "))
        }
    };
    let mut s = format!(
        "table inet {HOST_TABLE} {{\n  \
           set probe-v4 {{ type ipv4_addr;{} }}\n  \
           set probe-v6 {{ type ipv6_addr;{} }}\n",
        set(false),
        set(true)
    );
    let families = [
        ("ip", "probe-v4", PROBE_SNAT_V4.to_string()),
        ("ip6", "probe-v6", PROBE_SNAT_V6.to_string()),
    ];
    let l = PROBE_CT_LABEL;
    match probe {
        ProbeSource::Cgroup {
            nft_path, level, ..
        } => {
            s.push_str(
                "  chain output {\n    type filter hook output priority mangle; policy accept;\n",
            );
            for (fam, set, _) in &families {
                s.push_str(&format!(
                    "    meta l4proto tcp {fam} daddr @{set} socket cgroupv2 level {level} \"{nft_path}\" ct label set {l}\n"
                ));
            }
            s.push_str("  }\n  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n");
            for (fam, set, to) in &families {
                s.push_str(&format!(
                    "    meta l4proto tcp {fam} daddr @{set} ct label {l} snat {fam} to {to}\n"
                ));
            }
            s.push_str("  }\n");
        }
        ProbeSource::AnyLocal => {
            s.push_str("  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n");
            for (fam, set, to) in &families {
                s.push_str(&format!(
                    "    meta l4proto tcp {fam} daddr @{set} fib saddr type local snat {fam} to {to}\n"
                ));
            }
            s.push_str("  }\n");
        }
        ProbeSource::Nobody => {}
    }
    s.push_str("}\n");
    s
}

/// Runs an nft script in the agent's own (the host's) netns.
fn nft(script: &str) -> Result<(), ApplyError> {
    super::apply::run_nft_in(Command::new("nft"), &["-f", "-"], Some(script)).map(drop)
}

/// Adds or deletes `ips` in their family's probe set, over netlink (on every pod's path).
fn elements(ips: &[IpAddr], add: bool) -> Result<(), ApplyError> {
    for (v6, set) in [(false, "probe-v4"), (true, "probe-v6")] {
        let of: Vec<IpAddr> = ips
            .iter()
            .copied()
            .filter(|ip| ip.is_ipv6() == v6)
            .collect();
        if !of.is_empty() {
            super::nfnl::set_elements(HOST_TABLE, set, &of, add)?;
        }
    }
    Ok(())
}

/// (Re)creates the host table for `probe` in one transaction, keeping the elements the
/// previous table's sets held (a restarted agent must not stop the probes of pods it has not
/// re-confirmed yet; [`retain`] prunes the rest once it has). Run once at startup.
pub fn install(probe: &ProbeSource) -> Result<(), ApplyError> {
    let kept = current_elements()?;
    nft(&format!(
        "table inet {HOST_TABLE} {{}}\ndelete table inet {HOST_TABLE}\n{}",
        host_table(probe, &kept)
    ))
}

/// The addresses in the host table's sets now (none if there is no table).
fn current_elements() -> Result<Vec<IpAddr>, ApplyError> {
    let out = match super::apply::run_nft_in(
        Command::new("nft"),
        &["-j", "list", "table", "inet", HOST_TABLE],
        None,
    ) {
        Ok(out) => out,
        Err(ApplyError::Failed { stderr, .. }) if stderr.contains("No such file") => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    Ok(elements_in_json(&out))
}

/// The plain addresses in the sets of an `nft -j list table` answer.
fn elements_in_json(out: &str) -> Vec<IpAddr> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(out) else {
        return Vec::new();
    };
    let mut ips = BTreeSet::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        for e in item["set"]["elem"].as_array().into_iter().flatten() {
            if let Some(ip) = e.as_str().and_then(|s| s.parse().ok()) {
                ips.insert(ip);
            }
        }
    }
    ips.into_iter().collect()
}

/// Removes every address from the probe sets that is not in `keep` (the addresses of the
/// pods enrolled now).
pub fn retain(keep: &[IpAddr]) -> Result<(), ApplyError> {
    let stale: Vec<IpAddr> = current_elements()?
        .into_iter()
        .filter(|ip| !keep.contains(ip))
        .collect();
    remove(&stale)
}

/// Adds a pod's addresses to the probe sets (already present is fine).
pub fn add(ips: &[IpAddr]) -> Result<(), ApplyError> {
    elements(ips, true)
}

/// Removes a pod's addresses from the probe sets (absent is fine).
pub fn remove(ips: &[IpAddr]) -> Result<(), ApplyError> {
    for ip in ips {
        match elements(&[*ip], false) {
            Err(ApplyError::Netlink(super::nfnl::NlError::Kernel { source, .. }))
                if source.raw_os_error() == Some(nix::libc::ENOENT) => {}
            done => done?,
        }
    }
    Ok(())
}

/// Removes the host table (real uninstall only).
pub fn uninstall() -> Result<(), ApplyError> {
    nft(&format!(
        "table inet {HOST_TABLE} {{}}\ndelete table inet {HOST_TABLE}\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cgroup() -> ProbeSource {
        ProbeSource::Cgroup {
            path: "/system.slice/kubelet.service".into(),
            nft_path: "system.slice/kubelet.service".into(),
            level: 2,
        }
    }

    #[test]
    fn host_tables_match_golden() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/redirect/golden");
        let kept: Vec<IpAddr> = vec!["198.18.1.2".parse().unwrap(), "fd00::2".parse().unwrap()];
        for (name, probe, elements) in [
            ("host.nft", cgroup(), &[][..]),
            ("host-kept.nft", cgroup(), &kept[..]),
            ("host-any.nft", ProbeSource::AnyLocal, &[][..]),
            ("host-none.nft", ProbeSource::Nobody, &[][..]),
        ] {
            let file = dir.join(name);
            let got = host_table(&probe, elements);
            if std::env::var_os("UPDATE_GOLDEN").is_some() {
                std::fs::write(&file, &got).unwrap();
            }
            assert_eq!(got, std::fs::read_to_string(&file).unwrap(), "{name}");
        }
    }

    #[test]
    fn probe_cgroups_resolve_or_say_why_not() {
        let root = tempfile::tempdir().unwrap();
        let mount = Path::new(NFT_CGROUP_BASE).join("unified");
        // Only the resolution of names is checked here; nft itself is tried end to end.
        for bad in ["system.slice", "/", "/a/../b", "/./a"] {
            let err = ProbeSource::cgroup(bad, &mount).unwrap_err().to_string();
            assert!(err.contains("probe cgroup"), "{bad}: {err}");
        }
        let missing = ProbeSource::cgroup("/no-such-cgroup-here", &mount)
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("is not a cgroup v2 directory"),
            "{missing}"
        );
        let outside = root.path().join("kube");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("cgroup.procs"), "").unwrap();
        let err = ProbeSource::cgroup("/kube", root.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside /sys/fs/cgroup"), "{err}");

        let info = "24 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                    35 24 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_in_mountinfo(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_in_mountinfo("garbage\n- -\n"), None);
    }

    #[test]
    fn auto_finds_the_kubelet_or_says_why_not() {
        let proc = tempfile::tempdir().unwrap();
        let (none, why) = ProbeSource::resolve("auto", proc.path()).unwrap();
        assert_eq!(none, ProbeSource::Nobody);
        assert!(
            why.unwrap()
                .to_string()
                .contains("no process named kubelet")
        );
        let pid = proc.path().join("4242");
        std::fs::create_dir_all(&pid).unwrap();
        std::fs::write(pid.join("comm"), "kubelet\n").unwrap();
        std::fs::write(
            pid.join("cgroup"),
            "0::/../../system.slice/kubelet.service\n",
        )
        .unwrap();
        let (none, why) = ProbeSource::resolve("auto", proc.path()).unwrap();
        assert_eq!(none, ProbeSource::Nobody);
        assert!(
            why.unwrap()
                .to_string()
                .contains("outside this agent's cgroup namespace")
        );
        // Seen from a container: the host's init climbs as far, so the path is known.
        let init = proc.path().join("1");
        std::fs::create_dir_all(&init).unwrap();
        std::fs::write(init.join("cgroup"), "0::/../../init.scope\n").unwrap();
        assert_eq!(
            kubelet_cgroup(proc.path()).unwrap(),
            "/system.slice/kubelet.service"
        );
        std::fs::write(init.join("cgroup"), "0::/../init.scope\n").unwrap();
        assert!(kubelet_cgroup(proc.path()).is_err());
        assert_eq!(
            absolute_cgroup("/kubelet.slice", Some("/init.scope")).unwrap(),
            "/kubelet.slice"
        );
        std::fs::write(pid.join("cgroup"), "0::/system.slice/kubelet.service\n").unwrap();
        assert_eq!(
            kubelet_cgroup(proc.path()).unwrap(),
            "/system.slice/kubelet.service"
        );
        assert_eq!(
            ProbeSource::resolve("any", proc.path()).unwrap().0,
            ProbeSource::AnyLocal
        );
    }

    #[test]
    fn elements_are_read_from_nft_json() {
        let out = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "ztunnel-host", "handle": 3}},
            {"set": {"family": "inet", "name": "probe-v4", "table": "ztunnel-host", "type": "ipv4_addr", "handle": 1, "elem": ["198.18.1.2", "198.18.1.3"]}},
            {"set": {"family": "inet", "name": "probe-v6", "table": "ztunnel-host", "type": "ipv6_addr", "handle": 2}}]}"#;
        let got = elements_in_json(out);
        assert_eq!(got.len(), 2);
        assert!(elements_in_json("not json").is_empty());
    }
}
