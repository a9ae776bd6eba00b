//! `spawn_app()`: a real server on port 0 with its own data directory and, for Postgres, its
//! own database; plus a minimal raw HTTP/1.1 client for the HTTP tests.

use std::collections::HashMap;
use std::sync::Arc;

use nanochat::client::{Client, RoomSession};
use nanochat::config::{PowMode, Rate, Settings};
use nanochat::crypto::RoomKeys;
use nanochat::protocol::ServerFrame;
use nanochat::startup::{AppState, Application, ServerHandle};

use crate::pg::{TestDb, cluster};

/// Which storage backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A running server.
pub struct TestApp {
    pub port: u16,
    pub admin_port: u16,
    /// The redirect listener's port (`tls.redirect_listen`), if one is configured.
    pub redirect_port: Option<u16>,
    pub state: Arc<AppState>,
    pub settings: Settings,
    pub dir: tempfile::TempDir,
    pub db: Option<TestDb>,
    handle: ServerHandle,
}

/// Settings for a test server: loopback, port 0, a temp data dir, quiet logs.
pub fn test_settings(dir: &std::path::Path) -> Settings {
    let mut s = Settings::default();
    s.server.listen = "127.0.0.1:0".into();
    s.server.admin_listen = "127.0.0.1:0".into();
    s.server.data_dir = dir.to_path_buf();
    s.server.workers = 2;
    s.log.filter = "warn".into();
    // Tests send faster than a person types, all from 127.0.0.1; the abuse tests set the
    // limits they exercise.
    s.limits.frames_per_second = 10_000;
    s.limits.frames_burst = 10_000;
    let lots = Rate::new(10_000_000, 1_000_000);
    let r = &mut s.rate;
    for rate in [
        &mut r.client_connections,
        &mut r.client_frames,
        &mut r.client_messages,
        &mut r.client_creations,
        &mut r.client_pow_tokens,
        &mut r.client_reads,
        &mut r.client_requests,
        &mut r.room_messages,
        &mut r.global_creations,
        &mut r.global_connections,
    ] {
        *rate = lots;
    }
    r.client_max_sockets = 100_000;
    s.limits.strike_budget = 100_000;
    s.pow.mode = PowMode::Off;
    s
}

/// Adaptive proof of work from none at all, rising as soon as rooms are created faster than
/// 60 a minute (checked every 100 ms) and never falling back during a test.
pub fn work_rising_after_a_few_creations(s: &mut Settings) {
    s.pow.mode = PowMode::Adaptive;
    s.pow.base_bits = 0;
    s.pow.max_bits = 8;
    s.pow.adjust_interval_ms = 100;
    s.pow.raise_creations_per_minute = 60;
    s.pow.raise_connections_per_minute = 10_000_000;
    s.pow.calm_intervals = 100_000;
}

/// Start a server on `backend` with default test settings.
pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

/// Start a server on `backend`, letting the test adjust the settings first.
pub async fn spawn_app_with(backend: Backend, adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = test_settings(dir.path());
    let db = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => {
            let db = cluster().database().await;
            settings.database.url = Some(db.url.clone());
            Some(db)
        }
    };
    adjust(&mut settings);
    start(settings, dir, db).await
}

/// A second server process on the same Postgres database as `first`, with the same secret.
pub async fn second_node(first: &TestApp, adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = test_settings(dir.path());
    settings.database.url = first.settings.database.url.clone();
    settings.server.secret_file = Some(first.settings.secret_path());
    adjust(&mut settings);
    start(settings, dir, None).await
}

/// Start a server with exactly these settings (data dir and database already chosen).
pub async fn start(settings: Settings, dir: tempfile::TempDir, db: Option<TestDb>) -> TestApp {
    // The server's warnings and errors go to the test's captured output, which the harness
    // shows when the test fails (the first test to start installs it for the process).
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new("nanochat=warn"))
        .try_init();
    let app = Application::build(settings.clone())
        .await
        .expect("the server builds");
    TestApp {
        port: app.port(),
        admin_port: app.admin_port(),
        redirect_port: app.redirect_port(),
        state: app.state(),
        settings,
        dir,
        db,
        handle: app.spawn(),
    }
}

impl TestApp {
    /// The Prometheus text of the admin listener's `/metrics`.
    pub async fn metrics(&self) -> String {
        http_get(self.admin_port, "/metrics").await.body
    }

    /// Error frames with this code sent so far (`nanochat_frames_rejected_total`).
    pub fn rejected(&self, code: &str) -> u64 {
        self.state
            .metrics
            .frames_rejected_total
            .with_label_values(&[code])
            .get()
    }

    /// Frames refused so far by the limiter of this name (`nanochat_rate_limited_total`).
    pub fn refused(&self, limiter: &str) -> u64 {
        self.state
            .metrics
            .rate_limited_total
            .with_label_values(&[limiter])
            .get()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.ws_url()).await.expect("connect")
    }

    /// A client that has created a fresh room.
    pub async fn room_creator(&self) -> (Client, RoomKeys) {
        let keys = random_room();
        let mut c = self.client().await;
        let answer = c.create(&keys).await.expect("create answer");
        assert!(
            matches!(answer, nanochat::protocol::ServerFrame::Joined { .. }),
            "{answer:?}"
        );
        (c, keys)
    }

    /// Graceful shutdown, as on SIGTERM.
    pub async fn shutdown(self) -> (Settings, tempfile::TempDir, Option<TestDb>) {
        self.handle.shutdown().await;
        (self.settings, self.dir, self.db)
    }

    /// Stop serving (the data directory and database stay until dropped).
    pub async fn stop(self) -> (Settings, tempfile::TempDir, Option<TestDb>) {
        self.handle.stop(false).await;
        (self.settings, self.dir, self.db)
    }
}

/// Keys of a fresh random room.
pub fn random_room() -> RoomKeys {
    let mut secret = [0u8; 32];
    rand::fill(&mut secret);
    RoomKeys::derive(&secret)
}

/// The head of a WebSocket upgrade to `/ws`, without the final empty line, for tests that speak
/// raw TCP (add headers, then `\r\n`).
pub const UPGRADE_HEAD: &str = "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n";

/// A raw HTTP response.
pub struct HttpResponse {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
    /// The body's bytes as they came (`body` is them read as UTF-8).
    pub bytes: Vec<u8>,
}

/// Send `bytes` on a new connection to `port` and read until the server ends it (within 10 s,
/// else the test fails): what came back, and how the read ended (a reset where the server
/// closed with some of the bytes unread). A server may answer and close before a huge request
/// is fully written (a 431, say); then the write or the read meets a reset, and the answer is
/// whatever arrived.
pub async fn exchange(port: u16, bytes: &[u8]) -> (Vec<u8>, std::io::Result<usize>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let _ = tcp.write_all(bytes).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tcp.read_to_end(&mut answer),
    )
    .await
    .expect("the server ends the connection within 10 s");
    (answer, read)
}

/// Send raw request bytes and read the whole response (the request should close the
/// connection).
pub async fn http_raw(port: u16, request: &str) -> HttpResponse {
    let (buf, _) = exchange(port, request.as_bytes()).await;
    parse_response(&buf)
}

/// A whole HTTP/1.1 response as it came off the wire (status 0 if nothing came back).
pub fn parse_response(buf: &[u8]) -> HttpResponse {
    let text = String::from_utf8_lossy(buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let head_len = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(buf.len(), |at| at + 4);
    HttpResponse {
        status,
        headers,
        body: body.to_owned(),
        bytes: buf[head_len..].to_vec(),
    }
}

/// GET a path.
pub async fn http_get(port: u16, path: &str) -> HttpResponse {
    http_request(port, "GET", path, "").await
}

/// The value of a series in a Prometheus scrape, by its full name (labels included).
pub fn metric_value(body: &str, series: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{series} missing:\n{body}"))
        .parse()
        .unwrap()
}

/// Seal `text` in `session`, send it and wait for its `ack`; any other answer fails the test.
pub async fn send_acked(client: &mut Client, session: &mut RoomSession, nick: &str, text: &str) {
    client
        .send_sealed("acked", &session.seal(nick, text))
        .await
        .unwrap();
    let answer = client.recv().await.unwrap();
    assert!(matches!(answer, ServerFrame::Ack { .. }), "{answer:?}");
}

/// Wait until `/readyz` answers `status` (it reflects storage within about a second).
pub async fn wait_readiness(port: u16, status: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = http_get(port, "/readyz").await.status;
        if got == status {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz stayed {got}, not {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A request with this method, path and extra header lines (each ending in `\r\n`).
pub async fn http_request(port: u16, method: &str, path: &str, headers: &str) -> HttpResponse {
    http_raw(
        port,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}\r\n"
        ),
    )
    .await
}
