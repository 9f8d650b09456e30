//! Fuzz entry point (`fuzz/`, replayed from its corpus by `tests/tests/fuzz_corpora.rs`):
//! arbitrary bytes as a sequence of datagrams, fed to both session halves.
//!
//! Each datagram is framed as two bytes, `[fds << 6 | len >> 8, len & 0xff]`, then up to `len`
//! bytes of payload; `fds` (0 to 3) descriptors of `/dev/null` travel with it to the ztunnel
//! half. The node-agent half takes the first datagram as ztunnel's hello and every later one as
//! the answer to a request it has in flight.

use std::fs::File;
use std::os::fd::OwnedFd;

use crate::client::{ClientSession, Command};
use crate::server::{Request, ServerSession};

/// Runs one input through both halves; panics only if an invariant breaks.
pub fn datagrams(data: &[u8]) {
    let mut client = ClientSession::new();
    let mut server = ServerSession::new();
    let mut rest = data;
    let mut first = true;
    while let [head, low, tail @ ..] = rest {
        let fds = usize::from(head >> 6);
        let len = (usize::from(head & 0x3f) << 8 | usize::from(*low)).min(tail.len());
        let (datagram, next) = tail.split_at(len);
        rest = next;
        let descriptors: Vec<OwnedFd> = (0..fds)
            .filter_map(|_| File::open("/dev/null").ok().map(OwnedFd::from))
            .collect();
        let was_live = client.snapshot_done();
        match client.on_request(datagram, descriptors) {
            Ok(Command::Add { uid, .. }) | Ok(Command::Del { uid }) => assert!(!uid.is_empty()),
            Ok(Command::Keep { uid }) => assert!(!uid.is_empty() && !was_live),
            Ok(Command::Reconcile { keep }) => {
                assert!(!was_live && client.snapshot_done());
                assert!(keep.iter().all(|uid| !uid.is_empty()));
            }
            Err(_) => assert_eq!(client.snapshot_done(), was_live),
        }
        if first {
            first = false;
            let _ = server.on_hello(datagram);
        } else if server
            .start(&Request::Del {
                uid: "ns/pod".into(),
            })
            .is_ok()
        {
            let _ = server.on_response(datagram);
        }
    }
}
