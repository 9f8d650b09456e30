//! Simulated nodes and pods.
//!
//! ```text
//!   node i netns: n<j> (198.19.<i>.<j>) ══ n<i> (198.19.<j>.<i>) node j netns   (every pair)
//!   node netns:   v<k> (198.18.<i>.1, route 198.18.<i>.<k>/32) ══ eth0 (198.18.<i>.<k>/32) pod netns
//! ```
//! Pods are routed, not bridged, the way Calico- or Cilium-style CNIs wire them: each pod has
//! a /32 and a default route through its host-side veth. Nodes are joined pairwise by veth
//! links and route each other's pod subnets (198.18.<j>.0/24) and node address
//! (198.19.0.<j>) over them, like a flat cluster network with no switch in the way.
//! Namespace names carry the test process id and a counter, so parallel tests
//! never collide, and a later run deletes what a killed run left behind.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use mesh_netns::NetNs;

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Runs a command and panics with its output if it fails.
pub fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace created by a lab.
#[derive(Debug, Clone)]
pub struct Ns {
    pub name: String,
}

impl Ns {
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    pub fn open(&self) -> NetNs {
        NetNs::open(self.path()).expect("open lab netns")
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        sh("ip", &full);
    }

    /// Runs `program` inside the namespace and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let out = self
            .open()
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {} in {} failed: {}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Gives the namespace its own `/etc/<file>` (e.g. `resolv.conf`), seen by programs run
    /// with [`Ns::exec_etc`]; removed with the namespace.
    pub fn write_etc(&self, file: &str, text: &str) {
        let dir = Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).expect("/etc/netns dir");
        std::fs::write(dir.join(file), text).expect("write /etc/netns file");
    }

    /// Runs `program` as `ip netns exec` does: inside the namespace, with its
    /// [`Ns::write_etc`] files over the host's `/etc`. Returns the exit status and stdout.
    pub fn exec_etc(&self, program: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// A TCP connection to `addr` from inside this namespace.
    pub fn connect(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<std::net::TcpStream> {
        let sock = self
            .open()
            .run(|| {
                socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM,
                    None,
                )
            })
            .map_err(std::io::Error::other)??;
        sock.connect_timeout(&addr.into(), timeout)?;
        Ok(sock.into())
    }

    /// A minimal HTTP/1.0 GET from inside the namespace: (status, body).
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
        use std::io::{Read, Write};
        let mut stream = self.connect(addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not HTTP: {text:?}")))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    fn sysctl(&self, key: &str, value: &str) {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")]);
    }
}

/// A simulated node.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub index: u8,
    pub ns: Ns,
    /// The node's address on the cluster network.
    pub ip: Ipv4Addr,
    pods: u8,
}

/// A simulated pod.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub node: String,
    pub ns: Ns,
    pub ip: Ipv4Addr,
}

impl Pod {
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), port)
    }
}

/// A running process started by the lab; killed on drop.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. SIGTERM) to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal);
    }

    /// Waits up to `timeout` for the process to exit; returns its status if it did.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A set of nodes and pods; everything is removed when it drops.
#[derive(Debug)]
pub struct Lab {
    id: String,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    /// Processes get their own process group (a kept lab outlives its creator's terminal).
    detach: bool,
    namespaces: Vec<Ns>,
    nodes: Vec<Node>,
    /// Processes, killed before the namespaces go.
    pub processes: Vec<Process>,
}

impl Lab {
    /// A new lab with an empty cluster network.
    pub fn new() -> Self {
        crate::require_root();
        cleanup_stale();
        let id = format!(
            "zt{}x{}",
            std::process::id(),
            NEXT_LAB.fetch_add(1, Ordering::Relaxed)
        );
        Self::with_id(id, false)
    }

    /// A lab with a fixed `id` (a prefix no other lab uses), meant to be [`Lab::keep`]t and
    /// later removed with [`purge`]. Its processes run in their own process group.
    pub fn named(id: &str) -> Self {
        crate::require_root();
        Self::with_id(id.to_string(), true)
    }

    fn with_id(id: String, detach: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{id}-"))
            .tempdir()
            .expect("lab dir");
        Lab {
            id,
            path: dir.path().to_path_buf(),
            dir: Some(dir),
            detach,
            namespaces: Vec::new(),
            nodes: Vec::new(),
            processes: Vec::new(),
        }
    }

    /// Leaves everything running and in place when the lab is dropped; [`purge`] with the
    /// lab's id removes it later.
    pub fn keep(&mut self) {
        for p in self.processes.drain(..) {
            std::mem::forget(p);
        }
        self.namespaces.clear();
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
    }

    /// The lab's scratch directory (configs, sockets, logs).
    pub fn dir(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Routes `cidr` to node `to` from every other node (for subnets a node serves itself,
    /// like a CNI bridge's).
    pub fn route_to_node(&self, cidr: &str, to: &str) {
        let target = self.node(to);
        for other in self.nodes.iter().filter(|n| n.name != to) {
            let via = format!("198.19.{}.{}", target.index, other.index);
            other.ns.ip(&["route", "replace", cidr, "via", &via]);
        }
    }

    /// The directory of links to `node`'s pod namespaces (what `/run/netns` is on a real node).
    pub fn node_netns_dir(&self, node: &str) -> PathBuf {
        self.dir().join(format!("netns-{node}"))
    }

    /// The interface in node `from`'s netns that carries its traffic to node `to`.
    pub fn link(&self, from: &str, to: &str) -> String {
        let _ = self.node(from);
        format!("n{}", self.node(to).index)
    }

    fn create_ns(&mut self, ns: &Ns) {
        sh("ip", &["netns", "add", &ns.name]);
        self.namespaces.push(ns.clone());
        ns.ip(&["link", "set", "lo", "up"]);
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Adds a node: its netns, a link to every existing node, and routes both ways.
    pub fn add_node(&mut self, name: &str) -> Node {
        let index = u8::try_from(self.nodes.len() + 1).expect("at most 254 nodes");
        let ns = Ns {
            name: format!("{}-{name}", self.id),
        };
        self.create_ns(&ns);
        let ip = Ipv4Addr::new(198, 19, 0, index);
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
        ns.sysctl("net.ipv4.ip_forward", "1");
        for other in &self.nodes {
            let (i, j) = (index, other.index);
            let (here, there) = (format!("n{j}"), format!("n{i}"));
            let veth = [
                "link",
                "add",
                &here,
                "type",
                "veth",
                "peer",
                "name",
                &there,
                "netns",
                &other.ns.name,
            ];
            ns.ip(&veth);
            let (a, b) = (format!("198.19.{i}.{j}"), format!("198.19.{j}.{i}"));
            ns.ip(&["addr", "add", &a, "peer", &format!("{b}/32"), "dev", &here]);
            other
                .ns
                .ip(&["addr", "add", &b, "peer", &format!("{a}/32"), "dev", &there]);
            ns.ip(&["link", "set", &here, "up"]);
            other.ns.ip(&["link", "set", &there, "up"]);
            for (from, via, subnet, node_ip) in [(&ns, &b, j, other.ip), (&other.ns, &a, i, ip)] {
                from.ip(&["route", "add", &format!("198.18.{subnet}.0/24"), "via", via]);
                from.ip(&["route", "add", &format!("{node_ip}/32"), "via", via]);
            }
        }
        let node = Node {
            name: name.to_string(),
            index,
            ns,
            ip,
            pods: 0,
        };
        self.nodes.push(node.clone());
        node
    }

    /// Adds an empty pod network namespace on `node` (loopback up, as a runtime leaves it
    /// before the CNI chain runs), listed in the node's netns dir.
    pub fn add_netns(&mut self, node: &str, name: &str) -> Ns {
        let node = self.node(node).name.clone();
        let ns = Ns {
            name: format!("{}-{node}-{name}", self.id),
        };
        self.create_ns(&ns);
        let dir = self.node_netns_dir(&node);
        std::fs::create_dir_all(&dir).expect("node netns dir");
        std::os::unix::fs::symlink(ns.path(), dir.join(name)).expect("netns link");
        ns
    }

    /// Adds a pod on `node`, wired to the node's bridge with a default route through it.
    pub fn add_pod(&mut self, node: &str, name: &str) -> Pod {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.name == node)
            .unwrap_or_else(|| panic!("no node {node}"));
        node.pods += 1;
        let k = node.pods;
        assert!(k < 240, "too many pods on {}", node.name);
        let node = node.clone();
        let ns = Ns {
            name: format!("{}-{}-{name}", self.id, node.name),
        };
        self.create_ns(&ns);
        let ip = Ipv4Addr::new(198, 18, node.index, 10 + k);
        let port = format!("v{k}");
        let gateway = format!("198.18.{}.1", node.index);
        let veth = [
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &node.ns.name,
        ];
        ns.ip(&veth);
        node.ns
            .ip(&["addr", "add", &format!("{gateway}/32"), "dev", &port]);
        node.ns.ip(&["link", "set", &port, "up"]);
        node.ns
            .ip(&["route", "add", &format!("{ip}/32"), "dev", &port]);
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["route", "add", &gateway, "dev", "eth0", "scope", "link"]);
        ns.ip(&["route", "add", "default", "via", &gateway, "dev", "eth0"]);
        // Each simulated node has its own directory of pod namespaces, so a node agent
        // searching "its node" sees only that node's pods (not other nodes' or other tests').
        let dir = self.node_netns_dir(&node.name);
        std::fs::create_dir_all(&dir).expect("node netns dir");
        std::os::unix::fs::symlink(ns.path(), dir.join(name)).expect("netns link");
        Pod {
            name: name.to_string(),
            node: node.name,
            ns,
            ip,
        }
    }

    /// Starts `program` inside `ns` with stdout and stderr going to `<dir>/<name>.log`.
    pub fn spawn(
        &mut self,
        name: &str,
        ns: &Ns,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> &mut Process {
        let log = self.dir().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = ns.open().command(program);
        if self.detach {
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
        }
        let child = command
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        self.processes.push(Process {
            name: name.to_string(),
            child,
            log,
        });
        self.processes.last_mut().expect("just pushed")
    }

    pub fn process(&mut self, name: &str) -> &mut Process {
        self.processes
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    /// Removes a process from the lab (killing it).
    pub fn stop(&mut self, name: &str) {
        self.processes.retain(|p| p.name != name);
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in &self.processes {
                let text = p.log_text();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("---- last lines of {} ({}) ----", p.name, p.log.display());
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        self.processes.clear();
        for ns in self.namespaces.iter().rev() {
            delete_netns(&ns.name);
        }
    }
}

/// Deletes a namespace and its `/etc/netns` files, if any.
fn delete_netns(name: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
}

/// Removes everything lab `id` created, from outside the lab's owner (e.g. on Ctrl-C, when
/// the owner cannot unwind): processes inside its namespaces, the namespaces, its directory.
pub fn purge(id: &str) {
    let prefix = format!("{id}-");
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&prefix) {
            continue;
        }
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        delete_netns(&name);
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Deletes namespaces left by test processes that no longer exist.
fn cleanup_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("zt") else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('x') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            delete_netns(&name);
        }
    }
}
