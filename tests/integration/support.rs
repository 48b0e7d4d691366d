//! Test harness: a real broker (in-process via `server::run`, or the real binary as a child
//! process) on 127.0.0.1:0 with a temp-dir sled store, real gRPC clients, and fake upstreams on
//! loopback that answer as the vendors do and record every request they did not expect.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use credbroker::config::Config;
use credbroker::pb;
use credbroker::pb::credential_broker_client::CredentialBrokerClient;
use credbroker::server::{run_with_hooks, StartupHooks, ADMIN_TOKEN_FILE};
use serde_json::json;
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

/// The interceptor that adds the bearer token.
pub type AuthFn = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;

/// A gRPC client that sends a fixed bearer token (or none).
pub type Client = CredentialBrokerClient<InterceptedService<Channel, AuthFn>>;

/// A client that sends `authorization: Bearer <token>` (no header when `None`).
pub async fn client(addr: SocketAddr, token: Option<&str>) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let header: Option<MetadataValue<_>> = token.map(|t| format!("Bearer {t}").parse().unwrap());
    let f: AuthFn = Box::new(move |mut req: Request<()>| {
        if let Some(h) = &header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    });
    CredentialBrokerClient::with_interceptor(channel, f)
}

/// Waits (event-driven, through the health Watch stream) until the broker reports `status`.
pub async fn wait_for_health(addr: SocketAddr, status: ServingStatus) {
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
                service: String::new(),
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
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_path_buf(),
        egress_allow_http: true,
        upstream_timeout: Duration::from_secs(2),
        shutdown_grace: Duration::from_secs(5),
        ..Config::default()
    }
}

/// A broker running in this process.
pub struct TestBroker {
    /// gRPC address.
    pub addr: SocketAddr,
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
        Self::start_gated(config, StartupHooks::default()).await
    }

    /// Starts a broker on `data_dir` with the test defaults.
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with(test_config(data_dir)).await
    }

    async fn start_gated(config: Config, hooks: StartupHooks) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let data_dir = config.data_dir.clone();
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
        .env("CREDBROKER_LOG_FORMAT", "json")
        .env("CREDBROKER_EGRESS_ALLOW_HTTP", "1")
        .env_remove("CREDBROKER_MASTER_KEY_FILE")
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
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------------------------------
// Fake Asana
// ------------------------------------------------------------------------------------------

/// How the fake answers `/users/me`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsanaMode {
    /// As Asana does: 200 for a known PAT, 401 otherwise.
    Normal,
    /// 429 with `Retry-After: 30`.
    RateLimited,
    /// 503.
    ServerError,
    /// 200 with an HTML body.
    Garbage,
    /// Never answers.
    Hang,
    /// 402 premium only.
    PaymentRequired,
}

#[derive(Debug)]
struct AsanaState {
    users: HashMap<String, serde_json::Value>,
    mode: AsanaMode,
    requests: Vec<String>,
    unexpected: Vec<String>,
}

/// A fake Asana API on loopback (`{base}/users/me`).
#[derive(Clone)]
pub struct FakeAsana {
    /// Base URL (`http://127.0.0.1:PORT/api/1.0`).
    pub base_url: String,
    state: Arc<Mutex<AsanaState>>,
}

impl FakeAsana {
    /// Starts the fake.
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(AsanaState {
            users: HashMap::new(),
            mode: AsanaMode::Normal,
            requests: Vec::new(),
            unexpected: Vec::new(),
        }));
        let app = Router::new()
            .route("/api/1.0/users/me", get(asana_me))
            .fallback(asana_unexpected)
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            base_url: format!("http://{addr}/api/1.0"),
            state,
        }
    }

    /// Makes `pat` a valid token of user `gid`.
    pub fn add_user(&self, pat: &str, gid: &str, name: &str, email: &str) {
        self.state.lock().unwrap().users.insert(
            pat.to_owned(),
            json!({"gid": gid, "name": name, "email": email, "resource_type": "user", "workspaces": []}),
        );
    }

    /// Invalidates `pat` (as when a user revokes it).
    pub fn revoke(&self, pat: &str) {
        self.state.lock().unwrap().users.remove(pat);
    }

    /// Switches the answer mode.
    pub fn set_mode(&self, mode: AsanaMode) {
        self.state.lock().unwrap().mode = mode;
    }

    /// How many `/users/me` requests arrived.
    pub fn me_calls(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }

    /// Requests the fake did not expect (wrong path or header format). Tests assert it is empty.
    pub fn unexpected(&self) -> Vec<String> {
        self.state.lock().unwrap().unexpected.clone()
    }
}

async fn asana_me(State(state): State<Arc<Mutex<AsanaState>>>, headers: HeaderMap) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mode = {
        let mut s = state.lock().unwrap();
        s.requests.push(auth.clone());
        if !auth.is_empty() && !auth.starts_with("Bearer ") {
            s.unexpected
                .push(format!("authorization header is not Bearer: {auth:.10}…"));
        }
        if headers.get("accept").and_then(|v| v.to_str().ok()) != Some("application/json") {
            s.unexpected
                .push("missing Accept: application/json".to_owned());
        }
        s.mode
    };
    match mode {
        AsanaMode::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        AsanaMode::RateLimited => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "30")],
            axum::Json(json!({"errors":[{"message":"You have made too many requests recently."}]})),
        )
            .into_response(),
        AsanaMode::ServerError => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"errors":[{"message":"Server Error","phrase":"6 sad squid snuggle softly"}]})),
        )
            .into_response(),
        AsanaMode::Garbage => (StatusCode::OK, [("content-type", "text/html")], "<html>login</html>").into_response(),
        AsanaMode::PaymentRequired => (
            StatusCode::PAYMENT_REQUIRED,
            axum::Json(json!({"errors":[{"message":"This feature is only available to premium users."}]})),
        )
            .into_response(),
        AsanaMode::Normal => {
            let user = auth
                .strip_prefix("Bearer ")
                .and_then(|t| state.lock().unwrap().users.get(t).cloned());
            match user {
                Some(u) => axum::Json(json!({"data": u})).into_response(),
                None => (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(json!({"errors":[{"message":"Not Authorized"}]})),
                )
                    .into_response(),
            }
        }
    }
}

async fn asana_unexpected(State(state): State<Arc<Mutex<AsanaState>>>, uri: Uri) -> Response {
    state
        .lock()
        .unwrap()
        .unexpected
        .push(format!("unexpected request to {}", uri.path()));
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"errors":[{"message":"Not Found"}]})),
    )
        .into_response()
}

// ------------------------------------------------------------------------------------------
// Request builders
// ------------------------------------------------------------------------------------------

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
    }
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
