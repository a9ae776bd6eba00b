//! A Rust client of protocol v1: derives keys from a room secret, creates and joins rooms
//! (solving proof of work when asked), encrypts and decrypts message envelopes, and rejects
//! replays by `(sid, n)`. The integration tests drive the real server through it; benchmarks
//! and tools build on it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::crypto::{self, CHALLENGE_LEN, IV_LEN, RoomKeys};
use crate::protocol::{ClientFrame, PowSolution, ServerFrame, WireMsg, b64u, from_b64u};

/// A client failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The WebSocket failed.
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    /// The server closed the socket (code and reason when given).
    #[error("closed by server: {0:?}")]
    Closed(Option<(u16, String)>),
    /// The server sent something that is not protocol v1.
    #[error("protocol: {0}")]
    Protocol(String),
    /// No frame arrived in time.
    #[error("timed out waiting for a frame")]
    Timeout,
    /// The server answered with an error frame.
    #[error("server error {code}: {message}")]
    Server {
        /// Stable code.
        code: String,
        /// Human text.
        message: String,
    },
}

/// The `hello` a server sends on open.
#[derive(Debug, Clone)]
pub struct Hello {
    /// This socket's join challenge.
    pub challenge: [u8; CHALLENGE_LEN],
    /// Proof of work currently required for `create`.
    pub pow_bits: u8,
    /// Largest ciphertext accepted.
    pub max_ct: usize,
    /// Messages returned by `join`.
    pub history: u32,
    /// The server's clock when it said hello (ms; 0 if it did not say).
    pub now: i64,
}

/// One connection to a server.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The server's hello.
    pub hello: Hello,
    /// How long `recv` waits.
    pub timeout: Duration,
    /// The server's clock minus this machine's at the hello, ms (0 if it did not say).
    clock_offset: i64,
}

/// The WebSocket settings of every client socket. tungstenite zeroes its whole read buffer
/// before each read (128 KiB by default): with chat-sized frames that made `memset` a third of
/// a load generator's CPU. 8 KiB still takes a burst of queued frames in one read; a larger
/// frame is read in several.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(8 * 1024)
}

/// The line Tor starts a connection to an onion service with when it exports circuit ids
/// (`HiddenServiceExportCircuitID haproxy`): PROXY protocol version 1, the circuit in the low
/// 32 bits of the source address.
pub fn tor_circuit_line(circuit: u32) -> String {
    format!(
        "PROXY TCP6 fc00:dead:beef:4dad::{:x}:{:x} ::1 65535 42\r\n",
        circuit >> 16,
        circuit & 0xffff
    )
}

impl Client {
    /// Connect to `ws://host:port/ws` and read the hello.
    pub async fn connect(url: &str) -> Result<Client, ClientError> {
        let (ws, _) =
            tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), false).await?;
        Self::handshake(ws).await
    }

    /// Connect to `wss://host:port/ws`, trusting what `tls` trusts (tests and load runs give
    /// it their own certificate authority).
    pub async fn connect_tls(
        url: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Client, ClientError> {
        // No Nagle, as browsers do: TLS writes its last handshake message and the request
        // separately, and the second would wait for the server's delayed ACK (40 ms).
        let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(
            url,
            Some(ws_config()),
            true,
            Some(tokio_tungstenite::Connector::Rustls(tls)),
        )
        .await?;
        Self::handshake(ws).await
    }

    /// Connect from a chosen local address (load generators spread sockets over 127.0.0.x so
    /// each looks like another client and ports do not run out).
    pub async fn connect_from(url: &str, local: std::net::IpAddr) -> Result<Client, ClientError> {
        Self::connect_from_over(url, local, None).await
    }

    /// As [`Client::connect_from`], to a `wss://` URL, trusting what `tls` trusts.
    pub async fn connect_tls_from(
        url: &str,
        local: std::net::IpAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Client, ClientError> {
        Self::connect_from_over(url, local, Some(tls)).await
    }

    async fn connect_from_over(
        url: &str,
        local: std::net::IpAddr,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Client, ClientError> {
        let request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)?;
        let host = request
            .uri()
            .host()
            .unwrap_or("127.0.0.1")
            .trim_matches(['[', ']']);
        let port = request
            .uri()
            .port_u16()
            .unwrap_or(if tls.is_some() { 443 } else { 80 });
        let remote: std::net::IpAddr = host
            .parse()
            .map_err(|_| ClientError::Protocol(format!("connect_from needs an IP host: {host}")))?;
        let socket = if remote.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(tokio_tungstenite::tungstenite::Error::Io)?;
        socket
            .bind((local, 0).into())
            .map_err(tokio_tungstenite::tungstenite::Error::Io)?;
        let stream = socket
            .connect((remote, port).into())
            .await
            .map_err(tokio_tungstenite::tungstenite::Error::Io)?;
        match tls {
            None => Self::over(request, stream).await,
            Some(tls) => {
                // As in `connect_tls`.
                let _ = stream.set_nodelay(true);
                let (ws, _) = tokio_tungstenite::client_async_tls_with_config(
                    request,
                    stream,
                    Some(ws_config()),
                    Some(tokio_tungstenite::Connector::Rustls(tls)),
                )
                .await?;
                Self::handshake(ws).await
            }
        }
    }

    /// Connect to an onion listener as Tor does for a visitor on circuit `circuit` with
    /// `HiddenServiceExportCircuitID haproxy`: its PROXY line first, then the WebSocket.
    pub async fn connect_as_circuit(url: &str, circuit: u32) -> Result<Client, ClientError> {
        use tokio::io::AsyncWriteExt as _;
        let request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)?;
        let host = request.uri().host().unwrap_or("127.0.0.1").to_owned();
        let port = request.uri().port_u16().unwrap_or(80);
        let io = |e| tokio_tungstenite::tungstenite::Error::Io(e);
        let mut stream = TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(io)?;
        stream
            .write_all(tor_circuit_line(circuit).as_bytes())
            .await
            .map_err(io)?;
        Self::over(request, stream).await
    }

    async fn over(
        request: tokio_tungstenite::tungstenite::handshake::client::Request,
        stream: TcpStream,
    ) -> Result<Client, ClientError> {
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            request,
            MaybeTlsStream::Plain(stream),
            Some(ws_config()),
        )
        .await?;
        Self::handshake(ws).await
    }

    async fn handshake(
        ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    ) -> Result<Client, ClientError> {
        let mut client = Client {
            ws,
            hello: Hello {
                challenge: [0; CHALLENGE_LEN],
                pow_bits: 0,
                max_ct: 0,
                history: 0,
                now: 0,
            },
            timeout: Duration::from_secs(10),
            clock_offset: 0,
        };
        match client.recv().await? {
            ServerFrame::Hello {
                v: 1,
                challenge,
                pow_bits,
                max_ct,
                history,
                now,
            } => {
                client.hello = Hello {
                    challenge: from_b64u(&challenge)
                        .and_then(|c| c.try_into().ok())
                        .ok_or_else(|| ClientError::Protocol("bad challenge".into()))?,
                    pow_bits,
                    max_ct,
                    history,
                    now,
                };
                if now > 0 {
                    client.clock_offset = now - crate::store::now_ms();
                }
                Ok(client)
            }
            other => Err(ClientError::Protocol(format!(
                "expected hello, got {other:?}"
            ))),
        }
    }

    /// Send raw text (tests use it for malformed frames).
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<(), ClientError> {
        self.ws.send(Message::text(text.into())).await?;
        Ok(())
    }

    /// Send a JSON value as one frame.
    pub async fn send_json(&mut self, value: &serde_json::Value) -> Result<(), ClientError> {
        self.send_text(value.to_string()).await
    }

    /// Send a binary frame (which the server refuses).
    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.ws.send(Message::binary(bytes)).await?;
        Ok(())
    }

    /// The next frame as raw text; pings are answered, close becomes `Closed`.
    pub async fn recv_text(&mut self) -> Result<String, ClientError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| ClientError::Timeout)?;
            match next {
                None => return Err(ClientError::Closed(None)),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
                Some(Ok(Message::Close(frame))) => {
                    return Err(ClientError::Closed(frame.map(
                        |CloseFrame { code, reason }| (u16::from(code), reason.as_str().to_owned()),
                    )));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next frame.
    pub async fn recv(&mut self) -> Result<ServerFrame, ClientError> {
        let text = self.recv_text().await?;
        serde_json::from_str(&text)
            .map_err(|e| ClientError::Protocol(format!("unparseable frame {text:?}: {e}")))
    }

    /// The next frame, turning an error frame into `Err(Server)`.
    pub async fn recv_ok(&mut self) -> Result<ServerFrame, ClientError> {
        match self.recv().await? {
            ServerFrame::Error { code, message, .. } => Err(ClientError::Server { code, message }),
            frame => Ok(frame),
        }
    }

    /// Ask for a proof-of-work token; returns (token, bits).
    pub async fn pow_token(&mut self) -> Result<(Vec<u8>, u8), ClientError> {
        self.send_json(&ClientFrame::Pow.to_json()).await?;
        match self.recv_ok().await? {
            ServerFrame::Pow { token, bits, .. } => Ok((
                from_b64u(&token).ok_or_else(|| ClientError::Protocol("bad token".into()))?,
                bits,
            )),
            other => Err(ClientError::Protocol(format!(
                "expected pow, got {other:?}"
            ))),
        }
    }

    /// Create a room, solving proof of work when the hello asks for it, or when the server
    /// answers `pow_required` (the work asked for rose since the hello); returns the answer.
    pub async fn create(&mut self, keys: &RoomKeys) -> Result<ServerFrame, ClientError> {
        let mut with_work = self.hello.pow_bits > 0;
        loop {
            let pow = if with_work {
                let (token, bits) = self.pow_token().await?;
                let counter = crypto::pow_solve(&token, &keys.room_id, bits);
                let token = token
                    .try_into()
                    .map_err(|_| ClientError::Protocol("token of the wrong length".into()))?;
                Some(PowSolution { token, counter })
            } else {
                None
            };
            let frame = ClientFrame::Create {
                room: keys.room_id,
                auth_key: keys.auth_key,
                pow,
            };
            self.send_json(&frame.to_json()).await?;
            match self.recv().await? {
                ServerFrame::Error { code, .. } if code == "pow_required" && !with_work => {
                    with_work = true;
                }
                answer => return Ok(answer),
            }
        }
    }

    /// Join a room with the proof for this socket's challenge; returns the answer frame.
    pub async fn join(
        &mut self,
        keys: &RoomKeys,
        after: Option<i64>,
    ) -> Result<ServerFrame, ClientError> {
        let proof = crypto::join_proof(&keys.auth_key, &self.hello.challenge, &keys.room_id);
        let frame = ClientFrame::Join {
            room: keys.room_id,
            proof,
            after,
        };
        self.send_json(&frame.to_json()).await?;
        self.recv().await
    }

    /// Now by the server's clock (as of its hello), to date a message by: the server takes a
    /// `send` only within a day of its own epoch, whatever this machine's clock says.
    pub fn server_now(&self) -> i64 {
        crate::store::now_ms() + self.clock_offset
    }

    /// Send an already encrypted message.
    pub async fn send_sealed(
        &mut self,
        reference: &str,
        sealed: &Sealed,
    ) -> Result<(), ClientError> {
        let frame = ClientFrame::Send {
            reference: reference.to_owned(),
            epoch: sealed.epoch,
            iv: sealed.iv,
            ct: sealed.ct.clone(),
        };
        self.send_json(&frame.to_json()).await
    }

    /// The socket itself, once the handshake, create or join is done: for load generators
    /// that then drive it with their own hot loop.
    pub fn into_inner(self) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        self.ws
    }

    /// Close the socket politely.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// The room secret of a room link: `https://host/#<secret>`, `#<secret>` or the secret alone
/// (43 characters of base64url). `None` for anything else.
pub fn secret_from_link(link: &str) -> Option<[u8; crypto::SECRET_LEN]> {
    let link = link.trim();
    let fragment = link.rsplit_once('#').map_or(link, |(_, f)| f);
    from_b64u(fragment)?.try_into().ok()
}

/// What [`take_down`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takedown {
    /// The room existed: every message is deleted, every member told, the link blocked.
    Wiped,
    /// The room had already been wiped; its link stays blocked.
    AlreadyWiped,
    /// No room had this link (never made, or expired): one was made and wiped at once, so
    /// the link cannot be used on this server either.
    Blocked,
}

/// Wipe the room of `keys` and block its link, as its panic button does, without reading a
/// single message: join (or, when no room has this id, create it so the id can be blocked),
/// send `panic`, wait for `nuked`. The operator's takedown (`nanochat room wipe LINK`). A
/// server under load may refuse with `rate_limited`; then it waits as told and tries again
/// (five times at most).
pub async fn take_down(url: &str, keys: &RoomKeys) -> Result<Takedown, ClientError> {
    let mut tries = 0;
    loop {
        match take_down_once(url, keys).await? {
            Ok(done) => return Ok(done),
            Err(wait) if tries < 5 => {
                tries += 1;
                tokio::time::sleep(wait).await;
            }
            Err(_) => {
                return Err(ClientError::Server {
                    code: "rate_limited".into(),
                    message: "still refused after five waits".into(),
                });
            }
        }
    }
}

/// One try of [`take_down`]: `Ok(Err(wait))` when the server said to retry after `wait`.
async fn take_down_once(
    url: &str,
    keys: &RoomKeys,
) -> Result<Result<Takedown, Duration>, ClientError> {
    let mut client = match connect_or_wait(url).await? {
        Ok(client) => client,
        Err(wait) => return Ok(Err(wait)),
    };
    let outcome = match client.join(keys, None).await? {
        ServerFrame::Joined { .. } => Takedown::Wiped,
        ServerFrame::Error { code, .. } if code == "room_gone" => {
            return Ok(Ok(Takedown::AlreadyWiped));
        }
        ServerFrame::Error { code, .. } if code == "auth_failed" => {
            let mut fresh = match connect_or_wait(url).await? {
                Ok(client) => client,
                Err(wait) => return Ok(Err(wait)),
            };
            match fresh.create(keys).await? {
                ServerFrame::Joined { .. } => {}
                refused => return refusal(refused),
            }
            client = fresh;
            Takedown::Blocked
        }
        refused => return refusal(refused),
    };
    client.send_json(&ClientFrame::Panic.to_json()).await?;
    // Messages sent to the room meanwhile may still arrive first; the wipe ends with `nuked`.
    loop {
        match client.recv().await? {
            ServerFrame::Nuked => return Ok(Ok(outcome)),
            ServerFrame::Msg(_) => {}
            refused => return refusal(refused),
        }
    }
}

/// Connect, or learn how long to wait when the server refuses the upgrade for now (`429` or
/// `503` with `Retry-After`).
async fn connect_or_wait(url: &str) -> Result<Result<Client, Duration>, ClientError> {
    match Client::connect(url).await {
        Ok(client) => Ok(Ok(client)),
        Err(ClientError::Ws(tokio_tungstenite::tungstenite::Error::Http(answer)))
            if matches!(answer.status().as_u16(), 429 | 503) =>
        {
            let secs = answer
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .unwrap_or(1);
            Ok(Err(Duration::from_secs(secs.clamp(1, 30))))
        }
        Err(e) => Err(e),
    }
}

/// What an unexpected answer to [`take_down_once`] means: wait and retry, or give up.
fn refusal(frame: ServerFrame) -> Result<Result<Takedown, Duration>, ClientError> {
    match frame {
        ServerFrame::Error {
            code,
            retry_after_ms,
            ..
        } if code == "rate_limited" => Ok(Err(Duration::from_millis(
            retry_after_ms.unwrap_or(1_000).clamp(100, 30_000),
        ))),
        ServerFrame::Error { code, message, .. } => Err(ClientError::Server { code, message }),
        other => Err(ClientError::Protocol(format!(
            "unexpected answer: {other:?}"
        ))),
    }
}

/// The plaintext of a message (PROTOCOL.md §2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Sender's nickname (≤ 64 characters).
    pub nick: String,
    /// Message text.
    pub text: String,
    /// b64u of 8 random bytes, one per client session.
    pub sid: String,
    /// Counter, starting at 1.
    pub n: u64,
    /// Client time, ms.
    pub ts: i64,
}

/// An encrypted message ready to send.
#[derive(Debug, Clone)]
pub struct Sealed {
    /// Epoch of the key used.
    pub epoch: u32,
    /// Random IV.
    pub iv: [u8; IV_LEN],
    /// Ciphertext with tag.
    pub ct: Vec<u8>,
}

/// Why a received message was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Did not decrypt (wrong room, epoch, tampered) or is not an envelope.
    #[error("message does not decrypt")]
    Undecryptable,
    /// `(sid, n)` already seen, or `n` out of order with the seqs seen for that `sid`.
    #[error("message replayed")]
    Replayed,
}

/// A client's view of one room: its keys, its own `(sid, n)`, and the replay state.
///
/// The replay rule: a `(sid, n)` is accepted once, and within one sid `n` grows with `seq`.
/// For live messages (ascending seq) that is "n above the highest seen"; checking against the
/// neighbours by seq keeps the rule when older history is paged in backwards.
pub struct RoomSession {
    /// The room's keys.
    pub keys: RoomKeys,
    sid: String,
    n: u64,
    seen: HashMap<String, std::collections::BTreeMap<i64, u64>>,
    /// The server's largest ciphertext: envelopes are padded no further (`crypto::padded_len`).
    max_ct: usize,
}

impl RoomSession {
    /// Start a session for a room with a fresh random `sid`.
    pub fn new(keys: RoomKeys) -> Self {
        let mut sid = [0u8; 8];
        rand::fill(&mut sid);
        Self {
            keys,
            sid: b64u(&sid),
            n: 0,
            seen: HashMap::new(),
            max_ct: crate::config::LimitSettings::default().max_ct_bytes,
        }
    }

    /// Pad within this server's largest ciphertext (its `hello`'s `max_ct`) instead of the
    /// default's.
    pub fn within(mut self, max_ct: usize) -> Self {
        self.max_ct = max_ct;
        self
    }

    /// Encrypt a text with today's key.
    pub fn seal(&mut self, nick: &str, text: &str) -> Sealed {
        self.seal_at(nick, text, crate::store::now_ms())
    }

    /// Encrypt a text as written at `now` (ms): its envelope's `ts` and the key of its day.
    pub fn seal_at(&mut self, nick: &str, text: &str, now: i64) -> Sealed {
        self.n += 1;
        let env = Envelope {
            nick: nick.to_owned(),
            text: text.to_owned(),
            sid: self.sid.clone(),
            n: self.n,
            ts: now,
        };
        let epoch = crypto::epoch_of(now);
        let mut iv = [0u8; IV_LEN];
        rand::fill(&mut iv);
        let mut plain = serde_json::to_vec(&env).expect("envelopes serialize");
        // JSON allows whitespace after the value: every reader parses it as the same envelope.
        plain.resize(crypto::padded_len(plain.len(), self.max_ct), b' ');
        Sealed {
            epoch,
            iv,
            ct: crypto::seal_message(&self.keys, epoch, &iv, &plain),
        }
    }

    /// Decrypt a received message and apply the replay rule.
    pub fn open(&mut self, msg: &WireMsg) -> Result<Envelope, Rejected> {
        let iv = from_b64u(&msg.iv).ok_or(Rejected::Undecryptable)?;
        let ct = from_b64u(&msg.ct).ok_or(Rejected::Undecryptable)?;
        let plain =
            crypto::open_message(&self.keys, msg.epoch, &iv, &ct).ok_or(Rejected::Undecryptable)?;
        let env: Envelope = serde_json::from_slice(&plain).map_err(|_| Rejected::Undecryptable)?;
        let by_seq = self.seen.entry(env.sid.clone()).or_default();
        let below = by_seq.range(..msg.seq).next_back().map(|(_, n)| *n);
        let above = by_seq.range(msg.seq..).next().map(|(_, n)| *n);
        if by_seq.values().any(|n| *n == env.n)
            || below.is_some_and(|n| n >= env.n)
            || above.is_some_and(|n| n <= env.n)
        {
            return Err(Rejected::Replayed);
        }
        by_seq.insert(msg.seq, env.n);
        Ok(env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_messages_are_padded_to_whole_blocks_and_open_as_written() {
        let keys = RoomKeys::derive(&[3u8; crypto::SECRET_LEN]);
        let mut writer = RoomSession::new(keys.clone());
        let mut reader = RoomSession::new(keys.clone());
        let mut small = RoomSession::new(keys).within(300);
        for (seq, text) in [(1, "hi"), (2, &"x".repeat(150)), (3, &"y".repeat(300))] {
            let sealed = writer.seal("nick", text);
            let blocks = if text.len() > 150 { 2 } else { 1 };
            assert_eq!(
                sealed.ct.len(),
                blocks * crypto::PAD_BLOCK + crypto::TAG_LEN
            );
            let msg = WireMsg {
                seq,
                ts: 0,
                epoch: sealed.epoch,
                iv: b64u(&sealed.iv),
                ct: b64u(&sealed.ct),
            };
            assert_eq!(reader.open(&msg).unwrap().text, text);
        }
        // Within a smaller limit: padded up to it, not past it.
        assert_eq!(small.seal("nick", "hi").ct.len(), 256 + crypto::TAG_LEN);
        assert_eq!(small.seal("nick", &"z".repeat(200)).ct.len(), 300);
    }

    #[test]
    fn a_room_link_gives_its_secret_in_every_written_form() {
        let secret = [7u8; crypto::SECRET_LEN];
        let s = b64u(&secret);
        for link in [
            format!("https://chat.example.org/#{s}"),
            format!("http://abc.onion/#{s}\n"),
            format!("#{s}"),
            format!("  {s}  "),
        ] {
            assert_eq!(secret_from_link(&link), Some(secret), "{link:?}");
        }
        for bad in [
            String::new(),
            "https://chat.example.org/".into(),
            format!("https://chat.example.org/#{}", &s[..42]),
            format!("https://chat.example.org/#{s}A"),
            format!("https://chat.example.org/#+{}", &s[1..]),
            format!("https://chat.example.org/#{s}#"),
        ] {
            assert_eq!(secret_from_link(&bad), None, "{bad:?}");
        }
    }
}
