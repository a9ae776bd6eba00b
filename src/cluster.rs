//! Several server processes on one Postgres act as one: cross-node fan-out with
//! `LISTEN/NOTIFY`.
//!
//! # How
//! - Every committed write batch sends **one** notification (more only if its ranges exceed
//!   Postgres' 8000-byte payload limit) from inside its own transaction, so it is delivered if
//!   and only if the batch commits, in commit order. The payload names the node and, per room,
//!   the range of seqs the batch stored: `{"n":"<node>","m":[["<room>",first,last],…]}`. A wipe
//!   sends `{"n":"<node>","w":"<room>"}`.
//! - Each process keeps one dedicated listener connection (not from the pool). For a range of a
//!   room that has sockets here, it reads those messages (one query per notification, whatever
//!   its number of rooms, and one for all the notifications that queued up while it was
//!   reading; an index range scan per range) and publishes them to the local hub; rooms without
//!   local sockets cost nothing. Its own notifications are ignored (the writer already
//!   published locally).
//! - When the listener connection drops, it reconnects with backoff and then catches up: for
//!   every room with local sockets it reads what was committed after the highest seq this
//!   process knows, so nothing committed while it was away is skipped, and it closes the rooms
//!   wiped meanwhile; up to 500 rooms per statement, within a bound on the bytes one statement
//!   may bring. The first connection at start-up catches up the same way.
//! - Each room delivers in seq order: a local message that arrives before an earlier one
//!   still on its way through the listener is held until it comes ([`crate::hub`], *Order*);
//!   after [`HOLD`] the room reads what is missing from storage once, for all its sockets
//!   ([`fill_held_gaps`]). A session that still finds a gap (the last resort) reads it itself
//!   ([`crate::session`]). So every message is shown once and in order.
//!
//! Guarantee: a client that stays connected receives every message of its room exactly once,
//! in seq order; a client that reconnects and joins with `after` = the last seq it saw misses no
//! acknowledged message.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio_postgres::{AsyncMessage, NoTls};

use crate::crypto::RoomId;
use crate::hub::{HOLD, Hub};
use crate::metrics::Metrics;
use crate::protocol::{HistoryQuery, ServerFrame, WireMsg, b64u, room_from_wire};
use crate::store::{Store, StoredMessage, now_ms};

/// The notification channel.
pub const CHANNEL: &str = "nanochat";
/// Stay below Postgres' 8000-byte payload limit.
const MAX_PAYLOAD: usize = 7800;
/// At most this many notifications waiting for the listener are handled together (their
/// ranges read in one query).
const COALESCE: usize = 64;
/// A listener connection that lasted this long is retried at once when it drops.
const RECONNECT_AT_ONCE_AFTER: Duration = Duration::from_secs(1);
/// Rooms read per statement when the listener catches up after (re)connecting.
const CATCH_UP_ROOMS: usize = 500;
/// Most messages read per room and statement in a catch-up; a room with more is read again.
const CATCH_UP_PAGE: usize = 200;
/// Most ciphertext one catch-up statement may bring, counting each message at the largest
/// ciphertext allowed (`limits.max_ct_bytes`): a catch-up after a long absence, with many busy
/// rooms, then reads in more statements instead of holding gigabytes at once.
const CATCH_UP_BYTES: usize = 16 << 20;

/// How many of `pending` rooms the next catch-up statement reads, and how many messages of
/// each: as many rooms as allowed, sharing the statement's [`CATCH_UP_BYTES`].
fn catch_up_shape(pending: usize, max_ct_bytes: usize) -> (usize, u32) {
    let rows = (CATCH_UP_BYTES / max_ct_bytes.max(1)).max(1);
    let rooms = pending.min(CATCH_UP_ROOMS).min(rows).max(1);
    let page = (rows / rooms).clamp(1, CATCH_UP_PAGE);
    (rooms, page as u32)
}

/// Where a node's listener connects, and who the node is.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    /// Postgres connection string.
    pub url: String,
    /// This process's random id; its own notifications are ignored.
    pub node: u64,
}

/// One notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// Sending node (hex).
    pub n: String,
    /// Stored ranges: (room b64u, first seq, last seq).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub m: Vec<(String, i64, i64)>,
    /// A wiped room (b64u).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub w: Option<String>,
}

fn node_hex(node: u64) -> String {
    format!("{node:016x}")
}

/// The payloads announcing a committed batch: one, unless the ranges do not fit.
pub fn message_payloads(node: u64, ranges: &[(RoomId, i64, i64)]) -> Vec<String> {
    let mut out = Vec::new();
    let mut notice = Notice {
        n: node_hex(node),
        m: Vec::new(),
        w: None,
    };
    let mut size = 40;
    for (room, first, last) in ranges {
        // 22 characters of room id, two numbers, punctuation.
        let entry = 22 + 2 * 20 + 8;
        if size + entry > MAX_PAYLOAD && !notice.m.is_empty() {
            out.push(serde_json::to_string(&notice).expect("notices serialize"));
            notice.m.clear();
            size = 40;
        }
        notice.m.push((b64u(room), *first, *last));
        size += entry;
    }
    if !notice.m.is_empty() {
        out.push(serde_json::to_string(&notice).expect("notices serialize"));
    }
    out
}

/// The payload announcing a wipe.
pub fn wipe_payload(node: u64, room: &RoomId) -> String {
    serde_json::to_string(&Notice {
        n: node_hex(node),
        m: Vec::new(),
        w: Some(b64u(room)),
    })
    .expect("notices serialize")
}

/// Per-room ranges of the seqs a batch stored (`seqs` are (room, seq) in batch order).
pub fn ranges(seqs: impl IntoIterator<Item = (RoomId, i64)>) -> Vec<(RoomId, i64, i64)> {
    let mut by_room: HashMap<RoomId, (i64, i64)> = HashMap::new();
    for (room, seq) in seqs {
        let e = by_room.entry(room).or_insert((seq, seq));
        e.0 = e.0.min(seq);
        e.1 = e.1.max(seq);
    }
    by_room.into_iter().map(|(r, (a, b))| (r, a, b)).collect()
}

/// Deliver one stored message to this process's sockets in its room.
fn publish_stored(hub: &Hub, room: &RoomId, m: &StoredMessage) {
    let frame = ServerFrame::Msg(WireMsg::from(m)).to_text().into();
    hub.publish(room, m.seq, &frame, None);
}

/// Read the announced ranges of the rooms with sockets here, all in one query, and publish
/// what was found, in announcement order.
async fn publish_announced(store: &dyn Store, hub: &Hub, wanted: &mut Vec<(RoomId, i64, i64)>) {
    if wanted.is_empty() {
        return;
    }
    match store.messages_in_ranges(wanted, now_ms()).await {
        Ok(found) => {
            for (room, m) in &found {
                publish_stored(hub, room, m);
            }
        }
        // The rooms read what is missing once a later message has waited for it.
        Err(e) => tracing::warn!(error = %e, "cannot read messages announced by another node"),
    }
    wanted.clear();
}

/// Handle the notifications that arrived together, in their order. Their message ranges are
/// read in one query (up to a wipe, which closes its room after what came before is
/// published), so a listener that falls behind catches up with fewer, larger reads instead of
/// one read per notification.
async fn handle(
    payloads: &[String],
    info: &ClusterInfo,
    store: &dyn Store,
    hub: &Hub,
    metrics: &Metrics,
) {
    let own = node_hex(info.node);
    let mut wanted: Vec<(RoomId, i64, i64)> = Vec::new();
    for payload in payloads {
        let Ok(notice) = serde_json::from_str::<Notice>(payload) else {
            tracing::warn!("ignoring an unreadable cluster notification");
            continue;
        };
        if notice.n == own {
            continue;
        }
        metrics
            .cluster_notifications_total
            .with_label_values(&["received"])
            .inc();
        if let Some(room) = notice.w.as_deref().and_then(room_from_wire) {
            publish_announced(store, hub, &mut wanted).await;
            hub.nuke(&room);
        }
        // Only the rooms with sockets here.
        wanted.extend(
            notice
                .m
                .iter()
                .filter_map(|(room, first, last)| Some((room_from_wire(room)?, *first, *last)))
                .filter(|(room, _, _)| hub.members(room) > 0),
        );
    }
    publish_announced(store, hub, &mut wanted).await;
}

/// Read from storage, once per room, the messages a room has waited for longer than
/// [`HOLD`] (see *Order* in [`crate::hub`]), and publish them, so the room delivers what it
/// held; what cannot be read (expired) is skipped. Runs until the server stops.
pub async fn fill_held_gaps(store: Arc<dyn Store>, hub: Arc<Hub>, metrics: Arc<Metrics>) {
    loop {
        if !hub.holding() {
            hub.gap_opened().await;
        }
        tokio::time::sleep(HOLD / 5).await;
        for (room, through, first_held) in hub.overdue(HOLD) {
            let mut after = through;
            while after < first_held - 1 {
                metrics.held_gap_reads_total.inc();
                let limit = (first_held - 1 - after).clamp(1, 200) as u32;
                let page = match store
                    .messages(&room, HistoryQuery::After(after), limit, now_ms())
                    .await
                {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read a room's missing messages; its members read them themselves");
                        break;
                    }
                };
                for m in page.messages.iter().filter(|m| m.seq < first_held) {
                    publish_stored(&hub, &room, m);
                }
                match page.messages.last() {
                    Some(last) if page.more => after = last.seq,
                    _ => break,
                }
            }
            hub.skip_to(&room, first_held);
        }
    }
}

/// Catch up every room with local sockets after the listener (re)connected: close the rooms
/// another node wiped meanwhile, and publish what was committed to the others. Each statement
/// reads up to [`CATCH_UP_ROOMS`] rooms (a page of each, [`catch_up_shape`]); a room whose page
/// was full goes to the back of the queue. So thousands of rooms cost a few round trips
/// rather than two each. Returns how many rooms it caught up.
async fn catch_up(
    store: &dyn Store,
    hub: &Hub,
    max_ct_bytes: usize,
) -> Result<usize, crate::store::StoreError> {
    let rooms = hub.rooms();
    let mut pending: VecDeque<(RoomId, i64)> = VecDeque::with_capacity(rooms.len());
    for chunk in rooms.chunks(CATCH_UP_ROOMS) {
        let ids: Vec<RoomId> = chunk.iter().map(|(room, _)| *room).collect();
        let wiped: HashSet<RoomId> = store
            .wiped_rooms(&ids, now_ms())
            .await?
            .into_iter()
            .collect();
        for room in &wiped {
            hub.nuke(room);
        }
        pending.extend(chunk.iter().filter(|(room, _)| !wiped.contains(room)));
    }
    while !pending.is_empty() {
        let (count, page) = catch_up_shape(pending.len(), max_ct_bytes);
        let batch: Vec<(RoomId, i64)> = pending.drain(..count).collect();
        let found = store.messages_after(&batch, page, now_ms()).await?;
        // Per room: how many came and the last seq, to go on after it when its page was full.
        let mut read: HashMap<RoomId, (u32, i64)> = HashMap::new();
        for (room, m) in &found {
            publish_stored(hub, room, m);
            let e = read.entry(*room).or_insert((0, m.seq));
            *e = (e.0 + 1, m.seq);
        }
        pending.extend(
            read.into_iter()
                .filter(|(_, (n, _))| *n >= page)
                .map(|(room, (_, last))| (room, last)),
        );
    }
    Ok(rooms.len())
}

/// Listen for other nodes' notifications until the server stops, reconnecting as needed.
pub async fn listen(
    info: ClusterInfo,
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    max_ct_bytes: usize,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        // Listening until a moment ago (a connection that lasted): try again at once, as a
        // dropped connection (a restarted proxy, a killed backend) usually connects again at
        // once; the backoff is for a database that keeps refusing.
        let mut listened_for = Duration::ZERO;
        let config = info.url.parse::<tokio_postgres::Config>().map(|mut c| {
            c.application_name(format!("nanochat-listener-{}", node_hex(info.node)));
            c
        });
        let connected = match config {
            Ok(c) => c.connect(NoTls).await,
            Err(e) => {
                tracing::error!(error = %e, "database.url cannot be parsed for the cluster listener");
                return;
            }
        };
        match connected {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1024);
                // The connection must be polled to receive notifications.
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(AsyncMessage::Notification(n)) => {
                                if tx.send(n.payload().to_owned()).await.is_err() {
                                    break;
                                }
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    Ok(()) => {
                        backoff = Duration::from_millis(200);
                        metrics
                            .cluster_notifications_total
                            .with_label_values(&["listening"])
                            .inc();
                        // Notifications queue up from here on; the catch-up covers before.
                        let started = std::time::Instant::now();
                        match catch_up(&*store, &hub, max_ct_bytes).await {
                            Ok(rooms) => tracing::info!(
                                rooms,
                                ms = started.elapsed().as_millis() as u64,
                                "cluster listener caught up"
                            ),
                            Err(e) => tracing::warn!(
                                error = %e,
                                "cluster catch-up failed; members catch up on reconnect"
                            ),
                        }
                        metrics.cluster_listening.set(1);
                        let listening = std::time::Instant::now();
                        let mut payloads = Vec::new();
                        while rx.recv_many(&mut payloads, COALESCE).await > 0 {
                            handle(&payloads, &info, &*store, &hub, &metrics).await;
                            payloads.clear();
                        }
                        metrics.cluster_listening.set(0);
                        listened_for = listening.elapsed();
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot LISTEN for cluster notifications"),
                }
                driver.abort();
                tracing::warn!("cluster listener connection lost; reconnecting");
            }
            Err(e) => tracing::warn!(error = %e, "cluster listener cannot connect; retrying"),
        }
        metrics
            .cluster_notifications_total
            .with_label_values(&["reconnect"])
            .inc();
        if listened_for >= RECONNECT_AT_ONCE_AFTER {
            continue;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_ranges_split_below_the_payload_limit() {
        let rooms: Vec<_> = (0..500u32)
            .map(|i| {
                let mut r = [0u8; 16];
                r[..4].copy_from_slice(&i.to_be_bytes());
                (r, i64::from(i) + 1, i64::from(i) + 9_000_000_000)
            })
            .collect();
        let payloads = message_payloads(7, &rooms);
        assert!(payloads.len() > 1);
        let mut seen = 0;
        for p in &payloads {
            assert!(p.len() < 8000, "{}", p.len());
            let n: Notice = serde_json::from_str(p).unwrap();
            assert_eq!(n.n, node_hex(7));
            seen += n.m.len();
        }
        assert_eq!(seen, 500);
        assert_eq!(message_payloads(7, &rooms[..3]).len(), 1);
    }

    /// A catch-up statement reads as many rooms as allowed, and no more ciphertext than
    /// `CATCH_UP_BYTES` even if every message were as large as allowed.
    #[test]
    fn catch_up_statements_stay_within_their_bytes() {
        assert_eq!(catch_up_shape(3_750, 8192), (500, 4));
        assert_eq!(catch_up_shape(3, 8192), (3, 200));
        assert_eq!(catch_up_shape(3_750, 16), (500, 200));
        assert_eq!(catch_up_shape(3_750, 1 << 20), (16, 1));
        assert_eq!(catch_up_shape(0, 8192), (1, 200));
        for pending in [1, 7, 499, 500, 501, 10_000] {
            for ct in [16, 1000, 8192, 65_536, 1 << 20] {
                let (rooms, page) = catch_up_shape(pending, ct);
                assert!(rooms >= 1 && rooms <= pending.max(1) && rooms <= CATCH_UP_ROOMS);
                assert!(page >= 1 && page as usize <= CATCH_UP_PAGE);
                assert!(
                    rooms * page as usize * ct <= CATCH_UP_BYTES,
                    "{pending} {ct}"
                );
            }
        }
    }

    #[test]
    fn ranges_cover_each_rooms_seqs() {
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let mut r = ranges([(a, 4), (b, 1), (a, 5), (a, 6), (b, 2)]);
        r.sort();
        assert_eq!(r, vec![(a, 4, 6), (b, 1, 2)]);
    }
}
