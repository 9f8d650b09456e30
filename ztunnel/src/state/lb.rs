//! Which endpoint of a service takes a connection, as istiod's `LoadBalancing` asks: endpoints
//! filtered by health, then by routing preference (region, zone, subzone, node, cluster,
//! network, compared with the connecting pod's), then one drawn at random weighted by
//! `capacity`. A pure function of its inputs and the random draw, so a table test covers it.

use std::str::FromStr;
use std::sync::Arc;

use serde::Serialize;

use super::{Endpoint, HealthStatus, Workload};

/// A service's load-balancing policy (Istio's `LoadBalancing`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    pub routing_preferences: Vec<Scope>,
    pub mode: Mode,
    pub health_policy: HealthPolicy,
}

/// What an endpoint must share with the connecting pod to be preferred.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Scope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

/// How routing preferences apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Mode {
    /// Preferences are not applied (istiod's `UNSPECIFIED_MODE`).
    #[default]
    Standard,
    /// Only endpoints that match every preference; none matching refuses the connection.
    Strict,
    /// The endpoints matching the longest run of leading preferences; all endpoints when
    /// none match.
    Failover,
    /// No endpoint choice: the connection goes to the address the app dialled.
    Passthrough,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HealthPolicy {
    /// Unhealthy endpoints are never picked.
    #[default]
    OnlyHealthy,
    /// Every endpoint may be picked.
    AllowAll,
}

/// A name that is not one of the enum's values, for config errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not one of {expected}")]
pub struct UnknownName {
    pub value: String,
    pub expected: &'static str,
}

/// Parses Istio's spellings: the proto's (`FAILOVER`), and the local config's (`Failover`).
fn by_name<T: Copy>(
    value: &str,
    table: &[(&str, T)],
    expected: &'static str,
) -> Result<T, UnknownName> {
    let wanted: String = value
        .chars()
        .filter(|c| *c != '_')
        .collect::<String>()
        .to_ascii_lowercase();
    table
        .iter()
        .find(|(name, _)| name.replace('_', "").eq_ignore_ascii_case(&wanted))
        .map(|(_, v)| *v)
        .ok_or_else(|| UnknownName {
            value: value.to_string(),
            expected,
        })
}

impl FromStr for Scope {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use Scope::*;
        by_name(
            s,
            &[
                ("REGION", Region),
                ("ZONE", Zone),
                ("SUBZONE", Subzone),
                ("NODE", Node),
                ("CLUSTER", Cluster),
                ("NETWORK", Network),
            ],
            "REGION, ZONE, SUBZONE, NODE, CLUSTER, NETWORK",
        )
    }
}

impl FromStr for Mode {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use Mode::*;
        by_name(
            s,
            &[
                ("STANDARD", Standard),
                ("UNSPECIFIED_MODE", Standard),
                ("STRICT", Strict),
                ("FAILOVER", Failover),
                ("PASSTHROUGH", Passthrough),
            ],
            "STANDARD, STRICT, FAILOVER, PASSTHROUGH",
        )
    }
}

impl FromStr for HealthPolicy {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        by_name(
            s,
            &[
                ("ONLY_HEALTHY", HealthPolicy::OnlyHealthy),
                ("ALLOW_ALL", HealthPolicy::AllowAll),
            ],
            "ONLY_HEALTHY, ALLOW_ALL",
        )
    }
}

/// Where the connecting pod is: its workload entry when known, and this node's network.
#[derive(Debug, Clone, Copy, Default)]
pub struct Origin<'a> {
    pub workload: Option<&'a Workload>,
    pub network: &'a str,
}

impl Origin<'_> {
    /// Whether `w` shares `scope` with the origin. Without the origin's workload entry only
    /// the network is known: every other scope does not match (so STRICT refuses).
    fn shares(&self, scope: Scope, w: &Workload) -> bool {
        let Some(me) = self.workload else {
            return scope == Scope::Network && w.network == self.network;
        };
        match scope {
            Scope::Region => me.locality.region == w.locality.region,
            Scope::Zone => me.locality.zone == w.locality.zone,
            Scope::Subzone => me.locality.subzone == w.locality.subzone,
            Scope::Node => me.node == w.node,
            Scope::Cluster => me.cluster_id == w.cluster_id,
            Scope::Network => self.network == w.network,
        }
    }
}

/// An endpoint and its workload.
pub type Candidate<'a> = (&'a Endpoint, &'a Arc<Workload>);

/// What [`choose`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Choice<'a> {
    Endpoint(Candidate<'a>),
    /// PASSTHROUGH mode: no endpoint, the original destination.
    Passthrough,
    /// Nothing may take the connection, and why.
    None(&'static str),
}

/// Picks an endpoint. `draw(total)` returns a number in `0..total` (random in production,
/// fixed in tests); capacities are the weights.
pub fn choose<'a>(
    policy: Option<&LoadBalancer>,
    candidates: impl IntoIterator<Item = Candidate<'a>>,
    origin: &Origin<'_>,
    draw: impl FnOnce(u64) -> u64,
) -> Choice<'a> {
    let default = LoadBalancer::default();
    let policy = policy.unwrap_or(&default);
    if policy.mode == Mode::Passthrough {
        return Choice::Passthrough;
    }
    let mut pool: Vec<Candidate<'a>> = candidates
        .into_iter()
        .filter(|(e, w)| {
            policy.health_policy == HealthPolicy::AllowAll
                || (w.status == HealthStatus::Healthy && e.status == HealthStatus::Healthy)
        })
        .collect();
    if pool.is_empty() {
        return Choice::None("no healthy endpoints");
    }
    // Capacity 0 takes no traffic: such endpoints do not hold a preference tier either.
    pool.retain(|(_, w)| w.capacity > 0);
    if pool.is_empty() {
        return Choice::None("no endpoint has capacity");
    }
    let prefs = &policy.routing_preferences;
    let rank = |w: &Workload| {
        prefs
            .iter()
            .take_while(|scope| origin.shares(**scope, w))
            .count()
    };
    match policy.mode {
        Mode::Strict => {
            pool.retain(|(_, w)| rank(w) == prefs.len());
            if pool.is_empty() {
                return Choice::None("no endpoint matches the strict routing preferences");
            }
        }
        Mode::Failover => {
            let best = pool.iter().map(|(_, w)| rank(w)).max().unwrap_or(0);
            pool.retain(|(_, w)| rank(w) == best);
        }
        Mode::Standard | Mode::Passthrough => {}
    }
    let total: u64 = pool.iter().map(|(_, w)| u64::from(w.capacity)).sum();
    let mut point = draw(total) % total;
    let last = pool[pool.len() - 1];
    for c in pool {
        let weight = u64::from(c.1.capacity);
        if point < weight {
            return Choice::Endpoint(c);
        }
        point -= weight;
    }
    // Not reached: the point is below the sum of the weights.
    Choice::Endpoint(last)
}

#[cfg(test)]
mod tests;
