//! Rate limits with `governor`: per client (grouped address), per room, global, and per socket,
//! with memory that stays bounded under attack.
//!
//! # Bounded memory
//! A keyed governor limiter keeps one small state per key until `retain_recent()` forgets the
//! keys whose bucket has refilled. A botnet with a million addresses would otherwise grow the
//! map without limit, so each [`KeyedLimiter`]:
//! - is swept on a timer (`rate.sweep_interval_secs`): `retain_recent()` then `shrink_to_fit()`;
//! - holds at most `rate.max_keys` keys. When full, it sweeps at once (at most ten times a
//!   second), and if still full, checks the new key against one shared *overflow* bucket
//!   (16 times the per-key quota). Clients keep being limited, memory stays put, and the
//!   overflow count is a metric an operator can alert on.
//!
//! Order of checks: global before per-client before per-room, so the global limits also cap
//! how fast new keys can enter the per-client and per-room maps.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::{Rate, Settings};
use crate::metrics::Metrics;

/// Every limiter name (the `limiter` label of the metrics), so series exist from the start.
pub const LIMITER_NAMES: [&str; 21] = [
    "cluster_creations",
    "client_connections",
    "client_frames",
    "client_messages",
    "client_creations",
    "client_pow_tokens",
    "client_reads",
    "client_requests",
    "room_messages",
    "global_creations",
    "global_connections",
    "onion_connections",
    "onion_frames",
    "onion_messages",
    "onion_creations",
    "onion_pow_tokens",
    "onion_reads",
    "onion_requests",
    "socket_frames",
    "max_connections",
    "client_max_sockets",
];

/// Who a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// A grouped client address (see `client_ip`).
    Ip(u128),
    /// Anyone on the onion listener: one shared bucket.
    Onion,
    /// One Tor circuit on the onion listener (`server.onion_circuit_ids`): a client's limits
    /// of its own, keyed by its address ([`crate::abuse::circuit::address`]), within the
    /// shared onion bucket.
    Circuit(u32),
}

/// The keyed limiters' key of a circuit: its address's bits.
fn circuit_key(circuit: u32) -> u128 {
    crate::abuse::circuit::key(circuit)
}

/// A refusal: which limiter, and when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Limiter name (a metric label).
    pub limiter: &'static str,
    /// Wait before retrying.
    pub retry_after: Duration,
}

fn quota(rate: Rate, factor: u32) -> Quota {
    let per_minute =
        NonZeroU32::new(rate.per_minute.saturating_mul(factor)).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(rate.burst.saturating_mul(factor)).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(per_minute).allow_burst(burst)
}

/// A direct (single-bucket) limiter with a name.
pub struct DirectLimiter {
    name: &'static str,
    inner: DefaultDirectRateLimiter,
    /// The most cells one check may take: the whole bucket.
    burst: u32,
}

impl DirectLimiter {
    /// A limiter named `name` with this rate (times `factor`).
    pub fn new(name: &'static str, rate: Rate, factor: u32) -> Self {
        Self::with_quota(name, quota(rate, factor))
    }

    /// A limiter from a raw quota.
    pub fn with_quota(name: &'static str, quota: Quota) -> Self {
        Self {
            name,
            inner: RateLimiter::direct(quota),
            burst: quota.burst_size().get(),
        }
    }

    /// Take one cell.
    pub fn check(&self) -> Result<(), Refused> {
        self.check_n(1)
    }

    /// Take `n` cells at once; more than the whole bucket takes the whole bucket.
    pub fn check_n(&self, n: u32) -> Result<(), Refused> {
        let n = NonZeroU32::new(n.min(self.burst)).unwrap_or(NonZeroU32::MIN);
        refusal(self.name, self.inner.check_n(n), self.inner.clock())
    }
}

/// A `check_n` answer of governor as this module's result.
fn refusal(
    limiter: &'static str,
    answer: Result<
        Result<(), governor::NotUntil<<governor::clock::DefaultClock as Clock>::Instant>>,
        governor::InsufficientCapacity,
    >,
    clock: &governor::clock::DefaultClock,
) -> Result<(), Refused> {
    match answer {
        Ok(Ok(())) => Ok(()),
        Ok(Err(not_until)) => Err(Refused {
            limiter,
            retry_after: not_until.wait_time_from(clock.now()),
        }),
        // More than a whole burst: never, `check_n` takes at most the whole bucket.
        Err(_) => Err(Refused {
            limiter,
            retry_after: Duration::from_secs(60),
        }),
    }
}

/// A keyed limiter with a cap on its keys and an overflow bucket.
pub struct KeyedLimiter {
    name: &'static str,
    inner: DefaultKeyedRateLimiter<u128>,
    overflow: DefaultDirectRateLimiter,
    /// The most cells one check may take: a key's whole bucket.
    burst: u32,
    cap: usize,
    started: Instant,
    last_full_sweep_ms: AtomicU64,
    overflowed: AtomicU64,
    /// Checks so far, and the key count as of the last recount (every [`RECOUNT_EVERY`]).
    checks: AtomicU64,
    known_len: AtomicUsize,
}

/// Counting the keys locks every shard of the map, which costs more than the check itself
/// with a million keys; recount every this many checks, and on every check once the last
/// count is within this many keys of the cap (each check adds at most one key, so the cap
/// stays exact).
const RECOUNT_EVERY: u64 = 64;

impl KeyedLimiter {
    /// A limiter named `name` with this rate per key and at most `cap` keys.
    pub fn new(name: &'static str, rate: Rate, cap: usize) -> Self {
        Self {
            name,
            inner: RateLimiter::keyed(quota(rate, 1)),
            overflow: RateLimiter::direct(quota(rate, 16)),
            burst: rate.burst.max(1),
            cap,
            started: Instant::now(),
            last_full_sweep_ms: AtomicU64::new(0),
            overflowed: AtomicU64::new(0),
            checks: AtomicU64::new(0),
            known_len: AtomicUsize::new(0),
        }
    }

    /// Limiter name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Take one cell for `key`.
    pub fn check(&self, key: u128) -> Result<(), Refused> {
        self.check_n(key, 1)
    }

    /// Take `n` cells for `key` at once; more than a whole bucket takes the whole bucket (a
    /// message longer than the burst allows still passes, on a full bucket).
    pub fn check_n(&self, key: u128, n: u32) -> Result<(), Refused> {
        let n = NonZeroU32::new(n.min(self.burst)).unwrap_or(NonZeroU32::MIN);
        let due = self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(RECOUNT_EVERY);
        let mut len = self.known_len.load(Ordering::Relaxed);
        // Near the cap, count every time, so the cap is exact.
        if due || len + RECOUNT_EVERY as usize >= self.cap {
            len = self.inner.len();
            self.known_len.store(len, Ordering::Relaxed);
        }
        if len >= self.cap {
            let ms = self.started.elapsed().as_millis() as u64;
            let last = self.last_full_sweep_ms.load(Ordering::Relaxed);
            if ms.saturating_sub(last) >= 100
                && self
                    .last_full_sweep_ms
                    .compare_exchange(last, ms, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                self.inner.retain_recent();
            }
            let len = self.inner.len();
            self.known_len.store(len, Ordering::Relaxed);
            if len >= self.cap {
                self.overflowed.fetch_add(1, Ordering::Relaxed);
                return refusal(self.name, self.overflow.check_n(n), self.overflow.clock());
            }
        }
        refusal(
            self.name,
            self.inner.check_key_n(&key, n),
            self.inner.clock(),
        )
    }

    /// Forget keys whose bucket has refilled and return the memory.
    pub fn sweep(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// Checks that went to the overflow bucket so far.
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }
}

/// Per-client limits of the onion listener: one shared set of buckets.
struct OnionLimits {
    connections: DirectLimiter,
    frames: DirectLimiter,
    messages: DirectLimiter,
    creations: DirectLimiter,
    pow_tokens: DirectLimiter,
    reads: DirectLimiter,
    requests: DirectLimiter,
}

/// What a client-keyed check is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientLimit {
    /// A new connection.
    Connection,
    /// Any frame.
    Frame,
    /// A `send`, by its cost ([`crate::protocol::message_cost`]).
    Message(u32),
    /// A `create`.
    Creation,
    /// A `pow` token request.
    PowToken,
    /// Reading up to this many messages (`history`, or the page a `join` returns).
    Read(u32),
    /// A plain HTTP request (one of the page's files).
    Request,
}

/// Every limiter of the server.
pub struct Limits {
    client_connections: KeyedLimiter,
    client_frames: KeyedLimiter,
    client_messages: KeyedLimiter,
    client_creations: KeyedLimiter,
    client_pow_tokens: KeyedLimiter,
    client_reads: KeyedLimiter,
    client_requests: KeyedLimiter,
    room_messages: KeyedLimiter,
    global_creations: DirectLimiter,
    global_connections: DirectLimiter,
    onion: OnionLimits,
    sockets: Mutex<HashMap<u128, u32>>,
    onion_sockets: AtomicUsize,
    open_sockets: AtomicUsize,
    max_sockets: usize,
    client_max_sockets: u32,
    onion_max_sockets: usize,
    metrics: Arc<Metrics>,
}

impl Limits {
    /// All limiters from the settings.
    pub fn new(settings: &Settings, metrics: Arc<Metrics>) -> Self {
        let r = &settings.rate;
        let cap = r.max_keys;
        let f = r.onion_factor;
        for name in LIMITER_NAMES {
            metrics.rate_limited_total.with_label_values(&[name]);
        }
        for name in [
            "client_connections",
            "global_connections",
            "onion_connections",
            "max_connections",
            "client_max_sockets",
        ] {
            metrics.upgrades_refused_total.with_label_values(&[name]);
        }
        Self {
            client_connections: KeyedLimiter::new("client_connections", r.client_connections, cap),
            client_frames: KeyedLimiter::new("client_frames", r.client_frames, cap),
            client_messages: KeyedLimiter::new("client_messages", r.client_messages, cap),
            client_creations: KeyedLimiter::new("client_creations", r.client_creations, cap),
            client_pow_tokens: KeyedLimiter::new("client_pow_tokens", r.client_pow_tokens, cap),
            client_reads: KeyedLimiter::new("client_reads", r.client_reads, cap),
            client_requests: KeyedLimiter::new("client_requests", r.client_requests, cap),
            room_messages: KeyedLimiter::new("room_messages", r.room_messages, cap),
            global_creations: DirectLimiter::new("global_creations", r.global_creations, 1),
            global_connections: DirectLimiter::new("global_connections", r.global_connections, 1),
            onion: OnionLimits {
                connections: DirectLimiter::new("onion_connections", r.client_connections, f),
                frames: DirectLimiter::new("onion_frames", r.client_frames, f),
                messages: DirectLimiter::new("onion_messages", r.client_messages, f),
                creations: DirectLimiter::new("onion_creations", r.client_creations, f),
                pow_tokens: DirectLimiter::new("onion_pow_tokens", r.client_pow_tokens, f),
                reads: DirectLimiter::new("onion_reads", r.client_reads, f),
                requests: DirectLimiter::new("onion_requests", r.client_requests, f),
            },
            sockets: Mutex::new(HashMap::new()),
            onion_sockets: AtomicUsize::new(0),
            open_sockets: AtomicUsize::new(0),
            max_sockets: settings.limits.max_connections,
            client_max_sockets: r.client_max_sockets,
            onion_max_sockets: (r.client_max_sockets as usize).saturating_mul(f as usize),
            metrics,
        }
    }

    /// Count a refusal in the metrics and pass it on.
    fn note(&self, r: Refused) -> Refused {
        self.metrics
            .rate_limited_total
            .with_label_values(&[r.limiter])
            .inc();
        r
    }

    /// A per-client check (global limits first where they exist).
    pub fn client(&self, what: ClientLimit, client: Client) -> Result<(), Refused> {
        let global = match what {
            ClientLimit::Connection => self.global_connections.check(),
            ClientLimit::Creation => self.global_creations.check(),
            _ => Ok(()),
        };
        global.map_err(|r| self.note(r))?;
        let result = match client {
            Client::Ip(key) => self.keyed_check(what, key),
            Client::Onion => self.onion_check(what),
            // The circuit's own limit first: what it sends past that costs the others nothing.
            Client::Circuit(c) => self
                .keyed_check(what, circuit_key(c))
                .and_then(|()| self.onion_check(what)),
        };
        result.map_err(|r| self.note(r))
    }

    fn keyed_check(&self, what: ClientLimit, key: u128) -> Result<(), Refused> {
        match what {
            ClientLimit::Connection => self.client_connections.check(key),
            ClientLimit::Frame => self.client_frames.check(key),
            ClientLimit::Message(n) => self.client_messages.check_n(key, n),
            ClientLimit::Creation => self.client_creations.check(key),
            ClientLimit::PowToken => self.client_pow_tokens.check(key),
            ClientLimit::Read(n) => self.client_reads.check_n(key, n),
            ClientLimit::Request => self.client_requests.check(key),
        }
    }

    fn onion_check(&self, what: ClientLimit) -> Result<(), Refused> {
        match what {
            ClientLimit::Connection => self.onion.connections.check(),
            ClientLimit::Frame => self.onion.frames.check(),
            ClientLimit::Message(n) => self.onion.messages.check_n(n),
            ClientLimit::Creation => self.onion.creations.check(),
            ClientLimit::PowToken => self.onion.pow_tokens.check(),
            ClientLimit::Read(n) => self.onion.reads.check_n(n),
            ClientLimit::Request => self.onion.requests.check(),
        }
    }

    /// A per-room message check, for a message of this cost.
    pub fn room_message(&self, room: &[u8; 16], cost: u32) -> Result<(), Refused> {
        self.room_messages
            .check_n(u128::from_be_bytes(*room), cost)
            .map_err(|r| self.note(r))
    }

    /// Reserve a socket slot for `client`: refused past the server-wide or per-client cap.
    /// The slot is released when the guard drops.
    pub fn open_socket(self: &Arc<Self>, client: Client) -> Result<SocketGuard, Refused> {
        let refused = |limiter| Refused {
            limiter,
            retry_after: Duration::from_secs(10),
        };
        if self.open_sockets.fetch_add(1, Ordering::AcqRel) >= self.max_sockets {
            self.open_sockets.fetch_sub(1, Ordering::AcqRel);
            return Err(self.note(refused("max_connections")));
        }
        let admitted = match client {
            Client::Onion => self.take_onion_socket(),
            Client::Ip(key) => self.take_client_socket(key),
            Client::Circuit(c) => {
                self.take_client_socket(circuit_key(c))
                    && (self.take_onion_socket() || {
                        self.release_client_socket(circuit_key(c));
                        false
                    })
            }
        };
        if !admitted {
            self.open_sockets.fetch_sub(1, Ordering::AcqRel);
            return Err(self.note(refused("client_max_sockets")));
        }
        Ok(SocketGuard {
            limits: self.clone(),
            client,
        })
    }

    /// One of the onion listener's shared socket slots, if one is free.
    fn take_onion_socket(&self) -> bool {
        if self.onion_sockets.fetch_add(1, Ordering::AcqRel) >= self.onion_max_sockets {
            self.onion_sockets.fetch_sub(1, Ordering::AcqRel);
            false
        } else {
            true
        }
    }

    /// One of the socket slots of the client `key`, if it has one free.
    fn take_client_socket(&self, key: u128) -> bool {
        let mut map = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key).or_insert(0);
        if *n >= self.client_max_sockets {
            false
        } else {
            *n += 1;
            true
        }
    }

    fn release_client_socket(&self, key: u128) {
        let mut map = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&key);
            }
        }
    }

    /// Sweep every keyed limiter and publish key counts.
    pub fn sweep(&self) {
        for l in self.keyed() {
            l.sweep();
            self.metrics
                .limiter_keys
                .with_label_values(&[l.name()])
                .set(l.len() as i64);
            let counter = self
                .metrics
                .limiter_overflow_total
                .with_label_values(&[l.name()]);
            counter.inc_by(l.overflowed().saturating_sub(counter.get()));
        }
    }

    fn keyed(&self) -> [&KeyedLimiter; 8] {
        [
            &self.client_connections,
            &self.client_frames,
            &self.client_messages,
            &self.client_creations,
            &self.client_pow_tokens,
            &self.client_reads,
            &self.client_requests,
            &self.room_messages,
        ]
    }
}

/// Holds one socket slot; releases it on drop.
pub struct SocketGuard {
    limits: Arc<Limits>,
    client: Client,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let l = &self.limits;
        l.open_sockets.fetch_sub(1, Ordering::AcqRel);
        match self.client {
            Client::Onion => {
                l.onion_sockets.fetch_sub(1, Ordering::AcqRel);
            }
            Client::Ip(key) => l.release_client_socket(key),
            Client::Circuit(c) => {
                l.onion_sockets.fetch_sub(1, Ordering::AcqRel);
                l.release_client_socket(circuit_key(c));
            }
        }
    }
}

/// Run [`Limits::sweep`] every `rate.sweep_interval_secs`.
pub async fn sweep_loop(limits: Arc<Limits>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        limits.sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_bytes() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let pages: usize = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        pages * 4096
    }

    #[test]
    fn a_million_source_addresses_stay_within_the_key_cap_and_memory_bound() {
        // Resident memory is per process and other tests run in parallel threads: measure in a
        // child process running only this test.
        const MARK: &str = "NANOCHAT_MEASURE_LIMITER_MEMORY";
        if std::env::var_os(MARK).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "abuse::limits::tests::a_million_source_addresses_stay_within_the_key_cap_and_memory_bound",
                    "--test-threads=1",
                    "--nocapture",
                ])
                .env(MARK, "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("1 passed"),
                "{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        const CAP: usize = 50_000;
        // The stated bound: 50k keys of ~40 bytes each is ~2 MB; allow 24 MB of RSS growth
        // for the map, its shards and allocator slack. Without the cap, a million keys take
        // well over 40 MB.
        const BOUND: usize = 24 << 20;
        let limiter = KeyedLimiter::new("test", Rate::new(60, 5), CAP);
        let before = rss_bytes();
        let mut refused = 0u32;
        for i in 0..1_000_000u128 {
            // Distinct IPv6 /64s, as a botnet would present them.
            let key = (0x2001_0db8u128 << 96) | (i << 64);
            if limiter.check(key).is_err() {
                refused += 1;
            }
            assert!(
                limiter.len() <= CAP,
                "key count {} above the cap",
                limiter.len()
            );
        }
        let grown = rss_bytes().saturating_sub(before);
        println!(
            "limiter RSS growth for 1M addresses, cap {CAP}: {} KiB",
            grown >> 10
        );
        assert!(grown < BOUND, "RSS grew by {} MB", grown >> 20);
        assert!(
            limiter.overflowed() > 0,
            "the overflow bucket took the excess"
        );
        assert!(refused > 0, "the overflow bucket is itself limited");
        // Keys churn: after their buckets refill, a sweep forgets them.
        limiter.sweep();
        assert!(limiter.len() <= CAP);
    }

    #[test]
    fn a_key_is_limited_to_its_burst_and_others_are_not() {
        let limiter = KeyedLimiter::new("test", Rate::new(60, 3), 10);
        for _ in 0..3 {
            assert!(limiter.check(1).is_ok());
        }
        let refused = limiter.check(1).unwrap_err();
        assert_eq!(refused.limiter, "test");
        assert!(
            refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_secs(1)
        );
        assert!(limiter.check(2).is_ok());
    }

    #[test]
    fn a_check_of_more_than_the_burst_takes_the_whole_bucket() {
        let rate = Rate::new(60, 5);
        let keyed = KeyedLimiter::new("test", rate, 10);
        let direct = DirectLimiter::new("test", rate, 1);
        // A cost above the burst passes on a full bucket and empties it...
        assert!(keyed.check_n(1, 9).is_ok());
        assert!(direct.check_n(9).is_ok());
        // ...so the next cell waits about a second (60 a minute), not the minute an
        // impossible request would be told.
        for refused in [keyed.check(1).unwrap_err(), direct.check().unwrap_err()] {
            assert!(refused.retry_after <= Duration::from_secs(1), "{refused:?}");
        }
        // Below the burst, the cost is taken as it is.
        assert!(keyed.check_n(2, 4).is_ok());
        assert!(keyed.check_n(2, 1).is_ok());
        assert!(keyed.check(2).is_err());
    }

    #[test]
    fn socket_slots_are_capped_per_client_and_released() {
        let mut settings = Settings::default();
        settings.rate.client_max_sockets = 2;
        settings.limits.max_connections = 3;
        let limits = Arc::new(Limits::new(&settings, Arc::new(Metrics::new())));
        let a1 = limits.open_socket(Client::Ip(1)).unwrap();
        let _a2 = limits.open_socket(Client::Ip(1)).unwrap();
        assert_eq!(
            limits.open_socket(Client::Ip(1)).err().map(|r| r.limiter),
            Some("client_max_sockets")
        );
        let _b1 = limits.open_socket(Client::Ip(2)).unwrap();
        assert_eq!(
            limits.open_socket(Client::Ip(3)).err().map(|r| r.limiter),
            Some("max_connections")
        );
        drop(a1);
        assert!(limits.open_socket(Client::Ip(1)).is_ok());
    }

    #[test]
    fn a_tor_circuit_has_a_clients_limits_within_the_onion_share() {
        let mut settings = Settings::default();
        settings.rate.client_max_sockets = 2;
        settings.rate.onion_factor = 2;
        settings.rate.client_creations = Rate::new(60, 2);
        let limits = Arc::new(Limits::new(&settings, Arc::new(Metrics::new())));
        let refused = |r: Result<SocketGuard, Refused>| r.err().map(|r| r.limiter);
        // Sockets: two per circuit, four for all of the onion listener.
        let c1 = limits.open_socket(Client::Circuit(1)).unwrap();
        let _c1 = limits.open_socket(Client::Circuit(1)).unwrap();
        assert_eq!(
            refused(limits.open_socket(Client::Circuit(1))),
            Some("client_max_sockets")
        );
        let _c2 = limits.open_socket(Client::Circuit(2)).unwrap();
        let _c2 = limits.open_socket(Client::Circuit(2)).unwrap();
        assert_eq!(
            refused(limits.open_socket(Client::Circuit(3))),
            Some("client_max_sockets")
        );
        // The refused circuit kept no slot of its own; a closed socket frees both of its slots.
        drop(c1);
        let _c3 = limits.open_socket(Client::Circuit(3)).unwrap();
        let _c3 = limits.open_socket(Client::Circuit(3));
        assert!(limits.sockets.lock().unwrap().get(&circuit_key(3)) == Some(&1));
        // Rates: the circuit's own bucket first (its excess costs the others nothing), then the
        // shared one.
        let create = |c| limits.client(ClientLimit::Creation, Client::Circuit(c));
        assert!(create(1).is_ok() && create(1).is_ok());
        assert_eq!(create(1).err().map(|r| r.limiter), Some("client_creations"));
        assert_eq!(create(1).err().map(|r| r.limiter), Some("client_creations"));
        assert!(create(2).is_ok() && create(2).is_ok());
        assert_eq!(create(3).err().map(|r| r.limiter), Some("onion_creations"));
        // A circuit is not an address: the clearnet client whose key it would be is apart.
        assert!(
            limits
                .client(ClientLimit::Creation, Client::Ip(circuit_key(4)))
                .is_ok()
        );
    }
}
