//! The ztunnel half of a ZDS session, sans IO.
//!
//! Feed each received datagram to [`ClientSession::on_request`]; it returns the [`Command`] to
//! carry out or the [`ProtocolError`] to NACK with. Encode answers with [`ack`].

use std::collections::HashSet;
use std::os::fd::OwnedFd;

use prost::Message;

use crate::ProtocolError;
use crate::proto::{self, workload_request::Payload};

/// Identity facts the agent sends with an add.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkloadInfo {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The pod's own DNS upstreams (empty: ztunnel's), from the agent's view of the pod.
    pub dns_nameservers: Vec<std::net::IpAddr>,
}

/// What the agent asks ztunnel to do.
#[derive(Debug)]
pub enum Command {
    /// Start (or replace, if the netns differs) the proxy for this pod.
    Add {
        uid: String,
        info: WorkloadInfo,
        netns: OwnedFd,
    },
    /// Keep this pod's proxy running; its netns cannot be handed over right now.
    Keep { uid: String },
    /// The snapshot is complete: stop every pod proxy whose uid is not in `keep`.
    Reconcile { keep: HashSet<String> },
    /// Stop the proxy for this pod.
    Del { uid: String },
}

/// Where a session is in the exchange.
#[derive(Debug)]
enum Phase {
    Snapshot { named: HashSet<String> },
    Live,
}

/// One ZDS connection, from ztunnel's side.
#[derive(Debug)]
pub struct ClientSession {
    phase: Phase,
}

impl Default for ClientSession {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientSession {
    pub fn new() -> Self {
        Self {
            phase: Phase::Snapshot {
                named: HashSet::new(),
            },
        }
    }

    /// The first datagram ztunnel sends on a new connection.
    pub fn hello() -> Vec<u8> {
        proto::ZdsHello {
            version: proto::Version::V1 as i32,
        }
        .encode_to_vec()
    }

    /// Whether the initial snapshot has been received in full.
    pub fn snapshot_done(&self) -> bool {
        matches!(self.phase, Phase::Live)
    }

    /// Validates one request datagram and says what to do. Descriptors that do not belong to a
    /// valid add are dropped (closed) here.
    pub fn on_request(
        &mut self,
        data: &[u8],
        mut fds: Vec<OwnedFd>,
    ) -> Result<Command, ProtocolError> {
        let req = proto::WorkloadRequest::decode(data)
            .map_err(|e| ProtocolError::Decode(e.to_string()))?;
        let payload = req.payload.ok_or(ProtocolError::EmptyPayload)?;
        let expect_no_fds = |fds: &Vec<OwnedFd>, kind| {
            if fds.is_empty() {
                Ok(())
            } else {
                Err(ProtocolError::FdCount {
                    kind,
                    got: fds.len(),
                })
            }
        };
        match payload {
            Payload::Add(add) => {
                if fds.len() != 1 {
                    return Err(ProtocolError::FdCount {
                        kind: "add",
                        got: fds.len(),
                    });
                }
                if add.uid.is_empty() {
                    return Err(ProtocolError::MissingUid("add"));
                }
                let info = add
                    .workload_info
                    .ok_or_else(|| ProtocolError::MissingWorkloadInfo(add.uid.clone()))?;
                let dns_nameservers = nameservers(&add.uid, &info.dns_nameservers)?;
                if let Phase::Snapshot { named } = &mut self.phase {
                    named.insert(add.uid.clone());
                }
                Ok(Command::Add {
                    uid: add.uid,
                    info: WorkloadInfo {
                        name: info.name,
                        namespace: info.namespace,
                        service_account: info.service_account,
                        dns_nameservers,
                    },
                    netns: fds.pop().expect("length checked"),
                })
            }
            Payload::Keep(keep) => {
                expect_no_fds(&fds, "keep")?;
                if keep.uid.is_empty() {
                    return Err(ProtocolError::MissingUid("keep"));
                }
                match &mut self.phase {
                    Phase::Snapshot { named } => {
                        named.insert(keep.uid.clone());
                        Ok(Command::Keep { uid: keep.uid })
                    }
                    Phase::Live => Err(ProtocolError::KeepAfterSnapshot(keep.uid)),
                }
            }
            Payload::SnapshotSent(_) => {
                expect_no_fds(&fds, "snapshot_sent")?;
                match std::mem::replace(&mut self.phase, Phase::Live) {
                    Phase::Snapshot { named } => Ok(Command::Reconcile { keep: named }),
                    Phase::Live => Err(ProtocolError::DuplicateSnapshot),
                }
            }
            Payload::Del(del) => {
                expect_no_fds(&fds, "del")?;
                if del.uid.is_empty() {
                    return Err(ProtocolError::MissingUid("del"));
                }
                if let Phase::Snapshot { named } = &mut self.phase {
                    named.remove(&del.uid);
                }
                Ok(Command::Del { uid: del.uid })
            }
        }
    }
}

/// Encodes the answer to one request: `Ok` acks, `Err` NACKs with the reason.
pub fn ack(result: Result<(), String>) -> Vec<u8> {
    proto::WorkloadResponse {
        payload: Some(proto::workload_response::Payload::Ack(proto::Ack {
            error: result.err().unwrap_or_default(),
        })),
    }
    .encode_to_vec()
}

/// The agent's nameservers for pod `uid`: IP addresses only; anything else refuses the add
/// rather than forwarding the pod's DNS somewhere unmeant.
fn nameservers(uid: &str, raw: &[String]) -> Result<Vec<std::net::IpAddr>, ProtocolError> {
    raw.iter()
        .map(|s| {
            s.parse()
                .map_err(|_| ProtocolError::BadNameserver(uid.to_string(), s.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, WorkloadRequest};

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    fn enc(p: Payload) -> Vec<u8> {
        WorkloadRequest { payload: Some(p) }.encode_to_vec()
    }

    fn add(uid: &str) -> Vec<u8> {
        enc(Payload::Add(AddWorkload {
            uid: uid.into(),
            workload_info: Some(proto::WorkloadInfo {
                name: "p".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
                dns_nameservers: Vec::new(),
            }),
        }))
    }

    fn keep(uid: &str) -> Vec<u8> {
        enc(Payload::Keep(KeepWorkload { uid: uid.into() }))
    }

    fn del(uid: &str) -> Vec<u8> {
        enc(Payload::Del(DelWorkload { uid: uid.into() }))
    }

    fn snap() -> Vec<u8> {
        enc(Payload::SnapshotSent(SnapshotSent {}))
    }

    #[test]
    fn snapshot_collects_adds_and_keeps_then_goes_live() {
        let mut s = ClientSession::new();
        assert!(
            matches!(s.on_request(&add("a"), vec![fd()]), Ok(Command::Add { ref uid, .. }) if uid == "a")
        );
        assert!(matches!(
            s.on_request(&keep("b"), vec![]),
            Ok(Command::Keep { .. })
        ));
        assert!(matches!(
            s.on_request(&add("c"), vec![fd()]),
            Ok(Command::Add { .. })
        ));
        assert!(matches!(
            s.on_request(&del("c"), vec![]),
            Ok(Command::Del { .. })
        ));
        match s.on_request(&snap(), vec![]) {
            Ok(Command::Reconcile { keep }) => {
                assert_eq!(keep, HashSet::from(["a".to_string(), "b".to_string()]));
            }
            other => panic!("{other:?}"),
        }
        assert!(s.snapshot_done());
        assert!(matches!(
            s.on_request(&add("d"), vec![fd()]),
            Ok(Command::Add { .. })
        ));
    }

    #[test]
    fn malformed_requests_are_named_errors() {
        let cases: Vec<(&str, Vec<u8>, usize, ProtocolError)> = vec![
            (
                "garbage",
                vec![0xff, 0xff, 0xff],
                0,
                ProtocolError::Decode(String::new()),
            ),
            ("empty", vec![], 0, ProtocolError::EmptyPayload),
            (
                "add without fd",
                add("a"),
                0,
                ProtocolError::FdCount {
                    kind: "add",
                    got: 0,
                },
            ),
            (
                "add with two fds",
                add("a"),
                2,
                ProtocolError::FdCount {
                    kind: "add",
                    got: 2,
                },
            ),
            (
                "del with fd",
                del("a"),
                1,
                ProtocolError::FdCount {
                    kind: "del",
                    got: 1,
                },
            ),
            (
                "keep with fd",
                keep("a"),
                1,
                ProtocolError::FdCount {
                    kind: "keep",
                    got: 1,
                },
            ),
            (
                "snapshot with fd",
                snap(),
                1,
                ProtocolError::FdCount {
                    kind: "snapshot_sent",
                    got: 1,
                },
            ),
            (
                "add without uid",
                add(""),
                1,
                ProtocolError::MissingUid("add"),
            ),
            (
                "del without uid",
                del(""),
                0,
                ProtocolError::MissingUid("del"),
            ),
            (
                "add with a nameserver that is not an address",
                enc(Payload::Add(AddWorkload {
                    uid: "x".into(),
                    workload_info: Some(proto::WorkloadInfo {
                        dns_nameservers: vec!["resolver.local".into()],
                        ..Default::default()
                    }),
                })),
                1,
                ProtocolError::BadNameserver("x".into(), "resolver.local".into()),
            ),
            (
                "add without info",
                enc(Payload::Add(AddWorkload {
                    uid: "x".into(),
                    workload_info: None,
                })),
                1,
                ProtocolError::MissingWorkloadInfo("x".into()),
            ),
        ];
        for (name, data, nfds, want) in cases {
            let mut s = ClientSession::new();
            let got = s
                .on_request(&data, (0..nfds).map(|_| fd()).collect())
                .unwrap_err();
            match (&got, &want) {
                (ProtocolError::Decode(_), ProtocolError::Decode(_)) => {}
                _ => assert_eq!(got, want, "{name}"),
            }
            // A rejected request leaves the session usable.
            assert!(s.on_request(&add("ok"), vec![fd()]).is_ok(), "{name}");
        }
    }

    #[test]
    fn keep_and_second_snapshot_after_live_are_errors() {
        let mut s = ClientSession::new();
        s.on_request(&snap(), vec![]).unwrap();
        assert_eq!(
            s.on_request(&keep("a"), vec![]).unwrap_err(),
            ProtocolError::KeepAfterSnapshot("a".into())
        );
        assert_eq!(
            s.on_request(&snap(), vec![]).unwrap_err(),
            ProtocolError::DuplicateSnapshot
        );
    }

    #[test]
    fn ack_encodes_error_text() {
        let ok = proto::WorkloadResponse::decode(ack(Ok(())).as_slice()).unwrap();
        let nack = proto::WorkloadResponse::decode(ack(Err("boom".into())).as_slice()).unwrap();
        let text = |r: proto::WorkloadResponse| match r.payload {
            Some(proto::workload_response::Payload::Ack(a)) => a.error,
            None => panic!("no ack"),
        };
        assert_eq!(text(ok), "");
        assert_eq!(text(nack), "boom");
    }
}
