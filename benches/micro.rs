//! Micro-benchmarks of the per-frame hot paths: parsing and validating a `send`, verifying a
//! join proof, opening a proof-of-work token, and encoding a broadcast frame.
//! Run with `cargo bench --bench micro`.

use criterion::{Criterion, criterion_group, criterion_main};
use nanochat::crypto::{self, RoomKeys, ServerKeys};
use nanochat::protocol::{FrameLimits, ServerFrame, WireMsg, b64u, parse_client_frame};
use std::hint::black_box;

fn send_frame(ct_len: usize) -> String {
    serde_json::json!({
        "type": "send", "ref": "m-123", "epoch": 20417,
        "iv": b64u(&[7u8; 12]), "ct": b64u(&vec![9u8; ct_len]),
    })
    .to_string()
}

fn benches(c: &mut Criterion) {
    let limits = FrameLimits {
        max_ct_bytes: 8192,
        default_history: 100,
    };
    for len in [128usize, 1024, 8192] {
        let frame = send_frame(len);
        c.bench_function(&format!("parse_send_{len}B"), |b| {
            b.iter(|| parse_client_frame(black_box(&frame), &limits).unwrap())
        });
    }

    let keys = RoomKeys::derive(&[1u8; 32]);
    let challenge = [2u8; 32];
    let proof = crypto::join_proof(&keys.auth_key, &challenge, &keys.room_id);
    c.bench_function("verify_join_proof", |b| {
        b.iter(|| {
            crypto::verify_join_proof(&keys.auth_key, &challenge, &keys.room_id, black_box(&proof))
        })
    });

    let server = ServerKeys::derive(&[3u8; 32]);
    let token = server.issue_pow_token(u64::MAX, 8);
    let counter = crypto::pow_solve(&token, &keys.room_id, 8);
    c.bench_function("open_pow_token_and_check_work", |b| {
        b.iter(|| {
            let t = server.open_pow_token(black_box(&token), 0).unwrap();
            crypto::pow_check(&token, &keys.room_id, counter, t.bits)
        })
    });

    // One proof-of-work candidate: what an attacker's CPU core pays per hash.
    let prefix = crypto::pow_prefix(&token, &keys.room_id);
    let mut counter = 0u64;
    c.bench_function("pow_one_candidate", |b| {
        b.iter(|| {
            use sha2::Digest as _;
            counter += 1;
            let mut h = prefix.clone();
            h.update(counter.to_be_bytes());
            crypto::leading_zero_bits(&h.finalize())
        })
    });

    let msg = WireMsg {
        seq: 12345,
        ts: 1_764_028_800_000,
        epoch: 20417,
        iv: b64u(&[7u8; 12]),
        ct: b64u(&[9u8; 1024]),
    };
    c.bench_function("encode_broadcast_1024B", |b| {
        b.iter(|| ServerFrame::Msg(black_box(msg.clone())).to_text())
    });
}

criterion_group!(micro, benches);
criterion_main!(micro);
