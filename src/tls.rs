//! HTTPS on the public listener itself (`[tls]`), for an instance with no proxy in front.
//!
//! The certificate and key are read from PEM files (certbot's `fullchain.pem` and
//! `privkey.pem`, say) at start, where any problem stops the server with the file named, and
//! looked at again every `tls.reload_interval_secs`: a renewed pair is served from the next
//! handshake on. A pair that cannot be used (half written, a key that does not match) is
//! logged and counted, and the one already loaded goes on being served. The certificate's
//! expiry is exported so an alert can say when renewals stopped working.
//!
//! There is no session resumption: a resumed session would link a browser's connections
//! across addresses and rooms (see [`Tls::new`]).
//!
//! Connections are [`Conn`]s for the HTTP layer either way; the WebSocket code reads and
//! writes a TLS connection's two halves through [`tokio::io::split`] (see
//! [`crate::websocket::split`]).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_util::either::Either;

use crate::metrics::Metrics;

/// A public connection, as the HTTP layer and the WebSocket code see it: plain TCP (`Left`),
/// or TLS (`Right`, boxed: its state is large and most servers have none).
pub type Conn = Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>;

/// What identifies a version of the two files: each one's size, change time and inode, after
/// following symbolic links (certbot's `live/` names are links it moves to new files).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp([(u64, SystemTime, u64); 2]);

fn stamp(cert: &Path, key: &Path) -> io::Result<Stamp> {
    let one = |path: &Path| -> io::Result<(u64, SystemTime, u64)> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(path)?;
        Ok((m.len(), m.modified()?, m.ino()))
    };
    Ok(Stamp([one(cert)?, one(key)?]))
}

/// A certificate chain with its key, ready to serve.
pub struct Loaded {
    key: Arc<CertifiedKey>,
    /// The server certificate's last valid second (Unix time).
    pub not_after: i64,
}

/// Read and check a certificate chain and its key: every problem names its file.
pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Loaded> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read certificates from {}", cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "{} holds no certificate (PEM, BEGIN CERTIFICATE)",
        cert.display()
    );
    let private = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read a private key from {}", key.display()))?;
    let not_after = not_after(&chain[0]).with_context(|| {
        format!(
            "{}: the first certificate is not a valid X.509 certificate",
            cert.display()
        )
    })?;
    let certified = CertifiedKey::from_der(chain, private, &provider()).map_err(|e| {
        anyhow::anyhow!(
            "{} and {} do not make a usable pair: {e}",
            cert.display(),
            key.display()
        )
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        not_after,
    })
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The certificate being served, swapped when the files change.
pub struct Certificates {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificates")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// HTTPS for the public listener: the files loaded once (an error stops the server), the
/// acceptor, and the task that reloads them when they change.
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    certificates: Arc<Certificates>,
    loaded_at: Stamp,
}

impl Tls {
    pub fn new(cert: &Path, key: &Path, metrics: &Metrics) -> anyhow::Result<Tls> {
        let loaded_at = stamp(cert, key).with_context(|| {
            format!(
                "cannot read tls.cert {} or tls.key {}",
                cert.display(),
                key.display()
            )
        })?;
        let loaded = load(cert, key)?;
        metrics.tls().expiry.set(loaded.not_after);
        warn_if_expiring(loaded.not_after);
        let certificates = Arc::new(Certificates {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(loaded.key),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("TLS versions")?
            .with_no_client_auth()
            .with_cert_resolver(certificates.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // No session resumption: a session id or ticket would let the server tell that two
        // connections, from different addresses or to different rooms, come from one browser.
        // Every handshake is a full one (about 170 µs of CPU here, benches/README.md).
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            certificates,
            loaded_at,
        })
    }

    /// Look at both files every `every`; serve a changed pair once it loads. A pair that does
    /// not is logged and counted once per change of the files, and the old one stays.
    pub async fn reload_loop(self: Arc<Self>, every: Duration, metrics: Arc<Metrics>) {
        let certs = &self.certificates;
        let mut seen = Some(self.loaded_at.clone());
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let now = stamp(&certs.cert, &certs.key);
            if now.as_ref().ok() == seen.as_ref() {
                continue;
            }
            seen = now.as_ref().ok().cloned();
            let loaded = now
                .with_context(|| {
                    format!(
                        "cannot read tls.cert {} or tls.key {}",
                        certs.cert.display(),
                        certs.key.display()
                    )
                })
                .and_then(|_| load(&certs.cert, &certs.key));
            let gauges = metrics.tls();
            match loaded {
                Ok(loaded) => {
                    *certs.current.write().unwrap_or_else(|e| e.into_inner()) = loaded.key;
                    gauges.expiry.set(loaded.not_after);
                    gauges.reloads.with_label_values(&["loaded"]).inc();
                    tracing::info!(
                        not_after = loaded.not_after,
                        "TLS certificate reloaded: new connections get the new one"
                    );
                    warn_if_expiring(loaded.not_after);
                }
                Err(e) => {
                    gauges.reloads.with_label_values(&["failed"]).inc();
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "the changed TLS certificate or key cannot be used; still serving the one \
                         loaded before"
                    );
                }
            }
        }
    }
}

fn warn_if_expiring(not_after: i64) {
    let now = crate::store::now_ms() / 1000;
    if not_after < now + 14 * 86_400 {
        tracing::warn!(
            not_after,
            days_left = (not_after - now) / 86_400,
            "the TLS certificate expires within 14 days (or has): renew it"
        );
    }
}

/// One DER element at the start of `input`: its tag, its contents and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (len <= rest.len()).then(|| (tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// The `notAfter` of an X.509 certificate (RFC 5280, 4.1), as Unix time; `None` if the DER
/// does not have the shape of one.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let expect = |input, tag| match element(input) {
        Some((t, contents, rest)) if t == tag => Some((contents, rest)),
        _ => None,
    };
    let (certificate, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(certificate, SEQUENCE)?;
    let mut rest = tbs;
    if let Some((_, after)) = expect(rest, VERSION) {
        rest = after;
    }
    // serialNumber, signature, issuer
    for tag in [INTEGER, SEQUENCE, SEQUENCE] {
        rest = expect(rest, tag)?.1;
    }
    let (validity, _) = expect(rest, SEQUENCE)?;
    let (_, _, after_not_before) = element(validity)?;
    let (tag, time, _) = element(after_not_before)?;
    der_time(tag, time)
}

/// UTCTime `YYMMDDHHMMSSZ` (years 1950-2049) or GeneralizedTime `YYYYMMDDHHMMSSZ`, the forms
/// RFC 5280 allows, as Unix time.
fn der_time(tag: u8, time: &[u8]) -> Option<i64> {
    let (year, rest) = match (tag, time.len()) {
        (UTC_TIME, 13) => {
            let yy = number(&time[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &time[2..])
        }
        (GENERALIZED_TIME, 15) => (number(&time[..4])?, &time[4..]),
        _ => return None,
    };
    let field = |i: usize| number(&rest[i..i + 2]);
    let (month, day, hour, minute, second) =
        (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if rest[10] != b'Z' || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let days = crate::store::postgres::days_from_civil(
        year,
        u32::try_from(month).ok()?,
        u32::try_from(day).ok()?,
    )?;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

fn number(digits: &[u8]) -> Option<i64> {
    digits.iter().try_fold(0i64, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(not_after: (i32, u8, u8)) -> rcgen::CertifiedKey<rcgen::KeyPair> {
        let mut params = rcgen::CertificateParams::new(vec!["chat.example.org".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        rcgen::CertifiedKey {
            cert,
            signing_key: key,
        }
    }

    #[test]
    fn the_expiry_is_read_from_both_time_forms() {
        // 2026-12-31 is a UTCTime, 2051 a GeneralizedTime (RFC 5280 switches in 2050).
        for ((y, m, d), days) in [((2026, 12, 31), 20_818), ((2051, 3, 1), 29_644)] {
            let c = certificate((y, m, d));
            assert_eq!(not_after(c.cert.der()), Some(days * 86_400), "{y}-{m}-{d}");
        }
    }

    #[test]
    fn anything_else_has_no_expiry_and_nothing_panics() {
        let der = certificate((2030, 6, 15)).cert.der().to_vec();
        assert!(not_after(&der).is_some());
        for len in 0..der.len() {
            assert_eq!(not_after(&der[..len]), None, "cut at {len}");
        }
        let mut flipped = der.clone();
        for i in 0..der.len().min(400) {
            for bit in [0x01, 0x80] {
                flipped[i] ^= bit;
                let _ = not_after(&flipped);
                flipped[i] ^= bit;
            }
        }
        assert_eq!(not_after(b"not a certificate"), None);
        for (tag, time) in [
            (UTC_TIME, &b"261331000000Z"[..]),
            (UTC_TIME, b"261231240000Z"),
            (UTC_TIME, b"2612310000000"),
            (UTC_TIME, b"26123100000Z"),
            (GENERALIZED_TIME, b"20260230000000Z"),
            (GENERALIZED_TIME, b"2026123100000+Z"),
            (INTEGER, b"261231000000Z"),
        ] {
            assert_eq!(
                der_time(tag, time),
                None,
                "{}",
                String::from_utf8_lossy(time)
            );
        }
        assert_eq!(der_time(UTC_TIME, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(der_time(UTC_TIME, b"500101000000Z"), Some(-631_152_000));
    }

    #[test]
    fn a_pair_loads_and_a_mismatch_or_a_missing_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let a = certificate((2030, 6, 15));
        let b = certificate((2030, 6, 15));
        let cert = write("cert.pem", &a.cert.pem());
        let key = write("key.pem", &a.signing_key.serialize_pem());
        let other_key = write("other.pem", &b.signing_key.serialize_pem());
        let loaded = load(&cert, &key).unwrap();
        assert_eq!(loaded.not_after, not_after(a.cert.der()).unwrap());
        let e = format!("{:#}", load(&cert, &other_key).err().unwrap());
        assert!(e.contains("other.pem") && e.contains("usable pair"), "{e}");
        let e = format!(
            "{:#}",
            load(&dir.path().join("none.pem"), &key).err().unwrap()
        );
        assert!(e.contains("none.pem"), "{e}");
        let e = format!("{:#}", load(&key, &key).err().unwrap());
        assert!(e.contains("key.pem") && e.contains("no certificate"), "{e}");
        let e = format!("{:#}", load(&cert, &cert).err().unwrap());
        assert!(e.contains("cert.pem") && e.contains("private key"), "{e}");
    }
}
