//! The `nanochat` binary itself: it serves a room end to end on the embedded default, stops on
//! SIGTERM, and `migrate` prepares a Postgres database.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

use nanochat::client::Client;
use nanochat::protocol::ServerFrame;

use crate::helpers::random_room;

#[actix_web::test]
async fn the_binary_serves_a_room_on_sqlite_by_default_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nanochat"))
        .current_dir(dir.path())
        .env_remove("NANOCHAT_CONFIG")
        .env_remove("RUST_LOG")
        .env("NANOCHAT__SERVER__LISTEN", "127.0.0.1:0")
        .env("NANOCHAT__SERVER__ADMIN_LISTEN", "127.0.0.1:0")
        .env("NANOCHAT__LOG__FORMAT", "json")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut log = Vec::new();
    let port = loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no listening line; log so far: {log:?}"));
        let event: serde_json::Value = serde_json::from_str(&line).expect("JSON log lines");
        log.push(line);
        if event["message"] == "nanochat listening" {
            assert_eq!(event["backend"], "sqlite");
            break event["port"].as_u64().unwrap() as u16;
        }
    };
    // Embedded default: the database and the secret live in ./data.
    assert!(dir.path().join("data/nanochat.db").is_file());
    assert!(dir.path().join("data/secret").is_file());

    let url = format!("ws://127.0.0.1:{port}/ws");
    let keys = random_room();
    let mut alice = Client::connect(&url).await.unwrap();
    assert!(matches!(
        alice.create(&keys).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    let mut bob = Client::connect(&url).await.unwrap();
    assert!(matches!(
        bob.join(&keys, None).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    let mut session = nanochat::client::RoomSession::new(keys.clone());
    alice
        .send_sealed("1", &session.seal("alice", "hi"))
        .await
        .unwrap();
    assert!(matches!(
        alice.recv().await.unwrap(),
        ServerFrame::Ack { seq: 1, .. }
    ));
    let ServerFrame::Msg(m) = bob.recv().await.unwrap() else {
        panic!("bob expected the message")
    };
    let mut bob_session = nanochat::client::RoomSession::new(keys.clone());
    assert_eq!(bob_session.open(&m).unwrap().text, "hi");
    drop((alice, bob));

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not stop on SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    // Logs at the default level name neither the room nor the client.
    let room_hex: String = keys.room_id.iter().map(|b| format!("{b:02x}")).collect();
    let room_b64 = nanochat::protocol::b64u(&keys.room_id);
    while let Ok(line) = rx.try_recv() {
        log.push(line);
    }
    for line in &log {
        assert!(
            !line.contains(&room_b64) && !line.contains(&room_hex),
            "{line}"
        );
        assert!(
            !line.contains("127.0.0.1:") || line.contains("listening"),
            "{line}"
        );
    }
}

#[actix_web::test]
async fn migrate_prepares_a_postgres_database_and_exits() {
    let db = crate::pg::cluster().database().await;
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nanochat"))
        .arg("migrate")
        .env_remove("NANOCHAT_CONFIG")
        .env("NANOCHAT__DATABASE__URL", &db.url)
        .env("NANOCHAT__SERVER__DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sql = crate::pg::cluster().connect(&db).await;
    let version: i32 = sql
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 2);
    let partitioned: bool = sql
        .query_one(
            "SELECT relkind = 'p' FROM pg_class WHERE relname = 'messages'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(partitioned, "messages is a partitioned table");
}

#[test]
fn an_unreachable_database_stops_the_start_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nanochat"))
        .arg("migrate")
        .env_remove("NANOCHAT_CONFIG")
        .env(
            "NANOCHAT__DATABASE__URL",
            "host=/nonexistent port=1 user=x dbname=x",
        )
        .env("NANOCHAT__DATABASE__CONNECT_TIMEOUT_SECS", "1")
        .env("NANOCHAT__SERVER__DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot prepare the Postgres database"),
        "{stderr}"
    );
}

#[actix_web::test]
async fn a_schema_newer_than_the_binary_stops_the_start_with_a_clear_message() {
    let db = crate::pg::cluster().database().await;
    let sql = crate::pg::cluster().connect(&db).await;
    sql.batch_execute(
        "CREATE TABLE schema_migrations (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO schema_migrations (version) VALUES (99);",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nanochat"))
        .env_remove("NANOCHAT_CONFIG")
        .env("NANOCHAT__DATABASE__URL", &db.url)
        .env("NANOCHAT__SERVER__DATA_DIR", dir.path())
        .env("NANOCHAT__SERVER__LISTEN", "127.0.0.1:0")
        .env("NANOCHAT__SERVER__ADMIN_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("schema is version 99, newer than this binary"),
        "{stderr}"
    );
}
