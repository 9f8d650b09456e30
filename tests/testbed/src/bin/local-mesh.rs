//! `local-mesh`: a real multi-node mesh on one machine, driven end to end, with a report.
//!
//! ```text
//! local-mesh [--nodes N] [--pods M] [--ip-family ipv4|ipv6|dual] [--keep]
//!                                              build, drive, report, remove (or keep)
//! local-mesh down                              remove a mesh left by --keep
//! ```
//!
//! Each simulated node runs the real `node-agent` (installing the CNI plugin into the node's
//! CNI config) and the real `ztunnel`; pods are created through the real CNI path. See
//! [`mesh_testbed::demo`]. Everything is removed on exit, including on Ctrl-C, unless
//! `--keep` is given.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};

use mesh_testbed::demo::{self, KEPT_ID, LocalMesh, Options};
use mesh_testbed::lab::purge;
use nix::sys::signal::{SigSet, Signal};

const USAGE: &str =
    "usage: local-mesh [--nodes N] [--pods M] [--ip-family F] [--keep] | local-mesh down
  --nodes N       simulated nodes (default 2)
  --pods M        extra load pods per node, each talking to its twin on the next node (default 0)
  --ip-family F   ipv4, ipv6 or dual: the addresses of nodes, pods and services (default
                  ipv4); with dual every path is driven over both
  --keep          leave the mesh running and print how to poke at it
  down            remove a mesh left running by --keep";

fn step(msg: &str) {
    eprintln!("• {msg}");
}

/// Set once Ctrl-C or SIGTERM arrived: the signal thread is tearing everything down, so
/// failures the main thread sees from then on are its doing, not news.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn fail(msg: &str) -> ! {
    if INTERRUPTED.load(Ordering::Acquire) {
        loop {
            std::thread::park();
        }
    }
    eprintln!("local-mesh: {msg}");
    std::process::exit(2);
}

fn kept_dir() -> Option<std::path::PathBuf> {
    std::fs::read_dir(std::env::temp_dir())
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{KEPT_ID}-")))
        })
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut opts = Options::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut number = |name: &str| -> Result<usize, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--nodes" => opts.nodes = number("--nodes")?,
            "--pods" => opts.load_pods = number("--pods")?,
            "--keep" => opts.keep = true,
            "--ip-family" => {
                opts.family = it
                    .next()
                    .ok_or("--ip-family needs ipv4, ipv6 or dual")?
                    .parse()?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(opts)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(why) = mesh_testbed::preflight() {
        fail(&why);
    }
    if args.first().is_some_and(|a| a == "down") {
        match kept_dir() {
            Some(dir) => {
                step(&format!("removing the kept mesh ({})", dir.display()));
                purge(KEPT_ID);
            }
            None => eprintln!("local-mesh: no kept mesh to remove"),
        }
        return;
    }
    let opts = parse(&args).unwrap_or_else(|e| fail(&format!("{e}\n{USAGE}")));
    if opts.keep
        && let Some(dir) = kept_dir()
    {
        fail(&format!(
            "a kept mesh is already running ({}); remove it with `local-mesh down`",
            dir.display()
        ));
    }
    // Ctrl-C and SIGTERM go to a thread that removes what was built, since the main thread
    // cannot unwind from a signal.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().expect("block signals");
    let lab = LocalMesh::lab(&opts).unwrap_or_else(|e| fail(&e));
    let lab_id = lab.id().to_string();
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            INTERRUPTED.store(true, Ordering::Release);
            eprintln!("\nlocal-mesh: {sig:?}: removing everything it created");
            purge(&lab_id);
            std::process::exit(130);
        }
    });

    let mut progress = |msg: &str| step(msg);
    let mut mesh = LocalMesh::up(lab, &opts, &mut progress).unwrap_or_else(|e| fail(&e));
    let report = mesh.drive(&mut progress);
    println!();
    print!("{}", demo::render(&report));
    println!();
    let failures = report.failures();
    if opts.keep {
        let frontend = mesh.pod("frontend").pod.clone();
        let backend = mesh.pod("backend").pod.clone();
        let node = mesh.nets[0].ns.name.clone();
        let dir = mesh.keep();
        println!(
            "The mesh keeps running (files and logs in {}). Try:",
            dir.display()
        );
        println!(
            "  ip netns exec {} bash                       # a shell in the frontend pod",
            frontend.ns.name
        );
        println!(
            "  ip netns exec {} busybox nc {} 8080   # type a line: backend echoes it over HBONE",
            frontend.ns.name, backend.ip
        );
        println!(
            "  ip netns exec {node} curl -s 127.0.0.1:8000/pods         # the node agent's view of its pods"
        );
        println!(
            "  ip netns exec {node} curl -s 127.0.0.1:8000/metrics      # the node agent's metrics"
        );
        println!(
            "  ip netns exec {node} curl -s 127.0.0.1:15021/healthz/ready  # ztunnel readiness"
        );
        let admin = mesh_testbed::binary("ztunnel-admin");
        println!(
            "  ip netns exec {node} {} certs   # also: workloads, policies, connections, pool, log",
            admin.display()
        );
        println!(
            "  ip netns exec {node} curl -s 127.0.0.1:15020/metrics | grep istio_tcp   # Istio's metrics"
        );
        println!(
            "  tail -f {}/ztunnel-node-1.log                  # ztunnel's access log (JSON)",
            dir.display()
        );
        println!("  local-mesh down    (or ./x mesh down)            # remove it");
    } else {
        step("running CNI DEL for every pod, then removing nodes, processes and files");
        if let Err(left) = mesh.down() {
            eprintln!("local-mesh: CNI DEL left something behind:\n{left}");
            std::process::exit(1);
        }
    }
    if failures > 0 {
        eprintln!("local-mesh: {failures} path(s) failed");
        std::process::exit(1);
    }
}
