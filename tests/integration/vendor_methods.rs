//! Issue 18: Azure DevOps through a Microsoft Entra service principal (secret, certificate,
//! federated token file), Salesforce's JWT bearer flow and "Connect with Salesforce", against
//! fakes that answer as `upstreams.md` §12–§13 says (the fakes verify the signed JWTs with the
//! registered public key).

use std::time::Duration;

use credbroker::pb;
use credbroker::pb::AuthFailure as F;
use tonic::Code;

use crate::connect::{authz_code, browse, register, start, start as start_authorization};
use crate::fake_entra::{certificate_auth, public_key, AppAuth, FakeEntra};
use crate::oauth::stored_refresh_token;
use crate::service_identities::{checked, one_mint_per_need, refused, reg, tok};
use crate::support::*;

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const SP_SECRET: &str = "entra-secret-canary-81";
const FED_1: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJmZWQtMSJ9.c2lnLWNhbmFyeS04Mg";
const FED_2: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJmZWQtMiJ9.c2lnLWNhbmFyeS04Mw";
const SF_KEY_ID: &str = "3MVG9-jwt-consumer-key";
const SF_USER: &str = "integration@acme.example";
const SF_SECRET: &str = "sf-eca-secret-canary-84";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn sp_cred(client_id: &str, authority: &str, how: Entra) -> pb::Credential {
    let mut e = pb::EntraClientCredentials {
        tenant_id: TENANT.into(),
        client_id: client_id.into(),
        authority_url: authority.into(),
        ..Default::default()
    };
    match how {
        Entra::Secret(s) => e.client_secret = s.into(),
        Entra::Certificate(key) => {
            e.client_certificate_pem = fixture("entra-client.crt");
            e.client_private_key_pem = fixture(key);
        }
        Entra::Federated(path) => e.federated_token_file = path,
    }
    pb::Credential {
        credential: Some(pb::credential::Credential::EntraClientCredentials(e)),
    }
}

enum Entra {
    Secret(&'static str),
    Certificate(&'static str),
    Federated(String),
}

fn sf_jwt(consumer_key: &str, user: &str, key: &str, login_url: &str) -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::SalesforceJwtBearer(
            pb::SalesforceJwtBearer {
                client_id: consumer_key.into(),
                username: user.into(),
                private_key_pem: fixture(key),
                login_url: login_url.into(),
            },
        )),
    }
}

fn no_key_material(text: &str) {
    for secret in [SP_SECRET, FED_1, FED_2, SF_SECRET, "PRIVATE KEY", "MII"] {
        assert!(
            !text.contains(secret),
            "key material or a secret in: {text}"
        );
    }
}

/// A broker config whose federated token directory is `{dir}/tokens`.
fn with_token_dir(dir: &std::path::Path) -> (credbroker::config::Config, std::path::PathBuf) {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let mut config = test_config(dir);
    config.vendors.entra_federated_token_dir = tokens.clone();
    (config, tokens)
}

async fn ado_with_entra() -> (FakeEntra, FakeAzureDevOps) {
    let entra = FakeEntra::start(TENANT).await;
    let ado = FakeAzureDevOps::start().await;
    ado.trust(&entra);
    entra.add_app(
        "app-secret",
        AppAuth::Secret {
            value: SP_SECRET.into(),
            expired: false,
        },
    );
    entra.add_app(
        "app-cert",
        certificate_auth(&fixture("entra-client.crt"), &fixture("entra-client.key")),
    );
    entra.add_app(
        "app-fed",
        AppAuth::Federated {
            token: FED_1.into(),
        },
    );
    for app in ["app-secret", "app-cert", "app-fed"] {
        ado.add_principal(app, &format!("sp-{app}"), &format!("Sync SP ({app})"), true);
    }
    (entra, ado)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_devops_service_principals_by_secret_certificate_or_federated_token() {
    let dir = tempfile::tempdir().unwrap();
    let (entra, ado) = ado_with_entra().await;
    let (config, tokens) = with_token_dir(dir.path());
    let fed_file = tokens.join("azure-identity-token");
    std::fs::write(&fed_file, FED_1).unwrap();
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    let k = pb::SystemKind::AzureDevops;
    let (base, auth) = (ado.base_url.clone(), entra.authority.clone());
    let in_ten_days = credbroker::model::unix_now() as i64 + 10 * 86_400;

    let methods = [
        ("ado-secret", "app-secret", Entra::Secret(SP_SECRET)),
        (
            "ado-cert",
            "app-cert",
            Entra::Certificate("entra-client.key"),
        ),
        (
            "ado-fed",
            "app-fed",
            Entra::Federated(fed_file.display().to_string()),
        ),
    ];
    for (id, app, how) in methods {
        let mut cred = sp_cred(app, &auth, how);
        if let Some(pb::credential::Credential::EntraClientCredentials(e)) = &mut cred.credential {
            e.secret_expires_at = (id == "ado-secret").then_some(prost_types::Timestamp {
                seconds: in_ten_days,
                nanos: 0,
            });
        }
        let resp = admin
            .register_system(reg(id, k, &base, cred, true, pb::Delivery::Unspecified))
            .await
            .unwrap_or_else(|e| panic!("{id}: {e:?}"))
            .into_inner();
        let c = resp.check.unwrap();
        assert!(c.ok, "{id}: {}", c.message);
        assert_eq!(c.identity.as_ref().unwrap().id, format!("sp-{app}"), "{id}");
        let sys = resp.system.unwrap();
        assert_eq!(
            sys.credential_type,
            pb::CredentialType::EntraClientCredentials as i32
        );
        assert_eq!(
            sys.delivery,
            pb::Delivery::Header as i32,
            "{id}: tokens go by header"
        );
        if id == "ado-secret" {
            assert!(c.message.contains("expires in 10 day(s)"), "{}", c.message);
            assert_eq!(sys.credential_expires_at.unwrap().seconds, in_ten_days);
        }
        let t = admin.get_access_token(tok(id)).await.unwrap().into_inner();
        assert!(
            t.headers[0].value.starts_with("Bearer eyJ0eXAi.entra-"),
            "{id}"
        );
        assert_eq!(t.api_base_url, base);
        no_key_material(&format!("{c:?} {sys:?}"));
    }

    // One assertion per mint, whatever 500 callers do (the fake refuses a reused jti).
    admin
        .register_system(reg(
            "ado-cold",
            k,
            &base,
            sp_cred("app-cert", &auth, Entra::Certificate("entra-client.key")),
            false,
            pb::Delivery::Unspecified,
        ))
        .await
        .unwrap();
    entra.set_delay(Duration::from_millis(200));
    let e2 = entra.clone();
    one_mint_per_need(&broker, "ado-cold", move || e2.token_calls()).await;
    entra.set_delay(Duration::ZERO);

    // The federated token file is read for every mint: Kubernetes rotates it.
    entra.add_app(
        "app-fed",
        AppAuth::Federated {
            token: FED_2.into(),
        },
    );
    std::fs::write(&fed_file, FED_2).unwrap();
    let current = admin
        .get_access_token(tok("ado-fed"))
        .await
        .unwrap()
        .into_inner();
    let next = token_with_deadline(
        &mut admin,
        "ado-fed",
        &current.token_id,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_ne!(
        next.token_id, current.token_id,
        "the rewritten file was picked up"
    );
    assert!(
        entra.server.unexpected().is_empty(),
        "{:?}",
        entra.server.unexpected()
    );
    assert!(
        ado.server.unexpected().is_empty(),
        "{:?}",
        ado.server.unexpected()
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_and_azure_devops_refusals_each_name_their_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (entra, ado) = ado_with_entra().await;
    entra.add_app(
        "app-expired",
        AppAuth::Secret {
            value: "old-secret".into(),
            expired: true,
        },
    );
    entra.add_app(
        "app-not-added",
        AppAuth::Secret {
            value: SP_SECRET.into(),
            expired: false,
        },
    );
    ado.add_principal("app-not-added", "sp-x", "Not Added", false);
    entra.add_app(
        "app-unknown-to-ado",
        AppAuth::Secret {
            value: SP_SECRET.into(),
            expired: false,
        },
    );
    let (config, tokens) = with_token_dir(dir.path());
    let pem = tokens.join("not-a-token.pem");
    std::fs::write(&pem, fixture("other.key")).unwrap();
    let outside = dir.path().join("outside-token");
    std::fs::write(&outside, FED_1).unwrap();
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    let k = pb::SystemKind::AzureDevops;
    let (base, auth) = (ado.base_url.clone(), entra.authority.clone());

    let cases: Vec<(&str, pb::Credential, &[&str])> = vec![
        (
            "wrong-secret",
            sp_cred("app-secret", &auth, Entra::Secret("wrong")),
            &["AADSTS7000215", "Value"],
        ),
        (
            "expired-secret",
            sp_cred("app-expired", &auth, Entra::Secret("old-secret")),
            &["AADSTS7000222", "expired"],
        ),
        (
            "unknown-app",
            sp_cred("app-nobody", &auth, Entra::Secret(SP_SECRET)),
            &["AADSTS700016", "client id"],
        ),
        (
            "wrong-key",
            sp_cred("app-cert", &auth, Entra::Certificate("other.key")),
            &["AADSTS700027", "certificate"],
        ),
        (
            "not-added",
            sp_cred("app-not-added", &auth, Entra::Secret(SP_SECRET)),
            &["TF401444", "Add users"],
        ),
        (
            "unknown-to-ado",
            sp_cred("app-unknown-to-ado", &auth, Entra::Secret(SP_SECRET)),
            &["TF400813", "add it to the organization"],
        ),
        (
            "not-a-jwt",
            sp_cred(
                "app-fed",
                &auth,
                Entra::Federated(pem.display().to_string()),
            ),
            &["does not hold a JWT"],
        ),
    ];
    let calls = entra.token_calls();
    for (id, cred, needles) in cases {
        let msg = refused(
            &mut admin,
            reg(id, k, &base, cred, true, pb::Delivery::Unspecified),
            needles,
        )
        .await;
        no_key_material(&msg);
    }
    assert_eq!(
        entra.token_calls() - calls,
        6,
        "a file that is not a JWT is never sent"
    );

    let mut wrong_tenant = sp_cred("app-secret", &auth, Entra::Secret(SP_SECRET));
    if let Some(pb::credential::Credential::EntraClientCredentials(e)) =
        &mut wrong_tenant.credential
    {
        e.tenant_id = "contoso.onmicrosoft.com".into();
    }
    refused(
        &mut admin,
        reg(
            "wrong-tenant",
            k,
            &base,
            wrong_tenant,
            true,
            pb::Delivery::Unspecified,
        ),
        &["AADSTS90002"],
    )
    .await;

    // Where secrets and files would go is guarded: only Entra's authorities, only the
    // configured token directory, only Azure DevOps Services.
    let mut attacker = sp_cred(
        "app-secret",
        "https://attacker.example",
        Entra::Secret(SP_SECRET),
    );
    let elsewhere = sp_cred(
        "app-fed",
        &auth,
        Entra::Federated(outside.display().to_string()),
    );
    let escape = sp_cred(
        "app-fed",
        &auth,
        Entra::Federated(format!(
            "{}/../outside-token",
            dir.path().join("tokens").display()
        )),
    );
    if let Some(pb::credential::Credential::EntraClientCredentials(e)) = &mut attacker.credential {
        e.authority_url = "https://attacker.example".into();
    }
    for (cred, base_url, needle) in [
        (attacker, base.as_str(), "Entra authority"),
        (elsewhere, base.as_str(), "must be inside"),
        (escape, base.as_str(), "must be inside"),
        (
            sp_cred("app-secret", &auth, Entra::Secret(SP_SECRET)),
            "https://tfs.corp.example/tfs/DefaultCollection",
            "Azure DevOps Server needs a PAT",
        ),
    ] {
        let e = admin
            .register_system(reg(
                "guarded",
                k,
                base_url,
                cred,
                false,
                pb::Delivery::Unspecified,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(needle), "{}", e.message());
    }
    assert_eq!(entra.token_calls() - calls, 7, "nothing was sent anywhere");

    // Bad input never reaches Entra: two methods at once, a multi-tenant alias, a broken key.
    let mut two = sp_cred("app-secret", &auth, Entra::Secret(SP_SECRET));
    let mut common = two.clone();
    let mut broken = sp_cred("app-cert", &auth, Entra::Certificate("entra-client.key"));
    if let Some(pb::credential::Credential::EntraClientCredentials(e)) = &mut two.credential {
        e.federated_token_file = "/var/run/secrets/azure/tokens/azure-identity-token".into();
    }
    if let Some(pb::credential::Credential::EntraClientCredentials(e)) = &mut common.credential {
        e.tenant_id = "common".into();
    }
    if let Some(pb::credential::Credential::EntraClientCredentials(e)) = &mut broken.credential {
        e.client_private_key_pem =
            "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n".into();
    }
    for (cred, field) in [
        (two, "credential.entra_client_credentials"),
        (common, "credential.entra_client_credentials.tenant_id"),
        (
            broken,
            "credential.entra_client_credentials.client_private_key_pem",
        ),
    ] {
        let e = admin
            .register_system(reg("bad", k, &base, cred, true, pb::Delivery::Unspecified))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(field), "{}", e.message());
        no_key_material(e.message());
    }
    assert_eq!(entra.token_calls() - calls, 7);

    // A PAT refused by Azure DevOps names the end of global PATs first; PAT systems say they
    // are legacy.
    ado.add_pat(
        "pat-canary-85",
        "u-1",
        "Proxy User",
        "p@acme.example",
        ADO_ALL_SCOPES,
        true,
    );
    let e = admin
        .register_system(reg(
            "pat-bad",
            k,
            &base,
            pat("wrong-pat"),
            true,
            pb::Delivery::Unspecified,
        ))
        .await
        .unwrap_err();
    assert!(
        e.message()
            .contains("global PATs stopped working on 2026-12-01"),
        "{}",
        e.message()
    );
    let resp = admin
        .register_system(reg(
            "pat-ok",
            k,
            &base,
            pat("pat-canary-85"),
            true,
            pb::Delivery::Unspecified,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(resp
        .check
        .unwrap()
        .message
        .contains("Microsoft Entra service principals"));
    assert!(resp
        .system
        .unwrap()
        .state_message
        .contains("entra_client_credentials"));
    broker.stop().await;
}

async fn salesforce() -> FakeSalesforce {
    let fake = FakeSalesforce::start("3MVG9-eca-client", SF_SECRET).await;
    fake.add_jwt_app(SF_KEY_ID, public_key(&fixture("salesforce-jwt.key")));
    fake.preauthorize(SF_USER, true);
    fake
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salesforce_jwt_bearer_signs_mints_once_and_names_the_admins_fix() {
    let dir = tempfile::tempdir().unwrap();
    let fake = salesforce().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let k = pb::SystemKind::Salesforce;
    let base = fake.base_url.clone();

    let resp = admin
        .register_system(reg(
            "sf-jwt",
            k,
            &base,
            sf_jwt(SF_KEY_ID, SF_USER, "salesforce-jwt.key", &base),
            true,
            pb::Delivery::Unspecified,
        ))
        .await
        .unwrap()
        .into_inner();
    let c = resp.check.unwrap();
    assert!(c.ok, "{}", c.message);
    assert_eq!(c.identity.unwrap().id, "005000000000001AAA");
    let sys = resp.system.unwrap();
    assert_eq!(
        sys.credential_type,
        pb::CredentialType::SalesforceJwtBearer as i32
    );
    assert!(
        sys.state_message.is_empty(),
        "not legacy: {}",
        sys.state_message
    );
    let t = admin
        .get_access_token(tok("sf-jwt"))
        .await
        .unwrap()
        .into_inner();
    assert!(t.headers[0].value.starts_with("Bearer 00D!sess"));
    assert_eq!(t.api_base_url, base, "the instance_url of the answer");
    no_key_material(&format!("{sys:?}"));

    admin
        .register_system(reg(
            "sf-cold",
            k,
            &base,
            sf_jwt(SF_KEY_ID, SF_USER, "salesforce-jwt.key", &base),
            false,
            pb::Delivery::Unspecified,
        ))
        .await
        .unwrap();
    fake.set_login_delay(Duration::from_millis(200));
    let f = fake.clone();
    one_mint_per_need(&broker, "sf-cold", move || f.token_calls()).await;
    fake.set_login_delay(Duration::ZERO);

    let cases: Vec<(&str, pb::Credential, F, &[&str])> = vec![
        (
            "sf-not-approved",
            sf_jwt(SF_KEY_ID, "other@acme.example", "salesforce-jwt.key", &base),
            F::Misconfigured,
            &["pre-authorized", "Permitted Users"],
        ),
        (
            "sf-wrong-key",
            sf_jwt(SF_KEY_ID, SF_USER, "other.key", &base),
            F::InvalidCredentials,
            &["signature does not match", "certificate"],
        ),
        (
            "sf-wrong-app",
            sf_jwt("3MVG9-nobody", SF_USER, "salesforce-jwt.key", &base),
            F::InvalidCredentials,
            &["Consumer Key"],
        ),
    ];
    for (id, cred, failure, needles) in cases {
        let msg = refused(
            &mut admin,
            reg(id, k, &base, cred, true, pb::Delivery::Unspecified),
            needles,
        )
        .await;
        let class = failure
            .as_str_name()
            .trim_start_matches("AUTH_FAILURE_")
            .to_ascii_lowercase();
        assert!(msg.contains(&format!("({class})")), "{id}: {msg}");
        no_key_material(&msg);
    }
    // A user no longer pre-authorized: the stored system's next mint fails and says so.
    fake.preauthorize(SF_USER, false);
    let current = admin
        .get_access_token(tok("sf-jwt"))
        .await
        .unwrap()
        .into_inner();
    let e = token_with_deadline(
        &mut admin,
        "sf-jwt",
        &current.token_id,
        Duration::from_secs(10),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("pre-authorized"), "{}", e.message());
    assert!(
        fake.server.unexpected().is_empty(),
        "{:?}",
        fake.server.unexpected()
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_salesforce_rotates_and_keeps_idle_grants_alive() {
    let dir = tempfile::tempdir().unwrap();
    let fake = salesforce().await;
    fake.oauth(|o| o.rotate = true);
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let k = pb::SystemKind::Salesforce;
    let resp = admin
        .register_system(register(
            "sf-connect",
            k,
            &fake.base_url,
            authz_code("3MVG9-eca-client", SF_SECRET),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.system.unwrap().state,
        pb::SystemState::AuthorizationPending as i32
    );
    // A denied consent changes nothing.
    fake.set_consent(Consent::Deny);
    let denied = start(&mut admin, "sf-connect").await;
    let (_, status, _) = browse(&denied.authorize_url).await;
    assert_ne!(status, 200, "a denial is not a success page");
    let still = admin
        .get_system(pb::GetSystemRequest {
            system_id: "sf-connect".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .system
        .unwrap();
    assert_eq!(still.state, pb::SystemState::AuthorizationPending as i32);
    fake.set_consent(Consent::Allow("integration".into()));
    let s = start(&mut admin, "sf-connect").await;
    let authorize = url::Url::parse(&s.authorize_url).unwrap();
    let q: std::collections::HashMap<_, _> = authorize.query_pairs().into_owned().collect();
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["scope"], "api refresh_token");
    let (_, status, page) = browse(&s.authorize_url).await;
    assert_eq!(status, 200, "{page}");
    let c = checked(&mut admin, "sf-connect").await;
    assert!(c.ok, "{}", c.message);
    let first = admin
        .get_access_token(tok("sf-connect"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.api_base_url, fake.base_url, "instance_url is tracked");

    // A re-mint rotates the refresh token; the newest is stored before the token is used, even
    // when the worker that asked gives up while Salesforce is still answering.
    let issued = fake.newest_refresh_token().unwrap();
    let calls = fake.token_calls();
    fake.set_login_delay(Duration::from_millis(400));
    let dropped = token_with_deadline(
        &mut admin,
        "sf-connect",
        &first.token_id,
        Duration::from_millis(50),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(dropped.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{dropped:?}"
    );
    let next = admin
        .get_access_token(tok("sf-connect"))
        .await
        .unwrap()
        .into_inner();
    fake.set_login_delay(Duration::ZERO);
    assert_eq!(
        fake.token_calls() - calls,
        1,
        "the dropped refresh was not repeated"
    );
    assert_ne!(next.token_id, first.token_id);
    assert_ne!(
        fake.newest_refresh_token().unwrap(),
        issued,
        "the refresh token rotated"
    );
    assert_eq!(fake.reuse_detected(), 0);
    broker.stop().await;
    assert_eq!(
        stored_refresh_token(dir.path(), "sf-connect"),
        fake.newest_refresh_token().unwrap()
    );

    // Idle: with a margin wider than the idle limit, the sweep alone refreshes the grant.
    let mut config = test_config(dir.path());
    config.refresh.keepalive_interval = Duration::from_millis(200);
    config.refresh.keepalive_margin = Duration::from_secs(31 * 86_400);
    // Counted before the start: the first sweep runs at once.
    let before = fake.token_calls();
    let broker = TestBroker::start_with(config).await;
    eventually(
        Duration::from_secs(10),
        "the keep-alive sweep refreshes the idle grant",
        || fake.token_calls() > before,
    )
    .await;
    assert_eq!(fake.reuse_detected(), 0);
    broker.stop().await;
    assert_eq!(
        stored_refresh_token(dir.path(), "sf-connect"),
        fake.newest_refresh_token().unwrap()
    );
    assert!(
        fake.server.unexpected().is_empty(),
        "{:?}",
        fake.server.unexpected()
    );
}

/// A caller that gives up mid-exchange loses nothing: the exchange finishes and is used, for
/// the assertion flows as for the refresh-token ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_callers_do_not_repeat_assertion_exchanges() {
    let dir = tempfile::tempdir().unwrap();
    let (entra, ado) = ado_with_entra().await;
    let sf = salesforce().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(reg(
            "ado",
            pb::SystemKind::AzureDevops,
            &ado.base_url,
            sp_cred(
                "app-cert",
                &entra.authority,
                Entra::Certificate("entra-client.key"),
            ),
            false,
            pb::Delivery::Unspecified,
        ))
        .await
        .unwrap();
    admin
        .register_system(reg(
            "sf",
            pb::SystemKind::Salesforce,
            &sf.base_url,
            sf_jwt(SF_KEY_ID, SF_USER, "salesforce-jwt.key", &sf.base_url),
            false,
            pb::Delivery::Unspecified,
        ))
        .await
        .unwrap();
    entra.set_delay(Duration::from_millis(400));
    sf.set_login_delay(Duration::from_millis(400));
    let calls = |id: &str| {
        if id == "ado" {
            entra.token_calls()
        } else {
            sf.token_calls()
        }
    };
    for id in ["ado", "sf"] {
        let before = calls(id);
        let e = token_with_deadline(&mut admin, id, "", Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(
            matches!(e.code(), Code::Cancelled | Code::DeadlineExceeded),
            "{id}: {e:?}"
        );
        admin.get_access_token(tok(id)).await.unwrap();
        assert_eq!(
            calls(id) - before,
            1,
            "{id}: the dropped exchange was not repeated"
        );
    }
    broker.stop().await;
}

/// kill -9 while the broker waits for Entra or for Salesforce's JWT bearer answer: both mints
/// persist nothing, so the restarted broker simply mints again. During a rotating "Connect with
/// Salesforce" refresh the vendor has already rotated (it has no reuse leeway): the restarted
/// broker presents the old token once, is refused, and says plainly that the grant must be
/// connected again, instead of failing silently or retrying forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_exchange_loses_nothing_the_vendor_did_not_take() {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let (entra, ado) = ado_with_entra().await;
    let sf = salesforce().await;
    sf.oauth(|o| o.rotate = true);
    let start =
        |n: &str| spawn_process(dir.path(), &logs.path().join(format!("{n}.log")), &[]).unwrap();
    let proc = start("first");
    wait_for_health(
        proc.addr,
        tonic_health::pb::health_check_response::ServingStatus::Serving,
    )
    .await;
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let mut admin = client(proc.addr, Some(token.trim())).await;
    let cert = sp_cred(
        "app-cert",
        &entra.authority,
        Entra::Certificate("entra-client.key"),
    );
    let jwt = sf_jwt(SF_KEY_ID, SF_USER, "salesforce-jwt.key", &sf.base_url);
    for (id, kind, base, cred) in [
        (
            "ado",
            pb::SystemKind::AzureDevops,
            ado.base_url.clone(),
            cert,
        ),
        ("sf", pb::SystemKind::Salesforce, sf.base_url.clone(), jwt),
    ] {
        admin
            .register_system(reg(id, kind, &base, cred, false, pb::Delivery::Unspecified))
            .await
            .unwrap();
    }
    admin
        .register_system(register(
            "sfc",
            pb::SystemKind::Salesforce,
            &sf.base_url,
            authz_code("3MVG9-eca-client", SF_SECRET),
        ))
        .await
        .unwrap();
    let s = start_authorization(&mut admin, "sfc").await;
    assert_eq!(browse(&s.authorize_url).await.1, 200);
    let connected = admin
        .get_access_token(tok("sfc"))
        .await
        .unwrap()
        .into_inner();

    entra.set_delay(Duration::from_secs(30));
    sf.set_login_delay(Duration::from_secs(30));
    let (e0, s0) = (entra.token_calls(), sf.token_calls());
    for (id, rejected) in [
        ("ado", String::new()),
        ("sf", String::new()),
        ("sfc", connected.token_id.clone()),
    ] {
        let mut c = admin.clone();
        tokio::spawn(async move {
            let _ = token_with_deadline(&mut c, id, &rejected, Duration::from_secs(60)).await;
        });
    }
    eventually(
        Duration::from_secs(10),
        "the three exchanges reached the vendors",
        || entra.token_calls() > e0 && sf.token_calls() >= s0 + 2,
    )
    .await;
    proc.signal("KILL");
    drop(proc);
    entra.set_delay(Duration::ZERO);
    sf.set_login_delay(Duration::ZERO);

    let proc = start("second");
    wait_for_health(
        proc.addr,
        tonic_health::pb::health_check_response::ServingStatus::Serving,
    )
    .await;
    let mut admin = client(proc.addr, Some(token.trim())).await;
    for id in ["ado", "sf"] {
        let t = admin
            .get_access_token(tok(id))
            .await
            .unwrap_or_else(|e| panic!("{id}: {e:?}"));
        assert!(
            t.into_inner().headers[0].value.starts_with("Bearer "),
            "{id}"
        );
    }
    let e = admin.get_access_token(tok("sfc")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("connect"), "{}", e.message());
    assert!(proc.stop().await.is_some());
}
