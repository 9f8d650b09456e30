//! The data-path benchmark: tunnelled pod-to-pod traffic between two simulated nodes,
//! each figure beside the same measurement on the direct path (two pods that are not in the
//! mesh, same nodes, same links) taken in the same run, interleaved and repeated.
//!
//! Throughput is iperf3 (`-P 1` and `-P 4`), latency is sockperf ping-pong with 1 KiB
//! messages (one-way, half the round trip, as sockperf reports), and the connection rate is
//! this package's own generator (connect, 1 byte each way, close; 4 client threads). Cold
//! tunnels are that exchange over a new mTLS + HTTP/2 connection each, from an HBONE client
//! in this process to the server's ztunnel. Memory is both ztunnels' RSS growth per idle
//! tunnelled connection (1,000 of them, after 16 held open so the HBONE pool is up and not
//! charged to them; `--memory-warm 0` charges it), taken before any other figure. "Rules on ÷
//! off" is the plain connection rate into the direct server pod with the agent's ruleset
//! installed (inbound not captured: the kernel's cost of the rules and conntrack, no proxy),
//! over the same pod without it, the two alternating rep by rep.
//! "Plain relay" rows join the direct pods with a minimal user-space TCP relay in each
//! (`benches::relay`: no TLS, no HTTP/2, no rules) and measure it against the direct path, rep
//! by rep: the three TCP legs any in-pod L4 proxy adds, before any work of its own, and the
//! relays' CPU per GiB on the single stream and per ping-pong round trip beside both ztunnels'
//! (`--only floor` runs just those). CPU is user plus system time from `/proc`.
//!
//! Run: `./x bench` (or `cargo build --release --bins && cargo bench -p benches --bench
//! datapath -- [--reps N] [--seconds S] [--only NAME] [--tunnel-only]`). Prints a table and
//! writes `target/bench/datapath.json`. `--hold SECONDS` measures nothing: it keeps the scene up
//! for profiling (its pods' netns names are printed), with the plain relays joining the direct
//! pods to ports 5201 and 11111 in b2.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use benches::{
    Relay, Window, cold_tunnel_rate, connection_rate, connection_rate_via, idle_connection_memory,
    iperf3, iperf3_via, median, process_cpu_seconds, raise_fd_limit, relay, sockperf, sockperf_via,
};
use mesh_testbed::lab::Pod;
use mesh_testbed::mesh::{Mesh, Workload};

struct Args {
    reps: usize,
    seconds: f64,
    /// Run only figures whose name contains this.
    only: Option<String>,
    /// Skip the direct measurements (for profiling the tunnel).
    tunnel_only: bool,
    /// Client threads for the connection-rate figure.
    conn_threads: usize,
    /// Connections held open before the memory figure's first reading.
    memory_warm: usize,
    /// Extra arguments for both ztunnels (`--ztunnel-arg --hbone-congestion-control
    /// --ztunnel-arg cubic`).
    ztunnel_args: Vec<String>,
    /// ztunnel's log filter (default `info`: one access-log line per connection, as deployed).
    log: String,
    /// Keep the mesh up this long (or until stdin closes) after set-up, measuring nothing: for
    /// profiling by hand.
    hold: Option<Duration>,
}

fn args() -> Args {
    let mut a = Args {
        reps: 3,
        seconds: 3.0,
        only: None,
        tunnel_only: false,
        conn_threads: 4,
        memory_warm: 16,
        hold: None,
        ztunnel_args: Vec::new(),
        log: "info".to_string(),
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        match argv[i].as_str() {
            "--reps" => {
                a.reps = argv
                    .get(i + 1)
                    .and_then(|v| v.parse().ok())
                    .expect("--reps N");
                i += 1;
            }
            "--seconds" => {
                a.seconds = argv
                    .get(i + 1)
                    .and_then(|v| v.parse().ok())
                    .expect("--seconds S");
                i += 1;
            }
            "--tunnel-only" => a.tunnel_only = true,
            "--memory-warm" => {
                a.memory_warm = argv
                    .get(i + 1)
                    .and_then(|v| v.parse().ok())
                    .expect("--memory-warm N");
                i += 1;
            }
            "--conn-threads" => {
                a.conn_threads = argv
                    .get(i + 1)
                    .and_then(|v| v.parse().ok())
                    .expect("--conn-threads N");
                i += 1;
            }
            "--hold" => {
                a.hold = argv
                    .get(i + 1)
                    .and_then(|v| v.parse().ok())
                    .map(Duration::from_secs_f64);
                assert!(a.hold.is_some(), "--hold SECONDS");
                i += 1;
            }
            "--ztunnel-arg" => {
                a.ztunnel_args
                    .push(argv.get(i + 1).cloned().expect("--ztunnel-arg ARG"));
                i += 1;
            }
            "--log" => {
                a.log = argv.get(i + 1).cloned().expect("--log FILTER");
                i += 1;
            }
            "--only" => {
                a.only = argv.get(i + 1).cloned();
                i += 1;
            }
            _ => {} // cargo passes --bench
        }
        i += 1;
    }
    a
}

fn tune(pod: &Pod) {
    // Fast connection churn needs ports back quickly.
    pod.ns.exec(
        "sysctl",
        &["-qw", "net.ipv4.ip_local_port_range=1024 65000"],
    );
    pod.ns.exec("sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"]);
}

struct Pair<'a> {
    client: &'a Pod,
    server: &'a Pod,
}

/// With `--hold`, the relays between the direct pods lead to these ports in b2: iperf3's and
/// sockperf's defaults, one pair each (sockperf cannot bind a port a closed connection still
/// holds in TIME_WAIT).
const HOLD_RELAY_APPS: [u16; 2] = [5201, 11111];

/// A plain relay in each pod, from the client pod's loopback to `app` in the server pod, and
/// the address that enters them; they stop when the relays are dropped.
fn relay_pair(client: &Pod, server: &Pod, app: u16) -> ([Relay; 2], SocketAddr) {
    let lo: IpAddr = if client.ip.is_ipv6() {
        Ipv6Addr::LOCALHOST.into()
    } else {
        Ipv4Addr::LOCALHOST.into()
    };
    let server_side = relay(server, SocketAddr::new(server.ip, 0), server.addr(app));
    let client_side = relay(client, SocketAddr::new(lo, 0), server_side.addr);
    let entry = client_side.addr;
    ([server_side, client_side], entry)
}

/// CPU seconds the relays' threads have used so far.
fn relays_cpu(relays: &[Relay]) -> f64 {
    relays.iter().map(Relay::cpu_seconds).sum()
}

fn main() {
    let args = args();
    // 1,000 idle connections hold 2,000 descriptors here and as many in each ztunnel.
    raise_fd_limit();
    let window = Duration::from_secs_f64(args.seconds);
    let mut m = Mesh::new(&["a", "b"]);
    m.log = args.log.clone();
    let a1 = m.lab.add_pod("a", "a1");
    let b1 = m.lab.add_pod("b", "b1");
    let a2 = m.lab.add_pod("a", "a2");
    let b2 = m.lab.add_pod("b", "b2");
    for p in [&a1, &b1, &a2, &b2] {
        tune(p);
    }
    let wa = Workload::mesh(&a1, "bench", "client");
    let wb = Workload::mesh(&b1, "bench", "server");
    m.write_config(&[&wa, &wb], &[]);
    let extra: Vec<&str> = args.ztunnel_args.iter().map(String::as_str).collect();
    m.start_ztunnel("a", &extra);
    m.start_ztunnel("b", &extra);
    m.enroll(&wa);
    m.enroll(&wb);
    let pids = [
        m.lab.process("ztunnel-a").pid(),
        m.lab.process("ztunnel-b").pid(),
    ];
    let cpu = move || pids.iter().map(|p| process_cpu_seconds(*p)).sum::<f64>();
    let no_cpu = || 0.0;
    if let Some(hold) = args.hold {
        for p in [&a1, &b1, &a2, &b2] {
            eprintln!("pod {}: netns {} address {}", p.name, p.ns.name, p.ip);
        }
        // The floor's relays too, so that a profile of ztunnel can be set beside one of a
        // proxy that only copies, under the same load.
        let mut relays = Vec::new();
        for app in HOLD_RELAY_APPS {
            let (pair, entry) = relay_pair(&a2, &b2, app);
            eprintln!(
                "plain relays (threads of this process): a2 -> {entry} -> {} -> {}",
                pair[0].addr,
                b2.addr(app)
            );
            relays.extend(pair);
        }
        eprintln!(
            "holding the mesh for {hold:?} or until stdin closes (a1 -> b1 tunnelled, a2 -> b2 direct)"
        );
        let (closed, wait) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            let _ = closed.send(());
        });
        let _ = wait.recv_timeout(hold);
        return;
    }
    let direct = Pair {
        client: &a2,
        server: &b2,
    };
    let tunnel = Pair {
        client: &a1,
        server: &b1,
    };
    let mut port = 20000u16;
    let mut next_port = || {
        port += 1;
        port
    };

    eprintln!(
        "benchmark: {} reps x {:.1}s per figure; direct = pods outside the mesh on the same nodes",
        args.reps, args.seconds
    );
    let mut rows: Vec<Row> = Vec::new();
    let wanted = |name: &str| args.only.as_deref().is_none_or(|o| name.contains(o));

    // Memory per idle tunnelled connection, before any other load: memory the allocators
    // freed after earlier figures (and not yet returned to the kernel) would otherwise be
    // reused without growing RSS, and the figure read low (2.2 KiB in one run, 6.0-7.0 in
    // others, when it came after the cold tunnels).
    let memory_kib = wanted("memory").then(|| {
        idle_connection_memory(
            tunnel.client,
            tunnel.server,
            next_port(),
            args.memory_warm,
            1000,
            &pids,
        )
    });

    // Throughput, 1 and 4 streams, and CPU per GiB on the single stream.
    let mut cpu_per_gib = Vec::new();
    // The same on the single stream through the plain relays (the floor, below).
    let mut relay_cpu_per_gib = Vec::new();
    // CPU per 1 KiB round trip, from the latency figure (ztunnels) and the floor (relays).
    let (mut cpu_per_rt, mut relay_cpu_per_rt) = (Vec::new(), Vec::new());
    for streams in [1usize, 4] {
        if !wanted("throughput") {
            break;
        }
        let (mut d, mut t) = (Vec::new(), Vec::new());
        for _ in 0..args.reps {
            if !args.tunnel_only {
                d.push(
                    iperf3(
                        direct.client,
                        direct.server,
                        next_port(),
                        streams,
                        window,
                        &no_cpu,
                    )
                    .per_second,
                );
            }
            let w: Window = iperf3(
                tunnel.client,
                tunnel.server,
                next_port(),
                streams,
                window,
                &cpu,
            );
            t.push(w.per_second);
            cpu_per_gib.push(w.cpu / (w.units / (1u64 << 30) as f64));
        }
        d.sort_by(f64::total_cmp);
        t.sort_by(f64::total_cmp);
        rows.push(Row::ratio(
            &format!(
                "throughput, {streams} stream{}",
                if streams > 1 { "s" } else { "" }
            ),
            median(&d),
            median(&t),
            "GB/s",
            1e-9,
            if streams == 1 { 0.40 } else { 0.50 },
        ));
    }

    // Added latency on a 1 KiB ping-pong (sockperf: one-way, half the round trip).
    let (mut d, mut t) = (Vec::new(), Vec::new());
    let (mut d99, mut t99) = (Vec::new(), Vec::new());
    for _ in 0..args.reps {
        if !wanted("latency") {
            break;
        }
        if !args.tunnel_only {
            let l = sockperf(
                direct.client,
                direct.server,
                next_port(),
                1024,
                window,
                &no_cpu,
            );
            d.push(l.p50);
            d99.push(l.p99);
        }
        let l = sockperf(
            tunnel.client,
            tunnel.server,
            next_port(),
            1024,
            window,
            &cpu,
        );
        t.push(l.p50);
        t99.push(l.p99);
        cpu_per_rt.push(l.cpu_per_round_trip());
    }
    for v in [&mut d, &mut t, &mut d99, &mut t99] {
        v.sort_by(f64::total_cmp);
    }
    if wanted("latency") {
        let p50 = Row::added("latency p50, 1 KiB ping-pong", median(&d), median(&t), 25.0);
        // The bar for p99 is twice the added p50 of the same run.
        let bar99 = 2.0 * p50.raw.2;
        rows.push(p50);
        rows.push(Row::added(
            "latency p99, 1 KiB ping-pong",
            median(&d99),
            median(&t99),
            bar99,
        ));
    }

    // New connections per second.
    let conn_rate = |pair: &Pair, port: u16| {
        connection_rate(pair.client, pair.server, port, args.conn_threads, window).per_second
    };
    let (mut d, mut t) = (Vec::new(), Vec::new());
    for _ in 0..args.reps {
        if !wanted("connections") {
            break;
        }
        if !args.tunnel_only {
            d.push(conn_rate(&direct, next_port()));
        }
        t.push(conn_rate(&tunnel, next_port()));
    }
    d.sort_by(f64::total_cmp);
    t.sort_by(f64::total_cmp);
    let direct_rate = median(&d);
    if wanted("connections") {
        rows.push(Row::ratio(
            "new connections, warm pool",
            direct_rate,
            median(&t),
            "conn/s",
            1.0,
            0.40,
        ));
    }

    // Cold mTLS tunnels: a new HBONE connection to b1's ztunnel for each exchange.
    if wanted("cold") {
        let target = mesh_testbed::relay::HboneTarget {
            addr: tunnel.server.addr(15008),
            identity: ztunnel::identity::Identity::new("cluster.local", "bench", "server")
                .expect("identity"),
            authority: tunnel.server.addr(next_port()).to_string(),
        };
        let mut cold: Vec<f64> = (0..args.reps)
            .map(|_| {
                let port = next_port();
                let target = mesh_testbed::relay::HboneTarget {
                    authority: tunnel.server.addr(port).to_string(),
                    ..target.clone()
                };
                cold_tunnel_rate(
                    &m.ca_dir,
                    direct.client,
                    tunnel.server,
                    &target,
                    args.conn_threads,
                    window,
                )
                .per_second
            })
            .collect();
        cold.sort_by(f64::total_cmp);
        rows.push(Row::absolute(
            "cold mTLS tunnels",
            direct_rate,
            median(&cold),
            "conn/s",
            ">= 1000/s",
            median(&cold) >= 1000.0,
        ));
    }

    // Memory per idle tunnelled connection, measured first (shown in its row below).
    if let Some(kib) = memory_kib {
        rows.push(Row::absolute(
            "memory per idle connection",
            f64::NAN,
            kib,
            "KiB",
            "<= 8 KiB",
            kib <= 8.0,
        ));
    }

    // The floor: the direct pods joined by a plain relay in each (no TLS, no HTTP/2, no rules),
    // so a connection crosses the same three TCP legs as a tunnelled one. Direct and relayed
    // alternate rep by rep.
    if wanted("floor") && !args.tunnel_only {
        let (c, s) = (direct.client, direct.server);
        let relayed = |app: u16| relay_pair(c, s, app);
        let (mut tp, mut rtp) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
        let (mut lat, mut rlat, mut conn, mut rconn) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.reps {
            for (i, streams) in [1usize, 4].into_iter().enumerate() {
                tp[i].push(iperf3(c, s, next_port(), streams, window, &no_cpu).per_second);
                let app = next_port();
                let (relays, dst) = relayed(app);
                let cpu = || relays_cpu(&relays);
                let w = iperf3_via(c, s, app, dst, streams, window, &cpu);
                rtp[i].push(w.per_second);
                if streams == 1 {
                    relay_cpu_per_gib.push(w.cpu / (w.units / (1u64 << 30) as f64));
                }
            }
            lat.push(sockperf(c, s, next_port(), 1024, window, &no_cpu).p50);
            {
                let app = next_port();
                let (relays, dst) = relayed(app);
                let cpu = || relays_cpu(&relays);
                let l = sockperf_via(c, s, app, dst, 1024, window, &cpu);
                rlat.push(l.p50);
                relay_cpu_per_rt.push(l.cpu_per_round_trip());
            }
            conn.push(conn_rate(&direct, next_port()));
            let app = next_port();
            let (_relays, dst) = relayed(app);
            rconn.push(connection_rate_via(c, s, app, dst, args.conn_threads, window).per_second);
        }
        for v in tp
            .iter_mut()
            .chain(rtp.iter_mut())
            .chain([&mut lat, &mut rlat, &mut conn, &mut rconn])
        {
            v.sort_by(f64::total_cmp);
        }
        for (i, streams) in ["1 stream", "4 streams"].into_iter().enumerate() {
            rows.push(Row::ratio(
                &format!("plain relay: {streams}"),
                median(&tp[i]),
                median(&rtp[i]),
                "GB/s",
                1e-9,
                f64::NAN,
            ));
        }
        rows.push(Row::added(
            "plain relay: latency p50",
            median(&lat),
            median(&rlat),
            f64::NAN,
        ));
        rows.push(Row::ratio(
            "plain relay: new connections",
            median(&conn),
            median(&rconn),
            "conn/s",
            1.0,
            f64::NAN,
        ));
    }

    // The kernel's cost of the agent's rules on new connections into a pod.
    if wanted("rules") {
        // Off and on alternate, so that a slow spell of the VM does not land on one side only.
        let (mut off, mut on) = (Vec::new(), Vec::new());
        for _ in 0..args.reps {
            off.push(conn_rate(&direct, next_port()));
            mesh_testbed::agent::install_redirection_with(
                direct.server,
                node_agent::redirect::Options {
                    capture_inbound: false,
                    ..Default::default()
                },
            );
            on.push(conn_rate(&direct, next_port()));
            mesh_testbed::agent::remove_redirection(direct.server);
        }
        off.sort_by(f64::total_cmp);
        on.sort_by(f64::total_cmp);
        rows.push(Row::ratio(
            "conn/s into a pod, rules on/off",
            median(&off),
            median(&on),
            "conn/s",
            1.0,
            0.9,
        ));
    }

    cpu_per_gib.sort_by(f64::total_cmp);
    let cpu_gib = median(&cpu_per_gib);
    relay_cpu_per_gib.sort_by(f64::total_cmp);
    let relay_cpu_gib = median(&relay_cpu_per_gib);
    cpu_per_rt.sort_by(f64::total_cmp);
    let cpu_rt = median(&cpu_per_rt);
    relay_cpu_per_rt.sort_by(f64::total_cmp);
    let relay_cpu_rt = median(&relay_cpu_per_rt);

    println!();
    println!(
        "{:<28} {:>14} {:>14} {:>10} {:>10}",
        "figure", "direct", "tunnel", "result", "bar"
    );
    for r in &rows {
        println!(
            "{:<28} {:>14} {:>14} {:>10} {:>10}",
            r.name, r.direct, r.tunnel, r.result, r.bar
        );
    }
    for (name, value, bar) in [
        ("CPU-s per GiB, both ztunnels", cpu_gib, "<= 1.10"),
        ("CPU-s per GiB, plain relays", relay_cpu_gib, "-"),
        ("CPU us/round trip, ztunnels", cpu_rt, "-"),
        ("CPU us/round trip, relays", relay_cpu_rt, "-"),
    ] {
        if !value.is_nan() {
            println!(
                "{:<28} {:>14} {:>14} {:>10} {:>10}",
                name,
                "-",
                "-",
                format!("{value:.2}"),
                bar
            );
        }
    }
    let json = serde_json::json!({
        "reps": args.reps,
        "seconds": args.seconds,
        "figures": rows.iter().map(|r| serde_json::json!({
            "name": r.name, "direct": r.raw.0, "tunnel": r.raw.1, "result": r.raw.2,
        })).collect::<Vec<_>>(),
        "cpu_seconds_per_gib": cpu_gib,
        "relay_cpu_seconds_per_gib": relay_cpu_gib,
        "cpu_us_per_round_trip": cpu_rt,
        "relay_cpu_us_per_round_trip": relay_cpu_rt,
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(
        out.join("datapath.json"),
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    );
}

struct Row {
    name: String,
    direct: String,
    tunnel: String,
    result: String,
    bar: String,
    raw: (f64, f64, f64),
}

impl Row {
    fn ratio(name: &str, direct: f64, tunnel: f64, unit: &str, scale: f64, bar: f64) -> Self {
        let r = tunnel / direct;
        Self {
            name: name.into(),
            direct: format!("{:.2} {unit}", direct * scale),
            tunnel: format!("{:.2} {unit}", tunnel * scale),
            result: format!("{r:.2}x"),
            bar: if bar.is_nan() {
                "-".into()
            } else {
                format!(">= {bar:.2}")
            },
            raw: (direct, tunnel, r),
        }
    }

    /// A figure with an absolute bar; `direct` (NaN: none) is shown for scale.
    fn absolute(name: &str, direct: f64, tunnel: f64, unit: &str, bar: &str, met: bool) -> Self {
        Self {
            name: name.into(),
            direct: if direct.is_nan() {
                "-".into()
            } else {
                format!("{direct:.0} {unit}")
            },
            tunnel: format!("{tunnel:.1} {unit}"),
            result: format!("{tunnel:.1}{}", if met { "" } else { " (!)" }),
            bar: bar.into(),
            raw: (direct, tunnel, tunnel),
        }
    }

    fn added(name: &str, direct: f64, tunnel: f64, bar: f64) -> Self {
        let added = tunnel - direct;
        Self {
            name: name.into(),
            direct: format!("{direct:.1} us"),
            tunnel: format!("{tunnel:.1} us"),
            result: format!("+{added:.1} us"),
            bar: if bar.is_nan() {
                "-".into()
            } else {
                format!("<= +{bar:.0} us")
            },
            raw: (direct, tunnel, added),
        }
    }
}
