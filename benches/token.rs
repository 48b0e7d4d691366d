//! `GetAccessToken` against the gRPC floor (docs/benchmarks.md): the real broker binary and a
//! minimal echo gRPC server (the same `CredentialBroker` service, answering `GetAccessToken` with a
//! prebuilt response of the same size) each run as a child pinned to core 1, on the same runtime
//! flavour and server settings, and are driven alternately by the same tonic client on core 0
//! (closed loop). `cargo bench --bench token` runs the default suite (1, 4 and 16 connections ×
//! concurrency 64 and 256) and writes `bench-results/token-suite-<runtime>.{md,json}`; one setting
//! with `-- --connections N --concurrency C` (`--seconds S --rounds R --runtime
//! auto|multi|current` either way); writes `bench-results/token-*.json` and prints a markdown
//! table. `--scenario register` measures durable registrations with
//! `--concurrency` admin clients; `--scenario scale --systems N` measures N systems vs 10;
//! `--scenario oauth` drives OAuth systems whose 4 s tokens refresh in the background (vs echo);
//! `--scenario storm --systems 10000` is the refresh storm (all tokens expiring in one minute);
//! `--scenario checks --systems 10000` measures GetAccessToken while scheduled checks run;
//! `--scenario h2load` drives the broker and two echoes (multi-thread with one worker,
//! current_thread) with h2load instead of the tonic client (`apt-get install nghttp2-client`).
//! Medians over alternating rounds (noise here is ±10–15 %).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::*;
use credbroker::pb;
use credbroker::pb::credential_broker_server::{CredentialBroker, CredentialBrokerServer};
use tonic::{Request, Response, Status};

struct Echo(pb::GetAccessTokenResponse);

#[tonic::async_trait]
impl CredentialBroker for Echo {
    async fn get_access_token(
        &self,
        _: Request<pb::GetAccessTokenRequest>,
    ) -> Result<Response<pb::GetAccessTokenResponse>, Status> {
        Ok(Response::new(self.0.clone()))
    }
    async fn register_system(
        &self,
        _: Request<pb::RegisterSystemRequest>,
    ) -> Result<Response<pb::RegisterSystemResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn check_authentication(
        &self,
        _: Request<pb::CheckAuthenticationRequest>,
    ) -> Result<Response<pb::CheckAuthenticationResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn rotate_credential(
        &self,
        _: Request<pb::RotateCredentialRequest>,
    ) -> Result<Response<pb::RotateCredentialResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn get_system(
        &self,
        _: Request<pb::GetSystemRequest>,
    ) -> Result<Response<pb::GetSystemResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn list_systems(
        &self,
        _: Request<pb::ListSystemsRequest>,
    ) -> Result<Response<pb::ListSystemsResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn delete_system(
        &self,
        _: Request<pb::DeleteSystemRequest>,
    ) -> Result<Response<pb::DeleteSystemResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn create_caller(
        &self,
        _: Request<pb::CreateCallerRequest>,
    ) -> Result<Response<pb::CreateCallerResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn list_callers(
        &self,
        _: Request<pb::ListCallersRequest>,
    ) -> Result<Response<pb::ListCallersResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn revoke_caller(
        &self,
        _: Request<pb::RevokeCallerRequest>,
    ) -> Result<Response<pb::RevokeCallerResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn start_authorization(
        &self,
        _: Request<pb::StartAuthorizationRequest>,
    ) -> Result<Response<pb::StartAuthorizationResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn rotate_master_key(
        &self,
        _: Request<pb::RotateMasterKeyRequest>,
    ) -> Result<Response<pb::RotateMasterKeyResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn get_key_status(
        &self,
        _: Request<pb::GetKeyStatusRequest>,
    ) -> Result<Response<pb::GetKeyStatusResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn retire_key(
        &self,
        _: Request<pb::RetireKeyRequest>,
    ) -> Result<Response<pb::RetireKeyResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn set_delivery(
        &self,
        _: Request<pb::SetDeliveryRequest>,
    ) -> Result<Response<pb::SetDeliveryResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
    type WatchSystemsStream = tokio_stream::Empty<Result<pb::SystemEvent, Status>>;
    async fn watch_systems(
        &self,
        _: Request<pb::WatchSystemsRequest>,
    ) -> Result<Response<Self::WatchSystemsStream>, Status> {
        Err(Status::unimplemented("echo"))
    }
    type ExportBackupStream = tokio_stream::Empty<Result<pb::BackupChunk, Status>>;
    async fn export_backup(
        &self,
        _: Request<pb::ExportBackupRequest>,
    ) -> Result<Response<Self::ExportBackupStream>, Status> {
        Err(Status::unimplemented("echo"))
    }
    async fn restore_backup(
        &self,
        _: Request<tonic::Streaming<pb::BackupChunk>>,
    ) -> Result<Response<pb::RestoreBackupResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
}

fn runtime(kind: &str, cpus: usize) -> tokio::runtime::Runtime {
    if kind == "multi-nolifo" {
        // The broker's own multi-thread runtime (no LIFO slot).
        return credbroker::server::cores::main_runtime(false).unwrap();
    }
    // The same choice the broker makes for `--runtime`; "multi" is tokio's default scheduler.
    let current = match kind {
        "current" => true,
        "multi" => false,
        _ => cpus == 1,
    };
    if current {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build()
    .unwrap()
}

/// Child mode: serve the echo with the broker's server settings; print the address.
fn serve_echo(kind: &str, response_hex: &str) {
    let bytes: Vec<u8> = (0..response_hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&response_hex[i..i + 2], 16).unwrap())
        .collect();
    let resp = <pb::GetAccessTokenResponse as prost::Message>::decode(bytes.as_slice()).unwrap();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    runtime(kind, cpus).block_on(async move {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", l.local_addr().unwrap());
        // Nagle off on each connection, as the broker's listener (and tonic's own `serve`) has it.
        let incoming =
            tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(l), |r| {
                r.inspect(|s| {
                    let _ = s.set_nodelay(true);
                })
            });
        tonic::transport::Server::builder()
            .timeout(Duration::from_secs(30))
            .concurrency_limit_per_connection(1024)
            .max_concurrent_streams(1024)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .http2_max_header_list_size(16 * 1024)
            .add_service(CredentialBrokerServer::new(Echo(resp)))
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
}

#[derive(Clone, Copy, Default)]
struct Figures {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    cpu_us_per_req: f64,
    max_us: f64,
    over_50ms: u64,
}

async fn drive(
    addr: &str,
    token: &str,
    pid: u32,
    connections: usize,
    concurrency: usize,
    seconds: f64,
) -> Figures {
    drive_ids(
        addr,
        token,
        pid,
        connections,
        concurrency,
        seconds,
        Arc::new(vec!["bench".to_owned()]),
    )
    .await
}

/// [`drive`] over `ids` (each task walks them from its own offset).
async fn drive_ids(
    addr: &str,
    token: &str,
    pid: u32,
    connections: usize,
    concurrency: usize,
    seconds: f64,
    ids: Arc<Vec<String>>,
) -> Figures {
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(connect(addr, token).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = cpu_us(pid);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let mut c = clients[i % connections].clone();
        let stop = stop.clone();
        let ids = ids.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(200_000);
            let reqs: Vec<pb::GetAccessTokenRequest> = ids
                .iter()
                .map(|id| pb::GetAccessTokenRequest {
                    system_id: id.clone(),
                    ..Default::default()
                })
                .collect();
            let mut k = i * 7919;
            while !stop.load(Ordering::Relaxed) {
                k = k.wrapping_add(1);
                let req = &reqs[k % reqs.len()];
                let t = Instant::now();
                let r = c.get_access_token(req.clone()).await.unwrap().into_inner();
                assert!(!r.headers.is_empty());
                lat.push(t.elapsed().as_micros() as u32);
            }
            lat
        }));
    }
    let (all, elapsed) = finish(seconds, &stop, tasks, started).await;
    let cpu = cpu_us(pid) - cpu0;
    let pct = |p: f64| quantile(&all, p);
    Figures {
        rps: all.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        cpu_us_per_req: cpu / all.len() as f64,
        max_us: all.last().copied().unwrap_or(0) as f64,
        over_50ms: all.iter().filter(|l| **l > 50_000).count() as u64,
    }
}

/// A ServiceNow-style OAuth token endpoint on loopback (`POST /oauth_token.do`): answers every
/// refresh grant after `delay` with an access token living `lifetime` seconds, and counts calls
/// and the most calls in flight at once.
#[derive(Default)]
struct FakeTokens {
    calls: AtomicU64,
    inflight: AtomicU64,
    max_inflight: AtomicU64,
}

impl FakeTokens {
    /// One request: counted in flight (and the most at once), answered after `delay`; returns
    /// how many were answered before it.
    async fn answer_after(&self, delay: Duration) -> u64 {
        let now = self.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_inflight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(delay).await;
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        self.inflight.fetch_sub(1, Ordering::SeqCst);
        n
    }
}

async fn fake_token_endpoint(lifetime: u64, delay: Duration) -> (String, Arc<FakeTokens>) {
    let stats = Arc::new(FakeTokens::default());
    let st = stats.clone();
    let app = axum::Router::new().route(
        "/oauth_token.do",
        axum::routing::post(move || {
            let st = st.clone();
            async move {
                let n = st.answer_after(delay).await;
                axum::Json(serde_json::json!({
                    "access_token": format!("at-{n:08}-0123456789abcdef0123456789abcdef"),
                    "refresh_token": "rt-bench",
                    "token_type": "Bearer",
                    "scope": "useraccount",
                    "expires_in": lifetime,
                }))
            }
        }),
    );
    (serve_on_own_thread(app), stats)
}

/// Serves `app` on its own thread and runtime (so the client's measurements do not share a
/// thread with it); returns `http://127.0.0.1:PORT`.
fn serve_on_own_thread(app: axum::Router) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                axum::serve(l, app).await.unwrap()
            })
    });
    base
}

fn sn_register(i: usize, base: &str) -> pb::RegisterSystemRequest {
    pb::RegisterSystemRequest {
        system_id: format!("sn-{i:05}"),
        kind: pb::SystemKind::Servicenow as i32,
        base_url: base.to_owned(),
        credential: Some(pb::Credential {
            credential: Some(pb::credential::Credential::OauthRefreshToken(
                pb::OAuthRefreshToken {
                    client_id: "bench-client".into(),
                    client_secret: "bench-client-secret".into(),
                    refresh_token: "rt-bench".into(),
                    username: "bench.user".into(),
                },
            )),
        }),
        delivery: pb::Delivery::Header as i32,
        check: false,
        ..Default::default()
    }
}

/// Registers `n` ServiceNow OAuth systems on `base` with 16 admin clients; returns their ids.
async fn register_oauth(admin: &Client, n: usize, base: &str) -> Vec<String> {
    let mut tasks = Vec::new();
    for t in 0..16 {
        let mut c = admin.clone();
        let base = base.to_owned();
        tasks.push(tokio::spawn(async move {
            for i in (t..n).step_by(16) {
                c.register_system(sn_register(i, &base)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (0..n).map(|i| format!("sn-{i:05}")).collect()
}

/// GetAccessToken once for each id (16 at a time): (token_id, expires_at seconds) per id.
async fn warm(c: &Client, ids: &[String]) -> Vec<(String, i64)> {
    let mut tasks = Vec::new();
    for t in 0..16 {
        let mut c = c.clone();
        let mine: Vec<(usize, String)> = ids
            .iter()
            .cloned()
            .enumerate()
            .skip(t)
            .step_by(16)
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for (i, id) in mine {
                let r = c
                    .get_access_token(pb::GetAccessTokenRequest {
                        system_id: id,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                out.push((i, (r.token_id, r.expires_at.unwrap().seconds)));
            }
            out
        }));
    }
    let mut all = vec![(String::new(), 0); ids.len()];
    for t in tasks {
        for (i, v) in t.await.unwrap() {
            all[i] = v;
        }
    }
    all
}

/// Scenario 2: warm `GetAccessToken` on OAuth systems whose 4 s tokens are refreshed in the
/// background all the time, against the echo floor in the same run.
#[allow(clippy::too_many_arguments)]
async fn oauth_scenario(
    addr: &str,
    admin: &Client,
    worker_token: &str,
    bpid: u32,
    rt_kind: &str,
    connections: usize,
    concurrency: usize,
    seconds: f64,
    rounds: usize,
) {
    let delay_ms: u64 = arg("--upstream-delay-ms", "20").parse().unwrap();
    let (base, fake) = fake_token_endpoint(4, Duration::from_millis(delay_ms)).await;
    let ids = register_oauth(admin, 64, &base).await;
    warm(admin, &ids).await;
    let mut c = admin.clone();
    let sample = c
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: ids[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (echo_addr, mut echo) = spawn_echo(rt_kind, &sample);
    let epid = echo.id();
    let ids = Arc::new(ids);
    drive(
        &echo_addr,
        worker_token,
        epid,
        connections,
        concurrency,
        1.0,
    )
    .await;
    drive_ids(
        addr,
        worker_token,
        bpid,
        connections,
        concurrency,
        1.0,
        ids.clone(),
    )
    .await;
    let (mut e, mut b) = (Vec::new(), Vec::new());
    let mut refreshes = 0;
    let mut broker_secs = 0.0;
    for _ in 0..rounds {
        e.push(
            drive(
                &echo_addr,
                worker_token,
                epid,
                connections,
                concurrency,
                seconds,
            )
            .await,
        );
        // Tokens left idle during the echo round lapse by design (only used tokens are renewed
        // ahead); re-warm them so the measured round is the steady state.
        // (longer than one token lifetime, so every token in use was minted under load).
        drive_ids(
            addr,
            worker_token,
            bpid,
            connections,
            concurrency,
            5.0,
            ids.clone(),
        )
        .await;
        let calls1 = fake.calls.load(Ordering::SeqCst);
        let t = Instant::now();
        b.push(
            drive_ids(
                addr,
                worker_token,
                bpid,
                connections,
                concurrency,
                seconds,
                ids.clone(),
            )
            .await,
        );
        broker_secs += t.elapsed().as_secs_f64();
        refreshes += fake.calls.load(Ordering::SeqCst) - calls1;
    }
    if let Ok(url) = std::env::var("BENCH_METRICS_URL") {
        if let Ok(r) = reqwest::get(url).await {
            let text = r.text().await.unwrap_or_default();
            for l in text.lines().filter(|l| {
                l.contains("cache_total")
                    || l.contains("GetAccessToken") && l.contains("le=\"0.0")
                    || l.contains("refresh_total{kind=\"servicenow\"")
            }) {
                println!("{l}");
            }
        }
    }
    let m = |v: &[Figures], f: fn(&Figures) -> f64| median(v.iter().map(f).collect());
    let rps_ratio = m(&b, |f| f.rps) / m(&e, |f| f.rps);
    let p99_ratio = m(&b, |f| f.p99_us) / m(&e, |f| f.p99_us);
    let slow: u64 = b.iter().map(|f| f.over_50ms).sum();
    let max_ms = b.iter().map(|f| f.max_us).fold(0.0, f64::max) / 1000.0;
    let json = serde_json::json!({
        "benchmark": "get_access_token_oauth_refreshing",
        "systems": ids.len(), "token_lifetime_s": 4, "upstream_delay_ms": delay_ms,
        "runtime": rt_kind, "connections": connections, "concurrency": concurrency,
        "rounds": rounds, "seconds_per_round": seconds,
        "echo_rps": m(&e, |f| f.rps), "broker_rps": m(&b, |f| f.rps),
        "echo_p99_us": m(&e, |f| f.p99_us), "broker_p99_us": m(&b, |f| f.p99_us),
        "broker_p999_us": m(&b, |f| f.p999_us), "broker_max_ms": max_ms,
        "throughput_ratio": rps_ratio, "p99_ratio": p99_ratio,
        "background_refreshes": refreshes,
        "refreshes_per_s": refreshes as f64 / broker_secs.max(1e-9),
        "worker_calls_over_50ms": slow,
    });
    save(
        format!("token-oauth-n{connections}-c{concurrency}.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("| OAuth, refreshing ({connections} conn, c={concurrency}) | requests/s | p50 | p99 | p99.9 | max | calls > 50 ms |");
    println!("|---|---|---|---|---|---|---|");
    for (name, v) in [("echo", &e), ("broker GetAccessToken", &b)] {
        println!(
            "| {name} | {:.0} | {:.0} µs | {:.0} µs | {:.0} µs | {:.1} ms | {} |",
            m(v, |f| f.rps),
            m(v, |f| f.p50_us),
            m(v, |f| f.p99_us),
            m(v, |f| f.p999_us),
            v.iter().map(|f| f.max_us).fold(0.0, f64::max) / 1000.0,
            v.iter().map(|f| f.over_50ms).sum::<u64>()
        );
    }
    println!();
    println!(
        "broker/echo throughput {rps_ratio:.2}, p99 {p99_ratio:.2}; {refreshes} background refreshes ({:.1}/s) during the broker rounds",
        refreshes as f64 / broker_secs.max(1e-9)
    );
    let _ = echo.kill();
    let _ = echo.wait();
}

/// Scenario 5: `n` OAuth systems whose tokens (40 s) all expire within the same minute, read
/// by workers at random throughout: upstream concurrency, slow worker calls, all refreshed in
/// time.
async fn storm_scenario(
    admin: &Client,
    worker_token: &str,
    addr: &str,
    bpid: u32,
    n: usize,
    max_concurrent: u64,
) {
    let lifetime = 40;
    let (base, fake) = fake_token_endpoint(lifetime, Duration::from_millis(20)).await;
    let t0 = Instant::now();
    let ids = register_oauth(admin, n, &base).await;
    let reg_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let first = warm(admin, &ids).await;
    let warm_s = t1.elapsed().as_secs_f64();
    let warm_calls = fake.calls.load(Ordering::SeqCst);
    fake.max_inflight.store(0, Ordering::SeqCst);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let last_expiry = first.iter().map(|f| f.1).max().unwrap();
    let first_expiry = first.iter().map(|f| f.1).min().unwrap();
    // Workers read at random until 5 s past the last original expiry.
    let secs = (last_expiry - now + 5).max(5) as f64;
    let ids = Arc::new(ids);
    let f = drive_ids(addr, worker_token, bpid, 4, 64, secs, ids.clone()).await;
    let refresh_calls = fake.calls.load(Ordering::SeqCst) - warm_calls;
    let after = warm(admin, &ids).await;
    let refreshed_in_time = first
        .iter()
        .zip(&after)
        .filter(|(a, b)| a.0 != b.0 && b.1 > a.1)
        .count();
    let max_inflight = fake.max_inflight.load(Ordering::SeqCst);
    let json = serde_json::json!({
        "benchmark": "refresh_storm",
        "systems": n, "token_lifetime_s": lifetime, "upstream_delay_ms": 20,
        "registration_s": reg_s, "warm_s": warm_s,
        "original_expiries_span_s": last_expiry - first_expiry,
        "worker_seconds": secs, "worker_rps": f.rps,
        "worker_p50_us": f.p50_us, "worker_p99_us": f.p99_us, "worker_p999_us": f.p999_us,
        "worker_max_ms": f.max_us / 1000.0, "worker_calls_over_50ms": f.over_50ms,
        "upstream_refresh_calls": refresh_calls, "upstream_max_concurrent": max_inflight,
        "upstream_cap": max_concurrent, "systems_refreshed_before_expiry": refreshed_in_time,
    });
    save(
        "token-storm.json",
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("| refresh storm | value |");
    println!("|---|---|");
    println!(
        "| OAuth systems | {n} (tokens of {lifetime} s, all expiring within {} s) |",
        last_expiry - first_expiry
    );
    println!("| worker GetAccessToken during the storm | {:.0}/s over {secs:.0} s, p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.1} ms |", f.rps, f.p50_us, f.p99_us, f.p999_us, f.max_us / 1000.0);
    println!("| worker calls > 50 ms | {} (target 0) |", f.over_50ms);
    println!("| upstream refresh calls | {refresh_calls} |");
    println!("| upstream concurrency, max | {max_inflight} (cap {max_concurrent}) |");
    println!("| systems refreshed before their token expired | {refreshed_in_time} / {n} |");
}

/// With `BENCH_STORE_URL`, a fresh database on that server for one broker's data dir (each
/// data dir has its own master key, so it needs a store of its own), as `CREDBROKER_STORE_URL`.
async fn fresh_store(tag: &str) -> Vec<(&'static str, String)> {
    let Ok(base) = std::env::var("BENCH_STORE_URL") else {
        return Vec::new();
    };
    let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .expect("BENCH_STORE_URL answers (plain TCP)");
    tokio::spawn(conn);
    let name = format!("credbroker_bench_{tag}_{}", std::process::id());
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .await
        .unwrap();
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let mut url = reqwest::Url::parse(&base).unwrap();
    url.set_path(&format!("/{name}"));
    vec![("CREDBROKER_STORE_URL", url.to_string())]
}

fn spawn_broker_env(
    data_dir: &std::path::Path,
    runtime: &str,
    envs: &[(&str, &str)],
) -> (String, std::process::Child) {
    spawn_broker_on("1", data_dir, runtime, envs)
}

/// [`spawn_broker_env`] on the CPUs `cpus` (a `taskset` list).
fn spawn_broker_on(
    cpus: &str,
    data_dir: &std::path::Path,
    runtime: &str,
    envs: &[(&str, &str)],
) -> (String, std::process::Child) {
    let mut child = std::process::Command::new("taskset")
        .args(["-c", cpus])
        .arg(broker_bin())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            &std::env::var("BENCH_HTTP_LISTEN").unwrap_or_else(|_| "off".to_owned()),
            "--runtime",
            runtime,
        ])
        .arg("--data-dir")
        .arg(data_dir)
        // BENCH_STORE_URL=postgres://… runs the broker on the PostgreSQL store (a replica),
        // unless the scenario chose a database of its own (CREDBROKER_STORE_URL in `envs`).
        .args(
            std::env::var("BENCH_STORE_URL")
                .ok()
                .filter(|_| !envs.iter().any(|(k, _)| *k == "CREDBROKER_STORE_URL"))
                .map(|u| vec!["--store-url".to_owned(), u])
                .unwrap_or_default(),
        )
        .env("CREDBROKER_EGRESS_ALLOW_HTTP", "1")
        .env("CREDBROKER_EGRESS_ALLOW", "127.0.0.1/32")
        .env("CREDBROKER_LOG_FORMAT", "json")
        .env(
            "RUST_LOG",
            std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
        )
        // Production settings: callers authenticated, audit trail on.
        // BENCH_AUDIT_FILE=off measures what the audit trail costs.
        .env(
            "CREDBROKER_AUDIT_FILE",
            std::env::var("BENCH_AUDIT_FILE")
                .unwrap_or_else(|_| data_dir.join("audit.log").display().to_string()),
        )
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("taskset and the credbroker binary are needed");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("broker exited").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "gRPC listening." {
            break v["addr"].as_str().unwrap().to_owned();
        }
    };
    // BENCH_BROKER_LOG=path keeps the broker's log (else it is drained and dropped).
    let keep = std::env::var_os("BENCH_BROKER_LOG");
    std::thread::spawn(move || {
        use std::io::Write;
        let mut out = keep.map(|p| std::fs::File::create(p).unwrap());
        for line in lines.map_while(Result::ok) {
            if let Some(f) = out.as_mut() {
                let _ = writeln!(f, "{line}");
            }
        }
    });
    (addr, child)
}

fn spawn_echo(
    runtime: &str,
    response: &pb::GetAccessTokenResponse,
) -> (String, std::process::Child) {
    let hex: String = prost::Message::encode_to_vec(response)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut child = std::process::Command::new("taskset")
        .args(["-c", "1"])
        .arg(std::env::current_exe().unwrap())
        .args(["--serve-echo", runtime, &hex])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (line.trim().to_owned(), child)
}

/// One h2load run against `addr`: requests/s and the p50/p99 latency (µs) from its per-request
/// log. h2load (Debian: `apt-get install nghttp2-client`) runs on core 0, the server on core 1.
fn h2load_once(
    addr: &str,
    token: &str,
    body: &std::path::Path,
    seconds: f64,
    min_body: usize,
) -> (f64, f64, f64) {
    let (rps, p50, p99, _) = h2load_on(("0", 4, 1), addr, token, body, seconds, min_body);
    (rps, p50, p99)
}

/// [`h2load_once`] with h2load on `cpus`, `connections` connections (64 streams each) and
/// `warm_up` seconds before it counts; also returns the requests it counted.
fn h2load_on(
    (cpus, connections, warm_up): (&str, u32, u32),
    addr: &str,
    token: &str,
    body: &std::path::Path,
    seconds: f64,
    min_body: usize,
) -> (f64, f64, f64, f64) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let out = std::process::Command::new("taskset")
        .args(["-c", cpus, "h2load", "-m", "64"])
        .arg(format!("-c{connections}"))
        .arg(format!("--warm-up-time={warm_up}"))
        .arg(format!("--duration={}", seconds.max(1.0) as u64))
        .arg(format!("--log-file={}", log.path().display()))
        .arg(format!("--data={}", body.display()))
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args(["-H", &format!("authorization: Bearer {token}")])
        .arg(format!(
            "http://{addr}/credbroker.v1.CredentialBroker/GetAccessToken"
        ))
        .output()
        .expect("h2load is needed: apt-get install nghttp2-client");
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.trim_end_matches(" req/s").parse::<f64>().ok())
        .unwrap_or_else(|| panic!("h2load said: {text}"));
    assert!(text.contains(" 0 failed"), "h2load: {text}");
    // gRPC errors are HTTP 200 too: every answer must carry a response message of full size.
    let number = |line: &str, before: &str| -> f64 {
        let head = line.split(before).next().unwrap_or_default();
        let open = head.rfind('(').unwrap_or(0);
        head[open + 1..]
            .trim_end_matches(')')
            .trim_end_matches(") ")
            .parse()
            .unwrap_or(0.0)
    };
    let data = text
        .lines()
        .find(|l| l.starts_with("traffic:"))
        .map_or(0.0, |l| number(l, " data"));
    let done = text
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .and_then(|l| l.split(" done").next())
        .and_then(|l| l.rsplit(", ").next())
        .and_then(|n| n.trim().parse::<f64>().ok())
        .unwrap_or(1.0);
    assert!(
        data / done >= min_body as f64,
        "answers of {} bytes: errors? {text}",
        data / done
    );
    let mut lat: Vec<f64> = std::fs::read_to_string(log.path())
        .unwrap()
        .lines()
        .filter_map(|l| l.split('\t').nth(2).and_then(|v| v.parse().ok()))
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    (rps, pct(0.50), pct(0.99), done)
}

/// h2load's request (one framed `GetAccessToken` for `bench`) in a file, and the least size of
/// a whole answer (the 5-byte gRPC frame header and about the message; a lease's length varies
/// a little): an error has no message at all.
fn h2load_request(sample: &pb::GetAccessTokenResponse) -> (tempfile::NamedTempFile, usize) {
    let msg = prost::Message::encode_to_vec(&pb::GetAccessTokenRequest {
        system_id: "bench".into(),
        ..Default::default()
    });
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let body = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(body.path(), &frame).unwrap();
    (body, (5 + prost::Message::encoded_len(sample)) * 4 / 5)
}

/// CPU time of this process's finished children (h2load), µs.
fn children_cpu_us() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    (f[13].parse::<f64>().unwrap() + f[14].parse::<f64>().unwrap()) * 1e6 / 100.0
}

/// CPU time of `pid`'s threads whose name is `name` (the kernel keeps 15 bytes of it), µs.
fn threads_cpu_us(pid: u32, name: &str) -> f64 {
    let name = &name[..name.len().min(15)];
    let mut total = 0.0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else {
            continue;
        };
        let comm = &stat[stat.find('(').unwrap() + 1..stat.rfind(')').unwrap()];
        if comm == name {
            let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
            total += (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) * 1e6 / 100.0;
        }
    }
    total
}

/// One server layout of `--scenario cores`.
struct Layout {
    name: &'static str,
    broker_cpus: &'static str,
    runtime: &'static str,
    load_cpus: &'static str,
}

/// What one `--scenario cores` run of a layout measured.
#[derive(Clone, Copy, Default)]
struct CoresRun {
    rps: f64,
    p99_us: f64,
    /// Broker CPU per request, µs.
    broker_us: f64,
    /// h2load CPU per request, µs.
    load_us: f64,
    /// The extra serving thread's share of the serving threads' CPU.
    extra_share: f64,
}

/// `--scenario cores`: the warm `GetAccessToken` on one server core (`current_thread` on core
/// 1, h2load on core 0) against two (`--runtime per-core`, and `--runtime multi`, on both
/// cores, which h2load shares), 16 connections × 64 streams, without a warm-up so that the CPU
/// of the broker and of h2load covers exactly the requests counted. Alternating, median of
/// `rounds`. The broker is restarted on the same data directory for every run.
async fn cores_scenario(
    data_dir: &std::path::Path,
    token: &str,
    sample: &pb::GetAccessTokenResponse,
    seconds: f64,
    rounds: usize,
) {
    let (body, answer) = h2load_request(sample);
    let layouts = [
        Layout {
            name: "current_thread, 1 server core (h2load on the other)",
            broker_cpus: "1",
            runtime: "current",
            load_cpus: "0",
        },
        Layout {
            name: "per-core, 2 cores shared with h2load",
            broker_cpus: "0,1",
            runtime: "per-core",
            load_cpus: "0,1",
        },
        Layout {
            name: "multi-thread, 2 cores shared with h2load",
            broker_cpus: "0,1",
            runtime: "multi",
            load_cpus: "0,1",
        },
    ];
    let mut runs: Vec<Vec<CoresRun>> = vec![Vec::new(); layouts.len()];
    for _ in 0..rounds.max(1) {
        for (i, l) in layouts.iter().enumerate() {
            let (addr, mut child) = spawn_broker_on(l.broker_cpus, data_dir, l.runtime, &[]);
            wait_serving(&addr).await;
            let pid = child.id();
            let (b0, h0) = (cpu_us(pid), children_cpu_us());
            let (rps, _, p99, done) = h2load_on(
                (l.load_cpus, 16, 0),
                &addr,
                token,
                body.path(),
                seconds,
                answer,
            );
            let (b1, h1) = (cpu_us(pid), children_cpu_us());
            let (main, extra) = (
                threads_cpu_us(pid, "credbroker"),
                threads_cpu_us(pid, "credbroker-core-1"),
            );
            let _ = child.kill();
            let _ = child.wait();
            runs[i].push(CoresRun {
                rps,
                p99_us: p99,
                broker_us: (b1 - b0) / done,
                load_us: (h1 - h0) / done,
                extra_share: extra / (main + extra).max(1.0),
            });
        }
    }
    let one = median(runs[0].iter().map(|r| r.broker_us).collect());
    println!("| layout | requests/s | p99 | broker CPU/req | h2load CPU/req | server capacity (cores ÷ broker CPU/req) | ÷ one core | extra thread's share |");
    println!("|---|---|---|---|---|---|---|---|");
    for (i, l) in layouts.iter().enumerate() {
        let m = |f: fn(&CoresRun) -> f64| median(runs[i].iter().map(f).collect());
        let cores = l.broker_cpus.split(',').count() as f64;
        let capacity = cores * 1e6 / m(|r| r.broker_us);
        println!(
            "| {} | {:.0} | {:.0} µs | {:.2} µs | {:.2} µs | {:.0} req/s | {:.2} | {} |",
            l.name,
            m(|r| r.rps),
            m(|r| r.p99_us),
            m(|r| r.broker_us),
            m(|r| r.load_us),
            capacity,
            capacity / (1e6 / one),
            if l.runtime == "per-core" {
                format!("{:.0} %", 100.0 * m(|r| r.extra_share))
            } else {
                "–".to_owned()
            },
        );
    }
}

/// `--scenario h2load`: the broker's warm `GetAccessToken` against the echo floor (tokio's
/// default multi-thread runtime with one worker, current_thread, and the multi-thread runtime
/// as the broker builds it, without the LIFO slot), each on core 1, driven by h2load on core 0 (4
/// connections × 64 streams), alternating, median of `rounds`.
async fn h2load_scenario(
    broker_addr: &str,
    token: &str,
    sample: &pb::GetAccessTokenResponse,
    seconds: f64,
    rounds: usize,
) {
    let (body, answer) = h2load_request(sample);
    let (mt_addr, mut mt) = spawn_echo("multi", sample);
    let (ct_addr, mut ct) = spawn_echo("current", sample);
    let (nl_addr, mut nl) = spawn_echo("multi-nolifo", sample);
    let targets = [
        ("broker", broker_addr),
        ("echo, multi-thread, one worker", mt_addr.as_str()),
        ("echo, current_thread", ct_addr.as_str()),
        ("echo, multi-thread without the LIFO slot", nl_addr.as_str()),
    ];
    let mut runs: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); targets.len()];
    for _ in 0..rounds.max(1) {
        for (i, (_, addr)) in targets.iter().enumerate() {
            runs[i].push(h2load_once(addr, token, body.path(), seconds, answer));
        }
    }
    let _ = (mt.kill(), ct.kill(), nl.kill());
    let _ = (mt.wait(), ct.wait(), nl.wait());
    let median = |v: &[(f64, f64, f64)]| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
        s[s.len() / 2]
    };
    let broker = median(&runs[0]);
    println!("| | requests/s | p50 | p99 | broker ÷ this (req/s) | broker p99 ÷ this |");
    println!("|---|---|---|---|---|---|");
    for (i, (name, _)) in targets.iter().enumerate() {
        let m = median(&runs[i]);
        println!(
            "| {name} | {:.0} | {:.0} µs | {:.0} µs | {:.2} | {:.2} |",
            m.0,
            m.1,
            m.2,
            broker.0 / m.0,
            broker.2 / m.2.max(1.0)
        );
    }
}

/// A who-am-I endpoint (Asana's `users/me`) answering after `delay`, counting calls and the
/// most in flight at once; on its own thread and runtime.
async fn fake_asana(delay: Duration) -> (String, Arc<FakeTokens>) {
    let stats = Arc::new(FakeTokens::default());
    let st = stats.clone();
    let app = axum::Router::new().route(
        "/api/1.0/users/me",
        axum::routing::get(move || {
            let st = st.clone();
            async move {
                st.answer_after(delay).await;
                axum::Json(serde_json::json!({"data": {"gid": "1201", "name": "Bench", "email": "bench@example.com"}}))
            }
        }),
    );
    (format!("{}/api/1.0", serve_on_own_thread(app)), stats)
}

/// `n` Asana systems on a fake vendor (20 ms per answer): warm `GetAccessToken` latency with
/// scheduled checks off, then on the same store with every system due (interval 10 s: the
/// sweep, every minute as at start, finds all 10,000 due; 4 per vendor at a time), measured
/// while they run.
async fn checks_scenario(rt_kind: &str, n: usize, seconds: f64) {
    let (base, fake) = fake_asana(Duration::from_millis(20)).await;
    let dir = tempfile::tempdir().unwrap();
    let conf = |interval: u64| {
        let path = dir.path().join(format!("checks-{interval}.toml"));
        std::fs::write(
            &path,
            format!("check_interval_secs = {interval}\nchecks_per_vendor = 4\nkeepalive_interval_secs = 60\n"),
        )
        .unwrap();
        path.display().to_string()
    };
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let off = conf(0);
    let (addr, mut child) = spawn_broker_env(&data, rt_kind, &[("CREDBROKER_CONFIG", &off)]);
    wait_serving(&addr).await;
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let mut admin = connect(&addr, token.trim()).await;
    let t0 = Instant::now();
    register_asana_systems(&addr, token.trim(), n, &base).await;
    let reg_s = t0.elapsed().as_secs_f64();
    let worker = admin
        .create_caller(pb::CreateCallerRequest {
            name: "checks-worker".into(),
            role: pb::CallerRole::Worker as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let (p50_off, p99_off, rps_off) = random_tokens(&addr, &worker, n, seconds).await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let on = conf(10);
    let (addr, mut child) = spawn_broker_env(&data, rt_kind, &[("CREDBROKER_CONFIG", &on)]);
    wait_serving(&addr).await;
    // The first sweep starts the checks; measure once they are under way.
    while fake.calls.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = fake.calls.load(Ordering::SeqCst);
    let (p50_on, p99_on, rps_on) = random_tokens(&addr, &worker, n, seconds).await;
    let during = fake.calls.load(Ordering::SeqCst) - before;
    let max_inflight = fake.max_inflight.load(Ordering::SeqCst);
    let _ = child.kill();
    let _ = child.wait();
    let json = serde_json::json!({
        "benchmark": "scheduled_checks", "systems": n, "upstream_delay_ms": 20,
        "checks_per_vendor": 4, "registration_s": reg_s,
        "off": {"p50_us": p50_off, "p99_us": p99_off, "rps": rps_off},
        "on": {"p50_us": p50_on, "p99_us": p99_on, "rps": rps_on,
               "checks_during_measurement": during, "upstream_max_concurrent": max_inflight},
    });
    save(
        "token-checks.json",
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("| {n} systems, scheduled checks | p50 | p99 | GetAccessToken/s | checks run | vendor concurrency, max |");
    println!("|---|---|---|---|---|---|");
    println!("| checks off | {p50_off:.0} µs | {p99_off:.0} µs | {rps_off:.0} | — | — |");
    println!("| checks running | {p50_on:.0} µs | {p99_on:.0} µs | {rps_on:.0} | {during} in {seconds:.0} s | {max_inflight} (cap 4) |");
}

/// Registers `n` Asana systems (`sys-000000`…) on `base`, 64 at a time.
async fn register_asana_systems(addr: &str, token: &str, n: usize, base: &str) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut c = connect(addr, token).await;
        let (next, base) = (next.clone(), base.to_owned());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    break;
                }
                let mut r = scale_register(0);
                r.system_id = format!("sys-{i:06}");
                r.base_url = base.clone();
                c.register_system(r).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn scale_register(i: usize) -> pb::RegisterSystemRequest {
    // Mixed static kinds.
    let (kind, base, cred) = if i.is_multiple_of(2) {
        (
            pb::SystemKind::Asana,
            "https://app.asana.com/api/1.0".to_owned(),
            pb::credential::Credential::PersonalAccessToken(pb::PersonalAccessToken {
                token: format!("2/1200000000000000/{i}:0123456789abcdef0123456789abcdef"),
                ..Default::default()
            }),
        )
    } else {
        (
            pb::SystemKind::Freshdesk,
            "https://acme.freshdesk.com".to_owned(),
            pb::credential::Credential::ApiKey(pb::ApiKey {
                key: format!("fdkey{i:015}"),
                expires_at: None,
            }),
        )
    };
    pb::RegisterSystemRequest {
        system_id: format!("sys-{i:06}"),
        kind: kind as i32,
        base_url: base,
        credential: Some(pb::Credential {
            credential: Some(cred),
        }),
        delivery: pb::Delivery::Header as i32,
        check: false,
        ..Default::default()
    }
}

/// GetAccessToken over random ids among `n`: (p50, p99) µs, requests/s.
async fn random_tokens(addr: &str, token: &str, n: usize, seconds: f64) -> (f64, f64, f64) {
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(addr, token).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..64usize {
        let (mut c, stop) = (clients[t % 4].clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut x = t as u64 * 2654435761 + 1;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let id = format!("sys-{:06}", x as usize % n);
                let s = Instant::now();
                let r = c
                    .get_access_token(pb::GetAccessTokenRequest {
                        system_id: id,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                assert!(!r.into_inner().headers.is_empty());
                lat.push(s.elapsed().as_micros() as u32);
            }
            lat
        }));
    }
    let (all, elapsed) = finish(seconds, &stop, tasks, started).await;
    let rps = all.len() as f64 / elapsed;
    let pct = |p: f64| quantile(&all, p);
    (pct(0.5), pct(0.99), rps)
}

async fn wait_serving(addr: &str) {
    loop {
        if let Ok(ch) = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
            if let Ok(r) = h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
            {
                if r.into_inner().status == 1 {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Scenario 3: `n` systems vs 10: registration time, data-dir size, restart-to-SERVING, RSS,
/// GetAccessToken p99 over random ids (first pass and warm).
async fn scale_scenario(rt_kind: &str, n: usize, seconds: f64) {
    let mut rows = Vec::new();
    for count in [10usize, n] {
        let dir = tempfile::tempdir().unwrap();
        let store = fresh_store(&format!("scale{count}")).await;
        let store: Vec<(&str, &str)> = store.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (addr, mut child) = spawn_broker_env(dir.path(), rt_kind, &store);
        wait_serving(&addr).await;
        let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
        let token = token.trim().to_owned();
        let started = Instant::now();
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let mut c = connect(&addr, &token).await;
            let next = next.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= count {
                        break;
                    }
                    c.register_system(scale_register(i)).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let reg_secs = started.elapsed().as_secs_f64();
        let mut admin = connect(&addr, &token).await;
        let worker = admin
            .create_caller(pb::CreateCallerRequest {
                name: "scale-worker".into(),
                role: pb::CallerRole::Worker as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .token;
        let (p50a, p99a, _) = random_tokens(&addr, &worker, count, seconds).await;
        let rss_loaded = status_kib(child.id(), "VmRSS");
        // Graceful stop, then time the restart to SERVING.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
        let disk = dir_bytes(dir.path());
        let t0 = Instant::now();
        let (addr, mut child) = spawn_broker_env(dir.path(), rt_kind, &store);
        wait_serving(&addr).await;
        let restart_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let (p50b, p99b, rpsb) = random_tokens(&addr, &worker, count, seconds).await;
        let (p50c, p99c, rpsc) = random_tokens(&addr, &worker, count, seconds).await;
        let rss_restarted = status_kib(child.id(), "VmRSS");
        let rss = rss_restarted.max(rss_loaded);
        let _ = child.kill();
        let _ = child.wait();
        rows.push(serde_json::json!({
            "systems": count, "register_secs": reg_secs, "data_dir_bytes": disk,
            "restart_to_serving_ms": restart_ms, "peak_rss_kib_sampled": rss,
            "rss_kib_after_registration": rss_loaded, "rss_kib_after_restart": rss_restarted,
            "first_pass": {"p50_us": p50a, "p99_us": p99a},
            "after_restart_cold": {"p50_us": p50b, "p99_us": p99b, "rps": rpsb},
            "warm": {"p50_us": p50c, "p99_us": p99c, "rps": rpsc},
        }));
    }
    save(
        format!("scale-{n}.json"),
        serde_json::to_string_pretty(&rows).unwrap(),
    )
    .unwrap();
    println!("| systems | register | data dir | restart→SERVING | RSS | cold p50/p99 | warm p50/p99 | warm req/s |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} s | {:.1} MiB | {:.0} ms | {:.1} MiB | {:.0}/{:.0} µs | {:.0}/{:.0} µs | {:.0} |",
            r["systems"],
            r["register_secs"].as_f64().unwrap(),
            r["data_dir_bytes"].as_f64().unwrap() / 1048576.0,
            r["restart_to_serving_ms"].as_f64().unwrap(),
            r["peak_rss_kib_sampled"].as_f64().unwrap() / 1024.0,
            r["after_restart_cold"]["p50_us"].as_f64().unwrap(),
            r["after_restart_cold"]["p99_us"].as_f64().unwrap(),
            r["warm"]["p50_us"].as_f64().unwrap(),
            r["warm"]["p99_us"].as_f64().unwrap(),
            r["warm"]["rps"].as_f64().unwrap(),
        );
    }
    let p99 = |i: usize| rows[i]["warm"]["p99_us"].as_f64().unwrap();
    println!();
    println!(
        "warm p99 at {n} / at 10: {:.2} (target ≤ 1.2)",
        p99(1) / p99(0)
    );
}

/// Scenario 4: `concurrency` admin clients, each on its own connection, registering systems
/// closed-loop for `seconds`; every OK is durable (flushed) before it is sent.
async fn register_scenario(
    addr: &str,
    token_path: &std::path::Path,
    pid: u32,
    concurrency: usize,
    seconds: f64,
    template: &pb::RegisterSystemRequest,
) {
    let token = std::fs::read_to_string(token_path).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = cpu_us(pid);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let mut c = connect(addr, token.trim()).await;
        let (stop, template) = (stop.clone(), template.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut r = template.clone();
                r.system_id = format!("reg-{t}-{n}");
                n += 1;
                let s = Instant::now();
                c.register_system(r).await.unwrap();
                lat.push(s.elapsed().as_micros() as u32);
            }
            lat
        }));
    }
    let (all, elapsed) = finish(seconds, &stop, tasks, started).await;
    let cpu = cpu_us(pid) - cpu0;
    let pct = |p: f64| quantile(&all, p);
    let rps = all.len() as f64 / elapsed;
    let json = serde_json::json!({
        "benchmark": "register_system", "concurrency": concurrency, "seconds": seconds,
        "registrations": all.len(), "per_second": rps, "p50_us": pct(0.5), "p99_us": pct(0.99),
        "server_cpu_us_per_req": cpu / all.len() as f64,
    });
    save(
        format!("register-c{concurrency}.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("| admin clients | registrations/s | p50 | p99 | server CPU/req |");
    println!("|---|---|---|---|---|");
    println!(
        "| {concurrency} | {rps:.0} | {:.1} ms | {:.1} ms | {:.0} µs |",
        pct(0.5) / 1000.0,
        pct(0.99) / 1000.0,
        cpu / all.len() as f64
    );
    println!();
    println!("durable registrations/s: {rps:.0} (target ≥ 2000)");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve-echo") {
        serve_echo(&args[i + 1], &args[i + 2]);
        return;
    }
    let connections: usize = arg("--connections", "4").parse().unwrap();
    let concurrency: usize = arg("--concurrency", "64").parse().unwrap();
    let seconds: f64 = arg("--seconds", "4").parse().unwrap();
    let rounds: usize = arg("--rounds", "3").parse().unwrap();
    let rt_kind = arg("--runtime", "auto");
    // Client on core 0, servers on core 1.
    let _ = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", "0", &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let store = fresh_store("main").await;
        let store: Vec<(&str, &str)> = store.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (addr, mut broker) = spawn_broker_env(dir.path(), &rt_kind, &store);
        let token_path = dir.path().join("admin.token");
        let mut admin = loop {
            if let Ok(t) = std::fs::read_to_string(&token_path) {
                if !t.trim().is_empty() {
                    break connect(&addr, t.trim()).await;
                }
            }
            if let Ok(Some(status)) = broker.try_wait() {
                panic!("the broker exited ({status}) before writing its admin token; rerun with BENCH_BROKER_LOG=path to see why");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let reg = pb::RegisterSystemRequest {
            system_id: "bench".into(),
            kind: pb::SystemKind::Asana as i32,
            base_url: "https://app.asana.com/api/1.0".into(),
            credential: Some(pb::Credential {
                credential: Some(pb::credential::Credential::PersonalAccessToken(
                    pb::PersonalAccessToken {
                        token: "2/1200000000000000/1209999999999999:0123456789abcdef0123456789abcdef".into(),
                        ..Default::default()
                    },
                )),
            }),
            delivery: pb::Delivery::Header as i32,
            check: false,
            ..Default::default()
        };
        loop {
            match admin.register_system(reg.clone()).await {
                Ok(_) => break,
                Err(e) if e.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
        let worker_token = admin
            .create_caller(pb::CreateCallerRequest {
                name: "bench-worker".into(),
                role: pb::CallerRole::Worker as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .token;
        let sample = admin
            .get_access_token(pb::GetAccessTokenRequest {
                system_id: "bench".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if arg("--scenario", "token") == "scale" {
            let _ = broker.kill();
            let _ = broker.wait();
            scale_scenario(&rt_kind, arg("--systems", "100000").parse().unwrap(), seconds).await;
            return;
        }
        if arg("--scenario", "token") == "cores" {
            let _ = broker.kill();
            let _ = broker.wait();
            cores_scenario(dir.path(), &worker_token, &sample, seconds, rounds).await;
            return;
        }
        if arg("--scenario", "token") == "h2load" {
            h2load_scenario(&addr, &worker_token, &sample, seconds, rounds).await;
            let _ = broker.kill();
            let _ = broker.wait();
            return;
        }
        if arg("--scenario", "token") == "oauth" {
            oauth_scenario(&addr, &admin, &worker_token, broker.id(), &rt_kind, connections, concurrency, seconds, rounds).await;
            let _ = broker.kill();
            let _ = broker.wait();
            return;
        }
        if arg("--scenario", "token") == "checks" {
            let _ = broker.kill();
            let _ = broker.wait();
            checks_scenario(&rt_kind, arg("--systems", "10000").parse().unwrap(), seconds).await;
            return;
        }
        if arg("--scenario", "token") == "storm" {
            storm_scenario(&admin, &worker_token, &addr, broker.id(), arg("--systems", "10000").parse().unwrap(), 16).await;
            let _ = broker.kill();
            let _ = broker.wait();
            return;
        }
        if arg("--scenario", "token") == "register" {
            register_scenario(&addr, &token_path, broker.id(), concurrency, seconds, &reg).await;
            let _ = broker.kill();
            let _ = broker.wait();
            return;
        }
        let (echo_addr, mut echo) = spawn_echo(&rt_kind, &sample);
        let (bpid, epid) = (broker.id(), echo.id());
        // Without --connections/--concurrency: the default suite (scenario 1's six settings).
        let explicit = std::env::args().any(|a| a == "--connections" || a == "--concurrency");
        let settings: Vec<(usize, usize)> = if explicit {
            vec![(connections, concurrency)]
        } else {
            vec![(1, 64), (1, 256), (4, 64), (4, 256), (16, 64), (16, 256)]
        };
        let mut suite_rows = Vec::new();
        let mut suite_json = Vec::new();
        for (connections, concurrency) in settings {
            // Warm-up.
            drive(&echo_addr, &worker_token, epid, connections, concurrency, 1.0).await;
            drive(&addr, &worker_token, bpid, connections, concurrency, 1.0).await;
            let (mut e, mut b) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                e.push(drive(&echo_addr, &worker_token, epid, connections, concurrency, seconds).await);
                b.push(drive(&addr, &worker_token, bpid, connections, concurrency, seconds).await);
            }
            let m = |v: &[Figures], f: fn(&Figures) -> f64| median(v.iter().map(f).collect());
            let fig = |v: &[Figures]| {
                serde_json::json!({
                    "rps": m(v, |f| f.rps), "p50_us": m(v, |f| f.p50_us), "p99_us": m(v, |f| f.p99_us),
                    "p999_us": m(v, |f| f.p999_us), "server_cpu_us_per_req": m(v, |f| f.cpu_us_per_req),
                })
            };
            let (brss, erss) = (status_kib(bpid, "VmHWM"), status_kib(epid, "VmHWM"));
            let rps_ratio = m(&b, |f| f.rps) / m(&e, |f| f.rps);
            let p99_ratio = m(&b, |f| f.p99_us) / m(&e, |f| f.p99_us);
            let store = if std::env::var("BENCH_STORE_URL").is_ok() { "postgres" } else { "sled" };
            let json = serde_json::json!({
                "benchmark": "get_access_token_vs_echo",
                "store": store,
                "runtime": rt_kind, "connections": connections, "concurrency": concurrency,
                "seconds_per_round": seconds, "rounds": rounds,
                "echo": fig(&e), "broker": fig(&b),
                "broker_peak_rss_kib": brss, "echo_peak_rss_kib": erss,
                "throughput_ratio": rps_ratio, "p99_ratio": p99_ratio,
            });
            save(
                format!(
                    "token-{rt_kind}-n{connections}-c{concurrency}{}.json",
                    if store == "postgres" { "-pg" } else { "" }
                ),
                serde_json::to_string_pretty(&json).unwrap(),
            )
            .unwrap();
            println!("| server ({rt_kind}, {connections} conn, c={concurrency}, store {store}) | requests/s | p50 | p99 | p99.9 | server CPU/req | peak RSS |");
            println!("|---|---|---|---|---|---|---|");
            for (name, v, rss) in [("echo", &e, erss), ("broker GetAccessToken", &b, brss)] {
                println!(
                    "| {name} | {:.0} | {:.0} µs | {:.0} µs | {:.0} µs | {:.1} µs | {:.1} MiB |",
                    m(v, |f| f.rps), m(v, |f| f.p50_us), m(v, |f| f.p99_us), m(v, |f| f.p999_us),
                    m(v, |f| f.cpu_us_per_req), rss as f64 / 1024.0
                );
            }
            println!();
            println!("broker/echo throughput {rps_ratio:.2} (target ≥ 0.90), p99 {p99_ratio:.2} (target ≤ 1.25)");
            suite_rows.push(format!(
                "| {connections} / {concurrency} | {:.0} | {:.0} | **{rps_ratio:.2}** | {:.0} / {:.0} µs | {p99_ratio:.2} | {:.1} / {:.1} µs | {:.1} / {:.1} MiB |",
                m(&e, |f| f.rps), m(&b, |f| f.rps), m(&e, |f| f.p99_us), m(&b, |f| f.p99_us),
                m(&e, |f| f.cpu_us_per_req), m(&b, |f| f.cpu_us_per_req),
                erss as f64 / 1024.0, brss as f64 / 1024.0
            ));
            suite_json.push(json);
        }
        if !explicit {
            let mut md = format!("GetAccessToken vs echo, runtime {rt_kind}, {rounds} alternating rounds of {seconds} s (medians)\n\n");
            md.push_str("| conn / concurrency | echo req/s | broker req/s | ratio | p99 echo / broker | p99 ratio | server CPU/req echo / broker | peak RSS echo / broker |\n");
            md.push_str("|---|---|---|---|---|---|---|---|\n");
            for r in &suite_rows {
                md.push_str(r);
                md.push('\n');
            }
            save(format!("token-suite-{rt_kind}.md"), &md).unwrap();
            save(
                format!("token-suite-{rt_kind}.json"),
                serde_json::to_string_pretty(&suite_json).unwrap(),
            )
            .unwrap();
            println!("{md}");
        }
        let _ = broker.kill();
        let _ = echo.kill();
        let _ = broker.wait();
        let _ = echo.wait();
    });
}
