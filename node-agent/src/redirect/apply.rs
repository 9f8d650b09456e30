//! Applying, checking and removing a pod's redirection inside its netns.
//!
//! `nft` compiles each option set's ruleset once, in a scratch namespace; what the kernel then
//! holds is read back over netlink and replayed into each pod's netns as one transaction
//! ([`super::nfnl`]), so no process is started on a pod's path. A check compares the pod's
//! table with that same scratch copy, so neither side re-implements nft's normal form. The
//! policy route goes through rtnetlink ([`super::route`]).

use std::collections::HashMap;
use std::io::Write;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use mesh_netns::NetNs;

use super::nfnl::{self, Snapshot};
use super::plan::{Options, Ruleset, plan};
use super::route::{self, RouteError};

/// Why redirection could not be applied, checked or removed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot run {program} (is it installed?)")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("{command} did not finish within {after:?} and was killed")]
    Timeout {
        command: String,
        after: std::time::Duration,
    },
    #[error("policy route")]
    Route(#[from] RouteError),
    #[error("nftables over netlink")]
    Netlink(#[from] nfnl::NlError),
    #[error("scratch namespace")]
    Scratch(#[from] mesh_netns::Error),
    #[error("reading the pod's network settings")]
    Inspect(#[from] super::inspect::InspectError),
}

/// The outcome of checking a pod's redirection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Exactly as planned.
    Intact,
    /// Nothing installed (a fresh pod, or rules lost with a node reboot).
    Missing,
    /// Something changed behind our back.
    Drifted(String),
}

fn run_nft(netns: &NetNs, args: &[&str], stdin: Option<&str>) -> Result<String, ApplyError> {
    run_nft_in(netns.command("nft"), args, stdin)
}

/// How long one `nft` run may take before it is killed: a wedged netlink socket or a stuck
/// kernel lock must not hold a pod's enrollment (or the agent's blocking pool) forever.
pub const NFT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs `nft` (`command`, already placed in its netns) with `args` and `stdin`; its stdout.
pub(super) fn run_nft_in(
    command: std::process::Command,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, ApplyError> {
    run_with_deadline(command, args, stdin, NFT_DEADLINE)
}

/// Runs `command` with `args`, feeding it `stdin`, and kills it if it has not exited within
/// `deadline`. Blocking: for the blocking pool only.
fn run_with_deadline(
    mut command: std::process::Command,
    args: &[&str],
    stdin: Option<&str>,
    deadline: std::time::Duration,
) -> Result<String, ApplyError> {
    let name = format!(
        "{} {}",
        command.get_program().to_string_lossy(),
        args.join(" ")
    );
    let mut child = command
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ApplyError::Spawn {
            program: "nft",
            source,
        })?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped");
        let _ = pipe.write_all(input.as_bytes());
    }
    // The child is reaped only by the waiting thread, so its pid cannot be reused before the
    // kill below.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(deadline) {
        Ok(out) => out,
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = waiter.join();
            return Err(ApplyError::Timeout {
                command: name,
                after: deadline,
            });
        }
    };
    let _ = waiter.join();
    let out = out.map_err(|source| ApplyError::Spawn {
        program: "nft",
        source,
    })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(ApplyError::Failed {
        command: name,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Runs blocking nft work off the async threads.
async fn blocking<T: Send + 'static>(
    netns: &Arc<NetNs>,
    f: impl FnOnce(&NetNs) -> Result<T, ApplyError> + Send + 'static,
) -> Result<T, ApplyError> {
    let netns = netns.clone();
    tokio::task::spawn_blocking(move || f(&netns))
        .await
        .unwrap_or_else(|e| {
            Err(ApplyError::Failed {
                command: "nft".into(),
                stderr: format!("worker thread: {e}"),
            })
        })
}

/// Checks that `nft` runs; a clear error at startup beats one per pod later.
pub fn check_nft() -> Result<(), ApplyError> {
    let out = std::process::Command::new("nft")
        .arg("--version")
        .output()
        .map_err(|source| ApplyError::Spawn {
            program: "nft",
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ApplyError::Failed {
            command: "nft --version".into(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// `opts` for the pod in `netns`: IPv6 rules exactly when the pod has IPv6 switched on.
/// Decided per pod, not per node: a pod with IPv6 always has it captured, and one without
/// gets no IPv6 rule or route that could not be installed.
async fn for_netns(netns: &Arc<NetNs>, mut opts: Options) -> Result<Options, ApplyError> {
    opts.ipv6 = super::inspect::has_ipv6(netns).await?;
    Ok(opts)
}

/// Applies, checks and removes rulesets; caches the kernel's form of each option set.
#[derive(Debug, Default)]
pub struct Redirector {
    expected: Mutex<HashMap<Options, Arc<Snapshot>>>,
}

impl Redirector {
    pub fn new() -> Self {
        Self::default()
    }

    /// The kernel's form of the ruleset for `opts`: compiled by `nft` in a scratch namespace
    /// the first time, then read over netlink.
    async fn expected(&self, opts: Options) -> Result<Arc<Snapshot>, ApplyError> {
        if let Some(s) = self.expected.lock().expect("not poisoned").get(&opts) {
            return Ok(s.clone());
        }
        let scratch = Arc::new(NetNs::new_isolated()?);
        let script = plan(&opts).table();
        let snapshot = blocking(&scratch, move |ns| {
            run_nft(ns, &["-f", "-"], Some(&script))?;
            nfnl::read(ns)?.ok_or_else(|| ApplyError::Failed {
                command: "nft -f -".into(),
                stderr: "the scratch namespace holds no table after applying the ruleset".into(),
            })
        })
        .await?;
        let snapshot = Arc::new(snapshot);
        self.expected
            .lock()
            .expect("not poisoned")
            .insert(opts, snapshot.clone());
        Ok(snapshot)
    }

    /// Installs the ruleset for `opts` in `netns`, replacing any previous version in one
    /// transaction, and the policy route. Idempotent.
    pub async fn apply(&self, netns: &Arc<NetNs>, opts: Options) -> Result<(), ApplyError> {
        let opts = for_netns(netns, opts).await?;
        let expected = self.expected(opts).await?;
        let ruleset: Ruleset = plan(&opts);
        blocking(netns, move |ns| Ok(nfnl::install(ns, &expected)?)).await?;
        route::ensure(netns, ruleset.ipv4_route, ruleset.ipv6_route).await?;
        Ok(())
    }

    /// Compares what is installed in `netns` with the plan for `opts`.
    pub async fn check(&self, netns: &Arc<NetNs>, opts: Options) -> Result<Check, ApplyError> {
        let opts = for_netns(netns, opts).await?;
        let expected = self.expected(opts).await?;
        let current = blocking(netns, |ns| Ok(nfnl::read(ns)?)).await?;
        let ruleset = plan(&opts);
        let routes = route::present(netns, ruleset.ipv4_route, ruleset.ipv6_route).await?;
        Ok(match current {
            None if !routes => Check::Missing,
            None => Check::Drifted("nftables table missing".into()),
            Some(have) => match have.difference(&expected) {
                Some(what) => Check::Drifted(what),
                None if !routes => Check::Drifted("policy route missing".into()),
                None => Check::Intact,
            },
        })
    }

    /// Removes the ruleset and the policy route. Idempotent; removes what it can and reports
    /// the first failure.
    pub async fn remove(&self, netns: &Arc<NetNs>) -> Result<(), ApplyError> {
        let nft = blocking(netns, |ns| Ok(nfnl::remove(ns)?)).await;
        let routes = route::remove(netns).await;
        nft.and(routes.map_err(ApplyError::from))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{ApplyError, run_with_deadline};

    #[test]
    fn a_run_past_its_deadline_is_killed_and_reported() {
        let started = Instant::now();
        let r = run_with_deadline(
            std::process::Command::new("sleep"),
            &["30"],
            None,
            Duration::from_millis(200),
        );
        assert!(
            matches!(&r, Err(ApplyError::Timeout { command, .. }) if command == "sleep 30"),
            "{r:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_quick_run_returns_its_output_and_a_failure_its_stderr() {
        let long = Duration::from_secs(10);
        let out = run_with_deadline(std::process::Command::new("cat"), &[], Some("hi"), long);
        assert_eq!(out.unwrap(), "hi");
        let err = run_with_deadline(
            std::process::Command::new("sh"),
            &["-c", "echo nope >&2; exit 3"],
            None,
            long,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "sh -c echo nope >&2; exit 3 failed: nope");
    }
}
