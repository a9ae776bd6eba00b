//! Faults with real processes: Postgres crash-stopped in the middle of a stream of sends.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nanochat::client::RoomSession;
use nanochat::protocol::{HistoryQuery, ServerFrame};
use nanochat::store::now_ms;

use crate::helpers::{
    Backend, http_get, metric_value, second_node, spawn_app_with, start, test_settings,
};
use crate::pg::PgCluster;

/// Send message `i` (its text `m<i>`, then `padding` more bytes, so a full disk is reached
/// sooner) and wait for its answer: ("m<i>", "acked" | "refused"). The only refusal a fault
/// may cause is `unavailable`.
async fn send(
    alice: &mut nanochat::client::Client,
    s: &mut RoomSession,
    i: usize,
    padding: usize,
) -> (String, &'static str) {
    let label = format!("m{i}");
    let text = if padding == 0 {
        label.clone()
    } else {
        format!("{label} {}", "x".repeat(padding))
    };
    alice
        .send_sealed(&label, &s.seal("alice", &text))
        .await
        .unwrap();
    match alice.recv().await.unwrap() {
        ServerFrame::Ack { reference, .. } => (reference, "acked"),
        ServerFrame::Error {
            code, reference, ..
        } => {
            assert_eq!(code, "unavailable", "while the fault lasts");
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
        let (r, o) = send(&mut alice, &mut s, i, 0).await;
        outcome.insert(r, o);
        i += 1;
    }
    cluster.stop_immediate();
    for _ in 0..5 {
        let (r, o) = send(&mut alice, &mut s, i, 0).await;
        assert_eq!(
            o, "refused",
            "nothing is acknowledged while the database is down"
        );
        outcome.insert(r, o);
        i += 1;
    }
    crate::helpers::wait_readiness(app.port, 503).await;
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
        let (r, o) = send(&mut alice, &mut s, i, 0).await;
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

/// A small tmpfs mounted for one test, unmounted (lazily, so a still-open file cannot block
/// it) when the test lets go.
pub(crate) struct TmpfsMount(std::path::PathBuf);

impl TmpfsMount {
    pub(crate) fn new(at: &std::path::Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount(8) (package mount)");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill a disk for real: run the suite as root \
             (or with CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TmpfsMount(at.to_owned())
    }

    fn remount(&self, options: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {options}");
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Write zeros into `path` until the file system refuses: the disk is then full.
fn fill_disk(path: &std::path::Path) {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = f.write_all(&chunk).and_then(|_| f.sync_all()) {
            assert_eq!(e.raw_os_error(), Some(28), "expected ENOSPC, got {e}");
            break;
        }
    }
}

/// Stop a server process with SIGTERM and wait for it.
fn terminate(proc: &mut crate::binary::Proc) {
    let pid = proc.0.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while proc.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `PRAGMA integrity_check` and the stored message texts of a stopped server's database.
fn check_database(
    db: &std::path::Path,
    keys: &nanochat::crypto::RoomKeys,
) -> HashMap<String, usize> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let verdict: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(verdict, "ok", "the database is intact");
    let mut stmt = conn
        .prepare("SELECT seq, created_at, epoch, iv, ct FROM messages ORDER BY seq")
        .unwrap();
    let mut reader = RoomSession::new(keys.clone());
    let mut stored: HashMap<String, usize> = HashMap::new();
    let rows = stmt
        .query_map([], |r| {
            Ok(nanochat::protocol::WireMsg {
                seq: r.get(0)?,
                ts: r.get(1)?,
                epoch: r.get(2)?,
                iv: nanochat::protocol::b64u(&r.get::<_, Vec<u8>>(3)?),
                ct: nanochat::protocol::b64u(&r.get::<_, Vec<u8>>(4)?),
            })
        })
        .unwrap();
    for wire in rows {
        let text = reader.open(&wire.unwrap()).unwrap().text;
        let label = text.split(' ').next().unwrap().to_owned();
        *stored.entry(label).or_default() += 1;
    }
    stored
}

/// Some line the server has logged so far contains `words`.
fn assert_logged(log: &std::sync::mpsc::Receiver<String>, words: &str) {
    let said: Vec<String> = log.try_iter().collect();
    assert!(
        said.iter().any(|l| l.contains(words)),
        "the log names {words:?}: {said:?}"
    );
}

/// One client sending numbered 2 KiB messages into its room, remembering what became of each.
struct Sender {
    client: nanochat::client::Client,
    session: RoomSession,
    next: usize,
    outcome: HashMap<String, &'static str>,
}

impl Sender {
    async fn create(url: &str, keys: &nanochat::crypto::RoomKeys) -> Self {
        let mut client = nanochat::client::Client::connect(url).await.unwrap();
        client.create(keys).await.unwrap();
        Self {
            client,
            session: RoomSession::new(keys.clone()),
            next: 0,
            outcome: HashMap::new(),
        }
    }

    /// Send the next message: "acked" or "refused" (`unavailable`).
    async fn send(&mut self) -> &'static str {
        let (r, o) = send(&mut self.client, &mut self.session, self.next, 2048).await;
        self.next += 1;
        self.outcome.insert(r, o);
        o
    }

    /// Send `n` messages, each of which must be acked.
    async fn all_acked(&mut self, n: usize) {
        for _ in 0..n {
            assert_eq!(self.send().await, "acked");
        }
    }

    /// Send until `n` more are acked, within 10 s.
    async fn until_acked(&mut self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut acked = 0;
        while acked < n {
            assert!(
                Instant::now() < deadline,
                "sending did not resume: {:?}",
                self.outcome
            );
            if self.send().await == "acked" {
                acked += 1;
            }
        }
    }

    /// The stored messages of its room are exactly the acked ones, each once.
    fn assert_stored_as_answered(&self, stored: &HashMap<String, usize>) {
        for (text, o) in &self.outcome {
            match *o {
                "acked" => assert_eq!(stored.get(text), Some(&1), "acked {text}"),
                _ => assert_eq!(stored.get(text), None, "refused {text} was stored"),
            }
        }
        let acked = self.outcome.values().filter(|o| **o == "acked").count();
        assert_eq!(stored.values().sum::<usize>(), acked);
    }
}

#[actix_web::test]
async fn a_full_disk_refuses_sends_clearly_and_recovers_without_loss_or_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _mount = TmpfsMount::new(&data, "16m");
    // Without the reserve, which would refuse every message on so small a volume.
    let mut env = SEND_FREELY.to_vec();
    env.push(("NANOCHAT__STORE__MIN_FREE_MIB", "0"));
    let (mut server, port, _log, rx) = crate::binary::spawn_server(dir.path(), &env);
    let url = format!("ws://127.0.0.1:{port}/ws");
    let keys = crate::helpers::random_room();
    let mut alice = Sender::create(&url, &keys).await;
    alice.all_acked(10).await;

    let filler = data.join("filler");
    fill_disk(&filler);
    let mut refused = 0;
    for _ in 0..200 {
        if alice.send().await == "refused" {
            refused += 1;
            if refused == 5 {
                break;
            }
        }
    }
    assert_eq!(
        refused, 5,
        "a full disk must refuse sends: {:?}",
        alice.outcome
    );
    // The server stays up for everyone: a new client is greeted and can read.
    let mut bob = nanochat::client::Client::connect(&url).await.unwrap();
    assert!(matches!(
        bob.join(&keys, None).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    // The operator is told why, in words.
    assert_logged(&rx, "full");

    std::fs::remove_file(&filler).unwrap();
    alice.until_acked(10).await;
    drop(bob);
    terminate(&mut server);
    alice.assert_stored_as_answered(&check_database(&data.join("nanochat.db"), &keys));
}

/// Message and frame limits high enough for a test that sends a few hundred messages of 2 KiB
/// (each counts three times against the message limits) from one address.
pub(crate) const SEND_FREELY: [(&str, &str); 8] = [
    ("NANOCHAT__LIMITS__FRAMES_PER_SECOND", "100000"),
    ("NANOCHAT__LIMITS__FRAMES_BURST", "10000"),
    ("NANOCHAT__RATE__CLIENT_FRAMES__PER_MINUTE", "600000"),
    ("NANOCHAT__RATE__CLIENT_FRAMES__BURST", "10000"),
    ("NANOCHAT__RATE__CLIENT_MESSAGES__PER_MINUTE", "600000"),
    ("NANOCHAT__RATE__CLIENT_MESSAGES__BURST", "10000"),
    ("NANOCHAT__RATE__ROOM_MESSAGES__PER_MINUTE", "600000"),
    ("NANOCHAT__RATE__ROOM_MESSAGES__BURST", "10000"),
];

/// Write into `path` until the volume under it has at most `left` bytes available.
pub(crate) fn fill_until_available(path: &std::path::Path, left: u64) {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while available(path) > left {
        f.write_all(&chunk).unwrap();
        f.sync_all().unwrap();
    }
}

/// Bytes available to an unprivileged writer on the volume holding `path`.
pub(crate) fn available(path: &std::path::Path) -> u64 {
    let v = rustix::fs::statvfs(path).unwrap();
    v.f_bavail * v.f_frsize
}

/// `store.min_free_mib` keeps a volume from filling up with messages: below it new messages
/// and rooms are refused with `unavailable`, before the disk is full, while reading and the
/// panic button (whose deletes need room in SQLite's log) go on; once space is freed sending
/// resumes by itself. Nothing acknowledged is lost, nothing refused is stored.
#[actix_web::test]
async fn a_volume_low_on_space_refuses_new_messages_before_it_is_full_and_wipes_still_work() {
    const MIB: u64 = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _mount = TmpfsMount::new(&data, "64m");
    let mut env = SEND_FREELY.to_vec();
    env.push(("NANOCHAT__STORE__MIN_FREE_MIB", "16"));
    let (mut server, port, log, rx) = crate::binary::spawn_server(dir.path(), &env);
    let listening: serde_json::Value = serde_json::from_str(log.last().unwrap()).unwrap();
    let admin = listening["admin_port"].as_u64().unwrap() as u16;
    let url = format!("ws://127.0.0.1:{port}/ws");
    let keys = crate::helpers::random_room();
    let mut alice = Sender::create(&url, &keys).await;
    // A second room, to be wiped while space is low.
    let other = crate::helpers::random_room();
    let mut bob = Sender::create(&url, &other).await;
    bob.all_acked(20).await;
    alice.all_acked(10).await;

    // Leave 2 MiB above the reserve, then send until refused.
    fill_until_available(&data.join("filler"), 18 * MIB);
    let mut acked_near_the_reserve = 0;
    let mut refused = 0;
    while refused < 5 {
        assert!(alice.next < 5000, "the reserve never refused a message");
        match alice.send().await {
            "refused" => refused += 1,
            _ => acked_near_the_reserve += 1,
        }
    }
    assert!(
        acked_near_the_reserve > 0,
        "the 2 MiB above the reserve take messages"
    );
    let left = available(&data);
    assert!(
        left > 15 * MIB,
        "refused before the reserve is used up: {left} bytes left"
    );
    // The operator sees why: metrics and the log.
    let files = || {
        ["nanochat.db", "nanochat.db-wal"]
            .iter()
            .map(|f| std::fs::metadata(data.join(f)).unwrap().len())
            .sum::<u64>()
    };
    let before = files();
    let body = crate::helpers::http_get(admin, "/metrics").await.body;
    let after = files();
    assert_eq!(
        metric_value(&body, "nanochat_storage_reserve_bytes"),
        16 * MIB
    );
    assert_eq!(
        metric_value(&body, "nanochat_storage_volume_size_bytes"),
        64 * MIB
    );
    let seen = metric_value(&body, "nanochat_storage_volume_available_bytes");
    assert!(seen < 16 * MIB && seen > 15 * MIB, "{seen}");
    // The checkpointer may still be copying the last pages into the database file.
    let bytes = metric_value(&body, "nanochat_storage_bytes");
    assert!(
        bytes >= before.min(after) && bytes <= before.max(after),
        "{bytes} against {before}..{after}"
    );
    // Said once, not for every refused batch; a refusal on purpose is no storage error.
    let said: Vec<String> = rx.try_iter().collect();
    let told = said
        .iter()
        .filter(|l| l.contains("store.min_free_mib"))
        .count();
    assert_eq!(told, 1, "the log names the reserve once: {said:?}");
    assert_eq!(
        metric_value(&body, "nanochat_store_errors_total{op=\"append\"}"),
        0
    );
    // No new room either.
    let mut dave = nanochat::client::Client::connect(&url).await.unwrap();
    let answer = dave.create(&crate::helpers::random_room()).await;
    assert!(
        matches!(&answer, Ok(ServerFrame::Error { code, .. }) if code == "unavailable"),
        "{answer:?}"
    );
    // Reading goes on, and so does the panic button.
    let mut carol = nanochat::client::Client::connect(&url).await.unwrap();
    let ServerFrame::Joined { messages, .. } = carol.join(&keys, None).await.unwrap() else {
        panic!("carol joins");
    };
    assert!(!messages.is_empty());
    bob.client
        .send_json(&serde_json::json!({"type": "panic"}))
        .await
        .unwrap();
    assert!(
        matches!(bob.client.recv().await, Ok(ServerFrame::Nuked)),
        "the wipe works on a volume at its reserve"
    );
    let mut erin = nanochat::client::Client::connect(&url).await.unwrap();
    let answer = erin.join(&other, None).await.unwrap();
    assert!(
        matches!(&answer, ServerFrame::Error { code, .. } if code == "room_gone"),
        "{answer:?}"
    );

    std::fs::remove_file(data.join("filler")).unwrap();
    alice.until_acked(10).await;
    assert_logged(&rx, "above store.min_free_mib again");
    drop((bob, carol, dave, erin));
    terminate(&mut server);
    // Only the first room's messages are left (the wiped one's are gone, or they would not
    // open with this room's keys): each acked once, none of the refused.
    alice.assert_stored_as_answered(&check_database(&data.join("nanochat.db"), &keys));
}

#[actix_web::test]
async fn a_read_only_data_directory_stops_the_start_with_a_clear_error_and_harms_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mount = TmpfsMount::new(&data, "16m");
    let no_reserve = [("NANOCHAT__STORE__MIN_FREE_MIB", "0")];
    let (mut server, port, _log, _rx) = crate::binary::spawn_server(dir.path(), &no_reserve);
    let url = format!("ws://127.0.0.1:{port}/ws");
    let keys = crate::helpers::random_room();
    let mut alice = nanochat::client::Client::connect(&url).await.unwrap();
    alice.create(&keys).await.unwrap();
    let mut s = RoomSession::new(keys.clone());
    for i in 0..5 {
        assert_eq!(send(&mut alice, &mut s, i, 2048).await.1, "acked");
    }
    drop(alice);
    terminate(&mut server);
    let before = std::fs::read(data.join("nanochat.db")).unwrap();

    mount.remount("ro");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nanochat"))
        .current_dir(dir.path())
        .env_remove("NANOCHAT_CONFIG")
        .env("NANOCHAT__SERVER__LISTEN", "127.0.0.1:0")
        .env("NANOCHAT__SERVER__ADMIN_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "must not serve without a writable store: {stderr}"
    );
    assert!(
        stderr.contains("not writable") && stderr.contains("Read-only file system"),
        "the error names the problem and the directory: {stderr}"
    );
    assert_eq!(std::fs::read(data.join("nanochat.db")).unwrap(), before);

    mount.remount("rw");
    let (mut server, port, _log, _rx) = crate::binary::spawn_server(dir.path(), &[]);
    let mut bob = nanochat::client::Client::connect(&format!("ws://127.0.0.1:{port}/ws"))
        .await
        .unwrap();
    let ServerFrame::Joined { messages, .. } = bob.join(&keys, None).await.unwrap() else {
        panic!("join after recovery")
    };
    assert_eq!(messages.len(), 5, "everything acknowledged before is there");
    drop(bob);
    terminate(&mut server);
    let stored = check_database(&data.join("nanochat.db"), &keys);
    assert_eq!(stored.len(), 5);
}

/// `store.max_database_mib` caps the stored data: at the cap new messages and rooms get
/// `unavailable` while reading and the panic button go on; on SQLite the cap counts pages in
/// use, so a wipe, whose pages new messages reuse, lets sending resume, although the file
/// itself never shrinks.
#[actix_web::test]
async fn a_database_at_its_cap_refuses_new_messages_until_a_wipe_frees_pages() {
    let app = spawn_app_with(Backend::Sqlite, |s| s.store.max_database_mib = 2).await;
    let (mut alice, keys) = app.room_creator().await;
    let mut s = RoomSession::new(keys.clone());
    let (mut bob, other) = app.room_creator().await;
    let mut bob_s = RoomSession::new(other.clone());
    assert_eq!(send(&mut bob, &mut bob_s, 0, 0).await.1, "acked");
    // Fill the first room until the cap refuses.
    let mut i = 0;
    loop {
        assert!(i < 20_000, "the cap never refused a message");
        let (_, o) = send(&mut alice, &mut s, i, 2048).await;
        i += 1;
        if o == "refused" {
            break;
        }
    }
    let body = app.metrics().await;
    let gauge = |name: &str| metric_value(&body, name);
    assert_eq!(gauge("nanochat_storage_cap_bytes"), 2 << 20);
    assert!(gauge("nanochat_storage_used_bytes") >= 2 << 20, "{body}");
    // Everyone is refused, and told why; no room can be created.
    bob.send_sealed("b1", &bob_s.seal("bob", "b1"))
        .await
        .unwrap();
    match bob.recv().await.unwrap() {
        ServerFrame::Error { code, message, .. } => {
            assert_eq!(code, "unavailable");
            assert!(message.contains("storage is full"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let mut carol = app.client().await;
    let answer = carol.create(&crate::helpers::random_room()).await.unwrap();
    assert!(
        matches!(&answer, ServerFrame::Error { code, .. } if code == "unavailable"),
        "{answer:?}"
    );
    // Reading goes on.
    let ServerFrame::Joined { messages, .. } = carol.join(&keys, None).await.unwrap() else {
        panic!("carol joins");
    };
    assert!(!messages.is_empty());
    // The first room is wiped: its pages are free for new messages, the file keeps its size.
    let file = std::fs::metadata(app.settings.server.data_dir.join("nanochat.db"))
        .unwrap()
        .len();
    alice
        .send_json(&serde_json::json!({"type": "panic"}))
        .await
        .unwrap();
    loop {
        match alice.recv().await {
            Ok(ServerFrame::Nuked) => break,
            Ok(ServerFrame::Ack { .. } | ServerFrame::Error { .. }) => continue,
            other => panic!("{other:?}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 1;
    loop {
        assert!(
            Instant::now() < deadline,
            "sending did not resume after the wipe"
        );
        let (_, o) = send(&mut bob, &mut bob_s, n, 0).await;
        n += 1;
        if o == "acked" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now = std::fs::metadata(app.settings.server.data_dir.join("nanochat.db"))
        .unwrap()
        .len();
    assert!(now >= file, "the file did not shrink: {now} against {file}");
    assert!(app.metrics().await.contains("nanochat_storage_used_bytes"));
    assert!(!app.state.storage_full());
}

/// On Postgres the cap counts the database's size; each process of a cluster checks it
/// itself. A node whose cap is below what the database already takes refuses new messages
/// and rooms, while another node without a cap takes them and both serve readers.
#[actix_web::test]
async fn a_postgres_node_refuses_new_messages_while_the_database_is_at_its_cap() {
    let a = spawn_app_with(Backend::Postgres, |_| {}).await;
    let (mut alice, keys) = a.room_creator().await;
    let mut s = RoomSession::new(keys.clone());
    assert_eq!(send(&mut alice, &mut s, 0, 0).await.1, "acked");
    // A fresh database takes several MiB: 1 is below it.
    let b = second_node(&a, |s| s.store.max_database_mib = 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !b.state.storage_full() {
        assert!(Instant::now() < deadline, "the capped node never noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut bob = b.client().await;
    let ServerFrame::Joined { messages, .. } = bob.join(&keys, None).await.unwrap() else {
        panic!("bob joins through the capped node");
    };
    assert_eq!(messages.len(), 1, "reading goes on");
    let mut bob_s = RoomSession::new(keys.clone());
    assert_eq!(send(&mut bob, &mut bob_s, 1, 0).await.1, "refused");
    let answer = b
        .client()
        .await
        .create(&crate::helpers::random_room())
        .await
        .unwrap();
    assert!(
        matches!(&answer, ServerFrame::Error { code, .. } if code == "unavailable"),
        "{answer:?}"
    );
    let body = b.metrics().await;
    assert_eq!(metric_value(&body, "nanochat_storage_cap_bytes"), 1 << 20);
    assert!(metric_value(&body, "nanochat_storage_used_bytes") > 1 << 20);
    // The node without a cap goes on taking messages.
    assert_eq!(send(&mut alice, &mut s, 2, 0).await.1, "acked");
    assert!(!a.state.storage_full());
}
