//! `--runtime per-core`: extra serving threads, each a `current_thread` runtime accepting on its
//! own `SO_REUSEPORT` socket on the gRPC address.

use std::time::Duration;

use credbroker::pb;

use crate::support::*;

/// Sockets listening on 127.0.0.1:`port` (in this network namespace, from /proc/net/tcp).
fn listening_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A")
        })
        .count()
}

/// The in-process tests here count this process's serving threads: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Threads of this process named like the extra serving threads.
fn serving_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|name| name.starts_with("credbroker-core"))
        .count()
}

/// Runs `work` to its end on a thread and runtime of its own (so this test's thread, the
/// broker's main runtime, can be blocked meanwhile).
fn on_own_thread<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(work)
    })
}

/// `n` `GetAccessToken` calls for `system` and `n` HTTP `/healthz` requests, each on a new
/// connection, from a thread and runtime of their own; how many were answered within 5 s each.
fn calls_from_another_thread(
    grpc: std::net::SocketAddr,
    http: std::net::SocketAddr,
    worker: String,
    n: usize,
) -> std::thread::JoinHandle<usize> {
    on_own_thread(async move {
        let mut answered = 0;
        for _ in 0..n {
            let call = async {
                let mut c = client(grpc, Some(&worker)).await;
                c.get_access_token(pb::GetAccessTokenRequest {
                    system_id: "spread".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
            };
            if let Ok(t) = tokio::time::timeout(Duration::from_secs(5), call).await {
                assert_eq!(t.headers[0].value, "Bearer spread-pat");
                answered += 1;
            }
            let http_client = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap();
            let get = http_client.get(format!("http://{http}/healthz")).send();
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), get).await {
                assert_eq!(r.status(), 200);
                answered += 1;
            }
        }
        answered
    })
}

// A current_thread test: the broker's main runtime is this test's thread, so blocking it
// leaves only the extra threads to accept.
#[tokio::test]
async fn extra_threads_answer_while_the_main_runtime_is_busy_and_end_with_the_broker() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.server.serving_threads = 3;
    let broker = TestBroker::start_with(config).await;
    // Two beside the main runtime for each listener, all accepting on the one socket each.
    assert_eq!(serving_threads(), 4);
    assert_eq!(listening_on(broker.addr.port()), 1);
    let mut admin = broker.admin().await;
    admin
        .register_system(register_asana(
            "spread",
            "https://app.asana.com/api/1.0",
            "spread-pat",
            false,
        ))
        .await
        .unwrap();
    let worker = worker_token(&mut admin, "spread-worker").await;
    // Served by any thread while this one runs.
    let (grpc, http) = (broker.addr, broker.http_addr);
    let idle = calls_from_another_thread(grpc, http, worker.clone(), 4);
    let idle = tokio::task::spawn_blocking(move || idle.join().unwrap())
        .await
        .unwrap();
    assert_eq!(idle, 8);
    // This thread blocked: every connection is accepted and answered by an extra thread.
    let busy = calls_from_another_thread(grpc, http, worker, 8)
        .join()
        .unwrap();
    assert_eq!(
        busy, 16,
        "calls went unanswered while the main runtime was busy"
    );
    broker.stop().await;
    eventually(Duration::from_secs(5), "the serving threads end", || {
        serving_threads() == 0
    })
    .await;
    assert_eq!(
        listening_on(grpc.port()) + listening_on(http.port()),
        0,
        "every socket closed"
    );
}

#[tokio::test]
async fn the_binary_serves_a_runtime_per_core_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("broker.log");
    let process = spawn_process(&data, &log, &[("CREDBROKER_RUNTIME", "per-core")]).unwrap();
    wait_for_health(
        process.addr,
        tonic_health::pb::health_check_response::ServingStatus::Serving,
    )
    .await;
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(listening_on(process.addr.port()), 1, "one socket, shared");
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    for _ in 0..16 {
        let mut admin = client(process.addr, Some(token.trim())).await;
        admin
            .list_systems(pb::ListSystemsRequest::default())
            .await
            .unwrap();
    }
    let r = reqwest::get(format!("http://{}/readyz", process.http_addr()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let said = process
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "gRPC served by one runtime per core.")
        .map(|v| v["threads"].as_u64().unwrap())
        .collect::<Vec<_>>();
    let log_text = process.log();
    assert_eq!(process.stop().await, Some(0), "{log_text}");
    if cpus > 1 {
        assert_eq!(said, vec![cpus as u64]);
    } else {
        assert!(said.is_empty(), "one CPU: the main runtime alone");
    }
}

/// A vendor that takes connections, says so on `got`, and never answers.
fn silent_vendor(got: std::sync::mpsc::Sender<()>) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let mut buf = [0u8; 1024];
            let _ = std::io::Read::read(&mut conn, &mut buf);
            let _ = got.send(());
            held.push(conn);
        }
    });
    addr
}

// current_thread: the broker's main runtime is this test's thread.
#[tokio::test]
async fn a_call_stuck_on_an_extra_thread_is_cut_when_the_grace_period_ends() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (got_tx, got) = std::sync::mpsc::channel();
    let vendor = silent_vendor(got_tx);
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.server.serving_threads = 2;
    config.server.shutdown_grace = Duration::from_secs(1);
    config.proxy.read_timeout = Duration::from_secs(120);
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    let mut reg = register_asana(
        "stuck",
        &format!("http://{vendor}/api/1.0"),
        "stuck-pat",
        false,
    );
    reg.delivery = pb::Delivery::Proxy as i32;
    admin.register_system(reg).await.unwrap();
    let lease = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "stuck".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let url = format!("{}/users/me", lease.api_base_url);
    let auth = lease.headers[0].value.clone();
    let worker = on_own_thread(async move {
        let r = reqwest::Client::new()
            .get(url)
            .header("authorization", auth)
            .send()
            .await;
        r.map(|r| r.status().as_u16()).ok()
    });
    // This thread blocked until the vendor has the call: an extra thread forwarded it.
    got.recv_timeout(Duration::from_secs(10))
        .expect("the proxied call reached the vendor");
    let started = std::time::Instant::now();
    broker.stop().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?} with a call stuck on an extra thread (grace 1 s)"
    );
    // Its connection was cut with the thread's runtime, not left to the proxy's read timeout.
    let answered = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::task::spawn_blocking(move || worker.join().unwrap()),
    )
    .await
    .expect("the stuck call is cut at shutdown")
    .unwrap();
    assert_ne!(answered, Some(200), "the stuck call cannot have succeeded");
}

// current_thread: the broker's main runtime is this test's thread.
#[tokio::test]
async fn extra_threads_speak_tls() {
    use crate::mtls::{tls_client, write, Ca};
    let _serial = ONE_AT_A_TIME.lock().await;
    let (dir, certs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ca = Ca::new("per-core test CA");
    let server = ca.leaf(&["localhost", "127.0.0.1"], true);
    let mut config = test_config(dir.path());
    config.tls.cert_file = Some(write(certs.path(), "server.pem", &server.0));
    config.tls.key_file = Some(write(certs.path(), "server.key", &server.1));
    config.server.serving_threads = 2;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(credbroker::server::run(listener, config, async {
        let _ = stop_rx.await;
    }));
    let token_file = dir.path().join("admin.token");
    let token = loop {
        let token = std::fs::read_to_string(&token_file).unwrap_or_default();
        if !token.trim().is_empty() {
            if let Ok(mut c) = tls_client(addr, &ca.pem(), None, Some(token.trim())).await {
                if c.list_systems(pb::ListSystemsRequest::default())
                    .await
                    .is_ok()
                {
                    break token.trim().to_owned();
                }
            }
        }
        tokio::task::yield_now().await;
    };
    // This thread blocked: the extra thread handshakes and answers every connection.
    let ca_pem = ca.pem();
    let answered = on_own_thread(async move {
        let mut answered = 0;
        for _ in 0..8 {
            let call = async {
                let mut c = tls_client(addr, &ca_pem, None, Some(&token)).await.ok()?;
                c.list_systems(pb::ListSystemsRequest::default()).await.ok()
            };
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), call).await {
                answered += 1;
            }
        }
        answered
    })
    .join()
    .unwrap();
    assert_eq!(
        answered, 8,
        "TLS calls went unanswered while the main runtime was busy"
    );
    let _ = stop_tx.send(());
    task.await.unwrap().unwrap();
}
