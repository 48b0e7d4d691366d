//! Crash safety: concurrent RegisterSystem / RotateCredential / OAuth refresh load (ServiceNow
//! and Jira Cloud, both rotating their refresh tokens) against the real binary,
//! `kill -9` at a seeded random moment, restart on the same data directory, and check that every
//! acknowledged write is there and decrypts to exactly what was sent, that unacknowledged writes
//! are whole or absent, and that the startup integrity check finds zero errors.
//!
//! CI runs `CREDBROKER_CRASH_ROUNDS` rounds (default 3); `scripts/crash-test.sh` runs the long
//! variant (docs/benchmarks.md, "Crash test").

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use credbroker::pb;
use rand::{Rng, SeedableRng};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::*;

/// What the store must hold for one system id.
#[derive(Debug, Default, Clone)]
struct Expect {
    /// The last acknowledged credential (None: the registration itself was not acknowledged).
    acked: Option<String>,
    /// Values sent without an acknowledgement (the write was in flight at the kill).
    maybe: Vec<String>,
}

type Model = Arc<Mutex<HashMap<String, Expect>>>;

fn rounds() -> u64 {
    std::env::var("CREDBROKER_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// One writer: registers its own systems and rotates them, recording what was acknowledged,
/// until the server dies under it.
async fn writer(mut c: Client, base: String, model: Model, round: u64, task: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut mine: Vec<String> = Vec::new();
    for n in 0u64.. {
        let rotate = !mine.is_empty() && rng.gen_bool(0.5);
        if rotate {
            let id = mine[rng.gen_range(0..mine.len())].clone();
            let value = format!("rot-{round}-{task}-{n}");
            model
                .lock()
                .unwrap()
                .get_mut(&id)
                .unwrap()
                .maybe
                .push(value.clone());
            let r = c
                .rotate_credential(pb::RotateCredentialRequest {
                    system_id: id.clone(),
                    credential: Some(pat(&value)),
                    skip_check: true,
                })
                .await;
            if r.is_err() {
                return;
            }
            let mut m = model.lock().unwrap();
            let e = m.get_mut(&id).unwrap();
            e.acked = Some(value);
            e.maybe.clear();
        } else {
            let id = format!("c{round}-{task}-{n}");
            let value = format!("pat-{round}-{task}-{n}");
            model.lock().unwrap().insert(
                id.clone(),
                Expect {
                    acked: None,
                    maybe: vec![value.clone()],
                },
            );
            let r = c
                .register_system(register_asana(&id, &base, &value, false))
                .await;
            if r.is_err() {
                return;
            }
            let mut m = model.lock().unwrap();
            let e = m.get_mut(&id).unwrap();
            e.acked = Some(value);
            e.maybe.clear();
            mine.push(id);
        }
    }
}

/// Polls the child's log for the integrity check's verdict.
async fn integrity_verdict(proc: &BrokerProcess) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = proc.log();
        if let Some(v) = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("Store integrity check"))
            })
        {
            return v;
        }
        assert!(Instant::now() < deadline, "no integrity verdict in:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Registers "oauth-jira" and connects it through the fake's consent page.
async fn connect_jira(admin: &mut Client) {
    use crate::connect::{authz_code, browse, register, start, JIRA_CLIENT, JIRA_SECRET};
    admin
        .register_system(register(
            "oauth-jira",
            pb::SystemKind::JiraCloud,
            "https://acme.atlassian.net/",
            authz_code(JIRA_CLIENT, JIRA_SECRET),
        ))
        .await
        .unwrap();
    let s = start(admin, "oauth-jira").await;
    assert_eq!(browse(&s.authorize_url).await.1, 200);
}

/// Both rotating grants still work (after a restart nothing is cached, so this refreshes with
/// the stored refresh token), and neither vendor saw a revoked refresh token.
async fn grants_survived(
    admin: &mut Client,
    sn: &FakeServiceNow,
    jira: &FakeAtlassian,
    round: u64,
) {
    for id in ["oauth-sn", "oauth-jira"] {
        let t = admin
            .get_access_token(pb::GetAccessTokenRequest {
                system_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("round {round}: {id}: OAuth grant lost: {e:?}"));
        assert!(t.into_inner().headers[0].value.starts_with("Bearer "));
    }
    assert_eq!(
        sn.reuse_detected(),
        0,
        "round {round}: ServiceNow saw a revoked refresh token"
    );
    assert_eq!(
        jira.reuse_detected(),
        0,
        "round {round}: Jira saw a revoked refresh token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_write_load_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    // Registrations are unchecked: the fake only serves the base URL.
    let fake = FakeAsana::start().await;
    // One OAuth system whose 1 s access tokens are refreshed all through the run, against a
    // fake that rotates the refresh token on every refresh and revokes the family on reuse,
    // except (Atlassian's leeway) the one token rotated out last, presented once.
    let sn = crate::oauth::servicenow(1).await;
    sn.oauth(|o| {
        o.rotate = true;
        o.leeway = true;
    });
    let first_rt = sn.issue_refresh_token(crate::oauth::USER);
    // And Jira Cloud itself (rotating refresh tokens with Atlassian's reuse leeway), connected
    // through its consent page, with 1 s access tokens.
    let jira = crate::connect::atlassian().await;
    jira.oauth(|o| {
        o.rotate = true;
        o.leeway = true;
        o.access_lifetime = 1;
    });
    let jira_env = [
        ("CREDBROKER_JIRA_AUTH_URL", jira.origin.as_str()),
        ("CREDBROKER_JIRA_API_URL", jira.origin.as_str()),
    ];
    let model: Model = Arc::default();
    let mut total_acked = 0usize;
    for round in 0..rounds() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(round);
        let proc = spawn_process(
            dir.path(),
            &logs.path().join(format!("{round}.log")),
            &jira_env,
        )
        .unwrap();
        wait_for_health(proc.addr, ServingStatus::Serving).await;
        let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
        let mut admin = client(proc.addr, Some(token.trim())).await;
        if round == 0 {
            admin
                .register_system(crate::oauth::sn_register(
                    "oauth-sn",
                    &sn.base_url,
                    crate::oauth::refresh_cred(&first_rt),
                    false,
                ))
                .await
                .unwrap();
            connect_jira(&mut admin).await;
        }
        grants_survived(&mut admin, &sn, &jira, round).await;

        // Verify what the previous rounds left behind, then settle the model on what is there.
        if round > 0 {
            let verdict = integrity_verdict(&proc).await;
            assert_eq!(verdict["errors"], 0, "round {round}: {verdict}");
            let mut m = model.lock().unwrap().clone();
            for (id, e) in m.iter_mut() {
                let got = admin
                    .get_access_token(pb::GetAccessTokenRequest {
                        system_id: id.clone(),
                        ..Default::default()
                    })
                    .await;
                match got {
                    Ok(t) => {
                        let t = t.into_inner();
                        let value = t.headers[0]
                            .value
                            .strip_prefix("Bearer ")
                            .unwrap()
                            .to_owned();
                        assert!(
                            e.acked.as_deref() == Some(value.as_str()) || e.maybe.contains(&value),
                            "round {round}: {id} holds {value}, expected {e:?}"
                        );
                        e.acked = Some(value);
                        e.maybe.clear();
                    }
                    Err(s) => {
                        assert_eq!(
                            s.code(),
                            tonic::Code::NotFound,
                            "round {round}: {id}: {s:?}"
                        );
                        assert!(
                            e.acked.is_none(),
                            "round {round}: acknowledged {id} is gone"
                        );
                        e.maybe.clear();
                    }
                }
            }
            m.retain(|_, e| e.acked.is_some());
            total_acked = m.len();
            *model.lock().unwrap() = m;
        }

        let mut tasks = Vec::new();
        for task in 0..4u64 {
            let c = client(proc.addr, Some(token.trim())).await;
            tasks.push(tokio::spawn(writer(
                c,
                fake.base_url.clone(),
                model.clone(),
                round,
                task,
                round * 100 + task,
            )));
        }
        for id in ["oauth-sn", "oauth-sn", "oauth-jira"] {
            let mut c = client(proc.addr, Some(token.trim())).await;
            tasks.push(tokio::spawn(async move {
                while let Ok(t) = c
                    .get_access_token(pb::GetAccessTokenRequest {
                        system_id: id.into(),
                        ..Default::default()
                    })
                    .await
                {
                    assert!(t.into_inner().headers[0].value.starts_with("Bearer "));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        // The crash moment is the point of the test, not a readiness wait.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..600))).await;
        proc.signal("KILL");
        for t in tasks {
            t.await.unwrap();
        }
        drop(proc);
    }
    // The final restart is verified the same way.
    let proc = spawn_process(dir.path(), &logs.path().join("final.log"), &jira_env).unwrap();
    wait_for_health(proc.addr, ServingStatus::Serving).await;
    let verdict = integrity_verdict(&proc).await;
    assert_eq!(verdict["errors"], 0, "{verdict}");
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let mut admin = client(proc.addr, Some(token.trim())).await;
    admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "oauth-sn".into(),
            ..Default::default()
        })
        .await
        .expect("the OAuth grant survived every kill");
    grants_survived(&mut admin, &sn, &jira, rounds()).await;
    // A kill between the vendor issuing a new refresh token and the broker saving it is the one
    // case that presents the previous token again: at most once per kill.
    assert!(
        jira.token_calls() as u64 > rounds(),
        "Jira was not refreshed during the run"
    );
    for (vendor, reuses) in [
        ("ServiceNow", sn.leeway_reuses()),
        ("Jira", jira.leeway_reuses()),
    ] {
        assert!(
            reuses as u64 <= rounds(),
            "{vendor}: {reuses} leeway reuses in {} kills",
            rounds()
        );
    }
    let m = model.lock().unwrap().clone();
    let mut present = 0;
    for (id, e) in &m {
        match admin
            .get_access_token(pb::GetAccessTokenRequest {
                system_id: id.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(t) => {
                let v = t.into_inner().headers[0].value.clone();
                let v = v.strip_prefix("Bearer ").unwrap();
                assert!(
                    e.acked.as_deref() == Some(v) || e.maybe.iter().any(|x| x == v),
                    "{id} holds {v}, expected {e:?}"
                );
                present += 1;
            }
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::NotFound, "{id}: {s:?}");
                assert!(e.acked.is_none(), "acknowledged {id} is gone");
            }
        }
    }
    assert!(
        present > total_acked && present > 0,
        "the load wrote nothing ({present} present)"
    );
    assert_eq!(verdict["systems"], present as u64 + 2, "{verdict}");
    println!(
        "crash test: {} rounds, {present} systems verified, token calls ServiceNow {} / Jira {}, leeway reuses ServiceNow {} / Jira {}, 0 refresh tokens lost",
        rounds(),
        sn.token_calls(),
        jira.token_calls(),
        sn.leeway_reuses(),
        jira.leeway_reuses()
    );
}

/// A master-key rotation whose re-wrap is cut by kill -9 (the store slowed so that the kill
/// lands inside it): after a restart the re-wrap resumes and finishes, every credential decrypts
/// to what was stored, and the startup integrity check finds nothing wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_key_rotation_loses_nothing() {
    const N: usize = 120;
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let fake = FakeAsana::start().await;
    let proc = spawn_process(dir.path(), &logs.path().join("1.log"), &[]).unwrap();
    wait_for_health(proc.addr, ServingStatus::Serving).await;
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let mut admin = client(proc.addr, Some(token.trim())).await;
    for i in 0..N {
        admin
            .register_system(register_asana(
                &format!("kr{i:03}"),
                &fake.base_url,
                &format!("kr-pat-{i:03}"),
                false,
            ))
            .await
            .unwrap();
    }
    drop(admin);
    assert_eq!(proc.stop().await, Some(0));

    // Slowed: the re-wrap of N records takes seconds; kill -9 right after the rotation answers.
    let proc = spawn_process(
        dir.path(),
        &logs.path().join("2.log"),
        &[("CREDBROKER_TEST_STORE_LATENCY_MS", "10")],
    )
    .unwrap();
    wait_for_health(proc.addr, ServingStatus::Serving).await;
    let mut admin = client(proc.addr, Some(token.trim())).await;
    let new_key = rotate_and_wait_for_rewrap_under_way(&mut admin).await;
    proc.signal("KILL");
    drop(proc);
    let (on_new, total) = crate::store_conformance::records_on_key(dir.path(), &new_key).await;
    assert_eq!(total, N);
    assert!(
        0 < on_new && on_new < N,
        "{on_new} of {N} re-wrapped at the kill"
    );

    let proc = spawn_process(dir.path(), &logs.path().join("3.log"), &[]).unwrap();
    wait_for_health(proc.addr, ServingStatus::Serving).await;
    let verdict = integrity_verdict(&proc).await;
    assert_eq!(verdict["errors"], 0, "{verdict}");
    let mut admin = client(proc.addr, Some(token.trim())).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = admin
            .get_key_status(pb::GetKeyStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.primary_key_id == new_key && s.records_on_primary == s.records_total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the re-wrap did not resume: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..N {
        let t = admin
            .get_access_token(pb::GetAccessTokenRequest {
                system_id: format!("kr{i:03}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(t.headers[0].value, format!("Bearer kr-pat-{i:03}"));
    }
    println!(
        "key rotation cut by kill -9 with {on_new} of {N} records re-wrapped; resumed, all decrypt"
    );
    drop(admin);
    assert_eq!(proc.stop().await, Some(0));
}
