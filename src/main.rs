//! The `nanochat` binary: parse the command line, load settings, start logging, then serve,
//! migrate, or check the configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use nanochat::config::Settings;
use nanochat::startup::Application;

const USAGE: &str = "\
usage: nanochat [--config PATH] [COMMAND]

commands:
  serve          run the server (default)
  migrate        apply database migrations and exit
  config check   validate the configuration and exit

The config file may also be named by NANOCHAT_CONFIG; every key can be set with an
environment variable NANOCHAT__SECTION__KEY (see deploy/nanochat.toml).";

enum Command {
    Serve,
    Migrate,
    ConfigCheck,
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
        other => return Err(format!("unknown command: {}", other.join(" "))),
    };
    Ok((config, command))
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
    let settings = match Settings::load(config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nanochat: {e}");
            return ExitCode::from(2);
        }
    };
    if let Command::ConfigCheck = command {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    nanochat::telemetry::init(&settings.log);
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
