//! The Rust crypto against `docs/test-vectors.json`, computed by an independent implementation.

use nanochat::crypto::{self, RoomKeys};
use nanochat::protocol::{b64u, from_b64u};

fn vectors() -> serde_json::Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/test-vectors.json"
    ))
    .expect("docs/test-vectors.json");
    serde_json::from_str(&text).expect("valid JSON")
}

fn bytes(v: &serde_json::Value) -> Vec<u8> {
    from_b64u(v.as_str().expect("string")).expect("b64u")
}

#[test]
fn key_derivation_matches_the_vectors() {
    let v = vectors();
    let secret: [u8; 32] = bytes(&v["secret"]).try_into().unwrap();
    let keys = RoomKeys::derive(&secret);
    assert_eq!(b64u(&keys.room_id), v["room_id"]);
    assert_eq!(b64u(&keys.auth_key), v["auth_key"]);
    let epoch = v["epoch"].as_u64().unwrap() as u32;
    assert_eq!(b64u(&keys.msg_key(epoch)), v["msg_key"]);
    assert_eq!(b64u(&keys.attach_key()), v["attach_key"]);
}

#[test]
fn the_join_proof_matches_the_vectors() {
    let v = vectors();
    let keys = RoomKeys::derive(&bytes(&v["secret"]).try_into().unwrap());
    let challenge: [u8; 32] = bytes(&v["challenge"]).try_into().unwrap();
    let proof = crypto::join_proof(&keys.auth_key, &challenge, &keys.room_id);
    assert_eq!(b64u(&proof), v["proof"]);
    assert!(crypto::verify_join_proof(
        &keys.auth_key,
        &challenge,
        &keys.room_id,
        &proof
    ));
    let mut wrong = proof;
    wrong[31] ^= 1;
    assert!(!crypto::verify_join_proof(
        &keys.auth_key,
        &challenge,
        &keys.room_id,
        &wrong
    ));
}

#[test]
fn message_encryption_matches_the_vectors() {
    let v = vectors();
    let keys = RoomKeys::derive(&bytes(&v["secret"]).try_into().unwrap());
    let epoch = v["epoch"].as_u64().unwrap() as u32;
    let m = &v["message"];
    assert_eq!(b64u(&crypto::message_aad(&keys.room_id, epoch)), m["aad"]);
    let iv: [u8; 12] = bytes(&m["iv"]).try_into().unwrap();
    let plain = m["plaintext"].as_str().unwrap().as_bytes();
    assert_eq!(
        b64u(&crypto::seal_message(&keys, epoch, &iv, plain)),
        m["ct"]
    );
    let opened = crypto::open_message(&keys, epoch, &iv, &bytes(&m["ct"])).unwrap();
    assert_eq!(opened, plain);
}

#[test]
fn proof_of_work_matches_the_vectors() {
    let v = vectors();
    let keys = RoomKeys::derive(&bytes(&v["secret"]).try_into().unwrap());
    let p = &v["pow"];
    let token = bytes(&p["token"]);
    assert_eq!(token.len(), crypto::POW_TOKEN_LEN);
    assert_eq!(
        b64u(&crypto::pow_hash(&token, &keys.room_id, 0)),
        p["counter_0_hash"]
    );
    let bits = p["bits"].as_u64().unwrap() as u8;
    let solution = crypto::pow_solve(&token, &keys.room_id, bits);
    assert_eq!(solution, p["solution"].as_u64().unwrap());
    assert_eq!(
        b64u(&crypto::pow_hash(&token, &keys.room_id, solution)),
        p["solution_hash"]
    );
    assert!(crypto::pow_check(&token, &keys.room_id, solution, bits));
}
