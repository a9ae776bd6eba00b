//! Who the client is: the socket peer, or, when the peer is a trusted reverse proxy, the
//! right-most address in `X-Forwarded-For` (or `Forwarded`) that is not itself a trusted proxy.
//!
//! Walking from the right matters: every proxy *appends* the address it saw, so the entries to
//! the right of the first untrusted one were written by our own proxies, while everything to its
//! left was supplied by the client and can say anything. (actix's `realip_remote_addr()` takes
//! the left-most value and must not be used for limits.)
//!
//! Limits then key on the address *grouped* to a prefix (IPv4 /32 and IPv6 /64 by default), so
//! one host holding a whole /64 counts as one client.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix_web::http::header::HeaderMap;

/// An address block, kept as an IPv6 network (IPv4 as `::ffff:a.b.c.d/96+n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: u128,
    prefix: u8,
}

fn as_v6_bits(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Loopback, private (RFC 1918) or unique-local (fc00::/7): where a reverse proxy would be.
fn is_local(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private(),
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

fn mask(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix.min(128)))
    }
}

impl Cidr {
    /// Parse `10.0.0.0/8`, `fd00::/8`, or a bare address (one host).
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().ok()?)),
            None => (text.trim(), None),
        };
        let ip: IpAddr = addr.parse().ok()?;
        let (max, offset) = match ip {
            IpAddr::V4(_) => (32, 96),
            IpAddr::V6(_) => (128, 0),
        };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return None;
        }
        let prefix = prefix + offset;
        Some(Cidr {
            net: as_v6_bits(ip) & mask(prefix),
            prefix,
        })
    }

    /// Whether `ip` lies inside this block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        as_v6_bits(ip) & mask(self.prefix) == self.net
    }
}

/// How client addresses are found and grouped.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    trusted: Vec<Cidr>,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    /// Whether the warning about an unlisted proxy was logged (once per process).
    warned: Arc<AtomicBool>,
}

impl ClientIdentity {
    /// From `[proxy]` settings (already validated).
    pub fn new(trusted: &[String], ipv4_prefix: u8, ipv6_prefix: u8) -> Self {
        Self {
            trusted: trusted.iter().filter_map(|c| Cidr::parse(c)).collect(),
            ipv4_prefix,
            ipv6_prefix,
            warned: Arc::default(),
        }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }

    /// The client's address for a request from `peer` with these headers.
    pub fn client_addr(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.is_trusted(peer) {
            self.warn_if_unlisted_proxy(peer, headers);
            return peer;
        }
        let mut chain: Vec<Option<IpAddr>> = Vec::new();
        let xff: Vec<_> = headers.get_all("x-forwarded-for").collect();
        if !xff.is_empty() {
            for value in xff {
                let text = value.to_str().unwrap_or("");
                chain.extend(text.split(',').map(parse_forwarded_addr));
            }
        } else {
            for value in headers.get_all("forwarded") {
                let text = value.to_str().unwrap_or("");
                for element in text.split(',') {
                    let for_value = element.split(';').find_map(|pair| {
                        let (k, v) = pair.split_once('=')?;
                        k.trim().eq_ignore_ascii_case("for").then_some(v)
                    });
                    if let Some(v) = for_value {
                        chain.push(parse_forwarded_addr(v));
                    }
                }
            }
        }
        // From the right: skip our own proxies; the first other address is the client. An
        // unreadable entry can only come from the untrusted side: stop at the last proxy.
        let mut last_trusted = peer;
        for entry in chain.into_iter().rev() {
            match entry {
                Some(ip) if self.is_trusted(ip) => last_trusted = ip,
                Some(ip) => return ip,
                None => return last_trusted,
            }
        }
        last_trusted
    }

    /// A proxy left out of `proxy.trusted` makes every client behind it one client (sharing
    /// all per-client limits): say so once, when a loopback or private peer - where a reverse
    /// proxy runs, never a visitor from the Internet - passes on a client's address. No address
    /// goes into the log.
    fn warn_if_unlisted_proxy(&self, peer: IpAddr, headers: &HeaderMap) {
        if self.warned.load(Ordering::Relaxed)
            || !is_local(peer)
            || !(headers.contains_key("x-forwarded-for") || headers.contains_key("forwarded"))
            || self.warned.swap(true, Ordering::Relaxed)
        {
            return;
        }
        tracing::warn!(
            "requests from a loopback or private address name their client in X-Forwarded-For or \
             Forwarded, but proxy.trusted does not list that address: every client behind that \
             proxy shares one set of limits; list it in proxy.trusted (docs/operating.md)"
        );
    }

    /// The limiter key of a client address: the address masked to its group prefix.
    pub fn key(&self, ip: IpAddr) -> u128 {
        match ip.to_canonical() {
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()) & mask(96 + self.ipv4_prefix),
            IpAddr::V6(v6) => u128::from(v6) & mask(self.ipv6_prefix),
        }
    }
}

/// One address from a forwarding header: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`,
/// `[2001:db8::1]:4711`, optionally in quotes. `unknown` and obfuscated ids are `None`.
fn parse_forwarded_addr(raw: &str) -> Option<IpAddr> {
    let v = raw.trim().trim_matches('"');
    if let Some(rest) = v.strip_prefix('[') {
        let inner = rest.split(']').next()?;
        return inner.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Some(ip);
    }
    // IPv4 with a port.
    let (host, port) = v.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_match_their_blocks() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.200.1.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(c.contains(ip("::ffff:10.1.2.3")), "v4-mapped counts as v4");
        let c = Cidr::parse("fd00::/8").unwrap();
        assert!(c.contains(ip("fd12::1")));
        assert!(!c.contains(ip("fe80::1")));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("nonsense").is_none());
    }

    #[test]
    fn a_proxy_would_run_on_a_loopback_private_or_unique_local_address() {
        for local in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.9",
            "192.168.1.1",
            "::1",
            "fd00::5",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_local(ip(local)), "{local}");
        }
        for public in ["203.0.113.9", "172.32.0.1", "2001:db8::1", "fe80::1"] {
            assert!(!is_local(ip(public)), "{public}");
        }
    }

    #[test]
    fn headers_from_an_untrusted_peer_are_ignored() {
        let id = ClientIdentity::new(&["10.0.0.0/8".into()], 32, 64);
        let h = headers(&[("x-forwarded-for", "1.1.1.1")]);
        assert_eq!(id.client_addr(ip("203.0.113.9"), &h), ip("203.0.113.9"));
    }

    #[test]
    fn behind_proxies_the_rightmost_untrusted_address_wins() {
        let id = ClientIdentity::new(&["10.0.0.0/8".into()], 32, 64);
        // The client forged "6.6.6.6"; our proxy appended the real peer 203.0.113.9.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.0.0.2")]);
        assert_eq!(id.client_addr(ip("10.0.0.1"), &h), ip("203.0.113.9"));
        // Several header lines form one list.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "198.51.100.7"),
        ]);
        assert_eq!(id.client_addr(ip("10.0.0.1"), &h), ip("198.51.100.7"));
        // Garbage to the right of the proxies stops at the last proxy.
        let h = headers(&[("x-forwarded-for", "203.0.113.9, bogus")]);
        assert_eq!(id.client_addr(ip("10.0.0.1"), &h), ip("10.0.0.1"));
        // RFC 7239 Forwarded, with ports and brackets.
        let h = headers(&[(
            "forwarded",
            "for=6.6.6.6, for=\"[2001:db8::1]:4711\";proto=https, for=10.0.0.3:80",
        )]);
        assert_eq!(id.client_addr(ip("10.0.0.1"), &h), ip("2001:db8::1"));
        // No header at all: the proxy itself.
        assert_eq!(
            id.client_addr(ip("10.0.0.1"), &HeaderMap::new()),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn addresses_are_grouped_by_prefix() {
        let id = ClientIdentity::new(&[], 32, 64);
        assert_eq!(
            id.key(ip("2001:db8:1:2::1")),
            id.key(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(id.key(ip("2001:db8:1:2::1")), id.key(ip("2001:db8:1:3::1")));
        assert_ne!(id.key(ip("192.0.2.1")), id.key(ip("192.0.2.2")));
        assert_eq!(id.key(ip("192.0.2.1")), id.key(ip("::ffff:192.0.2.1")));
        let wide = ClientIdentity::new(&[], 24, 48);
        assert_eq!(wide.key(ip("192.0.2.1")), wide.key(ip("192.0.2.200")));
    }
}
