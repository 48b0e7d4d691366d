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

async fn scrape(broker: &TestBroker) -> String {
    let resp = reqwest::get(format!("http://{}/metrics", broker.http_addr))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    resp.text().await.unwrap()
}

#[tokio::test]
async fn metrics_count_rpcs_cache_hits_and_upstream_calls_without_naming_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    for path in ["/healthz", "/readyz"] {
        let r = reqwest::get(format!("http://{}{path}", broker.http_addr))
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }

    let fake = FakeFreshworks::start(Freshworks::Desk).await;
    fake.add_key("metrics-secret-key-77", 42, "Ada Agent", "ada@acme.example");
    let before = scrape(&broker).await;
    admin
        .register_system(pb::RegisterSystemRequest {
            system_id: "metrics-fd-sys".into(),
            kind: pb::SystemKind::Freshdesk as i32,
            base_url: fake.base_url.clone(),
            credential: Some(pb::Credential {
                credential: Some(pb::credential::Credential::ApiKey(pb::ApiKey {
                    key: "metrics-secret-key-77".into(),
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
    let after = scrape(&broker).await;

    // Other tests share the process-wide registry: compare deltas, never absolute values.
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    assert!(delta("credbroker_rpc_total{method=\"GetAccessToken\",code=\"OK\"}") >= 5.0);
    assert!(delta("credbroker_rpc_total{method=\"GetAccessToken\",code=\"NOT_FOUND\"}") >= 1.0);
    assert!(delta("credbroker_rpc_total{method=\"RegisterSystem\",code=\"OK\"}") >= 1.0);
    assert!(delta("credbroker_rpc_duration_seconds_count{method=\"GetAccessToken\"}") >= 6.0);
    // The first GetAccessToken mints; the other four are answered from memory.
    assert!(delta("credbroker_token_cache_total{result=\"hit\"}") >= 4.0);
    assert!(delta("credbroker_token_cache_total{result=\"miss\"}") >= 1.0);
    // The registration's check reached the fake upstream.
    assert!(delta("credbroker_upstream_duration_seconds_count") >= 1.0);
    assert!(sample(&after, "credbroker_systems{state=\"active\"}") >= 1.0);
    assert!(after.contains("# TYPE credbroker_rpc_duration_seconds histogram"));

    // Bounded labels only: no system ids, no secrets, no upstream URLs.
    for needle in [
        "metrics-secret-key-77",
        "metrics-fd-sys",
        fake.base_url.as_str(),
    ] {
        assert!(!after.contains(needle), "/metrics names {needle}");
    }
    broker.stop().await;
}
