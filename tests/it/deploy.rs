//! The operations surface: the metrics pass `promtool check metrics` after real traffic, the
//! Prometheus config and alert rules pass promtool, the dashboard and alerts name only metrics
//! the server exports, and the deployment files are well-formed and documented.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nanochat::client::RoomSession;
use nanochat::protocol::ServerFrame;
use yaml_rust2::{Yaml, YamlLoader};

use crate::helpers::{Backend, metric_value, random_room, spawn_app};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn promtool() -> Command {
    let path = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or_else(|| {
            panic!("promtool not found: install it with `apt-get install -y prometheus`")
        });
    Command::new(path)
}

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("nanochat_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        names.insert(text[start..end].to_owned());
        i = end;
    }
    names
}

/// Send message `i` and expect its acknowledgement.
async fn send_acked(client: &mut nanochat::client::Client, s: &mut RoomSession, i: u32) {
    client
        .send_sealed(&i.to_string(), &s.seal("a", "hi"))
        .await
        .unwrap();
    let answer = client.recv().await.unwrap();
    assert!(matches!(answer, ServerFrame::Ack { .. }), "{answer:?}");
}

async fn scrape_after_traffic() -> String {
    let app = spawn_app(Backend::Postgres).await;
    let (mut alice, keys) = app.room_creator().await;
    let mut s = RoomSession::new(keys.clone());
    for i in 0..5 {
        send_acked(&mut alice, &mut s, i).await;
    }
    let mut bob = app.client().await;
    assert!(matches!(
        bob.join(&random_room(), None).await.unwrap(),
        ServerFrame::Error { .. }
    ));
    crate::helpers::http_get(app.port, "/readyz").await;
    // The start-up run and this one may meet on the maintenance lock; one of them records.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while app.state.metrics.partitions.get() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "maintenance never succeeded"
        );
        nanochat::startup::run_maintenance(&app.state).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    app.metrics().await
}

#[actix_web::test]
async fn metrics_pass_promtool_and_the_key_series_move() {
    let body = scrape_after_traffic().await;
    let mut child = promtool()
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for moved in [
        "nanochat_messages_stored_total 5",
        "nanochat_rooms_created_total 1",
        "nanochat_joins_total{result=\"auth_failed\"} 1",
        "nanochat_ack_latency_seconds_count{result=\"ok\"} 5",
        "nanochat_maintenance_runs_total{result=\"ok\"}",
        "nanochat_store_pool_connections{state=\"max\"} 16",
        "nanochat_build_info{commit=",
    ] {
        assert!(body.contains(moved), "{moved} missing:\n{body}");
    }
    assert!(
        !body.contains("nanochat_partitions 0"),
        "partitions counted"
    );
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !line.contains("room=") && !line.contains("ip="),
            "identifying label: {line}"
        );
    }
}

/// On SQLite the replay key filter's memory is exported once a message has been stored: at
/// least the smallest filter (two bytes for each of 2^20 keys), at most three of the largest.
#[actix_web::test]
async fn the_replay_filter_memory_is_exported_on_sqlite() {
    let app = spawn_app(Backend::Sqlite).await;
    let (mut alice, keys) = app.room_creator().await;
    let mut s = RoomSession::new(keys.clone());
    let filter_bytes = |body: &str| -> u64 {
        body.lines()
            .find_map(|l| l.strip_prefix("nanochat_replay_filter_bytes "))
            .unwrap_or_else(|| panic!("nanochat_replay_filter_bytes missing:\n{body}"))
            .parse()
            .unwrap()
    };
    let before = app.metrics().await;
    assert_eq!(
        filter_bytes(&before),
        0,
        "no filter before the first message"
    );
    // The first append starts the filter's build; a later one takes the finished build in.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut i = 0;
    let held = loop {
        send_acked(&mut alice, &mut s, i).await;
        i += 1;
        let held = filter_bytes(&app.metrics().await);
        if held == 2 << 20 || std::time::Instant::now() > deadline {
            break held;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(held, 2 << 20, "the built filter: 2 bytes x 2^20 keys");
}

/// The database file and its write-ahead log, as the test sees them.
fn sqlite_files(dir: &Path) -> u64 {
    ["nanochat.db", "nanochat.db-wal"]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len()))
        .sum()
}

/// What the stored data takes is exported on both backends; on SQLite also the data volume
/// and the reserve below which new messages are refused (`store.min_free_mib`). Postgres,
/// whose disk the server cannot see, exports no volume at all rather than zeros.
#[actix_web::test]
async fn storage_size_and_the_sqlite_data_volume_are_exported() {
    let app = spawn_app(Backend::Sqlite).await;
    let (mut alice, keys) = app.room_creator().await;
    let mut s = RoomSession::new(keys);
    for i in 0..50 {
        send_acked(&mut alice, &mut s, i).await;
    }
    let dir = &app.settings.server.data_dir;
    let before = sqlite_files(dir);
    let body = app.metrics().await;
    let after = sqlite_files(dir);
    let bytes = metric_value(&body, "nanochat_storage_bytes");
    assert!(
        bytes >= before.min(after) && bytes <= before.max(after) && bytes > 0,
        "{bytes} against {before}..{after}"
    );
    let v = rustix::fs::statvfs(dir).unwrap();
    assert_eq!(
        metric_value(&body, "nanochat_storage_volume_size_bytes"),
        v.f_blocks * v.f_frsize
    );
    // Other tests write to the same disk meanwhile.
    let seen = metric_value(&body, "nanochat_storage_volume_available_bytes");
    let now = v.f_bavail * v.f_frsize;
    assert!(seen.abs_diff(now) < 1 << 30, "{seen} against {now}");
    assert_eq!(
        metric_value(&body, "nanochat_storage_reserve_bytes"),
        256 << 20
    );

    let app = spawn_app(Backend::Postgres).await;
    let (mut alice, keys) = app.room_creator().await;
    let mut s = RoomSession::new(keys);
    send_acked(&mut alice, &mut s, 0).await;
    let body = app.metrics().await;
    let url = app.settings.database.url.clone().unwrap();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    actix_web::rt::spawn(conn);
    let size: i64 = client
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .unwrap()
        .get(0);
    let bytes = metric_value(&body, "nanochat_storage_bytes");
    assert!(
        bytes.abs_diff(size as u64) < 1 << 20,
        "{bytes} against {size}"
    );
    assert!(
        !body.contains("nanochat_storage_volume") && !body.contains("nanochat_storage_reserve"),
        "no volume on Postgres:\n{body}"
    );
}

#[actix_web::test]
async fn dashboards_and_alerts_cover_exactly_the_exported_metrics() {
    // Postgres exports what only it has (pool, partitions); SQLite its filter and volume.
    let body = scrape_after_traffic().await;
    // With its own HTTPS, so that the certificate's metrics are exported too.
    let ca = crate::tls::TestCa::new();
    let sqlite = crate::tls::spawn_tls_app(Backend::Sqlite, &ca.issue((2030, 6, 15)), |_| {}).await;
    let (mut alice, keys) = crate::tls::tls_room_creator(&sqlite, &ca).await;
    send_acked(&mut alice, &mut RoomSession::new(keys), 0).await;
    let body = body + &sqlite.metrics().await;
    let exported = metric_names(&body);
    let strip = |n: &str| {
        ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| n.strip_suffix(s))
            .map_or_else(|| n.to_owned(), str::to_owned)
    };
    let exported: BTreeSet<String> = exported
        .iter()
        .map(|n| strip(n))
        .chain(exported.iter().cloned())
        .collect();
    let mut watched = BTreeSet::new();
    for file in [
        "deploy/grafana/nanochat.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        let used = metric_names(&text);
        assert!(!used.is_empty());
        for name in used {
            assert!(
                exported.contains(&name),
                "{file} uses {name}, which the server does not export"
            );
            watched.insert(strip(&name));
        }
    }
    // And the other way round: every metric the server exports is on the dashboard or in an
    // alert, except the two that describe the process rather than its behaviour.
    for name in exported.iter().map(|n| strip(n)) {
        if name == "nanochat_build_info" || name == "nanochat_start_time_seconds" {
            continue;
        }
        assert!(
            watched.contains(&name),
            "{name} is exported but neither the dashboard nor an alert shows it"
        );
    }
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/nanochat.json")).unwrap(),
    )
    .unwrap();
    assert!(dash["panels"].as_array().unwrap().len() >= 15);
}

#[test]
fn prometheus_config_and_rules_pass_promtool() {
    let dir = root().join("deploy/prometheus");
    // Syntax checks, then the rules' own unit tests (given series, which alerts fire).
    for (command, file) in [
        (["check", "config"], "prometheus.yml"),
        (["check", "rules"], "alerts.yml"),
        (["test", "rules"], "alerts-test.yml"),
    ] {
        let out = promtool()
            .args(command)
            .arg(dir.join(file))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {} {file}: {}{}",
            command.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    for alert in [
        "NanoChatDown",
        "NanoChatStorageErrors",
        "NanoChatMaintenanceStale",
        "NanoChatAckLatencyHigh",
        "NanoChatAbuseSpike",
        "NanoChatPowAtMaximum",
        "NanoChatClusterListenerDown",
        "NanoChatConnectionsNearLimit",
    ] {
        assert!(
            rules.contains(&format!("alert: {alert}")),
            "{alert} missing"
        );
    }
}

fn yaml_docs(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_compose_file_is_valid_yaml_and_refers_to_existing_files() {
    let dir = root().join("deploy/compose");
    let docs = yaml_docs(&dir.join("docker-compose.yml"));
    let services = docs[0]["services"].as_hash().expect("services");
    for name in ["nanochat", "postgres", "prometheus", "grafana"] {
        assert!(
            services.contains_key(&Yaml::String(name.into())),
            "{name} service"
        );
    }
    let build = &docs[0]["services"]["nanochat"]["build"];
    let context = dir.join(build["context"].as_str().unwrap());
    assert!(
        context
            .join(build["dockerfile"].as_str().unwrap())
            .is_file()
    );
    let mut mounts = 0;
    for (_, service) in services {
        for v in service["volumes"].as_vec().into_iter().flatten() {
            let spec = v.as_str().unwrap();
            if spec.starts_with('.') {
                let host = spec.split(':').next().unwrap();
                assert!(dir.join(host).exists(), "{spec}: {host} does not exist");
                mounts += 1;
            }
        }
    }
    assert!(mounts >= 4, "config files are mounted from the repository");
}

#[test]
fn the_dockerfile_builds_and_runs_the_binary_cargo_produces() {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    assert!(manifest.contains("[[bin]]\nname = \"nanochat\""));
    let docker = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(docker.contains("cargo build --release"));
    assert!(docker.contains("/src/target/release/nanochat "));
    assert!(docker.contains("ENTRYPOINT [\"/usr/local/bin/nanochat\"]"));
    assert!(docker.contains("USER nanochat"));
    assert!(docker.contains("HEALTHCHECK") && docker.contains("/healthz"));
    assert!(docker.contains("0.0.0.0:8080"));
    assert!(docker.contains("VOLUME [\"/var/lib/nanochat\"]"));
}

/// Docker cannot run here, so the build stage's first step runs as the Dockerfile says: its
/// stub files must give every target the manifest names a file (cargo refuses the manifest
/// otherwise, and the image does not build); and what the build does not need stays out of the
/// build context.
#[test]
fn the_dockerfiles_dependency_layer_gives_every_target_of_the_manifest_a_file() {
    let manifest: toml::Table = std::fs::read_to_string(root().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let mut targets = vec!["src/main.rs".to_owned(), "src/lib.rs".to_owned()];
    for (kind, folder) in [("bin", "src/bin"), ("test", "tests"), ("bench", "benches")] {
        for target in manifest
            .get(kind)
            .and_then(|t| t.as_array())
            .into_iter()
            .flatten()
        {
            let path = target.get("path").and_then(|p| p.as_str()).map_or_else(
                || format!("{folder}/{}.rs", target["name"].as_str().unwrap()),
                str::to_owned,
            );
            targets.push(path);
        }
    }
    assert!(targets.len() >= 7, "{targets:?}");

    let docker = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let joined = docker.replace("\\\n", " ");
    let stub = joined
        .split_once("COPY Cargo.toml Cargo.lock ./\nRUN ")
        .and_then(|(_, rest)| rest.split_once("&& cargo build"))
        .map(|(stub, _)| stub)
        .expect("a RUN after copying the manifest that makes stubs, then cargo build");
    let dir = tempfile::tempdir().unwrap();
    let ran = std::process::Command::new("sh")
        .arg("-c")
        .arg(stub)
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(ran.success(), "{stub}");
    for path in &targets {
        assert!(
            dir.path().join(path).is_file(),
            "the Dockerfile's stub step makes no {path}, which Cargo.toml names"
        );
    }

    let ignored = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    for kept_out in ["target/", "**/node_modules/", "data/", ".git/"] {
        assert!(ignored.lines().any(|l| l.trim() == kept_out), "{kept_out}");
    }
}

#[test]
fn kubernetes_and_systemd_files_are_well_formed_and_hardened() {
    for entry in std::fs::read_dir(root().join("deploy/k8s")).unwrap() {
        let path = entry.unwrap().path();
        for doc in yaml_docs(&path) {
            assert!(doc["apiVersion"].as_str().is_some(), "{}", path.display());
            assert!(doc["kind"].as_str().is_some(), "{}", path.display());
        }
    }
    let deployment = &yaml_docs(&root().join("deploy/k8s/deployment.yaml"))[0];
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let container = &pod["containers"][0];
    assert!(container["readinessProbe"]["httpGet"]["path"].as_str() == Some("/readyz"));
    assert!(container["livenessProbe"]["httpGet"]["path"].as_str() == Some("/healthz"));
    assert!(
        container["resources"]["limits"]["memory"]
            .as_str()
            .is_some()
    );
    let unit = std::fs::read_to_string(root().join("deploy/systemd/nanochat.service")).unwrap();
    for directive in [
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "StateDirectory=nanochat",
        "DynamicUser=yes",
    ] {
        assert!(unit.contains(directive), "{directive}");
    }
    // The HTTPS drop-in: one capability, to bind 443 and 80, and settings the server takes.
    let https = std::fs::read_to_string(root().join("deploy/systemd/nanochat-https.conf")).unwrap();
    assert!(https.contains("\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE\n"));
    assert!(https.contains("\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n"));
    let env: Vec<(String, String)> = https
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .map(|kv| kv.replace("%d", "/run/credentials/nanochat.service"))
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let settings =
        nanochat::config::Settings::load_from(None, env).expect("the drop-in's settings are valid");
    assert_eq!(settings.server.listen, "[::]:443");
    assert_eq!(settings.tls.redirect_listen.as_deref(), Some("[::]:80"));
    for (key, credential) in [
        (&settings.tls.cert, "fullchain.pem"),
        (&settings.tls.key, "privkey.pem"),
    ] {
        let key = key.as_ref().expect("tls.cert and tls.key set");
        assert!(key.ends_with(credential), "{}", key.display());
        assert!(https.contains(&format!(
            "\nLoadCredential={credential}:/etc/letsencrypt/live/"
        )));
    }
    let webroot = settings.tls.acme_webroot.expect("tls.acme_webroot set");
    assert!(https.contains(&format!("--webroot -w {}", webroot.display())));
    let nginx = std::fs::read_to_string(root().join("deploy/nginx/nanochat.conf")).unwrap();
    assert!(nginx.contains("proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"));
    assert!(nginx.contains("proxy_set_header Upgrade $http_upgrade;"));
    // No TLS session resumption, which would link a browser's connections.
    assert!(nginx.contains("\n    ssl_session_tickets off;\n"));
    assert!(!nginx.contains("ssl_session_cache"));
    // The origin check compares the page with the host the browser asked for.
    let ws_block = nginx.split("location = /ws").nth(1).expect("a /ws block");
    assert!(ws_block.contains("proxy_set_header Host $host;"));
    let torrc = std::fs::read_to_string(root().join("deploy/tor/torrc")).unwrap();
    assert!(torrc.contains("HiddenServicePoWDefensesEnabled 1"));
    assert!(torrc.contains("HiddenServiceMaxStreams 64"));
    // One address cannot hold all of nginx's connections.
    assert!(nginx.contains("limit_conn_zone $binary_remote_addr zone=nanochat_conn:10m;"));
    assert!(nginx.contains("limit_conn nanochat_conn 64;"));
    // Each client address stays with one process, whose per-client limits then hold.
    let upstream = nginx
        .split("upstream nanochat {")
        .nth(1)
        .expect("an upstream block");
    assert!(upstream.contains("hash $binary_remote_addr consistent;"));
    assert_eq!(nginx.matches("proxy_pass http://nanochat;").count(), 2);
    // The Tor settings file is a valid server configuration, and it expects Tor's circuit line
    // exactly when the torrc has Tor send it (with one and not the other, nothing connects).
    let tor = nanochat::config::Settings::load_from(
        Some(&root().join("deploy/tor/nanochat.toml")),
        Vec::new(),
    )
    .expect("deploy/tor/nanochat.toml is valid");
    assert!(tor.server.onion_circuit_ids);
    assert!(torrc.contains("\nHiddenServiceExportCircuitID haproxy\n"));
}

#[test]
fn the_operator_guide_references_every_deployment_file() {
    let guide = std::fs::read_to_string(root().join("docs/operating.md")).unwrap();
    let mut stack = vec![root().join("deploy")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(root())
                .unwrap()
                .to_string_lossy()
                .into_owned();
            assert!(
                guide.contains(&rel),
                "docs/operating.md does not mention {rel}"
            );
        }
    }
}
