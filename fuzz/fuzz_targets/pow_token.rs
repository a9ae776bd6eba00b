//! The proof-of-work token verifier: tokens the server issued, then altered by the fuzzer, and
//! wholly made-up ones. A token verifies only if every signed byte and the tag are exactly as
//! issued, it has not expired, and the counter really solves it for the room.
//!
//! The server key is fresh for every input. With a fixed key the fuzzer forged a tag within
//! minutes by reading the operands of the tag comparison (sanitizer-coverage trace-compares),
//! which no remote client can do: a property of the harness, not of the server.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nanochat::crypto::{self, PowTokenError, ServerKeys};

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in data.iter().skip(at).take(8).enumerate() {
        b[i] = *x;
    }
    u64::from_be_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let mut secret = [0u8; 32];
    rand::fill(&mut secret);
    let keys = ServerKeys::derive(&secret);
    let now = u64_at(data, 0) >> 1;
    let counter = u64_at(data, 8);
    let mut room = [0u8; 16];
    for (i, x) in data.iter().skip(16).take(16).enumerate() {
        room[i] = *x;
    }
    let rest = data.get(32..).unwrap_or(&[]);

    // A made-up token (any length): must never verify, the tag key is secret.
    let made_up = keys.verify_pow_solution(rest, &room, counter, now);
    assert!(made_up.is_err(), "a token the server never issued verified");

    // A genuine token at low difficulty, XOR-altered by the input.
    let bits = rest.first().map_or(0, |b| b % 4);
    let expires = now.saturating_add(u64_at(rest, 1) % 1_000_000);
    let issued = keys.issue_pow_token(expires, bits);
    let mut token = issued;
    for (t, m) in token.iter_mut().zip(rest.iter().skip(9)) {
        *t ^= *m;
    }
    let solution = crypto::pow_solve(&token, &room, bits);
    let result = keys.verify_pow_solution(&token, &room, solution, now);
    if token != issued {
        assert!(
            matches!(
                result,
                Err(PowTokenError::Malformed | PowTokenError::Expired | PowTokenError::BadTag)
            ),
            "an altered token was accepted: {result:?}"
        );
        return;
    }
    if expires <= now {
        assert_eq!(result, Err(PowTokenError::Expired));
        return;
    }
    let opened = result.expect("an unaltered, unexpired token with a real solution verifies");
    assert_eq!(opened.bits, bits);
    assert_eq!(opened.expires_ms, expires);
    // The fuzzer's own counter: accepted exactly when it does the work.
    let theirs = keys.verify_pow_solution(&token, &room, counter, now);
    assert_eq!(
        theirs.is_ok(),
        crypto::pow_check(&token, &room, counter, bits),
        "verdict differs from the work check"
    );
});
