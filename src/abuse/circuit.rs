//! Tor circuits on the onion listener. An onion service forwards every visitor from one local
//! address, so without more the onion listener counts all of them as one client. With
//! `HiddenServiceExportCircuitID haproxy` in torrc, Tor starts each connection with a PROXY
//! protocol (version 1) line whose source address carries, in its low 32 bits, the id of the
//! circuit the visitor came over:
//!
//! ```text
//! PROXY TCP6 fc00:dead:beef:4dad::ffff:ffff ::1 65535 42\r\n
//! ```
//!
//! With `server.onion_circuit_ids` on, the server reads that line and gives each circuit one
//! client's limits (all circuits together still get the onion share): a visitor who wants more
//! has to build more circuits, which Tor's own defences make slow and costly.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// The longest PROXY version 1 line, its CRLF included (the protocol's own bound).
const MAX_LINE: usize = 107;

/// The upper 96 bits of a circuit's address here: a private (fc00::/7) prefix, the one Tor uses.
const PREFIX: u128 = 0xfc00_dead_beef_4dad << 64;

/// The address a circuit goes by: the prefix, then the circuit id.
pub fn address(circuit: u32) -> IpAddr {
    Ipv6Addr::from(key(circuit)).into()
}

/// The bits of a circuit's [`address`] (the limits' key for it).
pub fn key(circuit: u32) -> u128 {
    PREFIX | u128::from(circuit)
}

/// The circuit of an address made by [`address`].
pub fn of(addr: IpAddr) -> Option<u32> {
    let IpAddr::V6(v6) = addr else { return None };
    let bits = u128::from(v6);
    (bits & !u128::from(u32::MAX) == PREFIX).then_some(bits as u32)
}

/// The circuit id Tor's line (without its CRLF) names, or what is wrong with it.
pub fn parse(line: &[u8]) -> Result<u32, &'static str> {
    let text = std::str::from_utf8(line).map_err(|_| "not text")?;
    let mut fields = text.split(' ');
    if fields.next() != Some("PROXY") {
        return Err("not a PROXY line");
    }
    if fields.next() != Some("TCP6") {
        return Err("not TCP6 (Tor always sends TCP6)");
    }
    let source: Ipv6Addr = fields
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or("no IPv6 source address")?;
    let destination = fields.next().and_then(|a| a.parse::<Ipv6Addr>().ok());
    let ports = [fields.next(), fields.next()].map(|p| p.and_then(|p| p.parse::<u16>().ok()));
    if destination.is_none() || ports.contains(&None) || fields.next().is_some() {
        return Err("not the six fields of a PROXY TCP6 line");
    }
    // The low 32 bits are the circuit; Tor's spec says to ignore the others.
    Ok(u128::from(source) as u32)
}

/// Read Tor's line at the start of an onion connection, leaving what follows it (the HTTP
/// request) unread, within `within`: the circuit's address (port 0).
pub async fn read(io: &mut TcpStream, within: Duration) -> io::Result<SocketAddr> {
    let line = tokio::time::timeout(within, read_line(io))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no PROXY line in time"))??;
    let circuit = line
        .strip_suffix(b"\r\n")
        .ok_or("a PROXY line ends with CRLF")
        .and_then(parse)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(SocketAddr::new(address(circuit), 0))
}

/// Bytes up to and including the first `\n`, at most [`MAX_LINE`]: what has arrived is looked
/// at first and only the line is taken, so the request behind it stays for the HTTP parser.
async fn read_line(io: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(MAX_LINE);
    let mut buf = [0u8; MAX_LINE];
    loop {
        let room = MAX_LINE - line.len();
        let n = io.peek(&mut buf[..room]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let end = buf[..n].iter().position(|&b| b == b'\n').map(|i| i + 1);
        let take = end.unwrap_or(n);
        io.read_exact(&mut buf[..take]).await?;
        line.extend_from_slice(&buf[..take]);
        if end.is_some() {
            return Ok(line);
        }
        if line.len() == MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "longer than a PROXY line",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tors_line_names_the_circuit_in_the_low_32_bits_of_the_source() {
        let tor = b"PROXY TCP6 fc00:dead:beef:4dad::ffff:ffff ::1 65535 42";
        assert_eq!(parse(tor), Ok(u32::MAX));
        let line = b"PROXY TCP6 fc00:dead:beef:4dad::aabb:ccdd ::1 65535 42";
        assert_eq!(parse(line), Ok(0xaabb_ccdd));
        // The upper bits are not Tor's promise: another implementation's prefix counts the same.
        assert_eq!(parse(b"PROXY TCP6 fd12::1:2 ::1 1 2"), Ok(0x0001_0002));
        assert_eq!(of(address(0xaabb_ccdd)), Some(0xaabb_ccdd));
        assert_eq!(of("fc00:dead:beef:4dae::1".parse().unwrap()), None);
        assert_eq!(of("127.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn the_line_the_client_library_writes_as_tor_names_its_circuit() {
        for circuit in [0, 1, 0xffff, 0x1_0000, 0xdead_beef, u32::MAX] {
            let line = crate::client::tor_circuit_line(circuit);
            let line = line.strip_suffix("\r\n").expect("CRLF");
            assert_eq!(parse(line.as_bytes()), Ok(circuit), "{line}");
        }
    }

    #[test]
    fn anything_else_is_refused_and_says_why() {
        for line in [
            &b""[..],
            b"GET / HTTP/1.1",
            b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2",
            b"PROXY UNKNOWN",
            b"PROXY TCP6 127.0.0.1 ::1 1 2",
            b"PROXY TCP6 fc00::1 ::1 65536 42",
            b"PROXY TCP6 fc00::1 ::1 1",
            b"PROXY TCP6 fc00::1 ::1 1 2 3",
            b"PROXY  TCP6 fc00::1 ::1 1 2",
            b"PROXY TCP6 fc00::1 ::1 1 2\r",
            b"\x0d\x0a\x0d\x0a\x00\x0d\x0aQUIT\x0a",
            b"PROXY TCP6 fc00::\xff ::1 1 2",
        ] {
            assert!(parse(line).is_err(), "{}", String::from_utf8_lossy(line));
        }
    }
}
