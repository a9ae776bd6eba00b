//! Abuse protection over real sockets, with clients spread over 127.0.0.x source addresses:
//! message floods, connection limits before the upgrade, proxy headers, the onion listener,
//! strikes, and proof of work (one-time tokens, adaptive difficulty).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use nanochat::client::{Client, RoomSession};
use nanochat::config::{PowMode, Rate};
use nanochat::crypto::{self, RoomKeys};
use nanochat::protocol::{ServerFrame, b64u};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::{expect_close, expect_error};
use crate::helpers::{
    Backend, TestApp, exchange, metric_value, random_room, send_acked, spawn_app_with,
    work_rising_after_a_few_creations,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn client_from(app: &TestApp, from: &str) -> Client {
    Client::connect_from(&app.ws_url(), ip(from))
        .await
        .expect("connect")
}

async fn create_from(app: &TestApp, from: &str) -> (Client, RoomKeys) {
    let keys = random_room();
    let mut c = client_from(app, from).await;
    assert!(matches!(
        c.create(&keys).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    (c, keys)
}

async fn join_from(app: &TestApp, from: &str, keys: &RoomKeys) -> Client {
    let mut c = client_from(app, from).await;
    assert!(matches!(
        c.join(keys, None).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    c
}

/// Send `n` messages without waiting, then collect the answers: (acked, rate_limited).
async fn burst(c: &mut Client, keys: &RoomKeys, n: usize) -> (usize, usize) {
    let (acked, waits) = burst_of(c, keys, n, "flood").await;
    (acked, waits.len())
}

/// Send `n` messages of `text` without waiting, then collect the answers: how many were
/// acked, and the `retry_after_ms` of each refused one, in order.
async fn burst_of(c: &mut Client, keys: &RoomKeys, n: usize, text: &str) -> (usize, Vec<u64>) {
    let mut s = RoomSession::new(keys.clone());
    for i in 0..n {
        c.send_sealed(&i.to_string(), &s.seal("x", text))
            .await
            .unwrap();
    }
    let (mut acked, mut waits) = (0, Vec::new());
    while acked + waits.len() < n {
        match c.recv().await.unwrap() {
            ServerFrame::Ack { .. } => acked += 1,
            ServerFrame::Error {
                code,
                retry_after_ms,
                reference,
                ..
            } => {
                assert_eq!(code, "rate_limited");
                assert!(retry_after_ms.unwrap() > 0);
                assert!(reference.is_some(), "a refused send carries its ref");
                waits.push(retry_after_ms.unwrap());
            }
            ServerFrame::Msg(_) => {}
            other => panic!("{other:?}"),
        }
    }
    (acked, waits)
}

/// A message counts once per started KiB of its content against the message limits, so they
/// bound the bytes a client or a room stores, not only the messages: the burst that lets 30
/// short messages through lets 4 of 7 KiB, and the next one waits for the 5 KiB it lacks.
#[actix_web::test]
async fn long_messages_count_once_per_kib_against_the_message_limits() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.rate.client_messages = Rate::new(60, 30);
        s.rate.room_messages = Rate::new(60, 40);
    })
    .await;
    // About 7 000 bytes of envelope, padded to 7 168: 7 KiB of content.
    let long = "x".repeat(7000);
    let (mut a, keys) = create_from(&app, "127.0.0.2").await;
    let (acked, waits) = burst_of(&mut a, &keys, 6, &long).await;
    assert_eq!(acked, 4, "28 of the 30 the burst holds");
    assert_eq!(waits.len(), 2);
    assert!(
        (4_000..=5_000).contains(&waits[0]),
        "5 more at one a second: {waits:?}"
    );
    // Short messages count once each: another client's 30 all pass.
    let (mut b, other) = create_from(&app, "127.0.0.3").await;
    assert_eq!(burst(&mut b, &other, 30).await, (30, 0));
    // The room counts the same way: 28 of its 40 are spent, so a member from elsewhere gets
    // one more long message and then short ones for the rest.
    let mut c = join_from(&app, "127.0.0.4", &keys).await;
    let (acked, waits) = burst_of(&mut c, &keys, 2, &long).await;
    assert_eq!((acked, waits.len()), (1, 1));
    let refused = app.refused("room_messages");
    assert_eq!(burst(&mut c, &keys, 5).await, (5, 0));
    assert_eq!(refused, 1);
}

#[actix_web::test]
async fn a_flooding_client_is_cut_to_its_rate_and_others_keep_chatting() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.rate.client_messages = Rate::new(60, 5);
    })
    .await;
    let (mut flooder, keys) = create_from(&app, "127.0.0.2").await;
    let mut member = join_from(&app, "127.0.0.3", &keys).await;
    let (mut elsewhere, other_keys) = create_from(&app, "127.0.0.4").await;

    let (acked, limited) = burst(&mut flooder, &keys, 20).await;
    assert_eq!(acked, 5, "the burst is let through");
    assert_eq!(limited, 15);
    // A member of the same room and a client in another room are not affected.
    assert_eq!(burst(&mut member, &keys, 3).await, (3, 0));
    assert_eq!(burst(&mut elsewhere, &other_keys, 3).await, (3, 0));
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("nanochat_rate_limited_total{limiter=\"client_messages\"} 15"),
        "{metrics}"
    );
}

#[actix_web::test]
async fn sends_over_a_sockets_frame_rate_are_refused_by_name_and_counted() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.limits.frames_per_second = 1;
        s.limits.frames_burst = 4;
    })
    .await;
    let (mut c, keys) = create_from(&app, "127.0.0.2").await;
    // The socket's own frame limit refuses before it reads the frame; the refusal still names
    // the send (so a client knows which to send again), and operators see it counted.
    let (acked, limited) = burst(&mut c, &keys, 10).await;
    assert!(
        acked >= 1 && limited >= 5,
        "{acked} acked, {limited} refused"
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(&format!(
            "nanochat_rate_limited_total{{limiter=\"socket_frames\"}} {limited}"
        )),
        "{metrics}"
    );
}

#[actix_web::test]
async fn one_room_is_protected_from_the_sum_of_its_members() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.rate.room_messages = Rate::new(60, 6);
    })
    .await;
    let (mut a, keys) = create_from(&app, "127.0.0.2").await;
    let mut b = join_from(&app, "127.0.0.3", &keys).await;
    let (acked_a, _) = burst(&mut a, &keys, 4).await;
    let (acked_b, limited_b) = burst(&mut b, &keys, 4).await;
    assert_eq!(acked_a + acked_b, 6);
    assert_eq!(limited_b, 2);
    // Another room has its own budget.
    let (mut c, other) = create_from(&app, "127.0.0.3").await;
    assert_eq!(burst(&mut c, &other, 4).await, (4, 0));
}

/// Send a WebSocket upgrade from `from` with extra headers; returns the status, the headers, and
/// the open stream (kept alive by the caller when the upgrade succeeded).
pub(crate) async fn upgrade(
    port: u16,
    from: &str,
    extra: &str,
) -> (u16, String, tokio::net::TcpStream) {
    upgrade_after(port, from, "", extra).await
}

/// As `upgrade`, with `first` sent before the request (as Tor's circuit line).
async fn upgrade_after(
    port: u16,
    from: &str,
    first: &str,
    extra: &str,
) -> (u16, String, tokio::net::TcpStream) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((ip(from), 0).into()).unwrap();
    let mut stream = socket
        .connect((ip("127.0.0.1"), port).into())
        .await
        .unwrap();
    let request = format!("{first}{}{extra}\r\n", crate::helpers::UPGRADE_HEAD);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("answer in time")
            .unwrap();
        assert!(n == 1, "connection closed before the response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), stream)
}

#[actix_web::test]
async fn upgrades_past_the_connection_rate_get_429_before_the_handshake() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.rate.client_connections = Rate::new(6, 3);
    })
    .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let (status, _, stream) = upgrade(app.port, "127.0.0.5", "").await;
        assert_eq!(status, 101);
        open.push(stream);
    }
    let (status, head, _) = upgrade(app.port, "127.0.0.5", "").await;
    assert_eq!(status, 429);
    let retry: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .expect("Retry-After")
        .trim()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry), "{retry}");
    // Another client is unaffected.
    let (status, _, _other) = upgrade(app.port, "127.0.0.6", "").await;
    assert_eq!(status, 101);
}

/// A browser names the page that opens a socket in `Origin`; by default only the server's own
/// pages (the requested host) get through, before any limit counts the attempt.
#[actix_web::test]
async fn pages_of_other_origins_cannot_open_a_websocket() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.rate.client_connections = Rate::new(6, 3);
    })
    .await;
    let foreign = [
        "https://evil.example",
        "http://127.0.0.1.evil.example",
        "null",
        "http://localhost",
    ];
    for origin in foreign {
        let (status, head, _) =
            upgrade(app.port, "127.0.0.9", &format!("Origin: {origin}\r\n")).await;
        assert_eq!(status, 403, "{origin}: {head}");
    }
    // The server's own page, and a program that names no page: the client's whole connection
    // budget is still there for them.
    let mut open = Vec::new();
    for extra in [
        "Origin: http://127.0.0.1\r\n",
        "",
        "origin: HTTP://127.0.0.1\r\n",
    ] {
        let (status, head, stream) = upgrade(app.port, "127.0.0.9", extra).await;
        assert_eq!(status, 101, "{extra:?}: {head}");
        open.push(stream);
    }
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("nanochat_upgrades_refused_total{reason=\"origin\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nanochat_upgrades_refused_total{reason=\"client_connections\"} 0"),
        "{metrics}"
    );
}

#[actix_web::test]
async fn listed_origins_and_a_star_let_other_pages_connect() {
    let listed = spawn_app_with(Backend::Sqlite, |s| {
        s.server.allowed_origins = vec!["https://chat.example.org".into()];
    })
    .await;
    let (status, _, _a) = upgrade(
        listed.port,
        "127.0.0.2",
        "Origin: https://chat.example.org\r\n",
    )
    .await;
    assert_eq!(status, 101);
    let (status, _, _b) = upgrade(listed.port, "127.0.0.2", "Origin: http://127.0.0.1\r\n").await;
    assert_eq!(
        status, 403,
        "once origins are listed, naming the requested host is not enough"
    );
    let (status, _, _) =
        upgrade(listed.port, "127.0.0.2", "Origin: https://evil.example\r\n").await;
    assert_eq!(status, 403);

    let any = spawn_app_with(Backend::Sqlite, |s| {
        s.server.allowed_origins = vec!["*".into()];
    })
    .await;
    for origin in ["https://evil.example", "null"] {
        let (status, _, _c) =
            upgrade(any.port, "127.0.0.2", &format!("Origin: {origin}\r\n")).await;
        assert_eq!(status, 101, "{origin}");
    }
}

#[actix_web::test]
async fn concurrent_sockets_per_client_are_capped() {
    let app = spawn_app_with(Backend::Sqlite, |s| s.rate.client_max_sockets = 2).await;
    let a = client_from(&app, "127.0.0.7").await;
    let _b = client_from(&app, "127.0.0.7").await;
    let (status, _, _) = upgrade(app.port, "127.0.0.7", "").await;
    assert_eq!(status, 429);
    let _other = client_from(&app, "127.0.0.8").await;
    // Closing one frees its slot.
    a.close().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, _s) = upgrade(app.port, "127.0.0.7", "").await;
        if status == 101 {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_web::test]
async fn the_server_wide_socket_cap_answers_503() {
    let app = spawn_app_with(Backend::Sqlite, |s| s.limits.max_connections = 2).await;
    let _a = client_from(&app, "127.0.0.2").await;
    let _b = client_from(&app, "127.0.0.3").await;
    let (status, _, _) = upgrade(app.port, "127.0.0.4", "").await;
    assert_eq!(status, 503);
}

#[actix_web::test]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.proxy.trusted = vec!["127.0.0.1".into()];
        s.rate.client_connections = Rate::new(6, 2);
    })
    .await;
    let mut keep = Vec::new();
    let port = app.port;
    let up = |from: &'static str, xff: String| async move {
        upgrade(port, from, &format!("X-Forwarded-For: {xff}\r\n")).await
    };
    // Through the trusted proxy, the right-most untrusted address is the client, whatever the
    // client put to its left.
    for forged in ["6.6.6.6", "7.7.7.7"] {
        let (status, _, s) = up("127.0.0.1", format!("{forged}, 203.0.113.5")).await;
        assert_eq!(status, 101);
        keep.push(s);
    }
    assert_eq!(up("127.0.0.1", "8.8.8.8, 203.0.113.5".into()).await.0, 429);
    let (status, _, s) = up("127.0.0.1", "203.0.113.6".into()).await;
    assert_eq!(status, 101, "another forwarded client has its own bucket");
    keep.push(s);
    // From an untrusted peer the header is ignored: new spoofed addresses do not help.
    for spoof in ["198.51.100.1", "198.51.100.2"] {
        let (status, _, s) = up("127.0.0.9", spoof.into()).await;
        assert_eq!(status, 101);
        keep.push(s);
    }
    assert_eq!(up("127.0.0.9", "198.51.100.3".into()).await.0, 429);
    // IPv6 addresses of one /64 share a bucket; another /64 does not.
    for v6 in ["2001:db8:1:2::1", "2001:db8:1:2::2"] {
        let (status, _, s) = up("127.0.0.1", v6.into()).await;
        assert_eq!(status, 101);
        keep.push(s);
    }
    assert_eq!(up("127.0.0.1", "2001:db8:1:2:ffff::3".into()).await.0, 429);
    assert_eq!(up("127.0.0.1", "2001:db8:1:3::1".into()).await.0, 101);
}

#[actix_web::test]
async fn the_onion_listener_shares_one_bucket_and_always_needs_work() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.server.onion_listen = Some("127.0.0.1:0".into());
        s.proxy.trusted = vec!["127.0.0.1".into()];
        s.pow.mode = PowMode::Off;
        s.pow.base_bits = 6;
        s.rate.onion_factor = 1;
        s.rate.client_connections = Rate::new(6, 2);
    })
    .await;
    let onion = app.state.onion_port.expect("onion listener");
    let url = format!("ws://127.0.0.1:{onion}/ws");
    let mut a = Client::connect_from(&url, ip("127.0.0.2")).await.unwrap();
    assert_eq!(
        a.hello.pow_bits, 6,
        "creation needs work on the onion listener"
    );
    let _b = Client::connect_from(&url, ip("127.0.0.3")).await.unwrap();
    // Different peers and forwarded headers do not matter there: one shared bucket.
    let (status, _, _) = upgrade(onion, "127.0.0.4", "X-Forwarded-For: 203.0.113.9\r\n").await;
    assert_eq!(status, 429);
    // The normal listener is separate and needs no work (mode off).
    let c = client_from(&app, "127.0.0.2").await;
    assert_eq!(c.hello.pow_bits, 0);
    // The client library solves the work; creation succeeds.
    let keys = random_room();
    assert!(matches!(
        a.create(&keys).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
}

#[actix_web::test]
async fn on_the_onion_listener_each_tor_circuit_gets_a_clients_limits_within_the_onion_share() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.server.onion_listen = Some("127.0.0.1:0".into());
        s.server.onion_circuit_ids = true;
        s.pow.mode = PowMode::Off;
        s.pow.base_bits = 6;
        s.rate.onion_factor = 2;
        s.rate.client_connections = Rate::new(6, 3);
        s.rate.client_messages = Rate::new(6, 3);
    })
    .await;
    let onion = app.state.onion_port.expect("onion listener");
    let url = format!("ws://127.0.0.1:{onion}/ws");
    let circuit_line = nanochat::client::tor_circuit_line;

    // Messages: circuit 1 floods a room past its own limit; circuit 2 in the same room is not
    // held back (all Tor visitors shared one bucket before).
    let mut a = Client::connect_as_circuit(&url, 1).await.unwrap();
    assert_eq!(a.hello.pow_bits, 6, "creation still needs work there");
    let keys = random_room();
    assert!(matches!(
        a.create(&keys).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    assert_eq!(burst(&mut a, &keys, 4).await, (3, 1));
    let mut b = Client::connect_as_circuit(&url, 2).await.unwrap();
    assert!(matches!(
        b.join(&keys, None).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    assert_eq!(burst(&mut b, &keys, 3).await, (3, 0));

    // Connections (3 per circuit, 6 for all of them): circuit 1 has used one of its three...
    let mut open = Vec::new();
    for _ in 0..2 {
        let (status, _, stream) = upgrade_after(onion, "127.0.0.1", &circuit_line(1), "").await;
        assert_eq!(status, 101);
        open.push(stream);
    }
    // ... and is refused its fourth, which costs the other circuits nothing ...
    let (status, _, _) = upgrade_after(onion, "127.0.0.1", &circuit_line(1), "").await;
    assert_eq!(status, 429);
    // ... until all circuits together reach the onion share: 1 + 1 + 2 + 2 = 6.
    for expected in [101, 101, 429] {
        let (status, _, stream) = upgrade_after(onion, "127.0.0.1", &circuit_line(3), "").await;
        assert_eq!(status, expected);
        open.push(stream);
    }
    let metrics = app.metrics().await;
    for (limiter, refused) in [
        ("client_messages", 1),
        ("client_connections", 1),
        ("onion_connections", 1),
        ("onion_messages", 0),
    ] {
        let series = format!("nanochat_rate_limited_total{{limiter=\"{limiter}\"}}");
        assert_eq!(metric_value(&metrics, &series), refused, "{series}");
    }

    // The line may come in pieces, and what follows it is the request.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", onion))
        .await
        .unwrap();
    let line = circuit_line(7);
    let (head, rest) = line.split_at(20);
    tcp.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    tcp.write_all(
        format!("{rest}GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // A connection without the line (torrc without `HiddenServiceExportCircuitID haproxy`) is
    // closed unanswered, and counted.
    let (answer, read) = exchange(onion, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // (reset, as what it sent is left unread.)
    let closed = match &read {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        _ => false,
    };
    assert!(
        closed && answer.is_empty(),
        "closed unanswered: {read:?} {answer:?}"
    );
    let metrics = app.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "nanochat_upgrades_refused_total{reason=\"onion_circuit_id\"}"
        ),
        1
    );
    // The clearnet listener reads no such line.
    let c = client_from(&app, "127.0.0.2").await;
    assert_eq!(c.hello.pow_bits, 0);
}

#[actix_web::test]
async fn a_client_that_keeps_sending_invalid_frames_is_disconnected() {
    let app = spawn_app_with(Backend::Sqlite, |s| s.limits.strike_budget = 10).await;
    let (mut alice, keys) = create_from(&app, "127.0.0.2").await;
    let mut bad = client_from(&app, "127.0.0.3").await;
    // Invalid frames cost 4 strikes each: two fit in a budget of 10, the third does not.
    for _ in 0..2 {
        bad.send_text("{garbage").await.unwrap();
        expect_error(&mut bad, "bad_request").await;
    }
    bad.send_text("{garbage").await.unwrap();
    expect_error(&mut bad, "bad_request").await;
    expect_close(&mut bad, 1008).await;
    // Everyone else goes on.
    assert_eq!(burst(&mut alice, &keys, 2).await, (2, 0));
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("nanochat_abuse_disconnects_total 1"),
        "{metrics}"
    );
}

#[actix_web::test]
async fn a_slow_handshake_is_cut_off() {
    let app = spawn_app_with(Backend::Sqlite, |s| s.limits.handshake_timeout_secs = 1).await;
    let (answer, _) = exchange(app.port, b"GET /ws HTTP/1.1\r\nHost: x\r\n").await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

async fn one_token_is_redeemed_once_under_concurrency(backend: Backend) {
    let app = spawn_app_with(backend, |s| {
        s.pow.mode = PowMode::On;
        s.pow.base_bits = 6;
    })
    .await;
    let mut a = client_from(&app, "127.0.0.2").await;
    let mut b = client_from(&app, "127.0.0.3").await;
    race_one_token(&mut a, &mut b).await;
}

/// Two clients redeem one solved token for one room at the same time: exactly one creates the
/// room, the other is told the token is spent.
pub async fn race_one_token(a: &mut nanochat::client::Client, b: &mut nanochat::client::Client) {
    let keys = random_room();
    let (token, bits) = a.pow_token().await.unwrap();
    let counter = crypto::pow_solve(&token, &keys.room_id, bits);
    let frame = json!({"type":"create","room":b64u(&keys.room_id),"auth_key":b64u(&keys.auth_key),
        "pow":{"token":b64u(&token),"counter":counter}});
    a.send_json(&frame).await.unwrap();
    b.send_json(&frame).await.unwrap();
    let (ra, rb) = tokio::join!(a.recv(), b.recv());
    let outcomes = [ra.unwrap(), rb.unwrap()];
    let joined = outcomes
        .iter()
        .filter(|f| matches!(f, ServerFrame::Joined { .. }))
        .count();
    let invalid = outcomes
        .iter()
        .filter(|f| matches!(f, ServerFrame::Error { code, .. } if code == "pow_invalid"))
        .count();
    assert_eq!((joined, invalid), (1, 1), "{outcomes:?}");
}

#[actix_web::test]
async fn one_token_is_redeemed_once_under_concurrency_on_sqlite() {
    one_token_is_redeemed_once_under_concurrency(Backend::Sqlite).await;
}

#[actix_web::test]
async fn one_token_is_redeemed_once_under_concurrency_on_postgres() {
    one_token_is_redeemed_once_under_concurrency(Backend::Postgres).await;
}

#[actix_web::test]
async fn adaptive_difficulty_rises_under_a_burst_of_creations_and_comes_back_down() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.pow.mode = PowMode::Adaptive;
        s.pow.base_bits = 2;
        s.pow.max_bits = 12;
        s.pow.adjust_interval_ms = 200;
        // 1 creation per 200 ms interval is 300 per minute.
        s.pow.raise_creations_per_minute = 100;
        s.pow.raise_connections_per_minute = 10_000_000;
        s.pow.calm_intervals = 2;
    })
    .await;
    let bits_now = || async { client_from(&app, "127.0.0.2").await.hello.pow_bits };
    assert_eq!(bits_now().await, 2);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut peak = 2;
    while peak < 6 {
        assert!(
            Instant::now() < deadline,
            "difficulty never rose (peak {peak})"
        );
        for _ in 0..3 {
            create_from(&app, "127.0.0.3").await;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak = peak.max(bits_now().await);
    }
    let gauge = app.metrics().await;
    assert!(
        gauge
            .lines()
            .any(|l| l.starts_with("nanochat_pow_difficulty ") && !l.ends_with(" 2")),
        "{gauge}"
    );
    // Quiet again: it falls back, one bit at a time, to the base.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = peak;
    loop {
        let bits = bits_now().await;
        assert!(bits <= last, "difficulty rose while calm: {last} -> {bits}");
        last = bits;
        if bits == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "difficulty stuck at {bits}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Ask for a page of history before `before`; the answer frame.
async fn read_history(c: &mut Client, before: i64, limit: u32) -> ServerFrame {
    c.send_json(&json!({"type": "history", "before": before, "limit": limit}))
        .await
        .unwrap();
    c.recv().await.unwrap()
}

/// Seconds until a `rate_limited` answer says to try again; panics on any other answer.
fn wait_asked(answer: &ServerFrame) -> f64 {
    match answer {
        ServerFrame::Error {
            code,
            retry_after_ms: Some(ms),
            ..
        } if code == "rate_limited" => *ms as f64 / 1000.0,
        other => panic!("expected rate_limited, got {other:?}"),
    }
}

#[actix_web::test]
async fn reading_is_limited_per_client_by_the_messages_asked_for() {
    // Ten messages a second per client, 400 at once; a join returns up to 100.
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.rate.client_reads = Rate::new(600, 400);
        s.limits.history = 100;
    })
    .await;
    let (mut writer, keys) = create_from(&app, "127.0.0.2").await;
    let mut session = RoomSession::new(keys.clone());
    for i in 0..3 {
        send_acked(&mut writer, &mut session, "w", &format!("m{i}")).await;
    }
    // The join costs 100 and a page of 200 the rest but 100, found or not (three messages).
    let mut reader = join_from(&app, "127.0.0.3", &keys).await;
    match read_history(&mut reader, 4, 200).await {
        ServerFrame::History { messages, .. } => assert_eq!(messages.len(), 3),
        other => panic!("{other:?}"),
    }
    // Another 200 is refused, with the time 100 more take to come back (10 s); 100 is not.
    let wait = wait_asked(&read_history(&mut reader, 4, 200).await);
    assert!((9.0..=10.5).contains(&wait), "{wait}");
    assert!(matches!(
        read_history(&mut reader, 4, 100).await,
        ServerFrame::History { .. }
    ));
    // Now even a join is refused from that address, on a new socket too...
    let mut again = client_from(&app, "127.0.0.3").await;
    wait_asked(&again.join(&keys, None).await.unwrap());
    // ... while another address reads as before.
    let mut other = join_from(&app, "127.0.0.4", &keys).await;
    assert!(matches!(
        read_history(&mut other, 4, 200).await,
        ServerFrame::History { .. }
    ));
    let refused = app.refused("client_reads");
    assert_eq!(refused, 2);
}

#[actix_web::test]
async fn a_client_told_no_work_is_needed_does_it_when_the_creation_is_refused_for_want_of_it() {
    let app = spawn_app_with(Backend::Sqlite, work_rising_after_a_few_creations).await;
    let mut early = client_from(&app, "127.0.0.2").await;
    assert_eq!(early.hello.pow_bits, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.state.pow.required(false) == 0 {
        assert!(Instant::now() < deadline, "the work asked never rose");
        create_from(&app, "127.0.0.3").await;
    }
    let refused = || app.rejected("pow_required");
    let before = refused();
    let answer = early.create(&random_room()).await.unwrap();
    assert!(matches!(answer, ServerFrame::Joined { .. }), "{answer:?}");
    assert_eq!(refused(), before + 1, "refused once, then done with work");
}

#[actix_web::test]
async fn room_creations_and_token_requests_are_limited_per_client_and_globally() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.rate.client_creations = Rate::new(6, 2);
        s.rate.global_creations = Rate::new(6, 4);
        s.rate.client_pow_tokens = Rate::new(6, 2);
    })
    .await;
    let create = |from: &'static str| {
        let app = &app;
        async move {
            let mut c = client_from(app, from).await;
            let answer = c.create(&random_room()).await.unwrap();
            match answer {
                ServerFrame::Joined { .. } => "joined".to_owned(),
                ServerFrame::Error { code, .. } => code,
                other => panic!("{other:?}"),
            }
        }
    };
    assert_eq!(create("127.0.0.2").await, "joined");
    assert_eq!(create("127.0.0.2").await, "joined");
    assert_eq!(create("127.0.0.2").await, "rate_limited", "per client");
    assert_eq!(create("127.0.0.3").await, "joined");
    // Four attempts so far (the refused one took a global cell too): the global limit.
    assert_eq!(create("127.0.0.4").await, "rate_limited", "global");
    let mut c = client_from(&app, "127.0.0.5").await;
    c.pow_token().await.unwrap();
    c.pow_token().await.unwrap();
    assert!(
        matches!(c.pow_token().await, Err(nanochat::client::ClientError::Server { code, .. }) if code == "rate_limited")
    );
}
