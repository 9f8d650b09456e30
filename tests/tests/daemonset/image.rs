//! The node image built by `daemonset/build-image`, running the DaemonSets' containers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use mesh_contract::paths;
use serde_json::Value;

use mesh_contract::ports;
use mesh_testbed::mesh::eventually;

use super::model::{Object, Program, Workload, load, load_all, workloads};
use super::{DIR, MODES, NAMESPACE, VERSION};

/// Removes the containers, the stand-in pod, the image and the scratch dir, whatever happened
/// (containers first: they hold mounts of the scratch dir).
struct Cleanup {
    image: String,
    containers: Vec<String>,
    pod: Option<std::process::Child>,
    scratch: tempfile::TempDir,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("podman")
                .args(["rm", "-f", "-t", "0", c])
                .output();
        }
        if let Some(mut pod) = self.pod.take() {
            let _ = pod.kill();
            let _ = pod.wait();
        }
        // podman may still be releasing the last container's hold on the image: retry.
        for _ in 0..10 {
            match Command::new("podman")
                .args(["rmi", "-f", &self.image])
                .output()
            {
                Ok(out) if out.status.success() => return,
                Ok(out) => eprintln!("podman rmi {}: {}", self.image, text(&out)),
                Err(e) => eprintln!("podman rmi {}: {e}", self.image),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `podman run` with what this machine's podman needs (runc refuses podman's default
/// rlimits here, as in the testbed) and no network.
fn podman_run() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args([
        "run",
        "--network",
        "none",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=4096:4096",
    ]);
    cmd
}

fn run_in_image(image: &str, env: &[(&str, &str)], args: &[&str]) -> String {
    let mut cmd = podman_run();
    cmd.arg("--rm");
    for (k, v) in env {
        cmd.args(["--env", &format!("{k}={v}")]);
    }
    let out = cmd.arg(image).args(args).output().expect("podman");
    assert!(
        out.status.success(),
        "{args:?} in the image: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A minimal HTTP GET from inside `pid`'s network namespace.
fn http_get(pid: &str, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let ns =
        mesh_netns::NetNs::open(format!("/proc/{pid}/ns/net")).map_err(std::io::Error::other)?;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let sock = ns
        .run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None))
        .map_err(std::io::Error::other)??;
    sock.connect_timeout(&addr.into(), Duration::from_secs(2))?;
    let mut stream: std::net::TcpStream = sock.into();
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((
        status,
        reply
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

/// TCP ports listening in `pid`'s network namespace.
fn listening(pid: u32) -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEX_IP:HEX_PORT; state 0A is LISTEN.
            if cols.get(3) == Some(&"0A")
                && let Some(port) = cols.get(1).and_then(|a| a.rsplit(':').next())
            {
                ports.insert(u16::from_str_radix(port, 16).unwrap_or(0));
            }
        }
    }
    ports
}

/// Starts `w`'s container from `image`, detached, the way its pod spec says (command, env,
/// user, capabilities, read-only root, no_new_privs, AppArmor), with its volumes mapped onto `node_root`
/// (hostPath; the host's /proc stays the real one) and `sources` (ConfigMap and Secret name →
/// prepared dir), plus `extra_mounts` (read-only) and `extra_env`. Returns podman's output.
fn start(
    w: &Workload,
    image: &str,
    name: &str,
    node_root: &Path,
    sources: &BTreeMap<String, PathBuf>,
    extra_mounts: &[(PathBuf, &str)],
    extra_env: &[(&str, &str)],
) -> std::process::Output {
    let sc = w.container.security_context.clone().unwrap_or_default();
    let mut cmd = podman_run();
    cmd.args([
        "--detach",
        "--name",
        name,
        "--read-only-tmpfs=false",
        "--cap-drop",
        "all",
    ]);
    if sc.read_only_root_filesystem == Some(true) {
        cmd.arg("--read-only");
    }
    let user = format!(
        "{}:{}",
        sc.run_as_user.unwrap_or(0),
        sc.run_as_group.unwrap_or(0)
    );
    cmd.args(["--user", &user]);
    for cap in sc.capabilities.and_then(|c| c.add).unwrap_or_default() {
        cmd.args(["--cap-add", &cap]);
    }
    if sc.allow_privilege_escalation == Some(false) {
        cmd.args(["--security-opt", "no-new-privileges"]);
    }
    if sc
        .app_armor_profile
        .is_some_and(|p| p.type_ == "Unconfined")
    {
        cmd.args(["--security-opt", "apparmor=unconfined"]);
    }
    for (k, v) in w.env() {
        cmd.args(["--env", &format!("{k}={v}")]);
    }
    for (k, v) in extra_env {
        cmd.args(["--env", &format!("{k}={v}")]);
    }
    for m in w.container.volume_mounts.iter().flatten() {
        let (_, volume) = w.mount_for(Path::new(&m.mount_path));
        let source = if let Some(host) = &volume.host_path {
            if host.path == "/proc" {
                PathBuf::from("/proc")
            } else {
                let dir = node_root.join(host.path.trim_start_matches('/'));
                std::fs::create_dir_all(&dir).unwrap();
                dir
            }
        } else if let Some(map) = &volume.config_map {
            sources[&map.name].clone()
        } else if let Some(secret) = &volume.secret {
            sources[secret.secret_name.as_deref().unwrap()].clone()
        } else {
            panic!("{}: volume {} has no stand-in here", w.what(), volume.name);
        };
        let ro = if m.read_only == Some(true) { ":ro" } else { "" };
        cmd.args([
            "--volume",
            &format!("{}:{}{ro}", source.display(), m.mount_path),
        ]);
    }
    for (source, target) in extra_mounts {
        cmd.args(["--volume", &format!("{}:{target}:ro", source.display())]);
    }
    cmd.arg(image);
    cmd.args(w.container.command.iter().flatten());
    cmd.args(w.container.args.iter().flatten());
    cmd.output().expect("podman")
}

fn logs(name: &str) -> String {
    Command::new("podman")
        .args(["logs", name])
        .output()
        .map(|o| text(&o))
        .unwrap_or_default()
}

fn pid_of(name: &str) -> String {
    let out = Command::new("podman")
        .args(["inspect", "--format", "{{.State.Pid}}", name])
        .output()
        .expect("podman");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Builds the image from the binaries next to this test, as `./x test` built them.
fn build(image: &str) {
    let bin_dir = mesh_testbed::binary("ztunnel")
        .parent()
        .unwrap()
        .to_path_buf();
    for b in ["node-agent", "ambient-cni"] {
        let _ = mesh_testbed::binary(b); // fails clearly if it was not built
    }
    let profile = if bin_dir.ends_with("release") {
        "release"
    } else {
        "debug"
    };
    let started = std::time::Instant::now();
    let out = Command::new(format!("{DIR}/build-image"))
        .args([profile, image])
        .env("BIN_DIR", &bin_dir)
        .output()
        .expect("daemonset/build-image");
    assert!(out.status.success(), "build-image: {}", text(&out));
    eprintln!("{}(build took {:.1?})", text(&out), started.elapsed());
}

/// Each binary in the image starts and says what it is.
fn versions(image: &str) {
    let zt = run_in_image(image, &[], &["/usr/local/bin/ztunnel", "--version"]);
    assert_eq!(zt.trim(), format!("ztunnel {VERSION}"));
    let agent = run_in_image(image, &[], &["/usr/local/bin/node-agent", "--version"]);
    assert_eq!(agent.trim(), format!("node-agent {VERSION}"));
    let cni = run_in_image(
        image,
        &[("CNI_COMMAND", "VERSION")],
        &["/usr/local/bin/ambient-cni"],
    );
    let reply: Value = serde_json::from_str(&cni).unwrap_or_else(|e| panic!("{cni}: {e}"));
    let supported = reply["supportedVersions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(supported.iter().any(|s| s == v), "{v} missing: {cni}");
    }
    let nft = run_in_image(image, &[], &["nft", "--version"]);
    assert!(nft.starts_with("nftables"), "{nft}");
}

/// What the kubelet would put in the pods' ConfigMap and Secret volumes: the ConfigMaps of
/// `objects` as files, and the Secret ztunnel-ca made the way the README says (here by the
/// image's own ztunnel).
fn volume_sources(dir: &Path, image: &str, objects: &[Object]) -> BTreeMap<String, PathBuf> {
    let mut sources = BTreeMap::new();
    for o in objects.iter().filter(|o| o.kind() == "ConfigMap") {
        let map = dir.join(format!("configmap-{}", o.name()));
        std::fs::create_dir_all(&map).unwrap();
        for (k, v) in o.typed::<ConfigMap>().data.unwrap_or_default() {
            std::fs::write(map.join(k), v).unwrap();
        }
        sources.insert(o.name().to_string(), map);
    }
    let ca = dir.join("secret-ztunnel-ca");
    std::fs::create_dir_all(&ca).unwrap();
    let out = podman_run()
        .args(["--rm", "--volume", &format!("{}:/ca", ca.display()), image])
        .args(["/usr/local/bin/ztunnel", "generate-ca", "--dir", "/ca"])
        .output()
        .unwrap();
    assert!(out.status.success(), "generate-ca: {}", text(&out));
    sources.insert("ztunnel-ca".into(), ca);
    sources
}

/// A pod as the agent finds it on a real node: a process of another user (so opening its
/// netns through /proc takes SYS_PTRACE) in its own netns holding `ip`.
fn spawn_pod(ip: &str) -> std::process::Child {
    let ns = mesh_netns::NetNs::new_isolated().expect("netns");
    for args in [
        vec!["link", "set", "lo", "up"],
        vec!["addr", "add", &format!("{ip}/32"), "dev", "lo"],
    ] {
        let out = ns.command("ip").args(&args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {}", text(&out));
    }
    ns.command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["sleep", "300"])
        .spawn()
        .expect("setpriv")
}

#[test]
fn image_runs_the_daemonset_containers() {
    mesh_testbed::require_root();
    for (tool, package) in [
        ("podman", "podman"),
        ("objcopy", "binutils"),
        ("setpriv", "util-linux"),
    ] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "`{tool}` is required: apt-get install {package}");
    }
    let started = std::time::Instant::now();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let unique = format!("{}-{nanos}", std::process::id());
    let mut cleanup = Cleanup {
        image: format!("localhost/ambient-node-test:{unique}"),
        containers: Vec::new(),
        pod: None,
        scratch: tempfile::tempdir().unwrap(),
    };
    let image = cleanup.image.clone();
    build(&image);
    versions(&image);

    // A scratch node: its filesystem root (hostPath volumes land here; /proc stays the real
    // one) with a primary CNI config to chain into, the ConfigMap and Secret volumes, a pod.
    let scratch = cleanup.scratch.path().to_path_buf();
    let node_root = scratch.join("node");
    let conf_dir = node_root.join(paths::CNI_CONF_DIR.trim_start_matches('/'));
    let bin_dir = node_root.join(paths::CNI_BIN_DIR.trim_start_matches('/'));
    std::fs::create_dir_all(&conf_dir).unwrap();
    let primary = r#"{"cniVersion": "1.0.0", "name": "podnet", "plugins": [{"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.88.0.0/16"}}]}"#;
    let conflist = conf_dir.join("10-podnet.conflist");
    std::fs::write(&conflist, primary).unwrap();
    let objects = load_all(MODES[0].1);
    let sources = volume_sources(&scratch, &image, &objects);
    let pod_ip = format!("198.51.100.{}", 10 + std::process::id() % 240);
    let pod = spawn_pod(&pod_ip);
    let pod_pid = pod.id();
    cleanup.pod = Some(pod);
    let uid = format!("shop/web-{unique}");
    let pod_file = scratch.join("pods.yaml");
    std::fs::write(
        &pod_file,
        format!(
            "namespaces:\n- {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}\n\
             pods:\n- {{name: web, namespace: shop, uid: {uid}, ips: [\"{pod_ip}\"]}}\n"
        ),
    )
    .unwrap();

    // The agent and ztunnel as their DaemonSets run them; the pod file stands in for the API.
    let all = workloads(&objects);
    let agent_w = all.iter().find(|w| w.name == "ambient-node-agent").unwrap();
    let ztunnel_w = all.iter().find(|w| w.name == "ztunnel").unwrap();
    let agent = format!("ambient-test-{unique}-agent");
    let ztunnel = format!("ambient-test-{unique}-ztunnel");
    cleanup.containers.extend([agent.clone(), ztunnel.clone()]);
    let out = start(
        agent_w,
        &image,
        &agent,
        &node_root,
        &sources,
        &[(pod_file, "/etc/test/pods.yaml")],
        &[("AGENT_POD_FILE", "/etc/test/pods.yaml")],
    );
    assert!(out.status.success(), "agent: {}", text(&out));
    let out = start(ztunnel_w, &image, &ztunnel, &node_root, &sources, &[], &[]);
    assert!(out.status.success(), "ztunnel: {}", text(&out));

    // Both answer their readiness probes where the kubelet would ask.
    let Program::Agent(agent_cfg) = agent_w.parsed() else {
        unreachable!()
    };
    let Program::Ztunnel(zt_cfg) = ztunnel_w.parsed() else {
        unreachable!()
    };
    let t = Duration::from_secs(30);
    let diagnose = || format!("agent:\n{}\nztunnel:\n{}", logs(&agent), logs(&ztunnel));
    let agent_get = {
        let (pid, port) = (pid_of(&agent), agent_cfg.http_addr.port());
        move |path: &str| http_get(&pid, port, path)
    };
    let zt_ready = {
        let (pid, port) = (pid_of(&ztunnel), zt_cfg.readiness_addr.port());
        move || http_get(&pid, port, "/healthz/ready")
    };
    let ok = |r: std::io::Result<(u16, String)>| r.is_ok_and(|(status, _)| status == 200);
    let ready = eventually(t, || ok(agent_get("/readyz")));
    assert!(ready, "agent: {:?}\n{}", agent_get("/readyz"), diagnose());
    let ready = eventually(t, || ok(zt_ready()));
    assert!(ready, "ztunnel: {:?}\n{}", zt_ready(), diagnose());

    // The pod, owned by another user, found through the host's /proc (SYS_PTRACE), its rules
    // installed (NET_ADMIN, SYS_ADMIN) and ztunnel listening inside it (SYS_ADMIN).
    let enrolled = || {
        agent_get("/pods")
            .is_ok_and(|(_, body)| body.contains(&uid) && body.contains("\"state\": \"enrolled\""))
    };
    let done = eventually(t, enrolled);
    assert!(done, "{:?}\n{}", agent_get("/pods"), diagnose());
    let ports = listening(pod_pid);
    for p in [ports::OUTBOUND, ports::INBOUND_PLAINTEXT, ports::HBONE] {
        let msg = format!("ztunnel does not listen on {p} in the pod: {ports:?}");
        assert!(ports.contains(&p), "{msg}\n{}", diagnose());
    }

    // The plugin the agent copied out of the image runs on this host, and is in the chain.
    let installed = bin_dir.join("ambient-cni");
    let out = Command::new(&installed)
        .env("CNI_COMMAND", "VERSION")
        .output()
        .expect("the installed plugin");
    assert!(
        out.status.success(),
        "the plugin on the host: {}",
        text(&out)
    );
    let chain: Value = serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
    let plugins = chain["plugins"].as_array().cloned().unwrap_or_default();
    let entry = plugins.iter().find(|p| p["type"] == "ambient-cni");
    let entry = entry.unwrap_or_else(|| panic!("not chained: {chain}"));
    assert_eq!(entry["cni_agent_run_dir"], paths::AGENT_RUN_DIR, "{chain}");
    let excluded = entry["exclude_namespaces"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(excluded.iter().any(|n| n == NAMESPACE), "{chain}");

    // Uninstall: the agent goes first (it would put the entry back), then the Job's container.
    let out = Command::new("podman")
        .args(["rm", "-f", "-t", "0", &agent])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let job = workloads(&load("uninstall-cni.yaml")).remove(0);
    let uninstall = format!("ambient-test-{unique}-uninstall");
    cleanup.containers.push(uninstall.clone());
    let out = start(&job, &image, &uninstall, &node_root, &sources, &[], &[]);
    assert!(out.status.success(), "uninstall: {}", text(&out));
    let out = Command::new("podman")
        .args(["wait", &uninstall])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert_eq!(status.trim(), "0", "uninstall-cni: {}", logs(&uninstall));
    let left = std::fs::read_to_string(&conflist).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&left).unwrap(),
        serde_json::from_str::<Value>(primary).unwrap(),
        "the primary config as it was"
    );
    assert!(
        !installed.exists(),
        "the plugin binary is still on the host"
    );
    eprintln!("image test took {:.1?}", started.elapsed());
}
