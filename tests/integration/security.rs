//! Who may ask for what, the egress guard, the audit trail, and tamper evidence.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use credbroker::pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::support::*;

const PAT: &str = "asana-pat-security-1";

fn worker_req(
    name: &str,
    patterns: &[&str],
    kinds: &[pb::SystemKind],
    expires_at: Option<i64>,
) -> pb::CreateCallerRequest {
    pb::CreateCallerRequest {
        name: name.into(),
        role: pb::CallerRole::Worker as i32,
        system_patterns: patterns.iter().map(|s| s.to_string()).collect(),
        kinds: kinds.iter().map(|k| *k as i32).collect(),
        expires_at: expires_at.map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
    }
}

fn tok(id: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        system_id: id.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAsana::start().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    for id in ["acme-asana", "globex-asana"] {
        admin
            .register_system(register_asana(id, &fake.base_url, PAT, false))
            .await
            .unwrap();
    }
    let by_id = admin
        .create_caller(worker_req("acme-worker", &["acme-*"], &[], None))
        .await
        .unwrap()
        .into_inner()
        .token;
    let by_kind = admin
        .create_caller(worker_req(
            "zd-worker",
            &[],
            &[pb::SystemKind::Zendesk],
            None,
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    let soon = credbroker::model::unix_now() as i64 + 2;
    let expiring = admin
        .create_caller(worker_req("short-lived", &[], &[], Some(soon)))
        .await
        .unwrap()
        .into_inner()
        .token;
    let revoked = admin
        .create_caller(worker_req("gone", &[], &[], None))
        .await
        .unwrap()
        .into_inner()
        .token;
    admin
        .revoke_caller(pb::RevokeCallerRequest {
            name: "gone".into(),
        })
        .await
        .unwrap();

    let mut acme = client(broker.addr, Some(&by_id)).await;
    let mut zd = client(broker.addr, Some(&by_kind)).await;
    let code = |r: Result<tonic::Response<pb::GetAccessTokenResponse>, tonic::Status>| {
        r.map(|_| Code::Ok).unwrap_or_else(|e| e.code())
    };
    // In scope.
    assert_eq!(
        code(acme.get_access_token(tok("acme-asana")).await),
        Code::Ok
    );
    // Out of scope, existing or not: the same answer, no existence leak.
    let e1 = acme
        .get_access_token(tok("globex-asana"))
        .await
        .unwrap_err();
    let e2 = acme
        .get_access_token(tok("globex-nonexistent"))
        .await
        .unwrap_err();
    assert_eq!(
        (e1.code(), e2.code()),
        (Code::PermissionDenied, Code::PermissionDenied)
    );
    // In-pattern but unknown: NOT_FOUND reveals nothing beyond the caller's scope.
    assert_eq!(
        code(acme.get_access_token(tok("acme-missing")).await),
        Code::NotFound
    );
    // Kind-scoped: an Asana system and an unknown one look alike.
    let e1 = zd.get_access_token(tok("acme-asana")).await.unwrap_err();
    let e2 = zd
        .get_access_token(tok("no-such-system"))
        .await
        .unwrap_err();
    assert_eq!(
        (e1.code(), e2.code()),
        (Code::PermissionDenied, Code::PermissionDenied)
    );
    assert_eq!(
        e1.message().replace("acme-asana", "X"),
        e2.message().replace("no-such-system", "X")
    );
    // Revoked and expired tokens.
    let mut gone = client(broker.addr, Some(&revoked)).await;
    assert_eq!(
        code(gone.get_access_token(tok("acme-asana")).await),
        Code::Unauthenticated
    );
    let mut short = client(broker.addr, Some(&expiring)).await;
    assert_eq!(
        code(short.get_access_token(tok("acme-asana")).await),
        Code::Ok
    );
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    let e = short.get_access_token(tok("acme-asana")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("expired"));
    // Admins are never scoped, and admin scopes are refused.
    assert_eq!(
        code(admin.get_access_token(tok("globex-asana")).await),
        Code::Ok
    );
    let mut bad = worker_req("scoped-admin", &["acme-*"], &[], None);
    bad.role = pb::CallerRole::Admin as i32;
    assert_eq!(
        admin.create_caller(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // Every call is checked against its caller's scope, so a scope stays small: 64 patterns
    // at most, each kind kept once.
    let many: Vec<String> = (0..65).map(|i| format!("p{i}-*")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let e = admin
        .create_caller(worker_req("wide", &refs, &[], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("64"), "{}", e.message());
    let jira = pb::SystemKind::JiraCloud;
    let repeated = worker_req("repeated", &refs[..64], &[jira, jira, jira], None);
    admin.create_caller(repeated).await.unwrap();
    let listed = admin
        .list_callers(pb::ListCallersRequest {})
        .await
        .unwrap()
        .into_inner()
        .callers;
    assert!(
        !listed.iter().any(|c| c.name == "wide"),
        "a refused caller was stored"
    );
    let repeated = listed.iter().find(|c| c.name == "repeated").unwrap();
    assert_eq!(
        (repeated.system_patterns.len(), repeated.kinds.len()),
        (64, 1)
    );
    let acme_caller = listed.iter().find(|c| c.name == "acme-worker").unwrap();
    assert_eq!(acme_caller.system_patterns, ["acme-*"]);
    broker.stop().await;
}

/// A loopback listener that counts connections: the guard must keep it at zero.
async fn canary() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = l.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
        }
    });
    (addr, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssrf_matrix_is_refused_and_the_allow_list_admits_one_host() {
    let dir = tempfile::tempdir().unwrap();
    let (canary_addr, hits) = canary().await;
    let mut config = test_config(dir.path());
    config.egress.allow = Default::default();
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    let port = canary_addr.port();
    let urls = [
        format!("http://127.0.0.1:{port}/api/1.0"),
        format!("http://localhost:{port}/api/1.0"),
        format!("http://[::1]:{port}/"),
        "http://0.0.0.0/".to_owned(),
        "http://10.0.0.1/".to_owned(),
        "http://172.16.0.1/".to_owned(),
        "http://192.168.1.1/".to_owned(),
        "http://169.254.169.254/latest/meta-data".to_owned(),
        "http://[fd00:ec2::254]/".to_owned(),
        "http://100.64.0.1/".to_owned(),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        format!("http://2130706433:{port}/"),
        format!("http://0x7f.1:{port}/"),
        format!("http://user@127.0.0.1:{port}/"),
        "file:///etc/passwd".to_owned(),
        "gopher://127.0.0.1/".to_owned(),
    ];
    for url in &urls {
        for check in [false, true] {
            let e = admin
                .register_system(register_asana("ssrf", url, PAT, check))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{url}: {}", e.message());
        }
        let c = admin
            .check_authentication(pb::CheckAuthenticationRequest {
                target: Some(pb::check_authentication_request::Target::Candidate(
                    pb::CandidateSystem {
                        kind: pb::SystemKind::Asana as i32,
                        base_url: url.clone(),
                        credential: Some(pat(PAT)),
                    },
                )),
            })
            .await
            .unwrap_err();
        assert_eq!(c.code(), Code::InvalidArgument, "{url}");
    }
    // Plain http when it is not allowed.
    broker.stop().await;
    let mut strict = test_config(dir.path());
    strict.egress.allow_http = false;
    let broker = TestBroker::start_with(strict).await;
    let mut admin = broker.admin().await;
    let e = admin
        .register_system(register_asana(
            "plain",
            &format!("http://127.0.0.1:{port}/api/1.0"),
            PAT,
            false,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    broker.stop().await;
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the canary was contacted");

    // The allow-list admits exactly the listed private host: the check connects to the canary.
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let resp = admin
        .register_system(register_asana(
            "allowed",
            &format!("http://127.0.0.1:{port}/api/1.0"),
            PAT,
            false,
        ))
        .await
        .unwrap();
    assert_eq!(
        resp.into_inner().system.unwrap().base_url,
        format!("http://127.0.0.1:{port}/api/1.0")
    );
    let _ = admin
        .check_authentication(pb::CheckAuthenticationRequest {
            target: Some(pb::check_authentication_request::Target::SystemId(
                "allowed".into(),
            )),
        })
        .await
        .unwrap();
    assert!(
        hits.load(Ordering::SeqCst) >= 1,
        "the allow-listed host was not contacted"
    );
    broker.stop().await;

    // Records pre-seeded with such URLs fail at call time, without a connection.
    let before = hits.load(Ordering::SeqCst);
    {
        use credbroker::store::{AuthenticatedStore, CredentialStore, SledStore};
        // Written as the broker writes (tagged under the master key), as when an earlier
        // egress policy allowed these hosts.
        let (key, _) =
            credbroker::crypto::keys::MasterKey::load_or_generate(None, dir.path(), true).unwrap();
        let integrity = credbroker::crypto::Keyring::new(key).derive_subkey("record-integrity");
        let store = AuthenticatedStore::new(
            std::sync::Arc::new(SledStore::open(dir.path()).unwrap()),
            integrity,
        );
        let mut r = store.get_system("allowed").await.unwrap().unwrap();
        for (id, url) in [
            ("seeded-metadata", "http://169.254.169.254/api"),
            (
                "seeded-loopback",
                &*format!("http://127.0.0.1:{port}/api/1.0"),
            ),
        ] {
            r.system_id = id.into();
            r.base_url = url.into();
            // The sealed credential is bound to "allowed"; seed a fresh one through the API
            // instead when decryption matters. Here the guard must refuse before decrypting.
            store.insert_system(&r).await.unwrap();
        }
    }
    let mut config = test_config(dir.path());
    config.egress.allow = Default::default();
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    for id in ["seeded-metadata", "seeded-loopback", "allowed"] {
        let e = admin.get_access_token(tok(id)).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{id}: {}", e.message());
        assert!(e.message().contains("egress guard"), "{}", e.message());
    }
    let c = admin
        .check_authentication(pb::CheckAuthenticationRequest {
            target: Some(pb::check_authentication_request::Target::SystemId(
                "allowed".into(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .check
        .unwrap();
    assert!(!c.ok);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        before,
        "a refused destination was contacted"
    );
    broker.stop().await;
}

fn audit_events(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Unauthenticated refusals reach the trail at most 50 a second; a flood of them cannot keep an
/// authenticated caller's refusal out (a worker calling an admin RPC), and a caller whose token
/// expired is named. (The flood and the refusal may straddle a second, so a broken build could
/// pass by chance; the expired caller's name cannot.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_callers_refusals_are_audited_through_an_anonymous_flood() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let create = |name, expires| worker_req(name, &["x"], &[], expires);
    let token = |r: pb::CreateCallerResponse| r.token;
    let w = admin
        .create_caller(create("flood-worker", None))
        .await
        .unwrap();
    let mut worker = client(broker.addr, Some(&token(w.into_inner()))).await;
    let soon = Some(credbroker::model::unix_now() as i64 + 2);
    let b = admin
        .create_caller(create("brief-worker", soon))
        .await
        .unwrap();
    let mut brief = client(broker.addr, Some(&token(b.into_inner()))).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let unauthenticated =
        |r: Result<_, tonic::Status>| matches!(r, Err(e) if e.code() == Code::Unauthenticated);
    while !unauthenticated(brief.get_access_token(tok("x")).await) {
        assert!(
            std::time::Instant::now() < deadline,
            "the token never expired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The loop's last refusal named the expired caller (within the anonymous budget: holding
    // an old token gives no right to write the trail at will). Then the flood, around a
    // worker's refusal.
    let anon = client(broker.addr, Some("cbt_not-a-caller")).await;
    let flood = || {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..80 {
            let mut a = anon.clone();
            calls.spawn(async move { a.list_systems(pb::ListSystemsRequest::default()).await });
        }
        calls.join_all()
    };
    flood().await;
    let denied = worker.list_systems(pb::ListSystemsRequest::default()).await;
    assert_eq!(denied.unwrap_err().code(), Code::PermissionDenied);
    flood().await;
    let all = audit_events(dir.path());
    let line = |caller: &str, rpc: &str, code: &str| {
        all.iter()
            .any(|e| e["caller"] == caller && e["rpc"] == rpc && e["code"] == code)
    };
    assert!(
        line("flood-worker", "ListSystems", "PERMISSION_DENIED"),
        "{all:?}"
    );
    assert!(
        line("brief-worker", "GetAccessToken", "UNAUTHENTICATED"),
        "{all:?}"
    );
    // At most 50 refusal lines in any second besides the authenticated caller's.
    let mut per_second = std::collections::HashMap::<String, usize>::new();
    for e in all.iter().filter(|e| e["code"] == "UNAUTHENTICATED") {
        let second = e["time"]
            .as_str()
            .unwrap_or_default()
            .get(..19)
            .unwrap_or_default();
        *per_second.entry(second.to_owned()).or_default() += 1;
    }
    // (The budget's second and the line's time are two clock reads: a line admitted at the
    // very end of a second may carry the next one's time, hence a little slack.)
    assert!(per_second.values().all(|n| *n <= 55), "{per_second:?}");
    broker.stop().await;
}

/// An audit trail that cannot be opened at start is reported before any call (health said
/// SERVING until the first one), and a failed trail is tried again without calls: once a load
/// balancer has taken the broker out of service, none come, and the broker stayed unready after
/// the trail could be written again. The line that found it writable says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_trail_is_found_at_start_and_tried_again_without_calls() {
    let dir = tempfile::tempdir().unwrap();
    let trail = dir.path().join("trail.log");
    // A directory where the file should be: it cannot be opened for appending.
    std::fs::create_dir(&trail).unwrap();
    let mut config = test_config(dir.path());
    config.audit.file = Some(trail.clone());
    let (addr, open, stop, task) = TestBroker::start_held(config).await;
    let _ = open.send(());
    // The writes service is announced last, once the broker is open.
    wait_for_service_health(
        addr,
        credbroker::store::WRITES_HEALTH_SERVICE,
        ServingStatus::Serving,
    )
    .await;
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::NotServing as i32);
    std::fs::remove_dir(&trail).unwrap();
    wait_for_health(addr, ServingStatus::Serving).await;
    let written = std::fs::read_to_string(&trail).unwrap();
    let line: serde_json::Value = serde_json::from_str(written.lines().next().unwrap()).unwrap();
    assert_eq!(line["rpc"], "AuditCheck", "{written}");
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// A trail that stops taking writes (a stdout pipe nobody reads, a stalled disk) was written on
/// the runtime's thread, and took every call, health and `/readyz` down with it. Now the call
/// whose line waits fails closed within seconds and later ones at once, health and `/readyz`
/// answer meanwhile (NOT_SERVING, 503), and all recovers once the trail takes writes again. On
/// one thread, as the broker runs on one core.
#[tokio::test(flavor = "current_thread")]
async fn a_trail_that_stops_taking_writes_fails_closed_and_holds_up_nothing_else() {
    use std::io::{Read, Write};
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audit.pipe");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.unwrap().success());
    // Held open to read and write: the broker's opens need no reader, and nothing is read
    // until the test reads.
    let mut pipe = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let fake = FakeAsana::start().await;
    fake.add_user(PAT, "1", "U", "u@example.com");
    let mut config = test_config(dir.path());
    config.audit.file = Some(fifo.clone());
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(register_asana("stall", &fake.base_url, PAT, true))
        .await
        .unwrap();
    let w = admin
        .create_caller(worker_req("stall-worker", &["stall"], &[], None))
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut worker = client(broker.addr, Some(&w)).await;
    worker.get_access_token(tok("stall")).await.unwrap();
    // The pipe is filled to the brim by a writer of our own, which then waits as the broker's
    // writes will.
    let mut filler = pipe.try_clone().unwrap();
    // More than any pipe holds (64 KiB, 1 MiB with 64-KiB pages).
    std::thread::spawn(move || filler.write_all(&vec![b'\n'; 4 << 20]));
    let mut calls = 0;
    let refused = loop {
        calls += 1;
        assert!(
            calls < 100,
            "calls kept being served: the trail never stalled"
        );
        let call = worker.get_access_token(tok("stall"));
        match tokio::time::timeout(Duration::from_secs(20), call).await {
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => break e,
            Err(_) => panic!("a call waited for a stalled trail past its limit"),
        }
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("audit"), "{}", refused.message());
    wait_for_health(broker.addr, ServingStatus::NotServing).await;
    let readyz = format!("http://{}/readyz", broker.http_addr);
    assert_eq!(reqwest::get(&readyz).await.unwrap().status().as_u16(), 503);
    // Later calls are answered at once: secrets refused, the rest served.
    let again = tokio::time::timeout(
        Duration::from_secs(2),
        worker.get_access_token(tok("stall")),
    )
    .await
    .expect("a later call waited behind the stalled write");
    assert_eq!(again.unwrap_err().code(), Code::Unavailable);
    let listed = tokio::time::timeout(
        Duration::from_secs(2),
        admin.list_systems(pb::ListSystemsRequest::default()),
    )
    .await
    .expect("a call that hands out no secret waited behind the stalled write");
    assert_eq!(listed.unwrap().into_inner().systems.len(), 1);
    // The pipe is read again: the write returns, and the broker serves.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let reading = seen.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0; 1 << 16];
        while let Ok(n @ 1..) = pipe.read(&mut buf) {
            reading.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    wait_for_health(broker.addr, ServingStatus::Serving).await;
    let t = worker.get_access_token(tok("stall")).await.unwrap();
    assert!(t.into_inner().headers.iter().any(|h| h.value.contains(PAT)));
    assert_eq!(reqwest::get(&readyz).await.unwrap().status().as_u16(), 200);
    admin
        .create_caller(worker_req("after-the-stall", &[], &[], None))
        .await
        .unwrap();
    broker.stop().await;
    let text = || String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    // Written before the call answered; read by the test's reader thread soon after.
    eventually(Duration::from_secs(10), "the line after the stall", || {
        text().contains("caller=after-the-stall")
    })
    .await;
    let seen = text();
    for secret in [PAT, w.as_str()] {
        assert!(!seen.contains(secret), "a secret is in the audit trail");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_audited_and_tokens_fail_closed_without_the_trail() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAsana::start().await;
    fake.add_user(PAT, "1", "U", "u@example.com");
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(register_asana("aud", &fake.base_url, PAT, true))
        .await
        .unwrap();
    let w = admin
        .create_caller(worker_req("aud-worker", &["aud"], &[], None))
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut worker = client(broker.addr, Some(&w)).await;
    let t = worker
        .get_access_token(tok("aud"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        worker
            .get_access_token(tok("other"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        worker
            .list_systems(pb::ListSystemsRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let mut anon = client(broker.addr, None).await;
    assert_eq!(
        anon.get_access_token(tok("aud")).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let all = audit_events(dir.path());
    // System events are audited too, each under `SystemEvent` with its type.
    let announced: Vec<(&str, &str)> = all
        .iter()
        .filter(|e| e["rpc"] == "SystemEvent")
        .map(|e| {
            (
                e["event"].as_str().unwrap(),
                e["system_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(announced, [("system.registered", "aud")]);
    let events: Vec<_> = all
        .into_iter()
        .filter(|e| e["rpc"] != "SystemEvent")
        .collect();
    let rpcs: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e["rpc"].as_str().unwrap(), e["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        rpcs,
        [
            ("RegisterSystem", "OK"),
            ("CreateCaller", "OK"),
            ("GetAccessToken", "OK"),
            ("GetAccessToken", "PERMISSION_DENIED"),
            ("ListSystems", "PERMISSION_DENIED"),
            ("GetAccessToken", "UNAUTHENTICATED"),
        ]
    );
    // An administrative change names what it changed (who was made what), never a secret.
    assert_eq!(
        events[1]["detail"], "caller=aud-worker role=worker patterns=1",
        "{:?}",
        events[1]
    );
    let granted = &events[2];
    assert!(granted["detail"].is_null(), "{granted:?}");
    assert_eq!(granted["caller"], "aud-worker");
    assert_eq!(granted["system_id"], "aud");
    let hmac = granted["token_hmac"].as_str().unwrap();
    assert_eq!(hmac.len(), 32);
    assert!(!hmac.contains(&t.token_id));
    assert_eq!(events[3]["caller"], "aud-worker");
    assert!(events[5]["caller"].is_null());
    let raw = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    for secret in [
        PAT,
        t.token_id.as_str(),
        w.as_str(),
        broker.admin_token.as_str(),
    ] {
        assert!(!raw.contains(secret), "a secret is in the audit trail");
    }

    // The sink becomes unwritable: tokens fail closed and health says so; then it recovers.
    let mut health = HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", broker.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    admin
        .register_system(pb::RegisterSystemRequest {
            delivery: pb::Delivery::Proxy as i32,
            ..register_asana("aud-proxy", &fake.base_url, PAT, false)
        })
        .await
        .unwrap();
    let lease = admin
        .get_access_token(tok("aud-proxy"))
        .await
        .unwrap()
        .into_inner();
    let proxied = || {
        let mut r = reqwest::Client::new().get(format!("{}/users/me", lease.api_base_url));
        for h in &lease.headers {
            r = r.header(&h.name, &h.value);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(proxied().await, 200);
    let path = dir.path().join("audit.log");
    std::fs::rename(&path, dir.path().join("audit.before")).unwrap();
    std::os::unix::fs::symlink("/dev/full", &path).unwrap();
    // The first write to fail is a new caller's line (health still says the trail is fine):
    // its token is withheld, and the caller, whose token nobody holds, is withdrawn.
    let e = admin
        .create_caller(worker_req("withheld", &[], &[], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let e = worker.get_access_token(tok("aud")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("audit"), "{}", e.message());
    // A new caller's token is a secret too: not handed out unaudited.
    let e = admin
        .create_caller(worker_req("unaudited", &[], &[], None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("audit"), "{}", e.message());
    // And the proxy forwards nothing it could not audit first.
    let vendor_calls = fake.server.count("");
    assert_eq!(proxied().await, 503);
    assert_eq!(
        fake.server.count(""),
        vendor_calls,
        "an unaudited call was forwarded"
    );
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    // HTTP-only load balancers see the same through /readyz.
    let readyz = || async {
        let r = reqwest::get(format!("http://{}/readyz", broker.http_addr))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let (code, body) = readyz().await;
    assert_eq!(code, 503);
    assert!(body.contains("audit"), "{body}");
    std::fs::remove_file(&path).unwrap();
    worker.get_access_token(tok("aud")).await.unwrap();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    assert_eq!(readyz().await.0, 200);
    // The refused caller was not created behind the refusal (an active caller whose token
    // nobody holds): it is not listed, and its name is free.
    let listed = admin.list_callers(pb::ListCallersRequest {}).await.unwrap();
    let listed = listed.into_inner().callers;
    assert!(listed.iter().all(|c| c.name != "unaudited"), "{listed:?}");
    let withheld = listed.iter().find(|c| c.name == "withheld");
    assert!(withheld.is_none_or(|c| c.revoked), "{listed:?}");
    let again = admin
        .create_caller(worker_req("unaudited", &[], &[], None))
        .await;
    assert!(again.is_ok(), "{again:?}");

    // credbrokerctl audit tail filters the trail.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_credbrokerctl"))
        .args([
            "--output",
            "json",
            "audit",
            "tail",
            "--caller",
            "aud-worker",
            "--file",
        ])
        .arg(dir.path().join("audit.before"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["caller"] == "aud-worker"));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_swapped_and_truncated_records_are_detected() {
    use credbroker::store::{CredentialStore, SledStore};
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAsana::start().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    for (id, p) in [
        ("a", "pat-aaaa"),
        ("b", "pat-bbbb"),
        ("c", "pat-cccc"),
        ("d", "pat-dddd"),
    ] {
        admin
            .register_system(register_asana(id, &fake.base_url, p, false))
            .await
            .unwrap();
    }
    broker.stop().await;
    {
        let store = SledStore::open(dir.path()).unwrap();
        // (a) one flipped byte in a's ciphertext.
        let mut a = store.get_system("a").await.unwrap().unwrap();
        let n = a.sealed_credential.len();
        a.sealed_credential[n - 5] ^= 0x01;
        let rev = a.revision;
        store.update_system(&a, rev).await.unwrap();
        // (b) b's and c's sealed credentials swapped.
        let mut b = store.get_system("b").await.unwrap().unwrap();
        let mut c = store.get_system("c").await.unwrap().unwrap();
        std::mem::swap(&mut b.sealed_credential, &mut c.sealed_credential);
        let (rb, rc) = (b.revision, c.revision);
        store.update_system(&b, rb).await.unwrap();
        store.update_system(&c, rc).await.unwrap();
    }
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    for id in ["a", "b", "c"] {
        let e = admin.get_access_token(tok(id)).await.unwrap_err();
        assert_eq!(e.code(), Code::DataLoss, "{id}");
        assert!(!e.message().contains("pat-"), "{}", e.message());
    }
    // The untouched system keeps serving.
    let t = admin.get_access_token(tok("d")).await.unwrap().into_inner();
    assert_eq!(t.headers[0].value, "Bearer pat-dddd");
    broker.stop().await;

    // (c) A truncated database file: the broker refuses to serve and re-initializes nothing.
    let db = dir.path().join("store").join("db");
    let key_check = std::fs::read(dir.path().join("key.check")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .set_len(0)
        .unwrap();
    for f in std::fs::read_dir(dir.path().join("store")).unwrap() {
        let p = f.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("snap.")
        {
            std::fs::remove_file(p).unwrap();
        }
    }
    let logs = tempfile::tempdir().unwrap();
    let (status, log) = match spawn_process(dir.path(), &logs.path().join("t.log"), &[]) {
        Err(e) => e,
        Ok(mut p) => {
            let s = p.child.wait().unwrap();
            (s, p.log())
        }
    };
    assert!(!status.success(), "a truncated store was served");
    assert!(
        log.contains("damaged") || log.contains("cannot open"),
        "{log}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("key.check")).unwrap(),
        key_check
    );
    assert!(!dir.path().join("admin.token.new").exists());
}

async fn key_status(admin: &mut Client) -> pb::GetKeyStatusResponse {
    admin
        .get_key_status(pb::GetKeyStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

async fn wait_rewrapped(admin: &mut Client) -> pb::GetKeyStatusResponse {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let s = key_status(admin).await;
        if !s.rewrap_running && s.records_on_primary == s.records_total {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "re-wrap did not finish: {s:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_key_rotation_under_load_and_restart_mid_rewrap() {
    use credbroker::store::faulty::{FaultControl, FaultyStore};
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAsana::start().await;
    // A store that can be made slow, so that a stop lands in the middle of a re-wrap.
    let control = std::sync::Arc::new(FaultControl::default());
    let ctl = control.clone();
    let broker = TestBroker::start_wrapped(
        test_config(dir.path()),
        Box::new(move |inner| std::sync::Arc::new(FaultyStore::new(inner, ctl.clone()))),
    )
    .await;
    let mut admin = broker.admin().await;
    const N: usize = 150;
    for i in 0..N {
        admin
            .register_system(register_asana(
                &format!("k{i:03}"),
                &fake.base_url,
                &format!("pat-{i:03}"),
                false,
            ))
            .await
            .unwrap();
    }
    let root = key_status(&mut admin).await.primary_key_id;

    // Load: workers re-mint (decrypt) tokens all through the rotation.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..4 {
        let mut c = broker.admin().await;
        let (stop, failures, calls) = (stop.clone(), failures.clone(), calls.clone());
        tasks.push(tokio::spawn(async move {
            let mut last = std::collections::HashMap::new();
            let mut i = w;
            while !stop.load(Ordering::SeqCst) {
                let id = format!("k{:03}", i % N);
                let mut r = tok(&id);
                r.rejected_token_id = last.get(&id).cloned().unwrap_or_default();
                match c.get_access_token(r).await {
                    Ok(t) => {
                        let t = t.into_inner();
                        if t.headers[0].value != format!("Bearer pat-{:03}", i % N) {
                            failures.fetch_add(1, Ordering::SeqCst);
                        }
                        last.insert(id, t.token_id);
                    }
                    Err(_) => {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                calls.fetch_add(1, Ordering::SeqCst);
                i += 4;
            }
        }));
    }
    let k1 = admin
        .rotate_master_key(pb::RotateMasterKeyRequest {})
        .await
        .unwrap()
        .into_inner()
        .key_id;
    assert_ne!(k1, root);
    let s = wait_rewrapped(&mut admin).await;
    assert_eq!(s.primary_key_id, k1);
    assert_eq!(s.records_total as usize, N);
    // The root can never be retired; the primary neither.
    assert_eq!(
        admin
            .retire_key(pb::RetireKeyRequest {
                key_id: root.clone()
            })
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        admin
            .retire_key(pb::RetireKeyRequest { key_id: k1.clone() })
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    let k2 = admin
        .rotate_master_key(pb::RotateMasterKeyRequest {})
        .await
        .unwrap()
        .into_inner()
        .key_id;
    wait_rewrapped(&mut admin).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "calls failed during rotation"
    );
    assert!(
        calls.load(Ordering::SeqCst) > 200,
        "too little load: {}",
        calls.load(Ordering::SeqCst)
    );
    // k1 protects nothing any more: it can go.
    admin
        .retire_key(pb::RetireKeyRequest { key_id: k1.clone() })
        .await
        .unwrap();
    let s = key_status(&mut admin).await;
    assert!(!s.keys.iter().any(|k| k.key_id == k1));
    // New writes carry the new key.
    admin
        .register_system(register_asana("after", &fake.base_url, "pat-after", false))
        .await
        .unwrap();
    let s = key_status(&mut admin).await;
    assert_eq!(
        (
            s.primary_key_id.as_str(),
            s.records_on_primary,
            s.records_total
        ),
        (k2.as_str(), N as u64 + 1, N as u64 + 1)
    );

    // A second rotation while the first one's re-wrap is under way: the running job makes
    // one more pass, so the records it had gone by end on the newest key too (and the key
    // between can be retired).
    control.latency_ms.store(20, Ordering::SeqCst);
    let between = rotate_and_wait_for_rewrap_under_way(&mut admin).await;
    let newest = admin
        .rotate_master_key(pb::RotateMasterKeyRequest {})
        .await
        .unwrap()
        .into_inner()
        .key_id;
    control.latency_ms.store(0, Ordering::SeqCst);
    let s = wait_rewrapped(&mut admin).await;
    assert_eq!(s.primary_key_id, newest);
    let key_id = between.clone();
    admin
        .retire_key(pb::RetireKeyRequest { key_id })
        .await
        .unwrap();

    // Rotate on a slow store, then stop at once: the re-wrap is interrupted (the store shows
    // records still on the old key); after a restart it resumes, and every credential still
    // decrypts to what was stored.
    control.latency_ms.store(20, Ordering::SeqCst);
    let k3 = rotate_and_wait_for_rewrap_under_way(&mut admin).await;
    broker.stop().await;
    let (on_k3, total) = crate::store_conformance::records_on_key(dir.path(), &k3).await;
    assert!(
        0 < on_k3 && on_k3 < total,
        "{on_k3} of {total} records re-wrapped at the stop"
    );
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let s = wait_rewrapped(&mut admin).await;
    assert_eq!(s.primary_key_id, k3);
    for i in 0..N {
        let t = admin
            .get_access_token(tok(&format!("k{i:03}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(t.headers[0].value, format!("Bearer pat-{i:03}"));
    }
    broker.stop().await;
}
