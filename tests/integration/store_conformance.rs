//! The store conformance suite: every `CredentialStore` implementation must pass it.

use std::sync::Arc;

use credbroker::model::{
    CallerRecord, CredentialType, Role, SystemKind, SystemRecord, SystemState,
};
use credbroker::store::{CredentialStore, MemoryStore, SledStore, StoreError};

pub(crate) fn record(id: &str, revision: u64) -> SystemRecord {
    SystemRecord {
        system_id: id.to_owned(),
        display_name: format!("name {id}"),
        description: String::new(),
        kind: SystemKind::Asana,
        base_url: "https://app.asana.com/api/1.0".into(),
        credential_type: CredentialType::PersonalAccessToken,
        credential_version: 1,
        state: SystemState::Active,
        state_message: None,
        created_at: 1,
        updated_at: 1,
        last_check: None,
        credential_expires_at: None,
        delivery: credbroker::model::Delivery::Proxy,
        proxy_unauthorized_count: 0,
        shared_token: None,
        last_proxy_unauthorized_at: None,
        health: None,
        refresh_failure: None,
        sealed_credential: vec![1, 2, 3, 0, 255],
        revision,
        integrity: None,
    }
}

async fn conformance(store: Arc<dyn CredentialStore>) {
    assert_eq!(store.get_system("a").await.unwrap(), None);
    store.insert_system(&record("b", 1)).await.unwrap();
    store.insert_system(&record("a", 1)).await.unwrap();
    store.insert_system(&record("c", 1)).await.unwrap();
    assert!(matches!(
        store.insert_system(&record("a", 1)).await,
        Err(StoreError::AlreadyExists)
    ));
    assert_eq!(store.get_system("a").await.unwrap(), Some(record("a", 1)));
    assert_eq!(store.count_systems().await.unwrap(), 3);

    let ids = |v: Vec<SystemRecord>| v.into_iter().map(|r| r.system_id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list_systems(None, 10).await.unwrap()),
        ["a", "b", "c"]
    );
    assert_eq!(ids(store.list_systems(None, 2).await.unwrap()), ["a", "b"]);
    assert_eq!(
        ids(store.list_systems(Some("a"), 10).await.unwrap()),
        ["b", "c"]
    );
    assert_eq!(
        ids(store.list_systems(Some("c"), 10).await.unwrap()),
        Vec::<String>::new()
    );

    // Compare-and-swap on revision.
    let mut upd = record("a", 2);
    upd.credential_version = 2;
    store.update_system(&upd, 1).await.unwrap();
    assert!(matches!(
        store.update_system(&record("a", 3), 1).await,
        Err(StoreError::Conflict)
    ));
    assert!(matches!(
        store.update_system(&record("zz", 2), 1).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        store
            .get_system("a")
            .await
            .unwrap()
            .unwrap()
            .credential_version,
        2
    );

    assert!(store.delete_system("b").await.unwrap());
    assert!(!store.delete_system("b").await.unwrap());
    assert_eq!(store.count_systems().await.unwrap(), 2);

    let caller = CallerRecord {
        name: "w".into(),
        role: Role::Worker,
        token_sha256: "00".repeat(32),
        created_at: 1,
        revoked: false,
        system_patterns: vec!["acme-*".into()],
        kinds: vec![SystemKind::Asana],
        expires_at: Some(4_000_000_000),
        integrity: None,
    };
    store.insert_caller(&caller).await.unwrap();
    assert!(matches!(
        store.insert_caller(&caller).await,
        Err(StoreError::AlreadyExists)
    ));
    let mut revoked = caller.clone();
    revoked.revoked = true;
    store.update_caller(&revoked).await.unwrap();
    assert_eq!(store.list_callers().await.unwrap(), vec![revoked]);
    let ghost = CallerRecord {
        name: "ghost".into(),
        ..caller
    };
    assert!(matches!(
        store.update_caller(&ghost).await,
        Err(StoreError::Conflict)
    ));

    assert_eq!(store.get_meta("k").await.unwrap(), None);
    store.put_meta("k", b"v1").await.unwrap();
    store.put_meta("k", b"v2").await.unwrap();
    assert_eq!(store.get_meta("k").await.unwrap(), Some(b"v2".to_vec()));
    takes_once(&store).await;
    store.flush().await.unwrap();
}

/// `take_meta` hands a value to one taker of many racing (on PostgreSQL: pooled connections,
/// each its own transaction) and removes the key (used ones do not pile up).
async fn takes_once(store: &Arc<dyn CredentialStore>) {
    assert_eq!(store.take_meta("absent").await.unwrap(), None);
    store.put_meta("once", b"single use").await.unwrap();
    let racers: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.take_meta("once").await.unwrap() })
        })
        .collect();
    let mut taken = Vec::new();
    for r in racers {
        taken.extend(r.await.unwrap());
    }
    assert_eq!(
        taken,
        vec![b"single use".to_vec()],
        "taken by more than one"
    );
    assert_eq!(store.get_meta("once").await.unwrap(), None);
    // An empty value (what versions before take_meta left as a used mark) is nothing to take.
    store.put_meta("used", b"").await.unwrap();
    assert_eq!(store.take_meta("used").await.unwrap(), None);
    assert_eq!(store.take_meta("once").await.unwrap(), None);
}

#[tokio::test]
async fn memory_store_conforms() {
    conformance(Arc::new(MemoryStore::new())).await;
}

/// The record-authenticating wrapper the broker puts around every store conforms too, and
/// refuses a record changed underneath it, alone.
#[tokio::test]
async fn authenticated_store_conforms_and_refuses_records_changed_underneath() {
    use credbroker::store::AuthenticatedStore;
    conformance(Arc::new(AuthenticatedStore::new(
        Arc::new(MemoryStore::new()),
        [7; 32].into(),
    )))
    .await;
    let inner: Arc<dyn CredentialStore> = Arc::new(MemoryStore::new());
    let store = AuthenticatedStore::new(inner.clone(), [7; 32].into());
    for id in ["a", "b", "c"] {
        store.insert_system(&record(id, 1)).await.unwrap();
    }
    let mut b = inner.get_system("b").await.unwrap().unwrap();
    b.base_url = "https://elsewhere.example".into();
    inner.update_system(&b, 1).await.unwrap();
    assert!(matches!(
        store.get_system("b").await,
        Err(StoreError::Tampered(_))
    ));
    let page = store.list_systems(None, 2).await.unwrap();
    let ids: Vec<_> = page.iter().map(|r| r.system_id.as_str()).collect();
    assert_eq!(ids, ["a", "c"], "a refused record leaves no short page");
    assert_eq!(store.get_system("a").await.unwrap(), Some(record("a", 1)));
    // Another key (another master key) trusts nothing.
    let other = AuthenticatedStore::new(inner, [8; 32].into());
    assert!(other.list_systems(None, 10).await.unwrap().is_empty());
}

/// Opens the sled store in `dir`, waiting (bounded) for a previous owner to let go: sled
/// releases its directory lock when its background flusher thread ends, which can be a moment
/// after the last handle is dropped.
pub async fn open_sled(dir: &std::path::Path) -> SledStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match SledStore::open(dir) {
            Ok(s) => return s,
            Err(credbroker::store::sled::OpenError::Locked(_))
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Of the systems in a stopped broker's sled store: (sealed under key `key_id`, all).
pub async fn records_on_key(dir: &std::path::Path, key_id: &str) -> (usize, usize) {
    let store = open_sled(dir).await;
    let records = store.list_systems(None, usize::MAX).await.unwrap();
    let on = records
        .iter()
        .filter(|r| {
            let kek = credbroker::crypto::parse_header(&r.sealed_credential)
                .unwrap()
                .kek_id;
            format!("{kek:08x}") == key_id
        })
        .count();
    (on, records.len())
}

#[tokio::test]
async fn sled_store_conforms_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path()).unwrap();
        conformance(Arc::new(store)).await;
    }
    let store = open_sled(dir.path()).await;
    assert_eq!(store.count_systems().await.unwrap(), 2);
    assert_eq!(store.get_meta("k").await.unwrap(), Some(b"v2".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conforms_and_persists() {
    let Some(server) = crate::pg::PgServer::shared().await else {
        return crate::pg::skipped("postgres_store_conforms_and_persists");
    };
    let url = server.fresh_db().await;
    {
        let store = credbroker::store::PostgresStore::connect(&url, None)
            .await
            .unwrap();
        conformance(Arc::new(store)).await;
    }
    // A second connection (another replica) sees the same data; migrating again is a no-op.
    let store = credbroker::store::PostgresStore::connect(&url, None)
        .await
        .unwrap();
    assert_eq!(store.count_systems().await.unwrap(), 2);
    assert_eq!(store.get_meta("k").await.unwrap(), Some(b"v2".to_vec()));
    assert!(store.is_shared());
}

/// A replica's refresh locks (each holding a pooled connection through a vendor call) never
/// take the whole pool: past half of it a lock waits for a slot, up to its deadline, and the
/// reads and writes the refreshes themselves need still find connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refresh_locks_leave_connections_for_reads_and_writes() {
    use credbroker::store::postgres::LOCK_HOLDERS;
    let Some(server) = crate::pg::PgServer::shared().await else {
        return crate::pg::skipped("postgres_refresh_locks_leave_connections_for_reads_and_writes");
    };
    let url = server.fresh_db().await;
    let store = Arc::new(
        credbroker::store::PostgresStore::connect(&url, None)
            .await
            .unwrap(),
    );
    let wait = std::time::Duration::from_secs(2);
    let mut held = Vec::new();
    for i in 0..LOCK_HOLDERS {
        held.push(store.lock_refresh(&format!("sys-{i}"), wait).await.unwrap());
    }
    let short = std::time::Duration::from_millis(300);
    let err = store.lock_refresh("one-more", short).await.err().unwrap();
    assert!(err.to_string().contains("too many refreshes"), "{err}");
    // An administrative operation's lock (a caller's revocation) takes no refresh slot.
    let admin_lock = store.lock_refresh("~caller-operations", short).await;
    assert!(matches!(admin_lock, Ok(Some(_))), "{admin_lock:?}");
    drop(admin_lock);
    let mut io = tokio::task::JoinSet::new();
    for i in 0..16 {
        let store = store.clone();
        io.spawn(async move {
            store.put_meta(&format!("k{i}"), b"v").await?;
            store.get_meta(&format!("k{i}")).await
        });
    }
    let all = tokio::time::timeout(wait, async {
        while let Some(r) = io.join_next().await {
            assert_eq!(r.unwrap().unwrap(), Some(b"v".to_vec()));
        }
    });
    all.await.expect("reads and writes waited for a connection");
    drop(held);
    assert!(store
        .lock_refresh("one-more", wait)
        .await
        .unwrap()
        .is_some());
}

/// A write fenced by a refresh lock lands only while the lock's session holds it: once that
/// session has ended (a cut connection, `pg_terminate_backend`), the write answers `LockLost`
/// and changes nothing, while a stale write under a held lock is an ordinary conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_writes_fenced_by_a_refresh_lock_land_only_while_it_is_held() {
    let Some(server) = crate::pg::PgServer::shared().await else {
        return crate::pg::skipped(
            "postgres_writes_fenced_by_a_refresh_lock_land_only_while_it_is_held",
        );
    };
    let url = server.fresh_db().await;
    let store = credbroker::store::PostgresStore::connect(&url, None)
        .await
        .unwrap();
    store.insert_system(&record("fenced", 1)).await.unwrap();
    let wait = std::time::Duration::from_secs(2);
    let lock = store.lock_refresh("fenced", wait).await.unwrap().unwrap();
    let fence = lock
        .fence()
        .expect("a database lock can be lost, so it fences");
    store
        .update_system_fenced(&record("fenced", 2), 1, fence)
        .await
        .expect("written while the lock is held");
    let stale = store
        .update_system_fenced(&record("fenced", 3), 1, fence)
        .await;
    assert!(matches!(stale, Err(StoreError::Conflict)), "{stale:?}");
    // The lock's session ends.
    let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&fence.session])
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while lock.still_held().await {
        assert!(
            std::time::Instant::now() < deadline,
            "the session never ended"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let late = store
        .update_system_fenced(&record("fenced", 3), 2, fence)
        .await;
    assert!(matches!(late, Err(StoreError::LockLost)), "{late:?}");
    let stored = store.get_system("fenced").await.unwrap().unwrap();
    assert_eq!(stored.revision, 2, "nothing written without the lock");
    // The lock is free again; its new holder's fence writes.
    let again = store.lock_refresh("fenced", wait).await.unwrap().unwrap();
    let fence = again.fence().unwrap();
    store
        .update_system_fenced(&record("fenced", 3), 2, fence)
        .await
        .expect("written under the new lock");
    drop(lock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_migrate_once_when_started_together() {
    let Some(server) = crate::pg::PgServer::shared().await else {
        return crate::pg::skipped("postgres_replicas_migrate_once_when_started_together");
    };
    let url = server.fresh_db().await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            credbroker::store::PostgresStore::connect(&url, None).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT version) FROM credbroker_schema_history",
            &[],
        )
        .await
        .unwrap();
    let (n, distinct): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(
        (n, distinct),
        (2, 2),
        "migrations V1 and V2 recorded exactly once each"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_over_tls_verifies_the_server() {
    let ca = crate::mtls::Ca::new("credbroker test PostgreSQL CA");
    let (cert, key) = ca.leaf(&["127.0.0.1", "localhost"], true);
    let Some(server) = crate::pg::PgServer::start_tls(&cert, &key).await else {
        return crate::pg::skipped(
            "postgres_store_over_tls_verifies_the_server (needs a local initdb)",
        );
    };
    let url = server.fresh_db().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let tls_url = format!("{url}?sslmode=require");
    let store = credbroker::store::PostgresStore::connect(&tls_url, Some(&ca_file))
        .await
        .unwrap();
    store.insert_system(&record("tls", 1)).await.unwrap();
    assert_eq!(
        store.get_system("tls").await.unwrap(),
        Some(record("tls", 1))
    );
    // The broker's sessions really are encrypted.
    let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let n: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE ssl AND application_name = 'credbroker'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(n >= 1, "no TLS session from the store");
    // A server the CA did not sign is refused.
    let other = crate::mtls::Ca::new("someone else");
    std::fs::write(&ca_file, other.pem()).unwrap();
    let err = credbroker::store::PostgresStore::connect(&tls_url, Some(&ca_file))
        .await
        .unwrap_err();
    // Refused in the handshake (the same URL with the right CA connected above).
    assert!(err.to_string().contains("TLS handshake"), "wrong CA: {err}");
}
