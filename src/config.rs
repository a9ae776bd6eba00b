//! Settings, layered once: defaults in code, then an optional TOML file (`--config PATH` or
//! `NANOCHAT_CONFIG`), then environment variables `NANOCHAT__SECTION__KEY`. Every key is listed
//! with its default and environment name in `deploy/nanochat.toml`.
//!
//! Unknown keys are errors (a typo must not silently fall back to a default), and
//! [`Settings::validate`] names the key of every value out of range.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// All settings of one server process.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Listeners, data directory and secret.
    pub server: ServerSettings,
    /// Storage backend.
    pub database: DatabaseSettings,
    /// Message and room expiry.
    pub retention: RetentionSettings,
    /// Protocol and connection limits.
    pub limits: LimitSettings,
    /// Proof of work for room creation.
    pub pow: PowSettings,
    /// Rate limits per client, per room and global.
    pub rate: RateSettings,
    /// Client addresses behind reverse proxies.
    pub proxy: ProxySettings,
    /// Group commit of messages.
    pub store: StoreSettings,
    /// HTTPS on the public listener itself.
    pub tls: TlsSettings,
    /// Logging.
    pub log: LogSettings,
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Public listener (browser client, `/ws`, health).
    pub listen: String,
    /// Admin listener (`/metrics`).
    pub admin_listen: String,
    /// Data directory (SQLite database, default secret file).
    pub data_dir: PathBuf,
    /// Server secret file; default `<data_dir>/secret`.
    pub secret_file: Option<PathBuf>,
    /// HTTP worker threads; 0 = one per CPU.
    pub workers: usize,
    /// Optional listener for a Tor onion service (or any shared-address front): every client
    /// there shares one set of limits, headers are never trusted, creation always needs work.
    pub onion_listen: Option<String>,
    /// Tor tells the onion listener each connection's circuit (`HiddenServiceExportCircuitID
    /// haproxy`): limits per circuit within the onion share. See [`crate::abuse::circuit`].
    pub onion_circuit_ids: bool,
    /// Origins of web pages that may open a WebSocket (`https://chat.example.org`), or `*` for
    /// any; empty = pages of the requested host. See [`crate::abuse::origin`].
    pub allowed_origins: Vec<String>,
    /// Seconds a shutdown (SIGTERM, Ctrl-C) may take: in-flight messages are committed and
    /// acknowledged, clients are told to reconnect (close 1012), then the process exits.
    pub shutdown_grace_secs: u64,
}

/// `[database]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// Postgres connection string; unset = embedded SQLite in the data directory.
    pub url: Option<String>,
    /// Largest number of pooled Postgres connections.
    pub pool_size: usize,
    /// Seconds to wait for a connection before a request fails with `unavailable`.
    pub connect_timeout_secs: u64,
}

/// `[retention]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    /// Days a message is kept; also how long an idle room lives.
    pub days: u32,
    /// Days a wiped room's tombstone refuses re-creation.
    pub tombstone_days: u32,
    /// Seconds between maintenance runs.
    pub maintenance_interval_secs: u64,
}

/// `[limits]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Messages returned by `join` without `after`, and the default `history` page.
    pub history: u32,
    /// Largest WebSocket frame, bytes.
    pub max_frame_bytes: usize,
    /// Largest ciphertext, bytes (decoded).
    pub max_ct_bytes: usize,
    /// Frames queued for one socket before it counts as a slow consumer and is disconnected.
    pub send_queue: usize,
    /// Seconds a write to one socket may block before the socket is dropped.
    pub send_timeout_secs: u64,
    /// Unacknowledged `send`s one socket may have in flight; reading pauses beyond it.
    pub max_inflight_sends: usize,
    /// Seconds between server pings.
    pub ping_interval_secs: u64,
    /// Seconds of client silence (no frame, no pong) before the socket is closed.
    pub idle_timeout_secs: u64,
    /// Sustained frames per second one socket may send.
    pub frames_per_second: u32,
    /// Frames one socket may send in a burst.
    pub frames_burst: u32,
    /// Bytes of broadcast frames queued for one socket before it counts as a slow consumer.
    pub send_queue_bytes: usize,
    /// Open WebSocket connections the whole server accepts; further upgrades get 503. Lowered
    /// at start when the hard open-file limit cannot hold it (`startup::fit_open_file_limit`).
    pub max_connections: usize,
    /// Seconds a client has to send its HTTP request head (the upgrade).
    pub handshake_timeout_secs: u64,
    /// Refusals one socket may collect (rate-limited frames cost 1, invalid frames 4) before
    /// it is disconnected; one is forgiven every 2 seconds.
    pub strike_budget: u32,
}

/// `[pow]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PowSettings {
    /// `off`, `on` (always `base_bits`) or `adaptive`.
    pub mode: PowMode,
    /// Difficulty in leading zero bits when on, and the floor when adaptive.
    pub base_bits: u8,
    /// Ceiling of the adaptive difficulty.
    pub max_bits: u8,
    /// Seconds a token stays valid.
    pub token_ttl_secs: u64,
    /// Milliseconds between difficulty adjustments.
    pub adjust_interval_ms: u64,
    /// Room creations per minute (whole server) above which the difficulty rises.
    pub raise_creations_per_minute: u32,
    /// New connections per minute (whole server) above which the difficulty rises.
    pub raise_connections_per_minute: u32,
    /// Adjustment intervals in a row with load below half the thresholds before the difficulty
    /// falls by one bit.
    pub calm_intervals: u32,
}

/// Whether room creation needs proof of work.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PowMode {
    /// Never (except on the onion listener).
    Off,
    /// Always, at `pow.base_bits`.
    On,
    /// From `pow.base_bits`, rising with load up to `pow.max_bits`.
    Adaptive,
}

/// One rate limit: a sustained rate and a burst.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Sustained events per minute.
    pub per_minute: u32,
    /// Events allowed at once.
    pub burst: u32,
}

impl Rate {
    /// `per_minute` sustained, `burst` at once.
    pub const fn new(per_minute: u32, burst: u32) -> Self {
        Self { per_minute, burst }
    }
}

/// `[rate]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateSettings {
    /// New WebSocket connections per client, checked before the upgrade (429).
    pub client_connections: Rate,
    /// Open WebSocket connections per client (429 beyond).
    pub client_max_sockets: u32,
    /// Frames per client across all its sockets.
    pub client_frames: Rate,
    /// Messages (`send`) per client.
    pub client_messages: Rate,
    /// Room creations per client.
    pub client_creations: Rate,
    /// Proof-of-work tokens per client.
    pub client_pow_tokens: Rate,
    /// Plain HTTP requests per client on the public listeners (the page's files); not health
    /// checks, not WebSocket upgrades (those have `client_connections`).
    pub client_requests: Rate,
    /// Messages a client may ask to read: each `history` costs its `limit`, each `join` the
    /// page it returns (`limits.history`), whether or not that many exist.
    pub client_reads: Rate,
    /// Messages per room, whoever sends them.
    pub room_messages: Rate,
    /// Room creations on the whole server.
    pub global_creations: Rate,
    /// New connections on the whole server.
    pub global_connections: Rate,
    /// On the onion listener all clients share one set of client limits, this many times the
    /// per-client ones.
    pub onion_factor: u32,
    /// Keys (clients or rooms) one limiter tracks; beyond it, new keys share an overflow bucket.
    pub max_keys: usize,
    /// Seconds between sweeps that forget idle keys and return their memory.
    pub sweep_interval_secs: u64,
}

/// `[proxy]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySettings {
    /// CIDRs of reverse proxies whose `X-Forwarded-For` / `Forwarded` headers are believed.
    pub trusted: Vec<String>,
    /// Prefix length that groups IPv4 clients (32 = one address).
    pub ipv4_prefix: u8,
    /// Prefix length that groups IPv6 clients (64 = one customer network).
    pub ipv6_prefix: u8,
}

/// `[store]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// Most messages written in one transaction.
    pub batch_max: usize,
    /// Messages waiting for the writers before senders wait (shared by the writers).
    pub queue: usize,
    /// Writer tasks committing in parallel on Postgres, rooms split between them (each room
    /// stays with one, so its order holds). SQLite always uses one.
    pub writers: usize,
    /// SQLite: new messages and rooms are refused (`unavailable`) while the data directory's
    /// volume has less than this many MiB available, so that expiry, wipes and the database's
    /// own log always find room. 0: never refused before the disk is full.
    pub min_free_mib: u64,
    /// New messages and rooms are refused (`unavailable`) while the stored data takes at
    /// least this many MiB (SQLite: the database's pages in use; Postgres: the database's
    /// size), checked every second. 0: no cap.
    pub max_database_mib: u64,
}

/// `[tls]`: HTTPS served by the server itself, for an instance without a proxy in front.
/// See [`crate::tls`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// PEM file with the certificate chain, the server's own certificate first (certbot's
    /// `fullchain.pem`). Set with `key`: `server.listen` then speaks HTTPS only.
    pub cert: Option<PathBuf>,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// Seconds between looks at both files: a renewed certificate is served from the next
    /// handshake on, without a restart.
    pub reload_interval_secs: u64,
    /// Plain-HTTP listener (normally `0.0.0.0:80`) that sends every request to the same path
    /// over HTTPS, and serves ACME http-01 challenges from `acme_webroot`.
    pub redirect_listen: Option<String>,
    /// Directory given to `certbot --webroot -w`: the redirect listener serves the files
    /// certbot puts in its `.well-known/acme-challenge/`, so renewals need no downtime.
    pub acme_webroot: Option<PathBuf>,
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `pretty` or `json`.
    pub format: LogFormat,
    /// Filter in `RUST_LOG` syntax; `RUST_LOG` itself wins when set.
    pub filter: String,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9464".into(),
            data_dir: PathBuf::from("./data"),
            secret_file: None,
            workers: 0,
            onion_listen: None,
            onion_circuit_ids: false,
            allowed_origins: Vec::new(),
            shutdown_grace_secs: 20,
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: None,
            pool_size: 16,
            connect_timeout_secs: 5,
        }
    }
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            days: 30,
            tombstone_days: 365,
            maintenance_interval_secs: 3600,
        }
    }
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            history: 100,
            max_frame_bytes: 65536,
            max_ct_bytes: 8192,
            send_queue: 4096,
            send_timeout_secs: 10,
            max_inflight_sends: 64,
            ping_interval_secs: 20,
            idle_timeout_secs: 60,
            frames_per_second: 20,
            frames_burst: 60,
            send_queue_bytes: 4 << 20,
            max_connections: 50_000,
            handshake_timeout_secs: 5,
            strike_budget: 40,
        }
    }
}

impl Default for PowSettings {
    fn default() -> Self {
        Self {
            mode: PowMode::Adaptive,
            base_bits: 16,
            max_bits: 26,
            token_ttl_secs: 300,
            adjust_interval_ms: 10_000,
            raise_creations_per_minute: 60,
            raise_connections_per_minute: 3_000,
            calm_intervals: 6,
        }
    }
}

impl Default for RateSettings {
    fn default() -> Self {
        Self {
            client_connections: Rate::new(60, 20),
            client_max_sockets: 32,
            client_frames: Rate::new(3_000, 300),
            client_messages: Rate::new(120, 30),
            client_creations: Rate::new(10, 5),
            client_pow_tokens: Rate::new(30, 10),
            client_reads: Rate::new(12_000, 3_000),
            client_requests: Rate::new(600, 120),
            room_messages: Rate::new(600, 120),
            global_creations: Rate::new(600, 100),
            global_connections: Rate::new(30_000, 3_000),
            onion_factor: 20,
            max_keys: 100_000,
            sweep_interval_secs: 10,
        }
    }
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            trusted: Vec::new(),
            ipv4_prefix: 32,
            ipv6_prefix: 64,
        }
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            batch_max: 4096,
            queue: 8192,
            writers: 2,
            min_free_mib: 256,
            max_database_mib: 0,
        }
    }
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            reload_interval_secs: 60,
            redirect_listen: None,
            acme_webroot: None,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            filter: "info".into(),
        }
    }
}

/// A configuration error; the text names the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Settings {
    /// Load settings: defaults, then `file` (if any), then `NANOCHAT__*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Settings::load`] with an explicit environment (tests use this).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let defaults = config::Config::try_from(&Settings::default())
            .map_err(|e| ConfigError(e.to_string()))?;
        let mut builder = config::Config::builder().add_source(defaults);
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("NANOCHAT__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("NANOCHAT")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("proxy.trusted")
                .with_list_parse_key("server.allowed_origins")
                .source(Some(env)),
        );
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Check every value that has a range; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn check(ok: bool, key: &str, what: &str) -> Result<(), ConfigError> {
            if ok {
                Ok(())
            } else {
                Err(ConfigError(format!("{key}: {what}")))
            }
        }
        check(
            self.server.listen.parse::<SocketAddr>().is_ok(),
            "server.listen",
            "must be an address like 127.0.0.1:8080",
        )?;
        check(
            self.server.admin_listen.parse::<SocketAddr>().is_ok(),
            "server.admin_listen",
            "must be an address like 127.0.0.1:9464",
        )?;
        check(
            (1..=3600).contains(&self.server.shutdown_grace_secs),
            "server.shutdown_grace_secs",
            "must be between 1 and 3600",
        )?;
        check(
            !self.server.data_dir.as_os_str().is_empty(),
            "server.data_dir",
            "must not be empty",
        )?;
        if let Err(e) = crate::abuse::origin::OriginPolicy::new(&self.server.allowed_origins) {
            return Err(ConfigError(format!("server.allowed_origins: {e}")));
        }
        if let Some(url) = &self.database.url {
            check(
                url.parse::<tokio_postgres::Config>().is_ok(),
                "database.url",
                "is not a valid Postgres connection string",
            )?;
        }
        check(
            (1..=1024).contains(&self.database.pool_size),
            "database.pool_size",
            "must be between 1 and 1024",
        )?;
        check(
            (1..=300).contains(&self.database.connect_timeout_secs),
            "database.connect_timeout_secs",
            "must be between 1 and 300",
        )?;
        check(
            (1..=3650).contains(&self.retention.days),
            "retention.days",
            "must be between 1 and 3650",
        )?;
        check(
            self.retention.tombstone_days <= 36500,
            "retention.tombstone_days",
            "must be at most 36500",
        )?;
        check(
            (1..=86400).contains(&self.retention.maintenance_interval_secs),
            "retention.maintenance_interval_secs",
            "must be between 1 and 86400",
        )?;
        let l = &self.limits;
        check(
            (1..=crate::protocol::MAX_HISTORY_LIMIT).contains(&l.history),
            "limits.history",
            "must be between 1 and 200",
        )?;
        check(
            (16..=1 << 20).contains(&l.max_ct_bytes),
            "limits.max_ct_bytes",
            "must be between 16 and 1048576",
        )?;
        // A send frame carries the ciphertext in base64 (4/3 larger) plus ~200 bytes of JSON.
        check(
            l.max_frame_bytes <= 16 << 20 && l.max_frame_bytes >= l.max_ct_bytes * 4 / 3 + 256,
            "limits.max_frame_bytes",
            "must be at most 16 MiB and hold a send frame of limits.max_ct_bytes (4/3 of it + 256)",
        )?;
        // One group commit can publish up to store.batch_max messages to one room at once; a
        // queue smaller than that would kick healthy members of a busy room.
        check(
            l.send_queue >= self.store.batch_max && l.send_queue <= 65536,
            "limits.send_queue",
            "must be at least store.batch_max and at most 65536",
        )?;
        check(
            (1..=3600).contains(&l.send_timeout_secs),
            "limits.send_timeout_secs",
            "must be between 1 and 3600",
        )?;
        check(
            (1..=4096).contains(&l.max_inflight_sends),
            "limits.max_inflight_sends",
            "must be between 1 and 4096",
        )?;
        check(
            (1..=3600).contains(&l.ping_interval_secs),
            "limits.ping_interval_secs",
            "must be between 1 and 3600",
        )?;
        check(
            l.idle_timeout_secs > l.ping_interval_secs && l.idle_timeout_secs <= 86400,
            "limits.idle_timeout_secs",
            "must be above limits.ping_interval_secs and at most 86400",
        )?;
        check(
            l.frames_per_second >= 1,
            "limits.frames_per_second",
            "must be at least 1",
        )?;
        check(
            l.frames_burst >= 1,
            "limits.frames_burst",
            "must be at least 1",
        )?;
        check(
            self.pow.base_bits <= 40,
            "pow.base_bits",
            "must be at most 40",
        )?;
        check(
            self.pow.max_bits >= self.pow.base_bits && self.pow.max_bits <= 40,
            "pow.max_bits",
            "must be between pow.base_bits and 40",
        )?;
        check(
            (10..=3_600_000).contains(&self.pow.adjust_interval_ms),
            "pow.adjust_interval_ms",
            "must be between 10 and 3600000",
        )?;
        check(
            self.pow.calm_intervals >= 1,
            "pow.calm_intervals",
            "must be at least 1",
        )?;
        let r = &self.rate;
        for (key, rate) in [
            ("rate.client_connections", r.client_connections),
            ("rate.client_frames", r.client_frames),
            ("rate.client_messages", r.client_messages),
            ("rate.client_creations", r.client_creations),
            ("rate.client_pow_tokens", r.client_pow_tokens),
            ("rate.client_reads", r.client_reads),
            ("rate.client_requests", r.client_requests),
            ("rate.room_messages", r.room_messages),
            ("rate.global_creations", r.global_creations),
            ("rate.global_connections", r.global_connections),
        ] {
            check(
                rate.per_minute >= 1 && rate.burst >= 1,
                key,
                "per_minute and burst must be at least 1",
            )?;
        }
        check(
            r.client_reads.burst >= crate::protocol::MAX_HISTORY_LIMIT,
            "rate.client_reads",
            "burst must be at least 200, the largest history page, or such a page could never be read",
        )?;
        check(
            r.client_max_sockets >= 1,
            "rate.client_max_sockets",
            "must be at least 1",
        )?;
        check(
            r.onion_factor >= 1,
            "rate.onion_factor",
            "must be at least 1",
        )?;
        check(
            (1..=10_000_000).contains(&r.max_keys),
            "rate.max_keys",
            "must be between 1 and 10000000",
        )?;
        check(
            (1..=3600).contains(&r.sweep_interval_secs),
            "rate.sweep_interval_secs",
            "must be between 1 and 3600",
        )?;
        for cidr in &self.proxy.trusted {
            check(
                crate::abuse::client_ip::Cidr::parse(cidr).is_some(),
                "proxy.trusted",
                "entries must be addresses or CIDRs like 10.0.0.0/8 or fd00::/8",
            )?;
        }
        check(
            (1..=32).contains(&self.proxy.ipv4_prefix),
            "proxy.ipv4_prefix",
            "must be between 1 and 32",
        )?;
        check(
            (1..=128).contains(&self.proxy.ipv6_prefix),
            "proxy.ipv6_prefix",
            "must be between 1 and 128",
        )?;
        if let Some(onion) = &self.server.onion_listen {
            check(
                onion.parse::<SocketAddr>().is_ok(),
                "server.onion_listen",
                "must be an address like 127.0.0.1:8081",
            )?;
        }
        check(
            !self.server.onion_circuit_ids || self.server.onion_listen.is_some(),
            "server.onion_circuit_ids",
            "needs server.onion_listen (Tor's circuit ids are read there only)",
        )?;
        let tls = &self.tls;
        check(
            tls.cert.is_some() == tls.key.is_some(),
            "tls.cert",
            "and tls.key are set together or not at all",
        )?;
        check(
            (1..=86400).contains(&tls.reload_interval_secs),
            "tls.reload_interval_secs",
            "must be between 1 and 86400",
        )?;
        if let Some(redirect) = &tls.redirect_listen {
            check(
                redirect.parse::<SocketAddr>().is_ok(),
                "tls.redirect_listen",
                "must be an address like 0.0.0.0:80",
            )?;
            check(
                tls.cert.is_some(),
                "tls.redirect_listen",
                "needs tls.cert and tls.key (it sends visitors to HTTPS)",
            )?;
        }
        check(
            tls.acme_webroot.is_none() || tls.redirect_listen.is_some(),
            "tls.acme_webroot",
            "needs tls.redirect_listen (challenges are served there)",
        )?;
        check(
            l.send_queue_bytes >= l.max_frame_bytes,
            "limits.send_queue_bytes",
            "must be at least limits.max_frame_bytes",
        )?;
        check(
            l.max_connections >= 1,
            "limits.max_connections",
            "must be at least 1",
        )?;
        check(
            (1..=300).contains(&l.handshake_timeout_secs),
            "limits.handshake_timeout_secs",
            "must be between 1 and 300",
        )?;
        check(
            l.strike_budget >= 4,
            "limits.strike_budget",
            "must be at least 4",
        )?;
        check(
            (10..=86400).contains(&self.pow.token_ttl_secs),
            "pow.token_ttl_secs",
            "must be between 10 and 86400",
        )?;
        check(
            (1..=65536).contains(&self.store.batch_max),
            "store.batch_max",
            "must be between 1 and 65536",
        )?;
        check(
            self.store.queue >= 1 && self.store.queue <= 1 << 20,
            "store.queue",
            "must be between 1 and 1048576",
        )?;
        // Each writer holds a pooled connection for its batch; leave some for reads.
        check(
            self.store.writers >= 1 && self.store.writers < self.database.pool_size.max(2),
            "store.writers",
            "must be at least 1 and below database.pool_size",
        )?;
        check(
            self.store.min_free_mib <= 1 << 24,
            "store.min_free_mib",
            "must be at most 16777216 (16 TiB)",
        )?;
        check(
            self.store.max_database_mib <= 1 << 30,
            "store.max_database_mib",
            "must be at most 1073741824 (1 PiB); 0 for no cap",
        )?;
        Ok(())
    }

    /// The server secret file: `server.secret_file`, or `<data_dir>/secret`.
    pub fn secret_path(&self) -> PathBuf {
        self.server
            .secret_file
            .clone()
            .unwrap_or_else(|| self.server.data_dir.join("secret"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid_and_match_the_documented_values() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(s.server.listen, "127.0.0.1:8080");
        assert_eq!(s.retention.days, 30);
        assert_eq!(s.secret_path(), PathBuf::from("./data/secret"));
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let s = Settings::load_from(
            None,
            env(&[
                ("NANOCHAT__SERVER__LISTEN", "0.0.0.0:9000"),
                ("NANOCHAT__LIMITS__MAX_CT_BYTES", "4096"),
                ("NANOCHAT__DATABASE__URL", "postgres://u@localhost/db"),
                ("NANOCHAT_CONFIG", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.listen, "0.0.0.0:9000");
        assert_eq!(s.limits.max_ct_bytes, 4096);
        assert_eq!(s.database.url.as_deref(), Some("postgres://u@localhost/db"));
        let s = Settings::load_from(
            None,
            env(&[
                ("NANOCHAT__PROXY__TRUSTED", "10.0.0.0/8,fd00::/8"),
                ("NANOCHAT__RATE__CLIENT_MESSAGES__PER_MINUTE", "7"),
                ("NANOCHAT__POW__MODE", "on"),
                (
                    "NANOCHAT__SERVER__ALLOWED_ORIGINS",
                    "https://chat.example.org,http://localhost:3000",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(s.proxy.trusted, vec!["10.0.0.0/8", "fd00::/8"]);
        assert_eq!(
            s.server.allowed_origins,
            vec!["https://chat.example.org", "http://localhost:3000"]
        );
        assert_eq!(s.rate.client_messages.per_minute, 7);
        assert_eq!(s.rate.client_messages.burst, 30);
        assert_eq!(s.pow.mode, PowMode::On);
    }

    #[test]
    fn invalid_values_name_their_key() {
        let e = Settings::load_from(None, env(&[("NANOCHAT__RETENTION__DAYS", "0")])).unwrap_err();
        assert!(e.to_string().contains("retention.days"), "{e}");
        let e =
            Settings::load_from(None, env(&[("NANOCHAT__SERVER__LISTEN", "nowhere")])).unwrap_err();
        assert!(e.to_string().contains("server.listen"), "{e}");
        let e = Settings::load_from(None, env(&[("NANOCHAT__SERVER__LISTN", "x")])).unwrap_err();
        assert!(e.to_string().contains("listn"), "{e}");
        let e = Settings::load_from(
            None,
            env(&[("NANOCHAT__SERVER__ALLOWED_ORIGINS", "chat.example.org")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("server.allowed_origins"), "{e}");
        assert!(e.to_string().contains("`chat.example.org`"), "{e}");
        let e = Settings::load_from(
            None,
            env(&[("NANOCHAT__SERVER__ONION_CIRCUIT_IDS", "true")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("server.onion_listen"), "{e}");
        let e =
            Settings::load_from(None, env(&[("NANOCHAT__LIMITS__HISTORY", "many")])).unwrap_err();
        assert!(e.to_string().contains("history"), "{e}");
        // Every writer holds a pooled connection while it commits: some must stay for reads.
        for writers in ["0", "16"] {
            let e = Settings::load_from(None, env(&[("NANOCHAT__STORE__WRITERS", writers)]))
                .unwrap_err();
            assert!(e.to_string().contains("store.writers"), "{writers}: {e}");
        }
        let ok = Settings::load_from(None, env(&[("NANOCHAT__STORE__WRITERS", "15")])).unwrap();
        assert_eq!(ok.store.writers, 15);
        // A read budget below the largest history page would refuse such a page forever.
        let e = Settings::load_from(None, env(&[("NANOCHAT__RATE__CLIENT_READS__BURST", "199")]))
            .unwrap_err();
        assert!(e.to_string().contains("rate.client_reads"), "{e}");
        let ok = Settings::load_from(None, env(&[("NANOCHAT__RATE__CLIENT_READS__BURST", "200")]))
            .unwrap();
        assert_eq!(ok.rate.client_reads.burst, 200);
    }

    #[test]
    fn tls_keys_come_together_and_the_redirect_needs_tls() {
        let load = |pairs: &[(&str, &str)]| Settings::load_from(None, env(pairs));
        let cert = ("NANOCHAT__TLS__CERT", "/etc/nanochat/fullchain.pem");
        let key = ("NANOCHAT__TLS__KEY", "/etc/nanochat/privkey.pem");
        let redirect = ("NANOCHAT__TLS__REDIRECT_LISTEN", "0.0.0.0:80");
        let webroot = ("NANOCHAT__TLS__ACME_WEBROOT", "/var/lib/nanochat/acme");
        for alone in [cert, key] {
            let e = load(&[alone]).unwrap_err();
            assert!(e.to_string().contains("tls.cert"), "{e}");
        }
        let e = load(&[redirect]).unwrap_err();
        assert!(e.to_string().contains("tls.redirect_listen"), "{e}");
        let e = load(&[cert, key, ("NANOCHAT__TLS__REDIRECT_LISTEN", ":80")]).unwrap_err();
        assert!(e.to_string().contains("tls.redirect_listen"), "{e}");
        let e = load(&[cert, key, webroot]).unwrap_err();
        assert!(e.to_string().contains("tls.acme_webroot"), "{e}");
        let e = load(&[cert, key, ("NANOCHAT__TLS__RELOAD_INTERVAL_SECS", "0")]).unwrap_err();
        assert!(e.to_string().contains("tls.reload_interval_secs"), "{e}");
        let s = load(&[cert, key, redirect, webroot]).unwrap();
        assert_eq!(s.tls.cert, Some(PathBuf::from(cert.1)));
        assert_eq!(s.tls.redirect_listen.as_deref(), Some(redirect.1));
        assert_eq!(s.tls.acme_webroot, Some(PathBuf::from(webroot.1)));
        assert_eq!(s.tls.reload_interval_secs, 60);
    }
}
