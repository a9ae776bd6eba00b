//! The two lookups kept beside the messages, filled in large sorted steps:
//! - `message_ivs`, every stored message's `(room id, IV)`, so that a room never stores two
//!   messages with one IV (`replay`), exactly and across restarts and crashes;
//! - `message_seqs`, every stored message's `(room id, seq) → id`, which history reads go
//!   through.
//!
//! Writing each message's entries into B-trees as the message is stored costs a page per entry:
//! IVs are random, and with many busy rooms so are the rooms' places in the seq index, so each
//! entry lands on a leaf of its own, which is written to the WAL and again at the checkpoint.
//! Instead the entries of freshly stored messages wait in memory: the keys in `pending`, the
//! seqs in [`RecentSeqs`] (which history reads consult too). Once there are
//! [`PendingIndex::move_at`] of them they become a sorted generation (`moving`, `moving_seqs`)
//! that the following appends carry into the tables, a chunk in each of their transactions.
//! Sorted, many entries share each leaf, so a generation writes a page per many entries instead
//! of one per entry. A key is looked up in all three places, unless the writer's filter (see
//! `filter`) rules it out first.
//!
//! Durability: an entry in memory belongs to a committed message. `replay_index.indexed_through`
//! is a message id at or below which every stored message has both entries in the tables; it
//! moves up when a generation's last chunk commits. On open, the entries of messages above it go
//! into the tables again (a crash loses only memory). Ids grow with every insert, except that
//! SQLite reuses the numbers of the highest rows once they are deleted: every delete lowers the
//! mark to the highest id left, so no message is ever above the mark without its entries.

use std::collections::{HashMap, HashSet, VecDeque};

use rusqlite::{Connection, params};

use crate::crypto::{IV_LEN, RoomId};
use crate::protocol::HistoryQuery;

/// A room id and an IV, side by side (their order in the table's key).
pub(super) type Key = [u8; 16 + IV_LEN];

/// A message's place in its room's history: room id, seq, and the message's id.
pub(super) type SeqEntry = (RoomId, i64, i64);

/// Messages whose entries wait in memory before a generation starts moving them.
const MOVE_AT: usize = 65_536;
/// Entries of each kind each append's transaction carries into the tables at least; twice its
/// own batch when that is more, so a generation has moved before the next one is due and memory
/// stays under `MOVE_AT` messages and a batch. Kept small because on a large table each entry
/// of a chunk can land on a page of its own: 1024 pages (4 MB of WAL) add a few milliseconds to
/// one commit.
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

/// The seqs and ids of stored messages not yet in `message_seqs`, by room, oldest first.
/// Shared between the writer (which alone changes it, after its commits) and history reads.
///
/// For a read to miss nothing it must copy its room's entries *before* it reads the table: an
/// entry leaves here only after the commit that put it into the table, so whatever the copy
/// lacks was either in the table already or stored after the copy (newer than every entry of
/// the room copied or in the table). Within a room every seq here is above every seq in the
/// table, except for entries that moved after the copy, which are in both.
#[derive(Default)]
pub(super) struct RecentSeqs {
    rooms: HashMap<RoomId, VecDeque<(i64, i64)>>,
    len: usize,
}

impl RecentSeqs {
    /// Entries held.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The room's highest seq held here.
    pub(super) fn last_seq(&self, room: &RoomId) -> Option<i64> {
        self.rooms.get(room)?.back().map(|(seq, _)| *seq)
    }

    /// The room's entries, oldest first.
    pub(super) fn room(&self, room: &RoomId) -> Vec<(i64, i64)> {
        self.rooms
            .get(room)
            .map(|q| q.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The room's entries that `query` asks for, at most `n` of them in the order the query
    /// reads (newest first for `Latest` and `Before`), and the room's lowest seq held here.
    pub(super) fn select(
        &self,
        room: &RoomId,
        query: HistoryQuery,
        n: usize,
    ) -> (Vec<(i64, i64)>, Option<i64>) {
        let Some(q) = self.rooms.get(room) else {
            return (Vec::new(), None);
        };
        let lowest = q.front().map(|(seq, _)| *seq);
        let picked = match query {
            HistoryQuery::Latest => q.iter().rev().take(n).copied().collect(),
            HistoryQuery::Before(b) => q
                .iter()
                .rev()
                .filter(|(seq, _)| *seq < b)
                .take(n)
                .copied()
                .collect(),
            HistoryQuery::After(a) => q
                .iter()
                .filter(|(seq, _)| *seq > a)
                .take(n)
                .copied()
                .collect(),
        };
        (picked, lowest)
    }

    /// Every entry, unsorted.
    pub(super) fn all(&self) -> Vec<SeqEntry> {
        self.rooms
            .iter()
            .flat_map(|(room, q)| q.iter().map(|(seq, id)| (*room, *seq, *id)))
            .collect()
    }

    /// Entries of freshly committed messages (each room's in ascending seq).
    fn add(&mut self, stored: &[SeqEntry]) {
        for (room, seq, id) in stored {
            self.rooms.entry(*room).or_default().push_back((*seq, *id));
        }
        self.len += stored.len();
    }

    /// Entries now committed into the table: each room's oldest ones, up to the highest seq
    /// moved.
    fn moved(&mut self, chunk: &[SeqEntry]) {
        let mut highest: HashMap<RoomId, i64> = HashMap::new();
        for (room, seq, _) in chunk {
            let h = highest.entry(*room).or_insert(*seq);
            *h = (*h).max(*seq);
        }
        for (room, top) in highest {
            if let Some(q) = self.rooms.get_mut(&room) {
                while q.front().is_some_and(|(seq, _)| *seq <= top) {
                    q.pop_front();
                    self.len -= 1;
                }
                if q.is_empty() {
                    self.rooms.remove(&room);
                }
            }
        }
    }

    /// Drop the entries of deleted messages.
    fn retain(&mut self, keep: impl Fn(&SeqEntry) -> bool) {
        let mut len = 0;
        self.rooms.retain(|room, q| {
            q.retain(|(seq, id)| keep(&(*room, *seq, *id)));
            len += q.len();
            !q.is_empty()
        });
        self.len = len;
    }

    fn clear(&mut self) {
        self.rooms.clear();
        self.len = 0;
    }
}

/// Entries of stored messages not yet in their tables: `MOVE_AT` messages and one batch at
/// most, since a moving generation shrinks faster than the new entries grow. About 12 MB at
/// most (the key set's table keeps its capacity, 128k slots of 29 bytes; the generation's keys
/// and seqs, 1.8 + 2.6 MB; the recent seqs by room, about 1 MB per 65 536).
pub(super) struct PendingIndex {
    /// Keys stored since the last generation started.
    pending: HashSet<Key>,
    /// The generation moving into the tables, sorted in descending order, so that the next
    /// chunk (the smallest) is at the end: keys, and seq entries (by room and seq).
    moving: Vec<Key>,
    moving_seqs: Vec<SeqEntry>,
    /// Every message at or below this id has its entries in the tables once `moving` is in.
    moving_through: i64,
    move_at: usize,
    chunk: usize,
}

/// What one append transaction moved: the last `keys` keys and `seqs` seq entries of the
/// generation.
#[derive(Debug, Clone, Copy)]
pub(super) struct Step {
    keys: usize,
    seqs: usize,
}

impl PendingIndex {
    pub(super) fn new() -> Self {
        Self::with_sizes(MOVE_AT, CHUNK)
    }

    pub(super) fn with_sizes(move_at: usize, chunk: usize) -> Self {
        Self {
            pending: HashSet::new(),
            moving: Vec::new(),
            moving_seqs: Vec::new(),
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
    pub(super) fn memory(&self) -> impl Iterator<Item = &Key> {
        self.pending.iter().chain(&self.moving)
    }

    /// The statement [`PendingIndex::contains`] looks in the table with, prepared once per
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
        let n = self.chunk.max(2 * batch);
        let step = Step {
            keys: self.moving.len().min(n),
            seqs: self.moving_seqs.len().min(n),
        };
        insert_keys(
            conn,
            self.moving[self.moving.len() - step.keys..].iter().rev(),
        )?;
        insert_seqs(
            conn,
            self.moving_seqs[self.moving_seqs.len() - step.seqs..]
                .iter()
                .rev(),
        )?;
        if (step.keys > 0 || step.seqs > 0)
            && step.keys == self.moving.len()
            && step.seqs == self.moving_seqs.len()
        {
            // The generation's last chunk: the mark moves up with it.
            set_mark(conn, self.moving_through)?;
        }
        Ok(step)
    }

    /// After the append's commit: its entries wait, the moved ones leave memory, and a new
    /// generation starts when enough have gathered.
    pub(super) fn committed(
        &mut self,
        conn: &Connection,
        recent: &mut RecentSeqs,
        keys: impl IntoIterator<Item = Key>,
        seqs: &[SeqEntry],
        step: Step,
    ) {
        self.pending.extend(keys);
        recent.add(seqs);
        self.moving.truncate(self.moving.len() - step.keys);
        let left = self.moving_seqs.len() - step.seqs;
        recent.moved(&self.moving_seqs[left..]);
        self.moving_seqs.truncate(left);
        if self.moving.is_empty()
            && self.moving_seqs.is_empty()
            && self.pending.len() >= self.move_at
        {
            match highest_id(conn) {
                Ok(id) => {
                    self.moving = self.pending.drain().collect();
                    self.moving.sort_unstable_by(|a, b| b.cmp(a));
                    self.moving_seqs = recent.all();
                    // (room, seq) is unique: by room, then seq.
                    self.moving_seqs.sort_unstable_by(|a, b| b.cmp(a));
                    self.moving_through = id;
                }
                // Try again after the next append; the entries stay where they are.
                Err(e) => tracing::warn!(error = %e, "could not start moving index entries"),
            }
        }
    }

    /// Inside a transaction that deleted messages: no id above the highest one left may be
    /// claimed as indexed. Call [`PendingIndex::rows_deleted`] after the commit.
    pub(super) fn lower_mark(conn: &Connection) -> rusqlite::Result<i64> {
        let highest = highest_id(conn)?;
        conn.execute(
            "UPDATE replay_index SET indexed_through = MIN(indexed_through, ?1)",
            params![highest],
        )?;
        Ok(highest)
    }

    /// After a delete's commit: the highest id left (from [`PendingIndex::lower_mark`]) and the
    /// deleted messages whose entries were still in memory.
    pub(super) fn rows_deleted(
        &mut self,
        recent: &mut RecentSeqs,
        highest: i64,
        gone_key: impl Fn(&Key) -> bool,
        gone_seq: impl Fn(&SeqEntry) -> bool,
    ) {
        self.moving_through = self.moving_through.min(highest);
        self.pending.retain(|k| !gone_key(k));
        self.moving.retain(|k| !gone_key(k));
        self.moving_seqs.retain(|s| !gone_seq(s));
        recent.retain(|s| !gone_seq(s));
    }

    /// Inside an expiry transaction: drop the deleted messages' entries from the tables (the
    /// ones in memory go in [`PendingIndex::rows_deleted`]). Sorts both lists.
    pub(super) fn forget(
        conn: &Connection,
        keys: &mut [Key],
        seqs: &mut [(RoomId, i64)],
    ) -> rusqlite::Result<()> {
        keys.sort_unstable();
        seqs.sort_unstable();
        let mut delete =
            conn.prepare_cached("DELETE FROM message_ivs WHERE room_id = ?1 AND iv = ?2")?;
        for k in keys.iter() {
            delete.execute(params![&k[..16], &k[16..]])?;
        }
        let mut delete =
            conn.prepare_cached("DELETE FROM message_seqs WHERE room_id = ?1 AND seq = ?2")?;
        for (room, seq) in seqs.iter() {
            delete.execute(params![&room[..], seq])?;
        }
        Ok(())
    }

    /// Move every entry in memory into the tables in one transaction (at close).
    pub(super) fn flush(
        &mut self,
        conn: &mut Connection,
        recent: &mut RecentSeqs,
    ) -> rusqlite::Result<()> {
        if self.in_memory() == 0 && recent.len() == 0 {
            return Ok(());
        }
        let mut keys: Vec<Key> = self.pending.iter().chain(&self.moving).copied().collect();
        keys.sort_unstable();
        let mut seqs = recent.all();
        seqs.sort_unstable();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        insert_keys(&tx, keys.iter())?;
        insert_seqs(&tx, seqs.iter())?;
        set_mark(&tx, highest_id(&tx)?)?;
        tx.commit()?;
        self.pending.clear();
        self.moving.clear();
        self.moving_seqs.clear();
        recent.clear();
        Ok(())
    }
}

/// At open: put the entries of messages stored above the mark (after a crash) into the
/// tables. Returns how many messages were above it.
pub(super) fn recover(conn: &mut Connection) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mark: i64 = tx.query_row("SELECT indexed_through FROM replay_index", [], |r| r.get(0))?;
    let above = tx.execute(
        "INSERT INTO message_ivs (room_id, iv)
         SELECT room_id, iv FROM messages WHERE id > ?1 ORDER BY room_id, iv
         ON CONFLICT DO NOTHING",
        params![mark],
    )?;
    tx.execute(
        "INSERT INTO message_seqs (room_id, seq, id)
         SELECT room_id, seq, id FROM messages WHERE id > ?1 ORDER BY room_id, seq
         ON CONFLICT DO NOTHING",
        params![mark],
    )?;
    set_mark(&tx, highest_id(&tx)?)?;
    tx.commit()?;
    Ok(above)
}

fn insert_keys<'a>(conn: &Connection, keys: impl Iterator<Item = &'a Key>) -> rusqlite::Result<()> {
    let mut insert = conn.prepare_cached(
        "INSERT INTO message_ivs (room_id, iv) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
    )?;
    for k in keys {
        insert.execute(params![&k[..16], &k[16..]])?;
    }
    Ok(())
}

fn insert_seqs<'a>(
    conn: &Connection,
    seqs: impl Iterator<Item = &'a SeqEntry>,
) -> rusqlite::Result<()> {
    let mut insert = conn.prepare_cached(
        "INSERT INTO message_seqs (room_id, seq, id) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
    )?;
    for (room, seq, id) in seqs {
        insert.execute(params![&room[..], seq, id])?;
    }
    Ok(())
}

/// The highest message id (0 for none): the next message gets the one after it.
fn highest_id(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT COALESCE(MAX(id), 0) FROM messages", [], |r| {
        r.get(0)
    })
}

fn set_mark(conn: &Connection, id: i64) -> rusqlite::Result<()> {
    conn.execute("UPDATE replay_index SET indexed_through = ?1", params![id])?;
    Ok(())
}
