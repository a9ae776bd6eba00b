//! Abuse: honest people chat (`--rooms` x `--members`, each member sending every 2 s from its
//! own address) while one client floods `--rate` frames per second from one address: valid
//! sends, garbage and reconnects as soon as it is thrown out. The server runs its default
//! limits. The honest members' delivery latency is measured once without and once with the
//! flood, on the same server, one after the other.
//!
//! With `--onion`, everyone comes through the server's onion listener instead: `circuits` runs
//! the server with `server.onion_circuit_ids`, each member and the flooder a Tor circuit of its
//! own (the line Tor starts each connection with), and gets a client's limits within the onion
//! share; `shared` without, as Tor without `HiddenServiceExportCircuitID` (all of Tor one
//! client).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use nanochat::crypto::{self, RoomKeys};
use tokio_tungstenite::tungstenite::Message;

use crate::{Args, Server, cpu_seconds, open, open_as_circuit, sent_at, timed_send};

/// The flooder's circuit on the onion listener (the members' are 1, 2, ...).
const FLOODER_CIRCUIT: u32 = 0xf100_d000;

#[derive(Default)]
struct Flood {
    frames: AtomicU64,
    connects: AtomicU64,
    refused_handshakes: AtomicU64,
    thrown_out: AtomicU64,
}

/// One phase: honest traffic for `secs`, with or without the flood; returns the honest
/// delivery histogram and how many deliveries were expected and seen.
async fn phase(
    args: &Args,
    server: &Server,
    flood_on: bool,
    flood: Arc<Flood>,
) -> (Histogram<u64>, u64, u64) {
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let hist = Arc::new(std::sync::Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
    ));
    let sent = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut n = if flood_on { 1000 } else { 0 };
    let circuits = args.onion.as_deref() == Some("circuits");
    // Everyone joins before anyone sends: a message sent while a member of its room was still
    // joining would count a delivery to that member that cannot happen.
    let mut members = Vec::new();
    for _ in 0..args.rooms {
        let mut secret = [0u8; 32];
        rand::fill(&mut secret);
        let keys = RoomKeys::derive(&secret);
        for m in 0..args.members {
            members.push(match (&server.onion, circuits) {
                (Some(onion), true) => open_as_circuit(onion, n as u32 + 1, &keys, m == 0).await,
                (Some(onion), false) => open(onion, n, &keys, m == 0).await,
                (None, _) => open(&server.addr, n, &keys, m == 0).await,
            });
            n += 1;
        }
    }
    for ws in members {
        let (mut sink, mut stream) = ws.split();
        let (hist, seen, sent, stop) = (hist.clone(), seen.clone(), sent.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let reader = tokio::spawn(async move {
                while let Some(Ok(Message::Text(t))) = stream.next().await {
                    if !t.as_str().starts_with(r#"{"type":"msg""#) {
                        continue;
                    }
                    let at = sent_at(t.as_str()).expect("a timed message");
                    let now = start.elapsed().as_micros() as u64;
                    let _ = hist
                        .lock()
                        .expect("h")
                        .record(now.saturating_sub(at).max(1));
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            });
            // Spread the members' sends over the 2 s period.
            tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 2000)).await;
            let epoch = crypto::epoch_of(nanochat::store::now_ms());
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let frame = timed_send(i, epoch, start, 48);
                if sink.send(Message::text(frame)).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = sink.close().await;
            let _ = tokio::time::timeout(Duration::from_secs(3), reader).await;
        }));
    }
    let flooder = flood_on.then(|| {
        let addr = server.onion.clone().unwrap_or_else(|| server.addr.clone());
        let (stop, flood, rate) = (stop.clone(), flood.clone(), args.rate);
        tokio::spawn(async move { flood_loop(&addr, circuits, rate, &stop, &flood).await })
    });
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    stop.store(true, Ordering::Relaxed);
    if let Some(f) = flooder {
        let _ = f.await;
    }
    for t in tasks {
        let _ = t.await;
    }
    let expected = sent.load(Ordering::Relaxed) * (args.members as u64 - 1);
    let h = hist.lock().expect("h").clone();
    (h, expected, seen.load(Ordering::Relaxed))
}

/// The flooder: one address (127.0.0.254), with `circuit` one Tor circuit, `rate` frames per
/// second, half valid sends and half garbage, reconnecting at once whenever it is thrown out or
/// refused.
async fn flood_loop(addr: &str, circuit: bool, rate: u64, stop: &AtomicBool, flood: &Flood) {
    use tokio::io::AsyncWriteExt as _;
    let per_ms = (rate / 1000).max(1);
    while !stop.load(Ordering::Relaxed) {
        let local = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 254));
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind((local, 0).into()).expect("bind");
        let Ok(mut tcp) = socket.connect(addr.parse().expect("addr")).await else {
            continue;
        };
        let line = nanochat::client::tor_circuit_line(FLOODER_CIRCUIT);
        if circuit && tcp.write_all(line.as_bytes()).await.is_err() {
            continue;
        }
        flood.connects.fetch_add(1, Ordering::Relaxed);
        let ws = tokio_tungstenite::client_async_with_config(
            format!("ws://{addr}/ws"),
            tokio_tungstenite::MaybeTlsStream::Plain(tcp),
            Some(nanochat::client::ws_config()),
        )
        .await;
        let Ok((ws, _)) = ws else {
            // 429 before the upgrade: try again at once.
            flood.refused_handshakes.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        let (mut sink, mut stream) = ws.split();
        let drain = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let mut i = 0u64;
        'socket: while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            for _ in 0..per_ms {
                i += 1;
                let frame = if i.is_multiple_of(2) {
                    format!(
                        r#"{{"type":"send","ref":"f{i}","epoch":1,"iv":"AAAAAAAAAAAAAAAA","ct":"{}"}}"#,
                        "A".repeat(40)
                    )
                } else {
                    "{not json".to_owned()
                };
                if sink.send(Message::text(frame)).await.is_err() {
                    flood.thrown_out.fetch_add(1, Ordering::Relaxed);
                    break 'socket;
                }
                flood.frames.fetch_add(1, Ordering::Relaxed);
            }
        }
        drain.abort();
    }
}

pub async fn run(args: &Args, server: &Server) {
    let flood = Arc::new(Flood::default());
    let cpu0 = cpu_seconds(server.pid());
    let (calm, calm_expected, calm_seen) = phase(args, server, false, flood.clone()).await;
    let cpu1 = cpu_seconds(server.pid());
    let (under, flood_expected, flood_seen) = phase(args, server, true, flood.clone()).await;
    let cpu2 = cpu_seconds(server.pid());
    let p99 = |h: &Histogram<u64>| h.value_at_quantile(0.99) as f64 / 1000.0;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "scenario": "abuse",
            "onion": args.onion,
            "honest_members": args.rooms * args.members,
            "flood_rate": args.rate,
            "secs": args.secs,
            "calm": {"expected": calm_expected, "delivered": calm_seen,
                     "p50_ms": calm.value_at_quantile(0.5) as f64 / 1000.0, "p99_ms": p99(&calm),
                     "server_cpu_s": cpu1 - cpu0},
            "flood": {"expected": flood_expected, "delivered": flood_seen,
                      "p50_ms": under.value_at_quantile(0.5) as f64 / 1000.0, "p99_ms": p99(&under),
                      "server_cpu_s": cpu2 - cpu1},
            "p99_ratio": if p99(&calm) > 0.0 { (p99(&under) / p99(&calm) * 100.0).round() / 100.0 } else { 0.0 },
            "flooder": {"frames_sent": load(&flood.frames), "connects": load(&flood.connects),
                        "refused_handshakes": load(&flood.refused_handshakes),
                        "thrown_out": load(&flood.thrown_out)},
        })
    );
}
