//! What the DNS proxy answers itself: A and AAAA for the mesh's service hostnames and
//! workload hostnames, from the state snapshot; `None` sends the query upstream. Pure, so a
//! table test covers the name handling.
//!
//! A pod's resolver appends its search domains (`<ns>.svc.<domain>`, `svc.<domain>`,
//! `<domain>`) before asking, so `echo.other` from namespace `ns` arrives as
//! `echo.other.ns.svc.cluster.local`. As Istio does, a name that ends in one of those is also
//! tried with it stripped and with the cluster's suffixes put back: `echo.other`,
//! `echo.other.svc.cluster.local`, `echo.other.cluster.local`, `echo.other.ns.svc.cluster.local`.

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};

use crate::state::State;

/// Seconds a local answer may be cached (Istio's).
pub const TTL: u32 = 30;

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    pub namespace: &'a str,
    /// This node's network: a service's VIPs on other networks are not answered.
    pub network: &'a str,
    pub cluster_domain: &'a str,
}

/// The names `query` (lowercase, no trailing dot) may stand for, most specific first.
pub fn candidates(query: &str, client: &Client<'_>) -> Vec<String> {
    let dom = client.cluster_domain;
    let mut out = vec![query.to_string()];
    let search = [
        format!("{}.svc.{dom}", client.namespace),
        format!("svc.{dom}"),
        dom.to_string(),
    ];
    for suffix in &search {
        let Some(stripped) = query
            .strip_suffix(suffix.as_str())
            .and_then(|p| p.strip_suffix('.'))
            .filter(|p| !p.is_empty())
        else {
            continue;
        };
        for name in [
            stripped.to_string(),
            format!("{stripped}.svc.{dom}"),
            format!("{stripped}.{dom}"),
            format!("{stripped}.{}.svc.{dom}", client.namespace),
        ] {
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// The addresses `query` has in the mesh, or `None` when the mesh does not know the name.
/// A service in the client's own namespace wins over one of the same name elsewhere; a
/// service's VIPs are answered (its endpoints' addresses when it has none: headless).
pub fn lookup(state: &State, query: &str, client: &Client<'_>) -> Option<Vec<IpAddr>> {
    for name in candidates(query, client) {
        let services = state.services_by_hostname(&name);
        let service = services
            .iter()
            .find(|s| s.namespace == client.namespace)
            .or_else(|| services.first());
        if let Some(s) = service {
            // A headless service (no VIP) answers with its endpoints' own addresses.
            if s.vips.is_empty() {
                return Some(
                    s.endpoints
                        .iter()
                        .filter_map(|e| state.workloads.get(&e.workload_uid))
                        .filter(|w| w.network == client.network)
                        .flat_map(|w| w.workload_ips.iter().copied())
                        .collect(),
                );
            }
            return Some(
                s.vips
                    .iter()
                    .filter(|v| v.network.is_empty() || v.network == client.network)
                    .map(|v| v.address)
                    .collect(),
            );
        }
        if let Some(w) = state.workload_by_hostname(&name) {
            return Some(w.workload_ips.clone());
        }
    }
    None
}

/// The local answer to `request`, or `None` to forward it: only a standard query for one
/// A or AAAA name of class IN that the mesh knows is answered here. A known name without an
/// address of the asked family gets an empty NOERROR answer (the name exists).
pub fn answer(state: &State, request: &Message, client: &Client<'_>) -> Option<Message> {
    if request.message_type() != MessageType::Query || request.queries().len() != 1 {
        return None;
    }
    let q = &request.queries()[0];
    let want = q.query_type();
    if q.query_class() != DNSClass::IN || !matches!(want, RecordType::A | RecordType::AAAA) {
        return None;
    }
    let name = q.name().to_ascii().to_ascii_lowercase();
    let ips = lookup(state, name.trim_end_matches('.'), client)?;
    let mut response = reply_to(request, ResponseCode::NoError);
    response.set_authoritative(true);
    for ip in ips {
        let rdata = match (ip, want) {
            (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
            (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
            _ => continue,
        };
        response.add_answer(Record::from_rdata(q.name().clone(), TTL, rdata));
    }
    Some(response)
}

/// A response to `request` with its id, question and flags, and `code`.
pub fn reply_to(request: &Message, code: ResponseCode) -> Message {
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    response.add_queries(request.queries().iter().cloned());
    response
}

#[cfg(test)]
mod tests;
