//! A rolling update of ztunnel and restarts of the node agent under continuous load: every
//! new connection made through the whole hand-over must succeed, and a long-lived connection
//! on the old ztunnel must finish normally within the drain deadline.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mesh_testbed::apps::{EchoServer, connect, echo_roundtrip};
use mesh_testbed::lab::Pod;
use mesh_testbed::mesh::{Scene, eventually};
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(10);

/// Opens connection after connection from `from` to `to` (one round trip each, on
/// `THREADS` threads at once) until told to stop; counts successes, remembers failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

/// Several at once, so that connections are in flight (and in accept queues) whenever a
/// listener closes.
const THREADS: usize = 3;

impl Load {
    fn start(from: &Pod, to: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let threads = (0..THREADS)
            .map(|t| {
                let (from, s, n) = (from.clone(), stop.clone(), ok.clone());
                std::thread::spawn(move || {
                    let mut failures = Vec::new();
                    let mut i = 0u64;
                    while !s.load(Ordering::Relaxed) {
                        i += 1;
                        let data = format!("conn-{t}-{i}");
                        let mut port = 0;
                        match connect(&from, to, Duration::from_secs(5)).and_then(|c| {
                            port = c.local_addr().map(|a| a.port()).unwrap_or(0);
                            echo_roundtrip(c, data.as_bytes())
                        }) {
                            Ok(got) if got == data.as_bytes() => {
                                n.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(got) => failures.push(format!("{data}: got {got:?}")),
                            Err(e) => failures.push(format!(
                                "{data} from port {port}: {e} at {:?}",
                                std::time::SystemTime::now()
                                    .duration_since(std::time::UNIX_EPOCH)
                                    .unwrap_or_default()
                            )),
                        }
                    }
                    failures
                })
            })
            .collect();
        Load { stop, ok, threads }
    }

    fn count(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `more` further connections have succeeded.
    fn wait_for(&self, more: usize) {
        let target = self.count() + more;
        assert!(
            eventually(T, || self.count() >= target),
            "the load stalled at {}",
            self.count()
        );
    }

    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("load thread"))
            .collect();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

#[test]
fn a_rolling_update_and_agent_restarts_lose_no_connection() {
    let mut s = Scene::new();
    s.run_with_agents(&["--drain-timeout", "8s"]);
    let _to_b = EchoServer::start(&s.b1, 8080);
    let _to_a = EchoServer::start(&s.a1, 8081);

    // A long-lived connection through the old ztunnel on node a.
    let mut long = connect(&s.a1, s.b1.addr(8080), T).unwrap();
    long.set_read_timeout(Some(T)).unwrap();
    let mut buf = [0u8; 4];
    long.write_all(b"old1").unwrap();
    long.read_exact(&mut buf).unwrap();

    // Outbound from a's pod and inbound to it, both through node a's ztunnels.
    let out = Load::start(&s.a1, s.b1.addr(8080));
    let inb = Load::start(&s.b1, s.a1.addr(8081));
    out.wait_for(20);
    inb.wait_for(20);

    // The new ztunnel starts beside the old one and takes every pod over ZDS.
    s.m.start_ztunnel_as(
        "a",
        "ztunnel-a-new",
        &[
            "--drain-timeout",
            "8s",
            "--admin-addr",
            "127.0.0.1:25000",
            "--metrics-addr",
            "127.0.0.1:25020",
            "--readiness-addr",
            "127.0.0.1:25021",
        ],
    );
    let node = s.m.lab.node("a").ns.clone();
    let ready = || {
        node.http_get("127.0.0.1:25021".parse().unwrap(), "/healthz/ready")
            .is_ok_and(|(status, _)| status == 200)
    };
    assert!(eventually(T, ready), "the new ztunnel never became ready");
    out.wait_for(20);
    inb.wait_for(20);

    // The old one is told to go: it drains while the new one serves.
    let told = Instant::now();
    s.m.lab.process("ztunnel-a").signal(Signal::SIGTERM);
    out.wait_for(30);
    inb.wait_for(30);
    // The long-lived connection still works on the old ztunnel, then ends normally.
    long.write_all(b"old2").unwrap();
    long.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"old2");
    long.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    long.read_to_end(&mut rest)
        .expect("the long-lived connection did not end cleanly");
    let status =
        s.m.lab
            .process("ztunnel-a")
            .wait_timeout(Duration::from_secs(10))
            .expect("the old ztunnel did not exit");
    assert!(status.success(), "old ztunnel: {status:?}");
    assert!(
        told.elapsed() < Duration::from_secs(8),
        "{:?}",
        told.elapsed()
    );
    assert!(s.m.ztunnel_log("a").contains("connections_cut=0"));
    out.wait_for(20);
    inb.wait_for(20);

    // The node agent restarts twice under the same load.
    for _ in 0..2 {
        s.m.lab.stop("agent-a");
        out.wait_for(10);
        s.m.start_agent("a", &[]);
        assert!(eventually(T, || s.m.agent_get("a", "/readyz").0 == 200));
        out.wait_for(20);
        inb.wait_for(20);
    }

    let (out_ok, out_failed) = out.finish();
    let (in_ok, in_failed) = inb.finish();
    assert!(
        out_failed.is_empty() && in_failed.is_empty(),
        "outbound: {out_ok} ok, failed {out_failed:?}\ninbound: {in_ok} ok, failed {in_failed:?}\nold ztunnel:\n{}\nnew ztunnel:\n{}",
        s.m.ztunnel_log("a"),
        s.m.lab.process("ztunnel-a-new").log_text()
    );
}
