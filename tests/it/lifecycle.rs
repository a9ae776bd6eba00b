//! Shutdown: draining turns readiness off and asks clients to reconnect; a shutdown under load
//! loses no acknowledged message, and what was refused was not stored.

use std::collections::HashSet;

use nanochat::client::{ClientError, RoomSession};
use nanochat::protocol::{HistoryQuery, ServerFrame};
use nanochat::store::sqlite::SqliteStore;
use nanochat::store::{Retention, Store, now_ms};

use crate::api::expect_close;
use crate::helpers::{Backend, http_get, spawn_app};

#[actix_web::test]
async fn draining_turns_readiness_off_and_asks_clients_to_reconnect() {
    let app = spawn_app(Backend::Sqlite).await;
    let (mut alice, _keys) = app.room_creator().await;
    assert_eq!(http_get(app.admin_port, "/readyz").await.status, 200);
    app.state.begin_shutdown();
    let r = http_get(app.admin_port, "/readyz").await;
    assert_eq!((r.status, r.body.as_str()), (503, "shutting down\n"));
    expect_close(&mut alice, 1012).await;
    let metrics = app.metrics().await;
    assert!(metrics.contains("nanochat_draining 1"));
}

#[actix_web::test]
async fn shutdown_under_load_loses_no_acknowledged_message() {
    let app = spawn_app(Backend::Sqlite).await;
    let (creator, keys) = app.room_creator().await;
    drop(creator);
    let mut senders = Vec::new();
    for _ in 0..4 {
        let mut c = app.client().await;
        assert!(matches!(
            c.join(&keys, None).await.unwrap(),
            ServerFrame::Joined { .. }
        ));
        let keys = keys.clone();
        senders.push(tokio::spawn(async move {
            let mut s = RoomSession::new(keys);
            let (mut sent, mut acked, mut refused) = (Vec::new(), HashSet::new(), HashSet::new());
            let mut in_flight = 0;
            let close = loop {
                while in_flight < 8 {
                    let sealed = s.seal("load", "x");
                    let reference = sent.len().to_string();
                    if c.send_sealed(&reference, &sealed).await.is_err() {
                        break;
                    }
                    sent.push(sealed.iv.to_vec());
                    in_flight += 1;
                }
                match c.recv().await {
                    Ok(ServerFrame::Ack { reference, .. }) => {
                        acked.insert(sent[reference.parse::<usize>().unwrap()].clone());
                        in_flight -= 1;
                    }
                    Ok(ServerFrame::Error {
                        code, reference, ..
                    }) => {
                        assert_eq!(code, "unavailable");
                        refused.insert(sent[reference.unwrap().parse::<usize>().unwrap()].clone());
                        in_flight -= 1;
                    }
                    Ok(ServerFrame::Msg(_)) => {}
                    Ok(other) => panic!("{other:?}"),
                    Err(ClientError::Closed(close)) => break close,
                    Err(e) => panic!("{e}"),
                }
            };
            (sent, acked, refused, close)
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (settings, dir, _) = app.shutdown().await;

    let store = SqliteStore::open(&settings.server.data_dir, Retention::from_days(30, 365))
        .await
        .unwrap();
    let mut stored = HashSet::new();
    let mut after = 0;
    loop {
        let page = store
            .messages(&keys.room_id, HistoryQuery::After(after), 200, now_ms())
            .await
            .unwrap();
        for m in &page.messages {
            stored.insert(m.iv.clone());
            after = m.seq;
        }
        if !page.more {
            break;
        }
    }
    let mut total_acked = 0;
    let mut all_sent = HashSet::new();
    for task in senders {
        let (sent, acked, refused, close) = task.await.unwrap();
        assert_eq!(
            close.map(|c| c.0),
            Some(1012),
            "clients are told to reconnect"
        );
        all_sent.extend(sent);
        for iv in &acked {
            assert!(stored.contains(iv), "an acknowledged message was lost");
        }
        for iv in &refused {
            assert!(!stored.contains(iv), "a refused message was stored");
        }
        total_acked += acked.len();
    }
    assert!(total_acked > 0);
    assert!(stored.is_subset(&all_sent), "stored only what was sent");
    drop(dir);
}
