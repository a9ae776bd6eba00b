//! The soak: many clients churn through the whole protocol for a bounded time while the
//! server's resident memory, open descriptors, threads and database connections are sampled.
//! After warm-up they must stay flat. On SQLite the replay key filter's memory (which grows
//! with the keys a replay window holds) is sampled too, from the server's `/metrics`.
//!
//! Each client loops: connect (from one of many 127.0.0.x addresses), create a room or join a
//! known one, send a few messages and wait for each answer, sometimes page history, sometimes
//! wipe the room with `panic`, then leave (politely or by dropping the socket).
//!
//! Watchers (`--watchers`) check live delivery meanwhile: each joins a room the churn uses, stays
//! a few seconds and checks that the live messages it gets continue the page `joined` gave it
//! one by one (every seq once, in order, none missing), that it got at least every message
//! acknowledged to a sender five seconds before it left, and that it is told of the room's
//! wipe when a churning client presses panic. With `--postgres` and `--nodes N`, clients and
//! watchers pick a process at random, so most of what a watcher gets crossed from one process
//! to another, and `--cut-listeners N` cuts the processes' cluster listener connections N times
//! during the run.
//!
//! Expiry under a compressed clock: the server runs maintenance every 2 s, and every few
//! seconds the soak ages the data instead of speeding the clock: it writes messages that are
//! already past the 30-day retention (SQLite: straight into the database file, which WAL
//! allows beside the server; Postgres: through the store with a clock set 31 days back, into
//! that day's partition). The server's own maintenance must expire them; the report shows how
//! many aged rows were still waiting at each sample.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nanochat::client::{Client, RoomSession};
use nanochat::crypto::RoomKeys;
use nanochat::protocol::{ClientFrame, HistoryQuery, ServerFrame, WireMsg};
use nanochat::store::{Millis, NewMessage, Store as _, now_ms};

use crate::{Args, Server, rss_bytes};

/// Server settings for the soak: maintenance every 2 s, and `join` pages of 5 messages (100
/// by default), so that a watcher coming back to a room after a few seconds pages the rest in
/// with `history`, as clients that were away longer do.
pub const SERVER_ENV: [(&str, &str); 2] = [
    ("NANOCHAT__RETENTION__MAINTENANCE_INTERVAL_SECS", "2"),
    ("NANOCHAT__LIMITS__HISTORY", "5"),
];

const DAY_MS: Millis = 86_400_000;
/// Aged rows are this old: past the 30-day retention.
const AGE_MS: Millis = 31 * DAY_MS;

#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    creates: AtomicU64,
    joins: AtomicU64,
    acks: AtomicU64,
    refusals: AtomicU64,
    histories: AtomicU64,
    /// History pages whose seqs were not consecutive or stopped short of a message this
    /// client had just had acknowledged.
    bad_histories: AtomicU64,
    bad_examples: Mutex<Vec<serde_json::Value>>,
    /// Empty history pages followed by the room's wipe notice.
    wiped_histories: AtomicU64,
    panics: AtomicU64,
    errors: AtomicU64,
    aged_written: AtomicU64,
    refusal_codes: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Watchers' visits to a room, and the live messages they got.
    watches: AtomicU64,
    live: AtomicU64,
    /// Live messages that did not continue a watcher's sequence by one: a repeat, an earlier
    /// seq or a hole (and pages of `joined` that were not consecutive).
    live_out_of_order: AtomicU64,
    /// Acknowledged messages a watcher had not got when it checked.
    live_missing: AtomicU64,
    live_examples: Mutex<Vec<serde_json::Value>>,
    /// Wipes a watcher was told of, and wipes a watcher in the room was not told of.
    watched_wipes: AtomicU64,
    wipes_missed: AtomicU64,
    watcher_errors: AtomicU64,
    /// Watchers' returns to a room with `after`, and the stored messages they got back.
    resumes: AtomicU64,
    resumed: AtomicU64,
    /// `history` pages they read after the page of `joined`.
    resume_pages: AtomicU64,
}

impl Counters {
    fn live_example(&self, example: serde_json::Value) {
        let mut examples = self.live_examples.lock().expect("examples");
        if examples.len() < 5 {
            examples.push(example);
        }
    }
}

/// What the churn knows of its rooms, shared with the watchers.
#[derive(Default)]
struct Rooms {
    /// Rooms to join (at most 200, the newest).
    known: Vec<RoomKeys>,
    /// Each room's highest seq acknowledged to a sender.
    acked: HashMap<[u8; 16], i64>,
    /// Rooms whose wipe the panicking client saw.
    wiped: HashSet<[u8; 16]>,
}

fn proc_count(pid: u32, what: &str) -> u64 {
    match what {
        "fds" => std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64),
        _ => std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0),
    }
}

/// A gauge or counter of the server's `/metrics` (on its admin listener), by its whole name.
pub(crate) async fn scrape(admin: Option<&str>, name: &str) -> Option<u64> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(admin?).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await.ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Where aged data goes and how to count what is left of it.
enum Ager {
    Sqlite(rusqlite::Connection),
    Postgres {
        store: nanochat::store::postgres::PgStore,
        client: tokio_postgres::Client,
    },
}

impl Ager {
    async fn open(args: &Args, data_dir: &Path) -> Ager {
        match &args.postgres {
            None => {
                let conn = rusqlite::Connection::open(data_dir.join("nanochat.db"))
                    .expect("open the server's SQLite file");
                conn.busy_timeout(Duration::from_secs(10))
                    .expect("busy timeout");
                Ager::Sqlite(conn)
            }
            Some(_) => {
                let (store, client) = crate::open_postgres(args).await;
                Ager::Postgres { store, client }
            }
        }
    }

    /// Write `n` messages that are already past the retention; returns how many were written.
    async fn write_aged(&mut self, n: usize) -> u64 {
        let then = now_ms() - AGE_MS;
        let mut room = [0u8; 16];
        rand::fill(&mut room);
        match self {
            Ager::Sqlite(conn) => {
                let tx = conn.transaction().expect("transaction");
                {
                    // A message and its seq entry, as the server stores them (no replay key: a
                    // message this old is out of every replay window, and its run long gone).
                    let mut insert = tx
                        .prepare_cached(
                            "INSERT INTO messages (room_id, seq, created_at, epoch, iv, ct)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        )
                        .expect("prepare");
                    let mut index = tx
                        .prepare_cached(
                            "INSERT INTO message_seqs (room_id, seq, id) VALUES (?1, ?2, last_insert_rowid())",
                        )
                        .expect("prepare");
                    for seq in 1..=n {
                        let mut iv = [0u8; 12];
                        rand::fill(&mut iv);
                        insert
                            .execute(rusqlite::params![
                                &room[..],
                                seq as i64,
                                then,
                                nanochat::crypto::epoch_of(then),
                                &iv[..],
                                &[0u8; 64][..]
                            ])
                            .expect("insert an aged message");
                        index
                            .execute(rusqlite::params![&room[..], seq as i64])
                            .expect("index an aged message");
                    }
                }
                tx.commit().expect("commit");
                n as u64
            }
            Ager::Postgres { store, .. } => {
                // The partitions of 31 days ago exist only while we make them.
                let _ = store.ensure_partitions(then).await;
                let _ = store.create_room(&room, &[0u8; 60], then).await;
                let batch: Vec<NewMessage> = (0..n)
                    .map(|_| {
                        let mut iv = [0u8; 12];
                        rand::fill(&mut iv);
                        NewMessage {
                            room,
                            epoch: nanochat::crypto::epoch_of(then),
                            iv,
                            ct: vec![0u8; 64],
                        }
                    })
                    .collect();
                match store.append(&batch, then).await {
                    Ok(outcomes) => outcomes.len() as u64,
                    Err(_) => 0,
                }
            }
        }
    }

    /// Aged rows still stored, and the server's database connections.
    async fn sample(&mut self, pid: u32) -> (u64, u64) {
        let cutoff = now_ms() - 30 * DAY_MS;
        match self {
            Ager::Sqlite(conn) => {
                let aged: i64 = conn
                    .query_row(
                        "SELECT count(*) FROM messages WHERE created_at < ?1",
                        [cutoff],
                        |r| r.get(0),
                    )
                    .unwrap_or(-1);
                // The server's SQLite connections: its open handles on the database file.
                let db_handles = std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .map(|d| {
                        d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                            .filter(|t| t.to_string_lossy().ends_with("nanochat.db"))
                            .count() as u64
                    })
                    .unwrap_or(0);
                (aged.max(0) as u64, db_handles)
            }
            Ager::Postgres { client, .. } => {
                let aged: i64 = client
                    .query_one(
                        "SELECT count(*) FROM messages WHERE created_at < to_timestamp($1::float8 / 1000)",
                        &[&(cutoff as f64)],
                    )
                    .await
                    .map_or(-1, |r| r.get(0));
                let conns: i64 = client
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity
                         WHERE datname = current_database() AND pid <> pg_backend_pid()
                           AND application_name LIKE 'nanochat-%'",
                        &[],
                    )
                    .await
                    .map_or(-1, |r| r.get(0));
                (aged.max(0) as u64, conns.max(0) as u64)
            }
        }
    }
}

/// One of the processes' WebSocket URLs, at random.
fn any_of(urls: &[String]) -> &str {
    &urls[rand::random::<u32>() as usize % urls.len()]
}

/// One churning client, until `stop`; each visit goes to one of `urls` at random.
async fn churn(
    id: usize,
    urls: Arc<Vec<String>>,
    rooms: Arc<Mutex<Rooms>>,
    counters: Arc<Counters>,
    phase: Arc<Phase>,
) {
    let local = crate::source_addr(1, id);
    let mut round = 0u64;
    while !phase.stop.load(Ordering::Relaxed) {
        round += 1;
        if one_visit(any_of(&urls), local, &rooms, &counters, round)
            .await
            .is_err()
        {
            counters.errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let pause = 20 + rand::random::<u64>() % 200;
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

async fn one_visit(
    url: &str,
    local: IpAddr,
    rooms: &Mutex<Rooms>,
    c: &Counters,
    round: u64,
) -> Result<(), nanochat::client::ClientError> {
    let mut client = Client::connect_from(url, local).await?;
    c.connects.fetch_add(1, Ordering::Relaxed);
    // Three visits in four join a room the churn knows, if any; the others create one.
    let known = (!rand::random::<u8>().is_multiple_of(4))
        .then(|| any_room(rooms, usize::MAX))
        .flatten();
    let keys = match known {
        Some(keys) => match client.join(&keys, None).await? {
            ServerFrame::Joined { .. } => {
                c.joins.fetch_add(1, Ordering::Relaxed);
                keys
            }
            _ => {
                // Wiped or expired meanwhile: forget it.
                forget(rooms, &keys.room_id);
                return Ok(());
            }
        },
        None => {
            let mut secret = [0u8; 32];
            rand::fill(&mut secret);
            let keys = RoomKeys::derive(&secret);
            if !matches!(client.create(&keys).await?, ServerFrame::Joined { .. }) {
                return Ok(());
            }
            c.creates.fetch_add(1, Ordering::Relaxed);
            let r = &mut rooms.lock().expect("rooms").known;
            if r.len() >= 200 {
                r.remove(0);
            }
            r.push(keys.clone());
            keys
        }
    };
    let mut session = RoomSession::new(keys.clone()).within(client.hello.max_ct);
    let sends = 1 + rand::random::<u32>() % 10;
    let mut last_ack = 0;
    for i in 0..sends {
        let reference = format!("{round}-{i}");
        let sealed = session.seal_at("soak", "a message of a soak run", client.server_now());
        client.send_sealed(&reference, &sealed).await?;
        loop {
            match client.recv().await? {
                ServerFrame::Ack {
                    reference: r, seq, ..
                } if r == reference => {
                    c.acks.fetch_add(1, Ordering::Relaxed);
                    last_ack = seq;
                    let acked = &mut rooms.lock().expect("rooms").acked;
                    let max = acked.entry(keys.room_id).or_default();
                    *max = (*max).max(seq);
                    break;
                }
                ServerFrame::Error {
                    reference: Some(r),
                    code,
                    ..
                } if r == reference => {
                    c.refusals.fetch_add(1, Ordering::Relaxed);
                    *c.refusal_codes
                        .lock()
                        .expect("codes")
                        .entry(code)
                        .or_default() += 1;
                    break;
                }
                ServerFrame::Nuked => return Ok(()),
                _ => {}
            }
        }
    }
    if round.is_multiple_of(3) {
        let query = ClientFrame::History {
            query: HistoryQuery::Latest,
            limit: 50,
        };
        client.send_json(&query.to_json()).await?;
        // The newest messages, ascending and without holes (rooms are never expired while
        // in use here), up to at least the last one acknowledged to this client.
        loop {
            match client.recv().await? {
                ServerFrame::History { messages, more } => {
                    let seqs: Vec<i64> = messages.iter().map(|m| m.seq).collect();
                    let consecutive = seqs.windows(2).all(|w| w[1] == w[0] + 1);
                    if seqs.is_empty() && last_ack > 0 {
                        // Wiped by another client after our acks (a wipe takes every message
                        // at once): the wipe's notice follows the page.
                        let next =
                            tokio::time::timeout(Duration::from_secs(5), client.recv()).await;
                        if matches!(next, Ok(Ok(ServerFrame::Nuked))) {
                            c.wiped_histories.fetch_add(1, Ordering::Relaxed);
                            return Ok(());
                        }
                    }
                    if !consecutive || seqs.last().copied().unwrap_or(0) < last_ack {
                        c.bad_histories.fetch_add(1, Ordering::Relaxed);
                        let mut examples = c.bad_examples.lock().expect("examples");
                        if examples.len() < 5 {
                            examples.push(serde_json::json!({
                                "first": seqs.first(), "last": seqs.last(), "len": seqs.len(),
                                "more": more, "last_ack": last_ack, "consecutive": consecutive,
                            }));
                        }
                    }
                    break;
                }
                ServerFrame::Nuked | ServerFrame::Error { .. } => return Ok(()),
                _ => {}
            }
        }
        c.histories.fetch_add(1, Ordering::Relaxed);
    }
    if rand::random::<u8>().is_multiple_of(25) {
        client.send_json(&ClientFrame::Panic.to_json()).await?;
        forget(rooms, &keys.room_id);
        c.panics.fetch_add(1, Ordering::Relaxed);
        // The panicking socket is told too: from then on every watcher of the room must be.
        loop {
            match tokio::time::timeout(Duration::from_secs(5), client.recv()).await {
                Ok(Ok(ServerFrame::Nuked)) => {
                    rooms.lock().expect("rooms").wiped.insert(keys.room_id);
                    break;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(nanochat::client::ClientError::Timeout),
            }
        }
        return Ok(());
    }
    if rand::random::<bool>() {
        client.close().await;
    }
    Ok(())
}

/// One of the rooms the churn knows, at random; `newest` limits the choice to that many of
/// the newest.
fn any_room(rooms: &Mutex<Rooms>, newest: usize) -> Option<RoomKeys> {
    let known = &rooms.lock().expect("rooms").known;
    let n = known.len().min(newest);
    (n > 0).then(|| known[known.len() - 1 - rand::random::<u32>() as usize % n].clone())
}

/// Watchers pick among this many of the newest rooms: the churn creates rooms fast enough
/// that the oldest of its 200 are dropped within seconds, and a watcher stays up to 12 s.
const WATCHED_NEWEST: usize = 20;

/// Drop a room from those the churn joins (wiped, or gone).
fn forget(rooms: &Mutex<Rooms>, room: &[u8; 16]) {
    rooms
        .lock()
        .expect("rooms")
        .known
        .retain(|k| &k.room_id != room);
}

/// How long before leaving a watcher notes what it must have got by then.
const WATCH_GRACE: Duration = Duration::from_secs(5);

/// Flags the run raises at its end: `stop` for everyone, then `churn_done` once every
/// churning client has finished, so that the rooms' acknowledged seqs are final.
#[derive(Default)]
struct Phase {
    stop: AtomicBool,
    churn_done: AtomicBool,
}

/// One watcher, until the run ends: visit rooms the churn uses, one after the other.
async fn watcher(
    id: usize,
    urls: Arc<Vec<String>>,
    rooms: Arc<Mutex<Rooms>>,
    counters: Arc<Counters>,
    phase: Arc<Phase>,
) {
    let local = crate::source_addr(200, id);
    let mut visits = 0u64;
    while !phase.stop.load(Ordering::Relaxed) {
        let Some(keys) = any_room(&rooms, WATCHED_NEWEST) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        visits += 1;
        let drops = visits % 2 == 1;
        if watch(&urls, local, &keys, drops, &rooms, &counters, &phase)
            .await
            .is_err()
        {
            counters.watcher_errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A live message: it must continue the socket's live sequence by one (which starts after
/// the last seq of `joined`).
fn observe(c: &Counters, m: &WireMsg, last: &mut i64) {
    if m.seq == *last + 1 {
        c.live.fetch_add(1, Ordering::Relaxed);
    } else {
        c.live_out_of_order.fetch_add(1, Ordering::Relaxed);
        c.live_example(serde_json::json!({"expected": *last + 1, "got": m.seq}));
    }
    *last = (*last).max(m.seq);
}

/// Check that a page of stored messages continues `last` by one (the page `joined` gave
/// after `after`, or a `history` page after it); returns the new last seq.
fn check_page(c: &Counters, messages: &[WireMsg], last: i64) -> i64 {
    let mut expected = last + 1;
    for m in messages {
        if m.seq != expected {
            c.live_out_of_order.fetch_add(1, Ordering::Relaxed);
            c.live_example(serde_json::json!({
                "page_after": last,
                "page": messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            }));
            return messages.last().map_or(last, |m| m.seq.max(last));
        }
        expected += 1;
    }
    c.resumed
        .fetch_add(messages.len() as u64, Ordering::Relaxed);
    expected - 1
}

/// Connect to one of `urls` at random and join the room: the newest messages when `after`
/// is none, else everything after it, paged in with `history` when `joined` says there is
/// more, as protocol.md says a client does. Live messages start after the last seq of
/// `joined`, so while the pages come they can bring seqs the pages bring too (the client
/// drops such repeats); the live sequence itself must still go up by one. The socket, the
/// last seq of the pages and the last seq of the live sequence; none when the room is gone.
async fn enter(
    urls: &[String],
    local: IpAddr,
    keys: &RoomKeys,
    after: Option<i64>,
    rooms: &Mutex<Rooms>,
    c: &Counters,
) -> Result<Option<(Client, i64, i64)>, nanochat::client::ClientError> {
    let mut client = Client::connect_from(any_of(urls), local).await?;
    let ServerFrame::Joined { messages, more, .. } = client.join(keys, after).await? else {
        forget(rooms, &keys.room_id);
        return Ok(None);
    };
    let (mut pages, mut more) = match after {
        Some(had) => {
            c.resumes.fetch_add(1, Ordering::Relaxed);
            (check_page(c, &messages, had), more)
        }
        None => {
            if !messages.windows(2).all(|w| w[1].seq == w[0].seq + 1) {
                c.live_out_of_order.fetch_add(1, Ordering::Relaxed);
                c.live_example(serde_json::json!({
                    "joined_page": messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
                }));
            }
            (messages.last().map_or(0, |m| m.seq), false)
        }
    };
    let mut live = pages;
    while more {
        let query = ClientFrame::History {
            query: HistoryQuery::After(pages),
            limit: 100,
        };
        client.send_json(&query.to_json()).await?;
        loop {
            match client.recv().await? {
                ServerFrame::Msg(m) => observe(c, &m, &mut live),
                ServerFrame::History { messages, more: m } => {
                    c.resume_pages.fetch_add(1, Ordering::Relaxed);
                    pages = check_page(c, &messages, pages);
                    more = m;
                    break;
                }
                ServerFrame::Nuked => {
                    c.watched_wipes.fetch_add(1, Ordering::Relaxed);
                    return Ok(None);
                }
                _ => {}
            }
        }
    }
    Ok(Some((client, pages, live)))
}

/// A watcher's stay in one room: join, then take live messages until it is time to leave
/// (or the run ends), checking them as it goes and what it got when it leaves. A stay that
/// `drops` (every other one, the first included) loses its connection once, a moment after
/// joining, and comes back through any process with `after`, as a client whose network
/// dropped does.
async fn watch(
    urls: &[String],
    local: IpAddr,
    keys: &RoomKeys,
    drops: bool,
    rooms: &Mutex<Rooms>,
    c: &Counters,
    phase: &Phase,
) -> Result<(), nanochat::client::ClientError> {
    let room = keys.room_id;
    let Some((mut client, pages, mut live)) = enter(urls, local, keys, None, rooms, c).await?
    else {
        return Ok(());
    };
    // The highest seq this watcher has, from pages or live.
    let mut last = pages.max(live);
    c.watches.fetch_add(1, Ordering::Relaxed);
    // What the room's senders had had acknowledged, and whether it had been wiped, at a
    // moment: by `WATCH_GRACE` later this watcher must have every such message, or the wipe.
    let noted = || {
        let r = rooms.lock().expect("rooms");
        (
            r.acked.get(&room).copied().unwrap_or(0),
            r.wiped.contains(&room),
        )
    };
    let started = Instant::now();
    let stay = Duration::from_millis(6_000 + rand::random::<u64>() % 6_000);
    let mut drop_at =
        drops.then(|| started + Duration::from_millis(1_000 + rand::random::<u64>() % 2_000));
    let mut must: Option<(i64, bool)> = None;
    let mut check_by = started + stay;
    let mut at_end = false;
    loop {
        if !at_end && phase.stop.load(Ordering::Relaxed) {
            // The run is ending: once the churn has finished, every acknowledged seq is
            // known, and the watcher must get up to it (or the wipe) within the grace.
            if phase.churn_done.load(Ordering::Relaxed) {
                at_end = true;
                must = Some(noted());
                check_by = Instant::now() + WATCH_GRACE;
            }
        } else if must.is_none() && started.elapsed() + WATCH_GRACE >= stay {
            must = Some(noted());
        }
        if let Some((acked, wiped)) = must {
            // At the end of the run, leave as soon as everything owed has arrived.
            let satisfied = at_end && !wiped && last >= acked;
            if satisfied || Instant::now() >= check_by {
                if wiped {
                    c.wipes_missed.fetch_add(1, Ordering::Relaxed);
                    c.live_example(serde_json::json!({"wipe_missed": true, "last": last}));
                } else if last < acked {
                    c.live_missing
                        .fetch_add((acked - last) as u64, Ordering::Relaxed);
                    c.live_example(serde_json::json!({"missing_after": last, "acked": acked}));
                }
                client.close().await;
                return Ok(());
            }
        }
        if drop_at.is_some_and(|t| Instant::now() >= t) && !phase.stop.load(Ordering::Relaxed) {
            // The connection drops (half the time without a close frame); the room goes on.
            drop_at = None;
            if rand::random::<bool>() {
                client.close().await;
            } else {
                drop(client);
            }
            let away = 200 + rand::random::<u64>() % 1_300;
            tokio::time::sleep(Duration::from_millis(away)).await;
            match enter(urls, local, keys, Some(last), rooms, c).await? {
                Some((back, pages, from)) => {
                    client = back;
                    live = from;
                    last = pages.max(live);
                }
                // Wiped while away: nothing more is owed.
                None => return Ok(()),
            }
            continue;
        }
        // Short waits, so that the checks above run on time however quiet the room.
        match tokio::time::timeout(Duration::from_millis(50), client.recv()).await {
            Err(_) => {}
            Ok(frame) => match frame? {
                ServerFrame::Msg(m) => {
                    observe(c, &m, &mut live);
                    last = last.max(live);
                }
                ServerFrame::Nuked => {
                    c.watched_wipes.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                _ => {}
            },
        }
    }
}

pub async fn run(args: &Args, servers: &[Server], data_dir: &Path) {
    let pids: Vec<u32> = servers.iter().map(|s| s.pid()).collect();
    let urls: Arc<Vec<String>> = Arc::new(
        servers
            .iter()
            .map(|s| format!("ws://{}/ws", s.addr))
            .collect(),
    );
    let counters = Arc::new(Counters::default());
    let phase = Arc::new(Phase::default());
    let rooms = Arc::new(Mutex::new(Rooms::default()));
    let workers: Vec<_> = (0..args.clients)
        .map(|id| {
            tokio::spawn(churn(
                id,
                urls.clone(),
                rooms.clone(),
                counters.clone(),
                phase.clone(),
            ))
        })
        .collect();
    let watchers: Vec<_> = (0..args.watchers)
        .map(|id| {
            tokio::spawn(watcher(
                id,
                urls.clone(),
                rooms.clone(),
                counters.clone(),
                phase.clone(),
            ))
        })
        .collect();
    let cutter = crate::ListenerCutter::start(args, Instant::now());
    let mut ager = Ager::open(args, data_dir).await;
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut next_sample = Duration::ZERO;
    let sum = |f: &dyn Fn(u32) -> u64| pids.iter().map(|&p| f(p)).sum::<u64>();
    while start.elapsed() < Duration::from_secs(args.secs) {
        if start.elapsed() >= next_sample {
            let (aged_left, db_conns) = ager.sample(pids[0]).await;
            let mut filter_kib = None;
            for s in servers {
                if let Some(b) = scrape(s.admin.as_deref(), "nanochat_replay_filter_bytes").await {
                    *filter_kib.get_or_insert(0) += b / 1024;
                }
            }
            let sample = serde_json::json!({
                "t_s": start.elapsed().as_secs(),
                "rss_kib": sum(&|p| rss_bytes(p) / 1024),
                "fds": sum(&|p| proc_count(p, "fds")),
                "threads": sum(&|p| proc_count(p, "threads")),
                "db_connections": db_conns,
                "aged_rows_waiting": aged_left,
                "replay_filter_kib": filter_kib,
                "acks": counters.acks.load(Ordering::Relaxed),
                "live": counters.live.load(Ordering::Relaxed),
            });
            eprintln!("{sample}");
            samples.push(sample);
            next_sample += Duration::from_secs(args.sample_secs);
        }
        let written = ager.write_aged(500).await;
        counters.aged_written.fetch_add(written, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    phase.stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    }
    phase.churn_done.store(true, Ordering::Relaxed);
    for w in watchers {
        let _ = tokio::time::timeout(WATCH_GRACE + Duration::from_secs(5), w).await;
    }
    let (listener_cuts, catch_ups) = cutter.finish(servers).await;
    // Flatness after warm-up: compare the last fifth of the run with the second fifth.
    let series = |key: &str| -> Vec<f64> {
        samples
            .iter()
            .map(|s| s[key].as_f64().unwrap_or(0.0))
            .collect()
    };
    let window = |v: &[f64], from: usize, to: usize| -> f64 {
        let part = &v[from.min(v.len())..to.min(v.len())];
        if part.is_empty() {
            0.0
        } else {
            part.iter().sum::<f64>() / part.len() as f64
        }
    };
    let n = samples.len();
    let mut trend = serde_json::Map::new();
    for key in [
        "rss_kib",
        "replay_filter_kib",
        "fds",
        "threads",
        "db_connections",
    ] {
        let v = series(key);
        let early = window(&v, n / 5, 2 * n / 5);
        let late = window(&v, 4 * n / 5, n);
        trend.insert(
            key.into(),
            serde_json::json!({"after_warmup": early, "end": late, "max": v.iter().cloned().fold(0.0, f64::max)}),
        );
    }
    let c = &counters;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let report = serde_json::json!({
        "scenario": "soak",
        "backend": if args.postgres.is_some() { "postgres" } else { "sqlite" },
        "secs": args.secs,
        "clients": args.clients,
        "connects": load(&c.connects),
        "creates": load(&c.creates),
        "joins": load(&c.joins),
        "acks": load(&c.acks),
        "refusals": load(&c.refusals),
        "refusal_codes": *c.refusal_codes.lock().expect("codes"),
        "histories": load(&c.histories),
        "bad_histories": load(&c.bad_histories),
        "bad_history_examples": *c.bad_examples.lock().expect("examples"),
        "wiped_histories": load(&c.wiped_histories),
        "panics": load(&c.panics),
        "client_errors": load(&c.errors),
        "aged_rows_written": load(&c.aged_written),
        "aged_rows_waiting_at_end": samples.last().map_or(0, |s| s["aged_rows_waiting"].as_u64().unwrap_or(0)),
        "nodes": servers.len(),
        "watchers": args.watchers,
        "watches": load(&c.watches),
        "live": load(&c.live),
        "live_out_of_order": load(&c.live_out_of_order),
        "live_missing": load(&c.live_missing),
        "live_examples": *c.live_examples.lock().expect("examples"),
        "watched_wipes": load(&c.watched_wipes),
        "wipes_missed": load(&c.wipes_missed),
        "watcher_errors": load(&c.watcher_errors),
        "resumes": load(&c.resumes),
        "resumed": load(&c.resumed),
        "resume_pages": load(&c.resume_pages),
        "listener_cuts": listener_cuts,
        "catch_ups": catch_ups,
        "trend": trend,
        "samples": samples.len(),
    });
    println!("{report}");
}
