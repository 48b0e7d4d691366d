//! Service identities (issue 19): Zendesk and Jira client credentials, Jira API tokens (classic
//! and scoped), ServiceNow client credentials and inbound REST API keys, against fakes that
//! answer as `upstreams.md` §14–§16 says the vendors do.

use std::collections::HashSet;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use credbroker::pb;
use credbroker::pb::AuthFailure as F;
use tonic::Code;

use crate::admin_cli::{ctl_at, json_out};
use crate::connect::{atlassian, jira_config, zendesk, ZD_CLIENT, ZD_SECRET};
use crate::oauth::{servicenow, USER as SN_USER};
use crate::support::*;

const ZD_SC_ID: &str = "zd-sync-service";
const ZD_SC_SECRET: &str = "zd-cc-secret-canary-61";
pub(crate) const SA_ID: &str = "atl-sa-client";
pub(crate) const SA_SECRET: &str = "atl-sa-secret-canary-62";
const SA_LOGIN: &str = "svc";
const SA_EMAIL: &str = "sync-svc@serviceaccount.atlassian.com";
const CLASSIC_TOKEN: &str = "ATATT-classic-canary-63";
const SCOPED_TOKEN: &str = "ATATT-scoped-canary-64";
const SN_SC_ID: &str = "sn-cc-client";
const SN_SC_SECRET: &str = "sn-cc-secret-canary-65";
const SN_KEY: &str = "sn-apikey-canary-66";
const PROPERTY: &str = "glide.oauth.inbound.client.credential.grant_type.enabled";
const SECRETS: &[&str] = &[
    ZD_SC_SECRET,
    SA_SECRET,
    CLASSIC_TOKEN,
    SCOPED_TOKEN,
    SN_SC_SECRET,
    SN_KEY,
];

pub(crate) fn cc(id: &str, secret: &str) -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::OauthClientCredentials(
            pb::OAuthClientCredentials {
                client_id: id.into(),
                client_secret: secret.into(),
                scopes: vec![],
                secret_expires_at: None,
            },
        )),
    }
}

fn email_token(email: &str, token: &str, scoped: bool, expires_at: Option<i64>) -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::EmailApiToken(
            pb::EmailApiToken {
                email: email.into(),
                token: token.into(),
                expires_at: expires_at.map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
                scoped,
            },
        )),
    }
}

fn sn_key(key: &str, expires_at: Option<i64>) -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::ApiKey(pb::ApiKey {
            key: key.into(),
            expires_at: expires_at.map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
        })),
    }
}

pub(crate) fn reg(
    id: &str,
    kind: pb::SystemKind,
    base: &str,
    cred: pb::Credential,
    check: bool,
    delivery: pb::Delivery,
) -> pb::RegisterSystemRequest {
    pb::RegisterSystemRequest {
        system_id: id.into(),
        kind: kind as i32,
        base_url: base.into(),
        credential: Some(cred),
        check,
        delivery: delivery as i32,
        ..Default::default()
    }
}

pub(crate) fn tok(id: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        system_id: id.into(),
        ..Default::default()
    }
}

/// Registration that must fail its check: the message has every needle and no secret.
pub(crate) async fn refused(
    admin: &mut Client,
    req: pb::RegisterSystemRequest,
    needles: &[&str],
) -> String {
    let id = req.system_id.clone();
    let e = admin.register_system(req).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    for n in needles {
        assert!(e.message().contains(n), "'{}' lacks '{n}'", e.message());
    }
    assert_no_secret(e.message());
    let gone = admin
        .get_system(pb::GetSystemRequest { system_id: id })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "a refused system was stored");
    e.message().to_owned()
}

pub(crate) async fn checked(admin: &mut Client, id: &str) -> pb::AuthCheck {
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

fn assert_check(c: &pb::AuthCheck, failure: F, needles: &[&str]) {
    assert!(!c.ok, "reported ok: {}", c.message);
    assert_eq!(c.failure, failure as i32, "{}", c.message);
    for n in needles {
        assert!(c.message.contains(n), "'{}' lacks '{n}'", c.message);
    }
    assert_no_secret(&c.message);
}

fn assert_no_secret(text: &str) {
    for s in SECRETS {
        assert!(!text.contains(s), "a secret is in: {text}");
    }
}

/// 500 concurrent `GetAccessToken` calls (reporting `rejected` as the upstream's refusal, when
/// given); returns the distinct headers they got.
async fn storm(pool: &[Client], id: &str, rejected: &str) -> HashSet<String> {
    let mut tasks = Vec::new();
    for i in 0..500 {
        let mut c = pool[i % pool.len()].clone();
        let mut r = tok(id);
        r.rejected_token_id = rejected.into();
        tasks.push(tokio::spawn(async move {
            c.get_access_token(r).await.map(|r| r.into_inner())
        }));
    }
    let mut headers = HashSet::new();
    for t in tasks {
        let t = t.await.unwrap().unwrap();
        headers.insert(t.headers[0].value.clone());
    }
    headers
}

async fn pool(broker: &TestBroker) -> Vec<Client> {
    let mut v = Vec::new();
    for _ in 0..4 {
        v.push(broker.admin().await);
    }
    v
}

/// Single flight for a minting credential: a cold system and a reported rejection each cost
/// one token request, whatever 500 callers do at once.
pub(crate) async fn one_mint_per_need(broker: &TestBroker, id: &str, calls: impl Fn() -> usize) {
    let pool = pool(broker).await;
    let before = calls();
    let first = storm(&pool, id, "").await;
    assert_eq!(calls() - before, 1, "{id}: one token request when cold");
    assert_eq!(first.len(), 1, "{id}: every caller got the same header");
    let mut admin = broker.admin().await;
    let rejected = admin
        .get_access_token(tok(id))
        .await
        .unwrap()
        .into_inner()
        .token_id;
    let second = storm(&pool, id, &rejected).await;
    assert_eq!(calls() - before, 2, "{id}: one more after the rejection");
    assert_eq!(
        second.len(),
        1,
        "{id}: every caller got the same new header"
    );
    assert!(
        first.is_disjoint(&second),
        "{id}: the rejected header came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zendesk_client_credentials_mint_once_and_report_the_acting_user() {
    let dir = tempfile::tempdir().unwrap();
    let fake = zendesk().await;
    fake.add_user("ada", 9003, "Ada Admin", "ada@acme.example", "admin");
    fake.add_service_client(ZD_SC_ID, ZD_SC_SECRET, "ada");
    fake.add_service_client("zd-enduser-client", "zd-eu-secret", "enduser");
    // A role is vendor text: it reaches the admin cut short and without control characters.
    let odd_role = format!("light-agent\r\nX-Injected: 1 {}", "r".repeat(10_000));
    fake.add_user("odd", 9004, "Odd Role", "odd@acme.example", &odd_role);
    fake.add_service_client("zd-odd-client", "zd-odd-secret", "odd");
    fake.oauth(|o| o.token_delay = Duration::from_millis(200));
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let z = pb::SystemKind::Zendesk;
    let base = fake.base_url.clone();

    let resp = admin
        .register_system(reg(
            "zd-cc",
            z,
            &base,
            cc(ZD_SC_ID, ZD_SC_SECRET),
            true,
            pb::Delivery::Unspecified,
        ))
        .await
        .unwrap()
        .into_inner();
    let c = resp.check.unwrap();
    assert!(c.ok, "{}", c.message);
    let who = c.identity.unwrap();
    assert_eq!(
        (who.id.as_str(), who.email.as_str()),
        ("9003", "ada@acme.example")
    );
    let sys = resp.system.unwrap();
    assert_eq!(
        sys.credential_type,
        pb::CredentialType::OauthClientCredentials as i32
    );
    assert_eq!(
        sys.delivery,
        pb::Delivery::Header as i32,
        "OAuth tokens default to header"
    );
    let t = admin
        .get_access_token(tok("zd-cc"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.headers[0].name, "authorization");
    assert!(
        t.headers[0].value.starts_with("Bearer at-"),
        "{}",
        t.headers[0].value
    );
    assert_eq!(t.api_base_url, base);
    // The answer has no expires_in: the lifetime is the one the broker asked for (30 min).
    let left = t.expires_at.unwrap().seconds - credbroker::model::unix_now() as i64;
    assert!((1700..=1800).contains(&left), "lifetime {left}");

    admin
        .register_system(reg(
            "zd-cold",
            z,
            &base,
            cc(ZD_SC_ID, ZD_SC_SECRET),
            false,
            pb::Delivery::Unspecified,
        ))
        .await
        .unwrap();
    let f = fake.clone();
    one_mint_per_need(&broker, "zd-cold", move || f.token_calls()).await;

    // A worker's deadline drops its call mid-exchange: the exchange finishes and is used.
    admin
        .register_system(reg(
            "zd-drop",
            z,
            &base,
            cc(ZD_SC_ID, ZD_SC_SECRET),
            false,
            pb::Delivery::Unspecified,
        ))
        .await
        .unwrap();
    let before = fake.token_calls();
    let e = token_with_deadline(&mut admin, "zd-drop", "", Duration::from_millis(50))
        .await
        .unwrap_err();
    // tonic reports its own client-side timeout as CANCELLED, a server-side one as
    // DEADLINE_EXCEEDED: either way the caller is gone before the exchange ends.
    assert!(
        matches!(e.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{e:?}"
    );
    admin.get_access_token(tok("zd-drop")).await.unwrap();
    assert_eq!(
        fake.token_calls() - before,
        1,
        "the dropped exchange was not repeated"
    );

    // Scopes are one word each, and a bounded list.
    let mut spaced = cc(ZD_SC_ID, ZD_SC_SECRET);
    if let Some(pb::credential::Credential::OauthClientCredentials(o)) = &mut spaced.credential {
        o.scopes = vec!["read write".into()];
    }
    let e = admin
        .register_system(reg(
            "zd-scope",
            z,
            &base,
            spaced,
            false,
            pb::Delivery::Unspecified,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(
        e.message().contains("oauth_client_credentials.scopes"),
        "{}",
        e.message()
    );
    refused(
        &mut admin,
        reg(
            "zd-bad",
            z,
            &base,
            cc(ZD_SC_ID, "wrong-secret"),
            true,
            pb::Delivery::Unspecified,
        ),
        &["invalid_client", "OAuth clients"],
    )
    .await;
    refused(
        &mut admin,
        reg(
            "zd-public",
            z,
            &base,
            cc(ZD_CLIENT, ZD_SECRET),
            true,
            pb::Delivery::Unspecified,
        ),
        &["unauthorized_client"],
    )
    .await;
    refused(
        &mut admin,
        reg(
            "zd-eu",
            z,
            &base,
            cc("zd-enduser-client", "zd-eu-secret"),
            true,
            pb::Delivery::Unspecified,
        ),
        &[
            "end-user",
            "not an agent or admin",
            "created the OAuth client",
        ],
    )
    .await;
    let message = refused(
        &mut admin,
        reg(
            "zd-odd",
            z,
            &base,
            cc("zd-odd-client", "zd-odd-secret"),
            true,
            pb::Delivery::Unspecified,
        ),
        &["light-agentX-Injected: 1 rrr", "not an agent or admin"],
    )
    .await;
    assert!(
        message.len() < 1000 && !message.contains(['\r', '\n']),
        "{message}"
    );
    assert!(
        fake.server.unexpected().is_empty(),
        "{:?}",
        fake.server.unexpected()
    );
    broker.stop().await;
}

pub(crate) async fn jira_fake() -> FakeAtlassian {
    let fake = atlassian().await;
    fake.add_user(SA_LOGIN, "712020:svc-account", "Sync Service", SA_EMAIL);
    fake.add_service_client(SA_ID, SA_SECRET, SA_LOGIN);
    fake.add_api_token(CLASSIC_TOKEN, "jira@acme.example", "proxy", false);
    fake.add_api_token(SCOPED_TOKEN, SA_EMAIL, SA_LOGIN, true);
    fake.set_site_cloud_id(Some("cloud-acme"));
    fake.oauth(|o| {
        o.access_lifetime = 3600;
        o.token_delay = Duration::from_millis(200);
    });
    fake
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jira_service_account_finds_the_cloud_id_without_a_user_and_names_each_fault() {
    let dir = tempfile::tempdir().unwrap();
    let fake = jira_fake().await;
    let broker = TestBroker::start_with(jira_config(dir.path(), &fake)).await;
    let mut admin = broker.admin().await;
    let j = pb::SystemKind::JiraCloud;
    // The fake's origin plays the site (tenant info) and Atlassian's hosts alike.
    let site = fake.origin.clone();
    let gateway = format!("{site}/ex/jira/cloud-acme");

    let resp = admin
        .register_system(reg(
            "jira-sa",
            j,
            &site,
            cc(SA_ID, SA_SECRET),
            true,
            pb::Delivery::Unspecified,
        ))
        .await
        .unwrap()
        .into_inner();
    let c = resp.check.unwrap();
    assert!(c.ok, "{}", c.message);
    assert_eq!(c.identity.unwrap().id, "712020:svc-account");
    assert_eq!(fake.server.count("/_edge/tenant_info"), 1);
    assert_eq!(
        fake.server.count("/oauth/token/accessible-resources"),
        0,
        "no user's grant"
    );
    let t = admin
        .get_access_token(tok("jira-sa"))
        .await
        .unwrap()
        .into_inner();
    assert!(t.headers[0].value.starts_with("Bearer at-"));
    assert_eq!(t.api_base_url, gateway);
    // A re-mint (the worker reports the token rejected) uses the stored cloud id.
    let calls = fake.token_calls();
    let again = token_with_deadline(&mut admin, "jira-sa", &t.token_id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_ne!(again.token_id, t.token_id);
    assert_eq!(again.api_base_url, gateway);
    assert_eq!(fake.token_calls(), calls + 1);
    assert_eq!(
        fake.server.count("/_edge/tenant_info"),
        1,
        "the cloud id is stored"
    );

    admin
        .register_system(reg(
            "jira-cold",
            j,
            &site,
            cc(SA_ID, SA_SECRET),
            false,
            pb::Delivery::Unspecified,
        ))
        .await
        .unwrap();
    let f = fake.clone();
    one_mint_per_need(&broker, "jira-cold", move || f.token_calls()).await;

    fake.set_missing_user_scope(SA_LOGIN, true);
    let c = checked(&mut admin, "jira-sa").await;
    assert_check(
        &c,
        F::InsufficientPermissions,
        &["scope does not match", "read:jira-user"],
    );
    fake.set_missing_user_scope(SA_LOGIN, false);
    fake.set_product_access(SA_LOGIN, false);
    let c = checked(&mut admin, "jira-sa").await;
    assert_check(
        &c,
        F::InsufficientPermissions,
        &["no Jira product access", "App access"],
    );
    assert_eq!(
        c.missing_permissions,
        vec!["Jira product access".to_owned()]
    );
    fake.set_product_access(SA_LOGIN, true);
    assert!(checked(&mut admin, "jira-sa").await.ok);

    refused(
        &mut admin,
        reg(
            "jira-sa-bad",
            j,
            &site,
            cc(SA_ID, "wrong"),
            true,
            pb::Delivery::Unspecified,
        ),
        &["rejected the client", "Service accounts"],
    )
    .await;
    fake.set_site_cloud_id(None);
    let calls = fake.token_calls();
    // Refused at registration, with or without a check: the cloud id is looked up first.
    for check in [true, false] {
        refused(
            &mut admin,
            reg(
                "jira-sa-nosite",
                j,
                &site,
                cc(SA_ID, SA_SECRET),
                check,
                pb::Delivery::Unspecified,
            ),
            &["no Atlassian site at", "HTTP 404", "site URL"],
        )
        .await;
    }
    assert_eq!(
        fake.token_calls(),
        calls,
        "no token is minted for a wrong site"
    );
    assert!(
        fake.server.unexpected().is_empty(),
        "{:?}",
        fake.server.unexpected()
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jira_api_tokens_work_at_the_site_or_scoped_through_the_gateway_and_expire_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let fake = jira_fake().await;
    let broker = TestBroker::start_with(jira_config(dir.path(), &fake)).await;
    let mut admin = broker.admin().await;
    let j = pb::SystemKind::JiraCloud;
    let site = fake.origin.clone();
    let in_ten_days = credbroker::model::unix_now() as i64 + 10 * 86_400;

    // Classic token, header delivery: Basic at the site; its expiry is kept and warned about.
    let resp = admin
        .register_system(reg(
            "jira-classic",
            j,
            &site,
            email_token("jira@acme.example", CLASSIC_TOKEN, false, Some(in_ten_days)),
            true,
            pb::Delivery::Header,
        ))
        .await
        .unwrap()
        .into_inner();
    let c = resp.check.unwrap();
    assert!(c.ok, "{}", c.message);
    assert!(c.message.contains("expires in 10 day(s)"), "{}", c.message);
    let sys = resp.system.unwrap();
    assert_eq!(
        sys.credential_type,
        pb::CredentialType::EmailApiToken as i32
    );
    assert_eq!(sys.credential_expires_at.unwrap().seconds, in_ten_days);
    let t = admin
        .get_access_token(tok("jira-classic"))
        .await
        .unwrap()
        .into_inner();
    let basic = format!(
        "Basic {}",
        STANDARD.encode(format!("jira@acme.example:{CLASSIC_TOKEN}"))
    );
    assert_eq!(t.headers[0].value, basic);
    assert_eq!(t.api_base_url, site);

    // Scoped token, default delivery: a static secret goes through the proxy, to the gateway.
    let resp = admin
        .register_system(reg(
            "jira-scoped",
            j,
            &site,
            email_token(SA_EMAIL, SCOPED_TOKEN, true, None),
            true,
            pb::Delivery::Unspecified,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        resp.check.as_ref().unwrap().ok,
        "{}",
        resp.check.unwrap().message
    );
    assert_eq!(resp.system.unwrap().delivery, pb::Delivery::Proxy as i32);
    let t = admin
        .get_access_token(tok("jira-scoped"))
        .await
        .unwrap()
        .into_inner();
    assert!(!t.headers[0].value.contains(SCOPED_TOKEN));
    let r = reqwest::Client::new()
        .get(format!("{}/rest/api/3/myself", t.api_base_url))
        .header(&t.headers[0].name, &t.headers[0].value)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let me: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        me["accountId"], "712020:svc-account",
        "the proxy went through the gateway"
    );

    // A scoped token registered as classic fails at the site, and the message says why.
    refused(
        &mut admin,
        reg(
            "jira-scoped-at-site",
            j,
            &site,
            email_token(SA_EMAIL, SCOPED_TOKEN, false, None),
            true,
            pb::Delivery::Unspecified,
        ),
        &["scoped = true"],
    )
    .await;
    // Expired (Atlassian's own answer) is expired_or_revoked.
    fake.expire_api_token(CLASSIC_TOKEN);
    let c = checked(&mut admin, "jira-classic").await;
    assert_check(
        &c,
        F::ExpiredOrRevoked,
        &["Client must be authenticated", "expired"],
    );
    // Bad input is refused before anything is stored.
    for bad in ["not-an-email", "a:b@acme.example", ""] {
        let e = admin
            .register_system(reg(
                "jira-bad",
                j,
                &site,
                email_token(bad, "x", false, None),
                false,
                pb::Delivery::Unspecified,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}: {}", e.message());
        assert!(
            e.message().contains("credential.email_api_token.email"),
            "{}",
            e.message()
        );
    }
    fake.set_site_cloud_id(None);
    refused(
        &mut admin,
        reg(
            "jira-scoped-nosite",
            j,
            &site,
            email_token(SA_EMAIL, SCOPED_TOKEN, true, None),
            false,
            pb::Delivery::Unspecified,
        ),
        &["no Atlassian site at"],
    )
    .await;
    assert!(
        fake.server.unexpected().is_empty(),
        "{:?}",
        fake.server.unexpected()
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servicenow_client_credentials_name_the_property_and_the_application_user() {
    let dir = tempfile::tempdir().unwrap();
    let fake = servicenow(1800).await;
    fake.add_service_client(SN_SC_ID, SN_SC_SECRET, Some(SN_USER));
    fake.add_service_client("sn-cc-nouser", "sn-cc-nouser-secret", None);
    fake.oauth(|o| o.token_delay = Duration::from_millis(200));
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let k = pb::SystemKind::Servicenow;
    let base = fake.base_url.clone();

    // Off by default on a real instance: the message names the property and the entity field.
    refused(
        &mut admin,
        reg(
            "sn-cc",
            k,
            &base,
            cc(SN_SC_ID, SN_SC_SECRET),
            true,
            pb::Delivery::Unspecified,
        ),
        &[PROPERTY, "OAuth Application User"],
    )
    .await;
    fake.enable_client_credentials(true);
    refused(
        &mut admin,
        reg(
            "sn-cc",
            k,
            &base,
            cc("sn-cc-nouser", "sn-cc-nouser-secret"),
            true,
            pb::Delivery::Unspecified,
        ),
        &["unauthorized_client", "OAuth Application User"],
    )
    .await;
    let resp = admin
        .register_system(reg(
            "sn-cc",
            k,
            &base,
            cc(SN_SC_ID, SN_SC_SECRET),
            true,
            pb::Delivery::Unspecified,
        ))
        .await
        .unwrap()
        .into_inner();
    let c = resp.check.unwrap();
    assert!(c.ok, "{}", c.message);
    assert!(
        c.message.contains("OAuth Application User"),
        "{}",
        c.message
    );
    assert_eq!(c.identity.unwrap().email, "sync@acme.example");
    assert!(
        resp.system.unwrap().credential_expires_at.is_none(),
        "no refresh token to track"
    );
    let t = admin
        .get_access_token(tok("sn-cc"))
        .await
        .unwrap()
        .into_inner();
    assert!(t.headers[0].value.starts_with("Bearer at-"));

    admin
        .register_system(reg(
            "sn-cold",
            k,
            &base,
            cc(SN_SC_ID, SN_SC_SECRET),
            false,
            pb::Delivery::Unspecified,
        ))
        .await
        .unwrap();
    let f = fake.clone();
    one_mint_per_need(&broker, "sn-cold", move || f.token_calls()).await;

    // Switched off again at the vendor: the next mint fails and the system says what to set.
    fake.enable_client_credentials(false);
    let current = admin
        .get_access_token(tok("sn-cc"))
        .await
        .unwrap()
        .into_inner()
        .token_id;
    let e = token_with_deadline(&mut admin, "sn-cc", &current, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains(PROPERTY), "{}", e.message());
    assert_no_secret(e.message());
    let sys = admin
        .get_system(pb::GetSystemRequest {
            system_id: "sn-cc".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .system
        .unwrap();
    assert!(
        sys.state_message.contains(PROPERTY),
        "{}",
        sys.state_message
    );
    assert!(
        sys.state_message.contains("rotate the credential in again"),
        "{}",
        sys.state_message
    );
    // Fixed at the vendor, the same credential rotated in serves again.
    fake.enable_client_credentials(true);
    admin
        .rotate_credential(pb::RotateCredentialRequest {
            system_id: "sn-cc".into(),
            credential: Some(cc(SN_SC_ID, SN_SC_SECRET)),
            skip_check: false,
        })
        .await
        .unwrap();
    let t = admin
        .get_access_token(tok("sn-cc"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.credential_version, 2);
    assert!(
        fake.server.unexpected().is_empty(),
        "{:?}",
        fake.server.unexpected()
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servicenow_api_keys_travel_as_x_sn_apikey_in_both_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let fake = servicenow(1800).await;
    fake.add_api_key(SN_KEY, SN_USER, false, true);
    fake.add_api_key("sn-key-expired", SN_USER, true, true);
    fake.add_api_key("sn-key-nopolicy", SN_USER, false, false);
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let k = pb::SystemKind::Servicenow;
    let base = fake.base_url.clone();
    let in_three_days = credbroker::model::unix_now() as i64 + 3 * 86_400;

    let resp = admin
        .register_system(reg(
            "sn-key",
            k,
            &base,
            sn_key(SN_KEY, Some(in_three_days)),
            true,
            pb::Delivery::Header,
        ))
        .await
        .unwrap()
        .into_inner();
    let c = resp.check.unwrap();
    assert!(c.ok, "{}", c.message);
    assert!(c.message.contains("expires in 3 day(s)"), "{}", c.message);
    assert_eq!(c.identity.unwrap().email, "sync@acme.example");
    assert_eq!(
        resp.system.unwrap().credential_expires_at.unwrap().seconds,
        in_three_days
    );
    let t = admin
        .get_access_token(tok("sn-key"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.headers.len(), 1);
    assert_eq!(
        (t.headers[0].name.as_str(), t.headers[0].value.as_str()),
        ("x-sn-apikey", SN_KEY)
    );

    // Proxy delivery (the default for a static secret): the lease is swapped for x-sn-apikey.
    let resp = admin
        .register_system(reg(
            "sn-key-proxy",
            k,
            &base,
            sn_key(SN_KEY, None),
            true,
            pb::Delivery::Unspecified,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.system.unwrap().delivery, pb::Delivery::Proxy as i32);
    let t = admin
        .get_access_token(tok("sn-key-proxy"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.headers[0].name, "authorization");
    assert!(!t.headers[0].value.contains(SN_KEY));
    let r = reqwest::Client::new()
        .get(format!(
            "{}/api/now/table/sys_user?sysparm_query=sys_id%3Djavascript%3Ags.getUserID()",
            t.api_base_url
        ))
        .header(&t.headers[0].name, &t.headers[0].value)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("sync@acme.example"));

    // A worker's own x-sn-apikey never crosses the proxy, whatever the system's credential.
    fake.add_user(
        "sn.basic",
        "sn-basic-pw-canary",
        "b-2",
        "Basic User",
        "basic@acme.example",
    );
    admin
        .register_system(reg(
            "sn-basic-proxy",
            k,
            &base,
            basic_cred("sn.basic", "sn-basic-pw-canary"),
            true,
            pb::Delivery::Proxy,
        ))
        .await
        .unwrap();
    for (id, who) in [
        ("sn-key-proxy", "sync@acme.example"),
        ("sn-basic-proxy", "basic@acme.example"),
    ] {
        let t = admin.get_access_token(tok(id)).await.unwrap().into_inner();
        let r = reqwest::Client::new()
            .get(format!(
                "{}/api/now/table/sys_user?sysparm_query=sys_id%3Djavascript%3Ags.getUserID()",
                t.api_base_url
            ))
            .header(&t.headers[0].name, &t.headers[0].value)
            .header("x-sn-apikey", "sn-key-nopolicy")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{id}");
        assert!(
            r.text().await.unwrap().contains(who),
            "{id} acted as someone else"
        );
    }

    for (key, id) in [
        ("sn-key-expired", "sn-x1"),
        ("sn-key-nopolicy", "sn-x2"),
        ("sn-key-wrong", "sn-x3"),
    ] {
        refused(
            &mut admin,
            reg(
                id,
                k,
                &base,
                sn_key(key, None),
                true,
                pb::Delivery::Unspecified,
            ),
            &[
                "did not accept the API key",
                "REST API Access Policies",
                "expired",
            ],
        )
        .await;
    }
    assert!(
        fake.server.unexpected().is_empty(),
        "{:?}",
        fake.server.unexpected()
    );
    broker.stop().await;
}

/// The binary with trace logging: the CLI registers a scoped API token, gRPC a ServiceNow key
/// and client credentials; no secret, minted token or key reaches the log or the data files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_registers_an_email_api_token_and_secrets_stay_out_of_logs_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let jira = jira_fake().await;
    let sn = servicenow(1800).await;
    sn.add_api_key(SN_KEY, SN_USER, false, true);
    sn.add_service_client(SN_SC_ID, SN_SC_SECRET, Some(SN_USER));
    sn.enable_client_credentials(true);
    let proc = spawn_process(
        dir.path(),
        &logs.path().join("trace.log"),
        &[
            ("RUST_LOG", "trace"),
            ("CREDBROKER_JIRA_AUTH_URL", &jira.origin),
            ("CREDBROKER_JIRA_API_URL", &jira.origin),
        ],
    )
    .unwrap();
    wait_for_health(
        proc.addr,
        tonic_health::pb::health_check_response::ServingStatus::Serving,
    )
    .await;
    let secret_file = logs.path().join("scoped-token");
    std::fs::write(&secret_file, format!("{SCOPED_TOKEN}\n")).unwrap();
    let secret_arg = format!("token=file:{}", secret_file.display());
    let (addr, data) = (proc.addr, dir.path().to_owned());
    let site = jira.origin.clone();
    let out = tokio::task::block_in_place(|| {
        ctl_at(
            addr,
            &data,
            &[
                "--output",
                "json",
                "system",
                "register",
                "--kind",
                "jira-cloud",
                "--id",
                "cli-jira",
                "--base-url",
                &site,
                "--check",
                "--credential-type",
                "email-api-token",
                "--email",
                SA_EMAIL,
                "--scoped",
                "--expires-at",
                "2027-06-30",
                "--secret",
                &secret_arg,
            ],
            None,
        )
    });
    let v = json_out(&out);
    assert_eq!(v["check"]["ok"], true, "{v}");
    // A flag the credential type does not read is refused, not ignored.
    let foreign = tokio::task::block_in_place(|| {
        ctl_at(
            addr,
            &data,
            &[
                "system",
                "register",
                "--kind",
                "servicenow",
                "--id",
                "cli-sn",
                "--base-url",
                &site,
                "--credential-type",
                "api-key",
                "--scoped",
                "--secret",
                &secret_arg,
            ],
            None,
        )
    });
    assert!(!foreign.status.success());
    assert!(
        String::from_utf8_lossy(&foreign.stderr)
            .contains("--scoped is for --credential-type email-api-token"),
        "{}",
        String::from_utf8_lossy(&foreign.stderr)
    );
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_secret(&printed);
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let mut admin = client(proc.addr, Some(token.trim())).await;
    let sys = admin
        .get_system(pb::GetSystemRequest {
            system_id: "cli-jira".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .system
        .unwrap();
    assert_eq!(
        sys.credential_type,
        pb::CredentialType::EmailApiToken as i32
    );
    assert_eq!(sys.credential_expires_at.unwrap().seconds, 1_814_313_600);
    let k = pb::SystemKind::Servicenow;
    let sn_base = sn.base_url.clone();
    for (id, cred) in [
        ("sn-key", sn_key(SN_KEY, None)),
        ("sn-cc", cc(SN_SC_ID, SN_SC_SECRET)),
    ] {
        admin
            .register_system(reg(id, k, &sn_base, cred, true, pb::Delivery::Header))
            .await
            .unwrap();
    }
    let minted = admin
        .get_access_token(tok("sn-cc"))
        .await
        .unwrap()
        .into_inner()
        .headers[0]
        .value
        .trim_start_matches("Bearer ")
        .to_owned();
    std::fs::remove_file(&secret_file).unwrap();
    assert_eq!(proc.terminate(), Some(0));
    let log = std::fs::read_to_string(logs.path().join("trace.log")).unwrap();
    assert!(log.contains("cli-jira"), "trace log not captured");
    for s in SECRETS.iter().copied().chain([minted.as_str()]) {
        assert!(!log.contains(s), "a secret is in the log");
        assert_eq!(
            dir_contains(dir.path(), s),
            None,
            "a secret is in the data directory"
        );
    }
}
