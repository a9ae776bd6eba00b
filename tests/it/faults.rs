//! Faults with real processes: Postgres crash-stopped in the middle of a stream of sends.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nanochat::client::RoomSession;
use nanochat::protocol::{HistoryQuery, ServerFrame};
use nanochat::store::now_ms;

use crate::helpers::{http_get, start, test_settings};
use crate::pg::PgCluster;

/// Send message `i` and wait for its answer: ("m<i>", "acked" | "refused").
async fn send(
    alice: &mut nanochat::client::Client,
    s: &mut RoomSession,
    i: usize,
) -> (String, &'static str) {
    let text = format!("m{i}");
    alice
        .send_sealed(&text, &s.seal("alice", &text))
        .await
        .unwrap();
    match alice.recv().await.unwrap() {
        ServerFrame::Ack { reference, .. } => (reference, "acked"),
        ServerFrame::Error {
            code, reference, ..
        } => {
            assert_eq!(code, "unavailable", "while Postgres is down");
            (reference.unwrap(), "refused")
        }
        other => panic!("{other:?}"),
    }
}

#[actix_web::test]
async fn postgres_crashing_mid_stream_refuses_sends_and_loses_no_acknowledged_message() {
    let cluster = PgCluster::dedicated();
    let db = cluster.database().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path());
    settings.database.url = Some(db.url.clone());
    settings.database.connect_timeout_secs = 1;
    let app = start(settings, dir, None).await;
    let (mut alice, keys) = app.room_creator().await;
    let mut s = RoomSession::new(keys.clone());
    let mut outcome: HashMap<String, &'static str> = HashMap::new();
    let mut i = 0;
    for _ in 0..10 {
        let (r, o) = send(&mut alice, &mut s, i).await;
        outcome.insert(r, o);
        i += 1;
    }
    cluster.stop_immediate();
    for _ in 0..5 {
        let (r, o) = send(&mut alice, &mut s, i).await;
        assert_eq!(
            o, "refused",
            "nothing is acknowledged while the database is down"
        );
        outcome.insert(r, o);
        i += 1;
    }
    assert_eq!(http_get(app.port, "/readyz").await.status, 503);
    assert_eq!(
        http_get(app.port, "/healthz").await.status,
        200,
        "the server stays up"
    );

    cluster.start_again();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(app.port, "/readyz").await.status != 200 {
        assert!(Instant::now() < deadline, "readiness did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Sending works again (a first attempt may meet a pooled connection that died).
    let mut acked_after = 0;
    for _ in 0..10 {
        let (r, o) = send(&mut alice, &mut s, i).await;
        if o == "acked" {
            acked_after += 1;
        }
        outcome.insert(r, o);
        i += 1;
    }
    assert!(
        acked_after >= 9,
        "{acked_after} of 10 acknowledged after recovery"
    );

    // Every acknowledged message is stored exactly once; refused ones are not.
    let page = app
        .state
        .store
        .messages(&keys.room_id, HistoryQuery::After(0), 200, now_ms())
        .await
        .unwrap();
    let mut reader = RoomSession::new(keys.clone());
    let mut stored: HashMap<String, usize> = HashMap::new();
    for m in &page.messages {
        let wire = nanochat::protocol::WireMsg::from(m);
        *stored.entry(reader.open(&wire).unwrap().text).or_default() += 1;
    }
    for (text, o) in &outcome {
        match *o {
            "acked" => assert_eq!(stored.get(text), Some(&1), "{text}"),
            _ => assert_eq!(stored.get(text), None, "refused {text} was stored"),
        }
    }
}
