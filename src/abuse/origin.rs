//! Which web pages may open a WebSocket here: the `Origin` check of an upgrade request.
//!
//! A browser lets any page open a WebSocket to any server, and tells the server which page
//! asked in the `Origin` header, which the page's script cannot change. Nothing rides along
//! that a foreign page could misuse to read (no cookie, no account), but without this check
//! a busy site could have every visitor's browser connect here, create rooms and send, each
//! visitor from an address of its own and so past the per-client limits. So by default a
//! browser's upgrade is accepted only from a page of the host it connects to (the request's
//! `Host`), the way the bundled client connects. That default needs no setting, but a page
//! whose own name an attacker points at this server's address (DNS rebinding, over plain
//! HTTP: TLS would fail on the name) names itself in `Host` too; so an instance that sets
//! `server.allowed_origins` admits exactly the origins listed there instead (`*` = any).
//!
//! Programs that are not browsers send no `Origin` (or whatever they like) and are admitted:
//! the check keeps other sites' pages out, it does not tell clients apart; the rate limits and
//! proof of work do that for every client alike.

use std::fmt;

/// The `server.allowed_origins` entry that admits pages of any origin.
pub const ANY: &str = "*";

/// A page origin of `http` or `https`: scheme, host (lowercase) and port (the scheme's default
/// when the origin names none).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    https: bool,
    host: String,
    port: u16,
}

impl Origin {
    /// Parse `scheme://host[:port]` as a browser serializes it: no path, no user, nothing else.
    fn parse(s: &str) -> Option<Origin> {
        let (scheme, authority) = s.split_once("://")?;
        let https = match scheme.to_ascii_lowercase().as_str() {
            "https" => true,
            "http" => false,
            _ => return None,
        };
        let (host, port) = split_authority(authority)?;
        Some(Origin {
            https,
            host,
            port: port.unwrap_or(if https { 443 } else { 80 }),
        })
    }
}

/// Split `host[:port]` (a `Host` header, or an origin after its scheme): the host lowercased
/// (an IPv6 address keeps its brackets) and the port if one is given. `None` for anything
/// else: a path, a user, spaces, an empty host, a port that is not a number from 1 to 65535.
pub(crate) fn split_authority(s: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = match s.strip_prefix('[') {
        Some(rest) => {
            let (inner, after) = rest.split_once(']')?;
            let ipv6 = |b: u8| b.is_ascii_hexdigit() || b == b':' || b == b'.';
            if inner.is_empty() || !inner.bytes().all(ipv6) {
                return None;
            }
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':')?),
            };
            (&s[..inner.len() + 2], port)
        }
        None => match s.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        },
    };
    let name = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_';
    if host.is_empty() || !(host.starts_with('[') || host.bytes().all(name)) {
        return None;
    }
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().ok().filter(|&p| p != 0)?)
        }
        Some(_) => return None,
    };
    Some((host.to_ascii_lowercase(), port))
}

/// The origins whose pages may open a WebSocket here (`server.allowed_origins`).
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    any: bool,
    listed: Vec<Origin>,
}

/// A `server.allowed_origins` entry that is neither `*` nor an origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadOrigin(pub String);

impl fmt::Display for BadOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not an origin like https://chat.example.org or http://127.0.0.1:8080 (scheme and host, no path), nor `*`",
            self.0
        )
    }
}

impl OriginPolicy {
    /// The policy of a `server.allowed_origins` list: empty = pages of the requested host;
    /// otherwise the origins listed and no others; `*` = any.
    pub fn new(entries: &[String]) -> Result<Self, BadOrigin> {
        let mut policy = OriginPolicy::default();
        for entry in entries {
            let entry = entry.trim();
            if entry == ANY {
                policy.any = true;
            } else {
                let origin = Origin::parse(entry).ok_or_else(|| BadOrigin(entry.to_string()))?;
                policy.listed.push(origin);
            }
        }
        Ok(policy)
    }

    /// Whether an upgrade request with these `Origin` and `Host` header values may go on.
    /// No `Origin`: not a browser, admitted. Otherwise the origin must be listed, or, when
    /// nothing is listed, be a page of the host the request names (its port too when `Host`
    /// carries one: a proxy that passes only the name, like nginx's `$host`, still matches).
    /// `null` (a sandboxed or local page) and anything unparsable match only `*`.
    pub fn admits(&self, origin: Option<&[u8]>, host: Option<&[u8]>) -> bool {
        let Some(origin) = origin else {
            return true;
        };
        if self.any {
            return true;
        }
        let Some(origin) = std::str::from_utf8(origin).ok().and_then(Origin::parse) else {
            return false;
        };
        if !self.listed.is_empty() {
            return self.listed.contains(&origin);
        }
        let Some((host, port)) = host
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| split_authority(h.trim()))
        else {
            return false;
        };
        host == origin.host && port.is_none_or(|p| p == origin.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> OriginPolicy {
        OriginPolicy::new(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>())
            .expect("valid entries")
    }

    fn admits(p: &OriginPolicy, origin: Option<&str>, host: Option<&str>) -> bool {
        p.admits(origin.map(str::as_bytes), host.map(str::as_bytes))
    }

    #[test]
    fn by_default_only_pages_of_the_requested_host_are_admitted() {
        let p = policy(&[]);
        let cases = [
            (
                Some("https://chat.example.org"),
                Some("chat.example.org"),
                true,
            ),
            (
                Some("https://Chat.Example.ORG"),
                Some("chat.example.org"),
                true,
            ),
            (
                Some("https://chat.example.org"),
                Some("chat.example.org:443"),
                true,
            ),
            (Some("http://127.0.0.1:8080"), Some("127.0.0.1:8080"), true),
            (Some("http://[::1]:8080"), Some("[::1]:8080"), true),
            (Some("http://abc.onion"), Some("abc.onion"), true),
            // A proxy that passes only the name (nginx's $host).
            (
                Some("https://chat.example.org:8443"),
                Some("chat.example.org"),
                true,
            ),
            // Not a browser: no Origin at all.
            (None, Some("chat.example.org"), true),
            (None, None, true),
            (
                Some("https://evil.example"),
                Some("chat.example.org"),
                false,
            ),
            (
                Some("https://chat.example.org.evil.example"),
                Some("chat.example.org"),
                false,
            ),
            (Some("http://127.0.0.1:8081"), Some("127.0.0.1:8080"), false),
            (
                Some("https://chat.example.org"),
                Some("chat.example.org:80"),
                false,
            ),
            (Some("http://localhost:8080"), Some("127.0.0.1:8080"), false),
            (Some("null"), Some("chat.example.org"), false),
            (Some("https://chat.example.org"), None, false),
            (Some("https://chat.example.org"), Some(""), false),
            (Some("chrome-extension://abcdef"), Some("abcdef"), false),
            (
                Some("https://chat.example.org/path"),
                Some("chat.example.org"),
                false,
            ),
            (
                Some("https://user@chat.example.org"),
                Some("chat.example.org"),
                false,
            ),
        ];
        for (origin, host, expected) in cases {
            assert_eq!(
                admits(&p, origin, host),
                expected,
                "{origin:?} for {host:?}"
            );
        }
    }

    #[test]
    fn listed_origins_and_only_they_are_admitted_whatever_the_host() {
        let p = policy(&["https://chat.example.org", "http://localhost:3000"]);
        assert!(admits(
            &p,
            Some("https://chat.example.org"),
            Some("10.0.0.5:8080")
        ));
        assert!(admits(
            &p,
            Some("https://chat.example.org:443"),
            Some("backend")
        ));
        assert!(admits(&p, Some("http://localhost:3000"), Some("backend")));
        assert!(!admits(
            &p,
            Some("http://chat.example.org"),
            Some("backend")
        ));
        assert!(!admits(&p, Some("http://localhost:3001"), Some("backend")));
        // A page naming the requested host is not enough once origins are listed (a rebound
        // name looks just like that), and programs without Origin stay admitted.
        assert!(!admits(&p, Some("http://backend"), Some("backend")));
        assert!(!admits(
            &p,
            Some("http://evil.example"),
            Some("evil.example")
        ));
        assert!(admits(&p, None, Some("backend")));
    }

    #[test]
    fn a_star_admits_every_origin_even_null() {
        let p = policy(&["*"]);
        for origin in ["https://evil.example", "null", "garbage"] {
            assert!(
                admits(&p, Some(origin), Some("chat.example.org")),
                "{origin}"
            );
        }
    }

    #[test]
    fn entries_that_are_not_origins_are_refused_by_name() {
        for bad in [
            "chat.example.org",
            "https://",
            "https://chat.example.org/",
            "ftp://chat.example.org",
            "https://chat.example.org:0",
            "https://chat.example.org:65536",
            "https://chat example.org",
            "null",
            "",
        ] {
            let err = OriginPolicy::new(&[bad.to_string()]).expect_err(bad);
            assert_eq!(err.0, bad.trim());
            assert!(err.to_string().contains("is not an origin"), "{err}");
        }
    }

    #[test]
    fn header_values_that_are_not_utf8_are_not_admitted() {
        let p = policy(&[]);
        assert!(!p.admits(Some(b"https://\xff.example"), Some(b"\xff.example")));
        assert!(!p.admits(Some(&[0xff, 0xfe]), Some(b"chat.example.org")));
    }
}
