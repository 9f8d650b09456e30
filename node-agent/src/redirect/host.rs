//! The node-level probe rule: kubelet (or any local process on the node) connecting to an
//! enrolled pod is SNATed to 169.254.7.127 (SPEC §3), which the pod's own rules accept before
//! any redirect, so health probes reach the app without passing through ztunnel or policy.
//!
//! One nftables table in the agent's (the host's) netns holds a set of enrolled pod IPs per
//! family; enrolling or removing a pod adds or deletes its elements.

use std::net::IpAddr;
use std::process::Command;

use mesh_contract::{PROBE_SNAT_V4, PROBE_SNAT_V6};

use super::ApplyError;

/// The host table (family `inet`).
pub const HOST_TABLE: &str = "ztunnel-host";

/// The table definition; elements are added per pod.
pub fn host_table() -> String {
    format!(
        "table inet {HOST_TABLE} {{\n  \
           set probe-v4 {{ type ipv4_addr; }}\n  \
           set probe-v6 {{ type ipv6_addr; }}\n  \
           chain postrouting {{\n    \
             type nat hook postrouting priority srcnat; policy accept;\n    \
             meta l4proto tcp ip daddr @probe-v4 fib saddr type local snat ip to {PROBE_SNAT_V4}\n    \
             meta l4proto tcp ip6 daddr @probe-v6 fib saddr type local snat ip6 to {PROBE_SNAT_V6}\n  \
           }}\n\
         }}\n"
    )
}

/// Runs an nft script in the agent's own (the host's) netns.
fn nft(script: &str) -> Result<(), ApplyError> {
    super::apply::run_nft_in(Command::new("nft"), &["-f", "-"], Some(script)).map(drop)
}

fn elements(ips: &[IpAddr], op: &str) -> String {
    let mut s = String::new();
    for ip in ips {
        let set = if ip.is_ipv4() { "probe-v4" } else { "probe-v6" };
        s.push_str(&format!(
            "{op} element inet {HOST_TABLE} {set} {{ {ip} }}\n"
        ));
    }
    s
}

/// (Re)creates the host table with empty sets. Run once at startup; enrolled pods add their
/// addresses as they are (re)confirmed.
pub fn install() -> Result<(), ApplyError> {
    nft(&format!(
        "table inet {HOST_TABLE} {{}}\ndelete table inet {HOST_TABLE}\n{}",
        host_table()
    ))
}

/// Adds a pod's addresses to the probe sets (already present is fine).
pub fn add(ips: &[IpAddr]) -> Result<(), ApplyError> {
    if ips.is_empty() {
        return Ok(());
    }
    nft(&elements(ips, "add"))
}

/// Removes a pod's addresses from the probe sets (absent is fine).
pub fn remove(ips: &[IpAddr]) -> Result<(), ApplyError> {
    for ip in ips {
        match nft(&elements(&[*ip], "delete")) {
            Ok(()) => {}
            Err(ApplyError::Failed { stderr, .. }) if stderr.contains("No such file") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Removes the host table (real uninstall only).
pub fn uninstall() -> Result<(), ApplyError> {
    nft(&format!(
        "table inet {HOST_TABLE} {{}}\ndelete table inet {HOST_TABLE}\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_table_matches_golden() {
        let file =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/redirect/golden/host.nft");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&file, host_table()).unwrap();
        }
        assert_eq!(host_table(), std::fs::read_to_string(&file).unwrap());
        let e = elements(
            &["198.18.1.2".parse().unwrap(), "fd00::2".parse().unwrap()],
            "add",
        );
        assert_eq!(
            e,
            "add element inet ztunnel-host probe-v4 { 198.18.1.2 }\nadd element inet ztunnel-host probe-v6 { fd00::2 }\n"
        );
    }
}
