//! Security properties checked by measurement rather than by reading the code.

use std::process::Command;

/// Instructions executed inside functions matching `function` while `ct_probe` runs
/// `what variant`, counted by valgrind's callgrind (exact and repeatable, unlike time).
fn instructions(what: &str, variant: &str, function: &str) -> u64 {
    let probe = env!("CARGO_BIN_EXE_ct-probe");
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let status = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!(
            "--callgrind-out-file={}",
            out_file.path().display()
        ))
        .arg(format!("--toggle-collect=*{function}*"))
        .arg(probe)
        .args([what, variant])
        .output()
        .expect("this test counts instructions with valgrind: apt-get install valgrind");
    assert!(status.status.success(), "{status:?}");
    let text = std::fs::read_to_string(out_file.path()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("summary: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("callgrind summary line")
}

/// A wrong join proof or proof-of-work tag costs the same instructions whether it differs
/// in its first byte or its last: the comparison does not stop early, so timing reveals
/// nothing about how much of a guess was right. The same method does catch a comparison
/// that stops at the first difference.
#[test]
fn proof_and_token_comparisons_do_not_stop_at_the_first_difference() {
    for (what, function) in [("join", "verify_join_proof"), ("pow", "open_pow_token")] {
        let first = instructions(what, "first", function);
        let last = instructions(what, "last", function);
        assert!(first > 0, "{what}: nothing counted");
        assert_eq!(
            first, last,
            "{what}: a difference in the first byte costs other instructions than one in the last"
        );
    }
    let first = instructions("early_exit", "first", "early_exit_compare");
    let last = instructions("early_exit", "last", "early_exit_compare");
    assert!(
        first < last,
        "the method must see an early exit: {first} vs {last}"
    );
}
