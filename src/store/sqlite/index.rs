//! The two lookups kept beside the messages, filled in large sorted steps:
//! - `replay_blocks` (and `replay_runs`), the `(room id, IV)` of every message stored within
//!   the replay window (and of some older ones), so that a room never stores two messages with
//!   one IV (`replay`) while a copy could be accepted, across restarts and crashes;
//! - `message_seqs`, every stored message's `(room id, seq) → id`, which history reads go
//!   through.
//!
//! Writing each message's entries into B-trees as the message is stored costs a page per entry:
//! IVs are random, and with many busy rooms so are the rooms' places in the seq index, so each
//! entry lands on a leaf of its own, which is written to the WAL and again at the checkpoint.
//! Instead the entries of freshly stored messages wait in memory: the keys in `pending`, the
//! seqs in [`RecentSeqs`] (which history reads consult too). Once there are `move_at` of them
//! they become a sorted generation (`moving`, `moving_seqs`) that the following appends carry
//! into the tables, a chunk in each of their transactions. Sorted, many entries share each
//! leaf, so a generation writes a page per many entries instead of one per entry.
//!
//! Merged into one table of random keys, a generation's keys would still land on more distinct
//! leaves the larger the table grew (up to a page per key): the writer's cost per message
//! would grow with the messages stored. Even written side by side, a row per key costs a
//! statement and a B-tree insert per message. So each generation's keys become a *run* of
//! their own, stored as blocks of [`BLOCK`] sorted keys (`replay_blocks`: the run, the
//! block's first key, the keys), a row per block, appended whatever the table's size. A key is
//! looked up in memory and then in each run that can hold a copy the message's epoch allows
//! ([`crate::store::replay_window_start`]: a run whose newest message is older cannot), newest
//! first: the one block that could hold it, searched in memory. Unless, that is, the writer's
//! filter (see `filter`) rules the key out first. A run is dropped whole once no message's
//! window reaches it ([`PendingIndex::drop_aged`]); the keys of messages deleted before that
//! stay in their run (a repeat of such an IV is refused, as it was while stored).
//!
//! A busy instance starts a run every few minutes, and a repeat (or a key the filter lets
//! through) is looked up in each run of its window: hundreds of look-ups after a few days.
//! So maintenance merges the runs whose newest messages fall in the same ended hour, and those
//! of the same ended six hours again ([`merge_span`]), a few hundred blocks per transaction
//! ([`merge_step`]); a look-up then visits the current hour's runs and about twenty more,
//! whatever the rate. A merge keeps its inputs until its last transaction, which swaps them
//! for its run, and no merge takes a day's runs into another day, so merged keys leave on the
//! same day as they would have.
//!
//! Durability: an entry in memory belongs to a committed message. `replay_index.indexed_through`
//! is a message id at or below which every stored message has both entries in the tables (its
//! key until its run is dropped); it moves up when a generation's last chunk commits. On open,
//! the entries of messages above it go into the tables again, the keys as new runs (a crash
//! loses only memory). Ids grow with every insert, except that
//! SQLite reuses the numbers of the highest rows once they are deleted: every delete lowers the
//! mark to the highest id left, so no message is ever above the mark without its entries.

use std::collections::{HashMap, HashSet, VecDeque};

use rusqlite::{Connection, OptionalExtension, params};

use crate::crypto::{EPOCH_MS, IV_LEN, RoomId};
use crate::protocol::HistoryQuery;
use crate::store::Millis;

/// A room id and an IV, side by side (their order in the table's key).
pub(super) type Key = [u8; 16 + IV_LEN];

/// A message's place in its room's history: room id, seq, and the message's id.
pub(super) type SeqEntry = (RoomId, i64, i64);

/// Messages whose entries wait in memory before a generation starts moving them.
const MOVE_AT: usize = 65_536;
/// Keys per row of `replay_blocks`: 3.5 KiB of keys, so a row fits one 4 KiB page.
pub(super) const BLOCK: usize = 128;
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

/// Whether a block of sorted keys (as stored in `replay_blocks.keys`) holds `k`.
fn block_holds(block: &[u8], k: &Key) -> bool {
    let n = block.len() / k.len();
    let at = |i: usize| &block[i * k.len()..(i + 1) * k.len()];
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        match at(mid).cmp(&k[..]) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return true,
        }
    }
    false
}

/// The keys of a block as stored in `replay_blocks.keys` (a block written by anything else
/// than this server may end in a partial key, which is ignored).
pub(super) fn block_keys(block: &[u8]) -> impl Iterator<Item = Key> + '_ {
    block
        .chunks_exact(16 + IV_LEN)
        .map(|c| c.try_into().expect("chunks of a key's length"))
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

/// A run of replay keys in the table: its number, and a time no message it holds is newer than.
#[derive(Debug, Clone, Copy)]
pub(super) struct Run {
    pub(super) id: i64,
    pub(super) newest_ms: Millis,
}

/// The earliest time a run must still be looked in at `now`: the widest replay window starts
/// three days back (see [`crate::store::replay_window_start`]).
pub(super) fn keep_runs_since(now: Millis) -> Millis {
    (Millis::from(crate::crypto::epoch_of(now)) - 3) * EPOCH_MS
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
    /// The runs in the table, oldest first; the last one is `moving`'s while it moves. Runs
    /// left for maintenance to drop (inputs of a finished merge, the output of an unfinished
    /// one) go first, with time 0.
    runs: Vec<Run>,
    /// The number the next run gets.
    next_run: i64,
    /// The latest time an append was committed at.
    latest: Millis,
    /// Whether this process has dropped a run.
    #[cfg(test)]
    pub(super) dropped_any: bool,
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
            runs: Vec::new(),
            next_run: 1,
            latest: 0,
            #[cfg(test)]
            dropped_any: false,
            move_at: move_at.max(1),
            chunk: chunk.max(1),
        }
    }

    /// Learn the runs already in the table (at open, and for tests that swap the index).
    pub(super) fn load_runs(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        // By age: a merged run is numbered after the runs that followed its inputs.
        self.runs = conn
            .prepare("SELECT run, newest_ms FROM replay_runs ORDER BY newest_ms, run")?
            .query_map([], |r| {
                Ok(Run {
                    id: r.get(0)?,
                    newest_ms: r.get(1)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        self.next_run = self.runs.iter().map(|r| r.id + 1).max().unwrap_or(1);
        Ok(())
    }

    /// The runs in the table, oldest first.
    #[cfg(test)]
    pub(super) fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// Keys waiting in memory.
    pub(super) fn in_memory(&self) -> usize {
        self.pending.len() + self.moving.len()
    }

    /// Every key in memory.
    pub(super) fn memory(&self) -> impl Iterator<Item = &Key> {
        self.pending.iter().chain(&self.moving)
    }

    /// The statement [`PendingIndex::contains`] looks in a run with, prepared once per
    /// transaction: the run's block that would hold the key.
    pub(super) fn probe(conn: &Connection) -> rusqlite::Result<rusqlite::CachedStatement<'_>> {
        conn.prepare_cached(
            "SELECT keys FROM replay_blocks WHERE run = ?1 AND first <= ?2
             ORDER BY first DESC LIMIT 1",
        )
    }

    /// Whether the key is held: in memory, or in a run whose newest message was stored at
    /// `since` or later (the start of the message's replay window).
    pub(super) fn contains(
        &self,
        probe: &mut rusqlite::Statement<'_>,
        k: &Key,
        since: Millis,
    ) -> rusqlite::Result<bool> {
        if self.pending.contains(k) || self.moving.binary_search_by(|probe| k.cmp(probe)).is_ok() {
            return Ok(true);
        }
        // Newest first; a clock that stepped back can leave the times out of order.
        for run in self.runs.iter().rev().filter(|r| r.newest_ms >= since) {
            let held = probe
                .query_row(params![run.id, &k[..]], |r| {
                    Ok(block_holds(r.get_ref(0)?.as_blob()?, k))
                })
                .optional()?;
            if held == Some(true) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Inside an append's transaction of `batch` messages: move the generation's next chunk.
    pub(super) fn move_chunk(&self, conn: &Connection, batch: usize) -> rusqlite::Result<Step> {
        let n = self.chunk.max(2 * batch);
        let step = Step {
            keys: self.moving.len().min(n),
            seqs: self.moving_seqs.len().min(n),
        };
        if step.keys > 0 {
            // The run is `moving`'s, the last one (numbered when the generation started).
            let run = *self.runs.last().expect("a moving generation has its run");
            insert_keys(
                conn,
                run,
                self.moving[self.moving.len() - step.keys..].iter().rev(),
            )?;
        }
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

    /// After the append's commit at `now`: its entries wait, the moved ones leave memory, and
    /// a new generation (with a run of its own) starts when enough have gathered.
    pub(super) fn committed(
        &mut self,
        conn: &Connection,
        recent: &mut RecentSeqs,
        keys: impl IntoIterator<Item = Key>,
        seqs: &[SeqEntry],
        step: Step,
        now: Millis,
    ) {
        self.pending.extend(keys);
        self.latest = self.latest.max(now);
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
                    if !self.moving.is_empty() {
                        // Every message of the generation was stored by now.
                        self.runs.push(Run {
                            id: self.next_run,
                            newest_ms: now,
                        });
                        self.next_run += 1;
                    }
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

    /// Inside an expiry transaction: drop the deleted messages' seq entries from the table (the
    /// ones in memory go in [`PendingIndex::rows_deleted`]; replay keys leave with their runs).
    /// Sorts the list.
    pub(super) fn forget(conn: &Connection, seqs: &mut [(RoomId, i64)]) -> rusqlite::Result<()> {
        seqs.sort_unstable();
        let mut delete =
            conn.prepare_cached("DELETE FROM message_seqs WHERE room_id = ?1 AND seq = ?2")?;
        for (room, seq) in seqs.iter() {
            delete.execute(params![&room[..], seq])?;
        }
        Ok(())
    }

    /// Drop up to `limit` blocks of runs whose newest message is older than `before` (the
    /// oldest first), inside the caller's transaction. Returns the blocks and keys deleted and
    /// the runs emptied; call [`PendingIndex::runs_dropped`] with the last after the commit.
    /// The moving generation's run too, if it is that old (after days of a trickle of
    /// messages): its keys are past every window as well.
    pub(super) fn drop_aged(
        &self,
        conn: &Connection,
        before: Millis,
        limit: usize,
    ) -> rusqlite::Result<(usize, usize, usize)> {
        let (mut blocks, mut keys, mut emptied) = (0, 0, 0);
        let mut delete = conn.prepare_cached(
            "DELETE FROM replay_blocks WHERE rowid IN
             (SELECT rowid FROM replay_blocks WHERE run = ?1 LIMIT ?2)
             RETURNING length(keys)",
        )?;
        for run in self.runs.iter().take_while(|r| r.newest_ms < before) {
            let mut rows = delete.query(params![run.id, (limit - blocks) as i64])?;
            while let Some(r) = rows.next()? {
                blocks += 1;
                keys += r.get::<_, i64>(0)? as usize / (16 + IV_LEN);
            }
            if blocks == limit {
                break;
            }
            conn.execute("DELETE FROM replay_runs WHERE run = ?1", params![run.id])?;
            emptied += 1;
        }
        Ok((blocks, keys, emptied))
    }

    /// After [`PendingIndex::drop_aged`] committed: forget the runs it emptied. If that was
    /// the moving generation's, its keys still in memory go too (its seqs keep moving, and
    /// the mark then covers messages that no window reaches without their keys).
    pub(super) fn runs_dropped(&mut self, emptied: usize) {
        if emptied > 0 && emptied == self.runs.len() {
            self.moving.clear();
        }
        #[cfg(test)]
        {
            self.dropped_any |= emptied > 0;
        }
        self.runs.drain(..emptied);
    }

    /// The runs to merge next at `now`, if any: two or more side by side, complete, within
    /// reach of a replay window, whose newest messages fall in the same ended span of time
    /// (see [`merge_span`]). A merge takes the runs' place, so the order by age holds.
    pub(super) fn merge_group(&self, now: Millis) -> Option<std::ops::Range<usize>> {
        let complete = self
            .runs
            .len()
            .saturating_sub(usize::from(!self.moving.is_empty()));
        let keep = keep_runs_since(now);
        let span = |r: &Run| {
            if r.newest_ms < keep {
                None
            } else {
                merge_span(r.newest_ms, now)
            }
        };
        let mut start = 0;
        while start < complete {
            let first = span(&self.runs[start]);
            let mut end = start + 1;
            while first.is_some() && end < complete && span(&self.runs[end]) == first {
                end += 1;
            }
            if first.is_some() && end - start >= 2 {
                return Some(start..end);
            }
            start = end;
        }
        None
    }

    /// Start merging the runs of `group` (from [`PendingIndex::merge_group`]) into a new run.
    /// Until it is finished the new run is one for maintenance to drop, here and in the table
    /// (time 0), so a merge cut short (an error, a crash) leaves only work to undo.
    pub(super) fn start_merge(&mut self, group: std::ops::Range<usize>) -> Merge {
        let inputs = &self.runs[group];
        let merge = Merge {
            out: Run {
                id: self.next_run,
                newest_ms: inputs.iter().map(|r| r.newest_ms).max().unwrap_or(0),
            },
            inputs: inputs
                .iter()
                .map(|r| Cursor {
                    run: r.id,
                    after: Vec::new(),
                    keys: Vec::new(),
                    at: 0,
                    done: false,
                })
                .collect(),
            last: None,
            keys: 0,
        };
        self.next_run += 1;
        self.runs.insert(
            0,
            Run {
                id: merge.out.id,
                newest_ms: 0,
            },
        );
        merge
    }

    /// After the transaction in which [`merge_step`] finished `merge` committed: the new run
    /// takes its inputs' place, and the inputs wait at the front to be dropped.
    pub(super) fn merged(&mut self, merge: &Merge) {
        let inputs: HashSet<i64> = merge.inputs.iter().map(|c| c.run).collect();
        let mut runs: Vec<Run> = merge
            .inputs
            .iter()
            .map(|c| Run {
                id: c.run,
                newest_ms: 0,
            })
            .collect();
        let mut placed = false;
        for run in self.runs.drain(..) {
            if run.id == merge.out.id {
                continue;
            }
            if inputs.contains(&run.id) {
                if !placed && merge.keys > 0 {
                    runs.push(merge.out);
                }
                placed = true;
                continue;
            }
            runs.push(run);
        }
        self.runs = runs;
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
        let run = Run {
            id: self.next_run,
            newest_ms: crate::store::now_ms().max(self.latest),
        };
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if !keys.is_empty() {
            insert_keys(&tx, run, keys.iter())?;
        }
        insert_seqs(&tx, seqs.iter())?;
        set_mark(&tx, highest_id(&tx)?)?;
        tx.commit()?;
        if !keys.is_empty() {
            self.runs.push(run);
            self.next_run += 1;
        }
        self.pending.clear();
        self.moving.clear();
        self.moving_seqs.clear();
        recent.clear();
        Ok(())
    }
}

/// At open: put the entries of messages stored above the mark (after a crash, from a backup,
/// or from an older schema) into the tables, the keys as runs of up to `MOVE_AT` messages in
/// the order they were stored. Returns how many messages were above it.
pub(super) fn recover(conn: &mut Connection) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mark: i64 = tx.query_row("SELECT indexed_through FROM replay_index", [], |r| r.get(0))?;
    let mut run: i64 = tx.query_row(
        "SELECT COALESCE(MAX(run), 0) + 1 FROM replay_runs",
        [],
        |r| r.get(0),
    )?;
    let (mut above, mut after) = (0, mark);
    loop {
        let from = after;
        let mut newest_ms = Millis::MIN;
        let mut keys: Vec<Key> = tx
            .prepare_cached(
                "SELECT room_id, iv, id, created_at FROM messages WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?
            .query_map(params![from, MOVE_AT as i64], |r| {
                after = r.get(2)?;
                newest_ms = newest_ms.max(r.get(3)?);
                row_key(r)
            })?
            .collect::<rusqlite::Result<_>>()?;
        if keys.is_empty() {
            break;
        }
        above += keys.len();
        keys.sort_unstable();
        keys.dedup();
        insert_keys(&tx, Run { id: run, newest_ms }, keys.iter())?;
        run += 1;
    }
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

/// Runs are merged once the hour of their newest message has ended, and merged again by six
/// hours once those have: at most the current hour's runs, five hours and four six-hour spans a
/// day are looked in, whatever the rate, and each key is rewritten at most twice.
const MERGE_HOUR: Millis = 3_600_000;
const MERGE_SIX_HOURS: Millis = 6 * MERGE_HOUR;

/// The span of time a complete run whose newest message is at `newest` is merged within at
/// `now` (its length and number), or `None` while that hour has not ended.
fn merge_span(newest: Millis, now: Millis) -> Option<(Millis, Millis)> {
    let hour = newest.div_euclid(MERGE_HOUR);
    if hour >= now.div_euclid(MERGE_HOUR) {
        None
    } else if newest.div_euclid(MERGE_SIX_HOURS) < now.div_euclid(MERGE_SIX_HOURS) {
        Some((MERGE_SIX_HOURS, newest.div_euclid(MERGE_SIX_HOURS)))
    } else {
        Some((MERGE_HOUR, hour))
    }
}

/// A merge of runs under way (see [`PendingIndex::start_merge`]): the run it writes (with the
/// time it will have), where it has got to in each input, and the last key it wrote.
pub(super) struct Merge {
    out: Run,
    inputs: Vec<Cursor>,
    last: Option<Key>,
    keys: usize,
}

impl Merge {
    /// Runs being merged.
    pub(super) fn runs(&self) -> usize {
        self.inputs.len()
    }

    /// Keys written so far.
    #[cfg(test)]
    pub(super) fn keys(&self) -> usize {
        self.keys
    }
}

/// One input of a merge: its run, the first key of the block read last, that block's keys and
/// how many of them are taken.
struct Cursor {
    run: i64,
    after: Vec<u8>,
    keys: Vec<Key>,
    at: usize,
    done: bool,
}

/// Inside the caller's transaction: write up to `blocks` blocks of the merge's run, its inputs'
/// keys in ascending order, each once. When the inputs are exhausted, also give the run its
/// time and the inputs time 0 (for maintenance to drop) and return true; call
/// [`PendingIndex::merged`] after that commit.
pub(super) fn merge_step(
    conn: &Connection,
    merge: &mut Merge,
    blocks: usize,
) -> rusqlite::Result<bool> {
    let mut next = conn.prepare_cached(
        "SELECT first, keys FROM replay_blocks WHERE run = ?1 AND first > ?2
         ORDER BY first LIMIT 1",
    )?;
    // Until the input's next key is in memory or the input is exhausted.
    let mut fill = |c: &mut Cursor| -> rusqlite::Result<()> {
        while c.at == c.keys.len() && !c.done {
            match next
                .query_row(params![c.run, &c.after], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
                })
                .optional()?
            {
                Some((first, keys)) => {
                    c.after = first;
                    c.keys = block_keys(&keys).collect();
                    c.at = 0;
                }
                None => c.done = true,
            }
        }
        Ok(())
    };
    // Each input's next key, smallest first: a merge of an hour's runs can have dozens.
    let mut heads = std::collections::BinaryHeap::with_capacity(merge.inputs.len());
    for (i, c) in merge.inputs.iter_mut().enumerate() {
        fill(c)?;
        if let Some(k) = c.keys.get(c.at) {
            heads.push(std::cmp::Reverse((*k, i)));
        }
    }
    let want = blocks.max(1) * BLOCK;
    let mut out: Vec<Key> = Vec::with_capacity(want);
    while out.len() < want {
        let Some(std::cmp::Reverse((k, i))) = heads.pop() else {
            break;
        };
        let c = &mut merge.inputs[i];
        c.at += 1;
        fill(c)?;
        if let Some(next) = c.keys.get(c.at) {
            heads.push(std::cmp::Reverse((*next, i)));
        }
        if merge.last != Some(k) {
            out.push(k);
            merge.last = Some(k);
        }
    }
    let exhausted = heads.is_empty();
    if !out.is_empty() {
        let unfinished = Run {
            id: merge.out.id,
            newest_ms: 0,
        };
        insert_keys(conn, unfinished, out.iter())?;
        merge.keys += out.len();
    }
    if exhausted {
        conn.execute(
            "UPDATE replay_runs SET newest_ms = ?2 WHERE run = ?1",
            params![merge.out.id, merge.out.newest_ms],
        )?;
        let mut spent =
            conn.prepare_cached("UPDATE replay_runs SET newest_ms = 0 WHERE run = ?1")?;
        for c in &merge.inputs {
            spent.execute(params![c.run])?;
        }
    }
    Ok(exhausted)
}

/// Write keys, in ascending order and above every key already in `run`, into `run` as blocks
/// (recording the run if it is new).
fn insert_keys<'a>(
    conn: &Connection,
    run: Run,
    keys: impl Iterator<Item = &'a Key>,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO replay_runs (run, newest_ms) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
    )?
    .execute(params![run.id, run.newest_ms])?;
    let mut insert =
        conn.prepare_cached("INSERT INTO replay_blocks (run, first, keys) VALUES (?1, ?2, ?3)")?;
    const FULL: usize = BLOCK * (16 + IV_LEN);
    let mut block = Vec::with_capacity(FULL);
    let mut write = |block: &mut Vec<u8>| -> rusqlite::Result<()> {
        if !block.is_empty() {
            insert.execute(params![run.id, &block[..16 + IV_LEN], &block[..]])?;
            block.clear();
        }
        Ok(())
    };
    for k in keys {
        block.extend_from_slice(k);
        if block.len() == FULL {
            write(&mut block)?;
        }
    }
    write(&mut block)
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
