//! NanoChat server: an anonymous, end-to-end-encrypted web chat server that stores and relays
//! ciphertexts it cannot read. Protocol: `docs/protocol.md`.
//!
//! # Layout
//! - [`abuse`]: client addresses behind proxies, which pages may connect, rate limits, adaptive
//!   proof of work.
//! - [`config`]: settings, layered defaults -> TOML file -> `NANOCHAT__*` environment.
//! - [`telemetry`]: tracing-subscriber setup.
//! - [`metrics`]: every Prometheus metric, defined once.
//! - [`crypto`]: HKDF, HMAC join proofs, proof-of-work tokens, key wrapping; shared with the
//!   client.
//! - [`protocol`]: wire frames, their validation, the stable error codes.
//! - [`hub`]: rooms -> sockets, fan-out, slow-consumer policy.
//! - [`session`]: one WebSocket connection's loop.
//! - [`websocket`]: WebSocket framing on a connection taken over from the HTTP dispatcher.
//! - [`store`]: the `Store` trait, its SQLite and Postgres backends, and the group-commit writer.
//! - [`startup`]: `Application`: listeners, routes, background tasks.
//! - [`tls`]: HTTPS on the public listener itself, certificates reloaded when renewed.
//! - [`assets`]: the browser client's files, embedded, gzip-compressed once, with ETags.
//! - [`cluster`]: several processes on one Postgres: cross-node fan-out with LISTEN/NOTIFY.
//! - [`client`]: a Rust client of the protocol (tests, benchmarks, tools).

pub mod abuse;
pub mod assets;
pub mod client;
pub mod cluster;
pub mod config;
pub mod crypto;
pub mod hub;
pub mod metrics;
pub mod protocol;
pub mod session;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod websocket;
