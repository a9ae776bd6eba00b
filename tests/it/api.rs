//! End to end over real sockets: the whole room life cycle on both backends, authentication,
//! and every error code of PROTOCOL.md §4.

use nanochat::client::{Client, ClientError, RoomSession};
use nanochat::crypto::{self, RoomKeys};
use nanochat::protocol::{ServerFrame, WireMsg, b64u};
use serde_json::json;

use crate::helpers::{Backend, random_room, spawn_app, spawn_app_with};

/// Read frames until an error frame arrives; returns (code, message, ref).
pub async fn expect_error(c: &mut Client, code: &str) -> (String, Option<String>) {
    match c.recv().await.expect("a frame") {
        ServerFrame::Error {
            code: got,
            message,
            reference,
            ..
        } => {
            assert_eq!(got, code, "message: {message}");
            (message, reference)
        }
        other => panic!("expected error {code}, got {other:?}"),
    }
}

/// The next frame must be a close with this code.
pub async fn expect_close(c: &mut Client, code: u16) {
    loop {
        match c.recv().await {
            Err(ClientError::Closed(Some((got, _)))) => {
                assert_eq!(got, code);
                return;
            }
            Err(ClientError::Closed(None)) if code == 0 => return,
            Ok(ServerFrame::Msg(_)) => continue,
            other => panic!("expected close {code}, got {other:?}"),
        }
    }
}

async fn joined(c: &mut Client, keys: &RoomKeys, after: Option<i64>) -> (Vec<WireMsg>, bool) {
    match c.join(keys, after).await.expect("join answer") {
        ServerFrame::Joined {
            messages,
            more,
            room,
        } => {
            assert_eq!(room, b64u(&keys.room_id));
            (messages, more)
        }
        other => panic!("expected joined, got {other:?}"),
    }
}

async fn send_and_ack(c: &mut Client, s: &mut RoomSession, text: &str, r: &str) -> i64 {
    let sealed = s.seal("alice", text);
    c.send_sealed(r, &sealed).await.unwrap();
    loop {
        match c.recv().await.unwrap() {
            ServerFrame::Ack { reference, seq, .. } => {
                assert_eq!(reference, r);
                return seq;
            }
            ServerFrame::Msg(_) => continue,
            other => panic!("expected ack, got {other:?}"),
        }
    }
}

async fn a_room_lives_its_whole_life(backend: Backend) {
    let app = spawn_app(backend).await;
    let (mut alice, keys) = app.room_creator().await;
    let mut alice_s = RoomSession::new(keys.clone());
    let mut bob = app.client().await;
    let (msgs, more) = joined(&mut bob, &keys, None).await;
    assert!(msgs.is_empty() && !more);
    let mut bob_s = RoomSession::new(keys.clone());

    // Send: ack to the sender, Msg to the other member.
    let seq = send_and_ack(&mut alice, &mut alice_s, "hello bob", "m1").await;
    assert_eq!(seq, 1);
    let ServerFrame::Msg(m) = bob.recv().await.unwrap() else {
        panic!("bob expected a msg")
    };
    assert_eq!(m.seq, 1);
    let env = bob_s.open(&m).expect("decrypts");
    assert_eq!(
        (env.nick.as_str(), env.text.as_str()),
        ("alice", "hello bob")
    );
    assert_eq!(bob_s.open(&m), Err(nanochat::client::Rejected::Replayed));

    // More messages, then history paging.
    for i in 2..=5 {
        let seq = send_and_ack(&mut alice, &mut alice_s, &format!("m{i}"), &format!("r{i}")).await;
        assert_eq!(seq, i);
        let ServerFrame::Msg(m) = bob.recv().await.unwrap() else {
            panic!()
        };
        assert_eq!(m.seq, i);
    }
    bob.send_json(&json!({"type": "history", "before": 4, "limit": 2}))
        .await
        .unwrap();
    match bob.recv().await.unwrap() {
        ServerFrame::History { messages, more } => {
            assert_eq!(
                messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
                vec![2, 3]
            );
            assert!(more);
        }
        other => panic!("{other:?}"),
    }
    bob.send_json(&json!({"type": "history", "after": 3}))
        .await
        .unwrap();
    match bob.recv().await.unwrap() {
        ServerFrame::History { messages, more } => {
            assert_eq!(
                messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
                vec![4, 5]
            );
            assert!(!more);
        }
        other => panic!("{other:?}"),
    }

    // Bob drops; Alice sends while he is away; Bob reconnects with `after`.
    bob.close().await;
    send_and_ack(&mut alice, &mut alice_s, "while away 1", "w1").await;
    send_and_ack(&mut alice, &mut alice_s, "while away 2", "w2").await;
    let mut bob = app.client().await;
    let (msgs, more) = joined(&mut bob, &keys, Some(5)).await;
    assert_eq!(msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![6, 7]);
    assert!(!more);
    let texts: Vec<String> = msgs
        .iter()
        .map(|m| bob_s.open(m).expect("decrypts").text)
        .collect();
    assert_eq!(texts, vec!["while away 1", "while away 2"]);
    // Join without `after` returns the newest `history` messages.
    let mut carol = app.client().await;
    let (msgs, _) = joined(&mut carol, &keys, None).await;
    assert_eq!(msgs.len(), 7);

    // Panic: every socket gets `nuked` and is closed.
    alice.send_json(&json!({"type": "panic"})).await.unwrap();
    for c in [&mut alice, &mut bob, &mut carol] {
        loop {
            match c.recv().await {
                Ok(ServerFrame::Nuked) => break,
                Ok(ServerFrame::Msg(_)) => continue,
                other => panic!("expected nuked, got {other:?}"),
            }
        }
        expect_close(c, 1000).await;
    }
    // The link now says the room is gone, and it cannot be created again.
    let mut dave = app.client().await;
    let answer = dave.join(&keys, None).await.unwrap();
    assert!(
        matches!(&answer, ServerFrame::Error { code, .. } if code == "room_gone"),
        "{answer:?}"
    );
    let mut erin = app.client().await;
    let answer = erin.create(&keys).await.unwrap();
    assert!(
        matches!(&answer, ServerFrame::Error { code, .. } if code == "room_gone"),
        "{answer:?}"
    );
    let page = app
        .state
        .store
        .messages(
            &keys.room_id,
            nanochat::protocol::HistoryQuery::After(0),
            100,
            nanochat::store::now_ms(),
        )
        .await
        .unwrap();
    assert!(page.messages.is_empty(), "panic deleted every message");
}

#[actix_web::test]
async fn a_room_lives_its_whole_life_on_sqlite() {
    a_room_lives_its_whole_life(Backend::Sqlite).await;
}

#[actix_web::test]
async fn a_room_lives_its_whole_life_on_postgres() {
    a_room_lives_its_whole_life(Backend::Postgres).await;
}

#[actix_web::test]
async fn a_room_id_alone_cannot_join_and_cannot_tell_if_the_room_exists() {
    let app = spawn_app(Backend::Sqlite).await;
    let (_alice, keys) = app.room_creator().await;
    // Wrong proof for an existing room...
    let mut mallory = app.client().await;
    mallory
        .send_json(&json!({"type": "join", "room": b64u(&keys.room_id), "proof": b64u(&[0u8; 32])}))
        .await
        .unwrap();
    let wrong_proof = mallory.recv_text().await.unwrap();
    // ...a proof computed for another socket's challenge...
    let mut eve = app.client().await;
    let stolen = crypto::join_proof(&keys.auth_key, &mallory.hello.challenge, &keys.room_id);
    eve.send_json(&json!({"type": "join", "room": b64u(&keys.room_id), "proof": b64u(&stolen)}))
        .await
        .unwrap();
    let replayed_proof = eve.recv_text().await.unwrap();
    // ...and a room that does not exist at all.
    let unknown = random_room();
    let mut trent = app.client().await;
    trent
        .send_json(
            &json!({"type": "join", "room": b64u(&unknown.room_id), "proof": b64u(&[0u8; 32])}),
        )
        .await
        .unwrap();
    let no_room = trent.recv_text().await.unwrap();
    assert_eq!(wrong_proof, no_room, "byte-identical answers");
    assert_eq!(replayed_proof, no_room);
    assert!(no_room.contains("\"auth_failed\""), "{no_room}");
    // The right proof still works after all that.
    let mut bob = app.client().await;
    joined(&mut bob, &keys, None).await;
}

#[actix_web::test]
async fn bad_frames_get_their_codes_and_the_socket_keeps_working() {
    let app = spawn_app(Backend::Sqlite).await;
    let (mut alice, keys) = app.room_creator().await;
    let mut s = RoomSession::new(keys.clone());
    send_and_ack(&mut alice, &mut s, "kept", "k1").await;

    let before = nanochat::store::now_ms();
    let mut c = app.client().await;
    let after = nanochat::store::now_ms();
    // The hello tells the server's clock: a client whose clock is off takes a send's epoch
    // from it (the epoch must be within one day of the server's, below).
    assert!(
        (before..=after).contains(&c.hello.now),
        "hello's now {} outside {before}..={after}",
        c.hello.now
    );
    // The Rust client dates by it: here the two clocks are one, so it is this clock's now.
    let dated = c.server_now();
    assert!(
        (before..=nanochat::store::now_ms()).contains(&dated),
        "{dated}"
    );
    let room = b64u(&keys.room_id);
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "bad_request"),
        ("[]".into(), "bad_request"),
        (r#"{"type":5}"#.into(), "bad_request"),
        (r#"{"type":"fly"}"#.into(), "unknown_type"),
        (
            json!({"type":"join","room":room,"proof":"!!!"}).to_string(),
            "bad_request",
        ),
        (
            json!({"type":"join","room":"AAAA","proof":b64u(&[0;32])}).to_string(),
            "bad_request",
        ),
        (
            json!({"type":"join","room":room,"proof":b64u(&[0;31])}).to_string(),
            "bad_request",
        ),
        (
            json!({"type":"join","room":room,"proof":b64u(&[0;32]),"after":-1}).to_string(),
            "bad_request",
        ),
        (
            json!({"type":"history","before":1}).to_string(),
            "not_joined",
        ),
        (json!({"type":"panic"}).to_string(), "not_joined"),
        (
            json!({"type":"send","ref":"x","epoch":1,"iv":b64u(&[0;12]),"ct":b64u(&[0;16])})
                .to_string(),
            "not_joined",
        ),
        (r#"{"type":"create","room":1}"#.into(), "bad_request"),
    ];
    for (frame, code) in &cases {
        c.send_text(frame.clone()).await.unwrap();
        expect_error(&mut c, code).await;
    }
    // The same socket can still join afterwards.
    joined(&mut c, &keys, None).await;
    c.send_json(&json!({"type":"join","room":room,"proof":b64u(&[0;32])}))
        .await
        .unwrap();
    expect_error(&mut c, "already_joined").await;
    c.send_json(&json!({"type":"create","room":room,"auth_key":b64u(&keys.auth_key)}))
        .await
        .unwrap();
    expect_error(&mut c, "already_joined").await;

    // Send-level refusals carry the ref.
    let epoch = crypto::epoch_of(nanochat::store::now_ms());
    let too_big = vec![0u8; app.settings.limits.max_ct_bytes + 1];
    let send_cases = vec![
        (
            json!({"type":"send","ref":"a","epoch":epoch + 2,"iv":b64u(&[1;12]),"ct":b64u(&[0;16])}),
            "bad_request",
        ),
        (
            json!({"type":"send","ref":"b","epoch":epoch - 2,"iv":b64u(&[1;12]),"ct":b64u(&[0;16])}),
            "bad_request",
        ),
        (
            json!({"type":"send","ref":"c","epoch":epoch,"iv":b64u(&[1;11]),"ct":b64u(&[0;16])}),
            "bad_request",
        ),
        (
            json!({"type":"send","ref":"d","epoch":epoch,"iv":b64u(&[1;12]),"ct":b64u(&[0;15])}),
            "bad_request",
        ),
        (
            json!({"type":"send","ref":"e","epoch":epoch,"iv":b64u(&[1;12]),"ct":b64u(&too_big)}),
            "too_large",
        ),
        (
            json!({"type":"send","ref":"f","epoch":"1","iv":b64u(&[1;12]),"ct":b64u(&[0;16])}),
            "bad_request",
        ),
        (
            json!({"type":"send","ref":"x".repeat(65),"epoch":epoch,"iv":b64u(&[1;12]),"ct":b64u(&[0;16])}),
            "bad_request",
        ),
    ];
    for (frame, code) in &send_cases {
        c.send_json(frame).await.unwrap();
        let (_, reference) = expect_error(&mut c, code).await;
        if let Some(r) = frame["ref"].as_str().filter(|r| r.len() <= 64)
            && frame["epoch"].is_number()
        {
            assert_eq!(reference.as_deref(), Some(r));
        }
    }
    // A repeated IV is a replay.
    let frame =
        json!({"type":"send","ref":"r1","epoch":epoch,"iv":b64u(&[7;12]),"ct":b64u(&[0;16])});
    c.send_json(&frame).await.unwrap();
    assert!(matches!(c.recv().await.unwrap(), ServerFrame::Ack { .. }));
    let mut again = frame.clone();
    again["ref"] = "r2".into();
    c.send_json(&again).await.unwrap();
    let (_, reference) = expect_error(&mut c, "replay").await;
    assert_eq!(reference.as_deref(), Some("r2"));
    // History limits.
    c.send_json(&json!({"type":"history","before":5,"limit":201}))
        .await
        .unwrap();
    expect_error(&mut c, "bad_request").await;
    c.send_json(&json!({"type":"history","before":5,"after":1}))
        .await
        .unwrap();
    expect_error(&mut c, "bad_request").await;

    // Nothing stored was lost and the room still works for everyone.
    let seq = send_and_ack(&mut alice, &mut s, "still here", "k2").await;
    assert_eq!(seq, 3);
    let mut bob = app.client().await;
    let (msgs, _) = joined(&mut bob, &keys, None).await;
    assert_eq!(
        msgs.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
}

#[actix_web::test]
async fn oversized_and_binary_frames_close_only_their_socket() {
    let app = spawn_app_with(Backend::Sqlite, |s| s.limits.max_frame_bytes = 16 * 1024).await;
    let (mut alice, keys) = app.room_creator().await;
    let mut s = RoomSession::new(keys.clone());

    let mut big = app.client().await;
    big.send_text("x".repeat(16 * 1024 + 1)).await.unwrap();
    expect_error(&mut big, "too_large").await;
    expect_close(&mut big, 1009).await;

    let mut bin = app.client().await;
    bin.send_binary(vec![1, 2, 3]).await.unwrap();
    expect_error(&mut bin, "bad_request").await;
    expect_close(&mut bin, 1003).await;

    assert_eq!(send_and_ack(&mut alice, &mut s, "fine", "a").await, 1);
}

#[actix_web::test]
async fn creating_an_existing_room_is_refused() {
    let app = spawn_app(Backend::Sqlite).await;
    let (_alice, keys) = app.room_creator().await;
    let mut c = app.client().await;
    let answer = c.create(&keys).await.unwrap();
    assert!(
        matches!(&answer, ServerFrame::Error { code, .. } if code == "room_exists"),
        "{answer:?}"
    );
}

#[actix_web::test]
async fn frames_beyond_the_rate_are_refused_with_a_retry_time() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.limits.frames_per_second = 1;
        s.limits.frames_burst = 3;
    })
    .await;
    let mut c = app.client().await;
    for _ in 0..3 {
        c.send_json(&json!({"type": "pow"})).await.unwrap();
        assert!(matches!(c.recv().await.unwrap(), ServerFrame::Pow { .. }));
    }
    c.send_json(&json!({"type": "pow"})).await.unwrap();
    match c.recv().await.unwrap() {
        ServerFrame::Error {
            code,
            retry_after_ms,
            ..
        } => {
            assert_eq!(code, "rate_limited");
            let wait = retry_after_ms.expect("retry_after_ms");
            assert!((1..=1000).contains(&wait), "{wait}");
        }
        other => panic!("{other:?}"),
    }
    // Another client is not affected.
    let mut other = app.client().await;
    other.send_json(&json!({"type": "pow"})).await.unwrap();
    assert!(matches!(
        other.recv().await.unwrap(),
        ServerFrame::Pow { .. }
    ));
}

#[actix_web::test]
async fn room_creation_checks_proof_of_work_when_required() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.pow.mode = nanochat::config::PowMode::On;
        s.pow.base_bits = 8;
    })
    .await;
    let keys = random_room();
    let mut c = app.client().await;
    assert_eq!(c.hello.pow_bits, 8);
    let create = |pow: Option<serde_json::Value>| {
        let mut f =
            json!({"type":"create","room":b64u(&keys.room_id),"auth_key":b64u(&keys.auth_key)});
        if let Some(p) = pow {
            f["pow"] = p;
        }
        f
    };
    c.send_json(&create(None)).await.unwrap();
    expect_error(&mut c, "pow_required").await;

    let (token, bits) = c.pow_token().await.unwrap();
    assert_eq!(bits, 8);
    let good = crypto::pow_solve(&token, &keys.room_id, bits);
    let wrong = (0..)
        .find(|n| !crypto::pow_check(&token, &keys.room_id, *n, bits))
        .unwrap();
    c.send_json(&create(Some(
        json!({"token": b64u(&token), "counter": wrong}),
    )))
    .await
    .unwrap();
    expect_error(&mut c, "pow_invalid").await;
    // Solved for another room: a counter that works there but not here.
    let other = random_room();
    let for_other = (0..)
        .find(|n| {
            crypto::pow_check(&token, &other.room_id, *n, bits)
                && !crypto::pow_check(&token, &keys.room_id, *n, bits)
        })
        .unwrap();
    c.send_json(&create(Some(
        json!({"token": b64u(&token), "counter": for_other}),
    )))
    .await
    .unwrap();
    expect_error(&mut c, "pow_invalid").await;
    // Expired, and from another server secret.
    let now = nanochat::store::now_ms() as u64;
    let expired = app.state.keys.issue_pow_token(now - 1, 8);
    let c_exp = crypto::pow_solve(&expired, &keys.room_id, 8);
    c.send_json(&create(Some(
        json!({"token": b64u(&expired), "counter": c_exp}),
    )))
    .await
    .unwrap();
    expect_error(&mut c, "pow_invalid").await;
    let foreign = crypto::ServerKeys::derive(&[42u8; 32]).issue_pow_token(now + 60_000, 8);
    let c_for = crypto::pow_solve(&foreign, &keys.room_id, 8);
    c.send_json(&create(Some(
        json!({"token": b64u(&foreign), "counter": c_for}),
    )))
    .await
    .unwrap();
    expect_error(&mut c, "pow_invalid").await;

    // The right work creates the room; the token is then spent.
    c.send_json(&create(Some(
        json!({"token": b64u(&token), "counter": good}),
    )))
    .await
    .unwrap();
    assert!(matches!(
        c.recv().await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    let again = random_room();
    let mut d = app.client().await;
    let c2 = crypto::pow_solve(&token, &again.room_id, bits);
    d.send_json(
        &json!({"type":"create","room":b64u(&again.room_id),"auth_key":b64u(&again.auth_key),
        "pow":{"token": b64u(&token), "counter": c2}}),
    )
    .await
    .unwrap();
    expect_error(&mut d, "pow_invalid").await;
    // The client library does the whole dance by itself.
    let mut e = app.client().await;
    assert!(matches!(
        e.create(&again).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
}

#[actix_web::test]
async fn a_stored_key_that_does_not_unwrap_gives_internal_without_details() {
    let app = spawn_app(Backend::Sqlite).await;
    let (_alice, keys) = app.room_creator().await;
    let db = rusqlite::Connection::open(app.dir.path().join("nanochat.db")).unwrap();
    db.execute(
        "UPDATE rooms SET auth_wrapped = zeroblob(60) WHERE id = ?1",
        [&keys.room_id[..]],
    )
    .unwrap();
    let mut bob = app.client().await;
    bob.join(&keys, None)
        .await
        .map(|f| {
            assert_eq!(
                f,
                ServerFrame::Error {
                    code: "internal".into(),
                    message: "internal error".into(),
                    reference: None,
                    retry_after_ms: None
                }
            )
        })
        .unwrap();
}

#[actix_web::test]
async fn storage_outage_gives_unavailable_and_recovers_without_loss() {
    let app = spawn_app(Backend::Postgres).await;
    let db = app.db.as_ref().unwrap().name.clone();
    let (mut alice, keys) = app.room_creator().await;
    let mut s = RoomSession::new(keys.clone());
    assert_eq!(send_and_ack(&mut alice, &mut s, "before", "b").await, 1);
    assert_eq!(
        crate::helpers::http_get(app.port, "/readyz").await.status,
        200
    );

    let cluster = crate::pg::cluster();
    cluster
        .admin(&format!(
            "ALTER DATABASE {db} WITH ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}';"
        ))
        .await;
    let sealed = s.seal("alice", "during");
    alice.send_sealed("d", &sealed).await.unwrap();
    let (_, reference) = expect_error(&mut alice, "unavailable").await;
    assert_eq!(reference.as_deref(), Some("d"));
    crate::helpers::wait_readiness(app.port, 503).await;

    cluster
        .admin(&format!("ALTER DATABASE {db} WITH ALLOW_CONNECTIONS true"))
        .await;
    crate::helpers::wait_readiness(app.port, 200).await;
    // The client retries the refused message and it is stored.
    alice.send_sealed("d", &sealed).await.unwrap();
    assert!(matches!(
        alice.recv().await.unwrap(),
        ServerFrame::Ack { seq: 2, .. }
    ));
    let mut bob = app.client().await;
    let (msgs, _) = joined(&mut bob, &keys, None).await;
    let mut bob_s = RoomSession::new(keys.clone());
    let texts: Vec<String> = msgs.iter().map(|m| bob_s.open(m).unwrap().text).collect();
    assert_eq!(texts, vec!["before", "during"]);
}

#[actix_web::test]
async fn the_largest_ciphertext_reaches_members_and_history_whole() {
    // Frames of about 53 KB: several reads of the client's 8 KiB read buffer, and far more
    // than one of the server's socket reads.
    let app = spawn_app_with(Backend::Sqlite, |s| s.limits.max_ct_bytes = 40_000).await;
    let (mut alice, keys) = app.room_creator().await;
    let mut bob = app.client().await;
    joined(&mut bob, &keys, None).await;
    let epoch = crypto::epoch_of(nanochat::store::now_ms());
    let mut ct = vec![0u8; 40_000];
    rand::fill(&mut ct[..]);
    let iv = [9u8; 12];
    alice
        .send_json(&json!({"type":"send","ref":"big","epoch":epoch,"iv":b64u(&iv),"ct":b64u(&ct)}))
        .await
        .unwrap();
    match alice.recv().await.unwrap() {
        ServerFrame::Ack { reference, seq, .. } => {
            assert_eq!((reference.as_str(), seq), ("big", 1))
        }
        other => panic!("expected ack, got {other:?}"),
    }
    match bob.recv().await.unwrap() {
        ServerFrame::Msg(m) => assert_eq!((m.seq, m.ct), (1, b64u(&ct))),
        other => panic!("expected the message, got {other:?}"),
    }
    let mut carol = app.client().await;
    let (history, _) = joined(&mut carol, &keys, None).await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].ct, b64u(&ct));
    assert_eq!(history[0].iv, b64u(&iv));
}

#[actix_web::test]
async fn a_client_that_stops_reading_is_dropped_and_the_room_goes_on() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        // The sender keeps at most 32 messages in flight, so no batch is larger than 32. The
        // queue holds eight batches: while a reading client's socket write is under way its
        // frames wait there, and a busy test machine can delay the test's reader by several.
        s.store.batch_max = 32;
        s.limits.send_queue = 256;
        s.limits.send_timeout_secs = 1;
    })
    .await;
    let (mut alice, keys) = app.room_creator().await;
    let mut bob = app.client().await;
    joined(&mut bob, &keys, None).await;
    let mut sleepy = app.client().await;
    joined(&mut sleepy, &keys, None).await;
    assert_eq!(app.state.hub.members(&keys.room_id), 3);

    // Large messages fill the sleepy client's socket buffers quickly.
    let epoch = crypto::epoch_of(nanochat::store::now_ms());
    let ct = b64u(&vec![0u8; 8000]);
    let total = 1200;
    let reader = tokio::spawn(async move {
        let mut seen = 0;
        while seen < total {
            match bob.recv().await.unwrap() {
                ServerFrame::Msg(m) => {
                    seen += 1;
                    assert_eq!(m.seq, seen);
                }
                other => panic!("{other:?}"),
            }
        }
        seen
    });
    let mut acked = 0;
    let mut sent = 0;
    while acked < total {
        while sent < total && sent - acked < 32 {
            let mut iv = [0u8; 12];
            rand::fill(&mut iv);
            alice
                .send_json(&json!({"type":"send","ref":sent.to_string(),"epoch":epoch,"iv":b64u(&iv),"ct":ct}))
                .await
                .unwrap();
            sent += 1;
        }
        assert!(matches!(
            alice.recv().await.unwrap(),
            ServerFrame::Ack { .. }
        ));
        acked += 1;
    }
    assert_eq!(reader.await.unwrap(), total);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while app.state.hub.members(&keys.room_id) > 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the sleepy client was never dropped"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop(sleepy);
}

#[actix_web::test]
async fn a_silent_client_is_closed_after_the_idle_timeout() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.limits.ping_interval_secs = 1;
        s.limits.idle_timeout_secs = 2;
    })
    .await;
    // A raw handshake that then never reads or answers pings.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", app.port))
        .await
        .unwrap();
    use tokio::io::AsyncWriteExt as _;
    tcp.write_all(format!("{}\r\n", crate::helpers::UPGRADE_HEAD).as_bytes())
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while app.state.metrics.connections_open.get() < 1 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while app.state.metrics.connections_open.get() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle socket not closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // A client that answers pings stays.
    let mut live = app.client().await;
    live.timeout = std::time::Duration::from_secs(4);
    assert!(matches!(live.recv().await, Err(ClientError::Timeout)));
    assert_eq!(app.state.metrics.connections_open.get(), 1);
}

#[actix_web::test]
async fn every_error_code_is_documented() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md"))
        .expect("docs/protocol.md");
    for code in nanochat::protocol::ErrorCode::ALL {
        assert!(
            doc.contains(&format!("`{}`", code.as_str())),
            "{} undocumented",
            code.as_str()
        );
    }
}
