//! Who the client is behind a load balancer: `X-Forwarded-For` is believed only when the
//! connection comes from a trusted proxy (`TRUSTED_PROXIES`), and then only up to the first
//! address that is not itself trusted. It names the client in logs; it grants nothing.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The addresses whose `X-Forwarded-For` is believed; empty (the default) believes none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Trust the addresses in `nets` (`TRUSTED_PROXIES`, as [`crate::config`] resolves it).
    pub fn new(nets: Vec<IpNet>) -> Self {
        TrustedProxies(nets)
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client of a request that arrived from `peer`: `peer` itself unless it is trusted;
    /// otherwise the right-most address of `X-Forwarded-For` (all such headers, in order) that
    /// is not trusted — each trusted proxy appends the address it received the request from,
    /// so everything left of the first untrusted hop was written by the client and may be
    /// made up. When every hop is trusted, the left-most one; an entry that is no address
    /// ends the search at the last address vouched for.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.to_canonical();
        if !self.contains(client) {
            return client;
        }
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .rev()
            // A value that is not text counts as one entry that is no address.
            .flat_map(|value| value.to_str().unwrap_or("?").rsplit(','));
        for hop in hops {
            let Some(ip) = parse_hop(hop.trim()) else {
                break;
            };
            client = ip;
            if !self.contains(ip) {
                break;
            }
        }
        client
    }
}

/// An `X-Forwarded-For` entry: an address, or an address with a port (`1.2.3.4:5678`,
/// `[::1]:5678`) as some proxies write it.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<std::net::SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted(list: &str) -> TrustedProxies {
        TrustedProxies::new(crate::config::parse_trusted_proxies(list).unwrap())
    }

    #[test]
    fn parses_addresses_and_ranges() {
        let t = trusted(" 10.0.0.0/8, 192.168.1.7 ,::1,fd00::/8,");
        assert!(t.contains(ip("10.1.2.3")));
        assert!(t.contains(ip("192.168.1.7")));
        assert!(!t.contains(ip("192.168.1.8")));
        assert!(t.contains(ip("::1")));
        assert!(t.contains(ip("fd12::1")));
        assert!(t.contains(ip("::ffff:10.0.0.1")), "IPv4-mapped");
        // A range written with host bits is the range.
        let t = trusted("10.1.2.3/8");
        assert!(t.contains(ip("10.200.0.1")));
        assert_eq!(trusted(""), TrustedProxies::default());
    }

    #[test]
    fn untrusted_peers_are_the_client_whatever_they_claim() {
        let none = TrustedProxies::default();
        let h = headers(&["203.0.113.7"]);
        assert_eq!(none.client(ip("127.0.0.1"), &h), ip("127.0.0.1"));
        let t = trusted("10.0.0.0/8");
        assert_eq!(t.client(ip("198.51.100.2"), &h), ip("198.51.100.2"));
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let t = trusted("127.0.0.1,10.0.0.0/8");
        let peer = ip("127.0.0.1");
        assert_eq!(t.client(peer, &headers(&[])), peer, "no header");
        assert_eq!(
            t.client(peer, &headers(&["203.0.113.7"])),
            ip("203.0.113.7")
        );
        // A client-made entry left of the real one is ignored.
        assert_eq!(
            t.client(peer, &headers(&["6.6.6.6, 203.0.113.7, 10.0.0.5"])),
            ip("203.0.113.7")
        );
        // Several headers are one list, in order.
        assert_eq!(
            t.client(peer, &headers(&["6.6.6.6, 203.0.113.7", "10.0.0.5"])),
            ip("203.0.113.7")
        );
        assert_eq!(
            t.client(peer, &headers(&["10.0.0.9, 10.0.0.5"])),
            ip("10.0.0.9"),
            "all trusted: the left-most"
        );
        assert_eq!(
            t.client(peer, &headers(&["203.0.113.7:4711"])),
            ip("203.0.113.7")
        );
        assert_eq!(
            t.client(peer, &headers(&["[2001:db8::1]:1"])),
            ip("2001:db8::1")
        );
        // Garbage stops the search at the last hop vouched for.
        assert_eq!(
            t.client(peer, &headers(&["203.0.113.7, bogus, 10.0.0.5"])),
            ip("10.0.0.5")
        );
        assert_eq!(t.client(peer, &headers(&["bogus"])), peer);
        assert_eq!(
            t.client(ip("::ffff:127.0.0.1"), &headers(&["203.0.113.7"])),
            ip("203.0.113.7"),
            "a dual-stack listener's mapped peer"
        );
    }
}
