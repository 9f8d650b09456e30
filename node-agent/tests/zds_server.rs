//! The agent's ZDS server against scripted ztunnels, including hostile ones.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use mesh_netns::NetNs;
use mesh_zds::client::{self, ClientSession, Command, WorkloadInfo};
use mesh_zds::transport::SeqPacket;
use node_agent::zds::{ZdsError, ZdsServer};

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "ns".into(),
        service_account: "sa".into(),
        dns_nameservers: Vec::new(),
    }
}

fn netns() -> Arc<NetNs> {
    Arc::new(NetNs::current().unwrap())
}

/// What a scripted ztunnel saw, in order.
type Seen = Arc<std::sync::Mutex<Vec<String>>>;

/// A ztunnel that acks everything except uids in `nack`, recording what it receives.
async fn ztunnel(path: std::path::PathBuf, nack: Vec<&'static str>, seen: Seen) {
    let sock = SeqPacket::connect(&path).await.unwrap();
    sock.send(&ClientSession::hello(), &[]).await.unwrap();
    let mut session = ClientSession::new();
    loop {
        let Ok(d) = sock.recv().await else { return };
        let cmd = session.on_request(&d.data, d.fds).unwrap();
        let (line, uid) = match &cmd {
            Command::Add { uid, .. } => (format!("add {uid}"), uid.clone()),
            Command::Keep { uid } => (format!("keep {uid}"), uid.clone()),
            Command::Reconcile { .. } => ("snapshot".to_string(), String::new()),
            Command::Del { uid } => (format!("del {uid}"), uid.clone()),
        };
        seen.lock().unwrap().push(line);
        let result = if nack.contains(&uid.as_str()) {
            Err(format!("cannot serve {uid}"))
        } else {
            Ok(())
        };
        if sock.send(&client::ack(result), &[]).await.is_err() {
            return;
        }
    }
}

async fn wait_connected(server: &ZdsServer, n: usize) {
    let mut rx = server.watch_connected();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|c| *c == n))
        .await
        .expect("connection count")
        .unwrap();
}

fn setup() -> (ZdsServer, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zds.sock");
    (ZdsServer::new(), dir, path)
}

#[tokio::test]
async fn snapshot_then_live_updates_with_rolling_update_rules() {
    let (server, _dir, path) = setup();
    server.keep("kept", info("kept"));
    assert!(matches!(
        server.add("p1", info("p1"), netns()).await,
        Err(ZdsError::NoZtunnel)
    ));
    tokio::spawn(server.serve(&path).unwrap());

    let old: Seen = Arc::default();
    tokio::spawn(ztunnel(path.clone(), vec![], old.clone()));
    wait_connected(&server, 1).await;
    assert_eq!(*old.lock().unwrap(), ["keep kept", "add p1", "snapshot"]);
    assert!(server.acked("p1"));

    // A second ztunnel (rolling update) gets the same snapshot; new adds go only to it.
    let new: Seen = Arc::default();
    tokio::spawn(ztunnel(path.clone(), vec![], new.clone()));
    wait_connected(&server, 2).await;
    server.add("p2", info("p2"), netns()).await.unwrap();
    server.del("p1").await.unwrap();
    assert_eq!(
        *old.lock().unwrap(),
        ["keep kept", "add p1", "snapshot", "del p1"]
    );
    assert_eq!(
        *new.lock().unwrap(),
        ["keep kept", "add p1", "snapshot", "add p2", "del p1"]
    );
}

#[tokio::test]
async fn nacks_are_surfaced() {
    let (server, _dir, path) = setup();
    tokio::spawn(server.serve(&path).unwrap());
    tokio::spawn(ztunnel(path.clone(), vec!["bad"], Arc::default()));
    wait_connected(&server, 1).await;
    let err = server.add("bad", info("bad"), netns()).await.unwrap_err();
    let text = format!("{err}: {:?}", err);
    assert!(text.contains("cannot serve bad"), "{text}");
    assert!(!server.acked("bad"));
    server.add("good", info("good"), netns()).await.unwrap();
}

#[tokio::test]
async fn hostile_or_vanishing_peers_do_not_hurt_the_others() {
    let (server, _dir, path) = setup();
    server.add("p1", info("p1"), netns()).await.unwrap_err();
    server.add("p2", info("p2"), netns()).await.unwrap_err();
    tokio::spawn(server.serve(&path).unwrap());

    let mut hostile: VecDeque<Vec<u8>> = VecDeque::from([
        vec![0xff, 0xff, 0xff], // garbage hello
        vec![0x08, 0x07],       // hello with an unknown version
        vec![0u8; 4000],        // oversized
    ]);
    while let Some(bytes) = hostile.pop_front() {
        let sock = SeqPacket::connect(&path).await.unwrap();
        sock.send(&bytes, &[]).await.unwrap();
        // The server hangs up on it.
        let closed = tokio::time::timeout(Duration::from_secs(5), sock.recv())
            .await
            .unwrap();
        assert!(closed.is_err(), "server answered {bytes:?}");
    }
    // A ztunnel that vanishes in the middle of its snapshot.
    {
        let sock = SeqPacket::connect(&path).await.unwrap();
        sock.send(&ClientSession::hello(), &[]).await.unwrap();
        let first = sock.recv().await.unwrap();
        assert!(!first.data.is_empty());
        drop(sock);
    }
    // One that sends an unsolicited datagram after its snapshot.
    {
        let seen: Seen = Arc::default();
        let sock = SeqPacket::connect(&path).await.unwrap();
        sock.send(&ClientSession::hello(), &[]).await.unwrap();
        let mut session = ClientSession::new();
        for _ in 0..3 {
            let d = sock.recv().await.unwrap();
            session.on_request(&d.data, d.fds).unwrap();
            sock.send(&client::ack(Ok(())), &[]).await.unwrap();
        }
        wait_connected(&server, 1).await;
        sock.send(b"unsolicited", &[]).await.unwrap();
        wait_connected(&server, 0).await;
        drop(seen);
    }
    // A well-behaved ztunnel still gets everything.
    let good: Seen = Arc::default();
    tokio::spawn(ztunnel(path.clone(), vec![], good.clone()));
    wait_connected(&server, 1).await;
    assert_eq!(*good.lock().unwrap(), ["add p1", "add p2", "snapshot"]);
    server.add("p3", info("p3"), netns()).await.unwrap();
}

#[tokio::test]
async fn a_ztunnel_that_stops_answering_is_dropped() {
    let (server, _dir, path) = setup();
    tokio::spawn(server.serve(&path).unwrap());
    let sock = SeqPacket::connect(&path).await.unwrap();
    sock.send(&ClientSession::hello(), &[]).await.unwrap();
    let d = sock.recv().await.unwrap(); // snapshot_sent, never answered
    assert!(!d.data.is_empty());
    // The 5 s deadline passes; the server gives up on it.
    let closed = tokio::time::timeout(Duration::from_secs(8), sock.recv())
        .await
        .unwrap();
    assert!(closed.is_err());
    assert_eq!(server.connected(), 0);
}
