//! A throwaway Postgres cluster for the test binary, started from the machine's own binaries
//! (`/usr/lib/postgresql/*/bin`, or `NANOCHAT_PG_BINDIR`), reachable only through a Unix
//! socket in a fresh directory. Each test gets its own database.
//!
//! `initdb` and `postgres` refuse to run as root, so as root they run as the `postgres` user.
//! A watchdog shell stops the server and removes its directory when this test process exits.
//! Without Postgres binaries the tests fail with a message saying what to install.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const PORT: u16 = 5432;

/// The running cluster.
pub struct PgCluster {
    bindir: PathBuf,
    socket_dir: PathBuf,
    as_postgres: bool,
    data: PathBuf,
    options: String,
}

/// One test database.
pub struct TestDb {
    /// Connection string for the server under test.
    pub url: String,
    /// Database name.
    pub name: String,
}

static CLUSTER: OnceLock<Result<PgCluster, String>> = OnceLock::new();

fn find_bindir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("NANOCHAT_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").is_file() && p.join("postgres").is_file())
        .collect();
    // Highest version last.
    candidates.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.pop().ok_or_else(|| {
        "PostgreSQL server binaries not found: the Postgres tests need them. Install them with \
         `apt-get install -y postgresql` (Debian/Ubuntu), or point NANOCHAT_PG_BINDIR at a \
         directory holding initdb and postgres."
            .to_string()
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgCluster {
    fn command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn start() -> Result<PgCluster, String> {
        let bindir = find_bindir()?;
        let as_postgres = is_root();
        let base = std::env::temp_dir().join(format!(
            "nanochat-pg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let data = base.join("data");
        let socket_dir = base.join("sock");
        std::fs::create_dir_all(&socket_dir).map_err(|e| format!("mkdir {base:?}: {e}"))?;
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&base)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                return Err(
                    "cannot chown the test cluster directory to the postgres user; \
                            as root the tests need a `postgres` system user (created by \
                            `apt-get install -y postgresql`)"
                        .into(),
                );
            }
        }
        let cluster = PgCluster {
            bindir,
            socket_dir: socket_dir.clone(),
            as_postgres,
            data: data.clone(),
            options: format!(
                "-k {} -p {PORT} -c listen_addresses= -c fsync=off -c max_connections=400 \
                 -c shared_buffers=64MB",
                socket_dir.display()
            ),
        };
        let out = cluster
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .map_err(|e| format!("cannot run initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // pg_ctl starts the server; the watchdog stops it once this test process is gone
        // (checked through /proc, which works across users) and removes the cluster directory.
        // Tests may stop and start the server in between (fault injection).
        let script = format!(
            "{pg_ctl} -D {data} -o \"{options}\" -l {base}/log -w start >/dev/null 2>&1; \
             while [ -d /proc/{parent} ]; do sleep 1; done; \
             {pg_ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {base}",
            pg_ctl = cluster.bindir.join("pg_ctl").display(),
            data = data.display(),
            options = cluster.options,
            base = base.display(),
            parent = std::process::id(),
        );
        let mut sh = if as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "sh", "-c", &script]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            c
        };
        sh.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start postgres: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(cluster.bindir.join("pg_isready"))
                .arg("-h")
                .arg(&socket_dir)
                .args(["-p", &PORT.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(cluster);
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(base.join("log")).unwrap_or_default();
                return Err(format!("postgres did not become ready in 30 s: {log}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A cluster of its own, for tests that stop and start the server.
    pub fn dedicated() -> PgCluster {
        PgCluster::start().unwrap_or_else(|msg| panic!("{msg}"))
    }

    fn pg_ctl(&self, args: &[&str]) {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(args)
            .output()
            .expect("run pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Crash-stop the server (`pg_ctl stop -m immediate`).
    pub fn stop_immediate(&self) {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }

    /// Start the server again after [`PgCluster::stop_immediate`].
    pub fn start_again(&self) {
        let options = self.options.clone();
        self.pg_ctl(&["-o", &options, "-l", "/dev/null", "-w", "start"]);
    }

    /// Connection string for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "host={} port={PORT} user=postgres dbname={db}",
            self.socket_dir.display()
        )
    }

    /// Run SQL as the superuser in the `postgres` database.
    pub async fn admin(&self, sql: &str) {
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
            .await
            .expect("connect to the test cluster");
        tokio::spawn(conn);
        client.batch_execute(sql).await.expect("admin SQL");
    }

    /// A fresh, empty database.
    pub async fn database(&self) -> TestDb {
        let name = format!("nanochat_test_{:016x}", rand::random::<u64>());
        self.admin(&format!("CREATE DATABASE {name}")).await;
        TestDb {
            url: self.url(&name),
            name,
        }
    }

    /// A client connected to a test database.
    pub async fn connect(&self, db: &TestDb) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(conn);
        client
    }
}

/// The cluster of this test process, started on first use.
pub fn cluster() -> &'static PgCluster {
    match CLUSTER.get_or_init(PgCluster::start) {
        Ok(c) => c,
        Err(msg) => panic!("{msg}"),
    }
}
