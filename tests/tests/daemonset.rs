//! The Kubernetes manifests in `daemonset/` and the node image, checked against what the
//! binaries really read and do:
//!
//! - every manifest passes `kubernetes-validate --strict` for Kubernetes 1.30 (unknown fields
//!   are errors); the validator is required, never skipped;
//! - every environment variable a container sets is a flag of that binary (clap's own
//!   description of `ztunnel::config::Config` and `node_agent::config::Config`), and the values
//!   parse: the test turns each container's env into the flags clap would see and parses them
//!   with the real config structs, then checks probes, mounts and paths against the result
//!   (ports and paths the binaries use, `mesh_contract::paths`, the CA file names);
//! - privileges, RBAC, scheduling and rolling updates say what the README says and the API
//!   accepts (rules kubernetes-validate cannot know, e.g. CAP_SYS_ADMIN with
//!   `allowPrivilegeEscalation: false`);
//! - the image built by `daemonset/build-image` runs each binary, and runs the node agent and
//!   ztunnel the way the DaemonSets do (their capabilities, env, read-only root, mounts mapped
//!   onto a scratch node root): the agent installs the plugin, finds a pod owned by another
//!   user through the host's /proc, ztunnel takes it over ZDS, both readiness endpoints answer
//!   200 where the probes look, and the uninstall Job takes the plugin out again.

#[path = "daemonset/image.rs"]
mod image;
#[path = "daemonset/model.rs"]
mod model;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, HTTPGetAction};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_contract::paths;

use model::{
    AgentRun, Object, Program, Workload, ZtunnelRun, default_of, env_names, load, load_all,
    workloads,
};

pub const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../daemonset");
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const NAMESPACE: &str = "ambient-system";

/// Every manifest, so a new file cannot escape validation.
const FILES: [&str; 4] = [
    "ambient.yaml",
    "standalone/ztunnel.yaml",
    "istio/ztunnel.yaml",
    "uninstall-cni.yaml",
];

/// The two ways to install: the shared part plus one ztunnel flavour.
pub const MODES: [(&str, &[&str]); 2] = [
    ("standalone", &["ambient.yaml", "standalone/ztunnel.yaml"]),
    ("istio", &["ambient.yaml", "istio/ztunnel.yaml"]),
];

/// The Kubernetes version the manifests are written for (appArmorProfile needs 1.30).
const KUBERNETES: &str = "1.30.0";

/// Environment variables a container may set that are not clap flags, each with the code that
/// reads it (checked to still be there).
pub const NOT_FLAGS: [(&str, &str, &str, &str); 1] = [(
    "node-agent",
    "POD_NAMESPACE",
    include_str!("../../node-agent/src/config.rs"),
    "std::env::var(\"POD_NAMESPACE\")",
)];

/// The Linux capabilities each program gets, and why (the README's table says the same).
const CAPABILITIES: [(&str, &str, &[&str]); 3] = [
    // SO_MARK and IP_TRANSPARENT (NET_ADMIN covers both), setns into pod netns.
    ("ztunnel", "run", &["NET_ADMIN", "SYS_ADMIN"]),
    // nft and rtnetlink; setns/unshare; opening other processes' /proc/<pid>/ns/net.
    (
        "node-agent",
        "run",
        &["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"],
    ),
    // Edits root-owned files as root.
    ("node-agent", "uninstall-cni", &[]),
];

/// What the agent's Kubernetes source calls (node-agent/src/pods/kube.rs) and the RBAC each
/// call needs: (code, resource, verbs).
const KUBE_CALLS: [(&str, &str, &[&str]); 3] = [
    ("watcher::watcher(pods", "pods", &["list", "watch"]),
    (
        "watcher::watcher(namespaces",
        "namespaces",
        &["list", "watch"],
    ),
    (".patch_status(", "pods/status", &["patch"]),
];
const KUBE_RS: &str = include_str!("../../node-agent/src/pods/kube.rs");

#[test]
fn every_manifest_is_listed_and_every_install_mode_is_complete() {
    let mut found = BTreeSet::new();
    let mut dirs = vec![PathBuf::from(DIR)];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).expect("daemonset/").flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                found.insert(p.strip_prefix(DIR).unwrap().display().to_string());
            }
        }
    }
    let listed: BTreeSet<String> = FILES.iter().map(|f| f.to_string()).collect();
    assert_eq!(
        found, listed,
        "add new manifests to FILES so they are validated"
    );
    for (mode, files) in MODES {
        let objects = load_all(files);
        let ds: Vec<&str> = objects
            .iter()
            .filter(|o| o.kind() == "DaemonSet")
            .map(Object::name)
            .collect();
        assert_eq!(
            ds,
            ["ambient-node-agent", "ztunnel"],
            "{mode}: one agent and one ztunnel"
        );
        assert!(
            objects
                .iter()
                .any(|o| o.kind() == "Namespace" && o.name() == NAMESPACE)
        );
        for o in &objects {
            let ns = o.value["metadata"]["namespace"].as_str();
            let cluster_scoped =
                ["Namespace", "ClusterRole", "ClusterRoleBinding"].contains(&o.kind());
            assert_eq!(
                ns.is_none(),
                cluster_scoped,
                "{} {}: namespace {ns:?}",
                o.file,
                o.name()
            );
            if let Some(ns) = ns {
                assert_eq!(ns, NAMESPACE, "{} {}", o.file, o.name());
            }
        }
    }
}

#[test]
fn manifests_pass_kubernetes_validate_strict() {
    let version = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--version"])
        .output();
    let installed = match version {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        other => panic!(
            "kubernetes-validate is required (./x test installs it, or `python3 -m pip install \
             kubernetes-validate=={}`): {other:?}",
            pinned_validator()
        ),
    };
    assert_eq!(
        installed,
        pinned_validator(),
        "./x pins kubernetes-validate {}, {installed} is installed",
        pinned_validator()
    );
    let files: Vec<String> = FILES.iter().map(|f| format!("{DIR}/{f}")).collect();
    let out = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--kubernetes-version",
            KUBERNETES,
        ])
        .args(&files)
        .output()
        .expect("python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubernetes-validate --strict -k {KUBERNETES}:\n{text}"
    );
    let passed = text
        .lines()
        .filter(|l| l.starts_with("INFO") && l.contains(" passed "))
        .count();
    let objects = load_all(&FILES);
    assert_eq!(passed, objects.len(), "every object validated:\n{text}");
}

/// The version `./x` installs.
fn pinned_validator() -> String {
    let x = include_str!("../../x");
    let at = x
        .find("kubernetes-validate==")
        .expect("./x installs kubernetes-validate");
    let rest = &x[at + "kubernetes-validate==".len()..];
    rest.chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect()
}

#[test]
fn containers_set_only_flags_their_binary_reads() {
    for (binary, name, source, reader) in NOT_FLAGS {
        assert!(
            source.contains(reader),
            "{binary} no longer reads {name} ({reader})"
        );
    }
    let known = [
        ("ztunnel", env_names::<ZtunnelRun>()),
        ("node-agent", env_names::<AgentRun>()),
    ];
    let mut seen = BTreeSet::new();
    for w in workloads(&load_all(&FILES)) {
        let (binary, _) = w.program();
        let names = &known
            .iter()
            .find(|(b, _)| *b == binary)
            .unwrap_or_else(|| panic!("{}: binary {binary}", w.what()))
            .1;
        for (name, _) in w.env() {
            let allowed = NOT_FLAGS
                .iter()
                .any(|(b, n, _, _)| *b == binary && *n == name);
            assert!(
                names.contains(&name) || allowed,
                "{}: {binary} has no flag with env {name}",
                w.what()
            );
        }
        // And every value parses the way the binary would parse it.
        let _ = w.parsed();
        seen.insert(w.program());
    }
    let expected: BTreeSet<(String, String)> = CAPABILITIES
        .iter()
        .map(|(b, s, _)| (b.to_string(), s.to_string()))
        .collect();
    assert_eq!(seen, expected);
}

#[test]
fn probes_mounts_and_paths_agree_with_the_binaries() {
    for (mode, files) in MODES {
        let objects = load_all(files);
        let mut zds_on_host = BTreeSet::new();
        for w in workloads(&objects) {
            match w.parsed() {
                Program::Agent(c) => {
                    agent_settings(&w, &c);
                    zds_on_host.insert(w.host_path(&c.zds_socket));
                }
                Program::Ztunnel(c) => {
                    ztunnel_settings(&w, &c);
                    zds_on_host.insert(w.host_path(&c.zds_socket));
                    match mode {
                        "standalone" => standalone_sources(&w, &c, &objects),
                        _ => istio_sources(&w, &c),
                    }
                }
                Program::Uninstall(_) => unreachable!("not part of an install"),
            }
        }
        assert_eq!(
            zds_on_host,
            BTreeSet::from([Some(PathBuf::from(paths::ZDS_SOCKET))]),
            "{mode}: agent and ztunnel must share the ZDS socket on the host"
        );
    }
    // The uninstall Job edits the same host directories the agent installed into.
    for w in workloads(&load("uninstall-cni.yaml")) {
        let Program::Uninstall(c) = w.parsed() else {
            panic!("{}", w.what())
        };
        let on_host = |p: &Path| w.host_path(p);
        assert_eq!(on_host(&c.cni_bin_dir), Some(paths::CNI_BIN_DIR.into()));
        assert_eq!(on_host(&c.cni_conf_dir), Some(paths::CNI_CONF_DIR.into()));
        assert_eq!(
            w.pod.node_name.as_deref(),
            Some("NODE_NAME"),
            "the README's sed replaces this placeholder"
        );
    }
}

/// The readiness probe's httpGet of `w`.
fn probe(w: &Workload) -> HTTPGetAction {
    let probe = w.container.readiness_probe.as_ref();
    probe
        .and_then(|p| p.http_get.clone())
        .unwrap_or_else(|| panic!("{}: no readiness httpGet probe", w.what()))
}

/// The agent: host network, the probe on its HTTP address, and every path it uses on the
/// host where the contract (and the other programs) expect it.
fn agent_settings(w: &Workload, c: &node_agent::config::Config) {
    let what = w.what();
    let on_host = |p: &Path| w.host_path(p);
    assert_eq!(w.pod.host_network, Some(true), "{what}: the host netns");
    let probe = probe(w);
    assert_eq!(probe.path.as_deref(), Some("/readyz"), "{what}");
    let host = c.http_addr.ip().to_string();
    assert_eq!(
        probe.host.as_deref(),
        Some(host.as_str()),
        "{what}: probe host"
    );
    let port = IntOrString::Int(c.http_addr.port().into());
    assert_eq!(probe.port, port, "{what}: probe port");
    assert!(c.install_cni, "{what}: installs the plugin");
    assert!(
        c.node_name.is_some() && c.pod_file.is_none(),
        "{what}: Kubernetes source"
    );
    let excluded = c.excluded_namespaces.iter().any(|n| n == NAMESPACE);
    assert!(excluded, "{what}: never enroll our own pods");
    // The run dir's path is written into the plugin's config entry and used on the host.
    assert_eq!(c.run_dir, Path::new(paths::AGENT_RUN_DIR), "{what}");
    assert_eq!(
        on_host(&c.run_dir),
        Some(paths::AGENT_RUN_DIR.into()),
        "{what}"
    );
    assert_eq!(
        on_host(&c.cni.cni_bin_dir),
        Some(paths::CNI_BIN_DIR.into()),
        "{what}"
    );
    assert_eq!(
        on_host(&c.cni.cni_conf_dir),
        Some(paths::CNI_CONF_DIR.into()),
        "{what}"
    );
    let state = default_of::<AgentRun>("state-dir");
    assert_eq!(
        on_host(&c.state_dir),
        Some(state.into()),
        "{what}: outlives the pod"
    );
    assert_ne!(
        c.proc_dir,
        Path::new("/proc"),
        "{what}: its own /proc shows no pods"
    );
    assert_eq!(on_host(&c.proc_dir), Some("/proc".into()), "{what}");
    assert_eq!(
        w.mount_for(&c.proc_dir).0.read_only,
        Some(true),
        "{what}: read-only"
    );
    assert!(!c.netns_dirs.is_empty(), "{what}");
    for dir in &c.netns_dirs {
        assert_eq!(on_host(dir).as_ref(), Some(dir), "{what}");
        let propagation = w.mount_for(dir).0.mount_propagation.as_deref();
        assert_eq!(
            propagation,
            Some("HostToContainer"),
            "{what}: {}",
            dir.display()
        );
    }
}

/// ztunnel: its own netns, the probe where the kubelet can reach it, time to drain.
fn ztunnel_settings(w: &Workload, c: &ztunnel::config::Config) {
    let what = w.what();
    assert_ne!(
        w.pod.host_network,
        Some(true),
        "{what}: its own netns (SPEC §1)"
    );
    let probe = probe(w);
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"), "{what}");
    assert_eq!(probe.host, None, "{what}: the kubelet probes the pod IP");
    let port = IntOrString::Int(c.readiness_addr.port().into());
    assert_eq!(probe.port, port, "{what}: probe port");
    let reachable = c.readiness_addr.ip().is_unspecified();
    assert!(
        reachable,
        "{what}: the kubelet cannot reach {}",
        c.readiness_addr
    );
    let grace = w.pod.termination_grace_period_seconds.unwrap_or(30);
    assert!(
        u64::try_from(grace).unwrap() > c.drain_timeout.as_secs(),
        "{what}: grace {grace}s must exceed the drain timeout {:?}",
        c.drain_timeout
    );
    let automount = w.pod.automount_service_account_token;
    assert_eq!(automount, Some(false), "{what}: no API access");
}

/// Standalone ztunnel: the CA from the Secret the README has the operator create, the local
/// config from the ConfigMap, which (and its documented example) ztunnel's parser accepts.
fn standalone_sources(w: &Workload, c: &ztunnel::config::Config, objects: &[Object]) {
    let what = w.what();
    assert!(c.xds_address.is_none() && c.ca_address.is_none(), "{what}");
    let ca_dir = c
        .ca_dir
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no CA dir"));
    let (_, volume) = w.mount_for(ca_dir);
    let secret = volume
        .secret
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: the CA dir is not a Secret"));
    assert_eq!(
        secret.secret_name.as_deref(),
        Some("ztunnel-ca"),
        "{what}: README creates ztunnel-ca"
    );
    let files: BTreeSet<&str> = secret
        .items
        .iter()
        .flatten()
        .map(|i| i.path.as_str())
        .collect();
    assert_eq!(
        files,
        BTreeSet::from([
            ztunnel::identity::ca::CERT_FILE,
            ztunnel::identity::ca::KEY_FILE
        ]),
        "{what}: the files `ztunnel generate-ca` writes"
    );
    assert_eq!(
        secret.default_mode,
        Some(0o400),
        "{what}: the CA key readable by root only"
    );

    let config = c
        .local_config
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no local config"));
    let (mount, volume) = w.mount_for(config);
    assert!(
        mount.sub_path.is_none(),
        "{what}: subPath mounts never see ConfigMap updates"
    );
    let name = volume
        .config_map
        .as_ref()
        .map(|v| v.name.clone())
        .unwrap_or_else(|| panic!("{what}: not a ConfigMap"));
    let map: ConfigMap = objects
        .iter()
        .find(|o| o.kind() == "ConfigMap" && o.name() == name)
        .unwrap_or_else(|| panic!("{what}: no ConfigMap {name}"))
        .typed();
    let key = config
        .strip_prefix(&mount.mount_path)
        .unwrap()
        .display()
        .to_string();
    let text = map
        .data
        .unwrap_or_default()
        .remove(&key)
        .unwrap_or_else(|| panic!("{what}: {name} has no {key}"));
    ztunnel::state::local::parse(&text, &c.trust_domain)
        .unwrap_or_else(|e| panic!("{name}/{key}: {e}"));
    // The example in the ConfigMap's comment, un-commented.
    let source = std::fs::read_to_string(Path::new(DIR).join(&w.file)).unwrap();
    let example: String = source
        .lines()
        .filter_map(|l| l.strip_prefix("  #   "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        example.contains("workloads:"),
        "the example in {} is gone",
        w.file
    );
    ztunnel::state::local::parse(&example, &c.trust_domain)
        .unwrap_or_else(|e| panic!("the example in {}: {e}\n{example}", w.file));
}

/// Istio mode: xDS and CA addresses, istiod's roots from the ConfigMap istiod publishes, and
/// the token file on a projected token for istiod.
fn istio_sources(w: &Workload, c: &ztunnel::config::Config) {
    let what = w.what();
    assert!(
        c.xds_address.is_some() && c.ca_address.is_some() && c.ca_dir.is_none(),
        "{what}"
    );
    for url in [&c.xds_address, &c.ca_address].into_iter().flatten() {
        assert!(
            url.starts_with("https://"),
            "{what}: {url} must be an https URL"
        );
    }
    let roots = c.xds_root_cert.as_ref().expect("XDS_ROOT_CA");
    let (_, volume) = w.mount_for(roots);
    assert_eq!(
        volume.config_map.as_ref().map(|m| m.name.as_str()),
        Some("istio-ca-root-cert"),
        "{what}: istiod's root certificate"
    );
    assert!(
        !c.node_name.is_empty() && c.pod_name != "ztunnel",
        "{what}: node and pod identity"
    );
    assert_eq!(
        c.token_file,
        PathBuf::from(default_of::<ZtunnelRun>("token-file")),
        "{what}: Istio's path"
    );
    let (mount, volume) = w.mount_for(&c.token_file);
    let file = c
        .token_file
        .strip_prefix(&mount.mount_path)
        .unwrap()
        .display()
        .to_string();
    let token = volume
        .projected
        .iter()
        .flat_map(|p| p.sources.iter().flatten())
        .find_map(|s| s.service_account_token.as_ref())
        .unwrap_or_else(|| {
            panic!("{what}: the token file is not a projected service account token")
        });
    assert_eq!(token.path, file, "{what}");
    assert_eq!(
        token.audience.as_deref(),
        Some("istio-ca"),
        "{what}: istiod accepts audience istio-ca"
    );
}

#[test]
fn privileges_rbac_and_scheduling_are_least_and_complete() {
    let objects = load_all(&FILES);
    for w in workloads(&objects) {
        let what = w.what();
        let (binary, sub) = w.program();
        let sc = w.container.security_context.clone().unwrap_or_default();
        assert_ne!(
            sc.privileged,
            Some(true),
            "{what}: no privileged containers"
        );
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{what}");
        assert!(
            w.pod.host_pid.is_none() && w.pod.host_ipc.is_none(),
            "{what}"
        );
        let caps = sc.capabilities.clone().unwrap_or_default();
        assert_eq!(
            caps.drop.as_deref(),
            Some(&["ALL".to_string()][..]),
            "{what}: drop ALL"
        );
        let added: BTreeSet<String> = caps.add.unwrap_or_default().into_iter().collect();
        let expected = CAPABILITIES
            .iter()
            .find(|(b, s, _)| *b == binary && *s == sub)
            .unwrap()
            .2;
        let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        assert_eq!(added, expected, "{what}: capabilities");
        // no_new_privs means nothing beside SYS_ADMIN (Kubernetes documents it as always true
        // then; the API rejects `false` with the spelling CAP_SYS_ADMIN): unset there, and
        // `false` everywhere else.
        assert!(
            added.iter().all(|c| !c.starts_with("CAP_")),
            "{what}: {added:?}"
        );
        let escalation = if added.contains("SYS_ADMIN") {
            None
        } else {
            Some(false)
        };
        assert_eq!(sc.allow_privilege_escalation, escalation, "{what}");
        assert_eq!(
            w.container.image.as_deref(),
            Some(format!("ambient-node:{VERSION}").as_str()),
            "{what}: the image of this release"
        );
        assert!(
            w.pod
                .tolerations
                .iter()
                .flatten()
                .any(|t| t.operator.as_deref() == Some("Exists")
                    && t.key.is_none()
                    && t.effect.is_none()),
            "{what}: must tolerate every taint"
        );
        if w.kind == "DaemonSet" {
            assert_eq!(
                w.pod.priority_class_name.as_deref(),
                Some("system-node-critical"),
                "{what}"
            );
        }
    }
    for o in objects.iter().filter(|o| o.kind() == "DaemonSet") {
        let ds: DaemonSet = o.typed();
        let rolling = ds
            .spec
            .unwrap()
            .update_strategy
            .and_then(|s| s.rolling_update)
            .unwrap();
        let got = (rolling.max_surge, rolling.max_unavailable);
        let want = match o.name() {
            // Host network: cannot surge.
            "ambient-node-agent" => (Some(IntOrString::Int(0)), Some(IntOrString::Int(1))),
            // The new ztunnel connects before the old one stops.
            _ => (Some(IntOrString::Int(1)), Some(IntOrString::Int(0))),
        };
        assert_eq!(got, want, "{} {}: rolling update", o.file, o.name());
    }

    // RBAC: exactly what kube.rs calls, bound to the agent's account only.
    let mut needed = BTreeSet::new();
    for (code, resource, verbs) in KUBE_CALLS {
        assert!(
            KUBE_RS.contains(code),
            "kube.rs no longer calls {code}: drop its permissions"
        );
        for v in verbs {
            needed.insert((String::new(), resource.to_string(), v.to_string()));
        }
    }
    for call in [
        ".create(",
        ".replace(",
        ".delete(",
        ".evict(",
        ".get_status(",
        ".replace_status(",
        ".get_opt(",
        ".patch(&",
    ] {
        assert!(
            !KUBE_RS.contains(call),
            "kube.rs calls {call}: add it to KUBE_CALLS and the ClusterRole"
        );
    }
    let roles: Vec<ClusterRole> = objects
        .iter()
        .filter(|o| o.kind() == "ClusterRole")
        .map(Object::typed)
        .collect();
    assert_eq!(roles.len(), 1);
    let mut granted = BTreeSet::new();
    for rule in roles[0].rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    assert_ne!(v, "*", "no wildcards");
                    granted.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    assert_eq!(
        granted, needed,
        "the ClusterRole grants exactly what the agent calls"
    );
    let bindings: Vec<ClusterRoleBinding> = objects
        .iter()
        .filter(|o| o.kind() == "ClusterRoleBinding")
        .map(Object::typed)
        .collect();
    let subjects: Vec<_> = bindings
        .iter()
        .flat_map(|b| b.subjects.iter().flatten())
        .map(|s| (s.kind.clone(), s.name.clone(), s.namespace.clone()))
        .collect();
    assert_eq!(
        subjects,
        [(
            "ServiceAccount".to_string(),
            "ambient-node-agent".to_string(),
            Some(NAMESPACE.to_string())
        )]
    );
    assert!(
        !objects.iter().any(|o| o.kind() == "RoleBinding"),
        "ztunnel needs no API access"
    );
    for w in workloads(&objects).iter().filter(|w| w.kind == "DaemonSet") {
        let account = w.pod.service_account_name.as_deref();
        let want = if w.name == "ztunnel" {
            "ztunnel"
        } else {
            "ambient-node-agent"
        };
        assert_eq!(account, Some(want), "{}", w.what());
    }
}
