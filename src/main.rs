//! The `nanochat` binary: parse the command line, load settings, start logging, then serve,
//! migrate, check the configuration, or take a room down.

use std::path::PathBuf;
use std::process::ExitCode;

use nanochat::config::Settings;
use nanochat::startup::Application;

const USAGE: &str = "\
usage: nanochat [--config PATH] [COMMAND]

commands:
  serve          run the server (default)
  migrate        apply database migrations and exit
  config check   validate the configuration (and load tls.cert and tls.key) and exit
  backup DIR     copy the SQLite database (consistent, also while the server runs) and the
                 server secret into the new directory DIR; restore by putting both into
                 server.data_dir while no server runs there
  room wipe LINK take a room down: through the running server (at server.listen), delete
                 its messages, close its sockets and block its link, as its panic button
                 does, without reading anything; LINK is https://host/#<secret>, <secret>,
                 or - to read it from standard input

The config file may also be named by NANOCHAT_CONFIG; every key can be set with an
environment variable NANOCHAT__SECTION__KEY (see deploy/nanochat.toml).";

enum Command {
    Serve,
    Migrate,
    ConfigCheck,
    Backup(PathBuf),
    RoomWipe([u8; nanochat::crypto::SECRET_LEN]),
}

fn parse_args() -> Result<(Option<PathBuf>, Command), String> {
    let mut config = std::env::var_os("NANOCHAT_CONFIG").map(PathBuf::from);
    let mut words = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => {
                config = Some(args.next().ok_or("--config needs a path")?.into());
            }
            "--help" | "-h" => return Err(String::new()),
            "--version" | "-V" => {
                println!("nanochat {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            _ => words.push(arg),
        }
    }
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let command = match words.as_slice() {
        [] | ["serve"] => Command::Serve,
        ["migrate"] => Command::Migrate,
        ["config", "check"] => Command::ConfigCheck,
        ["backup", dir] => Command::Backup(dir.into()),
        ["room", "wipe", link] => {
            // `-`: the link on standard input, so that it shows in no process list or history.
            let mut line = String::new();
            if *link == "-" {
                std::io::stdin()
                    .read_line(&mut line)
                    .map_err(|e| format!("room wipe: reading the link from stdin: {e}"))?;
            }
            let link = if *link == "-" { line.as_str() } else { link };
            Command::RoomWipe(nanochat::client::secret_from_link(link).ok_or(
                "room wipe: not a room link (the part after # must be 43 characters of base64url)",
            )?)
        }
        other => return Err(format!("unknown command: {}", other.join(" "))),
    };
    Ok((config, command))
}

/// The glibc allocator setting the server runs with (see [`steady_allocator`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const GLIBC_TUNABLES: &str = "glibc.malloc.mmap_threshold=131072";
/// Set in the environment of the restarted process, so it never restarts twice (glibc drops
/// `GLIBC_TUNABLES` itself from a binary given file capabilities, such as the right to bind
/// port 443).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const RESTARTED: &str = "NANOCHAT_ALLOCATOR_SET";

/// Keep glibc's allocator from holding freed memory: by default, each time a block of 128 KiB
/// or more is freed, glibc raises the size at which it maps blocks of their own (up to 32 MiB)
/// and lets each of its per-thread arenas (up to 16 on two cores) keep twice that much free
/// memory before returning any. The server frees such blocks all the time (the replay key
/// filter, a generation of index entries, grown buffers), so in a 30-minute soak glibc held
/// three and a half times what the server had allocated (docs/reliability.md, *Soak*). A
/// fixed threshold turns that off. It can only be set before the allocator starts, from the
/// environment, so the server starts itself again once, in place (same process id), with
/// `GLIBC_TUNABLES` set. An operator who sets `GLIBC_TUNABLES` (even empty) keeps their own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn steady_allocator() {
    use std::os::unix::process::CommandExt as _;
    if std::env::var_os("GLIBC_TUNABLES").is_some() || std::env::var_os(RESTARTED).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    let e = cmd
        .args(args)
        .env("GLIBC_TUNABLES", GLIBC_TUNABLES)
        .env(RESTARTED, "1")
        .exec();
    // Only reached when the exec failed: serve with glibc's defaults.
    eprintln!("nanochat: could not restart with GLIBC_TUNABLES={GLIBC_TUNABLES}: {e}");
}

fn main() -> ExitCode {
    let (config, command) = match parse_args() {
        Ok(parsed) => parsed,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("nanochat: {msg}\n");
            }
            eprintln!("{USAGE}");
            return if msg.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    // Before anything else is read, so the restarted process is the only one that does.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if let Command::Serve = command {
        steady_allocator();
    }
    let settings = match Settings::load(config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nanochat: {e}");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::ConfigCheck => {
            // The certificate pair too: a server would not start without a usable one.
            if let (Some(cert), Some(key)) = (&settings.tls.cert, &settings.tls.key) {
                match nanochat::tls::load(cert, key) {
                    Ok(loaded) => {
                        let day = loaded.not_after.div_euclid(86_400);
                        let (y, m, d) = nanochat::store::postgres::civil_from_days(day);
                        let left = day - nanochat::store::now_ms().div_euclid(86_400_000);
                        println!("TLS certificate valid until {y:04}-{m:02}-{d:02} ({left} days)");
                    }
                    Err(e) => {
                        eprintln!("nanochat: tls.cert, tls.key: {e:#}");
                        return ExitCode::from(2);
                    }
                }
            }
            println!("configuration is valid");
            return ExitCode::SUCCESS;
        }
        Command::RoomWipe(secret) => return room_wipe(&settings, &secret),
        Command::Backup(dir) => return backup(&settings, &dir),
        _ => {}
    }
    nanochat::telemetry::init(&settings.log);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if let Some(tunables) = std::env::var_os("GLIBC_TUNABLES") {
        tracing::info!(glibc_tunables = %tunables.to_string_lossy(), "allocator settings");
    }
    let result = actix_web::rt::System::new().block_on(async move {
        match command {
            Command::Migrate => {
                let store = nanochat::store::open(&settings).await?;
                tracing::info!(backend = store.backend(), "database is migrated");
                Ok(())
            }
            _ => Application::build(settings)
                .await?
                .run_until_stopped()
                .await
                .map_err(Into::into),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let e: anyhow::Error = e;
            eprintln!("nanochat: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `room wipe`: the operator's takedown of a reported link, through the running server so
/// that every process and every open window learns of it at once.
fn room_wipe(settings: &Settings, secret: &[u8; nanochat::crypto::SECRET_LEN]) -> ExitCode {
    use nanochat::client::{Takedown, take_down};
    let Ok(mut addr) = settings.server.listen.parse::<std::net::SocketAddr>() else {
        eprintln!(
            "nanochat: server.listen `{}` is not an address to connect to",
            settings.server.listen
        );
        return ExitCode::from(2);
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url = format!("ws://{addr}/ws");
    let keys = nanochat::crypto::RoomKeys::derive(secret);
    let days = settings.retention.tombstone_days;
    let result = actix_web::rt::System::new().block_on(take_down(&url, &keys));
    match result {
        Ok(Takedown::Wiped) => println!(
            "wiped: every message of the room is deleted, its open windows were told, and its \
             link stays blocked for {days} days"
        ),
        Ok(Takedown::AlreadyWiped) => {
            println!("already wiped: the room's link stays blocked")
        }
        Ok(Takedown::Blocked) => println!(
            "no room had this link (never made, or expired); it is now blocked for {days} days"
        ),
        Err(e @ nanochat::client::ClientError::Ws(_)) => {
            eprintln!(
                "nanochat: room wipe: cannot reach the server at {url} (is it running?): {e}"
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("nanochat: room wipe through {url}: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// `backup DIR`: the embedded database and the server secret, the two things a restore needs.
fn backup(settings: &Settings, dir: &std::path::Path) -> ExitCode {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if settings.database.url.is_some() {
        eprintln!(
            "nanochat: backup copies the embedded SQLite database; this server uses Postgres: \
             back that up with pg_dump or base backups, and keep a copy of the server secret \
             ({}) with it (docs/operating.md, Back up)",
            settings.secret_path().display()
        );
        return ExitCode::from(2);
    }
    if dir.exists() {
        eprintln!(
            "nanochat: backup: {} exists already; name a new directory",
            dir.display()
        );
        return ExitCode::from(2);
    }
    let result = (|| -> anyhow::Result<u64> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let size = nanochat::store::sqlite::backup(
            &settings.server.data_dir,
            &dir.join("nanochat.db"),
            settings.store.min_free_mib.saturating_mul(1 << 20),
        )?;
        let secret = dir.join("secret");
        std::fs::copy(settings.secret_path(), &secret).map_err(|e| {
            anyhow::anyhow!(
                "cannot copy the server secret {}: {e}",
                settings.secret_path().display()
            )
        })?;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
        Ok(size)
    })();
    match result {
        Ok(size) => {
            println!(
                "backed up: {}/nanochat.db ({size} bytes, the database as of now) and {}/secret; \
                 to restore, stop the server and put both into server.data_dir",
                dir.display(),
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            // Leave nothing behind: the directory was made here, and is empty unless the copy
            // got that far (then it stays, for the operator to look at).
            let _ = std::fs::remove_dir(dir);
            eprintln!("nanochat: backup: {e:#}");
            ExitCode::FAILURE
        }
    }
}
