//! WebSocket framing on a connection taken over from the HTTP/1 dispatcher.
//!
//! An upgraded socket keeps no buffer while it is idle: the reader holds bytes only while a
//! frame is incomplete, and the writer builds each write's bytes, writes them and lets them
//! go. (actix-http's dispatcher, which `actix-ws` runs on, keeps two 8 KiB buffers for the
//! socket's whole life: more than an idle socket's whole budget.) Frames are decoded by
//! actix-http's WebSocket codec, which checks masking and the size limit before it buffers a
//! frame's payload.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use actix_codec::Decoder;
use actix_http::ws::{Codec, Frame, Item, ProtocolError};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use tokio::io::{AsyncRead, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::either::Either;

use crate::tls::Conn;

type TlsStream = Box<tokio_rustls::server::TlsStream<TcpStream>>;

/// Bytes asked of the kernel per read. They land in a buffer on the stack, and only what
/// arrived is copied to the heap, so a socket holds no read buffer between messages and a
/// chat frame costs an allocation of its own size (small enough for glibc's per-thread cache;
/// a request of 1 KiB or more first merges every freed small block of the thread's arena).
const READ_CHUNK: usize = 4096;

/// How long a closing socket keeps reading for the client's own close, so that input still in
/// flight does not turn the close into a reset (which could discard the close frame).
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// The most frames one message may arrive in. Clients send whole messages or a few large
/// pieces; without a bound, a message of `limits.max_frame_bytes` bytes could arrive one byte
/// per frame, tens of thousands of frames for what the limits count as one.
pub const MAX_PIECES: usize = 64;

/// A message read from the client, continuations already joined.
#[derive(Debug)]
pub enum Incoming {
    Text(ByteString),
    Binary,
    Ping(Bytes),
    Pong,
    Close,
}

/// Why the client's input cannot be read further.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// A frame, or a message made of continuations, is larger than the limit.
    TooLarge,
    /// A message in more than [`MAX_PIECES`] frames.
    TooManyPieces,
    /// Not a valid WebSocket stream (unmasked frame, stray continuation, invalid UTF-8, ...).
    Protocol,
}

/// Split an upgraded connection into its reading and writing halves. `early` holds whatever
/// the client sent after its handshake request and the dispatcher already read.
pub fn split(io: Conn, early: BytesMut, max_message: usize) -> (Reader, Writer) {
    // Frames are written whole, and several at once when they queue up; waiting to fill a
    // packet (Nagle) would only delay them.
    let (read, write): (ReadHalf, WriteHalf) = match io {
        Either::Left(tcp) => {
            let _ = tcp.set_nodelay(true);
            let (read, write) = tcp.into_split();
            (Either::Left(read), Either::Left(write))
        }
        Either::Right(tls) => {
            let _ = tls.get_ref().0.set_nodelay(true);
            // TLS has one state for both directions: its halves share it behind a lock.
            let (read, write) = tokio::io::split(tls);
            (Either::Right(read), Either::Right(write))
        }
    };
    (
        Reader {
            io: read,
            buf: early,
            codec: Codec::new().max_size(max_message),
            partial: None,
            max_message,
        },
        Writer {
            io: write,
            out: Vec::new(),
            broken: false,
        },
    )
}

/// The reading side of a plain (`Left`) or TLS (`Right`) connection.
type ReadHalf = Either<OwnedReadHalf, tokio::io::ReadHalf<TlsStream>>;

/// The writing side of a plain (`Left`) or TLS (`Right`) connection.
type WriteHalf = Either<OwnedWriteHalf, tokio::io::WriteHalf<TlsStream>>;

/// The reading half: frames in, messages out.
pub struct Reader {
    io: ReadHalf,
    buf: BytesMut,
    codec: Codec,
    /// A message arriving in continuations: whether it is text, its bytes so far, and in how
    /// many frames.
    partial: Option<(bool, BytesMut, usize)>,
    max_message: usize,
}

impl Reader {
    /// The next message; `None` once the client is gone (end of stream or a socket error).
    /// Cancel-safe: bytes already read stay buffered for the next call.
    pub async fn recv(&mut self) -> Option<Result<Incoming, ReadError>> {
        loop {
            match self.next_buffered() {
                Ok(Some(message)) => return Some(Ok(message)),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            if self.buf.is_empty() {
                // Hold no memory while waiting: an idle socket has nothing buffered.
                self.buf = BytesMut::new();
            }
            match std::future::poll_fn(|cx| self.read_some(cx)).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// One read into a chunk on the stack, appended to `buf`. `poll_read` rather than waiting
    /// for readiness and trying a read: a read that comes back short tells tokio the socket is
    /// drained, so the next wait costs no system call, where a tried read leaves the socket
    /// marked ready and the next round pays for a read that finds nothing (one such empty read
    /// per message, measured). It also respects the task's cooperative budget.
    fn read_some(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut read = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut read))?;
        self.buf.extend_from_slice(read.filled());
        Poll::Ready(Ok(read.filled().len()))
    }

    /// Decode from what is buffered; `Ok(None)` when more bytes are needed.
    fn next_buffered(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            let frame = match self.codec.decode(&mut self.buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(None),
                Err(ProtocolError::Overflow) => return Err(ReadError::TooLarge),
                Err(_) => return Err(ReadError::Protocol),
            };
            let whole = match frame {
                Frame::Text(bytes) => text(bytes)?,
                Frame::Binary(_) => Incoming::Binary,
                Frame::Ping(bytes) => Incoming::Ping(bytes),
                Frame::Pong(_) => Incoming::Pong,
                Frame::Close(_) => Incoming::Close,
                Frame::Continuation(item) => match self.continuation(item)? {
                    Some(message) => message,
                    None => continue,
                },
            };
            return Ok(Some(whole));
        }
    }

    fn first(&mut self, is_text: bool, bytes: Bytes) -> Result<(Bytes, bool), ReadError> {
        if self.partial.is_some() {
            return Err(ReadError::Protocol);
        }
        self.partial = Some((is_text, BytesMut::new(), 0));
        Ok((bytes, false))
    }

    fn continuation(&mut self, item: Item) -> Result<Option<Incoming>, ReadError> {
        let (bytes, last) = match item {
            Item::FirstText(b) => self.first(true, b)?,
            Item::FirstBinary(b) => self.first(false, b)?,
            Item::Continue(b) => (b, false),
            Item::Last(b) => (b, true),
        };
        let Some((is_text, so_far, pieces)) = self.partial.as_mut() else {
            return Err(ReadError::Protocol);
        };
        if so_far.len() + bytes.len() > self.max_message {
            return Err(ReadError::TooLarge);
        }
        *pieces += 1;
        if *pieces > MAX_PIECES {
            return Err(ReadError::TooManyPieces);
        }
        so_far.extend_from_slice(&bytes);
        if !last {
            return Ok(None);
        }
        let is_text = *is_text;
        let (_, whole, _) = self.partial.take().expect("checked above");
        if is_text {
            text(whole.freeze()).map(Some)
        } else {
            Ok(Some(Incoming::Binary))
        }
    }

    /// Read and drop the client's input until it closes its side, for at most `CLOSE_LINGER`.
    pub async fn linger(mut self) {
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            loop {
                self.buf.clear();
                match std::future::poll_fn(|cx| self.read_some(cx)).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

fn text(bytes: Bytes) -> Result<Incoming, ReadError> {
    ByteString::try_from(bytes)
        .map(Incoming::Text)
        .map_err(|_| ReadError::Protocol)
}

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Append one unmasked, final frame (the server's frames are never masked or fragmented).
fn put_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// The writing half. Frames are queued with [`Writer::queue_text`] and written together by
/// [`Writer::flush`]; the other methods write at once.
pub struct Writer {
    io: WriteHalf,
    /// Frames waiting for `flush`.
    out: Vec<u8>,
    /// A write was abandoned part-way (its future dropped): the stream is cut mid-frame, so
    /// nothing more may be written.
    broken: bool,
}

impl Writer {
    /// Queue a text frame for the next [`Writer::flush`].
    pub fn queue_text(&mut self, text: &str) {
        put_frame(&mut self.out, OP_TEXT, text.as_bytes());
    }

    /// Write every queued frame, in one write call when the socket takes it.
    pub async fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        if self.broken {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        // Taken out, so an idle socket keeps no write buffer.
        let out = std::mem::take(&mut self.out);
        self.broken = true;
        self.io.write_all(&out).await?;
        // TLS may keep the tail of what it encrypted until asked (TCP's flush is free).
        self.io.flush().await?;
        self.broken = false;
        Ok(())
    }

    pub async fn ping(&mut self, payload: &[u8]) -> io::Result<()> {
        put_frame(&mut self.out, OP_PING, payload);
        self.flush().await
    }

    pub async fn pong(&mut self, payload: &[u8]) -> io::Result<()> {
        put_frame(&mut self.out, OP_PONG, payload);
        self.flush().await
    }

    /// Send a close frame with its code and reason, then end our side of the stream.
    pub async fn close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        let mut payload = code.to_be_bytes().to_vec();
        // A control frame's payload is at most 125 bytes: the code and 123 of the reason.
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        payload.extend_from_slice(&reason.as_bytes()[..end]);
        put_frame(&mut self.out, OP_CLOSE, &payload);
        self.flush().await?;
        self.io.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair: the server's halves (as `split` makes them) and the client's socket.
    async fn pair(max_message: usize) -> (Reader, Writer, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (reader, writer) = split(Either::Left(server), BytesMut::new(), max_message);
        (reader, writer, client)
    }

    /// A client frame (masked, as clients must send them).
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mask = [3u8, 5, 7, 11];
        let mut f = vec![
            if fin { 0x80 } else { 0 } | opcode,
            0x80 | payload.len() as u8,
        ];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    async fn recv(reader: &mut Reader) -> Option<Result<Incoming, ReadError>> {
        tokio::time::timeout(Duration::from_secs(5), reader.recv())
            .await
            .expect("a message in time")
    }

    #[tokio::test]
    async fn continuations_are_joined_around_control_frames_and_bounded() {
        let (mut reader, _writer, mut client) = pair(8).await;
        let mut input = client_frame(false, OP_TEXT, b"hel");
        input.extend(client_frame(true, OP_PING, b"p"));
        input.extend(client_frame(false, 0x0, b"l"));
        input.extend(client_frame(true, 0x0, b"o"));
        client.write_all(&input).await.unwrap();
        assert!(matches!(recv(&mut reader).await, Some(Ok(Incoming::Ping(p))) if &p[..] == b"p"));
        assert!(matches!(recv(&mut reader).await, Some(Ok(Incoming::Text(t))) if t == "hello"));
        // Each part fits the limit of 8 bytes, the message they make does not.
        let mut input = client_frame(false, OP_TEXT, b"12345");
        input.extend(client_frame(true, 0x0, b"6789"));
        client.write_all(&input).await.unwrap();
        assert_eq!(
            recv(&mut reader).await.unwrap().unwrap_err(),
            ReadError::TooLarge
        );
    }

    #[tokio::test]
    async fn a_message_may_come_in_at_most_max_pieces_frames() {
        let message = |pieces: usize| {
            let mut input = client_frame(false, OP_TEXT, b"x");
            for _ in 2..pieces {
                input.extend(client_frame(false, 0x0, b"x"));
            }
            input.extend(client_frame(true, 0x0, b"x"));
            input
        };
        let (mut reader, _writer, mut client) = pair(1024).await;
        client.write_all(&message(MAX_PIECES)).await.unwrap();
        assert!(
            matches!(recv(&mut reader).await, Some(Ok(Incoming::Text(t))) if t.len() == MAX_PIECES)
        );
        client.write_all(&message(MAX_PIECES + 1)).await.unwrap();
        assert_eq!(
            recv(&mut reader).await.unwrap().unwrap_err(),
            ReadError::TooManyPieces
        );
    }

    #[tokio::test]
    async fn stray_or_restarted_continuations_and_bad_utf8_are_protocol_errors() {
        for input in [
            client_frame(true, 0x0, b"no start"),
            [
                client_frame(false, OP_TEXT, b"a"),
                client_frame(true, OP_TEXT, b"b"),
            ]
            .concat(),
            [
                client_frame(false, OP_TEXT, &[0xe2, 0x82]),
                client_frame(true, 0x0, &[0x28]),
            ]
            .concat(),
        ] {
            let (mut reader, _writer, mut client) = pair(1024).await;
            client.write_all(&input).await.unwrap();
            assert_eq!(
                recv(&mut reader).await.unwrap().unwrap_err(),
                ReadError::Protocol
            );
        }
        // A multi-byte character split across two parts is fine once joined.
        let (mut reader, _writer, mut client) = pair(1024).await;
        let euro = "€".as_bytes();
        let input = [
            client_frame(false, OP_TEXT, &euro[..1]),
            client_frame(true, 0x0, &euro[1..]),
        ];
        client.write_all(&input.concat()).await.unwrap();
        assert!(matches!(recv(&mut reader).await, Some(Ok(Incoming::Text(t))) if t == "€"));
        drop(client);
        assert!(
            recv(&mut reader).await.is_none(),
            "end of stream is the end"
        );
    }

    #[tokio::test]
    async fn an_idle_reader_holds_no_buffer() {
        let (mut reader, _writer, mut client) = pair(1024).await;
        client
            .write_all(&client_frame(true, OP_TEXT, &[b'x'; 100]))
            .await
            .unwrap();
        assert!(matches!(
            recv(&mut reader).await,
            Some(Ok(Incoming::Text(_)))
        ));
        // Waiting for the next frame (and given up on, as `select!` does) keeps nothing.
        let waited = tokio::time::timeout(Duration::from_millis(50), reader.recv()).await;
        assert!(waited.is_err());
        assert_eq!(reader.buf.capacity(), 0);
        // Half a frame is kept across a cancelled wait and completed by the rest.
        let frame = client_frame(true, OP_TEXT, b"split");
        client.write_all(&frame[..4]).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(50), reader.recv()).await;
        assert!(waited.is_err());
        client.write_all(&frame[4..]).await.unwrap();
        assert!(matches!(recv(&mut reader).await, Some(Ok(Incoming::Text(t))) if t == "split"));
    }

    /// Read one server frame: (first byte, payload).
    async fn server_frame(client: &mut TcpStream) -> (u8, Vec<u8>) {
        let mut head = [0u8; 2];
        client.read_exact(&mut head).await.unwrap();
        assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
        let len = match head[1] {
            126 => u64::from(client.read_u16().await.unwrap()),
            127 => client.read_u64().await.unwrap(),
            n => u64::from(n),
        };
        let mut payload = vec![0u8; len as usize];
        client.read_exact(&mut payload).await.unwrap();
        (head[0], payload)
    }

    #[tokio::test]
    async fn frames_carry_their_lengths_and_a_close_reason_is_cut_at_a_character() {
        let (_reader, mut writer, mut client) = pair(1024).await;
        let sizes = [0, 125, 126, 65_535, 65_536, 70_000];
        for n in sizes {
            writer.queue_text(&"a".repeat(n));
        }
        writer.flush().await.unwrap();
        for n in sizes {
            let (first, payload) = server_frame(&mut client).await;
            assert_eq!((first, payload.len()), (0x81, n));
        }
        writer.ping(b"hi").await.unwrap();
        assert_eq!(server_frame(&mut client).await, (0x89, b"hi".to_vec()));
        writer.pong(b"yo").await.unwrap();
        assert_eq!(server_frame(&mut client).await, (0x8A, b"yo".to_vec()));
        let reason = "é".repeat(100);
        writer.close(1008, &reason).await.unwrap();
        let (first, payload) = server_frame(&mut client).await;
        assert_eq!(first, 0x88);
        assert!(payload.len() <= 125);
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1008);
        let text = std::str::from_utf8(&payload[2..]).expect("whole characters");
        assert_eq!(text, "é".repeat(61));
        // Our side is closed after the close frame.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}
