//! Building and running the server: [`Application::build`] opens storage, loads the server
//! secret, binds both listeners (port 0 works, for tests) and starts the background tasks;
//! [`Application::run_until_stopped`] serves until the process is told to stop.
//!
//! Routes of the public listener: the browser client (`/` and its assets, embedded from `web/`),
//! `/ws`, `/healthz`, `/readyz`. The admin listener serves `/metrics` (and the health
//! endpoints) and nothing else, so metrics are never exposed publicly by accident.

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix_codec::Framed;
use actix_http::body::{BodySize, BoxBody};
use actix_http::error::DispatchError;
use actix_http::{ConnectionType, HttpService, Protocol, Request, Response, h1, ws};
use actix_service::{IntoServiceFactory as _, ServiceFactoryExt as _, fn_service, map_config};
use actix_web::dev::{AppConfig, Service as _};
use actix_web::http::header;
use actix_web::middleware::DefaultHeaders;
use actix_web::{App, HttpMessage as _, HttpRequest, HttpResponse, HttpServer, web};
use anyhow::Context as _;
use futures_util::SinkExt as _;
use tokio::net::TcpStream;
use tokio_util::either::Either;

use crate::abuse::circuit;
use crate::abuse::client_ip::ClientIdentity;
use crate::abuse::limits::{self, Client, Limits};
use crate::abuse::origin::OriginPolicy;
use crate::abuse::pow::{self as pow_policy, PowPolicy};
use crate::assets;
use crate::config::{LimitSettings, PowMode, Settings};
use crate::crypto::ServerKeys;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol::{b64u, from_b64u};
use crate::session;
use crate::store::writer::Writer;
use crate::store::{self, Store, now_ms};
use crate::tls::{Conn, Tls};
use crate::websocket;

/// The Content-Security-Policy of every public response: own origin only, no inline script,
/// and Trusted Types: no string reaches an HTML or script sink (`innerHTML`, `eval`, a
/// worker's URL) except through the page's one policy, which admits only the proof-of-work
/// worker's own URL. The client builds its DOM from text nodes; this makes a future slip an
/// error instead of a hole (browsers without Trusted Types ignore the two directives).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; worker-src 'self'; \
    manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; \
    require-trusted-types-for 'script'; trusted-types nanochat";

/// Everything a request handler or a session needs, shared by all workers.
pub struct AppState {
    /// Settings the server started with.
    pub settings: Settings,
    /// Storage.
    pub store: Arc<dyn Store>,
    /// Rooms and their sockets.
    pub hub: Arc<Hub>,
    /// Group-commit writer.
    pub writer: Writer,
    /// Keys derived from the server secret.
    pub keys: ServerKeys,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Rate limiters and socket caps.
    pub limits: Arc<Limits>,
    /// Proof-of-work requirement.
    pub pow: Arc<PowPolicy>,
    /// How client addresses are found and grouped.
    pub identity: ClientIdentity,
    /// Which web pages may open a WebSocket.
    pub origins: OriginPolicy,
    /// Port of the onion listener, if configured.
    pub onion_port: Option<u16>,
    /// Cancelled when the server starts draining for shutdown.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Set just before `shutdown` is cancelled: a check that takes no lock, for loops that
    /// look every time round.
    shutting_down: std::sync::atomic::AtomicBool,
    /// Cancelled when the server has stopped: ends the background tasks, which releases the
    /// store (and with it the SQLite data-directory lock).
    pub tasks: tokio_util::sync::CancellationToken,
    /// The last storage check for `/readyz`, and one check at a time.
    readiness: Readiness,
    /// Set while the stored data is at `store.max_database_mib`: new messages and rooms are
    /// refused. Kept by [`storage_loop`].
    storage_full: std::sync::atomic::AtomicBool,
}

/// `/readyz` is public and free to ask: without this, each request would take a database
/// connection from the pool the chat uses.
#[derive(Default)]
struct Readiness {
    /// When the last check ended, and whether storage was ready.
    last: std::sync::Mutex<Option<(Instant, bool)>>,
    /// Held while a check runs; those who wait take its answer.
    checking: tokio::sync::Mutex<()>,
}

/// How long one storage check answers `/readyz`.
const READINESS_FRESH: Duration = Duration::from_secs(1);

impl AppState {
    /// Start draining: readiness turns 503 and every session finishes its in-flight messages,
    /// then asks its client to reconnect.
    pub fn begin_shutdown(&self) {
        self.metrics.draining.set(1);
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::Release);
        self.shutdown.cancel();
    }

    /// Whether the stored data is at its cap (`store.max_database_mib`) as of the last check.
    pub fn storage_full(&self) -> bool {
        self.storage_full.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether [`AppState::begin_shutdown`] has been called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether storage answers and is migrated, as of a check at most [`READINESS_FRESH`] old.
    async fn storage_ready(&self) -> bool {
        let fresh = || {
            let last = *self
                .readiness
                .last
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            last.filter(|(at, _)| at.elapsed() < READINESS_FRESH)
                .map(|(_, ready)| ready)
        };
        if let Some(ready) = fresh() {
            return ready;
        }
        let _checking = self.readiness.checking.lock().await;
        if let Some(ready) = fresh() {
            return ready;
        }
        self.metrics.readiness_checks_total.inc();
        let ready = matches!(
            tokio::time::timeout(Duration::from_secs(2), self.store.ready()).await,
            Ok(Ok(()))
        );
        *self
            .readiness
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), ready));
        ready
    }
}

/// Who is on the other end of a socket, decided before the upgrade.
pub struct Peer {
    /// The limiter identity.
    pub client: Client,
    /// Whether the socket came through the onion listener.
    pub onion: bool,
    /// The socket's slot in the connection caps, released when the session ends.
    pub slot: limits::SocketGuard,
}

/// Read the server secret, creating it (32 random bytes, base64url, mode 0600) when missing.
pub fn load_or_create_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};

    match std::fs::read_to_string(path) {
        Ok(text) => {
            let secret = from_b64u(text.trim()).with_context(|| {
                format!(
                    "server secret {} is not base64url (no padding)",
                    path.display()
                )
            })?;
            anyhow::ensure!(
                secret.len() >= 32,
                "server secret {} must hold at least 32 bytes",
                path.display()
            );
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    path = %path.display(),
                    "the server secret file is readable by other users; chmod 600 it"
                );
            }
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create directory {}", dir.display()))?;
            }
            let mut secret = vec![0u8; 32];
            rand::fill(&mut secret[..]);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("cannot create server secret {}", path.display()))?;
            file.write_all(format!("{}\n", b64u(&secret)).as_bytes())?;
            file.sync_all()?;
            tracing::info!(path = %path.display(), "generated a new server secret");
            Ok(secret)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read server secret {}", path.display())),
    }
}

fn refuse_upgrade(
    state: &AppState,
    status: actix_web::http::StatusCode,
    reason: &'static str,
    retry: Duration,
) -> Response<BoxBody> {
    state
        .metrics
        .upgrades_refused_total
        .with_label_values(&[reason])
        .inc();
    Response::build(status)
        .insert_header((header::RETRY_AFTER, retry.as_secs().max(1).to_string()))
        .content_type("text/plain; charset=utf-8")
        .body("too many connections; retry later\n")
        .map_into_boxed_body()
}

/// Connections the kernel completes and queues for a listener before the server accepts them
/// (capped by `net.core.somaxconn`, 4096 on current kernels). The standard library's 128
/// overflows when thousands of clients reconnect at once, after a restart say, and every SYN
/// dropped then costs its client a retransmission a second later.
const LISTEN_BACKLOG: i32 = 4096;

/// A listening socket on `addr` (validated as `ip:port` with the settings) with
/// [`LISTEN_BACKLOG`]; `SO_REUSEADDR`, as the standard library sets it, so a restarted server
/// can listen again while the old connections are in `TIME_WAIT`.
fn listen(addr: &str) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not ip:port"))?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Where an upgrade request goes: actix-http hands the connection over whole, with the
/// request, so the socket leaves the HTTP dispatcher and its buffers behind (see
/// [`crate::websocket`]). The session runs inside this future, so a graceful stop waits for
/// it to drain, as for any other connection.
///
/// The connection's task is allocated once, sized for the largest state of what it runs, and
/// lives as long as the socket. So the handshake and the session are boxed, each box freed
/// when its step ends: inline, both would be part of every idle socket's task (6.4 KB
/// instead of 1.3 KB, measured with `heaptrack`).
fn upgrade(
    state: Arc<AppState>,
    onion: bool,
    req: Request,
    framed: Framed<Conn, h1::Codec>,
) -> impl Future<Output = Result<(), actix_http::Error>> {
    let handshake = Box::pin(handshake(state.clone(), onion, req, framed));
    async move {
        if let Some((reader, writer, peer)) = handshake.await {
            Box::pin(session::run(state, writer, reader, peer)).await;
        }
        Ok(())
    }
}

/// How an HTTP connection's error counts in `nanochat_http_connection_errors_total`. The
/// dispatcher would also log each at error level; that log is turned off (see
/// [`crate::telemetry`]): any client can cause one per connection.
fn connection_error_kind(e: &DispatchError) -> &'static str {
    match e {
        DispatchError::Parse(_) => "malformed",
        DispatchError::SlowRequestTimeout | DispatchError::DisconnectTimeout => "timeout",
        DispatchError::Io(_) => "io",
        _ => "other",
    }
}

/// An HTTP service's error handler for a public listener: counts each error by kind in
/// `errors` (`nanochat_http_connection_errors_total`) and passes it on.
fn count_connection_error(
    errors: &prometheus::IntCounterVec,
) -> impl Fn(DispatchError) -> DispatchError + Clone + use<> {
    let errors = errors.clone();
    move |e| {
        errors.with_label_values(&[connection_error_kind(&e)]).inc();
        e
    }
}

/// An onion listener that reads Tor's circuit line (`server.onion_circuit_ids`): what a
/// connection without it counts in, and when the log last said so.
struct CircuitLines {
    refused: prometheus::IntCounter,
    /// Milliseconds since the epoch of the last warning (0: none yet).
    warned: AtomicU64,
}

/// What a public listener does with a new connection before HTTP.
#[derive(Clone)]
enum Front {
    /// Nothing: plain HTTP.
    Plain,
    /// An onion listener that reads Tor's circuit line first.
    Circuits(Arc<CircuitLines>),
    /// HTTPS (`[tls]`).
    Tls(Arc<Https>),
}

/// What an HTTPS listener needs before HTTP.
struct Https {
    acceptor: tokio_rustls::TlsAcceptor,
    /// Failed handshakes (`nanochat_http_connection_errors_total{kind="tls"}`).
    errors: prometheus::IntCounter,
    state: Arc<AppState>,
}

/// A new connection on a public listener, for the HTTP dispatcher: with its peer's address, or
/// on an onion listener that reads Tor's circuit line, its circuit's ([`circuit`]). A
/// connection that does not start with the line is closed: counted, and logged at most once a
/// minute per listener, since it means torrc lacks the line. With TLS, each handshake counts
/// as one of the client's requests (`rate.client_requests`: a handshake costs the server a
/// signature, so past the limit the connection is closed before one), and a connection whose
/// handshake fails or does not end within `within` is closed and counted.
async fn accept(
    front: Front,
    mut io: TcpStream,
    within: Duration,
) -> Result<(Conn, Protocol, Option<std::net::SocketAddr>), DispatchError> {
    let lines = match front {
        Front::Plain => {
            let peer = io.peer_addr().ok();
            return Ok((Either::Left(io), Protocol::Http1, peer));
        }
        Front::Tls(https) => {
            let peer = io.peer_addr().ok();
            if let Some(peer) = peer {
                let client = Client::Ip(https.state.identity.key(peer.ip()));
                let limits = &https.state.limits;
                if limits.client(limits::ClientLimit::Request, client).is_err() {
                    return Err(DispatchError::Io(
                        std::io::ErrorKind::ConnectionRefused.into(),
                    ));
                }
            }
            // Nothing waits to fill a packet: TLS writes a handshake flight and then records
            // that must not wait for the peer's delayed ACK.
            let _ = io.set_nodelay(true);
            // Boxed: inline, the handshake's state would be part of every connection's task
            // for the connection's whole life (1.6 KB more per idle socket, plain ones too).
            let handshake = Box::pin(tokio::time::timeout(within, https.acceptor.accept(io)));
            let tls = match handshake.await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    https.errors.inc();
                    return Err(DispatchError::Io(e));
                }
                Err(_) => {
                    https.errors.inc();
                    return Err(DispatchError::Io(std::io::ErrorKind::TimedOut.into()));
                }
            };
            return Ok((Either::Right(Box::new(tls)), Protocol::Http1, peer));
        }
        Front::Circuits(lines) => lines,
    };
    match circuit::read(&mut io, within).await {
        Ok(peer) => Ok((Either::Left(io), Protocol::Http1, Some(peer))),
        Err(e) => {
            lines.refused.inc();
            let now = now_ms().max(1) as u64;
            let last = lines.warned.load(Ordering::Relaxed);
            if now.saturating_sub(last) >= 60_000
                && lines
                    .warned
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(
                    error = %e,
                    "an onion connection did not start with Tor's circuit id: closed. \
                     server.onion_circuit_ids needs `HiddenServiceExportCircuitID haproxy` in \
                     torrc (see deploy/tor/torrc); set both or neither"
                );
            }
            Err(DispatchError::Io(e))
        }
    }
}

/// Admit the client and answer its upgrade: the socket's two halves when accepted, `None` when
/// refused (the refusal is sent) or when the client is gone.
async fn handshake(
    state: Arc<AppState>,
    onion: bool,
    req: Request,
    mut framed: Framed<Conn, h1::Codec>,
) -> Option<(websocket::Reader, websocket::Writer, Peer)> {
    match admit(&state, onion, &req) {
        Ok(peer) => {
            let mut accept = ws::handshake_response(req.head()).finish();
            with_security_headers(accept.headers_mut());
            framed
                .send(h1::Message::Item((accept.drop_body(), BodySize::None)))
                .await
                .ok()?;
            // Keep the socket and any bytes the client sent after its request; the
            // dispatcher's buffers and codec go.
            let parts = framed.into_parts();
            state.pow.record_connection();
            let (reader, writer) = websocket::split(
                parts.io,
                parts.read_buf,
                state.settings.limits.max_frame_bytes,
            );
            Some((reader, writer, peer))
        }
        Err(refusal) => {
            let (mut head, body) = refusal.into_parts();
            with_security_headers(head.headers_mut());
            head.head_mut().set_connection_type(ConnectionType::Close);
            let body = actix_web::body::to_bytes(body).await.unwrap_or_default();
            let _ = framed
                .send(h1::Message::Item((
                    head,
                    BodySize::Sized(body.len() as u64),
                )))
                .await;
            let _ = framed.send(h1::Message::Chunk(Some(body))).await;
            let _ = framed.send(h1::Message::Chunk(None)).await;
            None
        }
    }
}

/// Who a request's client is for the limits: its address (or the one a trusted proxy names),
/// grouped by prefix; on the onion listener its Tor circuit when Tor names it
/// (`server.onion_circuit_ids`), else everyone there together.
fn client_of(
    state: &AppState,
    onion: bool,
    peer: Option<std::net::SocketAddr>,
    headers: &actix_http::header::HeaderMap,
) -> Client {
    if onion {
        let circuit = peer.and_then(|p| circuit::of(p.ip()));
        return match circuit {
            Some(c) if state.settings.server.onion_circuit_ids => Client::Circuit(c),
            _ => Client::Onion,
        };
    }
    let peer = peer.map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |a| a.ip());
    Client::Ip(
        state
            .identity
            .key(state.identity.client_addr(peer, headers)),
    )
}

/// A plain HTTP request over the client's `rate.client_requests`: `Some(429)`. Health checks
/// are not counted (load balancers ask often, and they cost nothing). The answer is as small as
/// it can be, without the security headers (nothing in it to protect), and it closes the
/// connection - though the dispatcher still answers requests pipelined behind it, each with
/// this same small answer.
fn over_request_limit(state: &AppState, onion: bool, req: &HttpRequest) -> Option<HttpResponse> {
    if matches!(req.path(), "/healthz" | "/readyz") {
        return None;
    }
    let client = client_of(state, onion, req.peer_addr(), req.headers());
    let r = state
        .limits
        .client(limits::ClientLimit::Request, client)
        .err()?;
    Some(
        HttpResponse::TooManyRequests()
            .force_close()
            .insert_header((
                header::RETRY_AFTER,
                r.retry_after.as_secs().max(1).to_string(),
            ))
            .finish(),
    )
}

/// The plain-HTTP listener beside an HTTPS one (`tls.redirect_listen`): where it sends
/// visitors, and where certbot leaves its challenges.
struct Redirect {
    state: Arc<AppState>,
    /// The HTTPS listener's port, named in the new address unless it is 443.
    https_port: u16,
    webroot: Option<std::path::PathBuf>,
}

/// Any request on the redirect listener: the same host and path over HTTPS (301), within the
/// client's request limit; 400 without a `Host` naming a server.
async fn to_https(req: HttpRequest, to: web::Data<Redirect>) -> HttpResponse {
    if let Some(refused) = over_request_limit(&to.state, false, &req) {
        return refused;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| crate::abuse::origin::split_authority(h.trim()));
    let Some((host, _)) = host else {
        return HttpResponse::BadRequest()
            .content_type("text/plain; charset=utf-8")
            .body("a Host header naming this server is needed\n");
    };
    let port = match to.https_port {
        443 => String::new(),
        p => format!(":{p}"),
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    HttpResponse::MovedPermanently()
        .insert_header((header::LOCATION, format!("https://{host}{port}{path}")))
        .finish()
}

/// The largest ACME challenge file served (a key authorization is under 100 bytes).
const ACME_FILE_MAX: u64 = 4096;

/// `/.well-known/acme-challenge/{token}` on the redirect listener: the file certbot put under
/// `tls.acme_webroot` for an http-01 challenge. Only token-shaped names (base64url) are looked
/// up; anything else, or nothing there, is 404.
async fn acme_challenge(
    req: HttpRequest,
    token: web::Path<String>,
    to: web::Data<Redirect>,
) -> HttpResponse {
    if let Some(refused) = over_request_limit(&to.state, false, &req) {
        return refused;
    }
    let token_shaped = (1..=256).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let file = match &to.webroot {
        Some(dir) if token_shaped => dir.join(".well-known/acme-challenge").join(&*token),
        _ => return HttpResponse::NotFound().finish(),
    };
    let small = tokio::fs::metadata(&file)
        .await
        .is_ok_and(|m| m.is_file() && m.len() <= ACME_FILE_MAX);
    match tokio::fs::read(&file).await {
        Ok(body) if small => HttpResponse::Ok()
            .content_type("application/octet-stream")
            .body(body),
        _ => HttpResponse::NotFound().finish(),
    }
}

/// Decide who the client is and whether it may connect, *before* accepting the upgrade.
fn admit(state: &AppState, onion: bool, req: &Request) -> Result<Peer, Response<BoxBody>> {
    use actix_web::http::StatusCode;
    if req.path() != "/ws" {
        return Err(Response::build(StatusCode::NOT_FOUND)
            .content_type("text/plain; charset=utf-8")
            .body("not found\n")
            .map_into_boxed_body());
    }
    if let Err(e) = ws::verify_handshake(req.head()) {
        return Err(Response::from(e));
    }
    // Before any limit: a foreign page's attempt costs its visitor none of their budget.
    let headers = req.headers();
    let origin = headers.get(header::ORIGIN).map(|v| v.as_bytes());
    if !state
        .origins
        .admits(origin, headers.get(header::HOST).map(|v| v.as_bytes()))
    {
        state
            .metrics
            .upgrades_refused_total
            .with_label_values(&["origin"])
            .inc();
        return Err(Response::build(StatusCode::FORBIDDEN)
            .content_type("text/plain; charset=utf-8")
            .body("WebSockets are not accepted here from pages of this origin (server.allowed_origins)\n")
            .map_into_boxed_body());
    }
    let client = client_of(state, onion, req.peer_addr(), req.headers());
    if let Err(r) = state.limits.client(limits::ClientLimit::Connection, client) {
        return Err(refuse_upgrade(
            state,
            StatusCode::TOO_MANY_REQUESTS,
            r.limiter,
            r.retry_after,
        ));
    }
    let slot = match state.limits.open_socket(client) {
        Ok(slot) => slot,
        Err(r) => {
            let status = if r.limiter == "max_connections" {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::TOO_MANY_REQUESTS
            };
            return Err(refuse_upgrade(state, status, r.limiter, r.retry_after));
        }
    };
    Ok(Peer {
        client,
        onion,
        slot,
    })
}

/// `/ws` without an `Upgrade: websocket` header: say what the endpoint expects.
async fn ws_without_upgrade(req: HttpRequest) -> HttpResponse {
    match ws::verify_handshake(req.head()) {
        Err(e) => Response::from(e).into(),
        Ok(()) => HttpResponse::BadRequest()
            .content_type("text/plain; charset=utf-8")
            .body("a WebSocket upgrade is expected here\n"),
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body("ok\n")
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if state.is_shutting_down() {
        return HttpResponse::ServiceUnavailable()
            .content_type("text/plain; charset=utf-8")
            .body("shutting down\n");
    }
    if state.storage_ready().await {
        HttpResponse::Ok()
            .content_type("text/plain; charset=utf-8")
            .body("ready\n")
    } else {
        HttpResponse::ServiceUnavailable()
            .content_type("text/plain; charset=utf-8")
            .body("storage not ready\n")
    }
}

/// How long a scrape waits for the storage usage before it answers without it.
const USAGE_WAIT: Duration = Duration::from_secs(2);

async fn metrics_endpoint(state: web::Data<AppState>) -> HttpResponse {
    if let Some(p) = state.store.pool_stats() {
        let g = &state.metrics.store_pool_connections;
        g.with_label_values(&["max"]).set(p.max as i64);
        g.with_label_values(&["open"]).set(p.open as i64);
        g.with_label_values(&["idle"]).set(p.idle as i64);
        g.with_label_values(&["waiting"]).set(p.waiting as i64);
    }
    if let Some(bytes) = state.store.replay_filter_bytes() {
        state
            .metrics
            .replay_filter_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
    // A database that does not answer in time leaves the last values; the scrape goes on.
    match tokio::time::timeout(USAGE_WAIT, state.store.usage()).await {
        Ok(Ok(usage)) => state.metrics.set_storage(&usage),
        Ok(Err(e)) => tracing::debug!(error = %e, "storage usage not read for metrics"),
        Err(_) => tracing::debug!("storage usage not read for metrics in time"),
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}

/// Headers on every public response, WebSocket upgrades and their refusals included.
const SECURITY_HEADERS: [(&str, &str); 7] = [
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("referrer-policy", "no-referrer"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    (
        "permissions-policy",
        "camera=(), microphone=(), geolocation=(), interest-cohort=()",
    ),
];

/// What HTTPS adds: browsers that saw it use `https://` for this host for two years, even
/// when a link or a typed address says `http://`.
const STRICT_TRANSPORT_SECURITY: (&str, &str) = ("strict-transport-security", "max-age=63072000");

/// [`SECURITY_HEADERS`], and on an HTTPS listener [`STRICT_TRANSPORT_SECURITY`].
fn security_headers(https: bool) -> DefaultHeaders {
    let https = https.then_some(&STRICT_TRANSPORT_SECURITY);
    SECURITY_HEADERS
        .iter()
        .chain(https)
        .fold(DefaultHeaders::new(), |h, &(name, value)| {
            h.add((name, value))
        })
}

fn with_security_headers(headers: &mut actix_http::header::HeaderMap) {
    for (name, value) in SECURITY_HEADERS {
        headers.insert(
            header::HeaderName::from_static(name),
            header::HeaderValue::from_static(value),
        );
    }
}

/// Run a background task until the server stops.
fn background(state: &AppState, task: impl std::future::Future<Output = ()> + 'static) {
    let stop = state.tasks.clone();
    actix_web::rt::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = task => {}
        }
    });
}

/// Run maintenance now and then every `retention.maintenance_interval_secs`.
async fn maintenance_loop(state: Arc<AppState>) {
    let every = Duration::from_secs(state.settings.retention.maintenance_interval_secs);
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        run_maintenance(&state).await;
    }
}

/// How often the stored data's size is compared with `store.max_database_mib`.
const STORAGE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Compare the stored data with its cap every [`STORAGE_CHECK_EVERY`], and keep the storage
/// gauges current between scrapes. On Postgres that is one `pg_database_size` a second per
/// process (a look at the database directory's files); without a cap, nothing is asked.
async fn storage_loop(state: Arc<AppState>) {
    let cap = state
        .settings
        .store
        .max_database_mib
        .saturating_mul(1 << 20);
    state
        .metrics
        .storage_cap_bytes
        .set(i64::try_from(cap).unwrap_or(i64::MAX));
    if cap == 0 {
        return;
    }
    let mut ticker = tokio::time::interval(STORAGE_CHECK_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let usage = match tokio::time::timeout(USAGE_WAIT, state.store.usage()).await {
            Ok(Ok(usage)) => usage,
            // Storage trouble shows elsewhere (readiness, refused writes); keep the last answer.
            _ => continue,
        };
        state.metrics.set_storage(&usage);
        let full = usage.used_bytes >= cap;
        let was = state
            .storage_full
            .swap(full, std::sync::atomic::Ordering::Relaxed);
        if full && !was {
            tracing::warn!(
                used_mib = usage.used_bytes >> 20,
                cap_mib = cap >> 20,
                "the stored data reached store.max_database_mib: new messages and rooms are \
                 refused until expiry or wipes free space, or the cap is raised"
            );
        } else if was && !full {
            tracing::info!(
                used_mib = usage.used_bytes >> 20,
                cap_mib = cap >> 20,
                "the stored data is below store.max_database_mib again: new messages are taken"
            );
        }
    }
}

/// One maintenance run with its metrics and log line.
pub async fn run_maintenance(state: &AppState) {
    let m = &state.metrics;
    let started = std::time::Instant::now();
    let result = state.store.maintain(now_ms()).await;
    m.maintenance_seconds
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(report) if report.ran => {
            m.maintenance_runs_total.with_label_values(&["ok"]).inc();
            m.maintenance_last_success_timestamp_seconds
                .set(now_ms() / 1000);
            if let Some(n) = report.partitions_present {
                m.partitions.set(n as i64);
            }
            m.partitions_dropped_total.inc_by(report.partitions_dropped);
            m.partitions_deferred_total
                .inc_by(report.partitions_deferred);
            m.rooms_expired_total
                .inc_by(report.rooms_deleted + report.tombstones_deleted);
            tracing::info!(
                partitions_created = report.partitions_created,
                partitions_dropped = report.partitions_dropped,
                partitions_deferred = report.partitions_deferred,
                messages_deleted = report.messages_deleted,
                replay_keys_dropped = report.replay_keys_dropped,
                replay_runs_merged = report.replay_runs_merged,
                rooms_deleted = report.rooms_deleted,
                tombstones_deleted = report.tombstones_deleted,
                "maintenance done"
            );
        }
        Ok(_) => {
            m.maintenance_runs_total
                .with_label_values(&["skipped"])
                .inc();
            tracing::debug!("maintenance running on another process");
        }
        Err(e) => {
            m.maintenance_runs_total.with_label_values(&["error"]).inc();
            tracing::warn!(error = %e, "maintenance failed; retrying at the next interval");
        }
    }
}

/// Descriptors kept free for what is not a WebSocket: listeners, database connections and
/// files, plain HTTP requests, the admin port, logs.
pub const SPARE_DESCRIPTORS: u64 = 256;

/// Make room for `limits.max_connections` sockets in the process's open-file limit: raise the
/// soft limit as far as needed, up to the hard limit; if even that is too small, lower
/// `max_connections` to what fits, with a warning. Past the limit a new socket would fail in
/// `accept`, and actix-server then stops accepting on every listener for half a second: one
/// flood would shut everybody out, where a socket over `max_connections` gets a plain 503.
pub fn fit_open_file_limit(limits: &mut LimitSettings) {
    let wanted = limits.max_connections as u64 + SPARE_DESCRIPTORS;
    let (soft, hard) = match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit; leaving it as it is");
            return;
        }
    };
    let mut limit = soft;
    if soft < wanted {
        let raised = wanted.min(hard);
        match rlimit::setrlimit(rlimit::Resource::NOFILE, raised, hard) {
            Ok(()) => limit = raised,
            Err(e) => tracing::warn!(error = %e, soft, "cannot raise the open-file limit"),
        }
    }
    if limit < wanted {
        let fits = limit.saturating_sub(SPARE_DESCRIPTORS).max(1) as usize;
        tracing::warn!(
            open_files = limit,
            configured = limits.max_connections,
            max_connections = fits,
            "the open-file limit is too small for limits.max_connections; accepting fewer \
             WebSockets (raise LimitNOFILE or `ulimit -n`, see docs/operating.md)"
        );
        limits.max_connections = fits;
    } else {
        tracing::info!(open_files = limit, "open-file limit");
    }
}

/// A built server, listening, not yet serving.
pub struct Application {
    port: u16,
    admin_port: u16,
    redirect_port: Option<u16>,
    state: Arc<AppState>,
    public: actix_web::dev::Server,
    admin: actix_web::dev::Server,
}

impl Application {
    /// Open storage, load the secret, bind the listeners and start the background tasks.
    pub async fn build(mut settings: Settings) -> anyhow::Result<Application> {
        settings.validate()?;
        fit_open_file_limit(&mut settings.limits);
        let secret = load_or_create_secret(&settings.secret_path())?;
        let keys = ServerKeys::derive(&secret);
        let store = store::open(&settings).await?;
        anyhow::ensure!(
            store.check_secret(&keys.check_value()).await?,
            "the server secret {} is not the one this database was set up with: every server \
             using this database needs the same secret file (restore it from the backup taken \
             with the database; see docs/operating.md)",
            settings.secret_path().display()
        );
        let metrics = Arc::new(Metrics::new());
        let tls = match (&settings.tls.cert, &settings.tls.key) {
            (Some(cert), Some(key)) => Some(Arc::new(
                Tls::new(cert, key, &metrics).context("cannot serve HTTPS (tls.cert, tls.key)")?,
            )),
            _ => None,
        };
        metrics
            .connections_max
            .set(i64::try_from(settings.limits.max_connections).unwrap_or(i64::MAX));
        let hub = Arc::new(Hub::new(
            settings.limits.send_queue,
            settings.limits.send_queue_bytes,
            metrics.clone(),
        ));
        let limits = Arc::new(Limits::new(&settings, metrics.clone()));
        let pow = Arc::new(PowPolicy::new(&settings.pow));
        metrics.pow_bits.set(i64::from(pow.required(false)));
        metrics.pow_max_bits.set(i64::from(settings.pow.max_bits));
        let identity = ClientIdentity::new(
            &settings.proxy.trusted,
            settings.proxy.ipv4_prefix,
            settings.proxy.ipv6_prefix,
        );
        let origins = OriginPolicy::new(&settings.server.allowed_origins)
            .map_err(|e| anyhow::anyhow!("server.allowed_origins: {e}"))?;
        let (writer, _writer_task) = Writer::spawn(
            store.clone(),
            hub.clone(),
            metrics.clone(),
            settings.store.queue,
            settings.store.batch_max,
            // SQLite has one writer connection: more tasks would only queue for it.
            if store.backend() == "sqlite" {
                1
            } else {
                settings.store.writers
            },
        );

        let listener = listen(&settings.server.listen).with_context(|| {
            format!("cannot listen on server.listen {}", settings.server.listen)
        })?;
        let admin_listener = listen(&settings.server.admin_listen).with_context(|| {
            format!(
                "cannot listen on server.admin_listen {}",
                settings.server.admin_listen
            )
        })?;
        if let Some(webroot) = &settings.tls.acme_webroot {
            let challenges = webroot.join(".well-known/acme-challenge");
            std::fs::create_dir_all(&challenges).with_context(|| {
                format!(
                    "cannot create {} for tls.acme_webroot",
                    challenges.display()
                )
            })?;
        }
        let redirect_listener = match &settings.tls.redirect_listen {
            Some(addr) => Some(
                listen(addr)
                    .with_context(|| format!("cannot listen on tls.redirect_listen {addr}"))?,
            ),
            None => None,
        };
        let onion_listener = match &settings.server.onion_listen {
            Some(addr) => Some(
                listen(addr)
                    .with_context(|| format!("cannot listen on server.onion_listen {addr}"))?,
            ),
            None => None,
        };
        let port = listener.local_addr()?.port();
        let admin_port = admin_listener.local_addr()?.port();
        let onion_port = match &onion_listener {
            Some(l) => Some(l.local_addr()?.port()),
            None => None,
        };
        let redirect_port = match &redirect_listener {
            Some(l) => Some(l.local_addr()?.port()),
            None => None,
        };
        let workers = match settings.server.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };

        let state = Arc::new(AppState {
            settings,
            store,
            hub,
            writer,
            keys,
            metrics,
            limits,
            pow,
            identity,
            origins,
            onion_port,
            shutdown: tokio_util::sync::CancellationToken::new(),
            shutting_down: Default::default(),
            tasks: tokio_util::sync::CancellationToken::new(),
            readiness: Readiness::default(),
            storage_full: Default::default(),
        });
        let handshake_timeout = Duration::from_secs(state.settings.limits.handshake_timeout_secs);
        let data = web::Data::from(state.clone());
        let files = web::Data::new(assets::Assets::new(state.settings.retention.days));
        // The public listeners run actix-http directly rather than through `HttpServer`, for
        // its upgrade hook: WebSocket upgrades leave the HTTP dispatcher (see `upgrade`).
        let mut public = actix_server::Server::build()
            .workers(workers)
            .shutdown_timeout(state.settings.server.shutdown_grace_secs)
            .disable_signals();
        let listeners = std::iter::once((listener, false)).chain(onion_listener.map(|l| (l, true)));
        for (listener, onion) in listeners {
            let name = format!("public-{}", listener.local_addr()?);
            let front = match &tls {
                _ if onion && state.settings.server.onion_circuit_ids => {
                    Front::Circuits(Arc::new(CircuitLines {
                        refused: state
                            .metrics
                            .upgrades_refused_total
                            .with_label_values(&["onion_circuit_id"]),
                        warned: AtomicU64::new(0),
                    }))
                }
                Some(tls) if !onion => Front::Tls(Arc::new(Https {
                    acceptor: tls.acceptor.clone(),
                    errors: state
                        .metrics
                        .http_connection_errors_total
                        .with_label_values(&["tls"]),
                    state: state.clone(),
                })),
                _ => Front::Plain,
            };
            let https = matches!(front, Front::Tls(..));
            let (data, files, state) = (data.clone(), files.clone(), state.clone());
            public = public.listen(name, listener, move || {
                let (data, files, state) = (data.clone(), files.clone(), state.clone());
                let limited = state.clone();
                let app = App::new()
                    .app_data(data)
                    .app_data(files)
                    .wrap(security_headers(https))
                    // Outside the security headers: a refusal goes out bare.
                    .wrap_fn(move |req, service| {
                        let refusal = over_request_limit(&limited, onion, req.request());
                        let answer = match refusal {
                            Some(r) => Err(req.into_response(r).map_into_right_body()),
                            None => Ok(service.call(req)),
                        };
                        async move {
                            match answer {
                                Err(refused) => Ok(refused),
                                Ok(call) => call.await.map(|r| r.map_into_left_body()),
                            }
                        }
                    })
                    .route("/ws", web::get().to(ws_without_upgrade))
                    .route("/healthz", web::get().to(healthz))
                    .route("/healthz", web::head().to(healthz))
                    .route("/readyz", web::get().to(readyz))
                    .route("/readyz", web::head().to(readyz))
                    .route("/{path:.*}", web::get().to(assets::serve))
                    .route("/{path:.*}", web::head().to(assets::serve));
                let front = front.clone();
                let counted = count_connection_error(&state.metrics.http_connection_errors_total);
                let http = HttpService::build()
                    .client_request_timeout(handshake_timeout)
                    .client_disconnect_timeout(Duration::from_secs(1))
                    .upgrade(fn_service(
                        move |(req, framed): (Request, Framed<Conn, h1::Codec>)| {
                            upgrade(state.clone(), onion, req, framed)
                        },
                    ))
                    .finish(map_config(app.into_factory(), |_| AppConfig::default()))
                    .map_err(counted);
                fn_service(move |io: TcpStream| accept(front.clone(), io, handshake_timeout))
                    .and_then(http)
            })?;
        }
        if let Some(listener) = redirect_listener {
            let name = format!("redirect-{}", listener.local_addr()?);
            let to = web::Data::new(Redirect {
                state: state.clone(),
                https_port: port,
                webroot: state.settings.tls.acme_webroot.clone(),
            });
            let errors = state.metrics.http_connection_errors_total.clone();
            public = public.listen(name, listener, move || {
                let app = App::new()
                    .app_data(to.clone())
                    .route(
                        "/.well-known/acme-challenge/{token}",
                        web::get().to(acme_challenge),
                    )
                    .default_service(web::to(to_https));
                let http = HttpService::build()
                    .client_request_timeout(handshake_timeout)
                    .client_disconnect_timeout(Duration::from_secs(1))
                    .finish(map_config(app.into_factory(), |_| AppConfig::default()))
                    .map_err(count_connection_error(&errors));
                fn_service(move |io: TcpStream| accept(Front::Plain, io, handshake_timeout))
                    .and_then(http)
            })?;
        }
        let public = public.run();
        let admin = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .route("/metrics", web::get().to(metrics_endpoint))
                .route("/healthz", web::get().to(healthz))
                .route("/healthz", web::head().to(healthz))
                .route("/readyz", web::get().to(readyz))
                .route("/readyz", web::head().to(readyz))
        })
        .workers(1)
        .shutdown_timeout(1)
        .disable_signals()
        .listen(admin_listener)?
        .run();

        let https = tls.is_some();
        if let Some(tls) = tls {
            background(
                &state,
                tls.reload_loop(
                    Duration::from_secs(state.settings.tls.reload_interval_secs),
                    state.metrics.clone(),
                ),
            );
        }
        background(&state, maintenance_loop(state.clone()));
        background(&state, storage_loop(state.clone()));
        background(
            &state,
            crate::cluster::fill_held_gaps(
                state.store.clone(),
                state.hub.clone(),
                state.metrics.clone(),
            ),
        );
        if let Some(info) = state.store.cluster() {
            background(
                &state,
                crate::cluster::listen(
                    info,
                    state.store.clone(),
                    state.hub.clone(),
                    state.metrics.clone(),
                    state.settings.limits.max_ct_bytes,
                ),
            );
        }
        background(
            &state,
            limits::sweep_loop(
                state.limits.clone(),
                Duration::from_secs(state.settings.rate.sweep_interval_secs),
            ),
        );
        if state.settings.pow.mode == PowMode::Adaptive {
            background(
                &state,
                pow_policy::adjust_loop(
                    state.pow.clone(),
                    state.store.clone(),
                    Duration::from_millis(state.settings.pow.adjust_interval_ms),
                    state.metrics.pow_bits.clone(),
                ),
            );
        }
        tracing::info!(
            port,
            admin_port,
            backend = state.store.backend(),
            https,
            onion_port,
            redirect_port,
            "nanochat listening"
        );
        Ok(Application {
            port,
            admin_port,
            redirect_port,
            state,
            public,
            admin,
        })
    }

    /// Port of the public listener.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Port of the admin listener.
    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// Port of the redirect listener (`tls.redirect_listen`), if configured.
    pub fn redirect_port(&self) -> Option<u16> {
        self.redirect_port
    }

    /// Port of the onion listener, if configured.
    pub fn onion_port(&self) -> Option<u16> {
        self.state.onion_port
    }

    /// Shared state (tests use it to reach the store).
    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serve until SIGINT or SIGTERM, then shut down gracefully.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let handle = self.spawn();
        shutdown_signal().await;
        tracing::info!("shutting down: draining connections");
        handle.shutdown().await;
        tracing::info!("shut down");
        Ok(())
    }

    /// Serve in the background; the handle stops or shuts down the server.
    pub fn spawn(self) -> ServerHandle {
        let public = self.public.handle();
        let admin = self.admin.handle();
        actix_web::rt::spawn(self.public);
        actix_web::rt::spawn(self.admin);
        ServerHandle {
            public,
            admin,
            state: self.state,
        }
    }
}

/// Controls a server started with [`Application::spawn`].
pub struct ServerHandle {
    public: actix_web::dev::ServerHandle,
    admin: actix_web::dev::ServerHandle,
    state: Arc<AppState>,
}

impl ServerHandle {
    /// Stop both listeners at once, dropping connections (as a crash would, minus the process).
    pub async fn stop(&self, graceful: bool) {
        self.public.stop(graceful).await;
        self.admin.stop(graceful).await;
        self.state.tasks.cancel();
    }

    /// Graceful shutdown: readiness turns 503, new connections are refused, every session
    /// commits and acknowledges what it has in flight and closes with 1012 ("reconnect"); after
    /// `server.shutdown_grace_secs` whatever is left is dropped. Acknowledged messages are
    /// never lost either way, since an ack follows its commit.
    pub async fn shutdown(&self) {
        self.state.begin_shutdown();
        self.public.stop(true).await;
        self.admin.stop(true).await;
        self.state.tasks.cancel();
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of connections before the server accepts any (a reconnect storm meets a busy
    /// accept loop) completes in the kernel instead of waiting for SYN retransmissions.
    #[test]
    fn a_listener_queues_hundreds_of_connections_before_accepting_any() {
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4096);
        // Well above the standard library's 128, within a default 1024 open-file limit.
        let burst = 500.min(somaxconn);
        let listener = listen("127.0.0.1:0").expect("listen");
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        for i in 0..burst {
            let c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("connection {i} of {burst} not queued: {e}"));
            held.push(c);
        }
        // Nothing was accepted yet; every one of them is waiting in the queue.
        listener.set_nonblocking(true).unwrap();
        let queued = std::iter::from_fn(|| listener.accept().ok()).count();
        assert_eq!(queued, burst);
    }

    #[test]
    fn listening_needs_an_ip_and_port() {
        let e = listen("localhost:8080").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    }
}
