//! Expiry under write load (Postgres): while senders publish through the server at a fixed
//! open-loop `--rate` (the "half its maximum": measure the maximum with `publish`
//! first), one day of `--rows` messages past the retention is expired twice, each time freshly
//! written: first the way NanoChat does it (maintenance drops the day's partition), then the
//! way a table without partitions must (`DELETE` of the same rows and `VACUUM`). For each:
//! how long it took, the senders' p99 ack latency before and during it, and the database
//! size before and after. Latency counts from each send's scheduled time, so a stall shows in
//! every send it holds up, not only in the few a closed loop would have in flight.
//!
//! The old rows go in through the store with a clock set 31 days back, into that day's
//! partition; the server runs no maintenance of its own during the run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nanochat::store::{Millis, Store as _, now_ms};

use crate::publish::{Pace, SenderRooms, latencies, publishers, store_day};
use crate::{Args, Server, open_postgres};

/// The server's own maintenance stays out of the way; the scenario triggers expiry itself.
pub const SERVER_ENV: [(&str, &str); 1] =
    [("NANOCHAT__RETENTION__MAINTENANCE_INTERVAL_SECS", "86400")];

const DAY_MS: Millis = 86_400_000;

async fn db_size(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .expect("database size")
        .get(0)
}

async fn old_rows(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM messages WHERE created_at < now() - interval '30 days'",
            &[],
        )
        .await
        .expect("count")
        .get(0)
}

pub async fn run(args: &Args, server: &Server) {
    let (store, client) = open_postgres(args).await;

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let (addr, stop) = (server.addr.clone(), stop.clone());
        let rooms = SenderRooms::new(args.senders);
        let pace = Pace::Rate(args.rate as f64 / args.senders.max(1) as f64);
        async move { publishers(&addr, rooms, pace, start, stop).await }
    });
    let settle = Duration::from_secs(args.secs);
    let mut windows = Vec::new();
    for method in ["drop_partition", "delete_and_vacuum"] {
        let filled = Instant::now();
        // 1000 rooms of their own, never joined (so the wrapped key is a placeholder).
        let old_rooms: Vec<_> = (0..1000)
            .map(|_| {
                let mut r = [0u8; 16];
                rand::fill(&mut r);
                (r, vec![0u8; 60])
            })
            .collect();
        store_day(&store, args.rows, now_ms() - 31 * DAY_MS, &old_rooms).await;
        let fill_s = filled.elapsed().as_secs_f64();
        // A month-old day was vacuumed long ago; this one was just written, and an autovacuum
        // busy with it would hold the drop off (maintenance then leaves it for later). Vacuum
        // it now, as autovacuum would have by then.
        if let Err(e) = client.batch_execute("VACUUM messages").await {
            eprintln!("VACUUM refused ({e}): an autovacuum may hold the old day at the drop");
        }
        // A day expires a month after it was written, long after its pages reached the disk;
        // here it was written a moment ago. Flush it first, so the expiry is not measured
        // waiting for the write-back of the very pages it throws away.
        if let Err(e) = client.batch_execute("CHECKPOINT").await {
            eprintln!("CHECKPOINT refused ({e}): the old day's pages may still be in write-back");
        }
        let rows_before = old_rows(&client).await;
        let size_before = db_size(&client).await;
        // Steady state: the senders alone, just before the expiry.
        tokio::time::sleep(settle).await;
        let op_start = start.elapsed().as_micros() as u64;
        eprintln!("{method}: {rows_before} old rows, {size_before} bytes");
        let t = Instant::now();
        match method {
            "drop_partition" => {
                let report = store.maintain(now_ms()).await.expect("maintenance");
                assert!(report.partitions_dropped > 0, "{report:?}");
            }
            _ => {
                client
                    .execute(
                        "DELETE FROM messages WHERE created_at < now() - interval '30 days'",
                        &[],
                    )
                    .await
                    .expect("delete");
                client
                    .batch_execute("VACUUM messages")
                    .await
                    .expect("vacuum");
            }
        }
        let op_ms = t.elapsed().as_secs_f64() * 1000.0;
        let op_end = start.elapsed().as_micros() as u64;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let size_after = db_size(&client).await;
        eprintln!("{method}: {op_ms:.1} ms, {size_after} bytes after");
        windows.push((
            method,
            fill_s,
            rows_before,
            op_ms,
            op_start,
            op_end,
            size_before,
            size_after,
            old_rows(&client).await,
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let samples = load.await.expect("senders");
    let settle_us = settle.as_micros() as u64;
    let results: Vec<serde_json::Value> = windows
        .iter()
        .map(|&(method, fill_s, rows, op_ms, op_start, op_end, before, after, left)| {
            let steady = latencies(&samples, op_start.saturating_sub(settle_us), op_start);
            // During: from the start of the expiry to one second after it ended.
            let during = latencies(&samples, op_start, op_end + 1_000_000);
            let p99 = |h: &hdrhistogram::Histogram<u64>| h.value_at_quantile(0.99) as f64 / 1000.0;
            serde_json::json!({
                "method": method,
                "rows": rows,
                "fill_s": (fill_s * 10.0).round() / 10.0,
                "expiry_ms": (op_ms * 10.0).round() / 10.0,
                "steady_p99_ms": p99(&steady),
                "during_p99_ms": p99(&during),
                "during_max_ms": during.max() as f64 / 1000.0,
                "spike": if p99(&steady) > 0.0 { (p99(&during) / p99(&steady) * 100.0).round() / 100.0 } else { 0.0 },
                "db_bytes_before": before,
                "db_bytes_after": after,
                "freed_bytes": before - after,
                "old_rows_left": left,
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "scenario": "expiry",
            "backend": "postgres",
            "senders": args.senders,
            "rate": args.rate,
            "acked": samples.len(),
            "results": results,
        })
    );
}
