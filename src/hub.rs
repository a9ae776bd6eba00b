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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};

use bytestring::ByteString;
use tokio::sync::mpsc;

use crate::crypto::RoomId;
use crate::metrics::Metrics;

const SHARDS: usize = 16;

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

/// The sockets of one room, and the highest seq this process has seen for it.
#[derive(Default)]
struct RoomSubs {
    subs: Vec<Subscriber>,
    last_seq: i64,
}

/// The in-process registry of rooms and their sockets.
pub struct Hub {
    shards: Vec<Mutex<HashMap<RoomId, RoomSubs>>>,
    queue: usize,
    max_bytes: usize,
    metrics: Arc<Metrics>,
}

impl Hub {
    /// A hub whose sockets queue at most `queue` frames and `max_bytes` bytes.
    pub fn new(queue: usize, max_bytes: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
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

    /// Queue a frame to every socket of a room except `except`; returns how many got it.
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
        let subs = &mut r.subs;
        let mut delivered = 0;
        let mut slow = 0;
        let mut dropped = 0;
        let shared = Arc::new(frame.clone());
        subs.retain(|s| {
            if Some(s.id) == except {
                return true;
            }
            // Frames still queued for a kicked socket are never sent (the client catches up
            // when it reconnects); count them with this one.
            let queued_frames = || s.tx.max_capacity() - s.tx.capacity();
            if s.queued.load(Ordering::Relaxed) + frame.len() > self.max_bytes {
                s.kick.fire(KickReason::SlowConsumer);
                slow += 1;
                dropped += queued_frames() + 1;
                return false;
            }
            let out = Outbound {
                seq,
                frame: shared.clone(),
            };
            match s.tx.try_send(out) {
                Ok(()) => {
                    s.queued.fetch_add(frame.len(), Ordering::Relaxed);
                    delivered += 1;
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.kick.fire(KickReason::SlowConsumer);
                    slow += 1;
                    dropped += queued_frames() + 1;
                    false
                }
                // The session ended without unsubscribing yet; drop it here.
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        if subs.is_empty() {
            shard.remove(room);
        }
        drop(shard);
        self.metrics
            .messages_fanned_out_total
            .inc_by(delivered as u64);
        self.metrics.slow_consumers_total.inc_by(slow);
        self.metrics.messages_dropped_total.inc_by(dropped as u64);
        delivered
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
        }
    }

    /// Rooms with sockets here, each with the highest seq published or observed.
    pub fn rooms(&self) -> Vec<(RoomId, i64)> {
        self.shards
            .iter()
            .flat_map(|s| {
                let shard = s.lock().unwrap_or_else(|p| p.into_inner());
                shard
                    .iter()
                    .map(|(room, r)| (*room, r.last_seq))
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
}
