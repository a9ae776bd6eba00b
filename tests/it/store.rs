//! One storage conformance suite, run against both backends: creation, ordering, paging,
//! replay, tombstones, retention at read time, idle-room deletion, group commit with
//! concurrent senders, and ack-after-commit. Plus Postgres partition expiry for real.

use std::sync::Arc;

use nanochat::config::DatabaseSettings;
use nanochat::crypto::EPOCH_MS;
use nanochat::hub::Hub;
use nanochat::metrics::Metrics;
use nanochat::protocol::HistoryQuery;
use nanochat::store::postgres::{PgStore, partition_name};
use nanochat::store::sqlite::SqliteStore;
use nanochat::store::writer::Writer;
use nanochat::store::{
    AppendOutcome, CreateOutcome, MaintenanceReport, NewMessage, Retention, Store, now_ms,
};

use crate::pg::cluster;

const RETENTION: Retention = Retention {
    message_ms: 30 * EPOCH_MS,
    tombstone_ms: 365 * EPOCH_MS,
};

struct Fixture {
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

async fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), RETENTION).await.unwrap();
    Fixture {
        store: Arc::new(store),
        _dir: dir,
    }
}

async fn postgres() -> Fixture {
    let (_db, store) = pg_store().await;
    Fixture {
        store: Arc::new(store),
        _dir: tempfile::tempdir().unwrap(),
    }
}

/// A Postgres store on a fresh database, with the database (for direct SQL).
async fn pg_store() -> (crate::pg::TestDb, PgStore) {
    let db = cluster().database().await;
    let store = PgStore::connect(&db.url, &DatabaseSettings::default(), RETENTION)
        .await
        .unwrap();
    (db, store)
}

fn room(n: u8) -> [u8; 16] {
    let mut r = [0u8; 16];
    rand::fill(&mut r);
    r[15] = n;
    r
}

fn msg(room: [u8; 16], tag: u8) -> NewMessage {
    let mut iv = [0u8; 12];
    rand::fill(&mut iv);
    NewMessage {
        room,
        epoch: nanochat::crypto::epoch_of(now_ms()),
        iv,
        ct: vec![tag; 20],
    }
}

fn seqs(outcomes: &[AppendOutcome]) -> Vec<i64> {
    outcomes
        .iter()
        .map(|o| match o {
            AppendOutcome::Stored { seq } => *seq,
            other => panic!("not stored: {other:?}"),
        })
        .collect()
}

async fn create(store: &dyn Store, room: &[u8; 16], now: i64) {
    assert_eq!(
        store.create_room(room, &[1u8; 60], now).await.unwrap(),
        CreateOutcome::Created
    );
}

async fn rooms_are_created_once_and_found(store: &dyn Store) {
    let now = now_ms();
    let r = room(1);
    assert_eq!(store.room(&r, now).await.unwrap(), None);
    create(store, &r, now).await;
    assert_eq!(
        store.create_room(&r, &[2u8; 60], now).await.unwrap(),
        CreateOutcome::Exists
    );
    let rec = store.room(&r, now).await.unwrap().expect("room exists");
    assert_eq!(rec.auth_wrapped, vec![1u8; 60], "the first creation wins");
    assert!(!rec.wiped);
}

async fn messages_get_increasing_seqs_per_room_in_batch_order(store: &dyn Store) {
    let now = now_ms();
    let (a, b) = (room(1), room(2));
    create(store, &a, now).await;
    create(store, &b, now).await;
    let batch = vec![msg(a, 1), msg(b, 1), msg(a, 2), msg(a, 3), msg(b, 2)];
    let out = store.append(&batch, now).await.unwrap();
    assert_eq!(seqs(&out), vec![1, 1, 2, 3, 2]);
    let out = store.append(&[msg(a, 4)], now).await.unwrap();
    assert_eq!(seqs(&out), vec![4]);
    let page = store
        .messages(&a, HistoryQuery::Latest, 100, now)
        .await
        .unwrap();
    let got: Vec<(i64, u8)> = page.messages.iter().map(|m| (m.seq, m.ct[0])).collect();
    assert_eq!(got, vec![(1, 1), (2, 2), (3, 3), (4, 4)]);
    assert!(!page.more);
    assert_eq!(page.messages[0].iv, batch[0].iv.to_vec());
    assert_eq!(page.messages[0].ts, now);
}

async fn paging_before_and_after_reports_more(store: &dyn Store) {
    let now = now_ms();
    let r = room(3);
    create(store, &r, now).await;
    let batch: Vec<_> = (1..=10).map(|i| msg(r, i)).collect();
    store.append(&batch, now).await.unwrap();
    let page = |q, limit| {
        let store = &store;
        async move {
            let p = store.messages(&r, q, limit, now).await.unwrap();
            (p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), p.more)
        }
    };
    assert_eq!(page(HistoryQuery::Latest, 3).await, (vec![8, 9, 10], true));
    assert_eq!(
        page(HistoryQuery::Before(8), 3).await,
        (vec![5, 6, 7], true)
    );
    assert_eq!(
        page(HistoryQuery::Before(4), 3).await,
        (vec![1, 2, 3], false)
    );
    assert_eq!(page(HistoryQuery::Before(2), 3).await, (vec![1], false));
    assert_eq!(page(HistoryQuery::After(7), 2).await, (vec![8, 9], true));
    assert_eq!(page(HistoryQuery::After(8), 2).await, (vec![9, 10], false));
    assert_eq!(page(HistoryQuery::After(10), 2).await, (vec![], false));
    assert!(!page(HistoryQuery::Latest, 10).await.1);
}

async fn a_repeated_iv_is_a_replay_and_takes_no_seq(store: &dyn Store) {
    let now = now_ms();
    let (a, b) = (room(4), room(5));
    create(store, &a, now).await;
    create(store, &b, now).await;
    let first = msg(a, 1);
    assert_eq!(
        seqs(
            &store
                .append(std::slice::from_ref(&first), now)
                .await
                .unwrap()
        ),
        vec![1]
    );
    // Stored before, and twice within one batch.
    let again = store
        .append(&[first.clone(), msg(a, 2)], now)
        .await
        .unwrap();
    assert_eq!(
        again,
        vec![AppendOutcome::Replay, AppendOutcome::Stored { seq: 2 }]
    );
    let dup = msg(a, 3);
    let out = store
        .append(&[dup.clone(), dup.clone()], now)
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![AppendOutcome::Stored { seq: 3 }, AppendOutcome::Replay]
    );
    // The same IV in another room is a different message.
    let mut other = first.clone();
    other.room = b;
    assert_eq!(seqs(&store.append(&[other], now).await.unwrap()), vec![1]);
}

async fn a_wiped_room_is_empty_refuses_writes_and_recreation(store: &dyn Store) {
    let now = now_ms();
    let r = room(6);
    create(store, &r, now).await;
    store.append(&[msg(r, 1), msg(r, 2)], now).await.unwrap();
    assert!(store.wipe(&r, now).await.unwrap());
    assert!(
        !store.wipe(&r, now).await.unwrap(),
        "a tombstone is not wiped twice"
    );
    let rec = store.room(&r, now).await.unwrap().expect("tombstone");
    assert!(rec.wiped);
    let page = store
        .messages(&r, HistoryQuery::Latest, 10, now)
        .await
        .unwrap();
    assert!(page.messages.is_empty());
    assert_eq!(
        store.append(&[msg(r, 3)], now).await.unwrap(),
        vec![AppendOutcome::RoomGone]
    );
    assert_eq!(
        store
            .create_room(&r, &[1; 60], now + 300 * EPOCH_MS)
            .await
            .unwrap(),
        CreateOutcome::Gone
    );
    // After the tombstone period the id is free again.
    let later = now + 366 * EPOCH_MS;
    assert_eq!(store.room(&r, later).await.unwrap(), None);
    assert_eq!(
        store.create_room(&r, &[1; 60], later).await.unwrap(),
        CreateOutcome::Created
    );
    // Its seqs continue after those of the wiped messages, never repeat.
    assert_eq!(
        seqs(&store.append(&[msg(r, 4)], later).await.unwrap()),
        vec![3]
    );
    // An unknown room takes no messages.
    assert_eq!(
        store.append(&[msg(room(7), 1)], now).await.unwrap(),
        vec![AppendOutcome::RoomGone]
    );
}

async fn messages_past_retention_are_never_returned(store: &dyn Store) {
    let t0 = now_ms() - 31 * EPOCH_MS;
    let r = room(8);
    create(store, &r, t0).await;
    store.append(&[msg(r, 1)], t0).await.unwrap();
    let t1 = t0 + 2 * EPOCH_MS;
    store.append(&[msg(r, 2)], t1).await.unwrap();
    // Before any maintenance ran: the first message is 31 days old, the second 29.
    let now = t0 + 31 * EPOCH_MS;
    let page = store
        .messages(&r, HistoryQuery::Latest, 10, now)
        .await
        .unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![2]
    );
    let page = store
        .messages(&r, HistoryQuery::After(0), 10, now)
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 1);
    let page = store
        .messages(&r, HistoryQuery::Before(2), 10, now)
        .await
        .unwrap();
    assert!(page.messages.is_empty());
}

async fn idle_rooms_and_old_tombstones_are_deleted_by_maintenance(store: &dyn Store) {
    let t0 = now_ms() - 40 * EPOCH_MS;
    let (idle, busy, wiped) = (room(9), room(10), room(11));
    create(store, &idle, t0).await;
    create(store, &busy, t0).await;
    create(store, &wiped, t0).await;
    store.wipe(&wiped, t0).await.unwrap();
    store
        .append(&[msg(busy, 1)], t0 + 20 * EPOCH_MS)
        .await
        .unwrap();
    let now = t0 + 31 * EPOCH_MS;
    // Expired rooms already count as absent before maintenance.
    assert_eq!(store.room(&idle, now).await.unwrap(), None);
    let report = store.maintain(now).await.unwrap();
    assert!(report.ran);
    assert!(report.rooms_deleted >= 1, "{report:?}");
    assert_eq!(store.room(&idle, now).await.unwrap(), None);
    assert!(store.room(&busy, now).await.unwrap().is_some());
    assert!(store.room(&wiped, now).await.unwrap().unwrap().wiped);
    // An expired room id can be created again; its seqs continue, never repeat.
    assert_eq!(
        store.create_room(&idle, &[1; 60], now).await.unwrap(),
        CreateOutcome::Created
    );
    let later = t0 + 366 * EPOCH_MS;
    let report = store.maintain(later).await.unwrap();
    assert!(report.tombstones_deleted >= 1, "{report:?}");
    assert_eq!(store.room(&wiped, later).await.unwrap(), None);
}

async fn a_room_taken_over_after_idling_continues_its_seqs(store: &dyn Store) {
    let t0 = now_ms() - 40 * EPOCH_MS;
    let r = room(12);
    create(store, &r, t0).await;
    let out = store
        .append(&[msg(r, 1), msg(r, 2), msg(r, 3)], t0)
        .await
        .unwrap();
    assert_eq!(seqs(&out), vec![1, 2, 3]);
    // Idle past the retention and not yet deleted by maintenance: a creation takes its place.
    let now = t0 + 31 * EPOCH_MS;
    assert_eq!(store.room(&r, now).await.unwrap(), None);
    assert_eq!(
        store.create_room(&r, &[3; 60], now).await.unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(
        store.room(&r, now).await.unwrap().unwrap().auth_wrapped,
        vec![3; 60]
    );
    assert_eq!(
        seqs(&store.append(&[msg(r, 4)], now).await.unwrap()),
        vec![4]
    );
    // A room active within the retention is not taken over.
    let busy = room(13);
    create(store, &busy, t0).await;
    store.append(&[msg(busy, 1)], now - EPOCH_MS).await.unwrap();
    assert_eq!(
        store.create_room(&busy, &[3; 60], now).await.unwrap(),
        CreateOutcome::Exists
    );
}

async fn spent_tokens_are_refused(store: &dyn Store) {
    let now = now_ms();
    let nonce = [7u8; 16];
    assert!(store.redeem_token(&nonce, now + 60_000, now).await.unwrap());
    assert!(!store.redeem_token(&nonce, now + 60_000, now).await.unwrap());
    assert!(
        store
            .redeem_token(&[8u8; 16], now + 60_000, now)
            .await
            .unwrap()
    );
}

async fn concurrent_senders_are_group_committed_and_acked_after_commit(
    store: Arc<dyn Store>,
    shards: usize,
) {
    let now = now_ms();
    // Several rooms, so that with several writer shards each shard has work.
    let rooms: Vec<[u8; 16]> = (0..4).map(|n| room(12 + n)).collect();
    for r in &rooms {
        create(&*store, r, now).await;
    }
    let r = rooms[0];
    let metrics = Arc::new(Metrics::new());
    let hub = Arc::new(Hub::new(1024, 1 << 20, metrics.clone()));
    let (writer, _tasks) = Writer::spawn(store.clone(), hub, metrics.clone(), 1024, 64, shards);
    // Traffic in the other rooms at the same time: per-room order must hold regardless.
    let mut others = Vec::new();
    for (n, other) in rooms[1..].iter().copied().enumerate() {
        let writer = writer.clone();
        others.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..40u8 {
                let rx = writer
                    .submit(msg(other, i), 100 + n as u64, std::time::Instant::now())
                    .await;
                seqs.push(rx.await.unwrap().expect("stored").seq);
            }
            seqs
        }));
    }
    let mut tasks = Vec::new();
    for sender in 0..8u64 {
        let writer = writer.clone();
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..40u8 {
                let rx = writer
                    .submit(msg(r, i), sender, std::time::Instant::now())
                    .await;
                let committed = rx.await.unwrap().expect("stored");
                // Ack after commit: once acked, any reader sees it.
                let page = store
                    .messages(&r, HistoryQuery::After(committed.seq - 1), 1, now_ms())
                    .await
                    .unwrap();
                assert_eq!(page.messages[0].seq, committed.seq);
                mine.push(committed.seq);
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let mine = t.await.unwrap();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "per-sender order kept"
        );
        all.extend(mine);
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=320).collect::<Vec<i64>>(),
        "every seq once, no gaps"
    );
    let page = store
        .messages(&r, HistoryQuery::After(0), 200, now_ms())
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 200);
    assert!(page.more);
    for other in others {
        assert_eq!(other.await.unwrap(), (1..=40).collect::<Vec<i64>>());
    }
    assert_eq!(metrics.messages_stored_total.get(), 320 + 3 * 40);
    // Eight senders with one message in flight each: batches of more than one formed.
    assert!(
        metrics.store_batch_size.get_sample_count() < 320 + 3 * 40,
        "expected group commits, got {} batches",
        metrics.store_batch_size.get_sample_count()
    );
}

/// Batches back to back (on SQLite a task of their own answers and fans out each batch while
/// the next one commits; on Postgres the writer does so between batches). A watcher of each room still gets every message once and in seq order, each ack
/// names the seq the watcher saw for that message, and a message sent alone afterwards is
/// answered without another batch behind it.
async fn back_to_back_batches_are_fanned_out_in_order(store: Arc<dyn Store>) {
    let now = now_ms();
    let rooms: Vec<[u8; 16]> = (0..3).map(|n| room(40 + n)).collect();
    for r in &rooms {
        create(&*store, r, now).await;
    }
    let metrics = Arc::new(Metrics::new());
    let hub = Arc::new(Hub::new(4096, 16 << 20, metrics.clone()));
    let mut watchers: Vec<_> = rooms.iter().map(|r| hub.subscribe(r, 1_000)).collect();
    // Small batches and many messages in flight: dozens of batches, each one queued behind
    // the one committing.
    let (writer, _tasks) = Writer::spawn(store.clone(), hub, metrics.clone(), 4096, 16, 1);
    let mut acks = Vec::new();
    for i in 0..600usize {
        let rx = writer
            .submit(
                msg(rooms[i % 3], (i % 250) as u8),
                (i % 7) as u64,
                std::time::Instant::now(),
            )
            .await;
        acks.push((i % 3, rx));
    }
    let mut acked: Vec<Vec<i64>> = vec![Vec::new(); 3];
    for (r, rx) in acks {
        let answer = tokio::time::timeout(std::time::Duration::from_secs(30), rx)
            .await
            .expect("every message is answered");
        acked[r].push(answer.unwrap().expect("stored").seq);
    }
    assert!(
        metrics.store_batch_size.get_sample_count() >= 20,
        "expected many small batches, got {}",
        metrics.store_batch_size.get_sample_count()
    );
    for (r, w) in watchers.iter_mut().enumerate() {
        let mut seen = Vec::new();
        while let Ok(out) = w.rx.try_recv() {
            seen.push(out.seq);
        }
        assert_eq!(
            seen,
            (1..=200).collect::<Vec<i64>>(),
            "room {r}: in order, once"
        );
        let mut sorted = acked[r].clone();
        sorted.sort_unstable();
        assert_eq!(sorted, seen, "room {r}: acks name the delivered seqs");
    }
    // Alone on a quiet writer: answered and delivered without waiting for company.
    let rx = writer
        .submit(msg(rooms[0], 1), 3, std::time::Instant::now())
        .await;
    let lone = tokio::time::timeout(std::time::Duration::from_secs(10), rx)
        .await
        .expect("a lone message is answered without a next batch")
        .unwrap()
        .expect("stored");
    assert_eq!(lone.seq, 201);
    let out = tokio::time::timeout(std::time::Duration::from_secs(10), watchers[0].rx.recv())
        .await
        .expect("and fanned out")
        .expect("subscribed");
    assert_eq!(out.seq, 201);
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    let f = super::sqlite().await;
                    super::$name(&*f.store).await;
                }
            )*
        }
        mod postgres_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    let f = super::postgres().await;
                    super::$name(&*f.store).await;
                }
            )*
        }
    };
}

/// What the cluster listener reads for an announcement: exactly the given ranges, in the
/// given room order, each in seq order.
async fn announced_ranges_are_read_exactly(store: &dyn Store) {
    let (a, b) = (room(31), room(32));
    let now = now_ms();
    create(store, &a, now).await;
    create(store, &b, now).await;
    for r in [a, b] {
        let batch: Vec<_> = (0..5).map(|i| msg(r, i)).collect();
        assert_eq!(
            seqs(&store.append(&batch, now).await.unwrap()),
            vec![1, 2, 3, 4, 5]
        );
    }
    let found = store
        .messages_in_ranges(&[(b, 2, 4), (a, 1, 1), (a, 4, 9)], now)
        .await
        .unwrap();
    let got: Vec<(u8, i64, u8)> = found.iter().map(|(r, m)| (r[15], m.seq, m.ct[0])).collect();
    assert_eq!(
        got,
        vec![
            (32, 2, 1),
            (32, 3, 2),
            (32, 4, 3),
            (31, 1, 0),
            (31, 4, 3),
            (31, 5, 4)
        ]
    );
    assert!(store.messages_in_ranges(&[], now).await.unwrap().is_empty());
}

/// What the cluster listener reads to catch up after it reconnected, for many rooms at once:
/// up to a page of each room's messages after a seq (none past the retention), in the room
/// order given; and which rooms were wiped (not those whose tombstones expired).
async fn rooms_are_caught_up_together(store: &dyn Store) {
    let now = now_ms();
    let (a, b, old, unknown) = (room(33), room(34), room(35), room(36));
    let (wiped, wiped_long_ago) = (room(37), room(38));
    let days_31 = 31 * EPOCH_MS;
    let year_ago = now - 366 * EPOCH_MS;
    for (r, at) in [
        (a, now),
        (b, now),
        (wiped, now),
        (old, now - days_31),
        (wiped_long_ago, year_ago),
    ] {
        create(store, &r, at).await;
    }
    for r in [a, b] {
        let batch: Vec<_> = (0..5).map(|i| msg(r, i)).collect();
        store.append(&batch, now).await.unwrap();
    }
    store.append(&[msg(old, 0)], now - days_31).await.unwrap();
    store.append(&[msg(old, 1)], now).await.unwrap();
    assert!(store.wipe(&wiped, now).await.unwrap());
    assert!(store.wipe(&wiped_long_ago, year_ago + 1).await.unwrap());

    let got = |found: Vec<([u8; 16], nanochat::store::StoredMessage)>| -> Vec<(u8, i64, u8)> {
        found.iter().map(|(r, m)| (r[15], m.seq, m.ct[0])).collect()
    };
    let found = store
        .messages_after(
            &[(b, 2), (unknown, 0), (a, 0), (wiped, 0), (old, 0)],
            2,
            now,
        )
        .await
        .unwrap();
    assert_eq!(
        got(found),
        vec![(34, 3, 2), (34, 4, 3), (33, 1, 0), (33, 2, 1), (35, 2, 1)],
        "a page of each room, in the order asked; nothing expired"
    );
    let found = store
        .messages_after(&[(a, 4), (b, 5)], 200, now)
        .await
        .unwrap();
    assert_eq!(got(found), vec![(33, 5, 4)]);
    assert!(
        store
            .messages_after(&[], 200, now)
            .await
            .unwrap()
            .is_empty()
    );

    let gone = store
        .wiped_rooms(&[a, wiped_long_ago, unknown, wiped, old], now)
        .await
        .unwrap();
    assert_eq!(gone, vec![wiped]);
    assert!(store.wiped_rooms(&[], now).await.unwrap().is_empty());
}

/// A message can be replayed for as long as its epoch passes the server's check (within a
/// day of the server's): the lookup must reach back to the earliest day a copy with that
/// epoch could have been stored, and no further is needed.
async fn replays_are_found_as_far_back_as_their_epoch_allows(store: &dyn Store) {
    let now = now_ms();
    let today = now.div_euclid(EPOCH_MS);
    let r = room(6);
    create(store, &r, (today - 2) * EPOCH_MS).await;
    // Yesterday's epoch, stored first thing the day before yesterday (its server was a day
    // behind the sender); today's epoch, stored yesterday.
    let mut early = msg(r, 1);
    early.epoch = (today - 1) as u32;
    let mut ahead = msg(r, 2);
    ahead.epoch = today as u32;
    for (m, day) in [(&early, today - 2), (&ahead, today - 1)] {
        let stored = store
            .append(std::slice::from_ref(m), day * EPOCH_MS + 1000)
            .await
            .unwrap();
        assert_eq!(seqs(&stored), vec![(day - today + 3)]);
    }
    let again = store
        .append(&[early.clone(), ahead.clone(), msg(r, 3)], now)
        .await
        .unwrap();
    assert_eq!(
        again,
        vec![
            AppendOutcome::Replay,
            AppendOutcome::Replay,
            AppendOutcome::Stored { seq: 3 }
        ]
    );
}

conformance!(
    rooms_are_created_once_and_found,
    replays_are_found_as_far_back_as_their_epoch_allows,
    messages_get_increasing_seqs_per_room_in_batch_order,
    paging_before_and_after_reports_more,
    a_repeated_iv_is_a_replay_and_takes_no_seq,
    a_wiped_room_is_empty_refuses_writes_and_recreation,
    messages_past_retention_are_never_returned,
    idle_rooms_and_old_tombstones_are_deleted_by_maintenance,
    a_room_taken_over_after_idling_continues_its_seqs,
    spent_tokens_are_refused,
    announced_ranges_are_read_exactly,
    rooms_are_caught_up_together,
);

/// A room's `last_seq` and `last_active` as its SQLite row holds them.
fn sqlite_room_row(dir: &std::path::Path, r: &[u8; 16]) -> (i64, i64) {
    rusqlite::Connection::open(dir.join("nanochat.db"))
        .unwrap()
        .query_row(
            "SELECT last_seq, last_active FROM rooms WHERE id = ?1",
            [&r[..]],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap()
}

/// How many times `marker` occurs in the SQLite database file and its WAL, as on the disk.
fn sqlite_copies_of(dir: &std::path::Path, marker: &[u8]) -> usize {
    ["nanochat.db", "nanochat.db-wal"]
        .iter()
        .filter_map(|name| std::fs::read(dir.join(name)).ok())
        .map(|bytes| bytes.windows(marker.len()).filter(|w| *w == marker).count())
        .sum()
}

/// Messages whose ciphertexts are `marker` again and again.
fn marked(room: [u8; 16], marker: &[u8], count: usize) -> Vec<NewMessage> {
    (0..count)
        .map(|_| NewMessage {
            ct: marker.repeat(16),
            ..msg(room, 0)
        })
        .collect()
}

/// Someone who gets a wiped room's link and, later, the server's disk finds nothing of the
/// room: what the wipe deleted is overwritten in the database file (`secure_delete`), and the
/// write-ahead log, whose frames held the pages as they were, is emptied after the wipe.
#[tokio::test]
async fn a_wiped_rooms_ciphertexts_are_left_nowhere_in_the_sqlite_files() {
    let f = sqlite().await;
    let store = &*f.store;
    let dir = f._dir.path();
    let now = now_ms();
    let (gone, kept) = (room(60), room(61));
    create(store, &gone, now).await;
    create(store, &kept, now).await;
    let (wiped_marker, kept_marker) = (b"~wiped-room-ct~~", b"~kept-room-ct~~~");
    // Enough that whole pages of them are freed by the wipe, not only cells in shared pages.
    for _ in 0..4 {
        let mut batch = marked(gone, wiped_marker, 50);
        batch.extend(marked(kept, kept_marker, 50));
        store.append(&batch, now).await.unwrap();
    }
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    wait_for(
        "the checkpointer copies the messages into the database file",
        &|| {
            std::fs::read(dir.join("nanochat.db"))
                .is_ok_and(|b| b.windows(16).any(|w| w == wiped_marker))
        },
    );
    assert!(store.wipe(&gone, now).await.unwrap());
    wait_for("no copy of the wiped room's ciphertexts is left", &|| {
        sqlite_copies_of(dir, wiped_marker) == 0
    });
    // The scan sees what is there: the other room's messages are all still in the files.
    assert!(sqlite_copies_of(dir, kept_marker) >= 200 * 16);

    // A long read (as `nanochat backup`'s) keeps the log from being emptied while it lasts;
    // once it ends, the log is emptied, and writes went on meanwhile.
    let again = room(62);
    create(store, &again, now).await;
    store
        .append(&marked(again, wiped_marker, 200), now)
        .await
        .unwrap();
    let reader = rusqlite::Connection::open(dir.join("nanochat.db")).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    assert!(store.wipe(&again, now).await.unwrap());
    store
        .append(&marked(kept, kept_marker, 10), now)
        .await
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        sqlite_copies_of(dir, wiped_marker) > 0,
        "the read's state is still in the log"
    );
    reader.execute_batch("COMMIT").unwrap();
    wait_for("the log is emptied once the read is over", &|| {
        sqlite_copies_of(dir, wiped_marker) == 0
    });
    let page = store
        .messages(&kept, HistoryQuery::Latest, 200, now)
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 200);
}

/// The SQLite writer keeps busy rooms' seqs in memory: a room's row is rewritten when it is a
/// minute behind (not for every batch), and maintenance brings every row up to date.
#[tokio::test]
async fn sqlite_room_rows_are_written_a_minute_behind_and_at_maintenance() {
    let f = sqlite().await;
    let store = &*f.store;
    let t0 = now_ms();
    let r = room(40);
    create(store, &r, t0).await;
    for i in 1..=50 {
        let out = store.append(&[msg(r, i)], t0 + i64::from(i)).await.unwrap();
        assert_eq!(seqs(&out), vec![i64::from(i)]);
    }
    assert_eq!(
        sqlite_room_row(f._dir.path(), &r),
        (0, t0),
        "50 batches within a minute rewrote the row"
    );
    let t1 = t0 + 60_000;
    assert_eq!(
        seqs(&store.append(&[msg(r, 51)], t1).await.unwrap()),
        vec![51]
    );
    assert_eq!(sqlite_room_row(f._dir.path(), &r), (51, t1));
    let t2 = t1 + 5_000;
    store.append(&[msg(r, 52), msg(r, 53)], t2).await.unwrap();
    assert_eq!(sqlite_room_row(f._dir.path(), &r), (51, t1));
    store.maintain(t2).await.unwrap();
    assert_eq!(sqlite_room_row(f._dir.path(), &r), (53, t2));
    // Forgotten by maintenance, the room is read back from its row.
    assert_eq!(
        seqs(&store.append(&[msg(r, 54)], t2).await.unwrap()),
        vec![54]
    );
}

/// A crash can leave a SQLite room row behind its messages: the next start continues after
/// the greatest stored seq, and maintenance keeps such a room until its messages expire.
#[tokio::test]
async fn a_sqlite_room_row_behind_its_messages_repeats_no_seq() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = now_ms() - 40 * EPOCH_MS;
    let (r, quiet) = (room(41), room(42));
    {
        let store = SqliteStore::open(dir.path(), RETENTION).await.unwrap();
        create(&store, &r, t0).await;
        create(&store, &quiet, t0).await;
        store.append(&[msg(r, 1), msg(r, 2)], t0).await.unwrap();
        store
            .append(&[msg(r, 3)], t0 + 20 * EPOCH_MS)
            .await
            .unwrap();
        store.append(&[msg(quiet, 1)], t0).await.unwrap();
    }
    // What a crash leaves: rows as they were at creation.
    rusqlite::Connection::open(dir.path().join("nanochat.db"))
        .unwrap()
        .execute("UPDATE rooms SET last_seq = 0, last_active = ?1", [t0])
        .unwrap();
    let store = SqliteStore::open(dir.path(), RETENTION).await.unwrap();
    let now = t0 + 31 * EPOCH_MS;
    let report = store.maintain(now).await.unwrap();
    assert_eq!(
        report.rooms_deleted, 1,
        "only the quiet room goes: {report:?}"
    );
    assert_eq!(
        store.room(&quiet, now).await.unwrap(),
        None,
        "the quiet room was deleted"
    );
    // Its row says idle, so a creation may take its place; the stored message 3 still counts.
    assert_eq!(
        store.create_room(&r, &[1; 60], now).await.unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(
        seqs(&store.append(&[msg(r, 4)], now).await.unwrap()),
        vec![4]
    );
}

#[tokio::test]
async fn sqlite_group_commits_concurrent_senders() {
    let f = sqlite().await;
    concurrent_senders_are_group_committed_and_acked_after_commit(f.store.clone(), 1).await;
}

#[tokio::test]
async fn postgres_group_commits_concurrent_senders() {
    let f = postgres().await;
    concurrent_senders_are_group_committed_and_acked_after_commit(f.store.clone(), 1).await;
}

#[tokio::test]
async fn sqlite_writer_fans_out_back_to_back_batches_in_order() {
    let f = sqlite().await;
    back_to_back_batches_are_fanned_out_in_order(f.store.clone()).await;
}

#[tokio::test]
async fn postgres_writer_fans_out_back_to_back_batches_in_order() {
    let f = postgres().await;
    back_to_back_batches_are_fanned_out_in_order(f.store.clone()).await;
}

/// Four writer shards committing in parallel: every room's seqs still come in order, once
/// each, acked only after commit.
#[tokio::test]
async fn postgres_writer_shards_keep_each_rooms_order() {
    let f = postgres().await;
    concurrent_senders_are_group_committed_and_acked_after_commit(f.store.clone(), 4).await;
}

/// The writer drives its Postgres transaction by hand (to pipeline it). An append dropped
/// half way must not hand its connection back to the pool inside that transaction, where the
/// next batch would run in it and the room lock would be held meanwhile.
#[tokio::test]
async fn a_cancelled_postgres_append_leaves_no_transaction_open() {
    let (db, store) = pg_store().await;
    let mut blocker = cluster().connect(&db).await;
    let r = room(20);
    create(&store, &r, now_ms()).await;
    let tx = blocker.transaction().await.unwrap();
    tx.execute("SELECT 1 FROM rooms WHERE id = $1 FOR UPDATE", &[&&r[..]])
        .await
        .unwrap();
    // The append begins its transaction and waits for the room lock: give up on it.
    let waited = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        store.append(&[msg(r, 1)], now_ms()),
    )
    .await;
    assert!(waited.is_err(), "the append should be waiting for the lock");
    tx.rollback().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let open: i64 = blocker
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if open == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{open} connection(s) left idle inside the cancelled transaction"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Nothing of the cancelled batch was stored, and the store goes on.
    let out = store.append(&[msg(r, 2)], now_ms()).await.unwrap();
    assert_eq!(seqs(&out), vec![1]);
}

/// Every batch updates its rooms' rows. Those updates must stay in place (HOT: no new index
/// entries), or a busy room's row leaves thousands of dead versions that every room lookup
/// and lock then steps over: measured as the largest cost in Postgres during a publish run.
#[tokio::test]
async fn busy_postgres_rooms_are_updated_in_place() {
    let (db, store) = pg_store().await;
    let r = room(21);
    create(&store, &r, now_ms()).await;
    let batches = 200;
    for _ in 0..batches {
        let out = store.append(&[msg(r, 1)], now_ms()).await.unwrap();
        assert_eq!(seqs(&out).len(), 1);
    }
    // Backends report their statistics when idle, within about ten seconds.
    let observer = cluster().connect(&db).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (updated, hot) = loop {
        let row = observer
            .query_one(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'rooms'",
                &[],
            )
            .await
            .unwrap();
        let (updated, hot): (i64, i64) = (row.get(0), row.get(1));
        if updated >= batches {
            break (updated, hot);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "statistics never showed the updates ({updated})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(
        hot * 10 >= updated * 9,
        "only {hot} of {updated} room updates were in place"
    );
}

/// Postgres' plan for a statement, as text.
async fn explain(client: &tokio_postgres::Client, statement: &str) -> String {
    client
        .query(&format!("EXPLAIN {statement}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0) + "\n")
        .collect()
}

/// Plan nodes whose cost grows with the table rather than with the rows wanted.
const SCANS_AND_JOINS: [&str; 3] = ["Seq Scan on", "Hash Join", "Merge Join"];

/// A plan that stays index lookups: none of `bad` in it, and an index used.
fn assert_index_lookups(plan: &str, what: &str, bad: &[&str]) {
    for node in bad {
        assert!(!plan.contains(node), "{what}: {node} in\n{plan}");
    }
    assert!(plan.contains("Index"), "{what}: no index use in\n{plan}");
}

/// The writer's statements are planned once per connection, often while the tables are still
/// empty (a fresh database; every midnight's new partition). Those plans must still be index
/// lookups, which stay cheap as the tables grow: no sequential scan, no hash or merge join.
#[tokio::test]
async fn the_postgres_writer_plans_stay_index_lookups_from_an_empty_start() {
    use nanochat::store::postgres::{
        FIND_DIGESTS, FIND_REPLAYS, LOCK_ROOMS, WRITE_BATCH, WRITER_BEGIN,
    };
    let (db, store) = pg_store().await;
    // Partitions back to four days ago, for the replay lookup's pruning below.
    store
        .ensure_partitions(now_ms() - 3 * EPOCH_MS)
        .await
        .unwrap();
    let client = cluster().connect(&db).await;
    client.batch_execute(WRITER_BEGIN).await.unwrap();
    let at = "now()";
    for (name, sql, args) in [
        ("lock", LOCK_ROOMS, "'{}'::bytea[]".to_owned()),
        (
            "replays",
            FIND_REPLAYS,
            format!("'{{}}'::bytea[], '{{}}'::bytea[], {at} - interval '1 day', {at}, {at}, {at}"),
        ),
        (
            "digests",
            FIND_DIGESTS,
            format!(
                "'{{}}'::bytea[], '{{}}'::bytea[], {at} - interval '1 day', {at}, {at}, {at}, \
                 '{{}}'::int8[]"
            ),
        ),
        (
            "write",
            WRITE_BATCH,
            format!(
                "'{{}}', '{{}}', {at}, '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', 'nanochat', '{{}}', \
                 '{{}}', '{{}}'"
            ),
        ),
    ] {
        client
            .batch_execute(&format!("PREPARE {name} AS {sql}"))
            .await
            .unwrap();
        let plan = explain(&client, &format!("EXECUTE {name}({args})")).await;
        let bad = [SCANS_AND_JOINS.as_slice(), &["Bitmap Heap Scan"]].concat();
        assert_index_lookups(&plan, name, &bad);
    }
    // The replay lookup reaches only the partitions of its window, chosen as it starts: for
    // a batch of today's epoch, yesterday's and today's, not the older ones nor those made
    // ahead; and only yesterday's when today's is left to its unique key. The partitions the
    // store made probe their digests' unique index.
    let probed = |after_from: &str| {
        let client = &client;
        let sql = format!(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) EXECUTE digests(
                ARRAY['\\x00112233445566778899aabbccddeeff'::bytea],
                ARRAY['\\x00112233445566778899aabb'::bytea],
                date_trunc('day', now(), 'UTC') - interval '1 day',
                date_trunc('day', now(), 'UTC'),
                {after_from},
                now() + interval '1 minute',
                ARRAY[1::int8])"
        );
        async move {
            let run = client
                .query(&sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0) + "\n")
                .collect::<String>();
            assert!(run.contains("Subplans Removed"), "{run}");
            run
        }
    };
    let day = |back: i64| {
        format!(
            " on {} ",
            partition_name(now_ms().div_euclid(EPOCH_MS) - back)
        )
    };
    let whole = probed("date_trunc('day', now(), 'UTC')").await;
    for back in [0, 1] {
        let line = whole
            .lines()
            .find(|l| l.contains(&day(back)))
            .unwrap_or_else(|| panic!("no {} in\n{whole}", day(back)));
        assert!(line.contains("loops=1"), "{}\n{whole}", day(back));
        assert!(line.contains("_rk "), "{}\n{whole}", day(back));
    }
    for back in [2, 3, 4] {
        assert!(!whole.contains(&day(back)), "{}\n{whole}", day(back));
    }
    let skipping = probed("date_trunc('day', now(), 'UTC') + interval '1 day'").await;
    assert!(skipping.contains(&day(1)), "{skipping}");
    for back in [0, 2, 3, 4] {
        assert!(!skipping.contains(&day(back)), "{}\n{skipping}", day(back));
    }
}

/// Another node's announced ranges are read with one index range scan each, however many
/// ranges one read holds and however full the day's partition: a join planned over the whole
/// partition would make every cross-node delivery dearer with each message stored that day.
#[tokio::test]
async fn cross_node_reads_stay_index_lookups_on_a_full_day() {
    use nanochat::store::postgres::{READ_AFTER, READ_RANGES};
    let (db, store) = pg_store().await;
    let client = cluster().connect(&db).await;
    // 200 000 of today's messages: 2 000 in each of 100 rooms.
    client
        .batch_execute(
            "INSERT INTO messages (room_id, seq, created_at, epoch, iv, ct)
             SELECT decode(lpad(to_hex(r), 32, '0'), 'hex'), s, now(), 0, int8send(s), '\\x00'
             FROM generate_series(1, 100) AS r, generate_series(1, 2000) AS s;
             ANALYZE messages",
        )
        .await
        .unwrap();
    let rooms: Vec<[u8; 16]> = (1..=100u128).map(|r| r.to_be_bytes()).collect();
    // Ten messages of every room, as one busy node's notifications announce them.
    let ranges: Vec<([u8; 16], i64, i64)> = rooms.iter().map(|r| (*r, 1001, 1010)).collect();
    let found = store.messages_in_ranges(&ranges, now_ms()).await.unwrap();
    assert_eq!(found.len(), 1000);
    let expected: Vec<([u8; 16], i64)> = rooms
        .iter()
        .flat_map(|r| (1001..=1010).map(move |s| (*r, s)))
        .collect();
    let got: Vec<([u8; 16], i64)> = found.iter().map(|(r, m)| (*r, m.seq)).collect();
    assert_eq!(got, expected, "announcement order, then seq order");

    client
        .batch_execute(&format!("PREPARE ranges AS {READ_RANGES}"))
        .await
        .unwrap();
    for count in [3, 30, 100] {
        let args = |f: &dyn Fn(usize) -> String| (0..count).map(f).collect::<Vec<_>>().join(",");
        let plan = explain(
            &client,
            &format!(
                "EXECUTE ranges(ARRAY[{}]::bytea[], ARRAY[{}]::int8[], ARRAY[{}]::int8[], \
                 now() - interval '1 day', now() + interval '1 day')",
                args(&|i| format!("'\\x{:032x}'", i + 1)),
                args(&|_| "1001".to_owned()),
                args(&|_| "1010".to_owned()),
            ),
        )
        .await;
        assert_index_lookups(&plan, &format!("{count} ranges"), &SCANS_AND_JOINS);
    }

    // A listener's catch-up: the last ten messages of every room, in one statement.
    let after: Vec<([u8; 16], i64)> = rooms.iter().map(|r| (*r, 1990)).collect();
    let found = store.messages_after(&after, 200, now_ms()).await.unwrap();
    let got: Vec<([u8; 16], i64)> = found.iter().map(|(r, m)| (*r, m.seq)).collect();
    let expected: Vec<([u8; 16], i64)> = rooms
        .iter()
        .flat_map(|r| (1991..=2000).map(move |s| (*r, s)))
        .collect();
    assert_eq!(got, expected, "room order, then seq order");
    client
        .batch_execute(&format!("PREPARE after AS {READ_AFTER}"))
        .await
        .unwrap();
    for count in [3, 100] {
        let args = |f: &dyn Fn(usize) -> String| (0..count).map(f).collect::<Vec<_>>().join(",");
        let plan = explain(
            &client,
            &format!(
                "EXECUTE after(ARRAY[{}]::bytea[], ARRAY[{}]::int8[], now() - interval '30 days', 200)",
                args(&|i| format!("'\\x{:032x}'", i + 1)),
                args(&|_| "1990".to_owned()),
            ),
        )
        .await;
        assert_index_lookups(&plan, &format!("catch-up of {count}"), &SCANS_AND_JOINS);
    }
}

/// A message of today's epoch is looked for in yesterday's partition only in a room that
/// stored a message sent early yesterday: with yesterday's partition locked (as by a long
/// `ALTER`), a room without that mark stores at once; one with it waits for the lock, then
/// finds its repeat.
#[tokio::test]
async fn postgres_replay_lookups_read_yesterday_only_for_rooms_marked_early() {
    let (db, store) = pg_store().await;
    let now = now_ms();
    let today = now.div_euclid(EPOCH_MS);
    let yesterday = (today - 1) * EPOCH_MS + 1000;
    let (plain, marked) = (room(40), room(41));
    let mut ahead = msg(marked, 1);
    ahead.epoch = today as u32;
    for (r, m) in [(plain, msg(plain, 1)), (marked, ahead.clone())] {
        let mut m = m;
        create(&store, &r, yesterday).await;
        if r == plain {
            m.epoch = (today - 1) as u32;
        }
        store.append(&[m], yesterday).await.unwrap();
    }

    let holder = cluster().connect(&db).await;
    holder
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
            partition_name(today - 1)
        ))
        .await
        .unwrap();
    let stored = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        store.append(&[msg(plain, 2)], now),
    )
    .await
    .expect("an unmarked room looked into yesterday")
    .unwrap();
    assert_eq!(stored, vec![AppendOutcome::Stored { seq: 2 }]);

    let repeat = tokio::spawn({
        let (store, ahead) = (store.clone(), ahead.clone());
        async move { store.append(&[ahead, msg(marked, 2)], now).await }
    });
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(
        !repeat.is_finished(),
        "the marked room did not look into yesterday"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    let outcomes = repeat.await.unwrap().unwrap();
    assert_eq!(
        outcomes,
        vec![AppendOutcome::Replay, AppendOutcome::Stored { seq: 2 }]
    );
}

/// The marks live in the database, not in a process: a message sent early and stored by one
/// server process is found by another when it is repeated the next day.
#[tokio::test]
async fn a_repeat_of_a_message_another_process_stored_early_is_found() {
    let (db, first) = pg_store().await;
    let second = PgStore::connect(&db.url, &DatabaseSettings::default(), RETENTION)
        .await
        .unwrap();
    let now = now_ms();
    let today = now.div_euclid(EPOCH_MS);
    let yesterday = (today - 1) * EPOCH_MS + 1000;
    let r = room(43);
    create(&first, &r, yesterday).await;
    let mut ahead = msg(r, 1);
    ahead.epoch = today as u32;
    let stored = first.append(&[ahead.clone()], yesterday).await.unwrap();
    assert_eq!(stored, vec![AppendOutcome::Stored { seq: 1 }]);
    let again = second.append(&[ahead, msg(r, 2)], now).await.unwrap();
    assert_eq!(
        again,
        vec![AppendOutcome::Replay, AppendOutcome::Stored { seq: 2 }]
    );
}

/// Messages stored before schema version 5 (or by a version 4 binary still running beside a
/// newer one) carry no mark: on a database that had messages when it migrated, the lookup reads
/// every day of the window until the second day after, and finds a copy sent early yesterday
/// that no room row mentions.
#[tokio::test]
async fn postgres_replays_stored_before_the_marks_are_still_found() {
    let (db, client, today) = version_3_database().await;
    let r = room(42);
    let mut ahead = msg(r, 1);
    ahead.epoch = today as u32;
    client
        .execute(
            "INSERT INTO rooms (id, auth_wrapped, created_at, last_active, last_seq)
             VALUES ($1, '\\x00', now() - interval '1 day', now() - interval '1 day', 1)",
            &[&&r[..]],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO messages (room_id, seq, created_at, epoch, iv, ct)
             VALUES ($1, 1, now() - interval '1 day', $2, $3, '\\x00')",
            &[&&r[..], &(today as i32), &&ahead.iv[..]],
        )
        .await
        .unwrap();
    let store = PgStore::connect(&db.url, &DatabaseSettings::default(), RETENTION)
        .await
        .unwrap();
    let outcomes = store.append(&[ahead, msg(r, 2)], now_ms()).await.unwrap();
    assert_eq!(
        outcomes,
        vec![AppendOutcome::Replay, AppendOutcome::Stored { seq: 2 }]
    );
}

/// Whether a day's partition index `<partition><suffix>` is unique; `None` if there is none.
async fn day_index(client: &tokio_postgres::Client, day: i64, suffix: &str) -> Option<bool> {
    client
        .query_opt(
            "SELECT x.indisunique FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
             WHERE i.relname = $1",
            &[&format!("{}{suffix}", partition_name(day))],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// Whether a partition's replay key of before schema version 6 (`<partition>_iv`, on
/// `(room_id, iv)`) is unique; `None` if it has none.
async fn replay_key(client: &tokio_postgres::Client, day: i64) -> Option<bool> {
    day_index(client, day, "_iv").await
}

/// Whether a partition's digest key (`<partition>_rk`, schema version 6) is unique.
async fn digest_key(client: &tokio_postgres::Client, day: i64) -> Option<bool> {
    day_index(client, day, "_rk").await
}

/// Every day's partition keeps its (room, IV) pairs' digests unique with an index of its own,
/// so the writers leave the day they write to out of their replay lookup and the insert
/// refuses a repeat: the batch is redone with the lookup, and only the repeat is refused. A
/// partition made without a replay key (by a binary older than version 4) gets one on
/// `(room_id, iv)` at the next maintenance, a plain one if it already holds a repeat, and the
/// writers look into that day again.
#[tokio::test]
async fn postgres_days_keep_their_replay_keys_unique() {
    let (db, store) = pg_store().await;
    let client = cluster().connect(&db).await;
    let today = now_ms().div_euclid(EPOCH_MS);
    for day in today - 1..=today + 3 {
        assert_eq!(digest_key(&client, day).await, Some(true), "day {day}");
        assert_eq!(replay_key(&client, day).await, None, "day {day}");
    }
    // A minute into today (whatever the hour), then two minutes later.
    let (t1, t2) = (today * EPOCH_MS + 60_000, today * EPOCH_MS + 180_000);
    let r = room(50);
    create(&store, &r, t1).await;
    let first = msg(r, 1);
    let stored = store
        .append(std::slice::from_ref(&first), t1)
        .await
        .unwrap();
    assert_eq!(seqs(&stored), vec![1]);
    let again = store.append(&[msg(r, 2), first.clone()], t1).await.unwrap();
    assert_eq!(
        again,
        vec![AppendOutcome::Stored { seq: 2 }, AppendOutcome::Replay]
    );
    let copies: i64 = client
        .query_one(
            "SELECT count(*) FROM messages WHERE room_id = $1 AND iv = $2",
            &[&&r[..], &&first.iv[..]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(copies, 1);
    let digest: Option<i64> = client
        .query_one(
            "SELECT replay_key FROM messages WHERE room_id = $1 AND iv = $2",
            &[&&r[..], &&first.iv[..]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(digest, Some(store.replay_digest(&r, &first.iv)));

    // Today's partition without its key, holding a repeated pair (as a clock stepping back
    // could leave it); tomorrow's without its key.
    let (name, ahead) = (partition_name(today), partition_name(today + 1));
    client
        .batch_execute(&format!("DROP INDEX {name}_rk; DROP INDEX {ahead}_rk"))
        .await
        .unwrap();
    let other = room(51);
    create(&store, &other, t1).await;
    for seq in [1i64, 2] {
        client
            .execute(
                "INSERT INTO messages (room_id, seq, created_at, epoch, iv, ct)
                 VALUES ($1, $2, to_timestamp($3::float8 / 1000), 1, $4, '\\x00')",
                &[&&other[..], &seq, &(t1 as f64), &&first.iv[..]],
            )
            .await
            .unwrap();
    }
    store.ensure_partitions(t2).await.unwrap();
    assert_eq!(replay_key(&client, today).await, Some(false));
    assert_eq!(replay_key(&client, today + 1).await, Some(true));
    // Today is looked into again (two minutes on, past the minute a refused repeat keeps
    // every lookup whole): repeats are still refused, new messages stored.
    let mut repeat = first.clone();
    repeat.room = other;
    let out = store.append(&[repeat, msg(r, 3)], t2).await.unwrap();
    assert_eq!(
        out,
        vec![AppendOutcome::Replay, AppendOutcome::Stored { seq: 3 }]
    );
    let out = store
        .append(std::slice::from_ref(&first), t2)
        .await
        .unwrap();
    assert_eq!(out, vec![AppendOutcome::Replay]);
}

/// Two different pairs with one digest (at 100 million messages a day about once in ten
/// years; here written on purpose):
/// the second is stored all the same, without a digest, and the batch's other messages with
/// it.
#[tokio::test]
async fn a_message_whose_digest_another_pair_has_is_stored() {
    let (db, store) = pg_store().await;
    let client = cluster().connect(&db).await;
    let now = now_ms();
    let (r, other) = (room(53), room(54));
    create(&store, &r, now).await;
    create(&store, &other, now).await;
    let (m, next) = (msg(r, 1), msg(r, 2));
    // Another room's message carrying the digest of `m`'s pair.
    client
        .execute(
            "INSERT INTO messages (room_id, seq, created_at, epoch, iv, ct, replay_key)
             VALUES ($1, 1, now(), $2, $3, '\\x00', $4)",
            &[
                &&other[..],
                &(m.epoch as i32),
                &&[7u8; 12][..],
                &store.replay_digest(&r, &m.iv),
            ],
        )
        .await
        .unwrap();
    let out = store.append(&[m.clone(), next], now).await.unwrap();
    assert_eq!(seqs(&out), vec![1, 2]);
    let digests: Vec<Option<i64>> = client
        .query(
            "SELECT replay_key FROM messages WHERE room_id = $1 ORDER BY seq",
            &[&&r[..]],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(digests, vec![None, None]);
    // The store goes on as before.
    let out = store.append(&[msg(r, 3)], now_ms()).await.unwrap();
    assert_eq!(seqs(&out), vec![3]);
}

/// Store `m` as the first message of its (new) room at `at` (ms) as a version 5 server would:
/// without a digest.
async fn store_as_version_5(client: &tokio_postgres::Client, m: &NewMessage, at: i64) {
    client
        .execute(
            "INSERT INTO messages (room_id, seq, created_at, epoch, iv, ct)
             VALUES ($1, 1, to_timestamp($2::float8 / 1000), $3, $4, '\\x00')",
            &[&&m.room[..], &(at as f64), &(m.epoch as i32), &&m.iv[..]],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE rooms SET last_seq = 1 WHERE id = $1",
            &[&&m.room[..]],
        )
        .await
        .unwrap();
}

/// After the upgrade to schema version 6, the days of the replay window whose partitions were
/// made before it keep their `(room_id, iv)` key and their rows no digest: a repeat of a
/// message stored there is still found, while the new days are looked into by digest.
#[tokio::test]
async fn a_repeat_of_a_message_stored_before_the_digests_is_found() {
    let (db, store) = pg_store().await;
    let client = cluster().connect(&db).await;
    let now = now_ms();
    let today = now.div_euclid(EPOCH_MS);
    // Yesterday's partition as version 5 made it.
    let yesterday = partition_name(today - 1);
    client
        .batch_execute(&format!(
            "DROP INDEX {yesterday}_rk;
             CREATE UNIQUE INDEX {yesterday}_iv ON {yesterday} (room_id, iv)"
        ))
        .await
        .unwrap();
    store.ensure_partitions(now).await.unwrap();
    let r = room(55);
    create(&store, &r, now - EPOCH_MS).await;
    // Stored yesterday by a version 5 server: no digest.
    let mut old = msg(r, 1);
    old.epoch = (today - 1) as u32;
    store_as_version_5(&client, &old, (today - 1) * EPOCH_MS + 60_000).await;
    let out = store.append(&[old.clone(), msg(r, 2)], now).await.unwrap();
    assert_eq!(
        out,
        vec![AppendOutcome::Replay, AppendOutcome::Stored { seq: 2 }]
    );
}

/// A version 5 node beside version 6 ones gives the new partitions its `(room_id, iv)` key too,
/// a plain one where a partition already holds a repeated pair, and stores rows without
/// digests there. Such a day is looked into by pair even when it is the day written to: a
/// repeat of that node's message is found.
#[tokio::test]
async fn a_day_kept_by_both_keys_is_looked_into_by_pair() {
    let (db, store) = pg_store().await;
    let client = cluster().connect(&db).await;
    let now = now_ms();
    let today = partition_name(now.div_euclid(EPOCH_MS));
    client
        .batch_execute(&format!("CREATE INDEX {today}_iv ON {today} (room_id, iv)"))
        .await
        .unwrap();
    store.ensure_partitions(now + 2 * 60_000).await.unwrap();
    let r = room(56);
    create(&store, &r, now).await;
    let old = msg(r, 1);
    store_as_version_5(&client, &old, now).await;
    let out = store
        .append(&[old.clone(), msg(r, 2)], now + 2 * 60_000)
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![AppendOutcome::Replay, AppendOutcome::Stored { seq: 2 }]
    );
}

/// A database as schema version 3 left it, with partitions for yesterday and today (which had
/// no replay key of their own then); a connection to it; today's day number.
async fn version_3_database() -> (crate::pg::TestDb, tokio_postgres::Client, i64) {
    let db = cluster().database().await;
    let client = cluster().connect(&db).await;
    for sql in [
        include_str!("../../migrations/postgres/0001_init.sql"),
        include_str!("../../migrations/postgres/0002_cluster.sql"),
        include_str!("../../migrations/postgres/0003_rooms_hot_updates.sql"),
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    client
        .batch_execute(
            "CREATE TABLE schema_migrations (
                 version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO schema_migrations (version) VALUES (1), (2), (3);",
        )
        .await
        .unwrap();
    let now = now_ms();
    let today = now.div_euclid(EPOCH_MS);
    for day in [today - 1, today] {
        client
            .batch_execute(&format!(
                "CREATE TABLE {} PARTITION OF messages
                 FOR VALUES FROM (to_timestamp({})) TO (to_timestamp({}))",
                partition_name(day),
                day * 86_400,
                (day + 1) * 86_400
            ))
            .await
            .unwrap();
    }
    (db, client, today)
}

/// Schema version 4 replaces the partitioned `(room_id, iv)` index with one per partition:
/// unique, or plain where a partition already holds a repeated pair.
#[tokio::test]
async fn a_version_3_postgres_database_gets_a_replay_key_per_day() {
    let (db, client, today) = version_3_database().await;
    // Yesterday holds one IV twice in a room.
    let r = room(52);
    let held = msg(r, 1);
    for seq in [1i64, 2] {
        client
            .execute(
                "INSERT INTO messages (room_id, seq, created_at, epoch, iv, ct)
                 VALUES ($1, $2, to_timestamp($3::float8), 1, $4, '\\x00')",
                &[
                    &&r[..],
                    &seq,
                    &((today - 1) as f64 * 86_400.0 + 60.0),
                    &&held.iv[..],
                ],
            )
            .await
            .unwrap();
    }
    let store = PgStore::connect(&db.url, &DatabaseSettings::default(), RETENTION)
        .await
        .unwrap();
    assert_eq!(schema_version(&client).await, LATEST_PG_SCHEMA);
    let gone: bool = client
        .query_one("SELECT to_regclass('messages_room_iv') IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(gone);
    assert_eq!(replay_key(&client, today - 1).await, Some(false));
    assert_eq!(replay_key(&client, today).await, Some(true));
    // Partitions made ahead by the store keep their pairs' digests unique instead.
    assert_eq!(replay_key(&client, today + 1).await, None);
    assert_eq!(digest_key(&client, today + 1).await, Some(true));
    // The repeated IV is still refused in that room; a new one stored.
    let now = now_ms();
    store.create_room(&r, &[1u8; 60], now).await.unwrap();
    let out = store.append(&[held.clone(), msg(r, 2)], now).await.unwrap();
    assert_eq!(out[0], AppendOutcome::Replay);
    assert!(matches!(out[1], AppendOutcome::Stored { .. }), "{out:?}");
}

/// The schema version this binary's Postgres migrations end at.
const LATEST_PG_SCHEMA: i32 = 6;

async fn schema_version(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0)
}

/// A server started with a schema upgrade while a `pg_dump` holds `messages` (a rolling
/// upgrade during the nightly backup) waits for the dump. It does not make the other servers'
/// writes wait behind the locks it queues for; it migrates once the dump ends.
#[tokio::test]
async fn a_migration_during_a_dump_waits_for_it_without_stopping_writes() {
    let (db, client, _) = version_3_database().await;
    let dump = cluster().connect(&db).await;
    dump.batch_execute(
        "BEGIN ISOLATION LEVEL REPEATABLE READ; LOCK TABLE messages IN ACCESS SHARE MODE",
    )
    .await
    .unwrap();
    let url = db.url.clone();
    let start = tokio::spawn(async move {
        PgStore::connect(&url, &DatabaseSettings::default(), RETENTION)
            .await
            .map(drop)
    });
    let waits_for_a_lock = || async {
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        waiting > 0
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !waits_for_a_lock().await {
        assert!(
            std::time::Instant::now() < deadline,
            "the migration never queued for a lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    // Another server writes meanwhile, as version 3 did.
    let write = client.execute(
        "INSERT INTO messages (room_id, seq, created_at, epoch, iv, ct)
         VALUES ('\\x01', 1, now(), 1, '\\x02', '\\x00')",
        &[],
    );
    let written = tokio::time::timeout(std::time::Duration::from_secs(10), write).await;
    assert_eq!(
        written
            .expect("a write waited behind the migration")
            .unwrap(),
        1
    );
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(
        !start.is_finished(),
        "the migration did not wait for the dump"
    );
    assert_eq!(schema_version(&client).await, 3);

    dump.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(60), start)
        .await
        .expect("the migration went on waiting after the dump")
        .unwrap()
        .unwrap();
    assert_eq!(schema_version(&client).await, LATEST_PG_SCHEMA);
}

/// A message stored 40 days back, in a room of its own; the name of that expired day's
/// partition.
async fn expired_day(store: &PgStore, n: u8) -> String {
    let day = now_ms().div_euclid(EPOCH_MS) - 40;
    let (r, then) = (room(n), day * EPOCH_MS + 1000);
    create(store, &r, then).await;
    store.append(&[msg(r, 1)], then).await.unwrap();
    partition_name(day)
}

/// Maintenance that must end although something holds a lock it wants.
async fn maintain_beside(store: &PgStore, holder: &str) -> MaintenanceReport {
    tokio::time::timeout(std::time::Duration::from_secs(60), store.maintain(now_ms()))
        .await
        .unwrap_or_else(|_| panic!("maintenance waited for {holder}"))
        .unwrap()
}

/// A message to a new room is stored now: nothing stops writes.
async fn assert_writes_go_on(store: &PgStore, n: u8) {
    let (r, now) = (room(n), now_ms());
    create(store, &r, now).await;
    let stored = store.append(&[msg(r, 2)], now).await.unwrap();
    assert!(
        matches!(stored[0], AppendOutcome::Stored { seq: 1 }),
        "{stored:?}"
    );
}

/// An expired partition that something else is using (here a transaction holding the lock a
/// vacuum takes; an anti-wraparound vacuum is never cancelled) is not waited for: maintenance
/// ends, leaves it for the next run and writes go on meanwhile. Once it is free, it goes.
#[tokio::test]
async fn an_expired_partition_in_use_is_left_for_the_next_run() {
    let (db, store) = pg_store().await;
    let old = expired_day(&store, 14).await;
    let holder = cluster().connect(&db).await;
    holder
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {old} IN SHARE UPDATE EXCLUSIVE MODE"
        ))
        .await
        .unwrap();

    let report = maintain_beside(&store, "a vacuum").await;
    assert!(report.ran, "{report:?}");
    assert_eq!(report.partitions_deferred, 1, "{report:?}");
    assert!(store.partitions().await.unwrap().contains(&old));
    assert_writes_go_on(&store, 15).await;

    holder.batch_execute("COMMIT").await.unwrap();
    let report = store.maintain(now_ms()).await.unwrap();
    assert_eq!(report.partitions_deferred, 0, "{report:?}");
    assert!(report.partitions_dropped >= 1, "{report:?}");
    assert!(!store.partitions().await.unwrap().contains(&old));
}

/// A `pg_dump` holds a shared lock on `messages` and every partition while it runs. Maintenance
/// during one neither waits for it nor makes writes wait behind its own exclusive locks: the
/// partition it would make ahead and the one it would drop are left for the next run.
#[tokio::test]
async fn maintenance_during_a_dump_leaves_its_partition_changes_for_later() {
    let (db, store) = pg_store().await;
    let sql = cluster().connect(&db).await;
    let today = now_ms().div_euclid(EPOCH_MS);
    store.maintain(now_ms()).await.unwrap();
    let ahead = partition_name(today + 3);
    sql.batch_execute(&format!("DROP TABLE {ahead}"))
        .await
        .unwrap();
    let old = expired_day(&store, 16).await;

    let dump = cluster().connect(&db).await;
    dump.batch_execute(
        "BEGIN ISOLATION LEVEL REPEATABLE READ; LOCK TABLE messages IN ACCESS SHARE MODE",
    )
    .await
    .unwrap();
    let report = maintain_beside(&store, "the dump").await;
    // Writing the old day made the days around it too: all of them wait.
    assert_eq!(report.partitions_created, 0, "{report:?}");
    assert_eq!(report.partitions_dropped, 0, "{report:?}");
    assert!(report.partitions_deferred >= 1, "{report:?}");
    let partitions = store.partitions().await.unwrap();
    assert!(partitions.contains(&old) && !partitions.contains(&ahead));
    assert_writes_go_on(&store, 17).await;

    dump.batch_execute("COMMIT").await.unwrap();
    let report = store.maintain(now_ms()).await.unwrap();
    assert_eq!(report.partitions_created, 1, "{report:?}");
    assert_eq!(report.partitions_deferred, 0, "{report:?}");
    assert!(report.partitions_dropped >= 1, "{report:?}");
    let partitions = store.partitions().await.unwrap();
    assert!(!partitions.contains(&old) && partitions.contains(&ahead));
}

#[tokio::test]
async fn expired_postgres_partitions_are_dropped_not_emptied() {
    let (db, store) = pg_store().await;
    let sql = cluster().connect(&db).await;
    let today = now_ms().div_euclid(EPOCH_MS);
    let r = room(13);
    let t_old = (today - 40) * EPOCH_MS + 1000;
    create(&store, &r, t_old).await;
    // Writes into days that have no partition yet create them on demand.
    for (day, tag) in [
        (today - 40, 1u8),
        (today - 35, 2),
        (today - 31, 3),
        (today - 2, 4),
    ] {
        store
            .append(&[msg(r, tag)], day * EPOCH_MS + 5000)
            .await
            .unwrap();
    }
    let partitions = store.partitions().await.unwrap();
    for day in [today - 40, today - 35, today - 31, today - 2] {
        assert!(partitions.contains(&partition_name(day)), "{partitions:?}");
    }
    let rows: i64 = sql
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 4);

    let now = now_ms();
    let report = store.maintain(now).await.unwrap();
    assert!(report.partitions_dropped >= 3, "{report:?}");
    let present: Vec<String> = sql
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'messages'::regclass",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    for day in [today - 40, today - 35, today - 31] {
        let name = partition_name(day);
        assert!(
            !present.contains(&name),
            "{name} still attached: {present:?}"
        );
        let exists = sql
            .query_opt("SELECT 1 FROM pg_class WHERE relname = $1", &[&name])
            .await
            .unwrap();
        assert!(exists.is_none(), "{name} still exists as a table");
    }
    assert!(present.contains(&partition_name(today - 2)));
    for ahead in 0..=3 {
        assert!(
            present.contains(&partition_name(today + ahead)),
            "{present:?}"
        );
    }
    let rows: i64 = sql
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "only the recent message is left");
    let page = store
        .messages(&r, HistoryQuery::After(0), 10, now)
        .await
        .unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.ct[0]).collect::<Vec<_>>(),
        vec![4]
    );
}

#[tokio::test]
async fn only_one_process_runs_postgres_maintenance_at_a_time() {
    let db = cluster().database().await;
    let a = PgStore::connect(&db.url, &DatabaseSettings::default(), RETENTION)
        .await
        .unwrap();
    let b = PgStore::connect(&db.url, &DatabaseSettings::default(), RETENTION)
        .await
        .unwrap();
    let sql = cluster().connect(&db).await;
    // Hold the maintenance lock from outside, as another node mid-run would.
    let held: bool = sql
        .query_one(
            "SELECT pg_try_advisory_lock($1)",
            &[&0x6e61_6e6f_6368_6102_i64],
        )
        .await
        .unwrap()
        .get(0);
    assert!(held);
    assert!(!a.maintain(now_ms()).await.unwrap().ran);
    assert!(!b.maintain(now_ms()).await.unwrap().ran);
    sql.execute(
        "SELECT pg_advisory_unlock($1)",
        &[&0x6e61_6e6f_6368_6102_i64],
    )
    .await
    .unwrap();
    assert!(a.maintain(now_ms()).await.unwrap().ran);
}

/// Another process writing to the SQLite file (an operator's `sqlite3` shell, a backup tool)
/// makes the server wait its turn, not refuse: found by the soak, where a writer beside the
/// server turned a few sends into `unavailable`.
#[actix_web::test]
async fn a_second_writer_on_the_sqlite_file_delays_appends_instead_of_failing_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), RETENTION).await.unwrap());
    let r = room(1);
    store.create_room(&r, &[0u8; 60], now_ms()).await.unwrap();
    for round in 0..20u8 {
        let path = dir.path().join("nanochat.db");
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let other = std::thread::spawn(move || {
            let mut conn = rusqlite::Connection::open(path).unwrap();
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .unwrap();
            tx.execute(
                "INSERT OR REPLACE INTO server_identity (key, value) VALUES (?1, ?2)",
                rusqlite::params![format!("other-writer-{round}"), &[round; 32][..]],
            )
            .unwrap();
            locked_tx.send(()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50));
            tx.commit().unwrap();
        });
        // Read first so the writer's snapshot is older than the other commit.
        let _ = store.room(&r, now_ms()).await.unwrap();
        locked_rx.recv().unwrap();
        let outcomes = store.append(&[msg(r, round)], now_ms()).await;
        assert!(
            outcomes.is_ok(),
            "round {round}: an append failed while another writer held the file: {outcomes:?}"
        );
        other.join().unwrap();
    }
}

/// Committed pages reach the database file through the checkpointer thread, without the
/// writer paying for it (its own threshold is thousands of pages away) and without a restart.
#[actix_web::test]
async fn the_sqlite_wal_is_checkpointed_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), RETENTION).await.unwrap();
    let db = dir.path().join("nanochat.db");
    let wal = dir.path().join("nanochat.db-wal");
    let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let r = room(1);
    store.create_room(&r, &[0u8; 60], now_ms()).await.unwrap();
    // ~300 pages: far below the writer's own checkpoint threshold.
    for round in 0..30u8 {
        let batch: Vec<NewMessage> = (0..10)
            .map(|_| NewMessage {
                ct: vec![round; 4000],
                ..msg(r, round)
            })
            .collect();
        let outcomes = store.append(&batch, now_ms()).await.unwrap();
        assert_eq!(outcomes.len(), 10);
    }
    let wal_size = size(&wal);
    assert!(
        wal_size > 1_000_000,
        "the messages should be in the WAL first ({wal_size} bytes)"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    // 1.2 MB of messages; the empty schema takes a few pages.
    while size(&db) < 1_000_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the database file stayed at {} bytes with a {wal_size}-byte WAL: nothing \
             checkpointed it",
            size(&db)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Everything is still readable, from the file.
    let page = store
        .messages(&r, HistoryQuery::After(0), 1000, now_ms())
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 300);
}

/// The SQLite file's descriptors open in this process (every connection holds one).
fn sqlite_descriptors(db: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target == db)
        .count()
}

/// Many reads at once (a crowd paging history, or a flood from many addresses) queue for the
/// pooled read connections instead of each opening a connection of its own on a blocking
/// thread: those would cost a descriptor each (kept by SQLite while other connections hold
/// locks), a page cache each, and threads up to tokio's limit of 512.
#[actix_web::test]
async fn a_crowd_of_sqlite_reads_shares_the_pooled_connections() {
    let dir = tempfile::tempdir().unwrap();
    let db = std::fs::canonicalize(dir.path())
        .unwrap()
        .join("nanochat.db");
    let store = Arc::new(SqliteStore::open(dir.path(), RETENTION).await.unwrap());
    let r = room(1);
    store.create_room(&r, &[0u8; 60], now_ms()).await.unwrap();
    let batch: Vec<_> = (0..200u8).map(|i| msg(r, i)).collect();
    store.append(&batch, now_ms()).await.unwrap();
    let before = sqlite_descriptors(&db);
    let reads: Vec<_> = (0..300)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .messages(&r, HistoryQuery::Latest, 200, now_ms())
                    .await
                    .unwrap()
                    .messages
                    .len()
            })
        })
        .collect();
    for read in reads {
        assert_eq!(read.await.unwrap(), 200, "every read got its page");
    }
    let after = sqlite_descriptors(&db);
    assert!(
        after <= before + 8,
        "300 reads at once left {after} descriptors on the database file ({before} before): \
         more than the 8 pooled read connections"
    );
}
