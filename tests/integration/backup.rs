//! `credbrokerctl backup` / `restore` (docs/operations.md, Backup): an online export under load,
//! restored into an empty broker with the same master key; the file holds no plaintext; bad,
//! truncated or foreign backups change nothing.

use std::collections::HashMap;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use credbroker::pb;
use serde_json::Value;
use tonic::Code;

use crate::support::*;

pub(crate) fn ctl(broker: &TestBroker, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_credbrokerctl"))
        .args(["--output", "json"])
        .args(args)
        .env("CREDBROKER_ADDR", broker.addr.to_string())
        .env("CREDBROKER_TOKEN", &broker.admin_token)
        .env_remove("CREDBROKER_TOKEN_FILE")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

pub(crate) fn ok_json(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

async fn count(c: &mut Client) -> usize {
    let mut n = 0;
    let mut page_token = String::new();
    loop {
        let r = c
            .list_systems(pb::ListSystemsRequest {
                page_size: 500,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        n += r.systems.len();
        if r.next_page_token.is_empty() {
            return n;
        }
        page_token = r.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_load_restores_into_an_empty_broker_and_refuses_bad_files() {
    let root = tempfile::tempdir().unwrap();
    let (dir_a, dir_b, dir_c) = (
        root.path().join("a"),
        root.path().join("b"),
        root.path().join("c"),
    );
    let asana = FakeAsana::start().await;
    let a = TestBroker::start(&dir_a).await;
    let mut admin_a = a.admin().await;

    let mut secrets = HashMap::new();
    for i in 0..120 {
        let id = format!("sys-{i:03}");
        let secret = format!("backup-canary-{i}-Q7wz");
        admin_a
            .register_system(register_asana(&id, &asana.base_url, &secret, false))
            .await
            .unwrap();
        secrets.insert(id, secret);
    }
    let worker = admin_a
        .create_caller(pb::CreateCallerRequest {
            name: "worker-1".into(),
            role: pb::CallerRole::Worker as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;

    // Load while the export runs: token reads and new registrations.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for w in 0..2 {
        let mut c = a.admin().await;
        let (stop, served, base) = (stop.clone(), served.clone(), asana.base_url.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let h = auth_header(&mut c, &format!("sys-{:03}", n % 120))
                    .await
                    .unwrap();
                assert!(h.starts_with("Bearer backup-canary-"));
                served.fetch_add(1, Ordering::Relaxed);
                if n % 10 == 0 {
                    c.register_system(register_asana(
                        &format!("during-{w}-{n}"),
                        &base,
                        &format!("during-canary-{w}-{n}"),
                        false,
                    ))
                    .await
                    .unwrap();
                }
            }
        }));
    }
    let file = root.path().join("broker.backup");
    let f = file.to_str().unwrap().to_owned();
    let out = tokio::task::block_in_place(|| ctl(&a, &["backup", "--out", &f]));
    let summary = ok_json(&out);
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert!(
        served.load(Ordering::Relaxed) > 0,
        "load ran during the export"
    );
    assert!(summary["chunks"].as_u64().unwrap() >= 3, "{summary}");

    // No plaintext: neither secrets nor system ids nor caller names appear in the file.
    let bytes = std::fs::read(&file).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    for needle in ["canary", "sys-0", "worker-1", "Asana", &asana.base_url] {
        assert!(!text.contains(needle), "backup holds '{needle}' in clear");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    // An existing file is never overwritten.
    let again = tokio::task::block_in_place(|| ctl(&a, &["backup", "--out", &f]));
    assert!(!again.status.success());
    assert_eq!(std::fs::read(&file).unwrap(), bytes);

    // Restore into an empty broker that loads A's master key.
    let mut config_b = test_config(&dir_b);
    config_b.store.master_key_file = Some(dir_a.join("master.key"));
    let b = TestBroker::start_with(config_b).await;
    let mut admin_b = b.admin().await;
    let restored = ok_json(&tokio::task::block_in_place(|| {
        ctl(&b, &["restore", "--in", &f])
    }));
    assert!(
        restored["systems_restored"].as_u64().unwrap() >= 120,
        "{restored}"
    );
    assert_eq!(restored["systems_skipped"], 0);
    assert_eq!(restored["callers_restored"], 1, "worker-1");
    assert_eq!(
        restored["callers_skipped"], 1,
        "B's own bootstrap admin stays"
    );
    for (id, secret) in &secrets {
        assert_eq!(
            auth_header(&mut admin_b, id).await.unwrap(),
            format!("Bearer {secret}")
        );
    }
    // A's worker token works on B.
    let mut w = client(b.addr, Some(&worker)).await;
    assert_eq!(
        auth_header(&mut w, "sys-007").await.unwrap(),
        "Bearer backup-canary-7-Q7wz"
    );
    let n_b = count(&mut admin_b).await;
    assert_eq!(n_b as u64, restored["systems_restored"].as_u64().unwrap());

    // Restoring twice changes nothing.
    let twice = ok_json(&tokio::task::block_in_place(|| {
        ctl(&b, &["restore", "--in", &f])
    }));
    assert_eq!(twice["systems_restored"], 0);
    assert_eq!(twice["systems_skipped"].as_u64().unwrap() as usize, n_b);

    // A tampered chunk and a truncated file are refused before anything is written.
    admin_b
        .delete_system(pb::DeleteSystemRequest {
            system_id: "sys-000".into(),
        })
        .await
        .unwrap();
    let lines: Vec<&str> = std::str::from_utf8(&bytes).unwrap().lines().collect();
    let mut tampered = lines.clone();
    let mut raw = base64_decode(tampered[1]);
    let mid = raw.len() / 2;
    raw[mid] ^= 1;
    let flipped = base64_encode(&raw);
    tampered[1] = &flipped;
    let truncated = &lines[..lines.len() - 1];
    for (name, content) in [
        ("tampered", tampered.join("\n")),
        ("truncated", truncated.join("\n")),
    ] {
        let path = root.path().join(name);
        std::fs::write(&path, content).unwrap();
        let o =
            tokio::task::block_in_place(|| ctl(&b, &["restore", "--in", path.to_str().unwrap()]));
        assert!(!o.status.success(), "{name} backup was accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("InvalidArgument") || err.contains("invalid"),
            "{name}: {err}"
        );
        assert!(!err.contains("canary"));
    }
    assert_eq!(
        auth_header(&mut admin_b, "sys-000")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(count(&mut admin_b).await, n_b - 1);

    // A broker under another master key cannot read it.
    let c = TestBroker::start(&dir_c).await;
    let o = tokio::task::block_in_place(|| ctl(&c, &["restore", "--in", &f]));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("another master key"));
    assert_eq!(count(&mut c.admin().await).await, 0);

    c.stop().await;
    b.stop().await;
    a.stop().await;
}

/// Credentials of a few kilobytes each (a JWT bearer's private key, a certificate) fill a
/// chunk well past the 64 KiB a request may have: the backup still restores, with the default
/// settings, into an empty broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_large_credentials_restores() {
    let root = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (root.path().join("a"), root.path().join("b"));
    let asana = FakeAsana::start().await;
    let a = TestBroker::start(&dir_a).await;
    let mut admin_a = a.admin().await;
    let secret = |i: usize| format!("large-canary-{i}-{}", "k".repeat(3000));
    for i in 0..60 {
        let id = format!("big-{i:02}");
        admin_a
            .register_system(register_asana(&id, &asana.base_url, &secret(i), false))
            .await
            .unwrap();
    }
    let file = root.path().join("large.backup");
    let f = file.to_str().unwrap().to_owned();
    ok_json(&tokio::task::block_in_place(|| {
        ctl(&a, &["backup", "--out", &f])
    }));
    let mut config_b = test_config(&dir_b);
    config_b.store.master_key_file = Some(dir_a.join("master.key"));
    let b = TestBroker::start_with(config_b).await;
    let restored = ok_json(&tokio::task::block_in_place(|| {
        ctl(&b, &["restore", "--in", &f])
    }));
    assert_eq!(restored["systems_restored"], 60, "{restored}");
    let mut admin_b = b.admin().await;
    for i in [0, 49, 50, 59] {
        assert_eq!(
            auth_header(&mut admin_b, &format!("big-{i:02}"))
                .await
                .unwrap(),
            format!("Bearer {}", secret(i))
        );
    }
    b.stop().await;
    a.stop().await;
}

/// A system deleted after the backup comes back past its last credential version, so leases
/// of the deleted one (bound to their version) stay dead; the credential is the backup's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_system_never_repeats_a_deleted_ones_version() {
    let root = tempfile::tempdir().unwrap();
    let asana = FakeAsana::start().await;
    let a = TestBroker::start(root.path()).await;
    let mut admin = a.admin().await;
    admin
        .register_system(register_asana(
            "again",
            &asana.base_url,
            "pat-backed-up",
            false,
        ))
        .await
        .unwrap();
    let file = root.path().join("again.backup");
    let f = file.to_str().unwrap().to_owned();
    ok_json(&tokio::task::block_in_place(|| {
        ctl(&a, &["backup", "--out", &f])
    }));
    for secret in ["pat-2", "pat-3"] {
        let credential = Some(pb::Credential {
            credential: Some(pb::credential::Credential::PersonalAccessToken(
                pb::PersonalAccessToken {
                    token: secret.into(),
                    ..Default::default()
                },
            )),
        });
        let system_id = "again".into();
        let req = pb::RotateCredentialRequest {
            system_id,
            credential,
            skip_check: true,
        };
        admin.rotate_credential(req).await.unwrap();
    }
    let system_id = "again".to_owned();
    let get = pb::GetSystemRequest {
        system_id: system_id.clone(),
    };
    let last = admin.get_system(get.clone()).await.unwrap().into_inner();
    assert_eq!(last.system.unwrap().credential_version, 3);
    let delete = pb::DeleteSystemRequest { system_id };
    admin.delete_system(delete).await.unwrap();
    let watch = admin
        .watch_systems(pb::WatchSystemsRequest::default())
        .await;
    let mut events = watch.unwrap().into_inner();
    let restored = ok_json(&tokio::task::block_in_place(|| {
        ctl(&a, &["restore", "--in", &f])
    }));
    assert_eq!(restored["systems_restored"], 1, "{restored}");
    // Watches (and webhooks) hear of a restored system as of any registration.
    let registered = async {
        loop {
            let e = events.message().await.unwrap().expect("the watch ended");
            if e.r#type == "system.registered" {
                break e.system.map(|s| s.system_id);
            }
        }
    };
    let heard = tokio::time::timeout(std::time::Duration::from_secs(10), registered).await;
    assert_eq!(
        heard.expect("no event for the restored system"),
        Some("again".into())
    );
    let back = admin.get_system(get).await.unwrap().into_inner();
    assert_eq!(back.system.unwrap().credential_version, 4);
    assert_eq!(
        auth_header(&mut admin, "again").await.unwrap(),
        "Bearer pat-backed-up"
    );
    a.stop().await;
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A restore that outlasts the request deadline (a large backup, a slow disk): the verified
/// backup is still written to the end, the callers of its last chunk included (the RPC runs
/// detached from its caller), so no half-restored broker is left behind; `credbrokerctl` says
/// so and how to see the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_cut_off_by_its_deadline_is_still_written_to_the_end() {
    use credbroker::store::faulty::FaultControl;
    let root = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (root.path().join("a"), root.path().join("b"));
    let asana = FakeAsana::start().await;
    let a = TestBroker::start(&dir_a).await;
    let mut admin_a = a.admin().await;
    const SYSTEMS: usize = 30;
    for i in 0..SYSTEMS {
        let id = format!("cut-{i:02}");
        admin_a
            .register_system(register_asana(
                &id,
                &asana.base_url,
                "cut-canary-pat",
                false,
            ))
            .await
            .unwrap();
    }
    let worker = worker_token(&mut admin_a, "cut-worker").await;
    let file = root.path().join("cut.backup");
    let f = file.to_str().unwrap().to_owned();
    ok_json(&tokio::task::block_in_place(|| {
        ctl(&a, &["backup", "--out", &f])
    }));
    a.stop().await;
    let mut config_b = test_config(&dir_b);
    config_b.store.master_key_file = Some(dir_a.join("master.key"));
    config_b.server.request_timeout = std::time::Duration::from_millis(500);
    let control = Arc::new(FaultControl::default());
    let c = control.clone();
    let b = TestBroker::start_wrapped(
        config_b,
        Box::new(move |inner| {
            Arc::new(credbroker::store::faulty::FaultyStore::new(
                inner,
                c.clone(),
            ))
        }),
    )
    .await;
    let mut admin_b = b.admin().await;
    // Each write takes ~40 ms: the whole restore ~1.3 s, past the 500 ms request deadline.
    control.latency_ms.store(40, Ordering::SeqCst);
    let cut = tokio::task::block_in_place(|| ctl(&b, &["restore", "--in", &f]));
    let said = String::from_utf8_lossy(&cut.stderr);
    assert!(
        !cut.status.success() && said.contains("run the same restore again"),
        "{said}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut every = tokio::time::interval(std::time::Duration::from_millis(100));
    let mut w = client(b.addr, Some(&worker)).await;
    loop {
        every.tick().await;
        // The worker's caller is in the last chunk: it works once everything is written.
        if count(&mut admin_b).await == SYSTEMS && auth_header(&mut w, "cut-29").await.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the restore stopped with its caller: {} systems",
            count(&mut admin_b).await
        );
    }
    control.latency_ms.store(0, Ordering::SeqCst);
    let again = ok_json(&tokio::task::block_in_place(|| {
        ctl(&b, &["restore", "--in", &f])
    }));
    assert_eq!(again["systems_skipped"], SYSTEMS, "{again}");
    b.stop().await;
}
