//! One quota, many workers: the proxy learns each vendor's quota from its answers, holds calls
//! back while the vendor blocks, keeps a reserve of a metered quota, caps concurrency, and
//! never retries a write.

use std::time::{Duration, Instant};

use credbroker::pb;

use crate::fakes::{FakeSalesforce, SF_SOBJECTS};
use crate::oauth::{sf_cc, SF_ID, SF_SECRET};
use crate::service_identities::{cc, jira_fake, SA_ID, SA_SECRET};
use crate::support::*;

/// What a worker saw for one proxied call.
#[derive(Debug)]
struct Seen {
    status: u16,
    local: bool,
    retry_after: Option<u64>,
}

/// A worker's proxied call: `method` on `path` under the lease's base URL.
async fn proxied(
    http: &reqwest::Client,
    t: &pb::GetAccessTokenResponse,
    method: &str,
    path: &str,
) -> Seen {
    let mut req = http.request(method.parse().unwrap(), format!("{}{path}", t.api_base_url));
    for h in &t.headers {
        req = req.header(&h.name, &h.value);
    }
    if method == "POST" {
        req = req
            .header("content-type", "application/json")
            .body("{\"Name\":\"x\"}");
    }
    let r = req.send().await.unwrap();
    let header = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let seen = Seen {
        status: r.status().as_u16(),
        local: header("x-credbroker-limited").as_deref() == Some("local"),
        retry_after: header("retry-after").and_then(|v| v.parse().ok()),
    };
    let _ = r.bytes().await;
    seen
}

fn proxied_system(
    id: &str,
    kind: pb::SystemKind,
    base: &str,
    cred: pb::Credential,
) -> pb::RegisterSystemRequest {
    pb::RegisterSystemRequest {
        system_id: id.into(),
        kind: kind as i32,
        base_url: base.into(),
        credential: Some(cred),
        check: true,
        delivery: pb::Delivery::Proxy as i32,
        ..Default::default()
    }
}

/// Registers `reg` (checked first) and asserts the check passed.
async fn register_checked(admin: &mut Client, reg: pb::RegisterSystemRequest) {
    let c = admin
        .register_system(reg)
        .await
        .unwrap()
        .into_inner()
        .check
        .unwrap();
    assert!(c.ok, "{}", c.message);
}

async fn lease(admin: &mut Client, id: &str) -> pb::GetAccessTokenResponse {
    admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn system(admin: &mut Client, id: &str) -> pb::System {
    admin
        .get_system(pb::GetSystemRequest {
            system_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .system
        .unwrap()
}

/// The next `system.health_changed` on the watch.
async fn health_change(w: &mut tonic::Streaming<pb::SystemEvent>) -> pb::SystemEvent {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), w.message())
            .await
            .expect("no event within 10 s")
            .unwrap()
            .expect("the watch ended");
        if e.r#type == "system.health_changed" {
            return e;
        }
    }
}

async fn metrics(broker: &TestBroker) -> String {
    reqwest::get(format!("http://{}/metrics", broker.http_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Salesforce's over-quota 403 compressed and chunked, as it answers a worker that asks for
/// gzip (Go's, Python's and Java's HTTP clients all do): the proxy still reads the refusal and
/// holds the system back, and the worker gets the body as the vendor sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_salesforce_refusal_still_holds_the_system_back() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSalesforce::start(SF_ID, SF_SECRET).await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let reg = proxied_system(
        "sf-gz",
        pb::SystemKind::Salesforce,
        &fake.base_url,
        sf_cc(SF_SECRET),
    );
    register_checked(&mut admin, reg).await;
    let t = lease(&mut admin, "sf-gz").await;
    fake.set_api_limit_exhausted(true);
    let http = reqwest::Client::new();
    let call = || {
        let mut req = http.get(format!("{}/services/data/v62.0/", t.api_base_url));
        for h in &t.headers {
            req = req.header(&h.name, &h.value);
        }
        req.header("accept-encoding", "gzip").send()
    };
    let first = call().await.unwrap();
    assert_eq!(first.status(), 403);
    assert!(first.headers().get("x-credbroker-limited").is_none());
    assert_eq!(
        first
            .headers()
            .get("content-encoding")
            .map(|v| v.as_bytes()),
        Some(&b"gzip"[..])
    );
    let sent = first.bytes().await.unwrap();
    let mut plain = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&sent[..]), &mut plain)
        .unwrap();
    assert!(plain.contains("REQUEST_LIMIT_EXCEEDED"), "{plain}");
    let at_vendor = fake.server.count("/services/data/v62.0/");
    let second = call().await.unwrap();
    assert_eq!(second.status(), 429);
    assert_eq!(
        second
            .headers()
            .get("x-credbroker-limited")
            .map(|v| v.as_bytes()),
        Some(&b"local"[..])
    );
    assert_eq!(fake.server.count("/services/data/v62.0/"), at_vendor);
    let s = system(&mut admin, "sf-gz").await;
    assert!(s.quota.unwrap().blocked_until.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_workers_stop_at_the_salesforce_reserve_and_the_vendor_sees_no_call_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSalesforce::start(SF_ID, SF_SECRET).await;
    // 500 calls left of 1,000: with the default 5 % reserve, 450 may be spent.
    fake.set_api_usage(500, 1000);
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let reg = proxied_system(
        "sf-quota",
        pb::SystemKind::Salesforce,
        &fake.base_url,
        sf_cc(SF_SECRET),
    );
    register_checked(&mut admin, reg).await;
    let t = lease(&mut admin, "sf-quota").await;

    let http = reqwest::Client::new();
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (http, t) = (http.clone(), t.clone());
        workers.push(tokio::spawn(async move {
            let mut served = 0;
            loop {
                let seen = proxied(&http, &t, "GET", "/services/data/v62.0/sobjects/Account").await;
                match seen.status {
                    200 => served += 1,
                    429 => {
                        assert!(seen.local, "the vendor never answers 429 here: {seen:?}");
                        assert!(seen.retry_after.is_some_and(|s| s >= 1), "{seen:?}");
                        return served;
                    }
                    other => panic!("unexpected {other}: {seen:?}"),
                }
            }
        }));
    }
    let mut served = 0;
    for w in workers {
        served += w.await.unwrap();
    }
    assert_eq!(served, 450, "every call down to the reserve was served");
    assert_eq!(
        fake.api_used(),
        Some(950),
        "the vendor saw no call past the reserve"
    );
    assert_eq!(fake.server.count(SF_SOBJECTS), 450);
    // More calls are refused locally and never reach the vendor.
    let again = proxied(&http, &t, "GET", "/services/data/v62.0/sobjects/Account").await;
    assert!(again.status == 429 && again.local, "{again:?}");
    assert_eq!(fake.server.count(SF_SOBJECTS), 450);

    let q = system(&mut admin, "sf-quota").await.quota.unwrap();
    assert_eq!((q.remaining, q.limit, q.in_flight), (50, 1000, 0));
    assert!(q.blocked_until.is_none());
    let m = metrics(&broker).await;
    assert!(
        m.lines().any(|l| l.starts_with(
            "credbroker_proxy_local_refusals_total{kind=\"salesforce\",reason=\"reserve\"}"
        ) && !l.ends_with(" 0")),
        "{m}"
    );
    assert!(
        m.contains("credbroker_upstream_quota_remaining{kind=\"salesforce\"} 50"),
        "{m}"
    );
    assert!(
        m.contains("credbroker_upstream_quota_limit{kind=\"salesforce\"} 1000"),
        "{m}"
    );
    assert!(
        fake.server.unexpected().is_empty(),
        "{:?}",
        fake.server.unexpected()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jira_retry_after_holds_every_worker_back_locally_for_its_whole_wait() {
    let dir = tempfile::tempdir().unwrap();
    let fake = jira_fake().await;
    let broker = TestBroker::start_with(crate::connect::jira_config(dir.path(), &fake)).await;
    let mut admin = broker.admin().await;
    let reg = proxied_system(
        "jira-q",
        pb::SystemKind::JiraCloud,
        &fake.origin,
        cc(SA_ID, SA_SECRET),
    );
    register_checked(&mut admin, reg).await;
    let t = lease(&mut admin, "jira-q").await;
    let mut watch = admin
        .watch_systems(pb::WatchSystemsRequest {
            system_ids: vec!["jira-q".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let http = reqwest::Client::new();
    let search = "/rest/api/3/search";
    let at_vendor = || fake.server.count("/ex/jira/cloud-acme/rest/api/3/search");
    assert_eq!(proxied(&http, &t, "GET", search).await.status, 200);

    fake.throttle_for(5);
    let first = proxied(&http, &t, "GET", search).await;
    let blocked_at = Instant::now();
    assert!(
        first.status == 429 && !first.local,
        "the vendor's own 429: {first:?}"
    );
    assert_eq!(first.retry_after, Some(5));
    assert_eq!(at_vendor(), 2);

    // Eight workers keep calling: every call is answered by the broker, with the wait left.
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (http, t) = (http.clone(), t.clone());
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..20 {
                seen.push(proxied(&http, &t, "GET", search).await);
            }
            seen
        }));
    }
    for w in workers {
        for s in w.await.unwrap() {
            assert!(s.status == 429 && s.local, "{s:?}");
            assert!(s.retry_after.is_some_and(|r| (1..=5).contains(&r)), "{s:?}");
        }
    }
    let s = system(&mut admin, "jira-q").await;
    assert_eq!(s.health, pb::SystemHealth::Degraded as i32);
    assert!(
        s.health_reason.contains("rate limiting"),
        "{}",
        s.health_reason
    );
    assert!(s.quota.unwrap().blocked_until.is_some());
    assert_eq!(
        at_vendor(),
        2,
        "no call reached the vendor while it asked for a pause"
    );
    let e = health_change(&mut watch).await;
    assert_eq!(e.system.unwrap().health, pb::SystemHealth::Degraded as i32);
    assert!(e.detail.contains("rate limiting"), "{}", e.detail);

    // The first call to pass again does so once the vendor's wait is over, not before.
    loop {
        let seen = proxied(&http, &t, "GET", search).await;
        if seen.status == 200 {
            break;
        }
        assert!(seen.local, "{seen:?}");
        assert!(
            blocked_at.elapsed() < Duration::from_secs(8),
            "still held back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        blocked_at.elapsed() >= Duration::from_millis(4500),
        "{:?}",
        blocked_at.elapsed()
    );
    assert_eq!(at_vendor(), 3);
    let s = system(&mut admin, "jira-q").await;
    assert_ne!(
        s.health,
        pb::SystemHealth::Degraded as i32,
        "{}",
        s.health_reason
    );
    let e = health_change(&mut watch).await;
    assert_eq!(
        e.system.unwrap().health,
        pb::SystemHealth::Healthy as i32,
        "{}",
        e.detail
    );

    // Blocked again right after: held back the same, but within the announcer's cool-down a
    // block that comes and goes is no new pair of events (a vendor blocking again and again
    // would flood the event log).
    fake.throttle_for(5);
    let again = proxied(&http, &t, "GET", search).await;
    assert!(again.status == 429 && !again.local, "{again:?}");
    let reblocked = Instant::now();
    loop {
        let seen = proxied(&http, &t, "GET", search).await;
        if seen.status == 200 {
            break;
        }
        assert!(
            reblocked.elapsed() < Duration::from_secs(8),
            "still held back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let quiet = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(Some(e)) = watch.message().await {
            if e.r#type == "system.health_changed" {
                return e.detail;
            }
        }
        String::new()
    })
    .await;
    assert!(quiet.is_err(), "announced inside the cool-down: {quiet:?}");
    let m = metrics(&broker).await;
    // Counters are per process (other tests add to them): at least this test's one.
    let throttled = m
        .lines()
        .find_map(|l| {
            l.strip_prefix("credbroker_proxy_vendor_throttled_total{kind=\"jira_cloud\"} ")
        })
        .and_then(|v| v.parse::<u64>().ok());
    assert!(throttled.is_some_and(|n| n >= 1), "{m}");
    assert!(
        fake.server.unexpected().is_empty(),
        "{:?}",
        fake.server.unexpected()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jira_refusal_of_one_issues_writes_holds_back_no_other_call() {
    let dir = tempfile::tempdir().unwrap();
    let fake = jira_fake().await;
    let broker = TestBroker::start_with(crate::connect::jira_config(dir.path(), &fake)).await;
    let mut admin = broker.admin().await;
    let reg = proxied_system(
        "jira-i",
        pb::SystemKind::JiraCloud,
        &fake.origin,
        cc(SA_ID, SA_SECRET),
    );
    register_checked(&mut admin, reg).await;
    let t = lease(&mut admin, "jira-i").await;
    let http = reqwest::Client::new();
    fake.limit_issue_writes("ACME-1");
    let busy = "/rest/api/3/issue/ACME-1";
    let at_vendor = |p: &str| fake.server.count(&format!("/ex/jira/cloud-acme{p}"));

    // The vendor's refusal reaches the worker as it was sent, its wait included.
    let refused = proxied(&http, &t, "PUT", busy).await;
    assert!(
        refused.status == 429 && !refused.local,
        "the vendor's own 429: {refused:?}"
    );
    assert_eq!(refused.retry_after, Some(30));
    // Every other call goes on to the vendor at once: other issues, reads, the same issue again
    // (the vendor judges it; the broker does not guess when that issue's limit ends).
    for (method, path) in [
        ("PUT", "/rest/api/3/issue/ACME-2"),
        ("GET", "/rest/api/3/search"),
        ("PUT", busy),
    ] {
        let before = at_vendor(path);
        let seen = proxied(&http, &t, method, path).await;
        assert!(
            !seen.local,
            "held back by the broker: {method} {path} {seen:?}"
        );
        assert_eq!(at_vendor(path), before + 1, "{method} {path}");
    }
    let s = system(&mut admin, "jira-i").await;
    assert_ne!(
        s.health,
        pb::SystemHealth::Degraded as i32,
        "{}",
        s.health_reason
    );
    let quota = s.quota.unwrap();
    assert!(quota.blocked_until.is_none(), "{quota:?}");
    // The per-issue limit's counts ("0 of 20 left") are not taken for the tenant's budget
    // (this fake's other answers carry none: unknown is -1).
    assert_eq!((quota.remaining, quota.limit), (-1, -1), "{quota:?}");
    assert!(
        fake.server.unexpected().is_empty(),
        "{:?}",
        fake.server.unexpected()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salesforce_concurrency_is_capped_under_a_hundred_workers_and_queued_calls_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSalesforce::start(SF_ID, SF_SECRET).await;
    fake.set_api_delay(Duration::from_millis(50));
    let mut config = test_config(dir.path());
    let cap = credbroker::broker::quota::LimitsOverride {
        max_concurrent: Some(5),
        ..Default::default()
    };
    config
        .quota
        .kinds
        .insert(credbroker::model::SystemKind::Salesforce, cap);
    // One system may not queue at all.
    let no_queue = credbroker::broker::quota::LimitsOverride {
        max_concurrent: Some(1),
        max_queue_wait_seconds: Some(0),
        ..Default::default()
    };
    config.quota.systems.insert("sf-tight".into(), no_queue);
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    for id in ["sf-cap", "sf-tight"] {
        let reg = proxied_system(
            id,
            pb::SystemKind::Salesforce,
            &fake.base_url,
            sf_cc(SF_SECRET),
        );
        register_checked(&mut admin, reg).await;
    }
    let t = lease(&mut admin, "sf-cap").await;
    let http = reqwest::Client::new();
    let mut workers = Vec::new();
    for _ in 0..100 {
        let (http, t) = (http.clone(), t.clone());
        workers.push(tokio::spawn(async move {
            proxied(&http, &t, "GET", "/services/data/v62.0/sobjects/Case").await
        }));
    }
    for w in workers {
        let seen = w.await.unwrap();
        assert_eq!(seen.status, 200, "queued calls are served: {seen:?}");
    }
    assert_eq!(fake.server.count(SF_SOBJECTS), 100);
    assert_eq!(
        fake.server.max_in_flight(),
        5,
        "at most the configured 5 at once, and 5 used"
    );

    // Without a queue, a call finding the only slot taken is refused locally at once.
    let t = lease(&mut admin, "sf-tight").await;
    let mut workers = Vec::new();
    for _ in 0..10 {
        let (http, t) = (http.clone(), t.clone());
        workers.push(tokio::spawn(async move {
            proxied(&http, &t, "GET", "/services/data/v62.0/sobjects/Case").await
        }));
    }
    let mut refused = 0;
    for w in workers {
        let seen = w.await.unwrap();
        match seen.status {
            200 => {}
            429 => {
                assert!(seen.local && seen.retry_after == Some(1), "{seen:?}");
                refused += 1;
            }
            other => panic!("{other}: {seen:?}"),
        }
    }
    assert!(refused > 0, "ten at once through one slot without a queue");
    let m = metrics(&broker).await;
    assert!(
        m.lines().any(|l| l.starts_with(
            "credbroker_proxy_local_refusals_total{kind=\"salesforce\",reason=\"concurrency\"}"
        ) && !l.ends_with(" 0")),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_never_retried_and_a_get_is_retried_only_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let fake = jira_fake().await;
    let (broker, mut admin) = retrying_jira(dir.path(), &fake, "jira-r", |_| ()).await;
    let t = lease(&mut admin, "jira-r").await;
    let http = reqwest::Client::new();
    let issue = "/rest/api/3/issue";
    let path = "/ex/jira/cloud-acme/rest/api/3/issue";

    // A read whose Retry-After (1 s) fits the bound (2 s): waited out and sent again once.
    fake.throttle_for(1);
    let got = proxied(&http, &t, "GET", issue).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(fake.server.count_method("GET", path), 2);

    // `Retry-After: 0`: the second the broker then holds the system back is waited out too,
    // not met by the retry as a local 429.
    fake.throttle_saying_zero(300);
    let got = proxied(&http, &t, "GET", issue).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(fake.server.count_method("GET", path), 4);

    // A write gets the vendor's 429 as it came: sent once, never again.
    fake.throttle_for(1);
    let posted = proxied(&http, &t, "POST", issue).await;
    assert!(posted.status == 429 && !posted.local, "{posted:?}");
    assert_eq!(fake.server.count_method("POST", path), 1);
    // While the vendor's pause runs, the next write is refused locally: still one at the vendor.
    let held = proxied(&http, &t, "POST", issue).await;
    assert!(held.status == 429 && held.local, "{held:?}");
    assert_eq!(fake.server.count_method("POST", path), 1);

    // A read whose Retry-After is past the bound is not retried.
    fake.throttle_for(5);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let long = proxied(&http, &t, "GET", issue).await;
    assert!(long.status == 429 && !long.local, "{long:?}");
    assert_eq!(fake.server.count_method("GET", path), 5);

    // A worker revoked while its read waits out the vendor's pause: nothing more is sent.
    let token = worker_token(&mut admin, "retry-worker").await;
    let mut worker = client(broker.addr, Some(&token)).await;
    // The pause above ends first.
    wait_unblocked(&mut admin, "jira-r").await;
    let wt = lease(&mut worker, "jira-r").await;
    let revoke = async {
        let name = "retry-worker".into();
        let req = pb::RevokeCallerRequest { name };
        admin.revoke_caller(req).await.unwrap();
    };
    refused_after_held_while(&fake, &wt, 6, revoke, "sent for a revoked caller").await;

    // A credential rotated while a read waits out the pause: the lease names the old version,
    // so nothing more is sent for it.
    wait_unblocked(&mut admin, "jira-r").await;
    let t = lease(&mut admin, "jira-r").await;
    let rotate = async {
        let req = pb::RotateCredentialRequest {
            system_id: "jira-r".into(),
            credential: Some(cc(SA_ID, SA_SECRET)),
            skip_check: true,
        };
        admin.rotate_credential(req).await.unwrap();
    };
    refused_after_held_while(
        &fake,
        &t,
        7,
        rotate,
        "sent under a rotated credential's lease",
    )
    .await;

    // The system switched to header delivery while a read waits: its leases are dead, so
    // nothing more is sent.
    wait_unblocked(&mut admin, "jira-r").await;
    let t = lease(&mut admin, "jira-r").await;
    let switch = async {
        let delivery = pb::Delivery::Header as i32;
        let req = pb::SetDeliveryRequest {
            system_id: "jira-r".into(),
            delivery,
        };
        admin.set_delivery(req).await.unwrap();
    };
    refused_after_held_while(
        &fake,
        &t,
        8,
        switch,
        "sent under a lease after the switch to header delivery",
    )
    .await;
}

/// A lease that expires while its read waits out the vendor's pause sends nothing more: the
/// worker gets the lapsed lease's 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_lapses_during_the_wait_sends_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let fake = jira_fake().await;
    let two_seconds = |c: &mut credbroker::config::Config| {
        c.proxy.lease_ttl = Duration::from_secs(2);
    };
    let (_broker, mut admin) = retrying_jira(dir.path(), &fake, "jira-l", two_seconds).await;
    // Leases are dated in whole seconds: this one lives two at most, and the read below waits
    // two after its first try.
    let t = lease(&mut admin, "jira-l").await;
    refused_after_held_while(&fake, &t, 1, async {}, "sent for a lapsed lease").await;
}

/// A read sent again after its wait goes with the system's headers as they are then: a token
/// that expired during the wait is not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_read_carries_the_token_current_after_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let fake = jira_fake().await;
    // Tokens live two seconds, as long as the vendor's pause below.
    fake.oauth(|o| o.access_lifetime = 2);
    let (_broker, mut admin) = retrying_jira(dir.path(), &fake, "jira-t", |_| ()).await;
    let t = lease(&mut admin, "jira-t").await;
    let http = reqwest::Client::new();
    fake.throttle_for(2);
    let got = proxied(&http, &t, "GET", "/rest/api/3/issue").await;
    assert_eq!(got.status, 200, "{got:?}");
    let path = "/ex/jira/cloud-acme/rest/api/3/issue";
    assert_eq!(fake.server.count_method("GET", path), 2);
}

/// A broker whose Jira Cloud systems send a read again after a `Retry-After` of up to two
/// seconds, with `id` registered there (proxy delivery, the service account), and its admin;
/// `tweak` changes the rest of the configuration.
async fn retrying_jira(
    dir: &std::path::Path,
    fake: &crate::fakes::FakeAtlassian,
    id: &str,
    tweak: fn(&mut credbroker::config::Config),
) -> (TestBroker, Client) {
    let mut config = crate::connect::jira_config(dir, fake);
    tweak(&mut config);
    let retry = credbroker::broker::quota::LimitsOverride {
        local_retry_after_max_seconds: Some(2),
        ..Default::default()
    };
    config
        .quota
        .kinds
        .insert(credbroker::model::SystemKind::JiraCloud, retry);
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    let reg = proxied_system(
        id,
        pb::SystemKind::JiraCloud,
        &fake.origin,
        cc(SA_ID, SA_SECRET),
    );
    register_checked(&mut admin, reg).await;
    (broker, admin)
}

/// A read the vendor answers with a two-second pause: `meanwhile` runs once its first try is
/// the vendor's `tries`-th read of the issue path; then the worker must get the lapsed lease's
/// 401 with nothing more sent (`what` says what was sent for, if something was).
async fn refused_after_held_while(
    fake: &crate::fakes::FakeAtlassian,
    t: &pb::GetAccessTokenResponse,
    tries: usize,
    meanwhile: impl std::future::Future<Output = ()>,
    what: &str,
) {
    fake.throttle_for(2);
    let t = t.clone();
    let pending = tokio::spawn(async move {
        proxied(&reqwest::Client::new(), &t, "GET", "/rest/api/3/issue").await
    });
    let path = "/ex/jira/cloud-acme/rest/api/3/issue";
    eventually(
        Duration::from_secs(5),
        "the first try at the vendor",
        || fake.server.count_method("GET", path) == tries,
    )
    .await;
    meanwhile.await;
    let refused = pending.await.unwrap();
    assert_eq!(refused.status, 401, "{refused:?}");
    assert_eq!(fake.server.count_method("GET", path), tries, "{what}");
}

/// Waits until the system's quota view shows no block.
async fn wait_unblocked(admin: &mut Client, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while system(admin, id)
        .await
        .quota
        .is_some_and(|q| q.blocked_until.is_some())
    {
        assert!(Instant::now() < deadline, "still blocked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
