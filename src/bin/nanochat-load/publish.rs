//! Durable publish: how many messages per second are acknowledged (committed) with what ack
//! latency, against two baselines writing the same rows to the same database in the same run:
//!
//! * `naive`: one `INSERT` (and so one commit and one fsync) per message, from as many
//!   connections as NanoChat has senders: what a straightforward server does;
//! * `batch`: one writer inserting ready-made batches of 1000 rows with one statement
//!   (`unnest` on Postgres, one transaction on SQLite): the practical ceiling of the database,
//!   with no network protocol, validation, replay check or fan-out in front of it.
//!
//! `--target bare` runs the same senders against the bare broadcast server, which acks every
//! send at once and stores nothing: the most acks per second the WebSocket path alone gives on
//! this machine, the other side of NanoChat's cost.
//!
//! NanoChat runs closed-loop here (`Pace::Window`; the expiry scenario uses `Pace::Rate`):
//! `--senders` sockets, each in its own room, each keeping `--window` sends in flight; the ack
//! latency is from sending the frame to reading its ack.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use nanochat::crypto::{self, RoomId, RoomKeys, ServerKeys};
use nanochat::protocol::b64u;
use nanochat::store::postgres::{PgStore, partition_name};
use nanochat::store::{Millis, NewMessage, Store as _, now_ms};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::{Args, MachineCpu, Server, cpu_seconds, open};

const DAY_MS: Millis = 86_400_000;

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram")
}

fn report(
    args: &Args,
    target: &str,
    acked: u64,
    secs: f64,
    h: &Histogram<u64>,
    cpu: f64,
    machine_before: &MachineCpu,
) {
    let backend = if target == "bare" {
        "none"
    } else if args.postgres.is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    println!(
        "{}",
        serde_json::json!({
            "scenario": "publish",
            "target": target,
            "backend": backend,
            "senders": args.senders,
            "window": args.window,
            "warmup_s": args.warmup,
            "yesterday": args.yesterday,
            "acked": acked,
            "acked_per_s": (acked as f64 / secs).round(),
            "p50_ms": h.value_at_quantile(0.5) as f64 / 1000.0,
            "p99_ms": h.value_at_quantile(0.99) as f64 / 1000.0,
            "max_ms": h.max() as f64 / 1000.0,
            "server_cpu_s": (cpu * 100.0).round() / 100.0,
            "steal_pct": MachineCpu::now().steal_pct_since(machine_before),
        })
    );
}

/// Create `rooms` (ids and wrapped auth keys) at `then` and store `rows` messages dated then
/// over them (batches of 5000, through the store, as a server would have).
pub async fn store_day(store: &PgStore, rows: usize, then: Millis, rooms: &[(RoomId, Vec<u8>)]) {
    store.ensure_partitions(then).await.expect("partitions");
    for (r, wrapped) in rooms {
        store.create_room(r, wrapped, then).await.expect("room");
    }
    let rooms: Vec<RoomId> = rooms.iter().map(|r| r.0).collect();
    let mut written = 0;
    while written < rows {
        let n = (rows - written).min(5000);
        let batch: Vec<NewMessage> = (0..n)
            .map(|i| {
                let mut iv = [0u8; 12];
                rand::fill(&mut iv);
                let mut ct = vec![0u8; 64];
                rand::fill(&mut ct[..]);
                NewMessage {
                    room: rooms[(written + i) % rooms.len()],
                    epoch: nanochat::crypto::epoch_of(then),
                    iv,
                    ct,
                }
            })
            .collect();
        store
            .append(&batch, then)
            .await
            .expect("append stored rows");
        written += n;
        if written % 100_000 == 0 {
            eprintln!("{written} stored rows written");
        }
    }
}

/// Give the run's database the senders' rooms, made yesterday at noon (UTC) and holding
/// `--yesterday` messages of that time between them, vacuumed and analyzed as autovacuum would
/// have done by now; the rooms' keys wrapped with the server secret at `secret` (created here).
/// The senders' messages carry today's epoch, so each is looked up in yesterday's replay index
/// among its room's messages there, as on a server that has been running.
pub async fn store_yesterday(args: &Args, rooms: &mut SenderRooms, secret: &std::path::Path) {
    let secret = nanochat::startup::load_or_create_secret(secret).expect("server secret");
    let server = ServerKeys::derive(&secret);
    let wrapped: Vec<(RoomId, Vec<u8>)> = rooms
        .keys
        .iter()
        .map(|k| (k.room_id, server.wrap_auth_key(&k.room_id, &k.auth_key)))
        .collect();
    let (store, client) = crate::open_postgres(args).await;
    let noon = (now_ms().div_euclid(DAY_MS) - 1) * DAY_MS + DAY_MS / 2;
    let started = Instant::now();
    store_day(&store, args.yesterday, noon, &wrapped).await;
    rooms.stored = true;
    client
        .batch_execute("VACUUM ANALYZE messages")
        .await
        .expect("vacuum");
    let stored: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {}",
                partition_name(noon.div_euclid(DAY_MS))
            ),
            &[],
        )
        .await
        .expect("count yesterday's messages")
        .get(0);
    assert_eq!(stored as usize, args.yesterday, "yesterday's partition");
    eprintln!(
        "stored {} messages yesterday in {:.1} s",
        args.yesterday,
        started.elapsed().as_secs_f64()
    );
}

/// How senders pace their sends.
#[derive(Clone, Copy)]
pub enum Pace {
    /// Closed loop: each sender keeps this many sends in flight.
    Window(usize),
    /// Open loop: each sender sends this many per second on a fixed schedule, whatever the
    /// acks do; latency is from the scheduled time, so a stall counts for every send it delays.
    Rate(f64),
}

/// The senders' rooms, one each: new ones they create, or ones stored before the run
/// (`--yesterday`) that they join.
pub struct SenderRooms {
    pub keys: Vec<RoomKeys>,
    pub stored: bool,
}

impl SenderRooms {
    /// `n` rooms of random secrets, for the senders to create.
    pub fn new(n: usize) -> Self {
        let keys = (0..n)
            .map(|_| {
                let mut secret = [0u8; 32];
                rand::fill(&mut secret);
                RoomKeys::derive(&secret)
            })
            .collect();
        Self {
            keys,
            stored: false,
        }
    }
}

/// Senders against `addr`: `senders` sockets, each in its own new room, publishing at `pace`
/// until `stop`. Returns every ack as (when it arrived, µs since `start`; its latency, µs).
pub async fn publishers(
    addr: &str,
    rooms: SenderRooms,
    pace: Pace,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<(u64, u64)> {
    let mut sockets = Vec::new();
    for (n, keys) in rooms.keys.iter().enumerate() {
        let ws = open(addr, n, keys, !rooms.stored).await;
        sockets.push(ws);
    }
    // A window's permits come back with acks; an open-loop sender takes none.
    let window = match pace {
        Pace::Window(w) => w,
        Pace::Rate(_) => 0,
    };
    let mut tasks = Vec::new();
    let count = sockets.len();
    for (k, ws) in sockets.into_iter().enumerate() {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            let permits = Arc::new(tokio::sync::Semaphore::new(window));
            let reader_permits = permits.clone();
            let (sent_tx, sent_rx) = tokio::sync::watch::channel(0usize);
            let reader = tokio::spawn(async move {
                let mut acks = Vec::new();
                let mut answered = 0usize;
                loop {
                    // Open loop: stop once everything sent at the end is answered.
                    if stop_reading(&sent_rx, answered) {
                        break;
                    }
                    let Ok(next) =
                        tokio::time::timeout(Duration::from_millis(200), stream.next()).await
                    else {
                        continue;
                    };
                    let Some(Ok(m)) = next else { break };
                    let t = match m {
                        Message::Text(t) => t,
                        Message::Close(reason) => {
                            // Normal is the answer to our own close at the end.
                            if reason.as_ref().is_some_and(|r| r.code != CloseCode::Normal) {
                                eprintln!("sender closed by the server: {reason:?}");
                            }
                            break;
                        }
                        _ => continue,
                    };
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("json");
                    if v["type"] == "error" {
                        eprintln!("sender refused: {t}");
                    }
                    if v["type"] != "ack" && v["type"] != "error" {
                        continue;
                    }
                    let sent: u64 = v["ref"].as_str().and_then(|r| r.parse().ok()).unwrap_or(0);
                    if v["type"] == "ack" {
                        let now = start.elapsed().as_micros() as u64;
                        acks.push((now, now.saturating_sub(sent).max(1)));
                    }
                    answered += 1;
                    reader_permits.add_permits(1);
                }
                acks
            });
            let mut sent = 0usize;
            let first = match pace {
                Pace::Rate(per_sec) => {
                    let period = Duration::from_secs_f64(1.0 / per_sec.max(0.001));
                    Instant::now() + crate::stagger(k, count, period)
                }
                Pace::Window(_) => Instant::now(),
            };
            while !stop.load(Ordering::Relaxed) {
                let reference = match pace {
                    Pace::Window(_) => {
                        // Bounded wait: a socket the server closed never returns its permits.
                        match tokio::time::timeout(Duration::from_secs(1), permits.acquire()).await
                        {
                            Ok(Ok(p)) => p.forget(),
                            Ok(Err(_)) => break,
                            Err(_) if reader.is_finished() => break,
                            Err(_) => continue,
                        }
                        start.elapsed().as_micros() as u64
                    }
                    Pace::Rate(per_sec) => {
                        let due = first + Duration::from_secs_f64(sent as f64 / per_sec);
                        tokio::time::sleep_until(due.into()).await;
                        if reader.is_finished() {
                            break;
                        }
                        (due - start).as_micros() as u64
                    }
                };
                // Per send: a run may cross midnight UTC, where the epoch changes.
                let epoch = crypto::epoch_of(nanochat::store::now_ms());
                let mut iv = [0u8; 12];
                rand::fill(&mut iv);
                let mut ct = [0u8; 64];
                rand::fill(&mut ct);
                let frame = format!(
                    r#"{{"type":"send","ref":"{reference}","epoch":{epoch},"iv":"{}","ct":"{}"}}"#,
                    b64u(&iv),
                    b64u(&ct)
                );
                if sink.send(Message::text(frame)).await.is_err() {
                    break;
                }
                sent += 1;
            }
            // Let the last acks arrive, then close so the reader ends.
            match pace {
                Pace::Window(w) => {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        permits.acquire_many(w as u32),
                    )
                    .await;
                }
                Pace::Rate(_) => {
                    let _ = sent_tx.send(sent);
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while !reader.is_finished() && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            let _ = sink.close().await;
            tokio::time::timeout(Duration::from_secs(5), reader)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default()
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        if let Ok(acks) = t.await {
            all.extend(acks);
        }
    }
    all
}

/// Whether an open-loop reader is done: the sender has said how many it sent (non-zero) and
/// all of them are answered.
fn stop_reading(sent: &tokio::sync::watch::Receiver<usize>, answered: usize) -> bool {
    let sent = *sent.borrow();
    sent > 0 && answered >= sent
}

/// Latency histogram of (at, latency) samples whose `at` lies in `from..to` (µs).
pub fn latencies(samples: &[(u64, u64)], from: u64, to: u64) -> Histogram<u64> {
    let mut h = histogram();
    for &(at, lat) in samples {
        if (from..to).contains(&at) {
            let _ = h.record(lat);
        }
    }
    h
}

/// NanoChat, or the bare server, through its sockets: closed-loop senders, one room each.
/// With `--warmup`, only acks after the warm-up count (and the server's CPU from then).
pub async fn over_sockets(args: &Args, server: &Server, rooms: SenderRooms) {
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let run = tokio::spawn({
        let (addr, stop) = (server.addr.clone(), stop.clone());
        let pace = Pace::Window(args.window);
        async move { publishers(&addr, rooms, pace, start, stop).await }
    });
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let measure_from = start.elapsed().as_micros() as u64;
    let cpu_before = cpu_seconds(server.pid());
    let machine_before = MachineCpu::now();
    // The sockets are open and joined within the first moments; measure the rest.
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    stop.store(true, Ordering::Relaxed);
    let samples = run.await.expect("senders");
    let first = samples.iter().map(|s| s.0).min().unwrap_or(0);
    let from = first.max(measure_from);
    let to = samples.iter().map(|s| s.0).max().unwrap_or(0) + 1;
    let h = latencies(&samples, from, to);
    let secs = to.saturating_sub(from) as f64 / 1e6;
    let cpu = cpu_seconds(server.pid()) - cpu_before;
    report(
        args,
        &args.target,
        h.len(),
        secs.max(1e-3),
        &h,
        cpu,
        &machine_before,
    );
}

fn row(task: usize, seq: i64) -> ([u8; 16], i64, [u8; 12], Vec<u8>) {
    let mut room = [0u8; 16];
    room[..8].copy_from_slice(&(task as u64).to_be_bytes());
    let mut iv = [0u8; 12];
    rand::fill(&mut iv);
    let mut ct = vec![0u8; 80];
    rand::fill(&mut ct[..]);
    (room, seq, iv, ct)
}

const PG_TABLE: &str = "CREATE TABLE IF NOT EXISTS bench_publish (
    room_id bytea NOT NULL, seq bigint NOT NULL, created_at timestamptz NOT NULL,
    epoch integer NOT NULL, iv bytea NOT NULL, ct bytea NOT NULL,
    PRIMARY KEY (room_id, seq, created_at));
    CREATE INDEX IF NOT EXISTS bench_publish_iv ON bench_publish (room_id, iv);
    TRUNCATE bench_publish;";

/// The messages table as the server's was up to schema version 3, the same shape as the
/// Postgres baselines' table: primary key `(room_id, seq)`, the `(room_id, iv)` key that
/// keeps a room's IVs unique, and `created_at` for expiry. The server (version 4) keeps the
/// seq index and the replay keys in tables of their own, written in sorted steps; the
/// baselines insert into all three indexes row by row. (Until session 15 this table had no
/// replay key, and the ceiling was that of a writer that keeps none: see benches/HISTORY.md, durable publish session 15.)
const SQLITE_TABLE: &str = "CREATE TABLE IF NOT EXISTS bench_publish (
    room_id BLOB NOT NULL, seq INTEGER NOT NULL, created_at INTEGER NOT NULL,
    epoch INTEGER NOT NULL, iv BLOB NOT NULL, ct BLOB NOT NULL, PRIMARY KEY (room_id, seq));
    CREATE INDEX IF NOT EXISTS bench_publish_created ON bench_publish (created_at);
    CREATE UNIQUE INDEX IF NOT EXISTS bench_publish_iv ON bench_publish (room_id, iv);";

fn sqlite_conn(path: &std::path::Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).expect("open bench database");
    conn.busy_timeout(Duration::from_secs(30))
        .expect("busy timeout");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("wal");
    conn.pragma_update(None, "synchronous", "FULL")
        .expect("sync");
    conn
}

/// The baselines: `naive` (one INSERT per message, `--senders` writers) or `batch` (one
/// writer, 1000 rows per statement).
/// With `--warmup`, the writers write that long before their writes count.
pub async fn baseline(args: &Args, kind: &str, dir: &std::path::Path) {
    let measure_at = Instant::now() + Duration::from_secs(args.warmup);
    let deadline = measure_at + Duration::from_secs(args.secs);
    let writers = if kind == "naive" { args.senders } else { 1 };
    let rows_per_write: usize = if kind == "naive" { 1 } else { 1000 };
    let mut tasks = Vec::new();
    if let Some(url) = &args.postgres {
        let (setup, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect to Postgres");
        tokio::spawn(conn);
        setup.batch_execute(PG_TABLE).await.expect("bench table");
        for w in 0..writers {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .expect("connect to Postgres");
                tokio::spawn(conn);
                let mut h = histogram();
                let mut seq = 0i64;
                let mut rows = 0u64;
                while Instant::now() < deadline {
                    let batch: Vec<_> = (0..rows_per_write)
                        .map(|_| {
                            seq += 1;
                            row(w, seq)
                        })
                        .collect();
                    let t = Instant::now();
                    let rooms: Vec<&[u8]> = batch.iter().map(|r| &r.0[..]).collect();
                    let seqs: Vec<i64> = batch.iter().map(|r| r.1).collect();
                    let ivs: Vec<&[u8]> = batch.iter().map(|r| &r.2[..]).collect();
                    let cts: Vec<&[u8]> = batch.iter().map(|r| &r.3[..]).collect();
                    client
                        .execute(
                            "INSERT INTO bench_publish (room_id, seq, created_at, epoch, iv, ct)
                             SELECT r, s, now(), 20000, i, c
                             FROM unnest($1::bytea[], $2::int8[], $3::bytea[], $4::bytea[])
                               AS t(r, s, i, c)",
                            &[&rooms, &seqs, &ivs, &cts],
                        )
                        .await
                        .expect("insert");
                    if t >= measure_at {
                        let _ = h.record(t.elapsed().as_micros() as u64 + 1);
                        rows += batch.len() as u64;
                    }
                }
                (rows, h)
            }));
        }
    } else {
        let path = dir.join("bench.db");
        sqlite_conn(&path)
            .execute_batch(SQLITE_TABLE)
            .expect("bench table");
        for w in 0..writers {
            let path = path.clone();
            tasks.push(tokio::task::spawn_blocking(move || {
                let mut conn = sqlite_conn(&path);
                let mut h = histogram();
                let mut seq = 0i64;
                let mut rows = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let tx = conn
                        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                        .expect("transaction");
                    {
                        let mut insert = tx
                            .prepare_cached(
                                "INSERT INTO bench_publish VALUES (?1, ?2, ?3, 20000, ?4, ?5)",
                            )
                            .expect("prepare");
                        for _ in 0..rows_per_write {
                            seq += 1;
                            let (room, seq, iv, ct) = row(w, seq);
                            insert
                                .execute(rusqlite::params![
                                    &room[..],
                                    seq,
                                    nanochat::store::now_ms(),
                                    &iv[..],
                                    ct
                                ])
                                .expect("insert");
                        }
                    }
                    tx.commit().expect("commit");
                    if t >= measure_at {
                        let _ = h.record(t.elapsed().as_micros() as u64 + 1);
                        rows += rows_per_write as u64;
                    }
                }
                (rows, h)
            }));
        }
    }
    tokio::time::sleep_until(measure_at.into()).await;
    let machine_before = MachineCpu::now();
    let measuring = Instant::now();
    let mut h = histogram();
    let mut total = 0;
    for t in tasks {
        let (rows, local) = t.await.expect("writer");
        total += rows;
        h.add(&local).expect("same bounds");
    }
    report(
        args,
        kind,
        total,
        measuring.elapsed().as_secs_f64(),
        &h,
        0.0,
        &machine_before,
    );
}
