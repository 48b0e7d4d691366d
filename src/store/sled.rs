//! [`SledStore`]: the embedded default store, one sled database under the data directory.
//!
//! sled holds an exclusive file lock on its directory, so a second broker on the same data
//! directory fails at open with [`OpenError::Locked`]. Writes are made durable with an explicit
//! flush on a blocking thread before any mutating call returns; sled's own limits (it uses
//! `sync_file_range`, not `fsync`, for its log) are documented in docs/operations.md.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use super::{
    decode, decode_keyed, decode_listed, encode, CredentialStore, StoreError, StoredEvent,
};
use crate::model::{CallerRecord, SystemRecord};

/// The sled-backed store.
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    systems: sled::Tree,
    callers: sled::Tree,
    meta: sled::Tree,
    events: sled::Tree,
    flushes: Arc<GroupCommit>,
    /// The page cache it was opened with, MiB (a reopen keeps it).
    cache_mib: u64,
    /// Systems whose last write was not made durable (its flush failed), with what the tree
    /// held before it (`None`: nothing). sled applies a write in memory before the flush, so
    /// reads would find a write the disk does not have (a full disk) and that a reopen drops:
    /// they answer what was there before instead, until a flush succeeds (which makes the
    /// write durable after all) or the store is reopened from disk.
    unsure: Arc<std::sync::Mutex<Unsure>>,
}

type Unsure = std::collections::HashMap<Vec<u8>, Option<sled::IVec>>;

/// Group commit: writers that finish while a flush is running share the next one, instead of
/// each paying for its own (one flush makes every write before it durable).
#[derive(Default)]
struct GroupCommit {
    /// Held by the writer that flushes.
    flushing: tokio::sync::Mutex<()>,
    /// Writes that asked to be made durable so far.
    requested: std::sync::atomic::AtomicU64,
    /// Every request up to this one is durable.
    durable: std::sync::atomic::AtomicU64,
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process holds the data directory.
    #[error("data directory {0} is in use by another credbroker process")]
    Locked(PathBuf),
    /// Any other failure.
    #[error("cannot open the store in {path}: {detail}")]
    Other {
        /// The store directory.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").finish_non_exhaustive()
    }
}

impl SledStore {
    /// The store's directory inside a data directory.
    pub fn path_in(data_dir: &Path) -> PathBuf {
        data_dir.join("store")
    }

    /// True when a store already exists in `data_dir`.
    pub fn exists_in(data_dir: &Path) -> bool {
        Self::path_in(data_dir).join("conf").exists() || Self::path_in(data_dir).join("db").exists()
    }

    /// Opens (or creates) the store in `data_dir/store` with the default page cache.
    pub fn open(data_dir: &Path) -> Result<Self, OpenError> {
        Self::open_with_cache(data_dir, DEFAULT_CACHE_MIB)
    }

    /// Opens (or creates) the store in `data_dir/store`; sled's page cache holds pages of at
    /// most `cache_mib` MiB (their size on disk: the memory they take can be more). Its own
    /// default, 1 GiB, would keep every row ever read or written.
    pub fn open_with_cache(data_dir: &Path, cache_mib: u64) -> Result<Self, OpenError> {
        let path = Self::path_in(data_dir);
        check_cache_mib(cache_mib).map_err(|detail| OpenError::Other {
            path: path.clone(),
            detail,
        })?;
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(cache_mib << 20)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("lock") =>
                {
                    OpenError::Locked(data_dir.to_path_buf())
                }
                other => OpenError::Other {
                    path: path.clone(),
                    detail: other.to_string(),
                },
            })?;
        let tree = |name: &str| {
            db.open_tree(name).map_err(|e| OpenError::Other {
                path: path.clone(),
                detail: e.to_string(),
            })
        };
        let store = Self {
            systems: tree("systems")?,
            callers: tree("callers")?,
            meta: tree("meta")?,
            events: tree("events")?,
            flushes: Arc::default(),
            cache_mib,
            unsure: Arc::default(),
            db,
        };
        tracing::info!(message = "Store opened.", store = "sled", cache_mib);
        Ok(store)
    }

    /// Returns once the writes made before the call are on disk. A flush started after this
    /// call's request covers it, so a writer that finds one already done returns at once.
    async fn durable(&self) -> Result<(), StoreError> {
        self.durable_or(|_| {}).await
    }

    /// [`Self::durable`] for a write to system `key`, which held `before`: if its flush fails, the
    /// write is unsure (see `unsure`).
    async fn system_durable(
        &self,
        key: &[u8],
        before: Option<sled::IVec>,
    ) -> Result<(), StoreError> {
        let key = key.to_vec();
        self.durable_or(move |unsure| {
            unsure.entry(key).or_insert(before);
        })
        .await
    }

    /// [`Self::durable`]; `failed` runs on the unsure systems when the flush fails, under the
    /// flush turn (so a later flush that succeeds, and clears them, comes after it).
    ///
    /// The write is already in sled's memory, so the flush and its accounting run on a task of
    /// their own: a caller that leaves (a deadline, a disconnect) leaves them to finish. Before,
    /// a failed flush whose caller had left recorded nothing, and reads answered the write the
    /// disk did not have until a reopen dropped it.
    async fn durable_or(
        &self,
        failed: impl FnOnce(&mut Unsure) + Send + 'static,
    ) -> Result<(), StoreError> {
        let (db, g, unsure) = (self.db.clone(), self.flushes.clone(), self.unsure.clone());
        // Counted now, right after the write: a flush that starts before the task runs covers it.
        let mine = g.requested.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::spawn(async move { flush_turn(&db, &g, &unsure, mine, failed).await })
            .await
            .map_err(|e| StoreError::Backend(format!("flush task: {e}")))?
    }

    /// What a read of system `key` answers while its last write is unsure, if it is.
    fn unsure_system(&self, key: &[u8]) -> Option<Option<sled::IVec>> {
        crate::util::sync::lock(&self.unsure).get(key).cloned()
    }
}

/// One writer's turn at [`SledStore::durable_or`], its request counted as `mine`: returns once
/// the writes made before it are on disk. A flush started after the request covers it, so a
/// writer that finds one already done returns at once.
async fn flush_turn(
    db: &sled::Db,
    g: &GroupCommit,
    unsure: &std::sync::Mutex<Unsure>,
    mine: u64,
    failed: impl FnOnce(&mut Unsure),
) -> Result<(), StoreError> {
    let _turn = g.flushing.lock().await;
    if g.durable.load(Ordering::SeqCst) >= mine {
        return Ok(());
    }
    // Every request counted so far was made after its write: this flush covers them all.
    let upto = g.requested.load(Ordering::SeqCst);
    let db = db.clone();
    let flushed = tokio::task::spawn_blocking(move || db.flush())
        .await
        .map_err(|e| StoreError::Backend(format!("flush task: {e}")))
        .and_then(|r| r.map_err(backend));
    let mut unsure = crate::util::sync::lock(unsure);
    match flushed {
        Ok(_) => {
            // Everything in memory is on disk now, the unsure writes too.
            unsure.clear();
            g.durable.fetch_max(upto, Ordering::SeqCst);
            Ok(())
        }
        Err(e) => {
            failed(&mut unsure);
            Err(e)
        }
    }
}

fn backend(e: sled::Error) -> StoreError {
    match &e {
        sled::Error::Io(io)
            if io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28) =>
        {
            StoreError::Full(e.to_string())
        }
        _ => StoreError::Backend(e.to_string()),
    }
}

#[async_trait]
impl CredentialStore for SledStore {
    async fn get_system(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        let key = system_id.as_bytes();
        let stored = match self.unsure_system(key) {
            Some(before) => before,
            None => self.systems.get(key).map_err(backend)?,
        };
        match stored {
            Some(v) => Ok(Some(decode_keyed(system_id.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    async fn get_system_fresh(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        self.get_system(system_id).await
    }

    async fn list_systems(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SystemRecord>, StoreError> {
        let iter = match after {
            Some(a) => self.systems.range::<&[u8], _>((
                std::ops::Bound::Excluded(a.as_bytes()),
                std::ops::Bound::Unbounded,
            )),
            None => self.systems.iter(),
        };
        let mut out = Vec::new();
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(backend)?;
            // A write not made durable is listed as it was before (a failed delete's system
            // is not listed again: it is read whole by `get_system`).
            match self.unsure_system(&k) {
                Some(Some(before)) => out.extend(decode_listed("system", &k, &before)),
                Some(None) => {}
                None => out.extend(decode_listed("system", &k, &v)),
            }
        }
        Ok(out)
    }

    async fn insert_system(&self, record: &SystemRecord) -> Result<(), StoreError> {
        let bytes = encode(record)?;
        let res = self
            .systems
            .compare_and_swap(
                record.system_id.as_bytes(),
                None as Option<&[u8]>,
                Some(bytes),
            )
            .map_err(backend)?;
        if res.is_err() {
            return Err(StoreError::AlreadyExists);
        }
        self.system_durable(record.system_id.as_bytes(), None).await
    }

    async fn update_system_fenced(
        &self,
        record: &SystemRecord,
        expected_revision: u64,
        fence: super::Fence,
    ) -> Result<(), StoreError> {
        // This store's locks live in the process: they cannot be lost.
        let _ = fence;
        self.update_system(record, expected_revision).await
    }

    async fn update_system(
        &self,
        record: &SystemRecord,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        let key = record.system_id.as_bytes();
        let current = self
            .systems
            .get(key)
            .map_err(backend)?
            .ok_or(StoreError::Conflict)?;
        let decoded: SystemRecord = decode(&current)?;
        if decoded.revision != expected_revision {
            return Err(StoreError::Conflict);
        }
        let bytes = encode(record)?;
        self.systems
            .compare_and_swap(key, Some(&current), Some(bytes))
            .map_err(backend)?
            .map_err(|_| StoreError::Conflict)?;
        self.system_durable(key, Some(current)).await
    }

    async fn delete_system(&self, system_id: &str) -> Result<bool, StoreError> {
        let before = self.systems.remove(system_id.as_bytes()).map_err(backend)?;
        let existed = before.is_some();
        self.system_durable(system_id.as_bytes(), before).await?;
        Ok(existed)
    }

    async fn count_systems(&self) -> Result<usize, StoreError> {
        Ok(self.systems.len())
    }

    async fn count_callers(&self) -> Result<usize, StoreError> {
        Ok(self.callers.len())
    }

    async fn list_callers(&self) -> Result<Vec<CallerRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.callers.iter() {
            let (k, v) = item.map_err(backend)?;
            out.extend(decode_listed("caller", &k, &v));
        }
        Ok(out)
    }

    async fn insert_caller(&self, record: &CallerRecord) -> Result<(), StoreError> {
        let bytes = encode(record)?;
        self.callers
            .compare_and_swap(record.name.as_bytes(), None as Option<&[u8]>, Some(bytes))
            .map_err(backend)?
            .map_err(|_| StoreError::AlreadyExists)?;
        self.durable().await
    }

    async fn update_caller(&self, record: &CallerRecord) -> Result<(), StoreError> {
        let key = record.name.as_bytes();
        let current = self
            .callers
            .get(key)
            .map_err(backend)?
            .ok_or(StoreError::Conflict)?;
        self.callers
            .compare_and_swap(key, Some(current), Some(encode(record)?))
            .map_err(backend)?
            .map_err(|_| StoreError::Conflict)?;
        self.durable().await
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .meta
            .get(key.as_bytes())
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.meta.insert(key.as_bytes(), value).map_err(backend)?;
        self.durable().await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.durable().await
    }

    /// One appender at a time (the broker's event publisher): the next key is the last plus one.
    async fn append_events(&self, events: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        let last = match self.events.last().map_err(backend)? {
            Some((k, _)) => seq_of(&k)?,
            None => 0,
        };
        let mut batch = sled::Batch::default();
        for (i, (at, body)) in events.iter().enumerate() {
            let mut v = at.to_be_bytes().to_vec();
            v.extend_from_slice(body);
            batch.insert(&(last + 1 + i as u64).to_be_bytes(), v);
        }
        let newest = last + events.len() as u64;
        let oldest_kept = newest.saturating_sub(super::MAX_STORED_EVENTS);
        let cutoff = crate::model::unix_now().saturating_sub(super::EVENT_RETENTION_SECS);
        for item in self.events.range(..(oldest_kept + 1).to_be_bytes()) {
            batch.remove(item.map_err(backend)?.0);
        }
        for item in self.events.iter() {
            let (k, v) = item.map_err(backend)?;
            // The newest stays whatever its age: sequence numbers never go back.
            if event_at(&v) >= cutoff || seq_of(&k)? >= newest {
                break;
            }
            batch.remove(k);
        }
        self.events.apply_batch(batch).map_err(backend)?;
        // A failed flush is an error: sled then refuses every write until the store is
        // reopened from disk, where these events are not, so the retry appends them once.
        self.durable().await
    }

    async fn events_after(&self, seq: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let mut out = Vec::new();
        for item in self.events.range((seq.saturating_add(1)).to_be_bytes()..) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(backend)?;
            out.push(StoredEvent {
                seq: seq_of(&k)?,
                at: event_at(&v),
                body: v.get(8..).unwrap_or_default().to_vec(),
            });
        }
        Ok(out)
    }

    async fn last_event_seq(&self) -> Result<u64, StoreError> {
        match self.events.last().map_err(backend)? {
            Some((k, _)) => seq_of(&k),
            None => Ok(0),
        }
    }

    async fn take_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let taken = self
            .meta
            .remove(key.as_bytes())
            .map_err(backend)?
            .filter(|v| !v.is_empty())
            .map(|v| v.to_vec());
        self.durable().await?;
        Ok(taken)
    }

    async fn init_meta(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let _ = self
            .meta
            .compare_and_swap(key.as_bytes(), None as Option<&[u8]>, Some(value))
            .map_err(backend)?;
        self.durable().await?;
        Ok(self
            .meta
            .get(key.as_bytes())
            .map_err(backend)?
            .map(|v| v.to_vec())
            .unwrap_or_default())
    }
}

fn seq_of(key: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt("event key is not a sequence number".to_owned()))
}

fn event_at(v: &[u8]) -> u64 {
    v.get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// sled's page cache by default, MiB: the working set of writes and of the start-up passes.
/// sled's own default (1 GiB) keeps every row ever read or written in memory, while the broker
/// serves from caches of its own (`--store-cache-mib`; docs/benchmarks.md has the trade-off).
pub const DEFAULT_CACHE_MIB: u64 = 32;
/// The smallest page cache, MiB. sled refuses one under 256 bytes (by panicking) and splits
/// the cache over 256 shards: at 4 MiB each shard holds 16 KiB, about one large page.
pub const MIN_CACHE_MIB: u64 = 4;
/// The largest page cache, MiB (1 TiB; sled lowers it to a cgroup's memory limit by itself).
pub const MAX_CACHE_MIB: u64 = 1 << 20;

/// The one check of a page cache size, MiB: for the configuration and for every open.
pub fn check_cache_mib(cache_mib: u64) -> Result<u64, String> {
    if (MIN_CACHE_MIB..=MAX_CACHE_MIB).contains(&cache_mib) {
        Ok(cache_mib)
    } else {
        Err(format!(
            "a store cache of {cache_mib} MiB is outside {MIN_CACHE_MIB}–{MAX_CACHE_MIB} MiB"
        ))
    }
}

/// Free space needed before a failed store is reopened (a few sled segments).
const REOPEN_MIN_FREE_BYTES: u64 = 4 * 1024 * 1024;

/// The broker's sled store as it runs: a [`SledStore`] that reopens itself after a failed write.
///
/// sled remembers the first I/O error of its log (a full disk, say) and fails every later
/// operation with it, even after the cause is gone. So after a write fails, the next write (or
/// the broker's background write probe) waits for in-flight calls to finish, closes the
/// database and opens it again from disk: whatever was acknowledged is there, whatever failed
/// is not, and writes resume without a process restart once space is freed.
pub struct ReopeningSledStore {
    data_dir: PathBuf,
    cache_mib: u64,
    current: tokio::sync::RwLock<Option<Arc<SledStore>>>,
    poisoned: AtomicBool,
    /// Held for as long as the store is: sled's own lock goes while it reopens.
    _lock: DirLock,
}

/// The file a process holding a data directory locks (`flock`) for as long as it uses it: a
/// broker for its whole life, whatever happens to sled's handle (sled's own lock goes while a
/// failed store is reopened), and `credbroker rekey` while it copies.
pub const DIR_LOCK_FILE: &str = "broker.lock";

/// Left in a data directory whose store was copied under a new master key
/// (`credbroker rekey`): a broker neither starts nor reopens its store there.
pub const SUPERSEDED_FILE: &str = "superseded-by";

/// Whether `data_dir` was copied under a new master key: anything at its [`SUPERSEDED_FILE`]
/// counts (a marker its reader cannot read still stops the broker).
pub fn is_superseded(data_dir: &Path) -> bool {
    std::fs::symlink_metadata(data_dir.join(SUPERSEDED_FILE)).is_ok()
}

/// A hold on a data directory ([`DIR_LOCK_FILE`]); let go when dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// Takes the data directory, or [`OpenError::Locked`] while another process holds it.
    pub fn take(data_dir: &Path) -> Result<Self, OpenError> {
        use fs2::FileExt;
        use std::os::unix::fs::OpenOptionsExt;
        let path = data_dir.join(DIR_LOCK_FILE);
        let other = |e: std::io::Error| OpenError::Other {
            path: path.clone(),
            detail: e.to_string(),
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // A link planted in its place must not make a root run create a file elsewhere.
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)
            .map_err(other)?;
        match file.try_lock_exclusive() {
            Ok(()) => Ok(Self { _file: file }),
            Err(e) if e.raw_os_error() == fs2::lock_contended_error().raw_os_error() => {
                Err(OpenError::Locked(data_dir.to_path_buf()))
            }
            Err(e) => Err(other(e)),
        }
    }
}

impl std::fmt::Debug for ReopeningSledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReopeningSledStore")
            .field("poisoned", &self.poisoned.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl ReopeningSledStore {
    /// Wraps a store opened on `data_dir`, which `lock` holds.
    pub fn new(store: SledStore, data_dir: &Path, lock: DirLock) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            cache_mib: store.cache_mib,
            current: tokio::sync::RwLock::new(Some(Arc::new(store))),
            poisoned: AtomicBool::new(false),
            _lock: lock,
        }
    }

    async fn reader(&self) -> Result<Arc<SledStore>, StoreError> {
        if let Some(s) = self.current.read().await.as_ref() {
            return Ok(s.clone());
        }
        self.writer().await
    }

    async fn writer(&self) -> Result<Arc<SledStore>, StoreError> {
        if self.poisoned.load(Ordering::Acquire) {
            self.reopen().await?;
        }
        self.current
            .read()
            .await
            .clone()
            .ok_or_else(|| StoreError::Backend("the store is closed for reopening".to_owned()))
    }

    async fn reopen(&self) -> Result<(), StoreError> {
        let mut current = self.current.write().await;
        if !self.poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        if is_superseded(&self.data_dir) {
            return Err(StoreError::Backend(
                "this data directory was copied under a new master key; not reopened".to_owned(),
            ));
        }
        // Closing sled on a disk that is still full would leave nothing to read from (the
        // reopen needs space too), so wait for room first; meanwhile reads use the old handle.
        let free = fs2::available_space(&self.data_dir).unwrap_or(0);
        if free < REOPEN_MIN_FREE_BYTES {
            return Err(StoreError::Full(format!(
                "{free} bytes free; waiting for {REOPEN_MIN_FREE_BYTES}"
            )));
        }
        if let Some(mut old) = current.take() {
            // In-flight calls hold clones; sled's directory lock goes only with the last one.
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match Arc::try_unwrap(old) {
                    Ok(store) => {
                        let _ = tokio::task::spawn_blocking(move || drop(store)).await;
                        break;
                    }
                    Err(still_shared) => {
                        if tokio::time::Instant::now() > deadline {
                            *current = Some(still_shared);
                            return Err(StoreError::Backend(
                                "store busy; reopen postponed".to_owned(),
                            ));
                        }
                        old = still_shared;
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    }
                }
            }
        }
        // sled lets go of its directory lock when its flusher thread ends, a moment after the
        // last handle is dropped: retry a locked open briefly.
        let mut opened = None;
        for _ in 0..100 {
            let dir = self.data_dir.clone();
            let cache = self.cache_mib;
            match tokio::task::spawn_blocking(move || SledStore::open_with_cache(&dir, cache)).await
            {
                Ok(Err(OpenError::Locked(_))) => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                other => {
                    opened = Some(other);
                    break;
                }
            }
        }
        let Some(opened) = opened else {
            return Err(StoreError::Backend(
                "reopen: the store directory stayed locked".to_owned(),
            ));
        };
        match opened {
            Ok(Ok(store)) => {
                *current = Some(Arc::new(store));
                self.poisoned.store(false, Ordering::Release);
                tracing::warn!(message = "Store reopened after a failed write.");
                Ok(())
            }
            Ok(Err(e)) => Err(StoreError::Backend(format!("reopen: {e}"))),
            Err(e) => Err(StoreError::Backend(format!("reopen task: {e}"))),
        }
    }

    fn note<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if matches!(r, Err(StoreError::Full(_)) | Err(StoreError::Backend(_))) {
            self.poisoned.store(true, Ordering::Release);
        }
        r
    }
}

#[async_trait]
impl CredentialStore for ReopeningSledStore {
    async fn get_system(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        self.reader().await?.get_system(system_id).await
    }

    async fn get_system_fresh(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        self.get_system(system_id).await
    }

    async fn list_systems(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SystemRecord>, StoreError> {
        self.reader().await?.list_systems(after, limit).await
    }

    async fn insert_system(&self, record: &SystemRecord) -> Result<(), StoreError> {
        let r = self.writer().await?.insert_system(record).await;
        self.note(r)
    }

    async fn update_system_fenced(
        &self,
        record: &SystemRecord,
        expected_revision: u64,
        fence: super::Fence,
    ) -> Result<(), StoreError> {
        // This store's locks live in the process: they cannot be lost.
        let _ = fence;
        self.update_system(record, expected_revision).await
    }

    async fn update_system(
        &self,
        record: &SystemRecord,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        let r = self
            .writer()
            .await?
            .update_system(record, expected_revision)
            .await;
        self.note(r)
    }

    async fn delete_system(&self, system_id: &str) -> Result<bool, StoreError> {
        let r = self.writer().await?.delete_system(system_id).await;
        self.note(r)
    }

    async fn count_systems(&self) -> Result<usize, StoreError> {
        self.reader().await?.count_systems().await
    }

    async fn count_callers(&self) -> Result<usize, StoreError> {
        self.reader().await?.count_callers().await
    }

    async fn list_callers(&self) -> Result<Vec<CallerRecord>, StoreError> {
        self.reader().await?.list_callers().await
    }

    async fn insert_caller(&self, record: &CallerRecord) -> Result<(), StoreError> {
        let r = self.writer().await?.insert_caller(record).await;
        self.note(r)
    }

    async fn update_caller(&self, record: &CallerRecord) -> Result<(), StoreError> {
        let r = self.writer().await?.update_caller(record).await;
        self.note(r)
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.reader().await?.get_meta(key).await
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let r = self.writer().await?.put_meta(key, value).await;
        self.note(r)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let r = self.writer().await?.flush().await;
        self.note(r)
    }

    async fn append_events(&self, events: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        let r = self.writer().await?.append_events(events).await;
        self.note(r)
    }

    async fn events_after(&self, seq: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.reader().await?.events_after(seq, limit).await
    }

    async fn last_event_seq(&self) -> Result<u64, StoreError> {
        self.reader().await?.last_event_seq().await
    }

    async fn init_meta(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let r = self.writer().await?.init_meta(key, value).await;
        self.note(r)
    }

    async fn take_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let r = self.writer().await?.take_meta(key).await;
        self.note(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_out_of_range_is_refused_before_sled_sees_it() {
        let dir = tempfile::tempdir().unwrap();
        for mib in [0, MIN_CACHE_MIB - 1, MAX_CACHE_MIB + 1, u64::MAX] {
            match SledStore::open_with_cache(dir.path(), mib) {
                Err(OpenError::Other { detail, .. }) => assert!(detail.contains("MiB"), "{detail}"),
                other => panic!("{mib} MiB: {other:?}"),
            }
        }
        assert!(
            !SledStore::exists_in(dir.path()),
            "a refused open created the store"
        );
    }

    /// A broker whose store failed after its directory was copied under a new key (and marked)
    /// does not reopen it: the copy is where its refreshes must land.
    #[tokio::test]
    async fn a_store_copied_under_a_new_key_is_not_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let lock = DirLock::take(dir.path()).unwrap();
        let store = ReopeningSledStore::new(SledStore::open(dir.path()).unwrap(), dir.path(), lock);
        std::fs::write(dir.path().join(SUPERSEDED_FILE), "/elsewhere\n").unwrap();
        store.poisoned.store(true, Ordering::Release);
        let refused = store.reopen().await.unwrap_err().to_string();
        assert!(
            refused.contains("copied under a new master key"),
            "{refused}"
        );
        assert!(store.poisoned.load(Ordering::Acquire));
        assert!(
            store.current.read().await.is_some(),
            "the old handle was let go"
        );
    }

    /// A link planted at the lock's name is not followed: nothing is made where it points.
    #[test]
    fn a_link_at_the_lock_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&elsewhere, dir.path().join(DIR_LOCK_FILE)).unwrap();
        assert!(matches!(
            DirLock::take(dir.path()),
            Err(OpenError::Other { .. })
        ));
        assert!(!elsewhere.exists());
    }

    /// The directory's lock is one holder's at a time, and free again once dropped.
    #[test]
    fn a_data_directory_is_held_by_one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let held = DirLock::take(dir.path()).unwrap();
        assert!(matches!(
            DirLock::take(dir.path()),
            Err(OpenError::Locked(_))
        ));
        drop(held);
        DirLock::take(dir.path()).unwrap();
    }

    #[tokio::test]
    async fn a_reopened_store_keeps_its_cache_size() {
        let dir = tempfile::tempdir().unwrap();
        let lock = DirLock::take(dir.path()).unwrap();
        let store = ReopeningSledStore::new(
            SledStore::open_with_cache(dir.path(), 5).unwrap(),
            dir.path(),
            lock,
        );
        store.poisoned.store(true, Ordering::Release);
        store.reopen().await.unwrap();
        assert!(!store.poisoned.load(Ordering::Acquire));
        let reopened = store.current.read().await.clone().unwrap();
        assert_eq!(reopened.cache_mib, 5);
    }
}
