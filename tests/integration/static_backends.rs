//! Azure DevOps, Freshdesk, Freshservice and ServiceNow (basic) against fakes that behave like
//! the real systems, traps included.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use credbroker::pb;
use credbroker::pb::AuthFailure as F;
use tonic::Code;

use crate::support::*;

fn register(
    id: &str,
    kind: pb::SystemKind,
    base: &str,
    cred: pb::Credential,
    check: bool,
) -> pb::RegisterSystemRequest {
    pb::RegisterSystemRequest {
        system_id: id.into(),
        kind: kind as i32,
        base_url: base.into(),
        credential: Some(cred),
        check,
        // Header delivery, pinned: these tests assert the exact header workers get.
        delivery: pb::Delivery::Header as i32,
        ..Default::default()
    }
}

fn b64(s: &str) -> String {
    STANDARD.encode(s)
}

async fn check(admin: &mut Client, req: pb::CheckAuthenticationRequest) -> pb::AuthCheck {
    admin
        .check_authentication(req)
        .await
        .unwrap()
        .into_inner()
        .check
        .unwrap()
}

/// Registers with check=true, then asserts the worker's header, base URL and the identity.
async fn register_and_token(
    admin: &mut Client,
    req: pb::RegisterSystemRequest,
    header: &str,
    api_base: &str,
    identity: (&str, &str, &str),
) {
    let id = req.system_id.clone();
    let resp = admin.register_system(req).await.unwrap().into_inner();
    let c = resp.check.unwrap();
    assert!(c.ok, "{}", c.message);
    assert!(
        c.missing_permissions.is_empty(),
        "{:?}",
        c.missing_permissions
    );
    let i = c.identity.unwrap();
    assert_eq!(
        (i.id.as_str(), i.display_name.as_str(), i.email.as_str()),
        identity
    );
    let tok = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: id,
            min_valid_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tok.headers.len(), 1);
    assert_eq!(tok.headers[0].name, "authorization");
    assert_eq!(tok.headers[0].value, header);
    assert_eq!(tok.api_base_url, api_base);
}

/// A bad new credential leaves the old one serving; a good one replaces it.
async fn rotation(
    admin: &mut Client,
    id: &str,
    bad: pb::Credential,
    good: pb::Credential,
    old_header: &str,
    new_header: &str,
) {
    let e = admin
        .rotate_credential(pb::RotateCredentialRequest {
            system_id: id.into(),
            credential: Some(bad),
            skip_check: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    let tok = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: id.into(),
            min_valid_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tok.headers[0].value, old_header);
    assert_eq!(tok.credential_version, 1);
    admin
        .rotate_credential(pb::RotateCredentialRequest {
            system_id: id.into(),
            credential: Some(good),
            skip_check: false,
        })
        .await
        .unwrap();
    let tok = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: id.into(),
            min_valid_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tok.headers[0].value, new_header);
    assert_eq!(tok.credential_version, 2);
}

fn assert_failed(c: &pb::AuthCheck, failure: F, needles: &[&str], secrets: &[&str]) {
    assert!(!c.ok, "reported ok: {}", c.message);
    assert_eq!(c.failure, failure as i32, "{}", c.message);
    for n in needles {
        assert!(c.message.contains(n), "'{}' lacks '{n}'", c.message);
    }
    for s in secrets {
        assert!(!c.message.contains(s), "secret in message");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_devops_tells_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAzureDevOps::start().await;
    fake.add_pat(
        "ado-full-pat",
        "u-1",
        "Proxy User",
        "proxy@acme.example",
        ADO_ALL_SCOPES,
        true,
    );
    fake.add_pat(
        "ado-full-pat-2",
        "u-1",
        "Proxy User",
        "proxy@acme.example",
        ADO_ALL_SCOPES,
        true,
    );
    fake.add_pat(
        "ado-narrow-pat",
        "u-2",
        "Narrow",
        "n@acme.example",
        &["vso.project"],
        false,
    );
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let kind = pb::SystemKind::AzureDevops;

    register_and_token(
        &mut admin,
        register("ado", kind, &fake.base_url, pat("ado-full-pat"), true),
        &format!("Basic {}", b64(":ado-full-pat")),
        &fake.base_url,
        ("u-1", "Proxy User", "proxy@acme.example"),
    )
    .await;

    // Authenticates, but scopes and group membership are missing: named as the PAT dialog names them.
    let c = check(
        &mut admin,
        candidate(kind, &fake.base_url, pat("ado-narrow-pat")),
    )
    .await;
    assert_failed(
        &c,
        F::InsufficientPermissions,
        &["Work Items (Read & Write)"],
        &["ado-narrow-pat"],
    );
    assert_eq!(c.identity.as_ref().unwrap().id, "u-2");
    let mut missing = c.missing_permissions.clone();
    missing.sort();
    assert_eq!(
        missing,
        [
            "Identity (Read)",
            "Member Entitlement Management (Read)",
            "Project Collection Administrators membership",
            "Work Items (Read & Write)"
        ]
    );
    assert!(c.message.contains("Not verified"), "{}", c.message);

    // Traps: unknown PAT (401 TF400813), anonymous 200, 203 sign-in page; none ok.
    let c = check(
        &mut admin,
        candidate(kind, &fake.base_url, pat("ado-unknown-pat")),
    )
    .await;
    assert_failed(
        &c,
        F::InvalidCredentials,
        &["401", "new PAT"],
        &["ado-unknown-pat"],
    );
    fake.set_mode(Mode::Anonymous);
    let c = check(
        &mut admin,
        candidate(kind, &fake.base_url, pat("ado-full-pat")),
    )
    .await;
    assert_failed(&c, F::InvalidCredentials, &["anonymous"], &["ado-full-pat"]);
    fake.set_mode(Mode::SignInPage);
    let c = check(
        &mut admin,
        candidate(kind, &fake.base_url, pat("ado-full-pat")),
    )
    .await;
    assert_failed(
        &c,
        F::InvalidCredentials,
        &["sign-in page"],
        &["ado-full-pat"],
    );
    fake.set_mode(Mode::RateLimited);
    let c = check(
        &mut admin,
        candidate(kind, &fake.base_url, pat("ado-full-pat")),
    )
    .await;
    assert_failed(&c, F::RateLimited, &["retry after 30 s"], &[]);
    fake.set_mode(Mode::ServerError);
    let c = check(
        &mut admin,
        candidate(kind, &fake.base_url, pat("ado-full-pat")),
    )
    .await;
    assert_failed(&c, F::UpstreamError, &["503"], &[]);
    fake.set_mode(Mode::Garbage);
    let c = check(
        &mut admin,
        candidate(kind, &fake.base_url, pat("ado-full-pat")),
    )
    .await;
    assert_failed(&c, F::InvalidCredentials, &["sign-in page"], &[]);
    fake.set_mode(Mode::Hang);
    let c = check(
        &mut admin,
        candidate(kind, &fake.base_url, pat("ado-full-pat")),
    )
    .await;
    assert_failed(&c, F::Unreachable, &["timed out"], &[]);
    fake.set_mode(Mode::Normal);

    // Identity answers but every permission probe hangs: the whole check still ends within the
    // upstream timeout.
    fake.set_hang_probes(true);
    let c = check(
        &mut admin,
        candidate(kind, &fake.base_url, pat("ado-full-pat")),
    )
    .await;
    assert_failed(&c, F::Unreachable, &["did not finish"], &[]);
    fake.set_hang_probes(false);

    // Throttling headers on a 200 are reported without failing the check.
    fake.set_throttle_on_200(true);
    let c = check(
        &mut admin,
        candidate(kind, &fake.base_url, pat("ado-full-pat")),
    )
    .await;
    assert!(c.ok, "{}", c.message);
    assert!(c.message.contains("throttling"), "{}", c.message);
    fake.set_throttle_on_200(false);

    // A wrong URL: nothing at the organization path.
    let c = check(
        &mut admin,
        candidate(
            kind,
            &format!("{}/other", fake.server.origin),
            pat("ado-full-pat"),
        ),
    )
    .await;
    assert!(!c.ok);

    rotation(
        &mut admin,
        "ado",
        pat("ado-unknown-pat"),
        pat("ado-full-pat-2"),
        &format!("Basic {}", b64(":ado-full-pat")),
        &format!("Basic {}", b64(":ado-full-pat-2")),
    )
    .await;
    // The wrong-URL probe above is the one unexpected request.
    assert_eq!(
        fake.server.unexpected().len(),
        1,
        "{:?}",
        fake.server.unexpected()
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_devops_pat_expiry_is_kept_and_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAzureDevOps::start().await;
    fake.add_pat(
        "ado-exp-pat",
        "u-1",
        "Proxy User",
        "p@acme.example",
        ADO_ALL_SCOPES,
        true,
    );
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let in_ten_days = credbroker::model::unix_now() as i64 + 10 * 86_400;
    let cred = pb::Credential {
        credential: Some(pb::credential::Credential::PersonalAccessToken(
            pb::PersonalAccessToken {
                token: "ado-exp-pat".into(),
                expires_at: Some(prost_types::Timestamp {
                    seconds: in_ten_days,
                    nanos: 0,
                }),
                ..Default::default()
            },
        )),
    };
    let resp = admin
        .register_system(register(
            "ado-exp",
            pb::SystemKind::AzureDevops,
            &fake.base_url,
            cred,
            true,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.system.unwrap().credential_expires_at.unwrap().seconds,
        in_ten_days
    );
    let c = resp.check.unwrap();
    assert!(c.ok);
    assert!(c.message.contains("expires in 10 day"), "{}", c.message);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshdesk_and_freshservice_tell_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    for (product, kind, id) in [
        (Freshworks::Desk, pb::SystemKind::Freshdesk, "fd"),
        (Freshworks::Service, pb::SystemKind::Freshservice, "fs"),
    ] {
        let fake = FakeFreshworks::start(product).await;
        fake.add_key("fw-key-1", 42, "Ada Agent", "ada@acme.example");
        fake.add_key("fw-key-2", 42, "Ada Agent", "ada@acme.example");
        fake.add_key("fw-key-limited", 43, "Lim Ited", "lim@acme.example");
        register_and_token(
            &mut admin,
            register(
                id,
                kind,
                &format!("{}/", fake.base_url),
                api_key("fw-key-1"),
                true,
            ),
            &format!("Basic {}", b64("fw-key-1:X")),
            &format!("{}/api/v2", fake.base_url),
            ("42", "Ada Agent", "ada@acme.example"),
        )
        .await;

        let c = check(
            &mut admin,
            candidate(kind, &fake.base_url, api_key("fw-key-wrong")),
        )
        .await;
        assert_failed(
            &c,
            F::InvalidCredentials,
            &["401", "API Key"],
            &["fw-key-wrong"],
        );

        fake.set_agent("fw-key-limited", true, true, false);
        let c = check(
            &mut admin,
            candidate(kind, &fake.base_url, api_key("fw-key-limited")),
        )
        .await;
        assert_failed(&c, F::InsufficientPermissions, &["Tickets"], &[]);
        assert_eq!(c.missing_permissions, ["Tickets (view)"]);

        fake.set_agent("fw-key-limited", false, true, true);
        let c = check(
            &mut admin,
            candidate(kind, &fake.base_url, api_key("fw-key-limited")),
        )
        .await;
        assert_failed(&c, F::ExpiredOrRevoked, &["deactivated"], &[]);

        if product == Freshworks::Service {
            // The role's "API Key" permission is off: 403 access_denied on agents/me.
            fake.set_agent("fw-key-limited", true, false, true);
            let c = check(
                &mut admin,
                candidate(kind, &fake.base_url, api_key("fw-key-limited")),
            )
            .await;
            assert_failed(
                &c,
                F::InsufficientPermissions,
                &["API Key", "Account Admin"],
                &[],
            );
            assert_eq!(c.missing_permissions, ["API Key (role permission)"]);
        }
        for (mode, failure, needle) in [
            (Mode::RateLimited, F::RateLimited, "30 s"),
            (Mode::ServerError, F::UpstreamError, "503"),
            (Mode::Garbage, F::Misconfigured, "not as the"),
            (Mode::Hang, F::Unreachable, "timed out"),
        ] {
            fake.set_mode(mode);
            let c = check(
                &mut admin,
                candidate(kind, &fake.base_url, api_key("fw-key-1")),
            )
            .await;
            assert_failed(&c, failure, &[needle], &["fw-key-1"]);
        }
        fake.set_mode(Mode::Normal);
        rotation(
            &mut admin,
            id,
            api_key("fw-key-wrong"),
            api_key("fw-key-2"),
            &format!("Basic {}", b64("fw-key-1:X")),
            &format!("Basic {}", b64("fw-key-2:X")),
        )
        .await;
        assert!(
            fake.server.unexpected().is_empty(),
            "{:?}",
            fake.server.unexpected()
        );
    }
    // Freshservice on a custom domain is refused with what to enter instead.
    let e = admin
        .register_system(register(
            "fs-custom",
            pb::SystemKind::Freshservice,
            "https://help.acme.com",
            api_key("k"),
            false,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("freshservice.com"), "{}", e.message());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servicenow_basic_tells_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeServiceNow::start().await;
    fake.add_user(
        "sync.proxy",
        "sn-pass-1",
        "6816f79c",
        "Sync Proxy",
        "sync@acme.example",
    );
    fake.add_user(
        "limited",
        "sn-pass-lim",
        "7716f79c",
        "Limited",
        "lim@acme.example",
    );
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let kind = pb::SystemKind::Servicenow;

    register_and_token(
        &mut admin,
        register(
            "sn",
            kind,
            &fake.base_url,
            basic_cred("sync.proxy", "sn-pass-1"),
            true,
        ),
        &format!("Basic {}", b64("sync.proxy:sn-pass-1")),
        &fake.base_url,
        ("6816f79c", "Sync Proxy", "sync@acme.example"),
    )
    .await;

    // Wrong password: 401 with a message that names the role and the restriction.
    let c = check(
        &mut admin,
        candidate(kind, &fake.base_url, basic_cred("sync.proxy", "wrong-pw")),
    )
    .await;
    assert_failed(
        &c,
        F::InvalidCredentials,
        &["snc_platform_rest_api_access"],
        &["wrong-pw"],
    );

    // A user name with `^` (which joins conditions in an encoded query) is not looked up:
    // `x^ORuser_name=sync.proxy` would have shown sync.proxy's account.
    let before = fake.server.count("/api/now/table/sys_user");
    let c = check(
        &mut admin,
        candidate(
            kind,
            &fake.base_url,
            basic_cred("x^ORuser_name=sync.proxy", "sn-pass-1"),
        ),
    )
    .await;
    assert_failed(&c, F::Misconfigured, &["'^'"], &["sn-pass-1"]);
    assert_eq!(fake.server.count("/api/now/table/sys_user"), before);

    // ACL-filtered 200 with an empty result is not success.
    fake.set_access("limited", &["itil"], false, true);
    let c = check(
        &mut admin,
        candidate(kind, &fake.base_url, basic_cred("limited", "sn-pass-lim")),
    )
    .await;
    assert_failed(
        &c,
        F::InsufficientPermissions,
        &["empty result", "sys_user"],
        &[],
    );
    assert_eq!(c.missing_permissions, ["read access to sys_user"]);

    // Missing roles and the journal ACL are listed.
    fake.set_access("limited", &["itil"], true, false);
    let c = check(
        &mut admin,
        candidate(kind, &fake.base_url, basic_cred("limited", "sn-pass-lim")),
    )
    .await;
    assert_failed(
        &c,
        F::InsufficientPermissions,
        &["snc_platform_rest_api_access role"],
        &[],
    );
    assert_eq!(
        c.missing_permissions,
        [
            "snc_platform_rest_api_access role",
            "import_set_loader role",
            "import_transformer role",
            "import_scheduler role",
            "read ACL on sys_journal_field (comments)"
        ]
    );
    assert_eq!(c.identity.unwrap().id, "7716f79c");

    fake.deactivate("limited");
    let c = check(
        &mut admin,
        candidate(kind, &fake.base_url, basic_cred("limited", "sn-pass-lim")),
    )
    .await;
    assert_failed(&c, F::ExpiredOrRevoked, &["inactive"], &[]);

    fake.restrict_basic_auth(true);
    let c = check(
        &mut admin,
        candidate(kind, &fake.base_url, basic_cred("sync.proxy", "sn-pass-1")),
    )
    .await;
    assert_failed(
        &c,
        F::InsufficientPermissions,
        &["basic auth is restricted on this instance"],
        &["sn-pass-1"],
    );
    fake.restrict_basic_auth(false);

    for (mode, failure, needle) in [
        (Mode::RateLimited, F::RateLimited, "30 s"),
        (Mode::ServerError, F::UpstreamError, "503"),
        (Mode::Garbage, F::Misconfigured, "hibernating"),
        (Mode::Hang, F::Unreachable, "timed out"),
    ] {
        fake.set_mode(mode);
        let c = check(
            &mut admin,
            candidate(kind, &fake.base_url, basic_cred("sync.proxy", "sn-pass-1")),
        )
        .await;
        assert_failed(&c, failure, &[needle], &["sn-pass-1"]);
    }
    fake.set_mode(Mode::Normal);

    fake.add_user(
        "sync.proxy2",
        "sn-pass-2",
        "9916f79c",
        "Sync Proxy 2",
        "sync2@acme.example",
    );
    rotation(
        &mut admin,
        "sn",
        basic_cred("sync.proxy", "not-the-password"),
        basic_cred("sync.proxy2", "sn-pass-2"),
        &format!("Basic {}", b64("sync.proxy:sn-pass-1")),
        &format!("Basic {}", b64("sync.proxy2:sn-pass-2")),
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
async fn base_urls_admins_paste_are_canonicalized_or_refused_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.egress.allow_http = false;
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    let cases = [
        (
            pb::SystemKind::AzureDevops,
            "https://dev.azure.com/Acme/",
            pat("p"),
            "https://dev.azure.com/Acme",
        ),
        (
            pb::SystemKind::AzureDevops,
            "acme.visualstudio.com",
            pat("p"),
            "https://acme.visualstudio.com",
        ),
        (
            pb::SystemKind::AzureDevops,
            "https://tfs.corp.example/tfs/DefaultCollection/",
            pat("p"),
            "https://tfs.corp.example/tfs/DefaultCollection",
        ),
        (
            pb::SystemKind::Freshdesk,
            "https://ACME.freshdesk.com/",
            api_key("k"),
            "https://acme.freshdesk.com",
        ),
        (
            pb::SystemKind::Freshservice,
            "acme.freshservice.com",
            api_key("k"),
            "https://acme.freshservice.com",
        ),
        (
            pb::SystemKind::Servicenow,
            "acme.service-now.com",
            basic_cred("u", "p"),
            "https://acme.service-now.com",
        ),
    ];
    for (i, (kind, raw, cred, want)) in cases.into_iter().enumerate() {
        let sys = admin
            .register_system(register(&format!("u{i}"), kind, raw, cred, false))
            .await
            .unwrap()
            .into_inner()
            .system
            .unwrap();
        assert_eq!(sys.base_url, want);
    }
    let refused = [
        (
            pb::SystemKind::AzureDevops,
            "https://dev.azure.com",
            pat("p"),
            "organization",
        ),
        (
            pb::SystemKind::Servicenow,
            "http://acme.service-now.com",
            basic_cred("u", "p"),
            "https",
        ),
        (
            pb::SystemKind::Servicenow,
            "https://u:p@acme.service-now.com",
            basic_cred("u", "p"),
            "user name or password",
        ),
        (
            pb::SystemKind::Freshdesk,
            "https://acme.freshdesk.com/#x",
            api_key("k"),
            "fragment",
        ),
        (
            pb::SystemKind::Freshservice,
            "https://support.acme.com",
            api_key("k"),
            "custom domain",
        ),
    ];
    for (i, (kind, raw, cred, needle)) in refused.into_iter().enumerate() {
        let e = admin
            .register_system(register(&format!("r{i}"), kind, raw, cred, false))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().contains("base_url") && e.message().contains(needle),
            "{}",
            e.message()
        );
    }
    broker.stop().await;
}
