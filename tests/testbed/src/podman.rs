//! A real CNI runtime for tests: podman with its CNI backend and Debian's reference plugins,
//! run inside a simulated node's netns so its bridge and containers belong to that node.
//!
//! Each node's network comes from [`crate::cni::node_nets`]. Containers are named after the
//! lab so parallel tests and leftovers never collide, and every container is removed on drop.

use std::path::{Path, PathBuf};
use std::process::Output;

pub use crate::cni::{NodeNet, REFERENCE_PLUGINS};
use crate::lab::Lab;

#[derive(Debug)]
pub struct Podman {
    conf: PathBuf,
    root: PathBuf,
    prefix: String,
    /// Containers made, with their network config dir.
    containers: Vec<(String, PathBuf)>,
}

/// Panics with a clear message unless podman and the reference plugins are installed.
pub fn require() {
    let ok = std::process::Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "podman is required: apt-get install podman runc containernetworking-plugins busybox-static"
    );
    crate::cni::require_plugins();
    assert!(
        Path::new("/bin/busybox").exists(),
        "busybox is required: apt-get install busybox-static"
    );
}

impl Podman {
    /// Prepares a container network on every node of `lab`. `plugin_dirs` are extra
    /// directories podman searches for plugins (where the agents install ours).
    pub fn new(lab: &Lab, plugin_dirs: &[PathBuf]) -> (Self, Vec<NodeNet>) {
        require();
        let base = lab.dir().join("podman");
        std::fs::create_dir_all(&base).expect("podman dir");
        let mut dirs = vec![format!("\"{REFERENCE_PLUGINS}\"")];
        dirs.extend(plugin_dirs.iter().map(|d| format!("\"{}\"", d.display())));
        let conf = base.join("containers.conf");
        std::fs::write(
            &conf,
            format!(
                "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [{}]\n",
                dirs.join(", ")
            ),
        )
        .expect("containers.conf");
        let nets = crate::cni::node_nets(lab, &base);
        let podman = Self {
            conf,
            root: base.join("roots"),
            prefix: lab.id().to_string(),
            containers: Vec::new(),
        };
        (podman, nets)
    }

    /// The full container name for `name` (unique to this lab).
    pub fn name(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn rootfs(&self, name: &str) -> PathBuf {
        let root = self.root.join(name);
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).expect("rootfs");
        std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox");
        for applet in ["sh", "nc", "echo", "cat", "sleep", "ip", "wget"] {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
        root
    }

    /// Runs `podman run` for container `name` on `net`'s node with host number `host` in each
    /// of the network's subnets (`--ip`, `--ip6`), detached or not, and returns podman's output.
    pub fn run(
        &mut self,
        net: &NodeNet,
        name: &str,
        host: u8,
        detach: bool,
        command: &[&str],
    ) -> Output {
        let full = self.name(name);
        let root = self.rootfs(name);
        self.containers.push((full.clone(), net.conf_dir.clone()));
        let mut args: Vec<String> = vec![
            "--network-config-dir".into(),
            net.conf_dir.display().to_string(),
            "--runtime".into(),
            "/usr/sbin/runc".into(),
            "run".into(),
            "--ulimit".into(),
            "nofile=1024:1024".into(),
            "--ulimit".into(),
            "nproc=4096:4096".into(),
            "--network".into(),
            net.network.clone(),
            "--name".into(),
            full,
        ];
        for ip in net.ips(host) {
            args.push(if ip.is_ipv6() { "--ip6" } else { "--ip" }.into());
            args.push(ip.to_string());
        }
        args.push(if detach { "-d" } else { "--rm" }.into());
        // --rootfs takes the directory, and what follows it is the command.
        args.push("--rootfs".into());
        args.push(root.display().to_string());
        args.extend(command.iter().map(|s| s.to_string()));
        net.ns
            .open()
            .command("podman")
            .env("CONTAINERS_CONF", &self.conf)
            .args(&args)
            .output()
            .expect("podman")
    }

    /// Removes container `name` (whatever its state), running the network's DEL.
    pub fn rm(&self, net: &NodeNet, name: &str) -> Output {
        net.ns
            .open()
            .command("podman")
            .env("CONTAINERS_CONF", &self.conf)
            .args([
                "--network-config-dir",
                &net.conf_dir.display().to_string(),
                "rm",
                "-f",
                "-t",
                "0",
                &self.name(name),
            ])
            .output()
            .expect("podman rm")
    }
}

impl Drop for Podman {
    /// Removes every container this made, with its network's config so CNI DEL runs. Must
    /// run before the lab (which holds that config) is removed.
    fn drop(&mut self) {
        for (c, conf_dir) in &self.containers {
            let _ = std::process::Command::new("podman")
                .env("CONTAINERS_CONF", &self.conf)
                .arg("--network-config-dir")
                .arg(conf_dir)
                .args(["rm", "-f", "-t", "0", c])
                .output();
        }
    }
}
