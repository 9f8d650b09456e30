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
//!
//! A lab is built for one [`IpFamily`]. IPv6 mirrors the IPv4 plan digit for digit inside
//! fd00::/8: pod 198.18.1.11 is fd00:18:1::11, node 198.19.0.2 is fd00:19::2, link address
//! 198.19.1.2 is fd00:19:1:2::1, pod subnet 198.18.1.0/24 is fd00:18:1::/64. A dual-stack
//! lab has both, IPv4 first; an IPv6-only lab has no IPv4 address outside loopback.
//! Namespace names carry the test process id and a counter, so parallel tests
//! never collide, and a later run deletes what a killed run left behind.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use mesh_netns::NetNs;

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Which address families a lab's nodes and pods get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IpFamily {
    #[default]
    Ipv4,
    Ipv6,
    Dual,
}

impl IpFamily {
    pub const ALL: [IpFamily; 3] = [IpFamily::Ipv4, IpFamily::Ipv6, IpFamily::Dual];

    pub fn has_v4(self) -> bool {
        self != IpFamily::Ipv6
    }

    pub fn has_v6(self) -> bool {
        self != IpFamily::Ipv4
    }

    pub fn name(self) -> &'static str {
        match self {
            IpFamily::Ipv4 => "ipv4",
            IpFamily::Ipv6 => "ipv6",
            IpFamily::Dual => "dual",
        }
    }
}

impl std::fmt::Display for IpFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for IpFamily {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        IpFamily::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| format!("unknown IP family {s:?} (ipv4, ipv6 or dual)"))
    }
}

/// `fd00:<a>:<b>:<c>::<d>` with each group spelled with the decimal digits of its number, so
/// the IPv6 plan reads like the IPv4 one (`v6(18, 1, 0, 11)` is `fd00:18:1::11`).
fn v6(a: u8, b: u8, c: u8, d: u8) -> Ipv6Addr {
    let g = |n: u8| u16::from_str_radix(&n.to_string(), 16).expect("decimal digits are hex");
    Ipv6Addr::new(0xfd00, g(a), g(b), g(c), 0, 0, 0, g(d))
}

/// The address of `ips` in the family of `like`, if there is one.
fn same_family(ips: &[IpAddr], like: IpAddr) -> Option<IpAddr> {
    ips.iter()
        .copied()
        .find(|ip| ip.is_ipv6() == like.is_ipv6())
}

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

    /// A thread inside this netns that runs `task` on a current-thread Tokio runtime, so
    /// every socket the task opens belongs here.
    pub fn spawn_async<F: Future<Output = ()>>(
        &self,
        task: impl FnOnce() -> F + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let netns = self.open();
        std::thread::spawn(move || {
            netns
                .run(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime")
                        .block_on(task())
                })
                .expect("enter the lab netns")
        })
    }

    /// `ip -n <ns> <args>`.
    pub fn ip<S: AsRef<str>>(&self, args: &[S]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend(args.iter().map(|a| a.as_ref()));
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
    /// The node's address on the cluster network (IPv4 when it has one).
    pub ip: IpAddr,
    /// All its addresses, IPv4 first.
    pub ips: Vec<IpAddr>,
    pods: u8,
}

/// A simulated pod.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub node: String,
    pub ns: Ns,
    /// Its first address (IPv4 when it has one).
    pub ip: IpAddr,
    /// All its addresses, IPv4 first.
    pub ips: Vec<IpAddr>,
}

impl Pod {
    /// A pod (or a host process standing in for one) with the single address `ip`.
    pub fn with_ip(name: &str, node: &str, ns: &Ns, ip: IpAddr) -> Self {
        Self {
            name: name.into(),
            node: node.into(),
            ns: ns.clone(),
            ip,
            ips: vec![ip],
        }
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, port)
    }

    /// `port` on each of the pod's addresses.
    pub fn addrs(&self, port: u16) -> Vec<SocketAddr> {
        self.ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, port))
            .collect()
    }

    /// Its address in the family of `like`, if it has one.
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        same_family(&self.ips, like)
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
    family: IpFamily,
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
            family: IpFamily::default(),
            namespaces: Vec::new(),
            nodes: Vec::new(),
            processes: Vec::new(),
        }
    }

    /// The lab built for `family` (before any node is added).
    pub fn with_family(mut self, family: IpFamily) -> Self {
        assert!(
            self.nodes.is_empty(),
            "choose the family before adding nodes"
        );
        self.family = family;
        self
    }

    pub fn family(&self) -> IpFamily {
        self.family
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
            let (i, j) = (target.index, other.index);
            let via = if cidr.contains(':') {
                v6(19, i, j, 1).to_string()
            } else {
                format!("198.19.{i}.{j}")
            };
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
        if self.family.has_v6() {
            // Addresses usable at once: no duplicate detection on links only the lab owns.
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
        }
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
        let family = self.family;
        let mut ips = Vec::new();
        if family.has_v4() {
            ips.push(IpAddr::V4(Ipv4Addr::new(198, 19, 0, index)));
            ns.sysctl("net.ipv4.ip_forward", "1");
        }
        if family.has_v6() {
            ips.push(IpAddr::V6(v6(19, 0, 0, index)));
            ns.sysctl("net.ipv6.conf.all.forwarding", "1");
        }
        for ip in &ips {
            ns.ip(&["addr", "add", &host_prefix(*ip), "dev", "lo"]);
        }
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
            ns.ip(&["link", "set", &here, "up"]);
            other.ns.ip(&["link", "set", &there, "up"]);
            let mut plans: Vec<LinkPlan> = Vec::new();
            if family.has_v4() {
                plans.push((
                    Ipv4Addr::new(198, 19, i, j).into(),
                    Ipv4Addr::new(198, 19, j, i).into(),
                    |n| format!("198.18.{n}.0/24"),
                ));
            }
            if family.has_v6() {
                plans.push((v6(19, i, j, 1).into(), v6(19, j, i, 1).into(), |n| {
                    format!("{}/64", v6(18, n, 0, 0))
                }));
            }
            for (a, b, subnet) in plans {
                ns.ip(&peer_addr(a, b, &here));
                other.ns.ip(&peer_addr(b, a, &there));
                let their_ip = same_family(&other.ips, a).expect("same families");
                let my_ip = same_family(&ips, a).expect("same families");
                for (from, via, n, node_ip) in [(&ns, b, j, their_ip), (&other.ns, a, i, my_ip)] {
                    let via = via.to_string();
                    from.ip(&["route", "add", &subnet(n), "via", &via]);
                    from.ip(&["route", "add", &host_prefix(node_ip), "via", &via]);
                }
            }
        }
        let node = Node {
            name: name.to_string(),
            index,
            ns,
            ip: ips[0],
            ips,
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

    /// Adds a pod on `node`, routed through its host-side veth in each of the lab's families.
    pub fn add_pod(&mut self, node: &str, name: &str) -> Pod {
        let family = self.family;
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
        let port = format!("v{k}");
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
        node.ns.ip(&["link", "set", &port, "up"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        // (pod address, gateway) per family.
        let mut plan: Vec<(IpAddr, IpAddr)> = Vec::new();
        if family.has_v4() {
            let i = node.index;
            plan.push((
                Ipv4Addr::new(198, 18, i, 10 + k).into(),
                Ipv4Addr::new(198, 18, i, 1).into(),
            ));
        }
        if family.has_v6() {
            let i = node.index;
            plan.push((v6(18, i, 0, 10 + k).into(), v6(18, i, 0, 1).into()));
        }
        for (ip, gateway) in &plan {
            let (ip, gateway) = (host_prefix(*ip), gateway.to_string());
            let mut gw = vec!["addr", "add", &gateway, "dev", &port];
            let mut own = vec!["addr", "add", &ip, "dev", "eth0"];
            if gateway.contains(':') {
                gw.push("nodad");
                own.push("nodad");
            }
            node.ns.ip(&gw);
            node.ns.ip(&["route", "add", &ip, "dev", &port]);
            ns.ip(&own);
            ns.ip(&["route", "add", &gateway, "dev", "eth0", "scope", "link"]);
            ns.ip(&["route", "add", "default", "via", &gateway, "dev", "eth0"]);
        }
        // Each simulated node has its own directory of pod namespaces, so a node agent
        // searching "its node" sees only that node's pods (not other nodes' or other tests').
        let dir = self.node_netns_dir(&node.name);
        std::fs::create_dir_all(&dir).expect("node netns dir");
        std::os::unix::fs::symlink(ns.path(), dir.join(name)).expect("netns link");
        let ips: Vec<IpAddr> = plan.iter().map(|(ip, _)| *ip).collect();
        Pod {
            name: name.to_string(),
            node: node.name,
            ns,
            ip: ips[0],
            ips,
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

/// One family of a node-to-node link: this end, the other end, and the pod subnet of node
/// `n` (routed over the link towards the node behind it).
type LinkPlan = (IpAddr, IpAddr, fn(u8) -> String);

/// `ip/32` or `ip/128`.
fn host_prefix(ip: IpAddr) -> String {
    format!("{ip}/{}", if ip.is_ipv6() { 128 } else { 32 })
}

/// `ip addr` arguments giving `dev` the point-to-point address `local` with peer `peer`.
fn peer_addr(local: IpAddr, peer: IpAddr, dev: &str) -> Vec<String> {
    let mut args: Vec<String> = ["addr", "add", &local.to_string(), "peer"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend([host_prefix(peer), "dev".into(), dev.into()]);
    if local.is_ipv6() {
        args.push("nodad".into());
    }
    args
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
