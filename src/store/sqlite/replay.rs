//! The replay check's keys: every stored message's `(room id, IV)`, so that a room never stores
//! two messages with one IV (`replay`), exactly and across restarts and crashes.
//!
//! Writing each message's key into a B-tree as the message is stored costs a page per message:
//! the keys are random, so each lands on a leaf of its own, which is written to the WAL and
//! again at the checkpoint (about 11 KB per message once the table has grown past the cache).
//! Instead the keys of freshly stored messages wait in memory (`pending`); once there are
//! [`ReplayKeys::move_at`] of them they become a sorted generation (`moving`) that the
//! following appends carry into the `message_ivs` table, a chunk in each of their
//! transactions. Sorted, many keys share each leaf, so a generation writes a page per many
//! keys instead of one per key. A key is looked up in all three places.
//!
//! Durability: a key in memory belongs to a committed message. `replay_index.indexed_through`
//! is a message rowid at or below which every stored message's key is in the table; it moves
//! up when a generation's last chunk commits. On open, the keys of messages above it go into
//! the table again (a crash loses only memory). Rowids grow with every insert, except that
//! SQLite reuses the numbers of the highest rows once they are deleted: every delete lowers the
//! mark to the highest rowid left, so no message is ever above the mark without its key.

use std::collections::HashSet;

use rusqlite::{Connection, params};

use crate::crypto::{IV_LEN, RoomId};

/// A room id and an IV, side by side (their order in the table's key).
pub(super) type Key = [u8; 16 + IV_LEN];

/// Keys in memory before a generation starts moving them into the table.
const MOVE_AT: usize = 65_536;
/// Keys each append's transaction carries into the table at least; twice its own batch when
/// that is more, so a generation has moved before the next one is due and memory stays under
/// `MOVE_AT` keys and a batch. Kept small because on a large table each key of a chunk can
/// land on a page of its own: 1024 pages (4 MB of WAL) add a few milliseconds to one commit.
const CHUNK: usize = 1_024;

pub(super) fn key(room: &RoomId, iv: &[u8; IV_LEN]) -> Key {
    let mut k = [0u8; 16 + IV_LEN];
    k[..16].copy_from_slice(room);
    k[16..].copy_from_slice(iv);
    k
}

/// The key of a row whose first two columns are `room_id` and `iv`. Rows written by this
/// server always fit; anything else becomes a key no message has.
pub(super) fn row_key(r: &rusqlite::Row<'_>) -> rusqlite::Result<Key> {
    let (room, iv) = (r.get_ref(0)?.as_blob()?, r.get_ref(1)?.as_blob()?);
    Ok(match (room.try_into(), iv.try_into()) {
        (Ok(room), Ok(iv)) => key(room, iv),
        _ => [0; 16 + IV_LEN],
    })
}

/// Keys of stored messages not yet in the table: `MOVE_AT` and one batch at most, since a
/// moving generation shrinks faster than `pending` grows. About 6 MB at most (the set's
/// table keeps its capacity, 128k slots of 29 bytes, beside the 1.8 MB generation).
pub(super) struct ReplayKeys {
    /// Stored since the last generation started.
    pending: HashSet<Key>,
    /// The generation moving into the table, sorted in descending order, so that the next
    /// chunk (the smallest keys) is at the end.
    moving: Vec<Key>,
    /// Every message at or below this rowid has its key in the table once `moving` is in.
    moving_through: i64,
    move_at: usize,
    chunk: usize,
}

/// What one append transaction moved: the last `len` keys of the generation.
#[derive(Debug, Clone, Copy)]
pub(super) struct Step {
    len: usize,
}

impl ReplayKeys {
    pub(super) fn new() -> Self {
        Self::with_sizes(MOVE_AT, CHUNK)
    }

    pub(super) fn with_sizes(move_at: usize, chunk: usize) -> Self {
        Self {
            pending: HashSet::new(),
            moving: Vec::new(),
            moving_through: 0,
            move_at: move_at.max(1),
            chunk: chunk.max(1),
        }
    }

    /// Keys waiting in memory.
    pub(super) fn in_memory(&self) -> usize {
        self.pending.len() + self.moving.len()
    }

    /// Every key in memory.
    #[cfg(test)]
    pub(super) fn memory(&self) -> impl Iterator<Item = &Key> {
        self.pending.iter().chain(&self.moving)
    }

    /// The statement [`ReplayKeys::contains`] looks in the table with, prepared once per
    /// transaction.
    pub(super) fn probe(conn: &Connection) -> rusqlite::Result<rusqlite::CachedStatement<'_>> {
        conn.prepare_cached("SELECT 1 FROM message_ivs WHERE room_id = ?1 AND iv = ?2")
    }

    /// Whether the key is stored: in memory or in the table.
    pub(super) fn contains(
        &self,
        probe: &mut rusqlite::Statement<'_>,
        k: &Key,
    ) -> rusqlite::Result<bool> {
        if self.pending.contains(k) || self.moving.binary_search_by(|probe| k.cmp(probe)).is_ok() {
            return Ok(true);
        }
        probe.exists(params![&k[..16], &k[16..]])
    }

    /// Inside an append's transaction of `batch` messages: move the generation's next chunk.
    pub(super) fn move_chunk(&self, conn: &Connection, batch: usize) -> rusqlite::Result<Step> {
        let len = self.moving.len().min(self.chunk.max(2 * batch));
        insert(conn, self.moving[self.moving.len() - len..].iter().rev())?;
        if len > 0 && len == self.moving.len() {
            // The generation's last chunk: the mark moves up with it.
            set_mark(conn, self.moving_through)?;
        }
        Ok(Step { len })
    }

    /// After the append's commit: its keys wait, the moved ones leave memory, and a new
    /// generation starts when enough have gathered.
    pub(super) fn committed(
        &mut self,
        conn: &Connection,
        stored: impl IntoIterator<Item = Key>,
        step: Step,
    ) {
        self.pending.extend(stored);
        self.moving.truncate(self.moving.len() - step.len);
        if self.moving.is_empty() && self.pending.len() >= self.move_at {
            match highest_rowid(conn) {
                Ok(rowid) => {
                    self.moving = self.pending.drain().collect();
                    self.moving.sort_unstable_by(|a, b| b.cmp(a));
                    self.moving_through = rowid;
                }
                // Try again after the next append; the keys stay where they are.
                Err(e) => tracing::warn!(error = %e, "could not start moving replay keys"),
            }
        }
    }

    /// Inside a transaction that deleted messages: no rowid above the highest one left may be
    /// claimed as indexed. Call [`ReplayKeys::rows_deleted`] after the commit.
    pub(super) fn lower_mark(conn: &Connection) -> rusqlite::Result<i64> {
        let highest = highest_rowid(conn)?;
        conn.execute(
            "UPDATE replay_index SET indexed_through = MIN(indexed_through, ?1)",
            params![highest],
        )?;
        Ok(highest)
    }

    /// After a delete's commit: the highest rowid left (from [`ReplayKeys::lower_mark`]) and
    /// the keys of the deleted messages that were still in memory.
    pub(super) fn rows_deleted(&mut self, highest: i64, gone: impl Fn(&Key) -> bool) {
        self.moving_through = self.moving_through.min(highest);
        self.pending.retain(|k| !gone(k));
        self.moving.retain(|k| !gone(k));
    }

    /// Inside an expiry transaction: drop the deleted messages' keys from the table (the ones
    /// in memory go in [`ReplayKeys::rows_deleted`]).
    pub(super) fn forget(conn: &Connection, keys: &mut [Key]) -> rusqlite::Result<()> {
        keys.sort_unstable();
        let mut delete =
            conn.prepare_cached("DELETE FROM message_ivs WHERE room_id = ?1 AND iv = ?2")?;
        for k in keys.iter() {
            delete.execute(params![&k[..16], &k[16..]])?;
        }
        Ok(())
    }

    /// Move every key in memory into the table in one transaction (at close).
    pub(super) fn flush(&mut self, conn: &mut Connection) -> rusqlite::Result<()> {
        if self.in_memory() == 0 {
            return Ok(());
        }
        let mut all: Vec<Key> = self.pending.iter().chain(&self.moving).copied().collect();
        all.sort_unstable();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        insert(&tx, all.iter())?;
        set_mark(&tx, highest_rowid(&tx)?)?;
        tx.commit()?;
        self.pending.clear();
        self.moving.clear();
        Ok(())
    }
}

/// At open: put the keys of messages stored above the mark (after a crash) into the table.
/// Returns how many messages were above it.
pub(super) fn recover(conn: &mut Connection) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mark: i64 = tx.query_row("SELECT indexed_through FROM replay_index", [], |r| r.get(0))?;
    let above = tx.execute(
        "INSERT INTO message_ivs (room_id, iv)
         SELECT room_id, iv FROM messages WHERE rowid > ?1 ORDER BY room_id, iv
         ON CONFLICT DO NOTHING",
        params![mark],
    )?;
    set_mark(&tx, highest_rowid(&tx)?)?;
    tx.commit()?;
    Ok(above)
}

fn insert<'a>(conn: &Connection, keys: impl Iterator<Item = &'a Key>) -> rusqlite::Result<()> {
    let mut insert = conn.prepare_cached(
        "INSERT INTO message_ivs (room_id, iv) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
    )?;
    for k in keys {
        insert.execute(params![&k[..16], &k[16..]])?;
    }
    Ok(())
}

/// The highest message rowid (0 for none): the next message gets the one after it.
fn highest_rowid(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT COALESCE(MAX(rowid), 0) FROM messages", [], |r| {
        r.get(0)
    })
}

fn set_mark(conn: &Connection, rowid: i64) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE replay_index SET indexed_through = ?1",
        params![rowid],
    )?;
    Ok(())
}
