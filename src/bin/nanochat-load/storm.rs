//! `storm`: every client asks for a WebSocket at the same instant, each from its own source
//! address, as a whole server's clients do after a restart (close 1012) or a network blip.
//! Reports how long each waited for the answer to its upgrade, from the moment it began to
//! connect, and the answers. NanoChat runs with its default limits, so a storm larger than
//! `rate.global_connections` allows meets its 429s as it would in production; the bare server
//! (tokio's listener) is the baseline. With `--tls 1` every client makes a TLS handshake with
//! NanoChat's own HTTPS first, as browsers reconnecting to an instance without a proxy do.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpSocket;

use crate::{Args, Server, cpu_seconds, source_addr};

/// How long one client waits for its answer before it counts as `timeout`.
const PATIENCE: Duration = Duration::from_secs(30);

/// The upgrade request every client sends.
const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

/// A client's connection, plain or TLS.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Connect (with a TLS handshake when `tls` is given), ask for the upgrade and read the status
/// of the answer; the open stream is kept so that the server holds every accepted socket
/// until the storm is over.
async fn upgrade(
    socket: TcpSocket,
    to: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> std::io::Result<(u16, Box<dyn Stream>)> {
    let tcp = socket.connect(to).await?;
    let mut stream: Box<dyn Stream> = match tls {
        None => Box::new(tcp),
        Some(tls) => {
            // No Nagle, as browsers do: TLS writes its last handshake message and the request
            // separately, and the second would wait for the server's delayed ACK.
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::IpAddress(to.ip().into());
            Box::new(
                tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?,
            )
        }
    };
    stream.write_all(UPGRADE).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let status = String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, stream))
}

pub async fn run(args: &Args, server: &Server, tls: Option<Arc<rustls::ClientConfig>>) {
    let to: SocketAddr = server.addr.parse().expect("server address");
    // Every socket is made and bound first, so the start is one instant for all of them.
    let start = Arc::new(tokio::sync::Barrier::new(args.clients + 1));
    let mut tasks = Vec::with_capacity(args.clients);
    for id in 0..args.clients {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(source_addr(10, id), 0))
            .expect("bind a loopback source address");
        let (start, tls) = (start.clone(), tls.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let began = Instant::now();
            let answer = tokio::time::timeout(PATIENCE, upgrade(socket, to, tls)).await;
            (began.elapsed(), answer)
        }));
    }
    let cpu_before = cpu_seconds(server.pid());
    start.wait().await;
    let mut waited_ms = Vec::with_capacity(args.clients);
    let mut answers: BTreeMap<String, u64> = BTreeMap::new();
    let mut open = Vec::new();
    for task in tasks {
        let (waited, answer) = task.await.expect("client task");
        waited_ms.push(waited.as_secs_f64() * 1000.0);
        let key = match answer {
            Ok(Ok((status, stream))) => {
                open.push(stream);
                status.to_string()
            }
            Ok(Err(e)) => format!("error: {}", e.kind()),
            Err(_) => "timeout".into(),
        };
        *answers.entry(key).or_default() += 1;
    }
    let server_cpu_s = cpu_seconds(server.pid()) - cpu_before;
    drop(open);
    report(args, &mut waited_ms, answers, server_cpu_s);
}

/// One JSON line: the answers by status, and the wait's percentiles.
fn report(args: &Args, waited_ms: &mut [f64], answers: BTreeMap<String, u64>, server_cpu_s: f64) {
    waited_ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((waited_ms.len() as f64 - 1.0) * q).round() as usize;
        (waited_ms.get(i).copied().unwrap_or(0.0) * 10.0).round() / 10.0
    };
    let report = serde_json::json!({
        "scenario": "storm",
        "target": args.target,
        "tls": args.tls,
        "clients": args.clients,
        "answers": answers,
        "p50_ms": at(0.5),
        "p90_ms": at(0.9),
        "p99_ms": at(0.99),
        "max_ms": at(1.0),
        "over_1s": waited_ms.iter().filter(|&&ms| ms > 1000.0).count(),
        // The server's CPU time over the storm (its process, from /proc).
        "server_cpu_s": server_cpu_s,
    });
    println!("{report}");
}
