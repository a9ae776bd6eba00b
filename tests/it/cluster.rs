//! Two server processes on one real Postgres (each with its own pool, listener, hub and
//! limits, as separate processes have), clients spread over them.

use std::collections::HashMap;
use std::time::Duration;

use nanochat::client::{Client, ClientError, RoomSession};
use nanochat::config::PowMode;
use nanochat::crypto::RoomKeys;
use nanochat::protocol::ServerFrame;
use nanochat::store::{AppendOutcome, NewMessage, now_ms};
use serde_json::json;

use crate::api::expect_close;
use crate::helpers::{Backend, TestApp, second_node, spawn_app_with};

async fn joined(app: &TestApp, keys: &RoomKeys) -> Client {
    let mut c = app.client().await;
    assert!(matches!(
        c.join(keys, None).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    c
}

/// Send `n` messages with a few in flight; returns the acked seqs. Msg frames seen on the way
/// are returned too.
async fn send_many(
    mut c: Client,
    keys: RoomKeys,
    nick: &'static str,
    n: usize,
) -> (Vec<i64>, Vec<i64>, Client) {
    let mut s = RoomSession::new(keys);
    let (mut acked, mut seen) = (Vec::new(), Vec::new());
    let mut sent = 0;
    while acked.len() < n {
        while sent < n && sent - acked.len() < 4 {
            c.send_sealed(&sent.to_string(), &s.seal(nick, &format!("{nick} {sent}")))
                .await
                .unwrap();
            sent += 1;
        }
        match c.recv().await.unwrap() {
            ServerFrame::Ack { seq, .. } => acked.push(seq),
            ServerFrame::Msg(m) => seen.push(m.seq),
            other => panic!("{other:?}"),
        }
    }
    (acked, seen, c)
}

/// Receive Msg frames until `total` seqs are known (with `own` seqs counted as known).
async fn receive_until(
    c: &mut Client,
    keys: &RoomKeys,
    mut known: Vec<i64>,
    total: usize,
) -> Vec<(i64, String)> {
    let mut s = RoomSession::new(keys.clone());
    let mut got = Vec::new();
    while known.len() < total {
        match c.recv().await.unwrap() {
            ServerFrame::Msg(m) => {
                let env = s.open(&m).expect("decrypts, not a replay");
                known.push(m.seq);
                got.push((m.seq, env.text));
            }
            other => panic!("{other:?}"),
        }
    }
    got
}

fn assert_once_in_order(seqs: &[i64], label: &str) {
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "{label}: out of order or repeated: {seqs:?}"
    );
}

#[actix_web::test]
async fn messages_cross_nodes_once_and_in_order() {
    let a = spawn_app_with(Backend::Postgres, |_| {}).await;
    let b = second_node(&a, |_| {}).await;
    let (alice, keys) = a.room_creator().await;
    let bob = joined(&b, &keys).await;
    let mut carol = joined(&a, &keys).await;
    let mut dave = joined(&b, &keys).await;

    let k1 = keys.clone();
    let k2 = keys.clone();
    let ta = tokio::spawn(send_many(alice, k1, "alice", 30));
    let tb = tokio::spawn(send_many(bob, k2, "bob", 30));
    let carol_got = receive_until(&mut carol, &keys, Vec::new(), 60).await;
    let dave_got = receive_until(&mut dave, &keys, Vec::new(), 60).await;
    let (alice_acked, alice_seen, mut alice) = ta.await.unwrap();
    let (bob_acked, bob_seen, mut bob) = tb.await.unwrap();

    for (label, got) in [("carol on A", &carol_got), ("dave on B", &dave_got)] {
        let seqs: Vec<i64> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=60).collect::<Vec<_>>(), "{label}");
        // Each sender's messages keep their order.
        for nick in ["alice", "bob"] {
            let mine: Vec<usize> = got
                .iter()
                .filter_map(|(_, t)| {
                    t.strip_prefix(&format!("{nick} "))
                        .map(|n| n.parse().unwrap())
                })
                .collect();
            assert_eq!(mine, (0..30).collect::<Vec<_>>(), "{label}: {nick}");
        }
    }
    // The senders see the other's messages once, in order, around their own acks.
    let rest_a = receive_until(
        &mut alice,
        &keys,
        [alice_acked.clone(), alice_seen.clone()].concat(),
        60,
    )
    .await;
    let rest_b = receive_until(
        &mut bob,
        &keys,
        [bob_acked.clone(), bob_seen.clone()].concat(),
        60,
    )
    .await;
    for (label, acked, seen, rest) in [
        ("alice", alice_acked, alice_seen, rest_a),
        ("bob", bob_acked, bob_seen, rest_b),
    ] {
        let msgs: Vec<i64> = seen
            .iter()
            .copied()
            .chain(rest.iter().map(|(s, _)| *s))
            .collect();
        assert_once_in_order(&msgs, label);
        let mut all: Vec<i64> = msgs.into_iter().chain(acked).collect();
        all.sort_unstable();
        assert_eq!(all, (1..=60).collect::<Vec<_>>(), "{label}");
    }
}

/// Store `text` in the room directly, at `at`, where the process's hub never sees it (as a
/// message committed through another process whose notification is late); its seq.
async fn store_unannounced(
    app: &TestApp,
    session: &mut RoomSession,
    room: nanochat::crypto::RoomId,
    text: &str,
    at: i64,
) -> i64 {
    let m = session.seal("eve", text);
    let new = NewMessage {
        room,
        epoch: m.epoch,
        iv: m.iv,
        ct: m.ct.clone(),
    };
    match app.state.store.append(&[new], at).await.unwrap()[..] {
        [AppendOutcome::Stored { seq }] => seq,
        ref other => panic!("{other:?}"),
    }
}

/// Send `text` and expect its ack with `seq`.
async fn send_live(c: &mut Client, session: &mut RoomSession, text: &str, seq: i64) {
    c.send_sealed(text, &session.seal("alice", text))
        .await
        .unwrap();
    let answer = c.recv().await.unwrap();
    assert!(
        matches!(answer, ServerFrame::Ack { seq: s, .. } if s == seq),
        "{answer:?}"
    );
}

/// A message committed where this process's hub never saw it (as one committed through another
/// process whose notification is late) comes from storage once a later live message has waited
/// for it for a moment: the room reads it once for all its members, who get both, once and in
/// order. One process on SQLite, so that nothing else can deliver the first message meanwhile.
#[actix_web::test]
async fn a_live_message_after_a_gap_brings_the_gap_from_storage() {
    let a = spawn_app_with(Backend::Sqlite, |_| {}).await;
    let (mut alice, keys) = a.room_creator().await;
    let mut bob = joined(&a, &keys).await;
    let mut session = RoomSession::new(keys.clone());
    let seq = store_unannounced(
        &a,
        &mut session,
        keys.room_id,
        "committed elsewhere",
        now_ms(),
    )
    .await;
    assert_eq!(seq, 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), bob.recv())
            .await
            .is_err(),
        "nothing told this process about seq 1"
    );
    assert_eq!(a.state.metrics.held_gap_reads_total.get(), 0);

    // Carol joins now and has seq 1 from her join's read.
    let mut carol = joined(&a, &keys).await;
    send_live(&mut alice, &mut session, "live", 2).await;
    let got = receive_until(&mut bob, &keys, Vec::new(), 2).await;
    assert_eq!(
        got,
        vec![
            (1, "committed elsewhere".to_owned()),
            (2, "live".to_owned())
        ]
    );
    let got = receive_until(&mut carol, &keys, vec![1], 2).await;
    assert_eq!(got, vec![(2, "live".to_owned())]);
    let metrics = &a.state.metrics;
    assert_eq!(metrics.messages_held_total.get(), 1);
    assert_eq!(
        metrics.held_gap_reads_total.get(),
        1,
        "one read for the room"
    );
    assert_eq!(metrics.gap_reads_total.get(), 0, "none by the sockets");
}

/// A gap whose oldest messages expired before it was read (a member that waited past the
/// retention for a message whose notification never came): the read starts at the first message
/// still stored, and the member gets what is left and the live message, once, in order. (The
/// sockets then find seq 1 missing and each look for it once more themselves: the room does
/// not tell them it expired.)
#[actix_web::test]
async fn a_gap_whose_oldest_messages_expired_is_filled_from_the_first_one_left() {
    let a = spawn_app_with(Backend::Sqlite, |_| {}).await;
    let (mut alice, keys) = a.room_creator().await;
    let mut bob = joined(&a, &keys).await;
    let mut session = RoomSession::new(keys.clone());
    let days_31 = 31 * 86_400_000;
    for (text, stored_at, seq) in [("expired", now_ms() - days_31, 1), ("kept", now_ms(), 2)] {
        let stored = store_unannounced(&a, &mut session, keys.room_id, text, stored_at).await;
        assert_eq!(stored, seq);
    }
    send_live(&mut alice, &mut session, "live", 3).await;
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        receive_until(&mut bob, &keys, vec![1], 3),
    )
    .await
    .expect("the gap read ends and the live message follows");
    assert_eq!(got, vec![(2, "kept".to_owned()), (3, "live".to_owned())]);
    assert_eq!(
        a.state.metrics.held_gap_reads_total.get(),
        1,
        "one read, not one per retry"
    );
}

#[actix_web::test]
async fn panic_on_one_node_closes_the_room_on_the_other() {
    let a = spawn_app_with(Backend::Postgres, |_| {}).await;
    let b = second_node(&a, |_| {}).await;
    let (mut alice, keys) = a.room_creator().await;
    let mut carol = joined(&a, &keys).await;
    let mut dave = joined(&b, &keys).await;
    dave.send_json(&json!({"type": "panic"})).await.unwrap();
    for c in [&mut alice, &mut carol, &mut dave] {
        assert_eq!(c.recv().await.unwrap(), ServerFrame::Nuked);
        expect_close(c, 1000).await;
    }
    // Either node now says the room is gone.
    let mut erin = a.client().await;
    assert!(
        matches!(erin.join(&keys, None).await.unwrap(), ServerFrame::Error { code, .. } if code == "room_gone")
    );
}

/// Assert that nothing reaches `client` for `ms` milliseconds.
async fn assert_silent(client: &mut Client, ms: u64, why: &str) {
    assert!(
        matches!(
            tokio::time::timeout(Duration::from_millis(ms), client.recv()).await,
            Err(_) | Ok(Err(ClientError::Timeout))
        ),
        "{why}"
    );
}

/// Terminate a node's cluster listener connection (it reconnects and catches up).
async fn cut_listener(app: &TestApp) {
    let db = app.db.as_ref().unwrap();
    let node = format!("{:016x}", app.state.store.cluster().unwrap().node);
    crate::pg::cluster()
        .admin(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = '{}' AND application_name = 'nanochat-listener-{node}'",
            db.name
        ))
        .await;
}

/// Wait until a node's cluster listener receives notifications.
async fn until_listening(app: &TestApp) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while app.state.metrics.cluster_listening.get() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the cluster listener did not connect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_web::test]
async fn a_wipe_missed_while_the_listener_was_away_closes_the_room_on_reconnect() {
    let a = spawn_app_with(Backend::Postgres, |_| {}).await;
    until_listening(&a).await;
    let (mut alice, keys) = a.room_creator().await;
    let db = a.db.as_ref().unwrap();
    // Another node's wipe whose notification never reached this node (committed without one).
    let wiped = crate::pg::cluster()
        .connect(db)
        .await
        .execute(
            "UPDATE rooms SET wiped_at = now() WHERE id = $1",
            &[&&keys.room_id[..]],
        )
        .await
        .unwrap();
    assert_eq!(wiped, 1);
    assert_silent(&mut alice, 500, "no notice yet: nothing told this node").await;
    cut_listener(&a).await;
    assert_eq!(alice.recv().await.unwrap(), ServerFrame::Nuked);
    expect_close(&mut alice, 1000).await;
    until_listening(&a).await;
}

/// Messages committed while a node's listener was away (here: stored where its hub never saw
/// them) reach its members when the listener is back, once and in order: a room with more
/// than one catch-up page (200) of them, and a second room read in the same statements.
#[actix_web::test]
async fn messages_missed_while_the_listener_was_away_arrive_on_reconnect() {
    let a = spawn_app_with(Backend::Postgres, |_| {}).await;
    until_listening(&a).await;
    let (_alice, busy) = a.room_creator().await;
    let (_carol, quiet) = a.room_creator().await;
    let mut bob = joined(&a, &busy).await;
    let mut dave = joined(&a, &quiet).await;
    let mut missed = Vec::new();
    for (keys, count) in [(&busy, 450), (&quiet, 3)] {
        let mut session = RoomSession::new(keys.clone());
        let batch: Vec<NewMessage> = (0..count)
            .map(|i| {
                let m = session.seal("eve", &format!("missed {i}"));
                NewMessage {
                    room: keys.room_id,
                    epoch: m.epoch,
                    iv: m.iv,
                    ct: m.ct.clone(),
                }
            })
            .collect();
        let stored = a.state.store.append(&batch, now_ms()).await.unwrap();
        assert_eq!(stored.len(), count);
        missed.push(
            (0..count)
                .map(|i| format!("missed {i}"))
                .collect::<Vec<_>>(),
        );
    }
    assert_silent(&mut bob, 300, "nothing told this node yet").await;
    cut_listener(&a).await;
    for ((client, keys), texts) in [(&mut bob, &busy), (&mut dave, &quiet)]
        .into_iter()
        .zip(missed)
    {
        let got = receive_until(client, keys, Vec::new(), texts.len()).await;
        let seqs: Vec<i64> = got.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, (1..=texts.len() as i64).collect::<Vec<_>>());
        assert_eq!(got.into_iter().map(|(_, t)| t).collect::<Vec<_>>(), texts);
    }
    until_listening(&a).await;
    assert_eq!(
        a.state.metrics.gap_reads_total.get(),
        0,
        "the listener read them, not the sockets"
    );
}

#[actix_web::test]
async fn a_token_is_redeemed_once_across_nodes() {
    let pow = |s: &mut nanochat::config::Settings| {
        s.pow.mode = PowMode::On;
        s.pow.base_bits = 6;
    };
    let a = spawn_app_with(Backend::Postgres, pow).await;
    let b = second_node(&a, pow).await;
    let mut on_a = a.client().await;
    let mut on_b = b.client().await;
    crate::abuse::race_one_token(&mut on_a, &mut on_b).await;
}

#[actix_web::test]
async fn a_node_that_loses_its_database_connections_recovers_and_its_clients_miss_nothing() {
    let a = spawn_app_with(Backend::Postgres, |_| {}).await;
    let b = second_node(&a, |_| {}).await;
    let (mut alice, keys) = a.room_creator().await;
    let mut bob = joined(&b, &keys).await;
    let node_b = format!("{:016x}", b.state.store.cluster().unwrap().node);
    let db = a.db.as_ref().unwrap().name.clone();
    let mut s = RoomSession::new(keys.clone());
    let mut sent = Vec::new();
    for round in 0..3 {
        // Cut every connection of node B: its pool and its listener.
        crate::pg::cluster()
            .admin(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = '{db}' AND application_name LIKE '%{node_b}'"
            ))
            .await;
        for i in 0..5 {
            let text = format!("round {round} message {i}");
            crate::helpers::send_acked(&mut alice, &mut s, "alice", &text).await;
            sent.push(text);
        }
    }
    bob.timeout = Duration::from_secs(20);
    let got = receive_until(&mut bob, &keys, Vec::new(), sent.len()).await;
    let seqs: Vec<i64> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=15).collect::<Vec<_>>());
    assert_eq!(got.into_iter().map(|(_, t)| t).collect::<Vec<_>>(), sent);
    // Node B serves again: a send through it is acknowledged (after at most one refusal while
    // its pool reconnects) and reaches node A.
    let mut answers = HashMap::new();
    for attempt in 0..3 {
        bob.send_sealed("b", &RoomSession::new(keys.clone()).seal("bob", "back"))
            .await
            .unwrap();
        match bob.recv().await {
            Ok(ServerFrame::Ack { seq, .. }) => {
                answers.insert("ack", seq);
                break;
            }
            Ok(ServerFrame::Error { code, .. }) if code == "unavailable" && attempt < 2 => continue,
            Ok(ServerFrame::Error { code, .. }) if code == "replay" => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(answers.contains_key("ack"));
    match alice.recv().await {
        Ok(ServerFrame::Msg(m)) => assert_eq!(m.seq, 16),
        Err(ClientError::Timeout) => panic!("node A never got node B's message"),
        other => panic!("{other:?}"),
    }
    let metrics = b.metrics().await;
    assert!(
        !metrics.contains("nanochat_cluster_notifications_total{event=\"reconnect\"} 0"),
        "{metrics}"
    );
}

#[actix_web::test]
async fn the_server_wide_creation_limit_counts_the_whole_cluster() {
    let limit = |s: &mut nanochat::config::Settings| {
        s.rate.global_creations = nanochat::config::Rate::new(3, 1000);
    };
    let a = spawn_app_with(Backend::Postgres, limit).await;
    let b = second_node(&a, limit).await;
    for app in [&a, &a, &b] {
        let mut c = app.client().await;
        assert!(matches!(
            c.create(&crate::helpers::random_room()).await.unwrap(),
            ServerFrame::Joined { .. }
        ));
    }
    // Node B created one room itself, but the cluster created three this minute.
    let mut c = b.client().await;
    match c.create(&crate::helpers::random_room()).await.unwrap() {
        ServerFrame::Error {
            code,
            retry_after_ms,
            ..
        } => {
            assert_eq!(code, "rate_limited");
            assert!(retry_after_ms.unwrap() > 0);
        }
        other => panic!("{other:?}"),
    }
}
