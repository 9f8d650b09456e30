//! The policy route that returns app replies to ztunnel (SPEC §3), over rtnetlink:
//! `fwmark 0x111/0xfff lookup 100` at priority 32764 and `local default dev lo table 100`, per
//! address family, inside the pod's netns.

use std::net::{Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use mesh_contract::marks;
use mesh_netns::NetNs;
use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

/// The loopback interface's index, the same in every network namespace.
const LOOPBACK: u32 = 1;

/// Why a route operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("cannot open a netlink socket in the pod netns")]
    Socket(#[source] std::io::Error),
    #[error("entering the pod netns")]
    Netns(#[from] mesh_netns::Error),
    #[error("netlink: {0}")]
    Netlink(String),
}

#[allow(clippy::needless_pass_by_value)] // used as map_err(nl)
fn nl(e: rtnetlink::Error) -> RouteError {
    RouteError::Netlink(e.to_string())
}

/// Runs `f` with a netlink handle bound to `netns`.
async fn in_netns<T>(
    netns: &NetNs,
    f: impl AsyncFnOnce(&Handle) -> Result<T, RouteError>,
) -> Result<T, RouteError> {
    let (conn, handle, _) = netns
        .run(rtnetlink::new_connection)?
        .map_err(RouteError::Socket)?;
    let task = tokio::spawn(conn);
    let out = f(&handle).await;
    task.abort();
    out
}

fn is_ours(rule: &RuleMessage) -> bool {
    rule.attributes
        .iter()
        .any(|a| matches!(a, RuleAttribute::Priority(p) if *p == marks::RULE_PRIORITY))
}

fn is_exact(rule: &RuleMessage) -> bool {
    let has = |want: &RuleAttribute| rule.attributes.iter().any(|a| a == want);
    has(&RuleAttribute::FwMark(marks::CONNTRACK_REPLY))
        && has(&RuleAttribute::FwMask(marks::MASK))
        && (has(&RuleAttribute::Table(marks::ROUTE_TABLE))
            || u32::from(rule.header.table) == marks::ROUTE_TABLE)
        && rule.header.action == RuleAction::ToTable
}

fn in_table(route: &RouteMessage) -> bool {
    route
        .attributes
        .iter()
        .any(|a| matches!(a, RouteAttribute::Table(t) if *t == marks::ROUTE_TABLE))
        || u32::from(route.header.table) == marks::ROUTE_TABLE
}

fn local_default(v6: bool) -> RouteMessage {
    if v6 {
        RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .table_id(marks::ROUTE_TABLE)
            .output_interface(LOOPBACK)
            .build()
    } else {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .table_id(marks::ROUTE_TABLE)
            .output_interface(LOOPBACK)
            .build()
    }
}

fn families(v4: bool, v6: bool) -> impl Iterator<Item = (IpVersion, bool)> {
    [(v4, IpVersion::V4, false), (v6, IpVersion::V6, true)]
        .into_iter()
        .filter(|(on, _, _)| *on)
        .map(|(_, version, is_v6)| (version, is_v6))
}

/// Installs the rule and route for each enabled family, replacing anything at our priority
/// that differs. Idempotent.
pub async fn ensure(netns: &NetNs, v4: bool, v6: bool) -> Result<(), RouteError> {
    in_netns(netns, async |h| {
        for (version, is_v6) in families(v4, v6) {
            h.route()
                .add(local_default(is_v6))
                .replace()
                .execute()
                .await
                .map_err(nl)?;
            let rules: Vec<RuleMessage> = h
                .rule()
                .get(version.clone())
                .execute()
                .try_collect()
                .await
                .map_err(nl)?;
            let ours: Vec<RuleMessage> = rules.into_iter().filter(is_ours).collect();
            if ours.len() == 1 && is_exact(&ours[0]) {
                continue;
            }
            for r in ours {
                h.rule().del(r).execute().await.map_err(nl)?;
            }
            let mut add = h
                .rule()
                .add()
                .priority(marks::RULE_PRIORITY)
                .fw_mark(marks::CONNTRACK_REPLY)
                .table_id(marks::ROUTE_TABLE)
                .action(RuleAction::ToTable);
            add.message_mut()
                .attributes
                .push(RuleAttribute::FwMask(marks::MASK));
            if is_v6 {
                add.v6().execute().await.map_err(nl)?;
            } else {
                add.v4().execute().await.map_err(nl)?;
            }
        }
        Ok(())
    })
    .await
}

/// Whether the rule and route of each enabled family are in place exactly.
pub async fn present(netns: &NetNs, v4: bool, v6: bool) -> Result<bool, RouteError> {
    in_netns(netns, async |h| {
        for (version, _) in families(v4, v6) {
            let rules: Vec<RuleMessage> = h
                .rule()
                .get(version.clone())
                .execute()
                .try_collect()
                .await
                .map_err(nl)?;
            let ours: Vec<&RuleMessage> = rules.iter().filter(|r| is_ours(r)).collect();
            if ours.len() != 1 || !is_exact(ours[0]) {
                return Ok(false);
            }
            let dump = match version {
                IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
                IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
            };
            let routes: Vec<RouteMessage> = h
                .route()
                .get(dump)
                .execute()
                .try_collect()
                .await
                .map_err(nl)?;
            let local = routes.iter().any(|r| {
                in_table(r)
                    && r.header.kind == RouteType::Local
                    && r.header.destination_prefix_length == 0
            });
            if !local {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await
}

/// Removes our rules (both families) and every route in our table. Idempotent.
pub async fn remove(netns: &NetNs) -> Result<(), RouteError> {
    in_netns(netns, async |h| {
        for version in [IpVersion::V4, IpVersion::V6] {
            let rules: Vec<RuleMessage> = h
                .rule()
                .get(version.clone())
                .execute()
                .try_collect()
                .await
                .unwrap_or_default();
            for r in rules.into_iter().filter(is_ours) {
                h.rule().del(r).execute().await.map_err(nl)?;
            }
            let dump = match version {
                IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
                IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
            };
            let routes: Vec<RouteMessage> = h
                .route()
                .get(dump)
                .execute()
                .try_collect()
                .await
                .unwrap_or_default();
            for r in routes.into_iter().filter(in_table) {
                h.route().del(r).execute().await.map_err(nl)?;
            }
        }
        Ok(())
    })
    .await
}
