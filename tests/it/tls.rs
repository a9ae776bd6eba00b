//! HTTPS served by the server itself (`[tls]`): pages and sockets over TLS with certificates
//! of a certificate authority made for the test, renewals picked up without a restart, the
//! redirect listener and certbot's challenges.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nanochat::client::{Client, RoomSession};
use nanochat::config::Settings;
use nanochat::startup::Application;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::helpers::{
    Backend, HttpResponse, TestApp, http_raw, metric_value, parse_response, random_room,
    send_acked, spawn_app, spawn_app_with, test_settings,
};

/// A certificate authority of the test's own, and the server certificates it issues.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    der: CertificateDer<'static>,
}

/// A server certificate for 127.0.0.1 and localhost, and its key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "NanoChat test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            issuer: rcgen::Issuer::new(params, key),
            der: cert.der().clone(),
        }
    }

    /// A certificate valid from 2020 until `not_after` (year, month, day).
    pub fn issue(&self, not_after: (i32, u8, u8)) -> Issued {
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A TLS client configuration that trusts this authority only.
    pub fn client(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    }
}

/// Where a server's certificate and key are: `tls.pem` and `tls.key` in its data directory.
fn tls_files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("tls.pem"), dir.join("tls.key"))
}

fn install(dir: &Path, issued: &Issued) {
    let (cert, key) = tls_files(dir);
    std::fs::write(cert, &issued.cert_pem).unwrap();
    std::fs::write(key, &issued.key_pem).unwrap();
}

/// A server on `backend` serving HTTPS with `issued` (files in its data directory).
pub async fn spawn_tls_app(
    backend: Backend,
    issued: &Issued,
    adjust: impl FnOnce(&mut Settings),
) -> TestApp {
    spawn_app_with(backend, |s| {
        install(&s.server.data_dir, issued);
        let (cert, key) = tls_files(&s.server.data_dir);
        s.tls.cert = Some(cert);
        s.tls.key = Some(key);
        adjust(s);
    })
    .await
}

/// An HTTPS request on a new connection, trusting `tls`: the response and the certificate the
/// server presented.
async fn https_get(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
) -> (HttpResponse, CertificateDer<'static>) {
    try_https_get(port, tls, path)
        .await
        .expect("a TLS handshake with a certificate the test's authority issued")
}

/// A TLS connection to the server on `port` as 127.0.0.1, trusting `tls`.
async fn tls_connect(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
}

/// [`https_get`], or the error of a handshake that did not happen.
async fn try_https_get(
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
) -> std::io::Result<(HttpResponse, CertificateDer<'static>)> {
    let mut stream = tls_connect(port, tls).await?;
    let presented = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    // The server may end TCP without TLS's close_notify after its answer: what came counts.
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("an answer within 10 s");
    Ok((parse_response(&answer), presented))
}

fn wss_url(app: &TestApp) -> String {
    format!("wss://127.0.0.1:{}/ws", app.port)
}

/// A client over wss:// that has created a fresh room on `app`.
pub async fn tls_room_creator(app: &TestApp, ca: &TestCa) -> (Client, nanochat::crypto::RoomKeys) {
    let keys = random_room();
    let mut c = Client::connect_tls(&wss_url(app), ca.client())
        .await
        .unwrap();
    let answer = c.create(&keys).await.unwrap();
    assert!(
        matches!(answer, nanochat::protocol::ServerFrame::Joined { .. }),
        "{answer:?}"
    );
    (c, keys)
}

/// Wait until a metric series reaches `value`.
async fn wait_metric(app: &TestApp, series: &str, value: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = metric_value(&app.metrics().await, series);
        if got == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed {got}, not {value}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const EXPIRY: &str = "nanochat_tls_certificate_expiry_timestamp_seconds";
const TLS_ERRORS: &str = "nanochat_http_connection_errors_total{kind=\"tls\"}";

fn expiry_of(der: &CertificateDer<'_>) -> u64 {
    nanochat::tls::not_after(der).unwrap() as u64
}

#[actix_web::test]
async fn an_instance_serves_its_pages_and_sockets_over_https_itself() {
    let ca = TestCa::new();
    let issued = ca.issue((2030, 6, 15));
    let app = spawn_tls_app(Backend::Sqlite, &issued, |s| {
        s.limits.handshake_timeout_secs = 1;
    })
    .await;
    let (page, presented) = https_get(app.port, ca.client(), "/").await;
    assert_eq!(page.status, 200);
    assert_eq!(presented, issued.der);
    assert!(page.body.contains("<html"), "{}", page.body);
    assert_eq!(
        page.headers
            .get("strict-transport-security")
            .map(String::as_str),
        Some("max-age=63072000")
    );
    assert!(page.headers.contains_key("content-security-policy"));

    // Two people in one room over wss://.
    let (mut alice, keys) = tls_room_creator(&app, &ca).await;
    let mut bob = Client::connect_tls(&wss_url(&app), ca.client())
        .await
        .unwrap();
    let answer = bob.join(&keys, None).await.unwrap();
    assert!(
        matches!(answer, nanochat::protocol::ServerFrame::Joined { .. }),
        "{answer:?}"
    );
    let mut said = RoomSession::new(keys.clone());
    send_acked(&mut alice, &mut said, "alice", "over TLS").await;
    let mut heard = RoomSession::new(keys);
    match bob.recv().await.unwrap() {
        nanochat::protocol::ServerFrame::Msg(msg) => {
            assert_eq!(heard.open(&msg).unwrap().text, "over TLS");
        }
        other => panic!("{other:?}"),
    }

    // Plain HTTP on the HTTPS port gets no page, and neither does a client that never
    // starts its handshake (closed after limits.handshake_timeout_secs); both are counted.
    let plain = http_raw(app.port, "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
    assert_eq!(plain.status, 0, "{}", plain.body);
    let started = Instant::now();
    let (silent, _) = crate::helpers::exchange(app.port, b"").await;
    assert!(silent.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(900));
    let metrics = app.metrics().await;
    assert_eq!(metric_value(&metrics, TLS_ERRORS), 2);
    assert_eq!(metric_value(&metrics, EXPIRY), expiry_of(&issued.der));
    assert_eq!(metric_value(&metrics, "nanochat_connections_open"), 2);
    // A graceful shutdown reaches TLS sockets too: close 1012, "reconnect".
    app.state.begin_shutdown();
    crate::api::expect_close(&mut alice, 1012).await;
    crate::api::expect_close(&mut bob, 1012).await;

    // A server without [tls] exports none of this.
    let plain_app = spawn_app(Backend::Sqlite).await;
    let metrics = plain_app.metrics().await;
    assert!(!metrics.contains("nanochat_tls_"), "{metrics}");
    assert!(!metrics.contains("kind=\"tls\""), "{metrics}");
}

/// Whether a browser's connection resumes an earlier one's TLS session: never, since that
/// would let the server link a visitor's connections across addresses and rooms.
#[actix_web::test]
async fn no_tls_session_is_ever_resumed() {
    let ca = TestCa::new();
    let app = spawn_tls_app(Backend::Sqlite, &ca.issue((2030, 6, 15)), |_| {}).await;
    // One client configuration keeps its sessions and tickets, as a browser does.
    let client = ca.client();
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let mut stream = tls_connect(app.port, client.clone()).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        // Reading the answer also takes in any ticket the server sends after its handshake.
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        assert_eq!(parse_response(&answer).status, 200);
        kinds.push(stream.get_ref().1.handshake_kind());
    }
    assert!(
        kinds
            .iter()
            .all(|k| *k == Some(rustls::HandshakeKind::Full)),
        "{kinds:?}"
    );
}

/// A handshake costs the server a signature: each counts as one of the client's requests, and
/// past the limit the connection is closed before any.
#[actix_web::test]
async fn tls_handshakes_count_against_the_clients_request_limit() {
    let ca = TestCa::new();
    let app = spawn_tls_app(Backend::Sqlite, &ca.issue((2030, 6, 15)), |s| {
        s.rate.client_requests = nanochat::config::Rate::new(1, 5);
    })
    .await;
    // A handshake and a request each: 2, then 4 of the burst of 5.
    for _ in 0..2 {
        let (page, _) = https_get(app.port, ca.client(), "/").await;
        assert_eq!(page.status, 200);
    }
    // The fifth unit lets the handshake through, and the request is answered 429.
    let (page, _) = https_get(app.port, ca.client(), "/").await;
    assert_eq!(page.status, 429);
    // Nothing left: no handshake at all.
    assert!(try_https_get(app.port, ca.client(), "/").await.is_err());
    let metrics = app.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "nanochat_rate_limited_total{limiter=\"client_requests\"}"
        ),
        2
    );
    assert_eq!(metric_value(&metrics, TLS_ERRORS), 0);
}

#[actix_web::test]
async fn a_renewed_certificate_is_served_from_the_next_connection_and_a_broken_one_never() {
    let ca = TestCa::new();
    let first = ca.issue((2030, 6, 15));
    let app = spawn_tls_app(Backend::Sqlite, &first, |s| {
        s.tls.reload_interval_secs = 1;
    })
    .await;
    let dir = app.settings.server.data_dir.clone();
    let (cert_path, key_path) = tls_files(&dir);
    let (mut alice, keys) = tls_room_creator(&app, &ca).await;
    let mut session = RoomSession::new(keys);
    assert_eq!(https_get(app.port, ca.client(), "/").await.1, first.der);

    // Renewal half done: the new certificate beside the old key. Not served.
    let second = ca.issue((2031, 1, 1));
    std::fs::write(&cert_path, &second.cert_pem).unwrap();
    wait_metric(&app, "nanochat_tls_reloads_total{result=\"failed\"}", 1).await;
    assert_eq!(https_get(app.port, ca.client(), "/").await.1, first.der);
    let metrics = app.metrics().await;
    assert_eq!(metric_value(&metrics, EXPIRY), expiry_of(&first.der));
    assert_eq!(
        metric_value(&metrics, "nanochat_tls_reloads_total{result=\"loaded\"}"),
        0
    );

    // Its key arrives: served from the next connection on, without a restart.
    std::fs::write(&key_path, &second.key_pem).unwrap();
    wait_metric(&app, "nanochat_tls_reloads_total{result=\"loaded\"}", 1).await;
    assert_eq!(https_get(app.port, ca.client(), "/").await.1, second.der);
    assert_eq!(
        metric_value(&app.metrics().await, EXPIRY),
        expiry_of(&second.der)
    );
    // The socket opened under the old certificate goes on.
    send_acked(&mut alice, &mut session, "alice", "still here").await;

    // The files gone (a broken renewal script): counted, the loaded pair still served.
    std::fs::remove_file(&key_path).unwrap();
    wait_metric(&app, "nanochat_tls_reloads_total{result=\"failed\"}", 2).await;
    assert_eq!(https_get(app.port, ca.client(), "/").await.1, second.der);

    // Renewed as Kubernetes updates a mounted Secret: the names are links through `..data`,
    // and a renewal writes a new directory and swaps that one link.
    let version = |name: &str, issued: &Issued| {
        let d = dir.join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("tls.pem"), &issued.cert_pem).unwrap();
        std::fs::write(d.join("tls.key"), &issued.key_pem).unwrap();
    };
    version("..v3", &second);
    std::os::unix::fs::symlink("..v3", dir.join("..data")).unwrap();
    std::fs::remove_file(&cert_path).unwrap();
    std::os::unix::fs::symlink("..data/tls.pem", &cert_path).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", &key_path).unwrap();
    wait_metric(&app, "nanochat_tls_reloads_total{result=\"loaded\"}", 2).await;
    let third = ca.issue((2031, 6, 1));
    version("..v4", &third);
    std::os::unix::fs::symlink("..v4", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    wait_metric(&app, "nanochat_tls_reloads_total{result=\"loaded\"}", 3).await;
    assert_eq!(https_get(app.port, ca.client(), "/").await.1, third.der);
    assert_eq!(
        metric_value(&app.metrics().await, EXPIRY),
        expiry_of(&third.der)
    );
}

#[actix_web::test]
async fn the_redirect_listener_sends_visitors_to_https_and_serves_certbots_challenges() {
    let ca = TestCa::new();
    let issued = ca.issue((2030, 6, 15));
    let app = spawn_tls_app(Backend::Sqlite, &issued, |s| {
        s.tls.redirect_listen = Some("127.0.0.1:0".into());
        s.tls.acme_webroot = Some(s.server.data_dir.join("acme"));
        s.rate.client_requests = nanochat::config::Rate::new(1, 12);
    })
    .await;
    let redirect = app.redirect_port.expect("a redirect listener");
    let challenges = app
        .settings
        .server
        .data_dir
        .join("acme/.well-known/acme-challenge");
    assert!(
        challenges.is_dir(),
        "made at start, for certbot to write into"
    );
    std::fs::write(challenges.join("tok_EN-1"), "tok_EN-1.thumbprint").unwrap();
    std::fs::write(challenges.join("not.a.token"), "kept").unwrap();
    let get = |path: &str, host: &str| {
        let request = match host {
            "" => format!("GET {path} HTTP/1.0\r\n\r\n"),
            host => format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        };
        async move { http_raw(redirect, &request).await }
    };
    let port = app.port;
    for (host, to) in [
        ("chat.example.org", "chat.example.org"),
        ("Chat.Example.org:80", "chat.example.org"),
        ("[::1]:80", "[::1]"),
    ] {
        let answer = get("/some/page?x=1", host).await;
        assert_eq!(answer.status, 301, "{host}");
        assert_eq!(
            answer.headers.get("location").map(String::as_str),
            Some(format!("https://{to}:{port}/some/page?x=1").as_str()),
            "{host}"
        );
    }
    assert_eq!(get("/", "").await.status, 400, "no Host");
    assert_eq!(get("/", "evil.example/path").await.status, 400);

    let answer = get("/.well-known/acme-challenge/tok_EN-1", "chat.example.org").await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (200, "tok_EN-1.thumbprint")
    );
    for path in [
        "/.well-known/acme-challenge/missing",
        "/.well-known/acme-challenge/not.a.token",
        "/.well-known/acme-challenge/..%2F..%2F..%2Ftls.key",
    ] {
        assert_eq!(get(path, "chat.example.org").await.status, 404, "{path}");
    }
    // 9 requests so far; the client's burst of 12 has 3 left, then 429.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(get("/", "chat.example.org").await.status);
    }
    assert_eq!(statuses, [301, 301, 301, 429]);
}

/// `config check` loads the pair as the server would, and says how long it is valid.
#[test]
fn config_check_loads_the_certificate_pair() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = tls_files(dir.path());
    let (one, other) = (ca.issue((2030, 6, 15)), ca.issue((2030, 6, 15)));
    std::fs::write(&cert, &one.cert_pem).unwrap();
    std::fs::write(&key, &other.key_pem).unwrap();
    let check = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_nanochat"))
            .args(["config", "check"])
            .env_remove("NANOCHAT_CONFIG")
            .env("NANOCHAT__TLS__CERT", &cert)
            .env("NANOCHAT__TLS__KEY", &key)
            .output()
            .unwrap()
    };
    let bad = check();
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("tls.key") && stderr.contains("usable pair"),
        "{stderr}"
    );
    std::fs::write(&key, &one.key_pem).unwrap();
    let good = check();
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert!(
        stdout.contains("TLS certificate valid until 2030-06-15 ("),
        "{stdout}"
    );
    assert!(stdout.contains("configuration is valid"), "{stdout}");
}

#[actix_web::test]
async fn https_starts_only_with_a_usable_pair_and_the_error_names_the_file() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path());
    let (cert, key) = tls_files(dir.path());
    settings.tls.cert = Some(cert.clone());
    settings.tls.key = Some(key.clone());
    let error = |settings: Settings| async move {
        match Application::build(settings).await {
            Ok(_) => panic!("the server started"),
            Err(e) => format!("{e:#}"),
        }
    };
    let e = error(settings.clone()).await;
    assert!(e.contains("tls.cert") && e.contains("tls.pem"), "{e}");
    let (one, other) = (ca.issue((2030, 6, 15)), ca.issue((2030, 6, 15)));
    std::fs::write(&cert, &one.cert_pem).unwrap();
    std::fs::write(&key, &other.key_pem).unwrap();
    let e = error(settings.clone()).await;
    assert!(e.contains("tls.key") && e.contains("usable pair"), "{e}");
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let e = error(settings.clone()).await;
    assert!(e.contains("tls.key"), "{e}");
    std::fs::write(&key, &one.key_pem).unwrap();
    Application::build(settings).await.expect("a usable pair");
}
