//! HBONE requests without IO: building the client's CONNECT and validating it on the server.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderValue, Method, Request, StatusCode};
use mesh_contract::ports;

use crate::identity::Identity;

/// Headers Istio sends on CONNECT (SPEC §5).
pub const FORWARDED: &str = "forwarded";
pub const BAGGAGE: &str = "baggage";
pub const TRACEPARENT: &str = "traceparent";

/// Who is connecting, for the informational headers.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub addr: SocketAddr,
    pub identity: &'a Identity,
    pub pod_name: &'a str,
}

/// The CONNECT request for one tunnelled connection to `target`: an address (`SocketAddr`'s
/// Display brackets IPv6, "[fd00::1]:80") or, through a network gateway, `hostname:port`.
pub fn connect_request(target: impl std::fmt::Display, src: Source<'_>) -> Request<()> {
    let trace_id: u128 = rand::random::<u128>() | 1;
    let span_id: u64 = rand::random::<u64>() | 1;
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .unwrap_or_else(|_| {
            // A hostname from the control plane that is not a valid authority: send one the
            // peer refuses rather than panic.
            let mut req = Request::new(());
            *req.method_mut() = Method::CONNECT;
            req
        });
    let headers = req.headers_mut();
    let forwarded = format!("for=\"{}\"", src.addr);
    let baggage = format!(
        "k8s.namespace.name={},k8s.pod.name={},service.name={}",
        src.identity.namespace(),
        src.pod_name,
        src.identity.service_account()
    );
    let traceparent = format!("00-{trace_id:032x}-{span_id:016x}-00");
    for (name, value) in [
        (FORWARDED, forwarded),
        (BAGGAGE, baggage),
        (TRACEPARENT, traceparent),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
    req
}

/// Why a CONNECT was refused, with the status to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {reason}")]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: String,
}

fn bad_request(reason: impl Into<String>) -> Rejection {
    Rejection {
        status: StatusCode::BAD_REQUEST,
        reason: reason.into(),
    }
}

/// Validates a CONNECT that arrived on a connection to `local` (this pod's address). Returns
/// the app address to connect to. The authority is `IP:port` (this pod's), or, from a network
/// gateway, `hostname:port` of a service: `service_port(hostname, port)` then gives this
/// pod's target port for it, or `None` when this pod does not back that service.
pub fn validate_connect<B>(
    req: &Request<B>,
    local: IpAddr,
    service_port: impl FnOnce(&str, u16) -> Option<u16>,
) -> Result<SocketAddr, Rejection> {
    if req.method() != Method::CONNECT {
        return Err(Rejection {
            status: StatusCode::METHOD_NOT_ALLOWED,
            reason: format!("method {} (only CONNECT)", req.method()),
        });
    }
    let authority = req
        .uri()
        .authority()
        .ok_or_else(|| bad_request("CONNECT without an authority"))?;
    let target: SocketAddr = match authority.as_str().parse() {
        Ok(addr) => addr,
        Err(_) => {
            let not_ours = || bad_request(format!("authority {authority} is not IP:port"));
            let host = authority.host();
            let port = authority
                .port_u16()
                .filter(|p| *p != 0)
                .ok_or_else(not_ours)?;
            if host.is_empty() || host.starts_with('[') {
                return Err(not_ours());
            }
            let target = service_port(host, port).ok_or_else(|| {
                bad_request(format!(
                    "authority {authority}: this pod backs no service {host} on port {port}"
                ))
            })?;
            SocketAddr::new(local, target)
        }
    };
    if target.port() == 0 {
        return Err(bad_request("authority port 0"));
    }
    if !same_ip(target.ip(), local) {
        return Err(bad_request(format!(
            "destination {} does not match this pod's address {local}",
            target.ip()
        )));
    }
    if ports::LOOP_GUARD.contains(&target.port()) {
        return Err(bad_request(format!(
            "destination port {} is a proxy port",
            target.port()
        )));
    }
    Ok(target)
}

/// Whether two addresses are the same, an IPv4-mapped IPv6 address counting as its IPv4 one.
pub fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    fn canonical(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        }
    }
    canonical(a) == canonical(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_service(_: &str, _: u16) -> Option<u16> {
        None
    }

    /// This pod backs `echo.ns.svc` port 80 on 8080.
    fn echo_service(host: &str, port: u16) -> Option<u16> {
        (host == "echo.ns.svc" && port == 80).then_some(8080)
    }

    fn src() -> (Identity, SocketAddr) {
        (
            Identity::new("cluster.local", "ns", "sa").unwrap(),
            "198.18.1.2:40000".parse().unwrap(),
        )
    }

    #[test]
    fn built_requests_validate() {
        let (id, addr) = src();
        for target in ["198.18.2.2:8080", "[fd00::2]:8080"] {
            let target: SocketAddr = target.parse().unwrap();
            let req = connect_request(
                target,
                Source {
                    addr,
                    identity: &id,
                    pod_name: "a1",
                },
            );
            assert_eq!(req.uri().to_string(), target.to_string());
            assert_eq!(req.headers()[FORWARDED], "for=\"198.18.1.2:40000\"");
            assert!(
                req.headers()[BAGGAGE]
                    .to_str()
                    .unwrap()
                    .contains("k8s.namespace.name=ns")
            );
            assert_eq!(req.headers()[TRACEPARENT].len(), 55);
            assert_eq!(validate_connect(&req, target.ip(), no_service), Ok(target));
        }
    }

    #[test]
    fn malformed_and_hostile_connects_are_refused() {
        let local: IpAddr = "198.18.2.2".parse().unwrap();
        let cases: &[(&str, &str, StatusCode)] = &[
            ("GET", "198.18.2.2:80", StatusCode::METHOD_NOT_ALLOWED),
            ("CONNECT", "example.com:80", StatusCode::BAD_REQUEST),
            ("CONNECT", "echo.ns.svc:81", StatusCode::BAD_REQUEST),
            ("CONNECT", "echo.ns.svc", StatusCode::BAD_REQUEST),
            ("CONNECT", "echo.ns.svc:0", StatusCode::BAD_REQUEST),
            ("CONNECT", "198.18.2.2", StatusCode::BAD_REQUEST),
            ("CONNECT", "198.18.2.2:0", StatusCode::BAD_REQUEST),
            ("CONNECT", "198.18.2.3:80", StatusCode::BAD_REQUEST),
            ("CONNECT", "127.0.0.1:80", StatusCode::BAD_REQUEST),
            ("CONNECT", "198.18.2.2:15008", StatusCode::BAD_REQUEST),
            ("CONNECT", "198.18.2.2:15001", StatusCode::BAD_REQUEST),
            ("CONNECT", "198.18.2.2:15006", StatusCode::BAD_REQUEST),
            ("CONNECT", "[fd00::2]:80", StatusCode::BAD_REQUEST),
        ];
        for (method, uri, status) in cases {
            let req = Request::builder()
                .method(*method)
                .uri(*uri)
                .body(())
                .unwrap();
            let got = validate_connect(&req, local, echo_service).unwrap_err();
            assert_eq!(got.status, *status, "{method} {uri}: {}", got.reason);
        }
        // A service hostname this pod backs: its target port on this pod's address.
        let req = Request::builder()
            .method("CONNECT")
            .uri("echo.ns.svc:80")
            .body(())
            .unwrap();
        assert_eq!(
            validate_connect(&req, local, echo_service),
            Ok(SocketAddr::new(local, 8080))
        );
        // A v4-mapped local address still matches its v4 authority.
        let req = Request::builder()
            .method("CONNECT")
            .uri("198.18.2.2:80")
            .body(())
            .unwrap();
        assert!(validate_connect(&req, "::ffff:198.18.2.2".parse().unwrap(), no_service).is_ok());
    }
}
