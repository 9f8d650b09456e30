//! The redirection ruleset for one pod, as a value.

use std::fmt::Write;

use mesh_contract::{PROBE_SNAT_V4, PROBE_SNAT_V6, marks, ports};

/// The nftables table (family `inet`) that holds a pod's rules. Nothing else writes to it.
pub const TABLE: &str = "ztunnel-redirect";

/// Per-pod choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Options {
    pub ipv4: bool,
    pub ipv6: bool,
    /// Send the pod's DNS (port 53) to ztunnel's DNS proxy on 15053.
    pub dns_capture: bool,
    /// Redirect inbound TCP to 15006 (off: inbound plaintext reaches the app directly, HBONE
    /// still arrives on 15008).
    pub capture_inbound: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            ipv4: true,
            ipv6: true,
            dns_capture: false,
            capture_inbound: true,
        }
    }
}

/// Where a base chain hooks in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    PreroutingRaw,
    OutputRaw,
    PreroutingMangle,
    OutputMangle,
    PreroutingNat,
    OutputNat,
}

impl Hook {
    fn declaration(self) -> &'static str {
        match self {
            Hook::PreroutingRaw => "type filter hook prerouting priority raw; policy accept;",
            Hook::OutputRaw => "type filter hook output priority raw; policy accept;",
            Hook::PreroutingMangle => "type filter hook prerouting priority mangle; policy accept;",
            // A route chain re-routes packets whose mark it changes.
            Hook::OutputMangle => "type route hook output priority mangle; policy accept;",
            Hook::PreroutingNat => "type nat hook prerouting priority dstnat; policy accept;",
            Hook::OutputNat => "type nat hook output priority -100; policy accept;",
        }
    }
}

/// One base chain and its rules, in nft syntax.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub name: &'static str,
    pub hook: Hook,
    pub rules: Vec<String>,
}

/// Everything to install in one pod's netns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    pub chains: Vec<Chain>,
    /// Policy routing: `fwmark 0x111/0xfff lookup 100` and `local default dev lo` in table
    /// 100, per enabled family.
    pub ipv4_route: bool,
    pub ipv6_route: bool,
}

/// Computes the ruleset for a pod with `opts`.
pub fn plan(opts: &Options) -> Ruleset {
    let m = marks::ZTUNNEL;
    let mask = marks::MASK;
    let ct = marks::CONNTRACK_REPLY;
    let not_ours = format!("meta mark & {mask:#x} != {m:#x}");
    // (family match prefix, loopback address, probe address) for each enabled family.
    let mut families = Vec::new();
    if opts.ipv4 {
        families.push(("ip", "127.0.0.1".to_string(), PROBE_SNAT_V4.to_string()));
    }
    if opts.ipv6 {
        families.push(("ip6", "::1".to_string(), PROBE_SNAT_V6.to_string()));
    }

    let mut chains = Vec::new();
    chains.push(Chain {
        name: "prerouting-mangle",
        hook: Hook::PreroutingMangle,
        rules: vec![format!(
            "meta mark & {mask:#x} == {m:#x} ct mark set ct mark & {:#x} | {ct:#x}",
            !mask
        )],
    });
    chains.push(Chain {
        name: "output-mangle",
        hook: Hook::OutputMangle,
        rules: vec![format!(
            "ct mark & {mask:#x} == {ct:#x} meta mark set ct mark"
        )],
    });

    let mut pre = Vec::new();
    for (fam, _, probe) in &families {
        pre.push(format!("meta l4proto tcp {fam} saddr {probe} accept"));
    }
    if opts.capture_inbound {
        for (fam, lo, _) in &families {
            pre.push(format!(
                "meta l4proto tcp {fam} daddr != {lo} tcp dport != {} {not_ours} redirect to :{}",
                ports::HBONE,
                ports::INBOUND_PLAINTEXT
            ));
        }
    }
    chains.push(Chain {
        name: "prerouting-nat",
        hook: Hook::PreroutingNat,
        rules: pre,
    });

    let mut out = Vec::new();
    for (fam, _, probe) in &families {
        out.push(format!("meta l4proto tcp {fam} daddr {probe} accept"));
    }
    out.push(format!(
        "meta l4proto tcp meta mark & {mask:#x} == {ct:#x} accept"
    ));
    for (fam, lo, _) in &families {
        out.push(format!("oifname \"lo\" {fam} daddr != {lo} accept"));
    }
    if opts.dns_capture {
        for proto in ["udp", "tcp"] {
            out.push(format!(
                "oifname != \"lo\" meta l4proto {proto} {proto} dport 53 {not_ours} redirect to :{}",
                ports::DNS
            ));
        }
    }
    for (fam, lo, _) in &families {
        out.push(format!(
            "meta l4proto tcp {fam} daddr != {lo} {not_ours} redirect to :{}",
            ports::OUTBOUND
        ));
    }
    chains.push(Chain {
        name: "output-nat",
        hook: Hook::OutputNat,
        rules: out,
    });

    if opts.dns_capture {
        // ztunnel's own upstream DNS flows get their own conntrack zone so they cannot
        // collide with the app's (redirected) flows to the same server.
        let zone = marks::DNS_CONNTRACK_ZONE;
        chains.insert(
            0,
            Chain {
                name: "output-raw",
                hook: Hook::OutputRaw,
                rules: vec![format!("meta l4proto udp udp dport 53 meta mark & {mask:#x} == {m:#x} ct zone set {zone}")],
            },
        );
        chains.insert(
            0,
            Chain {
                name: "prerouting-raw",
                hook: Hook::PreroutingRaw,
                rules: vec![format!("meta l4proto udp udp sport 53 ct zone set {zone}")],
            },
        );
    }

    Ruleset {
        chains,
        ipv4_route: opts.ipv4,
        ipv6_route: opts.ipv6,
    }
}

impl Ruleset {
    /// The table definition in `nft -f` syntax.
    pub fn table(&self) -> String {
        let mut s = format!("table inet {TABLE} {{\n");
        for chain in &self.chains {
            let _ = writeln!(s, "  chain {} {{", chain.name);
            let _ = writeln!(s, "    {}", chain.hook.declaration());
            for rule in &chain.rules {
                let _ = writeln!(s, "    {rule}");
            }
            s.push_str("  }\n");
        }
        s.push_str("}\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each variant's rendered table is compared with a file in `golden/`. Regenerate with
    /// `UPDATE_GOLDEN=1 cargo test -p node-agent`.
    #[test]
    fn rulesets_match_golden_files() {
        let cases = [
            (
                "v4",
                Options {
                    ipv6: false,
                    ..Options::default()
                },
            ),
            (
                "v6",
                Options {
                    ipv4: false,
                    ..Options::default()
                },
            ),
            ("dual", Options::default()),
            (
                "dual-dns",
                Options {
                    dns_capture: true,
                    ..Options::default()
                },
            ),
            (
                "dual-inbound-bypass",
                Options {
                    capture_inbound: false,
                    ..Options::default()
                },
            ),
        ];
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/redirect/golden");
        let update = std::env::var_os("UPDATE_GOLDEN").is_some();
        for (name, opts) in cases {
            let got = plan(&opts).table();
            let file = dir.join(format!("{name}.nft"));
            if update {
                std::fs::write(&file, &got).unwrap();
                continue;
            }
            let want = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", file.display()));
            assert_eq!(got, want, "{name}: ruleset differs from {}", file.display());
        }
    }

    #[test]
    fn marked_traffic_is_never_redirected() {
        for opts in [
            Options::default(),
            Options {
                dns_capture: true,
                ..Options::default()
            },
        ] {
            let rs = plan(&opts);
            for chain in &rs.chains {
                for rule in chain.rules.iter().filter(|r| r.contains("redirect")) {
                    assert!(rule.contains("meta mark & 0xfff != 0x539"), "{rule}");
                }
            }
        }
    }
}
