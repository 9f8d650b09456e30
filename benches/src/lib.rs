//! Load generators for the benchmarks: bulk throughput, request/response latency and new
//! connection rate, each run between two pods with ordinary blocking sockets (like iperf or
//! netperf would), created inside the pods' network namespaces.
//!
//! Nothing here asserts a speed: benchmarks report ratios against a baseline measured in the
//! same run, because these machines are shared and noisy.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mesh_testbed::apps;
use mesh_testbed::lab::Pod;

fn connect(pod: &Pod, dst: SocketAddr) -> std::io::Result<TcpStream> {
    apps::connect(pod, dst, Duration::from_secs(5))
}

/// A measurement window's result: the rate and what the proxies spent during it.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub per_second: f64,
    pub units: f64,
    pub seconds: f64,
    /// CPU seconds the probe reported spent during the window.
    pub cpu: f64,
}

/// Total CPU seconds used so far by the processes under test (0 when there are none).
pub type CpuProbe<'a> = &'a (dyn Fn() -> f64 + Sync);

/// A child process that is killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_json(pod: &Pod, program: &str, args: &[String]) -> serde_json::Value {
    let out = pod
        .ns
        .open()
        .command(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (apt-get install {program})"));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{program} {}: {e}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Bulk TCP throughput with iperf3 (`-P streams`, the first second omitted) from `client` to
/// `server:port`. iperf3 before 3.16 drives all streams from one thread, as the figures this
/// project is compared against were measured. `per_second` is bytes per second received.
pub fn iperf3(
    client: &Pod,
    server: &Pod,
    port: u16,
    streams: usize,
    window: Duration,
    cpu: CpuProbe<'_>,
) -> Window {
    iperf3_via(
        client,
        server,
        port,
        server.addr(port),
        streams,
        window,
        cpu,
    )
}

/// [`iperf3`] with the client aimed at `dst` (a relay in front of `server`:`port`).
pub fn iperf3_via(
    client: &Pod,
    server: &Pod,
    port: u16,
    dst: SocketAddr,
    streams: usize,
    window: Duration,
    cpu: CpuProbe<'_>,
) -> Window {
    let _server = Killed(
        server
            .ns
            .open()
            .command("iperf3")
            .args([
                "-s",
                "-1",
                "-B",
                &server.ip.to_string(),
                "-p",
                &port.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("iperf3 (apt-get install iperf3)"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let secs = window.as_secs_f64().ceil().max(1.0) as u64;
    let args: Vec<String> = [
        "-c",
        &dst.ip().to_string(),
        "-p",
        &dst.port().to_string(),
        "-P",
        &streams.to_string(),
        "-t",
        &secs.to_string(),
        "-O",
        "1",
        "-J",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // CPU is sampled from the end of the omitted first second to the end of the run.
    let (c0, c1, json) = std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            std::thread::sleep(Duration::from_secs(1));
            cpu()
        });
        let json = run_json(client, "iperf3", &args);
        let end = cpu();
        (handle.join().expect("sampler"), end, json)
    });
    let received = &json["end"]["sum_received"];
    let bytes = received["bytes"].as_f64().expect("iperf3 bytes");
    let seconds = received["seconds"].as_f64().expect("iperf3 seconds");
    Window {
        per_second: bytes / seconds,
        units: bytes,
        seconds,
        cpu: c1 - c0,
    }
}

/// One-way latency percentiles (microseconds, as sockperf reports: half the round trip) of a
/// TCP ping-pong with `size`-byte messages.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    /// Round trips in the whole run, warm-up included.
    pub round_trips: f64,
    /// CPU seconds the processes under test used over the whole run.
    pub cpu: f64,
}

impl Latency {
    /// CPU microseconds per round trip.
    pub fn cpu_per_round_trip(&self) -> f64 {
        self.cpu / self.round_trips * 1e6
    }
}

pub fn sockperf(
    client: &Pod,
    server: &Pod,
    port: u16,
    size: usize,
    window: Duration,
    cpu: CpuProbe<'_>,
) -> Latency {
    sockperf_via(client, server, port, server.addr(port), size, window, cpu)
}

/// [`sockperf`] with the client aimed at `dst` (a relay in front of `server`:`port`).
pub fn sockperf_via(
    client: &Pod,
    server: &Pod,
    port: u16,
    dst: SocketAddr,
    size: usize,
    window: Duration,
    cpu: CpuProbe<'_>,
) -> Latency {
    let ip = server.ip.to_string();
    let port = port.to_string();
    let _server = Killed(
        server
            .ns
            .open()
            .command("sockperf")
            .args(["server", "--tcp", "-i", &ip, "-p", &port])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("sockperf (apt-get install sockperf)"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let secs = window.as_secs_f64().ceil().max(1.0).to_string();
    let cpu0 = cpu();
    let out = client
        .ns
        .open()
        .command("sockperf")
        .args([
            "ping-pong",
            "--tcp",
            "-i",
            &dst.ip().to_string(),
            "-p",
            &dst.port().to_string(),
            "-m",
            &size.to_string(),
            "-t",
            &secs,
        ])
        .output()
        .expect("sockperf");
    let cpu1 = cpu();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let pct = |p: &str| {
        text.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("sockperf printed no {p} percentile:\n{text}"))
    };
    // "[Total Run] RunTime=…; Warm up time=…; SentMessages=N; ReceivedMessages=N"
    let round_trips = text
        .lines()
        .find(|l| l.contains("[Total Run]"))
        .and_then(|l| l.rsplit("ReceivedMessages=").next())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("sockperf printed no total run:\n{text}"));
    Latency {
        p50: pct("50.000"),
        p99: pct("99.000"),
        round_trips,
        cpu: cpu1 - cpu0,
    }
}

/// New connections per second: each connects, sends one byte, reads one byte back, closes.
/// `per_second` counts completed exchanges; failures are not counted. The server answers on
/// many threads so that a slow first byte on one connection never holds up the next accept.
pub fn connection_rate(
    client: &Pod,
    server: &Pod,
    port: u16,
    threads: usize,
    window: Duration,
) -> Window {
    connection_rate_via(client, server, port, server.addr(port), threads, window)
}

/// [`connection_rate`] with the clients aimed at `dst` (a relay in front of `server`:`port`).
pub fn connection_rate_via(
    client: &Pod,
    server: &Pod,
    port: u16,
    dst: SocketAddr,
    threads: usize,
    window: Duration,
) -> Window {
    rate(server, port, threads, window, move |client_stop, done| {
        let client = client.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            while !client_stop.load(Ordering::Relaxed) {
                let Ok(mut conn) = connect(&client, dst) else {
                    continue;
                };
                if conn.write_all(b"x").is_ok() && conn.read_exact(&mut b).is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    })
}

/// Cold mTLS tunnels per second: each one a new TCP connection, TLS handshake (as
/// `bench/prober`, a certificate from the mesh's CA in `ca_dir`) and HTTP/2 handshake to
/// `target` (a ztunnel's 15008), one CONNECT, one byte each way, close. Clients run in
/// `client`'s netns, one Tokio runtime per thread; the server app is in `server`.
pub fn cold_tunnel_rate(
    ca_dir: &std::path::Path,
    client: &Pod,
    server: &Pod,
    target: &mesh_testbed::relay::HboneTarget,
    threads: usize,
    window: Duration,
) -> Window {
    let port = target
        .authority
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("authority ip:port");
    rate(server, port, threads, window, |client_stop, done| {
        let (ca_dir, target) = (ca_dir.to_path_buf(), target.clone());
        client.ns.spawn_async(move || async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (tls, cert, _certs) =
                mesh_testbed::relay::client_identity(&ca_dir, "bench", "prober").await;
            let mut b = [0u8; 1];
            while !client_stop.load(Ordering::Relaxed) {
                let Ok(mut s) =
                    mesh_testbed::relay::hbone_stream(&tls, cert.clone(), &target).await
                else {
                    continue;
                };
                if s.write_all(b"x").await.is_ok() && s.read_exact(&mut b).await.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    })
}

/// Runs `threads` clients (from `spawn_client`, counting exchanges in `done`) against a
/// one-byte echo server on `server`:`port` for `window`, after a 300 ms warm-up.
fn rate(
    server: &Pod,
    port: u16,
    threads: usize,
    window: Duration,
    mut spawn_client: impl FnMut(Arc<AtomicBool>, Arc<AtomicU64>) -> std::thread::JoinHandle<()>,
) -> Window {
    const SERVER_THREADS: usize = 16;
    let listener = apps::listen(server, port);
    // A receive timeout makes accept return periodically, so server threads notice the stop.
    socket2::SockRef::from(&listener)
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("accept timeout");
    let listener = Arc::new(listener);
    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = (0..SERVER_THREADS)
        .map(|_| {
            let (listener, stop): (Arc<TcpListener>, _) = (listener.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut b = [0u8; 1];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((mut conn, _)) = listener.accept() {
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        if conn.read_exact(&mut b).is_ok() {
                            let _ = conn.write_all(&b);
                        }
                    }
                }
            })
        })
        .collect();
    let done = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..threads)
        .map(|_| spawn_client(stop.clone(), done.clone()))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (n0, t0) = (done.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(window);
    let (n1, seconds) = (done.load(Ordering::Relaxed), t0.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    for t in clients.into_iter().chain(servers) {
        let _ = t.join();
    }
    let units = (n1 - n0) as f64;
    Window {
        per_second: units / seconds,
        units,
        seconds,
        cpu: 0.0,
    }
}

/// Resident memory of a process, KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn process_rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// What `count` idle connections from `client` to `server`:`port` cost the processes in
/// `pids`, KiB per connection (their RSS before, and after every connection has exchanged
/// one byte each way and sits idle). With `warm` > 0 that many connections are opened (and
/// held) before the first reading, so what is shared by all connections (the HBONE pool's
/// TLS connections and their buffers) is not charged to the ones measured. The caller's
/// descriptor limit must allow 2×(`warm` + `count`).
pub fn idle_connection_memory(
    client: &Pod,
    server: &Pod,
    port: u16,
    warm: usize,
    count: usize,
    pids: &[u32],
) -> f64 {
    let rss = || pids.iter().map(|p| process_rss_kib(*p)).sum::<f64>();
    let listener = apps::listen(server, port);
    let total = warm + count;
    let held = std::thread::spawn(move || {
        let mut held = Vec::with_capacity(total);
        let mut b = [0u8; 1];
        while held.len() < total {
            let Ok((mut conn, _)) = listener.accept() else {
                continue;
            };
            if conn.read_exact(&mut b).is_ok() && conn.write_all(&b).is_ok() {
                held.push(conn);
            }
        }
        held
    });
    let mut clients = Vec::with_capacity(total);
    let mut b = [0u8; 1];
    let mut open = |clients: &mut Vec<TcpStream>, n: usize| {
        while clients.len() < n {
            let Ok(mut conn) = connect(client, server.addr(port)) else {
                continue;
            };
            if conn.write_all(b"x").is_ok() && conn.read_exact(&mut b).is_ok() {
                clients.push(conn);
            }
        }
    };
    open(&mut clients, warm);
    std::thread::sleep(Duration::from_millis(500));
    let before = rss();
    open(&mut clients, total);
    let servers = held.join().expect("server thread");
    std::thread::sleep(Duration::from_millis(500));
    let after = rss();
    drop((clients, servers));
    (after - before) / count as f64
}

/// Raises this process's descriptor limit to its hard limit (children inherit it).
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat`.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU seconds (user + system) from a `stat` file of `/proc` (a process's or a thread's).
fn stat_cpu_seconds(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line: indexes 11 and 12 after the ')'.
    // USER_HZ is 100 on every Linux architecture this runs on.
    (ticks(11) + ticks(12)) / 100.0
}

/// The median of sorted samples.
pub fn median(sorted: &[f64]) -> f64 {
    percentile(sorted, 0.5)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// A plain user-space TCP relay: no TLS, no HTTP/2, no redirection rules, `TCP_NODELAY`, 64 KiB
/// copy buffers, two threads with a Tokio runtime each (as ztunnel's two workers). A chain of
/// two (client pod → server pod → app) carries a connection over the same three TCP legs as
/// the tunnel, so it shows what any user-space L4 proxy pays on this machine before doing any
/// work of its own. Stops when dropped.
#[derive(Debug)]
pub struct Relay {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The threads' ids, once each has started.
    tids: Arc<std::sync::Mutex<Vec<i32>>>,
}

impl Relay {
    /// CPU seconds (user + system) its threads have used so far.
    pub fn cpu_seconds(&self) -> f64 {
        self.tids
            .lock()
            .expect("relay tids")
            .iter()
            .map(|tid| stat_cpu_seconds(&format!("/proc/self/task/{tid}/stat")))
            .sum()
    }
}

/// Starts a [`Relay`] in `pod` from `listen` (port 0: any free one) to `upstream`.
pub fn relay(pod: &Pod, listen: SocketAddr, upstream: SocketAddr) -> Relay {
    // With 256 KiB (two allocated per connection) the relayed connection rate was 0.19 of the
    // direct one against 0.30 with 64 KiB (one `--only floor` run each): allocation, not the
    // floor.
    const BUF: usize = 64 * 1024;
    let netns = pod.ns.open();
    let listener = netns
        .run(|| TcpListener::bind(listen))
        .expect("enter the pod netns")
        .unwrap_or_else(|e| panic!("relay listen on {listen}: {e}"));
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("relay address");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let threads = (0..2)
        .map(|_| {
            let listener = listener.try_clone().expect("listener");
            let mut stopped = stopped.clone();
            let tids = tids.clone();
            pod.ns.spawn_async(move || async move {
                tids.lock()
                    .expect("relay tids")
                    .push(nix::unistd::gettid().as_raw());
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let mut down = tokio::select! {
                        _ = stopped.changed() => return,
                        r = listener.accept() => match r {
                            Ok((s, _)) => s,
                            Err(_) => continue,
                        },
                    };
                    tokio::spawn(async move {
                        let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                            return;
                        };
                        let _ = (down.set_nodelay(true), up.set_nodelay(true));
                        let _ =
                            tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, BUF, BUF)
                                .await;
                    });
                }
            })
        })
        .collect();
    Relay {
        addr,
        stop,
        threads,
        tids,
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
