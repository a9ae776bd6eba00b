//! The `nanochat` binary itself: it serves a room end to end on the embedded default, stops on
//! SIGTERM, and `migrate` prepares a Postgres database.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

use nanochat::client::Client;
use nanochat::protocol::ServerFrame;

use crate::helpers::{exchange, random_room};

/// A server process that is killed when the test lets go of it.
pub(crate) struct Proc(pub(crate) std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `nanochat` process started in `dir` with extra environment; returns it, its public port
/// and its JSON log lines (those read so far, and a channel for the rest).
pub(crate) fn spawn_server(
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (Proc, u16, Vec<String>, std::sync::mpsc::Receiver<String>) {
    spawn(Command::new(env!("CARGO_BIN_EXE_nanochat")), dir, env)
}

/// As `spawn_server`, with the open-file limit set first (`soft`, `hard`).
fn spawn_server_with_open_files(
    dir: &std::path::Path,
    env: &[(&str, &str)],
    soft: u64,
    hard: u64,
) -> (Proc, u16, Vec<String>, std::sync::mpsc::Receiver<String>) {
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(format!(
            "ulimit -S -n {soft} && ulimit -H -n {hard} && exec \"$0\""
        ))
        .arg(env!("CARGO_BIN_EXE_nanochat"));
    spawn(sh, dir, env)
}

fn spawn(
    mut cmd: Command,
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (Proc, u16, Vec<String>, std::sync::mpsc::Receiver<String>) {
    cmd.current_dir(dir)
        .env_remove("NANOCHAT_CONFIG")
        .env_remove("RUST_LOG")
        .env("NANOCHAT__SERVER__LISTEN", "127.0.0.1:0")
        .env("NANOCHAT__SERVER__ADMIN_LISTEN", "127.0.0.1:0")
        .env("NANOCHAT__LOG__FORMAT", "json")
        .env("NANOCHAT__POW__MODE", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
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
            break event["port"].as_u64().unwrap() as u16;
        }
    };
    (Proc(child), port, log, rx)
}

/// The port the server's "listening" line (the last of `log` from `spawn_server`) names under
/// `key` (`port`, `admin_port`, `onion_port`).
fn listening_port(log: &[String], key: &str) -> u16 {
    let listening: serde_json::Value = serde_json::from_str(log.last().unwrap()).unwrap();
    let port = listening[key].as_u64();
    port.unwrap_or_else(|| panic!("no {key} in {listening}")) as u16
}

/// The log lines containing `words` that the server writes within `secs` seconds.
fn logged_within(rx: &std::sync::mpsc::Receiver<String>, words: &str, secs: u64) -> Vec<String> {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut said = Vec::new();
    while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(words) => said.push(line),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    said
}

#[actix_web::test]
async fn an_onion_listener_without_tors_circuit_ids_names_the_torrc_line_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_child, _, log, rx) = spawn_server(
        dir.path(),
        &[
            ("NANOCHAT__SERVER__ONION_LISTEN", "127.0.0.1:0"),
            ("NANOCHAT__SERVER__ONION_CIRCUIT_IDS", "true"),
        ],
    );
    let onion = listening_port(&log, "onion_port");
    // Tor was not told to send the circuit line: every connection is closed unanswered...
    for _ in 0..3 {
        let (answer, _) = exchange(onion, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    }
    // ... and the operator is told what is missing, once (not once per connection).
    let warnings = logged_within(&rx, "HiddenServiceExportCircuitID haproxy", 2);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("\"level\":\"WARN\""),
        "{}",
        warnings[0]
    );
    // With the line, the same listener serves.
    let url = format!("ws://127.0.0.1:{onion}/ws");
    let client = nanochat::client::Client::connect_as_circuit(&url, 9).await;
    assert!(client.is_ok(), "{:?}", client.err());
}

#[actix_web::test]
async fn malformed_requests_are_counted_and_no_bad_request_is_logged_as_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_child, port, log, rx) = spawn_server(
        dir.path(),
        &[("NANOCHAT__LIMITS__HANDSHAKE_TIMEOUT_SECS", "1")],
    );
    let admin = listening_port(&log, "admin_port");
    // Twenty connections that any client could make: ten requests no HTTP parser takes, ten
    // that never finish their head.
    for i in 0..20 {
        let sent: &[u8] = if i % 2 == 0 {
            b"GET / HTTQ/9.9\r\n\x01\x02\r\n\r\n"
        } else {
            b"GET / HTTP/1.1\r\nHost: x\r\n"
        };
        let (answer, _) = exchange(port, sent).await;
        let answer = String::from_utf8_lossy(&answer);
        let expected = if i % 2 == 0 {
            "HTTP/1.1 400"
        } else {
            "HTTP/1.1 408"
        };
        assert!(answer.starts_with(expected), "{answer}");
    }
    // The malformed ones are counted (the slow ones are answered 408 and end without error).
    let metrics = crate::helpers::http_get(admin, "/metrics").await;
    let series = "nanochat_http_connection_errors_total{kind=\"malformed\"}";
    assert_eq!(
        crate::helpers::metric_value(&metrics.body, series),
        10,
        "{series}"
    );
    // Not one error line for them: the log stays for the server's own troubles.
    let errors: Vec<String> = logged_within(&rx, "\"level\":\"", 2)
        .into_iter()
        .filter(|l| l.contains("\"level\":\"ERROR\"") || l.contains("stream error"))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}

#[actix_web::test]
async fn a_proxy_missing_from_proxy_trusted_is_named_once_in_the_log_without_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let (_child, port, _, rx) = spawn_server(dir.path(), &[]);
    // A reverse proxy on this host passes clients' addresses on, but proxy.trusted is empty.
    for client in ["203.0.113.7", "203.0.113.8"] {
        let r = crate::helpers::http_request(
            port,
            "GET",
            "/",
            &format!("X-Forwarded-For: {client}\r\n"),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    // Logged while the request was handled; two seconds to read it is ample.
    let warnings = logged_within(&rx, "proxy.trusted", 2);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("\"level\":\"WARN\""),
        "{}",
        warnings[0]
    );
    assert!(!warnings[0].contains("203.0.113") && !warnings[0].contains("127.0.0.1"));
}

#[actix_web::test]
async fn the_binary_serves_a_room_on_sqlite_by_default_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, port, mut log, rx) = spawn_server(dir.path(), &[]);
    assert!(
        log.iter().any(|l| l.contains("\"backend\":\"sqlite\"")),
        "{log:?}"
    );
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
    let bob_challenge = bob.hello.challenge;
    assert!(matches!(
        bob.join(&keys, None).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    let mut session = nanochat::client::RoomSession::new(keys.clone());
    let sealed = session.seal("alice", "hi");
    alice.send_sealed("1", &sealed).await.unwrap();
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
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
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
    // Nor the proof or the ciphertext.
    let proof = nanochat::protocol::b64u(&nanochat::crypto::join_proof(
        &keys.auth_key,
        &bob_challenge,
        &keys.room_id,
    ));
    let ct = nanochat::protocol::b64u(&sealed.ct);
    for line in &log {
        assert!(
            !line.contains(&room_b64) && !line.contains(&room_hex),
            "{line}"
        );
        assert!(
            !line.contains("127.0.0.1:") || line.contains("listening"),
            "{line}"
        );
        assert!(
            !line.contains(&proof) && !line.contains(&ct[..32]),
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
    // Every migration file was applied.
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("sql".as_ref()))
        .count();
    assert_eq!(version as usize, files);
    assert!(files >= 3);
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

/// Send messages in a stream until the server dies; returns the texts acknowledged.
async fn stream_until_killed(port: u16, keys: &nanochat::crypto::RoomKeys) -> Vec<String> {
    let mut c = Client::connect(&format!("ws://127.0.0.1:{port}/ws"))
        .await
        .unwrap();
    assert!(matches!(
        c.join(keys, None).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    let mut s = nanochat::client::RoomSession::new(keys.clone());
    let mut sent = std::collections::HashMap::new();
    let mut acked = Vec::new();
    let mut i = 0;
    loop {
        while sent.len() < 8 {
            let text = format!("m{i}");
            if c.send_sealed(&text, &s.seal("a", &text)).await.is_err() {
                return acked;
            }
            sent.insert(text.clone(), ());
            i += 1;
        }
        match c.recv().await {
            Ok(ServerFrame::Ack { reference, .. }) => {
                sent.remove(&reference);
                acked.push(reference);
            }
            Ok(_) => {}
            Err(_) => return acked,
        }
    }
}

async fn sigkill_mid_stream_loses_no_acknowledged_message(pg: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<(&str, &str)> = match &pg {
        Some(url) => vec![("NANOCHAT__DATABASE__URL", url.as_str())],
        None => vec![],
    };
    let (mut child, port, _, _rx) = spawn_server(dir.path(), &env);
    let keys = random_room();
    let mut creator = Client::connect(&format!("ws://127.0.0.1:{port}/ws"))
        .await
        .unwrap();
    assert!(matches!(
        creator.create(&keys).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    let streamer = tokio::spawn({
        let keys = keys.clone();
        async move { stream_until_killed(port, &keys).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    Command::new("kill")
        .args(["-KILL", &child.0.id().to_string()])
        .status()
        .unwrap();
    let _ = child.0.wait();
    let acked = streamer.await.unwrap();
    assert!(
        !acked.is_empty(),
        "nothing was acknowledged before the kill"
    );

    // Restart on the same data directory (and database): every acked message is there.
    let (_child2, port2, _, _rx2) = spawn_server(dir.path(), &env);
    let mut reader = Client::connect(&format!("ws://127.0.0.1:{port2}/ws"))
        .await
        .unwrap();
    let mut s = nanochat::client::RoomSession::new(keys.clone());
    let mut texts = std::collections::HashSet::new();
    let mut after = 0;
    let ServerFrame::Joined {
        messages, mut more, ..
    } = reader.join(&keys, Some(0)).await.unwrap()
    else {
        panic!("join after restart failed")
    };
    let mut page = messages;
    let mut stored = Vec::new();
    loop {
        for m in &page {
            texts.insert(s.open(m).expect("stored intact").text);
            after = m.seq;
        }
        stored.extend(page.iter().cloned());
        if !more {
            break;
        }
        reader
            .send_json(&serde_json::json!({"type": "history", "after": after, "limit": 200}))
            .await
            .unwrap();
        match reader.recv().await.unwrap() {
            ServerFrame::History { messages, more: m } => {
                page = messages;
                more = m;
            }
            other => panic!("{other:?}"),
        }
    }
    for text in &acked {
        assert!(
            texts.contains(text),
            "acknowledged {text} lost after SIGKILL"
        );
    }
    // The replay check survived too: the messages stored just before the kill (whose keys a
    // server may hold in memory only) are refused when sent again.
    for m in stored.iter().rev().take(3) {
        reader
            .send_json(
                &serde_json::json!({"type": "send", "ref": format!("again {}", m.seq),
                "epoch": m.epoch, "iv": m.iv, "ct": m.ct}),
            )
            .await
            .unwrap();
        loop {
            match reader.recv().await.unwrap() {
                ServerFrame::Error { code, .. } => {
                    assert_eq!(code, "replay", "seq {} sent again", m.seq);
                    break;
                }
                ServerFrame::Ack { seq, .. } => {
                    panic!("seq {} sent again after SIGKILL was stored as {seq}", m.seq)
                }
                _ => {}
            }
        }
    }
    // Seqs go on after the last stored one, whatever the room's row said at the kill.
    reader
        .send_sealed("after restart", &s.seal("a", "after restart"))
        .await
        .unwrap();
    loop {
        match reader.recv().await.unwrap() {
            ServerFrame::Ack { seq, .. } => {
                assert_eq!(seq, after + 1, "the first seq after the restart");
                break;
            }
            ServerFrame::Error { code, .. } => panic!("send after restart refused: {code:?}"),
            _ => {}
        }
    }
}

#[actix_web::test]
async fn sigkill_mid_stream_loses_no_acknowledged_message_on_sqlite() {
    sigkill_mid_stream_loses_no_acknowledged_message(None).await;
}

#[actix_web::test]
async fn sigkill_mid_stream_loses_no_acknowledged_message_on_postgres() {
    let db = crate::pg::cluster().database().await;
    sigkill_mid_stream_loses_no_acknowledged_message(Some(db.url.clone())).await;
}

/// (soft, hard) "Max open files" of a running process.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let n: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (n[0], n[1])
}

#[tokio::test]
async fn the_soft_open_file_limit_is_raised_to_fit_max_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _port, log, _rx) = spawn_server_with_open_files(
        dir.path(),
        &[("NANOCHAT__LIMITS__MAX_CONNECTIONS", "1000")],
        512,
        4096,
    );
    let wanted = 1000 + nanochat::startup::SPARE_DESCRIPTORS;
    assert_eq!(open_file_limits(child.0.id()), (wanted, 4096));
    assert!(
        log.iter()
            .any(|l| l.contains(&format!("\"open_files\":{wanted}"))),
        "{log:?}"
    );
    assert!(!log.iter().any(|l| l.contains("WARN")), "{log:?}");
}

#[tokio::test]
async fn a_hard_open_file_limit_too_small_lowers_max_connections_to_what_fits() {
    let dir = tempfile::tempdir().unwrap();
    let hard = 300;
    let fits = (hard - nanochat::startup::SPARE_DESCRIPTORS) as usize;
    let (child, port, log, _rx) = spawn_server_with_open_files(
        dir.path(),
        &[
            ("NANOCHAT__RATE__CLIENT_MAX_SOCKETS", "1000"),
            ("NANOCHAT__RATE__CLIENT_CONNECTIONS__PER_MINUTE", "100000"),
            ("NANOCHAT__RATE__CLIENT_CONNECTIONS__BURST", "1000"),
            ("NANOCHAT__RATE__GLOBAL_CONNECTIONS__PER_MINUTE", "100000"),
            ("NANOCHAT__RATE__GLOBAL_CONNECTIONS__BURST", "1000"),
        ],
        hard,
        hard,
    );
    assert_eq!(open_file_limits(child.0.id()), (hard, hard));
    let warning = log
        .iter()
        .find(|l| l.contains("open-file limit is too small"))
        .unwrap_or_else(|| panic!("no warning in {log:?}"));
    assert!(warning.contains("\"configured\":50000"), "{warning}");
    assert!(
        warning.contains(&format!("\"max_connections\":{fits}")),
        "{warning}"
    );
    // Operators see the limit in force.
    let admin = listening_port(&log, "admin_port");
    let metrics = crate::helpers::http_get(admin, "/metrics").await;
    assert!(
        metrics
            .body
            .contains(&format!("nanochat_connections_max {fits}\n")),
        "{}",
        metrics.body
    );
    // The lowered cap holds: the socket past it gets the documented 503, and the server
    // still answers (no failing accept).
    let mut open = Vec::new();
    for n in 0..fits {
        let (status, _, stream) =
            crate::abuse::upgrade(port, &format!("127.0.1.{}", n % 200 + 1), "").await;
        assert_eq!(status, 101, "socket {n}");
        open.push(stream);
    }
    let (status, _, _) = crate::abuse::upgrade(port, "127.0.2.1", "").await;
    assert_eq!(status, 503);
    drop(open.pop());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, _, stream) = crate::abuse::upgrade(port, "127.0.2.2", "").await;
        if status == 101 {
            open.push(stream);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the freed slot was never reused"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn environment(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap()
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

/// `serve` starts itself again once, in place, with glibc's allocator told to keep a fixed
/// mmap threshold (without it, freed memory stays with the process: docs/reliability.md).
#[test]
fn serve_restarts_itself_in_place_with_a_fixed_mmap_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _port, log, _rx) = spawn_server(dir.path(), &[]);
    // The process the test started is the one serving, now with the setting.
    let env = environment(child.0.id());
    assert!(
        env.iter()
            .any(|v| v == "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072"),
        "{env:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("allocator settings") && l.contains("mmap_threshold=131072")),
        "{log:?}"
    );
}

/// An operator's own `GLIBC_TUNABLES` is left as it is, and the server does not restart.
#[test]
fn an_operators_glibc_tunables_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _port, log, _rx) = spawn_server(
        dir.path(),
        &[("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")],
    );
    let env = environment(child.0.id());
    assert!(
        env.iter()
            .any(|v| v == "GLIBC_TUNABLES=glibc.malloc.arena_max=2"),
        "{env:?}"
    );
    assert!(
        !env.iter().any(|v| v.starts_with("NANOCHAT_ALLOCATOR_SET")),
        "{env:?}"
    );
    assert!(
        log.iter().any(|l| l.contains("glibc.malloc.arena_max=2")),
        "{log:?}"
    );
}

/// The `nanochat` binary run with these arguments and extra environment in `dir` (beside a
/// server started there, whose `./data` it then sees), `input` on its standard input; its exit
/// code, stdout and stderr.
fn run_nanochat<S: AsRef<std::ffi::OsStr>>(
    dir: &std::path::Path,
    env: &[(&str, &str)],
    args: &[S],
    input: &str,
) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nanochat"))
        .current_dir(dir)
        .env_remove("NANOCHAT_CONFIG")
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What the server answers a `create` of this room from 127.0.0.`host` (an address of its own,
/// so no earlier creation counts against it): the error code, or `joined`.
async fn create_from(url: &str, host: u8, keys: &nanochat::crypto::RoomKeys) -> String {
    let mut c = Client::connect_from(url, [127, 0, 0, host].into())
        .await
        .unwrap();
    match c.create(keys).await.unwrap() {
        ServerFrame::Error { code, .. } => code,
        ServerFrame::Joined { .. } => "joined".into(),
        other => panic!("{other:?}"),
    }
}

/// `nanochat room wipe LINK` for the server on `port` (named as `server.listen` 0.0.0.0).
fn room_wipe(dir: &std::path::Path, port: u16, link: &str) -> (i32, String, String) {
    let listen = format!("0.0.0.0:{port}");
    run_nanochat(
        dir,
        &[("NANOCHAT__SERVER__LISTEN", &listen)],
        &["room", "wipe", link],
        "",
    )
}

#[actix_web::test]
async fn an_operator_takes_a_reported_link_down_through_the_running_server() {
    let dir = tempfile::tempdir().unwrap();
    // One room creation per second from an address, and none saved up: the takedown of an
    // unused link below (a creation from the address that just made Alice's room) is first
    // refused with `rate_limited`, waits as told and gets through.
    let (_server, port, _, _) = spawn_server(
        dir.path(),
        &[
            ("NANOCHAT__RATE__CLIENT_CREATIONS__PER_MINUTE", "60"),
            ("NANOCHAT__RATE__CLIENT_CREATIONS__BURST", "1"),
        ],
    );
    let url = format!("ws://127.0.0.1:{port}/ws");
    let keys = random_room();
    let link = format!(
        "https://chat.example.org/#{}",
        nanochat::protocol::b64u(keys.secret())
    );
    let mut alice = Client::connect(&url).await.unwrap();
    assert!(matches!(
        alice.create(&keys).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    let mut session = nanochat::client::RoomSession::new(keys.clone());
    crate::helpers::send_acked(&mut alice, &mut session, "alice", "reported content").await;

    // The operator runs the command with the reported link (server.listen 0.0.0.0 is reached
    // on loopback): the member's window is told, the room is gone for good.
    let (code, out, err) = room_wipe(dir.path(), port, &link);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("wiped:"), "{out}");
    assert!(matches!(alice.recv().await.unwrap(), ServerFrame::Nuked));
    let mut later = Client::connect(&url).await.unwrap();
    assert!(matches!(
        later.join(&keys, None).await.unwrap(),
        ServerFrame::Error { code, .. } if code == "room_gone"
    ));
    assert_eq!(create_from(&url, 5, &keys).await, "room_gone");
    // Given on standard input (`-`), the link shows in no process list.
    let listen = format!("127.0.0.1:{port}");
    let (code, out, err) = run_nanochat(
        dir.path(),
        &[("NANOCHAT__SERVER__LISTEN", &listen)],
        &["room", "wipe", "-"],
        &format!("{link}\n"),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("already wiped"), "{out}");

    // A link no room has (never made, or expired) is blocked all the same: the bare secret works.
    let unused = random_room();
    let (code, out, err) = room_wipe(dir.path(), port, &nanochat::protocol::b64u(unused.secret()));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("no room had this link"), "{out}");
    assert_eq!(create_from(&url, 6, &unused).await, "room_gone");

    // Mistakes are named: not a link (usage, 2), no server there (1).
    let (code, _, err) = room_wipe(dir.path(), port, "https://chat.example.org/#tooshort");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a room link"), "{err}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let (code, _, err) = room_wipe(dir.path(), closed_port, &link);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is it running?"), "{err}");
}

/// A new room on the server at `url`: its creator's socket, its keys, and a session to seal
/// messages in.
async fn room_at(
    url: &str,
) -> (
    Client,
    nanochat::crypto::RoomKeys,
    nanochat::client::RoomSession,
) {
    let keys = random_room();
    let mut client = Client::connect(url).await.unwrap();
    assert!(matches!(
        client.create(&keys).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    let session = nanochat::client::RoomSession::new(keys.clone());
    (client, keys, session)
}

/// `nanochat backup DIR` with the server's directory as its working directory.
fn backup(
    dir: &std::path::Path,
    dest: &std::path::Path,
    env: &[(&str, &str)],
) -> (i32, String, String) {
    run_nanochat(
        dir,
        env,
        &[std::ffi::OsStr::new("backup"), dest.as_os_str()],
        "",
    )
}

/// A backup that would not fit is refused before it writes anything: on the data directory's
/// own volume it must also leave the server's reserve (`store.min_free_mib`), which keeps room
/// for wipes and expiry. Elsewhere the same copy is taken, and the server goes on taking
/// messages throughout.
#[actix_web::test]
async fn a_backup_that_would_eat_the_disk_reserve_is_refused_before_it_writes() {
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _mount = crate::faults::TmpfsMount::new(&data, "48m");
    let mut env = crate::faults::SEND_FREELY.to_vec();
    env.push(("NANOCHAT__STORE__MIN_FREE_MIB", "16"));
    let (_server, port, _, _) = spawn_server(dir.path(), &env);
    let url = format!("ws://127.0.0.1:{port}/ws");
    let (mut alice, _, mut session) = room_at(&url).await;
    let page = "x".repeat(4000);
    for i in 0..600 {
        crate::helpers::send_acked(&mut alice, &mut session, "alice", &format!("{i} {page}")).await;
    }
    // About 2.5 MiB of messages; 1 MiB above the reserve is left.
    crate::faults::fill_until_available(&data.join("filler"), 17 * MIB);
    // What the volume has left beside the server's own files, which its checkpointer may still
    // be growing meanwhile: a refused backup changes it by nothing.
    let spare = || {
        use std::os::unix::fs::MetadataExt as _;
        let held: u64 = ["nanochat.db", "nanochat.db-wal", "nanochat.db-shm"]
            .iter()
            .filter_map(|f| std::fs::metadata(data.join(f)).ok())
            .map(|m| m.blocks() * 512)
            .sum();
        crate::faults::available(&data) + held
    };
    let before = spare();

    let copy = data.join("backup");
    let (code, out, err) = backup(dir.path(), &copy, &env);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("the copy needs about") && err.contains("store.min_free_mib (16 MiB)"),
        "{err}"
    );
    assert!(!copy.exists(), "nothing is left behind");
    assert!(
        spare() + MIB / 2 >= before,
        "the refused copy wrote nothing"
    );
    crate::helpers::send_acked(&mut alice, &mut session, "alice", "still taken").await;

    let elsewhere = dir.path().join("backup");
    let (code, out, err) = backup(dir.path(), &elsewhere, &env);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        std::fs::metadata(elsewhere.join("nanochat.db"))
            .unwrap()
            .len()
            > 2 * MIB
    );
}

#[actix_web::test]
async fn a_backup_taken_while_the_server_writes_restores_every_room_and_message_of_its_moment() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    // A writer sending as fast as it is answered, unhindered by the message and frame limits.
    let (server, port, _, _) = spawn_server(dir.path(), &crate::faults::SEND_FREELY);
    let url = format!("ws://127.0.0.1:{port}/ws");
    let (mut alice, keys, mut session) = room_at(&url).await;
    for text in ["before 1", "before 2", "before 3"] {
        crate::helpers::send_acked(&mut alice, &mut session, "alice", text).await;
    }
    // Another room keeps the writer busy while the copy is taken.
    let busy = random_room();
    let mut writer = Client::connect_from(&url, [127, 0, 0, 7].into())
        .await
        .unwrap();
    assert!(matches!(
        writer.create(&busy).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
    let busy_keys = busy.clone();
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = acked.clone();
    let writing = tokio::spawn(async move {
        let mut s = nanochat::client::RoomSession::new(busy_keys);
        for i in 0..150 {
            crate::helpers::send_acked(&mut writer, &mut s, "w", &format!("busy {i}")).await;
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    while acked.load(std::sync::atomic::Ordering::SeqCst) < 10 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }

    let copy = dir.path().join("backup");
    let (code, out, err) = backup(dir.path(), &copy, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("backed up:"), "{out}");
    writing.await.unwrap();
    for (path, mode) in [
        (copy.clone(), 0o700),
        (copy.join("nanochat.db"), 0o600),
        (copy.join("secret"), 0o600),
    ] {
        let got = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(got, mode, "{}", path.display());
    }
    crate::helpers::send_acked(&mut alice, &mut session, "alice", "after the backup").await;
    drop((alice, server));

    // Restored: a server on the copy has the room and what it held at that moment, and the
    // busy room's messages without a hole, and both go on.
    let elsewhere = tempfile::tempdir().unwrap();
    let (_restored, port, _, _) = spawn_server(
        elsewhere.path(),
        &[("NANOCHAT__SERVER__DATA_DIR", copy.to_str().unwrap())],
    );
    let url = format!("ws://127.0.0.1:{port}/ws");
    let mut bob = Client::connect(&url).await.unwrap();
    let ServerFrame::Joined { messages, .. } = bob.join(&keys, None).await.unwrap() else {
        panic!("the restored server lets a member in")
    };
    let mut reader = nanochat::client::RoomSession::new(keys.clone());
    let texts: Vec<String> = messages
        .iter()
        .map(|m| reader.open(m).unwrap().text)
        .collect();
    assert_eq!(texts, ["before 1", "before 2", "before 3"]);
    crate::helpers::send_acked(&mut bob, &mut reader, "bob", "after the restore").await;
    let mut busy_reader = Client::connect(&url).await.unwrap();
    let ServerFrame::Joined { messages, .. } = busy_reader.join(&busy, None).await.unwrap() else {
        panic!("the busy room was restored too")
    };
    let seqs: Vec<i64> = messages.iter().map(|m| m.seq).collect();
    assert!(seqs.len() >= 10, "{seqs:?}");
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "no hole in {seqs:?}"
    );

    // Mistakes are named: a directory that exists, a server on Postgres.
    let (code, _, err) = backup(dir.path(), &copy, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("exists already"), "{err}");
    let (code, _, err) = backup(
        dir.path(),
        &dir.path().join("other"),
        &[("NANOCHAT__DATABASE__URL", "postgres://nanochat@db/nanochat")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("pg_dump"), "{err}");
}
