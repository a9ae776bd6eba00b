//! The one integration-test binary: real servers on port 0, real SQLite files, a real
//! throwaway Postgres, real sockets.

mod abuse;
mod api;
mod bench_smoke;
mod binary;
mod browser;
mod cdp;
mod cluster;
mod config;
mod deploy;
mod faults;
mod helpers;
mod hostile;
mod http;
mod lifecycle;
mod pg;
mod security;
mod store;
mod tls;
mod vectors;
