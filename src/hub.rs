//! Rooms -> subscribers, and fan-out of committed messages to the sockets of a room.
//!
//! A broadcast frame is serialized once by the caller and its bytes ([`ByteString`], a
//! reference-counted buffer) are shared by every recipient: fan-out to n sockets costs n
//! reference-count increments and n channel pushes, never n serializations or copies.
//!
//! # Concurrency
//! The room map is split into shards, each behind a `std::sync::Mutex`: the critical sections
//! are short and never `.await` (pushing to a subscriber uses `try_send`), so an async mutex
//! would only add cost. Room ids are uniformly random, so the first byte picks a shard evenly.
//!
//! # Slow consumers
//! Each socket has a bounded queue (`limits.send_queue` frames, at least one full write batch,
//! since a batch publishes its messages at once, and `limits.send_queue_bytes` bytes). When a
//! publish finds it full,
//! the subscriber is removed from the room and *kicked*: its session closes the socket with
//! close code 4008 ("too slow"). Memory per socket therefore stays bounded whatever a client
//! does, and the room's other members never wait for it. Nothing is lost: every message is in
//! storage, and the client catches up by rejoining with `after`.
//!
//! # Order
//! Seqs of a room have no holes. When a message arrives ahead of the room's next seq (with
//! several processes, one committed here can come before an earlier one committed by another
//! process and still on its way through the database), the room *holds* it and delivers it,
//! in order, once the earlier ones arrive. If they have not arrived after [`HOLD`], the room
//! reads them from storage once ([`crate::cluster::fill_held_gaps`]) for all its sockets;
//! otherwise every socket of the room would read the gap itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytestring::ByteString;
use tokio::sync::mpsc;

use crate::crypto::RoomId;
use crate::metrics::Metrics;

const SHARDS: usize = 16;
/// How long a message that arrived ahead of its room's next seq waits for the earlier ones
/// before the room reads them from storage.
pub const HOLD: Duration = Duration::from_millis(50);
/// At most this many messages, and this many bytes of them, are held per room; beyond, the
/// room delivers what it holds in order and each socket fills its own gap.
const MAX_HELD: usize = 1024;
const MAX_HELD_BYTES: usize = 4 << 20;

/// Identifies one socket for the life of the process.
pub type SessionId = u64;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// A fresh session id.
pub fn next_session_id() -> SessionId {
    NEXT_SESSION.fetch_add(1, Ordering::Relaxed)
}

/// A frame queued to one socket, with the seq it carries so a session can drop frames it has
/// already delivered from storage.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// Sequence number of the message in the frame.
    pub seq: i64,
    /// The serialized frame, shared with every other recipient. Behind one more pointer so a
    /// queued frame takes 16 bytes instead of 40: every joined socket's queue allocates room
    /// for 32 of them up front, idle or not.
    pub frame: Arc<ByteString>,
}

/// Why a session was kicked out of its room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickReason {
    /// The socket's queue was full.
    SlowConsumer,
    /// The room was wiped by `panic`.
    Nuked,
}

/// Why the hub let go of a session, set once. The hub kicks a socket by taking it out of its
/// room, which drops the only sender of the socket's queue: the session sees its queue close
/// (it watches the queue anyway) and only then reads the reason, so its loop has nothing more
/// to check each time round.
#[derive(Debug, Clone, Default)]
pub struct Kick {
    /// 0 until fired, then the first reason's code.
    reason: Arc<AtomicU8>,
}

impl Kick {
    fn fire(&self, reason: KickReason) {
        // The first reason wins: a nuked room stays nuked even if the queue was also full.
        let code = match reason {
            KickReason::SlowConsumer => 1,
            KickReason::Nuked => 2,
        };
        let _ = self
            .reason
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Why the socket was kicked, if it was.
    pub fn reason(&self) -> Option<KickReason> {
        match self.reason.load(Ordering::Acquire) {
            0 => None,
            2 => Some(KickReason::Nuked),
            _ => Some(KickReason::SlowConsumer),
        }
    }
}

struct Subscriber {
    id: SessionId,
    tx: mpsc::Sender<Outbound>,
    kick: Kick,
    queued: Arc<AtomicUsize>,
}

/// A room subscription held by a session.
pub struct Subscription {
    /// Frames for this socket.
    pub rx: mpsc::Receiver<Outbound>,
    /// Why the socket left the room, once `rx` has closed.
    pub kick: Kick,
    /// Bytes queued in `rx`; the session subtracts what it has written.
    pub queued: Arc<AtomicUsize>,
}

/// A message held until the ones before it arrive.
struct Held {
    frame: Arc<ByteString>,
    except: Option<SessionId>,
}

/// The sockets of one room, and the highest seq this process has seen for it.
#[derive(Default)]
struct RoomSubs {
    subs: Vec<Subscriber>,
    last_seq: i64,
    /// The seq of the next message in order, once known (from the first publish, or the
    /// first join's read).
    next: Option<i64>,
    /// Messages that arrived ahead of `next`, by seq.
    held: BTreeMap<i64, Held>,
    /// Their frames' bytes.
    held_bytes: usize,
    /// When the oldest hold began.
    held_since: Option<Instant>,
}

/// What one delivery to a room's sockets did.
#[derive(Default)]
struct Fanned {
    delivered: usize,
    slow: u64,
    dropped: usize,
}

impl RoomSubs {
    /// Queue a frame to every socket except `except`, kicking those too slow to take it.
    fn fan_out(
        &mut self,
        seq: i64,
        shared: &Arc<ByteString>,
        except: Option<SessionId>,
        max_bytes: usize,
        f: &mut Fanned,
    ) {
        let len = shared.len();
        self.subs.retain(|s| {
            if Some(s.id) == except {
                return true;
            }
            // Frames still queued for a kicked socket are never sent (the client catches up
            // when it reconnects); count them with this one.
            let queued_frames = || s.tx.max_capacity() - s.tx.capacity();
            if s.queued.load(Ordering::Relaxed) + len > max_bytes {
                s.kick.fire(KickReason::SlowConsumer);
                f.slow += 1;
                f.dropped += queued_frames() + 1;
                return false;
            }
            let out = Outbound {
                seq,
                frame: shared.clone(),
            };
            match s.tx.try_send(out) {
                Ok(()) => {
                    s.queued.fetch_add(len, Ordering::Relaxed);
                    f.delivered += 1;
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.kick.fire(KickReason::SlowConsumer);
                    f.slow += 1;
                    f.dropped += queued_frames() + 1;
                    false
                }
                // The session ended without unsubscribing yet; drop it here.
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// `seq` went out: the next in order comes after it.
    fn advance(&mut self, seq: i64) {
        let after = seq.saturating_add(1);
        self.next = Some(self.next.map_or(after, |n| n.max(after)));
    }

    /// Deliver the held messages that are next in order (all of them when `all`).
    fn release(&mut self, all: bool, max_bytes: usize, f: &mut Fanned) {
        while let Some(entry) = self.held.first_entry() {
            let seq = *entry.key();
            if !all && self.next.is_some_and(|n| seq > n) {
                break;
            }
            let held = entry.remove();
            self.held_bytes -= held.frame.len();
            self.fan_out(seq, &held.frame, held.except, max_bytes, f);
            self.advance(seq);
        }
        if self.held.is_empty() {
            self.held_since = None;
        }
    }
}

/// The in-process registry of rooms and their sockets.
pub struct Hub {
    shards: Vec<Mutex<HashMap<RoomId, RoomSubs>>>,
    /// Rooms that may hold messages (some may have released them since).
    held_rooms: Mutex<HashSet<RoomId>>,
    gap_opened: tokio::sync::Notify,
    queue: usize,
    max_bytes: usize,
    metrics: Arc<Metrics>,
}

impl Hub {
    /// A hub whose sockets queue at most `queue` frames and `max_bytes` bytes.
    pub fn new(queue: usize, max_bytes: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            held_rooms: Mutex::new(HashSet::new()),
            gap_opened: tokio::sync::Notify::new(),
            queue,
            max_bytes,
            metrics,
        }
    }

    fn shard(&self, room: &RoomId) -> std::sync::MutexGuard<'_, HashMap<RoomId, RoomSubs>> {
        // A panic never happens while a shard is locked (no user code runs there), so a
        // poisoned lock still guards a consistent map.
        self.shards[room[0] as usize % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Add a socket to a room.
    pub fn subscribe(&self, room: &RoomId, id: SessionId) -> Subscription {
        let (tx, rx) = mpsc::channel(self.queue);
        let kick = Kick::default();
        let queued = Arc::new(AtomicUsize::new(0));
        self.shard(room)
            .entry(*room)
            .or_default()
            .subs
            .push(Subscriber {
                id,
                tx,
                kick: kick.clone(),
                queued: queued.clone(),
            });
        Subscription { rx, kick, queued }
    }

    /// Remove a socket from a room (on close).
    pub fn unsubscribe(&self, room: &RoomId, id: SessionId) {
        let mut shard = self.shard(room);
        if let Some(r) = shard.get_mut(room) {
            r.subs.retain(|s| s.id != id);
            if r.subs.is_empty() {
                shard.remove(room);
            }
        }
    }

    /// Queue a frame to every socket of a room except `except`, in seq order: a frame ahead of
    /// the room's next seq is held until the ones before it are published (or [`HOLD`] passes,
    /// see the module's *Order*). Returns how many sockets got it now.
    pub fn publish(
        &self,
        room: &RoomId,
        seq: i64,
        frame: &ByteString,
        except: Option<SessionId>,
    ) -> usize {
        let mut shard = self.shard(room);
        let Some(r) = shard.get_mut(room) else {
            return 0;
        };
        r.last_seq = r.last_seq.max(seq);
        let shared = Arc::new(frame.clone());
        if let Some(next) = r.next
            && seq > next
            && !r.held.contains_key(&seq)
        {
            if r.held.len() < MAX_HELD && r.held_bytes + shared.len() <= MAX_HELD_BYTES {
                r.held_bytes += shared.len();
                r.held.insert(
                    seq,
                    Held {
                        frame: shared,
                        except,
                    },
                );
                self.metrics.messages_held_total.inc();
                if r.held_since.is_none() {
                    r.held_since = Some(Instant::now());
                    self.held_rooms
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(*room);
                    self.gap_opened.notify_one();
                }
                return 0;
            }
            // Too much held: deliver it all in order; the sockets fill the gaps themselves.
            let mut f = Fanned::default();
            r.release(true, self.max_bytes, &mut f);
            let before = f.delivered;
            r.fan_out(seq, &shared, except, self.max_bytes, &mut f);
            let delivered = f.delivered - before;
            r.advance(seq);
            self.fanned(shard, room, f);
            return delivered;
        }
        let mut f = Fanned::default();
        r.fan_out(seq, &shared, except, self.max_bytes, &mut f);
        let delivered = f.delivered;
        r.advance(seq);
        r.release(false, self.max_bytes, &mut f);
        self.fanned(shard, room, f);
        delivered
    }

    /// Drop a room left without sockets, count a delivery's effects; returns the deliveries.
    fn fanned(
        &self,
        mut shard: std::sync::MutexGuard<'_, HashMap<RoomId, RoomSubs>>,
        room: &RoomId,
        f: Fanned,
    ) -> usize {
        if shard.get(room).is_some_and(|r| r.subs.is_empty()) {
            shard.remove(room);
        }
        drop(shard);
        self.metrics
            .messages_fanned_out_total
            .inc_by(f.delivered as u64);
        self.metrics.slow_consumers_total.inc_by(f.slow);
        self.metrics.messages_dropped_total.inc_by(f.dropped as u64);
        f.delivered
    }

    /// Rooms that have held a message for longer than `hold`, each with the seqs missing
    /// before it: (room, the last seq delivered in order, the first seq held).
    pub fn overdue(&self, hold: Duration) -> Vec<(RoomId, i64, i64)> {
        let rooms: Vec<RoomId> = self
            .held_rooms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        let mut out = Vec::new();
        let mut done = Vec::new();
        for room in rooms {
            let shard = self.shard(&room);
            let Some(r) = shard.get(&room).filter(|r| !r.held.is_empty()) else {
                done.push(room);
                continue;
            };
            if r.held_since.is_some_and(|t| t.elapsed() >= hold)
                && let (Some(next), Some((first, _))) = (r.next, r.held.first_key_value())
            {
                out.push((room, next - 1, *first));
            }
        }
        let mut held = self.held_rooms.lock().unwrap_or_else(|p| p.into_inner());
        for room in done {
            held.remove(&room);
        }
        out
    }

    /// Whether any room holds a message.
    pub fn holding(&self) -> bool {
        !self
            .held_rooms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Wait until a room starts holding a message.
    pub async fn gap_opened(&self) {
        self.gap_opened.notified().await;
    }

    /// Deliver a room's held messages up to `before`: the seqs missing before them could not
    /// be read (expired, or storage is down), so the sockets go on without them.
    pub fn skip_to(&self, room: &RoomId, before: i64) {
        let mut shard = self.shard(room);
        let Some(r) = shard.get_mut(room) else {
            return;
        };
        if r.next.is_some_and(|n| n < before) {
            r.next = Some(before);
        }
        let mut f = Fanned::default();
        r.release(false, self.max_bytes, &mut f);
        if !r.held.is_empty() {
            // A later gap: its hold starts now.
            r.held_since = Some(Instant::now());
        }
        self.fanned(shard, room, f);
    }

    /// Kick every socket of a wiped room; returns how many there were.
    pub fn nuke(&self, room: &RoomId) -> usize {
        let subs = self.shard(room).remove(room).unwrap_or_default().subs;
        for s in &subs {
            s.kick.fire(KickReason::Nuked);
        }
        subs.len()
    }

    /// Sockets currently in a room.
    pub fn members(&self, room: &RoomId) -> usize {
        self.shard(room).get(room).map_or(0, |r| r.subs.len())
    }

    /// Note that this process knows every message of `room` up to `seq` (a session read them
    /// at join); cross-node catch-up starts after it.
    pub fn observe(&self, room: &RoomId, seq: i64) {
        if let Some(r) = self.shard(room).get_mut(room) {
            r.last_seq = r.last_seq.max(seq);
            // The first member's read tells where the order starts; later reads change
            // nothing (the sockets already there may still be waiting for earlier seqs).
            if r.next.is_none() {
                r.next = Some(seq.saturating_add(1));
            }
        }
    }

    /// Rooms with sockets here, each with the highest seq published or observed in order
    /// (what it holds beyond a gap does not count).
    pub fn rooms(&self) -> Vec<(RoomId, i64)> {
        self.shards
            .iter()
            .flat_map(|s| {
                let shard = s.lock().unwrap_or_else(|p| p.into_inner());
                shard
                    .iter()
                    .map(|(room, r)| {
                        let through = match (r.held.is_empty(), r.next) {
                            (false, Some(next)) => next - 1,
                            _ => r.last_seq,
                        };
                        (*room, through)
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_kicks_only_that_subscriber() {
        let hub = Hub::new(2, 1 << 20, Arc::new(Metrics::new()));
        let room = [1u8; 16];
        let mut fast = hub.subscribe(&room, 1);
        let slow = hub.subscribe(&room, 2);
        let frame = ByteString::from_static("x");
        for seq in 1..=3 {
            assert!(hub.publish(&room, seq, &frame, None) >= 1);
            assert_eq!(fast.rx.recv().await.map(|o| o.seq), Some(seq));
        }
        assert!(slow.rx.is_closed());
        assert_eq!(slow.kick.reason(), Some(KickReason::SlowConsumer));
        assert_eq!(fast.kick.reason(), None);
        assert_eq!(hub.members(&room), 1);
        // Its two queued frames and the one that did not fit were dropped with it.
        assert_eq!(hub.metrics.messages_dropped_total.get(), 3);
    }

    #[tokio::test]
    async fn publish_skips_the_sender_and_nuke_kicks_everyone() {
        let hub = Hub::new(8, 1 << 20, Arc::new(Metrics::new()));
        let room = [2u8; 16];
        let mut a = hub.subscribe(&room, 1);
        let mut b = hub.subscribe(&room, 2);
        assert_eq!(
            hub.publish(&room, 1, &ByteString::from_static("m"), Some(1)),
            1
        );
        assert_eq!(b.rx.recv().await.map(|o| o.seq), Some(1));
        assert!(a.rx.try_recv().is_err());
        assert_eq!(hub.nuke(&room), 2);
        for sub in [&a, &b] {
            assert!(sub.rx.is_closed());
            assert_eq!(sub.kick.reason(), Some(KickReason::Nuked));
        }
        assert_eq!(hub.members(&room), 0);
    }

    #[tokio::test]
    async fn a_socket_over_its_byte_budget_is_kicked() {
        let metrics = Arc::new(Metrics::new());
        let hub = Hub::new(100, 10, metrics.clone());
        let room = [3u8; 16];
        let sub = hub.subscribe(&room, 1);
        let frame = ByteString::from_static("12345");
        assert_eq!(hub.publish(&room, 1, &frame, None), 1);
        assert_eq!(hub.publish(&room, 2, &frame, None), 1);
        assert_eq!(sub.queued.load(Ordering::Relaxed), 10);
        assert_eq!(hub.publish(&room, 3, &frame, None), 0);
        assert!(sub.rx.is_closed());
        assert_eq!(sub.kick.reason(), Some(KickReason::SlowConsumer));
        // The two frames still queued are never sent, nor is the third.
        assert_eq!(metrics.messages_dropped_total.get(), 3);
        assert_eq!(metrics.slow_consumers_total.get(), 1);
    }

    #[tokio::test]
    async fn a_socket_whose_queue_is_full_is_kicked() {
        let metrics = Arc::new(Metrics::new());
        let hub = Hub::new(2, 1 << 20, metrics.clone());
        let room = [4u8; 16];
        let sub = hub.subscribe(&room, 1);
        let frame = ByteString::from_static("m");
        assert_eq!(hub.publish(&room, 1, &frame, None), 1);
        assert_eq!(hub.publish(&room, 2, &frame, None), 1);
        assert_eq!(hub.publish(&room, 3, &frame, None), 0);
        assert_eq!(sub.kick.reason(), Some(KickReason::SlowConsumer));
        assert_eq!(metrics.messages_dropped_total.get(), 3);
        assert_eq!(metrics.messages_fanned_out_total.get(), 2);
    }

    fn seqs(sub: &mut Subscription) -> Vec<i64> {
        std::iter::from_fn(|| sub.rx.try_recv().ok().map(|o| o.seq)).collect()
    }

    #[tokio::test]
    async fn a_message_ahead_of_its_room_waits_for_the_earlier_ones() {
        let metrics = Arc::new(Metrics::new());
        let hub = Hub::new(16, 1 << 20, metrics.clone());
        let room = [5u8; 16];
        let mut a = hub.subscribe(&room, 1);
        let mut b = hub.subscribe(&room, 2);
        let frame = ByteString::from_static("m");
        assert_eq!(hub.publish(&room, 1, &frame, None), 2);
        // 4 (sent by a) and 3 come before 2, which another process committed first.
        assert_eq!(hub.publish(&room, 4, &frame, Some(1)), 0);
        assert_eq!(hub.publish(&room, 3, &frame, None), 0);
        assert_eq!(seqs(&mut a), vec![1]);
        assert_eq!(seqs(&mut b), vec![1]);
        assert!(hub.holding());
        // What catch-up would read from: the last seq delivered in order.
        assert_eq!(hub.rooms(), vec![(room, 1)]);
        assert_eq!(hub.publish(&room, 2, &frame, None), 2);
        assert_eq!(seqs(&mut a), vec![2, 3], "its own message is not echoed");
        assert_eq!(seqs(&mut b), vec![2, 3, 4]);
        assert_eq!(hub.rooms(), vec![(room, 4)]);
        assert_eq!(metrics.messages_held_total.get(), 2);
        assert!(hub.overdue(Duration::ZERO).is_empty());
        assert!(!hub.holding());
    }

    #[tokio::test]
    async fn a_gap_that_does_not_fill_is_reported_then_skipped() {
        let hub = Hub::new(16, 1 << 20, Arc::new(Metrics::new()));
        let room = [6u8; 16];
        let mut a = hub.subscribe(&room, 1);
        let frame = ByteString::from_static("m");
        // The first member's read ended at 10: the order starts at 11.
        hub.observe(&room, 10);
        hub.publish(&room, 13, &frame, None);
        hub.publish(&room, 14, &frame, None);
        assert!(seqs(&mut a).is_empty());
        assert!(hub.overdue(Duration::from_secs(60)).is_empty(), "not yet");
        assert_eq!(hub.overdue(Duration::ZERO), vec![(room, 10, 13)]);
        // 11 was read from storage; 12 could not be (expired): the room goes on without it.
        hub.publish(&room, 11, &frame, None);
        hub.skip_to(&room, 13);
        assert_eq!(seqs(&mut a), vec![11, 13, 14]);
        assert!(hub.overdue(Duration::ZERO).is_empty());
        assert!(!hub.holding());
        // Late and repeated frames are passed on at once; the sessions drop what they have.
        assert_eq!(hub.publish(&room, 12, &frame, None), 1);
        assert_eq!(seqs(&mut a), vec![12]);
    }

    #[tokio::test]
    async fn a_room_holding_too_much_delivers_it_in_order() {
        let hub = Hub::new(4096, 1 << 30, Arc::new(Metrics::new()));
        let room = [7u8; 16];
        let mut a = hub.subscribe(&room, 1);
        let frame = ByteString::from_static("m");
        hub.publish(&room, 1, &frame, None);
        // 3 to last are MAX_HELD + 1 messages: the last finds the room full.
        let last = 3 + MAX_HELD as i64;
        for seq in 3..=last {
            hub.publish(&room, seq, &frame, None);
        }
        let got = seqs(&mut a);
        assert_eq!(got.first(), Some(&1));
        assert_eq!(got.len(), MAX_HELD + 2, "everything but the missing 2");
        assert!(got.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            hub.publish(&room, last + 1, &frame, None),
            1,
            "no hold after"
        );
    }

    #[tokio::test]
    async fn a_room_holding_too_many_bytes_delivers_them_in_order() {
        let hub = Hub::new(4096, 1 << 30, Arc::new(Metrics::new()));
        let room = [8u8; 16];
        let mut a = hub.subscribe(&room, 1);
        let big = ByteString::from("x".repeat(1 << 20));
        hub.publish(&room, 1, &big, None);
        // Four mebibytes fit; the fifth frame does not.
        for seq in 3..=6 {
            assert_eq!(hub.publish(&room, seq, &big, None), 0);
        }
        assert_eq!(seqs(&mut a), vec![1]);
        assert_eq!(hub.publish(&room, 7, &big, None), 1);
        assert_eq!(seqs(&mut a), vec![3, 4, 5, 6, 7]);
        assert!(hub.overdue(Duration::ZERO).is_empty());
        assert!(!hub.holding());
    }
}
