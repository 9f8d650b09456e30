//! Applying a [`Ruleset`] inside a pod's netns.
//!
//! nftables has no stable netlink library under a permissive license, so rules go through the
//! `nft` binary (one `nft -f -` transaction, run with the child inside the pod's netns). A
//! missing `nft` is reported as such. Policy routes use `ip` the same way.

use std::io::Write;
use std::process::{Command, Stdio};

use mesh_contract::marks;
use mesh_netns::NetNs;

use super::Ruleset;

/// Why redirection could not be applied or removed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot run {program} (is it installed?)")]
    Spawn {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
}

fn run(
    netns: &NetNs,
    program: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<(), ApplyError> {
    let mut cmd: Command = netns.command(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|source| ApplyError::Spawn { program, source })?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped");
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| ApplyError::Spawn { program, source })?;
    if out.status.success() {
        return Ok(());
    }
    Err(ApplyError::Failed {
        command: format!("{program} {}", args.join(" ")),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Installs `ruleset` in `netns`, replacing any previous version atomically. Idempotent.
pub fn apply(netns: &NetNs, ruleset: &Ruleset) -> Result<(), ApplyError> {
    run(netns, "nft", &["-f", "-"], Some(&ruleset.apply_script()))?;
    let fwmark = format!("{:#x}/{:#x}", marks::CONNTRACK_REPLY, marks::MASK);
    let prio = marks::RULE_PRIORITY.to_string();
    let table = marks::ROUTE_TABLE.to_string();
    for (enabled, family, default) in [
        (ruleset.ipv4_route, "-4", "0.0.0.0/0"),
        (ruleset.ipv6_route, "-6", "::/0"),
    ] {
        if !enabled {
            continue;
        }
        // `replace` and a delete-then-add rule keep these idempotent.
        run(
            netns,
            "ip",
            &[
                family, "route", "replace", "local", default, "dev", "lo", "table", &table,
            ],
            None,
        )?;
        let _ = run(
            netns,
            "ip",
            &[family, "rule", "del", "priority", &prio],
            None,
        );
        run(
            netns,
            "ip",
            &[
                family, "rule", "add", "fwmark", &fwmark, "lookup", &table, "priority", &prio,
            ],
            None,
        )?;
    }
    Ok(())
}

/// Removes everything [`apply`] installs. Idempotent; removes what it can and reports the
/// first failure.
pub fn remove(netns: &NetNs) -> Result<(), ApplyError> {
    let mut first = run(netns, "nft", &["-f", "-"], Some(&Ruleset::remove_script())).err();
    let prio = marks::RULE_PRIORITY.to_string();
    let table = marks::ROUTE_TABLE.to_string();
    for family in ["-4", "-6"] {
        // Both may be absent (already removed, or the family was never enabled).
        let _ = run(
            netns,
            "ip",
            &[family, "rule", "del", "priority", &prio],
            None,
        );
        if let Err(e) = run(
            netns,
            "ip",
            &[family, "route", "flush", "table", &table],
            None,
        ) && first.is_none()
            && !matches!(&e, ApplyError::Failed { stderr, .. } if stderr.is_empty() || stderr.contains("No such"))
        {
            first = Some(e);
        }
    }
    first.map_or(Ok(()), Err)
}
