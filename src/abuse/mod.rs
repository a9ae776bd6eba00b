//! Abuse protection for public instances: who the client is ([`client_ip`], and on the onion
//! listener the Tor circuit, [`circuit`]), which web pages may connect ([`origin`]), rate limits
//! with bounded memory ([`limits`]), and the adaptive proof-of-work requirement ([`pow`]).

pub mod circuit;
pub mod client_ip;
pub mod limits;
pub mod origin;
pub mod pow;
