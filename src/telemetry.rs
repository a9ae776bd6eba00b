//! Logging setup with tracing-subscriber: an `EnvFilter` (`RUST_LOG` wins over `log.filter`)
//! and pretty or JSON output. Nothing else lives here.
//!
//! What gets logged is decided at the call sites: room ids, IPs, proofs and ciphertexts are
//! never written at info level or above.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Install the global subscriber. Calling it twice (as tests do) keeps the first one.
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}
