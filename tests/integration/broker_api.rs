//! gRPC-level behaviour: register → token, restart, auth matrix, bad input, rotation, checks.

use credbroker::pb;
use tonic::Code;

use crate::support::*;

const PAT: &str = "asana-pat-canary-0f9c1e";

async fn asana_with_user() -> FakeAsana {
    let fake = FakeAsana::start().await;
    fake.add_user(PAT, "1201", "Proxy User", "proxy@example.com");
    fake
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_asana_get_exact_header_and_again_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fake = asana_with_user().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;

    let resp = admin
        .register_system(register_asana("acme-asana", &fake.base_url, PAT, true))
        .await
        .unwrap()
        .into_inner();
    let check = resp.check.expect("a check ran");
    assert!(check.ok, "{}", check.message);
    let id = check.identity.unwrap();
    assert_eq!(
        (id.id.as_str(), id.display_name.as_str(), id.email.as_str()),
        ("1201", "Proxy User", "proxy@example.com")
    );
    let sys = resp.system.unwrap();
    assert_eq!(sys.credential_version, 1);
    assert_eq!(sys.state, pb::SystemState::Active as i32);
    assert_eq!(sys.base_url, fake.base_url);

    // A worker gets exactly the header and the API base.
    let worker_token = admin
        .create_caller(pb::CreateCallerRequest {
            name: "sync-1".into(),
            role: pb::CallerRole::Worker as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut worker = client(broker.addr, Some(&worker_token)).await;
    let tok = worker
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "acme-asana".into(),
            min_valid_seconds: 60,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tok.headers.len(), 1);
    assert_eq!(tok.headers[0].name, "authorization");
    assert_eq!(tok.headers[0].value, format!("Bearer {PAT}"));
    assert_eq!(tok.api_base_url, fake.base_url);
    assert_eq!(tok.credential_version, 1);
    assert!(!tok.token_id.is_empty());
    let exp = tok.expires_at.unwrap().seconds;
    let now = credbroker::model::unix_now() as i64;
    assert!(
        exp >= now + 60,
        "expires_at {exp} must cover min_valid_seconds"
    );

    // Warm calls come from memory: the same token id, and no upstream call.
    let calls = fake.me_calls();
    let again = worker
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "acme-asana".into(),
            min_valid_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.token_id, tok.token_id);
    assert_eq!(fake.me_calls(), calls);

    broker.stop().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut worker = client(broker.addr, Some(&worker_token)).await;
    let tok = worker
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "acme-asana".into(),
            min_valid_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tok.headers[0].value, format!("Bearer {PAT}"));
    assert_eq!(tok.api_base_url, fake.base_url);
    assert!(fake.unexpected().is_empty(), "{:?}", fake.unexpected());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_auth_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let fake = asana_with_user().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(register_asana("s1", &fake.base_url, PAT, false))
        .await
        .unwrap();
    let worker_token = admin
        .create_caller(pb::CreateCallerRequest {
            name: "w".into(),
            role: pb::CallerRole::Worker as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;

    // No token.
    let mut anon = client(broker.addr, None).await;
    let e = anon
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "s1".into(),
            min_valid_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = anon
        .list_systems(pb::ListSystemsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // Wrong token.
    let mut wrong = client(broker.addr, Some("cbt_not-a-real-token")).await;
    let e = wrong
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "s1".into(),
            min_valid_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // Worker: GetAccessToken yes; everything else PERMISSION_DENIED.
    let mut worker = client(broker.addr, Some(&worker_token)).await;
    worker
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "s1".into(),
            min_valid_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap();
    let denied = [
        worker
            .register_system(register_asana("s2", &fake.base_url, PAT, false))
            .await
            .map(|_| ()),
        worker
            .list_systems(pb::ListSystemsRequest::default())
            .await
            .map(|_| ()),
        worker
            .get_system(pb::GetSystemRequest {
                system_id: "s1".into(),
            })
            .await
            .map(|_| ()),
        worker
            .delete_system(pb::DeleteSystemRequest {
                system_id: "s1".into(),
            })
            .await
            .map(|_| ()),
        worker
            .rotate_credential(pb::RotateCredentialRequest {
                system_id: "s1".into(),
                credential: Some(pat("x")),
                skip_check: true,
            })
            .await
            .map(|_| ()),
        worker
            .check_authentication(pb::CheckAuthenticationRequest {
                target: Some(pb::check_authentication_request::Target::SystemId(
                    "s1".into(),
                )),
            })
            .await
            .map(|_| ()),
        worker
            .create_caller(pb::CreateCallerRequest {
                name: "evil".into(),
                role: pb::CallerRole::Admin as i32,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        worker
            .list_callers(pb::ListCallersRequest {})
            .await
            .map(|_| ()),
        worker
            .revoke_caller(pb::RevokeCallerRequest {
                name: "admin".into(),
            })
            .await
            .map(|_| ()),
    ];
    for r in denied {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("worker"), "{}", e.message());
    }
    // Nothing the worker tried changed anything.
    let list = admin
        .list_systems(pb::ListSystemsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.systems.len(), 1);
    assert_eq!(list.systems[0].credential_version, 1);

    // Revocation takes effect on the next call.
    admin
        .revoke_caller(pb::RevokeCallerRequest { name: "w".into() })
        .await
        .unwrap();
    let e = worker
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "s1".into(),
            min_valid_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // The last admin cannot be revoked.
    let e = admin
        .revoke_caller(pb::RevokeCallerRequest {
            name: "admin".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // A caller with no role is refused.
    let e = admin
        .create_caller(pb::CreateCallerRequest {
            name: "norole".into(),
            role: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let callers = admin
        .list_callers(pb::ListCallersRequest {})
        .await
        .unwrap()
        .into_inner()
        .callers;
    assert_eq!(callers.len(), 2);
    assert!(callers.iter().any(|c| c.name == "w" && c.revoked));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fake = asana_with_user().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(register_asana("keep", &fake.base_url, PAT, false))
        .await
        .unwrap();
    let before = admin
        .get_system(pb::GetSystemRequest {
            system_id: "keep".into(),
        })
        .await
        .unwrap()
        .into_inner();

    let mut cases: Vec<(pb::RegisterSystemRequest, Code, &str)> = Vec::new();
    let mut r = register_asana("k1", &fake.base_url, PAT, false);
    r.kind = 99;
    cases.push((r, Code::InvalidArgument, "kind"));
    let mut r = register_asana("k2", &fake.base_url, PAT, false);
    r.kind = 0;
    cases.push((r, Code::InvalidArgument, "kind"));
    let mut r = register_asana("k3", &fake.base_url, PAT, false);
    r.credential = Some(pb::Credential {
        credential: Some(pb::credential::Credential::ApiKey(pb::ApiKey {
            key: "k".into(),
            expires_at: None,
        })),
    });
    cases.push((r, Code::InvalidArgument, "credential"));
    let mut r = register_asana("k4", &fake.base_url, PAT, false);
    r.credential = None;
    cases.push((r, Code::InvalidArgument, "credential"));
    // Labels go into every event of the system and onto pages: bounded, nothing hidden.
    let mut r = register_asana("k4a", &fake.base_url, PAT, false);
    r.display_name = "n".repeat(201);
    cases.push((r, Code::InvalidArgument, "display_name"));
    let mut r = register_asana("k4b", &fake.base_url, PAT, false);
    r.display_name = "Sales\u{202E}txt.exe".into();
    cases.push((r, Code::InvalidArgument, "display_name"));
    let mut r = register_asana("k4c", &fake.base_url, PAT, false);
    r.description = "d".repeat(4001);
    cases.push((r, Code::InvalidArgument, "description"));
    let mut r = register_asana("k4d", &fake.base_url, PAT, false);
    r.description = "line\u{1b}[2J".into();
    cases.push((r, Code::InvalidArgument, "description"));
    let mut r = register_asana("k4e", &fake.base_url, PAT, false);
    r.description = "all is well\rALL IS LOST".into();
    cases.push((r, Code::InvalidArgument, "description"));
    cases.push((
        register_asana("k5", "https://evil.example.com/api/1.0", PAT, false),
        Code::InvalidArgument,
        "base_url",
    ));
    cases.push((
        register_asana("k6", "ftp://app.asana.com", PAT, false),
        Code::InvalidArgument,
        "base_url",
    ));
    cases.push((
        register_asana("k7", "https://user:pw@app.asana.com/api/1.0", PAT, false),
        Code::InvalidArgument,
        "base_url",
    ));
    cases.push((
        register_asana("k8", "https://app.asana.com/api/1.0#x", PAT, false),
        Code::InvalidArgument,
        "base_url",
    ));
    cases.push((
        register_asana("Bad Id!", &fake.base_url, PAT, false),
        Code::InvalidArgument,
        "system_id",
    ));
    cases.push((
        register_asana(&"a".repeat(129), &fake.base_url, PAT, false),
        Code::InvalidArgument,
        "system_id",
    ));
    cases.push((
        register_asana("k9", &fake.base_url, "", false),
        Code::InvalidArgument,
        "token",
    ));
    cases.push((
        register_asana("k10", &fake.base_url, "tok with\nnewline", false),
        Code::InvalidArgument,
        "token",
    ));
    cases.push((
        register_asana("k10b", &fake.base_url, &"t".repeat(8 * 1024 + 1), false),
        Code::InvalidArgument,
        "token",
    ));
    for (i, username) in ["u".repeat(1025), "user\nname".to_owned()]
        .into_iter()
        .enumerate()
    {
        let mut r = register_asana(&format!("k10c{i}"), &fake.base_url, PAT, false);
        r.credential = Some(pb::Credential {
            credential: Some(pb::credential::Credential::PersonalAccessToken(
                pb::PersonalAccessToken {
                    token: PAT.into(),
                    username: username.clone(),
                    expires_at: None,
                },
            )),
        });
        cases.push((r, Code::InvalidArgument, "username"));
    }
    cases.push((
        register_asana("keep", &fake.base_url, "other-pat", false),
        Code::AlreadyExists,
        "keep",
    ));
    // An authorization-code system cannot be checked before it is connected.
    let mut r = register_asana("k11", &fake.base_url, PAT, true);
    r.kind = pb::SystemKind::Zendesk as i32;
    r.credential = Some(pb::Credential {
        credential: Some(pb::credential::Credential::OauthAuthorizationCode(
            pb::OAuthAuthorizationCode {
                client_id: "c".into(),
                client_secret: "s".into(),
                scopes: vec![],
            },
        )),
    });
    cases.push((r, Code::InvalidArgument, "connected"));

    for (req, code, needle) in cases {
        let e = admin.register_system(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(
            e.message().contains(needle),
            "message '{}' should name '{needle}'",
            e.message()
        );
    }
    // At the limits, and a browser's multi-line description: accepted as given.
    let mut r = register_asana("labels-ok", &fake.base_url, PAT, false);
    r.display_name = "é".repeat(200);
    r.description = format!("line one\r\nline two\tend{}", "d".repeat(3978));
    let (name, description) = (r.display_name.clone(), r.description.clone());
    let stored = admin.register_system(r).await.unwrap().into_inner();
    let stored = stored.system.unwrap();
    assert_eq!(
        (stored.display_name, stored.description),
        (name, description)
    );
    admin
        .delete_system(pb::DeleteSystemRequest {
            system_id: "labels-ok".into(),
        })
        .await
        .unwrap();
    // Missing systems.
    let missing = [
        admin
            .get_system(pb::GetSystemRequest {
                system_id: "nope".into(),
            })
            .await
            .map(|_| ()),
        admin
            .delete_system(pb::DeleteSystemRequest {
                system_id: "nope".into(),
            })
            .await
            .map(|_| ()),
        admin
            .rotate_credential(pb::RotateCredentialRequest {
                system_id: "nope".into(),
                credential: Some(pat("x")),
                skip_check: true,
            })
            .await
            .map(|_| ()),
        admin
            .check_authentication(pb::CheckAuthenticationRequest {
                target: Some(pb::check_authentication_request::Target::SystemId(
                    "nope".into(),
                )),
            })
            .await
            .map(|_| ()),
        admin
            .get_access_token(pb::GetAccessTokenRequest {
                system_id: "nope".into(),
                min_valid_seconds: 0,
                ..Default::default()
            })
            .await
            .map(|_| ()),
    ];
    for r in missing {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().contains("nope"));
    }
    // Wrong credential type on rotate, silly min_valid, bad page token.
    let e = admin
        .rotate_credential(pb::RotateCredentialRequest {
            system_id: "keep".into(),
            credential: Some(pb::Credential {
                credential: Some(pb::credential::Credential::ApiKey(pb::ApiKey {
                    key: "k".into(),
                    expires_at: None,
                })),
            }),
            skip_check: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "keep".into(),
            min_valid_seconds: 10_000_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("min_valid_seconds"));
    let e = admin
        .list_systems(pb::ListSystemsRequest {
            page_size: 0,
            page_token: "%%%".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // An oversized request is refused, not buffered.
    let mut big = register_asana("big", &fake.base_url, PAT, false);
    big.description = "x".repeat(200 * 1024);
    let e = admin.register_system(big).await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{e:?}"
    );
    // The same on GetAccessToken's own route (its request carries caller-chosen strings).
    let e = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "keep".into(),
            rejected_token_id: "x".repeat(200 * 1024),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");

    // Nothing stored changed.
    let after = admin
        .get_system(pb::GetSystemRequest {
            system_id: "keep".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before, after);
    let list = admin
        .list_systems(pb::ListSystemsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.systems.len(), 1);
    let tok = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "keep".into(),
            min_valid_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tok.headers[0].value, format!("Bearer {PAT}"));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_checks_first_and_keeps_old_credential_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let fake = asana_with_user().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(register_asana("rot", &fake.base_url, PAT, true))
        .await
        .unwrap();
    let first = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "rot".into(),
            min_valid_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    // A new PAT Asana does not know: refused, old one keeps serving.
    let e = admin
        .rotate_credential(pb::RotateCredentialRequest {
            system_id: "rot".into(),
            credential: Some(pat("bad-new-pat-77")),
            skip_check: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("invalid_credentials"),
        "{}",
        e.message()
    );
    assert!(!e.message().contains("bad-new-pat-77"));
    let still = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "rot".into(),
            min_valid_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.headers[0].value, format!("Bearer {PAT}"));
    assert_eq!(still.credential_version, 1);

    // A good one replaces it at once.
    let new_pat = "asana-pat-new-42aa";
    fake.add_user(new_pat, "1201", "Proxy User", "proxy@example.com");
    let resp = admin
        .rotate_credential(pb::RotateCredentialRequest {
            system_id: "rot".into(),
            credential: Some(pat(new_pat)),
            skip_check: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.check.unwrap().ok);
    assert_eq!(resp.system.unwrap().credential_version, 2);
    let next = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "rot".into(),
            min_valid_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.headers[0].value, format!("Bearer {new_pat}"));
    assert_eq!(next.credential_version, 2);
    assert_ne!(next.token_id, first.token_id);

    // skip_check rotates without asking upstream.
    let calls = fake.me_calls();
    admin
        .rotate_credential(pb::RotateCredentialRequest {
            system_id: "rot".into(),
            credential: Some(pat("unchecked-pat")),
            skip_check: true,
        })
        .await
        .unwrap();
    assert_eq!(fake.me_calls(), calls);
    let v3 = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "rot".into(),
            min_valid_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v3.credential_version, 3);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asana_check_classifies_upstream_answers() {
    let dir = tempfile::tempdir().unwrap();
    let fake = asana_with_user().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let candidate = |token: &str| pb::CheckAuthenticationRequest {
        target: Some(pb::check_authentication_request::Target::Candidate(
            pb::CandidateSystem {
                kind: pb::SystemKind::Asana as i32,
                base_url: fake.base_url.clone(),
                credential: Some(pat(token)),
            },
        )),
    };
    use credbroker::pb::AuthFailure as F;
    let cases = [
        (Mode::Normal, "unknown-pat", F::InvalidCredentials, "401"),
        (Mode::RateLimited, PAT, F::RateLimited, "30 s"),
        (Mode::ServerError, PAT, F::UpstreamError, "503"),
        (Mode::Garbage, PAT, F::Misconfigured, "base URL"),
        (
            Mode::PaymentRequired,
            PAT,
            F::InsufficientPermissions,
            "premium",
        ),
        (Mode::Hang, PAT, F::Unreachable, "timed out"),
    ];
    for (mode, token, failure, needle) in cases {
        fake.set_mode(mode);
        let check = admin
            .check_authentication(candidate(token))
            .await
            .unwrap()
            .into_inner()
            .check
            .unwrap();
        assert!(!check.ok, "{mode:?} reported ok");
        assert_eq!(check.failure, failure as i32, "{mode:?}: {}", check.message);
        assert!(
            check.message.contains(needle),
            "{mode:?}: '{}' lacks '{needle}'",
            check.message
        );
        assert!(!check.message.contains(token));
    }
    fake.set_mode(Mode::Normal);
    let ok = admin
        .check_authentication(candidate(PAT))
        .await
        .unwrap()
        .into_inner()
        .check
        .unwrap();
    assert!(ok.ok);

    // register with check=true and a failing credential saves nothing.
    let e = admin
        .register_system(register_asana("nope", &fake.base_url, "unknown-pat", true))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("nothing was saved"));
    let e = admin
        .get_system(pb::GetSystemRequest {
            system_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // A stored system's check is recorded in System.last_check.
    admin
        .register_system(register_asana("stored", &fake.base_url, PAT, false))
        .await
        .unwrap();
    fake.revoke(PAT);
    let check = admin
        .check_authentication(pb::CheckAuthenticationRequest {
            target: Some(pb::check_authentication_request::Target::SystemId(
                "stored".into(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .check
        .unwrap();
    assert_eq!(check.failure, F::InvalidCredentials as i32);
    let sys = admin
        .get_system(pb::GetSystemRequest {
            system_id: "stored".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .system
        .unwrap();
    assert_eq!(
        sys.last_check.unwrap().failure,
        F::InvalidCredentials as i32
    );
    assert!(fake.unexpected().is_empty(), "{:?}", fake.unexpected());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_delete_and_generated_ids() {
    let dir = tempfile::tempdir().unwrap();
    let fake = asana_with_user().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    for i in 0..5 {
        admin
            .register_system(register_asana(
                &format!("sys-{i}"),
                &fake.base_url,
                PAT,
                false,
            ))
            .await
            .unwrap();
    }
    let generated = admin
        .register_system(register_asana("", &fake.base_url, PAT, false))
        .await
        .unwrap()
        .into_inner()
        .system
        .unwrap();
    assert!(
        generated.system_id.starts_with("asana-"),
        "{}",
        generated.system_id
    );

    let mut ids = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = admin
            .list_systems(pb::ListSystemsRequest {
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.systems.len() <= 2);
        ids.extend(page.systems.into_iter().map(|s| s.system_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    assert_eq!(ids.len(), 6);

    admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "sys-0".into(),
            min_valid_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .delete_system(pb::DeleteSystemRequest {
            system_id: "sys-0".into(),
        })
        .await
        .unwrap();
    let e = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "sys-0".into(),
            min_valid_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pat_expiry_is_kept_reported_and_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let fake = asana_with_user().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let now = credbroker::model::unix_now() as i64;
    let mut req = register_asana("exp", &fake.base_url, PAT, false);
    if let Some(pb::credential::Credential::PersonalAccessToken(p)) =
        req.credential.as_mut().and_then(|c| c.credential.as_mut())
    {
        p.expires_at = Some(prost_types::Timestamp {
            seconds: now + 600,
            nanos: 0,
        });
    }
    let sys = admin
        .register_system(req)
        .await
        .unwrap()
        .into_inner()
        .system
        .unwrap();
    assert_eq!(sys.credential_expires_at.unwrap().seconds, now + 600);
    let tok = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "exp".into(),
            min_valid_seconds: 60,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        tok.expires_at.unwrap().seconds <= now + 600,
        "headers must not outlive the PAT"
    );
    let e = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "exp".into(),
            min_valid_seconds: 3600,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    broker.stop().await;
}

/// The identity a check reports is the vendor's text: it is stored and sent with events, so a
/// vendor's huge or hostile name comes back cut short, with nothing hidden in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vendors_hostile_identity_is_cut_to_what_can_be_shown() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAsana::start().await;
    let name = format!("Mallory\u{202E}\r\nX: 1{}", "m".repeat(100_000));
    fake.add_user(PAT, "1201", &name, "mallory@example.com");
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let r = admin
        .register_system(register_asana("odd", &fake.base_url, PAT, true))
        .await
        .unwrap()
        .into_inner();
    let identity = r.check.unwrap().identity.unwrap();
    assert!(
        identity.display_name.starts_with("MalloryX: 1mmm")
            && identity.display_name.chars().count() == 200,
        "{}",
        identity.display_name
    );
    assert_eq!(identity.email, "mallory@example.com");
    broker.stop().await;
}
