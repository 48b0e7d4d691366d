//! Prometheus metrics and the plain HTTP probes on the HTTP listener.

use credbroker::pb;

use crate::fakes::*;
use crate::support::*;

/// The value of one exposition line `name{labels} value`, 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

async fn scrape(http: std::net::SocketAddr) -> String {
    let resp = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    resp.text().await.unwrap()
}

/// The metrics of a broker process of the test's own (the registry is process-wide, and tests
/// run in parallel): exact deltas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_rpcs_cache_hits_and_upstream_calls_without_naming_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let proc = spawn_process(dir.path(), &logs.path().join("broker.log"), &[])
        .unwrap_or_else(|(s, log)| panic!("exited {s}: {log}"));
    wait_for_health(
        proc.addr,
        tonic_health::pb::health_check_response::ServingStatus::Serving,
    )
    .await;
    let http = proc.http_addr();
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let mut admin = client(proc.addr, Some(token.trim())).await;
    for path in ["/healthz", "/readyz"] {
        let r = reqwest::get(format!("http://{http}{path}")).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }

    let fake = FakeFreshworks::start(Freshworks::Desk).await;
    fake.add_key("metrics-secret-key-77", 42, "Ada Agent", "ada@acme.example");
    let before = scrape(http).await;
    admin
        .register_system(pb::RegisterSystemRequest {
            system_id: "metrics-fd-sys".into(),
            kind: pb::SystemKind::Freshdesk as i32,
            base_url: fake.base_url.clone(),
            credential: Some(pb::Credential {
                credential: Some(pb::credential::Credential::ApiKey(pb::ApiKey {
                    key: "metrics-secret-key-77".into(),
                    expires_at: None,
                })),
            }),
            check: true,
            delivery: pb::Delivery::Header as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..5 {
        admin
            .get_access_token(pb::GetAccessTokenRequest {
                system_id: "metrics-fd-sys".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let missing = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "metrics-no-such".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let after = scrape(http).await;

    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(
        delta("credbroker_rpc_total{method=\"GetAccessToken\",code=\"OK\"}"),
        5.0
    );
    assert_eq!(
        delta("credbroker_rpc_total{method=\"GetAccessToken\",code=\"NOT_FOUND\"}"),
        1.0
    );
    assert_eq!(
        delta("credbroker_rpc_total{method=\"RegisterSystem\",code=\"OK\"}"),
        1.0
    );
    assert_eq!(
        delta("credbroker_rpc_duration_seconds_count{method=\"GetAccessToken\"}"),
        6.0
    );
    // The first GetAccessToken mints; the other four are answered from memory.
    assert_eq!(delta("credbroker_token_cache_total{result=\"hit\"}"), 4.0);
    assert_eq!(delta("credbroker_token_cache_total{result=\"miss\"}"), 2.0);
    // The registration's check is every upstream call (identity, then a ticket read).
    assert_eq!(fake.server.count(""), 2);
    assert_eq!(delta("credbroker_upstream_duration_seconds_count"), 2.0);
    assert_eq!(sample(&after, "credbroker_systems{state=\"active\"}"), 1.0);
    assert_eq!(
        sample(
            &after,
            "credbroker_systems_health{kind=\"freshdesk\",health=\"healthy\"}"
        ),
        1.0
    );
    assert!(after.contains("credbroker_credential_horizon_systems{within=\"30d\"} 0"));
    assert!(after.contains("# TYPE credbroker_rpc_duration_seconds histogram"));

    // Bounded labels only: no system ids, no secrets, no upstream URLs.
    for needle in [
        "metrics-secret-key-77",
        "metrics-fd-sys",
        fake.base_url.as_str(),
    ] {
        assert!(!after.contains(needle), "/metrics names {needle}");
    }
    drop(admin);
    assert_eq!(proc.stop().await, Some(0));
}
