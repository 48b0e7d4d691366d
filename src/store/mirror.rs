//! Every replica keeps a mirror of the shared store's rows in memory, so that it can serve every
//! system while PostgreSQL is unreachable, not only the systems it happened to serve before.
//!
//! - At start the mirror loads every system and caller (the rows as stored, sealed and tagged:
//!   the record authentication above still checks each one when it is read).
//! - It is kept current from the change feed: a system another replica changed is read again, a
//!   resync (the feed reconnected) reloads everything; this replica's own writes update it when
//!   they commit. Metadata is mirrored as it is read or written.
//! - A reload keeps what this replica wrote while it read (see [`settle`]); a read that overlapped
//!   a write of its row (made here, or heard of from another replica) is not mirrored, since it
//!   may predate the write; a change that cannot be mirrored, or a failed reload, leads to a
//!   reload retried with backoff.
//! - Reads go to the database while it answers. When a read fails for the database's sake, reads
//!   are answered from the mirror for [`DOWN_FOR`] before the database is tried again, once the
//!   broker has started on the mirror ([`MirroredStore::serve_outages`]; before, the mirror holds
//!   none of the keys the broker reads at start). Writes always go to the database, and fail
//!   while it is away. A read that must see the newest record (the re-read under the
//!   cross-replica refresh lock) is [`CredentialStore::get_system_fresh`]: never the mirror.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{Change, CredentialStore, Lead, RefreshLock, StoreError, StoredEvent};
use crate::model::{CallerRecord, SystemRecord};
use crate::util::sync::{lock, read, write};

/// After a read failed for the database's sake, reads are served from memory this long.
const DOWN_FOR: Duration = Duration::from_secs(2);
/// Rows read per page while loading.
const PAGE: usize = 1000;
/// The write-health probe's key: written every second, never worth mirroring.
const WRITE_PROBE: &str = "write_probe";
/// A snapshot older than this is refused (revocations and deletions since would come back).
const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Rows {
    /// Shared rows: a snapshot copies the map, not the records, and writes outside the lock.
    systems: BTreeMap<String, Arc<SystemRecord>>,
    callers: Vec<CallerRecord>,
    meta: HashMap<String, Vec<u8>>,
    /// The event log's newest sequence number seen (where a start from the snapshot begins).
    #[serde(default)]
    last_event_seq: u64,
    /// When the snapshot was written (Unix seconds).
    #[serde(default)]
    written_at: u64,
    /// What this replica wrote while a reload was reading the database (`None`: no reload is
    /// under way).
    #[serde(skip)]
    touched: Option<Touched>,
}

impl Rows {
    /// Notes a row this replica wrote, while a reload is under way.
    fn touch<R>(&mut self, f: impl FnOnce(&mut Touched) -> R) {
        if let Some(t) = self.touched.as_mut() {
            f(t);
        }
    }
}

/// Rows this replica wrote (system ids, caller names, metadata keys) since a reload began: the
/// reload may have read them before the write.
#[derive(Default)]
struct Touched {
    systems: HashSet<String>,
    callers: HashSet<String>,
    meta: HashSet<String>,
}

/// A shared store with every row mirrored in memory (see the module docs).
pub struct MirroredStore {
    inner: Arc<dyn CredentialStore>,
    rows: RwLock<Rows>,
    down_until: Mutex<Option<Instant>>,
    changes: Option<broadcast::Sender<Change>>,
    /// The mirror changed since the last snapshot.
    dirty: std::sync::atomic::AtomicBool,
    /// A change the snapshot should carry at once (a caller changed, a system deleted).
    urgent: Arc<tokio::sync::Notify>,
    /// Writes this replica made, counted per [`Row::bucket`]: a read that overlapped a write of
    /// its row may have read the row before it, and is not mirrored (it would undo a deletion
    /// or a revocation).
    own_writes: Box<[std::sync::atomic::AtomicU64]>,
    /// Whether reads fall back to the mirror while the database is away. Off from
    /// [`MirroredStore::open`] until [`MirroredStore::serve_outages`]: while the broker starts,
    /// the mirror holds none of the keys it reads then (format, key check, key ring), and an
    /// absent key read from it would look like a damaged store or a wrong master key.
    serving: std::sync::atomic::AtomicBool,
    /// Where the snapshot is kept, when it is.
    snapshot_file: std::sync::OnceLock<SnapshotFile>,
}

/// Counters of [`MirroredStore::own_writes`] (rows share them: a write makes an overlapping
/// read of another row of its counter read again, rarely).
const WRITE_BUCKETS: usize = 256;

/// A row, as far as this replica's writes are concerned.
#[derive(Clone, Copy)]
enum Row<'a> {
    System(&'a str),
    /// A caller (the callers are read as one list: one counter).
    Caller(&'a str),
    Meta(&'a str),
}

impl Row<'_> {
    fn bucket(self) -> usize {
        let (tag, key) = match self {
            Row::System(id) => (0u8, id),
            Row::Caller(_) => (1, ""),
            Row::Meta(k) => (2, k),
        };
        // FNV-1a: cheap, and the keys are not chosen to collide by anyone who gains by it.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in std::iter::once(tag).chain(key.bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        (h % WRITE_BUCKETS as u64) as usize
    }
}

/// Where the mirror's snapshot is kept, and the key that seals it (derived from the master key).
#[derive(Clone)]
pub struct SnapshotFile {
    /// The file (under the data directory).
    pub path: std::path::PathBuf,
    /// AES-256-GCM key.
    pub key: crate::crypto::SubKey,
}

/// How new a row is: its credential version (which never repeats, across re-registrations
/// too), then its revision.
fn age(r: &SystemRecord) -> (u64, u64) {
    (r.credential_version, r.revision)
}

/// Additional data of the snapshot's seal.
const SNAPSHOT_AAD: &[u8] = b"credbroker replica snapshot v1";

impl SnapshotFile {
    fn cipher(&self) -> aes_gcm::Aes256Gcm {
        use aes_gcm::KeyInit;
        aes_gcm::Aes256Gcm::new(aes_gcm::Key::<aes_gcm::Aes256Gcm>::from_slice(
            self.key.as_bytes(),
        ))
    }

    /// Seals `rows` (nonce, then ciphertext) and replaces the file atomically.
    fn write(&self, rows: &Rows) -> Result<(), StoreError> {
        use aes_gcm::aead::{Aead, Payload};
        let plain =
            serde_json::to_vec(rows).map_err(|e| StoreError::Corrupt(format!("snapshot: {e}")))?;
        let nonce: [u8; 12] = rand::random();
        let sealed = self
            .cipher()
            .encrypt(
                aes_gcm::Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: SNAPSHOT_AAD,
                },
            )
            .map_err(|_| StoreError::Corrupt("snapshot: could not seal".to_owned()))?;
        let tmp = self.path.with_extension("tmp");
        let io = |e: std::io::Error| StoreError::Backend(format!("snapshot: {e}"));
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(&nonce).map_err(io)?;
            f.write_all(&sealed).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(())
    }

    /// Whether a snapshot file is there.
    pub fn exists(&self) -> bool {
        self.path.is_file()
    }

    /// The rows of the snapshot; an altered file (or another master key's) is refused.
    fn read(&self) -> Result<Rows, StoreError> {
        use aes_gcm::aead::{Aead, Payload};
        let bytes =
            std::fs::read(&self.path).map_err(|e| StoreError::Backend(format!("snapshot: {e}")))?;
        if bytes.len() < 12 {
            return Err(StoreError::Tampered(
                "the replica snapshot is truncated".to_owned(),
            ));
        }
        let (nonce, sealed) = bytes.split_at(12);
        let plain = self
            .cipher()
            .decrypt(
                aes_gcm::Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: SNAPSHOT_AAD,
                },
            )
            .map_err(|_| {
                StoreError::Tampered(
                    "the replica snapshot does not open with this master key".to_owned(),
                )
            })?;
        let rows: Rows = serde_json::from_slice(&plain)
            .map_err(|e| StoreError::Corrupt(format!("snapshot: {e}")))?;
        let age = crate::model::unix_now().saturating_sub(rows.written_at);
        if age > SNAPSHOT_MAX_AGE.as_secs() {
            return Err(StoreError::Corrupt(format!(
                "the replica snapshot is {} h old (at most {} h is served)",
                age / 3600,
                SNAPSHOT_MAX_AGE.as_secs() / 3600
            )));
        }
        Ok(rows)
    }
}

impl MirroredStore {
    /// Mirrors `inner`: loads every system and caller now, then follows its change feed and
    /// (with `snapshot`) writes the mirror to its file every `every` while it changes. It answers
    /// for an unreachable database, and writes snapshots, only after
    /// [`MirroredStore::serve_outages`]: call it once the broker has started on it.
    pub async fn open(
        inner: Arc<dyn CredentialStore>,
        snapshot: Option<(SnapshotFile, Duration)>,
    ) -> Result<Arc<Self>, StoreError> {
        let me = Self::with_rows(inner, Rows::default());
        // Subscribed first: a change made after the reload read its row is heard.
        let feed = me.inner.changes();
        me.reload().await?;
        me.start(feed, snapshot);
        Ok(me)
    }

    /// Starts from the snapshot while `inner` cannot be reached: reads are answered from it
    /// until the database answers (its feed then resyncs the mirror).
    pub fn from_snapshot(
        inner: Arc<dyn CredentialStore>,
        snapshot: SnapshotFile,
        every: Duration,
    ) -> Result<Arc<Self>, StoreError> {
        let rows = snapshot.read()?;
        Ok(Self::serving_rows(inner, snapshot, every, rows))
    }

    /// [`MirroredStore::from_snapshot`], when the snapshot holds exactly the systems and
    /// callers `loaded` holds (`None` when it does not): a start from it then serves what the
    /// loaded mirror would, and brings back no revocation or deletion the mirror has read since
    /// the snapshot was written. The file is read once: the rows compared are the rows served.
    /// `inner` is made only for a start. A change the feed announced but the mirror could not
    /// read yet is not waited for: the snapshot serves what the loaded mirror would serve
    /// through the outage (and the feed's first resync, right after the load, is nearly always
    /// in flight then; refusing for it would refuse nearly every start).
    pub fn from_snapshot_agreeing(
        inner: impl FnOnce() -> Arc<dyn CredentialStore>,
        snapshot: SnapshotFile,
        every: Duration,
        loaded: &MirroredStore,
    ) -> Result<Option<Arc<Self>>, StoreError> {
        let rows = snapshot.read()?;
        if !loaded.holds(&rows) {
            return Ok(None);
        }
        Ok(Some(Self::serving_rows(inner(), snapshot, every, rows)))
    }

    fn serving_rows(
        inner: Arc<dyn CredentialStore>,
        snapshot: SnapshotFile,
        every: Duration,
        rows: Rows,
    ) -> Arc<Self> {
        tracing::warn!(
            message =
                "The store is not answering: serving from this replica's snapshot until it does.",
            systems = rows.systems.len()
        );
        let me = Self::with_rows(inner, rows);
        // The snapshot holds what the broker reads at start: it serves from the first read.
        me.serve_outages();
        *lock(&me.down_until) = Some(Instant::now() + DOWN_FOR);
        me.start(me.inner.changes(), Some((snapshot, every)));
        me
    }

    fn with_rows(inner: Arc<dyn CredentialStore>, rows: Rows) -> Arc<Self> {
        Arc::new(Self {
            changes: inner.changes().map(|_| broadcast::channel(4096).0),
            inner,
            rows: RwLock::new(rows),
            down_until: Mutex::new(None),
            dirty: std::sync::atomic::AtomicBool::new(true),
            urgent: Arc::new(tokio::sync::Notify::new()),
            own_writes: (0..WRITE_BUCKETS)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            serving: std::sync::atomic::AtomicBool::new(false),
            snapshot_file: std::sync::OnceLock::new(),
        })
    }

    fn is_serving(&self) -> bool {
        self.serving.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether `theirs` holds exactly the systems and callers this mirror holds (callers in any
    /// order).
    fn holds(&self, theirs: &Rows) -> bool {
        fn by_name(callers: &[CallerRecord]) -> Vec<&CallerRecord> {
            let mut v: Vec<&CallerRecord> = callers.iter().collect();
            v.sort_by(|a, b| a.name.cmp(&b.name));
            v
        }
        let ours = read(&self.rows);
        ours.systems == theirs.systems && by_name(&ours.callers) == by_name(&theirs.callers)
    }

    /// From now on, reads the database does not answer are answered from the mirror (called
    /// once the broker has started on this store).
    pub fn serve_outages(&self) {
        self.serving
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn start(
        self: &Arc<Self>,
        feed: Option<broadcast::Receiver<Change>>,
        snapshot: Option<(SnapshotFile, Duration)>,
    ) {
        if let Some(rx) = feed {
            tokio::spawn(follow(Arc::downgrade(self), rx));
        }
        if let Some((file, every)) = snapshot {
            let _ = self.snapshot_file.set(file.clone());
            tokio::spawn(keep_snapshot(Arc::downgrade(self), file, every));
        }
    }

    /// Writes the snapshot, when one is kept and the mirror changed since the last write: at a
    /// graceful stop, so that a restart during an outage starts from the newest state (and
    /// that [`MirroredStore::from_snapshot_agreeing`] finds it).
    pub async fn write_last_snapshot(self: &Arc<Self>) {
        let Some(file) = self.snapshot_file.get().cloned() else {
            return;
        };
        let me = self.clone();
        let written = tokio::task::spawn_blocking(move || me.snapshot_to(&file)).await;
        if let Ok(Err(e)) = written {
            tracing::warn!(message = "Could not write the replica snapshot.", error = %e);
        }
    }

    /// Writes the mirror to `file` when it changed since the last write.
    fn snapshot_to(&self, file: &SnapshotFile) -> Result<(), StoreError> {
        // A mirror without the store's format (nothing read yet), or one the broker has not
        // finished starting on (its key ring and event epoch not read yet), would not start a
        // broker: the last good snapshot stays.
        if !self.is_serving()
            || !read(&self.rows).meta.contains_key("format_version")
            || !self.dirty.swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return Ok(());
        }
        // A copy of the map (the records are shared) under the lock; sealed and written
        // outside it, so writers are not held up.
        let copy = {
            let rows = read(&self.rows);
            Rows {
                systems: rows.systems.clone(),
                callers: rows.callers.clone(),
                meta: rows.meta.clone(),
                last_event_seq: rows.last_event_seq,
                written_at: crate::model::unix_now(),
                touched: None,
            }
        };
        let written = file.write(&copy);
        if written.is_err() {
            self.dirty.store(true, std::sync::atomic::Ordering::Release);
        }
        written
    }

    /// Loads every system and caller again (and the metadata mirrored so far).
    async fn reload(&self) -> Result<(), StoreError> {
        write(&self.rows).touched = Some(Touched::default());
        let scanned = self.scan().await;
        let mut rows = self.rows_mut();
        match scanned {
            Ok((scanned, asked)) => {
                if settle(&mut rows, scanned, &asked) {
                    self.urgent.notify_one();
                }
                Ok(())
            }
            Err(e) => {
                rows.touched = None;
                Err(e)
            }
        }
    }

    /// Every system and caller, and the metadata mirrored so far, as the store holds them; with
    /// the metadata keys it asked for.
    async fn scan(&self) -> Result<(Rows, HashSet<String>), StoreError> {
        let mut systems = BTreeMap::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.inner.list_systems(after.as_deref(), PAGE).await?;
            let last = page.last().map(|r| r.system_id.clone());
            for r in page {
                systems.insert(r.system_id.clone(), Arc::new(r));
            }
            match last {
                Some(id) => after = Some(id),
                None => break,
            }
        }
        let callers = self.inner.list_callers().await?;
        let asked: HashSet<String> = read(&self.rows).meta.keys().cloned().collect();
        let mut meta = HashMap::new();
        for k in &asked {
            if let Some(v) = self.inner.get_meta(k).await? {
                meta.insert(k.clone(), v);
            }
        }
        let rows = Rows {
            systems,
            callers,
            meta,
            ..Rows::default()
        };
        Ok((rows, asked))
    }

    /// Notes a row this replica wrote, for a reload under way and for reads under way, and
    /// returns the rows to mirror the write in: the note comes first, so that neither a reload
    /// nor a read can settle in between and miss the write.
    fn wrote(&self, row: Row<'_>) -> std::sync::RwLockWriteGuard<'_, Rows> {
        self.own_writes[row.bucket()].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut rows = write(&self.rows);
        rows.touch(|t| match row {
            Row::System(id) => t.systems.insert(id.to_owned()),
            Row::Caller(name) => t.callers.insert(name.to_owned()),
            Row::Meta(key) => t.meta.insert(key.to_owned()),
        });
        rows
    }

    /// Reads `row` from `inner` and mirrors what it read with `mirror`, unless the row was
    /// written here or heard of as changed while the read was under way (the read may predate
    /// that): then it reads again, at most `tries` times in all, and the last read is returned
    /// unmirrored (`false`). The check and the mirroring are one step under the rows' lock, and
    /// a write bumps the counter before it mirrors, so no write can fall between them.
    async fn read_through<T, Fut>(
        &self,
        tries: u32,
        row: Row<'_>,
        read: impl Fn() -> Fut,
        mirror: impl Fn(&Self, &mut Rows, &T),
    ) -> Result<(T, bool), StoreError>
    where
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        use std::sync::atomic::Ordering::SeqCst;
        let writes = &self.own_writes[row.bucket()];
        let mut attempt = 1;
        loop {
            let before = writes.load(SeqCst);
            let value = read().await?;
            {
                let mut rows = write(&self.rows);
                if writes.load(SeqCst) == before {
                    mirror(self, &mut rows, &value);
                    return Ok((value, true));
                }
            }
            if attempt >= tries {
                return Ok((value, false));
            }
            attempt += 1;
        }
    }

    /// Notes that another replica changed `row`: a read of it under way here may predate that.
    fn heard(&self, row: Row<'_>) {
        self.own_writes[row.bucket()].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// The rows, to change them (the next snapshot writes them).
    fn rows_mut(&self) -> std::sync::RwLockWriteGuard<'_, Rows> {
        self.changed();
        write(&self.rows)
    }

    /// How many systems the mirror holds.
    pub fn mirrored_systems(&self) -> usize {
        read(&self.rows).systems.len()
    }

    fn is_down(&self) -> bool {
        lock(&self.down_until).is_some_and(|until| Instant::now() < until)
    }

    /// The error back unless the database did not answer and the mirror serves outages (then
    /// `Ok`: reads use the mirror for [`DOWN_FOR`]). While the broker starts, every error.
    fn fall_back(&self, e: StoreError) -> Result<(), StoreError> {
        if !self.is_serving() {
            return Err(e);
        }
        match e {
            StoreError::Unreachable(detail) => {
                let mut down = lock(&self.down_until);
                if down.is_none_or(|until| Instant::now() >= until) {
                    tracing::warn!(message = "The store is not answering; serving from this replica's mirror.", error = %detail);
                }
                *down = Some(Instant::now() + DOWN_FOR);
                Ok(())
            }
            other => Err(other),
        }
    }

    /// Mirrors one system's row (a read that found it unchanged changes nothing). A row older
    /// than the mirrored one (a slow read overtaken by a write) never replaces it.
    fn put_system(&self, rows: &mut Rows, r: Option<SystemRecord>, id: &str) {
        match (rows.systems.get(id), &r) {
            (Some(held), Some(new)) if **held == *new || age(held) > age(new) => return,
            (None, None) => return,
            _ => {}
        }
        self.changed();
        match r {
            Some(r) => {
                rows.systems.insert(id.to_owned(), Arc::new(r));
            }
            None => {
                rows.systems.remove(id);
                self.urgent.notify_one();
            }
        }
    }

    fn put_callers(&self, rows: &mut Rows, callers: &[CallerRecord]) {
        if rows.callers != callers {
            self.changed();
            rows.callers = callers.to_vec();
            self.urgent.notify_one();
        }
    }

    fn mirror_meta(&self, rows: &mut Rows, key: &str, v: Option<&[u8]>) {
        if key == WRITE_PROBE || rows.meta.get(key).map(Vec::as_slice) == v {
            return;
        }
        self.changed();
        match v {
            Some(v) => rows.meta.insert(key.to_owned(), v.to_vec()),
            None => rows.meta.remove(key),
        };
    }

    fn put_caller(&self, rows: &mut Rows, r: &CallerRecord) {
        self.changed();
        match rows.callers.iter_mut().find(|c| c.name == r.name) {
            Some(c) => *c = r.clone(),
            None => insert_caller(&mut rows.callers, r.clone()),
        }
        self.urgent.notify_one();
    }

    /// The mirror changed since the last snapshot.
    fn changed(&self) {
        self.dirty.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Applies a change another replica made, before the broker hears of it. A read that
    /// overlapped a write of the row here is read again; one that still cannot be mirrored
    /// turns into a reload. An error means the mirror may be behind (the caller resyncs later).
    async fn apply(&self, change: &Change) -> Result<(), StoreError> {
        const TRIES: u32 = 3;
        let mirrored = match change {
            Change::System(id) => {
                self.heard(Row::System(id));
                let read = || self.inner.get_system(id);
                let mirror = |me: &Self, rows: &mut Rows, r: &Option<SystemRecord>| {
                    me.put_system(rows, r.clone(), id);
                };
                self.read_through(TRIES, Row::System(id), read, mirror)
                    .await
                    .map(|(_, m)| m)
            }
            Change::Caller(_) => {
                self.heard(Row::Caller(""));
                let read = || self.inner.list_callers();
                let mirror = |me: &Self, rows: &mut Rows, c: &Vec<_>| me.put_callers(rows, c);
                self.read_through(TRIES, Row::Caller(""), read, mirror)
                    .await
                    .map(|(_, m)| m)
            }
            Change::Meta(key) => {
                self.heard(Row::Meta(key));
                let read = || self.inner.get_meta(key);
                let mirror = |me: &Self, rows: &mut Rows, v: &Option<Vec<u8>>| {
                    me.mirror_meta(rows, key, v.as_deref());
                };
                self.read_through(TRIES, Row::Meta(key), read, mirror)
                    .await
                    .map(|(_, m)| m)
            }
            Change::Resync => self.reload().await.map(|()| true),
            Change::Events | Change::Quota(_) => Ok(true),
        };
        if mirrored? {
            Ok(())
        } else {
            self.reload().await
        }
    }
}

/// Replaces the mirror's rows with what a reload read, except where this replica knows better:
/// rows it wrote while the reload read (a registration, a deletion, the admin caller created at
/// first start), a system version newer than the one read, metadata keys mirrored after the
/// reload chose which to read (the keys the broker reads at start). Lost, they would be missing
/// from the next snapshot. A revocation read is never undone. Changes other replicas made
/// meanwhile arrive on the feed after the reload (it is followed in order). Returns whether a
/// system went away or the callers changed (the snapshot should carry that at once).
fn settle(rows: &mut Rows, mut scanned: Rows, asked: &HashSet<String>) -> bool {
    let touched = rows.touched.take().unwrap_or_default();
    for (id, r) in &rows.systems {
        let read = scanned.systems.get(id);
        let newer = read.is_some_and(|s| age(s) < age(r));
        let mine = touched.systems.contains(id) && read.is_none_or(|s| age(s) <= age(r));
        if newer || mine {
            scanned.systems.insert(id.clone(), r.clone());
        }
    }
    for id in &touched.systems {
        if !rows.systems.contains_key(id) {
            scanned.systems.remove(id);
        }
    }
    for (k, v) in &rows.meta {
        if !asked.contains(k) || touched.meta.contains(k) {
            scanned.meta.insert(k.clone(), v.clone());
        }
    }
    for name in &touched.callers {
        let Some(mine) = rows.callers.iter().find(|c| &c.name == name) else {
            continue;
        };
        match scanned.callers.iter_mut().find(|c| &c.name == name) {
            Some(read) if read.revoked && !mine.revoked => {}
            Some(read) => *read = mine.clone(),
            None => insert_caller(&mut scanned.callers, mine.clone()),
        }
    }
    let urgent = rows.callers != scanned.callers
        || rows
            .systems
            .keys()
            .any(|id| !scanned.systems.contains_key(id));
    rows.systems = scanned.systems;
    rows.callers = scanned.callers;
    rows.meta = scanned.meta;
    urgent
}

/// Adds a caller to the list, kept in name order as the store lists them (so that a list read
/// from the store compares equal when nothing changed).
fn insert_caller(callers: &mut Vec<CallerRecord>, c: CallerRecord) {
    let at = callers.partition_point(|x| x.name < c.name);
    callers.insert(at, c);
}

/// Writes the snapshot at once, then every `every` while the mirror changes.
async fn keep_snapshot(me: std::sync::Weak<MirroredStore>, file: SnapshotFile, every: Duration) {
    let Some(urgent) = me.upgrade().map(|s| s.urgent.clone()) else {
        return;
    };
    loop {
        // First after an interval (what a starting broker reads is in the mirror by then), or
        // at once after a revocation or a deletion, which must not come back after a restart.
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = urgent.notified() => {}
        }
        let Some(store) = me.upgrade() else { break };
        let f = file.clone();
        let written = tokio::task::spawn_blocking(move || store.snapshot_to(&f)).await;
        if let Ok(Err(e)) = written {
            tracing::warn!(message = "Could not write the replica snapshot.", error = %e);
        }
    }
}

/// A change that could not be mirrored, or a failed resync, is made good by a resync this
/// long after, then after twice as long each time (up to [`RESYNC_RETRY_MAX`]) until one
/// succeeds.
const RESYNC_RETRY: Duration = Duration::from_secs(2);
const RESYNC_RETRY_MAX: Duration = Duration::from_secs(60);

/// Mirrors each change, then hands it on.
async fn follow(me: std::sync::Weak<MirroredStore>, mut rx: broadcast::Receiver<Change>) {
    let mut resync_at: Option<tokio::time::Instant> = None;
    let mut backoff = RESYNC_RETRY;
    loop {
        let retry = tokio::time::sleep_until(resync_at.unwrap_or_else(tokio::time::Instant::now));
        // A retry is the mirror's own business: the broker is not told (a resync there drops
        // every cached token, which must keep serving while the database is away).
        let (change, retried) = tokio::select! {
            received = rx.recv() => match received {
                Ok(c) => (c, false),
                Err(broadcast::error::RecvError::Lagged(_)) => (Change::Resync, false),
                Err(broadcast::error::RecvError::Closed) => break,
            },
            () = retry, if resync_at.is_some() => (Change::Resync, true),
        };
        let Some(me) = me.upgrade() else { break };
        // The broker reads what changed from the database itself: it hears at once, and the
        // mirror catches up behind it.
        if let (Some(tx), false) = (&me.changes, retried) {
            let _ = tx.send(change.clone());
        }
        match me.apply(&change).await {
            Err(e) => {
                if resync_at.is_none() {
                    tracing::warn!(message = "Could not mirror a change from the store; resyncing until it can.", error = %e);
                } else {
                    backoff = (backoff * 2).min(RESYNC_RETRY_MAX);
                }
                resync_at = Some(tokio::time::Instant::now() + backoff);
            }
            Ok(()) if matches!(change, Change::Resync) => {
                resync_at = None;
                backoff = RESYNC_RETRY;
            }
            Ok(()) => {}
        }
    }
}

#[async_trait]
impl CredentialStore for MirroredStore {
    async fn get_system(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        if !self.is_down() {
            // Read through as a fresh read does; an outage it noted sends this one to the mirror.
            match self.get_system_fresh(system_id).await {
                Err(StoreError::Unreachable(_)) if self.is_serving() => {}
                other => return other,
            }
        }
        Ok(read(&self.rows)
            .systems
            .get(system_id)
            .map(|r| SystemRecord::clone(r)))
    }

    async fn get_system_fresh(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        let read = || self.inner.get_system_fresh(system_id);
        let mirror = |me: &Self, rows: &mut Rows, r: &Option<SystemRecord>| {
            me.put_system(rows, r.clone(), system_id);
        };
        match self
            .read_through(1, Row::System(system_id), read, mirror)
            .await
        {
            Ok((r, _)) => Ok(r),
            // The outage is noted for the other reads; this one has no copy to fall back on.
            Err(StoreError::Unreachable(detail)) => {
                self.fall_back(StoreError::Unreachable(detail.clone()))?;
                Err(StoreError::Unreachable(detail))
            }
            Err(e) => Err(e),
        }
    }

    async fn list_systems(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SystemRecord>, StoreError> {
        if !self.is_down() {
            match self.inner.list_systems(after, limit).await {
                Ok(page) => return Ok(page),
                Err(e) => self.fall_back(e)?,
            }
        }
        let rows = read(&self.rows);
        let start = match after {
            Some(a) => std::ops::Bound::Excluded(a.to_owned()),
            None => std::ops::Bound::Unbounded,
        };
        Ok(rows
            .systems
            .range((start, std::ops::Bound::Unbounded))
            .take(limit)
            .map(|(_, r)| SystemRecord::clone(r))
            .collect())
    }

    async fn insert_system(&self, record: &SystemRecord) -> Result<(), StoreError> {
        self.inner.insert_system(record).await?;
        let mut rows = self.wrote(Row::System(&record.system_id));
        self.put_system(&mut rows, Some(record.clone()), &record.system_id);
        Ok(())
    }

    async fn update_system_fenced(
        &self,
        record: &SystemRecord,
        expected_revision: u64,
        fence: super::Fence,
    ) -> Result<(), StoreError> {
        self.inner
            .update_system_fenced(record, expected_revision, fence)
            .await?;
        let mut rows = self.wrote(Row::System(&record.system_id));
        self.put_system(&mut rows, Some(record.clone()), &record.system_id);
        Ok(())
    }

    async fn update_system(
        &self,
        record: &SystemRecord,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        self.inner.update_system(record, expected_revision).await?;
        let mut rows = self.wrote(Row::System(&record.system_id));
        self.put_system(&mut rows, Some(record.clone()), &record.system_id);
        Ok(())
    }

    async fn delete_system(&self, system_id: &str) -> Result<bool, StoreError> {
        let deleted = self.inner.delete_system(system_id).await?;
        self.put_system(&mut self.wrote(Row::System(system_id)), None, system_id);
        Ok(deleted)
    }

    async fn count_systems(&self) -> Result<usize, StoreError> {
        if !self.is_down() {
            match self.inner.count_systems().await {
                Ok(n) => return Ok(n),
                Err(e) => self.fall_back(e)?,
            }
        }
        Ok(self.mirrored_systems())
    }

    async fn list_callers(&self) -> Result<Vec<CallerRecord>, StoreError> {
        if !self.is_down() {
            let read = || self.inner.list_callers();
            match self
                .read_through(1, Row::Caller(""), read, |me, rows, c: &Vec<_>| {
                    me.put_callers(rows, c);
                })
                .await
            {
                Ok((c, _)) => return Ok(c),
                Err(e) => self.fall_back(e)?,
            }
        }
        Ok(read(&self.rows).callers.clone())
    }

    async fn insert_caller(&self, record: &CallerRecord) -> Result<(), StoreError> {
        self.inner.insert_caller(record).await?;
        self.put_caller(&mut self.wrote(Row::Caller(&record.name)), record);
        Ok(())
    }

    async fn update_caller(&self, record: &CallerRecord) -> Result<(), StoreError> {
        self.inner.update_caller(record).await?;
        self.put_caller(&mut self.wrote(Row::Caller(&record.name)), record);
        Ok(())
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if !self.is_down() {
            let read = || self.inner.get_meta(key);
            let mirror = |me: &Self, rows: &mut Rows, v: &Option<Vec<u8>>| {
                me.mirror_meta(rows, key, v.as_deref());
            };
            match self.read_through(1, Row::Meta(key), read, mirror).await {
                Ok((v, _)) => return Ok(v),
                Err(e) => self.fall_back(e)?,
            }
        }
        Ok(read(&self.rows).meta.get(key).cloned())
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner.put_meta(key, value).await?;
        self.mirror_meta(&mut self.wrote(Row::Meta(key)), key, Some(value));
        Ok(())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }

    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }

    async fn lock_refresh(
        &self,
        system_id: &str,
        wait: Duration,
    ) -> Result<Option<RefreshLock>, StoreError> {
        let held = self.inner.lock_refresh(system_id, wait).await?;
        // The database answers: ordinary reads go to it again at once (the re-read under this
        // lock is a fresh read, which never uses the mirror anyway).
        *lock(&self.down_until) = None;
        Ok(held)
    }

    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        self.changes.as_ref().map(broadcast::Sender::subscribe)
    }

    async fn append_events(&self, events: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        self.inner.append_events(events).await
    }

    async fn events_after(&self, seq: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        match self.inner.events_after(seq, limit).await {
            Ok(events) => Ok(events),
            // Nothing newer can be known while the log is away (the publisher pulls later).
            Err(e) => self.fall_back(e).map(|()| Vec::new()),
        }
    }

    async fn last_event_seq(&self) -> Result<u64, StoreError> {
        match self.inner.last_event_seq().await {
            Ok(n) => {
                if read(&self.rows).last_event_seq != n {
                    self.rows_mut().last_event_seq = n;
                }
                Ok(n)
            }
            Err(e) => {
                self.fall_back(e)?;
                Ok(read(&self.rows).last_event_seq)
            }
        }
    }

    async fn init_meta(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let stored = match self.inner.init_meta(key, value).await {
            Ok(v) => v,
            Err(e) => {
                // Already there (the event log's epoch): the mirror's value serves while the
                // database is away.
                let mirrored = read(&self.rows).meta.get(key).cloned();
                return match mirrored {
                    Some(v) => self.fall_back(e).map(|()| v),
                    None => Err(e),
                };
            }
        };
        let mut rows = self.wrote(Row::Meta(key));
        self.changed();
        rows.meta.insert(key.to_owned(), stored.clone());
        Ok(stored)
    }

    /// Only with the database: the mirror cannot tell whether another replica took it. Its own
    /// copy goes first, whatever the database answers (a take whose answer was lost may have
    /// landed), so it never serves a value that may have been used.
    async fn take_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.mirror_meta(&mut self.wrote(Row::Meta(key)), key, None);
        self.inner.take_meta(key).await
    }

    async fn try_lead(&self, duty: &str) -> Result<Option<Lead>, StoreError> {
        self.inner.try_lead(duty).await
    }

    async fn broadcast_quota(&self, payload: &str) -> Result<(), StoreError> {
        self.inner.broadcast_quota(payload).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    /// A memory store with a change feed. Once armed for a read (`meta` of the key `held`,
    /// `system` `held`, `callers`), that read, having read, waits for a go-ahead before it
    /// answers: a reload held in the middle of its scan, or a read answering after a write.
    #[derive(Default)]
    struct Held {
        inner: MemoryStore,
        /// The store does not answer a listing (a reload fails).
        unlisted: std::sync::atomic::AtomicBool,
        /// The store does not answer a system's read.
        silent: std::sync::atomic::AtomicBool,
        armed: Mutex<Option<&'static str>>,
        entered: tokio::sync::Notify,
        go: tokio::sync::Notify,
        feed: std::sync::OnceLock<broadcast::Sender<Change>>,
    }

    impl Held {
        fn feed(&self) -> &broadcast::Sender<Change> {
            self.feed.get_or_init(|| broadcast::channel(16).0)
        }

        fn arm(&self, read: &'static str) {
            *lock(&self.armed) = Some(read);
        }

        async fn hold<T>(&self, read: &str, value: T) -> T {
            let armed = {
                let mut a = lock(&self.armed);
                let hit = *a == Some(read);
                if hit {
                    *a = None;
                }
                hit
            };
            if armed {
                self.entered.notify_one();
                self.go.notified().await;
            }
            value
        }
    }

    #[async_trait]
    impl CredentialStore for Held {
        async fn get_system(&self, id: &str) -> Result<Option<SystemRecord>, StoreError> {
            if self.silent.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Unreachable("silent".into()));
            }
            let r = self.inner.get_system(id).await;
            match id {
                "held" => self.hold("system", r).await,
                _ => r,
            }
        }
        async fn get_system_fresh(&self, id: &str) -> Result<Option<SystemRecord>, StoreError> {
            self.get_system(id).await
        }
        async fn list_systems(
            &self,
            after: Option<&str>,
            limit: usize,
        ) -> Result<Vec<SystemRecord>, StoreError> {
            if self.unlisted.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Unreachable("unlisted".into()));
            }
            self.inner.list_systems(after, limit).await
        }
        async fn insert_system(&self, r: &SystemRecord) -> Result<(), StoreError> {
            self.inner.insert_system(r).await
        }
        async fn update_system(&self, r: &SystemRecord, rev: u64) -> Result<(), StoreError> {
            self.inner.update_system(r, rev).await
        }
        async fn update_system_fenced(
            &self,
            r: &SystemRecord,
            rev: u64,
            fence: crate::store::Fence,
        ) -> Result<(), StoreError> {
            self.inner.update_system_fenced(r, rev, fence).await
        }
        async fn delete_system(&self, id: &str) -> Result<bool, StoreError> {
            self.inner.delete_system(id).await
        }
        async fn count_systems(&self) -> Result<usize, StoreError> {
            self.inner.count_systems().await
        }
        async fn list_callers(&self) -> Result<Vec<CallerRecord>, StoreError> {
            let r = self.inner.list_callers().await;
            self.hold("callers", r).await
        }
        async fn insert_caller(&self, r: &CallerRecord) -> Result<(), StoreError> {
            self.inner.insert_caller(r).await
        }
        async fn update_caller(&self, r: &CallerRecord) -> Result<(), StoreError> {
            self.inner.update_caller(r).await
        }
        async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            let r = self.inner.get_meta(key).await;
            match key {
                "held" => self.hold("meta", r).await,
                _ => r,
            }
        }
        async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
            self.inner.put_meta(key, value).await
        }
        async fn flush(&self) -> Result<(), StoreError> {
            Ok(())
        }
        fn changes(&self) -> Option<broadcast::Receiver<Change>> {
            Some(self.feed().subscribe())
        }
        async fn append_events(&self, events: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
            self.inner.append_events(events).await
        }
        async fn events_after(&self, seq: u64, n: usize) -> Result<Vec<StoredEvent>, StoreError> {
            self.inner.events_after(seq, n).await
        }
        async fn last_event_seq(&self) -> Result<u64, StoreError> {
            self.inner.last_event_seq().await
        }
        async fn init_meta(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
            self.inner.init_meta(key, value).await
        }
        async fn take_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.take_meta(key).await
        }
    }

    fn caller(name: &str, revoked: bool) -> CallerRecord {
        CallerRecord {
            name: name.into(),
            role: crate::model::Role::Admin,
            token_sha256: "00".repeat(32),
            created_at: 0,
            revoked,
            system_patterns: Vec::new(),
            kinds: Vec::new(),
            expires_at: None,
            integrity: None,
        }
    }

    /// Waits at most 10 s (a reload that never ends fails the test instead of hanging it).
    async fn soon<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("in time")
    }

    /// A resync's reload that is still reading when this replica writes rows or reads new keys
    /// keeps them: the keys the broker reads at start (the snapshot written next must start a
    /// replica while the database is away), the admin caller created at first start (else the
    /// periodic caller reload during an outage locks the admin out), a registration and a
    /// deletion (CI failed on the first two before). What the reload read wins elsewhere: a
    /// change another replica made whose notification was lost, and a revocation is never
    /// undone by this replica's older copy.
    #[tokio::test]
    async fn a_reload_keeps_what_this_replica_wrote_while_it_read() {
        use crate::model::sample_system;
        let held = Arc::new(Held::default());
        held.inner.put_meta("format_version", b"7").await.unwrap();
        held.inner.put_meta("held", b"h").await.unwrap();
        for id in ["gone", "changed"] {
            held.inner.insert_system(&sample_system(id)).await.unwrap();
        }
        held.inner.insert_caller(&caller("x", false)).await.unwrap();
        let m = MirroredStore::open(held.clone(), None).await.unwrap();
        assert_eq!(m.get_meta("held").await.unwrap().unwrap(), b"h");
        // Another replica's changes whose notifications were lost: only the reload sees them.
        let mut changed = sample_system("changed");
        changed.credential_version = 2;
        held.inner.update_system(&changed, 1).await.unwrap();
        held.inner.put_meta("held", b"h2").await.unwrap();
        held.inner.update_caller(&caller("x", true)).await.unwrap();
        let mut heard = m.changes().unwrap();
        held.arm("meta");
        held.feed().send(Change::Resync).unwrap();
        soon(held.entered.notified()).await;
        // Read, created and written while the reload waits in its scan.
        assert_eq!(m.get_meta("format_version").await.unwrap().unwrap(), b"7");
        assert_eq!(m.init_meta("epoch", b"e1").await.unwrap(), b"e1");
        m.insert_caller(&caller("admin", false)).await.unwrap();
        let mut stale_x = caller("x", false);
        stale_x.expires_at = Some(1);
        m.update_caller(&stale_x).await.unwrap();
        m.insert_system(&sample_system("new")).await.unwrap();
        assert!(m.delete_system("gone").await.unwrap());
        held.go.notify_one();
        // The feed is followed in order: the change after the resync is handed on only once
        // the resync's reload has finished.
        held.feed().send(Change::Events).unwrap();
        assert!(matches!(soon(heard.recv()).await.unwrap(), Change::Resync));
        assert!(matches!(soon(heard.recv()).await.unwrap(), Change::Events));
        let rows = read(&m.rows);
        assert_eq!(rows.meta.get("format_version").unwrap(), b"7");
        assert_eq!(rows.meta.get("epoch").unwrap(), b"e1");
        assert!(rows.callers.contains(&caller("admin", false)));
        assert!(rows.systems.contains_key("new"));
        assert!(
            !rows.systems.contains_key("gone"),
            "a deleted system came back"
        );
        // The reload's reads win where this replica knows nothing newer.
        assert_eq!(rows.meta.get("held").unwrap(), b"h2");
        assert_eq!(rows.systems["changed"].credential_version, 2);
        let x = rows.callers.iter().find(|c| c.name == "x").unwrap();
        assert!(x.revoked, "a revocation was undone");
    }

    /// A read that answers after this replica's own write (it read the row before the write)
    /// is not mirrored: a deletion or a revocation made here is not undone by it.
    #[tokio::test]
    async fn a_read_overlapping_this_replicas_write_is_not_mirrored() {
        use crate::model::sample_system;
        let held = Arc::new(Held::default());
        held.inner
            .insert_system(&sample_system("held"))
            .await
            .unwrap();
        held.inner.insert_caller(&caller("x", false)).await.unwrap();
        let m = MirroredStore::open(held.clone(), None).await.unwrap();
        held.arm("system");
        let reading = tokio::spawn({
            let m = m.clone();
            async move { m.get_system("held").await }
        });
        soon(held.entered.notified()).await;
        assert!(m.delete_system("held").await.unwrap());
        held.go.notify_one();
        let stale = soon(reading).await.unwrap().unwrap();
        assert!(
            stale.is_some(),
            "the read answered what it read before the deletion"
        );
        assert!(
            !read(&m.rows).systems.contains_key("held"),
            "a deleted system came back"
        );

        held.arm("callers");
        let reading = tokio::spawn({
            let m = m.clone();
            async move { m.list_callers().await }
        });
        soon(held.entered.notified()).await;
        m.update_caller(&caller("x", true)).await.unwrap();
        held.go.notify_one();
        let stale = soon(reading).await.unwrap().unwrap();
        assert!(
            !stale[0].revoked,
            "the read answered what it read before the revocation"
        );
        assert!(read(&m.rows).callers[0].revoked, "a revocation was undone");

        // Another replica deletes a system while a read of it here is under way: the read,
        // answering after the deletion was mirrored, does not bring it back.
        held.inner
            .insert_system(&sample_system("held"))
            .await
            .unwrap();
        assert!(m.get_system("held").await.unwrap().is_some());
        let mut heard = m.changes().unwrap();
        held.arm("system");
        let reading = tokio::spawn({
            let m = m.clone();
            async move { m.get_system("held").await }
        });
        soon(held.entered.notified()).await;
        held.inner.delete_system("held").await.unwrap();
        held.feed().send(Change::System("held".into())).unwrap();
        held.feed().send(Change::Events).unwrap();
        assert!(matches!(
            soon(heard.recv()).await.unwrap(),
            Change::System(_)
        ));
        assert!(matches!(soon(heard.recv()).await.unwrap(), Change::Events));
        assert!(!read(&m.rows).systems.contains_key("held"));
        held.go.notify_one();
        assert!(soon(reading).await.unwrap().unwrap().is_some());
        assert!(
            !read(&m.rows).systems.contains_key("held"),
            "a deleted system came back"
        );

        // A write of another row does not keep a read from being mirrored.
        let mut newer = sample_system("held");
        held.inner.insert_system(&newer).await.unwrap();
        assert!(m.get_system("held").await.unwrap().is_some());
        newer.credential_version = 2;
        held.inner.update_system(&newer, 1).await.unwrap();
        held.arm("system");
        let reading = tokio::spawn({
            let m = m.clone();
            async move { m.get_system("held").await }
        });
        soon(held.entered.notified()).await;
        m.insert_system(&sample_system("other")).await.unwrap();
        held.go.notify_one();
        soon(reading).await.unwrap().unwrap();
        assert_eq!(read(&m.rows).systems["held"].credential_version, 2);
    }

    /// A resync that fails (the database does not answer the listing) is tried again until it
    /// succeeds, and then the mirror holds what it missed.
    #[tokio::test(start_paused = true)]
    async fn a_failed_resync_is_retried() {
        use crate::model::sample_system;
        let held = Arc::new(Held::default());
        let m = MirroredStore::open(held.clone(), None).await.unwrap();
        held.unlisted
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Missed: its notification was lost while the feed was away.
        held.inner
            .insert_system(&sample_system("missed"))
            .await
            .unwrap();
        let mut heard = m.changes().unwrap();
        held.feed().send(Change::Resync).unwrap();
        held.feed().send(Change::Events).unwrap();
        assert!(matches!(soon(heard.recv()).await.unwrap(), Change::Resync));
        assert!(matches!(soon(heard.recv()).await.unwrap(), Change::Events));
        assert!(!read(&m.rows).systems.contains_key("missed"));
        held.unlisted
            .store(false, std::sync::atomic::Ordering::SeqCst);
        // The clock is paused: time moves on only while every task waits (no real sleeping).
        let mut waited = Duration::ZERO;
        while !read(&m.rows).systems.contains_key("missed") {
            assert!(
                waited < Duration::from_secs(300),
                "the resync was never retried"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            waited += Duration::from_millis(500);
        }
    }

    /// A fresh read (the refresh lock's re-read) never answers with the mirror's copy: while the
    /// database does not answer it fails, though an ordinary read serves the mirrored row; once
    /// the database answers, it returns (and mirrors) the stored row.
    #[tokio::test]
    async fn a_fresh_read_never_falls_back_to_the_mirror() {
        use crate::model::sample_system;
        use std::sync::atomic::Ordering::SeqCst;
        let held = Arc::new(Held::default());
        held.inner.insert_system(&sample_system("s")).await.unwrap();
        let m = MirroredStore::open(held.clone(), None).await.unwrap();
        m.serve_outages();
        // Another replica rotates the row; its notification has not arrived yet.
        let mut rotated = sample_system("s");
        rotated.credential_version = 2;
        rotated.revision = 2;
        held.inner.update_system(&rotated, 1).await.unwrap();
        held.silent.store(true, SeqCst);
        let stale = m.get_system("s").await.unwrap().unwrap();
        assert_eq!(
            stale.credential_version, 1,
            "an ordinary read serves the mirror"
        );
        let fresh = m.get_system_fresh("s").await;
        assert!(
            matches!(fresh, Err(StoreError::Unreachable(_))),
            "a fresh read answered from the mirror: {fresh:?}"
        );
        held.silent.store(false, SeqCst);
        let fresh = m.get_system_fresh("s").await.unwrap().unwrap();
        assert_eq!(fresh.credential_version, 2);
        assert_eq!(read(&m.rows).systems["s"].credential_version, 2);
    }

    /// Until the broker has started on it, the mirror answers nothing for a database that does
    /// not (were it to, a key it never loaded, such as the format record or the key check value,
    /// would read as absent: a damaged store or a wrong master key). Shown on a system read, the
    /// The snapshot fallback's rule: a snapshot agrees while it holds the mirror's systems and
    /// callers (in any order), and no longer after a revocation or a deletion it lacks.
    #[tokio::test]
    async fn a_snapshot_agrees_only_while_it_holds_the_mirrors_systems_and_callers() {
        use crate::model::sample_system;
        let inner = Arc::new(crate::store::memory::MemoryStore::new());
        for id in ["s", "t"] {
            inner.insert_system(&sample_system(id)).await.unwrap();
        }
        for name in ["b-worker", "a-worker"] {
            inner.insert_caller(&caller(name, false)).await.unwrap();
        }
        inner.put_meta("format_version", b"1").await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = SnapshotFile {
            path: dir.path().join("snapshot"),
            key: [1; 32].into(),
        };
        let m = MirroredStore::open(inner.clone(), None).await.unwrap();
        m.serve_outages();
        m.get_meta("format_version").await.unwrap();
        m.snapshot_to(&file).unwrap();
        let agrees = |m: &MirroredStore| m.holds(&file.read().unwrap());
        assert!(agrees(&m));
        write(&m.rows).callers.reverse();
        assert!(agrees(&m), "the callers' order does not matter");
        m.update_caller(&caller("a-worker", true)).await.unwrap();
        assert!(!agrees(&m), "a revocation the snapshot lacks");
        let start = || {
            let inner: Arc<dyn CredentialStore> = inner.clone();
            MirroredStore::from_snapshot_agreeing(|| inner, file.clone(), DOWN_FOR, &m)
        };
        assert!(start().unwrap().is_none());
        m.snapshot_to(&file).unwrap();
        assert!(agrees(&m));
        m.delete_system("t").await.unwrap();
        assert!(!agrees(&m), "a deletion the snapshot lacks");
        m.snapshot_to(&file).unwrap();
        let started = start().unwrap().expect("an agreeing snapshot starts");
        assert_eq!(started.mirrored_systems(), 1);
        std::fs::write(&file.path, b"not a snapshot").unwrap();
        assert!(start().is_err(), "an unreadable snapshot");
    }

    /// same path; afterwards it serves the outage.
    #[tokio::test]
    async fn the_mirror_serves_outages_only_once_the_broker_started() {
        use crate::model::sample_system;
        use std::sync::atomic::Ordering::SeqCst;
        let held = Arc::new(Held::default());
        held.inner.insert_system(&sample_system("s")).await.unwrap();
        let m = MirroredStore::open(held.clone(), None).await.unwrap();
        held.silent.store(true, SeqCst);
        let starting = m.get_system("s").await;
        assert!(
            matches!(starting, Err(StoreError::Unreachable(_))),
            "answered from the mirror while starting: {starting:?}"
        );
        m.serve_outages();
        let serving = m.get_system("s").await.unwrap();
        assert_eq!(serving.map(|r| r.system_id), Some("s".to_owned()));
    }
}
