//! The embedded SQLite backend: one file in the data directory, WAL mode, `synchronous=FULL`
//! so a committed (and therefore acked) batch survives a power cut.
//!
//! Concurrency: SQLite allows one writer at a time, so all writes go through one connection
//! behind a `std::sync::Mutex`; reads use a small pool of their own connections, which WAL lets
//! run beside the writer. Every call runs on tokio's blocking pool (`spawn_blocking`), so no
//! lock is ever held across an `.await`. Expiry deletes rows in small batches and releases the
//! writer between them, so maintenance never stalls message writes for long.
//!
//! Room rows: the one writer remembers each busy room's last seq ([`LiveRoom`]), so an append
//! neither reads nor rewrites the room's row for every batch. The row's `last_seq` and
//! `last_active` are written when they are a minute behind, before a wipe or a re-creation of
//! the room, at maintenance, and when the store closes. After a crash a row can be behind by
//! that minute; the room's greatest stored seq is newer then, and the writer takes the greater
//! of the two the first time it meets the room again, so seqs never repeat.
//!
//! Messages are rows in the order they were stored; a room's history is found through
//! `message_seqs`, which like the replay keys is filled in large sorted steps while the newest
//! entries wait in memory, where history reads look too (see [`index`]). A filter in memory over
//! the replay keys spares the table lookup for almost every new message (see [`filter`]).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    AppendOutcome, CreateOutcome, MaintenanceReport, Millis, NewMessage, Page, Retention,
    RoomRecord, StorageUsage, Store, StoreError, StoredMessage, VolumeUsage, finish_page,
    replay_window_start,
};
use crate::crypto::RoomId;
use crate::protocol::HistoryQuery;
use filter::ReplayFilter;
use index::{PendingIndex, RecentSeqs};

mod filter;
mod index;

/// Migrations in order; the index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/sqlite/0001_init.sql"),
    include_str!("../../../migrations/sqlite/0002_server_identity.sql"),
    include_str!("../../../migrations/sqlite/0003_replay_keys.sql"),
    include_str!("../../../migrations/sqlite/0004_seq_index.sql"),
    include_str!("../../../migrations/sqlite/0005_replay_runs.sql"),
];
/// Read connections: at most this many reads run at once, each on a pooled connection; the
/// others wait their turn. Unbounded, a crowd of reads (many sockets paging history, a
/// flood from many addresses) would each take a blocking thread (tokio allows 512) and open
/// a connection of its own, with its own page cache and a descriptor that SQLite keeps
/// while other connections hold locks on the file.
const READ_POOL: usize = 8;
/// How often the checkpointer thread copies committed WAL pages into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// The longest a truncating checkpoint (after a wipe) waits for readers, holding new writers
/// back meanwhile.
const TRUNCATE_WAIT: std::time::Duration = std::time::Duration::from_millis(100);
/// Rounds of the checkpointer (half a second each) a truncation after a wipe waits for a
/// moment when no read holds an older state, before it is tried anyway.
const TRUNCATE_PATIENCE: u32 = 20;
/// WAL size (pages) at which the writer checkpoints by itself after a commit: only when the
/// checkpointer falls behind (a full checkpoint needs a moment without a write in between).
const WRITER_CHECKPOINT_PAGES: i64 = 4096;
/// Page cache of the writer connection in KiB (SQLite's negative `cache_size`; the default
/// is 2 MiB). Taken only as pages are used.
const WRITER_CACHE_KIB: i64 = -32 * 1024;
/// Rows deleted per expiry step.
const DELETE_BATCH: i64 = 5_000;
/// Blocks of aged replay keys deleted per transaction (each a page of 128 keys).
const DROP_BLOCKS: usize = 256;
/// Blocks of replay keys a merge writes per transaction (each about a page, read once from
/// its inputs): a quarter of a megabyte of WAL, a few milliseconds of the writer, which is
/// about what an append waiting behind a step waits (256 gave twice the p99 commit latency
/// during a merge; `nanochat-load merge`, benches/HISTORY.md, fan-out session 23).
const MERGE_BLOCKS: usize = 64;
/// The longest rest after a step of maintenance (each rests as long as it worked).
const MAINTENANCE_REST_MAX: std::time::Duration = std::time::Duration::from_millis(100);
/// A room row's `last_seq` / `last_active` are rewritten once they are this far behind.
const ROOM_ROW_LAG_MS: Millis = 60_000;
/// Rooms the writer remembers (about 64 bytes each, so 6–7 MB at most) before it writes them
/// all out and starts afresh; maintenance also starts afresh.
const LIVE_ROOMS_MAX: usize = 100_000;

/// The SQLite store.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// Held for the life of the store: one process per data directory.
    lock: std::fs::File,
    writer: Mutex<WriteSide>,
    /// Where history reads find the messages not yet in `message_seqs` (the writer's too).
    recent: Arc<Mutex<RecentSeqs>>,
    readers: Mutex<Vec<Connection>>,
    /// One permit per read connection (`READ_POOL`).
    read_turns: Arc<tokio::sync::Semaphore>,
    retention: Retention,
    /// Spent proof-of-work tokens and their expiry; one process owns a SQLite store, so the
    /// replay set lives in memory. Entries leave at maintenance once expired.
    spent: Mutex<HashMap<[u8; 16], Millis>>,
    /// Dropping it stops the checkpointer thread.
    _checkpointer: std::sync::mpsc::Sender<()>,
    /// Set by a wipe: the WAL may still hold the wiped room's pages as they were, until the
    /// checkpointer has copied it into the database file and emptied it.
    wiped_in_log: Arc<std::sync::atomic::AtomicBool>,
    /// The writer's replay key filters' memory.
    filter_bytes: Arc<std::sync::atomic::AtomicUsize>,
    /// Bytes the data directory's volume must keep available for new messages and rooms to
    /// be taken (`store.min_free_mib`); 0: no such check.
    min_free: std::sync::atomic::AtomicU64,
    /// Whether the last check found the volume below the reserve (so that the change is
    /// logged once each way, not every refused batch).
    below_reserve: std::sync::atomic::AtomicBool,
}

impl Inner {
    /// The data directory's volume, asked through the lock file held open in it.
    fn volume(&self) -> std::io::Result<VolumeUsage> {
        let v = rustix::fs::fstatvfs(&self.lock)?;
        Ok(VolumeUsage {
            available: v.f_bavail.saturating_mul(v.f_frsize),
            size: v.f_blocks.saturating_mul(v.f_frsize),
            reserve: self.min_free.load(Ordering::Relaxed),
        })
    }

    /// Refuse to add data while the volume has less than the reserve available: what frees
    /// space (expiry, wipes) and SQLite's own log must never find the disk full. One
    /// `fstatvfs` per transaction, about a microsecond.
    fn check_room_to_grow(&self) -> Result<(), StoreError> {
        let reserve = self.min_free.load(Ordering::Relaxed);
        if reserve == 0 {
            return Ok(());
        }
        match self.volume() {
            Ok(v) if v.available < reserve => {
                let why = format!(
                    "the data directory's volume has {} MiB available, less than \
                     store.min_free_mib ({} MiB): new messages and rooms are refused until \
                     space is freed",
                    v.available >> 20,
                    reserve >> 20
                );
                if !self.below_reserve.swap(true, Ordering::Relaxed) {
                    tracing::warn!("{why}");
                }
                Err(StoreError::Full(why))
            }
            Ok(v) => {
                if self.below_reserve.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        available_mib = v.available >> 20,
                        "the data directory's volume is above store.min_free_mib again: new \
                         messages are taken"
                    );
                }
                Ok(())
            }
            // Not knowing is no reason to refuse; a really full disk refuses by itself.
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the data volume's free space");
                Ok(())
            }
        }
    }
}

/// The writer connection, what it remembers of the rooms it has written to, and the index
/// entries not yet in their tables.
struct WriteSide {
    conn: Connection,
    rooms: HashMap<RoomId, LiveRoom>,
    index: PendingIndex,
    recent: Arc<Mutex<RecentSeqs>>,
    /// Rules most new keys out without a lookup in `replay_blocks`.
    filter: ReplayFilter,
}

impl WriteSide {
    fn recent(&self) -> std::sync::MutexGuard<'_, RecentSeqs> {
        lock_recent(&self.recent)
    }
}

/// The recent seqs change only after commits, whole, so a panic elsewhere leaves them usable.
fn lock_recent(recent: &Mutex<RecentSeqs>) -> std::sync::MutexGuard<'_, RecentSeqs> {
    recent.lock().unwrap_or_else(|p| p.into_inner())
}

/// A live room as the writer knows it.
#[derive(Debug, Clone, Copy)]
struct LiveRoom {
    /// The room's last committed seq and when it was stored.
    last_seq: i64,
    last_active: Millis,
    /// `last_seq` and `last_active` as the room's row holds them.
    row_seq: i64,
    row_active: Millis,
}

impl LiveRoom {
    /// The row misses messages.
    fn row_is_behind(&self) -> bool {
        self.last_seq != self.row_seq
    }

    /// The row misses messages and its activity time is a minute or more old.
    fn row_is_stale(&self) -> bool {
        self.row_is_behind() && self.last_active - self.row_active >= ROOM_ROW_LAG_MS
    }
}

/// Bring a room's row up to date (both columns only move forward).
fn save_room(conn: &Connection, room: &RoomId, live: &LiveRoom) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE rooms SET last_seq = MAX(last_seq, ?2), last_active = MAX(last_active, ?3)
         WHERE id = ?1",
    )?
    .execute(params![&room[..], live.last_seq, live.last_active])?;
    Ok(())
}

impl WriteSide {
    /// Write every room row that misses messages, then forget all rooms.
    fn save_all(&mut self) -> rusqlite::Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for (room, live) in &self.rooms {
            if live.row_is_behind() {
                save_room(&tx, room, live)?;
            }
        }
        tx.commit()?;
        self.rooms.clear();
        Ok(())
    }
}

impl Drop for WriteSide {
    fn drop(&mut self) {
        if let Err(e) = self.save_all() {
            tracing::warn!(error = %e, "could not write room rows at close; the next start recovers them from the messages");
        }
        let mut recent = lock_recent(&self.recent);
        if let Err(e) = self.index.flush(&mut self.conn, &mut recent) {
            tracing::warn!(error = %e, "could not write index entries at close; the next start recovers them from the messages");
        }
    }
}

fn db_err(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // What is deleted (a wiped room, expired messages) is overwritten with zeros, not left in
    // the file's free space: someone who later gets both a room's link and this disk finds
    // nothing of a wiped room. Free pages are written once more; expiry deletes in batches.
    conn.pragma_update(None, "secure_delete", "ON")?;
    Ok(conn)
}

/// The database's pages in use, in bytes, as of the latest commit (the write-ahead log
/// included): what a compacted copy takes, and what new data grows once the free pages that
/// expiry and wipes leave in the file are used up.
fn bytes_in_use(conn: &Connection) -> rusqlite::Result<u64> {
    let bytes: i64 = conn.query_row(
        "SELECT (page_count - freelist_count) * page_size
         FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()",
        [],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(bytes).unwrap_or(0))
}

/// Write a consistent copy of `<data_dir>/nanochat.db` to `dest`, also while a server is using
/// it: `VACUUM INTO` reads the whole database in one read transaction (the server's writer
/// goes on beside it, as WAL allows), so the copy is the database as of one moment, compacted.
/// Index entries the server had not yet sorted into their tables are put there when a server
/// opens the copy, as after an unclean stop. The copy is readable by its owner only. Returns
/// its size in bytes.
///
/// Nothing is written when the copy would not fit: it takes about the database's pages in use,
/// and on the data directory's own volume it must also leave `reserve` bytes there
/// (`store.min_free_mib`), which the running server keeps for what frees space.
pub fn backup(data_dir: &Path, dest: &Path, reserve: u64) -> anyhow::Result<u64> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let src = data_dir.join("nanochat.db");
    anyhow::ensure!(src.is_file(), "there is no database at {}", src.display());
    anyhow::ensure!(!dest.exists(), "{} exists already", dest.display());
    let conn = Connection::open_with_flags(&src, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", src.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    let needed = bytes_in_use(&conn)?;
    let into = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let volume = rustix::fs::statvfs(into)
        .map_err(|e| anyhow::anyhow!("cannot look at {}: {e}", into.display()))?;
    let available = volume.f_bavail.saturating_mul(volume.f_frsize);
    let shared = std::fs::metadata(into)?.dev() == std::fs::metadata(data_dir)?.dev();
    let keep = if shared { reserve } else { 0 };
    if available < needed.saturating_add(keep) {
        let kept = if shared && reserve > 0 {
            format!(
                ", and the server keeps store.min_free_mib ({} MiB) free on that volume",
                reserve >> 20
            )
        } else {
            String::new()
        };
        anyhow::bail!(
            "the copy needs about {} MiB; {} has {} MiB available{kept}: free space there, or \
             back up to another volume",
            needed.div_ceil(1 << 20),
            into.display(),
            available >> 20
        );
    }
    let to = dest
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("{} is not a UTF-8 path", dest.display()))?;
    conn.execute("VACUUM INTO ?1", [to])
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", dest.display()))?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o600))?;
    Ok(std::fs::metadata(dest)?.len())
}

fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )?;
    let current: i64 = conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    if current > MIGRATIONS.len() as i64 {
        anyhow::bail!(
            "the database schema is version {current}, newer than this binary knows ({}); \
             run a newer nanochat",
            MIGRATIONS.len()
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![i as i64 + 1, super::now_ms()],
        )?;
        tx.commit()?;
        tracing::info!(version = i + 1, "applied SQLite migration");
    }
    Ok(())
}

impl SqliteStore {
    /// Drop the runs of replay keys older than every replay window at `now` (and those a merge
    /// left behind), [`DROP_BLOCKS`] blocks per transaction; returns the keys dropped.
    async fn drop_aged_runs(&self, now: Millis) -> Result<u64, StoreError> {
        let mut dropped = 0;
        loop {
            let (blocks, keys) = self
                .maintenance_step(move |side, _| {
                    let tx = side
                        .conn
                        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                        .map_err(db_err)?;
                    let (blocks, keys, emptied) = side
                        .index
                        .drop_aged(&tx, index::keep_runs_since(now), DROP_BLOCKS)
                        .map_err(db_err)?;
                    tx.commit().map_err(db_err)?;
                    side.index.runs_dropped(emptied);
                    Ok((blocks, keys))
                })
                .await?;
            dropped += keys as u64;
            if blocks < DROP_BLOCKS {
                return Ok(dropped);
            }
        }
    }
    /// Open (creating if needed) `<data_dir>/nanochat.db` and apply migrations.
    pub async fn open(data_dir: &Path, retention: Retention) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            anyhow::anyhow!("cannot create data directory {}: {e}", data_dir.display())
        })?;
        let lock = lock_data_dir(data_dir).await?;
        let path = data_dir.join("nanochat.db");
        let p = path.clone();
        let writer = tokio::task::spawn_blocking(move || -> anyhow::Result<(Connection, PendingIndex)> {
            let mut conn = open_connection(&p)
                .map_err(|e| anyhow::anyhow!("cannot open SQLite database {}: {e}", p.display()))?;
            migrate(&mut conn)?;
            let recovered = index::recover(&mut conn)?;
            if recovered > 0 {
                tracing::info!(
                    recovered,
                    "put index entries of messages stored before an unclean stop into their tables"
                );
            }
            // The checkpointer thread copies the WAL into the database file; the writer only
            // steps in when the WAL has grown past this many pages without a full checkpoint.
            conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)?;
            // Index entries land at random places in their tables; a cache of a few MiB saves
            // most of those page reads once the tables have grown.
            conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
            let mut index = PendingIndex::new();
            index.load_runs(&conn)?;
            Ok((conn, index))
        })
        .await??;
        let (writer, index) = writer;
        let (checkpointer, stop) = std::sync::mpsc::channel();
        let wiped_in_log = Arc::new(std::sync::atomic::AtomicBool::new(false));
        spawn_checkpointer(path.clone(), stop, wiped_in_log.clone())?;
        let recent = Arc::new(Mutex::new(RecentSeqs::default()));
        let filter = ReplayFilter::new();
        let filter_bytes = filter.held_bytes();
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                lock,
                writer: Mutex::new(WriteSide {
                    conn: writer,
                    rooms: HashMap::new(),
                    index,
                    recent: recent.clone(),
                    filter,
                }),
                filter_bytes,
                min_free: std::sync::atomic::AtomicU64::new(0),
                below_reserve: std::sync::atomic::AtomicBool::new(false),
                recent,
                readers: Mutex::new(Vec::new()),
                read_turns: Arc::new(tokio::sync::Semaphore::new(READ_POOL)),
                retention,
                spent: Mutex::new(HashMap::new()),
                _checkpointer: checkpointer,
                wiped_in_log,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Refuse new messages and rooms while the data directory's volume has less than `bytes`
    /// available (0, the default: never).
    pub fn set_min_free(&self, bytes: u64) {
        self.inner.min_free.store(bytes, Ordering::Relaxed);
    }

    /// Run `f` with the writer connection on the blocking pool.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut WriteSide, &Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock would poison it; the connection itself is still
            // consistent (SQLite rolls back an open transaction), and the rooms it remembers
            // change only after a commit, so keep using it.
            let mut side = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut side, &inner)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("storage task failed: {e}")))?
    }

    /// One step of maintenance on the writer, then a rest as long as the step worked (at most
    /// [`MAINTENANCE_REST_MAX`]): maintenance takes at most half of the writer, and the
    /// appends that queued behind a step go next. Back to back, steps kept the writer and
    /// commits waited for whole series of them (benches/HISTORY.md, fan-out session 23).
    async fn maintenance_step<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut WriteSide, &Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (out, worked) = self
            .write(move |side, inner| {
                let began = std::time::Instant::now();
                let out = f(side, inner)?;
                Ok((out, began.elapsed()))
            })
            .await?;
        tokio::time::sleep(worked.min(MAINTENANCE_REST_MAX)).await;
        Ok(out)
    }

    /// Run `f` with a read connection on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        // Held by the blocking task, so that a caller that stops waiting does not free the
        // turn of a read still running.
        let turn = self
            .inner
            .read_turns
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("the store is closing".into()))?;
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let pooled = inner
                .readers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop();
            let conn = match pooled {
                Some(c) => c,
                None => open_connection(&inner.path).map_err(db_err)?,
            };
            let result = f(&conn, &inner);
            let mut readers = inner.readers.lock().unwrap_or_else(|p| p.into_inner());
            if readers.len() < READ_POOL {
                readers.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("storage task failed: {e}")))?
    }
}

/// Checkpoint the WAL from a thread of its own, so the writer (and every ack waiting on it)
/// does not pay for copying pages into the database file and that file's fsync: with SQLite's
/// default, the writer checkpoints after every 1000 pages of commits. The thread ends when
/// the store is dropped (`stop`'s sender goes away).
///
/// After a wipe (`wiped_in_log`) it also empties the WAL (`TRUNCATE`), whose older frames may
/// still hold the wiped room's pages as they were before. That checkpoint waits for readers and
/// holds new writers back meanwhile, so it waits at most [`TRUNCATE_WAIT`], is tried when a
/// passive one has just copied the whole WAL (no read holds an older state; a backup's read
/// can last minutes) or else every [`TRUNCATE_PATIENCE`] rounds, until it finishes.
fn spawn_checkpointer(
    path: PathBuf,
    stop: std::sync::mpsc::Receiver<()>,
    wiped_in_log: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    let conn = open_connection(&path)?;
    // Only the truncating checkpoint waits (a passive one never does).
    conn.busy_timeout(TRUNCATE_WAIT)?;
    std::thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(move || {
            let mut rounds_waited = 0;
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stop.recv_timeout(CHECKPOINT_EVERY)
            {
                // (busy, frames in the log, frames checkpointed); busy = 1: not finished.
                let copied_all = match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                }) {
                    Ok((busy, log, copied)) => busy == 0 && log == copied,
                    Err(e) => {
                        tracing::debug!(error = %e, "WAL checkpoint failed; the writer will retry");
                        false
                    }
                };
                if !wiped_in_log.load(Ordering::Acquire) {
                    rounds_waited = 0;
                    continue;
                }
                // Everything copied means no read holds an older state, so the truncation
                // will not wait; a long read (a backup) is waited out for a while first.
                if !copied_all && rounds_waited < TRUNCATE_PATIENCE {
                    rounds_waited += 1;
                    continue;
                }
                rounds_waited = 0;
                wiped_in_log.store(false, Ordering::Release);
                let truncated = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    r.get::<_, i64>(0)
                });
                if !matches!(truncated, Ok(0)) {
                    wiped_in_log.store(true, Ordering::Release);
                }
            }
        })?;
    Ok(())
}

/// Take the data directory's lock file, waiting a few seconds for a process that is still
/// exiting (a restart) before giving up.
async fn lock_data_dir(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = data_dir.join("nanochat.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| {
            anyhow::anyhow!(
                "the data directory {} is not writable ({e}); the embedded database, its lock \
                 and the server secret live there: make it writable by this user",
                data_dir.display()
            )
        })?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another nanochat process is using the data directory {}: with the embedded \
                 SQLite database one directory serves one process; to run several processes, \
                 use Postgres (database.url)",
                data_dir.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                anyhow::bail!("cannot lock {}: {e}", path.display())
            }
        }
    }
}

fn append_tx(
    side: &mut WriteSide,
    batch: &[NewMessage],
    now: Millis,
) -> rusqlite::Result<Vec<AppendOutcome>> {
    let WriteSide {
        conn,
        rooms,
        index,
        recent,
        filter,
    } = side;
    filter.tend(conn, index.memory());
    // IMMEDIATE: take the write lock up front, so the busy timeout covers waiting for another
    // writer (an operator's sqlite3 shell, a backup tool). A DEFERRED transaction that reads
    // first fails at once with SQLITE_BUSY_SNAPSHOT when someone else committed in between.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // The batch's rooms as they will be after this commit, `None` for a room that is not live.
    // Remembered rooms and replay keys change only once the commit has succeeded.
    let mut touched: HashMap<RoomId, Option<LiveRoom>> = HashMap::new();
    let mut stored = HashSet::with_capacity(batch.len());
    let mut seqs = Vec::with_capacity(batch.len());
    let mut outcomes = Vec::with_capacity(batch.len());
    let step = {
        // A room met for the first time: its row, and its greatest stored seq in case the row
        // is behind (a crash before the row was written); the newest seqs may still be waiting
        // in memory.
        let mut room_q = tx.prepare_cached(
            "SELECT last_seq, last_active, (SELECT MAX(seq) FROM message_seqs WHERE room_id = ?1)
             FROM rooms WHERE id = ?1 AND wiped_at IS NULL",
        )?;
        let mut insert = tx.prepare_cached(
            "INSERT INTO messages (room_id, seq, created_at, epoch, iv, ct) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        let mut probe = PendingIndex::probe(&tx)?;
        for m in batch {
            let room = match touched.get_mut(&m.room) {
                Some(room) => room,
                None => {
                    let room = match rooms.get(&m.room) {
                        Some(live) => Some(*live),
                        None => room_q
                            .query_row(params![&m.room[..]], |r| {
                                let (row_seq, row_active): (i64, Millis) = (r.get(0)?, r.get(1)?);
                                let stored: Option<i64> = r.get(2)?;
                                let waiting = lock_recent(recent).last_seq(&m.room);
                                Ok(LiveRoom {
                                    last_seq: row_seq
                                        .max(stored.unwrap_or(0))
                                        .max(waiting.unwrap_or(0)),
                                    last_active: row_active,
                                    row_seq,
                                    row_active,
                                })
                            })
                            .optional()?,
                    };
                    touched.entry(m.room).or_insert(room)
                }
            };
            let Some(room) = room else {
                outcomes.push(AppendOutcome::RoomGone);
                continue;
            };
            let k = index::key(&m.room, &m.iv);
            if stored.contains(&k)
                || (filter.may_contain(&k)
                    && index.contains(&mut probe, &k, replay_window_start(m.epoch, now))?)
            {
                outcomes.push(AppendOutcome::Replay);
                continue;
            }
            let seq = room.last_seq + 1;
            insert.execute(params![&m.room[..], seq, now, m.epoch, &m.iv[..], &m.ct])?;
            filter.insert(&k);
            seqs.push((m.room, seq, tx.last_insert_rowid()));
            stored.insert(k);
            room.last_seq = seq;
            room.last_active = room.last_active.max(now);
            outcomes.push(AppendOutcome::Stored { seq });
        }
        index.move_chunk(&tx, batch.len())?
    };
    // A busy room's row is rewritten about once a minute, not once per batch.
    for (id, room) in &mut touched {
        if let Some(room) = room
            && room.row_is_stale()
        {
            save_room(&tx, id, room)?;
            room.row_seq = room.last_seq;
            room.row_active = room.row_active.max(room.last_active);
        }
    }
    tx.commit()?;
    index.committed(conn, &mut lock_recent(recent), stored, &seqs, step, now);
    rooms.extend(
        touched
            .into_iter()
            .filter_map(|(id, room)| Some((id, room?))),
    );
    if rooms.len() > LIVE_ROOMS_MAX
        && let Err(e) = side.save_all()
    {
        tracing::warn!(error = %e, "could not write room rows; keeping them in memory");
    }
    Ok(outcomes)
}

/// Delete up to [`DELETE_BATCH`] messages stored before `cutoff`, and their index entries.
fn expire_batch(side: &mut WriteSide, cutoff: Millis) -> rusqlite::Result<usize> {
    let tx = side
        .conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let rows: Vec<(index::Key, RoomId, i64)> = tx
        .prepare_cached(
            "DELETE FROM messages WHERE id IN
             (SELECT id FROM messages WHERE created_at < ?1 LIMIT ?2)
             RETURNING room_id, iv, seq",
        )?
        .query_map(params![cutoff, DELETE_BATCH], |r| {
            let k = index::row_key(r)?;
            let room: RoomId = k[..16].try_into().expect("16 bytes");
            Ok((k, room, r.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    if rows.is_empty() {
        return Ok(0);
    }
    let (mut keys, mut seqs): (Vec<_>, Vec<_>) = rows
        .iter()
        .map(|(k, room, seq)| (*k, (*room, *seq)))
        .unzip();
    keys.sort_unstable();
    PendingIndex::forget(&tx, &mut seqs)?;
    let highest = PendingIndex::lower_mark(&tx)?;
    tx.commit()?;
    side.index.rows_deleted(
        &mut lock_recent(&side.recent),
        highest,
        |k| keys.binary_search(k).is_ok(),
        |(room, seq, _)| seqs.binary_search(&(*room, *seq)).is_ok(),
    );
    Ok(rows.len())
}

/// A page of a room's history, in the order `query` reads, with one message more than `limit`
/// when there are more.
///
/// The newest messages may not be in `message_seqs` yet: their seqs and ids are copied from
/// [`RecentSeqs`] first, and only then is the table read (see there why in that order; each
/// statement below reads the database as it is when the statement starts). Within a room the
/// seqs waiting in memory are all above the table's, so the page is the table's part and the
/// memory's part side by side, the table read below the lowest seq in memory.
fn read_history(
    conn: &Connection,
    inner: &Inner,
    room: &RoomId,
    query: HistoryQuery,
    limit: u32,
    now: Millis,
) -> rusqlite::Result<Vec<StoredMessage>> {
    let want = limit as usize + 1;
    let cutoff = inner.retention.message_cutoff(now);
    let (waiting, lowest) = lock_recent(&inner.recent).select(room, query, want);
    if let Some(page) = assemble(conn, room, query, want, cutoff, &waiting, lowest, false)? {
        return Ok(page);
    }
    // Some of the messages picked in memory were gone (expired or wiped a moment ago) and there
    // are more in memory than were picked: take them all this time.
    let (waiting, lowest) = lock_recent(&inner.recent).select(room, query, usize::MAX);
    Ok(assemble(conn, room, query, want, cutoff, &waiting, lowest, true)?.unwrap_or_default())
}

/// [`read_history`]'s page from the entries picked in memory (in the query's order) and the
/// table below `lowest`, or `None` when a picked message is gone and the page could miss
/// messages that were not picked (unless `all_picked`).
#[allow(clippy::too_many_arguments)]
fn assemble(
    conn: &Connection,
    room: &RoomId,
    query: HistoryQuery,
    want: usize,
    cutoff: Millis,
    waiting: &[(i64, i64)],
    lowest: Option<i64>,
    all_picked: bool,
) -> rusqlite::Result<Option<Vec<StoredMessage>>> {
    let row = |r: &rusqlite::Row<'_>| {
        Ok(StoredMessage {
            seq: r.get(0)?,
            ts: r.get(1)?,
            epoch: r.get(2)?,
            iv: r.get(3)?,
            ct: r.get(4)?,
        })
    };
    let from_memory = || -> rusqlite::Result<Option<Vec<StoredMessage>>> {
        // One lookup by id each, checking that the row is the one meant: ids of deleted top
        // rows are used again.
        let mut by_id = conn.prepare_cached(
            "SELECT seq, created_at, epoch, iv, ct FROM messages
             WHERE id = ?1 AND room_id = ?2 AND seq = ?3 AND created_at >= ?4",
        )?;
        let mut found = Vec::with_capacity(waiting.len());
        for (seq, id) in waiting {
            if let Some(m) = by_id
                .query_row(params![id, &room[..], seq, cutoff], row)
                .optional()?
            {
                found.push(m);
            }
        }
        let complete = all_picked || waiting.len() < want;
        Ok((found.len() == waiting.len() || complete).then_some(found))
    };
    let from_table = |after: i64, below: i64, n: usize, desc: bool| {
        let sql = if desc {
            "SELECT m.seq, m.created_at, m.epoch, m.iv, m.ct
             FROM message_seqs s JOIN messages m ON m.id = s.id
             WHERE s.room_id = ?1 AND s.seq > ?2 AND s.seq < ?3 AND m.created_at >= ?4
             ORDER BY s.seq DESC LIMIT ?5"
        } else {
            "SELECT m.seq, m.created_at, m.epoch, m.iv, m.ct
             FROM message_seqs s JOIN messages m ON m.id = s.id
             WHERE s.room_id = ?1 AND s.seq > ?2 AND s.seq < ?3 AND m.created_at >= ?4
             ORDER BY s.seq ASC LIMIT ?5"
        };
        conn.prepare_cached(sql)?
            .query_map(params![&room[..], after, below, cutoff, n as i64], row)?
            .collect::<rusqlite::Result<Vec<_>>>()
    };
    let below = lowest.unwrap_or(i64::MAX);
    Ok(match query {
        HistoryQuery::Latest | HistoryQuery::Before(_) => {
            let Some(mut page) = from_memory()? else {
                return Ok(None);
            };
            if page.len() < want {
                let bound = match query {
                    HistoryQuery::Before(b) => b.min(below),
                    _ => below,
                };
                page.extend(from_table(i64::MIN, bound, want - page.len(), true)?);
            }
            page.truncate(want);
            Some(page)
        }
        HistoryQuery::After(a) => {
            let mut page = from_table(a, below, want, false)?;
            if page.len() < want {
                let Some(newer) = from_memory()? else {
                    return Ok(None);
                };
                page.extend(newer);
            }
            page.truncate(want);
            Some(page)
        }
    })
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn replay_filter_bytes(&self) -> Option<u64> {
        Some(
            self.inner
                .filter_bytes
                .load(std::sync::atomic::Ordering::Relaxed) as u64,
        )
    }

    async fn usage(&self) -> Result<StorageUsage, StoreError> {
        self.read(|conn, inner| {
            let len = |suffix: &str| {
                let mut name = inner.path.clone().into_os_string();
                name.push(suffix);
                std::fs::metadata(name).map_or(0, |m| m.len())
            };
            let used = bytes_in_use(conn).map_err(db_err)?;
            let volume = inner
                .volume()
                .map_err(|e| StoreError::Unavailable(format!("data volume: {e}")))?;
            Ok(StorageUsage {
                database_bytes: len("") + len("-wal"),
                used_bytes: used,
                volume: Some(volume),
            })
        })
        .await
    }

    async fn ready(&self) -> Result<(), StoreError> {
        self.read(|conn, _| {
            let version: i64 = conn
                .query_row(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                    [],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            if version == MIGRATIONS.len() as i64 {
                Ok(())
            } else {
                Err(StoreError::Unavailable(format!(
                    "schema version {version}, expected {}",
                    MIGRATIONS.len()
                )))
            }
        })
        .await
    }

    async fn create_room(
        &self,
        room: &RoomId,
        auth_wrapped: &[u8],
        now: Millis,
    ) -> Result<CreateOutcome, StoreError> {
        let room = *room;
        let wrapped = auth_wrapped.to_vec();
        self.write(move |side, inner| {
            inner.check_room_to_grow()?;
            // The row must be current before its idleness is judged; a room that gets a new
            // row starts afresh in the writer's memory.
            if let Some(live) = side.rooms.get(&room) {
                save_room(&side.conn, &room, live).map_err(db_err)?;
                side.rooms.remove(&room);
            }
            let conn = &side.conn;
            let idle_cutoff = inner.retention.message_cutoff(now);
            let tomb_cutoff = now - inner.retention.tombstone_ms;
            // A room idle past the retention, or a tombstone past its time, counts as absent
            // even before maintenance deletes it: take its place (keeping last_seq, so seqs
            // never repeat within the room id).
            let changed = conn
                .execute(
                    "INSERT INTO rooms (id, auth_wrapped, created_at, last_active, last_seq)
                     VALUES (?1, ?2, ?3, ?3, 0)
                     ON CONFLICT (id) DO UPDATE SET auth_wrapped = excluded.auth_wrapped,
                         created_at = excluded.created_at, last_active = excluded.last_active,
                         wiped_at = NULL
                     WHERE (rooms.wiped_at IS NULL AND rooms.last_active < ?4)
                        OR (rooms.wiped_at IS NOT NULL AND rooms.wiped_at < ?5)",
                    params![&room[..], &wrapped, now, idle_cutoff, tomb_cutoff],
                )
                .map_err(db_err)?;
            if changed == 1 {
                return Ok(CreateOutcome::Created);
            }
            let wiped: Option<i64> = conn
                .query_row(
                    "SELECT wiped_at FROM rooms WHERE id = ?1",
                    params![&room[..]],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            Ok(if wiped.is_some() {
                CreateOutcome::Gone
            } else {
                CreateOutcome::Exists
            })
        })
        .await
    }

    async fn room(&self, room: &RoomId, now: Millis) -> Result<Option<RoomRecord>, StoreError> {
        let room = *room;
        self.read(move |conn, inner| {
            let row: Option<(Vec<u8>, i64, Option<i64>)> = conn
                .prepare_cached(
                    "SELECT auth_wrapped, last_active, wiped_at FROM rooms WHERE id = ?1",
                )
                .and_then(|mut q| {
                    q.query_row(params![&room[..]], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .optional()
                })
                .map_err(db_err)?;
            Ok(
                row.and_then(|(auth_wrapped, last_active, wiped_at)| match wiped_at {
                    Some(at) if at >= now - inner.retention.tombstone_ms => Some(RoomRecord {
                        auth_wrapped,
                        wiped: true,
                    }),
                    Some(_) => None,
                    None if last_active >= inner.retention.message_cutoff(now) => {
                        Some(RoomRecord {
                            auth_wrapped,
                            wiped: false,
                        })
                    }
                    None => None,
                }),
            )
        })
        .await
    }

    async fn append(
        &self,
        batch: &[NewMessage],
        now: Millis,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        // The blocking pool needs owned data; the copy is small next to an fsync.
        let batch = batch.to_vec();
        self.write(move |side, inner| {
            inner.check_room_to_grow()?;
            append_tx(side, &batch, now).map_err(db_err)
        })
        .await
    }

    async fn messages(
        &self,
        room: &RoomId,
        query: HistoryQuery,
        limit: u32,
        now: Millis,
    ) -> Result<Page, StoreError> {
        let room = *room;
        self.read(move |conn, inner| {
            let rows = read_history(conn, inner, &room, query, limit, now).map_err(db_err)?;
            Ok(finish_page(rows, limit, query))
        })
        .await
    }

    async fn wipe(&self, room: &RoomId, now: Millis) -> Result<bool, StoreError> {
        let room = *room;
        self.write(move |side, inner| {
            // The room's messages not in `message_seqs` yet; only this writer adds to them.
            let waiting = side.recent().room(&room);
            let remembered = side
                .rooms
                .get(&room)
                .map_or(0, |live| live.last_seq)
                .max(waiting.last().map_or(0, |(seq, _)| *seq));
            let tx = side
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(db_err)?;
            // The tombstone keeps the room's last seq (its row may be behind the messages about
            // to go), so a room re-created here later never repeats a seq.
            let wiped = tx
                .execute(
                    "UPDATE rooms SET wiped_at = ?2, last_seq = MAX(last_seq, ?3,
                         COALESCE((SELECT MAX(seq) FROM message_seqs WHERE room_id = ?1), 0))
                     WHERE id = ?1 AND wiped_at IS NULL",
                    params![&room[..], now, remembered],
                )
                .map_err(db_err)?;
            {
                let mut delete = tx
                    .prepare_cached("DELETE FROM messages WHERE id = ?1 AND room_id = ?2")
                    .map_err(db_err)?;
                for (_, id) in &waiting {
                    delete.execute(params![id, &room[..]]).map_err(db_err)?;
                }
            }
            for sql in [
                "DELETE FROM messages WHERE id IN (SELECT id FROM message_seqs WHERE room_id = ?1)",
                "DELETE FROM message_seqs WHERE room_id = ?1",
            ] {
                tx.execute(sql, params![&room[..]]).map_err(db_err)?;
            }
            let highest = PendingIndex::lower_mark(&tx).map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            if wiped == 1 {
                inner.wiped_in_log.store(true, Ordering::Release);
            }
            side.rooms.remove(&room);
            side.index.rows_deleted(
                &mut lock_recent(&side.recent),
                highest,
                |k| k[..16] == room[..],
                |(r, _, _)| *r == room,
            );
            Ok(wiped == 1)
        })
        .await
    }

    async fn check_secret(&self, check: &[u8; 32]) -> Result<bool, StoreError> {
        let check = *check;
        self.write(move |side, _| {
            let conn = &side.conn;
            conn.execute(
                "INSERT INTO server_identity (key, value) VALUES ('secret_check', ?1)
                 ON CONFLICT (key) DO NOTHING",
                params![&check[..]],
            )
            .map_err(db_err)?;
            let stored: Vec<u8> = conn
                .query_row(
                    "SELECT value FROM server_identity WHERE key = 'secret_check'",
                    [],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            Ok(stored == check)
        })
        .await
    }

    async fn redeem_token(
        &self,
        nonce: &[u8; 16],
        expires: Millis,
        _now: Millis,
    ) -> Result<bool, StoreError> {
        let mut spent = self.inner.spent.lock().unwrap_or_else(|p| p.into_inner());
        Ok(spent.insert(*nonce, expires).is_none())
    }

    async fn maintain(&self, now: Millis) -> Result<MaintenanceReport, StoreError> {
        let mut report = MaintenanceReport {
            ran: true,
            ..Default::default()
        };
        self.inner
            .spent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, expires| *expires > now);
        // Messages first, in batches, releasing the writer between them.
        loop {
            let deleted = self
                .maintenance_step(move |side, inner| {
                    expire_batch(side, inner.retention.message_cutoff(now)).map_err(db_err)
                })
                .await?;
            report.messages_deleted += deleted as u64;
            if (deleted as i64) < DELETE_BATCH {
                break;
            }
        }
        // Then the replay keys no message's window reaches any more, a run at a time; then
        // runs of the same ended hour (or six hours) merge, so a lookup visits few; then the
        // runs the merges replaced go too.
        report.replay_keys_dropped += self.drop_aged_runs(now).await?;
        while let Some(mut merge) = self
            .write(move |side, _| {
                Ok(side
                    .index
                    .merge_group(now)
                    .map(|g| side.index.start_merge(g)))
            })
            .await?
        {
            report.replay_runs_merged += merge.runs() as u64;
            loop {
                let (back, done) = self
                    .maintenance_step(move |side, _| {
                        let tx = side
                            .conn
                            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                            .map_err(db_err)?;
                        let done =
                            index::merge_step(&tx, &mut merge, MERGE_BLOCKS).map_err(db_err)?;
                        tx.commit().map_err(db_err)?;
                        if done {
                            side.index.merged(&merge);
                        }
                        Ok((merge, done))
                    })
                    .await?;
                merge = back;
                if done {
                    break;
                }
            }
        }
        if report.replay_runs_merged > 0 {
            self.drop_aged_runs(now).await?;
        }
        let (rooms, tombstones) = self
            .write(move |side, inner| {
                // Room rows must be current before idleness is judged; the writer then starts
                // afresh, which also forgets rooms about to be deleted.
                side.save_all().map_err(db_err)?;
                let conn = &side.conn;
                // A room whose row fell behind in a crash can still hold newer messages:
                // it goes once they have expired.
                let rooms = conn
                    .execute(
                        "DELETE FROM rooms WHERE wiped_at IS NULL AND last_active < ?1
                           AND NOT EXISTS (SELECT 1 FROM message_seqs WHERE room_id = rooms.id)",
                        params![inner.retention.message_cutoff(now)],
                    )
                    .map_err(db_err)?;
                let tombstones = conn
                    .execute(
                        "DELETE FROM rooms WHERE wiped_at IS NOT NULL AND wiped_at < ?1",
                        params![now - inner.retention.tombstone_ms],
                    )
                    .map_err(db_err)?;
                // Keep the WAL from growing without bound between automatic checkpoints.
                conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    .map_err(db_err)?;
                Ok((rooms as u64, tombstones as u64))
            })
            .await?;
        report.rooms_deleted = rooms;
        report.tombstones_deleted = tombstones;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(room: RoomId, n: u32) -> NewMessage {
        let mut iv = [0u8; crate::crypto::IV_LEN];
        iv[..4].copy_from_slice(&n.to_be_bytes());
        NewMessage {
            room,
            epoch: 0,
            iv,
            ct: vec![1; 20],
        }
    }

    /// The writer's memory of rooms is bounded: past `LIVE_ROOMS_MAX` rooms it writes every
    /// row out and starts afresh, and seqs carry on from the rows.
    #[tokio::test]
    async fn remembered_rooms_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), Retention::from_days(30, 365))
            .await
            .unwrap();
        let now = super::super::now_ms();
        let rooms: Vec<RoomId> = (0..LIVE_ROOMS_MAX as u32 + 1)
            .map(|i| {
                let mut id = [7u8; 16];
                id[..4].copy_from_slice(&i.to_be_bytes());
                id
            })
            .collect();
        {
            let mut side = store.inner.writer.lock().unwrap();
            let tx = side.conn.transaction().unwrap();
            for id in &rooms {
                tx.execute(
                    "INSERT INTO rooms (id, auth_wrapped, created_at, last_active) VALUES (?1, x'00', ?2, ?2)",
                    params![&id[..], now],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        let remembered = || store.inner.writer.lock().unwrap().rooms.len();
        let (first, last) = rooms.split_at(LIVE_ROOMS_MAX);
        for chunk in first.chunks(10_000) {
            let batch: Vec<_> = chunk.iter().map(|r| message(*r, 1)).collect();
            store.append(&batch, now).await.unwrap();
        }
        assert_eq!(remembered(), LIVE_ROOMS_MAX);
        let out = store.append(&[message(last[0], 1)], now).await.unwrap();
        assert_eq!(out, vec![AppendOutcome::Stored { seq: 1 }]);
        assert_eq!(remembered(), 0, "one room past the bound: all written out");
        let row_seq: i64 = store
            .inner
            .writer
            .lock()
            .unwrap()
            .conn
            .query_row(
                "SELECT last_seq FROM rooms WHERE id = ?1",
                params![&first[123][..]],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(row_seq, 1, "the rows were written before forgetting");
        let out = store.append(&[message(first[123], 2)], now).await.unwrap();
        assert_eq!(out, vec![AppendOutcome::Stored { seq: 2 }]);
    }
}

#[cfg(test)]
mod index_tests {
    use super::*;
    use crate::crypto::EPOCH_MS;

    fn message(room: RoomId, n: u32) -> NewMessage {
        let mut iv = [0u8; crate::crypto::IV_LEN];
        iv[8..].copy_from_slice(&n.to_be_bytes());
        NewMessage {
            room,
            epoch: 0,
            iv,
            ct: vec![2; 20],
        }
    }

    async fn open(dir: &Path) -> SqliteStore {
        let store = SqliteStore::open(dir, Retention::from_days(30, 365))
            .await
            .unwrap();
        // Small generations and chunks, so a few dozen messages go through every stage.
        small_index(&store, 8, 3);
        store
    }

    fn small_index(store: &SqliteStore, move_at: usize, chunk: usize) {
        let mut side = store.inner.writer.lock().unwrap();
        let mut index = PendingIndex::with_sizes(move_at, chunk);
        index.load_runs(&side.conn).unwrap();
        side.index = index;
    }

    async fn create(store: &SqliteStore, room: RoomId, now: Millis) {
        let out = store.create_room(&room, &[0], now).await.unwrap();
        assert_eq!(out, CreateOutcome::Created);
    }

    /// Every key in the runs' blocks (a key in two runs, twice).
    fn keys_in_blocks(conn: &Connection) -> Vec<index::Key> {
        let blocks: Vec<Vec<u8>> = conn
            .prepare("SELECT keys FROM replay_blocks")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        blocks.iter().flat_map(|b| index::block_keys(b)).collect()
    }

    /// The `(room_id, iv)` pairs a query with one parameter returns, as keys.
    fn keys_in_rows(conn: &Connection, sql: &str, p: Millis) -> HashSet<index::Key> {
        conn.prepare(sql)
            .unwrap()
            .query_map([p], index::row_key)
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    /// The `(room_id, iv)` pairs a query returns, as keys.
    fn keys_in(conn: &Connection, sql: &str) -> Vec<index::Key> {
        conn.prepare(sql)
            .unwrap()
            .query_map([], index::row_key)
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    /// Every stored message's key is in memory or in a run of the table, unless the message is
    /// older than every run left (its own was dropped); keys of deleted messages may stay in
    /// their runs; a key in memory is a stored message's. Every message at or below the mark
    /// has its key in the table (the same exception), and the runs in memory are the table's.
    /// Returns the distinct keys in the table and the keys in memory.
    fn assert_consistent(store: &SqliteStore) -> (usize, usize) {
        let side = store.inner.writer.lock().unwrap();
        let conn = &side.conn;
        // Runs go oldest first (times never fall as numbers rise here): a message as new as
        // the oldest run left had its key in a run that is still here.
        let floor = match side.index.runs().first() {
            Some(run) => run.newest_ms,
            None if side.index.dropped_any => Millis::MAX,
            None => 0,
        };
        let all: HashSet<index::Key> = keys_in(conn, "SELECT room_id, iv FROM messages")
            .into_iter()
            .collect();
        let messages = keys_in_rows(
            conn,
            "SELECT room_id, iv FROM messages WHERE created_at >= ?1",
            floor,
        );
        let table: HashSet<index::Key> = keys_in_blocks(conn).into_iter().collect();
        let memory: Vec<index::Key> = side.index.memory().copied().collect();
        let distinct: HashSet<index::Key> = memory.iter().copied().collect();
        assert_eq!(distinct.len(), memory.len(), "a key twice in memory");
        assert!(
            memory.iter().all(|k| all.contains(k)),
            "a key in memory that no stored message has"
        );
        assert!(
            messages
                .iter()
                .all(|k| table.contains(k) || distinct.contains(k)),
            "a stored message's key is neither in memory nor in the table"
        );
        assert!(
            table.iter().chain(&memory).all(|k| side.filter.holds(k)),
            "the replay key filter rules out a key it holds"
        );
        let indexed = keys_in_rows(
            conn,
            "SELECT room_id, iv FROM messages
             WHERE id <= (SELECT indexed_through FROM replay_index) AND created_at >= ?1",
            floor,
        );
        assert!(
            indexed.iter().all(|k| table.contains(k)),
            "a message at or below the mark has no key in the table"
        );
        let mut firsts = conn
            .prepare("SELECT first, keys FROM replay_blocks")
            .unwrap();
        let mut rows = firsts.query([]).unwrap();
        while let Some(r) = rows.next().unwrap() {
            let (first, keys): (Vec<u8>, Vec<u8>) = (r.get(0).unwrap(), r.get(1).unwrap());
            let keys: Vec<index::Key> = index::block_keys(&keys).collect();
            assert!(keys.is_sorted() && !keys.is_empty() && keys.len() <= 128);
            assert_eq!(
                first, keys[0],
                "a block filed under another key than its first"
            );
        }
        let runs: Vec<(i64, Millis)> = conn
            .prepare("SELECT run, newest_ms FROM replay_runs ORDER BY run")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let mut known: Vec<(i64, Millis)> = side
            .index
            .runs()
            .iter()
            .map(|r| (r.id, r.newest_ms))
            .collect();
        let last = known.last().copied();
        known.sort_unstable();
        let but_last: Vec<(i64, Millis)> =
            known.iter().copied().filter(|r| Some(*r) != last).collect();
        // The moving generation's run (the last by age) is known before its first chunk is
        // written.
        assert!(
            known == runs || but_last == runs,
            "runs in memory {known:?}, in the table {runs:?}"
        );
        // Within a run, the blocks in the order of their first keys hold ascending keys, each
        // once (a merge's output as much as a generation's).
        let mut in_order = conn
            .prepare("SELECT run, keys FROM replay_blocks ORDER BY run, first")
            .unwrap();
        let mut rows = in_order.query([]).unwrap();
        let mut previous: Option<(i64, index::Key)> = None;
        while let Some(r) = rows.next().unwrap() {
            let (run, keys): (i64, Vec<u8>) = (r.get(0).unwrap(), r.get(1).unwrap());
            for k in index::block_keys(&keys) {
                if let Some((run_before, before)) = previous {
                    assert!(
                        run_before != run || before < k,
                        "run {run} holds keys out of order or twice"
                    );
                }
                previous = Some((run, k));
            }
        }
        let orphans: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM replay_blocks WHERE run NOT IN (SELECT run FROM replay_runs)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(orphans, 0, "keys of a run that is not recorded");
        assert_seqs_consistent(&side);
        (table.len(), side.index.in_memory())
    }

    /// The seq entries in memory and in the table are exactly the stored messages' (room, seq,
    /// id), every message at or below the mark has its entry in the table, and within a room
    /// the seqs in memory are above the table's.
    fn assert_seqs_consistent(side: &WriteSide) {
        let conn = &side.conn;
        let triples = |sql: &str| -> Vec<index::SeqEntry> {
            conn.prepare(sql)
                .unwrap()
                .query_map([], |r| {
                    let room: Vec<u8> = r.get(0)?;
                    Ok((room.try_into().unwrap(), r.get(1)?, r.get(2)?))
                })
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        let mut messages = triples("SELECT room_id, seq, id FROM messages");
        let table = triples("SELECT room_id, seq, id FROM message_seqs");
        let recent = side.recent().all();
        assert_eq!(side.recent().len(), recent.len());
        let mut known: Vec<_> = table.iter().chain(&recent).copied().collect();
        messages.sort_unstable();
        known.sort_unstable();
        assert_eq!(known, messages, "seq entries = stored messages, each once");
        let mark: i64 = conn
            .query_row("SELECT indexed_through FROM replay_index", [], |r| r.get(0))
            .unwrap();
        for (room, seq, id) in &messages {
            if *id <= mark {
                assert!(
                    table.contains(&(*room, *seq, *id)),
                    "message {id} at or below the mark {mark} has no seq entry in the table"
                );
            }
        }
        for (room, seq, _) in &recent {
            assert!(
                table.iter().all(|(r, s, _)| r != room || s < seq),
                "a seq in memory below one in the table"
            );
        }
    }

    async fn append(store: &SqliteStore, batch: &[NewMessage], now: Millis) -> Vec<AppendOutcome> {
        let out = store.append(batch, now).await.unwrap();
        assert_consistent(store);
        out
    }

    /// Store messages with these IV numbers in `room`, ten per append; every outcome in order.
    async fn append_in_tens(
        store: &SqliteStore,
        room: RoomId,
        numbers: impl IntoIterator<Item = u32>,
        now: Millis,
    ) -> Vec<AppendOutcome> {
        let numbers: Vec<u32> = numbers.into_iter().collect();
        let mut out = Vec::with_capacity(numbers.len());
        for chunk in numbers.chunks(10) {
            let batch: Vec<NewMessage> = chunk.iter().map(|n| message(room, *n)).collect();
            out.extend(append(store, &batch, now).await);
        }
        out
    }

    #[tokio::test]
    async fn replays_are_refused_from_memory_from_the_table_and_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let now = super::super::now_ms();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        create(&store, a, now).await;
        create(&store, b, now).await;
        for chunk in (1..=40u32).collect::<Vec<_>>().chunks(5) {
            let batch: Vec<_> = chunk.iter().map(|n| message(a, *n)).collect();
            let out = append(&store, &batch, now).await;
            assert!(
                out.iter()
                    .all(|o| matches!(o, AppendOutcome::Stored { .. }))
            );
        }
        let (in_table, in_memory) = assert_consistent(&store);
        assert!(
            in_table > 0 && in_memory > 0,
            "{in_table} in the table, {in_memory} in memory"
        );
        // Every stored IV is refused, wherever its key is; another room may use it.
        for n in 1..=40 {
            let out = append(&store, &[message(a, n), message(b, n)], now).await;
            assert_eq!(out[0], AppendOutcome::Replay, "IV {n}");
            assert!(
                matches!(out[1], AppendOutcome::Stored { .. }),
                "IV {n} in room b"
            );
        }
        // Twice in one batch: the second is the replay.
        let out = append(&store, &[message(a, 100), message(a, 100)], now).await;
        assert_eq!(
            out,
            vec![AppendOutcome::Stored { seq: 41 }, AppendOutcome::Replay]
        );

        // A clean stop writes every key into the table.
        drop(store);
        let store = open(dir.path()).await;
        assert_eq!(assert_consistent(&store), (81, 0));
        for n in [1, 40, 100] {
            let out = append(&store, &[message(a, n)], now).await;
            assert_eq!(out, vec![AppendOutcome::Replay], "IV {n} after a restart");
        }
    }

    /// Append fresh messages to `room`, numbered from `n`, until the writer's replay key filter
    /// is built (it is taken in between appends); returns the next number.
    async fn until_filter_built(store: &SqliteStore, room: RoomId, now: Millis, mut n: u32) -> u32 {
        for _ in 0..500 {
            if store.inner.writer.lock().unwrap().filter.ready() {
                return n;
            }
            append(store, &[message(room, n)], now).await;
            n += 1;
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the replay key filter was not built within 5 s");
    }

    /// Once the filter is built, new keys are not looked up in the table (a few may be), and
    /// every replay is still refused: of keys in the table from before a restart, of keys in
    /// memory, and of keys stored since.
    #[tokio::test]
    async fn the_replay_filter_spares_lookups_and_refuses_every_replay() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let now = super::super::now_ms();
        let a = [9u8; 16];
        create(&store, a, now).await;
        append_in_tens(&store, a, 1..=200, now).await;
        drop(store);
        let store = open(dir.path()).await;
        let next = until_filter_built(&store, a, now, 1_000).await;
        store.inner.writer.lock().unwrap().filter.lookups = 0;
        let out = append_in_tens(&store, a, 2_000..2_300, now).await;
        assert!(
            out.iter()
                .all(|o| matches!(o, AppendOutcome::Stored { .. }))
        );
        let lookups = store.inner.writer.lock().unwrap().filter.lookups;
        assert!(lookups < 10, "{lookups} of 300 new keys looked up");
        for n in (1..=200).chain(1_000..next).chain(2_000..2_300) {
            let out = append(&store, &[message(a, n)], now).await;
            assert_eq!(out, vec![AppendOutcome::Replay], "IV {n}");
        }
        let lookups = store.inner.writer.lock().unwrap().filter.lookups;
        assert!(
            lookups >= 300 + u64::from(next - 1_000) + 200,
            "replays are looked up"
        );
    }

    /// The filter is sized for the keys in the runs (and in memory), not for the span of
    /// message ids: messages older than every replay window keep their rows for 30 days but
    /// not their keys.
    #[tokio::test]
    async fn the_filter_is_sized_for_the_keys_held_not_the_messages() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let now = super::super::now_ms();
        let a = [23u8; 16];
        create(&store, a, now).await;
        append_in_tens(&store, a, 1..=100, now).await;
        drop(store);
        // One more message, numbered as if ten million had been stored and expired between
        // (written beside the server, above the mark: the next open keys it).
        Connection::open(dir.path().join("nanochat.db"))
            .unwrap()
            .execute(
                "INSERT INTO messages (id, room_id, seq, created_at, epoch, iv, ct)
                 VALUES (10000000, ?1, 101, ?2, 0, ?3, x'01')",
                params![&a[..], now, &message(a, 101).iv[..]],
            )
            .unwrap();
        let store = open(dir.path()).await;
        store.inner.writer.lock().unwrap().filter = ReplayFilter::with_min_keys(64);
        let next = until_filter_built(&store, a, now, 1_000).await;
        let bytes = store.inner.writer.lock().unwrap().filter.bytes();
        // Sized for the ten million ids it would take 40 MB.
        assert!(bytes <= 64 << 10, "{bytes} bytes for about a hundred keys");
        for n in (1..=101).chain(1_000..next) {
            let out = append(&store, &[message(a, n)], now).await;
            assert_eq!(out, vec![AppendOutcome::Replay], "IV {n}");
        }
    }

    /// A filter that fills up is replaced by a new one built while messages keep coming, and
    /// no replay gets through at any point of it.
    #[tokio::test]
    async fn replays_stay_refused_while_the_filter_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        // Room for 64 keys: a new filter after every 32.
        store.inner.writer.lock().unwrap().filter = ReplayFilter::with_min_keys(64);
        let now = super::super::now_ms();
        let a = [10u8; 16];
        create(&store, a, now).await;
        for round in 0..40u32 {
            let fresh: Vec<_> = (0..20).map(|i| message(a, round * 20 + i)).collect();
            let out = append(&store, &fresh, now).await;
            assert!(
                out.iter()
                    .all(|o| matches!(o, AppendOutcome::Stored { .. })),
                "round {round}: {out:?}"
            );
            let earlier: Vec<_> = (0..10)
                .map(|j| message(a, (round * 7 + j * 13) % (round * 20 + 20)))
                .collect();
            let out = append(&store, &earlier, now).await;
            assert!(
                out.iter().all(|o| *o == AppendOutcome::Replay),
                "round {round}: {out:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let builds = store.inner.writer.lock().unwrap().filter.builds;
        assert!(builds >= 3, "{builds} filters built");
    }

    /// Keys met while their generation is half-way into the table: some in memory, sorted,
    /// the rest in the table.
    #[tokio::test]
    async fn replays_are_refused_while_a_generation_moves() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let now = super::super::now_ms();
        let a = [7u8; 16];
        create(&store, a, now).await;
        // Single messages: each transaction moves 3 keys of a generation of 8.
        for n in [5, 2, 8, 1, 7, 3, 6, 4] {
            append(&store, &[message(a, n)], now).await;
        }
        assert_eq!(
            assert_consistent(&store),
            (0, 8),
            "one generation, not moved yet"
        );
        let mut moved = Vec::new();
        for n in [4, 8, 1, 5, 3, 7, 2, 6] {
            let out = append(&store, &[message(a, n)], now).await;
            assert_eq!(out, vec![AppendOutcome::Replay], "IV {n}");
            moved.push(assert_consistent(&store));
        }
        assert_eq!(moved[..3], [(3, 5), (6, 2), (8, 0)]);
    }

    /// Runs of several blocks, among several runs: every key is found in the one block that
    /// can hold it, whichever run it is in, and keys between and around them are not.
    #[tokio::test]
    async fn keys_are_found_in_runs_of_many_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        small_index(&store, 300, 300);
        let now = super::super::now_ms();
        let a = [11u8; 16];
        create(&store, a, now).await;
        // Even IVs only, in batches of 10: two generations of 300 (three blocks each, the
        // last one short) move into the table while the rest waits in memory.
        append_in_tens(&store, a, (0..900).map(|n| 2 * n), now).await;
        let (in_table, in_memory) = assert_consistent(&store);
        assert_eq!((in_table, in_memory), (600, 300));
        let blocks: i64 = store
            .inner
            .writer
            .lock()
            .unwrap()
            .conn
            .query_row("SELECT COUNT(*) FROM replay_blocks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(blocks, 6);
        // Straight to the lookup, past the filter: every even IV is held, no odd one (whose
        // probe lands in the block below it, or before the first block).
        {
            let side = store.inner.writer.lock().unwrap();
            let mut probe = PendingIndex::probe(&side.conn).unwrap();
            for n in 0..1801u32 {
                let k = index::key(&a, &message(a, n).iv);
                let held = side.index.contains(&mut probe, &k, 0).unwrap();
                assert_eq!(held, n % 2 == 0 && n < 1800, "IV {n}");
            }
            let other = index::key(&[12u8; 16], &message(a, 0).iv);
            assert!(!side.index.contains(&mut probe, &other, 0).unwrap());
        }
        for n in (0..1800u32).step_by(7) {
            let out = append(&store, &[message(a, n)], now).await;
            assert_eq!(
                out[0] == AppendOutcome::Replay,
                n % 2 == 0,
                "IV {n}: {out:?}"
            );
        }
    }

    /// Runs whose newest messages fall in the same ended hour merge into one, and again by six
    /// hours once those have ended; the current hour's stay. No key is lost or duplicated,
    /// every one is still refused, and the runs come back in the same order after a restart.
    #[tokio::test]
    async fn runs_of_an_ended_hour_merge_and_every_key_is_still_found() {
        const HOUR: Millis = 3_600_000;
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        small_index(&store, 200, 200);
        let six = super::super::now_ms().div_euclid(6 * HOUR) * 6 * HOUR - 6 * HOUR;
        let a = [21u8; 16];
        create(&store, a, six - 6 * HOUR).await;
        // Generations of 200 keys (two blocks each): two in each of the last six hours' first
        // two hours, then two, three and two in the hours 1, 2 and 3 of this six.
        let hours: [(Millis, u32); 5] = [(-6, 2), (-5, 2), (1, 2), (2, 3), (3, 2)];
        let mut n = 0u32;
        for (hour, generations) in hours {
            let to = n + generations * 200;
            append_in_tens(&store, a, n..to, six + hour * HOUR + 600_000).await;
            n = to;
        }
        let runs = |store: &SqliteStore| store.inner.writer.lock().unwrap().index.runs().to_vec();
        let keys = |store: &SqliteStore| {
            let mut keys = keys_in_blocks(&store.inner.writer.lock().unwrap().conn);
            keys.sort_unstable();
            keys
        };
        assert_eq!(runs(&store).len(), 11, "{:?}", runs(&store));
        let before = keys(&store);

        // Half past hour 3: the previous six hours' four runs become one, hours 1 and 2 one
        // each; hour 3 has not ended.
        let now = six + 3 * HOUR + HOUR / 2;
        let report = store.maintain(now).await.unwrap();
        assert_eq!(report.replay_runs_merged, 4 + 2 + 3);
        assert_eq!(
            report.replay_keys_dropped, 0,
            "merged keys are not dropped ones"
        );
        let after = runs(&store);
        let times: Vec<Millis> = after.iter().map(|r| r.newest_ms).collect();
        assert_eq!(times.len(), 5, "{after:?}");
        assert_eq!(
            times[0],
            six - 5 * HOUR + 600_000,
            "the latest of its inputs"
        );
        assert_eq!(times[1], six + HOUR + 600_000);
        assert_eq!(times[2], six + 2 * HOUR + 600_000);
        assert!(times[3..].iter().all(|t| *t == six + 3 * HOUR + 600_000));
        assert_eq!(keys(&store), before, "the same keys, each once");
        assert_consistent(&store);
        assert_eq!(store.maintain(now).await.unwrap().replay_runs_merged, 0);

        // Every stored IV is held, past the filter and through an append; no other is.
        {
            let side = store.inner.writer.lock().unwrap();
            let mut probe = PendingIndex::probe(&side.conn).unwrap();
            for m in (0..n + 50).step_by(3) {
                let k = index::key(&a, &message(a, m).iv);
                assert_eq!(
                    side.index.contains(&mut probe, &k, 0).unwrap(),
                    m < n,
                    "IV {m}"
                );
            }
        }
        let out = append(
            &store,
            &[message(a, 0), message(a, n - 1), message(a, n)],
            now,
        )
        .await;
        assert_eq!(out[..2], [AppendOutcome::Replay, AppendOutcome::Replay]);
        assert!(matches!(out[2], AppendOutcome::Stored { .. }), "{out:?}");

        // A restart finds the runs in the same order (and one more, written at close with the
        // clock's time: this hour); once this six hours has ended, its four runs are one.
        drop(store);
        let store = open(dir.path()).await;
        small_index(&store, 200, 200);
        let reopened: Vec<Millis> = runs(&store).iter().map(|r| r.newest_ms).collect();
        assert_eq!(reopened[..5], times[..], "{reopened:?}");
        let report = store.maintain(six + 6 * HOUR).await.unwrap();
        assert_eq!(report.replay_runs_merged, 4);
        assert_eq!(runs(&store).len(), 3, "{:?}", runs(&store));
        assert_consistent(&store);
        for m in [0, 1, n / 2, n - 1, n] {
            let out = append(&store, &[message(a, m)], six + 6 * HOUR).await;
            assert_eq!(out, [AppendOutcome::Replay], "IV {m}");
        }
    }

    /// A merge cut short (a crash between its transactions) leaves a run that no lookup
    /// reads; the next maintenance drops it and merges afresh.
    #[tokio::test]
    async fn a_merge_cut_short_is_dropped_and_done_again() {
        const HOUR: Millis = 3_600_000;
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        small_index(&store, 300, 300);
        let hour = super::super::now_ms().div_euclid(HOUR) * HOUR - 2 * HOUR;
        let a = [22u8; 16];
        create(&store, a, hour).await;
        append_in_tens(&store, a, 0..700, hour + 60_000).await;
        let now = hour + HOUR + 60_000;
        {
            let mut guard = store.inner.writer.lock().unwrap();
            let side = &mut *guard;
            let group = side
                .index
                .merge_group(now)
                .expect("two runs of an ended hour");
            assert_eq!(group, 0..2);
            let mut merge = side.index.start_merge(group);
            let tx = side.conn.transaction().unwrap();
            assert!(!index::merge_step(&tx, &mut merge, 1).unwrap());
            tx.commit().unwrap();
            assert_eq!(merge.keys(), 128);
            // The unfinished run waits first, for maintenance to drop; lookups still read the
            // inputs.
            assert_eq!(side.index.runs()[0].newest_ms, 0);
            let mut probe = PendingIndex::probe(&side.conn).unwrap();
            let k = index::key(&a, &message(a, 599).iv);
            assert!(side.index.contains(&mut probe, &k, 1).unwrap());
        }
        drop(store);
        let store = open(dir.path()).await;
        small_index(&store, 300, 300);
        let first = store.inner.writer.lock().unwrap().index.runs()[0];
        assert_eq!(first.newest_ms, 0, "the unfinished run, left to drop");
        let report = store.maintain(now).await.unwrap();
        assert_eq!(report.replay_keys_dropped, 128, "the unfinished run's");
        assert_eq!(report.replay_runs_merged, 2);
        // The merged run, and the one written at close (the 100 keys waiting in memory).
        let runs = store.inner.writer.lock().unwrap().index.runs().to_vec();
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert_consistent(&store);
        for m in (0..700u32).step_by(13) {
            let out = append(&store, &[message(a, m)], now).await;
            assert_eq!(out, [AppendOutcome::Replay], "IV {m}");
        }
    }

    /// A crash leaves the keys of the messages stored above the mark only in memory, which is
    /// gone: the next open puts them into the table.
    #[tokio::test]
    async fn keys_lost_in_a_crash_are_recovered_from_the_messages() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let now = super::super::now_ms();
        let a = [3u8; 16];
        create(&store, a, now).await;
        for n in 1..=30 {
            append(&store, &[message(a, n)], now).await;
        }
        drop(store);
        {
            // The state a crash leaves: the mark at rowid 10, keys above it missing.
            let conn = Connection::open(dir.path().join("nanochat.db")).unwrap();
            conn.execute_batch(
                "UPDATE replay_index SET indexed_through = 10;
                 DELETE FROM message_seqs WHERE id > 10;",
            )
            .unwrap();
            let lost = keys_in_rows(&conn, "SELECT room_id, iv FROM messages WHERE id > ?1", 10);
            let blocks: Vec<(i64, Vec<u8>, Vec<u8>)> = conn
                .prepare("SELECT run, first, keys FROM replay_blocks")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            for (run, first, keys) in blocks {
                let kept: Vec<u8> = index::block_keys(&keys)
                    .filter(|k| !lost.contains(k))
                    .flatten()
                    .collect();
                conn.execute(
                    "DELETE FROM replay_blocks WHERE run = ?1 AND first = ?2",
                    params![run, first],
                )
                .unwrap();
                if !kept.is_empty() {
                    conn.execute(
                        "INSERT INTO replay_blocks (run, first, keys) VALUES (?1, ?2, ?3)",
                        params![run, &kept[..28], kept],
                    )
                    .unwrap();
                }
            }
            assert_eq!(keys_in_blocks(&conn).len(), 10);
        }
        let store = open(dir.path()).await;
        assert_eq!(assert_consistent(&store), (30, 0));
        let page = store
            .messages(&a, HistoryQuery::After(0), 100, now)
            .await
            .unwrap();
        let seqs: Vec<i64> = page.messages.iter().map(|m| m.seq).collect();
        assert_eq!(
            seqs,
            (1..=30).collect::<Vec<_>>(),
            "history after the crash"
        );
        for n in 1..=30 {
            let out = append(&store, &[message(a, n)], now).await;
            assert_eq!(out, vec![AppendOutcome::Replay], "IV {n} after the crash");
        }
    }

    /// Expiry and wipes never leave a message above the mark (SQLite reuses the rowids of
    /// deleted top rows); replay keys stay while any message's window can reach them, wherever
    /// they are, and leave a run at a time once none can.
    #[tokio::test]
    async fn keys_leave_with_their_runs_once_no_window_reaches_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let t0 = super::super::now_ms();
        let later = t0 + 20 * EPOCH_MS;
        let (a, b) = ([4u8; 16], [5u8; 16]);
        create(&store, a, t0).await;
        create(&store, b, t0).await;
        for n in 1..=20 {
            append(&store, &[message(a, n)], t0).await;
        }
        for n in 21..=30 {
            append(&store, &[message(a, n)], later).await;
        }
        for n in 1..=7 {
            append(&store, &[message(b, n)], later).await;
        }
        // Room b holds the highest rowids; wiping it must lower the mark before their numbers
        // come back.
        assert!(store.wipe(&b, later).await.unwrap());
        assert_consistent(&store);
        for n in 31..=35 {
            append(&store, &[message(a, n)], later).await;
        }
        let runs = |store: &SqliteStore| store.inner.writer.lock().unwrap().index.runs().to_vec();
        assert!(runs(&store).len() >= 3, "{:?}", runs(&store));

        // Two days on, the runs of day `later` are within reach: nothing of them goes, and
        // their keys (wiped room b's too) are still refused; the runs of day t0 are not.
        let day_after_next = later + 2 * EPOCH_MS;
        let report = store.maintain(day_after_next).await.unwrap();
        assert_eq!(report.messages_deleted, 0);
        let left = runs(&store);
        assert!(left.iter().all(|r| r.newest_ms >= later), "{left:?}");
        assert!(report.replay_keys_dropped >= 1);
        let (in_table, in_memory) = assert_consistent(&store);
        assert!(in_table > 0, "{in_table} keys in the table");
        let out = append(
            &store,
            &[message(a, 21), message(a, 35), message(b, 1)],
            day_after_next,
        )
        .await;
        assert_eq!(
            out,
            [
                AppendOutcome::Replay,
                AppendOutcome::Replay,
                AppendOutcome::RoomGone
            ]
        );

        // Eleven days after t0's messages expire, every run of day `later` is out of reach.
        let rows = |store: &SqliteStore| {
            keys_in_blocks(&store.inner.writer.lock().unwrap().conn).len() as i64
        };
        let before = rows(&store);
        let now = t0 + 31 * EPOCH_MS;
        let report = store.maintain(now).await.unwrap();
        assert_eq!(report.messages_deleted, 20);
        assert_eq!(report.replay_keys_dropped as i64, before);
        assert_eq!(assert_consistent(&store), (0, in_memory));
        assert!(runs(&store).is_empty());
        // Stored messages 21..35 are out of every window now (a client could not send their
        // epoch any more): their keys are refused only while they still wait in memory.
        let waiting = |n: u32| {
            let k = index::key(&a, &message(a, n).iv);
            store
                .inner
                .writer
                .lock()
                .unwrap()
                .index
                .memory()
                .any(|m| *m == k)
        };
        let expected: Vec<AppendOutcome> = [21, 35]
            .iter()
            .scan(36, |seq, &n| {
                Some(if waiting(n) {
                    AppendOutcome::Replay
                } else {
                    *seq += 1;
                    AppendOutcome::Stored { seq: *seq }
                })
            })
            .collect();
        let out = append(
            &store,
            &[message(a, 1), message(a, 21), message(a, 35)],
            now,
        )
        .await;
        assert_eq!(out[0], AppendOutcome::Stored { seq: 36 });
        assert_eq!(out[1..], expected[..]);
        assert!(waiting(35), "the newest key waits in memory");
        drop(store);
        let store = open(dir.path()).await;
        assert_eq!(assert_consistent(&store).1, 0);
    }

    /// Every history query a client can make, against a scan of the messages table: the same
    /// page whether the messages' seqs wait in memory, are moving, or are in the table.
    async fn assert_history(store: &SqliteStore, room: RoomId, now: Millis) {
        let cutoff = store.inner.retention.message_cutoff(now);
        let all: Vec<i64> = {
            let side = store.inner.writer.lock().unwrap();
            side.conn
                .prepare(
                    "SELECT seq FROM messages WHERE room_id = ?1 AND created_at >= ?2 ORDER BY seq",
                )
                .unwrap()
                .query_map(params![&room[..], cutoff], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        let top = all.last().copied().unwrap_or(0);
        let mut queries = vec![HistoryQuery::Latest];
        for at in [0, 1, top / 3, top / 2, top - 1, top, top + 1] {
            queries.push(HistoryQuery::Before(at));
            queries.push(HistoryQuery::After(at));
        }
        for limit in [1u32, 3, 7, 100] {
            for query in &queries {
                let matching: Vec<i64> = match *query {
                    HistoryQuery::Latest => all.clone(),
                    HistoryQuery::Before(b) => all.iter().copied().filter(|s| *s < b).collect(),
                    HistoryQuery::After(a) => all.iter().copied().filter(|s| *s > a).collect(),
                };
                let expected: Vec<i64> = match *query {
                    HistoryQuery::After(_) => {
                        matching.iter().take(limit as usize).copied().collect()
                    }
                    _ => matching[matching.len().saturating_sub(limit as usize)..].to_vec(),
                };
                let page = store.messages(&room, *query, limit, now).await.unwrap();
                let got: Vec<i64> = page.messages.iter().map(|m| m.seq).collect();
                assert_eq!(got, expected, "{query:?} limit {limit}");
                assert_eq!(
                    page.more,
                    matching.len() > limit as usize,
                    "{query:?} limit {limit}: more"
                );
            }
        }
    }

    /// History reads through every stage of the seq index: in memory, moving in chunks, in the
    /// table, after expiry, a wipe, and a restart.
    #[tokio::test]
    async fn history_reads_span_memory_and_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let t0 = super::super::now_ms();
        let later = t0 + 20 * EPOCH_MS;
        let (a, b) = ([8u8; 16], [9u8; 16]);
        create(&store, a, t0).await;
        create(&store, b, t0).await;
        let mut n = 0;
        for round in 0..16u32 {
            let when = if round < 6 { t0 } else { later };
            let mut batch = Vec::new();
            for _ in 0..round % 4 + 1 {
                n += 1;
                batch.push(message(a, n));
                if round % 3 != 0 {
                    batch.push(message(b, n));
                }
            }
            append(&store, &batch, when).await;
            assert_history(&store, a, later).await;
            assert_history(&store, b, later).await;
        }
        let (in_table, in_memory) = assert_consistent(&store);
        assert!(in_table > 0 && in_memory > 0, "{in_table} / {in_memory}");

        // Reads on a day when the first six rounds are past the retention, before and after
        // maintenance deletes them.
        let expired_day = t0 + 31 * EPOCH_MS;
        assert_history(&store, a, expired_day).await;
        store.maintain(expired_day).await.unwrap();
        assert_consistent(&store);
        assert_history(&store, a, expired_day).await;
        assert!(store.wipe(&b, expired_day).await.unwrap());
        assert_consistent(&store);
        assert_history(&store, b, expired_day).await;
        append(&store, &[message(a, 500), message(a, 501)], expired_day).await;
        assert_history(&store, a, expired_day).await;
        drop(store);
        let store = open(dir.path()).await;
        assert_eq!(assert_consistent(&store).1, 0);
        assert_history(&store, a, expired_day).await;
    }

    /// A message picked from memory whose row is gone (deleted between the copy and the read)
    /// does not shorten the page: the read takes the room's other entries instead.
    #[tokio::test]
    async fn history_reads_step_over_rows_gone_from_under_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        small_index(&store, 1000, 3);
        let now = super::super::now_ms();
        let a = [10u8; 16];
        create(&store, a, now).await;
        for n in 1..=10 {
            append(&store, &[message(a, n)], now).await;
        }
        assert_eq!(store.inner.recent.lock().unwrap().len(), 10);
        store
            .inner
            .writer
            .lock()
            .unwrap()
            .conn
            .execute(
                "DELETE FROM messages WHERE room_id = ?1 AND seq IN (2, 8, 9, 10)",
                params![&a[..]],
            )
            .unwrap();
        let seqs = |page: Page| page.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
        let page = store
            .messages(&a, HistoryQuery::Latest, 3, now)
            .await
            .unwrap();
        assert!(page.more);
        assert_eq!(seqs(page), [5, 6, 7]);
        let page = store
            .messages(&a, HistoryQuery::After(0), 2, now)
            .await
            .unwrap();
        assert!(page.more);
        assert_eq!(seqs(page), [1, 3]);
        let page = store
            .messages(&a, HistoryQuery::After(6), 3, now)
            .await
            .unwrap();
        assert!(!page.more);
        assert_eq!(seqs(page), [7]);
    }

    /// A version 4 database (one table of every key) keeps refusing the replays a window can
    /// still reach: the keys of its last three days' messages become runs at the first start;
    /// older keys are left behind.
    #[tokio::test]
    async fn a_version_4_database_keeps_the_keys_of_its_window() {
        let dir = tempfile::tempdir().unwrap();
        let now = super::super::now_ms();
        let old = now - 10 * EPOCH_MS;
        let a = [13u8; 16];
        {
            let conn = Connection::open(dir.path().join("nanochat.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL);
                 INSERT INTO schema_migrations VALUES (1, 0), (2, 0), (3, 0), (4, 0);",
            )
            .unwrap();
            for sql in &MIGRATIONS[..4] {
                conn.execute_batch(sql).unwrap();
            }
            conn.execute(
                "INSERT INTO rooms (id, auth_wrapped, created_at, last_active, last_seq)
                 VALUES (?1, x'00', ?2, ?3, 20)",
                params![&a[..], old, now],
            )
            .unwrap();
            for n in 1..=20u32 {
                let m = message(a, n);
                let at = if n <= 10 { old } else { now };
                conn.execute(
                    "INSERT INTO messages (room_id, seq, created_at, epoch, iv, ct)
                     VALUES (?1, ?2, ?3, 0, ?4, x'00')",
                    params![&a[..], n, at, &m.iv[..]],
                )
                .unwrap();
                let id = conn.last_insert_rowid();
                conn.execute(
                    "INSERT INTO message_seqs (room_id, seq, id) VALUES (?1, ?2, ?3)",
                    params![&a[..], n, id],
                )
                .unwrap();
                conn.execute(
                    "INSERT INTO message_ivs (room_id, iv) VALUES (?1, ?2)",
                    params![&a[..], &m.iv[..]],
                )
                .unwrap();
            }
            conn.execute("UPDATE replay_index SET indexed_through = 20", [])
                .unwrap();
        }
        let store = open(dir.path()).await;
        assert_eq!(assert_consistent(&store), (10, 0));
        {
            let side = store.inner.writer.lock().unwrap();
            let table: HashSet<index::Key> = keys_in_blocks(&side.conn).into_iter().collect();
            let want: HashSet<index::Key> = (11..=20)
                .map(|n| index::key(&a, &message(a, n).iv))
                .collect();
            assert_eq!(table, want);
            assert_eq!(side.index.runs().len(), 1);
            assert_eq!(side.index.runs()[0].newest_ms, now);
        }
        assert_history(&store, a, now).await;
        let out = append(&store, &[message(a, 15), message(a, 21)], now).await;
        assert_eq!(
            out,
            vec![AppendOutcome::Replay, AppendOutcome::Stored { seq: 21 }]
        );
    }

    /// A database from before the keys and seqs had tables of their own keeps refusing its
    /// replays and reading its history.
    #[tokio::test]
    async fn a_version_2_database_moves_its_keys_into_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let now = super::super::now_ms();
        let a = [6u8; 16];
        {
            let conn = Connection::open(dir.path().join("nanochat.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL);
                 INSERT INTO schema_migrations VALUES (1, 0), (2, 0);",
            )
            .unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(MIGRATIONS[1]).unwrap();
            conn.execute(
                "INSERT INTO rooms (id, auth_wrapped, created_at, last_active, last_seq)
                 VALUES (?1, x'00', ?2, ?2, 12)",
                params![&a[..], now],
            )
            .unwrap();
            for n in 1..=12u32 {
                let m = message(a, n);
                conn.execute(
                    "INSERT INTO messages (room_id, seq, created_at, epoch, iv, ct)
                     VALUES (?1, ?2, ?3, 0, ?4, x'00')",
                    params![&a[..], n, now, &m.iv[..]],
                )
                .unwrap();
            }
        }
        let store = open(dir.path()).await;
        assert_eq!(assert_consistent(&store), (12, 0));
        assert_history(&store, a, now).await;
        let out = append(&store, &[message(a, 12), message(a, 13)], now).await;
        assert_eq!(
            out,
            vec![AppendOutcome::Replay, AppendOutcome::Stored { seq: 13 }]
        );
    }
}
