//! The load-test scenarios run once at a tiny size, so they cannot rot. These assert that the
//! generator works and nothing is lost; speed is measured only by `benches/` on demand.

use std::process::Command;

/// Every JSON line the load generator printed.
fn run_lines(args: &[&str]) -> Vec<serde_json::Value> {
    run_lines_with(args, &[])
}

/// Every JSON line the load generator printed, run with `env` added to its environment.
fn run_lines_with(args: &[&str], env: &[(&str, &std::path::Path)]) -> Vec<serde_json::Value> {
    run_process(args, env).1
}

/// The load generator's process id and every JSON line it printed.
fn run_process(args: &[&str], env: &[(&str, &std::path::Path)]) -> (u32, Vec<serde_json::Value>) {
    let child = Command::new(env!("CARGO_BIN_EXE_nanochat-load"))
        .args(args)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the load generator");
    let pid = child.id();
    let out = child.wait_with_output().expect("run the load generator");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON report line"))
        .collect();
    (pid, lines)
}

/// The load generator's last (or only) report.
fn run(args: &[&str]) -> serde_json::Value {
    run_lines(args).pop().expect("a report line")
}

fn assert_complete(report: &serde_json::Value) {
    assert!(report["sent"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["delivered"], report["expected"], "{report}");
    assert!(report["p99_ms"].as_f64().unwrap() > 0.0, "{report}");
}

/// Two rooms of three at 20 messages/s for one second.
const TINY: [&str; 8] = [
    "--rooms",
    "2",
    "--members",
    "3",
    "--rate",
    "20",
    "--secs",
    "1",
];

#[test]
fn the_fanout_scenario_runs_against_every_baseline_and_nanochat() {
    let bare = run(&[&["fanout", "--target", "bare"][..], &TINY].concat());
    assert_complete(&bare);
    let nodelay = run(&[&["fanout", "--target", "bare-nodelay"][..], &TINY].concat());
    assert_complete(&nodelay);
    assert_eq!(nodelay["target"], "bare-nodelay", "{nodelay}");
    let node = run(&[&["fanout", "--target", "node"][..], &TINY].concat());
    assert_complete(&node);
    let ours = run(&[&["fanout", "--target", "nanochat"][..], &TINY].concat());
    assert_complete(&ours);
    // And over NanoChat's own HTTPS.
    let tls = run(&[&["fanout", "--target", "nanochat", "--tls", "1"][..], &TINY].concat());
    assert_complete(&tls);
    assert_eq!((&ours["tls"], &tls["tls"]), (&false.into(), &true.into()));
    assert!(ours["server_cpu_s"].as_f64().is_some());
    // How much of the run the VM's host took away, for reading noisy results.
    for report in [&bare, &nodelay, &node, &ours] {
        let steal = report["steal_pct"].as_f64().expect("steal_pct");
        assert!((0.0..=100.0).contains(&steal), "{report}");
    }
}

/// With `--warmup`, the load runs that long before anything is counted: only the measured
/// second's sends are reported, and each of their deliveries (none of the warm-up's).
#[test]
fn a_warm_up_is_sent_but_not_measured() {
    let report = run(&[
        &["fanout", "--target", "nanochat", "--warmup", "2"][..],
        &TINY,
    ]
    .concat());
    assert_complete(&report);
    assert_eq!(report["warmup_s"], 2, "{report}");
    // 20 messages/s over all rooms for the measured second (a tick either side at most);
    // counting the warm-up too would make it about 60.
    let sent = report["sent"].as_u64().unwrap();
    assert!((16..=24).contains(&sent), "{report}");
    assert_eq!(report["expected"], 2 * sent, "{report}");
}

/// `--timeline 1` accounts for every measured delivery second by second, and
/// `NANOCHAT_LOAD_SERVER_LOG` keeps the server's own log lines beside it.
#[test]
fn a_timeline_counts_every_delivery_by_second_and_the_server_log_is_kept() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let log = dir.path().join("server.log");
    let report = run_lines_with(
        &[
            &["fanout", "--target", "nanochat", "--timeline", "1"][..],
            &TINY,
        ]
        .concat(),
        &[("NANOCHAT_LOAD_SERVER_LOG", &log)],
    )
    .pop()
    .expect("a report line");
    assert_complete(&report);
    let seconds = report["timeline"].as_array().expect("a timeline");
    // One measured second of sends (a tick past its end at most).
    assert!((1..=2).contains(&seconds.len()), "{report}");
    let counted: u64 = seconds.iter().map(|s| s[1].as_u64().unwrap()).sum();
    assert_eq!(counted, report["delivered"].as_u64().unwrap(), "{report}");
    let worst = seconds
        .iter()
        .map(|s| s[2].as_f64().unwrap())
        .fold(0.0, f64::max);
    // The histogram keeps three significant digits; the timeline the exact worst.
    let max = report["max_ms"].as_f64().unwrap();
    assert!(worst <= max && worst >= max * 0.99, "{report}");
    let started = report["measured_from_unix_ms"]
        .as_i64()
        .expect("a wall clock");
    assert!(
        (started - nanochat::store::now_ms()).abs() < 60_000,
        "{report}"
    );
    let lines = std::fs::read_to_string(&log).expect("the server's log was kept");
    assert!(lines.contains("nanochat listening"), "{lines}");
}

/// The merge scenario at a tiny load: 2 senders at 200 commits/s, 1 s before maintenance.
fn merge_run(rows: &str, extra: &[&str]) -> serde_json::Value {
    let load = [
        "merge",
        "--rows",
        rows,
        "--senders",
        "2",
        "--rate",
        "200",
        "--secs",
        "1",
    ];
    run(&[&load[..], extra].concat())
}

/// The merge scenario stores an hour of replay keys in several runs, merges them while
/// senders commit through the server's writer, and loses none of those commits.
#[test]
fn the_merge_scenario_merges_an_hours_runs_under_load() {
    let report = merge_run("300000", &[]);
    assert_eq!(report["scenario"], "merge", "{report}");
    assert!(report["runs_merged"].as_u64().unwrap() >= 2, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert!(report["steady_p99_ms"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(report["messages_deleted"], 0, "{report}");
    assert!(report["maintenance_ms"].as_f64().unwrap() > 0.0, "{report}");
}

/// With `--expired 1` the stored hour is past the retention: maintenance deletes every one of
/// its messages while the senders commit, and none of their commits fails.
#[test]
fn the_merge_scenario_can_expire_the_hour_instead() {
    let report = merge_run("20000", &["--expired", "1"]);
    assert_eq!(report["messages_deleted"], 20000, "{report}");
    assert_eq!(report["runs_merged"], 0, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
}

#[test]
fn the_rate_sweep_steps_up_while_runs_pass() {
    let lines = run_lines(
        &[
            &["sweep", "--target", "nanochat"][..],
            &TINY,
            &["--steps", "2"],
        ]
        .concat(),
    );
    // Two fan-out runs at 20 and 25 msgs/s, then the summary naming the last passing one.
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["rate"], 20);
    assert_eq!(lines[1]["rate"], 25);
    lines[..2].iter().for_each(assert_complete);
    assert_eq!(lines[2]["scenario"], "sweep");
    assert_eq!(lines[2]["max_rate"], 25);
    assert_eq!(
        lines[2]["max_deliveries_per_s"],
        lines[1]["deliveries_per_s"]
    );
    assert_eq!(lines[2]["steal_pct_at_max"], lines[1]["steal_pct"]);
}

/// Run a summary script of `benches/` on `input` and return what it printed.
fn summarise(script: &str, args: &[&str], input: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new("python3")
        .arg(format!("{}/benches/{script}", env!("CARGO_MANIFEST_DIR")))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs the benchmark summary (Debian: apt-get install python3)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write the runs");
    let out = child.wait_with_output().expect("summary");
    assert!(out.status.success(), "{script} failed");
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// What `benches/machine.py` says this machine and checkout are, as the run scripts print it.
fn machine_record() -> serde_json::Value {
    let out = Command::new("python3")
        .arg(format!("{}/benches/machine.py", env!("CARGO_MANIFEST_DIR")))
        .output()
        .expect("python3 runs benches/machine.py (Debian: apt-get install python3)");
    assert!(out.status.success(), "benches/machine.py failed");
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(record["scenario"], "machine");
    assert!(record["cpus"].as_u64().is_some_and(|n| n > 0), "{record}");
    // "unknown" outside a git checkout; a clone names its commit.
    assert!(
        record["commit"].as_str().is_some_and(|c| !c.is_empty()),
        "{record}"
    );
    record
}

/// A summary's first line says where its numbers were measured.
fn assert_captioned(summary: &str, machine: &serde_json::Value) {
    let commit = machine["commit"].as_str().expect("a commit");
    let first = summary.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("Measured ")
            && first.contains(&format!("at commit {commit} "))
            && first.contains(&format!("on {} CPUs", machine["cpus"])),
        "no caption for {machine} in\n{summary}"
    );
}

/// `benches/fanout-chart.py` reads real sweep summaries: the table compares the median of each
/// target's sweeps, and the chart draws them; both say where they were measured.
#[test]
fn the_fanout_summary_compares_medians_of_repeated_sweeps() {
    let sweep = |target: &str| {
        run(&[&["sweep", "--target", target][..], &TINY, &["--steps", "1"]].concat())
    };
    let mut bare: Vec<serde_json::Value> = (0..3).map(|_| sweep("bare")).collect();
    let ours = sweep("nanochat");
    // Spread the three results apart (real summaries, scaled) so that the median, the mean and
    // the maximum all differ.
    let base = bare[0]["max_deliveries_per_s"]
        .as_f64()
        .expect("a passing run");
    for (s, k) in bare.iter_mut().zip([1.0, 6.0, 2.0]) {
        s["max_deliveries_per_s"] = serde_json::json!(base * k);
    }
    let ratio = ours["max_deliveries_per_s"]
        .as_f64()
        .expect("a passing run")
        / (2.0 * base);
    let machine = machine_record();
    let input: String = [&machine]
        .into_iter()
        .chain(&bare)
        .chain([&ours])
        .map(|s| format!("{s}\n"))
        .collect();
    let table = summarise("fanout-chart.py", &["--table"], &input);
    assert_captioned(&table, &machine);
    let row = table
        .lines()
        .find(|l| l.starts_with("| 2 x 3 |"))
        .unwrap_or_else(|| panic!("no row for the shape in\n{table}"));
    assert!(
        row.contains(&format!("**{:.0}%**", ratio * 100.0)),
        "NanoChat / median bare should be {:.0}%: {row}",
        ratio * 100.0
    );
    assert!(row.contains("| 3 |"), "three sweeps of bare: {row}");
    let svg = summarise("fanout-chart.py", &[], &input);
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("rooms x members: 2 x 3"), "{svg}");
    assert!(
        svg.contains(&format!(
            "at commit {} ",
            machine["commit"].as_str().unwrap()
        )),
        "the chart names its commit: {svg}"
    );
}

#[actix_web::test]
async fn the_fanout_scenario_runs_on_two_nodes_over_postgres_with_two_senders_per_room_and_a_listener_cut()
 {
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
        "2",
        "--room-senders",
        "2",
        "--cut-listeners",
        "1",
    ]);
    // Two members of each room send, through either node, and count each other's messages.
    assert_complete(&report);
    assert_eq!(report["nodes"], 2);
    assert_eq!(report["room_senders"], 2);
    assert_eq!(report["expected"], report["sent"].as_u64().unwrap() * 3);
    for key in ["held", "held_gap_reads", "gap_reads"] {
        assert!(report[key].is_u64(), "{key}: {report}");
    }
    // Both nodes' listener connections were cut a second in; each caught its rooms up, and
    // nothing was lost (above).
    assert_eq!(report["listener_cuts"], 2, "{report}");
    let catch_ups = report["catch_ups"].as_array().unwrap();
    assert_eq!(catch_ups.len(), 2, "{report}");
    assert!(
        catch_ups.iter().all(|c| c[0].as_u64().unwrap() > 0),
        "{report}"
    );
}

#[test]
fn the_idle_memory_scenario_runs() {
    // NanoChat also with its own HTTPS: every socket through a TLS handshake.
    for (target, tls) in [("bare", "0"), ("nanochat", "0"), ("nanochat", "1")] {
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
            "--tls",
            tls,
        ]);
        assert_eq!(report["sockets"], 20, "{report}");
        assert_eq!(report["tls"], tls == "1", "{report}");
        assert!(report["rss_after_bytes"].as_u64().unwrap() > 0, "{report}");
    }
}

#[test]
fn the_storm_scenario_runs() {
    // NanoChat also with its own HTTPS: a TLS handshake before each upgrade.
    for (target, tls) in [("bare", "0"), ("nanochat", "0"), ("nanochat", "1")] {
        let report = run(&["storm", "--target", target, "--clients", "30", "--tls", tls]);
        assert_eq!(report["clients"], 30, "{report}");
        assert_eq!(report["tls"], tls == "1", "{report}");
        // Each client from its own address, within every default limit: all are let in.
        assert_eq!(
            report["answers"],
            serde_json::json!({"101": 30}),
            "{report}"
        );
        let (p50, max) = (report["p50_ms"].as_f64(), report["max_ms"].as_f64());
        assert!(p50.unwrap() > 0.0 && p50 <= max, "{report}");
    }
    // A storm larger than the server-wide connection burst: the rest are told to come back.
    let path = std::path::Path::new;
    let report = run_lines_with(
        &["storm", "--target", "nanochat", "--clients", "30"],
        &[
            ("NANOCHAT__RATE__GLOBAL_CONNECTIONS__BURST", path("10")),
            ("NANOCHAT__RATE__GLOBAL_CONNECTIONS__PER_MINUTE", path("60")),
        ],
    )
    .pop()
    .expect("a report line");
    let answers = &report["answers"];
    let (let_in, refused) = (answers["101"].as_u64(), answers["429"].as_u64());
    assert!((10..=12).contains(&let_in.unwrap_or(0)), "{report}");
    assert_eq!(let_in.unwrap_or(0) + refused.unwrap_or(0), 30, "{report}");
}

/// Two senders with two sends in flight each, for one second.
const TINY_PUBLISH: [&str; 6] = ["--senders", "2", "--window", "2", "--secs", "1"];

#[test]
fn the_publish_scenario_runs_against_every_baseline_on_sqlite() {
    for target in ["nanochat", "naive", "batch", "bare"] {
        let report = run(&[&["publish", "--target", target][..], &TINY_PUBLISH].concat());
        assert!(report["acked"].as_u64().unwrap() > 0, "{report}");
        assert!(report["p99_ms"].as_f64().unwrap() > 0.0, "{report}");
        assert_eq!(report["target"], target, "{report}");
        // The bare server stores nothing: its acks measure the sockets alone.
        let backend = if target == "bare" { "none" } else { "sqlite" };
        assert_eq!(report["backend"], backend, "{report}");
    }
}

/// With `--warmup`, publish reports the measured second alone: its rate is over that second,
/// not over the warm-up too (which would about halve it).
#[test]
fn a_publish_warm_up_is_left_out_of_the_rate() {
    for target in ["nanochat", "batch"] {
        let report = run(&[
            &["publish", "--target", target, "--warmup", "1"][..],
            &TINY_PUBLISH,
        ]
        .concat());
        assert_eq!(report["warmup_s"], 1, "{report}");
        let acked = report["acked"].as_u64().unwrap() as f64;
        assert!(acked > 0.0, "{report}");
        let rate = report["acked_per_s"].as_f64().unwrap();
        assert!(rate > 0.6 * acked && rate < 1.2 * acked, "{report}");
    }
}

/// `benches/publish-table.py` reads real publish reports: NanoChat's result in a round is its
/// fastest run whose p99 ack is within 50 ms, compared with that round's baselines; the table
/// says where it was measured.
#[test]
fn the_publish_summary_takes_the_best_run_within_the_latency_limit() {
    let tiny = ["--secs", "1"];
    let publish = |target: &str, senders: &str, window: &str| {
        let report = run(&[
            &["publish", "--target", target, "--senders", senders][..],
            &["--window", window],
            &tiny,
        ]
        .concat());
        assert!(report["acked_per_s"].as_f64().unwrap() > 0.0, "{report}");
        report
    };
    // The reports are real; only their speeds are set, so the expected ratios are exact.
    let set = |mut r: serde_json::Value, acked: f64, p99: f64| {
        r["acked_per_s"] = serde_json::json!(acked);
        r["p99_ms"] = serde_json::json!(p99);
        r
    };
    let machine = machine_record();
    let runs = [
        machine.clone(),
        serde_json::json!({"scenario": "round", "round": 1, "backend": "sqlite"}),
        set(publish("naive", "2", "1"), 1000.0, 1.0),
        set(publish("batch", "1", "1"), 10000.0, 20.0),
        set(publish("nanochat", "2", "2"), 6000.0, 12.0),
        // Faster, but over the limit: not the result.
        set(publish("nanochat", "2", "4"), 9000.0, 80.0),
        set(publish("nanochat", "1", "2"), 3000.0, 5.0),
    ];
    let input: String = runs.iter().map(|r| format!("{r}\n")).collect();
    let table = summarise("publish-table.py", &[], &input);
    assert_captioned(&table, &machine);
    let round = table
        .lines()
        .find(|l| l.starts_with("| sqlite | 1 |"))
        .unwrap_or_else(|| panic!("no row for the round in\n{table}"));
    assert!(
        round.contains("| 6 000 | 2 × 2 | 12 | 60% | 6.0× |"),
        "the best run within 50 ms: {round}"
    );
    assert!(
        table.contains("| sqlite | 2 × 4 | 8 | 9 000 | 80 | 0 of 1 |"),
        "every load keeps its row: {table}"
    );
}

#[actix_web::test]
async fn the_publish_scenario_runs_against_both_baselines_on_postgres() {
    let db = crate::pg::cluster().database().await;
    // NanoChat twice on one URL: every run works in a database of its own, so the second
    // does not meet the first one's secret check. The second starts with a day of history.
    let mut runs = Vec::new();
    for (target, yesterday) in [
        ("nanochat", "0"),
        ("naive", "0"),
        ("batch", "0"),
        ("nanochat", "6000"),
    ] {
        let (pid, mut lines) = run_process(
            &[
                &["publish", "--target", target, "--postgres", &db.url][..],
                &TINY_PUBLISH,
                &["--yesterday", yesterday],
            ]
            .concat(),
            &[],
        );
        runs.push(format!("nanochat_load_{pid}"));
        let report = lines.pop().expect("a report line");
        assert!(report["acked"].as_u64().unwrap() > 0, "{report}");
        assert_eq!(report["backend"], "postgres");
        assert_eq!(report["yesterday"], yesterday.parse::<u64>().unwrap());
    }
    // The runs' databases are gone (other tests' runs may be working in theirs now), and
    // the one named in the URL was left untouched.
    let client = crate::pg::cluster().connect(&db).await;
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = ANY($1)",
            &[&runs],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "a run's database was left behind");
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "the runs wrote into the database of the URL");
}

/// A 2-second abuse run: 2 rooms of 3, a flooder offering 2 000 frames/s.
const ABUSE_TINY: [&str; 9] = [
    "abuse",
    "--rooms",
    "2",
    "--members",
    "3",
    "--rate",
    "2000",
    "--secs",
    "2",
];

#[test]
fn the_abuse_scenario_runs_and_the_flooder_is_thrown_out() {
    let report = run(&ABUSE_TINY);
    honest_whole_and_flooder_out(&report);
}

/// An abuse report in which the honest members got every message in both phases, and the
/// default limits closed or refused the flooder (it never keeps one socket for long).
fn honest_whole_and_flooder_out(report: &serde_json::Value) {
    for phase in ["calm", "flood"] {
        assert_eq!(
            report[phase]["delivered"], report[phase]["expected"],
            "honest members lost messages: {report}"
        );
        assert!(report[phase]["expected"].as_u64().unwrap() > 0, "{report}");
    }
    let flooder = &report["flooder"];
    assert!(flooder["connects"].as_u64().unwrap() > 0, "{report}");
    assert!(
        flooder["thrown_out"].as_u64().unwrap() + flooder["refused_handshakes"].as_u64().unwrap()
            > 0,
        "{report}"
    );
}

#[test]
fn the_abuse_scenario_runs_over_the_onion_listener_with_a_circuit_each() {
    let report = run(&[&ABUSE_TINY[..], &["--onion", "circuits"]].concat());
    assert_eq!(report["onion"], "circuits", "{report}");
    honest_whole_and_flooder_out(&report);
}

/// An 8-second soak: 4 churning clients, 8 watchers, a sample every 2 s.
const SOAK_TINY: [&str; 8] = [
    "--secs",
    "8",
    "--clients",
    "4",
    "--watchers",
    "8",
    "--sample-secs",
    "2",
];

/// The soak's watchers stayed in rooms, got live messages, and every one continued their
/// sequence by one; none was missing when they checked, and every wipe reached them.
fn assert_watched_cleanly(report: &serde_json::Value) {
    assert!(report["watches"].as_u64().unwrap() > 0, "{report}");
    assert!(report["live"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["live_out_of_order"], 0, "{report}");
    assert_eq!(report["live_missing"], 0, "{report}");
    assert_eq!(report["wipes_missed"], 0, "{report}");
    assert_eq!(report["watcher_errors"], 0, "{report}");
    // The first stay of each watcher lost its connection and came back with `after`.
    assert!(report["resumes"].as_u64().unwrap() > 0, "{report}");
}

#[test]
fn the_soak_scenario_runs_and_expires_aged_rows() {
    let report = run(&[&["soak"][..], &SOAK_TINY].concat());
    assert_watched_cleanly(&report);
    assert!(report["acks"].as_u64().unwrap() > 0, "{report}");
    assert!(report["creates"].as_u64().unwrap() > 0, "{report}");
    assert!(
        report["aged_rows_written"].as_u64().unwrap() > 0,
        "{report}"
    );
    // Maintenance runs every 2 s: the server expired aged rows while the soak ran.
    assert!(
        report["aged_rows_waiting_at_end"].as_u64().unwrap()
            < report["aged_rows_written"].as_u64().unwrap(),
        "{report}"
    );
    assert!(report["samples"].as_u64().unwrap() >= 3, "{report}");
    assert_eq!(report["client_errors"], 0, "{report}");
    assert!(report["histories"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["bad_histories"], 0, "{report}");
    // The replay key filter's memory came from the server's /metrics: at least the smallest
    // filter (2 MiB) once messages were stored.
    assert!(
        report["trend"]["replay_filter_kib"]["max"]
            .as_f64()
            .unwrap()
            >= 2048.0,
        "{report}"
    );
}

#[actix_web::test]
async fn the_soak_scenario_runs_on_two_nodes_over_postgres_with_a_listener_cut() {
    let db = crate::pg::cluster().database().await;
    let two_nodes = [
        "soak",
        "--postgres",
        &db.url,
        "--nodes",
        "2",
        "--cut-listeners",
        "1",
    ];
    let report = run(&[&two_nodes[..], &SOAK_TINY].concat());
    assert_eq!(report["nodes"], 2, "{report}");
    assert_eq!(report["backend"], "postgres", "{report}");
    assert!(report["acks"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["client_errors"], 0, "{report}");
    assert_eq!(report["bad_histories"], 0, "{report}");
    // Clients and watchers picked either process, so live messages crossed between them,
    // across a cut of both listener connections, and arrived whole and in order.
    assert_eq!(report["listener_cuts"], 2, "{report}");
    assert_watched_cleanly(&report);
}

#[actix_web::test]
async fn the_expiry_scenario_drops_a_day_and_deletes_one_under_load() {
    let db = crate::pg::cluster().database().await;
    let report = run(&[
        "expiry",
        "--postgres",
        &db.url,
        "--rows",
        "2000",
        "--senders",
        "2",
        "--rate",
        "200",
        "--secs",
        "1",
        "--timeline",
        "1",
    ]);
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{report}");
    for r in results {
        assert_eq!(r["rows"], 2000, "all old rows were there before: {report}");
        assert_eq!(r["old_rows_left"], 0, "and none after: {report}");
        assert!(r["expiry_ms"].as_f64().unwrap() > 0.0, "{report}");
        // The picture in 50 ms steps: from a second before the expiry to a second after it,
        // with the sends of the steady state before it in it.
        let around = r["around"].as_array().unwrap();
        assert!(around.len() >= 40, "{report}");
        assert_eq!(around[0]["from_ms"], -1000, "{report}");
        assert!(around.iter().any(|s| s["from_ms"] == 0), "{report}");
        let before: u64 = around
            .iter()
            .filter(|s| s["from_ms"].as_i64().unwrap() < 0)
            .map(|s| s["sends"].as_u64().unwrap())
            .sum();
        assert!(before >= 100, "200/s for the second before: {report}");
    }
    // The test's Postgres runs on this machine: its volume's mount is found.
    let volume = &report["data_volume"];
    assert!(volume["discard"].is_boolean(), "{report}");
    let dir = std::fs::canonicalize(volume["data_directory"].as_str().unwrap()).unwrap();
    assert!(
        dir.starts_with(volume["mount_point"].as_str().unwrap()),
        "{report}"
    );
    assert_eq!(results[0]["method"], "drop_partition");
    // Open loop at 200/s through two fills, two expiries and their waits: well over 200 acks.
    assert_eq!(report["rate"], 200, "{report}");
    assert!(report["acked"].as_u64().unwrap() > 200, "{report}");
}

/// A run the generator cannot do is refused before anything starts: exit code 2 and the reason.
#[test]
fn the_load_generator_refuses_runs_it_cannot_do() {
    for (args, reason) in [
        (&["expiry"][..], "needs --postgres URL"),
        (
            &["publish", "--yesterday", "5"][..],
            "--yesterday is for publish --target nanochat --postgres",
        ),
        (&["publish", "--secs", "100000"][..], "runs are bounded"),
        // Two SQLite servers would each keep a database of their own: no cluster.
        (
            &["soak", "--nodes", "2"][..],
            "more than 1 is for fanout, sweep and soak with --target nanochat --postgres",
        ),
        (&["fanout", "--nodes", "0"][..], "--nodes is at least 1"),
        (
            &["idle", "--target", "bare", "--tls", "1"][..],
            "--tls is for idle, storm and fanout with --target nanochat",
        ),
        (
            &["soak", "--cut-listeners", "1"][..],
            "--cut-listeners is for fanout --target nanochat --postgres and soak --postgres",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_nanochat-load"))
            .args(args)
            .output()
            .expect("run the load generator");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} reported a run");
    }
}
