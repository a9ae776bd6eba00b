//! Every Prometheus metric of the server, defined once with its help text. Each
//! [`Application`](crate::startup::Application) owns its own registry, so tests can run many
//! servers in one process. No metric carries a room id or an IP as a label.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::protocol::ErrorCode;

/// The metrics of one server.
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections_open: IntGauge,
    /// Open WebSocket connections the server accepts (`limits.max_connections`, as fitted to
    /// the open-file limit at start).
    pub connections_max: IntGauge,
    /// WebSocket connections accepted.
    pub connections_total: IntCounter,
    /// Join attempts by result (`ok`, `auth_failed`, `room_gone`, `error`).
    pub joins_total: IntCounterVec,
    /// Rooms created.
    pub rooms_created_total: IntCounter,
    /// Rooms wiped with panic.
    pub rooms_wiped_total: IntCounter,
    /// Messages committed to storage.
    pub messages_stored_total: IntCounter,
    /// Message frames queued to room members.
    pub messages_fanned_out_total: IntCounter,
    /// Sockets disconnected because they could not keep up.
    pub slow_consumers_total: IntCounter,
    /// Message frames dropped with the queue of a disconnected slow consumer.
    pub messages_dropped_total: IntCounter,
    /// Storage reads made because a live frame arrived ahead of messages its socket lacked.
    pub gap_reads_total: IntCounter,
    /// Storage reads a room made for the messages before one it held back too long.
    pub held_gap_reads_total: IntCounter,
    /// Messages a room held back until earlier ones arrived.
    pub messages_held_total: IntCounter,
    /// Error frames sent, by code.
    pub frames_rejected_total: IntCounterVec,
    /// Duration of one group-commit write.
    pub store_batch_seconds: Histogram,
    /// Messages per group-commit write.
    pub store_batch_size: Histogram,
    /// Storage operations that failed, by operation.
    pub store_errors_total: IntCounterVec,
    /// Maintenance runs by result.
    pub maintenance_runs_total: IntCounterVec,
    /// Message-history partitions dropped by maintenance (Postgres).
    pub partitions_dropped_total: IntCounter,
    /// Expired partitions whose drop was left for a later run: something else held them.
    pub partitions_deferred_total: IntCounter,
    /// Rooms deleted by maintenance (idle or tombstone expired).
    pub rooms_expired_total: IntCounter,
    /// Time from receiving a `send` to its `ack`.
    pub ack_latency_seconds: HistogramVec,
    /// Requests refused by a rate limiter, by limiter.
    pub rate_limited_total: IntCounterVec,
    /// Keys a keyed limiter tracks, by limiter.
    pub limiter_keys: IntGaugeVec,
    /// Checks that went to a limiter's shared overflow bucket because it was full, by limiter.
    pub limiter_overflow_total: IntCounterVec,
    /// Current proof-of-work difficulty for room creation (leading zero bits; 0 = none).
    pub pow_bits: IntGauge,
    /// The configured ceiling of the adaptive difficulty.
    pub pow_max_bits: IntGauge,
    /// Proof-of-work tokens by result: issued, redeemed, or why they were refused.
    pub pow_tokens_total: IntCounterVec,
    /// WebSocket upgrades refused before the handshake, by reason.
    pub upgrades_refused_total: IntCounterVec,
    /// Sockets closed for collecting too many refusals.
    pub abuse_disconnects_total: IntCounter,
    /// Public connections the HTTP layer ended in error, by kind: `malformed` (a request it
    /// could not parse), `timeout` (a client that did not let the connection close), `io`,
    /// `other`, and with `[tls]` on, `tls` (no TLS handshake within the handshake timeout).
    pub http_connection_errors_total: IntCounterVec,
    /// Time from a batch's commit until its messages are queued to every member.
    pub fanout_seconds: Histogram,
    /// Duration of history reads (join and history frames).
    pub history_query_seconds: Histogram,
    /// Database connections by state (`max`, `open`, `idle`, `waiting`); Postgres only.
    pub store_pool_connections: IntGaugeVec,
    /// Memory of the replay key filters (SQLite).
    pub replay_filter_bytes: IntGauge,
    /// Message partitions present after the last maintenance run (Postgres).
    pub partitions: IntGauge,
    /// Bytes the database takes on disk, as of the last scrape.
    pub storage_bytes: IntGauge,
    /// Bytes counted against `store.max_database_mib`.
    pub storage_used_bytes: IntGauge,
    /// `store.max_database_mib` in bytes (0: no cap).
    pub storage_cap_bytes: IntGauge,
    /// The data volume's gauges, registered once a backend reports a volume (SQLite), so a
    /// Postgres node shows no zeros for a disk it cannot see.
    volume: std::sync::OnceLock<VolumeGauges>,
    /// HTTPS's metrics, registered when `[tls]` is on (an expiry of 0 would look like an
    /// expired certificate).
    tls: std::sync::OnceLock<TlsMetrics>,
    /// Duration of maintenance runs.
    pub maintenance_seconds: Histogram,
    /// Unix time of the last successful maintenance run.
    pub maintenance_last_success_timestamp_seconds: IntGauge,
    /// Build information (always 1), labelled with version and git commit.
    pub build_info: IntGaugeVec,
    /// Unix time the process started.
    pub start_time_seconds: IntGauge,
    /// 1 while the server drains for shutdown.
    pub draining: IntGauge,
    /// Storage checks made for `/readyz` (at most one a second, however often it is asked).
    pub readiness_checks_total: IntCounter,
    /// 1 while the cluster listener is connected and listening (Postgres with several nodes);
    /// 0 before it first connects and while it reconnects.
    pub cluster_listening: IntGauge,
    /// Cluster listener events: `received` notifications from other nodes, `listening`
    /// (connected), `reconnect`.
    pub cluster_notifications_total: IntCounterVec,
}

/// The volume under a SQLite data directory.
struct VolumeGauges {
    available: IntGauge,
    size: IntGauge,
    reserve: IntGauge,
}

/// The certificate served on the public listener.
pub struct TlsMetrics {
    /// Unix time after which the served certificate is no longer valid.
    pub expiry: IntGauge,
    /// Looks at changed certificate files, by result: `loaded`, `failed`.
    pub reloads: IntCounterVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry
        .register(Box::new(metric.clone()))
        // Names are unique constants in this module; a clash is a programming error.
        .expect("metric names are unique");
    metric
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let counter =
            |name: &str, help: &str| reg(r, IntCounter::new(name, help).expect("valid metric"));
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let m = Metrics {
            connections_open: reg(
                r,
                IntGauge::new("nanochat_connections_open", "Open WebSocket connections.")
                    .expect("valid metric"),
            ),
            connections_max: reg(
                r,
                IntGauge::new(
                    "nanochat_connections_max",
                    "Open WebSocket connections the server accepts (limits.max_connections, lowered at start if the open-file limit cannot hold it).",
                )
                .expect("valid metric"),
            ),
            connections_total: counter(
                "nanochat_connections_total",
                "WebSocket connections accepted.",
            ),
            joins_total: counter_vec(
                "nanochat_joins_total",
                "Join attempts by result.",
                &["result"],
            ),
            rooms_created_total: counter("nanochat_rooms_created_total", "Rooms created."),
            rooms_wiped_total: counter(
                "nanochat_rooms_wiped_total",
                "Rooms wiped by the panic button.",
            ),
            messages_stored_total: counter(
                "nanochat_messages_stored_total",
                "Messages committed to storage.",
            ),
            messages_fanned_out_total: counter(
                "nanochat_messages_fanned_out_total",
                "Message frames queued to room members.",
            ),
            slow_consumers_total: counter(
                "nanochat_slow_consumers_total",
                "Sockets disconnected because they could not keep up with their room.",
            ),
            messages_dropped_total: counter(
                "nanochat_messages_dropped_total",
                "Message frames dropped with a slow consumer's queue when it was disconnected (it catches up on reconnect).",
            ),
            gap_reads_total: counter(
                "nanochat_gap_reads_total",
                "Storage reads a socket made because a live message arrived before earlier ones of its room (committed through another server process).",
            ),
            held_gap_reads_total: counter(
                "nanochat_held_gap_reads_total",
                "Storage reads a room made, once for all its sockets, for the messages before one it held back longer than 50 ms.",
            ),
            messages_held_total: counter(
                "nanochat_messages_held_total",
                "Messages a room held back because they arrived before earlier ones (committed through another server process or writer).",
            ),
            frames_rejected_total: counter_vec(
                "nanochat_frames_rejected_total",
                "Error frames sent, by code.",
                &["code"],
            ),
            store_batch_seconds: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "nanochat_store_batch_seconds",
                        "Duration of one group-commit write.",
                    )
                    .buckets(prometheus::exponential_buckets(0.0001, 2.0, 16).expect("valid")),
                )
                .expect("valid metric"),
            ),
            store_batch_size: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "nanochat_store_batch_size",
                        "Messages written per group-commit transaction.",
                    )
                    .buckets(prometheus::exponential_buckets(1.0, 2.0, 14).expect("valid")),
                )
                .expect("valid metric"),
            ),
            store_errors_total: counter_vec(
                "nanochat_store_errors_total",
                "Storage operations that failed, by operation.",
                &["op"],
            ),
            maintenance_runs_total: counter_vec(
                "nanochat_maintenance_runs_total",
                "Maintenance runs by result.",
                &["result"],
            ),
            partitions_dropped_total: counter(
                "nanochat_partitions_dropped_total",
                "Daily message partitions dropped by maintenance.",
            ),
            partitions_deferred_total: counter(
                "nanochat_partitions_deferred_total",
                "Expired partitions whose drop maintenance left for a later run because a vacuum or a long query held them.",
            ),
            rooms_expired_total: counter(
                "nanochat_rooms_expired_total",
                "Rooms deleted by maintenance: idle past retention or tombstone expired.",
            ),
            ack_latency_seconds: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "nanochat_ack_latency_seconds",
                        "Time from receiving a send to its ack, by result.",
                    )
                    .buckets(prometheus::exponential_buckets(0.0001, 2.0, 16).expect("valid")),
                    &["result"],
                )
                .expect("valid metric"),
            ),
            rate_limited_total: counter_vec(
                "nanochat_rate_limited_total",
                "Requests refused by a rate limiter, by limiter.",
                &["limiter"],
            ),
            limiter_keys: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "nanochat_limiter_keys",
                        "Keys (clients or rooms) a keyed limiter tracks, by limiter.",
                    ),
                    &["limiter"],
                )
                .expect("valid metric"),
            ),
            limiter_overflow_total: counter_vec(
                "nanochat_limiter_overflow_total",
                "Checks sent to a limiter's shared overflow bucket because its key table was full.",
                &["limiter"],
            ),
            pow_bits: reg(
                r,
                IntGauge::new(
                    "nanochat_pow_difficulty",
                    "Current proof-of-work difficulty for room creation, in leading zero bits.",
                )
                .expect("valid metric"),
            ),
            pow_max_bits: reg(
                r,
                IntGauge::new(
                    "nanochat_pow_difficulty_max",
                    "Configured ceiling of the proof-of-work difficulty (pow.max_bits).",
                )
                .expect("valid metric"),
            ),
            pow_tokens_total: counter_vec(
                "nanochat_pow_tokens_total",
                "Proof-of-work tokens issued, redeemed, or refused (by reason).",
                &["result"],
            ),
            upgrades_refused_total: counter_vec(
                "nanochat_upgrades_refused_total",
                "WebSocket upgrades refused before the handshake, by reason.",
                &["reason"],
            ),
            abuse_disconnects_total: counter(
                "nanochat_abuse_disconnects_total",
                "Sockets closed for collecting too many refused or invalid frames.",
            ),
            http_connection_errors_total: counter_vec(
                "nanochat_http_connection_errors_total",
                "Public connections ended by an HTTP error: malformed, timeout, io, other.",
                &["kind"],
            ),
            fanout_seconds: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "nanochat_fanout_seconds",
                        "Time from a batch commit until its messages are queued to every member.",
                    )
                    .buckets(prometheus::exponential_buckets(0.00001, 2.0, 16).expect("valid")),
                )
                .expect("valid metric"),
            ),
            history_query_seconds: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "nanochat_history_query_seconds",
                        "Duration of history reads for join and history frames.",
                    )
                    .buckets(prometheus::exponential_buckets(0.0001, 2.0, 16).expect("valid")),
                )
                .expect("valid metric"),
            ),
            store_pool_connections: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "nanochat_store_pool_connections",
                        "Postgres pool connections by state: max, open, idle, waiting (requests queued for one).",
                    ),
                    &["state"],
                )
                .expect("valid metric"),
            ),
            replay_filter_bytes: reg(
                r,
                IntGauge::new(
                    "nanochat_replay_filter_bytes",
                    "Memory of the SQLite writer's replay key filters: the one in use, and the next one twice while it is built.",
                )
                .expect("valid metric"),
            ),
            storage_bytes: reg(
                r,
                IntGauge::new(
                    "nanochat_storage_bytes",
                    "Bytes the database takes on disk: SQLite's database file and write-ahead log, or the Postgres database (pg_database_size).",
                )
                .expect("valid metric"),
            ),
            storage_used_bytes: reg(
                r,
                IntGauge::new(
                    "nanochat_storage_used_bytes",
                    "Bytes the stored data takes, as counted against store.max_database_mib: SQLite's pages in use (freed pages are reused first), Postgres's database size.",
                )
                .expect("valid metric"),
            ),
            storage_cap_bytes: reg(
                r,
                IntGauge::new(
                    "nanochat_storage_cap_bytes",
                    "New messages and rooms are refused while nanochat_storage_used_bytes is at least this (store.max_database_mib; 0: no cap).",
                )
                .expect("valid metric"),
            ),
            volume: std::sync::OnceLock::new(),
            tls: std::sync::OnceLock::new(),
            partitions: reg(
                r,
                IntGauge::new(
                    "nanochat_partitions",
                    "Daily message partitions present after the last maintenance run (Postgres).",
                )
                .expect("valid metric"),
            ),
            maintenance_seconds: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("nanochat_maintenance_seconds", "Duration of maintenance runs.")
                        .buckets(prometheus::exponential_buckets(0.001, 4.0, 10).expect("valid")),
                )
                .expect("valid metric"),
            ),
            maintenance_last_success_timestamp_seconds: reg(
                r,
                IntGauge::new(
                    "nanochat_maintenance_last_success_timestamp_seconds",
                    "Unix time of the last successful maintenance run.",
                )
                .expect("valid metric"),
            ),
            build_info: reg(
                r,
                IntGaugeVec::new(
                    Opts::new("nanochat_build_info", "Build information; the value is always 1."),
                    &["version", "commit"],
                )
                .expect("valid metric"),
            ),
            start_time_seconds: reg(
                r,
                IntGauge::new(
                    "nanochat_start_time_seconds",
                    "Unix time the server process started.",
                )
                .expect("valid metric"),
            ),
            draining: reg(
                r,
                IntGauge::new("nanochat_draining", "1 while the server drains for shutdown.")
                    .expect("valid metric"),
            ),
            readiness_checks_total: counter(
                "nanochat_readiness_checks_total",
                "Storage checks made for /readyz (at most one a second, however often it is asked).",
            ),
            cluster_listening: reg(
                r,
                IntGauge::new(
                    "nanochat_cluster_listening",
                    "1 while the cluster listener receives other nodes' notifications.",
                )
                .expect("valid metric"),
            ),
            cluster_notifications_total: counter_vec(
                "nanochat_cluster_notifications_total",
                "Cluster listener events: received notifications, listening (connected), reconnect.",
                &["event"],
            ),
            registry,
        };
        for event in ["received", "listening", "reconnect"] {
            m.cluster_notifications_total.with_label_values(&[event]);
        }
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("NANOCHAT_GIT_COMMIT")])
            .set(1);
        m.start_time_seconds.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        );
        for op in [
            "append",
            "room",
            "messages",
            "create_room",
            "wipe",
            "redeem_token",
        ] {
            m.store_errors_total.with_label_values(&[op]);
        }
        for result in ["ok", "skipped", "error"] {
            m.maintenance_runs_total.with_label_values(&[result]);
        }
        for result in [
            "issued",
            "redeemed",
            "malformed",
            "expired",
            "bad_tag",
            "wrong_work",
            "spent",
        ] {
            m.pow_tokens_total.with_label_values(&[result]);
        }
        // Pre-create the labelled series so dashboards see zeros instead of gaps.
        for code in ErrorCode::ALL {
            m.frames_rejected_total.with_label_values(&[code.as_str()]);
        }
        for result in ["ok", "auth_failed", "room_gone", "error"] {
            m.joins_total.with_label_values(&[result]);
        }
        // The limiters add their own reasons (`Limits::new`); this one is the origin check's.
        m.upgrades_refused_total.with_label_values(&["origin"]);
        for kind in ["malformed", "timeout", "io", "other"] {
            m.http_connection_errors_total.with_label_values(&[kind]);
        }
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            // Registered once per registry; cannot clash.
            let _ = m.registry.register(Box::new(pc));
        }
        m
    }

    /// Count an error frame.
    pub fn rejected(&self, code: ErrorCode) {
        self.frames_rejected_total
            .with_label_values(&[code.as_str()])
            .inc();
    }

    /// Record what storage takes and what its volume has left.
    pub fn set_storage(&self, usage: &crate::store::StorageUsage) {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.storage_bytes.set(clamp(usage.database_bytes));
        self.storage_used_bytes.set(clamp(usage.used_bytes));
        let Some(v) = usage.volume else {
            return;
        };
        let gauges = self.volume.get_or_init(|| {
            let gauge = |name: &str, help: &str| {
                reg(
                    &self.registry,
                    IntGauge::new(name, help).expect("valid metric"),
                )
            };
            VolumeGauges {
                available: gauge(
                    "nanochat_storage_volume_available_bytes",
                    "Bytes still available on the volume under the SQLite data directory.",
                ),
                size: gauge(
                    "nanochat_storage_volume_size_bytes",
                    "Size of the volume under the SQLite data directory.",
                ),
                reserve: gauge(
                    "nanochat_storage_reserve_bytes",
                    "New messages and rooms are refused while the volume has less than this available (store.min_free_mib; 0: never).",
                ),
            }
        });
        gauges.available.set(clamp(v.available));
        gauges.size.set(clamp(v.size));
        gauges.reserve.set(clamp(v.reserve));
    }

    /// HTTPS's metrics, registered on first use.
    pub fn tls(&self) -> &TlsMetrics {
        self.tls.get_or_init(|| {
            self.http_connection_errors_total.with_label_values(&["tls"]);
            let reloads = reg(
                &self.registry,
                IntCounterVec::new(
                    Opts::new(
                        "nanochat_tls_reloads_total",
                        "Changed TLS certificate files looked at, by result: loaded, failed (the old certificate is still served).",
                    ),
                    &["result"],
                )
                .expect("valid metric"),
            );
            for result in ["loaded", "failed"] {
                reloads.with_label_values(&[result]);
            }
            TlsMetrics {
                expiry: reg(
                    &self.registry,
                    IntGauge::new(
                        "nanochat_tls_certificate_expiry_timestamp_seconds",
                        "Unix time after which the certificate served on the public listener is no longer valid.",
                    )
                    .expect("valid metric"),
                ),
                reloads,
            }
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
