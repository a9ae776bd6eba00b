//! Durable storage behind one trait, [`Store`], with two backends: embedded SQLite (the
//! default) and Postgres (when `database.url` is set). Both pass one conformance suite
//! (`tests/it/store.rs`).
//!
//! Every method takes "now" as a parameter instead of reading the clock, so retention, expiry
//! and partition maintenance can be tested by moving time. The group-commit [`writer`] sits on
//! top of [`Store::append`] and is shared by both backends.

pub mod postgres;
pub mod sqlite;
pub mod writer;

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::Settings;
use crate::crypto::{EPOCH_MS, IV_LEN, RoomId};
use crate::protocol::HistoryQuery;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// The current time in milliseconds since the Unix epoch.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// How long things live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Messages older than this are never returned and are deleted; rooms without a message
    /// for this long are deleted.
    pub message_ms: Millis,
    /// Tombstones of wiped rooms live this long.
    pub tombstone_ms: Millis,
}

impl Retention {
    /// From the `[retention]` settings.
    pub fn from_days(days: u32, tombstone_days: u32) -> Self {
        Self {
            message_ms: days as Millis * EPOCH_MS,
            tombstone_ms: tombstone_days as Millis * EPOCH_MS,
        }
    }

    /// Oldest creation time still visible at `now`.
    pub fn message_cutoff(&self, now: Millis) -> Millis {
        now - self.message_ms
    }
}

/// A message to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// Room id.
    pub room: RoomId,
    /// Epoch of the message key.
    pub epoch: u32,
    /// AES-GCM IV; unique within a room.
    pub iv: [u8; IV_LEN],
    /// Ciphertext with tag.
    pub ct: Vec<u8>,
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Position in the room.
    pub seq: i64,
    /// Server time of storage.
    pub ts: Millis,
    /// Epoch of the message key.
    pub epoch: u32,
    /// AES-GCM IV.
    pub iv: Vec<u8>,
    /// Ciphertext with tag.
    pub ct: Vec<u8>,
}

impl From<&StoredMessage> for crate::protocol::WireMsg {
    fn from(m: &StoredMessage) -> Self {
        Self {
            seq: m.seq,
            ts: m.ts,
            epoch: m.epoch,
            iv: crate::protocol::b64u(&m.iv),
            ct: crate::protocol::b64u(&m.ct),
        }
    }
}

/// A page of messages in ascending `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    /// The messages.
    pub messages: Vec<StoredMessage>,
    /// Whether more messages exist in the direction of the query.
    pub more: bool,
}

/// What the store knows about a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRecord {
    /// The auth key wrapped with the server's wrap key.
    pub auth_wrapped: Vec<u8>,
    /// Whether the room was wiped (a tombstone).
    pub wiped: bool,
}

/// Result of creating a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    /// Created.
    Created,
    /// A live room with this id exists.
    Exists,
    /// A tombstone refuses re-creation.
    Gone,
}

/// Result of storing one message of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Committed with this sequence number.
    Stored {
        /// Assigned sequence number.
        seq: i64,
    },
    /// The room already stores a message with this IV.
    Replay,
    /// The room was wiped or no longer exists.
    RoomGone,
}

/// What a maintenance run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// Whether this process ran it (false: another process holds the maintenance lock).
    pub ran: bool,
    /// Partitions created ahead (Postgres).
    pub partitions_created: u64,
    /// Partitions dropped (Postgres).
    pub partitions_dropped: u64,
    /// Expired partitions left for the next run because something else held them (Postgres).
    pub partitions_deferred: u64,
    /// Messages deleted row by row (SQLite).
    pub messages_deleted: u64,
    /// Replay keys dropped with runs older than any replay window, or written by a merge that
    /// was cut short (SQLite).
    pub replay_keys_dropped: u64,
    /// Runs of replay keys merged into larger ones (SQLite).
    pub replay_runs_merged: u64,
    /// Idle rooms deleted.
    pub rooms_deleted: u64,
    /// Expired tombstones deleted.
    pub tombstones_deleted: u64,
    /// Message partitions present afterwards (Postgres).
    pub partitions_present: Option<u64>,
}

/// Connection pool counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Largest number of connections.
    pub max: usize,
    /// Connections open now.
    pub open: usize,
    /// Open connections not in use.
    pub idle: usize,
    /// Requests waiting for a connection.
    pub waiting: usize,
}

/// What the stored data takes on disk, and what is left where it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageUsage {
    /// Bytes the database takes: SQLite's database file and write-ahead log; the whole
    /// Postgres database as `pg_database_size` counts it.
    pub database_bytes: u64,
    /// Bytes counted against `store.max_database_mib`: SQLite's pages in use (pages freed by
    /// expiry and wipes stay in the file and are reused first); Postgres's database size.
    pub used_bytes: u64,
    /// The volume under the data directory (SQLite; Postgres keeps its files elsewhere).
    pub volume: Option<VolumeUsage>,
}

/// The file system holding a SQLite data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeUsage {
    /// Bytes an unprivileged writer may still use (blocks kept for root not counted).
    pub available: u64,
    /// The file system's size.
    pub size: u64,
    /// New messages and rooms are refused while `available` is below this
    /// (`store.min_free_mib`; 0: never).
    pub reserve: u64,
}

/// A storage failure. The text is for logs only; clients get a code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the operation; nothing was changed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Stored data is not what this version expects.
    #[error("storage inconsistent: {0}")]
    Corrupt(String),
    /// New data is refused on purpose: the disk is at the operator's reserve. Not a failure of
    /// storage; logged once when it begins (by the store), not for every refusal.
    #[error("storage full: {0}")]
    Full(String),
}

/// The storage operations the server needs.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;

    /// How this process joins a cluster (Postgres only).
    fn cluster(&self) -> Option<crate::cluster::ClusterInfo> {
        None
    }

    /// Rooms created since `since` across every process sharing this database, for
    /// cluster-wide creation limits and the proof-of-work signal; `None` where the process's
    /// own counters already see everything (SQLite: one process per database).
    async fn rooms_created_since(&self, _since: Millis) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }

    /// Pool counts, for backends with a connection pool.
    fn pool_stats(&self) -> Option<PoolStats> {
        None
    }

    /// Memory the replay key filters take, for backends that keep them (SQLite).
    fn replay_filter_bytes(&self) -> Option<u64> {
        None
    }

    /// Whether the database answers and is migrated (for `/readyz`).
    async fn ready(&self) -> Result<(), StoreError>;

    /// How much space the data takes, and (SQLite) what its volume has left.
    async fn usage(&self) -> Result<StorageUsage, StoreError>;

    /// Create a room with its wrapped auth key.
    async fn create_room(
        &self,
        room: &RoomId,
        auth_wrapped: &[u8],
        now: Millis,
    ) -> Result<CreateOutcome, StoreError>;

    /// Look a room up; `None` when unknown, idle past retention, or its tombstone expired.
    async fn room(&self, room: &RoomId, now: Millis) -> Result<Option<RoomRecord>, StoreError>;

    /// Store a batch of messages in one transaction; outcomes are in batch order, and the
    /// messages of one room get increasing `seq` in batch order.
    async fn append(
        &self,
        batch: &[NewMessage],
        now: Millis,
    ) -> Result<Vec<AppendOutcome>, StoreError>;

    /// A page of a room's messages newer than the retention.
    async fn messages(
        &self,
        room: &RoomId,
        query: HistoryQuery,
        limit: u32,
        now: Millis,
    ) -> Result<Page, StoreError>;

    /// The messages of several rooms' seq ranges (`(room, first, last)`, inclusive) stored in
    /// the last day: what other processes just announced. In room order as given, then seq
    /// order. Backends answer it in one query where they can; this default reads room by room.
    async fn messages_in_ranges(
        &self,
        ranges: &[(RoomId, i64, i64)],
        now: Millis,
    ) -> Result<Vec<(RoomId, StoredMessage)>, StoreError> {
        let mut found = Vec::new();
        for (room, first, last) in ranges {
            let mut after = first - 1;
            while after < *last {
                let limit = (last - after).clamp(1, 500) as u32;
                let page = self
                    .messages(room, HistoryQuery::After(after), limit, now)
                    .await?;
                let Some(end) = page.messages.last().map(|m| m.seq) else {
                    break;
                };
                found.extend(
                    page.messages
                        .into_iter()
                        .filter(|m| m.seq <= *last)
                        .map(|m| (*room, m)),
                );
                after = end;
                if !page.more {
                    break;
                }
            }
        }
        Ok(found)
    }

    /// Up to `limit` messages of each room after its seq (`(room, after)`), newer than the
    /// retention: what a process that lost its cluster listener missed. In room order as
    /// given, then seq order. Backends answer it in one query where they can; this default
    /// reads room by room.
    async fn messages_after(
        &self,
        rooms: &[(RoomId, i64)],
        limit: u32,
        now: Millis,
    ) -> Result<Vec<(RoomId, StoredMessage)>, StoreError> {
        let mut found = Vec::new();
        for (room, after) in rooms {
            let page = self
                .messages(room, HistoryQuery::After(*after), limit, now)
                .await?;
            found.extend(page.messages.into_iter().map(|m| (*room, m)));
        }
        Ok(found)
    }

    /// Those of `rooms` that were wiped (their tombstones still kept), in the order given.
    /// Backends answer it in one query where they can; this default looks room by room.
    async fn wiped_rooms(&self, rooms: &[RoomId], now: Millis) -> Result<Vec<RoomId>, StoreError> {
        let mut wiped = Vec::new();
        for room in rooms {
            if self.room(room, now).await?.is_some_and(|r| r.wiped) {
                wiped.push(*room);
            }
        }
        Ok(wiped)
    }

    /// Delete every message of a room in one transaction and leave a tombstone. Returns whether
    /// a live room was wiped.
    async fn wipe(&self, room: &RoomId, now: Millis) -> Result<bool, StoreError>;

    /// Record the server secret's check value on first use; `false` when the database was set
    /// up with a different secret.
    async fn check_secret(&self, check: &[u8; 32]) -> Result<bool, StoreError>;

    /// Record a proof-of-work token as spent; `false` when it already was.
    async fn redeem_token(
        &self,
        nonce: &[u8; 16],
        expires: Millis,
        now: Millis,
    ) -> Result<bool, StoreError>;

    /// Expire what is older than the retention and prepare what is needed ahead.
    async fn maintain(&self, now: Millis) -> Result<MaintenanceReport, StoreError>;
}

/// Open the store the settings name, applying migrations.
pub async fn open(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    let retention =
        Retention::from_days(settings.retention.days, settings.retention.tombstone_days);
    Ok(match &settings.database.url {
        Some(url) => {
            Arc::new(postgres::PgStore::connect(url, &settings.database, retention).await?)
        }
        None => {
            let store = sqlite::SqliteStore::open(&settings.server.data_dir, retention).await?;
            store.set_min_free(settings.store.min_free_mib.saturating_mul(1 << 20));
            Arc::new(store)
        }
    })
}

/// Pick the seqs of a batch: messages of a room that is not live are `RoomGone`, a repeated IV
/// (already stored, or earlier in the batch) is `Replay`, everything else gets the room's next
/// seq. `last_seq` maps each live room to its current last seq and is advanced in place.
pub(crate) fn assign_seqs(
    batch: &[NewMessage],
    last_seq: &mut std::collections::HashMap<RoomId, i64>,
    stored_ivs: &std::collections::HashSet<(RoomId, [u8; IV_LEN])>,
) -> Vec<AppendOutcome> {
    let mut seen = std::collections::HashSet::with_capacity(batch.len());
    batch
        .iter()
        .map(|m| {
            let Some(last) = last_seq.get_mut(&m.room) else {
                return AppendOutcome::RoomGone;
            };
            if stored_ivs.contains(&(m.room, m.iv)) || !seen.insert((m.room, m.iv)) {
                return AppendOutcome::Replay;
            }
            *last += 1;
            AppendOutcome::Stored { seq: *last }
        })
        .collect()
}

/// Keep the last `limit` of a descending page (or first of an ascending one) and set `more`.
pub(crate) fn finish_page(
    mut messages: Vec<StoredMessage>,
    limit: u32,
    query: HistoryQuery,
) -> Page {
    let more = messages.len() > limit as usize;
    messages.truncate(limit as usize);
    if !matches!(query, HistoryQuery::After(_)) {
        // Latest and Before are read newest first.
        messages.reverse();
    }
    Page { messages, more }
}

/// The earliest creation time an earlier copy of a message sent with `epoch` can have. That
/// copy carried the same epoch and passed the same check when it was received (within one day
/// of the receiving server's day, by that server's clock, which also dated it), so it was
/// stored no earlier than the start of day `epoch - 1`. Never earlier than three days back,
/// the widest the check allows. For a message of today's epoch that leaves yesterday and today.
pub(crate) fn replay_window_start(epoch: u32, now: Millis) -> Millis {
    let from_epoch = (Millis::from(epoch) - 1) * EPOCH_MS;
    from_epoch.max((Millis::from(crate::crypto::epoch_of(now)) - 3) * EPOCH_MS)
}
