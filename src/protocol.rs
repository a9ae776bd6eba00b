//! The wire types of protocol v1 (PROTOCOL.md §4): client frames parsed and validated in one
//! pass, server frames serialized with serde, and the stable error codes.
//!
//! Parsing borrows from the received text where it can; binary fields are decoded from
//! base64url (no padding) straight into fixed-size arrays, so a frame is either fully valid or
//! refused with one [`FrameError`] naming the code the client gets.

use std::borrow::Cow;

use base64_simd::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::crypto::{AUTH_KEY_LEN, IV_LEN, POW_TOKEN_LEN, PROOF_LEN, ROOM_ID_LEN, RoomId, TAG_LEN};

/// Protocol version announced in `hello`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest accepted `ref` of a `send`, in characters.
pub const MAX_REF_CHARS: usize = 64;
/// Largest `limit` of a `history` request.
pub const MAX_HISTORY_LIMIT: u32 = 200;

/// Bytes of a message's content that count as one message against the message limits.
pub const MESSAGE_COST_UNIT: usize = 1024;

/// What a `send` costs against the message limits: one per started KiB of its content (the
/// ciphertext less its tag), at least one. The page pads ordinary messages to 256-byte blocks,
/// so everything up to a KiB counts once, and the largest message (8 KiB at the default
/// `limits.max_ct_bytes`) eight times: the limits bound the bytes a client stores, not only
/// its messages.
pub fn message_cost(ct_len: usize) -> u32 {
    let content = ct_len.saturating_sub(TAG_LEN);
    u32::try_from(content.div_ceil(MESSAGE_COST_UNIT).max(1)).unwrap_or(u32::MAX)
}

/// Largest sequence number a client may name (JavaScript's safe integer range).
pub const MAX_SEQ: u64 = (1 << 53) - 1;

// base64url runs on every ciphertext in and out; the SIMD codec is 2-3x faster than a scalar
// one on this path and, like it, refuses padding, other alphabets and non-canonical tails
// (a test compares the two on random input).

/// Encode bytes as base64url without padding.
pub fn b64u(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode_to_string(bytes)
}

/// Decode base64url without padding; refuses padding, other alphabets and non-canonical tails.
pub fn from_b64u(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode_to_vec(text.as_bytes()).ok()
}

fn b64u_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    // Exactly N bytes encode to ceil(4N/3) characters without padding; refuse anything else
    // before decoding.
    if text.len() != (N * 4).div_ceil(3) {
        return None;
    }
    let mut out = [0u8; N];
    match URL_SAFE_NO_PAD.decode(text.as_bytes(), base64_simd::Out::from_slice(&mut out)) {
        Ok(decoded) if decoded.len() == N => Some(out),
        _ => None,
    }
}

/// The stable error codes of PROTOCOL.md §4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed JSON, wrong field types or lengths, bad base64, epoch out of range.
    BadRequest,
    /// Frame or ciphertext above the limit.
    TooLarge,
    /// `type` not known.
    UnknownType,
    /// Unknown room, wrong proof or expired room (one answer for all).
    AuthFailed,
    /// `create` for a room that exists.
    RoomExists,
    /// The room was wiped by `panic`.
    RoomGone,
    /// The frame needs a joined room.
    NotJoined,
    /// The socket already belongs to a room.
    AlreadyJoined,
    /// A limit was hit.
    RateLimited,
    /// Room creation needs proof of work.
    PowRequired,
    /// The work or the token is wrong, expired or spent.
    PowInvalid,
    /// The room already stores a message with this IV.
    Replay,
    /// Storage is down; nothing was stored.
    Unavailable,
    /// Anything else.
    Internal,
}

impl ErrorCode {
    /// Every code, for metrics and tests.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::UnknownType,
        ErrorCode::AuthFailed,
        ErrorCode::RoomExists,
        ErrorCode::RoomGone,
        ErrorCode::NotJoined,
        ErrorCode::AlreadyJoined,
        ErrorCode::RateLimited,
        ErrorCode::PowRequired,
        ErrorCode::PowInvalid,
        ErrorCode::Replay,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::RoomExists => "room_exists",
            ErrorCode::RoomGone => "room_gone",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::AlreadyJoined => "already_joined",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::PowRequired => "pow_required",
            ErrorCode::PowInvalid => "pow_invalid",
            ErrorCode::Replay => "replay",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A refused frame: the code, a human sentence, and the `ref` of a `send` when it was readable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// Stable code.
    pub code: ErrorCode,
    /// Human text; never carries internal details.
    pub message: &'static str,
    /// The `ref` of the refused `send`, if any.
    pub reference: Option<String>,
}

impl FrameError {
    /// A refusal without a `ref`.
    pub fn new(code: ErrorCode, message: &'static str) -> Self {
        Self {
            code,
            message,
            reference: None,
        }
    }

    fn with_ref(mut self, reference: Option<&str>) -> Self {
        self.reference = reference.map(str::to_owned);
        self
    }
}

/// A proof-of-work solution attached to `create`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PowSolution {
    /// The token as issued (42 bytes).
    pub token: [u8; POW_TOKEN_LEN],
    /// The counter that solves it.
    pub counter: u64,
}

/// Which messages a history request wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryQuery {
    /// The newest messages.
    Latest,
    /// Messages with `seq` greater than this, oldest first.
    After(i64),
    /// Messages with `seq` less than this (the newest of them).
    Before(i64),
}

/// A validated client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// Ask for a proof-of-work token.
    Pow,
    /// Create a room and join it.
    Create {
        /// Room id.
        room: RoomId,
        /// The room's authentication key.
        auth_key: [u8; AUTH_KEY_LEN],
        /// Proof of work, when one was sent.
        pow: Option<PowSolution>,
    },
    /// Join an existing room.
    Join {
        /// Room id.
        room: RoomId,
        /// HMAC proof over this socket's challenge.
        proof: [u8; PROOF_LEN],
        /// Resume after this sequence number.
        after: Option<i64>,
    },
    /// Store and relay a ciphertext.
    Send {
        /// Client's reference, echoed in `ack` or `error`.
        reference: String,
        /// Epoch of the message key.
        epoch: u32,
        /// AES-GCM IV.
        iv: [u8; IV_LEN],
        /// Ciphertext with tag.
        ct: Vec<u8>,
    },
    /// Page through history.
    History {
        /// Which page.
        query: HistoryQuery,
        /// At most this many messages.
        limit: u32,
    },
    /// Wipe the room for everyone.
    Panic,
}

impl ClientFrame {
    /// The canonical wire form of this frame: what [`parse_client_frame`] turns back into an
    /// equal frame. Used by the Rust client and by the parser's fuzz target.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            ClientFrame::Pow => json!({"type": "pow"}),
            ClientFrame::Panic => json!({"type": "panic"}),
            ClientFrame::Create {
                room,
                auth_key,
                pow,
            } => {
                let mut v =
                    json!({"type": "create", "room": b64u(room), "auth_key": b64u(auth_key)});
                if let Some(p) = pow {
                    v["pow"] = json!({"token": b64u(&p.token), "counter": p.counter});
                }
                v
            }
            ClientFrame::Join { room, proof, after } => {
                let mut v = json!({"type": "join", "room": b64u(room), "proof": b64u(proof)});
                if let Some(a) = after {
                    v["after"] = json!(a);
                }
                v
            }
            ClientFrame::Send {
                reference,
                epoch,
                iv,
                ct,
            } => json!({
                "type": "send", "ref": reference, "epoch": epoch, "iv": b64u(iv), "ct": b64u(ct),
            }),
            ClientFrame::History { query, limit } => {
                let mut v = json!({"type": "history", "limit": limit});
                match query {
                    HistoryQuery::Latest => {}
                    HistoryQuery::After(a) => v["after"] = json!(a),
                    HistoryQuery::Before(b) => v["before"] = json!(b),
                }
                v
            }
        }
    }
}

/// Limits that parsing enforces.
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    /// Largest decoded ciphertext.
    pub max_ct_bytes: usize,
    /// Default `history` limit when the client names none.
    pub default_history: u32,
}

#[derive(Deserialize)]
struct RawPow<'a> {
    #[serde(borrow)]
    token: Cow<'a, str>,
    counter: u64,
}

/// Every field any client frame can carry; which are required depends on `type`. Unknown fields
/// are ignored so later protocol versions can add some.
#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(default, borrow)]
    room: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    auth_key: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pow: Option<RawPow<'a>>,
    #[serde(default, borrow)]
    proof: Option<Cow<'a, str>>,
    #[serde(default)]
    after: Option<u64>,
    #[serde(default)]
    before: Option<u64>,
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default, rename = "ref", borrow)]
    reference: Option<Cow<'a, str>>,
    #[serde(default)]
    epoch: Option<u64>,
    #[serde(default, borrow)]
    iv: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    ct: Option<Cow<'a, str>>,
}

fn bad(message: &'static str) -> FrameError {
    FrameError::new(ErrorCode::BadRequest, message)
}

fn required<T>(field: Option<T>, message: &'static str) -> Result<T, FrameError> {
    field.ok_or_else(|| bad(message))
}

fn seq_field(value: u64, message: &'static str) -> Result<i64, FrameError> {
    if value > MAX_SEQ {
        return Err(bad(message));
    }
    Ok(value as i64)
}

/// The `ref` of a `send` refused before it is parsed (a frame limit was hit), found by looking
/// for it rather than parsing: the frame's `"ref":"..."` when it has `"type":"send"` and the
/// ref is a plain string of at most [`MAX_REF_CHARS`] characters, as clients write them. With
/// it, the refusal names the send, so the client knows which message to send again; anything
/// else is refused without a `ref`, as before. Two substring searches: no more work than
/// reading the frame was.
pub fn unparsed_send_ref(text: &str) -> Option<String> {
    const KEY: &str = "\"ref\":\"";
    if !text.contains("\"type\":\"send\"") {
        return None;
    }
    let start = text.find(KEY)? + KEY.len();
    let rest = &text[start..];
    let r = &rest[..rest.find('"')?];
    (!r.contains('\\') && r.chars().count() <= MAX_REF_CHARS).then(|| r.to_owned())
}

/// Parse and validate one text frame. Epoch range is checked by the caller, which knows the time.
pub fn parse_client_frame(text: &str, limits: &FrameLimits) -> Result<ClientFrame, FrameError> {
    let raw: RawFrame<'_> = serde_json::from_str(text)
        .map_err(|_| bad("the frame is not a JSON object with the fields its type needs"))?;
    match raw.ty.as_ref() {
        "pow" => Ok(ClientFrame::Pow),
        "panic" => Ok(ClientFrame::Panic),
        "create" => {
            let room = b64u_array(&required(raw.room, "create needs a room")?)
                .ok_or_else(|| bad("room must be 16 bytes of base64url"))?;
            let auth_key = b64u_array(&required(raw.auth_key, "create needs an auth_key")?)
                .ok_or_else(|| bad("auth_key must be 32 bytes of base64url"))?;
            let pow = match raw.pow {
                None => None,
                Some(p) => Some(PowSolution {
                    token: b64u_array(&p.token)
                        .ok_or_else(|| bad("pow.token must be 42 bytes of base64url"))?,
                    counter: p.counter,
                }),
            };
            Ok(ClientFrame::Create {
                room,
                auth_key,
                pow,
            })
        }
        "join" => {
            let room = b64u_array(&required(raw.room, "join needs a room")?)
                .ok_or_else(|| bad("room must be 16 bytes of base64url"))?;
            let proof = b64u_array(&required(raw.proof, "join needs a proof")?)
                .ok_or_else(|| bad("proof must be 32 bytes of base64url"))?;
            let after = raw
                .after
                .map(|a| seq_field(a, "after is out of range"))
                .transpose()?;
            Ok(ClientFrame::Join { room, proof, after })
        }
        "send" => {
            let reference = raw.reference.as_deref();
            let fail = |e: FrameError| e.with_ref(reference);
            let r = required(reference, "send needs a ref").map_err(fail)?;
            if r.chars().count() > MAX_REF_CHARS {
                return Err(fail(bad("ref is longer than 64 characters")));
            }
            let epoch = required(raw.epoch, "send needs an epoch").map_err(fail)?;
            let epoch = u32::try_from(epoch).map_err(|_| fail(bad("epoch is out of range")))?;
            let iv = b64u_array(&required(raw.iv, "send needs an iv").map_err(fail)?)
                .ok_or_else(|| fail(bad("iv must be 12 bytes of base64url")))?;
            let ct_text = required(raw.ct.as_deref(), "send needs a ct").map_err(fail)?;
            // Check the size from the encoded length before decoding anything.
            if ct_text.len() / 4 * 3 > limits.max_ct_bytes.saturating_add(2) {
                return Err(fail(FrameError::new(
                    ErrorCode::TooLarge,
                    "the ciphertext is larger than this server accepts",
                )));
            }
            let ct = from_b64u(ct_text).ok_or_else(|| fail(bad("ct must be base64url")))?;
            if ct.len() > limits.max_ct_bytes {
                return Err(fail(FrameError::new(
                    ErrorCode::TooLarge,
                    "the ciphertext is larger than this server accepts",
                )));
            }
            if ct.len() < TAG_LEN {
                return Err(fail(bad("ct is shorter than an AES-GCM tag")));
            }
            Ok(ClientFrame::Send {
                reference: r.to_owned(),
                epoch,
                iv,
                ct,
            })
        }
        "history" => {
            let query = match (raw.before, raw.after) {
                (Some(b), None) => HistoryQuery::Before(seq_field(b, "before is out of range")?),
                (None, Some(a)) => HistoryQuery::After(seq_field(a, "after is out of range")?),
                (None, None) => HistoryQuery::Latest,
                (Some(_), Some(_)) => return Err(bad("history takes before or after, not both")),
            };
            let limit = match raw.limit {
                None => limits.default_history,
                Some(n) if (1..=MAX_HISTORY_LIMIT as u64).contains(&n) => n as u32,
                Some(_) => return Err(bad("limit must be between 1 and 200")),
            };
            Ok(ClientFrame::History { query, limit })
        }
        _ => Err(FrameError::new(
            ErrorCode::UnknownType,
            "this frame type is not part of protocol v1",
        )),
    }
}

/// One stored message as sent to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMsg {
    /// Position in the room.
    pub seq: i64,
    /// Server time of storage, ms.
    pub ts: i64,
    /// Epoch of the message key.
    pub epoch: u32,
    /// b64u IV.
    pub iv: String,
    /// b64u ciphertext.
    pub ct: String,
}

/// A frame the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame on every socket.
    Hello {
        /// Protocol version.
        v: u32,
        /// b64u of 32 random bytes.
        challenge: String,
        /// Current proof-of-work requirement for `create` (0 = none).
        pow_bits: u8,
        /// Largest ciphertext accepted.
        max_ct: usize,
        /// Messages returned by `join` without `after`.
        history: u32,
        /// (extension) The server's clock when it sent this, ms since the Unix epoch: a client
        /// whose own clock is off takes the epoch of a `send` from it. 0 from a server without it.
        #[serde(default)]
        now: i64,
    },
    /// A proof-of-work token.
    Pow {
        /// b64u token.
        token: String,
        /// Required leading zero bits.
        bits: u8,
        /// Expiry, ms.
        expires: u64,
    },
    /// The socket joined a room.
    Joined {
        /// b64u room id.
        room: String,
        /// Messages, ascending seq.
        messages: Vec<WireMsg>,
        /// Whether more messages exist beyond this page.
        more: bool,
    },
    /// A message was committed.
    Ack {
        /// The client's ref.
        #[serde(rename = "ref")]
        reference: String,
        /// Assigned sequence number.
        seq: i64,
        /// Server time of storage, ms.
        ts: i64,
    },
    /// A page of history.
    History {
        /// Messages, ascending seq.
        messages: Vec<WireMsg>,
        /// Whether more messages exist beyond this page.
        more: bool,
    },
    /// A new message in the room.
    Msg(WireMsg),
    /// The room was wiped.
    Nuked,
    /// A refusal.
    Error {
        /// Stable code.
        code: String,
        /// Human text.
        message: String,
        /// The `ref` of the refused `send`.
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        /// When to retry, for `rate_limited`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

impl ServerFrame {
    /// The error frame of a refusal.
    pub fn error(err: &FrameError, retry_after_ms: Option<u64>) -> Self {
        ServerFrame::Error {
            code: err.code.as_str().to_owned(),
            message: err.message.to_owned(),
            reference: err.reference.clone(),
            retry_after_ms,
        }
    }

    /// Serialize to the text of one WebSocket frame.
    pub fn to_text(&self) -> String {
        // Serializing these plain structs to a String cannot fail.
        serde_json::to_string(self).expect("server frames serialize")
    }
}

/// The room id as sent on the wire.
pub fn room_to_wire(room: &RoomId) -> String {
    b64u(room)
}

/// Parse a wire room id.
pub fn room_from_wire(text: &str) -> Option<RoomId> {
    b64u_array::<ROOM_ID_LEN>(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_refused_unparsed_is_named_by_its_ref_when_it_can_be_read() {
        let send = r#"{"type":"send","ref":"abc-1","epoch":20417,"iv":"AAAA","ct":"BBBB"}"#;
        assert_eq!(unparsed_send_ref(send).as_deref(), Some("abc-1"));
        let long = format!(r#"{{"type":"send","ref":"{}","ct":"x"}}"#, "r".repeat(65));
        for none in [
            r#"{"type":"history","ref":"abc"}"#.to_owned(),
            r#"{"type":"send","epoch":1}"#.to_owned(),
            r#"{"type":"send","ref":"a\"b"}"#.to_owned(),
            r#"{"type":"send","ref":"unterminated"#.to_owned(),
            long,
        ] {
            assert_eq!(unparsed_send_ref(&none), None, "{none}");
        }
    }

    const LIMITS: FrameLimits = FrameLimits {
        max_ct_bytes: 64,
        default_history: 100,
    };

    fn code(text: &str) -> ErrorCode {
        parse_client_frame(text, &LIMITS).unwrap_err().code
    }

    /// The SIMD codec accepts and refuses exactly what the reference `base64` crate does
    /// (URL-safe alphabet, no padding, canonical tails), and encodes the same text.
    #[test]
    fn base64url_matches_the_reference_codec_on_random_input() {
        use base64::Engine as _;
        let reference = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/=. ";
        let mut accepted = 0;
        for i in 0..200_000u32 {
            let mut noise = [0u8; 48];
            rand::fill(&mut noise);
            let len = noise[0] as usize % 40;
            // Mostly the URL-safe alphabet, now and then a character from outside it.
            let text: Vec<u8> = noise[1..=len]
                .iter()
                .map(|&b| {
                    let pool = if b < 16 { alphabet.len() } else { 64 };
                    alphabet[b as usize % pool]
                })
                .collect();
            let text = String::from_utf8(text).unwrap();
            let ours = from_b64u(&text);
            assert_eq!(ours, reference.decode(&text).ok(), "decoding {text:?}");
            accepted += usize::from(ours.is_some());
            let bytes = &noise[..(i as usize % 48)];
            assert_eq!(b64u(bytes), reference.encode(bytes));
        }
        // Both outcomes were exercised.
        assert!(accepted > 10_000 && accepted < 190_000, "{accepted}");
    }

    #[test]
    fn a_message_costs_one_per_started_kib_of_content() {
        use super::message_cost;
        // The page's short messages (one 256-byte block and its tag), up to a KiB of content.
        for ct in [16, 272, 1024, 1040] {
            assert_eq!(message_cost(ct), 1, "{ct}");
        }
        assert_eq!(message_cost(1041), 2);
        assert_eq!(message_cost(7168 + 16), 7);
        // The largest at the default limits.max_ct_bytes, and one at the largest allowed.
        assert_eq!(message_cost(8192), 8);
        assert_eq!(message_cost(1 << 20), 1024);
        assert_eq!(message_cost(0), 1);
    }

    #[test]
    fn valid_frames_parse() {
        let room = b64u(&[1u8; 16]);
        let proof = b64u(&[2u8; 32]);
        let f = parse_client_frame(
            &format!(r#"{{"type":"join","room":"{room}","proof":"{proof}","after":5}}"#),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(
            f,
            ClientFrame::Join {
                room: [1u8; 16],
                proof: [2u8; 32],
                after: Some(5)
            }
        );
        let f = parse_client_frame(
            &format!(
                r#"{{"type":"send","ref":"a","epoch":3,"iv":"{}","ct":"{}"}}"#,
                b64u(&[0; 12]),
                b64u(&[9; 20])
            ),
            &LIMITS,
        )
        .unwrap();
        assert!(matches!(f, ClientFrame::Send { epoch: 3, ref ct, .. } if ct.len() == 20));
    }

    #[test]
    fn bad_frames_get_their_codes() {
        assert_eq!(code("not json"), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"no":"type"}"#), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"type":"join","room":"AAAA","proof":"x"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"history","limit":201}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"history","before":-1}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"history","before":1.5}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"pow","type":"pow"}"#),
            ErrorCode::BadRequest
        );
        let big = b64u(&[0u8; 65]);
        let iv = b64u(&[0u8; 12]);
        let err = parse_client_frame(
            &format!(r#"{{"type":"send","ref":"r1","epoch":1,"iv":"{iv}","ct":"{big}"}}"#),
            &LIMITS,
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge);
        assert_eq!(err.reference.as_deref(), Some("r1"));
        let short = b64u(&[0u8; 15]);
        assert_eq!(
            code(&format!(
                r#"{{"type":"send","ref":"r","epoch":1,"iv":"{iv}","ct":"{short}"}}"#
            )),
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn padded_or_standard_base64_is_refused() {
        assert_eq!(room_from_wire(&b64u(&[0xfb; 16])).map(|r| r[0]), Some(0xfb));
        assert_eq!(room_from_wire("+/+/+/+/+/+/+/+/+/+/+w"), None);
        assert_eq!(room_from_wire(&format!("{}==", b64u(&[1; 16]))), None);
    }

    #[test]
    fn error_frames_serialize_with_optional_fields() {
        let err = FrameError::new(ErrorCode::RateLimited, "slow down");
        let text = ServerFrame::error(&err, Some(250)).to_text();
        assert_eq!(
            text,
            r#"{"type":"error","code":"rate_limited","message":"slow down","retry_after_ms":250}"#
        );
    }
}
