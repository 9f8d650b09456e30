//! Test apps inside pod namespaces: sockets are created in the pod's netns (so they route
//! from the pod) and then used from ordinary threads.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Socket, Type};

use crate::lab::Pod;

/// A listener on `port` inside `pod`: `0.0.0.0`, or `[::]` taking both families when the pod
/// has an IPv6 address.
pub fn listen(pod: &Pod, port: u16) -> TcpListener {
    let netns = pod.ns.open();
    let v6 = pod.ips.iter().any(|ip| ip.is_ipv6());
    netns
        .run(|| -> io::Result<TcpListener> {
            let (domain, any) = if v6 {
                (Domain::IPV6, SocketAddr::from(([0u16; 8], port)))
            } else {
                (Domain::IPV4, SocketAddr::from(([0, 0, 0, 0], port)))
            };
            let s = Socket::new(domain, Type::STREAM, None)?;
            if v6 {
                s.set_only_v6(false)?;
            }
            s.set_reuse_address(true)?;
            s.bind(&any.into())?;
            s.listen(128)?;
            Ok(s.into())
        })
        .expect("enter pod netns")
        .unwrap_or_else(|e| panic!("listen on {}:{port}: {e}", pod.name))
}

/// Connects from `pod` to `dst`.
pub fn connect(pod: &Pod, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let netns = pod.ns.open();
    let sock = netns
        .run(|| Socket::new(Domain::for_address(dst), Type::STREAM, None))
        .map_err(io::Error::other)??;
    sock.connect_timeout(&dst.into(), timeout)?;
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.set_write_timeout(Some(Duration::from_secs(20)))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Writes `data`, half-closes, and reads everything until EOF. Proves both directions and
/// both half-closes work end to end against an [`EchoServer`].
pub fn echo_roundtrip(mut stream: TcpStream, data: &[u8]) -> io::Result<Vec<u8>> {
    let mut writer = stream.try_clone()?;
    let owned = data.to_vec();
    let send = std::thread::spawn(move || -> io::Result<()> {
        writer.write_all(&owned)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut got = Vec::with_capacity(data.len());
    stream.read_to_end(&mut got)?;
    send.join().expect("sender thread")?;
    Ok(got)
}

/// Random bytes with a recognisable marker at the front, for payload checks on the wire.
pub fn payload(marker: &str, len: usize) -> Vec<u8> {
    let mut data: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
    let m = marker.as_bytes();
    data[..m.len().min(len)].copy_from_slice(&m[..m.len().min(len)]);
    data
}

/// Echoes every connection until the client half-closes, then half-closes back. Records each
/// client's address as the server saw it (an IPv4 client of a dual listener as IPv4).
#[derive(Debug)]
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    /// Connections whose echo finished cleanly.
    completed: Arc<Mutex<usize>>,
}

impl EchoServer {
    pub fn start(pod: &Pod, port: u16) -> Self {
        let listener = listen(pod, port);
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let completed = Arc::new(Mutex::new(0));
        let thread = {
            let (stop, peers, completed) = (stop.clone(), peers.clone(), completed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, peer)) => {
                            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                            peers.lock().expect("peers").push(peer);
                            let completed = completed.clone();
                            std::thread::spawn(move || {
                                if echo(conn).is_ok() {
                                    *completed.lock().expect("completed") += 1;
                                }
                            });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Self {
            stop,
            thread: Some(thread),
            peers,
            completed,
        }
    }

    /// Client addresses seen so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers").clone()
    }

    pub fn completed(&self) -> usize {
        *self.completed.lock().expect("completed")
    }
}

fn echo(mut conn: TcpStream) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return conn.shutdown(Shutdown::Write);
        }
        conn.write_all(&buf[..n])?;
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The TCP ports listening inside `pod`'s netns (from `/proc/net/tcp{,6}` read in the netns).
pub fn listening_ports(pod: &Pod) -> Vec<u16> {
    let mut ports = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = pod.ns.exec("cat", &[file]);
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // st 0A = LISTEN; local address is "ADDR:PORT" in hex.
            if cols.len() > 3
                && cols[3] == "0A"
                && let Some(port) = cols[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                ports.push(port);
            }
        }
    }
    ports.sort_unstable();
    ports
}

/// Whether ztunnel listens in `pod` on all three of its ports (the pod is proxied).
pub fn proxied(pod: &Pod) -> bool {
    let ports = listening_ports(pod);
    [15001, 15006, 15008].iter().all(|p| ports.contains(p))
}

/// Whether none of ztunnel's ports listen in `pod`.
pub fn unproxied(pod: &Pod) -> bool {
    let ports = listening_ports(pod);
    ![15001, 15006, 15008].iter().any(|p| ports.contains(p))
}

/// Whether the node agent's redirection table is installed in `pod`.
pub fn has_rules(pod: &Pod) -> bool {
    pod.ns
        .exec("nft", &["list", "tables"])
        .contains("ztunnel-redirect")
}

/// A stand-in kubelet: a cgroup v2 of its own (unique name, removed on drop) and probes made
/// by processes inside it, so the agent's `--probe-cgroup` can name it.
#[derive(Debug)]
pub struct Kubelet {
    dir: std::path::PathBuf,
    /// The cgroup's path below the cgroup v2 root, for `--probe-cgroup`.
    pub path: String,
}

impl Kubelet {
    pub fn new(id: &str) -> Self {
        // Pure cgroup v2 hosts mount it at /sys/fs/cgroup; hybrid ones at .../unified.
        let root = std::path::Path::new("/sys/fs/cgroup");
        let mount = if root.join("cgroup.controllers").exists() {
            root.to_path_buf()
        } else {
            root.join("unified")
        };
        let name = format!("{id}-kubelet");
        let dir = mount.join(&name);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        Kubelet {
            dir,
            path: format!("/{name}"),
        }
    }

    /// Connects from a process in this cgroup, inside `from` (the node's netns), to `dst`,
    /// sends `data`, and returns what came back before the peer closed.
    pub fn probe(&self, from: &crate::lab::Ns, dst: SocketAddr, data: &str) -> io::Result<String> {
        const SCRIPT: &str = "import socket,sys\n\
            s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5)\n\
            s.sendall(sys.argv[3].encode());s.shutdown(socket.SHUT_WR)\n\
            out=b''\n\
            while True:\n  b=s.recv(4096)\n  if not b: break\n  out+=b\n\
            sys.stdout.write(out.decode())\n";
        let procs = self.dir.join("cgroup.procs");
        let out = from
            .open()
            .command("sh")
            .args([
                "-c",
                "echo 0 > \"$0\" && exec python3 -c \"$1\" \"$2\" \"$3\" \"$4\"",
                &procs.to_string_lossy(),
                SCRIPT,
                &dst.ip().to_string(),
                &dst.port().to_string(),
                data,
            ])
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        // Its probes have exited; an empty cgroup can be removed.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts dnsmasq in `pod` as process `dnsmasq`: a resolver on the pod's addresses, port 53,
/// that answers `name` with `addresses` (A and AAAA) and nothing else (no upstream, no hosts
/// file), and logs every query to its process log.
pub fn start_dnsmasq(lab: &mut crate::lab::Lab, pod: &Pod, name: &str, addresses: &[&str]) {
    let mut args: Vec<String> = vec![
        "--keep-in-foreground".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--bind-interfaces".into(),
    ];
    args.extend(pod.ips.iter().map(|ip| format!("--listen-address={ip}")));
    args.extend(addresses.iter().map(|a| format!("--address=/{name}/{a}")));
    args.extend([
        "--log-queries".into(),
        "--log-facility=-".into(),
        format!("--pid-file={}", lab.dir().join("dnsmasq.pid").display()),
        "--user=root".into(),
    ]);
    lab.spawn(
        "dnsmasq",
        &pod.ns,
        std::path::Path::new("/usr/sbin/dnsmasq"),
        &args,
        &[],
    );
}
