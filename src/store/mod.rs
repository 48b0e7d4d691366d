//! The credential store: a trait with three implementations (sled, the embedded default;
//! PostgreSQL, for replicas; memory, for tests), wrapped by the record-authenticating layer and
//! the write monitor, and one conformance suite (`tests/integration/store_conformance.rs`) that
//! every implementation passes.
//!
//! # Key schema
//! - `systems`: system id → [`SystemRecord`] (JSON; metadata in clear, credential sealed).
//! - `callers`: caller name → [`CallerRecord`] (JSON; token kept only as SHA-256).
//! - `meta`: `format_version` → `1`; `kcv/<kek id hex>` → key check value;
//!   `events_epoch` → the event log's epoch; `webhook/<endpoint>` → its delivery cursor.
//! - `events`: sequence number → one system event (JSON, metadata only; see
//!   [`crate::broker::events`]), kept [`EVENT_RETENTION_SECS`] and at most [`MAX_STORED_EVENTS`].
//!
//! # Durability
//! Every mutating method returns only after the change is flushed to disk.

pub mod authenticated;
#[cfg(feature = "fault-injection")]
pub mod faulty;
pub mod memory;
pub mod mirror;
pub mod monitor;
pub mod pending;
pub mod postgres;
pub mod sled;

use async_trait::async_trait;

use crate::error::BrokerError;
use crate::model::{CallerRecord, SystemRecord};

pub use self::authenticated::{AuthenticatedStore, INTEGRITY_META_KEY};
pub use self::memory::MemoryStore;
pub use self::mirror::MirroredStore;
pub use self::monitor::{MonitoredStore, WriteHealth, WRITES_HEALTH_SERVICE};
pub use self::postgres::PostgresStore;
pub use self::sled::{ReopeningSledStore, SledStore};

/// The fewest records a listing that reads past refused ones fetches at a time.
pub(crate) const MIN_BATCH: usize = 64;

/// How long the store keeps events: a day and an hour, so a webhook endpoint retried for a day
/// still finds what it missed.
pub const EVENT_RETENTION_SECS: u64 = 25 * 3600;
/// The most events the store keeps, whatever their age (the bound that keeps a burst, such as
/// 100,000 registrations, from growing the store's cache past the memory budget).
pub const MAX_STORED_EVENTS: u64 = 20_000;

/// One event as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Its position in the log (assigned by the store, increasing in commit order).
    pub seq: u64,
    /// Seconds since the epoch.
    pub at: u64,
    /// The encoded event.
    pub body: Vec<u8>,
}

/// Store format version written into `meta`.
pub const STORE_FORMAT_VERSION: &str = "1";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Insert of an existing key.
    #[error("record already exists")]
    AlreadyExists,
    /// Compare-and-swap lost: the record changed (or vanished) since it was read.
    #[error("record changed concurrently")]
    Conflict,
    /// The disk is full. The message holds no secret.
    #[error("storage full: {0}")]
    Full(String),
    /// The backend failed (I/O, lock). The message holds no secret.
    #[error("storage backend: {0}")]
    Backend(String),
    /// The store cannot be reached (connection refused, lost or timed out): nothing answered.
    /// The message holds no secret.
    #[error("storage unreachable: {0}")]
    Unreachable(String),
    /// A record could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// A record failed authentication: it was written without the master key.
    #[error("record failed authentication: {0}")]
    Tampered(String),
    /// A write fenced by a refresh lock found the lock lost (see
    /// [`CredentialStore::update_system_fenced`]); nothing was written.
    #[error("the refresh lock was lost")]
    LockLost,
}

/// What a caller is told of a store failure (the detail of a backend fault goes to the log).
impl From<StoreError> for BrokerError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Conflict => {
                BrokerError::Unavailable("the record changed concurrently; retry".to_owned())
            }
            StoreError::AlreadyExists => BrokerError::AlreadyExists("record already exists".to_owned()),
            StoreError::Backend(detail) | StoreError::Unreachable(detail) => {
                tracing::error!(message = "Storage operation failed.", error = %detail);
                BrokerError::Unavailable("storage is unavailable; retry later".to_owned())
            }
            StoreError::Full(detail) => {
                tracing::error!(message = "Storage is full.", error = %detail);
                BrokerError::ResourceExhausted(
                    "storage is full; writes are refused until space is freed (tokens are still served)"
                        .to_owned(),
                )
            }
            StoreError::Tampered(detail) => {
                BrokerError::DataLoss(format!("{detail}: the stored record was changed without the master key and is refused; restore it from a backup or register it again"))
            }
            StoreError::Corrupt(detail) => {
                tracing::error!(message = "Stored record is corrupt.", error = %detail);
                BrokerError::DataLoss("a stored record is corrupt".to_owned())
            }
            StoreError::LockLost => BrokerError::Unavailable(
                "this replica lost the system's refresh lock (its database session ended); retry"
                    .to_owned(),
            ),
        }
    }
}

/// Persistent storage for systems, callers and metadata.
#[async_trait]
pub trait CredentialStore: Send + Sync + 'static {
    /// One system, if present.
    async fn get_system(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError>;

    /// One system read from the store itself, never from a copy kept for its outages (a
    /// replica's mirror): what a refresh under the cross-process lock decides on, since a stale
    /// copy's refresh token may be one another replica already spent. [`StoreError::Unreachable`]
    /// when the store does not answer. Wrappers forward it (no default, so none can forget).
    async fn get_system_fresh(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError>;

    /// Up to `limit` systems with ids strictly greater than `after`, in id order.
    async fn list_systems(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SystemRecord>, StoreError>;

    /// Inserts a new system; [`StoreError::AlreadyExists`] when the id is taken. Durable on Ok.
    async fn insert_system(&self, record: &SystemRecord) -> Result<(), StoreError>;

    /// Replaces a system whose stored `revision` equals `expected_revision`; otherwise
    /// [`StoreError::Conflict`]. Durable on Ok.
    async fn update_system(
        &self,
        record: &SystemRecord,
        expected_revision: u64,
    ) -> Result<(), StoreError>;

    /// [`Self::update_system`] made only while `fence`'s refresh lock is still held: a lock
    /// lost meanwhile (its database session ended) answers [`StoreError::LockLost`] and writes
    /// nothing. A store whose locks cannot be lost writes as `update_system` does. Wrappers
    /// forward it (no default, so none can drop the fence).
    async fn update_system_fenced(
        &self,
        record: &SystemRecord,
        expected_revision: u64,
        fence: Fence,
    ) -> Result<(), StoreError>;

    /// Deletes a system; false when it was absent. Durable on Ok.
    async fn delete_system(&self, system_id: &str) -> Result<bool, StoreError>;

    /// Number of systems.
    async fn count_systems(&self) -> Result<usize, StoreError>;

    /// Every caller.
    async fn list_callers(&self) -> Result<Vec<CallerRecord>, StoreError>;

    /// Number of callers stored, counting those [`Self::list_callers`] leaves out (undecodable,
    /// or failing authentication), as [`Self::count_systems`] does: a copy of the store compares
    /// what it copied with it.
    async fn count_callers(&self) -> Result<usize, StoreError> {
        Ok(self.list_callers().await?.len())
    }

    /// Inserts a caller; [`StoreError::AlreadyExists`] when the name is taken. Durable on Ok.
    async fn insert_caller(&self, record: &CallerRecord) -> Result<(), StoreError>;

    /// Replaces a caller (it must exist, else [`StoreError::Conflict`]). Durable on Ok.
    async fn update_caller(&self, record: &CallerRecord) -> Result<(), StoreError>;

    /// A metadata value.
    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Sets a metadata value. Durable on Ok.
    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;

    /// Flushes everything to disk.
    async fn flush(&self) -> Result<(), StoreError>;

    /// True when several broker processes share this store (PostgreSQL): refreshes then go
    /// through [`CredentialStore::lock_refresh`] and issued tokens are shared through the store.
    fn is_shared(&self) -> bool {
        false
    }

    /// Takes the cross-process refresh lock of `system_id`, waiting at most `wait`. `None` means
    /// the store needs none (one process owns it).
    async fn lock_refresh(
        &self,
        _system_id: &str,
        _wait: std::time::Duration,
    ) -> Result<Option<RefreshLock>, StoreError> {
        Ok(None)
    }

    /// Changes made by *other* processes sharing the store, if it is shared.
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
        None
    }

    /// Appends `(at, body)` events to the log under the next sequence numbers, in order (across
    /// processes sharing the store too: sequence order is commit order), and drops events older
    /// than [`EVENT_RETENTION_SECS`] or beyond [`MAX_STORED_EVENTS`]. Durable on Ok.
    async fn append_events(&self, events: &[(u64, Vec<u8>)]) -> Result<(), StoreError>;

    /// Up to `limit` events after `seq`, in order.
    async fn events_after(&self, seq: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError>;

    /// The newest event's sequence number (0: none yet).
    async fn last_event_seq(&self) -> Result<u64, StoreError>;

    /// Stores `value` under `key` unless the key holds one already; returns what the key holds
    /// afterwards. Processes sharing the store that race here all get the same value.
    async fn init_meta(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError>;

    /// Takes `key`'s value and removes the key, atomically: of processes sharing the store that
    /// race here (two replicas handed the same single-use value), one gets it and the others
    /// `None`. A missing or empty value is `None`. Durable on Ok.
    async fn take_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Takes the lead of the background duties named `duty` (the keep-alive sweep, scheduled
    /// checks, webhook deliveries) if no other process sharing the store holds it. `Some` while
    /// this process leads; the lead ends when the [`Lead`] is dropped or its connection is lost.
    async fn try_lead(&self, _duty: &str) -> Result<Option<Lead>, StoreError> {
        Ok(Some(Lead::sole()))
    }

    /// Tells the other processes sharing the store about passing state that is not stored
    /// (quota readings): they receive it as [`Change::Quota`]. Nothing to do for a store no
    /// other process shares.
    async fn broadcast_quota(&self, _payload: &str) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The lead of a background duty: held while this process does it for every process sharing
/// the store. A sole process always leads.
pub struct Lead {
    lost: tokio::sync::watch::Receiver<bool>,
    _guard: Box<dyn Send + Sync>,
}

impl Lead {
    /// The lead of a process that does not share its store.
    pub fn sole() -> Self {
        Self {
            lost: tokio::sync::watch::channel(false).1,
            _guard: Box::new(()),
        }
    }

    /// A lead that ends when `lost` turns true; `guard` releases it on drop.
    pub fn new(
        lost: tokio::sync::watch::Receiver<bool>,
        guard: impl Send + Sync + 'static,
    ) -> Self {
        Self {
            lost,
            _guard: Box::new(guard),
        }
    }

    /// True once the lead was lost (its connection died): the duty must stop.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }
}

impl std::fmt::Debug for Lead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lead")
            .field("lost", &self.is_lost())
            .finish()
    }
}

/// A change another replica made to the shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A system was written or deleted.
    System(String),
    /// A caller was added or changed.
    Caller(String),
    /// A metadata key changed.
    Meta(String),
    /// Events were appended to the log.
    Events,
    /// Another process's quota readings (see `crate::broker::quota`), as it sent them.
    Quota(String),
    /// The change feed (re)connected: changes may have been missed, reload everything.
    Resync,
}

/// A held cross-process refresh lock; dropping it releases the lock.
pub struct RefreshLock(Box<dyn LockGuard>);

/// What a refresh lock holds: released on drop, and asked whether it is still held.
#[async_trait]
pub trait LockGuard: Send + Sync {
    /// Whether the lock is still this process's: a lock that lives in a database session ends
    /// with that session (a cut connection, a restarted server, an administrator's kill).
    async fn still_held(&self) -> bool;

    /// What a write made under the lock carries to land only while the lock is held (`None`:
    /// the lock cannot be lost).
    fn fence(&self) -> Option<Fence> {
        None
    }
}

/// A refresh lock as a write can check it: the database session that holds it and its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The holding session's backend process id.
    pub session: i32,
    /// The lock's key.
    pub key: i64,
    /// Which taking of the lock this is (unique within the process).
    pub serial: u64,
}

/// A guard whose lock cannot be lost while it is held (an in-process lock).
struct Kept<G>(#[allow(dead_code)] G);

#[async_trait]
impl<G: Send + Sync> LockGuard for Kept<G> {
    async fn still_held(&self) -> bool {
        true
    }
}

impl RefreshLock {
    /// Wraps whatever releases the lock on drop, for a lock that is held until then.
    pub fn new(guard: impl Send + Sync + 'static) -> Self {
        Self(Box::new(Kept(guard)))
    }

    /// Wraps a guard whose lock can be lost while held.
    pub fn losable(guard: impl LockGuard + 'static) -> Self {
        Self(Box::new(guard))
    }

    /// See [`LockGuard::still_held`].
    pub async fn still_held(&self) -> bool {
        self.0.still_held().await
    }

    /// See [`LockGuard::fence`].
    pub fn fence(&self) -> Option<Fence> {
        self.0.fence()
    }
}

impl std::fmt::Debug for RefreshLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefreshLock")
    }
}

pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(format!("encode: {e}")))
}

/// A stored key as a log line may show it: someone who can write the store chooses it, so it is
/// cut to 64 characters and escaped.
pub(crate) fn shown_key(key: &str) -> String {
    key.chars().take(64).flat_map(char::escape_debug).collect()
}

/// One batch a listing read: the records it accepted, the key of the last row it read (accepted
/// or not), and how many rows that was.
pub(crate) struct Batch<T> {
    pub accepted: Vec<T>,
    pub last_key: Option<String>,
    pub rows: usize,
}

/// Fills a page of at most `limit` records after `after` from `read` (one batch after a cursor):
/// refused rows leave gaps, so it reads on, at least [`MIN_BATCH`] rows at a time, until the page
/// is full or the rows end. The one rule for every listing that may refuse rows.
pub(crate) async fn fill_page<T, F, Fut>(
    after: Option<&str>,
    limit: usize,
    mut read: F,
) -> Result<Vec<T>, StoreError>
where
    F: FnMut(Option<String>, usize) -> Fut,
    Fut: std::future::Future<Output = Result<Batch<T>, StoreError>>,
{
    let mut out = Vec::new();
    let mut cursor = after.map(str::to_owned);
    while out.len() < limit {
        let want = (limit - out.len()).max(MIN_BATCH);
        let batch = read(cursor.clone(), want).await?;
        out.extend(batch.accepted);
        cursor = batch.last_key.or(cursor);
        if batch.rows < want {
            break;
        }
    }
    out.truncate(limit);
    Ok(out)
}

/// A stored record's key: what the store files it under must be what it says it is (a row
/// copied under another key is refused, not served as the other system).
pub(crate) trait Keyed {
    fn key(&self) -> &str;
}

impl Keyed for SystemRecord {
    fn key(&self) -> &str {
        &self.system_id
    }
}

impl Keyed for CallerRecord {
    fn key(&self) -> &str {
        &self.name
    }
}

/// Decodes the record filed under `key`.
pub(crate) fn decode_keyed<T: serde::de::DeserializeOwned + Keyed>(
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    let v: T = decode(bytes)?;
    if v.key().as_bytes() != key {
        return Err(StoreError::Corrupt(
            "record filed under another key".to_owned(),
        ));
    }
    Ok(v)
}

/// Decodes one record of a listing. An undecodable record is logged by key, counted and left
/// out: one bad record costs only itself, never the listing (nor the broker's start).
pub(crate) fn decode_listed<T: serde::de::DeserializeOwned + Keyed>(
    what: &str,
    key: &[u8],
    bytes: &[u8],
) -> Option<T> {
    match decode_keyed(key, bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            crate::metrics::METRICS.record_refused();
            let shown = shown_key(&String::from_utf8_lossy(key));
            tracing::error!(message = "A stored record cannot be decoded; it is left out.", record = what, id = %shown, error = %e);
            None
        }
    }
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    // serde_json errors name a position, never the content.
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("decode: {e}")))
}
