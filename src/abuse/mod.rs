//! Abuse protection for public instances: who the client is ([`client_ip`]), which web pages
//! may connect ([`origin`]), rate limits with bounded memory ([`limits`]), and the adaptive
//! proof-of-work requirement ([`pow`]).

pub mod client_ip;
pub mod limits;
pub mod origin;
pub mod pow;
