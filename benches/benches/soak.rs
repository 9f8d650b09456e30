//! The soak run: two simulated nodes with real agents and ztunnels and `--pods` pods each,
//! kept busy for `--minutes` with connection churn in both directions, policy changes,
//! ztunnel rolling updates and node-agent restarts. It prints each process's open
//! descriptors and RSS at the start, every few minutes and at the end, and every failed
//! connection; it exits non-zero if any connection failed or a process's descriptors grew.
//!
//! Run: `./x soak` (or `cargo build --release --bins && cargo bench -p benches --bench soak
//! -- [--minutes M] [--pods N]`; 30 minutes and 20 pods by default). Not part of `./x test`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mesh_testbed::apps::{EchoServer, connect, echo_roundtrip};
use mesh_testbed::lab::Pod;
use mesh_testbed::mesh::{Mesh, Workload, config_yaml, eventually};
use nix::sys::signal::Signal;

const PORT: u16 = 8080;
const T: Duration = Duration::from_secs(20);

struct Args {
    minutes: f64,
    pods: usize,
}

fn args() -> Args {
    let mut a = Args {
        minutes: 30.0,
        pods: 20,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let value = || argv.get(i + 1).and_then(|v| v.parse::<f64>().ok());
        match argv[i].as_str() {
            "--minutes" => a.minutes = value().expect("--minutes M"),
            "--pods" => a.pods = value().expect("--pods N") as usize,
            // cargo bench passes --bench.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// One reading: when, and (process, descriptors, RSS in KiB) for each process.
type Sample = (String, Vec<(String, usize, u64)>);

/// Descriptors and RSS (KiB) of one process.
fn usage(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0);
    (fds, rss)
}

/// Which lab process runs each node's ztunnel now (it changes with every rolling update),
/// and how many updates each node has had.
struct Ztunnels {
    current: Vec<(String, String, u32)>,
}

impl Ztunnels {
    fn name(&self, node: &str) -> String {
        let (_, name, _) = self
            .current
            .iter()
            .find(|(n, _, _)| n == node)
            .expect("node");
        name.clone()
    }
}

/// The flags a ztunnel of generation `generation` gets: alternate admin ports so an old and
/// a new one can share the node's namespace during the hand-over.
fn ztunnel_flags(generation: u32) -> Vec<String> {
    let base = if generation.is_multiple_of(2) {
        15000
    } else {
        25000
    };
    vec![
        "--drain-timeout".into(),
        "10s".into(),
        "--admin-addr".into(),
        format!("127.0.0.1:{base}"),
        "--metrics-addr".into(),
        format!("127.0.0.1:{}", base + 20),
        "--readiness-addr".into(),
        format!("127.0.0.1:{}", base + 21),
    ]
}

fn start_ztunnel(m: &mut Mesh, node: &str, generation: u32) -> String {
    let name = format!("ztunnel-{node}-{generation}");
    let flags = ztunnel_flags(generation);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    m.start_ztunnel_as(node, &name, &flags);
    let ready: SocketAddr = flags[7].parse().expect("readiness address");
    let ns = m.lab.node(node).ns.clone();
    assert!(
        eventually(T, || ns
            .http_get(ready, "/healthz/ready")
            .is_ok_and(|(s, _)| s == 200)),
        "{name} never became ready"
    );
    name
}

/// Opens connections between random pairs of `clients` and `servers` on `threads` threads
/// until `stop`; every failure goes to `failures`.
fn churn(
    clients: &[Pod],
    servers: &[Pod],
    threads: usize,
    stop: &Arc<AtomicBool>,
    ok: &Arc<AtomicUsize>,
    failures: &mpsc::Sender<String>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..threads)
        .map(|t| {
            let (clients, servers, stop, ok, failures) = (
                clients.to_vec(),
                servers.to_vec(),
                stop.clone(),
                ok.clone(),
                failures.clone(),
            );
            std::thread::spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    i = i.wrapping_mul(31).wrapping_add(7);
                    let from = &clients[i % clients.len()];
                    let to = &servers[(i / 7) % servers.len()];
                    let data = format!("{}>{} {i}", from.name, to.name);
                    match connect(from, to.addr(PORT), Duration::from_secs(5))
                        .and_then(|c| echo_roundtrip(c, data.as_bytes()))
                    {
                        Ok(got) if got == data.as_bytes() => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(got) => {
                            let _ = failures.send(format!("{data}: got {} bytes", got.len()));
                        }
                        Err(e) => {
                            let _ = failures.send(format!("{data}: {e}"));
                        }
                    }
                }
            })
        })
        .collect()
}

fn main() {
    let args = args();
    let mut m = Mesh::new(&["a", "b"]);
    let mut workloads = Vec::new();
    for node in ["a", "b"] {
        for i in 0..args.pods {
            let pod = m.lab.add_pod(node, &format!("{node}{i}"));
            workloads.push(Workload::mesh(&pod, &format!("ns-{node}"), "app"));
        }
    }
    let refs: Vec<&Workload> = workloads.iter().collect();
    let base = config_yaml(&refs, &[]);
    m.write_config_text(&base);
    let mut z = Ztunnels {
        current: Vec::new(),
    };
    for node in ["a", "b"] {
        let mine: Vec<&Workload> = refs
            .iter()
            .copied()
            .filter(|w| w.pod.node == node)
            .collect();
        m.write_pods(node, &mine, "");
        m.start_agent(node, &[]);
        let name = start_ztunnel(&mut m, node, 0);
        let pid = m.lab.process(&name).pid();
        z.current.push((node.to_string(), name, pid));
    }
    for node in ["a", "b"] {
        let want = format!("ambient_agent_pods_enrolled {}", args.pods);
        assert!(
            eventually(Duration::from_secs(60), || m
                .agent_get(node, "/metrics")
                .1
                .contains(&want)),
            "node {node}: not every pod enrolled"
        );
    }
    let _servers: Vec<EchoServer> = workloads
        .iter()
        .map(|w| EchoServer::start(&w.pod, PORT))
        .collect();
    let (a_pods, b_pods): (Vec<Pod>, Vec<Pod>) = (
        workloads
            .iter()
            .filter(|w| w.pod.node == "a")
            .map(|w| w.pod.clone())
            .collect(),
        workloads
            .iter()
            .filter(|w| w.pod.node == "b")
            .map(|w| w.pod.clone())
            .collect(),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let (tx, failures) = mpsc::channel();
    let mut load = churn(&a_pods, &b_pods, 2, &stop, &ok, &tx);
    load.extend(churn(&b_pods, &a_pods, 2, &stop, &ok, &tx));
    drop(tx);

    let mut samples: Vec<Sample> = Vec::new();
    let sample = |m: &mut Mesh, z: &Ztunnels, label: String| {
        let mut row = Vec::new();
        for node in ["a", "b"] {
            let agent = m.lab.process(&format!("agent-{node}")).pid();
            let (fds, rss) = usage(agent);
            row.push((format!("agent-{node}"), fds, rss));
            let (fds, rss) = usage(m.lab.process(&z.name(node)).pid());
            row.push((format!("ztunnel-{node}"), fds, rss));
        }
        (label, row)
    };
    // Let the pools and caches warm up before the first reading.
    std::thread::sleep(Duration::from_secs(10));
    samples.push(sample(&mut m, &z, "start".into()));

    let started = Instant::now();
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let mut generation = [0u32, 0u32];
    let mut step = 0u64;
    let mut events = Vec::new();
    let mut last_sample = Instant::now();
    while started.elapsed() < total {
        std::thread::sleep(Duration::from_secs(15));
        step += 1;
        // Every 15 s a policy change (a DENY on a port nobody uses, in or out); every minute
        // a ztunnel rolling update or an agent restart, alternating between the nodes.
        if !step.is_multiple_of(2) {
            m.write_config_text(&format!(
                "{base}policies:\n- {{name: churn-{step}, namespace: ns-b, scope: Namespace, action: Deny, rules: [[[{{destinationPorts: [9]}}]]]}}\n"
            ));
        } else {
            m.write_config_text(&base);
        }
        if step.is_multiple_of(4) {
            let node = if (step / 4).is_multiple_of(2) {
                "a"
            } else {
                "b"
            };
            let n = usize::from(node == "b");
            if (step / 8).is_multiple_of(2) {
                generation[n] += 1;
                let old = z.name(node);
                let new = start_ztunnel(&mut m, node, generation[n]);
                m.lab.process(&old).signal(Signal::SIGTERM);
                let exited = m.lab.process(&old).wait_timeout(Duration::from_secs(20));
                assert!(exited.is_some(), "{old} did not exit after draining");
                m.lab.stop(&old);
                let pid = m.lab.process(&new).pid();
                z.current[n] = (node.to_string(), new.clone(), pid);
                events.push(format!(
                    "{:>6.1} min  rolling update on {node}: {old} -> {new}",
                    started.elapsed().as_secs_f64() / 60.0
                ));
            } else {
                m.lab.stop(&format!("agent-{node}"));
                m.start_agent(node, &[]);
                events.push(format!(
                    "{:>6.1} min  agent restart on {node}",
                    started.elapsed().as_secs_f64() / 60.0
                ));
            }
        }
        if last_sample.elapsed() >= Duration::from_secs(300) {
            last_sample = Instant::now();
            let label = format!("{:.0} min", started.elapsed().as_secs_f64() / 60.0);
            samples.push(sample(&mut m, &z, label));
        }
    }
    // The last reading after the churn has settled for a moment.
    std::thread::sleep(Duration::from_secs(5));
    samples.push(sample(&mut m, &z, "end".into()));
    stop.store(true, Ordering::Relaxed);
    for t in load {
        let _ = t.join();
    }
    let failed: Vec<String> = failures.try_iter().collect();

    println!(
        "soak: 2 nodes x {} pods, {:.1} min, {} connections ok, {} failed",
        args.pods,
        args.minutes,
        ok.load(Ordering::Relaxed),
        failed.len()
    );
    for e in &events {
        println!("  {e}");
    }
    println!(
        "\n{:<10} {}",
        "when",
        samples[0]
            .1
            .iter()
            .map(|(n, _, _)| format!("{n:>22}"))
            .collect::<String>()
    );
    for (label, row) in &samples {
        println!(
            "{label:<10} {}",
            row.iter()
                .map(|(_, fds, rss)| format!("{:>22}", format!("{fds} fds {} MiB", rss / 1024)))
                .collect::<String>()
        );
    }
    for f in failed.iter().take(20) {
        println!("failed: {f}");
    }
    // The agents restart and the ztunnels are new processes after updates: compare each
    // role's start with its end, allowing a little slack for pools and timers.
    let (first, last) = (&samples[0].1, &samples[samples.len() - 1].1);
    let mut grew = Vec::new();
    for ((name, fds0, _), (_, fds1, _)) in first.iter().zip(last) {
        if *fds1 > fds0 + 16 {
            grew.push(format!("{name}: {fds0} -> {fds1} fds"));
        }
    }
    if !grew.is_empty() {
        println!("descriptors grew: {grew:?}");
    }
    if !failed.is_empty() || !grew.is_empty() {
        std::process::exit(1);
    }
}
