//! HTTP surface: the page and its security headers, health and readiness, metrics only on the
//! admin listener, and the server secret file.

use std::os::unix::fs::PermissionsExt as _;

use nanochat::protocol::ServerFrame;
use nanochat::startup::CONTENT_SECURITY_POLICY;

use crate::helpers::{Backend, http_get, http_raw, http_request, spawn_app, spawn_app_with, start};

#[actix_web::test]
async fn the_page_is_served_with_strict_security_headers() {
    let app = spawn_app(Backend::Sqlite).await;
    for path in ["/", "/index.html", "/nope"] {
        let r = http_get(app.port, path).await;
        assert_eq!(
            r.headers.get("content-security-policy").map(String::as_str),
            Some(CONTENT_SECURITY_POLICY),
            "{path}"
        );
        assert_eq!(
            r.headers.get("referrer-policy").map(String::as_str),
            Some("no-referrer")
        );
        assert_eq!(
            r.headers.get("x-content-type-options").map(String::as_str),
            Some("nosniff")
        );
    }
    let r = http_get(app.port, "/").await;
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"].starts_with("text/html"));
    assert!(r.body.contains("<html"));
    assert!(!CONTENT_SECURITY_POLICY.contains("unsafe-inline"));
    assert!(CONTENT_SECURITY_POLICY.contains("script-src 'self'"));
    assert_eq!(http_get(app.port, "/nope").await.status, 404);
}

/// WebSocket upgrades leave actix-web's stack at the handshake; the answer, its refusals and an
/// upgrade anywhere but `/ws` still carry the security headers.
#[actix_web::test]
async fn upgrades_and_their_refusals_carry_the_security_headers() {
    let app = spawn_app_with(Backend::Sqlite, |s| s.limits.max_connections = 1).await;
    let csp = format!(
        "content-security-policy: {}",
        CONTENT_SECURITY_POLICY.to_ascii_lowercase()
    );
    let (status, head, _open) = crate::abuse::upgrade(app.port, "127.0.0.2", "").await;
    assert_eq!(status, 101);
    assert!(head.contains(&csp), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    // The only socket allowed is taken.
    let (status, head, _) = crate::abuse::upgrade(app.port, "127.0.0.3", "").await;
    assert_eq!(status, 503);
    assert!(head.contains(&csp), "{head}");
    assert!(head.contains("retry-after: "), "{head}");
    let elsewhere = crate::helpers::UPGRADE_HEAD.replace("GET /ws ", "GET /index.html ");
    let r = http_raw(app.port, &format!("{elsewhere}\r\n")).await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.headers.get("content-security-policy").map(String::as_str),
        Some(CONTENT_SECURITY_POLICY)
    );
}

#[actix_web::test]
async fn the_client_files_are_compressed_and_revalidated_without_a_body() {
    let app = spawn_app(Backend::Sqlite).await;
    for path in ["/", "/app.js", "/crypto.js", "/style.css"] {
        let plain = http_get(app.port, path).await;
        assert_eq!(plain.status, 200, "{path}");
        assert!(!plain.headers.contains_key("content-encoding"), "{path}");
        let etag = plain.headers["etag"].clone();
        assert!(etag.starts_with('"') && etag.len() == 34, "{etag}");

        // A browser that takes gzip gets the same bytes in under half the size.
        let gz = http_request(app.port, "GET", path, "Accept-Encoding: gzip, br\r\n").await;
        assert_eq!(gz.headers["content-encoding"], "gzip", "{path}");
        assert_eq!(gz.headers["vary"], "Accept-Encoding");
        assert_eq!(gz.headers["etag"], etag);
        let mut unpacked = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(&gz.bytes[..]),
            &mut unpacked,
        )
        .unwrap();
        assert_eq!(unpacked, plain.bytes, "{path}");
        assert!(gz.bytes.len() * 2 < plain.bytes.len(), "{path}");

        // Its copy still current: 304, no body, the security headers all the same.
        let again =
            http_request(app.port, "GET", path, &format!("If-None-Match: {etag}\r\n")).await;
        assert_eq!(again.status, 304, "{path}");
        assert!(again.bytes.is_empty(), "{path}");
        assert_eq!(
            again
                .headers
                .get("content-security-policy")
                .map(String::as_str),
            Some(CONTENT_SECURITY_POLICY)
        );
        let stale = http_request(app.port, "GET", path, "If-None-Match: \"0\"\r\n").await;
        assert_eq!((stale.status, stale.bytes.len()), (200, plain.bytes.len()));

        // HEAD answers as GET would, without the body.
        let head = http_request(app.port, "HEAD", path, "").await;
        assert_eq!(head.status, 200, "{path}");
        assert_eq!(head.headers["etag"], etag);
        assert!(head.bytes.is_empty());
    }
    // The client's own tests are not part of what is served.
    assert_eq!(
        http_get(app.port, "/tests/crypto.test.mjs").await.status,
        404
    );
}

#[actix_web::test]
async fn the_page_says_how_long_this_server_keeps_messages() {
    let app = spawn_app_with(Backend::Sqlite, |s| s.retention.days = 7).await;
    let page = http_get(app.port, "/").await;
    assert!(
        page.body.contains("forgets it after 7 days"),
        "{}",
        page.body
    );
    assert!(
        page.body
            .contains("<meta name=\"nanochat-retention-days\" content=\"7\">")
    );
    assert!(!page.body.contains("{{"), "no placeholder left");
}

#[actix_web::test]
async fn the_pages_files_are_limited_per_client_and_a_refusal_is_small() {
    // Five files at once, then one a second; the client as a trusted proxy names it.
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.rate.client_requests = nanochat::config::Rate::new(60, 5);
        s.proxy.trusted = vec!["127.0.0.1/32".into()];
    })
    .await;
    let from = |ip: &str| format!("X-Forwarded-For: {ip}\r\n");
    for path in ["/", "/app.js", "/crypto.js", "/style.css", "/no-such-file"] {
        let r = http_request(app.port, "GET", path, &from("203.0.113.7")).await;
        assert_ne!(r.status, 429, "{path}");
    }
    let r = http_request(app.port, "GET", "/", &from("203.0.113.7")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.headers["connection"], "close");
    assert!(r.body.is_empty());
    assert!(
        !r.headers.contains_key("content-security-policy"),
        "a refusal goes out without the page's headers: {:?}",
        r.headers
    );
    // Health checks are not counted; another client is served.
    for _ in 0..10 {
        let r = http_request(app.port, "GET", "/healthz", &from("203.0.113.7")).await;
        assert_eq!(r.status, 200);
    }
    let r = http_request(app.port, "GET", "/", &from("203.0.113.8")).await;
    assert_eq!(r.status, 200);
    assert_eq!(app.refused("client_requests"), 1);
}

#[actix_web::test]
async fn a_flood_of_readiness_requests_checks_storage_about_once_a_second() {
    let app = spawn_app(Backend::Postgres).await;
    http_get(app.port, "/readyz").await;
    let checks = || app.state.metrics.readiness_checks_total.get();
    let (before, started) = (checks(), std::time::Instant::now());
    // 64 clients ask 2 000 times together, each answered.
    let answers: Vec<u16> = futures_util::future::join_all((0..64).map(|_| async {
        let mut statuses = Vec::new();
        for _ in 0..32 {
            statuses.push(http_get(app.port, "/readyz").await.status);
        }
        statuses
    }))
    .await
    .into_iter()
    .flatten()
    .collect();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(answers.len(), 2048);
    assert!(answers.iter().all(|&s| s == 200));
    let made = checks() - before;
    assert!(
        (made as f64) <= secs.ceil() + 1.0,
        "{made} storage checks for 2 048 requests in {secs:.1} s"
    );
}

#[actix_web::test]
async fn health_and_readiness_answer() {
    let app = spawn_app(Backend::Sqlite).await;
    let h = http_get(app.port, "/healthz").await;
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));
    let r = http_get(app.port, "/readyz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
    // Load balancers that check with HEAD get the same answer, on both listeners.
    for port in [app.port, app.admin_port] {
        for path in ["/healthz", "/readyz"] {
            let head = http_request(port, "HEAD", path, "").await;
            assert_eq!((head.status, head.bytes.len()), (200, 0), "{port}{path}");
        }
    }
}

#[actix_web::test]
async fn metrics_are_served_on_the_admin_listener_only() {
    let app = spawn_app(Backend::Sqlite).await;
    let (_alice, _keys) = app.room_creator().await;
    let public = http_get(app.port, "/metrics").await;
    assert_eq!(public.status, 404);
    assert!(!public.body.contains("nanochat_"));
    let admin = http_get(app.admin_port, "/metrics").await;
    assert_eq!(admin.status, 200);
    assert!(
        admin.body.contains("nanochat_rooms_created_total 1"),
        "{}",
        admin.body
    );
    assert!(admin.body.contains("nanochat_connections_open 1"));
    assert!(
        admin
            .body
            .contains("nanochat_frames_rejected_total{code=\"auth_failed\"} 0")
    );
}

#[actix_web::test]
async fn the_server_secret_is_created_private_and_kept_across_restarts() {
    let app = spawn_app(Backend::Sqlite).await;
    let path = app.dir.path().join("secret");
    let meta = std::fs::metadata(&path).expect("secret file created");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let secret = std::fs::read_to_string(&path).unwrap();
    let (_alice, keys) = app.room_creator().await;
    // The secret never goes into the database.
    let db = std::fs::read(app.dir.path().join("nanochat.db")).unwrap();
    let raw = nanochat::protocol::from_b64u(secret.trim()).unwrap();
    assert!(!db.windows(raw.len()).any(|w| w == raw.as_slice()));
    assert!(
        !db.windows(32).any(|w| w == keys.auth_key),
        "auth key stored wrapped"
    );
    // Whoever holds a dump of the database cannot join with what is stored: no 32 bytes of
    // the wrapped key work as the auth key.
    let wrapped: Vec<u8> = rusqlite::Connection::open(app.dir.path().join("nanochat.db"))
        .unwrap()
        .query_row(
            "SELECT auth_wrapped FROM rooms WHERE id = ?1",
            [&keys.room_id[..]],
            |r| r.get(0),
        )
        .unwrap();
    for window in wrapped.windows(32) {
        let mut thief = app.client().await;
        let mut stolen = keys.clone();
        stolen.auth_key.copy_from_slice(window);
        match thief.join(&stolen, None).await.unwrap() {
            ServerFrame::Error { code, .. } => assert_eq!(code, "auth_failed"),
            other => panic!("a stored value opened the room: {other:?}"),
        }
    }
    drop(_alice);

    // Restart on the same directory: same secret, the room still accepts its members.
    let (settings, dir, db) = app.stop().await;
    let app = start(settings, dir, db).await;
    assert_eq!(std::fs::read_to_string(&path).unwrap(), secret);
    let mut bob = app.client().await;
    assert!(matches!(
        bob.join(&keys, None).await.unwrap(),
        ServerFrame::Joined { .. }
    ));
}

#[actix_web::test]
async fn a_second_process_on_the_same_sqlite_directory_is_refused() {
    let app = spawn_app(Backend::Sqlite).await;
    let mut settings = app.settings.clone();
    settings.server.data_dir = app.dir.path().to_path_buf();
    let err = match nanochat::startup::Application::build(settings).await {
        Ok(_) => panic!("a second server opened the same data directory"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("another nanochat process is using the data directory"),
        "{err}"
    );
    assert!(err.contains("database.url"), "{err}");
}

#[actix_web::test]
async fn a_server_with_another_secret_refuses_the_database() {
    let app = spawn_app(Backend::Postgres).await;
    let (mut settings, dir, db) = app.stop().await;
    // A second node whose secret file differs from the cluster's.
    let other = tempfile::tempdir().unwrap();
    settings.server.data_dir = other.path().to_path_buf();
    let err = match nanochat::startup::Application::build(settings.clone()).await {
        Ok(_) => panic!("a node with another secret started"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("is not the one this database was set up with"),
        "{err}"
    );
    // With the cluster's secret file it starts.
    settings.server.secret_file = Some(dir.path().join("secret"));
    let app = start(settings, other, db).await;
    assert_eq!(http_get(app.port, "/readyz").await.status, 200);
}
