//! Several broker processes on one PostgreSQL store: one upstream refresh per expiry across
//! replicas, a rotating refresh token never reused, changes and revocations seen everywhere
//! within a second, a dead lock holder taken over, and a database outage survived.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use credbroker::pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::oauth::{refresh_cred, servicenow, sn_register, USER};
use crate::pg::{skipped, PgServer};
use crate::support::*;

struct Replicas {
    procs: Vec<BrokerProcess>,
    admin_token: String,
    _dirs: Vec<tempfile::TempDir>,
    logs: tempfile::TempDir,
}

/// A password the local test servers ignore (trust authentication): it must never show up in
/// a replica's log, even while the database is unreachable.
const PG_PASSWORD: &str = "pg-canary-pw-3141";

/// `url` with [`PG_PASSWORD`] in it for the local test servers (an external
/// `CREDBROKER_TEST_PG_URL` keeps its own).
fn with_canary_password(url: &str) -> String {
    if std::env::var("CREDBROKER_TEST_PG_URL").is_err() {
        url.replacen("postgres@", &format!("postgres:{PG_PASSWORD}@"), 1)
    } else {
        url.to_owned()
    }
}

/// `n` broker processes on `url`, sharing the first one's master key.
async fn replicas(url: &str, n: usize, extra: &[(&str, &str)]) -> Replicas {
    let url = with_canary_password(url);
    let url = url.as_str();
    let logs = tempfile::tempdir().unwrap();
    let mut dirs = Vec::new();
    let mut procs = Vec::new();
    for i in 0..n {
        let dir = tempfile::tempdir().unwrap();
        let key = dirs
            .first()
            .map(|d: &tempfile::TempDir| d.path().join("master.key"));
        let key_s = key.as_ref().map(|k| k.to_str().unwrap().to_owned());
        let mut envs: Vec<(&str, &str)> = vec![("CREDBROKER_STORE_URL", url)];
        if let Some(k) = key_s.as_deref() {
            envs.push(("CREDBROKER_MASTER_KEY_FILE", k));
        }
        envs.extend_from_slice(extra);
        let p = spawn_process(dir.path(), &logs.path().join(format!("{i}.log")), &envs)
            .unwrap_or_else(|(s, log)| panic!("replica {i} exited {s}: {log}"));
        wait_for_health(p.addr, ServingStatus::Serving).await;
        procs.push(p);
        dirs.push(dir);
    }
    let admin_token = std::fs::read_to_string(dirs[0].path().join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    Replicas {
        procs,
        admin_token,
        _dirs: dirs,
        logs,
    }
}

impl Drop for Replicas {
    /// A failing test shows what each replica logged last (the logs go with their directory).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for f in std::fs::read_dir(self.logs.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let text = std::fs::read_to_string(f.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            eprintln!("--- {} (last 60 lines) ---\n{tail}", f.path().display());
        }
    }
}

impl Replicas {
    async fn admin(&self, i: usize) -> Client {
        client(self.procs[i].addr, Some(&self.admin_token)).await
    }

    /// Replica `i`'s HTTP listener (proxy), from its log.
    fn http_addr(&self, i: usize) -> String {
        self.procs[i]
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == "HTTP listening.")
            .and_then(|v| v["addr"].as_str().map(str::to_owned))
            .expect("HTTP listener address in the log")
    }
}

/// Two admins, each on its own replica, revoking each other at once, round after round: the
/// revocations run one at a time across replicas (the store's lock), so one admin always stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_revoking_each_other_on_two_replicas_always_leave_one() {
    let Some(pg) = PgServer::shared().await else {
        return skipped("admins_revoking_each_other_on_two_replicas_always_leave_one");
    };
    let url = pg.fresh_db().await;
    let r = replicas(&url, 2, &[]).await;
    let mut kept = ("admin".to_owned(), r.admin_token.clone());
    for round in 0..8 {
        let mut a = client(r.procs[0].addr, Some(&kept.1)).await;
        let create = pb::CreateCallerRequest {
            name: format!("second-{round}"),
            role: pb::CallerRole::Admin as i32,
            ..Default::default()
        };
        let made = a.create_caller(create.clone()).await.unwrap().into_inner();
        let other = (create.name, made.token);
        let addr_b = r.procs[1].addr;
        // Known at the other replica first.
        within(Duration::from_secs(1), || {
            let token = other.1.clone();
            async move {
                let mut b = client(addr_b, Some(&token)).await;
                b.list_callers(pb::ListCallersRequest {}).await.is_ok()
            }
        })
        .await;
        let mut b = client(addr_b, Some(&other.1)).await;
        let revoke = |name: &str| pb::RevokeCallerRequest { name: name.into() };
        let (by_a, by_b) = tokio::join!(
            a.revoke_caller(revoke(&other.0)),
            b.revoke_caller(revoke(&kept.0)),
        );
        match (by_a.is_ok(), by_b.is_ok()) {
            (true, false) => {}
            (false, true) => kept = other,
            outcome => panic!("round {round}: {outcome:?}: {by_a:?} {by_b:?}"),
        }
        let refused = by_a.err().or(by_b.err()).unwrap();
        let codes = [Code::FailedPrecondition, Code::Unauthenticated];
        assert!(codes.contains(&refused.code()), "{refused:?}");
        let mut left = client(r.procs[0].addr, Some(&kept.1)).await;
        let callers = left.list_callers(pb::ListCallersRequest {}).await.unwrap();
        let callers = callers.into_inner().callers;
        let active: Vec<_> = callers.iter().filter(|c| !c.revoked).collect();
        assert_eq!(active.len(), 1, "round {round}: {callers:?}");
        assert_eq!(active[0].name, kept.0);
    }
}

/// The stored revision of `system_id`, read from the database itself.
async fn stored_revision(url: &str, system_id: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .query_one(
            "SELECT revision FROM systems WHERE system_id = $1",
            &[&system_id],
        )
        .await
        .unwrap()
        .get(0)
}

/// Polls `f` until it is true; returns how long that took (panics after `limit`).
async fn within<F, Fut>(limit: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn no_secret_in_logs(dir: &Path, secrets: &[&str]) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for s in secrets {
            assert!(!text.contains(s), "a replica logged a secret");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_refresh_once_per_expiry_and_never_reuse_a_refresh_token() {
    let Some(pg) = PgServer::shared().await else {
        return skipped("three_replicas_refresh_once_per_expiry_and_never_reuse_a_refresh_token");
    };
    let url = pg.fresh_db().await;
    // Strict rotation: every refresh rotates the refresh token, reuse revokes the family.
    let fake = servicenow(1).await;
    fake.oauth(|o| o.rotate = true);
    let rt = fake.issue_refresh_token(USER);
    let r = replicas(&url, 3, &[]).await;
    r.admin(0)
        .await
        .register_system(sn_register(
            "shared",
            &fake.base_url,
            refresh_cred(&rt),
            false,
        ))
        .await
        .unwrap();
    let revision_before = stored_revision(&url, "shared").await;
    let mut pool = Vec::new();
    for i in 0..3 {
        for _ in 0..2 {
            pool.push(r.admin(i).await);
        }
    }
    // 600 concurrent calls spread over the replicas, again and again while tokens of 1 s
    // expire, until 20 refreshes happened.
    let started = Instant::now();
    let mut rounds = 0;
    while fake.token_calls() < 21 {
        assert!(started.elapsed() < Duration::from_secs(60), "too slow");
        rounds += 1;
        let mut tasks = Vec::new();
        for k in 0..600 {
            let mut c = pool[k % pool.len()].clone();
            tasks.push(tokio::spawn(
                async move { auth_header(&mut c, "shared").await },
            ));
        }
        for t in tasks {
            let h = t.await.unwrap().expect("every call gets a token");
            assert!(h.starts_with("Bearer at-"));
        }
        // Let the token age towards its expiry: the point of the test, not a readiness wait.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let times = fake.token_call_times();
    let min_gap = times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .min()
        .unwrap();
    eprintln!(
        "{rounds} rounds of 600 calls, {} token calls, closest two {min_gap:?} apart",
        times.len()
    );
    assert_eq!(
        fake.reuse_detected(),
        0,
        "a rotated-out refresh token was reused"
    );
    // Each rotating refresh wrote the record once: the rotated credential and the token it
    // brought together (one write, one notification), not one after the other.
    let writes = stored_revision(&url, "shared").await - revision_before;
    assert_eq!(writes, times.len() as i64, "record writes per refresh");
    // Two replicas refreshing for the same expiry would be milliseconds apart; refreshes of
    // successive 1 s tokens are at least a few hundred apart.
    assert!(
        min_gap >= Duration::from_millis(200),
        "two refreshes {min_gap:?} apart: more than one per expiry"
    );
    no_secret_in_logs(
        r.logs.path(),
        &[&rt, crate::oauth::CLIENT_SECRET, PG_PASSWORD],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_or_revocation_on_one_replica_reaches_the_others_within_a_second() {
    let Some(pg) = PgServer::shared().await else {
        return skipped(
            "a_rotation_or_revocation_on_one_replica_reaches_the_others_within_a_second",
        );
    };
    let url = pg.fresh_db().await;
    let asana = FakeAsana::start().await;
    let r = replicas(&url, 2, &[]).await;
    let (mut a, mut b) = (r.admin(0).await, r.admin(1).await);
    a.register_system(register_asana("sys", &asana.base_url, "old-pat", false))
        .await
        .unwrap();
    assert_eq!(auth_header(&mut b, "sys").await.unwrap(), "Bearer old-pat");
    a.rotate_credential(pb::RotateCredentialRequest {
        system_id: "sys".into(),
        credential: Some(pat("new-pat")),
        skip_check: true,
    })
    .await
    .unwrap();
    let took = within(Duration::from_secs(1), || {
        let mut b = b.clone();
        async move { auth_header(&mut b, "sys").await.unwrap() == "Bearer new-pat" }
    })
    .await;
    eprintln!("rotation on A served by B after {took:?}");

    // A worker created on A works on B; revoked on A, it is refused on B.
    let token = a
        .create_caller(pb::CreateCallerRequest {
            name: "w1".into(),
            role: pb::CallerRole::Worker as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let addr_b = r.procs[1].addr;
    within(Duration::from_secs(1), || {
        let token = token.clone();
        async move {
            let mut w = client(addr_b, Some(&token)).await;
            auth_header(&mut w, "sys").await.is_ok()
        }
    })
    .await;
    a.revoke_caller(pb::RevokeCallerRequest { name: "w1".into() })
        .await
        .unwrap();
    let took = within(Duration::from_secs(1), || {
        let token = token.clone();
        async move {
            let mut w = client(addr_b, Some(&token)).await;
            matches!(auth_header(&mut w, "sys").await, Err(s) if s.code() == Code::Unauthenticated)
        }
    })
    .await;
    eprintln!("revocation on A refused by B after {took:?}");

    // A master-key rotation started on A completes with B serving throughout: records
    // re-wrapped (or newly sealed) under the new key on A decrypt on B.
    for i in 0..20 {
        a.register_system(register_asana(
            &format!("k{i}"),
            &asana.base_url,
            &format!("kpat-{i}"),
            false,
        ))
        .await
        .unwrap();
    }
    a.rotate_master_key(pb::RotateMasterKeyRequest {})
        .await
        .unwrap();
    a.register_system(register_asana(
        "after-kek",
        &asana.base_url,
        "kpat-new",
        false,
    ))
    .await
    .unwrap();
    within(Duration::from_secs(10), || {
        let mut a = a.clone();
        async move {
            let s = a
                .get_key_status(pb::GetKeyStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            !s.rewrap_running && s.records_on_primary == s.records_total
        }
    })
    .await;
    assert_eq!(
        auth_header(&mut b, "after-kek").await.unwrap(),
        "Bearer kpat-new"
    );
    for i in 0..20 {
        // Never read on B before: decrypted from the re-wrapped record.
        assert_eq!(
            auth_header(&mut b, &format!("k{i}")).await.unwrap(),
            format!("Bearer kpat-{i}")
        );
    }

    // A proxy lease handed out by A works at B's proxy (leases are signed with a key derived
    // from the shared master key), and stops working there once A rotates the credential.
    asana.add_user("proxy-pat-1", "91", "Proxy User", "proxy@example.com");
    asana.add_user("proxy-pat-2", "91", "Proxy User", "proxy@example.com");
    a.register_system(pb::RegisterSystemRequest {
        delivery: pb::Delivery::Proxy as i32,
        ..register_asana("proxied", &asana.base_url, "proxy-pat-1", false)
    })
    .await
    .unwrap();
    let t = a
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "proxied".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let lease = t.headers[0].value.clone();
    let at_b = format!("http://{}/proxy/proxied/users/me", r.http_addr(1));
    let http = reqwest::Client::new();
    let resp = http
        .get(&at_b)
        .header("authorization", &lease)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "A's lease at B's proxy");
    a.rotate_credential(pb::RotateCredentialRequest {
        system_id: "proxied".into(),
        credential: Some(pat("proxy-pat-2")),
        skip_check: true,
    })
    .await
    .unwrap();
    let took = within(Duration::from_secs(1), || {
        let (http, at_b, lease) = (http.clone(), at_b.clone(), lease.clone());
        async move {
            let r = http
                .get(&at_b)
                .header("authorization", &lease)
                .send()
                .await
                .unwrap();
            r.status().as_u16() == 401
        }
    })
    .await;
    eprintln!("A's pre-rotation lease refused by B's proxy after {took:?}");

    // Deleted on A: gone on B.
    a.delete_system(pb::DeleteSystemRequest {
        system_id: "sys".into(),
    })
    .await
    .unwrap();
    within(Duration::from_secs(1), || {
        let mut b = b.clone();
        async move { matches!(auth_header(&mut b, "sys").await, Err(s) if s.code() == Code::NotFound) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_replica_that_holds_the_refresh_lock_hands_the_refresh_to_another() {
    let Some(pg) = PgServer::shared().await else {
        return skipped(
            "killing_the_replica_that_holds_the_refresh_lock_hands_the_refresh_to_another",
        );
    };
    let url = pg.fresh_db().await;
    // Rotating refresh tokens with Atlassian's leeway: the token a dead replica presented may
    // be presented once more by the replica that takes over.
    let fake = servicenow(60).await;
    fake.oauth(|o| {
        o.rotate = true;
        o.leeway = true;
        o.token_delay = Duration::from_millis(1500);
    });
    let rt = fake.issue_refresh_token(USER);
    let r = replicas(&url, 2, &[("CREDBROKER_UPSTREAM_TIMEOUT_SECS", "5")]).await;
    let mut a = r.admin(0).await;
    a.register_system(sn_register(
        "locked",
        &fake.base_url,
        refresh_cred(&rt),
        false,
    ))
    .await
    .unwrap();
    // A starts the refresh and holds the lock while the vendor takes 1.5 s…
    let pending = tokio::spawn(async move { auth_header(&mut a, "locked").await });
    within(Duration::from_secs(5), || async { fake.token_calls() == 1 }).await;
    // …and dies in the middle of it.
    r.procs[0].signal("KILL");
    let _ = pending.await;
    let mut b = r.admin(1).await;
    let started = Instant::now();
    let h = auth_header(&mut b, "locked")
        .await
        .expect("B completes the refresh");
    let took = started.elapsed();
    eprintln!("B refreshed {took:?} after A's death");
    assert!(h.starts_with("Bearer at-"));
    assert!(
        took < Duration::from_secs(5),
        "within the upstream timeout: {took:?}"
    );
    assert_eq!(fake.token_calls(), 2);
    assert_eq!(
        fake.reuse_detected(),
        0,
        "no refresh token was lost or reused"
    );
    // The grant is alive: B's stored refresh token is the newest.
    let mut req = pb::GetAccessTokenRequest {
        system_id: "locked".into(),
        ..Default::default()
    };
    req.rejected_token_id = b
        .get_access_token(req.clone())
        .await
        .unwrap()
        .into_inner()
        .token_id;
    b.get_access_token(req)
        .await
        .expect("a forced refresh works");
    assert_eq!(fake.reuse_detected(), 0);
}

/// Ends the database session that holds `system_id`'s refresh lock (as a cut connection or an
/// administrator's `pg_terminate_backend` would); true when there was one.
async fn end_lock_session(url: &str, system_id: &str) -> bool {
    use sha2::Digest;
    let d = sha2::Sha256::digest(system_id.as_bytes());
    let key = i64::from_be_bytes(d[..8].try_into().unwrap());
    // A one-bigint advisory lock shows its key's high and low halves as classid and objid.
    let (hi, lo) = ((key as u64 >> 32) as i64, (key as u64 & 0xffff_ffff) as i64);
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let ended = client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' \
             AND granted AND objsubid = 1 AND classid::bigint = $1 AND objid::bigint = $2",
            &[&hi, &lo],
        )
        .await
        .unwrap();
    !ended.is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_whose_lock_was_lost_never_overwrites_the_newer_refresh_token() {
    let Some(pg) = PgServer::shared().await else {
        return skipped("a_refresh_whose_lock_was_lost_never_overwrites_the_newer_refresh_token");
    };
    let url = pg.fresh_db().await;
    // Atlassian's leeway: the refresh token rotated out last may be presented once more, and
    // what that brings supersedes what its first presentation brought.
    let fake = servicenow(60).await;
    fake.oauth(|o| {
        o.rotate = true;
        o.leeway = true;
        o.token_delay = Duration::from_secs(5);
    });
    let rt = fake.issue_refresh_token(USER);
    let r = replicas(&url, 2, &[]).await;
    let mut a = r.admin(0).await;
    a.register_system(sn_register(
        "lost",
        &fake.base_url,
        refresh_cred(&rt),
        false,
    ))
    .await
    .unwrap();
    // A presents the refresh token and, while the vendor takes 5 s to answer, loses its lock's
    // database session…
    let at_a = tokio::spawn(async move { auth_header(&mut a, "lost").await });
    within(Duration::from_secs(5), || async { fake.token_calls() == 1 }).await;
    fake.oauth(|o| o.token_delay = Duration::ZERO);
    assert!(end_lock_session(&url, "lost").await, "A held the lock");
    // …so B takes the lock, presents the same refresh token (within the leeway) and stores the
    // newer one before A's answer comes.
    let mut b = r.admin(1).await;
    auth_header(&mut b, "lost").await.expect("B refreshes");
    assert_eq!((fake.token_calls(), fake.leeway_reuses()), (2, 1));
    let e = at_a.await.unwrap().expect_err("A hands out nothing");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        r.procs[0]
            .log()
            .contains("refresh lock was lost during the vendor's call"),
        "A noticed"
    );
    // The stored refresh token is B's: a forced refresh of the token served now works and
    // reuses nothing.
    let served = b
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "lost".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    b.get_access_token(pb::GetAccessTokenRequest {
        system_id: "lost".into(),
        rejected_token_id: served.token_id,
        ..Default::default()
    })
    .await
    .expect("a forced refresh works");
    assert_eq!(fake.token_calls(), 3);
    assert_eq!(fake.reuse_detected(), 0, "no refresh token was reused");
    no_secret_in_logs(r.logs.path(), &[&rt]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_ride_out_a_database_outage() {
    // Its own server: this test stops it.
    let Some(pg) = PgServer::start_local().await else {
        return skipped("replicas_ride_out_a_database_outage");
    };
    let outage: u64 = std::env::var("CREDBROKER_PG_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let url = pg.fresh_db().await;
    let asana = FakeAsana::start().await;
    let r = replicas(&url, 2, &[]).await;
    let (mut a, mut b) = (r.admin(0).await, r.admin(1).await);
    for i in 0..10 {
        a.register_system(register_asana(
            &format!("s{i}"),
            &asana.base_url,
            &format!("pat-{i}"),
            false,
        ))
        .await
        .unwrap();
    }
    for i in 0..10 {
        assert_eq!(
            auth_header(&mut b, &format!("s{i}")).await.unwrap(),
            format!("Bearer pat-{i}")
        );
        assert_eq!(
            auth_header(&mut a, &format!("s{i}")).await.unwrap(),
            format!("Bearer pat-{i}")
        );
    }

    pg.stop();
    let until = Instant::now() + Duration::from_secs(outage);
    let mut served = 0u64;
    let mut refused = 0u64;
    while Instant::now() < until {
        for (k, c) in [&mut a, &mut b].into_iter().enumerate() {
            let i = served % 10;
            assert_eq!(
                auth_header(c, &format!("s{i}")).await.unwrap(),
                format!("Bearer pat-{i}"),
                "replica {k} stopped serving cached tokens"
            );
            served += 1;
        }
        if refused < 5 {
            let e = a
                .register_system(register_asana(
                    &format!("during-{refused}"),
                    &asana.base_url,
                    "x",
                    false,
                ))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::Unavailable, "{e:?}");
            assert!(!e.message().contains("postgres://"), "{}", e.message());
            refused += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for p in &r.procs {
        wait_for_service_health(
            p.addr,
            credbroker::store::WRITES_HEALTH_SERVICE,
            ServingStatus::NotServing,
        )
        .await;
        wait_for_health(p.addr, ServingStatus::Serving).await;
    }
    eprintln!("{outage} s outage: {served} tokens served from memory, {refused} writes refused");

    pg.resume().await;
    for p in &r.procs {
        wait_for_service_health(
            p.addr,
            credbroker::store::WRITES_HEALTH_SERVICE,
            ServingStatus::Serving,
        )
        .await;
    }
    a.register_system(register_asana("after", &asana.base_url, "pat-after", false))
        .await
        .unwrap();
    within(Duration::from_secs(5), || {
        let mut b = b.clone();
        async move {
            auth_header(&mut b, "after")
                .await
                .is_ok_and(|h| h == "Bearer pat-after")
        }
    })
    .await;
    for i in 0..10 {
        assert_eq!(
            auth_header(&mut b, &format!("s{i}")).await.unwrap(),
            format!("Bearer pat-{i}")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_started_on_one_replica_completes_through_another() {
    let Some(pg) = PgServer::shared().await else {
        return skipped("a_connect_started_on_one_replica_completes_through_another");
    };
    let url = pg.fresh_db().await;
    let fake = crate::connect::zendesk().await;
    let r = replicas(&url, 2, &[]).await;
    let (mut a, mut b) = (r.admin(0).await, r.admin(1).await);
    crate::connect::register_zendesk(&mut a, &fake).await;
    // The browser comes back through the load balancer, which picks B.
    let mut callback = consent_callback(&mut a).await;
    let via_a = callback.to_string();
    let b_http: std::net::SocketAddr = r.http_addr(1).parse().unwrap();
    callback.set_port(Some(b_http.port())).unwrap();
    let page = reqwest::get(callback.as_str()).await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.unwrap().contains("connected and active"));
    assert!(auth_header(&mut b, "zd")
        .await
        .unwrap()
        .starts_with("Bearer "));
    assert!(auth_header(&mut a, "zd")
        .await
        .unwrap()
        .starts_with("Bearer "));
    // Single use across replicas: the same callback replayed at A changes nothing.
    let replay = reqwest::get(&via_a).await.unwrap();
    assert_eq!(replay.status().as_u16(), 400);
    no_secret_in_logs(r.logs.path(), &[crate::connect::ZD_SECRET, PG_PASSWORD]);
}

/// Starts a connect of "zd" through `a` and allows it at the vendor: the callback URL the
/// browser is sent back to.
async fn consent_callback(a: &mut Client) -> url::Url {
    let s = a
        .start_authorization(pb::StartAuthorizationRequest {
            system_id: "zd".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let consent = no_redirects().get(&s.authorize_url).send().await.unwrap();
    assert_eq!(consent.status().as_u16(), 302);
    url::Url::parse(consent.headers()["location"].to_str().unwrap()).unwrap()
}

/// The same callback at two replicas at once (a double click through the load balancer, a
/// replayed URL): the code is exchanged once, one page says connected and the other refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_raced_at_two_replicas_exchanges_the_code_once() {
    let Some(pg) = PgServer::shared().await else {
        return skipped("a_callback_raced_at_two_replicas_exchanges_the_code_once");
    };
    let url = pg.fresh_db().await;
    let fake = crate::connect::zendesk().await;
    let r = replicas(&url, 2, &[]).await;
    let mut a = r.admin(0).await;
    crate::connect::register_zendesk(&mut a, &fake).await;
    for round in 0..5 {
        let via_a = consent_callback(&mut a).await;
        let mut via_b = via_a.clone();
        let b_http: std::net::SocketAddr = r.http_addr(1).parse().unwrap();
        via_b.set_port(Some(b_http.port())).unwrap();
        let before = fake.token_calls();
        let (pa, pb_) = tokio::join!(reqwest::get(via_a.as_str()), reqwest::get(via_b.as_str()));
        let mut codes = [
            pa.unwrap().status().as_u16(),
            pb_.unwrap().status().as_u16(),
        ];
        codes.sort_unstable();
        assert_eq!(codes, [200, 400], "round {round}");
        assert_eq!(
            fake.token_calls() - before,
            1,
            "round {round}: the code was exchanged twice"
        );
    }
    no_secret_in_logs(r.logs.path(), &[crate::connect::ZD_SECRET, PG_PASSWORD]);
}

/// Registers an Asana system through `c`.
async fn register_on(c: &mut Client, id: &str, base_url: &str) {
    c.register_system(register_asana(id, base_url, "evt-pat", false))
        .await
        .unwrap();
}

/// The next event of `w` that is not a snapshot, within 10 s.
async fn next_change(w: &mut tonic::Streaming<pb::SystemEvent>) -> pb::SystemEvent {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), w.message())
            .await
            .expect("no event within 10 s")
            .unwrap()
            .expect("the watch ended");
        if e.r#type != "system.snapshot" {
            return e;
        }
    }
}

/// One event log for all replicas: a watcher on B sees what A did, a cursor from B resumes on
/// A, and a webhook endpoint configured on both gets each event once, from one replica, also
/// after the delivering replica is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_event_log_and_deliver_each_webhook_once() {
    let Some(pg) = PgServer::shared().await else {
        return skipped("replicas_share_one_event_log_and_deliver_each_webhook_once");
    };
    let url = pg.fresh_db().await;
    let asana = FakeAsana::start().await;
    asana.add_user("evt-pat", "1201", "Proxy User", "proxy@example.com");
    let receiver = crate::health::Receiver::default();
    let hook_url = receiver.clone().start("127.0.0.1:0").await;
    let secrets = tempfile::tempdir().unwrap();
    let secret_file = secrets.path().join("webhook.secret");
    std::fs::write(&secret_file, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    let key = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    )
    .unwrap();
    let r = replicas(
        &url,
        2,
        &[
            ("CREDBROKER_WEBHOOK_URL", &hook_url),
            (
                "CREDBROKER_WEBHOOK_SECRET_FILE",
                secret_file.to_str().unwrap(),
            ),
        ],
    )
    .await;
    let (mut a, mut b) = (r.admin(0).await, r.admin(1).await);
    let mut on_b = b
        .watch_systems(pb::WatchSystemsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let started = Instant::now();
    register_on(&mut a, "e-1", &asana.base_url).await;
    let seen = next_change(&mut on_b).await;
    assert_eq!(
        (
            seen.r#type.as_str(),
            seen.system.as_ref().unwrap().system_id.as_str()
        ),
        ("system.registered", "e-1")
    );
    eprintln!(
        "A's registration seen by a watcher on B after {:?}",
        started.elapsed()
    );

    // B's cursor resumes on A: what happened after it, nothing before.
    register_on(&mut b, "e-2", &asana.base_url).await;
    let mut on_a = a
        .watch_systems(pb::WatchSystemsRequest {
            after: seen.cursor.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let resumed = next_change(&mut on_a).await;
    assert_eq!(resumed.system.unwrap().system_id, "e-2");
    assert_eq!(
        next_change(&mut on_b).await.system.unwrap().system_id,
        "e-2"
    );

    // Each event reached the endpoint once, though both replicas have it configured.
    let delivered = || receiver.delivered(&key).len();
    eventually(Duration::from_secs(15), "two deliveries", || {
        delivered() >= 2
    })
    .await;
    // The delivering replica records its cursor just after the 2xx; killed before that, it
    // leaves the event to be sent once more with the same webhook-id (documented: receivers
    // dedupe on it). Wait for the record, so the kill tests the hand-over alone.
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    within(Duration::from_secs(15), || {
        let db = &db;
        async move {
            let newest: i64 = db
                .query_one("SELECT COALESCE(max(seq), 0) FROM events", &[])
                .await
                .unwrap()
                .get(0);
            let cursors = db
                .query("SELECT value FROM meta WHERE key LIKE 'webhook/%'", &[])
                .await
                .unwrap();
            cursors.iter().any(|row| {
                let value: Vec<u8> = row.get(0);
                String::from_utf8_lossy(&value).parse::<i64>().ok() >= Some(newest)
            })
        }
    })
    .await;
    // Killing either replica leaves the other to deliver (the lead passes within seconds).
    r.procs[0].signal("KILL");
    register_on(&mut b, "e-3", &asana.base_url).await;
    eventually(Duration::from_secs(20), "the third delivery", || {
        delivered() >= 3
    })
    .await;
    let got = receiver.delivered(&key);
    let ids: Vec<(&str, &str)> = got
        .iter()
        .map(|(_, t, s)| (t.as_str(), s.as_str()))
        .collect();
    assert_eq!(
        ids,
        [
            ("system.registered", "e-1"),
            ("system.registered", "e-2"),
            ("system.registered", "e-3"),
        ],
        "each event once, in order"
    );
    let distinct: std::collections::HashSet<_> = got.iter().map(|(id, _, _)| id).collect();
    assert_eq!(distinct.len(), 3);
}

/// A proxied GET through replica `i`: (status, refused locally).
async fn proxied_at(r: &Replicas, i: usize, lease: &str, path: &str) -> (u16, bool) {
    let url = format!("http://{}/proxy/jira-shared{path}", r.http_addr(i));
    let resp = reqwest::Client::new()
        .get(url)
        .header("authorization", lease)
        .send()
        .await
        .unwrap();
    let local = resp
        .headers()
        .get("x-credbroker-limited")
        .is_some_and(|v| v == "local");
    (resp.status().as_u16(), local)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vendor_block_met_at_one_replica_holds_back_all_three_within_a_second() {
    use crate::service_identities::{cc, jira_fake, SA_ID, SA_SECRET};
    let Some(pg) = PgServer::shared().await else {
        return skipped("a_vendor_block_met_at_one_replica_holds_back_all_three_within_a_second");
    };
    let url = pg.fresh_db().await;
    let fake = jira_fake().await;
    let origin = fake.origin.clone();
    let env = [
        ("CREDBROKER_JIRA_AUTH_URL", origin.as_str()),
        ("CREDBROKER_JIRA_API_URL", origin.as_str()),
    ];
    let r = replicas(&url, 3, &env).await;
    let mut a = r.admin(0).await;
    let reg = pb::RegisterSystemRequest {
        system_id: "jira-shared".into(),
        kind: pb::SystemKind::JiraCloud as i32,
        base_url: origin.clone(),
        credential: Some(cc(SA_ID, SA_SECRET)),
        check: true,
        delivery: pb::Delivery::Proxy as i32,
        ..Default::default()
    };
    assert!(
        a.register_system(reg)
            .await
            .unwrap()
            .into_inner()
            .check
            .unwrap()
            .ok
    );
    let t = a
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "jira-shared".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let lease = t.headers[0].value.clone();
    let search = "/rest/api/3/search";
    let at_vendor = || fake.server.count("/ex/jira/cloud-acme/rest/api/3/search");
    for i in 0..3 {
        assert_eq!(proxied_at(&r, i, &lease, search).await, (200, false));
    }
    // A meets the vendor's 429; the vendor then answers normally, so B and C can only hold
    // back because A told them.
    fake.throttle_for(30);
    assert_eq!(proxied_at(&r, 0, &lease, search).await, (429, false));
    fake.throttle_for(0);
    let before = at_vendor();
    let took = within(Duration::from_secs(1), || async {
        proxied_at(&r, 1, &lease, search).await == (429, true)
            && proxied_at(&r, 2, &lease, search).await == (429, true)
    })
    .await;
    eprintln!("A's block reached B and C after {took:?}");
    let leaked = at_vendor() - before;
    for i in 0..3 {
        assert_eq!(
            proxied_at(&r, i, &lease, search).await,
            (429, true),
            "replica {i}"
        );
    }
    assert_eq!(
        at_vendor() - before,
        leaked,
        "nothing reaches the vendor once shared"
    );
    let q = r
        .admin(2)
        .await
        .get_system(pb::GetSystemRequest {
            system_id: "jira-shared".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .system
        .unwrap();
    assert!(
        q.quota.unwrap().blocked_until.is_some(),
        "C's System.quota shows the block"
    );
    assert_eq!(q.health, pb::SystemHealth::Degraded as i32);
    no_secret_in_logs(r.logs.path(), &[SA_SECRET, &lease]);
}

/// Three replicas, 100 systems registered through A. With PostgreSQL stopped, C, which never
/// served any of them, serves them all (static headers and still-valid OAuth tokens) from its
/// mirror; writes fail cleanly; once PostgreSQL is back everything catches up, no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_serves_every_system_while_the_database_is_down() {
    let Some(pg) = PgServer::start_local().await else {
        return skipped("every_replica_serves_every_system_while_the_database_is_down");
    };
    let url = pg.fresh_db().await;
    let asana = FakeAsana::start().await;
    let sn = servicenow(3600).await;
    let r = replicas(&url, 3, &[]).await;
    let (mut a, mut c) = (r.admin(0).await, r.admin(2).await);
    for i in 0..90 {
        a.register_system(register_asana(
            &format!("s{i}"),
            &asana.base_url,
            &format!("pat-{i}"),
            false,
        ))
        .await
        .unwrap();
    }
    let mut oauth = Vec::new();
    for i in 0..10 {
        let id = format!("o{i}");
        let rt = sn.issue_refresh_token(USER);
        a.register_system(sn_register(&id, &sn.base_url, refresh_cred(&rt), false))
            .await
            .unwrap();
        oauth.push((id.clone(), auth_header(&mut a, &id).await.unwrap()));
    }
    let minted = sn.token_calls();
    // Refreshed ahead of expiry (half its 14 s lifetime at most): 7 s after it is minted.
    let short = servicenow(14).await;
    let rt = short.issue_refresh_token(USER);
    a.register_system(sn_register(
        "short",
        &short.base_url,
        refresh_cred(&rt),
        false,
    ))
    .await
    .unwrap();
    let short_header = auth_header(&mut a, "short").await.unwrap();

    pg.stop();
    for i in 0..90 {
        assert_eq!(
            auth_header(&mut c, &format!("s{i}")).await.unwrap(),
            format!("Bearer pat-{i}"),
            "C serves s{i} without the database"
        );
    }
    for (id, header) in &oauth {
        assert_eq!(&auth_header(&mut c, id).await.unwrap(), header, "{id}");
    }
    assert_eq!(
        sn.token_calls(),
        minted,
        "A's valid tokens are served, not re-minted"
    );
    // A refresh is stored before its token is handed out: the short-lived token's refresh
    // waits (the token serves while valid, the system's health says why, the vendor is not
    // asked), then the expired token is refused as UNAVAILABLE.
    assert_eq!(auth_header(&mut c, "short").await.unwrap(), short_header);
    within(Duration::from_secs(10), || {
        let mut c = c.clone();
        async move {
            let s = crate::connect::system(&mut c, "short").await;
            s.health == pb::SystemHealth::Degraded as i32
                && s.health_reason.contains("waits for the database")
        }
    })
    .await;
    within(Duration::from_secs(20), || {
        let mut c = c.clone();
        async move {
            auth_header(&mut c, "short").await.is_err_and(|e| {
                e.code() == Code::Unavailable && e.message().contains("waits for the database")
            })
        }
    })
    .await;
    assert_eq!(
        short.token_calls(),
        1,
        "no vendor refresh without the database"
    );
    let e = c
        .register_system(register_asana("during", &asana.base_url, "x", false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(!e.message().contains("postgres://"), "{}", e.message());

    pg.resume().await;
    for p in &r.procs {
        wait_for_service_health(
            p.addr,
            credbroker::store::WRITES_HEALTH_SERVICE,
            ServingStatus::Serving,
        )
        .await;
    }
    // The first write after the restart may meet a pooled connection the restart killed
    // (UNAVAILABLE, as a client retries it).
    let started = Instant::now();
    while let Err(e) = a
        .register_system(register_asana("after", &asana.base_url, "pat-after", false))
        .await
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not within 5 s: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    within(Duration::from_secs(5), || {
        let mut c = c.clone();
        async move {
            auth_header(&mut c, "after")
                .await
                .is_ok_and(|h| h == "Bearer pat-after")
        }
    })
    .await;
    // The waiting refresh runs once the database answers, and the health clears.
    within(Duration::from_secs(10), || {
        let mut c = c.clone();
        async move {
            auth_header(&mut c, "short").await.is_ok()
                && crate::connect::system(&mut c, "short").await.health
                    == pb::SystemHealth::Healthy as i32
        }
    })
    .await;
    no_secret_in_logs(r.logs.path(), &["pat-7", PG_PASSWORD]);
}

/// The gRPC health of the broker at `addr` ("" service), once.
async fn health_now(addr: std::net::SocketAddr) -> Option<i32> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .ok()?;
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
    h.check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

/// C restarted while PostgreSQL is down serves every system from its sealed snapshot; with
/// snapshots off it stays not-ready (gRPC health NOT_SERVING, /readyz 503) until the database
/// answers, then serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_during_an_outage_serves_from_its_snapshot_or_waits_not_ready() {
    let Some(pg) = PgServer::start_local().await else {
        return skipped(
            "a_replica_restarted_during_an_outage_serves_from_its_snapshot_or_waits_not_ready",
        );
    };
    let url = pg.fresh_db().await;
    let asana = FakeAsana::start().await;
    // An hour between routine snapshots: the one this test sees is the one a revocation
    // forces at once.
    let slow = [("CREDBROKER_REPLICA_SNAPSHOT_INTERVAL_SECS", "3600")];
    let mut r = replicas(&url, 3, &slow).await;
    let mut a = r.admin(0).await;
    for i in 0..20 {
        a.register_system(register_asana(
            &format!("s{i}"),
            &asana.base_url,
            &format!("snap-pat-{i}"),
            false,
        ))
        .await
        .unwrap();
    }
    let worker = a
        .create_caller(pb::CreateCallerRequest {
            name: "gone-worker".into(),
            role: pb::CallerRole::Worker as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let c_dir = r._dirs[2].path().to_path_buf();
    let snapshot = c_dir.join(credbroker::server::REPLICA_SNAPSHOT_FILE);
    let registered = std::time::SystemTime::now();
    a.revoke_caller(pb::RevokeCallerRequest {
        name: "gone-worker".into(),
    })
    .await
    .unwrap();
    within(Duration::from_secs(10), || {
        let s = snapshot.clone();
        async move {
            std::fs::metadata(&s)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > registered)
        }
    })
    .await;
    let sealed = std::fs::read(&snapshot).unwrap();
    for i in 0..20 {
        let pat = format!("snap-pat-{i}");
        assert!(!sealed.windows(pat.len()).any(|w| w == pat.as_bytes()));
    }
    let base = asana.base_url.as_bytes();
    assert!(
        !sealed.windows(base.len()).any(|w| w == base),
        "metadata is sealed too"
    );

    r.procs.pop().unwrap().stop().await;
    pg.stop();
    let key = r._dirs[0].path().join("master.key");
    let key = key.to_str().unwrap();
    let url_env = std::env::var("CREDBROKER_TEST_PG_URL").unwrap_or(url.clone());
    let env = [
        ("CREDBROKER_STORE_URL", url_env.as_str()),
        ("CREDBROKER_MASTER_KEY_FILE", key),
    ];
    let log = r.logs.path().join("c-restarted.log");
    let c = spawn_process(&c_dir, &log, &env).unwrap_or_else(|(s, l)| panic!("{s}: {l}"));
    wait_for_health(c.addr, ServingStatus::Serving).await;
    let mut cc = client(c.addr, Some(&r.admin_token)).await;
    for i in 0..20 {
        assert_eq!(
            auth_header(&mut cc, &format!("s{i}")).await.unwrap(),
            format!("Bearer snap-pat-{i}"),
            "served from the snapshot"
        );
    }
    let mut revoked = client(c.addr, Some(&worker)).await;
    let e = auth_header(&mut revoked, "s1").await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "a revocation survives the restart: {e:?}"
    );
    c.stop().await;

    // Snapshots off: not ready while the database is away, serving once it is back.
    let off = [
        ("CREDBROKER_STORE_URL", url_env.as_str()),
        ("CREDBROKER_MASTER_KEY_FILE", key),
        ("CREDBROKER_REPLICA_SNAPSHOT", "0"),
    ];
    let log = r.logs.path().join("c-no-snapshot.log");
    let c = spawn_process(&c_dir, &log, &off).unwrap_or_else(|(s, l)| panic!("{s}: {l}"));
    let not_serving = ServingStatus::NotServing as i32;
    within(Duration::from_secs(10), || async {
        health_now(c.addr).await == Some(not_serving)
    })
    .await;
    let ready = reqwest::get(format!("http://{}/readyz", c.http_addr()))
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    pg.resume().await;
    wait_for_health(c.addr, ServingStatus::Serving).await;
    let mut cc = client(c.addr, Some(&r.admin_token)).await;
    assert_eq!(
        auth_header(&mut cc, "s3").await.unwrap(),
        "Bearer snap-pat-3"
    );
    c.stop().await;
    no_secret_in_logs(r.logs.path(), &["snap-pat-3", PG_PASSWORD]);
}

/// A front for a PostgreSQL server: while `starting` is set it answers every connection the way
/// a server still starting up does (FATAL 57P03, "the database system is starting up"), and
/// counts them; afterwards it passes connections through.
struct StartingUp {
    addr: std::net::SocketAddr,
    starting: std::sync::Arc<std::sync::atomic::AtomicBool>,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl StartingUp {
    async fn start(upstream: String) -> StartingUp {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let starting = std::sync::Arc::new(AtomicBool::new(true));
        let refused = std::sync::Arc::new(AtomicUsize::new(0));
        let (st, rf) = (starting.clone(), refused.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (st, rf, up) = (st.clone(), rf.clone(), upstream.clone());
                tokio::spawn(async move {
                    if st.load(Ordering::SeqCst) {
                        if answer_starting_up(&mut s).await {
                            rf.fetch_add(1, Ordering::SeqCst);
                        }
                    } else if let Ok(mut u) = tokio::net::TcpStream::connect(up).await {
                        let _ = tokio::io::copy_bidirectional(&mut s, &mut u).await;
                    }
                });
            }
        });
        StartingUp {
            addr,
            starting,
            refused,
        }
    }
}

/// Reads the startup packet (declining TLS or GSS encryption first when asked) and answers as
/// PostgreSQL does while it starts up; true once the answer is sent.
async fn answer_starting_up(s: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok(len) = s.read_u32().await else {
            return false;
        };
        let mut body = vec![0; (len as usize).saturating_sub(4)];
        if s.read_exact(&mut body).await.is_err() {
            return false;
        }
        // SSLRequest (80877103) and GSSENCRequest (80877104): "N", then the real startup.
        if len == 8
            && matches!(
                u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                80877103 | 80877104
            )
        {
            let _ = s.write_all(b"N").await;
            continue;
        }
        break;
    }
    let fields: &[u8] = b"SFATAL\0VFATAL\0C57P03\0Mthe database system is starting up\0\0";
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
    msg.extend_from_slice(fields);
    let sent = s.write_all(&msg).await.is_ok();
    let _ = s.shutdown().await;
    sent
}

/// A replica started while PostgreSQL is still starting up (every connection answered FATAL
/// 57P03, as during any restart of the database) waits, not ready, and serves once the database
/// accepts; the answer is not taken for a refusal that ends the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_while_the_database_starts_up_waits_for_it() {
    use std::sync::atomic::Ordering;
    let Some(pg) = PgServer::shared().await else {
        return skipped("a_replica_started_while_the_database_starts_up_waits_for_it");
    };
    let url = pg.fresh_db().await;
    // postgres://user@host:port/db: the front stands where host:port was.
    let host_port = url.split('@').nth(1).unwrap().split('/').next().unwrap();
    let front = StartingUp::start(host_port.to_owned()).await;
    let front_url = with_canary_password(&url.replacen(host_port, &front.addr.to_string(), 1));
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("starting.log");
    let env = [("CREDBROKER_STORE_URL", front_url.as_str())];
    let mut c = spawn_process(dir.path(), &log, &env).unwrap_or_else(|(s, l)| panic!("{s}: {l}"));
    // Two answers seen: the broker asked again after the first instead of exiting.
    within(Duration::from_secs(15), || async {
        front.refused.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert!(c.child.try_wait().unwrap().is_none(), "exited: {}", c.log());
    assert_eq!(
        health_now(c.addr).await,
        Some(ServingStatus::NotServing as i32),
        "not ready while the database starts"
    );
    // The wait is logged with what the server said (tokio-postgres's own text: "db error").
    let waiting = &c;
    within(Duration::from_secs(5), || async move {
        waiting
            .log()
            .contains("FATAL 57P03: the database system is starting up")
    })
    .await;
    front.starting.store(false, Ordering::SeqCst);
    wait_for_health(c.addr, ServingStatus::Serving).await;
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let asana = FakeAsana::start().await;
    let mut a = client(c.addr, Some(token.trim())).await;
    a.register_system(register_asana("s1", &asana.base_url, "starting-pat", false))
        .await
        .unwrap();
    assert_eq!(
        auth_header(&mut a, "s1").await.unwrap(),
        "Bearer starting-pat"
    );
    assert_eq!(c.stop().await, Some(0));
    no_secret_in_logs(logs.path(), &["starting-pat", PG_PASSWORD]);
}

/// A primary and a streaming standby with synchronous commit; two brokers on the multi-host URL
/// (`target_session_attrs=read-write`). Registrations run through A while the primary is killed
/// and the standby promoted: both brokers reconnect within seconds, and every registration a
/// broker acknowledged is in the promoted database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_failover_loses_no_acknowledged_registration() {
    let Some(primary) = PgServer::start_local().await else {
        return skipped("a_primary_failover_loses_no_acknowledged_registration");
    };
    let db_url = primary.fresh_db().await;
    let db = db_url.rsplit('/').next().unwrap().to_owned();
    let standby = primary.standby().await.unwrap();
    let (client, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        .await
        .unwrap();
    client
        .execute("SELECT pg_reload_conf()", &[])
        .await
        .unwrap();
    within(Duration::from_secs(20), || {
        let client = &client;
        async move {
            client
                .query(
                    "SELECT 1 FROM pg_stat_replication WHERE sync_state = 'sync'",
                    &[],
                )
                .await
                .is_ok_and(|rows| !rows.is_empty())
        }
    })
    .await;
    let url = format!(
        "postgres://postgres@{},{}/{db}?target_session_attrs=read-write",
        primary.authority(),
        standby.authority()
    );
    let asana = FakeAsana::start().await;
    let r = replicas(&url, 2, &[]).await;
    let (a, b) = (r.admin(0).await, r.admin(1).await);

    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (acks, base) = (acked.clone(), asana.base_url.clone());
    let load = tokio::spawn(async move {
        let mut a = a;
        for i in 0..400 {
            let id = format!("f{i}");
            let reg = register_asana(&id, &base, &format!("fo-pat-{i}"), false);
            if a.register_system(reg).await.is_ok() {
                acks.lock().unwrap().push(id);
            }
            if acks.lock().unwrap().len() >= 120 {
                break;
            }
        }
    });
    within(Duration::from_secs(20), || async {
        acked.lock().unwrap().len() >= 40
    })
    .await;
    primary.kill();
    standby.promote();
    // Each broker writes again through the promoted standby (a first write may meet a
    // connection the kill broke: UNAVAILABLE, which a client retries).
    for (i, name) in ["after-a", "after-b"].into_iter().enumerate() {
        let took = within(Duration::from_secs(30), || {
            let (addr, token) = (r.procs[i].addr, r.admin_token.clone());
            let base = asana.base_url.clone();
            async move {
                let mut c = crate::support::client(addr, Some(&token)).await;
                c.register_system(register_asana(name, &base, "fo-after", false))
                    .await
                    .is_ok()
            }
        })
        .await;
        eprintln!("broker {i} writes again {took:?} after the promotion");
    }
    load.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 40,
        "{} registrations acknowledged",
        acked.len()
    );
    // Every acknowledged registration is in the promoted database and served by B.
    let promoted = format!("{}/{db}", standby.base_url());
    let (client, conn) = tokio_postgres::connect(&promoted, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    for id in &acked {
        let row = client
            .query_opt("SELECT 1 FROM systems WHERE system_id = $1", &[id])
            .await
            .unwrap();
        assert!(row.is_some(), "acknowledged {id} was lost in the failover");
    }
    // B serves the newest of them once its pool and feed are on the promoted server (a pooled
    // connection to the dead primary may fail one call first, as a client retries it).
    let i: usize = acked[acked.len() - 1][1..].parse().unwrap();
    within(Duration::from_secs(5), || {
        let mut b = b.clone();
        async move {
            auth_header(&mut b, &format!("f{i}"))
                .await
                .is_ok_and(|h| h == format!("Bearer fo-pat-{i}"))
        }
    })
    .await;
    no_secret_in_logs(r.logs.path(), &["fo-pat-7", PG_PASSWORD]);
}

/// Wraps the store: its first opening with `first` (faults), any later one (the snapshot a
/// replica falls back to) with none; counts the openings.
fn wrap_first(
    first: &Arc<credbroker::store::faulty::FaultControl>,
    calls: &Arc<std::sync::atomic::AtomicUsize>,
) -> credbroker::server::StoreWrapper {
    use credbroker::store::faulty::{FaultControl, FaultyStore};
    let (first, calls) = (first.clone(), calls.clone());
    let clean = Arc::new(FaultControl::default());
    Box::new(move |inner| {
        let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let control = if n == 0 { first.clone() } else { clean.clone() };
        Arc::new(FaultyStore::new(inner, control))
    })
}

/// A database that stops answering after the replica loaded its mirror, while the broker opens
/// on it (format record, keys, callers), means starting from the replica's snapshot (the one
/// its last graceful stop wrote), as it would had the database stopped a moment earlier, when
/// the snapshot holds what the mirror loaded. A snapshot behind the database (a system registered while this replica was away)
/// would bring back an older state: then the replica waits for the database, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_stops_answering_while_the_broker_opens_on_its_mirror_means_the_snapshot() {
    use credbroker::store::faulty::FaultControl;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let Some(pg) = PgServer::shared().await else {
        return skipped(
            "a_store_that_stops_answering_while_the_broker_opens_on_its_mirror_means_the_snapshot",
        );
    };
    let url = pg.fresh_db().await;
    let asana = FakeAsana::start().await;
    let (dir, other_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut config = test_config(dir.path());
    config.store.url = Some(credbroker::secret::SecretString::new(url.clone()));
    // No routine snapshot while the test runs: the one the replica starts from is the one its
    // graceful stop writes.
    config.store.replica_snapshot_interval = Duration::from_secs(3600);
    let snapshot = dir.path().join(credbroker::server::REPLICA_SNAPSHOT_FILE);
    let first = TestBroker::start_with(config.clone()).await;
    let mut admin = first.admin().await;
    admin
        .register_system(register_asana("s", &asana.base_url, "open-pat", false))
        .await
        .unwrap();
    first.stop().await;
    assert!(snapshot.is_file(), "a graceful stop writes the snapshot");

    // Every operation on the loaded mirror finds no answer: the snapshot serves.
    let (down, calls) = (
        Arc::new(FaultControl::default()),
        Arc::new(AtomicUsize::new(0)),
    );
    down.unreachable.store(u32::MAX, SeqCst);
    let second = TestBroker::start_wrapped(config.clone(), wrap_first(&down, &calls)).await;
    assert_eq!(calls.load(SeqCst), 2, "the snapshot's store is wrapped too");
    assert_eq!(down.injected.load(SeqCst), 1, "one try on the mirror");
    let mut cc = second.admin().await;
    assert_eq!(auth_header(&mut cc, "s").await.unwrap(), "Bearer open-pat");
    second.stop().await;

    // Another replica registers a system meanwhile: this replica's snapshot is behind.
    let mut other = test_config(other_dir.path());
    other.store.url = config.store.url.clone();
    other.store.master_key_file = Some(dir.path().join("master.key"));
    let token_file = credbroker::server::ADMIN_TOKEN_FILE;
    std::fs::copy(
        dir.path().join(token_file),
        other_dir.path().join(token_file),
    )
    .unwrap();
    let b = TestBroker::start_with(other).await;
    let mut admin_b = b.admin().await;
    admin_b
        .register_system(register_asana("t", &asana.base_url, "later-pat", false))
        .await
        .unwrap();
    b.stop().await;
    let (down, calls) = (
        Arc::new(FaultControl::default()),
        Arc::new(AtomicUsize::new(0)),
    );
    down.unreachable.store(u32::MAX, SeqCst);
    let (d, n) = (down.clone(), calls.clone());
    let waited = tokio::spawn(async move {
        // A second try on the mirror (2 s later) shows the replica waited, not fell back.
        within(Duration::from_secs(15), || async {
            d.injected.load(SeqCst) >= 2
        })
        .await;
        let openings = n.load(SeqCst);
        d.unreachable.store(0, SeqCst);
        openings
    });
    let third = TestBroker::start_wrapped(config, wrap_first(&down, &calls)).await;
    assert_eq!(
        waited.await.unwrap(),
        1,
        "no fallback to a snapshot behind the database"
    );
    assert_eq!(calls.load(SeqCst), 1);
    let mut cc = third.admin().await;
    assert_eq!(auth_header(&mut cc, "t").await.unwrap(), "Bearer later-pat");
    third.stop().await;
}
