//! Our nftables table over netlink, by replay: no `nft` process on a pod's path.
//!
//! The agent never encodes an nftables expression itself. `nft` compiles each option set's
//! ruleset once, in a scratch namespace ([`super::apply`]); [`read`] dumps what the kernel
//! then holds for our table (the table, its chains, their rules, as netlink attributes) and
//! [`install`] sends those same objects back as one batch (one transaction) into a pod's
//! netns. A check is a [`read`] of the pod compared with the scratch copy. The kernel's
//! dump format is its own request format, so the two always agree, and only the attributes
//! the kernel assigns (handles, use counts, counters) are dropped on the way.
//!
//! Written by hand because no permissively licensed crate speaks nf_tables' messages (the
//! libraries that do are GPL or wrap `libnftnl`); this is only framing, a few hundred bytes
//! per pod. Constants are from `linux/netfilter/nf_tables.h` and `linux/netlink.h`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use mesh_netns::NetNs;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, socket, sockopt,
};

use super::plan::TABLE;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_INET: u8 = 1;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_USE: u16 = 3;
const NFTA_TABLE_HANDLE: u16 = 4;
const NFTA_TABLE_PAD: u16 = 5;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_HANDLE: u16 = 2;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_USE: u16 = 6;
const NFTA_CHAIN_COUNTERS: u16 = 8;
const NFTA_CHAIN_PAD: u16 = 9;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_PAD: u16 = 8;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
/// The type bits of `nla_type` (without NLA_F_NESTED / NLA_F_NET_BYTEORDER).
const NLA_TYPE_MASK: u16 = 0x3fff;

/// How long the kernel may take to answer one request before the pod's step fails.
const REPLY_DEADLINE: Duration = Duration::from_secs(10);

/// Why a netlink exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    #[error("netlink socket in the pod's netns")]
    Socket(#[source] std::io::Error),
    #[error("{what}")]
    Kernel {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed netlink reply: {0}")]
    Malformed(&'static str),
}

/// One nftables object, as the attributes of its NEW message.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Object {
    kind: u16,
    attrs: Vec<u8>,
}

/// Our table, its chains and their rules, in kernel order, without kernel-assigned attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    table: Object,
    chains: Vec<Object>,
    rules: Vec<Object>,
}

impl Snapshot {
    /// How `self` (what a pod holds) differs from `want`, for a log line; `None` if it does not.
    pub fn difference(&self, want: &Snapshot) -> Option<String> {
        if self == want {
            return None;
        }
        if self.table != want.table {
            return Some("the table's settings differ from the plan".into());
        }
        let names = |s: &Snapshot| -> Vec<String> {
            s.chains
                .iter()
                .map(|c| string_attr(&c.attrs, NFTA_CHAIN_NAME))
                .collect()
        };
        if self.chains != want.chains {
            return Some(format!(
                "chains differ from the plan (have {:?}, want {:?})",
                names(self),
                names(want)
            ));
        }
        let chain_of = |r: &Object| string_attr(&r.attrs, NFTA_RULE_CHAIN);
        for name in names(want) {
            let of = |s: &Snapshot| -> Vec<Object> {
                s.rules
                    .iter()
                    .filter(|r| chain_of(r) == name)
                    .cloned()
                    .collect()
            };
            if of(self) != of(want) {
                return Some(format!("the rules of chain {name} differ from the plan"));
            }
        }
        Some("rules in a chain the plan does not have".into())
    }
}

/// Our table in `netns`, or `None` if it has none.
pub fn read(netns: &NetNs) -> Result<Option<Snapshot>, NlError> {
    let sock = Socket::open(netns)?;
    let name = cstr_attr(NFTA_TABLE_NAME, TABLE);
    let table = match sock.request(NFT_MSG_GETTABLE, NLM_F_ACK, &name, "reading the table") {
        Ok(mut t) => t.pop().ok_or(NlError::Malformed("no table in the reply"))?,
        Err(NlError::Kernel { source, .. }) if source.raw_os_error() == Some(nix::libc::ENOENT) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let ours = |attrs: &[u8], ty| string_attr(attrs, ty) == TABLE;
    let chains = sock
        .request(NFT_MSG_GETCHAIN, NLM_F_DUMP, &[], "listing chains")?
        .into_iter()
        .filter(|a| ours(a, NFTA_CHAIN_TABLE))
        .map(|a| Object {
            kind: NFT_MSG_NEWCHAIN,
            attrs: without(
                &a,
                &[
                    NFTA_CHAIN_HANDLE,
                    NFTA_CHAIN_USE,
                    NFTA_CHAIN_COUNTERS,
                    NFTA_CHAIN_PAD,
                ],
            ),
        })
        .collect();
    let rules = sock
        .request(
            NFT_MSG_GETRULE,
            NLM_F_DUMP,
            &cstr_attr(NFTA_RULE_TABLE, TABLE),
            "listing rules",
        )?
        .into_iter()
        .filter(|a| ours(a, NFTA_RULE_TABLE))
        .map(|a| Object {
            kind: NFT_MSG_NEWRULE,
            attrs: without(&a, &[NFTA_RULE_HANDLE, NFTA_RULE_PAD]),
        })
        .collect();
    Ok(Some(Snapshot {
        table: Object {
            kind: NFT_MSG_NEWTABLE,
            attrs: without(&table, &[NFTA_TABLE_USE, NFTA_TABLE_HANDLE, NFTA_TABLE_PAD]),
        },
        chains,
        rules,
    }))
}

/// Replaces whatever our table holds in `netns` with `snapshot`, in one transaction.
///
/// A pod without our table (every fresh sandbox) gets it created exclusively, which touches
/// nothing else and costs well under a millisecond; deleting a table with base chains makes
/// the kernel wait for its hooks to drain, so the delete-and-recreate transaction is kept
/// for a table that is already there (a repair, or a restarted agent's re-apply).
pub fn install(netns: &NetNs, snapshot: &Snapshot) -> Result<(), NlError> {
    let objects = || {
        snapshot.chains.iter().chain(&snapshot.rules).map(|o| {
            let flags = if o.kind == NFT_MSG_NEWRULE {
                NLM_F_CREATE | NLM_F_APPEND
            } else {
                NLM_F_CREATE
            };
            (o.kind, flags, o.attrs.clone())
        })
    };
    let table = (
        NFT_MSG_NEWTABLE,
        NLM_F_CREATE | NLM_F_EXCL,
        snapshot.table.attrs.clone(),
    );
    let fresh: Vec<_> = std::iter::once(table.clone()).chain(objects()).collect();
    match Socket::open(netns)?.transaction(&fresh, "installing the ruleset") {
        Err(NlError::Kernel { source, .. }) if source.raw_os_error() == Some(nix::libc::EEXIST) => {
        }
        done => return done,
    }
    // Create-then-delete makes the delete valid whether or not the table still exists.
    let name = cstr_attr(NFTA_TABLE_NAME, TABLE);
    let replace: Vec<_> = [
        (NFT_MSG_NEWTABLE, NLM_F_CREATE, name.clone()),
        (NFT_MSG_DELTABLE, 0, name),
        table,
    ]
    .into_iter()
    .chain(objects())
    .collect();
    Socket::open(netns)?.transaction(&replace, "replacing the ruleset")
}

/// Removes our table from `netns`; nothing to do if it has none.
pub fn remove(netns: &NetNs) -> Result<(), NlError> {
    let name = cstr_attr(NFTA_TABLE_NAME, TABLE);
    let batch = [
        (NFT_MSG_NEWTABLE, NLM_F_CREATE, name.clone()),
        (NFT_MSG_DELTABLE, 0, name),
    ];
    Socket::open(netns)?.transaction(&batch, "removing the ruleset")
}

/// Adds (`add`) or deletes `ips` in the set `set` of the inet table `table` in the caller's
/// own netns, in one transaction. Adding an element that is there is fine; deleting one that
/// is not fails with ENOENT.
pub fn set_elements(
    table: &str,
    set: &str,
    ips: &[std::net::IpAddr],
    add: bool,
) -> Result<(), NlError> {
    let mut list = Vec::new();
    for ip in ips {
        let value = match ip {
            std::net::IpAddr::V4(a) => attr(NFTA_DATA_VALUE, &a.octets()),
            std::net::IpAddr::V6(a) => attr(NFTA_DATA_VALUE, &a.octets()),
        };
        let key = attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, &value);
        list.extend(attr(NFTA_LIST_ELEM | NLA_F_NESTED, &key));
    }
    let mut attrs = cstr_attr(NFTA_SET_ELEM_LIST_TABLE, table);
    attrs.extend(cstr_attr(NFTA_SET_ELEM_LIST_SET, set));
    attrs.extend(attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, &list));
    let (msg, flags, what) = if add {
        (NFT_MSG_NEWSETELEM, NLM_F_CREATE, "adding set elements")
    } else {
        (NFT_MSG_DELSETELEM, 0, "deleting set elements")
    };
    Socket::here()?.transaction(&[(msg, flags, attrs)], what)
}

/// A netfilter netlink socket opened inside a netns (it stays bound to that netns).
struct Socket {
    fd: OwnedFd,
}

impl Socket {
    fn open(netns: &NetNs) -> Result<Self, NlError> {
        netns
            .run(Self::here)
            .map_err(|e| NlError::Socket(std::io::Error::other(e)))?
    }

    /// A socket in the calling thread's netns.
    fn here() -> Result<Self, NlError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(|e| NlError::Socket(e.into()))?;
        let timeout = nix::sys::time::TimeVal::new(REPLY_DEADLINE.as_secs() as _, 0);
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)
            .and_then(|()| bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)))
            .map_err(|e| NlError::Socket(e.into()))?;
        Ok(Self { fd })
    }

    fn send(&self, buf: &[u8], what: &str) -> Result<(), NlError> {
        let sent =
            send(self.fd.as_raw_fd(), buf, MsgFlags::empty()).map_err(|e| kernel(what, e))?;
        if sent == buf.len() {
            Ok(())
        } else {
            Err(NlError::Malformed("short send"))
        }
    }

    /// Receives the next datagram into `buf`; the messages in it.
    fn recv<'b>(&self, buf: &'b mut [u8], what: &str) -> Result<Messages<'b>, NlError> {
        let n = recv(self.fd.as_raw_fd(), buf, MsgFlags::MSG_TRUNC).map_err(|e| kernel(what, e))?;
        if n > buf.len() {
            return Err(NlError::Malformed("a reply larger than the receive buffer"));
        }
        Ok(Messages { rest: &buf[..n] })
    }

    /// Sends one GET request; the attributes of each object in the reply.
    fn request(
        &self,
        msg: u16,
        flags: u16,
        attrs: &[u8],
        what: &str,
    ) -> Result<Vec<Vec<u8>>, NlError> {
        let mut out = Vec::new();
        message(
            &mut out,
            nft_type(msg),
            NLM_F_REQUEST | flags,
            1,
            NFPROTO_INET,
            attrs,
        );
        self.send(&out, what)?;
        let dump = flags & NLM_F_DUMP != 0;
        let mut objects = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            for m in self.recv(&mut buf, what)? {
                let m = m?;
                match m.ty {
                    NLMSG_DONE => return Ok(objects),
                    NLMSG_ERROR => match m.errno()? {
                        0 if !dump => return Ok(objects),
                        0 => {}
                        errno => return Err(kernel(what, nix::errno::Errno::from_raw(errno))),
                    },
                    _ => objects.push(m.attrs()?.to_vec()),
                }
            }
        }
    }

    /// Sends `batch` as one transaction; Ok once the kernel acknowledged every message.
    fn transaction(&self, batch: &[(u16, u16, Vec<u8>)], what: &str) -> Result<(), NlError> {
        let mut out = Vec::with_capacity(4096);
        let subsys = NFNL_SUBSYS_NFTABLES.to_be_bytes();
        message_with(
            &mut out,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            0,
            subsys,
            &[],
        );
        for (seq, (msg, flags, attrs)) in (1..).zip(batch) {
            let flags = NLM_F_REQUEST | NLM_F_ACK | flags;
            message(&mut out, nft_type(*msg), flags, seq, NFPROTO_INET, attrs);
        }
        let end = u32::try_from(batch.len() + 1).unwrap_or(u32::MAX);
        message_with(
            &mut out,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            end,
            0,
            subsys,
            &[],
        );
        self.send(&out, what)?;
        let mut acked = 0;
        let mut buf = vec![0u8; 16 * 1024];
        while acked < batch.len() {
            for m in self.recv(&mut buf, what)? {
                let m = m?;
                if m.ty != NLMSG_ERROR {
                    continue;
                }
                match m.errno()? {
                    0 => acked += 1,
                    errno => {
                        let step = m.acked_seq().map_or(String::new(), |seq| {
                            format!(" (message {seq} of {})", batch.len())
                        });
                        return Err(kernel(
                            &format!("{what}{step}"),
                            nix::errno::Errno::from_raw(errno),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn kernel(what: &str, e: nix::errno::Errno) -> NlError {
    NlError::Kernel {
        what: what.to_string(),
        source: e.into(),
    }
}

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

fn message(out: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) {
    message_with(out, ty, flags, seq, family, [0, 0], attrs);
}

/// Appends one netlink message: `nlmsghdr`, `nfgenmsg` (family, version 0, `res_id`), attrs.
fn message_with(
    out: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: [u8; 2],
    attrs: &[u8],
) {
    let len = u32::try_from(16 + 4 + attrs.len()).expect("a message under 4 GiB");
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&[family, 0]);
    out.extend_from_slice(&res_id);
    out.extend_from_slice(attrs);
}

/// One attribute (header, `payload`, padding).
fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + payload.len().next_multiple_of(4));
    let len = u16::try_from(4 + payload.len()).expect("a short attribute");
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
    out
}

/// One attribute whose payload is `value` and a NUL.
fn cstr_attr(ty: u16, value: &str) -> Vec<u8> {
    let mut payload = value.as_bytes().to_vec();
    payload.push(0);
    attr(ty, &payload)
}

/// The top-level attributes in `attrs`: (type without flags, the whole attribute with its
/// header and padding, its payload). Stops at the first malformed one.
fn attributes(mut attrs: &[u8]) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    std::iter::from_fn(move || {
        let header: [u8; 4] = attrs.get(..4)?.try_into().ok()?;
        let len = usize::from(u16::from_ne_bytes([header[0], header[1]]));
        let ty = u16::from_ne_bytes([header[2], header[3]]) & NLA_TYPE_MASK;
        let payload = attrs.get(4..len)?;
        let whole = len.next_multiple_of(4).min(attrs.len());
        let (this, rest) = attrs.split_at(whole);
        attrs = rest;
        Some((ty, this, payload))
    })
}

/// `attrs` without the attributes of the types in `drop`.
fn without(attrs: &[u8], drop: &[u16]) -> Vec<u8> {
    attributes(attrs)
        .filter(|(ty, _, _)| !drop.contains(ty))
        .flat_map(|(_, whole, _)| whole.iter().copied())
        .collect()
}

/// The string attribute `ty` of `attrs` (without its NUL), or "" if absent.
fn string_attr(attrs: &[u8], ty: u16) -> String {
    attributes(attrs)
        .find(|(t, _, _)| *t == ty)
        .map(|(_, _, p)| String::from_utf8_lossy(p.strip_suffix(&[0]).unwrap_or(p)).into_owned())
        .unwrap_or_default()
}

/// The netlink messages in one received datagram.
struct Messages<'b> {
    rest: &'b [u8],
}

struct Message<'b> {
    ty: u16,
    body: &'b [u8],
}

impl<'b> Message<'b> {
    /// An NLMSG_ERROR's error code as a positive errno (0 for an acknowledgement).
    fn errno(&self) -> Result<i32, NlError> {
        let code: [u8; 4] = self
            .body
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or(NlError::Malformed("a short error message"))?;
        Ok(-i32::from_ne_bytes(code))
    }

    /// The sequence number of the request an NLMSG_ERROR answers.
    fn acked_seq(&self) -> Option<u32> {
        Some(u32::from_ne_bytes(self.body.get(12..16)?.try_into().ok()?))
    }

    /// The attributes after the `nfgenmsg` header.
    fn attrs(&self) -> Result<&'b [u8], NlError> {
        self.body
            .get(4..)
            .ok_or(NlError::Malformed("a message without its nfgenmsg header"))
    }
}

impl<'b> Iterator for Messages<'b> {
    type Item = Result<Message<'b>, NlError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let parsed = (|| {
            let len = u32::from_ne_bytes(self.rest.get(..4)?.try_into().ok()?);
            let len = usize::try_from(len).ok()?;
            let ty = u16::from_ne_bytes(self.rest.get(4..6)?.try_into().ok()?);
            let body = self.rest.get(16..len)?;
            Some((len, ty, body))
        })();
        match parsed {
            Some((len, ty, body)) => {
                self.rest = self.rest.get(len.next_multiple_of(4)..).unwrap_or_default();
                Some(Ok(Message { ty, body }))
            }
            None => {
                self.rest = &[];
                Some(Err(NlError::Malformed("a truncated message")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_walked_and_dropped_by_type_and_a_torn_one_ends_the_walk() {
        let mut a = cstr_attr(NFTA_CHAIN_TABLE, "t");
        a.extend(cstr_attr(NFTA_CHAIN_HANDLE, "hh"));
        a.extend(cstr_attr(NFTA_CHAIN_NAME, "chain-name"));
        assert_eq!(string_attr(&a, NFTA_CHAIN_NAME), "chain-name");
        let kept = without(&a, &[NFTA_CHAIN_HANDLE]);
        assert_eq!(string_attr(&kept, NFTA_CHAIN_HANDLE), "");
        assert_eq!(string_attr(&kept, NFTA_CHAIN_TABLE), "t");
        assert_eq!(kept.len(), a.len() - 8);
        // A length past the end, a length under the header, an empty input: no panic.
        let mut torn = cstr_attr(NFTA_CHAIN_TABLE, "t");
        torn.extend([200, 0, 3, 0, b'x']);
        assert_eq!(attributes(&torn).count(), 1);
        assert_eq!(attributes(&[1, 0, 3, 0]).count(), 0);
        assert_eq!(attributes(&[]).count(), 0);
    }

    #[test]
    fn replies_with_bad_lengths_are_errors_not_panics() {
        for bad in [
            &[0u8; 3][..],
            &[8, 0, 0, 0, 2, 0, 0, 0][..],
            &[0xff, 0xff, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
        ] {
            let mut m = Messages { rest: bad };
            assert!(matches!(m.next(), Some(Err(NlError::Malformed(_)))));
            assert!(m.next().is_none());
        }
        let mut ack = Vec::new();
        message_with(&mut ack, NLMSG_ERROR, 0, 1, 0, [0, 0], &[]);
        let m = Messages { rest: &ack }.next().unwrap().unwrap();
        assert_eq!(m.ty, NLMSG_ERROR);
        // 4 bytes of body: the nfgenmsg-sized slot read as the error code 0.
        assert_eq!(m.errno().unwrap(), 0);
        assert!(m.acked_seq().is_none());
    }
}
