//! Client address resolution from proxy headers: whatever `X-Forwarded-For` and `Forwarded`
//! say, nothing panics, and a peer outside the trusted proxies is never overridden.
#![no_main]

use std::net::IpAddr;

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use nanochat::abuse::client_ip::ClientIdentity;

fuzz_target!(|data: &[u8]| {
    let identity = ClientIdentity::new(&["127.0.0.0/8".into(), "fd00::/8".into()], 32, 64);
    let (selector, rest) = data.split_first().unwrap_or((&0, &[]));
    let peer: IpAddr = if selector & 1 == 0 {
        "127.0.0.1".parse().unwrap()
    } else {
        "203.0.113.9".parse().unwrap()
    };
    let mut headers = HeaderMap::new();
    let name = if selector & 2 == 0 {
        "x-forwarded-for"
    } else {
        "forwarded"
    };
    for part in rest.split(|b| *b == b'\n') {
        if let Ok(v) = HeaderValue::from_bytes(part) {
            headers.append(HeaderName::from_static(name), v);
        }
    }
    let addr = identity.client_addr(peer, &headers);
    if selector & 1 == 1 {
        assert_eq!(addr, peer, "an untrusted peer's headers were believed");
    }
    let _ = identity.key(addr);
});
