//! Network namespaces as scoped resources.
//!
//! A [`NetNs`] is an open file descriptor known to refer to a network namespace, identified by
//! the (device, inode) pair of that descriptor ([`NetNsId`]). [`NetNs::run`] enters it on the
//! calling thread, runs a synchronous closure, and restores the thread's home namespace; if the
//! restore fails the process aborts, because a thread left in a pod's namespace would open the
//! proxy's next socket in the wrong place. Sockets created inside the closure stay bound to the
//! namespace they were created in and can be used from any thread afterwards.
//!
//! [`NetNs::command`] builds a child process that starts inside the namespace (for `nft`
//! and `ip`). The `pre_exec` hook and one `ioctl` asking a descriptor its namespace type are
//! the crate's only `unsafe`.
//!
//! This crate must not hold async code or do I/O inside a namespace beyond what the closure
//! does: callers create sockets there, nothing more.

use std::cell::OnceCell;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, setns};
use nix::sys::stat::{Mode, fstat};
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};

/// Why a file descriptor or path could not be used as a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {path}")]
    Open { path: String, source: nix::Error },
    #[error("cannot inspect the namespace descriptor: {0}")]
    Inspect(nix::Error),
    #[error("not a network namespace: {0}")]
    NotNetNs(String),
    #[error("cannot enter the network namespace {id}")]
    Enter { id: NetNsId, source: nix::Error },
}

/// The identity of a network namespace: (st_dev, st_ino) of a descriptor that refers to it.
/// Two descriptors refer to the same namespace exactly when their ids are equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetNsId {
    pub dev: u64,
    pub ino: u64,
}

impl fmt::Display for NetNsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "net:[{}:{}]", self.dev, self.ino)
    }
}

/// An open network namespace.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    id: NetNsId,
}

impl NetNs {
    /// Opens the namespace at `path` (e.g. `/run/netns/foo` or `/proc/<pid>/ns/net`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let fd =
            open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).map_err(|source| {
                Error::Open {
                    path: path.display().to_string(),
                    source,
                }
            })?;
        Self::from_fd(fd)
    }

    /// A new, empty network namespace (only a loopback device, down), alive while the
    /// returned value is. Created on a short-lived thread so no caller's thread moves.
    pub fn new_isolated() -> Result<Self, Error> {
        std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|source| Error::Enter {
                id: NetNsId { dev: 0, ino: 0 },
                source,
            })?;
            Self::current()
        })
        .join()
        .unwrap_or_else(|_| Err(Error::NotNetNs("namespace thread panicked".into())))
    }

    /// The namespace the calling thread is in now.
    pub fn current() -> Result<Self, Error> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// Takes ownership of `fd` after checking that it refers to a network namespace.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, Error> {
        let fs = fstatfs(&fd).map_err(Error::Inspect)?;
        if fs.filesystem_type() != NSFS_MAGIC {
            return Err(Error::NotNetNs(format!(
                "descriptor is on filesystem {:#x}, not nsfs",
                fs.filesystem_type().0
            )));
        }
        // NS_GET_NSTYPE = _IO(0xb7, 0x3): which kind of namespace an nsfs descriptor is.
        const NS_GET_NSTYPE: nix::libc::c_ulong = 0xb703;
        #[allow(unsafe_code)]
        // SAFETY: NS_GET_NSTYPE takes no argument and only reports the type of the namespace
        // the (valid, owned) descriptor refers to.
        let kind = unsafe { nix::libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE) };
        if kind != nix::libc::CLONE_NEWNET {
            return Err(Error::NotNetNs(format!(
                "namespace type {kind:#x}, not a network namespace"
            )));
        }
        let st = fstat(&fd).map_err(Error::Inspect)?;
        let id = NetNsId {
            dev: st.st_dev,
            ino: st.st_ino,
        };
        Ok(Self { fd, id })
    }

    /// The namespace's identity.
    pub fn id(&self) -> NetNsId {
        self.id
    }

    /// A second descriptor for the same namespace.
    pub fn try_clone(&self) -> Result<Self, Error> {
        let fd = self
            .fd
            .try_clone()
            .map_err(|e| Error::Inspect(io_to_nix(&e)))?;
        Ok(Self { fd, id: self.id })
    }

    /// Runs `f` with the calling thread inside this namespace, then returns the thread to its
    /// home namespace (the one it was in the first time it called `run`).
    ///
    /// `f` must not block on async work or move the thread elsewhere: it should create sockets
    /// and return. If the thread cannot be returned home the process aborts.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, Error> {
        HOME.with(|home| {
            let home = match home.get() {
                Some(home) => home,
                None => {
                    let current = Self::current()?;
                    home.get_or_init(|| current)
                }
            };
            if home.id == self.id {
                return Ok(f());
            }
            setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| Error::Enter {
                id: self.id,
                source,
            })?;
            let _restore = Restore(home);
            Ok(f())
        })
    }
}

impl NetNs {
    /// A command whose child process runs inside this namespace (entered between fork and
    /// exec; the parent never moves).
    #[allow(unsafe_code)]
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(program);
        // The hook owns its own descriptor, so the Command stays valid after `self` is gone.
        let fd = self.fd.try_clone();
        let id = self.id;
        // SAFETY: the hook runs in the forked child before exec and only calls setns(2), which
        // is async-signal-safe and allocates nothing on success. `fd` is owned by the closure,
        // which the Command keeps alive until it is spawned.
        unsafe {
            cmd.pre_exec(move || {
                let fd = fd
                    .as_ref()
                    .map_err(|e| std::io::Error::new(e.kind(), "netns fd"))?;
                setns(fd, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| std::io::Error::other(format!("entering {id}: {e}")))
            });
        }
        cmd
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<NetNs> for OwnedFd {
    fn from(ns: NetNs) -> OwnedFd {
        ns.fd
    }
}

thread_local! {
    static HOME: OnceCell<NetNs> = const { OnceCell::new() };
}

/// Returns the thread to its home namespace when dropped, even if the closure panicked.
struct Restore<'a>(&'a NetNs);

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        if let Err(e) = setns(self.0.fd.as_fd(), CloneFlags::CLONE_NEWNET) {
            // Carrying on would open the next socket inside a pod's namespace.
            eprintln!("fatal: cannot return thread to its network namespace: {e}");
            std::process::abort();
        }
    }
}

fn io_to_nix(e: &std::io::Error) -> nix::Error {
    e.raw_os_error()
        .map(nix::Error::from_raw)
        .unwrap_or(nix::Error::EIO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_files_that_are_not_namespaces() {
        for path in ["/proc/self/status", "/dev/null", "/proc/self/ns/uts"] {
            let err = NetNs::open(path).unwrap_err();
            assert!(matches!(err, Error::NotNetNs(_)), "{path}: {err}");
        }
        assert!(matches!(
            NetNs::open("/nonexistent/ns"),
            Err(Error::Open { .. })
        ));
    }

    #[test]
    fn isolated_namespaces_are_new_and_distinct() {
        let home = NetNs::current().unwrap();
        let a = NetNs::new_isolated().unwrap();
        let b = NetNs::new_isolated().unwrap();
        assert_ne!(a.id(), home.id());
        assert_ne!(a.id(), b.id());
        // The calling thread never moved.
        assert_eq!(NetNs::current().unwrap().id(), home.id());
    }

    #[test]
    fn command_runs_inside_the_namespace() {
        let ns = NetNs::current().unwrap();
        let out = ns
            .command("readlink")
            .arg("/proc/self/ns/net")
            .output()
            .unwrap();
        assert!(out.status.success());
        let link = String::from_utf8(out.stdout).unwrap();
        assert_eq!(link.trim(), format!("net:[{}]", ns.id().ino));
    }

    #[test]
    fn current_namespace_has_stable_identity_and_run_at_home_is_direct() {
        let a = NetNs::current().unwrap();
        let b = NetNs::open("/proc/self/ns/net").unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(a.try_clone().unwrap().id(), a.id());
        assert_eq!(a.run(|| 7).unwrap(), 7);
    }
}
