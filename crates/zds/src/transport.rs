//! The ZDS transport: an `AF_UNIX` `SOCK_SEQPACKET` socket carrying one message per datagram,
//! with file descriptors passed as `SCM_RIGHTS`.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use tokio::io::unix::AsyncFd;

use crate::MAX_DATAGRAM;

/// Room for the kernel's own limit of descriptors per message (SCM_MAX_FD), so that every
/// descriptor a peer sends is received and closed by us rather than truncated and leaked.
const MAX_FDS: usize = 253;

/// One received datagram.
#[derive(Debug)]
pub struct Datagram {
    pub data: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Why a receive failed.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("peer closed the connection")]
    Closed,
    #[error("datagram larger than {MAX_DATAGRAM} bytes (truncated)")]
    Truncated,
    #[error("ancillary data truncated")]
    ControlTruncated,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A connected SEQPACKET socket.
#[derive(Debug)]
pub struct SeqPacket {
    fd: AsyncFd<OwnedFd>,
}

/// Registers an owned descriptor with the Tokio reactor.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `OwnedFd` owns the descriptor, so it stays open exactly as long as the AsyncFd
    // that holds it and is closed only after deregistration.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

fn new_socket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

impl SeqPacket {
    /// Who is at the other end (`SO_PEERCRED`: the peer's uid, gid and pid when it connected).
    pub fn peer_credentials(&self) -> io::Result<socket::UnixCredentials> {
        socket::getsockopt(self, socket::sockopt::PeerCredentials).map_err(io::Error::from)
    }

    /// Connects to the listener at `path`. Must be called within a Tokio runtime.
    pub async fn connect(path: &Path) -> io::Result<Self> {
        let fd = new_socket()?;
        let addr = UnixAddr::new(path)?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {}
            // A non-blocking unix connect only waits when the listener's backlog is full.
            Err(nix::Error::EAGAIN) | Err(nix::Error::EINPROGRESS) => {
                let fd = register(fd)?;
                fd.writable().await?.retain_ready();
                let err = socket::getsockopt(fd.get_ref(), socket::sockopt::SocketError)?;
                if err != 0 {
                    return Err(io::Error::from_raw_os_error(err));
                }
                return Ok(Self { fd });
            }
            Err(e) => return Err(e.into()),
        }
        Ok(Self { fd: register(fd)? })
    }

    /// A connected pair, for tests.
    pub fn pair() -> io::Result<(Self, Self)> {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((Self { fd: register(a)? }, Self { fd: register(b)? }))
    }

    /// Sends one datagram with `fds` attached.
    pub async fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() {
            &[]
        } else {
            &[ControlMessage::ScmRights(&raw)]
        };
        let iov = [IoSlice::new(data)];
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| {
                socket::sendmsg::<UnixAddr>(
                    fd.as_raw_fd(),
                    &iov,
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            }) {
                Ok(result) => {
                    let sent = result?;
                    if sent != data.len() {
                        return Err(io::Error::other("datagram sent partially"));
                    }
                    return Ok(());
                }
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one datagram and the descriptors that came with it.
    pub async fn recv(&self) -> Result<Datagram, RecvError> {
        loop {
            let mut guard = self.fd.readable().await?;
            // Only "would block" goes back to the readiness loop; every other outcome is final.
            let attempt = guard.try_io(|fd| match recv_once(fd.as_raw_fd()) {
                Err(RecvError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
                other => Ok(other),
            });
            if let Ok(Ok(result)) = attempt {
                return result;
            }
        }
    }
}

fn recv_once(fd: RawFd) -> Result<Datagram, RecvError> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, flags, raw_fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg =
            socket::recvmsg::<UnixAddr>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
                .map_err(io::Error::from)?;
        let mut raw_fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                raw_fds.extend(fds);
            }
        }
        (msg.bytes, msg.flags, raw_fds)
    };
    // Adopt descriptors first so that every early return below closes them.
    let fds: Vec<OwnedFd> = raw_fds
        .into_iter()
        // SAFETY: the kernel has just installed these descriptors in our table for this
        // SCM_RIGHTS message; nothing else in the process knows or owns them.
        .map(|raw| unsafe { OwnedFd::from_raw_fd(raw) })
        .collect();
    if flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(RecvError::Truncated);
    }
    if flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(RecvError::ControlTruncated);
    }
    if len == 0 && fds.is_empty() && peer_closed(fd) {
        return Err(RecvError::Closed);
    }
    buf.truncate(len);
    Ok(Datagram { data: buf, fds })
}

/// A zero-byte read is either the peer's close or an empty datagram. End of stream is sticky
/// (a peek sees it again) while an empty datagram is gone once read.
fn peer_closed(fd: RawFd) -> bool {
    let mut probe = [0u8; 1];
    match socket::recv(fd, &mut probe, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
        Ok(0) => true,
        Ok(_) | Err(nix::Error::EAGAIN) => false,
        Err(_) => true,
    }
}

/// The listening side (node agent).
#[derive(Debug)]
pub struct SeqPacketListener {
    fd: AsyncFd<OwnedFd>,
}

impl SeqPacketListener {
    /// Binds `path` (which must not exist), makes it `0600` and listens. Must be called within
    /// a Tokio runtime. The mode is set before `listen`, so no other user can connect in
    /// between.
    pub fn bind(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let fd = new_socket()?;
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        socket::listen(&fd, Backlog::new(64).map_err(io::Error::from)?)?;
        Ok(Self { fd: register(fd)? })
    }

    /// Accepts one connection.
    pub async fn accept(&self) -> io::Result<SeqPacket> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                socket::accept4(
                    fd.as_raw_fd(),
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                )
                .map_err(io::Error::from)
            }) {
                Ok(result) => {
                    let raw = result?;
                    // SAFETY: accept4 returned a fresh descriptor that only we hold.
                    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    return Ok(SeqPacket { fd: register(fd)? });
                }
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsFd for SeqPacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn datagrams_and_fds_round_trip() {
        let (a, b) = SeqPacket::pair().unwrap();
        let file = std::fs::File::open("/proc/self/ns/net").unwrap();
        a.send(b"hello", &[file.as_fd()]).await.unwrap();
        let d = b.recv().await.unwrap();
        assert_eq!(d.data, b"hello");
        assert_eq!(d.fds.len(), 1);
        a.send(b"x", &[]).await.unwrap();
        assert!(b.recv().await.unwrap().fds.is_empty());
    }

    #[tokio::test]
    async fn oversized_datagram_is_truncation_error_and_stream_continues() {
        let (a, b) = SeqPacket::pair().unwrap();
        a.send(&[7u8; MAX_DATAGRAM + 1], &[]).await.unwrap();
        a.send(b"next", &[]).await.unwrap();
        assert!(matches!(b.recv().await, Err(RecvError::Truncated)));
        assert_eq!(b.recv().await.unwrap().data, b"next");
    }

    #[tokio::test]
    async fn every_descriptor_sent_is_received() {
        let (a, b) = SeqPacket::pair().unwrap();
        let files: Vec<_> = (0..6)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        a.send(b"many", &fds).await.unwrap();
        // The protocol layer rejects the count; the transport must not lose any on the way.
        assert_eq!(b.recv().await.unwrap().fds.len(), 6);
    }

    #[tokio::test]
    async fn empty_datagram_is_not_end_of_stream() {
        let (a, b) = SeqPacket::pair().unwrap();
        a.send(b"", &[]).await.unwrap();
        assert!(b.recv().await.unwrap().data.is_empty());
        a.send(b"after", &[]).await.unwrap();
        assert_eq!(b.recv().await.unwrap().data, b"after");
    }

    #[tokio::test]
    async fn closed_peer_is_reported() {
        let (a, b) = SeqPacket::pair().unwrap();
        drop(a);
        assert!(matches!(b.recv().await, Err(RecvError::Closed)));
    }
}
