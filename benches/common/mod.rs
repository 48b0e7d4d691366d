//! Helpers shared by the bench binaries (each includes this with `mod common;`).

#![allow(dead_code)]

use tonic::{Request, Status};

use credbroker::pb::credential_broker_client::CredentialBrokerClient;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Auth(pub tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

/// A broker client on its own connection.
pub type Client = CredentialBrokerClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Auth>,
>;

/// Connects one client (`TCP_NODELAY`) authenticated with `token`.
pub async fn connect(addr: &str, token: &str) -> Client {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();
    CredentialBrokerClient::with_interceptor(
        channel,
        Auth(format!("Bearer {token}").parse().unwrap()),
    )
}

/// The value after `name` on the command line, or `default`.
/// The broker binary to measure: this build's, or `BENCH_BROKER_BIN` (another build, for a
/// before/after comparison on the same VM in the same hour).
pub fn broker_bin() -> std::ffi::OsString {
    std::env::var_os("BENCH_BROKER_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_credbroker").into())
}

pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_owned())
}

/// The median of `v`.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Bytes under `p`, recursively.
pub fn dir_bytes(p: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let m = e.metadata().unwrap();
            total += if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            };
        }
    }
    total
}

/// Lets closed-loop `tasks` run for `seconds`, stops them through `stop`, and returns their
/// latencies (µs, sorted) and the seconds elapsed since `started`.
pub async fn finish(
    seconds: f64,
    stop: &std::sync::atomic::AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<Vec<u32>>>,
    started: std::time::Instant,
) -> (Vec<u32>, f64) {
    tokio::time::sleep(std::time::Duration::from_secs_f64(seconds)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    (all, elapsed)
}

/// The `p` quantile of sorted latencies, µs.
pub fn quantile(sorted: &[u32], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0) as f64
}

/// utime + stime of `pid`, µs.
#[allow(dead_code)]
pub fn cpu_us(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks * 1e6 / 100.0
}

/// Writes a result file `name` into `BENCH_RESULTS_DIR` (default `bench-results`), making the
/// directory; CI's short runs of every bench write elsewhere, so the committed figures stay.
pub fn save(name: impl AsRef<str>, contents: impl AsRef<[u8]>) -> std::io::Result<()> {
    let dir = std::env::var_os("BENCH_RESULTS_DIR").unwrap_or_else(|| "bench-results".into());
    let dir = std::path::Path::new(&dir);
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name.as_ref()), contents)
}
