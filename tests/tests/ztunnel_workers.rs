//! How ztunnel uses its worker threads and sockets for speed: a peer's HBONE connections are
//! spread over the workers, and each kind of socket gets the congestion control meant for it.

use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::Duration;

use mesh_testbed::apps::{EchoServer, connect, payload};
use mesh_testbed::lab::Pod;
use mesh_testbed::mesh::{Scene, eventually};
use mesh_testbed::relay::{self, HboneTarget};
use ztunnel::identity::Identity;

const T: Duration = Duration::from_secs(5);

/// Inbound HBONE connections per worker, from node `node`'s `/debug/workers`.
fn inbound_hbone_per_worker(s: &Scene, node: &str) -> Vec<u64> {
    let (status, body) =
        s.m.lab
            .node(node)
            .ns
            .http_get("127.0.0.1:15000".parse().unwrap(), "/debug/workers")
            .unwrap();
    assert_eq!(status, 200, "{body}");
    let loads: serde_json::Value = serde_json::from_str(&body).unwrap();
    loads
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["inbound_hbone"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_peers_hbone_connections_are_spread_over_the_workers() {
    // Left to the kernel's SO_REUSEPORT hash, 8 connections split 4/4 over two workers only
    // about one time in four.
    const CONNECTIONS: usize = 8;
    let mut s = Scene::new();
    s.m.write_config(&[&s.wa, &s.wb], &[]);
    // The testbed runs every ztunnel with two workers.
    s.m.start_ztunnel("b", &[]);
    s.m.enroll(&s.wb);
    let _server = EchoServer::start(&s.b1, 8080);
    assert_eq!(inbound_hbone_per_worker(&s, "b"), [0, 0]);

    // A peer in a1's netns (a1 is not enrolled, so nothing captures it) opens each stream on
    // a connection of its own and keeps them all open while the test looks.
    let target = HboneTarget {
        addr: s.b1.addr(15008),
        identity: Identity::new("cluster.local", "ns-b", "server").unwrap(),
        authority: s.b1.addr(8080).to_string(),
    };
    let ca_dir = s.m.ca_dir.clone();
    let netns = s.a1.ns.open();
    let (opened, all_open) = mpsc::channel::<()>();
    let (done, finish) = mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        netns
            .run(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let (tls, cert, _certs) =
                        relay::client_identity(&ca_dir, "ns-a", "client").await;
                    let mut streams = Vec::new();
                    for _ in 0..CONNECTIONS {
                        let stream = relay::hbone_stream(&tls, cert.clone(), &target).await;
                        streams.push(stream.expect("an HBONE stream to b1"));
                    }
                    opened.send(()).unwrap();
                    // The connections are driven by this runtime while the test looks.
                    let _ = tokio::task::spawn_blocking(move || finish.recv()).await;
                    drop(streams);
                })
            })
            .expect("enter a1's netns")
    });
    all_open.recv_timeout(T * 4).expect("HBONE streams opened");
    let mut seen = Vec::new();
    let even = eventually(T, || {
        seen = inbound_hbone_per_worker(&s, "b");
        seen == [4, 4]
    });
    done.send(()).unwrap();
    peer.join().unwrap();
    assert!(even, "inbound HBONE connections per worker: {seen:?}");
    // Each is uncounted when it closes.
    assert!(
        eventually(T * 3, || inbound_hbone_per_worker(&s, "b") == [0, 0]),
        "{:?}",
        inbound_hbone_per_worker(&s, "b")
    );
}

/// (local address, peer address, congestion control) of every established TCP socket in
/// `pod`'s netns, from `ss -tin`.
fn congestion_controls(pod: &Pod) -> Vec<(String, String, String)> {
    let out = pod.ns.exec("ss", &["-Htin", "state", "established"]);
    let mut sockets = Vec::new();
    let mut lines = out.lines().peekable();
    while let Some(line) = lines.next() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Recv-Q Send-Q Local Peer, then an indented line of details led by the algorithm.
        let (Some(local), Some(peer)) = (fields.get(2), fields.get(3)) else {
            continue;
        };
        let cc = lines
            .next_if(|l| l.starts_with(char::is_whitespace))
            .and_then(|l| l.split_whitespace().next().map(str::to_string))
            .unwrap_or_default();
        sockets.push((local.to_string(), peer.to_string(), cc));
    }
    sockets
}

/// The congestion control of the one socket in `pod` whose local or peer address ends in
/// `port` (`:15008`, say) on the side given.
fn congestion_of(pod: &Pod, local_port: Option<&str>, peer_port: Option<&str>) -> String {
    let all = congestion_controls(pod);
    let found: Vec<_> = all
        .iter()
        .filter(|(l, p, _)| {
            local_port.is_none_or(|port| l.ends_with(port))
                && peer_port.is_none_or(|port| p.ends_with(port))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one socket with local {local_port:?}, peer {peer_port:?} in {}: {all:?}",
        pod.name
    );
    found[0].2.clone()
}

#[test]
fn app_facing_sockets_never_pace_and_hbone_ones_use_what_is_configured() {
    let mut s = Scene::new();
    // A default the proxy does not pick itself (and any netns may choose), so what it picked
    // shows.
    for pod in [&s.a1, &s.b1] {
        pod.ns
            .exec("sysctl", &["-qw", "net.ipv4.tcp_congestion_control=reno"]);
    }
    s.m.write_config(&[&s.wa, &s.wb], &[]);
    s.m.start_ztunnel("a", &[]);
    s.m.start_ztunnel("b", &["--hbone-congestion-control", "cubic"]);
    s.m.enroll(&s.wa);
    s.m.enroll(&s.wb);
    let _server = EchoServer::start(&s.b1, 8080);
    let mut live = connect(&s.a1, s.b1.addr(8080), T).unwrap();
    live.set_read_timeout(Some(T)).unwrap();
    let data = payload("CC", 1000);
    live.write_all(&data).unwrap();
    let mut back = vec![0; data.len()];
    live.read_exact(&mut back).unwrap();
    assert_eq!(back, data);

    // a1: the app's own socket keeps the pod's default; ztunnel's end of the captured
    // connection (accepted on 15001) and its pooled HBONE connection, from a ztunnel with no
    // --hbone-congestion-control, as the pod's default would have them.
    assert_eq!(congestion_of(&s.a1, None, Some(":8080")), "reno");
    assert_eq!(congestion_of(&s.a1, Some(":15001"), None), "cubic");
    assert_eq!(congestion_of(&s.a1, None, Some(":15008")), "reno");
    // b1: the accepted HBONE connection has the configured algorithm; ztunnel's connection
    // to the app never paces; the app's accepted socket keeps the default.
    assert_eq!(congestion_of(&s.b1, Some(":15008"), None), "cubic");
    assert_eq!(congestion_of(&s.b1, None, Some(":8080")), "cubic");
    assert_eq!(congestion_of(&s.b1, Some(":8080"), None), "reno");
}
