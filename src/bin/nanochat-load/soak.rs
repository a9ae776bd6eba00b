//! The soak: many clients churn through the whole protocol for a bounded time while the
//! server's resident memory, open descriptors, threads and database connections are sampled.
//! After warm-up they must stay flat. On SQLite the replay key filter's memory (which grows
//! with the keys a replay window holds) is sampled too, from the server's `/metrics`.
//!
//! Each client loops: connect (from one of many 127.0.0.x addresses), create a room or join a
//! known one, send a few messages and wait for each answer, sometimes page history, sometimes
//! wipe the room with `panic`, then leave (politely or by dropping the socket).
//!
//! Expiry under a compressed clock: the server runs maintenance every 2 s, and every few
//! seconds the soak ages the data instead of speeding the clock: it writes messages that are
//! already past the 30-day retention (SQLite: straight into the database file, which WAL
//! allows beside the server; Postgres: through the store with a clock set 31 days back, into
//! that day's partition). The server's own maintenance must expire them; the report shows how
//! many aged rows were still waiting at each sample.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nanochat::client::{Client, RoomSession};
use nanochat::crypto::RoomKeys;
use nanochat::protocol::{ClientFrame, HistoryQuery, ServerFrame};
use nanochat::store::{Millis, NewMessage, Store as _, now_ms};

use crate::{Args, Server, rss_bytes};

/// Server settings for the soak: maintenance every 2 s, limits out of the way of the churn.
pub const SERVER_ENV: [(&str, &str); 1] = [("NANOCHAT__RETENTION__MAINTENANCE_INTERVAL_SECS", "2")];

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

/// One churning client, until `stop`.
async fn churn(
    id: usize,
    url: String,
    rooms: Arc<Mutex<Vec<RoomKeys>>>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) {
    let local = IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        1 + (id / 250) as u8,
        2 + (id % 250) as u8,
    ));
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        if one_visit(&url, local, &rooms, &counters, round)
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
    rooms: &Mutex<Vec<RoomKeys>>,
    c: &Counters,
    round: u64,
) -> Result<(), nanochat::client::ClientError> {
    let mut client = Client::connect_from(url, local).await?;
    c.connects.fetch_add(1, Ordering::Relaxed);
    let known = {
        let r = rooms.lock().expect("rooms");
        (!r.is_empty() && !rand::random::<u8>().is_multiple_of(4))
            .then(|| r[rand::random::<u32>() as usize % r.len()].clone())
    };
    let keys = match known {
        Some(keys) => match client.join(&keys, None).await? {
            ServerFrame::Joined { .. } => {
                c.joins.fetch_add(1, Ordering::Relaxed);
                keys
            }
            _ => {
                // Wiped or expired meanwhile: forget it.
                rooms
                    .lock()
                    .expect("rooms")
                    .retain(|k| k.room_id != keys.room_id);
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
            let mut r = rooms.lock().expect("rooms");
            if r.len() >= 200 {
                r.remove(0);
            }
            r.push(keys.clone());
            keys
        }
    };
    let mut session = RoomSession::new(keys.clone());
    let sends = 1 + rand::random::<u32>() % 10;
    let mut last_ack = 0;
    for i in 0..sends {
        let reference = format!("{round}-{i}");
        client
            .send_sealed(&reference, &session.seal("soak", "a message of a soak run"))
            .await?;
        loop {
            match client.recv().await? {
                ServerFrame::Ack {
                    reference: r, seq, ..
                } if r == reference => {
                    c.acks.fetch_add(1, Ordering::Relaxed);
                    last_ack = seq;
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
        rooms
            .lock()
            .expect("rooms")
            .retain(|k| k.room_id != keys.room_id);
        c.panics.fetch_add(1, Ordering::Relaxed);
    }
    if rand::random::<bool>() {
        client.close().await;
    }
    Ok(())
}

pub async fn run(args: &Args, server: &Server, data_dir: &Path) {
    let pid = server.pid();
    let url = format!("ws://{}/ws", server.addr);
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let rooms = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..args.clients)
        .map(|id| {
            tokio::spawn(churn(
                id,
                url.clone(),
                rooms.clone(),
                counters.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let mut ager = Ager::open(args, data_dir).await;
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut next_sample = Duration::ZERO;
    while start.elapsed() < Duration::from_secs(args.secs) {
        if start.elapsed() >= next_sample {
            let (aged_left, db_conns) = ager.sample(pid).await;
            let sample = serde_json::json!({
                "t_s": start.elapsed().as_secs(),
                "rss_kib": rss_bytes(pid) / 1024,
                "fds": proc_count(pid, "fds"),
                "threads": proc_count(pid, "threads"),
                "db_connections": db_conns,
                "aged_rows_waiting": aged_left,
                "replay_filter_kib": scrape(server.admin.as_deref(), "nanochat_replay_filter_bytes")
                    .await
                    .map(|b| b / 1024),
                "acks": counters.acks.load(Ordering::Relaxed),
            });
            eprintln!("{sample}");
            samples.push(sample);
            next_sample += Duration::from_secs(args.sample_secs);
        }
        let written = ager.write_aged(500).await;
        counters.aged_written.fetch_add(written, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    }
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
        "trend": trend,
        "samples": samples.len(),
    });
    println!("{report}");
}
