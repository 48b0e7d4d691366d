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

/// Threads of this process named like the extra serving threads.
fn serving_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|name| name.starts_with("credbroker-core"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_serving_thread_answers_and_ends_with_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.server.serving_threads = 3;
    let broker = TestBroker::start_with(config).await;
    assert_eq!(
        listening_on(broker.addr.port()),
        3,
        "one gRPC socket per serving thread"
    );
    assert_eq!(
        listening_on(broker.http_addr.port()),
        3,
        "one HTTP socket per serving thread"
    );
    // Two beside the main runtime for each listener.
    assert_eq!(serving_threads(), 4);
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
    // The kernel spreads connections over the three sockets by their addresses: of 48, each
    // socket gets some (all but certainly), and a socket nobody accepts on would leave its
    // share unanswered.
    for i in 0..48 {
        let answered = tokio::time::timeout(Duration::from_secs(5), async {
            let mut c = client(broker.addr, Some(&worker)).await;
            c.get_access_token(pb::GetAccessTokenRequest {
                system_id: "spread".into(),
                ..Default::default()
            })
            .await
        })
        .await;
        let t = answered
            .unwrap_or_else(|_| panic!("connection {i} was not answered"))
            .unwrap()
            .into_inner();
        assert_eq!(t.headers[0].value, "Bearer spread-pat");
    }
    // The HTTP listener likewise (a new connection per request).
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for i in 0..48 {
        let answered = tokio::time::timeout(
            Duration::from_secs(5),
            http.get(format!("http://{}/healthz", broker.http_addr))
                .send(),
        )
        .await;
        let r = answered
            .unwrap_or_else(|_| panic!("HTTP connection {i} was not answered"))
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let (port, http_port) = (broker.addr.port(), broker.http_addr.port());
    broker.stop().await;
    eventually(Duration::from_secs(5), "the serving threads end", || {
        serving_threads() == 0
    })
    .await;
    assert_eq!(
        listening_on(port) + listening_on(http_port),
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
    assert_eq!(
        listening_on(process.addr.port()),
        cpus,
        "a gRPC socket per CPU"
    );
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
