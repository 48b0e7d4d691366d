//! Proxy overhead: the same loopback fake vendor called directly, through a bare forwarder (the
//! floor: hyper's server and the proxy's pooled hyper client, nothing else) and through the
//! broker's proxy, with the same client, concurrency and duration. Run with `cargo bench --bench proxy`
//! (`-- --concurrency N --seconds S --rounds R`); writes `bench-results/proxy-c{N}.json` and prints a
//! markdown table. Medians over alternating rounds, since run-to-run noise on a 2-core VM is
//! ±10–15 %.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::*;
use credbroker::pb;
use credbroker::pb::credential_broker_client::CredentialBrokerClient;

#[derive(Clone, Copy)]
struct Figures {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// The broker's CPU per request (0 for direct calls, which do not touch it).
    broker_cpu_us: f64,
    /// The load generator's CPU per request (its process: the client, and the fake vendor
    /// unless `--vendor-cores` gives it a process of its own).
    load_cpu_us: f64,
    /// How busy the load generator's cores were (1.0: all of them, all the time).
    load_busy: f64,
}

/// The fake vendor; with `delay_ms` > 0 every answer waits that long (a vendor's own time,
/// which loopback does not have).
async fn fake_vendor(delay_ms: u64) -> String {
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| async move {
        if delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        if req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some("Bearer bench-pat")
        {
            (
                axum::http::StatusCode::OK,
                r#"{"data":{"gid":"1","name":"Bench"}}"#,
            )
        } else {
            (
                axum::http::StatusCode::UNAUTHORIZED,
                r#"{"errors":[{"message":"Not Authorized"}]}"#,
            )
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}/api/1.0")
}

async fn drive(
    url: String,
    auth: String,
    concurrency: usize,
    seconds: f64,
    broker: u32,
) -> Figures {
    let cpu_before = cpu_us(broker);
    let load_before = cpu_us(std::process::id());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for _ in 0..concurrency {
        let (client, url, auth, stop) = (client.clone(), url.clone(), auth.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = client
                    .get(&url)
                    .header("authorization", &auth)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let _ = r.bytes().await.unwrap();
                lat.push(t.elapsed().as_micros() as u32);
            }
            lat
        }));
    }
    let (all, elapsed) = finish(seconds, &stop, tasks, started).await;
    let cpu = cpu_us(broker) - cpu_before;
    let load = cpu_us(std::process::id()) - load_before;
    let pct = |p: f64| quantile(&all, p);
    let calls = all.len().max(1) as f64;
    Figures {
        rps: all.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        broker_cpu_us: cpu / calls,
        load_cpu_us: load / calls,
        load_busy: load / 1e6 / elapsed / load_threads() as f64,
    }
}

/// The floor for any HTTP/1.1 proxy here, run as this bench binary again (`--forwarder
/// http://vendor`) on the broker's core: hyper's HTTP/1.1 server (no-delay sockets) and the
/// pooled hyper-util client the broker's proxy uses, on one current_thread runtime; it swaps
/// the caller's header for the vendor's and relays the answer whole. No lease check, audit,
/// quota, screening or header filtering: what those cost is the broker's own share.
fn forwarder_main(vendor_root: String) {
    use axum::body::Body;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.set_nodelay(true);
        let client: hyper_util::client::legacy::Client<_, Body> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(http);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", l.local_addr().unwrap());
        let root: Arc<str> = vendor_root.into();
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let (client, root) = (client.clone(), root.clone());
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (client, root) = (client.clone(), root.clone());
                    async move {
                        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
                        let mut forward = hyper::Request::new(Body::empty());
                        *forward.uri_mut() = format!("{root}{target}").parse().unwrap();
                        forward.headers_mut().insert(
                            "authorization",
                            axum::http::HeaderValue::from_static("Bearer bench-pat"),
                        );
                        let (parts, body) = client.request(forward).await.unwrap().into_parts();
                        let whole = http_body_util::BodyExt::collect(body).await.unwrap();
                        let answer =
                            hyper::Response::from_parts(parts, Body::from(whole.to_bytes()));
                        Ok::<_, std::convert::Infallible>(answer)
                    }
                });
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(tcp);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
}

/// The fake vendor in a process of its own (`--vendor DELAY_MS`), on as many runtime threads
/// as the cores it is pinned to; prints its base URL.
fn vendor_main(delay_ms: u64) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        println!("{}", fake_vendor(delay_ms).await);
        std::future::pending::<()>().await;
    });
}

/// A child process killed and reaped when this goes, a panic included.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How many CPUs a `taskset` list names ("1", "0,2", "0-2").
fn count_cpus(list: &str) -> usize {
    let bound = |n: &str| n.trim().parse::<usize>().expect("a taskset CPU list");
    list.split(',')
        .map(|part| {
            part.split_once('-')
                .map_or(1, |(a, b)| bound(b) + 1 - bound(a))
        })
        .sum()
}

/// The load generator's cores (`--load-cores`, default core 0): one runtime thread per core.
fn load_threads() -> usize {
    count_cpus(&arg("--load-cores", "0"))
}

/// Runs this bench binary again with `args`, pinned to `cores`; returns the first line it
/// prints (its address) and the child.
fn spawn_self(cores: &str, args: &[&str]) -> (String, std::process::Child) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new("taskset")
        .args(["-c", cores])
        .arg(std::env::current_exe().unwrap())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("taskset is needed");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = lines.next().expect("child exited").unwrap();
    (addr, child)
}

/// Starts [`forwarder_main`] on the broker's cores; returns its address and the child.
fn spawn_forwarder(vendor_root: &str) -> (String, std::process::Child) {
    spawn_self(&arg("--broker-cores", "1"), &["--forwarder", vendor_root])
}

/// Starts the real `credbroker` binary pinned to the broker's cores (`--broker-cores`, default
/// core 1); returns (gRPC addr, HTTP addr, child).
fn spawn_broker(data_dir: &std::path::Path) -> (String, String, std::process::Child) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new("taskset")
        .args(["-c", &arg("--broker-cores", "1")])
        .arg(broker_bin())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .env("CREDBROKER_EGRESS_ALLOW_HTTP", "1")
        .env("CREDBROKER_EGRESS_ALLOW", "127.0.0.1/32")
        .env("CREDBROKER_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .env(
            "CREDBROKER_AUDIT_FILE",
            std::env::var("BENCH_AUDIT_FILE")
                .unwrap_or_else(|_| data_dir.join("audit.log").display().to_string()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("taskset and the credbroker binary are needed");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut grpc, mut http) = (None, None);
    while grpc.is_none() || http.is_none() {
        let line = lines.next().expect("broker exited").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        match v["message"].as_str() {
            Some("gRPC listening.") => grpc = v["addr"].as_str().map(str::to_owned),
            Some("HTTP listening.") => http = v["addr"].as_str().map(str::to_owned),
            _ => {}
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (grpc.unwrap(), http.unwrap(), child)
}

/// The quota book's own cost per proxied call, in-process on one thread: admission (a
/// concurrency slot, the block and reserve screens), reading the vendor's headers (Salesforce's,
/// the heaviest) and learning from them (a changing count every call).
fn quota_bookkeeping_ns(iterations: u32) -> f64 {
    use credbroker::model::SystemKind;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let book = credbroker::broker::quota::Quotas::new(Default::default());
        let headers: Vec<axum::http::HeaderMap> = (0..2)
            .map(|i| {
                let mut h = axum::http::HeaderMap::new();
                h.insert(
                    "sforce-limit-info",
                    format!("api-usage={}/1000000", 1000 + i).parse().unwrap(),
                );
                h.insert("content-type", "application/json".parse().unwrap());
                h
            })
            .collect();
        let run = |n: u32| {
            let book = &book;
            let headers = &headers;
            async move {
                let started = Instant::now();
                for i in 0..n {
                    let permit = book.admit("bench", SystemKind::Salesforce).await.unwrap();
                    let h = &headers[(i % 2) as usize];
                    let s = credbroker::backends::ratelimit::read(
                        SystemKind::Salesforce,
                        200,
                        h,
                        None,
                        1_800_000_000,
                    );
                    std::hint::black_box(book.learn("bench", &permit, &s));
                }
                started.elapsed().as_nanos() as f64 / f64::from(n)
            }
        };
        run(iterations / 10).await;
        run(iterations).await
    })
}

fn main() {
    let forwarder = arg("--forwarder", "");
    if !forwarder.is_empty() {
        return forwarder_main(forwarder);
    }
    let vendor_child = arg("--vendor", "");
    if !vendor_child.is_empty() {
        return vendor_main(vendor_child.parse().unwrap());
    }
    let concurrency = arg("--concurrency", "16").parse::<usize>().unwrap();
    let seconds = arg("--seconds", "5.0").parse::<f64>().unwrap();
    let rounds = arg("--rounds", "3").parse::<usize>().unwrap();
    // Other callers the broker holds besides the lease's (a lease names its caller, looked up
    // on every proxied call).
    let callers = arg("--callers", "0").parse::<usize>().unwrap();
    let quota_ns = quota_bookkeeping_ns(1_000_000);
    // The load generator and the fake vendor run on core 0, the broker on core 1 (as
    // docs/benchmarks.md measures gRPC servers), so the proxy's work does not steal the
    // client's CPU. On a machine with more cores, `--load-cores`, `--vendor-cores` (the
    // vendor then runs in a process of its own) and `--broker-cores` give each its own.
    let (load_cores, vendor_cores) = (arg("--load-cores", "0"), arg("--vendor-cores", ""));
    let delay_ms = arg("--vendor-delay-ms", "0").parse::<u64>().unwrap();
    let _ = std::process::Command::new("taskset")
        .args([
            "-a",
            "-p",
            "-c",
            &load_cores,
            &std::process::id().to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .status();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(load_threads())
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let (vendor, _vendor_child) = if vendor_cores.is_empty() {
            (fake_vendor(delay_ms).await, None)
        } else {
            let (url, child) = spawn_self(&vendor_cores, &["--vendor", &delay_ms.to_string()]);
            (url, Some(Reaped(child)))
        };
        let (grpc_addr, _http_addr, child) = spawn_broker(dir.path());
        let child = Reaped(child);
        let token_path = dir.path().join("admin.token");
        let channel = loop {
            if token_path.exists() {
                if let Ok(c) = tonic::transport::Channel::from_shared(format!("http://{grpc_addr}")).unwrap().connect().await {
                    break c;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let token = std::fs::read_to_string(&token_path).unwrap();
        let header: tonic::metadata::MetadataValue<_> = format!("Bearer {}", token.trim()).parse().unwrap();
        let mut admin = CredentialBrokerClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", header.clone());
            Ok(r)
        });
        let pat = pb::Credential { credential: Some(pb::credential::Credential::PersonalAccessToken(pb::PersonalAccessToken { token: "bench-pat".into(), ..Default::default() })) };
        let reg = pb::RegisterSystemRequest {
            system_id: "bench".into(),
            kind: pb::SystemKind::Asana as i32,
            base_url: vendor.clone(),
            credential: Some(pat),
            delivery: pb::Delivery::Proxy as i32,
            ..Default::default()
        };
        loop {
            match admin.register_system(reg.clone()).await {
                Ok(_) => break,
                Err(e) if e.code() == tonic::Code::Unavailable => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("{e}"),
            }
        }
        // 32 at a time.
        let adding: Vec<_> = (0..32)
            .map(|k| {
                let mut admin = admin.clone();
                tokio::spawn(async move {
                    for i in (k..callers).step_by(32) {
                        let name = format!("bench-worker-{i}");
                        let role = pb::CallerRole::Worker as i32;
                        let req = pb::CreateCallerRequest { name, role, ..Default::default() };
                        admin.create_caller(req).await.unwrap();
                    }
                })
            })
            .collect();
        for a in adding {
            a.await.unwrap();
        }
        let t = admin.get_access_token(pb::GetAccessTokenRequest { system_id: "bench".into(), ..Default::default() }).await.unwrap().into_inner();
        let lease = t.headers[0].value.clone();
        let direct_url = format!("{vendor}/users/me");
        let proxied_url = format!("{}/users/me", t.api_base_url);
        let root = vendor.split("/api/").next().unwrap().to_owned();
        let (fwd_addr, fwd_child) = spawn_forwarder(&root);
        let fwd_child = Reaped(fwd_child);
        let forwarded_url = format!("http://{fwd_addr}/api/1.0/users/me");
        // Warm up every path.
        let (bpid, fpid) = (child.0.id(), fwd_child.0.id());
        drive(direct_url.clone(), "Bearer bench-pat".into(), concurrency, 1.0, bpid).await;
        drive(forwarded_url.clone(), "Bearer other".into(), concurrency, 1.0, fpid).await;
        drive(proxied_url.clone(), lease.clone(), concurrency, 1.0, bpid).await;
        let (mut d, mut w, mut p) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            d.push(drive(direct_url.clone(), "Bearer bench-pat".into(), concurrency, seconds, bpid).await);
            w.push(drive(forwarded_url.clone(), "Bearer other".into(), concurrency, seconds, fpid).await);
            p.push(drive(proxied_url.clone(), lease.clone(), concurrency, seconds, bpid).await);
        }
        let m = |v: &[Figures], f: fn(&Figures) -> f64| median(v.iter().map(f).collect());
        let (drps, dp50, dp99) = (m(&d, |f| f.rps), m(&d, |f| f.p50_us), m(&d, |f| f.p99_us));
        let (wrps, wp50, wp99) = (m(&w, |f| f.rps), m(&w, |f| f.p50_us), m(&w, |f| f.p99_us));
        let wcpu = m(&w, |f| f.broker_cpu_us);
        let (prps, pp50, pp99) = (m(&p, |f| f.rps), m(&p, |f| f.p50_us), m(&p, |f| f.p99_us));
        let pcpu = m(&p, |f| f.broker_cpu_us);
        let load = |v: &[Figures]| (m(v, |f| f.load_cpu_us), m(v, |f| f.load_busy));
        let ((dl, db), (wl, wb), (pl, pb)) = (load(&d), load(&w), load(&p));
        let layout = format!(
            "load generator on cores {load_cores} ({} runtime threads), the vendor {}, the broker and the forwarder on cores {}; vendor delay {delay_ms} ms",
            load_threads(),
            if vendor_cores.is_empty() { "in the load generator's process".to_owned() } else { format!("on cores {vendor_cores}") },
            arg("--broker-cores", "1"),
        );
        let json = serde_json::json!({
            "benchmark": "proxy_overhead",
            "broker": std::env::var("BENCH_BROKER_BIN").unwrap_or_else(|_| "this build".to_owned()),
            "concurrency": concurrency, "seconds_per_round": seconds, "rounds": rounds, "other_callers": callers,
            "direct": {"rps": drps, "p50_us": dp50, "p99_us": dp99},
            "bare_forwarder": {"rps": wrps, "p50_us": wp50, "p99_us": wp99, "cpu_us_per_req": wcpu},
            "proxied": {"rps": prps, "p50_us": pp50, "p99_us": pp99, "broker_cpu_us_per_req": pcpu},
            "throughput_ratio": prps / drps,
            "bare_forwarder_ratio": wrps / drps,
            "throughput_ratio_to_bare_forwarder": prps / wrps,
            "p50_added_ms": (pp50 - dp50) / 1000.0,
            "layout": layout,
            "load_generator": {
                "cpu_us_per_req": {"direct": dl, "bare_forwarder": wl, "proxied": pl},
                "busy": {"direct": db, "bare_forwarder": wb, "proxied": pb},
            },
            "quota_bookkeeping_ns_per_call": quota_ns,
        });
        save(format!("proxy-c{concurrency}.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
        println!("{layout}");
        println!();
        println!("| path | requests/s | p50 | p99 | broker CPU/req | load generator CPU/req (busy) |");
        println!("|---|---|---|---|---|---|");
        println!("| direct GET to the loopback fake | {drps:.0} | {:.3} ms | {:.3} ms | – | {dl:.1} µs ({:.0} %) |", dp50 / 1000.0, dp99 / 1000.0, db * 100.0);
        println!("| bare forwarder (hyper server + the proxy's client, no checks) | {wrps:.0} | {:.3} ms | {:.3} ms | {wcpu:.1} µs | {wl:.1} µs ({:.0} %) |", wp50 / 1000.0, wp99 / 1000.0, wb * 100.0);
        println!("| proxied GET (lease → real header) | {prps:.0} | {:.3} ms | {:.3} ms | {pcpu:.1} µs | {pl:.1} µs ({:.0} %) |", pp50 / 1000.0, pp99 / 1000.0, pb * 100.0);
        println!();
        if wb >= 0.95 && db >= 0.95 {
            println!("the load generator's cores were the bound through the bare forwarder ({:.0} % busy), and each call there cost them {wl:.1} µs against {dl:.1} µs direct: a proxy that cost nothing on its own core, but cost the load generator what this forwarder's traffic does, would show at most {:.2} of direct here", wb * 100.0, dl / wl);
        }
        println!("throughput ratio proxied/direct: {:.2} (target ≥ 0.90); p50 added: {:.3} ms (target ≤ 0.1 ms)", prps / drps, (pp50 - dp50) / 1000.0);
        println!("bare forwarder/direct: {:.2} (the floor of any proxy here); broker/bare forwarder: {:.2}; broker CPU per call − forwarder's: {:.1} µs", wrps / drps, prps / wrps, pcpu - wcpu);
        println!("quota bookkeeping (admit + read the vendor's headers + learn): {quota_ns:.0} ns per call (target ≤ 2 µs)");
    });
}
