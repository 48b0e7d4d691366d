//! Someone who can write the database but lacks the master key: every forged change is refused
//! (`DATA_LOSS` or unauthenticated), nothing goes upstream, and the rest of the store carries on.

use std::time::Duration;

use credbroker::pb;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tonic::Code;

use crate::pg::{skipped, PgServer};
use crate::support::*;

const PAT_SYS: &str = "tamper-pat-sys-5f1e";
const PAT_OTHER: &str = "tamper-pat-other-77b0";
const PAT_FINE: &str = "tamper-pat-fine-0c3a";
const FORGED_ADMIN: &str = "forged-admin-token-9d2c";

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A plain SQL session, as the database writer has one.
async fn sql(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

async fn row(db: &tokio_postgres::Client, table: &str, key: &str) -> Value {
    let (col, q) = match table {
        "systems" => (
            "system_id",
            "SELECT record FROM systems WHERE system_id = $1",
        ),
        _ => ("name", "SELECT record FROM callers WHERE name = $1"),
    };
    let r = db
        .query_one(q, &[&key])
        .await
        .unwrap_or_else(|e| panic!("{col} {key}: {e}"));
    serde_json::from_slice(r.get::<_, &[u8]>(0)).unwrap()
}

async fn put_row(db: &tokio_postgres::Client, table: &str, key: &str, v: &Value) {
    let bytes = serde_json::to_vec(v).unwrap();
    let q = match table {
        "systems" => {
            "INSERT INTO systems (system_id, revision, record) VALUES ($1, 1, $2) \
                      ON CONFLICT (system_id) DO UPDATE SET record = $2"
        }
        _ => {
            "INSERT INTO callers (name, record) VALUES ($1, $2) \
              ON CONFLICT (name) DO UPDATE SET record = $2"
        }
    };
    db.execute(q, &[&key, &bytes]).await.unwrap();
}

async fn notify(db: &tokio_postgres::Client, payload: &str) {
    db.execute("SELECT pg_notify('credbroker_changes', $1)", &[&payload])
        .await
        .unwrap();
}

/// A worker's lease for `id` and the proxied GET it makes with it.
async fn proxied_get(t: &pb::GetAccessTokenResponse) -> reqwest::StatusCode {
    let mut req = reqwest::Client::new().get(format!("{}/users/me", t.api_base_url));
    for h in &t.headers {
        req = req.header(&h.name, &h.value);
    }
    req.send().await.unwrap().status()
}

async fn token(c: &mut Client, id: &str) -> Result<pb::GetAccessTokenResponse, tonic::Status> {
    c.get_access_token(pb::GetAccessTokenRequest {
        system_id: id.into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

fn register(id: &str, base: &str, secret: &str) -> pb::RegisterSystemRequest {
    pb::RegisterSystemRequest {
        delivery: pb::Delivery::Proxy as i32,
        ..register_asana(id, base, secret, false)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_writer_without_the_master_key_cannot_forge_callers_or_redirect_secrets() {
    let Some(pg) = PgServer::shared().await else {
        return skipped(
            "a_database_writer_without_the_master_key_cannot_forge_callers_or_redirect_secrets",
        );
    };
    let url = pg.fresh_db().await;
    let asana = FakeAsana::start().await;
    for pat in [PAT_SYS, PAT_OTHER, PAT_FINE] {
        asana.add_user(pat, "1", "Sync", "sync@example.com");
    }
    let evil = FakeUpstream::start(|_| Reply::Json(200, json!({"data": {}}))).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.store.url = Some(credbroker::secret::SecretString::new(url.clone()));
    let broker = TestBroker::start_with(config.clone()).await;
    let mut admin = broker.admin().await;
    for (id, secret) in [
        ("sys", PAT_SYS),
        ("other", PAT_OTHER),
        ("fine", PAT_FINE),
        ("canary", PAT_FINE),
    ] {
        admin
            .register_system(register(id, &asana.base_url, secret))
            .await
            .unwrap();
    }
    let mut lease = token(&mut admin, "sys").await.unwrap();
    let first_http = broker.http_addr.to_string();
    let db = sql(&url).await;
    let mut workers = Vec::new();
    for name in ["w", "w2"] {
        let token = worker_token(&mut admin, name).await;
        workers.push((token, row(&db, "callers", name).await));
        admin
            .revoke_caller(pb::RevokeCallerRequest { name: name.into() })
            .await
            .unwrap();
    }
    let [(w_token, w_before_revocation), (w2_token, _)] = <[_; 2]>::try_from(workers).unwrap();
    broker.stop().await;

    // The forged changes, each made the way a database writer can.
    let mut forged = row(&db, "callers", "admin").await; // a valid tag, copied
    forged["name"] = json!("intruder");
    forged["token_sha256"] = json!(sha256_hex(FORGED_ADMIN));
    put_row(&db, "callers", "intruder", &forged).await;
    let mut untagged = forged.clone();
    untagged["name"] = json!("intruder2");
    untagged.as_object_mut().unwrap().remove("integrity");
    put_row(&db, "callers", "intruder2", &untagged).await;
    let mut revived = row(&db, "callers", "w2").await;
    revived["revoked"] = json!(false);
    put_row(&db, "callers", "w2", &revived).await;
    let mut sys = row(&db, "systems", "sys").await;
    sys["base_url"] = json!(format!("{}/api/1.0", evil.origin));
    put_row(&db, "systems", "sys", &sys).await;
    let mut other = row(&db, "systems", "other").await;
    other["delivery"] = json!("header");
    put_row(&db, "systems", "other", &other).await;
    db.execute(
        "INSERT INTO systems (system_id, revision, record) VALUES ('garbage', 1, 'not json')",
        &[],
    )
    .await
    .unwrap();

    // A broker starting on the tampered store starts, and refuses each forged record alone.
    let broker = TestBroker::start_with(config.clone()).await;
    let mut admin = broker.admin().await;
    for t in [FORGED_ADMIN, w_token.as_str(), w2_token.as_str()] {
        let mut c = client(broker.addr, Some(t)).await;
        let err = c
            .list_systems(pb::ListSystemsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    }
    for id in ["sys", "other", "garbage"] {
        let err = token(&mut admin, id).await.unwrap_err();
        assert_eq!(err.code(), Code::DataLoss, "{id}: {}", err.message());
        let err = admin
            .get_system(pb::GetSystemRequest {
                system_id: id.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::DataLoss, "{id}: {}", err.message());
    }
    // The old lease names the redirected system: refused, nothing reaches the forged host.
    lease.api_base_url = lease
        .api_base_url
        .replace(&first_http, &broker.http_addr.to_string());
    assert!(!proxied_get(&lease).await.is_success());
    assert_eq!(evil.count(""), 0, "a forged base URL received a request");
    // Everything else carries on.
    let fine = token(&mut admin, "fine").await.unwrap();
    assert_eq!(proxied_get(&fine).await, reqwest::StatusCode::OK);
    let listed = admin
        .list_systems(pb::ListSystemsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = listed
        .systems
        .iter()
        .map(|s| s.system_id.as_str())
        .collect();
    assert_eq!(ids, ["canary", "fine"]);

    // While it runs: the revoked caller's own earlier row (validly tagged) is put back and a
    // notification sent by hand, with odd ones after it; then the cached canary's row is
    // deleted and notified: once the canary is gone, the caller reload before it has run.
    assert!(token(&mut admin, "canary").await.is_ok());
    put_row(&db, "callers", "w", &w_before_revocation).await;
    notify(&db, "someone|caller|w").await;
    notify(&db, &format!("someone|system|{}", "x".repeat(7000))).await;
    notify(&db, "someone|system|no such system").await;
    notify(&db, "someone|bogus").await;
    db.execute("DELETE FROM systems WHERE system_id = 'canary'", &[])
        .await
        .unwrap();
    notify(&db, "someone|system|canary").await;
    let started = std::time::Instant::now();
    loop {
        match token(&mut admin, "canary").await {
            Err(e) if e.code() == Code::NotFound => break,
            _ => assert!(
                started.elapsed() < Duration::from_secs(10),
                "notification not seen"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = client(broker.addr, Some(&w_token)).await;
    let err = c
        .list_systems(pb::ListSystemsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let fine = token(&mut admin, "fine").await.unwrap();
    assert_eq!(proxied_get(&fine).await, reqwest::StatusCode::OK);
    assert_eq!(evil.count(""), 0);

    // A refused record can be deleted and its id registered again, past any old version.
    admin
        .delete_system(pb::DeleteSystemRequest {
            system_id: "sys".into(),
        })
        .await
        .unwrap();
    let again = admin
        .register_system(register("sys", &asana.base_url, PAT_SYS))
        .await
        .unwrap()
        .into_inner()
        .system
        .unwrap();
    assert!(
        again.credential_version > 1_000_000,
        "{}",
        again.credential_version
    );
    assert!(token(&mut admin, "sys").await.is_ok());

    // Nothing secret is in the database in clear.
    for secret in [PAT_SYS, PAT_OTHER, PAT_FINE] {
        let rows = db
            .query("SELECT record::text FROM systems", &[])
            .await
            .unwrap();
        assert!(rows.iter().all(|r| !r.get::<_, String>(0).contains(secret)));
    }
    broker.stop().await;
}

/// The same holds for the embedded store: a record edited in the sled files is refused alone.
#[tokio::test]
async fn a_sled_record_edited_without_the_master_key_is_refused_alone() {
    let dir = tempfile::tempdir().unwrap();
    let asana = FakeAsana::start().await;
    for pat in [PAT_SYS, PAT_OTHER, PAT_FINE] {
        asana.add_user(pat, "1", "Sync", "sync@example.com");
    }
    let evil = FakeUpstream::start(|_| Reply::Json(200, json!({"data": {}}))).await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    for (id, secret) in [("sys", PAT_SYS), ("fine", PAT_FINE)] {
        admin
            .register_system(register(id, &asana.base_url, secret))
            .await
            .unwrap();
    }
    broker.stop().await;
    {
        use credbroker::store::CredentialStore;
        let store = crate::store_conformance::open_sled(dir.path()).await;
        let mut r = store.get_system("sys").await.unwrap().unwrap();
        r.base_url = format!("{}/api/1.0", evil.origin);
        let rev = r.revision;
        store.update_system(&r, rev).await.unwrap();
        store.flush().await.unwrap();
    }
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let err = token(&mut admin, "sys").await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    assert!(
        err.message().contains("failed authentication"),
        "{}",
        err.message()
    );
    let fine = token(&mut admin, "fine").await.unwrap();
    assert_eq!(proxied_get(&fine).await, reqwest::StatusCode::OK);
    assert_eq!(evil.count(""), 0);
    broker.stop().await;
}

/// A store written before records carried tags: the broker refuses it (naming the way out) until
/// the operator asks it once to adopt the records; then it serves them.
#[tokio::test]
async fn a_store_from_before_record_authentication_is_adopted_only_when_asked() {
    use credbroker::store::{CredentialStore, INTEGRITY_META_KEY};
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let asana = FakeAsana::start().await;
    let broker = TestBroker::start(dir.path()).await;
    let admin_token = broker.admin_token.clone();
    broker
        .admin()
        .await
        .register_system(register_asana("sys", &asana.base_url, PAT_SYS, false))
        .await
        .unwrap();
    broker.stop().await;
    {
        // What an older broker left: the same records without tags, and no marker.
        let store = crate::store_conformance::open_sled(dir.path()).await;
        let mut r = store.get_system("sys").await.unwrap().unwrap();
        r.integrity = None;
        store.update_system(&r, r.revision).await.unwrap();
        for mut c in store.list_callers().await.unwrap() {
            c.integrity = None;
            store.update_caller(&c).await.unwrap();
        }
        store.put_meta(INTEGRITY_META_KEY, b"").await.unwrap();
        store.flush().await.unwrap();
    }
    let log = match spawn_process(dir.path(), &logs.path().join("a.log"), &[]) {
        Err((status, log)) => {
            assert!(!status.success());
            log
        }
        Ok(mut p) => {
            assert!(
                !p.child.wait().unwrap().success(),
                "started on untagged records"
            );
            p.log()
        }
    };
    assert!(
        log.contains("CREDBROKER_ADOPT_UNAUTHENTICATED_RECORDS"),
        "the refusal names the way out: {log}"
    );
    let p = spawn_process(
        dir.path(),
        &logs.path().join("b.log"),
        &[("CREDBROKER_ADOPT_UNAUTHENTICATED_RECORDS", "1")],
    )
    .unwrap_or_else(|(s, log)| panic!("exited {s}: {log}"));
    wait_for_health(
        p.addr,
        tonic_health::pb::health_check_response::ServingStatus::Serving,
    )
    .await;
    let mut admin = client(p.addr, Some(&admin_token)).await;
    assert_eq!(
        auth_header(&mut admin, "sys").await.unwrap(),
        format!("Bearer {PAT_SYS}")
    );
    assert!(p.log().contains("Adopting a system record"));
    drop(admin);
    // Off the runtime: the dropped client's connection closes while the broker drains.
    let code = tokio::task::spawn_blocking(move || p.terminate())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    // Left on, the setting would adopt whatever a database writer puts there next: refused.
    let adopt = [("CREDBROKER_ADOPT_UNAUTHENTICATED_RECORDS", "1")];
    let log = match spawn_process(dir.path(), &logs.path().join("c.log"), &adopt) {
        Err((status, log)) => {
            assert!(!status.success());
            log
        }
        Ok(mut p) => {
            let ok = tokio::task::spawn_blocking(move || p.child.wait().unwrap().success())
                .await
                .unwrap();
            assert!(!ok, "started with adoption left on");
            std::fs::read_to_string(logs.path().join("c.log")).unwrap()
        }
    };
    assert!(log.contains("Remove the setting"), "{log}");
}
