//! A filter in memory over every replay key the store holds (the `replay_blocks` table and the
//! keys still waiting in memory), so that the writer looks a new message's key up in the table
//! only when the filter cannot rule it out. Without it every stored message costs a lookup in
//! each run of keys its replay window reaches (one B-tree lookup in a table of random keys, as
//! keys were kept until schema version 5, was about a sixth of the server's CPU in a publish
//! run).
//!
//! It never rules a stored key out; a key that is not stored is ruled out except for a small
//! share of them (about 0.13% at the filter's capacity, more past it), which are looked up.
//!
//! - The writer adds every key it stores, from the moment a filter is started.
//! - The keys already in the table are added by a scan on a thread and a read connection of
//!   its own. A key in the table when the scan's read starts is found by it; one that was
//!   still in memory when the filter started is added right then; one stored since, by the
//!   writer. Until the scan is in, the previous filter (or, at open, the table) is consulted.
//! - Deleted keys stay in the filter (they only cost a lookup). Once it has taken half its
//!   capacity in new keys, a new one is built the same way, sized for the table as it is then,
//!   which also drops the deleted ones.
//! - Memory: 2 bytes per key of capacity, at most [`MAX_BYTES`] per filter (three while a new
//!   one is built); past that the share of keys looked up grows, nothing else changes.

use std::hash::{BuildHasher, RandomState};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::index::{BLOCK, Key};

/// Bits of filter per key of capacity.
const BITS_PER_KEY: usize = 16;
/// Bits set per key, all in one 512-bit block (one cache line).
const BITS_SET: u32 = 6;
/// The smallest capacity a filter is made with.
const MIN_KEYS: usize = 1 << 20;
/// The most memory one filter takes (three exist while the next one is built: the current one,
/// the next one, and the part its scan fills).
pub(super) const MAX_BYTES: usize = 64 << 20;
/// Wait before building again after a failed scan.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// A blocked Bloom filter over keys.
pub(super) struct KeyFilter {
    blocks: Vec<[u64; 8]>,
    /// Two keyed hashes: which block, and which bits in it. Keyed at random per filter
    /// family, so a client cannot choose IVs that collide on purpose.
    hashers: (RandomState, RandomState),
    capacity: usize,
    added: usize,
}

impl KeyFilter {
    /// A filter for `keys` keys (at least `min`, at most what [`MAX_BYTES`] holds).
    fn with_hashers(keys: usize, hashers: (RandomState, RandomState), min: usize) -> Self {
        let bytes = (keys.max(min).saturating_mul(BITS_PER_KEY) / 8).clamp(64, MAX_BYTES);
        let blocks = bytes / 64;
        Self {
            blocks: vec![[0; 8]; blocks],
            hashers,
            capacity: blocks * 512 / BITS_PER_KEY,
            added: 0,
        }
    }

    /// An empty filter of the same size and hashes, whose keys can be merged into this one.
    fn sibling(&self) -> Self {
        Self {
            blocks: vec![[0; 8]; self.blocks.len()],
            hashers: self.hashers.clone(),
            capacity: self.capacity,
            added: 0,
        }
    }

    fn place(&self, k: &Key) -> (usize, u64) {
        let h = self.hashers.0.hash_one(k);
        let block = ((u128::from(h) * self.blocks.len() as u128) >> 64) as usize;
        (block, self.hashers.1.hash_one(k))
    }

    pub(super) fn insert(&mut self, k: &Key) {
        let (block, mut bits) = self.place(k);
        let block = &mut self.blocks[block];
        for _ in 0..BITS_SET {
            let bit = (bits & 511) as usize;
            block[bit / 64] |= 1 << (bit % 64);
            bits >>= 9;
        }
        self.added += 1;
    }

    /// False only if the key was never inserted.
    pub(super) fn may_contain(&self, k: &Key) -> bool {
        let (block, mut bits) = self.place(k);
        let block = &self.blocks[block];
        (0..BITS_SET).all(|_| {
            let bit = (bits & 511) as usize;
            bits >>= 9;
            block[bit / 64] & (1 << (bit % 64)) != 0
        })
    }

    /// Add every key of a sibling.
    fn merge(&mut self, other: &KeyFilter) {
        debug_assert_eq!(self.blocks.len(), other.blocks.len());
        for (mine, theirs) in self.blocks.iter_mut().zip(&other.blocks) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a |= b;
            }
        }
        self.added += other.added;
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.capacity
    }

    pub(super) fn bytes(&self) -> usize {
        self.blocks.len() * 64
    }
}

/// The filter the writer consults, and the next one while it is built.
pub(super) struct ReplayFilter {
    /// Complete: holds every stored key. `None` until the first build is in.
    current: Option<KeyFilter>,
    /// Keys the current filter held when it was built.
    built_with: usize,
    /// Being built: gets every key stored since it started; the scan's keys arrive on the
    /// channel.
    next: Option<(KeyFilter, Receiver<rusqlite::Result<KeyFilter>>)>,
    /// No build starts before this (after a failed scan).
    not_before: Instant,
    min_keys: usize,
    /// Keys looked up in the table because the filter could not rule them out, and filters
    /// built (both only counted, for tests and logs).
    pub(super) lookups: u64,
    pub(super) builds: u64,
    /// The memory the filters take (see [`ReplayFilter::held_bytes`]), for the metrics.
    held: Arc<AtomicUsize>,
}

impl ReplayFilter {
    pub(super) fn new() -> Self {
        Self::with_min_keys(MIN_KEYS)
    }

    /// With a smaller least capacity, so tests can make it fill up and rebuild.
    pub(super) fn with_min_keys(min_keys: usize) -> Self {
        Self {
            current: None,
            built_with: 0,
            next: None,
            not_before: Instant::now(),
            min_keys,
            lookups: 0,
            builds: 0,
            held: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The memory the filters take, kept up to date by [`ReplayFilter::tend`]: the one in use
    /// and, while the next one is built, that one twice (its scan fills a copy of its own).
    pub(super) fn held_bytes(&self) -> Arc<AtomicUsize> {
        self.held.clone()
    }

    /// False only if the key is not stored, in the table or in memory; true while no filter is
    /// complete. The caller looks a true one up.
    pub(super) fn may_contain(&mut self, k: &Key) -> bool {
        let maybe = self.current.as_ref().is_none_or(|f| f.may_contain(k));
        self.lookups += u64::from(maybe);
        maybe
    }

    /// A key being stored.
    pub(super) fn insert(&mut self, k: &Key) {
        if let Some(f) = &mut self.current {
            f.insert(k);
        }
        if let Some((f, _)) = &mut self.next {
            f.insert(k);
        }
    }

    /// Whether a complete filter is in use.
    #[cfg(test)]
    pub(super) fn ready(&self) -> bool {
        self.current.is_some()
    }

    /// Memory of the filter in use.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.current.as_ref().map_or(0, KeyFilter::bytes)
    }

    /// [`ReplayFilter::may_contain`] without counting a lookup.
    #[cfg(test)]
    pub(super) fn holds(&self, k: &Key) -> bool {
        self.current.as_ref().is_none_or(|f| f.may_contain(k))
    }

    /// Between transactions: take a finished scan in, and start a build when there is no
    /// filter yet or the current one is full. `memory` is every key waiting in memory.
    pub(super) fn tend<'a>(&mut self, conn: &Connection, memory: impl Iterator<Item = &'a Key>) {
        if let Some((_, scan)) = &self.next {
            match scan.try_recv() {
                Ok(Ok(part)) => {
                    let (mut built, _) = self.next.take().expect("checked above");
                    built.merge(&part);
                    tracing::debug!(
                        keys = built.added,
                        bytes = built.bytes(),
                        "replay key filter built"
                    );
                    self.built_with = built.added;
                    self.builds += 1;
                    self.current = Some(built);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not build the replay key filter; looking keys up in the table meanwhile");
                    self.next = None;
                    self.not_before = Instant::now() + RETRY_AFTER;
                }
                Err(TryRecvError::Disconnected) => {
                    tracing::warn!("the replay key filter's scan ended without an answer");
                    self.next = None;
                    self.not_before = Instant::now() + RETRY_AFTER;
                }
                Err(TryRecvError::Empty) => {}
            }
        }
        let due = self
            .current
            .as_ref()
            .is_none_or(|f| f.added - self.built_with > f.capacity / 2);
        if due
            && self.next.is_none()
            && Instant::now() >= self.not_before
            && let Err(e) = self.start(conn, memory)
        {
            tracing::warn!(error = %e, "could not start the replay key filter");
            self.not_before = Instant::now() + RETRY_AFTER;
        }
        let held = self.current.as_ref().map_or(0, KeyFilter::bytes)
            + self.next.as_ref().map_or(0, |(f, _)| 2 * f.bytes());
        self.held.store(held, Ordering::Relaxed);
    }

    fn start<'a>(
        &mut self,
        conn: &Connection,
        memory: impl Iterator<Item = &'a Key>,
    ) -> anyhow::Result<()> {
        let Some(path) = conn.path().filter(|p| !p.is_empty()).map(PathBuf::from) else {
            return Ok(());
        };
        // A block holds at most `BLOCK` keys, so the blocks bound the keys in the table (the
        // runs a replay window reaches, a few days of them, not the 30 days of messages),
        // counted in the blocks' index without reading a key. Twice that and the keys in
        // memory, so it need not be rebuilt soon.
        let blocks: i64 = conn.query_row("SELECT COUNT(*) FROM replay_blocks", [], |r| r.get(0))?;
        let memory: Vec<&Key> = memory.collect();
        let keys = usize::try_from(blocks)
            .unwrap_or(0)
            .saturating_mul(BLOCK)
            .saturating_add(memory.len());
        let mut built = KeyFilter::with_hashers(
            keys.saturating_mul(2),
            (RandomState::new(), RandomState::new()),
            self.min_keys,
        );
        for k in memory {
            built.insert(k);
        }
        let part = built.sibling();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("sqlite-filter".into())
            .spawn(move || {
                let _ = tx.send(scan(&path, part));
            })?;
        self.next = Some((built, rx));
        Ok(())
    }
}

/// Every key of the table, into `into`.
fn scan(path: &std::path::Path, mut into: KeyFilter) -> rusqlite::Result<KeyFilter> {
    let conn = super::open_connection(path)?;
    let mut blocks = conn.prepare("SELECT keys FROM replay_blocks")?;
    let mut rows = blocks.query([])?;
    while let Some(r) = rows.next()? {
        for k in super::index::block_keys(r.get_ref(0)?.as_blob()?) {
            into.insert(&k);
        }
    }
    Ok(into)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_keys(n: usize) -> Vec<Key> {
        (0..n)
            .map(|_| {
                let mut k = [0u8; 28];
                rand::fill(&mut k);
                k
            })
            .collect()
    }

    #[test]
    fn inserted_keys_are_always_found_and_few_others_are() {
        let f_keys = random_keys(100_000);
        let mut f =
            KeyFilter::with_hashers(f_keys.len(), (RandomState::new(), RandomState::new()), 1);
        for k in &f_keys {
            f.insert(k);
        }
        assert!(f.capacity() >= f_keys.len());
        assert!(f_keys.iter().all(|k| f.may_contain(k)));
        let others = random_keys(100_000);
        let wrong = others.iter().filter(|k| f.may_contain(k)).count();
        // About 0.13% at capacity (measured: 113 to 137 of 100 000).
        assert!(wrong < 1_000, "{wrong} of 100000 not ruled out");
        assert!(
            wrong > 0,
            "a filter this full rules everything out: is it hashing?"
        );
    }

    #[test]
    fn a_merged_sibling_brings_its_keys() {
        let mut a = KeyFilter::with_hashers(10_000, (RandomState::new(), RandomState::new()), 1);
        let mut b = a.sibling();
        let (ka, kb) = (random_keys(5_000), random_keys(5_000));
        ka.iter().for_each(|k| a.insert(k));
        kb.iter().for_each(|k| b.insert(k));
        assert!(!kb.iter().all(|k| a.may_contain(k)));
        a.merge(&b);
        assert!(ka.iter().chain(&kb).all(|k| a.may_contain(k)));
        assert_eq!(a.added, 10_000);
    }

    #[test]
    fn memory_is_bounded() {
        let hashers = || (RandomState::new(), RandomState::new());
        let f = KeyFilter::with_hashers(usize::MAX / 2, hashers(), MIN_KEYS);
        assert_eq!(f.bytes(), MAX_BYTES);
        assert_eq!(
            KeyFilter::with_hashers(0, hashers(), MIN_KEYS).capacity(),
            MIN_KEYS
        );
    }
}
