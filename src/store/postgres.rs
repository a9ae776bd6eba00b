//! The Postgres backend: a deadpool-postgres pool, migrations applied at start under an
//! advisory lock, `messages` partitioned by UTC day of `created_at`, and expiry that drops whole
//! partitions instead of deleting rows.
//!
//! Ordering across writers: `append` locks the rows of the rooms it writes (`FOR UPDATE`, in
//! room-id order so concurrent batches cannot deadlock) before it reads `last_seq`, so seqs of
//! one room are assigned and committed in the same order even with several server processes,
//! and a reader that saw seq n has seen every seq below it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::future::BoxFuture;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::{
    AppendOutcome, CreateOutcome, MaintenanceReport, Millis, NewMessage, Page, Retention,
    RoomRecord, StorageUsage, Store, StoreError, StoredMessage, assign_seqs, finish_page,
    replay_window_start,
};
use crate::config::DatabaseSettings;
use crate::crypto::{EPOCH_MS, RoomId};
use crate::protocol::HistoryQuery;

/// Migrations in order; the index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_init.sql"),
    include_str!("../../migrations/postgres/0002_cluster.sql"),
    include_str!("../../migrations/postgres/0003_rooms_hot_updates.sql"),
    include_str!("../../migrations/postgres/0004_replay_keys_per_day.sql"),
    include_str!("../../migrations/postgres/0005_early_days.sql"),
    include_str!("../../migrations/postgres/0006_replay_digests.sql"),
];
/// Advisory lock key serializing migrations across processes ("nanochat" + 1).
const MIGRATE_LOCK: i64 = 0x6e61_6e6f_6368_6101;
/// Advisory lock key making maintenance run on one process at a time.
const MAINTAIN_LOCK: i64 = 0x6e61_6e6f_6368_6102;
/// How a write batch's transaction starts. Its three statements are planned once per
/// connection (generic plans) instead of for every batch: planning took a fifth of Postgres'
/// time per batch. Index paths only, so a plan made while a table or the day's partition was
/// still nearly empty stays right as it grows (what a generic plan would otherwise pick then,
/// a hash join over a sequential scan, costs more with every row). Reads keep custom plans.
pub const WRITER_BEGIN: &str = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; \
     SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off; \
     SET LOCAL enable_mergejoin = off; SET LOCAL enable_bitmapscan = off";
/// Lock the batch's live rooms, in id order (so writers cannot deadlock), and read their seqs
/// and the last day each stored a message sent early (`early_day`, schema version 5).
pub const LOCK_ROOMS: &str =
    "SELECT id, last_seq, early_day FROM rooms WHERE id = ANY($1) AND wiped_at IS NULL
     ORDER BY id FOR UPDATE";
/// The batch's (room, IV) pairs already stored in the parts of its replay window (see
/// `replay_window_start`) whose partitions keep `(room_id, iv)` indexes (made before schema
/// version 6): the ranges `$3` to `$4` and `$5` to `$6` (ends excluded). One index probe per
/// message and partition left, stopping at the first match; the other partitions are pruned
/// when the statement starts.
pub const FIND_REPLAYS: &str = "SELECT t.room_id, t.iv
     FROM unnest($1::bytea[], $2::bytea[]) AS t(room_id, iv)
     CROSS JOIN LATERAL (
        SELECT 1 FROM messages m
        WHERE m.room_id = t.room_id AND m.iv = t.iv
          AND ((m.created_at >= $3 AND m.created_at < $4)
            OR (m.created_at >= $5 AND m.created_at < $6))
        LIMIT 1) AS found";
/// The same for the parts whose partitions keep the pairs' digests unique (`_rk`, made since
/// schema version 6), probing by digest (`$7`) and comparing the pair.
pub const FIND_DIGESTS: &str = "SELECT t.room_id, t.iv
     FROM unnest($1::bytea[], $2::bytea[], $7::int8[]) AS t(room_id, iv, d)
     CROSS JOIN LATERAL (
        SELECT 1 FROM messages m
        WHERE m.replay_key = t.d AND m.room_id = t.room_id AND m.iv = t.iv
          AND ((m.created_at >= $3 AND m.created_at < $4)
            OR (m.created_at >= $5 AND m.created_at < $6))
        LIMIT 1) AS found";
/// Insert the batch with its replay digests (`$12`), advance its rooms (and mark those that
/// stored a message sent early with today, `$11`, NULL for the others) and announce it, in one
/// statement. `last_active` moves
/// only when a minute or more behind, so most room updates change no indexed column and stay
/// in place (HOT).
pub const WRITE_BATCH: &str = "WITH stored AS (
        INSERT INTO messages (room_id, seq, created_at, epoch, iv, ct, replay_key)
        SELECT r, s, $3, e, i, c, d
        FROM unnest($1::bytea[], $2::int8[], $4::int4[], $5::bytea[], $6::bytea[], $12::int8[])
          AS t(r, s, e, i, c, d)
     ), advanced AS (
        UPDATE rooms SET last_seq = t.s, last_active = CASE
            WHEN last_active <= $3 - interval '1 minute' THEN $3 ELSE last_active END,
            early_day = GREATEST(early_day, t.e)
        FROM unnest($7::bytea[], $8::int8[], $11::int4[]) AS t(r, s, e) WHERE rooms.id = t.r
     )
     SELECT pg_notify($9, p) FROM unnest($10::text[]) AS p";
/// The messages of other nodes' announced ranges (`$1` rooms, `$2` first and `$3` last seqs), in
/// the order announced, stored between `$4` and `$5`. One index range scan per range: the
/// `LIMIT` (a range holds at most that many) keeps the subquery from being merged into a join,
/// which Postgres would plan for many ranges as a hash join over a scan of the whole day's
/// partition, a cost that grows with every message stored that day.
pub const READ_RANGES: &str = "SELECT r.room_id, m.seq, m.created_at, m.epoch, m.iv, m.ct
     FROM unnest($1::bytea[], $2::int8[], $3::int8[]) WITH ORDINALITY AS r(room_id, first, last, n)
     CROSS JOIN LATERAL (
        SELECT seq, created_at, epoch, iv, ct FROM messages
        WHERE room_id = r.room_id AND seq BETWEEN r.first AND r.last
          AND created_at >= $4 AND created_at <= $5
        ORDER BY seq
        LIMIT GREATEST(r.last - r.first + 1, 0)) AS m
     ORDER BY r.n, m.seq";
/// Up to `$4` messages of each room (`$1`) after its seq (`$2`), stored since `$3`, in room
/// order as given: a listener's catch-up for every room with sockets here, in one statement.
/// Per room, the same ordered index scan as one room's history read (the `LIMIT` keeps it a
/// lookup per room, as in [`READ_RANGES`]).
pub const READ_AFTER: &str = "SELECT r.room_id, m.seq, m.created_at, m.epoch, m.iv, m.ct
     FROM unnest($1::bytea[], $2::int8[]) WITH ORDINALITY AS r(room_id, after, n)
     CROSS JOIN LATERAL (
        SELECT seq, created_at, epoch, iv, ct FROM messages
        WHERE room_id = r.room_id AND created_at >= $3 AND seq > r.after
        ORDER BY seq
        LIMIT $4) AS m
     ORDER BY r.n, m.seq";
/// Longest a partition's `CREATE` or `DROP`, or a schema migration, waits for its locks. They
/// take exclusive locks on `messages` (a drop also on the old partition, which every writer's
/// replay lookup locks too), and while one waits for them every write waits behind it:
/// anything else using the table (a `pg_dump`, which holds its locks for the whole dump; an
/// autovacuum of the old day, or an anti-wraparound one, which nothing cancels; a long read)
/// would otherwise stop all writes until it ends. Past this the attempt gives up; one that
/// works takes its locks in milliseconds.
const DDL_LOCK_TIMEOUT: &str = "200ms";
/// Attempts at one partition's `CREATE` or `DROP` per maintenance run, this far apart; then it
/// waits for the next run. Partitions are made days ahead, and the rows of one waiting to be
/// dropped are past the retention and never read meanwhile.
const DDL_ATTEMPTS: u32 = 3;
const DDL_RETRY_REST: Duration = Duration::from_secs(1);

/// Rest between rounds of [`DDL_ATTEMPTS`] at a schema migration whose tables are in use.
const MIGRATION_RETRY_REST: Duration = Duration::from_secs(5);

/// Run `sql` (a partition's `CREATE` or `DROP`, or a schema migration; one transaction)
/// without letting writes wait long behind it: false when its locks were still taken after
/// [`DDL_ATTEMPTS`] attempts.
async fn try_ddl(
    client: &mut deadpool_postgres::Object,
    sql: &str,
) -> Result<bool, tokio_postgres::Error> {
    for attempt in 1..=DDL_ATTEMPTS {
        let tx = client.transaction().await?;
        let done = tx
            .batch_execute(&format!(
                "SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'; {sql}"
            ))
            .await;
        match done {
            Ok(()) => {
                tx.commit().await?;
                return Ok(true);
            }
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                tx.rollback().await?;
                if attempt < DDL_ATTEMPTS {
                    tokio::time::sleep(DDL_RETRY_REST).await;
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Days of partitions created ahead of today.
const PARTITIONS_AHEAD: i64 = 3;

/// The Postgres store.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    retention: Retention,
    url: String,
    node: u64,
    day_keys: Arc<DayKeys>,
    /// Keyed with the database's `replay_digest` (schema version 6): the replay digests.
    digest_mac: Arc<Hmac<Sha256>>,
    /// The first day whose messages sent early are marked on their rooms' rows (`early_day`):
    /// the second day after schema version 5 was applied to a database with messages, or from
    /// the start. Before it, the replay lookup looks into every day of a message's window.
    marks_from: i64,
}

/// How the partitions around today keep their replay keys, read from the catalog. A day whose
/// partition keeps its pairs unique (a unique `_iv` index on `(room_id, iv)`, or only an `_rk`
/// index on their digests, always unique) need not be looked into by a batch written into it:
/// the insert refuses a repeat. A day whose partition has an `_rk` index and no `_iv` one
/// (made since schema version 6) is looked into by digest, any other by pair. Shared by the
/// store's clones (its writers).
#[derive(Default)]
struct DayKeys {
    known: Mutex<KnownDays>,
    /// Until when every batch looks into every day of its window: set for a minute after a
    /// day's unique index refused a repeat (and the batch was redone), so that a client
    /// repeating messages costs at most one redone batch a minute, never one per repeat.
    look_everywhere_until: AtomicI64,
}

#[derive(Default)]
struct KnownDays {
    /// Days whose partitions refuse a repeat at the insert.
    unique: HashSet<i64>,
    /// Days whose partitions are looked into by digest.
    digests: HashSet<i64>,
    /// When the catalog was last read.
    read_at: Option<Millis>,
}

/// How long after a refused repeat every batch looks into every day, and how long a day not
/// known to be unique waits before the catalog is read again.
const RECHECK_MS: Millis = 60_000;

/// The partitions from `back` days before `now`'s day to the last one made ahead.
fn nearby_partitions(now: Millis, back: i64) -> Vec<String> {
    let today = now.div_euclid(EPOCH_MS);
    (today - back..=today + PARTITIONS_AHEAD)
        .map(partition_name)
        .collect()
}

/// The statement giving a partition the replay key of partitions made before schema version
/// 6, `<partition>_iv` on `(room_id, iv)`: still how one made without any key (by a binary
/// older than version 4) gets one, since its rows carry no digests.
fn replay_key(partition: &str, unique: bool) -> String {
    let unique = if unique { "UNIQUE " } else { "" };
    format!("CREATE {unique}INDEX IF NOT EXISTS {partition}_iv ON {partition} (room_id, iv)")
}

/// The statement giving a new partition its replay key: its pairs' digests, unique.
fn digest_key(partition: &str) -> String {
    format!("CREATE UNIQUE INDEX IF NOT EXISTS {partition}_rk ON {partition} (replay_key)")
}

/// Which unique replay key refused an insert: `_iv` (a repeated pair) or `_rk` (a repeated
/// digest: a repeated pair, or two pairs with one digest).
fn refused_by(e: &tokio_postgres::Error) -> Option<&'static str> {
    if e.code() != Some(&SqlState::UNIQUE_VIOLATION) {
        return None;
    }
    let constraint = e.as_db_error()?.constraint()?;
    ["_iv", "_rk"].into_iter().find(|k| constraint.ends_with(k))
}

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A time in ms as a `timestamptz` parameter.
fn ts(ms: Millis) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

fn ms(t: SystemTime) -> Millis {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as Millis,
        Err(e) => -(e.duration().as_millis() as Millis),
    }
}

/// The civil (proleptic Gregorian) date of a day number since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The partition holding messages created on day `day` (days since the Unix epoch).
pub fn partition_name(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("messages_p{y:04}{m:02}{d:02}")
}

/// The day a partition name stands for, if it is one of ours.
pub fn partition_day(name: &str) -> Option<i64> {
    let digits = name.strip_prefix("messages_p")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let y: i64 = digits[..4].parse().ok()?;
    let m: u32 = digits[4..6].parse().ok()?;
    let d: u32 = digits[6..].parse().ok()?;
    days_from_civil(y, m, d)
}

/// The day number since 1970-01-01 of a civil date; `None` for a date that does not exist
/// (month 13, February 30).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> Option<i64> {
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Years counted from March, so that the leap day ends the year.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let doy = (153 * i64::from((m + 9) % 12) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let day = era * 146_097 + doe - 719_468;
    // Day 31 of a 30-day month would land on the next month's first.
    (civil_from_days(day).2 == d).then_some(day)
}

/// Rows of `(room_id, seq, created_at, epoch, iv, ct)`, as [`READ_RANGES`] and [`READ_AFTER`]
/// return them.
fn room_messages(rows: &[tokio_postgres::Row]) -> Vec<(RoomId, StoredMessage)> {
    rows.iter()
        .filter_map(|r| {
            let room: RoomId = r.get::<_, &[u8]>(0).try_into().ok()?;
            Some((room, stored_message(r, 1)))
        })
        .collect()
}

/// A message read from its columns `seq, created_at, epoch, iv, ct`, starting at `first`.
fn stored_message(r: &tokio_postgres::Row, first: usize) -> StoredMessage {
    StoredMessage {
        seq: r.get(first),
        ts: ms(r.get(first + 1)),
        epoch: r.get::<_, i32>(first + 2) as u32,
        iv: r.get(first + 3),
        ct: r.get(first + 4),
    }
}

/// A pooled connection that may be inside a transaction `append` drives by hand. If the call
/// is dropped half way (cancelled), the connection leaves the pool and closes, which makes
/// Postgres roll the transaction back, instead of going back to the pool mid-transaction.
struct InTransaction(Option<deadpool_postgres::Client>);

impl InTransaction {
    /// The transaction ended (committed or rolled back): return the connection to the pool.
    fn release(mut self) {
        drop(self.0.take());
    }
}

impl Drop for InTransaction {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

impl PgStore {
    /// Connect (retrying for a bounded time), migrate and prepare today's partitions.
    pub async fn connect(
        url: &str,
        settings: &DatabaseSettings,
        retention: Retention,
    ) -> anyhow::Result<Self> {
        let mut pg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| anyhow::anyhow!("database.url is not a valid connection string: {e}"))?;
        let timeout = Duration::from_secs(settings.connect_timeout_secs);
        pg.connect_timeout(timeout);
        let node: u64 = rand::random();
        pg.application_name(format!("nanochat-{node:016x}"));
        // Reads plan every execution with its parameters and today's statistics. A generic
        // plan is fixed once per connection, and one made while the day's partition was still
        // empty (every midnight, or a fresh database) can stay bad for the connection's life.
        // Write transactions set their own options (`WRITER_BEGIN`).
        let options = match pg.get_options() {
            Some(theirs) => format!("{theirs} -c plan_cache_mode=force_custom_plan"),
            None => "-c plan_cache_mode=force_custom_plan".to_owned(),
        };
        pg.options(options);
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()?;
        let mut store = Self {
            pool,
            retention,
            url: url.to_owned(),
            node,
            day_keys: Arc::default(),
            // Replaced by the database's key once migrated.
            digest_mac: Arc::new(Hmac::new_from_slice(&[]).expect("any key length")),
            marks_from: i64::MAX,
        };
        // Bounded retry: a database that comes up a few seconds after us is fine; one that
        // does not answer at all stops the start with a clear message.
        let mut delay = Duration::from_millis(250);
        let mut attempt = 1;
        loop {
            match store.migrate().await {
                Ok(()) => break,
                Err(e) if attempt < 5 && e.downcast_ref::<StoreError>().is_some() => {
                    tracing::warn!(attempt, error = %e, "database not reachable yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e.context("cannot prepare the Postgres database")),
            }
        }
        store.marks_from = store.read_marks_from().await?;
        store.digest_mac = Arc::new(store.read_digest_key().await?);
        store.ensure_partitions(super::now_ms()).await?;
        Ok(store)
    }

    /// Apply pending migrations under an advisory lock.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
            .await
            .map_err(pg_err)?;
        let result = async {
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (
                         version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
                )
                .await?;
            let current: i32 = client
                .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])
                .await?
                .get(0);
            if current as usize > MIGRATIONS.len() {
                anyhow::bail!(
                    "the database schema is version {current}, newer than this binary knows ({}); \
                     run a newer nanochat",
                    MIGRATIONS.len()
                );
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
                let version = i + 1;
                // A migration locks tables every write uses, and while it waited for a lock
                // held elsewhere (a dump, a long query) every node's writes would wait behind
                // it: it gives way instead, and this start waits. (The statement is the
                // binary's own SQL and an integer.)
                let sql = format!(
                    "{sql}\n;INSERT INTO schema_migrations (version) VALUES ({version})"
                );
                let started = std::time::Instant::now();
                while !try_ddl(&mut client, &sql).await? {
                    tracing::warn!(
                        version,
                        waited_secs = started.elapsed().as_secs(),
                        "the Postgres migration waits for tables in use elsewhere \
                         (a dump or a long query); the other servers' writes go on"
                    );
                    tokio::time::sleep(MIGRATION_RETRY_REST).await;
                }
                tracing::info!(version, "applied Postgres migration");
            }
            Ok(())
        }
        .await;
        let _ = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK])
            .await;
        result
    }

    /// The first day whose early messages are marked (`early_marks`, written by migration 5).
    async fn read_marks_from(&self) -> Result<i64, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let from: i32 = client
            .query_one("SELECT from_day FROM early_marks", &[])
            .await
            .map_err(pg_err)?
            .get(0);
        Ok(i64::from(from))
    }

    /// The database's replay digest key (written by migration 6), keyed into a MAC.
    async fn read_digest_key(&self) -> Result<Hmac<Sha256>, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let key: Vec<u8> = client
            .query_one(
                "SELECT value FROM server_identity WHERE key = 'replay_digest'",
                &[],
            )
            .await
            .map_err(pg_err)?
            .get(0);
        if key.len() < 16 {
            return Err(StoreError::Unavailable(
                "server_identity.replay_digest is shorter than 16 bytes".to_owned(),
            ));
        }
        Ok(Hmac::new_from_slice(&key).expect("any key length"))
    }

    /// A pair's replay digest: the first 8 bytes of HMAC-SHA256(key, room_id || iv).
    pub fn replay_digest(&self, room: &RoomId, iv: &[u8]) -> i64 {
        let mut mac = Hmac::clone(&self.digest_mac);
        mac.update(&room[..]);
        mac.update(iv);
        let tag = mac.finalize().into_bytes();
        i64::from_be_bytes(tag[..8].try_into().expect("a 32-byte tag"))
    }

    /// The day before `epoch`'s, when a message of that epoch sent at `now` must look there
    /// for an earlier copy only if its room's row marks that day or a later one: the day is in
    /// the window, before today, and its early messages are marked.
    fn marked_early_day(&self, epoch: u32, now: Millis) -> Option<i64> {
        let day = i64::from(epoch) - 1;
        let today = now.div_euclid(EPOCH_MS);
        (replay_window_start(epoch, now) == day * EPOCH_MS && day < today && day >= self.marks_from)
            .then_some(day)
    }

    /// Create the partitions from yesterday to a few days ahead; returns how many were new.
    pub async fn ensure_partitions(&self, now: Millis) -> Result<u64, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let today = now.div_euclid(EPOCH_MS);
        let mut created = 0;
        for day in today - 1..=today + PARTITIONS_AHEAD {
            if day * EPOCH_MS + EPOCH_MS <= self.retention.message_cutoff(now) {
                continue;
            }
            let name = partition_name(day);
            let exists = client
                .query_opt("SELECT 1 FROM pg_class WHERE relname = $1", &[&name])
                .await
                .map_err(pg_err)?
                .is_some();
            if exists {
                continue;
            }
            let from = ms_literal(day * EPOCH_MS);
            let to = ms_literal((day + 1) * EPOCH_MS);
            // Identifiers and bounds come from integers formatted here, never from input. One
            // query, so one transaction: a partition never exists without its replay key.
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {name} PARTITION OF messages
                 FOR VALUES FROM ('{from}') TO ('{to}'); {}",
                digest_key(&name)
            );
            match try_ddl(&mut client, &sql).await {
                Ok(true) => created += 1,
                Ok(false) if day > today => tracing::warn!(
                    partition = %name,
                    "messages is in use (a dump or a long query); \
                     this partition ahead is left for the next maintenance run"
                ),
                Ok(false) => {
                    return Err(StoreError::Unavailable(format!(
                        "cannot create partition {name}: messages is in use (a dump or a long query)"
                    )));
                }
                // Another process created it between our check and now.
                Err(e) if e.code() == Some(&SqlState::DUPLICATE_TABLE) => {}
                Err(e) => return Err(pg_err(e)),
            }
        }
        // A partition made by a binary older than schema version 4 (still running beside a
        // newer one) has no replay key: give it one, unique unless it holds a repeat.
        let bare = client
            .query(
                "SELECT c.relname::text FROM pg_class c
                 WHERE c.relname = ANY($1) AND c.relkind = 'r' AND NOT EXISTS (
                     SELECT 1 FROM pg_class i
                     WHERE i.relname IN (c.relname || '_iv', c.relname || '_rk'))",
                &[&nearby_partitions(now, 1)],
            )
            .await
            .map_err(pg_err)?;
        for row in bare {
            let name: String = row.get(0);
            let Some(day) = partition_day(&name) else {
                continue;
            };
            let name = partition_name(day);
            let unique = client.batch_execute(&replay_key(&name, true)).await;
            let made = match unique {
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => client
                    .batch_execute(&replay_key(&name, false))
                    .await
                    .map(|()| "plain"),
                other => other.map(|()| "unique"),
            };
            match made {
                Ok(kind) => {
                    tracing::warn!(partition = %name, kind, "gave a partition its replay key")
                }
                Err(e) => {
                    tracing::warn!(partition = %name, error = %e, "could not index a partition's replay keys")
                }
            }
        }
        self.read_day_keys(&client, now).await.map_err(pg_err)?;
        Ok(created)
    }

    /// Read from the catalog how the partitions of the replay window (three days back) and
    /// ahead keep their replay keys.
    async fn read_day_keys(
        &self,
        client: &tokio_postgres::Client,
        now: Millis,
    ) -> Result<(), tokio_postgres::Error> {
        let rows = client
            .query(
                "SELECT c.relname::text, bool_or(i.relname = c.relname || '_iv'),
                        bool_or(i.relname = c.relname || '_rk'),
                        bool_or(i.relname = c.relname || '_iv' AND x.indisunique)
                 FROM pg_index x
                 JOIN pg_class i ON i.oid = x.indexrelid
                 JOIN pg_class c ON c.oid = x.indrelid
                 WHERE c.relname = ANY($1) AND x.indisvalid
                   AND i.relname IN (c.relname || '_iv', c.relname || '_rk')
                 GROUP BY c.relname",
                &[&nearby_partitions(now, 3)],
            )
            .await?;
        let mut known = KnownDays {
            read_at: Some(now),
            ..KnownDays::default()
        };
        for row in &rows {
            let Some(day) = partition_day(row.get::<_, &str>(0)) else {
                continue;
            };
            let (pairs, digests, pairs_unique): (bool, bool, bool) =
                (row.get(1), row.get(2), row.get(3));
            // A partition with both keys (given its `_iv` by a version 5 node) may hold rows
            // without digests: only a unique `_iv` refuses every repeat there.
            if pairs_unique || (digests && !pairs) {
                known.unique.insert(day);
            }
            if digests && !pairs {
                known.digests.insert(day);
            }
        }
        *self
            .day_keys
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = known;
        Ok(())
    }

    /// The days around `now` whose partitions are looked into by digest.
    fn digest_days(&self) -> HashSet<i64> {
        self.day_keys
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .digests
            .clone()
    }

    /// Whether a batch written at `now` may leave the day it is written to out of its replay
    /// lookup: that day's partition is known to keep its pairs unique, and no repeat was
    /// refused in the last minute. Reads the catalog (on the batch's own connection, before
    /// its transaction) when the day is not known and the last read is a minute old.
    async fn skips_own_day(&self, client: &tokio_postgres::Client, now: Millis) -> bool {
        if now < self.day_keys.look_everywhere_until.load(Ordering::Relaxed) {
            return false;
        }
        let day = now.div_euclid(EPOCH_MS);
        {
            let known = self
                .day_keys
                .known
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if known.unique.contains(&day) {
                return true;
            }
            if known
                .read_at
                .is_some_and(|at| (now - at).abs() < RECHECK_MS)
            {
                return false;
            }
        }
        match self.read_day_keys(client, now).await {
            Ok(()) => self
                .day_keys
                .known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .unique
                .contains(&day),
            Err(e) => {
                tracing::warn!(error = %e, "could not read which partitions have replay keys");
                false
            }
        }
    }

    /// Names of the message partitions that exist, oldest first.
    pub async fn partitions(&self) -> Result<Vec<String>, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let rows = client
            .query(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = 'messages'::regclass ORDER BY c.relname",
                &[],
            )
            .await
            .map_err(pg_err)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// One batch in two round trips. The transaction is driven by hand so its statements can
    /// be pipelined: `append` rolls back after an error and keeps a connection left inside a
    /// transaction (a cancelled call) out of the pool.
    async fn append_once(
        &self,
        client: &deadpool_postgres::Client,
        batch: &[NewMessage],
        now: Millis,
        skip_own_day: bool,
        write_digests: bool,
    ) -> Result<Vec<AppendOutcome>, tokio_postgres::Error> {
        // Every statement is prepared once per connection (deadpool's statement cache) and,
        // under `WRITER_BEGIN`, planned once too.
        let lock_rooms = client.prepare_cached(LOCK_ROOMS).await?;
        let find = Lookups {
            pairs: client.prepare_cached(FIND_REPLAYS).await?,
            digests: client.prepare_cached(FIND_DIGESTS).await?,
            digest_days: self.digest_days(),
        };
        let write = client.prepare_cached(WRITE_BATCH).await?;
        let room_col: Vec<&[u8]> = batch.iter().map(|m| &m.room[..]).collect();
        let mut rooms = room_col.clone();
        rooms.sort_unstable();
        rooms.dedup();
        let iv_col: Vec<&[u8]> = batch.iter().map(|m| &m.iv[..]).collect();
        let digests: Vec<i64> = batch
            .iter()
            .map(|m| self.replay_digest(&m.room, &m.iv))
            .collect();
        // First round trip: BEGIN, lock the rooms, look for replays. Postgres runs pipelined
        // statements one after the other and the lookup takes its snapshot when it starts, so
        // it runs with the locks held and sees every message another process committed to
        // these rooms before us. The replay window starts as far back as the oldest epoch in
        // the batch allows (usually yesterday: two partitions, not four) and ends a minute
        // from now: another node's clock may run a little ahead of ours, and the partitions
        // made ahead are left out. With `skip_own_day`, the day the batch is written to is
        // left out too: its partition's unique key refuses a repeat at the insert. Each day is
        // looked into by the key its partition keeps (by digest since schema version 6). A window's
        // first day, the day before the message's epoch, holds a copy only if it was sent early
        // there; when such days are marked on the room rows, it is left out here and looked
        // into below for the rooms whose rows say so (none, nearly always): most batches then
        // read no other day's index at all.
        let since = batch
            .iter()
            .map(|m| {
                let start = replay_window_start(m.epoch, now);
                match self.marked_early_day(m.epoch, now) {
                    Some(_) => start + EPOCH_MS,
                    None => start,
                }
            })
            .min()
            .unwrap_or(now);
        let day_start = now.div_euclid(EPOCH_MS) * EPOCH_MS;
        let skip_end = if skip_own_day {
            day_start + EPOCH_MS
        } else {
            day_start
        };
        let window = [
            (since, day_start.max(since)),
            (skip_end.max(since), now + 60_001),
        ];
        let lock_params: [&(dyn ToSql + Sync); 1] = [&rooms];
        let (begun, locked, found) = futures_util::join!(
            client.batch_execute(WRITER_BEGIN),
            client.query(&lock_rooms, &lock_params),
            find.stored(client, &room_col, &iv_col, &digests, &window),
        );
        begun?;
        let (locked, mut stored_ivs) = (locked?, found?);
        let mut last_seq = HashMap::new();
        let mut early_day = HashMap::new();
        for row in &locked {
            let Ok(id) = RoomId::try_from(row.get::<_, &[u8]>(0)) else {
                continue;
            };
            last_seq.insert(id, row.get::<_, i64>(1));
            if let Some(day) = row.get::<_, Option<i32>>(2) {
                early_day.insert(id, i64::from(day));
            }
        }
        // The rooms locked now: their marks are final. Those that stored a message sent early
        // on a day left out above look into it.
        let (mut early_rooms, mut early_ivs, mut early_digests) =
            (Vec::new(), Vec::new(), Vec::new());
        let mut early_from = since;
        for (m, digest) in batch.iter().zip(&digests) {
            if let Some(day) = self.marked_early_day(m.epoch, now)
                && day * EPOCH_MS < since
                && early_day.get(&m.room).is_some_and(|&marked| marked >= day)
            {
                early_rooms.push(&m.room[..]);
                early_ivs.push(&m.iv[..]);
                early_digests.push(*digest);
                early_from = early_from.min(day * EPOCH_MS);
            }
        }
        if !early_rooms.is_empty() {
            // From the earliest such day up to where the first lookup began.
            let early = [(early_from, since)];
            let found = find
                .stored(client, &early_rooms, &early_ivs, &early_digests, &early)
                .await?;
            stored_ivs.extend(found);
        }
        let outcomes = assign_seqs(batch, &mut last_seq, &stored_ivs);
        let mut rooms_w = Vec::new();
        let mut seqs = Vec::new();
        let mut epochs = Vec::new();
        let mut ivs = Vec::new();
        let mut cts = Vec::new();
        let mut digests_w = Vec::new();
        for ((m, o), digest) in batch.iter().zip(&outcomes).zip(&digests) {
            if let AppendOutcome::Stored { seq } = o {
                rooms_w.push(&m.room[..]);
                seqs.push(*seq);
                epochs.push(m.epoch as i32);
                ivs.push(&m.iv[..]);
                cts.push(&m.ct[..]);
                digests_w.push(write_digests.then_some(*digest));
            }
        }
        if rooms_w.is_empty() {
            client.batch_execute("COMMIT").await?;
            return Ok(outcomes);
        }
        let at = ts(now);
        // Rooms that stored a message sent early (its epoch ahead of today) are marked today.
        let today = now.div_euclid(EPOCH_MS);
        let sent_early: HashSet<RoomId> = batch
            .iter()
            .zip(&outcomes)
            .filter(|(m, o)| {
                matches!(o, AppendOutcome::Stored { .. }) && i64::from(m.epoch) > today
            })
            .map(|(m, _)| m.room)
            .collect();
        let (mut ids, mut lasts, mut marks) = (Vec::new(), Vec::new(), Vec::new());
        for (id, last) in &last_seq {
            ids.push(&id[..]);
            lasts.push(*last);
            marks.push(sent_early.contains(id).then_some(today as i32));
        }
        // Announce the stored ranges to the other processes; delivered only on commit.
        let stored = batch.iter().zip(&outcomes).filter_map(|(m, o)| match o {
            AppendOutcome::Stored { seq } => Some((m.room, *seq)),
            _ => None,
        });
        let payloads = crate::cluster::message_payloads(self.node, &crate::cluster::ranges(stored));
        // Second round trip: insert, room update and notification in one statement, then
        // COMMIT. If the write fails, the transaction is aborted and COMMIT only rolls back.
        let write_params: [&(dyn ToSql + Sync); 12] = [
            &rooms_w,
            &seqs,
            &at,
            &epochs,
            &ivs,
            &cts,
            &ids,
            &lasts,
            &crate::cluster::CHANNEL,
            &payloads,
            &marks,
            &digests_w,
        ];
        let (written, committed) = futures_util::join!(
            client.execute(&write, &write_params),
            client.batch_execute("COMMIT"),
        );
        written?;
        committed?;
        Ok(outcomes)
    }
}

/// A batch's replay lookups on one connection: the two statements, and which days are looked
/// into by digest.
struct Lookups {
    pairs: tokio_postgres::Statement,
    digests: tokio_postgres::Statement,
    digest_days: HashSet<i64>,
}

impl Lookups {
    /// The batch's pairs (`rooms[i]`, `ivs[i]`, digest `digests[i]`) already stored within
    /// `window` (ranges in ms, ends excluded): one statement per two runs of days looked into
    /// the same way, all sent at once (none for an empty window).
    async fn stored(
        &self,
        client: &tokio_postgres::Client,
        rooms: &[&[u8]],
        ivs: &[&[u8]],
        digests: &[i64],
        window: &[(Millis, Millis)],
    ) -> Result<HashSet<(RoomId, [u8; 12])>, tokio_postgres::Error> {
        let [by_pair, by_digest] = split_by_key(window, &self.digest_days);
        // The pair statement takes the first six parameters, the digest one all seven.
        let statements = [(&self.pairs, 6, by_pair), (&self.digests, 7, by_digest)];
        let bounds: Vec<(&tokio_postgres::Statement, usize, [SystemTime; 4])> = statements
            .iter()
            .flat_map(|&(statement, n, ref runs)| {
                runs.chunks(2).map(move |two| {
                    let (a, b) = (two[0], two.get(1).copied().unwrap_or((0, 0)));
                    (statement, n, [ts(a.0), ts(a.1), ts(b.0), ts(b.1)])
                })
            })
            .collect();
        let queries = bounds.iter().map(|(statement, n, t)| {
            let params: [&(dyn ToSql + Sync); 7] =
                [&rooms, &ivs, &t[0], &t[1], &t[2], &t[3], &digests];
            let query: BoxFuture<'_, _> =
                Box::pin(async move { client.query(*statement, &params[..*n]).await });
            query
        });
        let found = futures_util::future::try_join_all(queries).await?;
        Ok(found
            .iter()
            .flatten()
            .filter_map(|r| {
                let room: &[u8] = r.get(0);
                let iv: &[u8] = r.get(1);
                Some((room.try_into().ok()?, iv.try_into().ok()?))
            })
            .collect())
    }
}

/// `window`'s ranges (ms, ends excluded) cut at UTC days and sorted by how each day is looked
/// into: `[by pair, by digest]`, adjacent days of one kind joined, empty ranges left out.
fn split_by_key(
    window: &[(Millis, Millis)],
    digest_days: &HashSet<i64>,
) -> [Vec<(Millis, Millis)>; 2] {
    let mut runs: [Vec<(Millis, Millis)>; 2] = [Vec::new(), Vec::new()];
    for &(from, to) in window {
        let mut at = from;
        while at < to {
            let day = at.div_euclid(EPOCH_MS);
            let end = to.min((day + 1) * EPOCH_MS);
            let kind = &mut runs[usize::from(digest_days.contains(&day))];
            match kind.last_mut() {
                Some(last) if last.1 == at => last.1 = end,
                _ => kind.push((at, end)),
            }
            at = end;
        }
    }
    runs
}

fn ms_literal(ms: Millis) -> String {
    let day = ms.div_euclid(EPOCH_MS);
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02} 00:00:00+00")
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn cluster(&self) -> Option<crate::cluster::ClusterInfo> {
        Some(crate::cluster::ClusterInfo {
            url: self.url.clone(),
            node: self.node,
        })
    }

    fn pool_stats(&self) -> Option<super::PoolStats> {
        let s = self.pool.status();
        Some(super::PoolStats {
            max: s.max_size,
            open: s.size,
            idle: s.available,
            waiting: s.waiting,
        })
    }

    async fn usage(&self) -> Result<StorageUsage, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let bytes: i64 = client
            .query_one("SELECT pg_database_size(current_database())", &[])
            .await
            .map_err(pg_err)?
            .get(0);
        let bytes = u64::try_from(bytes).unwrap_or(0);
        Ok(StorageUsage {
            database_bytes: bytes,
            used_bytes: bytes,
            volume: None,
        })
    }

    async fn ready(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let version: i32 = client
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )
            .await
            .map_err(pg_err)?
            .get(0);
        if version as usize == MIGRATIONS.len() {
            Ok(())
        } else {
            Err(StoreError::Unavailable(format!(
                "schema version {version}, expected {}",
                MIGRATIONS.len()
            )))
        }
    }

    async fn create_room(
        &self,
        room: &RoomId,
        auth_wrapped: &[u8],
        now: Millis,
    ) -> Result<CreateOutcome, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let idle_cutoff = ts(self.retention.message_cutoff(now));
        let tomb_cutoff = ts(now - self.retention.tombstone_ms);
        let at = ts(now);
        // See the SQLite backend: an expired room or tombstone is replaced in place.
        let changed = client
            .execute(
                "INSERT INTO rooms (id, auth_wrapped, created_at, last_active, last_seq)
                 VALUES ($1, $2, $3, $3, 0)
                 ON CONFLICT (id) DO UPDATE SET auth_wrapped = excluded.auth_wrapped,
                     created_at = excluded.created_at, last_active = excluded.last_active,
                     wiped_at = NULL
                 WHERE (rooms.wiped_at IS NULL AND rooms.last_active < $4)
                    OR (rooms.wiped_at IS NOT NULL AND rooms.wiped_at < $5)",
                &[&&room[..], &auth_wrapped, &at, &idle_cutoff, &tomb_cutoff],
            )
            .await
            .map_err(pg_err)?;
        if changed == 1 {
            return Ok(CreateOutcome::Created);
        }
        let row = client
            .query_opt(
                "SELECT wiped_at IS NOT NULL FROM rooms WHERE id = $1",
                &[&&room[..]],
            )
            .await
            .map_err(pg_err)?;
        Ok(match row {
            Some(r) if r.get::<_, bool>(0) => CreateOutcome::Gone,
            _ => CreateOutcome::Exists,
        })
    }

    async fn room(&self, room: &RoomId, now: Millis) -> Result<Option<RoomRecord>, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let stmt = client
            .prepare_cached("SELECT auth_wrapped, last_active, wiped_at FROM rooms WHERE id = $1")
            .await
            .map_err(pg_err)?;
        let row = client
            .query_opt(&stmt, &[&&room[..]])
            .await
            .map_err(pg_err)?;
        Ok(row.and_then(|r| {
            let auth_wrapped: Vec<u8> = r.get(0);
            let last_active = ms(r.get(1));
            let wiped_at: Option<SystemTime> = r.get(2);
            match wiped_at.map(ms) {
                Some(at) if at >= now - self.retention.tombstone_ms => Some(RoomRecord {
                    auth_wrapped,
                    wiped: true,
                }),
                Some(_) => None,
                None if last_active >= self.retention.message_cutoff(now) => Some(RoomRecord {
                    auth_wrapped,
                    wiped: false,
                }),
                None => None,
            }
        }))
    }

    async fn append(
        &self,
        batch: &[NewMessage],
        now: Millis,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        let guard = InTransaction(Some(self.pool.get().await.map_err(pool_err)?));
        let client = guard.0.as_ref().expect("held until the end");
        let attempt = |skip_own_day: bool, write_digests: bool| async move {
            let result = self
                .append_once(client, batch, now, skip_own_day, write_digests)
                .await;
            if result.is_err() {
                // Leave the connection outside any transaction (a harmless warning if the
                // failed COMMIT already ended it).
                let _ = client.batch_execute("ROLLBACK").await;
            }
            result
        };
        let mut skip_own_day = self.skips_own_day(client, now).await;
        let mut write_digests = true;
        let mut partitions_made = false;
        // At most four attempts: a failed one stored nothing.
        let result = loop {
            let result = attempt(skip_own_day, write_digests).await;
            match &result {
                Err(e) if !partitions_made && e.code() == Some(&SqlState::CHECK_VIOLATION) => {
                    // No partition for today (maintenance has not run for days): create it
                    // and retry.
                    tracing::warn!("no message partition for the current day; creating it");
                    self.ensure_partitions(now).await?;
                    partitions_made = true;
                    skip_own_day = self.skips_own_day(client, now).await;
                }
                Err(e) if skip_own_day && refused_by(e).is_some() => {
                    // A repeat of a message stored today: look into every day for a while, and
                    // redo the batch that way so the repeat is answered `replay` and the rest
                    // is stored.
                    self.day_keys
                        .look_everywhere_until
                        .store(now + RECHECK_MS, Ordering::Relaxed);
                    skip_own_day = false;
                }
                Err(e) if write_digests && refused_by(e) == Some("_rk") => {
                    // Refused by digest although no stored pair matched: two different pairs
                    // with one digest (at 100 million messages a day, about once in ten
                    // years). Store the batch without digests; its messages are still looked
                    // into by pair on days kept that way, and a repeat of one of them on a day
                    // kept by digest is not seen.
                    tracing::warn!(
                        "two messages share a replay digest; storing a batch without digests"
                    );
                    write_digests = false;
                }
                _ => break result,
            }
        };
        guard.release();
        result.map_err(pg_err)
    }

    async fn messages(
        &self,
        room: &RoomId,
        query: HistoryQuery,
        limit: u32,
        now: Millis,
    ) -> Result<Page, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let (sql, bound) = match query {
            HistoryQuery::Latest => (
                "SELECT seq, created_at, epoch, iv, ct FROM messages
                 WHERE room_id = $1 AND created_at >= $2 AND seq < $3
                 ORDER BY seq DESC LIMIT $4",
                i64::MAX,
            ),
            HistoryQuery::Before(b) => (
                "SELECT seq, created_at, epoch, iv, ct FROM messages
                 WHERE room_id = $1 AND created_at >= $2 AND seq < $3
                 ORDER BY seq DESC LIMIT $4",
                b,
            ),
            HistoryQuery::After(a) => (
                "SELECT seq, created_at, epoch, iv, ct FROM messages
                 WHERE room_id = $1 AND created_at >= $2 AND seq > $3
                 ORDER BY seq ASC LIMIT $4",
                a,
            ),
        };
        let stmt = client.prepare_cached(sql).await.map_err(pg_err)?;
        let rows = client
            .query(
                &stmt,
                &[
                    &&room[..],
                    &ts(self.retention.message_cutoff(now)),
                    &bound,
                    &(limit as i64 + 1),
                ],
            )
            .await
            .map_err(pg_err)?;
        let messages = rows.iter().map(|r| stored_message(r, 0)).collect();
        Ok(finish_page(messages, limit, query))
    }

    async fn messages_in_ranges(
        &self,
        ranges: &[(RoomId, i64, i64)],
        now: Millis,
    ) -> Result<Vec<(RoomId, StoredMessage)>, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let stmt = client.prepare_cached(READ_RANGES).await.map_err(pg_err)?;
        let rooms: Vec<&[u8]> = ranges.iter().map(|r| &r.0[..]).collect();
        let firsts: Vec<i64> = ranges.iter().map(|r| r.1).collect();
        let lasts: Vec<i64> = ranges.iter().map(|r| r.2).collect();
        // Announced messages were stored moments ago: the day before and after now bound the
        // partitions read (and allow for clocks that differ between processes).
        let (from, to) = (ts(now - EPOCH_MS), ts(now + EPOCH_MS));
        let rows = client
            .query(&stmt, &[&rooms, &firsts, &lasts, &from, &to])
            .await
            .map_err(pg_err)?;
        Ok(room_messages(&rows))
    }

    async fn messages_after(
        &self,
        rooms: &[(RoomId, i64)],
        limit: u32,
        now: Millis,
    ) -> Result<Vec<(RoomId, StoredMessage)>, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let stmt = client.prepare_cached(READ_AFTER).await.map_err(pg_err)?;
        let ids: Vec<&[u8]> = rooms.iter().map(|r| &r.0[..]).collect();
        let afters: Vec<i64> = rooms.iter().map(|r| r.1).collect();
        let from = ts(self.retention.message_cutoff(now));
        let rows = client
            .query(&stmt, &[&ids, &afters, &from, &i64::from(limit)])
            .await
            .map_err(pg_err)?;
        Ok(room_messages(&rows))
    }

    async fn wiped_rooms(&self, rooms: &[RoomId], now: Millis) -> Result<Vec<RoomId>, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let stmt = client
            .prepare_cached(
                "SELECT r.id FROM unnest($1::bytea[]) WITH ORDINALITY AS r(id, n)
                 JOIN rooms USING (id) WHERE rooms.wiped_at >= $2 ORDER BY r.n",
            )
            .await
            .map_err(pg_err)?;
        let ids: Vec<&[u8]> = rooms.iter().map(|r| &r[..]).collect();
        let since = ts(now - self.retention.tombstone_ms);
        let rows = client.query(&stmt, &[&ids, &since]).await.map_err(pg_err)?;
        Ok(rows
            .iter()
            .filter_map(|r| r.get::<_, &[u8]>(0).try_into().ok())
            .collect())
    }

    async fn wipe(&self, room: &RoomId, now: Millis) -> Result<bool, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let wiped = tx
            .execute(
                "UPDATE rooms SET wiped_at = $2 WHERE id = $1 AND wiped_at IS NULL",
                &[&&room[..], &ts(now)],
            )
            .await
            .map_err(pg_err)?;
        tx.execute("DELETE FROM messages WHERE room_id = $1", &[&&room[..]])
            .await
            .map_err(pg_err)?;
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[
                &crate::cluster::CHANNEL,
                &crate::cluster::wipe_payload(self.node, room),
            ],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        Ok(wiped == 1)
    }

    async fn rooms_created_since(&self, since: Millis) -> Result<Option<u64>, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM rooms WHERE created_at >= $1",
                &[&ts(since)],
            )
            .await
            .map_err(pg_err)?
            .get(0);
        Ok(Some(n as u64))
    }

    async fn check_secret(&self, check: &[u8; 32]) -> Result<bool, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        client
            .execute(
                "INSERT INTO server_identity (key, value) VALUES ('secret_check', $1)
                 ON CONFLICT (key) DO NOTHING",
                &[&&check[..]],
            )
            .await
            .map_err(pg_err)?;
        let stored: Vec<u8> = client
            .query_one(
                "SELECT value FROM server_identity WHERE key = 'secret_check'",
                &[],
            )
            .await
            .map_err(pg_err)?
            .get(0);
        Ok(stored == check)
    }

    async fn redeem_token(
        &self,
        nonce: &[u8; 16],
        expires: Millis,
        _now: Millis,
    ) -> Result<bool, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let inserted = client
            .execute(
                "INSERT INTO pow_spent (nonce, expires_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&&nonce[..], &ts(expires)],
            )
            .await
            .map_err(pg_err)?;
        Ok(inserted == 1)
    }

    async fn maintain(&self, now: Millis) -> Result<MaintenanceReport, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_err)?;
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&MAINTAIN_LOCK])
            .await
            .map_err(pg_err)?
            .get(0);
        if !locked {
            return Ok(MaintenanceReport::default());
        }
        let result = async {
            let mut report = MaintenanceReport {
                ran: true,
                ..Default::default()
            };
            report.partitions_created = self.ensure_partitions(now).await?;
            let cutoff = self.retention.message_cutoff(now);
            for name in self.partitions().await? {
                let Some(day) = partition_day(&name) else {
                    continue;
                };
                // Every row of day D is older than the retention once D + 1 is.
                if (day + 1) * EPOCH_MS <= cutoff {
                    let drop = format!("DROP TABLE IF EXISTS {name}");
                    if try_ddl(&mut client, &drop).await.map_err(pg_err)? {
                        report.partitions_dropped += 1;
                        tracing::info!(partition = %name, "dropped expired message partition");
                    } else {
                        report.partitions_deferred += 1;
                        tracing::warn!(
                            partition = %name,
                            "expired message partition is in use (a vacuum or a long query); \
                             its drop is left for the next maintenance run"
                        );
                    }
                }
            }
            report.rooms_deleted = client
                .execute(
                    "DELETE FROM rooms WHERE wiped_at IS NULL AND last_active < $1",
                    &[&ts(cutoff)],
                )
                .await
                .map_err(pg_err)?;
            report.tombstones_deleted = client
                .execute(
                    "DELETE FROM rooms WHERE wiped_at IS NOT NULL AND wiped_at < $1",
                    &[&ts(now - self.retention.tombstone_ms)],
                )
                .await
                .map_err(pg_err)?;
            client
                .execute("DELETE FROM pow_spent WHERE expires_at < $1", &[&ts(now)])
                .await
                .map_err(pg_err)?;
            report.partitions_present = Some(self.partitions().await?.len() as u64);
            Ok(report)
        }
        .await;
        let _ = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MAINTAIN_LOCK])
            .await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_round_trip_through_days() {
        assert_eq!(partition_name(0), "messages_p19700101");
        assert_eq!(partition_name(20_417), "messages_p20251125");
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        for day in [0, 59, 365, 11_016, 19_000, 20_417, 30_000] {
            assert_eq!(partition_day(&partition_name(day)), Some(day), "day {day}");
        }
        assert_eq!(partition_day("messages_default"), None);
        assert_eq!(partition_day("messages_p20250230"), None);
        assert_eq!(partition_day("messages_p20251131"), None);
        assert_eq!(days_from_civil(2000, 2, 29), Some(11_016));
        assert_eq!(days_from_civil(2001, 2, 29), None);
        assert_eq!(days_from_civil(1969, 12, 31), Some(-1));
        assert_eq!(days_from_civil(2026, 13, 1), None);
        for day in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), Some(day));
        }
        assert_eq!(crate::crypto::epoch_of(20_417 * EPOCH_MS), 20_417);
    }

    #[test]
    fn a_replay_window_splits_at_days_by_how_each_is_looked_into() {
        let day = |d: i64, ms: i64| d * EPOCH_MS + ms;
        // Days 10 and 11 by pair, 12 and 13 by digest; the window skips from day 11 noon to
        // day 12 noon (the day written to), and runs on a minute into day 13.
        let digests: HashSet<i64> = [12, 13].into();
        let window = [
            (day(10, 0), day(11, 43_200_000)),
            (day(12, 43_200_000), day(13, 60_000)),
        ];
        let [pairs, by_digest] = split_by_key(&window, &digests);
        assert_eq!(pairs, vec![(day(10, 0), day(11, 43_200_000))]);
        assert_eq!(by_digest, vec![(day(12, 43_200_000), day(13, 60_000))]);
        // Kinds alternating day by day give a run per day; empty ranges none.
        let odd: HashSet<i64> = [11].into();
        let [pairs, by_digest] =
            split_by_key(&[(day(10, 5), day(12, 5)), (day(9, 0), day(9, 0))], &odd);
        assert_eq!(
            pairs,
            vec![(day(10, 5), day(11, 0)), (day(12, 0), day(12, 5))]
        );
        assert_eq!(by_digest, vec![(day(11, 0), day(12, 0))]);
        let [pairs, by_digest] = split_by_key(&[], &odd);
        assert!(pairs.is_empty() && by_digest.is_empty());
    }
}
