//! SQLite maintenance under write load, in-process: `--rows` messages stored over the
//! previous hour (their replay keys in the runs the writer makes of them), then senders submit
//! messages to the server's own group-commit writer at a fixed open-loop `--rate` while
//! maintenance merges that hour's runs. With `--expired 1` the hour is 31 days back instead,
//! so maintenance deletes those messages (and drops their runs) as it does when a day expires.
//! Reports how long maintenance took and the p99 commit latency (from each send's scheduled
//! time) in the `--secs` before it and while it ran.
//!
//! In-process because a real server merges only when a UTC hour ends; the store and writer
//! are the server's, so this is the same code path without the sockets (the fan-out
//! timeline shows the merge through the sockets, once an hour: benches/HISTORY.md, fan-out session 23).

use std::sync::Arc;
use std::time::{Duration, Instant};

use nanochat::hub::{Hub, next_session_id};
use nanochat::metrics::Metrics;
use nanochat::store::sqlite::SqliteStore;
use nanochat::store::writer::Writer;
use nanochat::store::{Millis, NewMessage, Retention, Store, now_ms};

use crate::Args;
use crate::publish::latencies;

const HOUR_MS: Millis = 3_600_000;
const ROOMS: usize = 1000;

fn message(room: [u8; 16]) -> NewMessage {
    let mut iv = [0u8; 12];
    rand::fill(&mut iv);
    let mut ct = vec![0u8; 48];
    rand::fill(&mut ct[..]);
    NewMessage {
        room,
        epoch: nanochat::crypto::epoch_of(now_ms()),
        iv,
        ct,
    }
}

pub async fn run(args: &Args, dir: &std::path::Path) {
    let store = Arc::new(
        SqliteStore::open(&dir.join("merge"), Retention::from_days(30, 365))
            .await
            .expect("open a SQLite store"),
    );
    let new_rooms = || -> Vec<[u8; 16]> {
        (0..ROOMS)
            .map(|_| {
                let mut r = [0u8; 16];
                rand::fill(&mut r);
                r
            })
            .collect()
    };
    let rooms = new_rooms();
    // The previous hour, as the clock of the stored keys: it has ended, so maintenance
    // merges its runs; or that hour 31 days ago, past the retention.
    let back = if args.expired { 31 * 24 * HOUR_MS } else { 0 };
    let hour = now_ms().div_euclid(HOUR_MS) * HOUR_MS - HOUR_MS - back;
    for r in &rooms {
        store.create_room(r, &[0u8; 60], hour).await.expect("room");
    }
    let filled = Instant::now();
    let mut written = 0;
    while written < args.rows {
        let n = (args.rows - written).min(1000);
        let batch: Vec<NewMessage> = (0..n).map(|i| message(rooms[i % ROOMS])).collect();
        let at = hour + (written as Millis * (HOUR_MS - 60_000) / args.rows.max(1) as Millis);
        store
            .append(&batch, at)
            .await
            .expect("append the hour's rows");
        written += n;
    }
    let fill_s = filled.elapsed().as_secs_f64();
    // The senders' rooms are today's: the stored hour's rooms may be expired with it.
    let live = new_rooms();
    for r in &live {
        store
            .create_room(r, &[0u8; 60], now_ms())
            .await
            .expect("room");
    }

    let settings = nanochat::config::Settings::default();
    let metrics = Arc::new(Metrics::new());
    let hub = Arc::new(Hub::new(
        settings.limits.send_queue,
        settings.limits.send_queue_bytes,
        metrics.clone(),
    ));
    let (writer, _tasks) = Writer::spawn(
        store.clone(),
        hub,
        metrics,
        settings.store.queue,
        settings.store.batch_max,
        1,
    );
    let start = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let per_sender = args.rate as f64 / args.senders.max(1) as f64;
    let period = Duration::from_secs_f64(1.0 / per_sender);
    let mut senders = Vec::new();
    for k in 0..args.senders.max(1) {
        let (writer, stop, rooms) = (writer.clone(), stop.clone(), live.clone());
        let first = start + crate::stagger(k, args.senders.max(1), period);
        senders.push(tokio::spawn(async move {
            let origin = next_session_id();
            let mut tick = tokio::time::interval_at(first.into(), period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut waits = Vec::new();
            let mut i = k;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let due = tick.tick().await.into_std();
                let reply = writer.submit(message(rooms[i % ROOMS]), origin, due).await;
                i += 1;
                waits.push(tokio::spawn(async move {
                    let ok = matches!(reply.await, Ok(Ok(_)));
                    let done = Instant::now();
                    let at = done.duration_since(start).as_micros() as u64;
                    (ok, at, done.duration_since(due).as_micros() as u64)
                }));
            }
            let mut samples = Vec::with_capacity(waits.len());
            let mut failed = 0u64;
            for w in waits {
                match w.await {
                    Ok((true, at, latency)) => samples.push((at, latency.max(1))),
                    _ => failed += 1,
                }
            }
            (samples, failed)
        }));
    }
    let settle = Duration::from_secs(args.secs);
    tokio::time::sleep(settle).await;
    let merge_start = start.elapsed().as_micros() as u64;
    let t = Instant::now();
    let report = store.maintain(now_ms()).await.expect("maintenance");
    let merge_ms = t.elapsed().as_secs_f64() * 1000.0;
    let merge_end = start.elapsed().as_micros() as u64;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut samples = Vec::new();
    let mut failed = 0;
    for s in senders {
        let (mut part, f) = s.await.expect("sender");
        samples.append(&mut part);
        failed += f;
    }
    let steady = latencies(
        &samples,
        merge_start.saturating_sub(settle.as_micros() as u64),
        merge_start,
    );
    let during = latencies(&samples, merge_start, merge_end);
    let ms = |us: u64| us as f64 / 1000.0;
    let p99 = |h: &hdrhistogram::Histogram<u64>| ms(h.value_at_quantile(0.99));
    println!(
        "{}",
        serde_json::json!({
            "scenario": "merge",
            "backend": "sqlite",
            "rows": args.rows,
            "fill_s": (fill_s * 10.0).round() / 10.0,
            "senders": args.senders,
            "rate": args.rate,
            "expired": args.expired,
            "runs_merged": report.replay_runs_merged,
            "messages_deleted": report.messages_deleted,
            "maintenance_ms": (merge_ms * 10.0).round() / 10.0,
            "steady_p99_ms": p99(&steady),
            "during_p99_ms": p99(&during),
            "during_max_ms": ms(during.max()),
            "committed_during": during.len(),
            "failed": failed,
        })
    );
}
