//! Load generator for the benchmarks (loopback only, bounded in time): starts the server(s)
//! under test itself, opens many sockets spread over 127.0.0.x source addresses, creates and
//! joins rooms through the crate's client (`nanochat::client`), then drives the sockets with
//! its own loops: sends timestamped messages at an open-loop rate and records delivery latency
//! in an HDR histogram. Prints one JSON line per run. See benches/README.md.
//!
//! `nanochat-load --help` lists the scenarios and their options ([`USAGE`]).
//! `idle` opens rooms x members joined sockets that then stay silent, and reports the server's
//! resident memory growth per socket. `soak` churns (see `soak.rs`) and samples the server's
//! memory, descriptors and database connections over time. `storm` has every client ask for a
//! socket at the same instant (see `storm.rs`).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use nanochat::client::Client;
use nanochat::crypto::{self, RoomKeys};
use nanochat::protocol::{ServerFrame, b64u, from_b64u};
use rand::seq::SliceRandom as _;
use tokio_tungstenite::tungstenite::Message;

mod abuse;
mod expiry;
mod merge;
mod publish;
mod soak;
mod storm;
mod timeline;

#[derive(Clone)]
struct Args {
    target: String,
    rooms: usize,
    members: usize,
    rate: u64,
    secs: u64,
    /// Seconds of load before a fan-out or publish run starts measuring.
    warmup: u64,
    clients: usize,
    /// Soak: sockets that stay in rooms and check the live messages they get.
    watchers: usize,
    sample_secs: u64,
    senders: usize,
    /// Fan-out: members of each room that send (the first to arrive), sharing its rate.
    room_senders: usize,
    /// Fan-out and soak on Postgres: times the servers' cluster listener connections are cut
    /// during the measured run, evenly spaced (they reconnect and catch up).
    cut_listeners: usize,
    window: usize,
    rows: usize,
    /// Publish on Postgres only: messages stored yesterday before the run (a day of history
    /// for the replay lookup to search, as a running server has).
    yesterday: usize,
    postgres: Option<String>,
    nodes: usize,
    steps: usize,
    refine: usize,
    /// Fan-out: report deliveries and the worst latency of each second (by send time).
    /// Expiry: each expiry's acks in 50 ms steps around it.
    timeline: bool,
    /// Merge only: the stored hour is past the retention, so maintenance deletes it.
    expired: bool,
    /// Abuse only: everyone connects to an onion listener, each as a Tor circuit of its own;
    /// `circuits`: with `server.onion_circuit_ids`, `shared`: without (one bucket for all).
    onion: Option<String>,
    /// Idle, storm and fanout only: NanoChat serves HTTPS itself (`[tls]`, a certificate made
    /// by `openssl` for the run) and every socket is `wss://`.
    tls: bool,
}

/// What `--help` and a mistaken command line print.
const USAGE: &str = "\
usage: nanochat-load SCENARIO [--option value ...]   (loopback only, bounded in time)
  fanout  --target nanochat|bare|bare-nodelay|node [--rooms 100] [--members 10] [--rate 2000]
          [--secs 10] [--warmup 0] [--postgres URL] [--nodes 1] [--timeline 0|1]
          [--room-senders 1] [--cut-listeners 0] [--tls 0|1]
  sweep   --target nanochat|bare|bare-nodelay|node [--rooms 100] [--members 10] [--rate 1000]
          [--secs 6] [--warmup 0] [--steps 12] [--refine 2] [--postgres URL] [--nodes 1]
  idle    --target nanochat|bare [--rooms 1000] [--members 10] [--secs 5] [--tls 0|1]
  storm   --target nanochat|bare [--clients 40] [--tls 0|1]
          (all ask for a socket at the same instant)
  soak    [--secs 1800] [--clients 40] [--watchers 50] [--sample-secs 10]
          [--postgres URL [--nodes 1] [--cut-listeners 0]]
  expiry  --postgres URL [--rows 1000000] [--senders 16] [--rate 2000] [--secs 5]
          [--timeline 0|1]
  merge   [--rows 1000000] [--senders 16] [--rate 2000] [--secs 5] [--expired 0|1]
          (SQLite maintenance under write load, in-process)
  abuse   [--rooms 10] [--members 10] [--rate 10000] [--secs 10] [--onion circuits|shared]
  publish --target nanochat|bare|naive|batch [--senders 16] [--window 8] [--secs 10] [--warmup 0]
          [--postgres URL [--yesterday 0]]
With --postgres, each run works in a database it creates on that server and drops at the end
(the URL's role needs CREATEDB). Each run prints one JSON line; benches/README.md explains the
scenarios.";

const SCENARIOS: &[&str] = &[
    "fanout", "sweep", "idle", "storm", "soak", "publish", "abuse", "expiry", "merge",
];

/// Read the options that follow the scenario name.
fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        target: "nanochat".into(),
        rooms: 100,
        members: 10,
        rate: 2000,
        secs: 10,
        warmup: 0,
        clients: 40,
        watchers: 50,
        sample_secs: 10,
        senders: 16,
        room_senders: 1,
        cut_listeners: 0,
        window: 8,
        rows: 1_000_000,
        yesterday: 0,
        postgres: None,
        nodes: 1,
        steps: 12,
        refine: 2,
        timeline: false,
        expired: false,
        onion: None,
        tls: false,
    };
    fn num<T: std::str::FromStr>(k: &str, v: &str) -> Result<T, String> {
        v.parse()
            .map_err(|_| format!("{k} takes a whole number, not {v:?}"))
    }
    while let Some(k) = it.next() {
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--target" => a.target = v,
            "--postgres" => a.postgres = Some(v),
            "--rooms" => a.rooms = num(&k, &v)?,
            "--members" => a.members = num(&k, &v)?,
            "--rate" => a.rate = num(&k, &v)?,
            "--secs" => a.secs = num(&k, &v)?,
            "--warmup" => a.warmup = num(&k, &v)?,
            "--nodes" => a.nodes = num(&k, &v)?,
            "--steps" => a.steps = num(&k, &v)?,
            "--refine" => a.refine = num(&k, &v)?,
            "--clients" => a.clients = num(&k, &v)?,
            "--watchers" => a.watchers = num(&k, &v)?,
            "--senders" => a.senders = num(&k, &v)?,
            "--room-senders" => a.room_senders = num(&k, &v)?,
            "--cut-listeners" => a.cut_listeners = num(&k, &v)?,
            "--window" => a.window = num(&k, &v)?,
            "--rows" => a.rows = num(&k, &v)?,
            "--yesterday" => a.yesterday = num(&k, &v)?,
            "--sample-secs" => a.sample_secs = num(&k, &v)?,
            "--timeline" => a.timeline = num::<u8>(&k, &v)? != 0,
            "--expired" => a.expired = num::<u8>(&k, &v)? != 0,
            "--tls" => a.tls = num::<u8>(&k, &v)? != 0,
            "--onion" if ["circuits", "shared"].contains(&v.as_str()) => a.onion = Some(v),
            "--onion" => return Err(format!("--onion is circuits or shared, not {v:?}")),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(a)
}

/// A server process under test and its public address.
struct Server {
    child: Child,
    addr: String,
    /// NanoChat's admin listener (`/metrics`); none for the baselines.
    admin: Option<String>,
    /// NanoChat's onion listener, when it has one.
    onion: Option<String>,
    /// NanoChat's cluster catch-ups after its listener reconnected, from its log: rooms read
    /// and milliseconds taken (those with no rooms, as at start-up, are left out).
    catch_ups: Arc<Mutex<Vec<(u64, u64)>>>,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .expect("own path")
        .with_file_name(name)
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    // Fields by position after the command name (state first, then ppid, …, which may be
    // negative, like tpgid): utime and stime are fields 14 and 15 of the whole line.
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// The whole machine's CPU time from `/proc/stat`, in ticks: all of it, and the part the
/// hypervisor gave to other guests while this one wanted to run ("steal").
#[derive(Clone, Copy)]
struct MachineCpu {
    total: u64,
    steal: u64,
}

impl MachineCpu {
    fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        Self::parse(stat.lines().next().unwrap_or_default())
    }

    /// The `cpu` line: user nice system idle iowait irq softirq steal guest guest_nice. Guest
    /// time is already counted in user time, so the total is the first eight fields.
    fn parse(line: &str) -> Self {
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        Self {
            total: f.iter().sum(),
            steal: f.get(7).copied().unwrap_or(0),
        }
    }

    /// Percentage of the machine's time stolen since `earlier`: how much of a run the VM's
    /// cores were taken away. Runs with much steal are slower for reasons outside the test.
    fn steal_pct_since(&self, earlier: &MachineCpu) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        let steal = self.steal.saturating_sub(earlier.steal);
        if total == 0 {
            return 0.0;
        }
        (steal as f64 * 1000.0 / total as f64).round() / 10.0
    }
}

fn spawn_nanochat(
    dir: &std::path::Path,
    secret: &std::path::Path,
    pg: Option<&str>,
    extra: &[(&str, &str)],
    real_limits: bool,
) -> Server {
    let mut cmd = Command::new(sibling("nanochat"));
    cmd.env_clear()
        .env("NANOCHAT__SERVER__LISTEN", "127.0.0.1:0")
        .env("NANOCHAT__SERVER__ADMIN_LISTEN", "127.0.0.1:0")
        .env("NANOCHAT__SERVER__DATA_DIR", dir)
        .env("NANOCHAT__SERVER__SECRET_FILE", secret)
        .env("NANOCHAT__LOG__FORMAT", "json")
        .env("NANOCHAT__POW__MODE", "off");
    // The abuse and storm scenarios meet the default limits; the others take them out of the way.
    if !real_limits {
        // All that the inherited open-file limit holds, so the server need not lower it.
        let open_files = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |l| l.0);
        let sockets = open_files
            .saturating_sub(nanochat::startup::SPARE_DESCRIPTORS)
            .max(1);
        cmd.env("NANOCHAT__LIMITS__MAX_CONNECTIONS", sockets.to_string())
            .env("NANOCHAT__LIMITS__FRAMES_PER_SECOND", "1000000")
            .env("NANOCHAT__LIMITS__FRAMES_BURST", "1000000")
            .env("NANOCHAT__RATE__CLIENT_MAX_SOCKETS", "1000000");
        for limit in [
            "CLIENT_CONNECTIONS",
            "CLIENT_FRAMES",
            "CLIENT_MESSAGES",
            "CLIENT_CREATIONS",
            "CLIENT_READS",
            "CLIENT_REQUESTS",
            "ROOM_MESSAGES",
            "GLOBAL_CREATIONS",
            "GLOBAL_CONNECTIONS",
        ] {
            cmd.env(format!("NANOCHAT__RATE__{limit}__PER_MINUTE"), "100000000")
                .env(format!("NANOCHAT__RATE__{limit}__BURST"), "10000000");
        }
    }
    if let Some(url) = pg {
        cmd.env("NANOCHAT__DATABASE__URL", url);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    // Settings to try out: NANOCHAT__* variables of the generator's environment win.
    for (k, v) in std::env::vars().filter(|(k, _)| k.starts_with("NANOCHAT__")) {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nanochat (build it: cargo build --release)");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let catch_ups = Arc::new(Mutex::new(Vec::new()));
    let caught_up = catch_ups.clone();
    // The whole log, to set beside a run's timeline: NANOCHAT_LOAD_SERVER_LOG names a file.
    let mut log_copy = std::env::var_os("NANOCHAT_LOAD_SERVER_LOG").map(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("NANOCHAT_LOAD_SERVER_LOG={}: {e}", path.display()))
    });
    std::thread::spawn(move || {
        use std::io::{BufRead as _, Write as _};
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(file) = &mut log_copy {
                let _ = writeln!(file, "{line}");
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["message"] == "nanochat listening" {
                let port = |key: &str| v[key].as_u64().unwrap_or(0);
                let _ = tx.send((port("port"), port("admin_port"), port("onion_port")));
            }
            if v["message"] == "cluster listener caught up" {
                let rooms = v["rooms"].as_u64().unwrap_or(0);
                if rooms > 0 {
                    let ms = v["ms"].as_u64().unwrap_or(0);
                    caught_up.lock().expect("catch-ups").push((rooms, ms));
                }
            }
            // The server's warnings and errors explain a run that went wrong.
            if v["level"] == "WARN" || v["level"] == "ERROR" {
                eprintln!("server: {line}");
            }
        }
    });
    let (port, admin_port, onion_port) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("nanochat started");
    Server {
        child,
        addr: format!("127.0.0.1:{port}"),
        admin: Some(format!("127.0.0.1:{admin_port}")),
        onion: (onion_port > 0).then(|| format!("127.0.0.1:{onion_port}")),
        catch_ups,
    }
}

/// The tokio + tungstenite ceiling (`benches/bare_broadcast.rs`); with `nodelay`, its sockets
/// set `TCP_NODELAY` as NanoChat's do.
fn spawn_bare(nodelay: bool) -> Server {
    let mut cmd = Command::new(sibling("bare-broadcast"));
    cmd.arg("127.0.0.1:0");
    if nodelay {
        cmd.arg("nodelay");
    }
    spawn_baseline(cmd, "start bare-broadcast (cargo build --release --bins)")
}

/// The plain Node.js `ws` broadcast server (`benches/node-ws/server.js`).
fn spawn_node() -> Server {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/node-ws");
    assert!(
        dir.join("node_modules/ws").is_dir(),
        "the Node baseline needs its package: npm ci --prefix {}",
        dir.display()
    );
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("server.js")).arg("127.0.0.1:0");
    spawn_baseline(
        cmd,
        "start node (install Node.js: apt-get install -y nodejs npm)",
    )
}

/// Start a baseline server that prints `listening on <addr>` as its first line.
fn spawn_baseline(mut cmd: Command, what: &str) -> Server {
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect(what);
    let mut line = String::new();
    use std::io::BufRead as _;
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("address");
    let addr = line.trim().trim_start_matches("listening on ").to_owned();
    Server {
        child,
        addr,
        admin: None,
        onion: None,
        catch_ups: Arc::default(),
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The run's TLS client configuration when NanoChat serves HTTPS itself (`--tls 1`): set once
/// before the server starts, and every socket [`open`] makes is then `wss://`.
static TLS: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();

/// A socket in a room, opened through the crate's client from 127.0.0.2–251 (by `n`, so no
/// single source address runs out of ports): the handshake (over TLS in a `--tls` run), then
/// `create` (solving proof of work if asked) or `join` with the proof for this socket's
/// challenge.
async fn open(addr: &str, n: usize, keys: &RoomKeys, create: bool) -> Ws {
    let local = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (n % 250) as u8));
    let client = match TLS.get() {
        Some(tls) => {
            Client::connect_tls_from(&format!("wss://{addr}/ws"), local, tls.clone()).await
        }
        None => Client::connect_from(&format!("ws://{addr}/ws"), local).await,
    }
    .expect("connect and read the hello");
    enter(client, keys, create).await
}

/// As [`open`], through an onion listener as the Tor circuit `circuit`.
async fn open_as_circuit(addr: &str, circuit: u32, keys: &RoomKeys, create: bool) -> Ws {
    let client = Client::connect_as_circuit(&format!("ws://{addr}/ws"), circuit)
        .await
        .expect("connect and read the hello");
    enter(client, keys, create).await
}

/// A certificate for 127.0.0.1 made by `openssl` in `dir` (ECDSA P-256, as certbot makes them
/// by default), for a run over TLS: the server's settings for it, and a client configuration
/// that trusts it.
fn run_certificate(
    dir: &std::path::Path,
) -> ([(&'static str, String); 2], Arc<rustls::ClientConfig>) {
    use rustls::pki_types::pem::PemObject as _;
    let (cert, key) = (dir.join("tls.pem"), dir.join("tls.key"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "90", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl makes the run's certificate (apt-get install -y openssl)");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            rustls::pki_types::CertificateDer::from_pem_file(&cert).expect("the run's certificate"),
        )
        .expect("a usable certificate");
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    (
        [
            ("NANOCHAT__TLS__CERT", cert.display().to_string()),
            ("NANOCHAT__TLS__KEY", key.display().to_string()),
        ],
        Arc::new(client),
    )
}

/// Create or join the room of `keys`; the socket.
async fn enter(mut client: Client, keys: &RoomKeys, create: bool) -> Ws {
    let answer = if create {
        client.create(keys).await
    } else {
        client.join(keys, None).await
    }
    .expect("create or join");
    assert!(matches!(answer, ServerFrame::Joined { .. }), "{answer:?}");
    client.into_inner()
}

/// How long after the run starts open-loop sender `k` of `n`, each sending every `period`,
/// makes its first send: the senders' schedules spread evenly over one period, so that the
/// server sees a steady rate, not `n` sends at the same instant once per period (with many
/// slow senders, as in 5 000 rooms at 2 000 messages/s, that burst was every sender at once).
pub fn stagger(k: usize, n: usize, period: Duration) -> Duration {
    period.mul_f64((k % n.max(1)) as f64 / n.max(1) as f64)
}

/// A `send` frame whose ciphertext (`ct_len` random bytes, at least 8) starts with the time
/// since `start` in µs, so a receiver can tell the delivery latency.
fn timed_send(reference: u64, epoch: u32, start: Instant, ct_len: usize) -> String {
    let mut ct = vec![0u8; ct_len];
    ct[..8].copy_from_slice(&(start.elapsed().as_micros() as u64).to_be_bytes());
    rand::fill(&mut ct[8..]);
    let mut iv = [0u8; 12];
    rand::fill(&mut iv);
    format!(
        r#"{{"type":"send","ref":"{reference}","epoch":{epoch},"iv":"{}","ct":"{}"}}"#,
        b64u(&iv),
        b64u(&ct)
    )
}

/// The send time (µs since the sender's `start`) carried by a `msg` frame from [`timed_send`].
/// Decodes only the first 12 characters of the ciphertext (its first 9 bytes): the receivers
/// are the load generator's busiest part and share the machine with the server under test.
fn sent_at(msg_text: &str) -> Option<u64> {
    let (_, rest) = msg_text.split_once(r#""ct":""#)?;
    let head = from_b64u(rest.get(..12)?)?;
    Some(u64::from_be_bytes(head.get(..8)?.try_into().ok()?))
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

#[tokio::main]
async fn main() {
    let cmd = std::env::args().nth(1).unwrap_or_default();
    if matches!(cmd.as_str(), "--help" | "-h" | "help") {
        println!("{USAGE}");
        return;
    }
    if !SCENARIOS.contains(&cmd.as_str()) {
        eprintln!("nanochat-load: no scenario {cmd:?}\n{USAGE}");
        std::process::exit(2);
    }
    let args = match parse_args(std::env::args().skip(2)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("nanochat-load {cmd}: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let targets: &[&str] = match cmd.as_str() {
        "fanout" | "sweep" => &["nanochat", "bare", "bare-nodelay", "node"],
        "idle" | "storm" => &["nanochat", "bare"],
        "publish" => &["nanochat", "bare", "naive", "batch"],
        _ => &["nanochat"],
    };
    if !targets.contains(&args.target.as_str()) {
        eprintln!(
            "nanochat-load {cmd}: --target is one of {}, not {:?}",
            targets.join(", "),
            args.target
        );
        std::process::exit(2);
    }
    if args.tls
        && (!["idle", "storm", "fanout"].contains(&cmd.as_str()) || args.target != "nanochat")
    {
        eprintln!(
            "nanochat-load {cmd}: --tls is for idle, storm and fanout with --target nanochat"
        );
        std::process::exit(2);
    }
    if args.yesterday > 0
        && (cmd != "publish" || args.target != "nanochat" || args.postgres.is_none())
    {
        eprintln!("nanochat-load {cmd}: --yesterday is for publish --target nanochat --postgres");
        std::process::exit(2);
    }
    if args.cut_listeners > 0
        && (!["fanout", "soak"].contains(&cmd.as_str())
            || args.target != "nanochat"
            || args.postgres.is_none())
    {
        eprintln!(
            "nanochat-load {cmd}: --cut-listeners is for fanout --target nanochat --postgres \
             and soak --postgres"
        );
        std::process::exit(2);
    }
    // Several processes act as one only through Postgres; with SQLite each would have a
    // database of its own and the members of a room on different ones would never meet.
    if args.nodes == 0
        || args.nodes > 1
            && (!["fanout", "sweep", "soak"].contains(&cmd.as_str())
                || args.target != "nanochat"
                || args.postgres.is_none())
    {
        eprintln!(
            "nanochat-load {cmd}: --nodes is at least 1, and more than 1 is for fanout, sweep \
             and soak with --target nanochat --postgres"
        );
        std::process::exit(2);
    }
    if cmd == "expiry" && args.postgres.is_none() {
        eprintln!("nanochat-load expiry: needs --postgres URL");
        std::process::exit(2);
    }
    let bound = if cmd == "soak" { 7200 } else { 600 };
    if args.secs > bound || args.warmup > bound {
        eprintln!("nanochat-load {cmd}: runs are bounded: --secs and --warmup at most {bound}");
        std::process::exit(2);
    }
    raise_open_files();
    // Every Postgres run works in a database of its own, created now and dropped at the end.
    let scratch = match &args.postgres {
        Some(url) => match ScratchDb::create(url).await {
            Ok(db) => Some(db),
            Err(e) => {
                eprintln!("nanochat-load {cmd}: {e}");
                std::process::exit(2);
            }
        },
        None => None,
    };
    let mut args = args;
    if let Some(db) = &scratch {
        args.postgres = Some(db.url.clone());
    }
    run_scenario(&cmd, &args).await;
    if let Some(db) = scratch {
        db.drop_database().await;
    }
}

/// Run scenario `cmd` (already checked) with its servers and files in a temporary directory.
async fn run_scenario(cmd: &str, args: &Args) {
    let dir = std::env::temp_dir().join(format!("nanochat-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let onion = args.onion.as_deref().map(|mode| {
        [
            ("NANOCHAT__SERVER__ONION_LISTEN", "127.0.0.1:0"),
            (
                "NANOCHAT__SERVER__ONION_CIRCUIT_IDS",
                if mode == "circuits" { "true" } else { "false" },
            ),
        ]
    });
    let tls_env = match args.tls {
        true => {
            let (env, client) = run_certificate(&dir);
            let _ = TLS.set(client);
            env.to_vec()
        }
        false => Vec::new(),
    };
    let tls_env: Vec<(&str, &str)> = tls_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let extra: &[(&str, &str)] = match (cmd, &onion) {
        ("soak", _) => &soak::SERVER_ENV,
        ("expiry", _) => &expiry::SERVER_ENV,
        ("abuse", Some(onion)) => onion,
        ("idle" | "storm" | "fanout", _) => &tls_env,
        _ => &[],
    };
    if cmd == "publish" && !["nanochat", "bare"].contains(&args.target.as_str()) {
        publish::baseline(args, &args.target, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    if cmd == "merge" {
        merge::run(args, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    if cmd == "sweep" {
        sweep(args, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let mut rooms = publish::SenderRooms::new(args.senders);
    if cmd == "publish" && args.yesterday > 0 {
        publish::store_yesterday(args, &mut rooms, &dir.join("secret")).await;
    }
    let servers = spawn_targets(args, &dir, extra, ["abuse", "storm"].contains(&cmd));
    let single = &servers[0];
    match cmd {
        "expiry" => expiry::run(args, single).await,
        "abuse" => abuse::run(args, single).await,
        "publish" => publish::over_sockets(args, single, rooms).await,
        "soak" => soak::run(args, &servers, &dir.join("node0")).await,
        "idle" => idle(args, single).await,
        "storm" => storm::run(args, single, TLS.get().cloned()).await,
        _ => println!("{}", fanout(args, servers).await),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The run's Postgres database (`--postgres`) through the store, as a server with the default
/// settings writes it, and through a plain connection.
async fn open_postgres(
    args: &Args,
) -> (nanochat::store::postgres::PgStore, tokio_postgres::Client) {
    let url = args.postgres.as_deref().expect("--postgres, checked");
    let settings = nanochat::config::Settings::default();
    let retention = nanochat::store::Retention::from_days(
        settings.retention.days,
        settings.retention.tombstone_days,
    );
    let store = nanochat::store::postgres::PgStore::connect(url, &settings.database, retention)
        .await
        .expect("connect to Postgres");
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to Postgres");
    tokio::spawn(conn);
    (store, client)
}

/// The database a Postgres run works in: created on the server `--postgres` names, under a
/// name of its own (`nanochat_load_<pid>`), and dropped when the run ends. Runs therefore
/// start from the same empty state, whatever ran before, and leave nothing behind; a NanoChat
/// run in a database another run had used would refuse to start (its secret check holds the
/// other run's secret). The role in the URL needs the right to create databases.
struct ScratchDb {
    /// The URL given, for dropping the database afterwards.
    admin: String,
    name: String,
    /// The URL of the new database.
    url: String,
}

impl ScratchDb {
    async fn create(url: &str) -> Result<ScratchDb, String> {
        let name = format!("nanochat_load_{}", std::process::id());
        let scratch_url = with_database(url, &name);
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("cannot connect to the --postgres server: {e}"))?;
        tokio::spawn(conn);
        // One statement each: a multi-statement string would run as one transaction, where
        // CREATE DATABASE is not allowed.
        for sql in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            client.batch_execute(&sql).await.map_err(|e| {
                let why = e
                    .as_db_error()
                    .map_or(e.to_string(), |d| d.message().to_owned());
                format!("cannot create the run's database {name} (the role needs CREATEDB): {why}")
            })?;
        }
        Ok(ScratchDb {
            admin: url.to_owned(),
            name,
            url: scratch_url,
        })
    }

    async fn drop_database(self) {
        let dropped = async {
            let (client, conn) =
                tokio_postgres::connect(&self.admin, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            client
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await
        };
        if let Err(e) = dropped.await {
            eprintln!("could not drop the run's database {}: {e}", self.name);
        }
    }
}

/// The connection string `url` with its database replaced by `name`: a `postgres://` URL, or
/// `key=value` pairs (where the last `dbname` given wins).
fn with_database(url: &str, name: &str) -> String {
    let Some(rest) = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    else {
        return format!("{url} dbname={name}");
    };
    let scheme = &url[..url.len() - rest.len()];
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
    format!("{scheme}{authority}/{name}{query}")
}

/// Descriptors the generator and the servers it starts (they inherit the limit) may open: the
/// largest scenario, 30 000 idle sockets, needs that many on each side.
const OPEN_FILES: u64 = 1 << 17;

/// Raise this process's open-file limit to `OPEN_FILES` (the hard limit too, which needs root);
/// failing that, the soft limit to the hard one.
fn raise_open_files() {
    let Ok((soft, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) else {
        return;
    };
    if hard < OPEN_FILES
        && rlimit::setrlimit(rlimit::Resource::NOFILE, OPEN_FILES, OPEN_FILES).is_ok()
    {
        return;
    }
    if soft < hard {
        let _ = rlimit::setrlimit(
            rlimit::Resource::NOFILE,
            hard.min(OPEN_FILES.max(soft)),
            hard,
        );
    }
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((0, 0));
    if soft < OPEN_FILES {
        eprintln!(
            "open-file limit {soft}: runs with more sockets than that fail (raising it needs CAP_SYS_RESOURCE, or a higher ulimit -Hn)"
        );
    }
}

/// The server(s) under test: `--nodes` NanoChat processes sharing one secret (fresh data
/// directories under `dir`), or one baseline server.
fn spawn_targets(
    args: &Args,
    dir: &std::path::Path,
    extra: &[(&str, &str)],
    real_limits: bool,
) -> Vec<Server> {
    match args.target.as_str() {
        "bare" => vec![spawn_bare(false)],
        "bare-nodelay" => vec![spawn_bare(true)],
        "node" => vec![spawn_node()],
        "nanochat" => (0..args.nodes)
            .map(|i| {
                let d = dir.join(format!("node{i}"));
                let _ = std::fs::remove_dir_all(&d);
                std::fs::create_dir_all(&d).expect("node dir");
                let s = spawn_nanochat(
                    &d,
                    &dir.join("secret"),
                    args.postgres.as_deref(),
                    extra,
                    real_limits,
                );
                // Let the first node create the secret file before the others read it.
                std::thread::sleep(Duration::from_millis(300));
                s
            })
            .collect(),
        other => panic!("unknown target {other}"),
    }
}

/// Cut every NanoChat cluster listener connection to the run's database (`url`), as a
/// restarted proxy or a killed backend would; how many were cut.
async fn cut_listeners(url: &str) -> u64 {
    let cut = async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let row = client
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name LIKE 'nanochat-listener-%'",
                &[],
            )
            .await?;
        Ok::<_, tokio_postgres::Error>(row.get::<_, i64>(0))
    };
    match cut.await {
        Ok(n) => n as u64,
        Err(e) => {
            eprintln!("cannot cut the listener connections: {e}");
            0
        }
    }
}

/// `--cut-listeners N`: cuts the servers' cluster listener connections N times, evenly over
/// `--secs` from a given start.
struct ListenerCutter(Option<tokio::task::JoinHandle<u64>>);

impl ListenerCutter {
    fn start(args: &Args, from: Instant) -> ListenerCutter {
        let task = args
            .postgres
            .clone()
            .filter(|_| args.cut_listeners > 0)
            .map(|url| {
                let (n, span) = (args.cut_listeners, Duration::from_secs(args.secs));
                tokio::spawn(async move {
                    let mut cut = 0;
                    for i in 1..=n {
                        let at = from + span.mul_f64(i as f64 / (n + 1) as f64);
                        tokio::time::sleep_until(at.into()).await;
                        cut += cut_listeners(&url).await;
                    }
                    cut
                })
            });
        ListenerCutter(task)
    }

    /// After the last cut: the connections cut (none when not asked to), and each server's
    /// catch-ups from its log, `(rooms, ms)`.
    async fn finish(self, servers: &[Server]) -> (Option<u64>, Vec<(u64, u64)>) {
        let cuts = match self.0 {
            Some(task) => Some(task.await.unwrap_or(0)),
            None => None,
        };
        let catch_ups = servers
            .iter()
            .flat_map(|s| s.catch_ups.lock().expect("catch-ups").clone())
            .collect();
        (cuts, catch_ups)
    }
}

/// A loopback source address for client `id` of a group: groups take their own third octets
/// from `first` on (250 clients per octet), so that each client's address is its own.
fn source_addr(first: u8, id: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        first + (id / 250) as u8,
        2 + (id % 250) as u8,
    ))
}

/// The highest fan-out rate a target sustains: fan-out runs from `--rate` up in steps of 25%,
/// each against freshly started server(s), until a run loses a delivery or its p99 delivery
/// latency exceeds 200 ms (or `--steps` runs were made; if the first run fails, the rate halves
/// until one passes); then `--refine` more runs halve the gap between the last passing and the
/// first failing rate, so the maximum is known to about 6% rather than 25%. Prints every run,
/// then the highest passing one as `{"scenario":"sweep",...}`.
async fn sweep(args: &Args, dir: &std::path::Path) {
    let run_at = |rate: u64| {
        let mut run = args.clone();
        run.rate = rate;
        async move {
            let servers = spawn_targets(&run, dir, &[], false);
            let report = fanout(&run, servers).await;
            println!("{report}");
            let ok = report["lost"] == 0 && report["p99_ms"].as_f64().is_some_and(|p| p <= 200.0);
            (ok, report)
        }
    };
    let mut best = serde_json::Value::Null;
    let mut failed = serde_json::Value::Null;
    let mut rate = args.rate;
    for _ in 0..args.steps {
        let (ok, report) = run_at(rate).await;
        if ok {
            best = report;
            if !failed.is_null() {
                break;
            }
            rate = rate * 5 / 4;
        } else {
            failed = report;
            if !best.is_null() {
                break;
            }
            // Even the starting rate failed: look lower.
            rate /= 2;
            if rate == 0 {
                break;
            }
        }
    }
    for _ in 0..args.refine {
        let (Some(pass), Some(fail)) = (best["rate"].as_u64(), failed["rate"].as_u64()) else {
            break;
        };
        let Some(mid) = between(pass, fail) else {
            break;
        };
        let (ok, report) = run_at(mid).await;
        if ok {
            best = report;
        } else {
            failed = report;
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "scenario": "sweep",
            "target": args.target,
            "rooms": args.rooms,
            "members": args.members,
            "max_rate": best["rate"],
            "max_deliveries_per_s": best["deliveries_per_s"],
            "p99_ms_at_max": best["p99_ms"],
            "deliveries_per_cpu_s_at_max": best["deliveries_per_cpu_s"],
            "steal_pct_at_max": best["steal_pct"],
            "first_failing_rate": failed["rate"],
        })
    );
}

/// The rate halfway between a passing and a higher failing one, if there is one strictly
/// between them.
fn between(pass: u64, fail: u64) -> Option<u64> {
    let mid = pass + fail.saturating_sub(pass) / 2;
    (mid > pass && mid < fail).then_some(mid)
}

/// Fan-out: rooms x members joined sockets, one sender per room at an open-loop rate, every
/// delivery timed. With `--warmup`, the senders run that long first and only what is sent
/// after it is counted and timed (and the server's CPU measured from then): a server that
/// stores messages is measured with a database that has been filling for a while, not empty.
/// What every member's socket in a fan-out run adds its deliveries to.
#[derive(Clone)]
struct Receiver {
    start: Instant,
    /// Sends stamped before this (µs after `start`) are warm-up.
    measure_from: Arc<AtomicU64>,
    hist: Arc<Mutex<Histogram<u64>>>,
    delivered: Arc<AtomicU64>,
    timeline: Arc<Mutex<timeline::Timeline>>,
    keep_timeline: bool,
}

impl Receiver {
    /// Count and time every measured `msg` a socket receives until its connection ends, then
    /// add its histogram and timeline to the run's.
    async fn count<S>(self, mut stream: S)
    where
        S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
            + Unpin,
    {
        let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
        let mut local_timeline = timeline::Timeline::default();
        while let Some(Ok(msg)) = stream.next().await {
            let Message::Text(t) = msg else { continue };
            let t = t.as_str();
            if !t.starts_with(r#"{"type":"msg""#) {
                continue;
            }
            let from_us = self.measure_from.load(Ordering::Relaxed);
            if let Some(sent_us) = sent_at(t)
                && sent_us >= from_us
            {
                let now_us = self.start.elapsed().as_micros() as u64;
                let latency_us = now_us.saturating_sub(sent_us).max(1);
                let _ = local.record(latency_us);
                if self.keep_timeline {
                    local_timeline.record(sent_us - from_us, latency_us);
                }
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.hist
            .lock()
            .expect("histogram")
            .add(&local)
            .expect("same bounds");
        self.timeline.lock().expect("timeline").add(&local_timeline);
    }
}

async fn fanout(args: &Args, servers: Vec<Server>) -> serde_json::Value {
    let start = Instant::now();
    // Sends stamped before this (µs after `start`) are warm-up: set once the sockets are open.
    let measure_from = Arc::new(AtomicU64::new(u64::MAX));
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
    ));
    let delivered = Arc::new(AtomicU64::new(0));
    let timeline = Arc::new(Mutex::new(timeline::Timeline::default()));
    let keep_timeline = args.timeline;
    let mut senders = Vec::new();
    let mut readers = Vec::new();
    let receiver = Receiver {
        start,
        measure_from: measure_from.clone(),
        hist: hist.clone(),
        delivered: delivered.clone(),
        timeline: timeline.clone(),
        keep_timeline,
    };
    // Sockets open in a random order, each room created by whichever of its members comes
    // first; the first `--room-senders` of a room to arrive are its senders. Opening them room
    // by room, senders first, would line the roles up with a server's connection order: a
    // server that hands connections to its threads in turn would get every sender on one
    // thread and every reader on another, which no real instance sees (its members arrive at
    // random).
    let room_senders = args.room_senders.clamp(1, args.members.max(1));
    let keys: Vec<RoomKeys> = (0..args.rooms)
        .map(|_| {
            let mut secret_bytes = [0u8; 32];
            rand::fill(&mut secret_bytes);
            RoomKeys::derive(&secret_bytes)
        })
        .collect();
    let mut order: Vec<usize> = (0..args.rooms)
        .flat_map(|r| std::iter::repeat_n(r, args.members))
        .collect();
    order.shuffle(&mut rand::rng());
    let mut arrived = vec![0usize; args.rooms];
    for (n, r) in order.into_iter().enumerate() {
        let server = &servers[n % servers.len()];
        let create = arrived[r] == 0;
        arrived[r] += 1;
        let ws = open(&server.addr, n, &keys[r], create).await;
        if arrived[r] <= room_senders {
            senders.push(ws);
        } else {
            readers.push(tokio::spawn(receiver.clone().count(ws)));
        }
    }
    let per_sender = args.rate as f64 / args.rooms as f64 / room_senders as f64;
    let sent = Arc::new(AtomicU64::new(0));
    let run_start = Instant::now();
    let warmup = Duration::from_secs(args.warmup);
    let from_us = (run_start + warmup - start).as_micros() as u64;
    measure_from.store(from_us, Ordering::Relaxed);
    // The wall clock at the timeline's second 0, to set it beside the server's log.
    let measured_from_unix_ms = nanochat::store::now_ms() + args.warmup as i64 * 1000;
    let mut tasks = Vec::new();
    let period = Duration::from_secs_f64(1.0 / per_sender.max(0.001));
    let count = senders.len();
    for (k, ws) in senders.into_iter().enumerate() {
        let sent = sent.clone();
        let secs = args.warmup + args.secs;
        let (mut sink, stream) = ws.split();
        // Read acks (so the socket never backs up) and, with several senders in a room, count
        // the others' messages like any member; it ends with the connection.
        readers.push(tokio::spawn(receiver.clone().count(stream)));
        let first = run_start + stagger(k, count, period);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(first.into(), period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let epoch = crypto::epoch_of(nanochat::store::now_ms());
            let mut i = 0u64;
            while run_start.elapsed() < Duration::from_secs(secs) {
                tick.tick().await;
                let frame = timed_send(i, epoch, start, 32);
                // Counted by its stamp, as the readers decide what to time.
                let measured = sent_at(&frame).is_some_and(|us| us >= from_us);
                if sink.send(Message::text(frame)).await.is_err() {
                    break;
                }
                if measured {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }));
    }
    // `--cut-listeners`: cut the servers' cluster listener connections while the run is
    // measured, evenly spaced; the report counts the connections cut.
    let cutter = ListenerCutter::start(args, run_start + warmup);
    tokio::time::sleep_until((run_start + warmup).into()).await;
    let cpu_before: f64 = servers.iter().map(|s| cpu_seconds(s.child.id())).sum();
    let machine_before = MachineCpu::now();
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = run_start.elapsed().as_secs_f64() - warmup.as_secs_f64() - 2.0;
    let cpu: f64 = servers
        .iter()
        .map(|s| cpu_seconds(s.child.id()))
        .sum::<f64>()
        - cpu_before;
    let steal_pct = MachineCpu::now().steal_pct_since(&machine_before);
    // Messages a room held back because an earlier one (committed through another process)
    // was still on its way, the reads a room made for such a gap, and those a socket made
    // itself; over the whole run, warm-up included.
    let mut order_counts = serde_json::Map::new();
    for (key, metric) in [
        ("held", "nanochat_messages_held_total"),
        ("held_gap_reads", "nanochat_held_gap_reads_total"),
        ("gap_reads", "nanochat_gap_reads_total"),
    ] {
        let mut total = None;
        for s in &servers {
            if let Some(n) = soak::scrape(s.admin.as_deref(), metric).await {
                *total.get_or_insert(0) += n;
            }
        }
        if let Some(n) = total {
            order_counts.insert(key.to_owned(), n.into());
        }
    }
    let (listener_cuts, catch_ups) = cutter.finish(&servers).await;
    drop(servers);
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
    }
    let sent = sent.load(Ordering::Relaxed);
    let delivered = delivered.load(Ordering::Relaxed);
    let expected = sent * (args.members as u64 - 1);
    let h = hist.lock().expect("histogram");
    let mut report = serde_json::json!({
        "scenario": "fanout",
        "target": args.target,
        "tls": args.tls,
        "nodes": args.nodes,
        "backend": if args.postgres.is_some() { "postgres" } else { "sqlite" },
        "rooms": args.rooms,
        "members": args.members,
        "room_senders": args.room_senders.clamp(1, args.members.max(1)),
        "rate": args.rate,
        "warmup_s": args.warmup,
        "sent": sent,
        "expected": expected,
        "delivered": delivered,
        "lost": expected.saturating_sub(delivered),
        "deliveries_per_s": (delivered as f64 / elapsed).round(),
        "p50_ms": h.value_at_quantile(0.5) as f64 / 1000.0,
        "p99_ms": h.value_at_quantile(0.99) as f64 / 1000.0,
        "max_ms": h.max() as f64 / 1000.0,
        "server_cpu_s": (cpu * 100.0).round() / 100.0,
        "deliveries_per_cpu_s": if cpu > 0.0 { (delivered as f64 / cpu).round() } else { 0.0 },
        "steal_pct": steal_pct,
    });
    for (key, n) in order_counts {
        report[key] = n;
    }
    if let Some(cut) = listener_cuts {
        report["listener_cuts"] = cut.into();
        report["catch_ups"] = serde_json::json!(catch_ups);
    }
    if keep_timeline {
        report["measured_from_unix_ms"] = measured_from_unix_ms.into();
        report["timeline"] = timeline.lock().expect("timeline").to_json();
    }
    report
}

/// Idle memory: open rooms x members joined sockets, let them sit, and compare the server's
/// resident memory with what it used after one warm-up room.
async fn idle(args: &Args, server: &Server) {
    let pid = server.child.id();
    let mut sockets = Vec::new();
    // Warm up: one room, so allocator arenas, thread stacks and caches exist before measuring.
    let mut n = 0;
    let room_keys = || {
        let mut secret = [0u8; 32];
        rand::fill(&mut secret);
        RoomKeys::derive(&secret)
    };
    let warm = room_keys();
    for m in 0..args.members {
        let ws = open(&server.addr, n, &warm, m == 0).await;
        n += 1;
        sockets.push(ws);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_bytes(pid);
    let opened_from = sockets.len();
    for _ in 0..args.rooms {
        let keys = room_keys();
        for m in 0..args.members {
            let ws = open(&server.addr, n, &keys, m == 0).await;
            n += 1;
            sockets.push(ws);
        }
    }
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    let after = rss_bytes(pid);
    let opened = (sockets.len() - opened_from) as u64;
    let report = serde_json::json!({
        "scenario": "idle",
        "target": args.target,
        "tls": args.tls,
        "rooms": args.rooms,
        "members": args.members,
        "sockets": opened,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "bytes_per_socket": after.saturating_sub(before) / opened.max(1),
    });
    println!("{report}");
}

#[cfg(test)]
mod tests {
    fn parse(line: &str) -> Result<super::Args, String> {
        super::parse_args(line.split_whitespace().map(String::from))
    }

    /// A run's database replaces the one in the connection string; host, user and options stay.
    #[test]
    fn the_run_database_keeps_everything_else_of_the_url() {
        let cases = [
            (
                "postgres://u@127.0.0.1:5432/app",
                "postgres://u@127.0.0.1:5432/r",
            ),
            (
                "postgresql://u:p@h/app?sslmode=disable",
                "postgresql://u:p@h/r?sslmode=disable",
            ),
            ("postgres://h:1", "postgres://h:1/r"),
            ("postgres://h/?host=/tmp", "postgres://h/r?host=/tmp"),
            (
                "host=/tmp dbname=app user=u",
                "host=/tmp dbname=app user=u dbname=r",
            ),
        ];
        for (url, want) in cases {
            assert_eq!(super::with_database(url, "r"), want, "{url}");
        }
        let config: tokio_postgres::Config = super::with_database("host=/tmp dbname=app", "r")
            .parse()
            .unwrap();
        assert_eq!(config.get_dbname(), Some("r"), "the last dbname wins");
    }

    /// Options are read by name; a mistake names the option instead of panicking.
    #[test]
    fn options_are_read_and_mistakes_named() {
        let a =
            parse("--target bare --rooms 7 --rate 900 --postgres postgres://x --cut-listeners 2")
                .unwrap();
        assert_eq!(a.cut_listeners, 2);
        assert_eq!(
            (a.target.as_str(), a.rooms, a.rate, a.members),
            ("bare", 7, 900, 10)
        );
        assert_eq!(a.postgres.as_deref(), Some("postgres://x"));
        assert_eq!(parse("--rooms").err().unwrap(), "--rooms needs a value");
        assert_eq!(
            parse("--rate fast").err().unwrap(),
            "--rate takes a whole number, not \"fast\""
        );
        assert_eq!(
            parse("--colour red").err().unwrap(),
            "unknown option --colour"
        );
        assert_eq!(
            parse("--onion circuits").unwrap().onion.as_deref(),
            Some("circuits")
        );
        assert_eq!(
            parse("--onion yes").err().unwrap(),
            "--onion is circuits or shared, not \"yes\""
        );
        assert!(parse("--tls 1").unwrap().tls);
        assert!(!parse("").unwrap().tls);
    }

    /// The reading counts user time: spinning in user space must move it.
    #[test]
    fn cpu_seconds_counts_user_time() {
        let pid = std::process::id();
        let before = super::cpu_seconds(pid);
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while super::cpu_seconds(pid) < before + 0.3 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "30 s of spinning did not register"
            );
            for i in 0..1_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
    }

    /// Steal is the eighth number of the `cpu` line and the total the sum of the first eight
    /// (guest time is inside user time already).
    #[test]
    fn senders_start_spread_over_one_period() {
        use std::time::Duration;
        let period = Duration::from_millis(2500);
        let firsts: Vec<Duration> = (0..5).map(|k| super::stagger(k, 5, period)).collect();
        assert_eq!(
            firsts,
            [0, 500, 1000, 1500, 2000]
                .map(Duration::from_millis)
                .to_vec()
        );
        assert!((0..1000).all(|k| super::stagger(k, 1000, period) < period));
        assert_eq!(super::stagger(0, 0, period), Duration::ZERO);
    }

    #[test]
    fn steal_is_read_from_the_cpu_line() {
        let a = super::MachineCpu::parse("cpu  100 0 50 800 10 0 5 35 20 0");
        assert_eq!(a.total, 1000);
        assert_eq!(a.steal, 35);
        let b = super::MachineCpu::parse("cpu  200 0 100 1500 20 0 10 170 40 0");
        // 135 of 1000 more ticks were stolen.
        assert_eq!(b.steal_pct_since(&a), 13.5);
        assert_eq!(a.steal_pct_since(&a), 0.0);
    }

    /// Refinement probes halfway and stops once nothing lies strictly between.
    #[test]
    fn refinement_halves_the_gap_until_it_is_closed() {
        assert_eq!(super::between(1000, 1250), Some(1125));
        assert_eq!(super::between(1125, 1250), Some(1187));
        assert_eq!(super::between(20, 21), None);
        assert_eq!(super::between(25, 25), None);
        assert_eq!(super::between(30, 25), None);
    }
}
