//! Group commit: one task takes every pending `send` from a bounded queue, writes them in one
//! transaction ([`Store::append`]), and only then answers each sender and fans the messages
//! out. An `ack` therefore always means "committed".
//!
//! # Concurrency
//! - The queue is bounded (`store.queue`): when storage is slower than the senders, `submit`
//!   waits, which pauses the sending sockets' reads instead of growing memory.
//! - Rooms are split over `shards` writer tasks by room id; each has one batch in flight at a
//!   time. While it commits, new messages pile up in its queue and form the next batch, so
//!   batches grow exactly when the database is the bottleneck, and a quiet server commits each
//!   message alone without waiting for a timer.
//!   Several shards let Postgres commit batches in parallel (SQLite has one writer
//!   connection, so it runs one shard).
//! - On SQLite, whose single writer is the one serial step, a task of its own answers the
//!   senders and fans the messages out in commit order, so that work does not stand between
//!   two transactions: the next batch starts as soon as the last one has committed. Postgres
//!   writers answer each batch before taking the next (see `Writer::spawn`).
//! - A room always goes to the same shard. Within it, seqs are assigned in batch order and
//!   batches commit in order, so publishing after each commit delivers every room's messages
//!   in seq order. Shards never share a room, so their transactions never wait for each other.

use std::sync::Arc;
use std::time::Instant;

use bytestring::ByteString;
use tokio::sync::{mpsc, oneshot};

use super::{AppendOutcome, Millis, NewMessage, Store, now_ms};
use crate::hub::{Hub, SessionId};
use crate::metrics::Metrics;
use crate::protocol::{ErrorCode, ServerFrame, WireMsg, b64u};

/// A committed message as the sender learns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Assigned sequence number.
    pub seq: i64,
    /// Server time of storage.
    pub ts: Millis,
}

/// The answer to one submitted message.
pub type WriteResult = Result<Committed, ErrorCode>;

/// Queued boxed: the queue stores its items in blocks of 32, and a block of whole jobs (about
/// 3 KiB) was a large allocation every 32 messages, each of which made glibc sweep the socket
/// thread's freed small blocks first. A block of pointers is small.
struct Job {
    msg: NewMessage,
    origin: SessionId,
    received: Instant,
    reply: oneshot::Sender<WriteResult>,
}

/// Handle to the group-commit tasks. Cloning is cheap; the tasks stop when the last handle is
/// dropped and their queues are drained.
#[derive(Clone)]
pub struct Writer {
    shards: Arc<[mpsc::Sender<Box<Job>>]>,
}

impl Writer {
    /// Start `shards` writer tasks (at least one), sharing `queue` places between them.
    pub fn spawn(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        queue: usize,
        batch_max: usize,
        shards: usize,
    ) -> (Writer, Vec<tokio::task::JoinHandle<()>>) {
        let shards = shards.max(1);
        // SQLite's one writer is the only serial step of a message's path: there a task of
        // its own answers each batch (a `msg` frame per message, fan-out, acks) while the next
        // one commits, which lowered p99 delivery at 1000 rooms x 2 under full load in every
        // run (benches/HISTORY.md, fan-out session 16). Postgres's writers already overlap one another,
        // and there answering before the next batch forms measured faster (durable publish
        // 2-26% ahead in five pairs).
        let overlap = store.backend() == "sqlite";
        let per_shard = (queue / shards).max(batch_max).max(1);
        let (senders, tasks): (Vec<_>, Vec<_>) = (0..shards)
            .map(|_| {
                let (tx, rx) = mpsc::channel(per_shard);
                let answers = if overlap {
                    // At most two committed batches wait for their answers: answering that
                    // falls behind slows the commits instead of growing memory.
                    let (done_tx, done_rx) = mpsc::channel(2);
                    tokio::spawn(answer_in_order(done_rx, hub.clone(), metrics.clone()));
                    Answers::Apart(done_tx)
                } else {
                    Answers::Inline(hub.clone())
                };
                let task =
                    tokio::spawn(run(rx, store.clone(), metrics.clone(), batch_max, answers));
                (tx, task)
            })
            .unzip();
        (
            Writer {
                shards: senders.into(),
            },
            tasks,
        )
    }

    /// Queue a message; the receiver resolves after its batch commits (or fails).
    pub async fn submit(
        &self,
        msg: NewMessage,
        origin: SessionId,
        received: Instant,
    ) -> oneshot::Receiver<WriteResult> {
        let (reply, rx) = oneshot::channel();
        let job = Box::new(Job {
            msg,
            origin,
            received,
            reply,
        });
        // Room ids are HKDF outputs: their first bytes spread rooms evenly. A client choosing
        // ids to crowd one shard only slows that shard, as one writer would be anyway.
        let head = u64::from_le_bytes(job.msg.room[..8].try_into().expect("16-byte room id"));
        let shard = &self.shards[(head % self.shards.len() as u64) as usize];
        if let Err(mpsc::error::SendError(job)) = shard.send(job).await {
            // The writer is gone (shutting down): nothing was stored.
            let _ = job.reply.send(Err(ErrorCode::Unavailable));
        }
        rx
    }
}

/// A batch whose transaction has ended: what its senders and rooms are still owed.
struct Finished {
    msgs: Vec<NewMessage>,
    metas: Vec<(SessionId, Instant, oneshot::Sender<WriteResult>)>,
    result: Result<Vec<AppendOutcome>, super::StoreError>,
    now: Millis,
    committed: Instant,
}

/// Who answers a writer's committed batches.
enum Answers {
    /// The writer itself, before it takes the next batch.
    Inline(Arc<Hub>),
    /// A task of their own, in commit order, while the writer goes on to the next batch.
    Apart(mpsc::Sender<Finished>),
}

/// One writer: commit whatever is queued, have the batch answered, then take what queued
/// meanwhile. Ends when every [`Writer`] is gone.
async fn run(
    mut rx: mpsc::Receiver<Box<Job>>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    batch_max: usize,
    answers: Answers,
) {
    let mut jobs = Vec::with_capacity(batch_max);
    while rx.recv_many(&mut jobs, batch_max).await > 0 {
        let (msgs, metas): (Vec<NewMessage>, Vec<_>) = jobs
            .drain(..)
            .map(|j| (j.msg, (j.origin, j.received, j.reply)))
            .unzip();
        let started = Instant::now();
        let now = now_ms();
        let result = store.append(&msgs, now).await;
        metrics
            .store_batch_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.store_batch_size.observe(msgs.len() as f64);
        let finished = Finished {
            msgs,
            metas,
            result,
            now,
            committed: Instant::now(),
        };
        match &answers {
            Answers::Inline(hub) => answer(finished, hub, &metrics),
            Answers::Apart(done) => {
                if done.send(finished).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Answer and fan out one writer's batches in the order they committed.
async fn answer_in_order(mut done: mpsc::Receiver<Finished>, hub: Arc<Hub>, metrics: Arc<Metrics>) {
    while let Some(finished) = done.recv().await {
        answer(finished, &hub, &metrics);
    }
}

/// Answer each sender of a finished batch and fan its stored messages out.
fn answer(done: Finished, hub: &Hub, metrics: &Metrics) {
    let Finished {
        msgs,
        metas,
        result,
        now,
        committed,
    } = done;
    match result {
        Ok(outcomes) => {
            // Looked up and timed once per batch, not per message.
            let acked = metrics.ack_latency_seconds.with_label_values(&["ok"]);
            let refused = metrics.ack_latency_seconds.with_label_values(&["refused"]);
            let answered = Instant::now();
            for ((msg, (origin, received, reply)), outcome) in
                msgs.into_iter().zip(metas).zip(outcomes)
            {
                let (answer, stored) = match outcome {
                    AppendOutcome::Stored { seq } => {
                        metrics.messages_stored_total.inc();
                        let frame: ByteString = ServerFrame::Msg(WireMsg {
                            seq,
                            ts: now,
                            epoch: msg.epoch,
                            iv: b64u(&msg.iv),
                            ct: b64u(&msg.ct),
                        })
                        .to_text()
                        .into();
                        (Ok(Committed { seq, ts: now }), Some((seq, frame)))
                    }
                    AppendOutcome::Replay => (Err(ErrorCode::Replay), None),
                    AppendOutcome::RoomGone => (Err(ErrorCode::RoomGone), None),
                };
                let latency = if answer.is_ok() { &acked } else { &refused };
                latency.observe(answered.saturating_duration_since(received).as_secs_f64());
                let _ = reply.send(answer);
                // After the answer: the sender then has its ack before any later message of
                // its room can reach it, so it never takes its own message for a gap.
                if let Some((seq, frame)) = stored {
                    hub.publish(&msg.room, seq, &frame, Some(origin));
                }
            }
            metrics
                .fanout_seconds
                .observe(committed.elapsed().as_secs_f64());
        }
        Err(e) => {
            // A refusal on purpose (the disk at its reserve) is logged by the store when it
            // begins and shows in its own gauges; it is not a storage error.
            if !matches!(e, super::StoreError::Full(_)) {
                tracing::warn!(error = %e, batch = msgs.len(), "message batch not stored");
                metrics
                    .store_errors_total
                    .with_label_values(&["append"])
                    .inc();
            }
            for (_, _, reply) in metas {
                let _ = reply.send(Err(ErrorCode::Unavailable));
            }
        }
    }
}
