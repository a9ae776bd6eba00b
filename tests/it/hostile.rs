//! A corpus of hostile frames and HTTP requests, replayed against a running server: each gets
//! its documented answer, nothing panics, and the server keeps serving everyone else.

use std::time::Duration;

use nanochat::client::RoomSession;
use nanochat::protocol::{ServerFrame, b64u};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::helpers::{Backend, http_raw, spawn_app_with};

/// (frame text, expected error code or "ok:<type>" for an accepted frame).
fn frame_corpus(room: &str, epoch: u32) -> Vec<(String, &'static str)> {
    let iv = b64u(&[1u8; 12]);
    let ct = b64u(&[2u8; 16]);
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    // Deep nesting inside an ignored field: skipped without recursion, so even 30 000 levels
    // (what fits in a 64 KiB frame) cannot exhaust a worker's stack; the frame is accepted.
    let deep_obj = format!(
        r#"{{"type":"pow","x":{}1{}}}"#,
        "[".repeat(30_000),
        "]".repeat(30_000)
    );
    let many = format!(r#"{{"type":"pow","junk":[{}]}}"#, vec!["1"; 5000].join(","));
    let send = |r: &str, extra: &str| {
        format!(r#"{{"type":"send","ref":{r},"epoch":{epoch},"iv":"{iv}","ct":"{ct}"{extra}}}"#)
    };
    let mut c: Vec<(String, &'static str)> = vec![
        (String::new(), "bad_request"),
        ("   ".into(), "bad_request"),
        ("null".into(), "bad_request"),
        ("\"hello\"".into(), "bad_request"),
        ("42".into(), "bad_request"),
        ("[]".into(), "bad_request"),
        ("{}".into(), "bad_request"),
        ("\u{feff}{\"type\":\"pow\"}".into(), "bad_request"),
        (deep, "bad_request"),
        (deep_obj, "ok:pow"),
        (
            r#"{"type":"pow","x":{"a":{"b":{"c":[1,2,{"d":null}]}}}}"#.into(),
            "ok:pow",
        ),
        (many, "ok:pow"),
        (r#"{"type":"pow","extra":{"nested":true}}"#.into(), "ok:pow"),
        (r#"{"type":"pow","type":"panic"}"#.into(), "bad_request"),
        (r#"{"type":["pow"]}"#.into(), "bad_request"),
        (r#"{"type":null}"#.into(), "bad_request"),
        (r#"{"type":"POW"}"#.into(), "unknown_type"),
        ("{\"type\":\"pow\\u0000\"}".into(), "unknown_type"),
        (r#"{"type":"pow "}"#.into(), "unknown_type"),
        (r#"{"type":"__proto__"}"#.into(), "unknown_type"),
        (r#"{"type":"history","before":1e400}"#.into(), "bad_request"),
        (
            r#"{"type":"history","before":18446744073709551616}"#.into(),
            "bad_request",
        ),
        (
            r#"{"type":"history","before":9007199254740992}"#.into(),
            "bad_request",
        ),
        (r#"{"type":"history","before":-1}"#.into(), "bad_request"),
        (r#"{"type":"history","before":NaN}"#.into(), "bad_request"),
        (
            r#"{"type":"history","before":Infinity}"#.into(),
            "bad_request",
        ),
        (r#"{"type":"history","before":1.0}"#.into(), "bad_request"),
        (r#"{"type":"history","before":"5"}"#.into(), "bad_request"),
        (r#"{"type":"history","limit":0}"#.into(), "bad_request"),
        (r#"{"type":"history","limit":-5}"#.into(), "bad_request"),
        (r#"{"type":"history","limit":"10"}"#.into(), "bad_request"),
        (
            r#"{"type":"history","before":3,"after":1}"#.into(),
            "bad_request",
        ),
        (
            r#"{"type":"history","before":5,"limit":3}"#.into(),
            "ok:history",
        ),
        (
            send("\"x\"", "").replace(&format!("\"epoch\":{epoch}"), "\"epoch\":4294967296"),
            "bad_request",
        ),
        (
            send("\"x\"", "").replace(&format!("\"epoch\":{epoch}"), "\"epoch\":-1"),
            "bad_request",
        ),
        (
            send("\"x\"", "").replace(&format!("\"epoch\":{epoch}"), "\"epoch\":1.5"),
            "bad_request",
        ),
        (
            send("\"x\"", "").replace(&format!("\"epoch\":{epoch}"), "\"epoch\":0"),
            "bad_request",
        ),
        (send("\"x\"", "").replace(&ct, ""), "bad_request"),
        (
            send("\"x\"", "").replace(&ct, &format!(" {ct}")),
            "bad_request",
        ),
        (
            send("\"x\"", "").replace(&ct, &format!("{ct}==")),
            "bad_request",
        ),
        (
            send("\"x\"", "").replace(&iv, &b64u(&[1u8; 11])),
            "bad_request",
        ),
        (
            send("\"x\"", "").replace(&iv, &b64u(&[1u8; 13])),
            "bad_request",
        ),
        (
            send("\"x\"", "").replace(&iv, "AQEBAQEBAQEBAQEB+/"),
            "bad_request",
        ),
        (send(&format!("\"{}\"", "r".repeat(65)), ""), "bad_request"),
        (
            send(&format!("\"{}\"", "r".repeat(30_000)), ""),
            "bad_request",
        ),
        (send("5", ""), "bad_request"),
        (send("null", ""), "bad_request"),
        (r#"{"type":"send","ref":"x"}"#.into(), "bad_request"),
        (
            r#"{"type":"join","room":"","proof":""}"#.into(),
            "bad_request",
        ),
        (
            format!(
                r#"{{"type":"join","room":"{room}=","proof":"{}"}}"#,
                b64u(&[0; 32])
            ),
            "bad_request",
        ),
        (
            // The standard alphabet, not base64url.
            format!(
                r#"{{"type":"join","room":"+/+/+/+/+/+/+/+/+/+/+w","proof":"{}"}}"#,
                b64u(&[0; 32])
            ),
            "bad_request",
        ),
        (
            format!(
                r#"{{"type":"create","room":"{room}","auth_key":"{}","pow":{{"token":"x","counter":1}}}}"#,
                b64u(&[0; 32])
            ),
            "bad_request",
        ),
        (
            format!(
                r#"{{"type":"create","room":"{room}","auth_key":"{}","pow":{{"token":"{}","counter":-1}}}}"#,
                b64u(&[0; 32]),
                b64u(&[0; 42])
            ),
            "bad_request",
        ),
    ];
    // Unicode tricks in `ref` are data: accepted and echoed exactly.
    for r in [
        "\u{202e}gnp.exe",
        "zero\u{200b}width",
        "emoji 😀😀😀",
        "<script>alert(1)</script>",
        "\\\"quote\\\"",
        "nul\\u0000byte",
    ] {
        c.push((send(&format!("\"{r}\""), ""), "ok:ack"));
    }
    c
}

/// Send each corpus frame from a joined socket and check its documented answer. Accepted sends
/// get IVs counted up from `iv_base`, so a later round does not collide with an earlier one.
async fn replay_frames(
    attacker: &mut nanochat::client::Client,
    corpus: &[(String, &'static str)],
    iv_base: u16,
) {
    let mut ivs = iv_base;
    for (frame, expected) in corpus {
        // Accepted sends need distinct IVs.
        let frame = if *expected == "ok:ack" {
            ivs += 1;
            let mut iv = [0u8; 12];
            iv[..2].copy_from_slice(&ivs.to_be_bytes());
            frame.replace(&b64u(&[1u8; 12]), &b64u(&iv))
        } else {
            frame.clone()
        };
        attacker.send_text(frame.clone()).await.unwrap();
        match expected.strip_prefix("ok:") {
            Some(kind) => loop {
                let got = attacker.recv().await.unwrap();
                let ok = match (&got, kind) {
                    (ServerFrame::Pow { .. }, "pow") | (ServerFrame::History { .. }, "history") => {
                        true
                    }
                    (ServerFrame::Ack { reference, .. }, "ack") => {
                        let sent: serde_json::Value = serde_json::from_str(&frame).unwrap();
                        assert_eq!(
                            sent["ref"].as_str().unwrap(),
                            reference,
                            "ref echoed exactly"
                        );
                        true
                    }
                    (ServerFrame::Msg(_), _) => false,
                    _ => panic!("{frame:.120}: expected {kind}, got {got:?}"),
                };
                if ok {
                    break;
                }
            },
            None => match attacker.recv().await.unwrap() {
                ServerFrame::Error { code, message, .. } => {
                    assert_eq!(&code, expected, "{frame:.120}");
                    assert!(!message.is_empty());
                }
                other => panic!("{frame:.120}: expected {expected}, got {other:?}"),
            },
        }
    }
}

#[actix_web::test]
async fn a_corpus_of_hostile_frames_gets_documented_answers_and_harms_no_one() {
    let app = spawn_app_with(Backend::Sqlite, |s| s.limits.max_frame_bytes = 64 * 1024).await;
    let (mut alice, keys) = app.room_creator().await;
    let mut s = RoomSession::new(keys.clone());
    let mut attacker = app.client().await;
    assert!(matches!(
        attacker.join(&keys, None).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    let epoch = nanochat::crypto::epoch_of(nanochat::store::now_ms());
    let corpus = frame_corpus(&b64u(&keys.room_id), epoch);
    assert!(corpus.len() >= 50, "{} frames", corpus.len());
    replay_frames(&mut attacker, &corpus, 0).await;
    // Everyone else is fine and nothing stored was lost.
    still_served(&mut alice, &mut s).await;
}

/// A member can still send and get its ack (messages of others may arrive first).
async fn still_served(alice: &mut nanochat::client::Client, s: &mut RoomSession) {
    alice
        .send_sealed("after", &s.seal("alice", "still here"))
        .await
        .unwrap();
    loop {
        match alice.recv().await.unwrap() {
            ServerFrame::Ack { reference, .. } if reference == "after" => break,
            ServerFrame::Msg(_) => {}
            other => panic!("{other:?}"),
        }
    }
}

/// Send raw bytes after a WebSocket handshake (for frames a client library will not send).
async fn raw_ws(port: u16, frame: &[u8]) -> (Vec<u8>, bool) {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tcp.write_all(format!("{}\r\n", crate::helpers::UPGRADE_HEAD).as_bytes())
        .await
        .unwrap();
    tcp.write_all(frame).await.unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf))
        .await
        .is_ok();
    (buf, closed)
}

fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [7u8, 9, 11, 13];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// `{ … }` in `pieces` frames (the first a text frame, the others continuations).
fn in_pieces(pieces: usize) -> Vec<u8> {
    let piece = |opcode: u8, fin: bool, payload: &[u8]| {
        let mut f = masked(opcode, payload);
        f[0] = if fin { 0x80 } else { 0 } | opcode;
        f
    };
    let mut frames = piece(0x1, false, b"{");
    for _ in 2..pieces {
        frames.extend(piece(0x0, false, b" "));
    }
    frames.extend(piece(0x0, true, b"}"));
    frames
}

/// Invalid UTF-8 in a text frame, an unmasked frame, a reserved opcode, a fragmented control
/// frame, a 2^63-byte length, a message in 65 frames.
fn broken_ws_frames() -> Vec<Vec<u8>> {
    vec![
        in_pieces(65),
        masked(0x1, &[0xff, 0xfe, 0xfd]),
        vec![0x81, 0x03, b'a', b'b', b'c'],
        masked(0x3, b"reserved"),
        masked(0x9, &[0u8; 0])
            .into_iter()
            .map(|b| if b == 0x89 { 0x09 } else { b })
            .collect(),
        vec![0x81, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    ]
}

#[actix_web::test]
async fn broken_websocket_frames_close_only_their_socket() {
    let app = spawn_app_with(Backend::Sqlite, |_| {}).await;
    let (mut alice, keys) = app.room_creator().await;
    // Each socket is closed; the server goes on.
    for frame in broken_ws_frames() {
        let (answer, closed) = raw_ws(app.port, &frame).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 101"),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
        assert!(closed, "the server kept a broken socket open: {frame:?}");
    }
    let mut s = RoomSession::new(keys.clone());
    crate::helpers::send_acked(&mut alice, &mut s, "alice", "fine").await;
}

/// The server's frames after the handshake in `answer`: (opcode, payload) of each.
fn server_frames(answer: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let head = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut rest = &answer[head..];
    let mut frames = Vec::new();
    while rest.len() >= 2 {
        let (opcode, len) = (rest[0] & 0x0f, usize::from(rest[1] & 0x7f));
        let (len, at) = match len {
            126 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 => panic!("no frame here is that long"),
            n => (n, 2),
        };
        if rest.len() < at + len {
            break;
        }
        frames.push((opcode, rest[at..at + len].to_vec()));
        rest = &rest[at + len..];
    }
    frames
}

#[actix_web::test]
async fn a_message_in_more_than_64_frames_closes_the_socket() {
    let app = spawn_app_with(Backend::Sqlite, |_| {}).await;
    // 64 pieces make one message (`{}` with spaces: refused as a frame without a type).
    let (answer, closed) = raw_ws(app.port, &in_pieces(64)).await;
    let frames = server_frames(&answer);
    assert!(!closed, "{frames:?}");
    assert!(String::from_utf8_lossy(&frames.last().unwrap().1).contains("bad_request"));
    // 65 do not: too_large, then close 1009.
    let (answer, closed) = raw_ws(app.port, &in_pieces(65)).await;
    let frames = server_frames(&answer);
    assert!(closed);
    let n = frames.len();
    assert!(String::from_utf8_lossy(&frames[n - 2].1).contains("too_large"));
    assert_eq!(
        (frames[n - 1].0, &frames[n - 1].1[..2]),
        (0x8, &1009u16.to_be_bytes()[..])
    );
}

#[actix_web::test]
async fn a_flood_of_pings_gets_pongs_only_within_the_frame_limit_then_is_closed() {
    // The default limits: 20 frames a second per socket, 60 at once; 40 strikes.
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.limits = nanochat::config::LimitSettings::default();
    })
    .await;
    let (mut alice, keys) = app.room_creator().await;
    let flood: Vec<u8> = (0..2000).flat_map(|_| masked(0x9, b"ping")).collect();
    let (answer, closed) = raw_ws(app.port, &flood).await;
    let frames = server_frames(&answer);
    let pongs = frames.iter().filter(|(op, _)| *op == 0xA).count();
    assert!((60..=70).contains(&pongs), "{pongs} pongs for 2 000 pings");
    assert!(closed, "the flooding socket was left open");
    let (op, close) = frames.last().unwrap();
    assert_eq!(*op, 0x8);
    assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1008);
    // Closed at the 41st ping over the limit (each a strike, the budget 40).
    assert_eq!(app.refused("socket_frames"), 41);
    assert_eq!(app.state.metrics.abuse_disconnects_total.get(), 1);
    // Others are served as before.
    let mut s = RoomSession::new(keys.clone());
    crate::helpers::send_acked(&mut alice, &mut s, "alice", "still here").await;
}

/// Hostile HTTP requests and the statuses each may get (0: the server just closes).
fn http_corpus() -> Vec<(String, &'static [u16])> {
    vec![
        ("GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(), &[404, 400]),
        ("GET /%2e%2e/Cargo.toml HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(), &[404, 400]),
        ("GET /..%2f..%2fCargo.toml HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(), &[404, 400]),
        ("GET /index.html%00.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(), &[404, 400]),
        ("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(), &[404]),
        ("GET /ws HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(), &[400]),
        ("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n".into(), &[400]),
        ("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n".into(), &[400, 426]),
        ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n".into(), &[400, 404, 405]),
        ("POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(), &[404, 405]),
        ("BREW / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(), &[404, 405, 400]),
        ("GET / HTTP/1.0\r\n\r\n".into(), &[200]),
        (format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(100_000)), &[200, 431, 400, 0]),
        ("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\nConnection: close\r\n\r\n".into(), &[400]),
        ("\u{0}\u{1}\u{2} garbage\r\n\r\n".into(), &[400, 0]),
    ]
}

#[actix_web::test]
async fn hostile_http_requests_get_clean_refusals() {
    let app = spawn_app_with(Backend::Sqlite, |s| s.limits.handshake_timeout_secs = 2).await;
    let p = app.port;
    for (request, allowed) in http_corpus() {
        let r = http_raw(p, &request).await;
        assert!(
            allowed.contains(&r.status),
            "{:.80}: got {}",
            request,
            r.status
        );
        assert!(
            !r.body.contains("panicked") && !r.body.contains("src/"),
            "{:.80}",
            request
        );
    }
    // A thousand half-open handshakes do not stop a real client; they are cut off in time.
    let mut half_open = Vec::new();
    for i in 0..1000u32 {
        let local = std::net::Ipv4Addr::new(127, 0, (i / 250) as u8 + 1, (i % 250) as u8 + 2);
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((local, 0).into()).unwrap();
        let mut tcp = socket.connect(([127, 0, 0, 1], p).into()).await.unwrap();
        tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        half_open.push(tcp);
    }
    let (mut c, keys) = app.room_creator().await;
    let mut s = RoomSession::new(keys);
    crate::helpers::send_acked(&mut c, &mut s, "a", "b").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut closed = 0;
    for tcp in &mut half_open {
        let mut buf = [0u8; 64];
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(20), tcp.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert!(
        closed > 900,
        "only {closed} of 1000 half-open handshakes were cut off"
    );
}

/// Every input under `fuzz/seeds/frame` and `fuzz/regressions/frame` (crashing inputs the
/// fuzzer ever found are committed there) goes through the parser as the fuzz target runs it:
/// no panic, and an accepted frame survives its canonical round trip.
#[test]
fn fuzz_seeds_and_regressions_parse_as_the_fuzz_target_expects() {
    use nanochat::protocol::{FrameLimits, parse_client_frame};
    let limits = FrameLimits {
        max_ct_bytes: 1024,
        default_history: 50,
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut seen = 0;
    let mut accepted = 0;
    for sub in ["seeds/frame", "regressions/frame"] {
        let Ok(entries) = std::fs::read_dir(root.join(sub)) else {
            continue;
        };
        for entry in entries {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            seen += 1;
            let Ok(text) = std::str::from_utf8(&bytes) else {
                continue;
            };
            if let Ok(frame) = parse_client_frame(text, &limits) {
                accepted += 1;
                let again = parse_client_frame(&frame.to_json().to_string(), &limits).unwrap();
                assert_eq!(frame, again, "{text}");
            }
        }
    }
    // Proof-of-work inputs: a token that was never issued by this key does not verify.
    let mut secret = [0u8; 32];
    rand::fill(&mut secret);
    let keys = nanochat::crypto::ServerKeys::derive(&secret);
    for entry in std::fs::read_dir(root.join("regressions/pow_token")).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        seen += 1;
        let room: [u8; 16] = data[16..32].try_into().unwrap();
        let counter = u64::from_be_bytes(data[8..16].try_into().unwrap());
        let now = u64::from_be_bytes(data[..8].try_into().unwrap()) >> 1;
        assert!(
            keys.verify_pow_solution(&data[32..], &room, counter, now)
                .is_err()
        );
    }
    assert!(
        seen >= 7 && accepted >= 6,
        "the seeds are there: {seen} read, {accepted} accepted"
    );
}

fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The whole corpus, again and again, against a real server process: after warm-up rounds,
/// further rounds leave its resident memory and its open descriptors where they were.
/// Measured over 16 rounds alone (session 20): RSS rises while SQLite's page cache and the
/// allocator's arenas fill (24.2 -> 26.8 MB in five rounds), then moves by 0-130 KiB per round;
/// descriptors stay put. Under the full suite's parallel load the rise lasts longer (CI once
/// saw +1.1 MiB between rounds 2 and 5, decelerating), so the baseline is taken after five
/// rounds and four more must stay within 1 MiB of it: a leak of 256 KiB a round would fail.
#[actix_web::test]
async fn memory_and_descriptors_return_to_baseline_after_rounds_of_the_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = crate::helpers::test_settings(dir.path());
    settings.log.filter = "info".into();
    settings.limits.max_frame_bytes = 64 * 1024;
    settings.limits.handshake_timeout_secs = 1;
    // The room creator waits silently through all rounds before its last check.
    settings.limits.idle_timeout_secs = 600;
    let config = dir.path().join("nanochat.toml");
    std::fs::write(&config, toml::to_string(&settings).unwrap()).unwrap();
    let config = config.to_str().unwrap().to_owned();
    let (server, port, _log, _rx) =
        crate::binary::spawn_server(dir.path(), &[("NANOCHAT_CONFIG", &config)]);
    let pid = server.0.id();
    let url = format!("ws://127.0.0.1:{port}/ws");
    let keys = crate::helpers::random_room();
    let mut alice = nanochat::client::Client::connect(&url).await.unwrap();
    alice.create(&keys).await.unwrap();
    let epoch = nanochat::crypto::epoch_of(nanochat::store::now_ms());
    let corpus = frame_corpus(&b64u(&keys.room_id), epoch);

    let mut samples = Vec::new();
    for round in 0..10u16 {
        let mut attacker = nanochat::client::Client::connect(&url).await.unwrap();
        assert!(matches!(
            attacker.join(&keys, None).await.unwrap(),
            ServerFrame::Joined { .. }
        ));
        replay_frames(&mut attacker, &corpus, round * 100).await;
        drop(attacker);
        for frame in broken_ws_frames() {
            assert!(raw_ws(port, &frame).await.1);
        }
        for (request, allowed) in http_corpus() {
            let r = http_raw(port, &request).await;
            assert!(allowed.contains(&r.status), "{request:.80}: {}", r.status);
        }
        let mut half_open = Vec::new();
        for _ in 0..300 {
            let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            half_open.push(tcp);
        }
        // The handshake timeout (1 s) cuts them off; then everything of this round is gone.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        drop(half_open);
        tokio::time::sleep(Duration::from_millis(500)).await;
        samples.push((proc_status(pid, "VmRSS:"), open_fds(pid)));
    }
    let (warm_rss, warm_fds) = samples[5];
    let (last_rss, last_fds) = *samples.last().unwrap();
    assert!(
        last_fds <= warm_fds,
        "descriptors grew: {samples:?} (KiB of RSS, open fds)"
    );
    assert!(
        last_rss <= warm_rss + 1024,
        "resident memory grew by more than 1 MiB after warm-up: {samples:?} (KiB, fds)"
    );
    // The server still serves.
    let mut s = RoomSession::new(keys.clone());
    still_served(&mut alice, &mut s).await;
    eprintln!("rss KiB / fds per round: {samples:?}");
}

/// A member that stops reading is cut off with close code 4008 once its queue is over budget;
/// the room's other members keep being served, and what it missed is in storage.
#[actix_web::test]
async fn a_member_that_stops_reading_is_closed_as_too_slow_and_no_one_else_waits() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.limits.max_ct_bytes = 8192;
        s.limits.max_frame_bytes = 8192 * 4 / 3 + 256;
        // Room for a single large frame: the second one queued behind it is over budget.
        s.limits.send_queue_bytes = s.limits.max_frame_bytes;
        // Long enough that the stalled socket is still open when it reads again.
        s.limits.send_timeout_secs = 120;
    })
    .await;
    let (mut alice, keys) = app.room_creator().await;
    let mut lazy = app.client().await;
    assert!(matches!(
        lazy.join(&keys, None).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    let mut s = RoomSession::new(keys.clone());
    let text = "z".repeat(6000);
    let mut sent = 0;
    let kicked = |metrics: &str| {
        metrics
            .lines()
            .any(|l| l.starts_with("nanochat_slow_consumers_total ") && !l.ends_with(" 0"))
    };
    // `lazy` reads nothing: its socket's buffers fill, its session waits on the write, and the
    // hub finds its queue over budget.
    loop {
        let sealed = s.seal("alice", &text);
        alice.send_sealed(&sent.to_string(), &sealed).await.unwrap();
        assert!(
            matches!(alice.recv().await.unwrap(), ServerFrame::Ack { .. }),
            "alice's sends are acknowledged while another member stalls"
        );
        sent += 1;
        if sent % 50 == 0 && kicked(&app.metrics().await) {
            break;
        }
        assert!(sent < 20_000, "the stalled member was never found too slow");
    }
    // Reading again, it gets what was already written to it and then the close.
    tokio::time::timeout(
        Duration::from_secs(60),
        crate::api::expect_close(&mut lazy, 4008),
    )
    .await
    .expect("closed as too slow");
    // Alice is still served, and a new member finds every message in storage.
    still_served(&mut alice, &mut s).await;
    let mut late = app.client().await;
    let mut seqs = Vec::new();
    let mut page = late.join(&keys, Some(0)).await.unwrap();
    loop {
        let (ServerFrame::Joined { messages, more, .. } | ServerFrame::History { messages, more }) =
            page
        else {
            panic!("unexpected {page:?}");
        };
        seqs.extend(messages.iter().map(|m| m.seq));
        if !more {
            break;
        }
        let after = seqs.last().copied().unwrap_or(0);
        late.send_json(&serde_json::json!({"type": "history", "after": after}))
            .await
            .unwrap();
        page = late.recv().await.unwrap();
    }
    // Everything alice sent, and her last message after the close.
    assert_eq!(seqs, (1..=sent + 1).collect::<Vec<i64>>());
}
