//! [`PostgresStore`]: the store for several broker replicas sharing one PostgreSQL database
//! (`CREDBROKER_STORE_URL=postgres://…`).
//!
//! - **Same records**: rows hold the very JSON documents the sled store keeps (metadata in clear,
//!   credentials sealed under the master key with the record binding), so nothing secret is ever
//!   stored in clear in PostgreSQL either.
//! - **Schema**: versioned migrations in `src/store/migrations/` (refinery), applied at start
//!   under an advisory lock, so replicas starting together migrate once.
//! - **Pool**: deadpool with connect, wait and recycle timeouts; a broken database turns into
//!   `UNAVAILABLE` answers, never a hang.
//! - **TLS**: `sslmode=require` (or `prefer`) in the URL connects with rustls, verifying the
//!   server against `CREDBROKER_STORE_CA_FILE` (PEM) or, without one, the public web roots. A
//!   URL naming a host off loopback without `sslmode` means `require`.
//! - **Change propagation**: every write sends `NOTIFY credbroker_changes` in the same statement;
//!   each replica `LISTEN`s on a dedicated connection and hands the changes to the broker, which
//!   drops cached tokens and reloads callers (within milliseconds; after a reconnect it resyncs
//!   everything, since notifications sent meanwhile are lost).
//! - **Cross-replica single flight**: [`CredentialStore::lock_refresh`] takes a session-level
//!   advisory lock per system (polled with `pg_try_advisory_lock`, so no query is left waiting);
//!   a replica that dies releases it with its session.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, NoTls, Socket};

use super::{
    decode_keyed, decode_listed, encode, Change, CredentialStore, RefreshLock, StoreError,
    StoredEvent,
};
use crate::model::{CallerRecord, SystemRecord};

mod embedded {
    refinery::embed_migrations!("src/store/migrations");
}

const CHANNEL: &str = "credbroker_changes";
/// Advisory lock key serialising migrations across replicas ("credbrok" in ASCII).
const MIGRATION_LOCK: i64 = 0x6372_6564_6272_6f6b;

/// The PostgreSQL-backed store.
pub struct PostgresStore {
    pool: Pool,
    /// Refresh locks held at once (each holds a pooled connection for a vendor call): at most
    /// half the pool, so the reads and writes the refreshes themselves need always find one.
    lock_slots: Arc<tokio::sync::Semaphore>,
    /// The sessions of the refresh locks held now, for fenced writes.
    fenced: Fenced,
    replica: String,
    changes: broadcast::Sender<Change>,
    listener: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        // A server starting up, shutting down or dropping the connection is not there yet (or
        // any more): the same as no answer, waited out rather than taken for a refusal.
        Some(db) if unavailable(db.code()) => StoreError::Unreachable(db_text(db)),
        // The server answered (a constraint, a timeout, a refused login): it is there.
        Some(db) => StoreError::Backend(db_text(db)),
        // No answer: connection refused, lost or timed out.
        None => StoreError::Unreachable(format!("postgres: {e}")),
    }
}

/// A database error as logs and callers see it: its severity, SQLSTATE and message
/// (tokio-postgres's own text is only "db error"). Not its DETAIL, which can quote a row. All
/// three come from the server: the severity is one it knows, the SQLSTATE five letters or
/// digits, the message capped and its control characters escaped.
fn db_text(db: &tokio_postgres::error::DbError) -> String {
    let severity = db
        .parsed_severity()
        .map_or_else(|| "?".to_owned(), |s| s.to_string());
    let code = db.code().code();
    let code = if code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric()) {
        code
    } else {
        "?????"
    };
    let mut message = String::new();
    for c in db.message().chars().take(200) {
        if c.is_control() {
            message.extend(c.escape_default());
        } else {
            message.push(c);
        }
    }
    format!("postgres: {severity} {code}: {message}")
}

/// SQLSTATEs that mean the server cannot serve now but will: class 08 (connection exception),
/// 57P01–57P03 (an administrator's or a crash's shutdown, "the database system is starting
/// up") and 53300 (too many connections, as when many replicas restart at once). A restart of
/// the database sends these to everyone connecting during it.
///
/// PgBouncer sends 08P01 for all of its own errors: its server being down or restarting, and
/// also a refused login. The first must be waited out, so the second is too; the wait is
/// logged every 30 s with the server's message, which says which it is.
fn unavailable(code: &tokio_postgres::error::SqlState) -> bool {
    use tokio_postgres::error::SqlState;
    code.code().starts_with("08")
        || [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::TOO_MANY_CONNECTIONS,
        ]
        .contains(code)
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    use deadpool_postgres::{PoolError, TimeoutType};
    match e {
        PoolError::Backend(e) => pg(e),
        PoolError::Timeout(TimeoutType::Create | TimeoutType::Recycle) => {
            StoreError::Unreachable("postgres pool: connecting timed out".to_owned())
        }
        // Every connection busy: the database answers, this process is loaded.
        e => StoreError::Backend(format!("postgres pool: {e}")),
    }
}

/// Whether `url` selects this store.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

#[derive(Clone)]
enum Tls {
    None,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

fn tls_for(config: &tokio_postgres::Config, ca_file: Option<&Path>) -> Result<Tls, StoreError> {
    use tokio_postgres::config::SslMode;
    if matches!(config.get_ssl_mode(), SslMode::Disable) {
        return Ok(Tls::None);
    }
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                StoreError::Backend(format!(
                    "cannot read the store CA file {}: {e}",
                    path.display()
                ))
            })?;
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| {
                    StoreError::Backend(format!("store CA file {}: {e}", path.display()))
                })?;
                roots
                    .add(cert)
                    .map_err(|e| StoreError::Backend(format!("store CA certificate: {e}")))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Backend(format!("tls: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(
        tls,
    )))
}

/// A URL that names a host off loopback and says nothing about TLS gets `sslmode=require`: the
/// store holds every sealed credential and caller, so plaintext (`prefer`, `disable`) must be
/// asked for explicitly.
fn require_tls_off_loopback(url: &str, config: &mut tokio_postgres::Config) {
    use tokio_postgres::config::{Host, SslMode};
    if names_sslmode(url) {
        return;
    }
    let off_loopback = config.get_hosts().iter().any(|h| match h {
        Host::Tcp(name) => !is_loopback_host(name),
        #[cfg(unix)]
        Host::Unix(_) => false,
    }) || config.get_hostaddrs().iter().any(|ip| !ip.is_loopback());
    if off_loopback {
        config.ssl_mode(SslMode::Require);
    }
}

/// Whether the URL (`postgres://…?sslmode=…`) or key=value string (`… sslmode=…`) sets sslmode
/// itself (as a parameter: a user or database called "sslmode…" does not count).
fn names_sslmode(url: &str) -> bool {
    let is_key = |k: &str| k.trim().eq_ignore_ascii_case("sslmode");
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return url::Url::parse(url).is_ok_and(|u| u.query_pairs().any(|(k, _)| is_key(&k)));
    }
    url.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .any(|(k, _)| is_key(k))
}

fn is_loopback_host(name: &str) -> bool {
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl PostgresStore {
    /// Connects, applies pending migrations (once across replicas) and starts listening for
    /// other replicas' changes. `url` is a libpq-style URL; the password in it never appears in
    /// an error or log line.
    pub async fn connect(url: &str, ca_file: Option<&Path>) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|_| {
            StoreError::Backend("the store URL is not a valid postgres:// URL".to_owned())
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.application_name("credbroker");
        // A database behind a dead network path is noticed in under a minute, not hours.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        config.keepalives_interval(Duration::from_secs(5));
        config.keepalives_retries(3);
        require_tls_off_loopback(url, &mut config);
        let tls = tls_for(&config, ca_file)?;
        let pool = match &tls {
            Tls::None => build_pool(config.clone(), NoTls)?,
            Tls::Rustls(t) => build_pool(config.clone(), t.clone())?,
        };
        migrate(&pool).await?;
        let replica = crate::util::random::hex_id::<6>();
        let (changes, _) = broadcast::channel(4096);
        let listener = {
            let (config, changes, replica) = (config.clone(), changes.clone(), replica.clone());
            tokio::spawn(async move {
                match tls {
                    Tls::None => listen_loop(config, NoTls, changes, replica).await,
                    Tls::Rustls(t) => listen_loop(config, t, changes, replica).await,
                }
            })
        };
        Ok(Self {
            pool,
            lock_slots: Arc::new(tokio::sync::Semaphore::new(LOCK_HOLDERS)),
            fenced: Fenced::default(),
            replica,
            changes,
            listener,
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_err)
    }

    /// Runs one statement and returns its rows (a write's `… SELECT pg_notify(…) FROM …` yields
    /// one row per changed record).
    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.client().await?.query(sql, params).await.map_err(pg)
    }

    /// Up to `limit` system rows (`system_id`, `record`) after `after`, in id order.
    async fn system_rows(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        match after {
            Some(a) => {
                self.rows(
                    "SELECT system_id, record FROM systems WHERE system_id COLLATE \"C\" > $1 ORDER BY system_id COLLATE \"C\" LIMIT $2",
                    &[&a, &limit],
                )
                .await
            }
            None => {
                self.rows(
                    "SELECT system_id, record FROM systems ORDER BY system_id COLLATE \"C\" LIMIT $1",
                    &[&limit],
                )
                .await
            }
        }
    }

    /// Runs a caller write (`$1` name, `$2` record, `$3`/`$4` the notification) that returns a
    /// row when it changed something; `missing` when it did not.
    async fn write_caller(
        &self,
        sql: &str,
        record: &CallerRecord,
        missing: StoreError,
    ) -> Result<(), StoreError> {
        let bytes = encode(record)?;
        let payload = self.payload("caller", &record.name);
        let n = self
            .rows(sql, &[&record.name, &bytes, &CHANNEL, &payload])
            .await?
            .len();
        if n == 0 {
            return Err(missing);
        }
        Ok(())
    }

    fn payload(&self, kind: &str, id: &str) -> String {
        format!("{}|{kind}|{id}", self.replica)
    }
}

/// Connections in the pool.
const POOL_SIZE: usize = 16;

/// Refresh locks one replica holds at once (see [`PostgresStore::lock_slots`]).
pub const LOCK_HOLDERS: usize = POOL_SIZE / 2;

fn build_pool<T>(config: tokio_postgres::Config, tls: T) -> Result<Pool, StoreError>
where
    T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
    T::Stream: Sync + Send,
    T::TlsConnect: Sync + Send,
    <T::TlsConnect as tokio_postgres::tls::TlsConnect<Socket>>::Future: Send,
{
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(POOL_SIZE)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| StoreError::Backend(format!("postgres pool: {e}")))
}

async fn migrate(pool: &Pool) -> Result<(), StoreError> {
    let mut obj = pool.get().await.map_err(pool_err)?;
    obj.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    let client: &mut tokio_postgres::Client = &mut obj;
    let result = embedded::migrations::runner()
        .set_migration_table_name("credbroker_schema_history")
        .run_async(client)
        .await;
    let _ = obj
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    match result {
        Ok(report) => {
            for m in report.applied_migrations() {
                tracing::info!(message = "Store migration applied.", version = m.version(), name = %m.name());
            }
            Ok(())
        }
        Err(e) => Err(StoreError::Backend(format!("migration failed: {e}"))),
    }
}

/// Listens for other replicas' changes on a dedicated connection, reconnecting every second
/// while the database is away; after each (re)connect it announces [`Change::Resync`].
async fn listen_loop<T>(
    config: tokio_postgres::Config,
    tls: T,
    tx: broadcast::Sender<Change>,
    replica: String,
) where
    T: MakeTlsConnect<Socket> + Clone + Send + 'static,
    T::Stream: Send,
    T::TlsConnect: Send,
    <T::TlsConnect as tokio_postgres::tls::TlsConnect<Socket>>::Future: Send,
{
    let mut connected_before = false;
    loop {
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let (ntx, mut nrx) = tokio::sync::mpsc::unbounded_channel::<String>();
                let driver = tokio::spawn(async move {
                    while let Some(msg) =
                        std::future::poll_fn(|cx| connection.poll_message(cx)).await
                    {
                        match msg {
                            Ok(AsyncMessage::Notification(n)) => {
                                if ntx.send(n.payload().to_owned()).is_err() {
                                    break;
                                }
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                });
                if client
                    .batch_execute(&format!("LISTEN {CHANNEL}"))
                    .await
                    .is_ok()
                {
                    if connected_before {
                        tracing::info!(
                            message = "Store change feed reconnected; resyncing caches."
                        );
                    }
                    connected_before = true;
                    let _ = tx.send(Change::Resync);
                    while let Some(p) = next_notification(&client, &mut nrx, &replica).await {
                        let mut parts = p.splitn(3, '|');
                        let (Some(from), Some(kind), Some(id)) =
                            (parts.next(), parts.next(), parts.next())
                        else {
                            continue;
                        };
                        if from == replica {
                            continue;
                        }
                        let change = match kind {
                            "system" => Change::System(id.to_owned()),
                            "caller" => Change::Caller(id.to_owned()),
                            "meta" => Change::Meta(id.to_owned()),
                            "events" => Change::Events,
                            "quota" => Change::Quota(id.to_owned()),
                            _ => continue,
                        };
                        let _ = tx.send(change);
                    }
                    tracing::warn!(
                        message = "Store change feed lost its connection; reconnecting."
                    );
                }
                driver.abort();
                drop(client);
            }
            Err(e) => {
                tracing::debug!(message = "Store change feed cannot connect.", error = %e);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// After this long without a notification the feed proves it still delivers (a NOTIFY of its
/// own must come back within [`FEED_ECHO`]), or it reconnects and resyncs.
const FEED_QUIET: Duration = Duration::from_secs(5);
/// How long the feed's own NOTIFY may take to come back.
const FEED_ECHO: Duration = Duration::from_secs(10);

/// The next notification's payload; `None` when the feed is dead (closed, or quiet and its own
/// NOTIFY did not come back: a connection that looks alive but no longer delivers).
async fn next_notification(
    client: &tokio_postgres::Client,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    replica: &str,
) -> Option<String> {
    if let Ok(p) = tokio::time::timeout(FEED_QUIET, rx.recv()).await {
        return p;
    }
    let ping = format!("{replica}|ping|-");
    let echo = tokio::time::timeout(FEED_ECHO, async {
        client
            .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &ping])
            .await
            .ok()?;
        rx.recv().await
    })
    .await;
    match echo {
        Ok(Some(p)) => Some(p),
        _ => {
            tracing::warn!(message = "Store change feed went quiet; reconnecting.");
            None
        }
    }
}

/// The first column as bytes; a schema someone changed by hand is an error, not a panic.
fn column(row: &tokio_postgres::Row) -> Result<&[u8], StoreError> {
    column_at(row, 0)
}

fn column_at(row: &tokio_postgres::Row, i: usize) -> Result<&[u8], StoreError> {
    row.try_get::<_, &[u8]>(i)
        .map_err(|e| StoreError::Corrupt(format!("unexpected column: {e}")))
}

/// `pg_try_advisory_lock(key)` on `obj`'s session: that session's backend process id when
/// taken.
async fn try_advisory_lock(
    obj: &deadpool_postgres::Object,
    key: i64,
) -> Result<Option<i32>, StoreError> {
    let row = obj
        .query_one("SELECT pg_try_advisory_lock($1), pg_backend_pid()", &[&key])
        .await
        .map_err(pg)?;
    let taken: bool = row
        .try_get(0)
        .map_err(|e| StoreError::Backend(format!("advisory lock: {e}")))?;
    let session: i32 = row
        .try_get(1)
        .map_err(|e| StoreError::Backend(format!("advisory lock: {e}")))?;
    Ok(taken.then_some(session))
}

/// A system's update, compare-and-swap on its revision, with its change notice.
const UPDATE_SYSTEM: &str = "WITH up AS (UPDATE systems SET revision = $2, record = $3 \
     WHERE system_id = $1 AND revision = $4 RETURNING 1) SELECT pg_notify($5, $6) FROM up";

/// Whether `e` says the session is gone (closed, or ended by the server).
fn session_ended(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.as_db_error()
            .is_some_and(|d| d.parsed_severity() == Some(tokio_postgres::error::Severity::Fatal))
}

/// Each taking of a refresh lock in this process, numbered (see [`super::Fence::serial`]).
static LOCK_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The sessions holding this store's refresh locks, by their fences (see
/// [`CredentialStore::update_system_fenced`]).
type Fenced = Arc<std::sync::Mutex<HashMap<super::Fence, Weak<deadpool_postgres::Object>>>>;

fn lock_key(system_id: &str) -> i64 {
    let d = Sha256::digest(system_id.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    i64::from_be_bytes(b)
}

struct PgLock {
    /// The session that holds the lock (shared only with a fenced write under way).
    obj: Option<Arc<deadpool_postgres::Object>>,
    /// The session, the key and the serial of this taking of the lock.
    fence: super::Fence,
    /// Given back once the connection is back in the pool.
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Where fenced writes find the session; this lock's entry goes with it.
    fenced: Fenced,
}

/// How long [`PgLock`]'s liveness check waits for its session's answer.
const LOCK_CHECK: Duration = Duration::from_secs(2);

#[async_trait]
impl super::LockGuard for PgLock {
    fn fence(&self) -> Option<super::Fence> {
        Some(self.fence)
    }

    /// The session that took the lock still answers: it holds the lock (nothing else unlocks
    /// it). A session that does not answer within [`LOCK_CHECK`] counts as lost.
    async fn still_held(&self) -> bool {
        let Some(obj) = &self.obj else {
            return false;
        };
        if obj.is_closed() {
            return false;
        }
        matches!(
            tokio::time::timeout(LOCK_CHECK, obj.simple_query("SELECT 1")).await,
            Ok(Ok(_))
        )
    }
}

impl Drop for PgLock {
    fn drop(&mut self) {
        crate::util::sync::lock(&self.fenced).remove(&self.fence);
        if let Some(obj) = self.obj.take() {
            let (key, slot) = (self.fence.key, self.slot.take());
            // Unlock before the connection goes back to the pool; if this fails the connection
            // is dropped instead, which ends the session and its locks.
            tokio::spawn(async move {
                let _slot = slot;
                if obj
                    .execute("SELECT pg_advisory_unlock($1)", &[&key])
                    .await
                    .is_err()
                {
                    if let Ok(obj) = Arc::try_unwrap(obj) {
                        let _ = deadpool_postgres::Object::take(obj);
                    }
                }
            });
        }
    }
}

#[async_trait]
impl CredentialStore for PostgresStore {
    async fn get_system(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        let rows = self
            .rows(
                "SELECT record FROM systems WHERE system_id = $1",
                &[&system_id],
            )
            .await?;
        rows.first()
            .map(|r| decode_keyed(system_id.as_bytes(), column(r)?))
            .transpose()
    }

    async fn get_system_fresh(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        self.get_system(system_id).await
    }

    async fn list_systems(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SystemRecord>, StoreError> {
        // Undecodable rows are left out.
        super::fill_page(after, limit, |cursor, want| async move {
            let rows = self.system_rows(cursor.as_deref(), want).await?;
            let mut batch = super::Batch {
                accepted: Vec::new(),
                last_key: None,
                rows: rows.len(),
            };
            for r in &rows {
                let key: &str = r
                    .try_get(0)
                    .map_err(|e| StoreError::Corrupt(format!("unexpected column: {e}")))?;
                batch
                    .accepted
                    .extend(decode_listed("system", key.as_bytes(), column_at(r, 1)?));
                batch.last_key = Some(key.to_owned());
            }
            Ok(batch)
        })
        .await
    }

    async fn insert_system(&self, record: &SystemRecord) -> Result<(), StoreError> {
        let bytes = encode(record)?;
        let rev = i64::try_from(record.revision).unwrap_or(i64::MAX);
        let n = self
            .rows(
                "WITH ins AS (INSERT INTO systems (system_id, revision, record) VALUES ($1, $2, $3) \
                 ON CONFLICT (system_id) DO NOTHING RETURNING 1) \
                 SELECT pg_notify($4, $5) FROM ins",
                &[&record.system_id, &rev, &bytes, &CHANNEL, &self.payload("system", &record.system_id)],
            )
            .await?
            .len();
        if n == 0 {
            return Err(StoreError::AlreadyExists);
        }
        Ok(())
    }

    async fn update_system(
        &self,
        record: &SystemRecord,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        let obj = self.client().await?;
        match self.update_on(&obj, record, expected_revision).await? {
            Ok(true) => Ok(()),
            Ok(false) => Err(StoreError::Conflict),
            Err(e) => Err(pg(e)),
        }
    }

    /// Made on the lock's own session: while that session lives it holds the lock (nothing
    /// else unlocks it), and a session that ended takes the write with it. A lock this store
    /// no longer holds, or whose session is gone, is [`StoreError::LockLost`].
    async fn update_system_fenced(
        &self,
        record: &SystemRecord,
        expected_revision: u64,
        fence: super::Fence,
    ) -> Result<(), StoreError> {
        let held = crate::util::sync::lock(&self.fenced)
            .get(&fence)
            .and_then(std::sync::Weak::upgrade);
        let Some(session) = held else {
            return Err(StoreError::LockLost);
        };
        match self.update_on(&session, record, expected_revision).await? {
            Ok(true) => Ok(()),
            Ok(false) => Err(StoreError::Conflict),
            Err(e) if session_ended(&e) || session.is_closed() => {
                // The session may have ended after the commit, before its answer: then the
                // write landed under the lock (this revision with this sealing is stored).
                match self.get_system(&record.system_id).await {
                    Ok(Some(stored))
                        if stored.revision == record.revision
                            && stored.sealed_credential == record.sealed_credential =>
                    {
                        Ok(())
                    }
                    _ => Err(StoreError::LockLost),
                }
            }
            Err(e) => Err(pg(e)),
        }
    }

    async fn delete_system(&self, system_id: &str) -> Result<bool, StoreError> {
        let n = self
            .rows(
                "WITH d AS (DELETE FROM systems WHERE system_id = $1 RETURNING 1) \
                 SELECT pg_notify($2, $3) FROM d",
                &[&system_id, &CHANNEL, &self.payload("system", system_id)],
            )
            .await?
            .len();
        Ok(n > 0)
    }

    async fn count_systems(&self) -> Result<usize, StoreError> {
        let rows = self.rows("SELECT count(*) FROM systems", &[]).await?;
        let n: i64 = rows
            .first()
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("count: {e}")))?
            .unwrap_or(0);
        Ok(usize::try_from(n).unwrap_or(0))
    }

    async fn list_callers(&self) -> Result<Vec<CallerRecord>, StoreError> {
        let rows = self
            .rows("SELECT name, record FROM callers ORDER BY name", &[])
            .await?;
        let mut out = Vec::new();
        for r in &rows {
            let key: &str = r
                .try_get(0)
                .map_err(|e| StoreError::Corrupt(format!("unexpected column: {e}")))?;
            out.extend(decode_listed("caller", key.as_bytes(), column_at(r, 1)?));
        }
        Ok(out)
    }

    async fn insert_caller(&self, record: &CallerRecord) -> Result<(), StoreError> {
        self.write_caller(
            "WITH ins AS (INSERT INTO callers (name, record) VALUES ($1, $2) \
             ON CONFLICT (name) DO NOTHING RETURNING 1) SELECT pg_notify($3, $4) FROM ins",
            record,
            StoreError::AlreadyExists,
        )
        .await
    }

    async fn update_caller(&self, record: &CallerRecord) -> Result<(), StoreError> {
        self.write_caller(
            "WITH up AS (UPDATE callers SET record = $2 WHERE name = $1 RETURNING 1) \
             SELECT pg_notify($3, $4) FROM up",
            record,
            StoreError::Conflict,
        )
        .await
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let rows = self
            .rows("SELECT value FROM meta WHERE key = $1", &[&key])
            .await?;
        rows.first()
            .map(|r| column(r).map(<[u8]>::to_vec))
            .transpose()
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.rows(
            "WITH m AS (INSERT INTO meta (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value RETURNING 1) \
             SELECT pg_notify($3, $4) FROM m",
            &[&key, &value, &CHANNEL, &self.payload("meta", key)],
        )
        .await?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // Every statement above commits before it returns (synchronous_commit as configured).
        Ok(())
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn lock_refresh(
        &self,
        system_id: &str,
        wait: Duration,
    ) -> Result<Option<RefreshLock>, StoreError> {
        let key = lock_key(system_id);
        let deadline = tokio::time::Instant::now() + wait;
        // An administrative operation's lock (a key rotation, a caller's revocation: ids that
        // start with `~`, which no system has; one at a time per replica) takes no refresh
        // slot, so refreshes that hold every slot cannot keep an admin from revoking a caller.
        let slot = if system_id.starts_with('~') {
            None
        } else {
            let slots = self.lock_slots.clone().acquire_owned();
            match tokio::time::timeout_at(deadline, slots).await {
                Ok(Ok(slot)) => Some(slot),
                Ok(Err(_)) | Err(_) => {
                    return Err(StoreError::Backend(
                        "too many refreshes hold this replica's refresh locks; retry shortly"
                            .to_owned(),
                    ))
                }
            }
        };
        let obj = self.client().await?;
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(session) = try_advisory_lock(&obj, key).await? {
                let obj = Arc::new(obj);
                let fence = super::Fence {
                    session,
                    key,
                    serial: LOCK_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                };
                crate::util::sync::lock(&self.fenced).insert(fence, Arc::downgrade(&obj));
                return Ok(Some(RefreshLock::losable(PgLock {
                    obj: Some(obj),
                    fence,
                    slot,
                    fenced: self.fenced.clone(),
                })));
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(StoreError::Backend(if slot.is_none() {
                    "another replica holds this operation's lock for too long; retry".to_owned()
                } else {
                    "another replica holds this system's refresh lock for too long".to_owned()
                }));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        Some(self.changes.subscribe())
    }

    /// One transaction under a transaction-level advisory lock: sequence numbers follow commit
    /// order, so a reader that has seen `seq` never later finds a smaller one appear.
    async fn append_events(&self, events: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        self.append_events_now(events).await
    }

    async fn events_after(&self, seq: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = self
            .rows(
                "SELECT seq, at, body FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&to_i64(seq), &to_i64(limit as u64)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let num = |i| {
                    r.try_get::<_, i64>(i)
                        .map(|v| u64::try_from(v).unwrap_or(0))
                        .map_err(|e| StoreError::Corrupt(format!("unexpected column: {e}")))
                };
                Ok(StoredEvent {
                    seq: num(0)?,
                    at: num(1)?,
                    body: column_at(r, 2)?.to_vec(),
                })
            })
            .collect()
    }

    async fn last_event_seq(&self) -> Result<u64, StoreError> {
        let rows = self
            .rows("SELECT COALESCE(MAX(seq), 0)::BIGINT FROM events", &[])
            .await?;
        let v: i64 = rows
            .first()
            .ok_or_else(|| StoreError::Corrupt("no row".to_owned()))?
            .try_get(0)
            .map_err(|e| StoreError::Corrupt(format!("unexpected column: {e}")))?;
        Ok(u64::try_from(v).unwrap_or(0))
    }

    async fn take_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        // A racing taker waits for the row's lock, then finds it gone.
        let rows = self
            .rows(
                "WITH m AS (DELETE FROM meta WHERE key = $1 RETURNING value) \
                 SELECT m.value, pg_notify($2, $3) FROM m",
                &[&key, &CHANNEL, &self.payload("meta", key)],
            )
            .await?;
        let taken = rows
            .first()
            .map(|r| column(r).map(<[u8]>::to_vec))
            .transpose()?;
        Ok(taken.filter(|v| !v.is_empty()))
    }

    async fn init_meta(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.rows(
            "WITH m AS (INSERT INTO meta (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO NOTHING RETURNING 1) \
             SELECT pg_notify($3, $4) FROM m",
            &[&key, &value, &CHANNEL, &self.payload("meta", key)],
        )
        .await?;
        Ok(self.get_meta(key).await?.unwrap_or_default())
    }

    async fn broadcast_quota(&self, payload: &str) -> Result<(), StoreError> {
        let obj = self.client().await?;
        obj.execute(
            "SELECT pg_notify($1, $2)",
            &[&CHANNEL, &self.payload("quota", payload)],
        )
        .await
        .map_err(pg)?;
        Ok(())
    }

    /// A session-level advisory lock on a connection of its own, pinged every two seconds: when
    /// the connection dies (and with it the lock), the lead is lost and another replica takes it.
    async fn try_lead(&self, duty: &str) -> Result<Option<super::Lead>, StoreError> {
        let key = lock_key(&format!("lead/{duty}"));
        let obj = self.client().await?;
        // The server drops this session (and the lock) within ~15 s of this process vanishing
        // (a dead host, a cut network), so another replica takes the lead: not after the
        // kernel's two-hour keepalive.
        let _ = obj
            .batch_execute(
                "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 3; \
                 SET tcp_keepalives_count = 3",
            )
            .await;
        if try_advisory_lock(&obj, key).await?.is_none() {
            return Ok(None);
        }
        let (lost_tx, lost) = tokio::sync::watch::channel(false);
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => {
                        if obj.execute("SELECT pg_advisory_unlock($1)", &[&key]).await.is_err() {
                            let _ = deadpool_postgres::Object::take(obj);
                        }
                        return;
                    }
                    _ = tokio::time::sleep(LEAD_PING) => {}
                }
                let alive = tokio::time::timeout(LEAD_PING * 2, obj.simple_query("SELECT 1")).await;
                if !matches!(alive, Ok(Ok(_))) {
                    let _ = lost_tx.send(true);
                    let _ = deadpool_postgres::Object::take(obj);
                    return;
                }
            }
        });
        Ok(Some(super::Lead::new(lost, stop)))
    }
}

impl PostgresStore {
    /// [`UPDATE_SYSTEM`] for `record` on `client`'s session: whether it wrote (a revision other
    /// than `expected_revision` stored is no write), or the database's error as it came.
    async fn update_on(
        &self,
        client: &tokio_postgres::Client,
        record: &SystemRecord,
        expected_revision: u64,
    ) -> Result<Result<bool, tokio_postgres::Error>, StoreError> {
        let bytes = encode(record)?;
        let rev = i64::try_from(record.revision).unwrap_or(i64::MAX);
        let expected = i64::try_from(expected_revision).unwrap_or(i64::MAX);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
            &record.system_id,
            &rev,
            &bytes,
            &expected,
            &CHANNEL,
            &self.payload("system", &record.system_id),
        ];
        Ok(client
            .query(UPDATE_SYSTEM, &params)
            .await
            .map(|rows| !rows.is_empty()))
    }

    async fn append_events_now(&self, events: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        let mut obj = self.client().await?;
        let tx = obj.transaction().await.map_err(pg)?;
        // A holder that died mid-append (its session not yet reaped) costs seconds, not a
        // stall; the statements are bounded by the server, the commit is never cut off here (a
        // commit cut off may have landed, and a retry would store the events twice).
        tx.batch_execute("SET LOCAL lock_timeout = '5s'; SET LOCAL statement_timeout = '10s'")
            .await
            .map_err(pg)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&EVENTS_LOCK])
            .await
            .map_err(pg)?;
        let last: i64 = tx
            .query_one("SELECT COALESCE(MAX(seq), 0)::BIGINT FROM events", &[])
            .await
            .map_err(pg)?
            .try_get(0)
            .map_err(|e| StoreError::Corrupt(format!("unexpected column: {e}")))?;
        let ats: Vec<i64> = events.iter().map(|(at, _)| to_i64(*at)).collect();
        let bodies: Vec<&[u8]> = events.iter().map(|(_, b)| b.as_slice()).collect();
        tx.execute(
            "INSERT INTO events (seq, at, body) SELECT $1 + t.i, t.a, t.b \
             FROM UNNEST($2::BIGINT[], $3::BYTEA[]) WITH ORDINALITY AS t(a, b, i)",
            &[&last, &ats, &bodies],
        )
        .await
        .map_err(pg)?;
        let newest = last + to_i64(events.len() as u64);
        let cutoff = to_i64(crate::model::unix_now().saturating_sub(super::EVENT_RETENTION_SECS));
        tx.execute(
            // The newest stays whatever its age: sequence numbers never go back.
            "DELETE FROM events WHERE (seq <= $1 OR at < $2) AND seq < $3",
            &[
                &(newest - to_i64(super::MAX_STORED_EVENTS)),
                &cutoff,
                &newest,
            ],
        )
        .await
        .map_err(pg)?;
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&CHANNEL, &self.payload("events", &newest.to_string())],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)
    }
}

/// How often a held lead proves its connection alive.
const LEAD_PING: Duration = Duration::from_secs(2);
/// Transaction-level advisory lock serialising event appends ("credevnt").
const EVENTS_LOCK: i64 = 0x6372_6564_6576_6e74;

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(url: &str) -> tokio_postgres::config::SslMode {
        let mut config: tokio_postgres::Config = url.parse().unwrap();
        require_tls_off_loopback(url, &mut config);
        config.get_ssl_mode()
    }

    #[test]
    fn a_database_starting_or_stopping_is_unavailable_and_a_refusal_is_not() {
        use tokio_postgres::error::SqlState;
        for waits in [
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CONNECTION_FAILURE,
            SqlState::CONNECTION_EXCEPTION,
            SqlState::CONNECTION_DOES_NOT_EXIST,
            SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            // PgBouncer's, whatever its cause.
            SqlState::PROTOCOL_VIOLATION,
            SqlState::TOO_MANY_CONNECTIONS,
        ] {
            assert!(unavailable(&waits), "{waits:?}");
        }
        for refuses in [
            SqlState::INVALID_PASSWORD,
            SqlState::INVALID_CATALOG_NAME,
            SqlState::UNIQUE_VIOLATION,
            SqlState::QUERY_CANCELED,
            SqlState::DATABASE_DROPPED,
        ] {
            assert!(!unavailable(&refuses), "{refuses:?}");
        }
    }

    #[test]
    fn tls_is_required_off_loopback_unless_the_url_says_otherwise() {
        use tokio_postgres::config::SslMode;
        assert_eq!(
            mode("postgres://u@db.example.com/credbroker"),
            SslMode::Require
        );
        assert_eq!(mode("postgres://u@10.0.0.5:5432/c"), SslMode::Require);
        assert_eq!(mode("host=db.internal user=u dbname=c"), SslMode::Require);
        assert_eq!(
            mode("postgres://u@db.example.com/c?sslmode=disable"),
            SslMode::Disable
        );
        assert_eq!(
            mode("postgres://u@db.example.com/c?sslmode=prefer"),
            SslMode::Prefer
        );
        assert_eq!(mode("postgres://u@127.0.0.1/c"), SslMode::Prefer);
        assert_eq!(mode("postgres://u@localhost/c"), SslMode::Prefer);
        assert_eq!(mode("postgres://u@[::1]:5432/c"), SslMode::Prefer);
        assert_eq!(mode("host=/var/run/postgresql user=u"), SslMode::Prefer);
        // Only the parameter counts, and an address given beside a name is what is dialled.
        assert_eq!(
            mode("postgres://sslmode_ro@db.example.com/sslmode"),
            SslMode::Require
        );
        assert_eq!(
            mode("host=localhost hostaddr=10.1.2.3 user=u"),
            SslMode::Require
        );
        assert_eq!(
            mode("host=db.internal sslmode=disable user=u"),
            SslMode::Disable
        );
    }
}
