//! The node-agent half of a ZDS session: a sans-IO [`ServerSession`] that enforces the
//! exchange, and [`Connection`], a thin async driver over [`SeqPacket`].

use std::os::fd::BorrowedFd;

use prost::Message;

use crate::client::WorkloadInfo;
use crate::proto::{self, workload_request::Payload};
use crate::transport::{RecvError, SeqPacket};
use crate::{ACK_DEADLINE, ProtocolError};

/// One request the agent can make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Add { uid: String, info: WorkloadInfo },
    Keep { uid: String },
    SnapshotSent,
    Del { uid: String },
}

impl Request {
    /// The short name used in logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Add { .. } => "add",
            Request::Keep { .. } => "keep",
            Request::SnapshotSent => "snapshot_sent",
            Request::Del { .. } => "del",
        }
    }

    fn encode(&self) -> Vec<u8> {
        let payload = match self {
            Request::Add { uid, info } => Payload::Add(proto::AddWorkload {
                uid: uid.clone(),
                workload_info: Some(proto::WorkloadInfo {
                    name: info.name.clone(),
                    namespace: info.namespace.clone(),
                    service_account: info.service_account.clone(),
                    dns_nameservers: info
                        .dns_nameservers
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                }),
            }),
            Request::Keep { uid } => Payload::Keep(proto::KeepWorkload { uid: uid.clone() }),
            Request::SnapshotSent => Payload::SnapshotSent(proto::SnapshotSent {}),
            Request::Del { uid } => Payload::Del(proto::DelWorkload { uid: uid.clone() }),
        };
        proto::WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec()
    }
}

/// Misuse of the session by the agent's own code (a bug, not a peer fault).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsageError {
    #[error("no hello received yet")]
    NoHello,
    #[error("a {0} request is already in flight")]
    InFlight(&'static str),
    #[error("keep is only valid before snapshot_sent")]
    KeepAfterSnapshot,
    #[error("snapshot already sent")]
    SnapshotAgain,
    #[error("no request in flight")]
    NothingInFlight,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    Snapshot,
    Live,
}

/// One ZDS connection, from the agent's side.
#[derive(Debug)]
pub struct ServerSession {
    phase: Phase,
    in_flight: Option<&'static str>,
}

impl Default for ServerSession {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerSession {
    pub fn new() -> Self {
        Self {
            phase: Phase::AwaitHello,
            in_flight: None,
        }
    }

    /// Validates ztunnel's hello.
    pub fn on_hello(&mut self, data: &[u8]) -> Result<(), ProtocolError> {
        if self.phase != Phase::AwaitHello {
            return Err(ProtocolError::Unexpected("second hello"));
        }
        let hello =
            proto::ZdsHello::decode(data).map_err(|e| ProtocolError::Decode(e.to_string()))?;
        if hello.version != proto::Version::V1 as i32 {
            return Err(ProtocolError::Version(hello.version));
        }
        self.phase = Phase::Snapshot;
        Ok(())
    }

    /// Whether `snapshot_sent` has gone out.
    pub fn live(&self) -> bool {
        self.phase == Phase::Live
    }

    /// Encodes `req` and marks it in flight. The caller attaches the netns fd to an add.
    pub fn start(&mut self, req: &Request) -> Result<Vec<u8>, UsageError> {
        if let Some(kind) = self.in_flight {
            return Err(UsageError::InFlight(kind));
        }
        match (&self.phase, req) {
            (Phase::AwaitHello, _) => return Err(UsageError::NoHello),
            (Phase::Live, Request::Keep { .. }) => return Err(UsageError::KeepAfterSnapshot),
            (Phase::Live, Request::SnapshotSent) => return Err(UsageError::SnapshotAgain),
            (Phase::Snapshot, Request::SnapshotSent) => self.phase = Phase::Live,
            _ => {}
        }
        self.in_flight = Some(req.kind());
        Ok(req.encode())
    }

    /// Decodes ztunnel's answer to the request in flight: `Ok(Ok(()))` is an ack,
    /// `Ok(Err(reason))` a NACK.
    pub fn on_response(&mut self, data: &[u8]) -> Result<Result<(), String>, ProtocolError> {
        if self.in_flight.take().is_none() {
            return Err(ProtocolError::Unexpected(
                "response with no request in flight",
            ));
        }
        let resp = proto::WorkloadResponse::decode(data)
            .map_err(|e| ProtocolError::Decode(e.to_string()))?;
        match resp.payload {
            Some(proto::workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(Ok(())),
            Some(proto::workload_response::Payload::Ack(ack)) => Ok(Err(ack.error)),
            None => Err(ProtocolError::EmptyPayload),
        }
    }
}

/// Why a request on a [`Connection`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("ztunnel rejected {kind}: {reason}")]
    Nack { kind: &'static str, reason: String },
    #[error("no answer to {0} within {ACK_DEADLINE:?}")]
    Timeout(&'static str),
    #[error("ztunnel broke the protocol")]
    Protocol(#[from] ProtocolError),
    #[error("ZDS receive failed")]
    Recv(#[from] RecvError),
    #[error("ZDS send failed")]
    Send(#[from] std::io::Error),
    #[error(transparent)]
    Usage(#[from] UsageError),
}

impl RequestError {
    /// Whether the connection is still usable after this error (only a NACK leaves it so).
    pub fn connection_usable(&self) -> bool {
        matches!(self, RequestError::Nack { .. })
    }
}

/// An async ZDS connection from the agent's side.
#[derive(Debug)]
pub struct Connection {
    sock: SeqPacket,
    session: ServerSession,
}

impl Connection {
    /// Reads and validates the hello from a freshly accepted socket.
    pub async fn accept(sock: SeqPacket) -> Result<Self, RequestError> {
        let mut session = ServerSession::new();
        let hello = tokio::time::timeout(ACK_DEADLINE, sock.recv())
            .await
            .map_err(|_| RequestError::Timeout("hello"))??;
        if !hello.fds.is_empty() {
            return Err(ProtocolError::FdCount {
                kind: "hello",
                got: hello.fds.len(),
            }
            .into());
        }
        session.on_hello(&hello.data)?;
        Ok(Self { sock, session })
    }

    /// Sends `req` (with `netns` attached for an add) and waits for the answer.
    pub async fn request(
        &mut self,
        req: &Request,
        netns: Option<BorrowedFd<'_>>,
    ) -> Result<(), RequestError> {
        let data = self.session.start(req)?;
        let fds: Vec<BorrowedFd<'_>> = netns.into_iter().collect();
        self.sock.send(&data, &fds).await?;
        let resp = tokio::time::timeout(ACK_DEADLINE, self.sock.recv())
            .await
            .map_err(|_| RequestError::Timeout(req.kind()))??;
        if !resp.fds.is_empty() {
            return Err(ProtocolError::FdCount {
                kind: "ack",
                got: resp.fds.len(),
            }
            .into());
        }
        self.session
            .on_response(&resp.data)?
            .map_err(|reason| RequestError::Nack {
                kind: req.kind(),
                reason,
            })
    }

    /// Sends arbitrary bytes and descriptors as if they were a request, bypassing the
    /// session's checks, and returns ztunnel's answer. For conformance tests that play a
    /// hostile agent; the product never calls it.
    pub async fn send_raw(
        &mut self,
        data: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Result<(), String>, RequestError> {
        self.sock.send(data, fds).await?;
        let resp = tokio::time::timeout(ACK_DEADLINE, self.sock.recv())
            .await
            .map_err(|_| RequestError::Timeout("raw request"))??;
        let resp = proto::WorkloadResponse::decode(resp.data.as_slice())
            .map_err(|e| ProtocolError::Decode(e.to_string()))?;
        match resp.payload {
            Some(proto::workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(Ok(())),
            Some(proto::workload_response::Payload::Ack(ack)) => Ok(Err(ack.error)),
            None => Err(ProtocolError::EmptyPayload.into()),
        }
    }

    /// Waits until ztunnel closes the connection (any datagram it sends unprompted is a
    /// protocol error).
    pub async fn closed(&self) -> RequestError {
        match self.sock.recv().await {
            Ok(_) => ProtocolError::Unexpected("unsolicited datagram").into(),
            Err(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{self, ClientSession, Command};

    fn add(uid: &str) -> Request {
        Request::Add {
            uid: uid.into(),
            info: WorkloadInfo::default(),
        }
    }

    #[test]
    fn session_enforces_order_and_one_in_flight() {
        let mut s = ServerSession::new();
        assert_eq!(s.start(&add("a")), Err(UsageError::NoHello));
        s.on_hello(&ClientSession::hello()).unwrap();
        s.start(&add("a")).unwrap();
        assert_eq!(s.start(&add("b")), Err(UsageError::InFlight("add")));
        assert_eq!(s.on_response(&client::ack(Ok(()))), Ok(Ok(())));
        s.start(&Request::Keep { uid: "k".into() }).unwrap();
        assert_eq!(
            s.on_response(&client::ack(Err("no".into()))),
            Ok(Err("no".into()))
        );
        s.start(&Request::SnapshotSent).unwrap();
        s.on_response(&client::ack(Ok(()))).unwrap().unwrap();
        assert!(s.live());
        assert_eq!(
            s.start(&Request::Keep { uid: "k".into() }),
            Err(UsageError::KeepAfterSnapshot)
        );
        assert_eq!(
            s.start(&Request::SnapshotSent),
            Err(UsageError::SnapshotAgain)
        );
        assert!(s.on_response(&client::ack(Ok(()))).is_err());
    }

    #[test]
    fn bad_hellos_are_rejected() {
        let mut s = ServerSession::new();
        assert!(matches!(
            s.on_hello(&[0xff, 0x01]),
            Err(ProtocolError::Decode(_))
        ));
        let v0 = proto::ZdsHello { version: 0 }.encode_to_vec();
        assert_eq!(s.on_hello(&v0), Err(ProtocolError::Version(0)));
    }

    #[test]
    fn both_halves_agree_on_the_wire() {
        let mut server = ServerSession::new();
        let mut client = ClientSession::new();
        server.on_hello(&ClientSession::hello()).unwrap();
        let info = WorkloadInfo {
            name: "pod".into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            dns_nameservers: vec!["198.18.0.53".parse().unwrap(), "fd00::53".parse().unwrap()],
        };
        let data = server
            .start(&Request::Add {
                uid: "u1".into(),
                info: info.clone(),
            })
            .unwrap();
        let fd = std::fs::File::open("/dev/null").unwrap().into();
        match client.on_request(&data, vec![fd]).unwrap() {
            Command::Add { uid, info: got, .. } => {
                assert_eq!(uid, "u1");
                assert_eq!(got, info);
            }
            other => panic!("{other:?}"),
        }
        server.on_response(&client::ack(Ok(()))).unwrap().unwrap();
        let data = server.start(&Request::Del { uid: "u1".into() }).unwrap();
        assert!(
            matches!(client.on_request(&data, vec![]), Ok(Command::Del { uid }) if uid == "u1")
        );
    }
}
