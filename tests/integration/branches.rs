//! Branches no other test reaches: a store that fails in the middle of a rotating refresh, the
//! global cap on concurrent refreshes, and warm tokens served with the store gone.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use credbroker::pb;
use credbroker::store::faulty::{FaultControl, FaultyStore};
use tonic::Code;

use crate::oauth::{refresh_cred, servicenow, sn_register, USER};
use crate::support::*;

fn wrap(control: &Arc<FaultControl>) -> credbroker::server::StoreWrapper {
    let control = control.clone();
    Box::new(move |inner| Arc::new(FaultyStore::new(inner, control.clone())))
}

fn req(id: &str, rejected: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        system_id: id.into(),
        rejected_token_id: rejected.into(),
        ..Default::default()
    }
}

/// The vendor rotated the refresh token but the store refuses the write: nothing is handed out
/// (a token whose grant is not durable would outlive a restart's memory), and once the store is
/// back the grant works without the rotated-out refresh token ever being presented again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failure_mid_rotation_hands_out_nothing_and_keeps_the_grant() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, mut admin, fake, first) = rotated_on_a_full_disk(dir.path(), "rot").await;
    let next = admin
        .get_access_token(req("rot", &first))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(next.token_id, first);
    assert!(next.headers[0].value.starts_with("Bearer "));
    assert_eq!(
        fake.reuse_detected(),
        0,
        "a rotated-out refresh token was presented"
    );
    // And it is durable: after a restart the stored grant refreshes.
    broker.stop().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let after = admin
        .get_access_token(req("rot", &next.token_id))
        .await
        .unwrap()
        .into_inner();
    assert!(after.headers[0].value.starts_with("Bearer "));
    assert_eq!(
        fake.reuse_detected(),
        0,
        "the stored refresh token was a stale one"
    );
    broker.stop().await;
}

/// A broker on a store that can fail, with ServiceNow system `id` (its vendor turns refresh
/// tokens over) and a token handed out; then a refresh the vendor answered while the disk was
/// full, so the rotated refresh token lives only in memory: nothing was handed out for it. The
/// disk is back when this returns. Also returns the first token's id.
async fn rotated_on_a_full_disk(
    dir: &std::path::Path,
    id: &str,
) -> (TestBroker, Client, crate::fakes::FakeServiceNow, String) {
    let control = Arc::new(FaultControl::default());
    let fake = servicenow(1800).await;
    fake.oauth(|o| o.rotate = true);
    let rt = fake.issue_refresh_token(USER);
    let broker = TestBroker::start_wrapped(test_config(dir), wrap(&control)).await;
    let mut admin = broker.admin().await;
    let reg = sn_register(id, &fake.base_url, refresh_cred(&rt), false);
    admin.register_system(reg).await.unwrap();
    let first = admin.get_access_token(req(id, "")).await.unwrap();
    let first = first.into_inner().token_id;
    control.disk_full.store(true, Ordering::SeqCst);
    let calls = fake.token_calls();
    let refused = admin.get_access_token(req(id, &first)).await.unwrap_err();
    assert_eq!(
        fake.token_calls(),
        calls + 1,
        "the vendor rotated the grant"
    );
    assert!(
        matches!(refused.code(), Code::ResourceExhausted | Code::Unavailable),
        "{refused:?}"
    );
    control.heal();
    (broker, admin, fake, first)
}

/// A rotated refresh token the store refused is stored at a stop that comes before the
/// background retry: the restarted broker refreshes with it, never the rotated-out one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_stores_the_rotated_refresh_token_the_store_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _, fake, first) = rotated_on_a_full_disk(dir.path(), "rot-stop").await;
    // The disk is back, and the broker stops at once (its retry waits a second first).
    broker.stop().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let after = admin.get_access_token(req("rot-stop", &first)).await;
    let after = after.unwrap().into_inner();
    assert!(after.headers[0].value.starts_with("Bearer "));
    assert_eq!(
        fake.reuse_detected(),
        0,
        "a rotated-out refresh token was presented"
    );
    broker.stop().await;
}

/// A restore that finds the system present leaves its refresh state alone: the rotated
/// refresh token the store refused is still stored (at the stop) and used after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_skips_a_system_keeps_its_unstored_refresh_token() {
    use crate::backup::{ctl, ok_json};
    let dir = tempfile::tempdir().unwrap();
    let (broker, _, fake, first) = rotated_on_a_full_disk(dir.path(), "rot-kept").await;
    let file = dir.path().join("kept.backup");
    let f = file.to_str().unwrap().to_owned();
    ok_json(&tokio::task::block_in_place(|| {
        ctl(&broker, &["backup", "--out", &f])
    }));
    let restored = ok_json(&tokio::task::block_in_place(|| {
        ctl(&broker, &["restore", "--in", &f])
    }));
    assert_eq!(restored["systems_skipped"], 1, "{restored}");
    broker.stop().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let after = admin.get_access_token(req("rot-kept", &first)).await;
    assert!(after.is_ok(), "{after:?}");
    assert_eq!(
        fake.reuse_detected(),
        0,
        "a rotated-out refresh token was presented"
    );
    broker.stop().await;
}

/// A registration checked while the store refuses writes: the first one (writes not yet known
/// to fail) has the vendor turn the refresh token over and says the given one may be spent;
/// once writes are known to fail, a checked registration or rotation is refused before the
/// vendor is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_is_not_run_while_its_new_refresh_token_could_not_be_kept() {
    let dir = tempfile::tempdir().unwrap();
    let control = Arc::new(FaultControl::default());
    let fake = servicenow(1800).await;
    fake.oauth(|o| o.rotate = true);
    let broker = TestBroker::start_wrapped(test_config(dir.path()), wrap(&control)).await;
    let mut admin = broker.admin().await;
    // A check that fails after the vendor turned the refresh token over says so too.
    fake.set_access(USER, &[], false, false);
    let lost = fake.issue_refresh_token(USER);
    let reg = sn_register("no-roles", &fake.base_url, refresh_cred(&lost), true);
    let e = admin.register_system(reg).await.unwrap_err();
    assert!(e.message().contains("may be spent"), "{e:?}");
    fake.set_access(USER, crate::fakes::SN_ALL_ROLES, true, true);
    let kept = fake.issue_refresh_token(USER);
    let reg = sn_register("kept", &fake.base_url, refresh_cred(&kept), true);
    admin.register_system(reg).await.unwrap();
    control.disk_full.store(true, Ordering::SeqCst);
    let calls = fake.token_calls();
    let rt = fake.issue_refresh_token(USER);
    let reg = sn_register("spent", &fake.base_url, refresh_cred(&rt), true);
    let e = admin.register_system(reg.clone()).await.unwrap_err();
    assert_eq!(fake.token_calls(), calls + 1);
    assert!(e.message().contains("may be spent"), "{e:?}");
    let e = admin.register_system(reg).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("retry once writes recover"), "{e:?}");
    let rotate = pb::RotateCredentialRequest {
        system_id: "kept".into(),
        credential: Some(refresh_cred(&fake.issue_refresh_token(USER))),
        skip_check: false,
    };
    let e = admin.rotate_credential(rotate).await.unwrap_err();
    assert!(e.message().contains("retry once writes recover"), "{e:?}");
    assert_eq!(fake.token_calls(), calls + 1, "the vendor was asked again");
    assert!(!e.message().contains(&rt) && !e.message().contains(&kept));
    broker.stop().await;
}

/// `max_concurrent_refreshes` holds across systems: with a cap of 2 and a vendor that takes
/// 400 ms, a third token request reaches the vendor only after one of two before it was
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refresh_concurrency_cap_holds_across_systems() {
    const DELAY: Duration = Duration::from_millis(400);
    let dir = tempfile::tempdir().unwrap();
    let fake = servicenow(1800).await;
    let mut config = test_config(dir.path());
    config.refresh.max_concurrent = 2;
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    for i in 0..6 {
        let rt = fake.issue_refresh_token(USER);
        admin
            .register_system(sn_register(
                &format!("cap-{i}"),
                &fake.base_url,
                refresh_cred(&rt),
                false,
            ))
            .await
            .unwrap();
    }
    fake.oauth(|o| o.token_delay = DELAY);
    let before = fake.token_calls();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let mut c = admin.clone();
        tasks.push(tokio::spawn(async move {
            c.get_access_token(req(&format!("cap-{i}"), "")).await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().is_ok());
    }
    let mut arrived = fake.token_call_times()[before..].to_vec();
    assert_eq!(arrived.len(), 6);
    arrived.sort();
    // Two at once are allowed (the cap is 2, not 1)…
    assert!(
        arrived[1].duration_since(arrived[0]) < DELAY,
        "the first two refreshes did not run together"
    );
    for w in arrived.windows(3) {
        // …three are not: the vendor answers DELAY after a request arrives; only then is a slot
        // free.
        assert!(
            w[2].duration_since(w[0]) >= DELAY - Duration::from_millis(20),
            "three token requests in flight at once"
        );
    }
    broker.stop().await;
}

/// A warm `GetAccessToken` is served from memory: with every store operation failing, cached
/// static headers and OAuth tokens are still handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_tokens_are_served_with_every_store_operation_failing() {
    let dir = tempfile::tempdir().unwrap();
    let control = Arc::new(FaultControl::default());
    let asana = FakeAsana::start().await;
    let fake = servicenow(1800).await;
    let rt = fake.issue_refresh_token(USER);
    let broker = TestBroker::start_wrapped(test_config(dir.path()), wrap(&control)).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(register_asana(
            "warm-static",
            &asana.base_url,
            "warm-pat",
            false,
        ))
        .await
        .unwrap();
    admin
        .register_system(sn_register(
            "warm-oauth",
            &fake.base_url,
            refresh_cred(&rt),
            false,
        ))
        .await
        .unwrap();
    admin
        .register_system(register_asana(
            "cold-static",
            &asana.base_url,
            "cold-pat",
            false,
        ))
        .await
        .unwrap();
    // A worker scoped by kind too: its kind check must come from memory as well.
    let scoped = admin
        .create_caller(pb::CreateCallerRequest {
            name: "warm-worker".into(),
            role: pb::CallerRole::Worker as i32,
            kinds: vec![
                pb::SystemKind::Asana as i32,
                pb::SystemKind::Servicenow as i32,
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut worker = client(broker.addr, Some(&scoped)).await;
    let mut warm = Vec::new();
    for id in ["warm-static", "warm-oauth"] {
        warm.push(
            admin
                .get_access_token(req(id, ""))
                .await
                .unwrap()
                .into_inner(),
        );
    }

    control.fail_reads.store(true, Ordering::SeqCst);
    control.fail_permille.store(1000, Ordering::SeqCst);
    let injected = control.injected.load(Ordering::SeqCst);
    for (id, earlier) in ["warm-static", "warm-oauth"].iter().zip(&warm) {
        for _ in 0..20 {
            let t = admin
                .get_access_token(req(id, ""))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(t.token_id, earlier.token_id, "{id}");
            let t = worker
                .get_access_token(req(id, ""))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(t.token_id, earlier.token_id, "{id}, kind-scoped worker");
        }
    }
    assert_eq!(
        control.injected.load(Ordering::SeqCst),
        injected,
        "a warm call touched the store"
    );
    // The store really is failing: a cold read fails.
    let cold = admin
        .get_system(pb::GetSystemRequest {
            system_id: "warm-static".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(cold.code(), Code::Unavailable, "{cold:?}");
    // A kind-scoped worker's first call for a system not in memory: the store cannot say its
    // kind, so UNAVAILABLE (retry), not PERMISSION_DENIED (which a worker takes for good).
    let cold = worker.get_access_token(req("cold-static", "")).await;
    assert_eq!(cold.unwrap_err().code(), Code::Unavailable);
    control.heal();
    broker.stop().await;
}
