//! Cryptographic primitives of protocol v1, shared by the server and the Rust client:
//! HKDF key derivation (§1), message AAD (§2), the join proof (§4), proof-of-work tokens and
//! hashes (§3), and the server-side keys derived from the server secret.
//!
//! Nothing here does I/O or keeps state; every function is deterministic given its inputs
//! (random bytes are passed in or drawn from the OS generator where noted).

use aes_gcm::aead::{Aead, KeyInit as _, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// Length of a room id in bytes.
pub const ROOM_ID_LEN: usize = 16;
/// Length of a room authentication key in bytes.
pub const AUTH_KEY_LEN: usize = 32;
/// Length of a room secret in bytes.
pub const SECRET_LEN: usize = 32;
/// Length of the per-socket join challenge in bytes.
pub const CHALLENGE_LEN: usize = 32;
/// Length of a join proof (HMAC-SHA256 output) in bytes.
pub const PROOF_LEN: usize = 32;
/// Length of an AES-GCM IV in bytes.
pub const IV_LEN: usize = 12;
/// Length of an AES-GCM tag in bytes; the smallest possible ciphertext.
pub const TAG_LEN: usize = 16;
/// Length of a proof-of-work token in bytes.
pub const POW_TOKEN_LEN: usize = 42;
/// Version byte that starts every proof-of-work token.
pub const POW_TOKEN_VERSION: u8 = 1;
/// Milliseconds in one epoch (one UTC day).
pub const EPOCH_MS: i64 = 86_400_000;
/// Largest proof-of-work counter a client may send (2^53, exclusive, so JavaScript can count).
pub const MAX_POW_COUNTER: u64 = 1 << 53;

const POW_SIGNED_LEN: usize = 26;
const POW_TAG_LEN: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// A room id: 16 bytes derived from the room secret.
pub type RoomId = [u8; ROOM_ID_LEN];

/// The epoch (UTC day number) of a time in milliseconds since the Unix epoch.
pub fn epoch_of(unix_ms: i64) -> u32 {
    // Times before 1970 or after year 11 million do not occur; clamp instead of wrapping.
    unix_ms.div_euclid(EPOCH_MS).clamp(0, u32::MAX as i64) as u32
}

/// HKDF-SHA256 with IKM `ikm`, no salt, and the given `info`, filling `out`.
pub fn hkdf_expand(ikm: &[u8], info: &[u8], out: &mut [u8]) {
    Hkdf::<Sha256>::new(None, ikm)
        .expand(info, out)
        // Every caller asks for at most 32 bytes, far below HKDF's 255 * 32 limit.
        .expect("HKDF output length is within limits");
}

/// The keys a client derives from a room secret (PROTOCOL.md §1).
#[derive(Clone)]
pub struct RoomKeys {
    secret: [u8; SECRET_LEN],
    /// The room id the server knows the room by.
    pub room_id: RoomId,
    /// The key whose HMAC proves membership; the server stores it wrapped.
    pub auth_key: [u8; AUTH_KEY_LEN],
}

impl RoomKeys {
    /// Derive the room id and authentication key from a 32-byte room secret.
    pub fn derive(secret: &[u8; SECRET_LEN]) -> Self {
        let mut room_id = [0u8; ROOM_ID_LEN];
        let mut auth_key = [0u8; AUTH_KEY_LEN];
        hkdf_expand(secret, b"nanochat/v1/room-id", &mut room_id);
        hkdf_expand(secret, b"nanochat/v1/auth", &mut auth_key);
        Self {
            secret: *secret,
            room_id,
            auth_key,
        }
    }

    /// The room secret these keys were derived from.
    pub fn secret(&self) -> &[u8; SECRET_LEN] {
        &self.secret
    }

    /// The AES-256-GCM message key of epoch `epoch`.
    pub fn msg_key(&self, epoch: u32) -> [u8; 32] {
        let mut info = Vec::with_capacity(20);
        info.extend_from_slice(b"nanochat/v1/msg/");
        info.extend_from_slice(&epoch.to_be_bytes());
        let mut key = [0u8; 32];
        hkdf_expand(&self.secret, &info, &mut key);
        key
    }

    /// The attachment key (reserved by the protocol, unused so far).
    pub fn attach_key(&self) -> [u8; 32] {
        let mut key = [0u8; 32];
        hkdf_expand(&self.secret, b"nanochat/v1/attach", &mut key);
        key
    }
}

/// The additional authenticated data of a message: binds a ciphertext to its room and epoch.
pub fn message_aad(room_id: &RoomId, epoch: u32) -> [u8; 35] {
    let mut aad = [0u8; 35];
    aad[..15].copy_from_slice(b"nanochat/v1/msg");
    aad[15..31].copy_from_slice(room_id);
    aad[31..].copy_from_slice(&epoch.to_be_bytes());
    aad
}

fn join_mac(auth_key: &[u8; AUTH_KEY_LEN], challenge: &[u8], room_id: &RoomId) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(auth_key).expect("HMAC accepts any key length");
    mac.update(b"nanochat/v1/join");
    mac.update(challenge);
    mac.update(room_id);
    mac
}

/// The join proof: HMAC-SHA256(auth_key, "nanochat/v1/join" || challenge || room_id).
pub fn join_proof(
    auth_key: &[u8; AUTH_KEY_LEN],
    challenge: &[u8; CHALLENGE_LEN],
    room_id: &RoomId,
) -> [u8; PROOF_LEN] {
    join_mac(auth_key, challenge, room_id)
        .finalize()
        .into_bytes()
        .into()
}

/// Check a join proof in constant time (the comparison does not stop at the first difference).
pub fn verify_join_proof(
    auth_key: &[u8; AUTH_KEY_LEN],
    challenge: &[u8; CHALLENGE_LEN],
    room_id: &RoomId,
    proof: &[u8; PROOF_LEN],
) -> bool {
    join_mac(auth_key, challenge, room_id)
        .verify_slice(proof)
        .is_ok()
}

/// The proof-of-work hash state after the fixed prefix `"nanochat/v1/pow" || token || room_id`;
/// clone it and feed a counter to test one candidate.
pub fn pow_prefix(token: &[u8], room_id: &RoomId) -> Sha256 {
    let mut h = Sha256::new();
    h.update(b"nanochat/v1/pow");
    h.update(token);
    h.update(room_id);
    h
}

/// The number of leading zero bits of a digest.
pub fn leading_zero_bits(digest: &[u8]) -> u32 {
    let mut bits = 0;
    for byte in digest {
        if *byte == 0 {
            bits += 8;
        } else {
            bits += byte.leading_zeros();
            break;
        }
    }
    bits
}

/// SHA-256("nanochat/v1/pow" || token || room_id || u64be(counter)).
pub fn pow_hash(token: &[u8], room_id: &RoomId, counter: u64) -> [u8; 32] {
    let mut h = pow_prefix(token, room_id);
    h.update(counter.to_be_bytes());
    h.finalize().into()
}

/// Whether `counter` solves `token` for `room_id` at difficulty `bits`.
pub fn pow_check(token: &[u8], room_id: &RoomId, counter: u64, bits: u8) -> bool {
    counter < MAX_POW_COUNTER
        && leading_zero_bits(&pow_hash(token, room_id, counter)) >= bits as u32
}

/// Find the smallest counter that solves `token` for `room_id` at difficulty `bits`.
/// Expected work: 2^bits hashes.
pub fn pow_solve(token: &[u8], room_id: &RoomId, bits: u8) -> u64 {
    let prefix = pow_prefix(token, room_id);
    (0..MAX_POW_COUNTER)
        .find(|c| {
            let mut h = prefix.clone();
            h.update(c.to_be_bytes());
            leading_zero_bits(&h.finalize()) >= bits as u32
        })
        // 2^53 candidates at any difficulty up to 32 bits fail with probability ~0.
        .expect("a solution exists below 2^53")
}

/// The fields of a proof-of-work token whose tag verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowToken {
    /// When the token stops being accepted, in milliseconds since the Unix epoch.
    pub expires_ms: u64,
    /// Required leading zero bits.
    pub bits: u8,
    /// Random bytes that make the token unique; the key of the replay set.
    pub nonce: [u8; 16],
}

/// Why a proof-of-work token was refused, in the order the checks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PowTokenError {
    /// Wrong length or version byte.
    #[error("malformed token")]
    Malformed,
    /// Past its expiry time.
    #[error("token expired")]
    Expired,
    /// The tag does not verify: forged, altered or from another server secret.
    #[error("token not issued by this server")]
    BadTag,
    /// The token is genuine but the counter does not solve it for this room.
    #[error("the counter does not solve the token")]
    WrongWork,
}

impl PowTokenError {
    /// The label of `nanochat_pow_tokens_total` for this refusal.
    pub fn label(self) -> &'static str {
        match self {
            PowTokenError::Malformed => "malformed",
            PowTokenError::Expired => "expired",
            PowTokenError::BadTag => "bad_tag",
            PowTokenError::WrongWork => "wrong_work",
        }
    }
}

/// Keys the server derives from its own secret. They never leave the process.
#[derive(Clone)]
pub struct ServerKeys {
    pow_key: [u8; 32],
    wrap: Aes256Gcm,
    check: [u8; 32],
}

impl ServerKeys {
    /// Derive the server keys from the server secret (at least 32 bytes).
    pub fn derive(server_secret: &[u8]) -> Self {
        let mut pow_key = [0u8; 32];
        let mut wrap_key = [0u8; 32];
        let mut check = [0u8; 32];
        hkdf_expand(server_secret, b"nanochat/v1/server/pow", &mut pow_key);
        hkdf_expand(server_secret, b"nanochat/v1/server/wrap", &mut wrap_key);
        hkdf_expand(server_secret, b"nanochat/v1/server/check", &mut check);
        Self {
            pow_key,
            wrap: Aes256Gcm::new(&wrap_key.into()),
            check,
        }
    }

    /// A value that identifies the server secret without revealing it; nodes of one cluster
    /// compare it to detect a mismatched secret.
    pub fn check_value(&self) -> [u8; 32] {
        self.check
    }

    fn pow_tag(&self, signed: &[u8]) -> [u8; POW_TAG_LEN] {
        let mut mac = HmacSha256::new_from_slice(&self.pow_key).expect("any key length");
        mac.update(signed);
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; POW_TAG_LEN];
        tag.copy_from_slice(&full[..POW_TAG_LEN]);
        tag
    }

    /// Issue a proof-of-work token: `1 || u64be(expires) || bits || nonce || tag`.
    pub fn issue_pow_token(&self, expires_ms: u64, bits: u8) -> [u8; POW_TOKEN_LEN] {
        let mut token = [0u8; POW_TOKEN_LEN];
        token[0] = POW_TOKEN_VERSION;
        token[1..9].copy_from_slice(&expires_ms.to_be_bytes());
        token[9] = bits;
        rand::fill(&mut token[10..POW_SIGNED_LEN]);
        let tag = self.pow_tag(&token[..POW_SIGNED_LEN]);
        token[POW_SIGNED_LEN..].copy_from_slice(&tag);
        token
    }

    /// Check a token's length, version, expiry and tag, cheapest first. The caller then checks
    /// the replay set and the work itself.
    pub fn open_pow_token(&self, token: &[u8], now_ms: u64) -> Result<PowToken, PowTokenError> {
        if token.len() != POW_TOKEN_LEN || token[0] != POW_TOKEN_VERSION {
            return Err(PowTokenError::Malformed);
        }
        let expires_ms = u64::from_be_bytes(token[1..9].try_into().expect("8 bytes"));
        if expires_ms <= now_ms {
            return Err(PowTokenError::Expired);
        }
        let expected = self.pow_tag(&token[..POW_SIGNED_LEN]);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            &expected[..],
            &token[POW_SIGNED_LEN..],
        )) {
            return Err(PowTokenError::BadTag);
        }
        Ok(PowToken {
            expires_ms,
            bits: token[9],
            nonce: token[10..POW_SIGNED_LEN].try_into().expect("16 bytes"),
        })
    }

    /// Everything about a proof-of-work solution that needs no I/O, cheapest first: length,
    /// version, expiry and tag, then the work (one hash). The caller then spends the token in
    /// the replay set; checking the work first means a wrong counter does not burn a token.
    pub fn verify_pow_solution(
        &self,
        token: &[u8],
        room_id: &RoomId,
        counter: u64,
        now_ms: u64,
    ) -> Result<PowToken, PowTokenError> {
        let opened = self.open_pow_token(token, now_ms)?;
        if !pow_check(token, room_id, counter, opened.bits) {
            return Err(PowTokenError::WrongWork);
        }
        Ok(opened)
    }

    /// Wrap a room's auth key for storage: `nonce(12) || AES-256-GCM(ct || tag)`, bound to the
    /// room id, so a database dump alone does not let anyone join.
    pub fn wrap_auth_key(&self, room_id: &RoomId, auth_key: &[u8; AUTH_KEY_LEN]) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        rand::fill(&mut nonce);
        let aad = wrap_aad(room_id);
        let ct = self
            .wrap
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: auth_key,
                    aad: &aad,
                },
            )
            // AES-GCM encryption of 32 bytes cannot fail.
            .expect("AES-GCM encrypts 32 bytes");
        let mut out = Vec::with_capacity(12 + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Unwrap a stored auth key; `None` when it was not wrapped by this server secret for this
    /// room (a cluster with mismatched secrets, or a tampered row).
    pub fn unwrap_auth_key(&self, room_id: &RoomId, wrapped: &[u8]) -> Option<[u8; AUTH_KEY_LEN]> {
        if wrapped.len() != 12 + AUTH_KEY_LEN + TAG_LEN {
            return None;
        }
        let aad = wrap_aad(room_id);
        let plain = self
            .wrap
            .decrypt(
                Nonce::from_slice(&wrapped[..12]),
                Payload {
                    msg: &wrapped[12..],
                    aad: &aad,
                },
            )
            .ok()?;
        plain.try_into().ok()
    }
}

fn wrap_aad(room_id: &RoomId) -> [u8; 32] {
    let mut aad = [0u8; 32];
    aad[..16].copy_from_slice(b"nanochat/v1/wrap");
    aad[16..].copy_from_slice(room_id);
    aad
}

/// Envelopes are padded to a multiple of this many bytes (client side, `padded_len`).
pub const PAD_BLOCK: usize = 256;

/// The length an envelope of `len` bytes is padded to, with JSON whitespace after it, so that
/// the server and the network learn a message's length only to within `PAD_BLOCK` bytes: the
/// next multiple of `PAD_BLOCK`, but never past what a server taking at most `max_ct` bytes of
/// ciphertext accepts (the tag takes `TAG_LEN`), and never shorter than the envelope.
pub fn padded_len(len: usize, max_ct: usize) -> usize {
    len.next_multiple_of(PAD_BLOCK)
        .min(max_ct.saturating_sub(TAG_LEN))
        .max(len)
}

/// Encrypt a message plaintext with a room's key of `epoch` (client side).
pub fn seal_message(keys: &RoomKeys, epoch: u32, iv: &[u8; IV_LEN], plaintext: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(&keys.msg_key(epoch).into());
    let aad = message_aad(&keys.room_id, epoch);
    cipher
        .encrypt(
            Nonce::from_slice(iv),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .expect("AES-GCM encryption does not fail for messages below 64 GiB")
}

/// Decrypt a message ciphertext (client side); `None` if it does not authenticate.
pub fn open_message(keys: &RoomKeys, epoch: u32, iv: &[u8], ct: &[u8]) -> Option<Vec<u8>> {
    if iv.len() != IV_LEN {
        return None;
    }
    let cipher = Aes256Gcm::new(&keys.msg_key(epoch).into());
    let aad = message_aad(&keys.room_id, epoch);
    cipher
        .decrypt(Nonce::from_slice(iv), Payload { msg: ct, aad: &aad })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_zero_bits_counts_across_bytes() {
        assert_eq!(leading_zero_bits(&[0xff]), 0);
        assert_eq!(leading_zero_bits(&[0x00, 0x80]), 8);
        assert_eq!(leading_zero_bits(&[0x00, 0x00, 0x01]), 23);
        assert_eq!(leading_zero_bits(&[0x0f]), 4);
        assert_eq!(leading_zero_bits(&[0, 0]), 16);
    }

    #[test]
    fn a_solved_counter_verifies_and_is_bound_to_its_room() {
        let keys = ServerKeys::derive(&[7u8; 32]);
        let token = keys.issue_pow_token(10_000, 10);
        let room = [1u8; 16];
        let c = pow_solve(&token, &room, 10);
        assert!(pow_check(&token, &room, c, 10));
        let other = [2u8; 16];
        // The same counter for another room almost never has 10 zero bits (p = 2^-10); the
        // smallest solution for that room is what must verify.
        let c2 = pow_solve(&token, &other, 10);
        assert!(pow_check(&token, &other, c2, 10));
        assert!(!pow_check(&token, &room, MAX_POW_COUNTER, 0));
    }

    #[test]
    fn tokens_are_checked_for_length_expiry_and_tag() {
        let keys = ServerKeys::derive(&[7u8; 32]);
        let token = keys.issue_pow_token(10_000, 12);
        let opened = keys.open_pow_token(&token, 9_999).expect("valid");
        assert_eq!(opened.bits, 12);
        assert_eq!(opened.expires_ms, 10_000);
        assert_eq!(
            keys.open_pow_token(&token[..41], 0),
            Err(PowTokenError::Malformed)
        );
        assert_eq!(
            keys.open_pow_token(&token, 10_000),
            Err(PowTokenError::Expired)
        );
        let mut altered = token;
        altered[9] = 1; // lower the difficulty
        assert_eq!(keys.open_pow_token(&altered, 0), Err(PowTokenError::BadTag));
        let other = ServerKeys::derive(&[8u8; 32]);
        assert_eq!(other.open_pow_token(&token, 0), Err(PowTokenError::BadTag));
    }

    #[test]
    fn wrapped_auth_keys_unwrap_only_for_their_room_and_secret() {
        let keys = ServerKeys::derive(&[7u8; 32]);
        let room = [3u8; 16];
        let auth = [9u8; 32];
        let wrapped = keys.wrap_auth_key(&room, &auth);
        assert_eq!(wrapped.len(), 60);
        assert_eq!(keys.unwrap_auth_key(&room, &wrapped), Some(auth));
        assert_eq!(keys.unwrap_auth_key(&[4u8; 16], &wrapped), None);
        assert_eq!(
            ServerKeys::derive(&[8u8; 32]).unwrap_auth_key(&room, &wrapped),
            None
        );
        assert!(!wrapped.windows(32).any(|w| w == auth));
    }

    #[test]
    fn messages_round_trip_and_are_bound_to_room_and_epoch() {
        let keys = RoomKeys::derive(&[5u8; 32]);
        let iv = [1u8; 12];
        let ct = seal_message(&keys, 20000, &iv, b"hello");
        assert_eq!(ct.len(), 5 + TAG_LEN);
        assert_eq!(
            open_message(&keys, 20000, &iv, &ct).as_deref(),
            Some(&b"hello"[..])
        );
        assert_eq!(open_message(&keys, 20001, &iv, &ct), None);
        let other = RoomKeys::derive(&[6u8; 32]);
        assert_eq!(open_message(&other, 20000, &iv, &ct), None);
    }

    #[test]
    fn envelopes_pad_to_whole_blocks_within_the_servers_limit() {
        assert_eq!(padded_len(1, 8192), 256);
        assert_eq!(padded_len(256, 8192), 256);
        assert_eq!(padded_len(257, 8192), 512);
        // Never past what the server takes, never shorter than the envelope.
        assert_eq!(padded_len(8100, 8192), 8192 - TAG_LEN);
        assert_eq!(padded_len(8176, 8192), 8176);
        assert_eq!(padded_len(9000, 8192), 9000);
        assert_eq!(padded_len(100, 16), 100);
    }

    #[test]
    fn epochs_are_utc_days() {
        assert_eq!(epoch_of(0), 0);
        assert_eq!(epoch_of(EPOCH_MS - 1), 0);
        assert_eq!(epoch_of(EPOCH_MS), 1);
        assert_eq!(epoch_of(-5), 0);
    }
}
