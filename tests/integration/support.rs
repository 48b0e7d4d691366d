//! Test harness: a real broker (in-process via `server::run`, or the real binary as a child
//! process) on 127.0.0.1:0 with a temp-dir sled store, real gRPC clients, and fake upstreams on
//! loopback that answer as the vendors do and record every request they did not expect.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use credbroker::config::Config;
use credbroker::pb;
use credbroker::pb::credential_broker_client::CredentialBrokerClient;
use credbroker::server::{run_with_hooks, StartupHooks, ADMIN_TOKEN_FILE};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The interceptor that adds the bearer token (or nothing).
#[derive(Clone)]
pub struct AuthFn(pub Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for AuthFn {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.0 {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// A gRPC client that sends a fixed bearer token (or none).
pub type Client = CredentialBrokerClient<InterceptedService<Channel, AuthFn>>;

/// A client that sends `authorization: Bearer <token>` (no header when `None`).
pub async fn client(addr: SocketAddr, token: Option<&str>) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let header = token.map(|t| format!("Bearer {t}").parse().unwrap());
    CredentialBrokerClient::with_interceptor(channel, AuthFn(header))
}

/// Waits (event-driven, through the health Watch stream) until the broker reports `status`.
pub async fn wait_for_health(addr: SocketAddr, status: ServingStatus) {
    wait_for_service_health(addr, "", status).await
}

/// [`wait_for_health`] for one named health service.
pub async fn wait_for_service_health(addr: SocketAddr, service: &str, status: ServingStatus) {
    let fut = async {
        let mut health = loop {
            // The listener is bound before the address is known, so connecting cannot race.
            if let Ok(ch) = Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
            {
                break HealthClient::new(ch);
            }
            tokio::task::yield_now().await;
        };
        let mut stream = health
            .watch(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        while let Some(msg) = stream.message().await.unwrap() {
            if msg.status == status as i32 {
                return;
            }
        }
        panic!("health stream ended before {status:?}");
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .expect("broker did not reach the expected health status in 30 s");
}

/// A test configuration on a given data directory.
pub fn test_config(data_dir: &Path) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    // Tests bind their own HTTP listener on port 0 (never the default 8080).
    c.server.http_listen = None;
    c.server.shutdown_grace = Duration::from_secs(5);
    c.store.data_dir = data_dir.to_path_buf();
    c.egress.allow_http = true;
    // The fakes live on loopback; the guard admits it only because the tests say so.
    c.egress.allow = credbroker::backends::egress::AllowList::parse("127.0.0.1/32").unwrap();
    c.egress.upstream_timeout = Duration::from_secs(2);
    c
}

/// A broker running in this process.
pub struct TestBroker {
    /// gRPC address.
    pub addr: SocketAddr,
    /// HTTP listener address (OAuth callback).
    pub http_addr: SocketAddr,
    /// The bootstrap admin token.
    pub admin_token: String,
    /// The data directory.
    pub data_dir: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), credbroker::server::ServeError>>>,
}

impl TestBroker {
    /// Starts a broker with `config` and waits until it is SERVING.
    pub async fn start_with(config: Config) -> Self {
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_gated(
            config,
            StartupHooks {
                http_listener: Some(http),
                ..Default::default()
            },
        )
        .await
    }

    /// Starts a broker whose store is wrapped by `wrap` (fault injection).
    pub async fn start_wrapped(config: Config, wrap: credbroker::server::StoreWrapper) -> Self {
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_gated(
            config,
            StartupHooks {
                http_listener: Some(http),
                wrap_store: Some(wrap),
                ..Default::default()
            },
        )
        .await
    }

    /// Starts a broker on `data_dir` with the test defaults.
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with(test_config(data_dir)).await
    }

    async fn start_gated(config: Config, hooks: StartupHooks) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let http_addr = hooks.http_listener.as_ref().unwrap().local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let data_dir = config.store.data_dir.clone();
        let task = tokio::spawn(run_with_hooks(
            listener,
            config,
            async {
                let _ = rx.await;
            },
            hooks,
        ));
        wait_for_health(addr, ServingStatus::Serving).await;
        let admin_token = std::fs::read_to_string(data_dir.join(ADMIN_TOKEN_FILE))
            .unwrap()
            .trim()
            .to_owned();
        Self {
            addr,
            http_addr,
            admin_token,
            data_dir,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Starts a broker whose store opens only when the returned sender fires.
    pub async fn start_held(
        config: Config,
    ) -> (
        SocketAddr,
        oneshot::Sender<()>,
        oneshot::Sender<()>,
        JoinHandle<Result<(), credbroker::server::ServeError>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (gate_tx, gate_rx) = oneshot::channel::<()>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(run_with_hooks(
            listener,
            config,
            async {
                let _ = stop_rx.await;
            },
            StartupHooks {
                before_open: Some(gate_rx),
                ..Default::default()
            },
        ));
        (addr, gate_tx, stop_tx, task)
    }

    /// An admin client.
    pub async fn admin(&self) -> Client {
        client(self.addr, Some(&self.admin_token)).await
    }

    /// Stops the broker gracefully and waits until it has released the data directory.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// The real `credbroker` binary as a child process, logging JSON to a file.
pub struct BrokerProcess {
    /// The child.
    pub child: Child,
    /// gRPC address.
    pub addr: SocketAddr,
    /// Where its stderr goes.
    pub log_path: PathBuf,
}

/// Spawns the binary on `data_dir`; returns once it logged its address, or its exit status
/// (with the log) when it exits first.
pub fn spawn_process(
    data_dir: &Path,
    log_path: &Path,
    envs: &[(&str, &str)],
) -> Result<BrokerProcess, (std::process::ExitStatus, String)> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_credbroker"));
    cmd.arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--http-listen")
        .arg("127.0.0.1:0")
        .env("CREDBROKER_LOG_FORMAT", "json")
        .env("CREDBROKER_EGRESS_ALLOW_HTTP", "1")
        .env("CREDBROKER_EGRESS_ALLOW", "127.0.0.1/32")
        .env_remove("CREDBROKER_MASTER_KEY_FILE")
        .env_remove("CREDBROKER_TEST_STORE_LATENCY_MS")
        .env_remove("CREDBROKER_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
    let log = log_path.to_path_buf();
    std::thread::spawn(move || {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            writeln!(file, "{line}").unwrap();
            file.flush().unwrap();
            if !sent {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"] == "gRPC listening." {
                        if let Some(a) = v["addr"].as_str().and_then(|a| a.parse().ok()) {
                            let _ = tx.send(a);
                            sent = true;
                        }
                    }
                }
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => Ok(BrokerProcess {
            child,
            addr,
            log_path: log_path.to_path_buf(),
        }),
        Err(_) => {
            let status = child.wait().unwrap();
            // The reader thread drains stderr to the file before the pipe closes.
            let log = wait_log(log_path);
            Err((status, log))
        }
    }
}

fn wait_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl BrokerProcess {
    /// Sends a signal (`TERM`, `KILL`, …).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// SIGTERM and wait for exit; returns the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        self.signal("TERM");
        let status = self.child.wait().unwrap();
        status.code()
    }

    /// The captured log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The HTTP listener's address, from the log (a reader thread copies the log into the
    /// file, so the line may land a moment after the broker logged it).
    pub fn http_addr(&self) -> SocketAddr {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let found = self
                .log()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["message"] == "HTTP listening.")
                .and_then(|v| v["addr"].as_str().and_then(|a| a.parse().ok()));
            if let Some(a) = found {
                return a;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no HTTP listener address in the log"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM and wait for the exit code, off the async runtime (so the test's own client
    /// connections can close while the broker drains).
    pub async fn stop(self) -> Option<i32> {
        tokio::task::spawn_blocking(move || self.terminate())
            .await
            .unwrap()
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub use crate::fakes::*;

// ------------------------------------------------------------------------------------------
// Request builders
// ------------------------------------------------------------------------------------------

/// The `authorization` header value `GetAccessToken` hands out for `id` (empty when none).
pub async fn auth_header(c: &mut Client, id: &str) -> Result<String, tonic::Status> {
    let r = c
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: id.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.headers
        .into_iter()
        .find(|h| h.name.eq_ignore_ascii_case("authorization"))
        .map(|h| h.value)
        .unwrap_or_default())
}

/// A PAT credential.
pub fn pat(token: &str) -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::PersonalAccessToken(
            pb::PersonalAccessToken {
                token: token.to_owned(),
                ..Default::default()
            },
        )),
    }
}

/// A RegisterSystem request for Asana.
pub fn register_asana(
    id: &str,
    base_url: &str,
    token: &str,
    check: bool,
) -> pb::RegisterSystemRequest {
    pb::RegisterSystemRequest {
        system_id: id.to_owned(),
        display_name: format!("Asana {id}"),
        description: String::new(),
        kind: pb::SystemKind::Asana as i32,
        base_url: base_url.to_owned(),
        credential: Some(pat(token)),
        check,
        // Header delivery, pinned: these tests assert the exact header workers get.
        delivery: pb::Delivery::Header as i32,
    }
}

/// A new worker caller's token.
pub async fn worker_token(admin: &mut Client, name: &str) -> String {
    admin
        .create_caller(pb::CreateCallerRequest {
            name: name.into(),
            role: pb::CallerRole::Worker as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// True when any file under `dir` contains `needle` (raw bytes).
pub fn dir_contains(dir: &Path, needle: &str) -> Option<PathBuf> {
    files_under(dir).into_iter().find(|p| {
        let bytes = std::fs::read(p).unwrap_or_default();
        bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
    })
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `within`.
pub async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GetAccessToken` for `id` with a client-side deadline (the call is dropped when it passes).
pub async fn token_with_deadline(
    c: &mut Client,
    id: &str,
    rejected: &str,
    deadline: Duration,
) -> Result<pb::GetAccessTokenResponse, tonic::Status> {
    let mut req = Request::new(pb::GetAccessTokenRequest {
        system_id: id.into(),
        rejected_token_id: rejected.into(),
        ..Default::default()
    });
    req.set_timeout(deadline);
    c.get_access_token(req).await.map(|r| r.into_inner())
}

/// An HTTP client that never follows redirects (a browser step by step, a worker that must see
/// the proxy's own answer).
pub fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Rotates the master key and returns the new key's id once its re-wrap is under way: at least
/// five records on it, and not all (a test then interrupts it).
pub async fn rotate_and_wait_for_rewrap_under_way(admin: &mut Client) -> String {
    let key = admin
        .rotate_master_key(pb::RotateMasterKeyRequest {})
        .await
        .unwrap()
        .into_inner()
        .key_id;
    loop {
        let s = admin
            .get_key_status(pb::GetKeyStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(
            s.records_on_primary < s.records_total,
            "the re-wrap finished before it could be interrupted"
        );
        if s.records_on_primary >= 5 {
            return key;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An API key credential.
pub fn api_key(key: &str) -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::ApiKey(pb::ApiKey {
            key: key.into(),
            expires_at: None,
        })),
    }
}

/// A basic-auth credential.
pub fn basic_cred(user: &str, pw: &str) -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::Basic(pb::BasicCredential {
            username: user.into(),
            password: pw.into(),
        })),
    }
}

/// `CheckAuthentication` of a credential not stored yet.
pub fn candidate(
    kind: pb::SystemKind,
    base: &str,
    cred: pb::Credential,
) -> pb::CheckAuthenticationRequest {
    pb::CheckAuthenticationRequest {
        target: Some(pb::check_authentication_request::Target::Candidate(
            pb::CandidateSystem {
                kind: kind as i32,
                base_url: base.into(),
                credential: Some(cred),
            },
        )),
    }
}

/// Held by the tests that count refused gRPC connections (a process-wide counter), so that one
/// test's refusals cannot satisfy another's check.
pub static GRPC_CAP_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// False once the peer has closed `s` (or reset it): a connection refused past a cap. Bytes the
/// peer sent are read and dropped.
pub fn still_open(s: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match s.try_read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}
