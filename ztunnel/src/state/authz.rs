//! L4 authorization: which policies apply to a destination workload, and whether a connection
//! is allowed. Evaluation is a pure function of a [`PolicyIndex`] and a [`Connection`].
//!
//! Istio's order: any matching DENY denies; with no ALLOW policy in scope the connection is
//! allowed; otherwise some ALLOW policy must match. Dry-run policies never decide; their
//! would-be verdict is returned for the log. A policy matches when any of its rules does; a
//! rule when all of its clauses do; a clause when any of its matches does; a match when every
//! condition it sets holds. A peer without an identity (plaintext on 15006) fails every
//! positive identity condition (`principals`, `namespaces`, `serviceAccounts`) and satisfies
//! every negative one, as in Envoy's RBAC: `DENY notPrincipals [x]` denies plaintext peers.
//!
//! Policies are indexed at snapshot build time by scope, so a decision only looks at the
//! policies that can apply to its destination (global, the workload's namespace, the ones the
//! workload names), and within a scope by the destination ports a policy can match at all, so
//! a policy about port 9000 is not evaluated for a connection to 8080. ALLOW policies are still
//! counted whether or not they are evaluated: their presence is what turns the default from
//! allow to deny.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::Workload;
use super::policy::{Action, Authorization, RbacMatch, Scope, ServiceAccountMatch, StringMatch};
use crate::identity::Identity;

/// What is known about a connection when it is authorized.
#[derive(Clone, Debug)]
pub struct Connection<'a> {
    /// The peer's verified identity; `None` for plaintext peers.
    pub src_identity: Option<&'a Identity>,
    /// The identity as Istio writes principals (`td/ns/x/sa/y`), computed once.
    principal: Option<String>,
    pub src_ip: IpAddr,
    /// The original destination (pod address and app port).
    pub dst: SocketAddr,
}

impl<'a> Connection<'a> {
    pub fn new(src_identity: Option<&'a Identity>, src_ip: IpAddr, dst: SocketAddr) -> Self {
        Connection {
            src_identity,
            principal: src_identity.map(principal_of),
            src_ip,
            dst,
        }
    }
}

/// Which destination a connection is for, as far as scoping goes.
#[derive(Clone, Copy, Debug)]
pub struct Destination<'a> {
    pub namespace: &'a str,
    /// Policy keys (`namespace/name`) the workload lists, when it is a known workload.
    pub selected: &'a [String],
}

impl<'a> Destination<'a> {
    pub fn of(workload: &'a Workload) -> Self {
        Destination {
            namespace: &workload.namespace,
            selected: &workload.authorization_policies,
        }
    }
}

/// The outcome of authorizing one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(DenyReason),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DenyReason {
    #[error("denied by policy {0}")]
    DenyPolicy(String),
    #[error("no ALLOW policy matched ({0} in scope)")]
    NoAllowMatch(usize),
    #[error("the destination pod has no workload entry yet, so its policies are unknown")]
    UnknownDestination,
}

/// A decision plus what dry-run policies would have done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// Set when the dry-run policies alone would have decided differently: the would-be
    /// decision, for the log.
    pub dry_run: Option<Decision>,
}

/// Policies grouped by scope.
#[derive(Debug, Default)]
pub struct PolicyIndex {
    global: Group,
    by_namespace: HashMap<String, Group>,
    by_key: HashMap<String, Indexed>,
}

/// A policy with the destination ports it can match (`None`: any).
#[derive(Debug)]
struct Indexed {
    policy: Arc<Authorization>,
    ports: Option<Box<[u16]>>,
}

impl Indexed {
    fn new(policy: Arc<Authorization>) -> Self {
        let ports = ports_of(&policy).map(|set| set.into_iter().collect());
        Indexed { policy, ports }
    }

    fn may_match(&self, port: u16) -> bool {
        self.ports.as_ref().is_none_or(|p| p.contains(&port))
    }
}

/// The ports a policy can match at all, or `None` when it may match any port. A match limits
/// ports when it lists `destinationPorts`; a clause when all its matches do (their union); a
/// rule when any of its clauses does (their intersection); a policy when all its rules do.
fn ports_of(p: &Authorization) -> Option<std::collections::BTreeSet<u16>> {
    use std::collections::BTreeSet;
    let mut policy = Some(BTreeSet::new());
    for rule in &p.rules {
        let mut rule_ports: Option<BTreeSet<u16>> = None;
        for clause in rule {
            let mut clause_ports = Some(BTreeSet::new());
            for m in clause {
                match (&mut clause_ports, m.destination_ports.is_empty()) {
                    (Some(set), false) => set.extend(&m.destination_ports),
                    _ => clause_ports = None,
                }
            }
            if let Some(c) = clause_ports {
                rule_ports = Some(match rule_ports {
                    None => c,
                    Some(r) => r.intersection(&c).copied().collect(),
                });
            }
        }
        match (&mut policy, rule_ports) {
            (Some(set), Some(r)) => set.extend(r),
            _ => policy = None,
        }
    }
    policy
}

/// One scope's policies, in order, with a port prefilter.
#[derive(Debug, Default)]
struct Group {
    policies: Vec<Arc<Authorization>>,
    /// Positions of the policies that may match any port.
    any_port: Vec<usize>,
    /// Positions of the policies limited to certain ports, by port.
    by_port: HashMap<u16, Vec<usize>>,
    /// ALLOW policies: enforced ones, and all including dry-run ones.
    allows: (usize, usize),
}

impl Group {
    fn push(&mut self, policy: Arc<Authorization>) {
        let at = self.policies.len();
        match ports_of(&policy) {
            None => self.any_port.push(at),
            Some(ports) => {
                for port in ports {
                    self.by_port.entry(port).or_default().push(at);
                }
            }
        }
        if policy.action == Action::Allow {
            self.allows.1 += 1;
            self.allows.0 += usize::from(!policy.dry_run);
        }
        self.policies.push(policy);
    }

    /// The policies that may match a connection to `port`, in order.
    fn candidates(&self, port: u16) -> impl Iterator<Item = &Authorization> {
        let limited = self.by_port.get(&port).map_or(&[][..], Vec::as_slice);
        Merge(&self.any_port, limited).map(|i| self.policies[i].as_ref())
    }
}

/// Two ascending, disjoint position lists as one ascending sequence.
struct Merge<'a>(&'a [usize], &'a [usize]);

impl Iterator for Merge<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let take_a = match (self.0.first(), self.1.first()) {
            (Some(a), Some(b)) => a < b,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return None,
        };
        let side = if take_a { &mut self.0 } else { &mut self.1 };
        let (first, rest) = side.split_first()?;
        *side = rest;
        Some(*first)
    }
}

impl PolicyIndex {
    pub fn new(policies: &[Authorization]) -> Self {
        let mut index = PolicyIndex::default();
        for p in policies {
            let p = Arc::new(p.clone());
            match p.scope {
                Scope::Global => index.global.push(p.clone()),
                Scope::Namespace => index
                    .by_namespace
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(p.clone()),
                Scope::WorkloadSelector => {}
            }
            index.by_key.insert(key(&p), Indexed::new(p));
        }
        index
    }

    /// The policies that apply to `dst`: global ones, its namespace's, and the selector
    /// policies it names (a name with no such policy, or naming a policy of another scope,
    /// adds nothing: Istio only attaches selector policies this way).
    pub fn applicable<'a>(
        &'a self,
        dst: Destination<'a>,
    ) -> impl Iterator<Item = &'a Authorization> + 'a {
        let ns = self
            .by_namespace
            .get(dst.namespace)
            .into_iter()
            .flat_map(|g| g.policies.iter());
        self.global
            .policies
            .iter()
            .chain(ns)
            .map(|p| p.as_ref())
            .chain(self.selected(dst).map(|i| i.policy.as_ref()))
    }

    fn selected<'a>(&'a self, dst: Destination<'a>) -> impl Iterator<Item = &'a Indexed> + 'a {
        dst.selected
            .iter()
            .filter_map(|k| self.by_key.get(k))
            .filter(|i| i.policy.scope == Scope::WorkloadSelector)
    }

    /// The same decision as [`evaluate`] over [`Self::applicable`], evaluating only the
    /// policies that can match the destination port.
    pub fn authorize(&self, dst: Destination<'_>, conn: &Connection<'_>) -> Verdict {
        let port = conn.dst.port();
        let ns = self.by_namespace.get(dst.namespace);
        let mut tallies = Tallies::default();
        for g in std::iter::once(&self.global).chain(ns) {
            tallies.enforced.allows += g.allows.0;
            tallies.with_dry_run.allows += g.allows.1;
        }
        for i in self.selected(dst) {
            tallies.count_allow(&i.policy);
        }
        let candidates = self
            .global
            .candidates(port)
            .chain(ns.into_iter().flat_map(|g| g.candidates(port)))
            .chain(
                self.selected(dst)
                    .filter(|i| i.may_match(port))
                    .map(|i| i.policy.as_ref()),
            );
        for p in candidates {
            tallies.record(p, conn);
        }
        tallies.verdict()
    }
}

/// `namespace/name`, the key workloads use to name policies.
pub fn key(p: &Authorization) -> String {
    format!("{}/{}", p.namespace, p.name)
}

/// Decides over a set of applicable policies.
pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a Authorization>,
    conn: &Connection<'_>,
) -> Verdict {
    let mut tallies = Tallies::default();
    for p in policies {
        tallies.count_allow(p);
        tallies.record(p, conn);
    }
    tallies.verdict()
}

/// What enforced policies decide, beside what they would decide with dry-run ones included.
#[derive(Default)]
struct Tallies {
    enforced: Tally,
    with_dry_run: Tally,
}

impl Tallies {
    /// Counts an ALLOW policy as in scope (whether or not it is evaluated).
    fn count_allow(&mut self, p: &Authorization) {
        if p.action == Action::Allow {
            self.with_dry_run.allows += 1;
            self.enforced.allows += usize::from(!p.dry_run);
        }
    }

    /// Evaluates one policy and records whether it matched.
    fn record(&mut self, p: &Authorization, conn: &Connection<'_>) {
        let matched = matches(p, conn);
        self.with_dry_run.record(p, matched);
        if !p.dry_run {
            self.enforced.record(p, matched);
        }
    }

    fn verdict(self) -> Verdict {
        let decision = self.enforced.decide();
        let would = self.with_dry_run.decide();
        Verdict {
            dry_run: (would != decision).then_some(would),
            decision,
        }
    }
}

#[derive(Default)]
struct Tally {
    denied_by: Option<String>,
    allows: usize,
    allowed: bool,
}

impl Tally {
    /// Records whether a policy matched (ALLOW policies counted separately).
    fn record(&mut self, p: &Authorization, matched: bool) {
        match p.action {
            Action::Deny if matched && self.denied_by.is_none() => self.denied_by = Some(key(p)),
            Action::Deny => {}
            Action::Allow => self.allowed |= matched,
        }
    }

    fn decide(self) -> Decision {
        if let Some(p) = self.denied_by {
            Decision::Deny(DenyReason::DenyPolicy(p))
        } else if self.allows == 0 || self.allowed {
            Decision::Allow
        } else {
            Decision::Deny(DenyReason::NoAllowMatch(self.allows))
        }
    }
}

/// Whether one policy's rules match a connection.
pub fn matches(p: &Authorization, conn: &Connection<'_>) -> bool {
    p.rules.iter().any(|rule| {
        rule.iter()
            .all(|clause| clause.iter().any(|m| match_one(m, conn)))
    })
}

fn match_one(m: &RbacMatch, conn: &Connection<'_>) -> bool {
    let id = conn.src_identity;
    let principal = conn.principal.as_deref();
    let namespace = id.map(Identity::namespace);
    // For a positive list: empty = no condition; else some entry must match a present value.
    // For a negative list: empty = no condition; else no entry may match a present value.
    fn pos<T>(list: &[T], hit: impl Fn(&T) -> bool) -> bool {
        list.is_empty() || list.iter().any(hit)
    }
    fn neg<T>(list: &[T], hit: impl Fn(&T) -> bool) -> bool {
        !list.iter().any(hit)
    }
    let ns_hit = |s: &StringMatch| namespace.is_some_and(|v| s.matches(v));
    let sa_hit = |s: &ServiceAccountMatch| {
        id.is_some_and(|i| i.namespace() == s.namespace && i.service_account() == s.service_account)
    };
    let principal_hit = |s: &StringMatch| principal.is_some_and(|v| s.matches_principal(v));
    let port = conn.dst.port();
    pos(&m.principals, principal_hit)
        && neg(&m.not_principals, principal_hit)
        && pos(&m.namespaces, ns_hit)
        && neg(&m.not_namespaces, ns_hit)
        && pos(&m.service_accounts, sa_hit)
        && neg(&m.not_service_accounts, sa_hit)
        && pos(&m.source_ips, |c| c.contains(conn.src_ip))
        && neg(&m.not_source_ips, |c| c.contains(conn.src_ip))
        && pos(&m.destination_ips, |c| c.contains(conn.dst.ip()))
        && neg(&m.not_destination_ips, |c| c.contains(conn.dst.ip()))
        && pos(&m.destination_ports, |p| *p == port)
        && neg(&m.not_destination_ports, |p| *p == port)
}

/// Istio writes principals without the scheme: `cluster.local/ns/a/sa/b`.
fn principal_of(id: &Identity) -> String {
    format!(
        "{}/ns/{}/sa/{}",
        id.trust_domain(),
        id.namespace(),
        id.service_account()
    )
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence(_) => !value.is_empty(),
        }
    }

    /// Like [`StringMatch::matches`] for a principal (`td/ns/x/sa/y`); a pattern written with
    /// the `spiffe://` scheme matches too.
    fn matches_principal(&self, principal: &str) -> bool {
        fn strip(s: &str) -> &str {
            s.strip_prefix("spiffe://").unwrap_or(s)
        }
        match self {
            StringMatch::Exact(s) => principal == strip(s),
            StringMatch::Prefix(s) => principal.starts_with(strip(s)),
            _ => self.matches(principal),
        }
    }
}

#[cfg(test)]
mod tests;
