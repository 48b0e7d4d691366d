//! Throwaway PostgreSQL servers for the replica tests.
//!
//! With `initdb`/`postgres` on the machine (PATH or Debian's `/usr/lib/postgresql/*/bin`), each
//! [`PgServer::start`] creates a cluster in a temp dir (as the `postgres` user when the tests run
//! as root) and runs it under a watchdog that stops it when the test process ends. Else
//! `CREDBROKER_TEST_PG_URL` names an existing server whose user may create databases. Without
//! either, PostgreSQL tests print that they were skipped; `CREDBROKER_REQUIRE_PG=1` (set by
//! `.ci/run`) turns that into a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::OnceCell;

/// A PostgreSQL server for tests.
pub struct PgServer {
    /// `postgres://user@host:port` (no database).
    pub base: String,
    local: Option<Local>,
}

struct Local {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
    child: std::sync::Mutex<Option<Child>>,
    extra: String,
}

fn find_bin() -> Option<PathBuf> {
    let in_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p).find(|d| d.join("initdb").exists() && d.join("postgres").exists())
    });
    in_path.or_else(|| {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|d| d.join("initdb").exists())
            .collect();
        dirs.sort();
        dirs.pop()
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn run(as_postgres: bool, bin: &Path, args: &[&str]) -> Command {
    let mut c = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    c.args(args);
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The one skip rule of the PostgreSQL tests: fails the test when PostgreSQL is required
/// (`CREDBROKER_REQUIRE_PG=1`), else prints the skip and returns. Tests that need a server of
/// their own ([`PgServer::start_local`], [`PgServer::start_tls`]) need `initdb` even when
/// `CREDBROKER_TEST_PG_URL` is set.
pub fn skipped(test: &str) {
    let msg = format!(
        "SKIPPED {test}: no PostgreSQL for it (no initdb on the machine, and for tests that need a \
         server of their own an external CREDBROKER_TEST_PG_URL does not do)"
    );
    assert!(
        std::env::var("CREDBROKER_REQUIRE_PG").ok().as_deref() != Some("1"),
        "{msg}, but CREDBROKER_REQUIRE_PG=1"
    );
    eprintln!("{msg}");
}

impl PgServer {
    /// A new server of its own (a local cluster), or the external one; `None` when neither is
    /// available.
    pub async fn start() -> Option<PgServer> {
        Self::start_with(None, false).await
    }

    /// A local server that also accepts TLS with this certificate and key (PEM); `None` when
    /// no local server can be made (an external `CREDBROKER_TEST_PG_URL` cannot stand in).
    pub async fn start_tls(cert: &str, key: &str) -> Option<PgServer> {
        Self::start_with(Some((cert, key)), true).await
    }

    /// A local server of the test's own, which it may stop and start (an external
    /// `CREDBROKER_TEST_PG_URL` cannot stand in); `None` when no local server can be made.
    pub async fn start_local() -> Option<PgServer> {
        Self::start_with(None, true).await
    }

    async fn start_with(tls: Option<(&str, &str)>, local_only: bool) -> Option<PgServer> {
        if let (false, Ok(url)) = (local_only, std::env::var("CREDBROKER_TEST_PG_URL")) {
            return Some(PgServer {
                base: url.trim_end_matches('/').to_owned(),
                local: None,
            });
        }
        let bin = find_bin()?;
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("credbroker-pg")
            .tempdir()
            .unwrap();
        if as_postgres {
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status();
        }
        let data = dir.path().join("data");
        let data_s = data.to_str().unwrap().to_owned();
        let out = run(
            as_postgres,
            &bin.join("initdb"),
            &[
                "-D",
                &data_s,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )
        .stdout(Stdio::null())
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut extra = String::new();
        if let Some((cert, key)) = tls {
            let (c, k) = (data.join("server.crt"), data.join("server.key"));
            std::fs::write(&c, cert).unwrap();
            std::fs::write(&k, key).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
            if as_postgres {
                let _ = Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(&c)
                    .arg(&k)
                    .status();
            }
            extra = format!(
                "-c ssl=on -c ssl_cert_file='{}' -c ssl_key_file='{}'",
                c.display(),
                k.display()
            );
        }
        let local = Local {
            bin,
            dir,
            port: free_port(),
            as_postgres,
            child: std::sync::Mutex::new(None),
            extra,
        };
        let server = PgServer {
            base: format!("postgres://postgres@127.0.0.1:{}", local.port),
            local: Some(local),
        };
        server.resume().await;
        Some(server)
    }

    /// The shared server of this test process.
    pub async fn shared() -> Option<&'static PgServer> {
        static SHARED: OnceCell<Option<PgServer>> = OnceCell::const_new();
        SHARED.get_or_init(PgServer::start).await.as_ref()
    }

    /// Starts (again) a local server and waits until it accepts connections.
    pub async fn resume(&self) {
        let Some(l) = &self.local else { return };
        let data = l.dir.path().join("data");
        let sock = l.dir.path().to_str().unwrap().to_owned();
        let postgres = l.bin.join("postgres");
        // A watchdog stops the server when the test process goes away.
        let script = format!(
            "'{pg}' -D '{data}' -p {port} -k '{sock}' -c listen_addresses=127.0.0.1 \
             -c max_connections=300 -c fsync=off -c full_page_writes=off {extra} & pg=$!; \
             while [ -d /proc/{me} ] && kill -0 $pg 2>/dev/null; do sleep 1; done; \
             kill -INT $pg 2>/dev/null; wait $pg",
            pg = postgres.display(),
            data = data.display(),
            port = l.port,
            me = std::process::id(),
            extra = l.extra,
        );
        let mut cmd = if l.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "sh", "-c", &script]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            c
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        *l.child.lock().unwrap() = Some(child);
        let url = format!("{}/postgres", self.base);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "PostgreSQL did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops a local server (fast shutdown: sessions end, committed data stays).
    pub fn stop(&self) {
        let Some(l) = &self.local else { return };
        let data = l.dir.path().join("data");
        let _ = run(
            l.as_postgres,
            &l.bin.join("pg_ctl"),
            &["-D", data.to_str().unwrap(), "-m", "fast", "-w", "stop"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
        if let Some(mut c) = l.child.lock().unwrap().take() {
            let _ = c.wait();
        }
    }

    /// A streaming standby of this local server (a base backup, `standby.signal` and
    /// `primary_conninfo` written by `pg_basebackup -R`), started; `None` without a local server.
    pub async fn standby(&self) -> Option<PgServer> {
        let l = self.local.as_ref()?;
        let dir = tempfile::Builder::new()
            .prefix("credbroker-pg-standby")
            .tempdir()
            .unwrap();
        if l.as_postgres {
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status();
        }
        let data = dir.path().join("data");
        let port = l.port.to_string();
        // pg_basebackup sits next to the real `postgres` (PATH may hold only links to some).
        let tools = std::fs::canonicalize(l.bin.join("postgres"))
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| l.bin.clone());
        let out = run(
            l.as_postgres,
            &tools.join("pg_basebackup"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
        )
        .stdout(Stdio::null())
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "pg_basebackup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let local = Local {
            bin: l.bin.clone(),
            dir,
            port: free_port(),
            as_postgres: l.as_postgres,
            child: std::sync::Mutex::new(None),
            extra: String::new(),
        };
        let server = PgServer {
            base: format!("postgres://postgres@127.0.0.1:{}", local.port),
            local: Some(local),
        };
        server.resume().await;
        Some(server)
    }

    /// `postgres://postgres@host:port`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// This server's `host:port`.
    pub fn authority(&self) -> String {
        self.base
            .trim_start_matches("postgres://postgres@")
            .to_owned()
    }

    /// Kills the server as a crash would (immediate shutdown: no checkpoint).
    pub fn kill(&self) {
        let Some(l) = &self.local else { return };
        let data = l.dir.path().join("data");
        let _ = run(
            l.as_postgres,
            &l.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
        if let Some(mut c) = l.child.lock().unwrap().take() {
            let _ = c.wait();
        }
    }

    /// Promotes a standby to primary and waits until it accepts writes.
    pub fn promote(&self) {
        let Some(l) = &self.local else { return };
        let data = l.dir.path().join("data");
        let out = run(
            l.as_postgres,
            &l.bin.join("pg_ctl"),
            &["-D", data.to_str().unwrap(), "-w", "promote"],
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "promote: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A fresh, empty database; returns its URL.
    pub async fn fresh_db(&self) -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "cb_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let (client, conn) =
            tokio_postgres::connect(&format!("{}/postgres", self.base), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        format!("{}/{name}", self.base)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}
