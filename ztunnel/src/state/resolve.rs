//! Where a connection to some address goes: a pure function of a snapshot, the connecting
//! pod ([`Origin`]) and random draws.
//!
//! In order: a service VIP with a waypoint goes to the waypoint; a VIP without one goes to an
//! endpoint chosen by [`super::lb`], directly or, when the endpoint is on another network,
//! through that network's gateway (double HBONE); a workload address with a workload waypoint
//! goes to the waypoint; a workload address goes to the workload. Traffic from a waypoint is
//! never sent back to it. A waypoint or gateway that cannot be resolved refuses the
//! connection: it is never bypassed.

use std::net::SocketAddr;
use std::sync::Arc;

use super::lb::{self, Choice, Origin};
use super::{Endpoint, GatewayAddress, GatewayDestination, Protocol, Service, State, Workload};
use crate::identity::Identity;

/// One mTLS hop: connect to `addr`; the server must prove one of `identities`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HboneHop {
    pub addr: SocketAddr,
    pub identities: Vec<Identity>,
}

/// Where a connection to some address should go.
#[derive(Clone, Debug)]
pub enum Upstream {
    /// Over HBONE to `hop` with CONNECT `authority`. `workload` is the pod that terminates
    /// the tunnel: the destination itself, or the waypoint when `waypoint` is set.
    Hbone {
        hop: HboneHop,
        authority: SocketAddr,
        workload: Arc<Workload>,
        service: Option<Arc<Service>>,
        waypoint: bool,
    },
    /// Double HBONE: an HBONE tunnel to a network gateway with CONNECT `authority`
    /// (`hostname:port`), and inside it a second mTLS session, to an endpoint proving one of
    /// `identities`, with the same CONNECT. `workload` is the endpoint this side chose, for
    /// logs; the gateway makes the final choice.
    Gateway {
        gateway: HboneHop,
        authority: String,
        identities: Vec<Identity>,
        workload: Arc<Workload>,
        service: Arc<Service>,
    },
    /// A known workload outside the mesh: plain TCP to `target`.
    Tcp {
        workload: Arc<Workload>,
        service: Option<Arc<Service>>,
        target: SocketAddr,
    },
    /// Not a known workload or service (or a service in PASSTHROUGH mode): plain TCP to the
    /// original destination.
    Passthrough,
    /// Known, but nothing may take this connection.
    Unroutable {
        /// The service hostname or the workload, for logs.
        target: String,
        reason: &'static str,
    },
}

/// What a waypoint or gateway address names.
enum GatewayTarget<'a> {
    Service(&'a Arc<Service>),
    /// A workload, at this one of its addresses.
    Workload(&'a Arc<Workload>, std::net::IpAddr),
}

/// A waypoint or gateway resolved to the workload that takes the tunnel.
struct Resolved {
    hop: HboneHop,
    workload: Arc<Workload>,
}

impl State {
    /// Resolves an original destination for a connection from `origin`. `draw(total)`
    /// returns a number in `0..total` (random in production, fixed in tests).
    pub fn resolve(
        &self,
        dst: SocketAddr,
        origin: &Origin<'_>,
        draw: impl FnMut(u64) -> u64,
    ) -> Upstream {
        if let Some(service) = self.service_by_vip(dst.ip()) {
            if let Some(waypoint) = &service.waypoint
                && !self.is_from(waypoint, origin)
            {
                return self.via_waypoint(waypoint, dst, Some(service), &service.hostname, draw);
            }
            return self.resolve_service(service, dst, origin, draw);
        }
        let Some(workload) = self.workload_by_ip(dst.ip()) else {
            return Upstream::Passthrough;
        };
        if let Some(waypoint) = &workload.waypoint
            && !self.is_from(waypoint, origin)
        {
            return self.via_waypoint(waypoint, dst, None, &workload.uid, draw);
        }
        if workload.network != origin.network {
            // Another network's pod address means nothing here: only its services, through
            // the gateway, reach it (as in Istio).
            return Upstream::Unroutable {
                target: workload.uid.clone(),
                reason: "workload is on another network; reach it through a service",
            };
        }
        workload_upstream(workload.clone(), None, dst, Vec::new())
    }

    fn resolve_service(
        &self,
        service: &Arc<Service>,
        dst: SocketAddr,
        origin: &Origin<'_>,
        mut draw: impl FnMut(u64) -> u64,
    ) -> Upstream {
        let unroutable = |reason| Upstream::Unroutable {
            target: service.hostname.clone(),
            reason,
        };
        let Some(&service_target) = service.ports.get(&dst.port()) else {
            return unroutable("service has no such port");
        };
        let candidates = service.endpoints.iter().filter_map(|e| {
            let w = self.workloads.get(&e.workload_uid)?;
            // A remote endpoint needs no address of its own: its gateway has one.
            let reachable = !w.workload_ips.is_empty()
                || (w.network != origin.network && w.network_gateway.is_some());
            reachable.then_some((e, w))
        });
        let (endpoint, workload) = match lb::choose(
            service.load_balancer.as_ref(),
            candidates,
            origin,
            &mut draw,
        ) {
            Choice::Endpoint(c) => c,
            Choice::Passthrough => return Upstream::Passthrough,
            Choice::None(reason) => return unroutable(reason),
        };
        let port = target_port(endpoint, service_target, dst.port());
        let sans: Vec<Identity> = service
            .subject_alt_names
            .iter()
            .filter_map(|s| s.parse::<Identity>().ok())
            .collect();
        if workload.network != origin.network {
            return self.via_network_gateway(service, workload, dst, sans, draw);
        }
        // Prefer an address of the same family as the VIP.
        let Some(ip) = workload
            .workload_ips
            .iter()
            .find(|ip| ip.is_ipv4() == dst.is_ipv4())
            .or(workload.workload_ips.first())
        else {
            return unroutable("endpoint has no address");
        };
        workload_upstream(
            workload.clone(),
            Some(service.clone()),
            SocketAddr::new(*ip, port),
            sans,
        )
    }

    /// Double HBONE to `workload` on another network, through its network's gateway.
    fn via_network_gateway(
        &self,
        service: &Arc<Service>,
        workload: &Arc<Workload>,
        dst: SocketAddr,
        mut identities: Vec<Identity>,
        draw: impl FnOnce(u64) -> u64,
    ) -> Upstream {
        let unroutable = |reason| Upstream::Unroutable {
            target: service.hostname.clone(),
            reason,
        };
        let Some(gateway) = &workload.network_gateway else {
            return unroutable("endpoint is on another network without a gateway");
        };
        let Some(resolved) = self.resolve_gateway(gateway, draw) else {
            return unroutable("network gateway unknown");
        };
        // The gateway picks the endpoint: the inner session may end at any of the service's
        // endpoints on that network, and only at one of them.
        for e in &service.endpoints {
            if let Some(w) = self.workloads.get(&e.workload_uid)
                && w.network == workload.network
                && !identities.contains(&w.identity)
            {
                identities.push(w.identity.clone());
            }
        }
        Upstream::Gateway {
            gateway: resolved.hop,
            authority: format!("{}:{}", service.hostname, dst.port()),
            identities,
            workload: workload.clone(),
            service: service.clone(),
        }
    }

    fn via_waypoint(
        &self,
        waypoint: &GatewayAddress,
        dst: SocketAddr,
        service: Option<&Arc<Service>>,
        target: &str,
        draw: impl FnOnce(u64) -> u64,
    ) -> Upstream {
        match self.resolve_gateway(waypoint, draw) {
            Some(r) => Upstream::Hbone {
                hop: r.hop,
                authority: dst,
                workload: r.workload,
                service: service.cloned(),
                waypoint: true,
            },
            None => Upstream::Unroutable {
                target: target.to_string(),
                reason: "waypoint unknown or without endpoints",
            },
        }
    }

    /// The workload behind a waypoint or gateway address, and the hop to it. An address is a
    /// service VIP (an endpoint is picked) or a workload's own; a hostname names a service.
    /// What a waypoint or gateway address names: a service (a VIP, or a hostname) or a
    /// workload's own address.
    fn gateway_target(&self, gateway: &GatewayAddress) -> Option<GatewayTarget<'_>> {
        match &gateway.destination {
            GatewayDestination::Address(a) => match self.service_by_vip(a.address) {
                Some(s) => Some(GatewayTarget::Service(s)),
                None => self
                    .workload_by_ip(a.address)
                    .map(|w| GatewayTarget::Workload(w, a.address)),
            },
            GatewayDestination::Hostname(h) => {
                self.services.get(&h.key()).map(GatewayTarget::Service)
            }
        }
    }

    fn resolve_gateway(
        &self,
        gateway: &GatewayAddress,
        draw: impl FnOnce(u64) -> u64,
    ) -> Option<Resolved> {
        let port = gateway.hbone_mtls_port;
        let service = match self.gateway_target(gateway)? {
            GatewayTarget::Service(s) => s,
            GatewayTarget::Workload(w, ip) => {
                return Some(Resolved {
                    hop: HboneHop {
                        addr: SocketAddr::new(ip, port),
                        identities: vec![w.identity.clone()],
                    },
                    workload: w.clone(),
                });
            }
        };
        let candidates = service.endpoints.iter().filter_map(|e| {
            let w = self.workloads.get(&e.workload_uid)?;
            (!w.workload_ips.is_empty()).then_some((e, w))
        });
        let Choice::Endpoint((endpoint, workload)) =
            lb::choose(None, candidates, &Origin::default(), draw)
        else {
            return None;
        };
        let target = endpoint
            .port
            .get(&port)
            .or_else(|| service.ports.get(&port))
            .copied()
            .filter(|p| *p != 0)
            .unwrap_or(port);
        let mut identities = vec![workload.identity.clone()];
        identities.extend(
            service
                .subject_alt_names
                .iter()
                .filter_map(|s| s.parse::<Identity>().ok()),
        );
        Some(Resolved {
            hop: HboneHop {
                addr: SocketAddr::new(*workload.workload_ips.first()?, target),
                identities,
            },
            workload: workload.clone(),
        })
    }

    /// The target port on workload `uid` for port `port` of the service named `hostname`
    /// (a CONNECT from a network gateway names the service, not the pod), when `uid` backs it.
    pub fn service_port_on(&self, hostname: &str, port: u16, uid: &str) -> Option<u16> {
        self.services_by_hostname(&hostname.to_ascii_lowercase())
            .iter()
            .find_map(|s| {
                let endpoint = s.endpoints.iter().find(|e| e.workload_uid == uid)?;
                Some(target_port(endpoint, *s.ports.get(&port)?, port))
            })
    }

    /// Whether the connecting pod is (one of the workloads behind) `gateway`: its traffic
    /// then goes on to the destination instead of looping back to itself.
    fn is_from(&self, gateway: &GatewayAddress, origin: &Origin<'_>) -> bool {
        let Some(me) = origin.workload else {
            return false;
        };
        match self.gateway_target(gateway) {
            Some(GatewayTarget::Service(s)) => s.endpoints.iter().any(|e| e.workload_uid == me.uid),
            Some(GatewayTarget::Workload(w, _)) => w.uid == me.uid,
            None => false,
        }
    }
}

/// The port `endpoint` takes service port `port` on: its own mapping, else the service's
/// (`service_target`, 0 meaning the same port).
fn target_port(endpoint: &Endpoint, service_target: u16, port: u16) -> u16 {
    endpoint
        .port
        .get(&port)
        .copied()
        .filter(|p| *p != 0)
        .unwrap_or(if service_target == 0 {
            port
        } else {
            service_target
        })
}

fn workload_upstream(
    workload: Arc<Workload>,
    service: Option<Arc<Service>>,
    target: SocketAddr,
    mut identities: Vec<Identity>,
) -> Upstream {
    match workload.protocol {
        Protocol::Hbone => {
            identities.retain(|i| *i != workload.identity);
            identities.insert(0, workload.identity.clone());
            Upstream::Hbone {
                hop: HboneHop {
                    addr: SocketAddr::new(target.ip(), mesh_contract::ports::HBONE),
                    identities,
                },
                authority: target,
                workload,
                service,
                waypoint: false,
            }
        }
        Protocol::Tcp => Upstream::Tcp {
            workload,
            service,
            target,
        },
    }
}
