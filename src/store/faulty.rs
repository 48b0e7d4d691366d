//! [`FaultyStore`] (feature `fault-injection`, for tests): a store wrapper that injects errors,
//! "disk full" and latency into any [`CredentialStore`], switchable at run time through a shared
//! [`FaultControl`].
//!
//! An injected write failure happens either before the inner write (nothing reached disk) or
//! after it (the record is on disk but the caller hears an error: the "unacknowledged but
//! present" case a client must tolerate). [`FaultControl::reached_disk`] records every system id
//! whose write the inner store acknowledged, so a test can prove that no RPC answered OK for a
//! write that did not reach disk.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;

use super::{CredentialStore, StoreError};
use crate::model::{CallerRecord, SystemRecord};

/// Run-time switches for a [`FaultyStore`].
#[derive(Debug, Default)]
pub struct FaultControl {
    /// Failure probability for each operation, in thousandths.
    pub fail_permille: AtomicU32,
    /// When set, reads fail too (else only writes and flushes).
    pub fail_reads: AtomicBool,
    /// When set, every write fails with [`StoreError::Full`].
    pub disk_full: AtomicBool,
    /// Mean added latency per operation, in milliseconds (±20 %).
    pub latency_ms: AtomicU64,
    /// The next this many operations (reads and writes) answer [`StoreError::Unreachable`]
    /// without reaching the inner store: a database restarting.
    pub unreachable: AtomicU32,
    /// The next this many caller inserts reach the inner store, then answer
    /// [`StoreError::Unreachable`], and the operation after each does not answer either: the
    /// database went away after the commit, before its answer came back.
    pub lost_caller_answers: AtomicU32,
    /// The next this many caller inserts answer [`StoreError::Unreachable`] without reaching
    /// the inner store (the operations after them answer).
    pub unanswered_caller_inserts: AtomicU32,
    /// The next this many caller inserts answer [`StoreError::Unreachable`] without reaching
    /// the inner store, and land in it just before the next caller insert: a commit that shows
    /// only after the caller gave up on it.
    pub late_caller_commits: AtomicU32,
    /// The next this many system updates find that another writer came first: just before
    /// each is tried, the stored record's revision moves on (its content unchanged, as after a
    /// concurrent health or label write), so the update answers a conflict.
    pub concurrent_writes: AtomicU32,
    /// The next this many system updates reach the inner store, then answer
    /// [`StoreError::Unreachable`]: the commit landed, its answer was lost.
    pub lost_update_answers: AtomicU32,
    /// Injected failures so far.
    pub injected: AtomicU64,
    /// Pages of systems listed so far (every scan reads at least one).
    pub system_pages: AtomicU64,
    reached: Mutex<HashSet<String>>,
    late: Mutex<Vec<CallerRecord>>,
}

impl FaultControl {
    /// Stops every fault.
    pub fn heal(&self) {
        self.fail_permille.store(0, Ordering::SeqCst);
        self.fail_reads.store(false, Ordering::SeqCst);
        self.disk_full.store(false, Ordering::SeqCst);
        self.latency_ms.store(0, Ordering::SeqCst);
        self.unreachable.store(0, Ordering::SeqCst);
        self.lost_caller_answers.store(0, Ordering::SeqCst);
        self.unanswered_caller_inserts.store(0, Ordering::SeqCst);
        self.late_caller_commits.store(0, Ordering::SeqCst);
        self.concurrent_writes.store(0, Ordering::SeqCst);
        self.lost_update_answers.store(0, Ordering::SeqCst);
        crate::util::sync::lock(&self.late).clear();
    }

    /// Counts one down from `n` if it is above zero; true if it did (and counts the injection).
    fn take(&self, n: &AtomicU32) -> bool {
        let took = n
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
            .is_ok();
        if took {
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
        took
    }

    /// System ids whose insert or update the inner store acknowledged.
    pub fn reached_disk(&self) -> HashSet<String> {
        self.reached.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn note(&self, id: &str) {
        if let Ok(mut r) = self.reached.lock() {
            r.insert(id.to_owned());
        }
    }
}

/// Where an injected failure lands relative to the inner call.
enum Fault {
    None,
    Before(StoreError),
    After(StoreError),
}

/// The fault-injecting wrapper.
pub struct FaultyStore {
    inner: Arc<dyn CredentialStore>,
    control: Arc<FaultControl>,
}

impl FaultyStore {
    /// Wraps `inner`, steered by `control`.
    pub fn new(inner: Arc<dyn CredentialStore>, control: Arc<FaultControl>) -> Self {
        Self { inner, control }
    }

    async fn delay(&self) {
        let ms = self.control.latency_ms.load(Ordering::Relaxed);
        if ms > 0 {
            let jitter = rand::thread_rng().gen_range(0.8..1.2);
            tokio::time::sleep(Duration::from_secs_f64(ms as f64 * jitter / 1000.0)).await;
        }
    }

    fn roll(&self, write: bool) -> Fault {
        let c = &self.control;
        if c.take(&c.unreachable) {
            return Fault::Before(StoreError::Unreachable("no answer [injected]".to_owned()));
        }
        if write && c.disk_full.load(Ordering::Relaxed) {
            c.injected.fetch_add(1, Ordering::Relaxed);
            return Fault::Before(StoreError::Full(
                "No space left on device (os error 28) [injected]".to_owned(),
            ));
        }
        if !write && !c.fail_reads.load(Ordering::Relaxed) {
            return Fault::None;
        }
        let p = c.fail_permille.load(Ordering::Relaxed);
        let mut rng = rand::thread_rng();
        if p == 0 || rng.gen_range(0..1000) >= p {
            return Fault::None;
        }
        c.injected.fetch_add(1, Ordering::Relaxed);
        let e = StoreError::Backend("injected I/O error".to_owned());
        if write && rng.gen_bool(0.5) {
            Fault::After(e)
        } else {
            Fault::Before(e)
        }
    }

    async fn write<T>(
        &self,
        id: Option<&str>,
        op: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.delay().await;
        match self.roll(true) {
            Fault::Before(e) => Err(e),
            fault => {
                let v = op.await?;
                if let Some(id) = id {
                    self.control.note(id);
                }
                match fault {
                    Fault::After(e) => Err(e),
                    _ => Ok(v),
                }
            }
        }
    }

    async fn read<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.delay().await;
        match self.roll(false) {
            Fault::None => op.await,
            Fault::Before(e) | Fault::After(e) => Err(e),
        }
    }
}

#[async_trait]
impl CredentialStore for FaultyStore {
    async fn get_system(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        self.read(self.inner.get_system(system_id)).await
    }

    async fn get_system_fresh(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        self.read(self.inner.get_system_fresh(system_id)).await
    }

    async fn list_systems(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SystemRecord>, StoreError> {
        self.control.system_pages.fetch_add(1, Ordering::SeqCst);
        self.read(self.inner.list_systems(after, limit)).await
    }

    async fn insert_system(&self, record: &SystemRecord) -> Result<(), StoreError> {
        self.write(Some(&record.system_id), self.inner.insert_system(record))
            .await
    }

    async fn update_system_fenced(
        &self,
        record: &SystemRecord,
        expected_revision: u64,
        fence: super::Fence,
    ) -> Result<(), StoreError> {
        // The faults of an update, then the inner store's fenced write.
        self.write(
            Some(&record.system_id),
            self.inner
                .update_system_fenced(record, expected_revision, fence),
        )
        .await
    }

    async fn update_system(
        &self,
        record: &SystemRecord,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        if self.control.take(&self.control.concurrent_writes) {
            if let Ok(Some(mut theirs)) = self.inner.get_system(&record.system_id).await {
                let read = theirs.revision;
                theirs.revision += 1;
                let _ = self.inner.update_system(&theirs, read).await;
            }
        }
        if self.control.take(&self.control.lost_update_answers) {
            self.inner.update_system(record, expected_revision).await?;
            self.control.note(&record.system_id);
            return Err(StoreError::Unreachable(
                "answer lost after the commit [injected]".into(),
            ));
        }
        self.write(
            Some(&record.system_id),
            self.inner.update_system(record, expected_revision),
        )
        .await
    }

    async fn delete_system(&self, system_id: &str) -> Result<bool, StoreError> {
        self.write(None, self.inner.delete_system(system_id)).await
    }

    async fn count_systems(&self) -> Result<usize, StoreError> {
        self.read(self.inner.count_systems()).await
    }

    async fn list_callers(&self) -> Result<Vec<CallerRecord>, StoreError> {
        self.read(self.inner.list_callers()).await
    }

    async fn insert_caller(&self, record: &CallerRecord) -> Result<(), StoreError> {
        let late = std::mem::take(&mut *crate::util::sync::lock(&self.control.late));
        for held in late {
            self.inner.insert_caller(&held).await?;
        }
        if self.control.take(&self.control.late_caller_commits) {
            crate::util::sync::lock(&self.control.late).push(record.clone());
            return Err(StoreError::Unreachable("no answer [injected]".to_owned()));
        }
        if self.control.take(&self.control.unanswered_caller_inserts) {
            return Err(StoreError::Unreachable("no answer [injected]".to_owned()));
        }
        self.write(None, self.inner.insert_caller(record)).await?;
        if self.control.take(&self.control.lost_caller_answers) {
            self.control.unreachable.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Unreachable(
                "connection lost before the answer [injected]".to_owned(),
            ));
        }
        Ok(())
    }

    async fn update_caller(&self, record: &CallerRecord) -> Result<(), StoreError> {
        self.write(None, self.inner.update_caller(record)).await
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(self.inner.get_meta(key)).await
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(None, self.inner.put_meta(key, value)).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.write(None, self.inner.flush()).await
    }

    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }

    async fn lock_refresh(
        &self,
        system_id: &str,
        wait: std::time::Duration,
    ) -> Result<Option<super::RefreshLock>, StoreError> {
        self.inner.lock_refresh(system_id, wait).await
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<super::Change>> {
        self.inner.changes()
    }

    async fn append_events(&self, events: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        self.write(None, self.inner.append_events(events)).await
    }

    async fn events_after(
        &self,
        seq: u64,
        limit: usize,
    ) -> Result<Vec<super::StoredEvent>, StoreError> {
        self.read(self.inner.events_after(seq, limit)).await
    }

    async fn try_lead(&self, duty: &str) -> Result<Option<super::Lead>, StoreError> {
        self.inner.try_lead(duty).await
    }

    async fn broadcast_quota(&self, payload: &str) -> Result<(), StoreError> {
        self.inner.broadcast_quota(payload).await
    }

    async fn last_event_seq(&self) -> Result<u64, StoreError> {
        self.read(self.inner.last_event_seq()).await
    }

    async fn init_meta(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.write(None, self.inner.init_meta(key, value)).await
    }

    async fn take_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.write(None, self.inner.take_meta(key)).await
    }
}
