//! The client frame parser: any bytes a socket can deliver as a text frame. Beyond "never
//! panics", every accepted frame must respect the documented bounds and survive a round trip
//! through its canonical JSON form unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nanochat::protocol::{
    ClientFrame, FrameLimits, HistoryQuery, MAX_HISTORY_LIMIT, MAX_REF_CHARS, MAX_SEQ,
    parse_client_frame,
};

const LIMITS: FrameLimits = FrameLimits {
    max_ct_bytes: 1024,
    default_history: 50,
};

fn check_bounds(frame: &ClientFrame) {
    match frame {
        ClientFrame::Send { reference, ct, .. } => {
            assert!(reference.chars().count() <= MAX_REF_CHARS);
            assert!(ct.len() >= 16 && ct.len() <= LIMITS.max_ct_bytes);
        }
        ClientFrame::History { query, limit } => {
            assert!((1..=MAX_HISTORY_LIMIT).contains(limit));
            if let HistoryQuery::After(s) | HistoryQuery::Before(s) = query {
                assert!((0..=MAX_SEQ as i64).contains(s));
            }
        }
        ClientFrame::Join { after: Some(a), .. } => assert!((0..=MAX_SEQ as i64).contains(a)),
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(frame) = parse_client_frame(text, &LIMITS) else {
        return;
    };
    check_bounds(&frame);
    let again = parse_client_frame(&frame.to_json().to_string(), &LIMITS)
        .expect("the canonical form of an accepted frame is accepted");
    assert_eq!(frame, again, "round trip changed the frame");
});
