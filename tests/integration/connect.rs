//! "Connect with Zendesk" and "Connect with Jira Cloud": RPC → authorize URL → the vendor's
//! consent page (followed as a browser would) → the broker's callback → an active system.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use credbroker::pb;
use tonic::Code;

use crate::support::*;

pub(crate) const ZD_CLIENT: &str = "zdg-credbroker";
pub(crate) const ZD_SECRET: &str = "zd-client-secret-canary-19";
pub(crate) const JIRA_CLIENT: &str = "jira-client-a";
pub(crate) const JIRA_SECRET: &str = "jira-client-secret-canary-23";

pub(crate) fn authz_code(client_id: &str, secret: &str) -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::OauthAuthorizationCode(
            pb::OAuthAuthorizationCode {
                client_id: client_id.into(),
                client_secret: secret.into(),
                scopes: vec![],
            },
        )),
    }
}

pub(crate) fn register(
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
        ..Default::default()
    }
}

/// What a browser does: open the authorize URL, follow the vendor's redirect to the callback.
/// Returns the vendor's redirect target and the callback page.
pub(crate) async fn browse(authorize_url: &str) -> (String, u16, String) {
    let http = no_redirects();
    let r = http.get(authorize_url).send().await.unwrap();
    assert_eq!(
        r.status().as_u16(),
        302,
        "the consent page should redirect back"
    );
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let (status, page) = open(&location).await;
    (location, status, page)
}

async fn open(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

pub(crate) async fn start(admin: &mut Client, id: &str) -> pb::StartAuthorizationResponse {
    admin
        .start_authorization(pb::StartAuthorizationRequest {
            system_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

pub(crate) async fn system(admin: &mut Client, id: &str) -> pb::System {
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

pub(crate) fn token_req(id: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        system_id: id.into(),
        ..Default::default()
    }
}

pub(crate) async fn zendesk() -> FakeZendesk {
    let fake = FakeZendesk::start(ZD_CLIENT, ZD_SECRET).await;
    fake.add_user("agent", 9001, "Agent Smith", "agent@acme.example", "agent");
    fake.add_user("enduser", 9002, "End User", "eu@acme.example", "end-user");
    fake.set_consent(Consent::Allow("agent".into()));
    fake
}

/// Registers Zendesk system "zd" at `fake` (an authorization-code client, not connected yet).
pub(crate) async fn register_zendesk(admin: &mut Client, fake: &FakeZendesk) {
    admin
        .register_system(register(
            "zd",
            pb::SystemKind::Zendesk,
            &fake.base_url,
            authz_code(ZD_CLIENT, ZD_SECRET),
        ))
        .await
        .unwrap();
}

/// Registers Zendesk system "zd" at `fake` and connects it (the consent page allows).
pub(crate) async fn connect_zendesk(admin: &mut Client, fake: &FakeZendesk) {
    register_zendesk(admin, fake).await;
    let s = start(admin, "zd").await;
    assert_eq!(browse(&s.authorize_url).await.1, 200);
}

pub(crate) async fn atlassian() -> FakeAtlassian {
    let fake = FakeAtlassian::start().await;
    fake.add_client(JIRA_CLIENT, JIRA_SECRET);
    fake.add_client("jira-client-b", "jira-secret-b");
    fake.add_user(
        "proxy",
        "5b10ac8d82e05b22cc7d4ef5",
        "Jira Proxy",
        "jira@acme.example",
    );
    fake.set_sites(&[
        ("cloud-other", "Other", "https://other.atlassian.net"),
        ("cloud-acme", "Acme", "https://acme.atlassian.net"),
    ]);
    fake.set_consent(Consent::Allow("proxy".into()));
    fake
}

pub(crate) fn jira_config(
    dir: &std::path::Path,
    fake: &FakeAtlassian,
) -> credbroker::config::Config {
    let mut c = test_config(dir);
    c.vendors.jira_auth_url = fake.origin.clone();
    c.vendors.jira_api_url = fake.origin.clone();
    c
}

/// A write that lands on the system between the broker reading it and storing the grant (a
/// health check, a 401 count) does not cost the user a new consent: the code is spent, so the
/// grant is stored on top of the record as it is now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_write_during_the_callback_does_not_lose_the_grant() {
    callback_meets(|c| {
        c.concurrent_writes
            .store(2, std::sync::atomic::Ordering::SeqCst)
    })
    .await;
}

/// A grant whose write landed though the store's answer was lost is reported connected, not
/// "changed meanwhile" (the retry finds the record at the next version: its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_stored_though_the_answer_was_lost_is_reported_connected() {
    callback_meets(|c| {
        c.lost_update_answers
            .store(1, std::sync::atomic::Ordering::SeqCst)
    })
    .await;
}

/// Connects Zendesk system "zd" with `fault` set on the store just before the callback, and
/// checks that the system is connected and serves.
async fn callback_meets(fault: impl Fn(&credbroker::store::faulty::FaultControl)) {
    let dir = tempfile::tempdir().unwrap();
    let fake = zendesk().await;
    let control = std::sync::Arc::new(credbroker::store::faulty::FaultControl::default());
    let wrap_control = control.clone();
    let broker = TestBroker::start_wrapped(
        test_config(dir.path()),
        Box::new(move |inner| {
            std::sync::Arc::new(credbroker::store::faulty::FaultyStore::new(
                inner,
                wrap_control.clone(),
            ))
        }),
    )
    .await;
    let mut admin = broker.admin().await;
    register_zendesk(&mut admin, &fake).await;
    let s = start(&mut admin, "zd").await;
    fault(&control);
    let (_, status, page) = browse(&s.authorize_url).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("connected and active"), "{page}");
    let left = |n: &std::sync::atomic::AtomicU32| n.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        left(&control.concurrent_writes) + left(&control.lost_update_answers),
        0,
        "the fault met the callback's write"
    );
    let sys = system(&mut admin, "zd").await;
    assert_eq!(sys.state, pb::SystemState::Active as i32);
    assert_eq!(sys.credential_version, 2);
    let tok = admin
        .get_access_token(token_req("zd"))
        .await
        .unwrap()
        .into_inner();
    assert!(tok.headers[0].value.starts_with("Bearer at-"));
    broker.stop().await;
}

/// A Zendesk refresh answered without a refresh token (real Zendesk always sends a new one: a
/// wrong answer) keeps the stored refresh token and its tracked expiry; the answer's
/// `refresh_token_expires_in` speaks of no token the broker holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zendesk_refresh_without_a_refresh_token_keeps_the_stored_ones_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let fake = zendesk().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    connect_zendesk(&mut admin, &fake).await;
    let expires = system(&mut admin, "zd")
        .await
        .credential_expires_at
        .unwrap();
    let first = admin
        .get_access_token(token_req("zd"))
        .await
        .unwrap()
        .into_inner();
    fake.omit_refresh_tokens(7 * 86_400);
    let calls = fake.token_calls();
    let again = admin
        .get_access_token(pb::GetAccessTokenRequest {
            rejected_token_id: first.token_id.clone(),
            ..token_req("zd")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fake.token_calls(), calls + 1, "refreshed");
    assert_ne!(again.token_id, first.token_id);
    let after = system(&mut admin, "zd").await;
    assert_eq!(after.state, pb::SystemState::Active as i32);
    assert_eq!(
        after.credential_expires_at.unwrap(),
        expires,
        "the expiry stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zendesk_connects_end_to_end_through_the_rpc() {
    let dir = tempfile::tempdir().unwrap();
    let fake = zendesk().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let sys = admin
        .register_system(register(
            "zd",
            pb::SystemKind::Zendesk,
            &fake.base_url,
            authz_code(ZD_CLIENT, ZD_SECRET),
        ))
        .await
        .unwrap()
        .into_inner()
        .system
        .unwrap();
    assert_eq!(sys.state, pb::SystemState::AuthorizationPending as i32);
    assert!(
        sys.state_message
            .contains("credbrokerctl system connect zd"),
        "{}",
        sys.state_message
    );
    let e = admin.get_access_token(token_req("zd")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("connect"), "{}", e.message());

    let s = start(&mut admin, "zd").await;
    assert_eq!(
        s.redirect_uri,
        format!("http://{}/oauth/callback", broker.http_addr)
    );
    let url = url::Url::parse(&s.authorize_url).unwrap();
    let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["scope"], "read write");
    assert_eq!(q["redirect_uri"], s.redirect_uri);
    assert!(q["state"].len() >= 40);
    let (_, status, page) = browse(&s.authorize_url).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("connected and active"), "{page}");

    let sys = system(&mut admin, "zd").await;
    assert_eq!(sys.state, pb::SystemState::Active as i32);
    assert_eq!(sys.credential_version, 2);
    // The refresh token's lifetime is known (asked for explicitly): 30 days by default.
    let left = sys.credential_expires_at.unwrap().seconds - credbroker::model::unix_now() as i64;
    assert!((2_591_000..=2_592_000).contains(&left), "{left}");
    let calls = fake.token_calls();
    let tok = admin
        .get_access_token(token_req("zd"))
        .await
        .unwrap()
        .into_inner();
    assert!(tok.headers[0].value.starts_with("Bearer at-"));
    assert_eq!(tok.api_base_url, fake.base_url);
    assert_eq!(
        fake.token_calls(),
        calls,
        "the token from the exchange serves the first worker"
    );
    let c = admin
        .check_authentication(pb::CheckAuthenticationRequest {
            target: Some(pb::check_authentication_request::Target::SystemId(
                "zd".into(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .check
        .unwrap();
    assert!(c.ok, "{}", c.message);
    assert_eq!(c.identity.unwrap().id, "9001");

    // Reconnecting as an end-user: the identity check tells, the grant is replaced only on success.
    fake.set_consent(Consent::Allow("enduser".into()));
    let s = start(&mut admin, "zd").await;
    let (_, status, _) = browse(&s.authorize_url).await;
    assert_eq!(status, 200);
    let c = admin
        .check_authentication(pb::CheckAuthenticationRequest {
            target: Some(pb::check_authentication_request::Target::SystemId(
                "zd".into(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .check
        .unwrap();
    assert!(!c.ok);
    assert_eq!(c.missing_permissions, ["agent or admin role"]);
    assert!(
        fake.server.unexpected().is_empty(),
        "{:?}",
        fake.server.unexpected()
    );
    broker.stop().await;
}

/// A code exchange answered without `scope` (RFC 6749 lets a server leave it out when it
/// granted what was asked) is taken to have granted what the flow asked for: with no scopes
/// stored, Zendesk's defaults, so the check does not call them missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_answered_without_scope_has_what_was_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let fake = zendesk().await;
    fake.omit_scope();
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let creds = authz_code(ZD_CLIENT, ZD_SECRET);
    let reg = register("zd", pb::SystemKind::Zendesk, &fake.base_url, creds);
    admin.register_system(reg).await.unwrap();
    let s = start(&mut admin, "zd").await;
    let (_, status, page) = browse(&s.authorize_url).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("connected and active"), "{page}");
    let target = pb::check_authentication_request::Target::SystemId("zd".into());
    let check = pb::CheckAuthenticationRequest {
        target: Some(target),
    };
    let c = admin
        .check_authentication(check)
        .await
        .unwrap()
        .into_inner();
    let c = c.check.unwrap();
    assert!(c.ok, "{}", c.message);
    assert!(
        c.missing_permissions.is_empty(),
        "{:?}",
        c.missing_permissions
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jira_connects_through_the_cli_and_picks_the_registered_site() {
    let dir = tempfile::tempdir().unwrap();
    let fake = atlassian().await;
    let broker = TestBroker::start_with(jira_config(dir.path(), &fake)).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(register(
            "jira",
            pb::SystemKind::JiraCloud,
            "https://ACME.atlassian.net/",
            authz_code(JIRA_CLIENT, JIRA_SECRET),
        ))
        .await
        .unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_credbrokerctl"))
        .args([
            "--output",
            "json",
            "system",
            "connect",
            "jira",
            "--poll-ms",
            "100",
        ])
        .env("CREDBROKER_ADDR", broker.addr.to_string())
        .env("CREDBROKER_DATA_DIR", &broker.data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let url = url::Url::parse(first["authorize_url"].as_str().unwrap()).unwrap();
    let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(q["audience"], "api.atlassian.com");
    assert_eq!(q["prompt"], "consent");
    assert!(q["scope"].split(' ').any(|s| s == "offline_access"));
    let (_, status, page) = browse(url.as_str()).await;
    assert_eq!(status, 200, "{page}");
    let done = tokio::task::spawn_blocking(move || {
        let last: serde_json::Value =
            serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        (child.wait().unwrap(), last)
    })
    .await
    .unwrap();
    assert!(done.0.success(), "credbrokerctl system connect failed");
    assert_eq!(done.1["state"], "active");

    let tok = admin
        .get_access_token(token_req("jira"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        tok.api_base_url,
        format!("{}/ex/jira/cloud-acme", fake.origin),
        "the registered site's cloud id"
    );
    assert_eq!(fake.token_calls(), 1, "only the code exchange so far");
    // A worker's rejection report forces a refresh with the rotating refresh token.
    let mut r = token_req("jira");
    r.rejected_token_id = tok.token_id.clone();
    let fresh = admin.get_access_token(r).await.unwrap().into_inner();
    assert_ne!(fresh.token_id, tok.token_id);
    assert_eq!(fake.token_calls(), 2);
    assert_eq!(fake.reuse_detected(), 0);
    let c = admin
        .check_authentication(pb::CheckAuthenticationRequest {
            target: Some(pb::check_authentication_request::Target::SystemId(
                "jira".into(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .check
        .unwrap();
    assert!(c.ok, "{}", c.message);
    assert_eq!(c.identity.unwrap().email, "jira@acme.example");

    // A grant that covers none of the registered site leaves the system pending with the list.
    admin
        .register_system(register(
            "jira2",
            pb::SystemKind::JiraCloud,
            "https://missing.atlassian.net",
            authz_code(JIRA_CLIENT, JIRA_SECRET),
        ))
        .await
        .unwrap();
    let s = start(&mut admin, "jira2").await;
    let (_, status, page) = browse(&s.authorize_url).await;
    assert_eq!(status, 400);
    assert!(
        page.contains("https://acme.atlassian.net (Acme)")
            && page.contains("https://other.atlassian.net (Other)"),
        "{page}"
    );
    let sys = system(&mut admin, "jira2").await;
    assert_eq!(sys.state, pb::SystemState::AuthorizationPending as i32);
    assert!(
        sys.state_message.contains("https://acme.atlassian.net"),
        "{}",
        sys.state_message
    );

    // Missing scopes come back as a 401 "scope does not match": named, not guessed.
    fake.set_granted_scopes("read:jira-work offline_access");
    admin
        .register_system(register(
            "jira3",
            pb::SystemKind::JiraCloud,
            "https://acme.atlassian.net",
            authz_code(JIRA_CLIENT, JIRA_SECRET),
        ))
        .await
        .unwrap();
    let s = start(&mut admin, "jira3").await;
    assert_eq!(browse(&s.authorize_url).await.1, 200);
    let c = admin
        .check_authentication(pb::CheckAuthenticationRequest {
            target: Some(pb::check_authentication_request::Target::SystemId(
                "jira3".into(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .check
        .unwrap();
    assert_eq!(
        c.failure,
        pb::AuthFailure::InsufficientPermissions as i32,
        "{}",
        c.message
    );
    assert_eq!(c.missing_permissions, ["write:jira-work", "read:jira-user"]);
    assert!(
        fake.server.unexpected().is_empty(),
        "{:?}",
        fake.server.unexpected()
    );
    broker.stop().await;
}

/// The code is spent when Atlassian's site list fails right after the exchange: the broker
/// asks for the list again instead of dropping the fresh grant (a new consent for the admin).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_list_that_fails_once_after_the_exchange_does_not_lose_the_grant() {
    let dir = tempfile::tempdir().unwrap();
    let fake = atlassian().await;
    let broker = TestBroker::start_with(jira_config(dir.path(), &fake)).await;
    let mut admin = broker.admin().await;
    for id in ["jira", "jira2"] {
        admin
            .register_system(register(
                id,
                pb::SystemKind::JiraCloud,
                "https://acme.atlassian.net",
                authz_code(JIRA_CLIENT, JIRA_SECRET),
            ))
            .await
            .unwrap();
    }
    const LIST: &str = "/oauth/token/accessible-resources";

    fake.fail_site_list(2, 503);
    let s = start(&mut admin, "jira").await;
    let (_, status, page) = browse(&s.authorize_url).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(fake.server.count(LIST), 3, "two 503s, then the list");
    let sys = system(&mut admin, "jira").await;
    assert_eq!(sys.state, pb::SystemState::Active as i32);
    let tok = admin
        .get_access_token(token_req("jira"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        tok.api_base_url,
        format!("{}/ex/jira/cloud-acme", fake.origin)
    );
    assert_eq!(fake.token_calls(), 1, "the exchange only");

    // A list that keeps failing is given up after three tries, and one that refuses (a 401)
    // after one: nothing stored, say why.
    for (status, tries) in [(503, 3), (401, 1)] {
        let before = fake.server.count(LIST);
        fake.fail_site_list(10, status);
        let s = start(&mut admin, "jira2").await;
        let (_, code, page) = browse(&s.authorize_url).await;
        assert_ne!(code, 200, "{page}");
        let why = format!("accessible-resources answered HTTP {status}");
        assert!(page.contains(&why), "{page}");
        assert_eq!(fake.server.count(LIST) - before, tries, "HTTP {status}");
        let sys = system(&mut admin, "jira2").await;
        assert_eq!(sys.state, pb::SystemState::AuthorizationPending as i32);
        assert_eq!(sys.credential_version, 1);
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_expired_foreign_and_denied_callbacks_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let zd = zendesk().await;
    let atl = atlassian().await;
    let mut config = jira_config(dir.path(), &atl);
    config.refresh.authorization_ttl = Duration::from_secs(1);
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    register_zendesk(&mut admin, &zd).await;
    admin
        .register_system(register(
            "ja",
            pb::SystemKind::JiraCloud,
            "https://acme.atlassian.net",
            authz_code(JIRA_CLIENT, JIRA_SECRET),
        ))
        .await
        .unwrap();
    admin
        .register_system(register(
            "jb",
            pb::SystemKind::JiraCloud,
            "https://acme.atlassian.net",
            authz_code("jira-client-b", "jira-secret-b"),
        ))
        .await
        .unwrap();
    let cb = format!("http://{}/oauth/callback", broker.http_addr);
    let unchanged = |s: &pb::System| {
        s.state == pb::SystemState::AuthorizationPending as i32 && s.credential_version == 1
    };

    // Forged state.
    let (status, page) = open(&format!("{cb}?code=whatever&state=forged-state")).await;
    assert_eq!(status, 400);
    assert!(page.contains("unknown, was already used"), "{page}");
    // Vendor error: access_denied.
    zd.set_consent(Consent::Deny);
    let s = start(&mut admin, "zd").await;
    let (_, status, page) = browse(&s.authorize_url).await;
    assert_eq!(status, 400);
    assert!(
        page.contains("access_denied") && page.contains("Nothing was changed"),
        "{page}"
    );
    assert!(unchanged(&system(&mut admin, "zd").await));
    // Replay: a successful callback URL opened twice.
    zd.set_consent(Consent::Allow("agent".into()));
    let s = start(&mut admin, "zd").await;
    let (location, status, _) = browse(&s.authorize_url).await;
    assert_eq!(status, 200);
    let version = system(&mut admin, "zd").await.credential_version;
    let (status, page) = open(&location).await;
    assert_eq!(status, 400, "{page}");
    assert_eq!(
        system(&mut admin, "zd").await.credential_version,
        version,
        "a replay changed the system"
    );
    // A code for another system: ja's code delivered with jb's state (another client).
    let sa = start(&mut admin, "ja").await;
    let sb = start(&mut admin, "jb").await;
    let http = no_redirects();
    let loc = http.get(&sa.authorize_url).send().await.unwrap().headers()["location"]
        .to_str()
        .unwrap()
        .to_owned();
    let code = url::Url::parse(&loc)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .to_string();
    let state_b = url::Url::parse(&sb.authorize_url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .to_string();
    let (status, page) = open(&format!("{cb}?code={code}&state={state_b}")).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("invalid_grant"), "{page}");
    assert!(unchanged(&system(&mut admin, "jb").await));
    assert!(!page.contains(&code), "the code is echoed in the page");
    // Expired state (1 s lifetime here).
    let s = start(&mut admin, "ja").await;
    let loc = http.get(&s.authorize_url).send().await.unwrap().headers()["location"]
        .to_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (status, page) = open(&loc).await;
    assert_eq!(status, 400);
    assert!(page.contains("expired"), "{page}");
    assert!(unchanged(&system(&mut admin, "ja").await));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_grants_refresh_once_across_expiry_and_are_kept_alive_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let fake = zendesk().await;
    fake.set_access_lifetime(2);
    let mut config = test_config(dir.path());
    config.refresh.keepalive_interval = Duration::from_millis(300);
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    connect_zendesk(&mut admin, &fake).await;
    // The exchange's token nobody used lapses (2 s); then 500 concurrent calls across the expiry.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let before = fake.token_calls();
    let mut pool = Vec::new();
    for _ in 0..4 {
        pool.push(broker.admin().await);
    }
    let mut tasks = Vec::new();
    for i in 0..500 {
        let mut c = pool[i % 4].clone();
        tasks.push(tokio::spawn(async move {
            c.get_access_token(token_req("zd"))
                .await
                .unwrap()
                .into_inner()
                .token_id
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(fake.token_calls() - before, 1, "exactly one refresh");
    // Many expiries under load: the rotating fake never sees a reused refresh token.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        admin.get_access_token(token_req("zd")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(fake.token_calls() - before >= 3);
    assert_eq!(fake.reuse_detected(), 0);
    broker.stop().await;

    // Keep-alive: with a margin wider than the refresh token's lifetime every grant is due, so an
    // idle system is refreshed by the sweep alone, without any worker call (once: the rotated
    // refresh token is within the margin at once, and is refreshed again only halfway to its
    // end, not at every sweep; the unit tests count the sweeps).
    let mut config = test_config(dir.path());
    config.refresh.keepalive_interval = Duration::from_millis(200);
    config.refresh.keepalive_margin = Duration::from_secs(90 * 86_400);
    // Counted before the start: the first sweep runs at once.
    let before = fake.token_calls();
    let broker = TestBroker::start_with(config).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fake.token_calls() < before + 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the keep-alive sweep never refreshed the idle grant"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fake.reuse_detected(), 0);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_secrets_never_reach_logs_pages_or_data_files() {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let fake = zendesk().await;
    let proc = spawn_process(
        dir.path(),
        &logs.path().join("trace.log"),
        &[("RUST_LOG", "trace")],
    )
    .unwrap();
    wait_for_health(
        proc.addr,
        tonic_health::pb::health_check_response::ServingStatus::Serving,
    )
    .await;
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let mut admin = client(proc.addr, Some(token.trim())).await;
    register_zendesk(&mut admin, &fake).await;
    let s = start(&mut admin, "zd").await;
    let (location, status, page) = browse(&s.authorize_url).await;
    assert_eq!(status, 200, "{page}");
    let code = url::Url::parse(&location)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .to_string();
    let tok = admin
        .get_access_token(token_req("zd"))
        .await
        .unwrap()
        .into_inner();
    let access = tok.headers[0]
        .value
        .trim_start_matches("Bearer ")
        .to_owned();
    let refresh = fake.newest_refresh_token("agent").unwrap();
    assert_eq!(proc.terminate(), Some(0));
    let log = std::fs::read_to_string(logs.path().join("trace.log")).unwrap();
    assert!(
        log.contains("Authorization completed"),
        "trace log not captured"
    );
    for secret in [ZD_SECRET, code.as_str(), access.as_str(), refresh.as_str()] {
        assert!(!log.contains(secret), "a secret is in the log");
        assert!(!page.contains(secret), "a secret is in the page");
        assert_eq!(
            dir_contains(dir.path(), secret),
            None,
            "a secret is in the data directory"
        );
    }
}

/// A `system.reauthorization_required` webhook carries a ready Connect link: opening it starts
/// the authorization and leads through the vendor's consent back to an active system. The link
/// is signed (an altered one is refused and starts nothing) and dies with the credential
/// version it was made for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reauthorization_webhook_carries_a_connect_link_that_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let fake = zendesk().await;
    let receiver = crate::health::Receiver::default();
    let mut config = test_config(dir.path());
    config.webhooks = vec![credbroker::config::WebhookConfig {
        url: receiver.clone().start("127.0.0.1:0").await,
        secret: credbroker::secret::SecretString::from("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        events: vec!["system.reauthorization_required".into()],
    }];
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    connect_zendesk(&mut admin, &fake).await;
    let tok = admin
        .get_access_token(token_req("zd"))
        .await
        .unwrap()
        .into_inner();
    // Consent withdrawn at Zendesk: the next refresh is refused for good.
    fake.oauth(|o| o.revoke_all());
    let mut r = token_req("zd");
    r.rejected_token_id = tok.token_id;
    let err = admin.get_access_token(r).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    eventually(
        Duration::from_secs(10),
        "the reauthorization webhook",
        || !receiver.bodies().is_empty(),
    )
    .await;
    let body = receiver.bodies().remove(0);
    assert_eq!(body["type"], "system.reauthorization_required");
    let link = body["data"]["connect_url"].as_str().unwrap().to_owned();
    assert!(
        link.starts_with(&format!("http://{}/oauth/start?", broker.http_addr)),
        "{link}"
    );
    assert!(!link.contains(ZD_SECRET));

    // Altered (another system, a later expiry, a forged signature): refused, nothing started.
    let http = no_redirects();
    for forged in [
        link.replace("system=zd", "system=zd2"),
        link.replace("exp=", "exp=9"),
        format!("{}A", link),
    ] {
        let r = http.get(&forged).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 403, "{forged}");
    }
    // The real one: a page with one button (link previews, which only GET, start nothing)…
    let page = http.get(&link).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert_eq!(page.headers()["cache-control"], "no-store");
    assert_eq!(page.headers()["referrer-policy"], "no-referrer");
    assert!(page.text().await.unwrap().contains("method=\"post\""));
    let form = link.split_once('?').unwrap().1.to_owned();
    let post = |form: String| {
        let http = http.clone();
        let url = format!("http://{}/oauth/start", broker.http_addr);
        async move {
            http.post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form)
                .send()
                .await
                .unwrap()
        }
    };
    // …the button starts the flow; a leaked link opens at most 3 at a time.
    let mut consents = Vec::new();
    for _ in 0..3 {
        let r = post(form.clone()).await;
        assert_eq!(r.status().as_u16(), 303);
        consents.push(r.headers()["location"].to_str().unwrap().to_owned());
    }
    let fourth = post(form.clone()).await;
    assert_eq!(fourth.status().as_u16(), 410);
    assert!(fourth.text().await.unwrap().contains("already open"));
    assert!(consents[0].starts_with(&fake.base_url), "{}", consents[0]);
    let (_, status, page) = browse(&consents[0]).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        system(&mut admin, "zd").await.state,
        pb::SystemState::Active as i32
    );
    // Reconnected: the link was for the credential version before; it is spent.
    assert_eq!(http.get(&link).send().await.unwrap().status().as_u16(), 410);
    assert_eq!(post(form).await.status().as_u16(), 410);
    broker.stop().await;
}

/// A 403 HTML page from a CDN or firewall in front of the token endpoint is not the vendor's
/// word on the grant: the refresh fails as unavailable, the grant is not marked for
/// re-authorization, and once the page is gone the next refresh works without a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firewall_page_at_the_token_endpoint_does_not_kill_the_grant() {
    let dir = tempfile::tempdir().unwrap();
    let fake = zendesk().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    connect_zendesk(&mut admin, &fake).await;
    let mut every = tokio::time::interval(Duration::from_millis(100));
    // A firewall's HTML challenge, then a gateway's JSON without an `error` member.
    for mode in [Mode::Challenge, Mode::GatewayJson] {
        let first = zd_token(&mut admin, "").await.unwrap().into_inner();
        fake.oauth(|o| o.token_mode = mode);
        let calls = fake.token_calls();
        // The worker says the token was refused: a new one is minted (at most one forced
        // re-mint a second: asked every 100 ms until one is tried), and the page answers (the
        // worker gets UNAVAILABLE, or the token it has while that still lives).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while fake.token_calls() == calls {
            every.tick().await;
            let got = zd_token(&mut admin, &first.token_id).await;
            match got {
                Ok(t) => assert_eq!(t.into_inner().token_id, first.token_id),
                Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
            }
            assert!(std::time::Instant::now() < deadline, "never re-minted");
        }
        assert_eq!(
            system(&mut admin, "zd").await.state,
            pb::SystemState::Active as i32,
            "{mode:?} marked the grant dead"
        );
        // The page goes away: after the back-off, a token again, with the same grant.
        fake.oauth(|o| o.token_mode = Mode::Normal);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            every.tick().await;
            let got = zd_token(&mut admin, "").await;
            if got.is_ok_and(|t| t.into_inner().token_id != first.token_id) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no new token after the outage"
            );
        }
    }
    // JSON that is no OAuth error, though, is the vendor refusing: the grant is marked.
    let current = zd_token(&mut admin, "").await.unwrap().into_inner();
    fake.oauth(|o| o.token_mode = Mode::JsonRefusal);
    // Forced re-mints are at most one a second: asked every 200 ms until one is tried.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let e = loop {
        every.tick().await;
        let got = zd_token(&mut admin, &current.token_id).await;
        match got {
            Err(e) => break e,
            Ok(_) => assert!(std::time::Instant::now() < deadline, "never re-minted"),
        }
    };
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(
        system(&mut admin, "zd").await.state,
        pb::SystemState::ReauthorizationRequired as i32
    );
    broker.stop().await;
}

/// A vendor whose token answer carries a CR/LF in the access token (header injection at the
/// worker's HTTP stack) while rotating the refresh token: the token is handed to no one, the
/// rotated refresh token is kept, and once the vendor answers sanely the grant still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_token_that_is_no_header_value_is_never_handed_out() {
    let dir = tempfile::tempdir().unwrap();
    let fake = zendesk().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    connect_zendesk(&mut admin, &fake).await;
    let first = zd_token(&mut admin, "").await.unwrap().into_inner();
    fake.oauth(|o| o.access_token_tail = "\r\nX-Injected: 1");
    let calls = fake.token_calls();
    for _ in 0..20 {
        match zd_token(&mut admin, &first.token_id).await {
            Ok(t) => {
                let t = t.into_inner();
                assert_eq!(t.token_id, first.token_id, "a new token was handed out");
                for h in &t.headers {
                    assert!(!h.value.contains('\n'), "an injected header was handed out");
                }
            }
            Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
        }
    }
    let during = fake.token_calls() - calls;
    assert!(
        (1..=3).contains(&during),
        "{during} token calls: no back-off"
    );
    // The vendor mends its ways: the rotated refresh token it issued with the bad answer works.
    fake.oauth(|o| o.access_token_tail = "");
    let mut every = tokio::time::interval(Duration::from_millis(100));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        every.tick().await;
        if let Ok(t) = zd_token(&mut admin, &first.token_id).await {
            let t = t.into_inner();
            if t.token_id != first.token_id {
                assert!(t.headers.iter().all(|h| !h.value.contains('\n')));
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new token after the vendor mended"
        );
    }
    assert_eq!(
        fake.reuse_detected(),
        0,
        "a rotated-out refresh token was presented"
    );
    assert_eq!(
        system(&mut admin, "zd").await.state,
        pb::SystemState::Active as i32
    );
    broker.stop().await;
}

/// A token answer that is a token answer under another 2xx status (a gateway's 201 or 203)
/// is read as the answer it is: the vendor rotated the refresh token in it, so dropping it as
/// "unreadable" and retrying with the old one would present a rotated-out refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_answer_under_another_2xx_status_is_kept() {
    for status in [201, 203] {
        let dir = tempfile::tempdir().unwrap();
        let fake = zendesk().await;
        let broker = TestBroker::start(dir.path()).await;
        let mut admin = broker.admin().await;
        connect_zendesk(&mut admin, &fake).await;
        let first = zd_token(&mut admin, "").await.unwrap().into_inner();
        fake.oauth(|o| o.success_status = status);
        let calls = fake.token_calls();
        let t = zd_token(&mut admin, &first.token_id)
            .await
            .unwrap_or_else(|e| panic!("HTTP {status}: {e:?}"))
            .into_inner();
        assert_ne!(t.token_id, first.token_id, "HTTP {status}");
        assert_eq!(fake.token_calls() - calls, 1, "HTTP {status}");
        // The rotated refresh token from that answer is the one presented next.
        broker.stop().await;
        let broker = TestBroker::start(dir.path()).await;
        let mut admin = broker.admin().await;
        fake.oauth(|o| o.success_status = 200);
        let again = zd_token(&mut admin, "").await.unwrap().into_inner();
        assert_ne!(
            again.token_id, t.token_id,
            "HTTP {status}: a restart mints anew"
        );
        assert_eq!(
            fake.reuse_detected(),
            0,
            "HTTP {status}: a rotated-out refresh token was presented"
        );
        assert_eq!(
            system(&mut admin, "zd").await.state,
            pb::SystemState::Active as i32
        );
        broker.stop().await;
    }
}

/// The same at a connect: the code exchange's answer carries an access token that is no header
/// value. The grant is stored, but that token is cached for no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connects_unsendable_token_is_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let fake = zendesk().await;
    fake.oauth(|o| o.access_token_tail = "\r\nX-Injected: 1");
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    register_zendesk(&mut admin, &fake).await;
    let s = start(&mut admin, "zd").await;
    browse(&s.authorize_url).await;
    let got = zd_token(&mut admin, "").await;
    match got {
        Ok(t) => panic!(
            "a token was handed out: {:?}",
            t.into_inner()
                .headers
                .iter()
                .map(|h| h.value.contains('\n'))
                .collect::<Vec<_>>()
        ),
        Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
    }
    broker.stop().await;
}

/// `GetAccessToken` for "zd", saying `rejected` (a token id, or "") was refused.
async fn zd_token(
    admin: &mut Client,
    rejected: &str,
) -> Result<tonic::Response<pb::GetAccessTokenResponse>, tonic::Status> {
    admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "zd".into(),
            rejected_token_id: rejected.to_owned(),
            ..Default::default()
        })
        .await
}
