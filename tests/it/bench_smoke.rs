//! The load-test scenarios run once at a tiny size, so they cannot rot. These assert that the
//! generator works and nothing is lost; speed is measured only by `benches/` on demand.

use std::process::Command;

fn run(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_nanochat-load"))
        .args(args)
        .output()
        .expect("run the load generator");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().expect("a report line")).expect("JSON report")
}

fn assert_complete(report: &serde_json::Value) {
    assert!(report["sent"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["delivered"], report["expected"], "{report}");
    assert!(report["p99_ms"].as_f64().unwrap() > 0.0, "{report}");
}

#[test]
fn the_fanout_scenario_runs_against_the_bare_baseline_and_nanochat() {
    let tiny = [
        "--rooms",
        "2",
        "--members",
        "3",
        "--rate",
        "20",
        "--secs",
        "1",
    ];
    let bare = run(&[&["fanout", "--target", "bare"][..], &tiny].concat());
    assert_complete(&bare);
    let ours = run(&[&["fanout", "--target", "nanochat"][..], &tiny].concat());
    assert_complete(&ours);
    assert!(ours["server_cpu_s"].as_f64().is_some());
}

#[actix_web::test]
async fn the_fanout_scenario_runs_on_two_nodes_over_postgres() {
    let db = crate::pg::cluster().database().await;
    let report = run(&[
        "fanout",
        "--target",
        "nanochat",
        "--nodes",
        "2",
        "--postgres",
        &db.url,
        "--rooms",
        "2",
        "--members",
        "4",
        "--rate",
        "20",
        "--secs",
        "1",
    ]);
    assert_complete(&report);
    assert_eq!(report["nodes"], 2);
}

#[test]
fn the_idle_memory_scenario_runs() {
    for target in ["bare", "nanochat"] {
        let report = run(&[
            "idle",
            "--target",
            target,
            "--rooms",
            "5",
            "--members",
            "4",
            "--secs",
            "1",
        ]);
        assert_eq!(report["sockets"], 20, "{report}");
        assert!(report["rss_after_bytes"].as_u64().unwrap() > 0, "{report}");
    }
}
