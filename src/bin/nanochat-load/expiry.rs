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
//!
//! With `--timeline 1` each expiry also gets its picture in 50 ms steps (`around`), from a
//! second before it to a second after it. The report says whether the database's volume is
//! mounted with online `discard` (`data_volume`), when the database is on this machine: on
//! such a volume, freeing a day's files stalls the writers' WAL flushes (see
//! `benches/HISTORY.md`, *Expiry under write load*, Session 29).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nanochat::store::{Millis, Store as _, now_ms};

use crate::publish::{Pace, SenderRooms, histogram, latencies, publishers, store_day};
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

/// Where the database keeps its files and how that volume is mounted, when it is on this
/// machine (the load generator runs beside it on loopback): `null` when it cannot be told.
async fn data_volume(client: &tokio_postgres::Client) -> serde_json::Value {
    let Ok(row) = client.query_one("SHOW data_directory", &[]).await else {
        return serde_json::Value::Null;
    };
    let dir: String = row.get(0);
    let (Ok(path), Ok(mounts)) = (
        std::fs::canonicalize(&dir),
        std::fs::read_to_string("/proc/mounts"),
    ) else {
        return serde_json::Value::Null;
    };
    match mount_of(&path.to_string_lossy(), &mounts) {
        Some(m) => serde_json::json!({
            "data_directory": dir,
            "mount_point": m.point,
            "fs_type": m.fs_type,
            "discard": m.options.split(',').any(|o| o == "discard"),
        }),
        None => serde_json::Value::Null,
    }
}

/// One line of `/proc/mounts`.
#[derive(Debug, PartialEq)]
struct Mount {
    point: String,
    fs_type: String,
    options: String,
}

/// The mount holding `path` (absolute, symbolic links resolved): the last-listed of those
/// whose mount point is `path` or one of its ancestors, longest first (a later mount on the
/// same point hides an earlier one).
fn mount_of(path: &str, mounts: &str) -> Option<Mount> {
    let within = |point: &str| {
        point == "/"
            || path == point
            || path
                .strip_prefix(point)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    mounts
        .lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let (_source, point, fs_type, options) = (f.next()?, f.next()?, f.next()?, f.next()?);
            // The kernel writes a space, tab, newline or backslash in a path in octal.
            let point = point
                .replace("\\040", " ")
                .replace("\\011", "\t")
                .replace("\\012", "\n")
                .replace("\\134", "\\");
            within(&point).then(|| Mount {
                point,
                fs_type: fs_type.to_string(),
                options: options.to_string(),
            })
        })
        .enumerate()
        .max_by_key(|(i, m)| (m.point.len(), *i))
        .map(|(_, m)| m)
}

/// Sends from a second before `op_start` to a second after `op_end` in 50 ms steps, by the
/// time each was due: how many, their p99 and slowest ack. Times are µs since the run began.
fn around(samples: &[(u64, u64)], op_start: u64, op_end: u64) -> serde_json::Value {
    const STEP: u64 = 50_000;
    let first = op_start.saturating_sub(1_000_000);
    let steps = (op_end + 1_000_000).saturating_sub(first).div_ceil(STEP);
    let mut by_step = vec![histogram(); steps as usize];
    for &(at, lat) in samples {
        if let Some(h) = at
            .checked_sub(first)
            .and_then(|d| by_step.get_mut((d / STEP) as usize))
        {
            let _ = h.record(lat);
        }
    }
    by_step
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let from = first + i as u64 * STEP;
            serde_json::json!({
                "from_ms": (from as i64 - op_start as i64) / 1000,
                "sends": h.len(),
                "p99_ms": h.value_at_quantile(0.99) as f64 / 1000.0,
                "max_ms": h.max() as f64 / 1000.0,
            })
        })
        .collect()
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
    let volume = data_volume(&client).await;
    if volume["discard"] == true {
        eprintln!(
            "the database's volume ({}) is mounted with online discard: freeing a day's files \
             stalls the writers' WAL flushes (see benches/README.md, Expiry under write load)",
            volume["mount_point"]
        );
    }

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
            let mut result = serde_json::json!({
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
            });
            if args.timeline {
                result["around"] = around(&samples, op_start, op_end);
            }
            result
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
            "data_volume": volume,
            "results": results,
        })
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
/dev/vda / ext4 rw,relatime,discard 0 0
proc /proc proc rw,nosuid 0 0
/dev/loop0 /srv/pg ext4 rw,relatime 0 0
/dev/loop1 /srv/pg\\040data xfs rw,nodiscard 0 0
tmpfs /srv/pg tmpfs rw 0 0
";

    #[test]
    fn a_path_belongs_to_the_deepest_mount_above_it_and_the_last_on_a_point() {
        let at = |p| mount_of(p, MOUNTS).map(|m| (m.point, m.fs_type, m.options));
        assert_eq!(
            at("/var/lib/postgresql/15/main"),
            Some(("/".into(), "ext4".into(), "rw,relatime,discard".into()))
        );
        // /srv/pg is mounted twice: the later mount hides the earlier one.
        assert_eq!(at("/srv/pg/base").unwrap().1, "tmpfs");
        assert_eq!(at("/srv/pg").unwrap().1, "tmpfs");
        // A sibling whose name only starts like a mount point is not under it.
        assert_eq!(at("/srv/pgx").unwrap().0, "/");
        // Spaces in mount points come octal-escaped.
        assert_eq!(at("/srv/pg data/base").unwrap().1, "xfs");
        assert_eq!(mount_of("/x", ""), None);
    }

    #[test]
    fn the_picture_around_an_expiry_puts_each_send_in_its_step() {
        // Sends every 10 ms for 3 s, acked in 5 ms except those due during 1.00-1.10 s.
        let samples: Vec<(u64, u64)> = (0..300u64)
            .map(|i| {
                let at = i * 10_000;
                let slow = (1_000_000..1_100_000).contains(&at);
                (at, if slow { 40_000 } else { 5_000 })
            })
            .collect();
        let steps = around(&samples, 1_000_000, 1_100_000);
        let steps = steps.as_array().unwrap();
        // From 1 s before the start to 1 s after the end: 2.1 s in 50 ms steps.
        assert_eq!(steps.len(), 42);
        assert_eq!(steps[0]["from_ms"], -1000);
        assert_eq!(steps[20]["from_ms"], 0);
        for (i, s) in steps.iter().enumerate() {
            assert_eq!(s["sends"], 5, "step {i}");
            let slow = i == 20 || i == 21;
            assert_eq!(s["max_ms"].as_f64().unwrap() > 30.0, slow, "step {i}: {s}");
        }
    }
}
