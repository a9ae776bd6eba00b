//! Micro-benchmarks of the per-frame hot paths: parsing and validating a `send`, verifying a
//! join proof, opening a proof-of-work token, a keyed rate-limit check among a million keys,
//! the whole admission path of one message, and encoding a broadcast frame.
//! Run with `cargo bench --bench micro`.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use nanochat::abuse::limits::{Client, ClientLimit, DirectLimiter, KeyedLimiter, Limits};
use nanochat::config::{Rate, Settings};
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

/// A rate no benchmark loop can exhaust, so every check takes the accepting path.
const UNLIMITED: Rate = Rate {
    per_minute: 1_000_000_000,
    burst: 1_000_000_000,
};

fn limiter_benches(c: &mut Criterion) {
    // One keyed check with a million keys in the map (cap above it, so no overflow path).
    let keyed = KeyedLimiter::new("bench", UNLIMITED, 2_000_000);
    let keys: Vec<u128> = (0..1_000_000u128)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835))
        .collect();
    for k in &keys {
        keyed.check(*k).unwrap();
    }
    assert_eq!(keyed.len(), 1_000_000);
    let mut i = 0usize;
    c.bench_function("keyed_limit_check_1M_keys", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            keyed.check(black_box(keys[i])).unwrap()
        })
    });
    drop(keyed);

    // At its cap (100 000 keys, the default), where every check also counts the keys.
    let capped = KeyedLimiter::new("bench", UNLIMITED, 100_000);
    for k in &keys[..99_999] {
        capped.check(*k).unwrap();
    }
    c.bench_function("keyed_limit_check_at_cap", |b| {
        b.iter(|| {
            i = (i + 7919) % 99_999;
            capped.check(black_box(keys[i])).unwrap()
        })
    });

    // The whole admission path of one `send`, as the session runs it before handing the
    // message to the writer: per-client frame limit, per-socket frame limit, parse and
    // validate, per-client message limit, per-room message limit, epoch window. The
    // per-client maps hold half their default key cap (50 000 other clients); at the cap the
    // limiter counts its keys on every check (see `keyed_limit_check_at_cap`).
    let mut settings = Settings::default();
    let r = &mut settings.rate;
    for rate in [
        &mut r.client_frames,
        &mut r.client_messages,
        &mut r.room_messages,
    ] {
        *rate = UNLIMITED;
    }
    let limits = Limits::new(&settings, Arc::new(nanochat::metrics::Metrics::new()));
    for k in 0..settings.rate.max_keys as u128 / 2 {
        let _ = limits.client(ClientLimit::Frame, Client::Ip(k << 64));
        let _ = limits.client(ClientLimit::Message(1), Client::Ip(k << 64));
    }
    let socket = DirectLimiter::new("socket_frames", UNLIMITED, 1);
    let me = Client::Ip(42 << 64);
    let room = [5u8; 16];
    let frame_limits = FrameLimits {
        max_ct_bytes: settings.limits.max_ct_bytes,
        default_history: settings.limits.history,
    };
    let epoch = crypto::epoch_of(nanochat::store::now_ms());
    let frame = serde_json::json!({
        "type": "send", "ref": "m-123", "epoch": epoch,
        "iv": b64u(&[7u8; 12]), "ct": b64u(&[9u8; 128]),
    })
    .to_string();
    c.bench_function("admission_send_128B", |b| {
        b.iter(|| {
            limits.client(ClientLimit::Frame, me).unwrap();
            socket.check().unwrap();
            let parsed = parse_client_frame(black_box(&frame), &frame_limits).unwrap();
            let nanochat::protocol::ClientFrame::Send { epoch, ct, .. } = parsed else {
                unreachable!()
            };
            let cost = nanochat::protocol::message_cost(ct.len());
            limits.client(ClientLimit::Message(cost), me).unwrap();
            limits.room_message(&room, cost).unwrap();
            let current = crypto::epoch_of(nanochat::store::now_ms());
            assert!(epoch.abs_diff(current) <= 1);
        })
    });
}

criterion_group!(micro, benches, limiter_benches);
criterion_main!(micro);
