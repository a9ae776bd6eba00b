//! One WebSocket connection: the hello, the frame loop, heartbeats and limits.
//!
//! # The loop
//! A single task per socket `select!`s over, in priority order:
//! 1. commits of this socket's `send`s, answered with `ack` in send order,
//! 2. frames queued for this socket by the hub (all that are waiting go out in one write), or
//!    the queue's closing: the hub kicked the socket (room wiped, or this socket too slow),
//!    which ends it at once, whatever is still queued,
//! 3. the next client frame, read only while fewer than `limits.max_inflight_sends` sends are
//!    waiting for their commit (so a fast sender is paced by the database, not buffered),
//! 4. the heartbeat tick: close after `limits.idle_timeout_secs` of client silence, else ping.
//!
//! Writes to the socket are bounded by `limits.send_timeout_secs`; a client that stops reading
//! is dropped instead of holding the task. Nothing here holds a lock across an `.await`.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_http::ws::CloseCode;
use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::mpsc;
use tokio::sync::oneshot;

use crate::abuse::limits::{ClientLimit, DirectLimiter, Refused};
use crate::crypto::{self, CHALLENGE_LEN, RoomId};
use crate::hub::{Kick, KickReason, Outbound, SessionId, next_session_id};
use crate::protocol::{
    ClientFrame, ErrorCode, FrameError, FrameLimits, HistoryQuery, PROTOCOL_VERSION, PowSolution,
    ServerFrame, WireMsg, b64u, parse_client_frame, room_to_wire,
};
use crate::startup::{AppState, Peer};
use crate::store::writer::WriteResult;
use crate::store::{CreateOutcome, NewMessage, Page, StoreError, StoredMessage, now_ms};
use crate::websocket::{Incoming, ReadError, Reader, Writer};

/// Close code for a socket that could not keep up with its room.
pub const CLOSE_TOO_SLOW: u16 = 4008;
/// Strike cost of a frame refused by a rate limit.
const STRIKE_RATE_LIMITED: u32 = 1;
/// Strike cost of an invalid frame: malformed input costs more than a valid frame sent too fast.
const STRIKE_INVALID: u32 = 4;
/// Most live frames written to a socket in one write.
const DELIVER_BATCH: usize = 64;
/// The refusal of a message or room while the stored data is at `store.max_database_mib`.
const STORAGE_FULL: &str = "the server's storage is full; nothing was stored, try again later";
/// Pending sends a socket keeps room for once all are answered; a larger burst's room is freed.
const INFLIGHT_KEPT: usize = 8;

/// A `send` waiting for its commit. Commits come back in the order sends were made (one room,
/// one writer), and acks must go out in that order anyway, so only the oldest is ever waited on.
struct PendingSend {
    reference: String,
    /// When a gap is filled from storage, a stored message with this IV is this socket's own,
    /// answered by its ack rather than echoed.
    iv: [u8; 12],
    reply: oneshot::Receiver<WriteResult>,
}

type Answered = (String, Result<WriteResult, oneshot::error::RecvError>);

/// The oldest pending send's answer, once it has one.
fn next_answer(pending: &mut VecDeque<PendingSend>, cx: &mut Context<'_>) -> Poll<Answered> {
    let Some(oldest) = pending.front_mut() else {
        return Poll::Pending;
    };
    let result = std::task::ready!(Pin::new(&mut oldest.reply).poll(cx));
    let done = pending.pop_front().expect("front exists");
    Poll::Ready((done.reference, result))
}

/// The heartbeat timer, polled only once it is due. A poll registers this task to be woken when
/// the timer fires and stays registered until then, so polling it every time round the loop
/// (as an `Interval` in the `select!` would be) only re-registers the same waker, after a
/// cache miss on the timer's own allocation: 1.1–1.3% of the server's samples at 25 000
/// messages/s. The due time is kept here, beside the loop's other state, and a clock read
/// decides.
struct Heartbeat {
    sleep: Pin<Box<tokio::time::Sleep>>,
    every: Duration,
    due: tokio::time::Instant,
    /// Polled since its last reset, so the timer holds this task's waker.
    armed: bool,
}

impl Heartbeat {
    fn new(every: Duration) -> Self {
        let due = tokio::time::Instant::now() + every;
        Self {
            sleep: Box::pin(tokio::time::sleep_until(due)),
            every,
            due,
            armed: false,
        }
    }

    /// Ready once per period; the next period starts when it fires.
    fn poll_beat(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.armed && tokio::time::Instant::now() < self.due {
            return Poll::Pending;
        }
        // Outside the task's budget: a poll refused for a spent budget would register nothing,
        // and nothing else wakes a silent socket.
        let mut sleep = tokio::task::unconstrained(self.sleep.as_mut());
        match Pin::new(&mut sleep).poll(cx) {
            Poll::Ready(()) => {
                self.due = tokio::time::Instant::now() + self.every;
                self.sleep.as_mut().reset(self.due);
                self.armed = false;
                Poll::Ready(())
            }
            Poll::Pending => {
                self.armed = true;
                Poll::Pending
            }
        }
    }
}

/// Why the loop ended, turned into a close frame.
enum End {
    /// The client closed or vanished; nothing to send.
    Gone,
    /// Close with this code and reason.
    Close(CloseCode, &'static str),
}

struct Joined {
    room: RoomId,
    delivered: Delivered,
}

/// Which messages of its room a socket has: every seq up to `through`, plus some beyond it
/// (its own acknowledged messages, which the hub does not echo back to the sender).
///
/// Seqs of a room have no holes, so a live frame whose seq is not `through + 1` reveals a gap:
/// with several server processes, a message committed through another process can arrive after
/// a later one committed here. The session then reads the gap from storage before delivering,
/// so every member sees every message once and in seq order.
#[derive(Debug, Default, PartialEq, Eq)]
struct Delivered {
    through: i64,
    ahead: std::collections::BTreeSet<i64>,
}

impl Delivered {
    fn new(through: i64) -> Self {
        Self {
            through,
            ahead: Default::default(),
        }
    }

    fn has(&self, seq: i64) -> bool {
        seq <= self.through || self.ahead.contains(&seq)
    }

    fn mark(&mut self, seq: i64) {
        if seq <= self.through {
            return;
        }
        if seq > self.through + 1 {
            self.ahead.insert(seq);
            return;
        }
        // The next one, as almost always: no set node is allocated and freed for it.
        self.through = seq;
        while self.ahead.remove(&(self.through + 1)) {
            self.through += 1;
        }
    }

    /// Everything below `seq` counts as had (the gap could not be read: wiped or expired).
    fn skip_to(&mut self, seq: i64) {
        if seq - 1 > self.through {
            self.through = seq - 1;
            self.ahead.retain(|s| *s > self.through);
            while self.ahead.remove(&(self.through + 1)) {
                self.through += 1;
            }
        }
    }
}

/// Take in one page read (oldest first) to fill the gap before `next`: marks as had every
/// message in it below `next` and returns, in seq order, those this socket must be sent. A
/// message it already has is left out, and so is one of its own sends that is committed but not
/// yet acknowledged here (its ack is on the way; a few pending sends at most, so a scan will do).
/// Seqs have no holes, so what is missing from storage has expired: the seqs before the page's
/// first count as had, and so does the whole gap when the page holds nothing below `next`
/// (then `None`). Each page therefore moves what the socket has forward.
fn gap_page(
    delivered: &mut Delivered,
    pending: &VecDeque<PendingSend>,
    page: Vec<StoredMessage>,
    next: i64,
) -> Option<Vec<StoredMessage>> {
    let mut missing = page.into_iter().filter(|m| m.seq < next).peekable();
    let Some(first) = missing.peek() else {
        delivered.skip_to(next);
        return None;
    };
    delivered.skip_to(first.seq);
    let mut to_send = Vec::new();
    for m in missing {
        if delivered.has(m.seq) {
            continue;
        }
        delivered.mark(m.seq);
        if !pending.iter().any(|p| p.iv[..] == m.iv[..]) {
            to_send.push(m);
        }
    }
    Some(to_send)
}

struct Conn {
    id: SessionId,
    state: Arc<AppState>,
    ws: Writer,
    challenge: [u8; CHALLENGE_LEN],
    joined: Option<Joined>,
    pending: VecDeque<PendingSend>,
    limiter: DefaultDirectRateLimiter,
    strikes: DirectLimiter,
    send_timeout: Duration,
    peer: Peer,
    queued: Option<Arc<std::sync::atomic::AtomicUsize>>,
}

fn refuse(code: ErrorCode, message: &'static str) -> FrameError {
    FrameError::new(code, message)
}

fn store_refusal(e: &StoreError, op: &'static str, state: &AppState) -> FrameError {
    let refusal = match e {
        // On purpose, not a failure: the store logged it when it began.
        StoreError::Full(_) => return refuse(ErrorCode::Unavailable, STORAGE_FULL),
        StoreError::Unavailable(_) => refuse(
            ErrorCode::Unavailable,
            "storage is unavailable right now; nothing was changed, try again shortly",
        ),
        StoreError::Corrupt(_) => refuse(ErrorCode::Internal, "internal error"),
    };
    tracing::warn!(error = %e, op, "storage operation failed");
    state
        .metrics
        .store_errors_total
        .with_label_values(&[op])
        .inc();
    refusal
}

fn wire_messages(page: Page) -> (Vec<WireMsg>, bool, i64) {
    let high = page.messages.last().map_or(0, |m| m.seq);
    let msgs = page.messages.iter().map(WireMsg::from).collect();
    (msgs, page.more, high)
}

async fn next_outbound(rx: &mut Option<mpsc::Receiver<Outbound>>) -> Option<Outbound> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Run one connection to its end.
pub async fn run(state: Arc<AppState>, ws: Writer, mut stream: Reader, peer: Peer) {
    let limits = &state.settings.limits;
    let quota = Quota::per_second(
        std::num::NonZeroU32::new(limits.frames_per_second).unwrap_or(std::num::NonZeroU32::MIN),
    )
    .allow_burst(
        std::num::NonZeroU32::new(limits.frames_burst).unwrap_or(std::num::NonZeroU32::MIN),
    );
    let mut challenge = [0u8; CHALLENGE_LEN];
    rand::fill(&mut challenge);
    let ping_every = Duration::from_secs(limits.ping_interval_secs);
    let idle_after = Duration::from_secs(limits.idle_timeout_secs);
    let max_inflight = limits.max_inflight_sends;
    let mut conn = Conn {
        id: next_session_id(),
        send_timeout: Duration::from_secs(limits.send_timeout_secs),
        state: state.clone(),
        ws,
        challenge,
        joined: None,
        pending: VecDeque::new(),
        limiter: RateLimiter::direct(quota),
        // One strike is forgiven every two seconds.
        strikes: DirectLimiter::with_quota(
            "strikes",
            Quota::with_period(Duration::from_secs(2))
                .expect("non-zero period")
                .allow_burst(
                    std::num::NonZeroU32::new(limits.strike_budget)
                        .unwrap_or(std::num::NonZeroU32::MIN),
                ),
        ),
        peer,
        queued: None,
    };
    state.metrics.connections_open.inc();
    state.metrics.connections_total.inc();

    let hello = ServerFrame::Hello {
        v: PROTOCOL_VERSION,
        challenge: b64u(&conn.challenge),
        pow_bits: state.pow.required(conn.peer.onion),
        max_ct: state.settings.limits.max_ct_bytes,
        history: state.settings.limits.history,
        now: now_ms(),
    };
    let mut rx: Option<mpsc::Receiver<Outbound>> = None;
    let mut kick: Option<Kick> = None;
    let mut last_heard = Instant::now();
    let mut heartbeat = Heartbeat::new(ping_every);

    // Polled once here so that its wake-up is registered; after that the loop looks at the
    // lock-free flag and polls the token only once shutdown has begun (a token's poll takes a
    // lock that every session shares). The flag is read at every poll, not as a `select!`
    // condition: those are read once per round, and the wake-up comes in the middle of one.
    let shutdown = state.shutdown.clone().cancelled_owned();
    tokio::pin!(shutdown);
    let mut draining = futures_util::poll!(&mut shutdown).is_ready();
    let end = if conn.send(hello.to_text()).await.is_err() {
        End::Gone
    } else {
        loop {
            // Draining for shutdown: once every read message is acknowledged (or refused), ask
            // the client to reconnect elsewhere or later.
            if draining && conn.pending.is_empty() {
                break End::Close(CloseCode::Restart, "server restarting");
            }
            tokio::select! {
                biased;
                _ = std::future::poll_fn(|cx| match state.is_shutting_down() {
                    true => shutdown.as_mut().poll(cx),
                    false => Poll::Pending,
                }), if !draining => {
                    draining = true;
                }
                (reference, result) = std::future::poll_fn(|cx| next_answer(&mut conn.pending, cx)), if !conn.pending.is_empty() => {
                    conn.answer_send(reference, result);
                    // Sends committed together are answered in one write. Polled with this
                    // task's own waker, so a wake-up asked for meanwhile is never lost.
                    std::future::poll_fn(|cx| {
                        conn.answer_ready(cx);
                        Poll::Ready(())
                    })
                    .await;
                    conn.release_idle_inflight();
                    if conn.flush().await.is_err() {
                        break End::Gone;
                    }
                }
                out = next_outbound(&mut rx) => {
                    // A closed queue is a kick: leave now, frames still queued are not sent
                    // (the client catches up from storage when it rejoins).
                    let closed = rx.as_ref().is_some_and(mpsc::Receiver::is_closed);
                    let Some(out) = out.filter(|_| !closed) else {
                        break match kick.as_ref().and_then(Kick::reason) {
                            Some(KickReason::Nuked) => {
                                let _ = conn.send(ServerFrame::Nuked.to_text()).await;
                                End::Close(CloseCode::Normal, "room wiped")
                            }
                            // Too slow, or dropped by the hub without a reason: the same.
                            _ => End::Close(CloseCode::Other(CLOSE_TOO_SLOW), "too slow"),
                        };
                    };
                    if conn.deliver_queued(out, &mut rx).await.is_err() {
                        break End::Gone;
                    }
                }
                msg = stream.recv(), if conn.pending.len() < max_inflight => {
                    last_heard = Instant::now();
                    match msg {
                        None => break End::Gone,
                        Some(Ok(Incoming::Text(text))) if draining => {
                            // Nothing new is taken on while draining; say so, so the client
                            // knows to retry after reconnecting.
                            let limits = FrameLimits {
                                max_ct_bytes: conn.state.settings.limits.max_ct_bytes,
                                default_history: conn.state.settings.limits.history,
                            };
                            let reference = match parse_client_frame(&text, &limits) {
                                Ok(ClientFrame::Send { reference, .. }) => Some(reference),
                                _ => None,
                            };
                            let err = FrameError {
                                code: ErrorCode::Unavailable,
                                message: "the server is restarting; reconnect and retry",
                                reference,
                            };
                            if conn.send_error(&err, None).await.is_err() {
                                break End::Gone;
                            }
                        }
                        Some(Ok(Incoming::Text(text))) => {
                            match Box::pin(conn.handle_text(&text)).await {
                                Ok(Some(sub)) => {
                                    rx = Some(sub.rx);
                                    kick = Some(sub.kick);
                                    conn.queued = Some(sub.queued);
                                }
                                Ok(None) => {}
                                Err(end) => break end,
                            }
                        }
                        Some(Ok(Incoming::Binary)) => {
                            let err = refuse(ErrorCode::BadRequest, "binary frames are not accepted; send JSON text frames");
                            let _ = conn.send_error(&err, None).await;
                            break End::Close(CloseCode::Unsupported, "binary frame");
                        }
                        Some(Ok(Incoming::Ping(bytes))) => match conn.control_frame_allowed() {
                            Ok(true) => {
                                if conn.ws.pong(&bytes).await.is_err() {
                                    break End::Gone;
                                }
                            }
                            Ok(false) => {}
                            Err(end) => break end,
                        },
                        Some(Ok(Incoming::Pong)) => {
                            if let Err(end) = conn.control_frame_allowed() {
                                break end;
                            }
                        }
                        Some(Ok(Incoming::Close)) => break End::Close(CloseCode::Normal, ""),
                        Some(Err(ReadError::TooLarge)) => {
                            let err = refuse(ErrorCode::TooLarge, "the frame is larger than this server accepts");
                            let _ = conn.send_error(&err, None).await;
                            break End::Close(CloseCode::Size, "frame too large");
                        }
                        Some(Err(ReadError::TooManyPieces)) => {
                            const _: () = assert!(crate::websocket::MAX_PIECES == 64, "named below");
                            let err = refuse(ErrorCode::TooLarge, "a message may arrive in at most 64 frames");
                            let _ = conn.send_error(&err, None).await;
                            break End::Close(CloseCode::Size, "message in too many frames");
                        }
                        Some(Err(ReadError::Protocol)) => break End::Close(CloseCode::Protocol, "protocol error"),
                    }
                }
                () = std::future::poll_fn(|cx| heartbeat.poll_beat(cx)) => {
                    if last_heard.elapsed() >= idle_after {
                        break End::Close(CloseCode::Away, "idle timeout");
                    }
                    if conn.ws.ping(b"").await.is_err() {
                        break End::Gone;
                    }
                }
            }
        }
    };

    if let Some(joined) = &conn.joined {
        state.hub.unsubscribe(&joined.room, conn.id);
    }
    state.metrics.connections_open.dec();
    if let End::Close(code, description) = end {
        let closed =
            tokio::time::timeout(conn.send_timeout, conn.ws.close(code.into(), description)).await;
        if matches!(closed, Ok(Ok(()))) {
            // Read on until the client answers the close, so that its input still in flight
            // does not make the kernel reset the connection before our close frame is read.
            stream.linger().await;
        }
    }
}

impl Conn {
    /// Deliver `first` and the frames queued behind it (at most `DELIVER_BATCH`) in one write:
    /// under load a socket's frames queue up while its task waits its turn, and one write of
    /// many frames costs little more than a write of one.
    async fn deliver_queued(
        &mut self,
        first: Outbound,
        rx: &mut Option<mpsc::Receiver<Outbound>>,
    ) -> Result<(), ()> {
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(out) = next.take() {
            if let Some(q) = &self.queued {
                q.fetch_sub(out.frame.len(), std::sync::atomic::Ordering::Relaxed);
            }
            self.deliver(out).await?;
            taken += 1;
            if taken < DELIVER_BATCH {
                next = rx.as_mut().and_then(|rx| rx.try_recv().ok());
            }
        }
        self.flush().await
    }

    /// Queue a live frame for the next flush, once and in order, reading any gap before it
    /// from storage.
    async fn deliver(&mut self, out: Outbound) -> Result<(), ()> {
        let joined = self
            .joined
            .as_ref()
            .expect("a receiver exists only once joined");
        if joined.delivered.has(out.seq) {
            return Ok(());
        }
        if out.seq > joined.delivered.through + 1 {
            // Its own sends answered meanwhile are not missing: take their acks first.
            std::future::poll_fn(|cx| {
                self.answer_ready(cx);
                Poll::Ready(())
            })
            .await;
        }
        let through = self.joined.as_ref().map_or(0, |j| j.delivered.through);
        if out.seq > through + 1 {
            // Rare, and its future is large: boxed, so it does not grow every session's task.
            Box::pin(self.fill_gap(out.seq)).await?;
        }
        self.ws.queue_text(&out.frame);
        if let Some(j) = self.joined.as_mut() {
            j.delivered.mark(out.seq);
        }
        Ok(())
    }

    /// Send the stored messages between what this socket has seen and `next`, which the hub
    /// is about to deliver.
    async fn fill_gap(&mut self, next: i64) -> Result<(), ()> {
        let Some(room) = self.joined.as_ref().map(|j| j.room) else {
            return Ok(());
        };
        while let Some(j) = &self.joined
            && next > j.delivered.through + 1
        {
            let through = j.delivered.through;
            self.state.metrics.gap_reads_total.inc();
            let limit = (next - 1 - through).clamp(1, 200) as u32;
            let page = self
                .state
                .store
                .messages(&room, HistoryQuery::After(through), limit, now_ms())
                .await;
            let Ok(page) = page else {
                // Storage is down: deliver what we have; the client can page later.
                break;
            };
            let delivered = &mut self.joined.as_mut().expect("joined").delivered;
            let Some(to_send) = gap_page(delivered, &self.pending, page.messages, next) else {
                break;
            };
            for m in &to_send {
                self.ws
                    .queue_text(&ServerFrame::Msg(WireMsg::from(m)).to_text());
            }
            self.flush().await?;
        }
        Ok(())
    }

    /// Write whatever is queued, giving up after the send timeout.
    async fn flush(&mut self) -> Result<(), ()> {
        match tokio::time::timeout(self.send_timeout, self.ws.flush()).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    /// Send one text frame (after any queued ones), giving up after the send timeout.
    async fn send(&mut self, text: impl AsRef<str>) -> Result<(), ()> {
        self.ws.queue_text(text.as_ref());
        self.flush().await
    }

    async fn send_error(
        &mut self,
        err: &FrameError,
        retry_after_ms: Option<u64>,
    ) -> Result<(), ()> {
        self.state.metrics.rejected(err.code);
        self.send(ServerFrame::error(err, retry_after_ms).to_text())
            .await
    }

    /// Send a refusal and charge the socket's strike budget; a socket that keeps going after
    /// repeated refusals is disconnected.
    async fn refuse(&mut self, err: &FrameError, retry_after_ms: Option<u64>) -> Result<(), End> {
        let cost = match err.code {
            ErrorCode::RateLimited => STRIKE_RATE_LIMITED,
            ErrorCode::BadRequest | ErrorCode::UnknownType | ErrorCode::TooLarge => STRIKE_INVALID,
            _ => 0,
        };
        self.send_error(err, retry_after_ms)
            .await
            .map_err(|()| End::Gone)?;
        self.strike(cost)
    }

    /// Charge the socket's strike budget; past it the socket is disconnected.
    fn strike(&self, cost: u32) -> Result<(), End> {
        if cost > 0 && self.strikes.check_n(cost).is_err() {
            self.state.metrics.abuse_disconnects_total.inc();
            return Err(End::Close(CloseCode::Policy, "too many refused frames"));
        }
        Ok(())
    }

    /// Whether a frame now would be over the client's or this socket's frame limit (counted in
    /// the metrics when it is).
    fn frame_limited(&self) -> Option<Refused> {
        self.state
            .limits
            .client(ClientLimit::Frame, self.peer.client)
            .err()
            .or_else(|| {
                self.limiter.check().err().map(|n| {
                    // Counted here: this limiter is the socket's own, not one of `Limits`.
                    self.state
                        .metrics
                        .rate_limited_total
                        .with_label_values(&["socket_frames"])
                        .inc();
                    Refused {
                        limiter: "socket_frames",
                        retry_after: n.wait_time_from(self.limiter.clock().now()),
                    }
                })
            })
    }

    /// A ping or pong counts against the frame limits like any frame. Over them a ping gets no
    /// pong (a flood of pings would otherwise be a flood of writes) and each costs a strike.
    fn control_frame_allowed(&self) -> Result<bool, End> {
        if self.frame_limited().is_none() {
            return Ok(true);
        }
        self.strike(STRIKE_RATE_LIMITED).map(|()| false)
    }

    /// Once every send is answered, give back what a burst of them grew (up to
    /// `limits.max_inflight_sends` entries), so a socket that sent a burst once does not keep
    /// that memory while it sits idle.
    fn release_idle_inflight(&mut self) {
        if self.pending.is_empty() && self.pending.capacity() > INFLIGHT_KEPT {
            self.pending = VecDeque::new();
        }
    }

    /// Queue the answer to a committed (or failed) send: `ack`, or the error that says why it
    /// was not stored.
    /// Answer, in order, the pending sends whose answers are in; polled with `cx`, so the task
    /// is woken when the next one comes.
    fn answer_ready(&mut self, cx: &mut Context<'_>) {
        while let Poll::Ready((reference, result)) = next_answer(&mut self.pending, cx) {
            self.answer_send(reference, result);
        }
    }

    fn answer_send(
        &mut self,
        reference: String,
        result: Result<WriteResult, oneshot::error::RecvError>,
    ) {
        let frame = match result {
            Ok(Ok(c)) => {
                if let Some(j) = self.joined.as_mut() {
                    j.delivered.mark(c.seq);
                }
                ServerFrame::Ack {
                    reference,
                    seq: c.seq,
                    ts: c.ts,
                }
            }
            Ok(Err(code)) => {
                let message = match code {
                    ErrorCode::Replay => "this room already has a message with this IV",
                    ErrorCode::RoomGone => "this room was wiped",
                    _ => "storage is unavailable right now; the message was not stored, retry it",
                };
                self.state.metrics.rejected(code);
                ServerFrame::error(
                    &FrameError {
                        code,
                        message,
                        reference: Some(reference),
                    },
                    None,
                )
            }
            // The writer dropped the job without answering: it was not stored.
            Err(_) => {
                self.state.metrics.rejected(ErrorCode::Unavailable);
                ServerFrame::error(
                    &FrameError {
                        code: ErrorCode::Unavailable,
                        message: "the message was not stored, retry it",
                        reference: Some(reference),
                    },
                    None,
                )
            }
        };
        self.ws.queue_text(&frame.to_text());
    }

    /// Handle one text frame. `Ok(Some(_))` when the socket just joined a room; `Err` when the
    /// socket must end.
    async fn handle_text(&mut self, text: &str) -> Result<Option<crate::hub::Subscription>, End> {
        if let Some(r) = self.frame_limited() {
            self.refuse_rate(r, crate::protocol::unparsed_send_ref(text))
                .await?;
            return Ok(None);
        }
        let limits = FrameLimits {
            max_ct_bytes: self.state.settings.limits.max_ct_bytes,
            default_history: self.state.settings.limits.history,
        };
        let received = Instant::now();
        let frame = match parse_client_frame(text, &limits) {
            Ok(f) => f,
            Err(err) => {
                self.refuse(&err, None).await?;
                return Ok(None);
            }
        };
        let outcome = match frame {
            ClientFrame::Pow => self.pow().await.map(|()| None),
            ClientFrame::Create {
                room,
                auth_key,
                pow,
            } => self.create(room, auth_key, pow).await.map(Some),
            ClientFrame::Join { room, proof, after } => {
                self.join(room, proof, after).await.map(Some)
            }
            ClientFrame::Send {
                reference,
                epoch,
                iv,
                ct,
            } => self
                .submit(reference, epoch, iv, ct, received)
                .await
                .map(|()| None),
            ClientFrame::History { query, limit } => {
                self.history(query, limit).await.map(|()| None)
            }
            ClientFrame::Panic => self.panic().await.map(|()| None),
        };
        match outcome {
            Ok(sub) => Ok(sub),
            Err(Refusal::Frame(err)) => {
                self.refuse(&err, None).await?;
                Ok(None)
            }
            Err(Refusal::Limited(r, reference)) => {
                self.refuse_rate(r, reference).await?;
                Ok(None)
            }
            Err(Refusal::Gone) => Err(End::Gone),
        }
    }

    async fn refuse_rate(&mut self, r: Refused, reference: Option<String>) -> Result<(), End> {
        let err = FrameError {
            code: ErrorCode::RateLimited,
            message: "too many requests; wait before retrying",
            reference,
        };
        let wait = r.retry_after.as_millis().max(1) as u64;
        self.refuse(&err, Some(wait)).await
    }

    async fn pow(&mut self) -> Result<(), Refusal> {
        self.state
            .limits
            .client(ClientLimit::PowToken, self.peer.client)
            .map_err(|r| Refusal::Limited(r, None))?;
        let bits = self.state.pow.required(self.peer.onion);
        self.state
            .metrics
            .pow_tokens_total
            .with_label_values(&["issued"])
            .inc();
        let expires = now_ms() as u64 + self.state.settings.pow.token_ttl_secs * 1000;
        let token = self.state.keys.issue_pow_token(expires, bits);
        let frame = ServerFrame::Pow {
            token: b64u(&token),
            bits,
            expires,
        };
        self.send(frame.to_text()).await.map_err(|()| Refusal::Gone)
    }

    async fn check_pow(&self, room: &RoomId, pow: Option<PowSolution>) -> Result<(), Refusal> {
        let required = self.state.pow.required(self.peer.onion);
        if required == 0 {
            return Ok(());
        }
        let Some(sol) = pow else {
            return Err(refuse(
                ErrorCode::PowRequired,
                "creating a room needs proof of work right now: ask for a token with a pow frame",
            )
            .into());
        };
        let tokens = &self.state.metrics.pow_tokens_total;
        let invalid = |why: &str| {
            tokens.with_label_values(&[why]).inc();
            Refusal::from(refuse(
                ErrorCode::PowInvalid,
                "the proof of work is wrong, expired or already used",
            ))
        };
        let now = now_ms();
        // No I/O first (length, version, expiry, tag, the work), then the replay set, which
        // may be a database round trip.
        let token = self
            .state
            .keys
            .verify_pow_solution(&sol.token, room, sol.counter, now as u64)
            .map_err(|e| invalid(e.label()))?;
        match self
            .state
            .store
            .redeem_token(&token.nonce, token.expires_ms as i64, now)
            .await
        {
            Ok(true) => {
                tokens.with_label_values(&["redeemed"]).inc();
                Ok(())
            }
            Ok(false) => Err(invalid("spent")),
            Err(e) => Err(store_refusal(&e, "redeem_token", &self.state).into()),
        }
    }

    /// With several processes on one database, the server-wide creation limit is also checked
    /// against the rooms the whole cluster created in the last minute.
    async fn check_cluster_creations(&self) -> Result<(), Refusal> {
        let limit = u64::from(self.state.settings.rate.global_creations.per_minute);
        let since = now_ms() - 60_000;
        match self.state.store.rooms_created_since(since).await {
            Ok(Some(n)) if n >= limit => {
                self.state
                    .metrics
                    .rate_limited_total
                    .with_label_values(&["cluster_creations"])
                    .inc();
                Err(Refusal::Limited(
                    Refused {
                        limiter: "cluster_creations",
                        retry_after: Duration::from_secs(5),
                    },
                    None,
                ))
            }
            Ok(_) => Ok(()),
            Err(e) => Err(store_refusal(&e, "room", &self.state).into()),
        }
    }

    fn ensure_not_joined(&self) -> Result<(), Refusal> {
        match self.joined {
            Some(_) => Err(refuse(
                ErrorCode::AlreadyJoined,
                "this socket already belongs to a room",
            )
            .into()),
            None => Ok(()),
        }
    }

    async fn create(
        &mut self,
        room: RoomId,
        auth_key: [u8; 32],
        pow: Option<PowSolution>,
    ) -> Result<crate::hub::Subscription, Refusal> {
        self.ensure_not_joined()?;
        if self.state.storage_full() {
            return Err(refuse(ErrorCode::Unavailable, STORAGE_FULL).into());
        }
        // Global before per client, then the cluster-wide count, then the work itself.
        self.state
            .limits
            .client(ClientLimit::Creation, self.peer.client)
            .map_err(|r| Refusal::Limited(r, None))?;
        self.check_cluster_creations().await?;
        self.check_pow(&room, pow).await?;
        let wrapped = self.state.keys.wrap_auth_key(&room, &auth_key);
        let outcome = self
            .state
            .store
            .create_room(&room, &wrapped, now_ms())
            .await
            .map_err(|e| store_refusal(&e, "create_room", &self.state))?;
        match outcome {
            CreateOutcome::Created => {}
            CreateOutcome::Exists => {
                return Err(
                    refuse(ErrorCode::RoomExists, "a room with this id already exists").into(),
                );
            }
            CreateOutcome::Gone => {
                return Err(refuse(
                    ErrorCode::RoomGone,
                    "this room was wiped and cannot be used again",
                )
                .into());
            }
        }
        self.state.metrics.rooms_created_total.inc();
        self.state.pow.record_creation();
        let sub = self.state.hub.subscribe(&room, self.id);
        self.joined = Some(Joined {
            room,
            delivered: Delivered::new(0),
        });
        let frame = ServerFrame::Joined {
            room: room_to_wire(&room),
            messages: Vec::new(),
            more: false,
        };
        self.send(frame.to_text())
            .await
            .map_err(|()| Refusal::Gone)?;
        Ok(sub)
    }

    async fn join(
        &mut self,
        room: RoomId,
        proof: [u8; 32],
        after: Option<i64>,
    ) -> Result<crate::hub::Subscription, Refusal> {
        self.ensure_not_joined()?;
        // The page a join returns is a read; charged before the room is even looked up.
        self.state
            .limits
            .client(
                ClientLimit::Read(self.state.settings.limits.history),
                self.peer.client,
            )
            .map_err(|r| Refusal::Limited(r, None))?;
        let metrics = self.state.metrics.clone();
        let auth_failed = || {
            metrics
                .joins_total
                .with_label_values(&["auth_failed"])
                .inc();
            Refusal::from(refuse(
                ErrorCode::AuthFailed,
                "no room with this id accepts this proof",
            ))
        };
        let now = now_ms();
        let record = self.state.store.room(&room, now).await.map_err(|e| {
            metrics.joins_total.with_label_values(&["error"]).inc();
            store_refusal(&e, "room", &self.state)
        })?;
        let Some(record) = record else {
            // Spend the same HMAC work as for a known room, so timing does not tell the two
            // apart either.
            let decoy = [0u8; 32];
            let _ = crypto::verify_join_proof(&decoy, &self.challenge, &room, &proof);
            return Err(auth_failed());
        };
        let Some(auth_key) = self.state.keys.unwrap_auth_key(&room, &record.auth_wrapped) else {
            metrics.joins_total.with_label_values(&["error"]).inc();
            tracing::error!(
                "a stored room key does not unwrap with this server's secret: is \
                 server.secret_file the same on every node, and the database unaltered?"
            );
            return Err(refuse(ErrorCode::Internal, "internal error").into());
        };
        if !crypto::verify_join_proof(&auth_key, &self.challenge, &room, &proof) {
            return Err(auth_failed());
        }
        if record.wiped {
            metrics.joins_total.with_label_values(&["room_gone"]).inc();
            return Err(refuse(ErrorCode::RoomGone, "this room was wiped").into());
        }
        // Subscribe before reading, so nothing committed in between is missed; frames that
        // the read already returned are dropped by seq in the loop.
        let sub = self.state.hub.subscribe(&room, self.id);
        let query = after.map_or(HistoryQuery::Latest, HistoryQuery::After);
        let started = Instant::now();
        let page = self
            .state
            .store
            .messages(&room, query, self.state.settings.limits.history, now)
            .await;
        metrics
            .history_query_seconds
            .observe(started.elapsed().as_secs_f64());
        let page = match page {
            Ok(page) => page,
            Err(e) => {
                self.state.hub.unsubscribe(&room, self.id);
                metrics.joins_total.with_label_values(&["error"]).inc();
                return Err(store_refusal(&e, "messages", &self.state).into());
            }
        };
        metrics.joins_total.with_label_values(&["ok"]).inc();
        let (messages, more, high) = wire_messages(page);
        let through = high.max(after.unwrap_or(0));
        self.state.hub.observe(&room, through);
        self.joined = Some(Joined {
            room,
            delivered: Delivered::new(through),
        });
        let frame = ServerFrame::Joined {
            room: room_to_wire(&room),
            messages,
            more,
        };
        self.send(frame.to_text())
            .await
            .map_err(|()| Refusal::Gone)?;
        Ok(sub)
    }

    async fn submit(
        &mut self,
        reference: String,
        epoch: u32,
        iv: [u8; 12],
        ct: Vec<u8>,
        received: Instant,
    ) -> Result<(), Refusal> {
        let with_ref = |code, message| FrameError {
            code,
            message,
            reference: Some(reference.clone()),
        };
        let Some(joined) = &self.joined else {
            return Err(with_ref(ErrorCode::NotJoined, "join or create a room first").into());
        };
        let room = joined.room;
        if self.state.storage_full() {
            return Err(with_ref(ErrorCode::Unavailable, STORAGE_FULL).into());
        }
        // Per client before per room; a long message counts as several.
        let cost = crate::protocol::message_cost(ct.len());
        self.state
            .limits
            .client(ClientLimit::Message(cost), self.peer.client)
            .and_then(|()| self.state.limits.room_message(&room, cost))
            .map_err(|r| Refusal::Limited(r, Some(reference.clone())))?;
        let current = crypto::epoch_of(now_ms());
        if epoch.abs_diff(current) > 1 {
            return Err(with_ref(
                ErrorCode::BadRequest,
                "epoch must be within one day of the server's; check the device clock",
            )
            .into());
        }
        let msg = NewMessage {
            room,
            epoch,
            iv,
            ct,
        };
        let rx = self.state.writer.submit(msg, self.id, received).await;
        self.pending.push_back(PendingSend {
            reference,
            iv,
            reply: rx,
        });
        Ok(())
    }

    async fn history(&mut self, query: HistoryQuery, limit: u32) -> Result<(), Refusal> {
        let Some(joined) = &self.joined else {
            return Err(refuse(ErrorCode::NotJoined, "join or create a room first").into());
        };
        // What may be read is charged, not what is found: the cost of the read is paid either way.
        self.state
            .limits
            .client(ClientLimit::Read(limit), self.peer.client)
            .map_err(|r| Refusal::Limited(r, None))?;
        let started = Instant::now();
        let page = self
            .state
            .store
            .messages(&joined.room, query, limit, now_ms())
            .await;
        self.state
            .metrics
            .history_query_seconds
            .observe(started.elapsed().as_secs_f64());
        let page = page.map_err(|e| store_refusal(&e, "messages", &self.state))?;
        let (messages, more, _) = wire_messages(page);
        let frame = ServerFrame::History { messages, more };
        self.send(frame.to_text()).await.map_err(|()| Refusal::Gone)
    }

    async fn panic(&mut self) -> Result<(), Refusal> {
        let Some(joined) = &self.joined else {
            return Err(refuse(ErrorCode::NotJoined, "join or create a room first").into());
        };
        let room = joined.room;
        self.state
            .store
            .wipe(&room, now_ms())
            .await
            .map_err(|e| store_refusal(&e, "wipe", &self.state))?;
        self.state.metrics.rooms_wiped_total.inc();
        // Every socket of the room, this one included, is kicked and sends `nuked`.
        self.state.hub.nuke(&room);
        Ok(())
    }
}

/// Why a frame handler stopped: a refusal to send, a rate limit (with the `ref` of a `send`),
/// or the socket is gone.
enum Refusal {
    Frame(FrameError),
    Limited(Refused, Option<String>),
    Gone,
}

impl From<FrameError> for Refusal {
    fn from(e: FrameError) -> Self {
        Refusal::Frame(e)
    }
}

#[cfg(test)]
mod tests {
    use super::{Delivered, PendingSend, gap_page};
    use crate::store::StoredMessage;
    use std::collections::VecDeque;

    fn stored(seq: i64) -> StoredMessage {
        StoredMessage {
            seq,
            ts: 0,
            epoch: 0,
            iv: vec![seq as u8; 12],
            ct: vec![1; 16],
        }
    }

    fn pending(seqs: &[i64]) -> VecDeque<PendingSend> {
        seqs.iter()
            .map(|&seq| PendingSend {
                reference: seq.to_string(),
                iv: [seq as u8; 12],
                reply: tokio::sync::oneshot::channel().1,
            })
            .collect()
    }

    fn seqs(page: Option<Vec<StoredMessage>>) -> Option<Vec<i64>> {
        page.map(|p| p.iter().map(|m| m.seq).collect())
    }

    #[test]
    fn a_gap_page_sends_what_is_missing_but_not_the_sockets_own_pending_sends() {
        // Has 1..=3 and its own acknowledged 6; 7 arrived live. Its send with seq 5 is
        // committed, but the ack has not reached the socket yet.
        let mut d = Delivered::new(3);
        d.mark(6);
        let page = (4..=8).map(stored).collect();
        assert_eq!(
            seqs(gap_page(&mut d, &pending(&[5]), page, 7)),
            Some(vec![4])
        );
        assert_eq!(d.through, 6, "4 sent, 5 its own, 6 had: 7 comes next");
        assert!(d.ahead.is_empty());
    }

    #[test]
    fn a_gap_whose_start_expired_still_moves_forward() {
        // 4 and 5 expired while the socket waited; the page starts at 6.
        let mut d = Delivered::new(3);
        d.mark(7);
        let page = vec![stored(6), stored(7), stored(8)];
        assert_eq!(
            seqs(gap_page(&mut d, &pending(&[]), page, 9)),
            Some(vec![6, 8])
        );
        assert_eq!(d.through, 8);
        // Nothing below `next` stored at all: the whole gap counts as had.
        let mut d = Delivered::new(3);
        assert_eq!(
            seqs(gap_page(&mut d, &pending(&[]), vec![stored(12)], 10)),
            None
        );
        assert_eq!(d.through, 9);
    }

    #[test]
    fn own_messages_ahead_are_absorbed_and_gaps_are_visible() {
        let mut d = Delivered::new(3);
        assert!(d.has(2) && !d.has(4));
        d.mark(5); // own ack, while 4 (from another node) is still on its way
        assert!(d.has(5) && !d.has(4));
        assert_eq!(d.through, 3);
        d.mark(4);
        assert_eq!(d.through, 5);
        assert!(d.ahead.is_empty());
        d.mark(9);
        d.skip_to(9); // 6, 7 and 8 could not be read
        assert_eq!(d.through, 9);
        d.mark(10);
        assert_eq!(d.through, 10);
        assert!(d.ahead.is_empty());
    }
}
