//! OAuth token lifecycle: single flight, refresh ahead, durable rotation, rejection reports,
//! dead grants and outages (ServiceNow OAuth and Salesforce against loopback fakes).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use credbroker::pb;
use credbroker::pb::AuthFailure as F;
use tonic::Code;

use crate::support::*;

const CLIENT_ID: &str = "sn-client-id";
pub(crate) const CLIENT_SECRET: &str = "sn-client-secret-canary-77";
pub(crate) const USER: &str = "sync.proxy";
const PASSWORD: &str = "sn-password-canary-42";

pub(crate) fn password_grant() -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::OauthPasswordGrant(
            pb::OAuthPasswordGrant {
                client_id: CLIENT_ID.into(),
                client_secret: CLIENT_SECRET.into(),
                username: USER.into(),
                password: PASSWORD.into(),
            },
        )),
    }
}

pub(crate) fn refresh_cred(rt: &str) -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::OauthRefreshToken(
            pb::OAuthRefreshToken {
                client_id: CLIENT_ID.into(),
                client_secret: CLIENT_SECRET.into(),
                refresh_token: rt.into(),
                username: USER.into(),
            },
        )),
    }
}

pub(crate) fn sn_register(
    id: &str,
    base: &str,
    cred: pb::Credential,
    check: bool,
) -> pb::RegisterSystemRequest {
    pb::RegisterSystemRequest {
        system_id: id.into(),
        kind: pb::SystemKind::Servicenow as i32,
        base_url: base.into(),
        credential: Some(cred),
        check,
        ..Default::default()
    }
}

pub(crate) async fn servicenow(lifetime: u64) -> FakeServiceNow {
    let fake = FakeServiceNow::start().await;
    fake.add_user(
        USER,
        PASSWORD,
        "6816f79c",
        "Sync Proxy",
        "sync@acme.example",
    );
    fake.add_client(CLIENT_ID, CLIENT_SECRET);
    fake.oauth(|o| o.access_lifetime = lifetime);
    fake
}

fn req(id: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        system_id: id.into(),
        ..Default::default()
    }
}

/// `n` clients on their own connections.
async fn clients(broker: &TestBroker, n: usize) -> Vec<Client> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(broker.admin().await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_grant_is_exchanged_and_the_password_is_never_stored() {
    let dir = tempfile::tempdir().unwrap();
    let fake = servicenow(1800).await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let resp = admin
        .register_system(sn_register(
            "sn-oauth",
            &fake.base_url,
            password_grant(),
            true,
        ))
        .await
        .unwrap()
        .into_inner();
    let check = resp.check.unwrap();
    assert!(check.ok, "{}", check.message);
    assert_eq!(check.identity.unwrap().email, "sync@acme.example");
    let sys = resp.system.unwrap();
    assert_eq!(
        sys.credential_type,
        pb::CredentialType::OauthRefreshToken as i32
    );
    let lifespan =
        sys.credential_expires_at.unwrap().seconds - credbroker::model::unix_now() as i64;
    assert!(
        (8_639_000..=8_640_000).contains(&lifespan),
        "refresh token expiry tracked: {lifespan}"
    );

    let calls = fake.token_calls();
    let tok = admin
        .get_access_token(req("sn-oauth"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        tok.headers[0].value.starts_with("Bearer at-"),
        "{}",
        tok.headers[0].value
    );
    assert_eq!(tok.api_base_url, fake.base_url);
    // The token minted during registration serves the first worker: no extra upstream call.
    assert_eq!(fake.token_calls(), calls);

    // A stored check goes through the cache and looks the user up with the bearer token.
    let c = admin
        .check_authentication(pb::CheckAuthenticationRequest {
            target: Some(pb::check_authentication_request::Target::SystemId(
                "sn-oauth".into(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .check
        .unwrap();
    assert!(c.ok, "{}", c.message);

    // A wrong password is refused at registration and nothing is saved.
    let mut bad = password_grant();
    if let Some(pb::credential::Credential::OauthPasswordGrant(p)) = bad.credential.as_mut() {
        p.password = "wrong-password-9".into();
    }
    let e = admin
        .register_system(sn_register("sn-bad", &fake.base_url, bad, false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("invalid_credentials") && !e.message().contains("wrong-password-9"),
        "{}",
        e.message()
    );
    assert_eq!(
        admin
            .get_system(pb::GetSystemRequest {
                system_id: "sn-bad".into()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    broker.stop().await;
    for secret in [PASSWORD, CLIENT_SECRET, "wrong-password-9"] {
        assert_eq!(
            dir_contains(dir.path(), secret),
            None,
            "a secret is in the data directory"
        );
    }
    assert!(
        fake.server.unexpected().is_empty(),
        "{:?}",
        fake.server.unexpected()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_calls_on_a_cold_or_expired_system_make_one_token_request() {
    let dir = tempfile::tempdir().unwrap();
    let fake = servicenow(2).await;
    fake.oauth(|o| o.token_delay = Duration::from_millis(200));
    let rt = fake.issue_refresh_token(USER);
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(sn_register(
            "cold",
            &fake.base_url,
            refresh_cred(&rt),
            false,
        ))
        .await
        .unwrap();
    let pool = clients(&broker, 4).await;

    for round in ["cold", "expired"] {
        let before = fake.token_calls();
        let mut tasks = Vec::new();
        for i in 0..500 {
            let mut c = pool[i % pool.len()].clone();
            tasks.push(tokio::spawn(async move {
                c.get_access_token(req("cold"))
                    .await
                    .map(|r| r.into_inner())
            }));
        }
        let mut headers = HashSet::new();
        for t in tasks {
            let tok = t.await.unwrap().unwrap();
            headers.insert(tok.headers[0].value.clone());
        }
        assert_eq!(
            fake.token_calls() - before,
            1,
            "{round}: exactly one token request"
        );
        assert_eq!(
            headers.len(),
            1,
            "{round}: every caller got the same header"
        );
        if round == "cold" {
            // For the "expired" round the system needs a token nobody used: the refresher keeps
            // used tokens fresh, so re-register (the check mints and caches one) and let it lapse.
            admin
                .delete_system(pb::DeleteSystemRequest {
                    system_id: "cold".into(),
                })
                .await
                .unwrap();
            let rt = fake.issue_refresh_token(USER);
            admin
                .register_system(sn_register("cold", &fake.base_url, refresh_cred(&rt), true))
                .await
                .unwrap();
            // Time-based on purpose: the token must really expire (2 s lifetime).
            tokio::time::sleep(Duration::from_millis(2_100)).await;
        }
    }
    assert_eq!(fake.reuse_detected(), 0);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refreshed_ahead_once_per_expiry_and_workers_never_wait() {
    let dir = tempfile::tempdir().unwrap();
    let fake = servicenow(1).await;
    // Any worker call that waited on the upstream would take at least this long.
    fake.oauth(|o| o.token_delay = Duration::from_millis(150));
    let rt = fake.issue_refresh_token(USER);
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(sn_register(
            "ahead",
            &fake.base_url,
            refresh_cred(&rt),
            false,
        ))
        .await
        .unwrap();
    // The first call waits for the first mint.
    let first = admin
        .get_access_token(req("ahead"))
        .await
        .unwrap()
        .into_inner();
    let mut seen = HashSet::from([first.token_id.clone()]);
    let first_mints = fake.token_calls();
    // When each worker call started and ended, to hold against the vendor's request times.
    let mut calls_made: Vec<(Instant, Instant)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    // 20 expiries: 20 tokens after the first.
    while seen.len() < 21 {
        assert!(
            Instant::now() < deadline,
            "refresh ahead stalled at {} tokens",
            seen.len()
        );
        let started = Instant::now();
        let tok = admin
            .get_access_token(req("ahead"))
            .await
            .unwrap()
            .into_inner();
        calls_made.push((started, Instant::now()));
        let exp = tok.expires_at.unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        assert!(
            exp.seconds as u128 * 1000 + exp.nanos as u128 / 1_000_000 > now.as_millis(),
            "an expired token was handed out"
        );
        seen.insert(tok.token_id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let calls = fake.token_calls();
    eprintln!(
        "refresh ahead: {calls} token calls for {} tokens, {} worker calls",
        seen.len(),
        calls_made.len()
    );
    assert!(
        (21..=22).contains(&calls),
        "{calls} token calls for 21 tokens"
    );
    // A worker that waited on a refresh was in its call for the whole of a token request (which
    // the vendor takes 150 ms to answer): no worker call spans one.
    for arrived in &fake.token_call_times()[first_mints..] {
        let answered = *arrived + Duration::from_millis(150);
        assert!(
            !calls_made
                .iter()
                .any(|(start, end)| start <= arrived && *end >= answered),
            "a worker call waited on a refresh"
        );
    }
    broker.stop().await;
}

/// Opens a stopped broker's store and decrypts a system's credential.
pub(crate) fn stored_refresh_token(data_dir: &std::path::Path, system_id: &str) -> String {
    use credbroker::crypto::{Keyring, MasterKey, RecordBinding};
    use credbroker::store::{CredentialStore, SledStore};
    let (key, _) = MasterKey::load_or_generate(None, data_dir, true).unwrap();
    let keyring = Keyring::new(key);
    let store = SledStore::open(data_dir).unwrap();
    let record = futures_lite(store.get_system(system_id)).unwrap().unwrap();
    let plain = keyring
        .open(
            &RecordBinding {
                system_id,
                credential_type: record.credential_type,
                version: record.credential_version,
            },
            &record.sealed_credential,
        )
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&plain).unwrap();
    v["refresh_token"]
        .as_str()
        .or(v["grant"]["refresh_token"].as_str())
        .unwrap()
        .to_owned()
}

fn futures_lite<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_refresh_tokens_are_never_reused_and_the_newest_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let fake = servicenow(1).await;
    fake.oauth(|o| o.rotate = true);
    let rt = fake.issue_refresh_token(USER);
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(sn_register("rot", &fake.base_url, refresh_cred(&rt), false))
        .await
        .unwrap();
    let pool = clients(&broker, 4).await;
    // 1,000 requests from 10 workers over several token lifetimes, some reporting rejections.
    let mut tasks = Vec::new();
    for w in 0..10 {
        let mut c = pool[w % pool.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut last = String::new();
            for i in 0..100 {
                let mut r = req("rot");
                if i % 25 == 24 {
                    r.rejected_token_id = last.clone();
                }
                let tok = c.get_access_token(r).await.unwrap().into_inner();
                last = tok.token_id;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    eprintln!("rotation: {} token calls", fake.token_calls());
    assert_eq!(
        fake.reuse_detected(),
        0,
        "a rotated-out refresh token was reused"
    );
    assert!(
        fake.token_calls() >= 3,
        "the run spanned several expiries ({} token calls)",
        fake.token_calls()
    );
    // Connections still open would keep serving (and holding the store) past the shutdown
    // grace; the store is opened again right below.
    drop((pool, admin));
    broker.stop().await;
    assert_eq!(
        Some(stored_refresh_token(dir.path(), "rot")),
        fake.newest_refresh_token(USER)
    );
}

/// A vendor that writes its lifetimes as strings (Entra's v1 endpoint answers `"expires_in":
/// "3599"`) still has its answers read: the token lives as long as the vendor said, and the
/// refresh token it rotated in that answer is the one stored and presented next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_lifetimes_as_strings_is_read_and_its_rotated_refresh_token_kept() {
    let dir = tempfile::tempdir().unwrap();
    let fake = servicenow(1234).await;
    fake.oauth(|o| {
        o.rotate = true;
        o.numbers_as_strings = true;
    });
    let rt = fake.issue_refresh_token(USER);
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(sn_register(
            "strs",
            &fake.base_url,
            refresh_cred(&rt),
            false,
        ))
        .await
        .unwrap();
    let first = admin
        .get_access_token(req("strs"))
        .await
        .unwrap()
        .into_inner();
    let expires = first.expires_at.as_ref().map(|t| t.seconds).unwrap_or(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (1200..=1240).contains(&(expires - now)),
        "the vendor said 1234 s, the broker holds it {} s",
        expires - now
    );
    let calls = fake.token_calls();
    let mut reported = req("strs");
    reported.rejected_token_id = first.token_id.clone();
    let second = admin.get_access_token(reported).await.unwrap().into_inner();
    assert_ne!(second.token_id, first.token_id);
    assert_eq!(fake.token_calls(), calls + 1);
    assert_eq!(
        fake.reuse_detected(),
        0,
        "a rotated-out refresh token was presented"
    );
    drop(admin);
    broker.stop().await;
    assert_eq!(
        Some(stored_refresh_token(dir.path(), "strs")),
        fake.newest_refresh_token(USER)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_right_after_a_refresh_keeps_the_newest_refresh_token() {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let fake = servicenow(1800).await;
    fake.oauth(|o| o.rotate = true);
    let rt = fake.issue_refresh_token(USER);
    let proc = spawn_process(dir.path(), &logs.path().join("1.log"), &[]).unwrap();
    wait_for_health(
        proc.addr,
        tonic_health::pb::health_check_response::ServingStatus::Serving,
    )
    .await;
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let mut admin = client(proc.addr, Some(token.trim())).await;
    admin
        .register_system(sn_register(
            "killed",
            &fake.base_url,
            refresh_cred(&rt),
            false,
        ))
        .await
        .unwrap();
    // This call refreshes (rotating the refresh token) and answers only after the new refresh
    // token is flushed. Kill the process the moment the answer arrives.
    admin.get_access_token(req("killed")).await.unwrap();
    proc.signal("KILL");
    drop(proc);
    assert_eq!(fake.token_calls(), 1);

    let proc = spawn_process(dir.path(), &logs.path().join("2.log"), &[]).unwrap();
    wait_for_health(
        proc.addr,
        tonic_health::pb::health_check_response::ServingStatus::Serving,
    )
    .await;
    let mut admin = client(proc.addr, Some(token.trim())).await;
    // Nothing is cached after a restart: this refreshes with the stored refresh token.
    let tok = admin
        .get_access_token(req("killed"))
        .await
        .unwrap()
        .into_inner();
    assert!(tok.headers[0].value.starts_with("Bearer at-"));
    assert_eq!(fake.token_calls(), 2);
    assert_eq!(
        fake.reuse_detected(),
        0,
        "the old refresh token was presented after the restart"
    );
    assert_eq!(proc.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_requires_reauthorization_and_stops_upstream_calls() {
    let dir = tempfile::tempdir().unwrap();
    let fake = servicenow(1800).await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(sn_register("dead", &fake.base_url, password_grant(), false))
        .await
        .unwrap();
    let tok = admin
        .get_access_token(req("dead"))
        .await
        .unwrap()
        .into_inner();
    fake.revoke_all();
    let mut r = req("dead");
    r.rejected_token_id = tok.token_id.clone();
    let e = admin.get_access_token(r).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("invalid_grant") && e.message().contains("password grant"),
        "{}",
        e.message()
    );
    let sys = admin
        .get_system(pb::GetSystemRequest {
            system_id: "dead".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .system
        .unwrap();
    assert_eq!(sys.state, pb::SystemState::ReauthorizationRequired as i32);
    assert!(sys.state_message.contains("password grant"));

    // Continued worker load makes zero upstream calls.
    let calls = fake.token_calls();
    let pool = clients(&broker, 4).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = pool[i % 4].clone();
        tasks.push(tokio::spawn(async move {
            c.get_access_token(req("dead")).await.unwrap_err().code()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Code::FailedPrecondition);
    }
    assert_eq!(
        fake.token_calls(),
        calls,
        "a dead grant was retried upstream"
    );

    // A new password grant revives the system.
    admin
        .rotate_credential(pb::RotateCredentialRequest {
            system_id: "dead".into(),
            credential: Some(password_grant()),
            skip_check: false,
        })
        .await
        .unwrap();
    let sys = admin
        .get_system(pb::GetSystemRequest {
            system_id: "dead".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .system
        .unwrap();
    assert_eq!(sys.state, pb::SystemState::Active as i32);
    admin.get_access_token(req("dead")).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_serves_the_cached_token_until_expiry_with_bounded_retries() {
    let dir = tempfile::tempdir().unwrap();
    let fake = servicenow(3).await;
    let rt = fake.issue_refresh_token(USER);
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(sn_register(
            "flaky",
            &fake.base_url,
            refresh_cred(&rt),
            false,
        ))
        .await
        .unwrap();
    let first = admin
        .get_access_token(req("flaky"))
        .await
        .unwrap()
        .into_inner();
    fake.oauth(|o| o.token_mode = Mode::ServerError);
    let calls = fake.token_calls();
    let expires = first.expires_at.unwrap().seconds as u64;
    // Hammer the broker until the cached token has expired.
    let mut served = 0;
    let mut unavailable = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        match admin.get_access_token(req("flaky")).await {
            Ok(t) => {
                assert_eq!(
                    t.into_inner().token_id,
                    first.token_id,
                    "only the cached token can be served"
                );
                served += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                assert!(credbroker::model::unix_now() >= expires);
                unavailable += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        served > 10 && unavailable > 10,
        "served {served}, unavailable {unavailable}"
    );
    let during = fake.token_calls() - calls;
    eprintln!("outage: served {served}, unavailable {unavailable}, upstream calls {during}");
    assert!(
        (1..=5).contains(&during),
        "{during} upstream calls in a 5 s outage"
    );
    // Recovery without restart once the upstream is back (after the back-off).
    fake.oauth(|o| o.token_mode = Mode::Normal);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if admin.get_access_token(req("flaky")).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servicenow_refresh_token_lapse_requires_a_new_password_grant() {
    let dir = tempfile::tempdir().unwrap();
    let fake = servicenow(1800).await;
    let mut config = test_config(dir.path());
    config.vendors.servicenow_refresh_token_lifespan = Duration::from_secs(1);
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(sn_register(
            "lapse",
            &fake.base_url,
            password_grant(),
            false,
        ))
        .await
        .unwrap();
    let tok = admin
        .get_access_token(req("lapse"))
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let calls = fake.token_calls();
    let mut r = req("lapse");
    r.rejected_token_id = tok.token_id;
    let e = admin.get_access_token(r).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("refresh token has expired") && e.message().contains("password grant"),
        "{}",
        e.message()
    );
    assert_eq!(
        fake.token_calls(),
        calls,
        "an expired refresh token is not sent upstream"
    );
    let sys = admin
        .get_system(pb::GetSystemRequest {
            system_id: "lapse".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .system
        .unwrap();
    assert_eq!(sys.state, pb::SystemState::ReauthorizationRequired as i32);
    broker.stop().await;
}

/// An instance that rotates its refresh tokens: each new one lives its own lifespan from its
/// issue, not the first one's (which would have the grant refused locally at the first token's
/// date).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_servicenow_refresh_token_lives_its_own_lifespan() {
    let dir = tempfile::tempdir().unwrap();
    let fake = servicenow(1800).await;
    fake.oauth(|o| o.rotate = true);
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(sn_register(
            "turns",
            &fake.base_url,
            password_grant(),
            false,
        ))
        .await
        .unwrap();
    let expiry = |admin: &mut Client| {
        let mut admin = admin.clone();
        async move {
            let system = admin
                .get_system(pb::GetSystemRequest {
                    system_id: "turns".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .system
                .unwrap();
            system.credential_expires_at.unwrap().seconds
        }
    };
    let first = expiry(&mut admin).await;
    let token = admin
        .get_access_token(req("turns"))
        .await
        .unwrap()
        .into_inner();
    // A second later (the expiry counts whole seconds), a refresh that rotates the token.
    let before = credbroker::model::unix_now() + 1;
    while credbroker::model::unix_now() < before {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls = fake.token_calls();
    let mut r = req("turns");
    r.rejected_token_id = token.token_id;
    admin.get_access_token(r).await.unwrap();
    assert_eq!(fake.token_calls(), calls + 1, "refreshed");
    let rotated = expiry(&mut admin).await;
    assert!(
        rotated > first,
        "the new refresh token's expiry {rotated} is its own, not the first one's {first}"
    );
    assert_eq!(fake.reuse_detected(), 0);
    broker.stop().await;
}

// ----------------------------------------------------------------------------------------------
// Salesforce
// ----------------------------------------------------------------------------------------------

pub(crate) const SF_ID: &str = "3MVG9-consumer-key";
pub(crate) const SF_SECRET: &str = "sf-consumer-secret-canary-31";

pub(crate) fn sf_cc(secret: &str) -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::OauthClientCredentials(
            pb::OAuthClientCredentials {
                client_id: SF_ID.into(),
                client_secret: secret.into(),
                scopes: vec![],
                secret_expires_at: None,
            },
        )),
    }
}

pub(crate) fn sf_login(password: &str, with_client: bool) -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::SalesforceLogin(
            pb::SalesforceLogin {
                username: "integration@acme.example".into(),
                password: password.into(),
                security_token: "sf-sectoken-canary-5".into(),
                client_id: if with_client {
                    SF_ID.into()
                } else {
                    String::new()
                },
                client_secret: if with_client {
                    SF_SECRET.into()
                } else {
                    String::new()
                },
            },
        )),
    }
}

pub(crate) fn sf_register(
    id: &str,
    base: &str,
    cred: pb::Credential,
    check: bool,
) -> pb::RegisterSystemRequest {
    pb::RegisterSystemRequest {
        system_id: id.into(),
        kind: pb::SystemKind::Salesforce as i32,
        base_url: base.into(),
        credential: Some(cred),
        check,
        ..Default::default()
    }
}

/// An exhausted daily API allocation answers REST with 403 REQUEST_LIMIT_EXCEEDED: the check
/// says rate-limited (wait), not a missing permission (change the app), and a real permission
/// 403 still says permission.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salesforce_api_limit_is_rate_limited_not_a_missing_permission() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSalesforce::start(SF_ID, SF_SECRET).await;
    // No identity scopes: the check falls back to the REST API.
    fake.set_userinfo(false);
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(sf_register(
            "sf-limit",
            &fake.base_url,
            sf_cc(SF_SECRET),
            true,
        ))
        .await
        .unwrap();
    let check = |admin: &mut Client| {
        let mut admin = admin.clone();
        async move {
            admin
                .check_authentication(pb::CheckAuthenticationRequest {
                    target: Some(pb::check_authentication_request::Target::SystemId(
                        "sf-limit".into(),
                    )),
                })
                .await
                .unwrap()
                .into_inner()
                .check
                .unwrap()
        }
    };
    assert!(check(&mut admin).await.ok);
    fake.set_api_limit_exhausted(true);
    let c = check(&mut admin).await;
    assert!(!c.ok);
    assert_eq!(
        c.failure,
        pb::AuthFailure::RateLimited as i32,
        "{}",
        c.message
    );
    assert!(
        c.message.contains("REQUEST_LIMIT_EXCEEDED"),
        "{}",
        c.message
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salesforce_client_credentials_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSalesforce::start(SF_ID, SF_SECRET).await;
    fake.set_lifetime(3000);
    let mut config = test_config(dir.path());
    config.vendors.salesforce_token_lifetime = Duration::from_secs(600);
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;

    let resp = admin
        .register_system(sf_register("sf", &fake.base_url, sf_cc(SF_SECRET), true))
        .await
        .unwrap()
        .into_inner();
    let c = resp.check.unwrap();
    assert!(c.ok, "{}", c.message);
    assert_eq!(c.identity.unwrap().id, "005000000000001AAA");
    let tok = admin
        .get_access_token(req("sf"))
        .await
        .unwrap()
        .into_inner();
    assert!(tok.headers[0].value.starts_with("Bearer 00D!sess"));
    assert_eq!(
        tok.api_base_url, fake.base_url,
        "api_base_url is the instance_url"
    );
    // The expiry comes from introspection (3000 s), not the 600 s fallback.
    let left = tok.expires_at.unwrap().seconds - credbroker::model::unix_now() as i64;
    assert!((2990..=3000).contains(&left), "expires in {left} s");
    // A worker calls Salesforce with exactly what it got.
    let headers: Vec<(String, String)> = tok
        .headers
        .iter()
        .map(|h| (h.name.clone(), h.value.clone()))
        .collect();
    assert_eq!(fake.call_api(&tok.api_base_url, &headers).await, 200);

    // Sessions end (no expiry is announced): 100 workers report the 401 → one re-mint.
    fake.revoke_sessions();
    assert_eq!(fake.call_api(&tok.api_base_url, &headers).await, 401);
    let calls = fake.token_calls();
    let pool = clients(&broker, 4).await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut c = pool[i % 4].clone();
        let mut r = req("sf");
        r.rejected_token_id = tok.token_id.clone();
        tasks.push(tokio::spawn(async move {
            c.get_access_token(r).await.unwrap().into_inner()
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        let fresh = t.await.unwrap();
        assert_ne!(fresh.token_id, tok.token_id);
        ids.insert(fresh.token_id);
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(fake.token_calls() - calls, 1, "one re-mint for 100 reports");

    // Without introspection the configured conservative lifetime applies; without identity
    // scopes the REST probe proves the token.
    fake.set_introspection(false);
    fake.set_userinfo(false);
    let resp = admin
        .register_system(sf_register("sf2", &fake.base_url, sf_cc(SF_SECRET), true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.check.unwrap().identity.unwrap().id,
        "005000000000001AAA"
    );
    let tok = admin
        .get_access_token(req("sf2"))
        .await
        .unwrap()
        .into_inner();
    let left = tok.expires_at.unwrap().seconds - credbroker::model::unix_now() as i64;
    assert!((590..=600).contains(&left), "expires in {left} s");

    // Wrong secret: invalid credentials, with the setup-delay note; nothing saved.
    let e = admin
        .register_system(sf_register(
            "sf3",
            &fake.base_url,
            sf_cc("wrong-secret-2"),
            true,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("invalid_credentials") && e.message().contains("10–20 minutes"),
        "{}",
        e.message()
    );
    // The generic login host cannot do client credentials.
    let e = admin
        .register_system(sf_register(
            "sf4",
            "https://login.salesforce.com",
            sf_cc(SF_SECRET),
            false,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("My Domain"), "{}", e.message());
    assert!(
        fake.server.unexpected().is_empty(),
        "{:?}",
        fake.server.unexpected()
    );
    broker.stop().await;
    assert_eq!(dir_contains(dir.path(), SF_SECRET), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salesforce_legacy_login_flows_work_and_warn_about_retirement() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSalesforce::start(SF_ID, SF_SECRET).await;
    fake.add_user(
        "integration@acme.example",
        "sf-pass-canary-8",
        "sf-sectoken-canary-5",
    );
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    for (id, with_client) in [("sf-oauth-pw", true), ("sf-soap", false)] {
        let resp = admin
            .register_system(sf_register(
                id,
                &fake.base_url,
                sf_login("sf-pass-canary-8", with_client),
                true,
            ))
            .await
            .unwrap()
            .into_inner();
        let c = resp.check.unwrap();
        assert!(c.ok, "{id}: {}", c.message);
        assert!(c.message.contains("retiring"), "{}", c.message);
        let tok = admin.get_access_token(req(id)).await.unwrap().into_inner();
        assert!(tok.headers[0].value.starts_with("Bearer 00D!sess"));
        assert_eq!(tok.api_base_url, fake.base_url);
        let c = admin
            .check_authentication(pb::CheckAuthenticationRequest {
                target: Some(pb::check_authentication_request::Target::Candidate(
                    pb::CandidateSystem {
                        kind: pb::SystemKind::Salesforce as i32,
                        base_url: fake.base_url.clone(),
                        credential: Some(sf_login("not-the-password", with_client)),
                    },
                )),
            })
            .await
            .unwrap()
            .into_inner()
            .check
            .unwrap();
        assert!(!c.ok);
        assert_eq!(
            c.failure,
            F::InvalidCredentials as i32,
            "{id}: {}",
            c.message
        );
        assert!(!c.message.contains("not-the-password"));
    }
    assert!(
        fake.server.unexpected().is_empty(),
        "{:?}",
        fake.server.unexpected()
    );
    broker.stop().await;
    for secret in ["sf-pass-canary-8", "sf-sectoken-canary-5"] {
        assert_eq!(dir_contains(dir.path(), secret), None);
    }
}
