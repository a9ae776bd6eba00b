//! Runs one secret comparison many times, for the constant-time test in
//! `tests/it/security.rs`, which counts its instructions under valgrind:
//! `ct-probe join|pow|early_exit right|first|last` (the proof or tag is correct, or wrong in
//! its first or its last byte). `early_exit` is a comparison that stops at the first
//! difference, the kind the test must catch.

use std::hint::black_box;

use nanochat::crypto::{self, RoomKeys, ServerKeys};

#[inline(never)]
fn early_exit_compare(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (what, variant) = (args[1].as_str(), args[2].as_str());
    let flip = |bytes: &mut [u8], tail_from: usize| match variant {
        "first" => bytes[tail_from] ^= 1,
        "last" => *bytes.last_mut().expect("bytes") ^= 1,
        _ => {}
    };
    let mut accepted = 0u32;
    match what {
        "join" => {
            let keys = RoomKeys::derive(&[1u8; 32]);
            let challenge = [2u8; 32];
            let mut proof = crypto::join_proof(&keys.auth_key, &challenge, &keys.room_id);
            flip(&mut proof, 0);
            for _ in 0..100 {
                accepted += u32::from(crypto::verify_join_proof(
                    black_box(&keys.auth_key),
                    &challenge,
                    &keys.room_id,
                    black_box(&proof),
                ));
            }
        }
        "early_exit" => {
            let keys = RoomKeys::derive(&[1u8; 32]);
            let right = crypto::join_proof(&keys.auth_key, &[2u8; 32], &keys.room_id);
            let mut proof = right;
            flip(&mut proof, 0);
            for _ in 0..100 {
                accepted += u32::from(early_exit_compare(black_box(&right), black_box(&proof)));
            }
        }
        _ => {
            let keys = ServerKeys::derive(&[3u8; 32]);
            let mut token = keys.issue_pow_token(u64::MAX, 8);
            // The tag is the token's last 16 bytes.
            let tag_from = token.len() - 16;
            flip(&mut token, tag_from);
            for _ in 0..100 {
                accepted += u32::from(keys.open_pow_token(black_box(&token), 0).is_ok());
            }
        }
    }
    black_box(accepted);
}
