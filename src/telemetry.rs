//! Logging setup with tracing-subscriber: an `EnvFilter` (`RUST_LOG` wins over `log.filter`)
//! and pretty or JSON output. Nothing else lives here.
//!
//! What gets logged is decided at the call sites: room ids, IPs, proofs and ciphertexts are
//! never written at info level or above.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// actix-http logs every connection whose request is malformed, or too slow, at error level
/// ("stream error: ..."): any client could fill the log, and page whoever alerts on errors,
/// with a line per connection. Those are counted instead
/// (`nanochat_http_connection_errors_total`), and this directive joins every filter that does
/// not name `actix_http` itself.
const HTTP_ERRORS_OFF: &str = "actix_http::h1::dispatcher=off";

/// The filter for directives `asked` (from `RUST_LOG` or `log.filter`).
fn with_http_errors_off(asked: &str) -> String {
    if asked.contains("actix_http") {
        asked.to_owned()
    } else if asked.trim().is_empty() {
        HTTP_ERRORS_OFF.to_owned()
    } else {
        format!("{asked},{HTTP_ERRORS_OFF}")
    }
}

/// Install the global subscriber. Calling it twice (as tests do) keeps the first one.
pub fn init(settings: &LogSettings) {
    let parse = |asked: &str| EnvFilter::try_new(with_http_errors_off(asked)).ok();
    let filter = std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .and_then(|asked| parse(&asked))
        .or_else(|| parse(&settings.filter))
        .unwrap_or_else(|| EnvFilter::new(with_http_errors_off("info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_http_layers_per_connection_errors_stay_out_of_the_log_unless_asked_for() {
        assert_eq!(
            with_http_errors_off("info"),
            "info,actix_http::h1::dispatcher=off"
        );
        assert_eq!(
            with_http_errors_off("nanochat=debug,warn"),
            "nanochat=debug,warn,actix_http::h1::dispatcher=off"
        );
        assert_eq!(with_http_errors_off(""), "actix_http::h1::dispatcher=off");
        // An operator who names actix-http gets what they ask for.
        assert_eq!(
            with_http_errors_off("info,actix_http=trace"),
            "info,actix_http=trace"
        );
        assert!(EnvFilter::try_new(with_http_errors_off("info")).is_ok());
    }
}
