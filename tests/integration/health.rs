//! Credential health and `WatchSystems` (issue 20): health derived with reasons, each change
//! announced once (recoveries too), expiry warnings at 30/7/1 days, resuming with a cursor,
//! too-old cursors, workers' scopes, and `credbrokerctl system health`.

use std::time::Duration;

use credbroker::pb;
use tonic::Code;

use crate::admin_cli::ctl_at;
use crate::support::*;

type Events = tonic::Streaming<pb::SystemEvent>;

async fn watch(c: &mut Client, after: &str) -> Result<Events, tonic::Status> {
    c.watch_systems(pb::WatchSystemsRequest {
        after: after.into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

/// The next event, within a generous bound (a missing event fails instead of hanging).
async fn next(events: &mut Events) -> pb::SystemEvent {
    tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .expect("no event within 10 s")
        .unwrap()
        .expect("the watch ended")
}

/// Events up to and including the registration of `marker`.
async fn until_registered(events: &mut Events, marker: &str) -> Vec<pb::SystemEvent> {
    until(events, |e| {
        e.r#type == "system.registered" && e.system.as_ref().is_some_and(|s| s.system_id == marker)
    })
    .await
}

/// The events up to and including the first that `done` accepts.
async fn until(
    events: &mut Events,
    done: impl Fn(&pb::SystemEvent) -> bool,
) -> Vec<pb::SystemEvent> {
    let mut seen = Vec::new();
    loop {
        let e = next(events).await;
        let last = done(&e);
        seen.push(e);
        if last {
            return seen;
        }
    }
}

fn summary(events: &[pb::SystemEvent]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e.r#type.clone(),
                e.system
                    .as_ref()
                    .map(|s| s.system_id.clone())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

fn health_of(e: &pb::SystemEvent) -> pb::SystemHealth {
    pb::SystemHealth::try_from(e.system.as_ref().map(|s| s.health).unwrap_or_default())
        .unwrap_or(pb::SystemHealth::Unspecified)
}

fn expiring_pat(token: &str, days: i64) -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::PersonalAccessToken(
            pb::PersonalAccessToken {
                token: token.into(),
                expires_at: Some(prost_types::Timestamp {
                    seconds: credbroker::model::unix_now() as i64 + days * 86_400,
                    nanos: 0,
                }),
                ..Default::default()
            },
        )),
    }
}

async fn check(admin: &mut Client, id: &str) -> pb::AuthCheck {
    admin
        .check_authentication(pb::CheckAuthenticationRequest {
            target: Some(pb::check_authentication_request::Target::SystemId(
                id.into(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .check
        .unwrap()
}

async fn register(admin: &mut Client, req: pb::RegisterSystemRequest) {
    admin.register_system(req).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_changes_are_announced_once_and_recoveries_too() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAsana::start().await;
    for pat in ["hpat-canary-a", "hpat-canary-b", "hpat-canary-c"] {
        fake.add_user(pat, "1201", "Proxy User", "proxy@example.com");
    }
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    register(
        &mut admin,
        register_asana("pre", &fake.base_url, "hpat-canary-a", false),
    )
    .await;
    let mut events = watch(&mut admin, "").await.unwrap();
    let snap = next(&mut events).await;
    assert_eq!(
        summary(std::slice::from_ref(&snap)),
        [("system.snapshot".into(), "pre".into())]
    );
    assert_eq!(health_of(&snap), pb::SystemHealth::Healthy);

    // A PAT 10 days from its expiry: registered expiring, warned once at the 30-day mark.
    let mut req = register_asana("exp", &fake.base_url, "x", true);
    req.credential = Some(expiring_pat("hpat-canary-b", 10));
    req.delivery = pb::Delivery::Proxy as i32;
    register(&mut admin, req).await;
    let seen = until_registered(&mut events, "exp").await;
    assert_eq!(summary(&seen), [("system.registered".into(), "exp".into())]);
    assert_eq!(health_of(&seen[0]), pb::SystemHealth::Expiring);
    let reason = seen[0].system.as_ref().unwrap().health_reason.clone();
    assert!(reason.contains("expires in 10 day(s)"), "{reason}");
    let warn = next(&mut events).await;
    assert_eq!(
        (
            warn.r#type.as_str(),
            warn.detail.contains("within 30 day(s)")
        ),
        ("credential.expiring", true)
    );

    // Rotated to a PAT 5 days out: the 7-day warning, once, then the rotation.
    admin
        .rotate_credential(pb::RotateCredentialRequest {
            system_id: "exp".into(),
            credential: Some(expiring_pat("hpat-canary-c", 5)),
            skip_check: false,
        })
        .await
        .unwrap();
    register(
        &mut admin,
        register_asana("m1", &fake.base_url, "hpat-canary-a", false),
    )
    .await;
    let seen = until_registered(&mut events, "m1").await;
    let types: Vec<_> = summary(&seen).into_iter().map(|(t, _)| t).collect();
    assert_eq!(
        types,
        [
            "credential.expiring",
            "credential.rotated",
            "system.registered"
        ]
    );
    assert!(
        seen[0].detail.contains("within 7 day(s)"),
        "{}",
        seen[0].detail
    );

    // A 401 storm through the proxy: degraded, announced once.
    fake.revoke("hpat-canary-c");
    let lease = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "exp".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let http = reqwest::Client::new();
    for _ in 0..20 {
        let r = http
            .get(format!("{}/users/me", lease.api_base_url))
            .header("authorization", &lease.headers[0].value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    // The 401s are counted in the background (a write a second): the change comes, once.
    let mut seen = until(&mut events, |e| e.r#type == "system.health_changed").await;
    register(
        &mut admin,
        register_asana("m2", &fake.base_url, "hpat-canary-a", false),
    )
    .await;
    seen.extend(until_registered(&mut events, "m2").await);
    let changes: Vec<_> = seen
        .iter()
        .filter(|e| e.r#type == "system.health_changed")
        .collect();
    assert_eq!(changes.len(), 1, "{:?}", summary(&seen));
    assert_eq!(health_of(changes[0]), pb::SystemHealth::Degraded);
    assert!(
        changes[0].detail.contains("401 through the proxy"),
        "{}",
        changes[0].detail
    );

    // A check that fails makes "pre" failing; fixed at the vendor, the next check recovers it.
    fake.revoke("hpat-canary-a");
    assert!(!check(&mut admin, "pre").await.ok);
    fake.add_user("hpat-canary-a", "1201", "Proxy User", "proxy@example.com");
    assert!(check(&mut admin, "pre").await.ok);
    admin
        .delete_system(pb::DeleteSystemRequest {
            system_id: "m1".into(),
        })
        .await
        .unwrap();
    register(
        &mut admin,
        register_asana("m3", &fake.base_url, "hpat-canary-a", false),
    )
    .await;
    let seen = until_registered(&mut events, "m3").await;
    let pre: Vec<_> = seen
        .iter()
        .filter(|e| e.system.as_ref().is_some_and(|s| s.system_id == "pre"))
        .map(|e| (e.r#type.as_str(), health_of(e)))
        .collect();
    assert_eq!(
        pre,
        [
            ("system.health_changed", pb::SystemHealth::Failing),
            ("check.completed", pb::SystemHealth::Failing),
            ("system.health_changed", pb::SystemHealth::Healthy),
            ("check.completed", pb::SystemHealth::Healthy),
        ]
    );
    assert!(seen
        .iter()
        .any(|e| e.r#type == "system.deleted"
            && e.system.as_ref().is_some_and(|s| s.system_id == "m1")));
    let text = format!("{seen:?}");
    for pat in ["hpat-canary-a", "hpat-canary-b", "hpat-canary-c", "cbl_"] {
        assert!(!text.contains(pat), "a secret or lease is in an event");
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_resume_from_a_cursor_refuse_old_ones_and_respect_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAsana::start().await;
    fake.add_user("wpat-1", "1201", "Proxy User", "proxy@example.com");
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    for id in ["a-1", "b-1"] {
        register(
            &mut admin,
            register_asana(id, &fake.base_url, "wpat-1", false),
        )
        .await;
    }
    let token = admin
        .create_caller(pb::CreateCallerRequest {
            name: "w".into(),
            role: pb::CallerRole::Worker as i32,
            system_patterns: vec!["a-*".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut worker = client(broker.addr, Some(&token)).await;
    let mut seen_by_worker = watch(&mut worker, "").await.unwrap();
    assert_eq!(
        summary(&[next(&mut seen_by_worker).await]),
        [("system.snapshot".into(), "a-1".into())]
    );

    let mut events = watch(&mut admin, "").await.unwrap();
    let mut cursor = String::new();
    for _ in 0..2 {
        cursor = next(&mut events).await.cursor;
    }
    drop(events);
    // While nobody watches: a registration and a deletion.
    register(
        &mut admin,
        register_asana("b-2", &fake.base_url, "wpat-1", false),
    )
    .await;
    register(
        &mut admin,
        register_asana("a-2", &fake.base_url, "wpat-1", false),
    )
    .await;
    admin
        .delete_system(pb::DeleteSystemRequest {
            system_id: "b-1".into(),
        })
        .await
        .unwrap();
    let mut resumed = watch(&mut admin, &cursor).await.unwrap();
    let got = vec![
        next(&mut resumed).await,
        next(&mut resumed).await,
        next(&mut resumed).await,
    ];
    assert_eq!(
        summary(&got),
        [
            ("system.registered".into(), "b-2".into()),
            ("system.registered".into(), "a-2".into()),
            ("system.deleted".into(), "b-1".into()),
        ]
    );
    // The scoped worker saw only its own system's registration.
    let mine = next(&mut seen_by_worker).await;
    // Workers get what GetAccessToken tells them anyway, not an admin's view of the system.
    let sys = mine.system.clone().unwrap();
    assert!(sys.base_url.is_empty() && sys.last_check.is_none() && sys.health_reason.is_empty());
    assert_eq!(
        summary(&[mine]),
        [("system.registered".into(), "a-2".into())]
    );
    // A revoked worker's watch ends.
    admin
        .revoke_caller(pb::RevokeCallerRequest { name: "w".into() })
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(15), seen_by_worker.message())
        .await
        .expect("the revoked worker's watch went on");
    assert_eq!(ended.unwrap_err().code(), Code::PermissionDenied);

    for (after, code) in [
        ("000000000000.1", Code::OutOfRange),
        ("not-a-cursor", Code::InvalidArgument),
    ] {
        let e = watch(&mut admin, after)
            .await
            .err()
            .unwrap_or_else(|| panic!("{after} accepted"));
        assert_eq!(e.code(), code, "{after}: {}", e.message());
    }
    // A filter naming more kinds than there are (each costs every event a scan) is refused.
    let many = admin
        .watch_systems(pb::WatchSystemsRequest {
            kinds: vec![pb::SystemKind::Asana as i32; 9],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(many.code(), Code::InvalidArgument, "{}", many.message());

    // The CLI lists health worst first.
    fake.revoke("wpat-1");
    assert!(!check(&mut admin, "b-2").await.ok);
    let (addr, data) = (broker.addr, broker.data_dir.clone());
    let out = tokio::task::block_in_place(|| {
        ctl_at(addr, &data, &["--output", "json", "system", "health"], None)
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(
        (lines[0]["system_id"].as_str(), lines[0]["health"].as_str()),
        (Some("b-2"), Some("failing"))
    );
    assert!(lines[0]["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("last check failed"));
    assert!(lines[1..].iter().all(|l| l["health"] == "healthy"));
    broker.stop().await;
}

/// Time alone moves a horizon: with no write at all, the sweep announces the 30-day crossing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_announces_a_horizon_crossed_by_time_alone() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAsana::start().await;
    fake.add_user("spat-1", "1201", "Proxy User", "proxy@example.com");
    let mut config = test_config(dir.path());
    config.refresh.keepalive_interval = Duration::from_millis(200);
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    let mut events = watch(&mut admin, "").await.unwrap();
    // Two seconds outside the 30-day window.
    let mut cred = expiring_pat("spat-1", 30);
    if let Some(pb::credential::Credential::PersonalAccessToken(p)) = &mut cred.credential {
        if let Some(t) = &mut p.expires_at {
            t.seconds += 2;
        }
    }
    let mut req = register_asana("soon", &fake.base_url, "x", false);
    req.credential = Some(cred);
    register(&mut admin, req).await;
    let registered = next(&mut events).await;
    assert_eq!(health_of(&registered), pb::SystemHealth::Healthy);
    let changed = next(&mut events).await;
    assert_eq!(changed.r#type, "system.health_changed");
    assert_eq!(health_of(&changed), pb::SystemHealth::Expiring);
    let warned = next(&mut events).await;
    assert_eq!(warned.r#type, "credential.expiring");
    // Once: the next sweeps find nothing new (a marker registration comes next).
    register(
        &mut admin,
        register_asana("marker", &fake.base_url, "spat-1", false),
    )
    .await;
    let after = until_registered(&mut events, "marker").await;
    assert_eq!(
        summary(&after),
        [("system.registered".into(), "marker".into())]
    );
    broker.stop().await;
}

/// One request a receiver saw: headers, body, the status it answered.
type Seen = (axum::http::HeaderMap, Vec<u8>, u16);

/// A webhook receiver: records every request; answers 503 (or `down_status`) while `down`.
#[derive(Clone, Default)]
pub(crate) struct Receiver {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    pub(crate) down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub(crate) down_status: std::sync::Arc<std::sync::atomic::AtomicU16>,
}

impl Receiver {
    pub(crate) async fn start(self, bind: &str) -> String {
        let me = self.clone();
        let app = axum::Router::new().fallback(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let me = me.clone();
                async move {
                    let status = if me.down.load(std::sync::atomic::Ordering::SeqCst) {
                        match me.down_status.load(std::sync::atomic::Ordering::SeqCst) {
                            0 => 503,
                            s => s,
                        }
                    } else {
                        200
                    };
                    me.seen
                        .lock()
                        .unwrap()
                        .push((headers, body.to_vec(), status));
                    axum::http::StatusCode::from_u16(status).unwrap()
                }
            },
        );
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/hooks/credbroker")
    }

    /// The bodies of the deliveries answered 2xx, in order.
    pub(crate) fn bodies(&self) -> Vec<serde_json::Value> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, status)| *status == 200)
            .map(|(_, body, _)| serde_json::from_slice(body).unwrap())
            .collect()
    }

    pub(crate) fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// (id, type, system id) of the deliveries answered 2xx, in order.
    pub(crate) fn delivered(&self, key: &[u8]) -> Vec<(String, String, String)> {
        let now = credbroker::model::unix_now();
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, status)| *status == 200)
            .map(|(h, body, _)| {
                let get = |n: &str| {
                    h.get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                let (id, ts) = (get("webhook-id"), get("webhook-timestamp"));
                let ts_n: u64 = ts.parse().unwrap();
                assert!(now.abs_diff(ts_n) < 300, "timestamp {ts} is not current");
                let want = credbroker::server::webhooks::signature(key, &id, ts_n, body);
                assert!(
                    get("webhook-signature").split(' ').any(|s| s == want),
                    "bad signature"
                );
                let v: serde_json::Value = serde_json::from_slice(body).unwrap();
                // RFC 3339 in UTC, as Standard Webhooks' payloads carry it.
                let at = v["timestamp"].as_str().unwrap();
                assert!(
                    at.len() == 24 && at.as_bytes()[10] == b'T' && at.ends_with('Z'),
                    "timestamp {at}"
                );
                (
                    id,
                    v["type"].as_str().unwrap().to_owned(),
                    v["data"]["system_id"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_until_delivered_once_and_kept_off_refused_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAsana::start().await;
    fake.add_user("whpat-canary", "1201", "Proxy User", "proxy@example.com");
    let (all, deleted_only, blocked) = (
        Receiver::default(),
        Receiver::default(),
        Receiver::default(),
    );
    all.down.store(true, std::sync::atomic::Ordering::SeqCst);
    // Mid-rotation: a new secret and the old one the receiver still checks with.
    let secret = "whsec_bmV3LXNlY3JldA==\nwhsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let key = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    )
    .unwrap();
    let hook = |url: String, events: &[&str]| credbroker::config::WebhookConfig {
        url,
        secret: credbroker::secret::SecretString::from(secret),
        events: events.iter().map(|e| e.to_string()).collect(),
    };
    let mut config = test_config(dir.path());
    config.webhooks = vec![
        hook(all.clone().start("127.0.0.1:0").await, &[]),
        hook(
            deleted_only.clone().start("127.0.0.1:0").await,
            &["system.deleted"],
        ),
        // Outside the egress allow-list (127.0.0.1/32): never contacted.
        hook(blocked.clone().start("127.0.0.2:0").await, &[]),
    ];
    let broker = TestBroker::start_with(config.clone()).await;
    let mut admin = broker.admin().await;
    for id in ["h-1", "h-2"] {
        register(
            &mut admin,
            register_asana(id, &fake.base_url, "whpat-canary", false),
        )
        .await;
    }
    admin
        .delete_system(pb::DeleteSystemRequest {
            system_id: "h-1".into(),
        })
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "a first attempt at the endpoint that is down",
        || all.count() >= 1,
    )
    .await;
    // A restart while the receiver is down loses nothing: delivery resumes from the stored
    // cursor, and what was delivered before is not sent again.
    broker.stop().await;
    // Back with its signing secret half rotated: 401 to everything, and nothing is lost.
    all.down_status
        .store(401, std::sync::atomic::Ordering::SeqCst);
    let refused = all.count();
    let broker = TestBroker::start_with(config).await;
    eventually(Duration::from_secs(10), "an attempt answered 401", || {
        all.count() > refused
    })
    .await;
    // Counted apart from an outage (after the answer came back: polled).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = reqwest::get(format!("http://{}/metrics", broker.http_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let unauthorized = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix("credbroker_webhook_deliveries_total{outcome=\"unauthorized\"} ")
            })
            .and_then(|n| n.parse::<u64>().ok());
        if unauthorized >= Some(1) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    all.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let want = [
        ("system.registered", "h-1"),
        ("system.registered", "h-2"),
        ("system.deleted", "h-1"),
    ];
    eventually(
        Duration::from_secs(20),
        "every event delivered after the outage",
        || all.delivered(&key).len() >= 3,
    )
    .await;
    let got = all.delivered(&key);
    let kinds: Vec<(&str, &str)> = got
        .iter()
        .map(|(_, t, s)| (t.as_str(), s.as_str()))
        .collect();
    assert_eq!(kinds, want, "in order, each once");
    let ids: std::collections::HashSet<_> = got.iter().map(|(id, _, _)| id.clone()).collect();
    assert_eq!(ids.len(), 3, "no event delivered twice");
    eventually(
        Duration::from_secs(10),
        "the filtered endpoint's one event",
        || deleted_only.delivered(&key).len() == 1,
    )
    .await;
    assert_eq!(deleted_only.delivered(&key)[0].1, "system.deleted");
    assert_eq!(blocked.count(), 0, "a refused address was contacted");
    let bodies = format!(
        "{:?}",
        all.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b, _)| String::from_utf8_lossy(b).to_string())
            .collect::<Vec<_>>()
    );
    assert!(
        !bodies.contains("whpat-canary"),
        "a secret is in a webhook body"
    );
    broker.stop().await;
}

/// An Asana stand-in that answers `users/me` after 100 ms and records how many calls it had
/// in flight at once; PATs in `revoked` get 401.
#[derive(Clone, Default)]
struct SlowAsana {
    in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    peak: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    revoked: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl SlowAsana {
    async fn start(self) -> String {
        use std::sync::atomic::Ordering::SeqCst;
        let me = self.clone();
        let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
            let me = me.clone();
            async move {
                let now = me.in_flight.fetch_add(1, SeqCst) + 1;
                me.peak.fetch_max(now, SeqCst);
                me.calls.fetch_add(1, SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                me.in_flight.fetch_sub(1, SeqCst);
                let pat = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .trim_start_matches("Bearer ")
                    .to_owned();
                if me.revoked.lock().unwrap().contains(&pat) {
                    return (
                        axum::http::StatusCode::UNAUTHORIZED,
                        axum::Json(serde_json::json!({"errors":[{"message":"Not Authorized"}]})),
                    );
                }
                (
                    axum::http::StatusCode::OK,
                    axum::Json(serde_json::json!({"data": {"gid": "1201", "name": "Proxy User", "email": "proxy@example.com"}})),
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/api/1.0")
    }
}

/// Scheduled checks come due on their own, never exceed the per-vendor limit, and a proxy user
/// that lost its access turns up as a failing system with its event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_checks_respect_the_vendor_limit_and_find_lost_access() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let vendor = SlowAsana::default();
    let base = vendor.clone().start().await;
    let mut config = test_config(dir.path());
    config.refresh.keepalive_interval = Duration::from_millis(100);
    config.refresh.check_interval = Duration::from_secs(1);
    config.refresh.checks_per_vendor = 2;
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    for i in 0..12 {
        let mut req = register_asana(&format!("sched-{i}"), &base, "x", false);
        req.credential = Some(pat(&format!("schedpat-{i}")));
        register(&mut admin, req).await;
    }
    let mut events = watch(&mut admin, "").await.unwrap();
    for _ in 0..12 {
        assert_eq!(next(&mut events).await.r#type, "system.snapshot");
    }
    vendor.revoked.lock().unwrap().insert("schedpat-7".into());
    // Every system gets its scheduled check; sched-7 fails and says so.
    let mut checked = std::collections::HashSet::new();
    let mut failing = None;
    while checked.len() < 12 || failing.is_none() {
        let e = next(&mut events).await;
        let id = e
            .system
            .as_ref()
            .map(|s| s.system_id.clone())
            .unwrap_or_default();
        match e.r#type.as_str() {
            "check.completed" => {
                checked.insert(id);
            }
            "system.health_changed" if health_of(&e) == pb::SystemHealth::Failing => {
                failing = Some(id)
            }
            _ => {}
        }
    }
    assert_eq!(failing.as_deref(), Some("sched-7"));
    assert!(vendor.calls.load(SeqCst) >= 12);
    // The next rounds find nothing new: a scheduled check that changes nothing is recorded but
    // not announced (an admin's check always is).
    let calls = vendor.calls.load(SeqCst);
    eventually(Duration::from_secs(20), "a second round of checks", || {
        vendor.calls.load(SeqCst) >= calls + 12
    })
    .await;
    register(
        &mut admin,
        register_asana("sched-marker", &base, "x", false),
    )
    .await;
    let quiet = until_registered(&mut events, "sched-marker").await;
    assert!(
        !quiet.iter().any(|e| e.r#type == "check.completed"),
        "{:?}",
        summary(&quiet)
    );
    assert!(
        vendor.peak.load(SeqCst) <= 2,
        "the vendor saw {} checks at once; the limit is 2",
        vendor.peak.load(SeqCst)
    );
    // An admin's check (not limited by the schedule) is always announced.
    check(&mut admin, "sched-3").await;
    let e = next(&mut events).await;
    assert_eq!(
        summary(&[e]),
        [("check.completed".into(), "sched-3".into())]
    );
    broker.stop().await;
}

/// Longer than the 2 s a short horizon needs to cross its next threshold, plus sweeps.
const WAIT: Duration = Duration::from_millis(3_000);

/// Type, system, health and the warning's day count of each event: what a horizon test asserts.
fn traced(events: &[pb::SystemEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            let days = ["30", "7", "1"]
                .into_iter()
                .find(|d| e.detail.contains(&format!("within {d} day(s)")))
                .unwrap_or("-");
            format!(
                "{} {} {:?} {days}",
                e.r#type,
                e.system
                    .as_ref()
                    .map(|s| s.system_id.as_str())
                    .unwrap_or(""),
                health_of(e)
            )
        })
        .collect()
}

/// After `wait` (time for the sweeps, every 200 ms, to act), a marker registration: whatever
/// came before it is all there was.
async fn settle(
    admin: &mut Client,
    events: &mut Events,
    (base_url, marker): (&str, &str),
    wait: Duration,
) -> Vec<String> {
    tokio::time::sleep(wait).await;
    register(admin, register_asana(marker, base_url, "spat-1", false)).await;
    let seen = until_registered(events, marker).await;
    traced(&seen[..seen.len() - 1])
}

/// A ServiceNow refresh token's lifespan is not in any response: the broker counts it from the
/// password grant, warns at 30 days (at once here: the configured lifespan is 7 days and 2 s) and
/// at 7 days when time alone crosses it, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servicenow_refresh_token_nearing_its_lifespan_is_announced_once_per_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let sn = crate::oauth::servicenow(3600).await;
    let asana = FakeAsana::start().await;
    asana.add_user("spat-1", "1201", "Proxy User", "proxy@example.com");
    let mut config = test_config(dir.path());
    config.refresh.keepalive_interval = Duration::from_millis(200);
    config.vendors.servicenow_refresh_token_lifespan = Duration::from_secs(7 * 86_400 + 2);
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    let mut events = watch(&mut admin, "").await.unwrap();
    register(
        &mut admin,
        crate::oauth::sn_register("sn", &sn.base_url, crate::oauth::password_grant(), false),
    )
    .await;
    let first = settle(&mut admin, &mut events, (&asana.base_url, "m1"), WAIT).await;
    assert_eq!(
        first,
        [
            "system.registered sn Expiring -",
            "credential.expiring sn Expiring 30",
            "credential.expiring sn Expiring 7",
        ]
    );
    let reason = crate::connect::system(&mut admin, "sn").await.health_reason;
    assert!(
        reason.contains("refresh token expires in 7 day(s)"),
        "{reason}"
    );
    assert!(reason.contains("password grant"), "{reason}");
    // Nothing more while the horizon stays where it is.
    assert_eq!(
        settle(&mut admin, &mut events, (&asana.base_url, "m2"), WAIT).await,
        Vec::<String>::new()
    );
    broker.stop().await;
}

/// An idle Atlassian grant is kept alive by the sweep; when the keep-alive refresh stops getting
/// through, the system is degraded (refreshes failing) and the grant's 90-day idle limit (3 days
/// and 2 s here) becomes a horizon: warned once at 7 days; when refreshes get through again the
/// limit moves back and the recovery is announced, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_atlassian_grant_near_its_limit_is_announced_and_recovers() {
    use crate::connect::{
        atlassian, authz_code, browse, jira_config, start, JIRA_CLIENT, JIRA_SECRET,
    };
    let dir = tempfile::tempdir().unwrap();
    let fake = atlassian().await;
    let asana = FakeAsana::start().await;
    asana.add_user("spat-1", "1201", "Proxy User", "proxy@example.com");
    let mut config = jira_config(dir.path(), &fake);
    config.refresh.keepalive_interval = Duration::from_millis(200);
    config.vendors.jira_refresh_idle_limit = Duration::from_secs(3 * 86_400 + 2);
    config.refresh.retry_max = Duration::from_millis(500);
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(crate::connect::register(
            "jira",
            pb::SystemKind::JiraCloud,
            "https://acme.atlassian.net/",
            authz_code(JIRA_CLIENT, JIRA_SECRET),
        ))
        .await
        .unwrap();
    let s = start(&mut admin, "jira").await;
    assert_eq!(browse(&s.authorize_url).await.1, 200);
    fake.oauth(|o| o.token_mode = Mode::ServerError);
    let mut events = watch(&mut admin, "").await.unwrap();
    let failing = settle(&mut admin, &mut events, (&asana.base_url, "m1"), WAIT).await;
    assert_eq!(
        failing,
        [
            "system.snapshot jira Healthy -",
            "system.health_changed jira Degraded -",
            "credential.expiring jira Degraded 7",
        ]
    );
    let reason = crate::connect::system(&mut admin, "jira")
        .await
        .health_reason;
    assert!(
        reason.contains("token refreshes have been failing"),
        "{reason}"
    );
    // Refreshes get through again: the sweep pushes the idle limit back; recovered, once.
    fake.oauth(|o| o.token_mode = Mode::Normal);
    let recovered = settle(&mut admin, &mut events, (&asana.base_url, "m2"), WAIT).await;
    assert_eq!(recovered, ["system.health_changed jira Healthy -"]);
    broker.stop().await;
}

/// One caller holds at most 16 watches at once (each is a live feed and a task on the broker);
/// the 17th is refused with RESOURCE_EXHAUSTED, and a watch that ends frees its slot. Another
/// caller is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_holds_a_bounded_number_of_watches() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let mut open = Vec::new();
    for _ in 0..credbroker::broker::watch::MAX_WATCHES_PER_CALLER {
        open.push(watch(&mut admin, "").await.unwrap());
    }
    let refused = watch(&mut admin, "").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("watches open"),
        "{}",
        refused.message()
    );
    let token = admin
        .create_caller(pb::CreateCallerRequest {
            name: "w-watch".into(),
            role: pb::CallerRole::Worker as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut worker = client(broker.addr, Some(&token)).await;
    assert!(
        watch(&mut worker, "").await.is_ok(),
        "another caller is not limited"
    );
    drop(open.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match watch(&mut admin, "").await {
            Ok(w) => {
                open.push(w);
                break;
            }
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the slot was never freed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    broker.stop().await;
}

/// A watch resuming from further back than the broker keeps in memory (4,096 events) reads the
/// rest from the store's log: every event after its cursor arrives once, in order, and then
/// the live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_older_than_memory_is_served_from_the_store_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAsana::start().await;
    fake.add_user("deep-pat", "1201", "Proxy User", "proxy@example.com");
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    // One system per checking client: checks of one system at once would race for its record.
    for t in 0..16 {
        let id = format!("deep-{t}");
        register(
            &mut admin,
            register_asana(&id, &fake.base_url, "deep-pat", false),
        )
        .await;
    }
    let mut events = watch(&mut admin, "").await.unwrap();
    register(
        &mut admin,
        register_asana("deep", &fake.base_url, "deep-pat", false),
    )
    .await;
    let start = loop {
        let e = next(&mut events).await;
        if e.r#type == "system.registered" {
            break e;
        }
    };
    drop(events);
    let n = credbroker::broker::events::MAX_EVENTS + 300;
    let mut tasks = Vec::new();
    for t in 0..16 {
        let mut c = broker.admin().await;
        tasks.push(tokio::spawn(async move {
            for _ in (t..n).step_by(16) {
                check(&mut c, &format!("deep-{t}")).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut resumed = watch(&mut admin, &start.cursor).await.unwrap();
    let seq =
        |e: &pb::SystemEvent| -> u64 { e.cursor.rsplit('.').next().unwrap().parse().unwrap() };
    let mut last = seq(&start);
    for i in 0..n {
        let e = next(&mut resumed).await;
        assert_eq!(e.r#type, "check.completed", "event {i}");
        assert_eq!(seq(&e), last + 1, "event {i} out of order or missing");
        last = seq(&e);
    }
    register(
        &mut admin,
        register_asana("deep-live", &fake.base_url, "deep-pat", false),
    )
    .await;
    let live = next(&mut resumed).await;
    assert_eq!(
        summary(&[live]),
        [("system.registered".into(), "deep-live".into())]
    );
    broker.stop().await;
}
