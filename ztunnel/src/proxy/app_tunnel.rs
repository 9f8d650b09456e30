//! Application tunnels: inbound HBONE handed to an app that reads tunnel metadata itself
//! (Istio's `applicationTunnel`). With the PROXY protocol, the app connection opens with a
//! PROXY v2 header (encoded by the `ppp` crate): the HBONE peer as source, the CONNECT's
//! target as destination, and TLV 0xD0 carrying the peer's SPIFFE id.

use std::net::SocketAddr;

use ppp::v2;

use crate::identity::Identity;

/// Istio's TLV type for the peer's SPIFFE identity.
pub const PEER_IDENTITY_TLV: u8 = 0xD0;

/// The PROXY v2 header for a stream from `src` to `dst` whose peer proved `identity`.
/// Mixed families are written as IPv6 (the IPv4 one mapped), as the header has one family.
pub fn proxy_v2_header(
    src: SocketAddr,
    dst: SocketAddr,
    identity: Option<&Identity>,
) -> std::io::Result<Vec<u8>> {
    let v6 = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    };
    let (src, dst) = if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        (v6(src), v6(dst))
    };
    let mut builder = v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (src, dst),
    );
    if let Some(id) = identity {
        builder = builder.write_tlv(PEER_IDENTITY_TLV, id.to_string().as_bytes())?;
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What we write, read back by the same crate's parser: addresses, ports, the TLV.
    #[test]
    fn header_carries_addresses_and_the_peer_identity() {
        let id: Identity = "spiffe://cluster.local/ns/a/sa/client".parse().unwrap();
        let cases = [
            ("198.18.1.2:40000", "198.18.2.3:8080"),
            ("[fd00::2]:40000", "[fd00::3]:8080"),
            ("198.18.1.2:40000", "[fd00::3]:8080"),
        ];
        for (src, dst) in cases {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let bytes = proxy_v2_header(src, dst, Some(&id)).unwrap();
            let header = v2::Header::try_from(bytes.as_slice()).unwrap();
            assert_eq!(header.command, v2::Command::Proxy);
            assert_eq!(header.protocol, v2::Protocol::Stream);
            let (got_src, got_dst) = match header.addresses {
                v2::Addresses::IPv4(a) => (
                    SocketAddr::new(a.source_address.into(), a.source_port),
                    SocketAddr::new(a.destination_address.into(), a.destination_port),
                ),
                v2::Addresses::IPv6(a) => (
                    SocketAddr::new(a.source_address.into(), a.source_port),
                    SocketAddr::new(a.destination_address.into(), a.destination_port),
                ),
                other => panic!("{other:?}"),
            };
            let canon = |a: SocketAddr| match a.ip() {
                std::net::IpAddr::V6(v6) => v6
                    .to_ipv4_mapped()
                    .map_or(a, |v4| SocketAddr::new(v4.into(), a.port())),
                _ => a,
            };
            assert_eq!((canon(got_src), canon(got_dst)), (src, dst));
            let tlvs: Vec<_> = header.tlvs().collect::<Result<_, _>>().unwrap();
            assert_eq!(tlvs.len(), 1);
            assert_eq!(tlvs[0].kind, PEER_IDENTITY_TLV);
            assert_eq!(&*tlvs[0].value, id.to_string().as_bytes());
        }
        // Without an identity: no TLV at all.
        let bytes = proxy_v2_header(
            "198.18.1.2:1".parse().unwrap(),
            "198.18.1.3:2".parse().unwrap(),
            None,
        )
        .unwrap();
        let header = v2::Header::try_from(bytes.as_slice()).unwrap();
        assert_eq!(header.tlvs().count(), 0);
    }
}
