//! Group commit: one task takes every pending `send` from a bounded queue, writes them in one
//! transaction ([`Store::append`]), and only then answers each sender and fans the messages
//! out. An `ack` therefore always means "committed".
//!
//! # Concurrency
//! - The queue is bounded (`store.queue`): when storage is slower than the senders, `submit`
//!   waits, which pauses the sending sockets' reads instead of growing memory.
//! - One batch is in flight at a time. While it commits, new messages pile up in the queue and
//!   form the next batch, so batches grow exactly when the database is the bottleneck, and a
//!   quiet server commits each message alone without waiting for a timer.
//! - Seqs of one room are assigned in batch order and batches commit in order, so publishing
//!   after each commit delivers every room's messages in seq order.

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

struct Job {
    msg: NewMessage,
    origin: SessionId,
    received: Instant,
    reply: oneshot::Sender<WriteResult>,
}

/// Handle to the group-commit task. Cloning is cheap; the task stops when the last handle is
/// dropped and the queue is drained.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
}

impl Writer {
    /// Start the writer task.
    pub fn spawn(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        queue: usize,
        batch_max: usize,
    ) -> (Writer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(queue);
        let task = tokio::spawn(run(rx, store, hub, metrics, batch_max));
        (Writer { tx }, task)
    }

    /// Queue a message; the receiver resolves after its batch commits (or fails).
    pub async fn submit(
        &self,
        msg: NewMessage,
        origin: SessionId,
        received: Instant,
    ) -> oneshot::Receiver<WriteResult> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            msg,
            origin,
            received,
            reply,
        };
        if let Err(mpsc::error::SendError(job)) = self.tx.send(job).await {
            // The writer is gone (shutting down): nothing was stored.
            let _ = job.reply.send(Err(ErrorCode::Unavailable));
        }
        rx
    }
}

async fn run(
    mut rx: mpsc::Receiver<Job>,
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    batch_max: usize,
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
        match result {
            Ok(outcomes) => {
                let committed = Instant::now();
                for ((msg, (origin, received, reply)), outcome) in
                    msgs.into_iter().zip(metas).zip(outcomes)
                {
                    let answer = match outcome {
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
                            hub.publish(&msg.room, seq, &frame, Some(origin));
                            Ok(Committed { seq, ts: now })
                        }
                        AppendOutcome::Replay => Err(ErrorCode::Replay),
                        AppendOutcome::RoomGone => Err(ErrorCode::RoomGone),
                    };
                    let result = if answer.is_ok() { "ok" } else { "refused" };
                    metrics
                        .ack_latency_seconds
                        .with_label_values(&[result])
                        .observe(received.elapsed().as_secs_f64());
                    let _ = reply.send(answer);
                }
                metrics
                    .fanout_seconds
                    .observe(committed.elapsed().as_secs_f64());
            }
            Err(e) => {
                tracing::warn!(error = %e, batch = msgs.len(), "message batch not stored");
                metrics
                    .store_errors_total
                    .with_label_values(&["append"])
                    .inc();
                for (_, _, reply) in metas {
                    let _ = reply.send(Err(ErrorCode::Unavailable));
                }
            }
        }
    }
}
