//! [`MonitoredStore`]: wraps the configured store and keeps [`WriteHealth`] current, so gRPC
//! health (service [`WRITES_HEALTH_SERVICE`]), `/readyz/writes` and `/metrics` can say whether
//! writes reach the disk, and why not.
//!
//! Reads and the token hot path do not depend on it: a broker whose disk is full keeps serving
//! `GetAccessToken` from memory while every mutating RPC fails with a clear code. A failing
//! store is probed in the background ([`WriteHealth::needs_probe`]), so health recovers without a
//! restart once the fault clears, even when no admin writes.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::watch;

use super::{CredentialStore, StoreError};
use crate::model::{CallerRecord, SystemRecord};

/// The gRPC health service name that follows [`WriteHealth`]: `SERVING` while writes reach the
/// store, `NOT_SERVING` while they fail (the broker's own service stays `SERVING` for tokens).
pub const WRITES_HEALTH_SERVICE: &str = "credbroker.v1.CredentialBroker.Writes";

/// Whether the last write to the store succeeded, and if not, why (never a secret: the reason is
/// a fixed phrase chosen from the error class).
#[derive(Debug)]
pub struct WriteHealth {
    /// Why writes fail, while they do.
    reason: Mutex<Option<&'static str>>,
    /// Whether they succeed (the one copy of that state; health watchers subscribe to it).
    tx: watch::Sender<bool>,
}

impl Default for WriteHealth {
    fn default() -> Self {
        let (tx, _) = watch::channel(true);
        Self {
            reason: Mutex::new(None),
            tx,
        }
    }
}

impl WriteHealth {
    /// True while writes reach the store.
    pub fn is_ok(&self) -> bool {
        *self.tx.borrow()
    }

    /// Why writes fail, while they do.
    pub fn reason(&self) -> Option<&'static str> {
        self.reason.lock().map(|r| *r).unwrap_or(None)
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    /// True while a background probe should try a write.
    pub fn needs_probe(&self) -> bool {
        !self.is_ok()
    }

    fn observe<T>(&self, result: &Result<T, StoreError>) {
        let failure = match result {
            Ok(_)
            | Err(StoreError::AlreadyExists)
            | Err(StoreError::Conflict)
            | Err(StoreError::LockLost) => None,
            Err(StoreError::Full(_)) => Some("disk full"),
            Err(StoreError::Backend(_) | StoreError::Unreachable(_)) => {
                Some("storage write failed")
            }
            Err(StoreError::Corrupt(_)) | Err(StoreError::Tampered(_)) => None,
        };
        let ok = failure.is_none();
        if !ok {
            crate::metrics::METRICS.store_write_error();
        }
        if let Ok(mut r) = self.reason.lock() {
            *r = failure;
        }
        let changed = self.tx.send_if_modified(|current| {
            let changed = *current != ok;
            *current = ok;
            changed
        });
        if changed {
            if ok {
                tracing::info!(message = "Store writes succeed again.");
            } else {
                tracing::error!(
                    message =
                        "Store writes are failing; mutating RPCs are refused until they succeed.",
                    reason = failure.unwrap_or_default()
                );
            }
        }
    }
}

/// A store wrapper that feeds [`WriteHealth`] from every mutating call's outcome.
pub struct MonitoredStore {
    inner: Arc<dyn CredentialStore>,
    health: Arc<WriteHealth>,
}

impl MonitoredStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn CredentialStore>, health: Arc<WriteHealth>) -> Self {
        Self { inner, health }
    }

    /// Runs the write `op` makes to its end on a task of its own and notes its outcome. A
    /// caller that leaves (a deadline, a disconnect, a dropped select) leaves the write, its
    /// flush and what its outcome sets off (this health, the sled store's reopen after a
    /// failure) to finish without it: a failed write whose caller had left went unnoticed, and
    /// health said writes succeed.
    async fn write<T, F>(
        &self,
        op: impl FnOnce(Arc<dyn CredentialStore>) -> F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let (work, health) = (op(self.inner.clone()), self.health.clone());
        let write = async move {
            let r = work.await;
            health.observe(&r);
            r
        };
        // The caller's span goes along: the store's log lines keep its request and system.
        tokio::spawn(tracing::Instrument::instrument(
            write,
            tracing::Span::current(),
        ))
        .await
        .map_err(|e| StoreError::Backend(format!("store write task: {e}")))?
    }
}

#[async_trait]
impl CredentialStore for MonitoredStore {
    async fn get_system(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        self.inner.get_system(system_id).await
    }

    async fn get_system_fresh(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        self.inner.get_system_fresh(system_id).await
    }

    async fn list_systems(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SystemRecord>, StoreError> {
        self.inner.list_systems(after, limit).await
    }

    async fn insert_system(&self, record: &SystemRecord) -> Result<(), StoreError> {
        let record = record.clone();
        self.write(|s| async move { s.insert_system(&record).await })
            .await
    }

    async fn update_system_fenced(
        &self,
        record: &SystemRecord,
        expected_revision: u64,
        fence: super::Fence,
    ) -> Result<(), StoreError> {
        let record = record.clone();
        self.write(|s| async move {
            s.update_system_fenced(&record, expected_revision, fence)
                .await
        })
        .await
    }

    async fn update_system(
        &self,
        record: &SystemRecord,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        let record = record.clone();
        self.write(|s| async move { s.update_system(&record, expected_revision).await })
            .await
    }

    async fn delete_system(&self, system_id: &str) -> Result<bool, StoreError> {
        let id = system_id.to_owned();
        self.write(|s| async move { s.delete_system(&id).await })
            .await
    }

    async fn count_systems(&self) -> Result<usize, StoreError> {
        self.inner.count_systems().await
    }

    async fn count_callers(&self) -> Result<usize, StoreError> {
        self.inner.count_callers().await
    }

    async fn list_callers(&self) -> Result<Vec<CallerRecord>, StoreError> {
        self.inner.list_callers().await
    }

    async fn insert_caller(&self, record: &CallerRecord) -> Result<(), StoreError> {
        let record = record.clone();
        self.write(|s| async move { s.insert_caller(&record).await })
            .await
    }

    async fn update_caller(&self, record: &CallerRecord) -> Result<(), StoreError> {
        let record = record.clone();
        self.write(|s| async move { s.update_caller(&record).await })
            .await
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_meta(key).await
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let (key, value) = (key.to_owned(), value.to_vec());
        self.write(|s| async move { s.put_meta(&key, &value).await })
            .await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.write(|s| async move { s.flush().await }).await
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
        let events = events.to_vec();
        self.write(|s| async move { s.append_events(&events).await })
            .await
    }

    async fn events_after(
        &self,
        seq: u64,
        limit: usize,
    ) -> Result<Vec<super::StoredEvent>, StoreError> {
        self.inner.events_after(seq, limit).await
    }

    async fn try_lead(&self, duty: &str) -> Result<Option<super::Lead>, StoreError> {
        self.inner.try_lead(duty).await
    }

    async fn broadcast_quota(&self, payload: &str) -> Result<(), StoreError> {
        self.inner.broadcast_quota(payload).await
    }

    async fn last_event_seq(&self) -> Result<u64, StoreError> {
        self.inner.last_event_seq().await
    }

    async fn init_meta(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let (key, value) = (key.to_owned(), value.to_vec());
        self.write(|s| async move { s.init_meta(&key, &value).await })
            .await
    }

    async fn take_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_owned();
        self.write(|s| async move { s.take_meta(&key).await }).await
    }
}

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::*;
    use crate::store::faulty::{FaultControl, FaultyStore};
    use crate::store::memory::MemoryStore;
    use std::future::Future;
    use std::sync::atomic::Ordering;

    /// A write whose caller leaves while it runs still counts: its failure turns the writes
    /// health, which a failed write nobody waited for did not.
    #[tokio::test]
    async fn a_write_whose_caller_left_still_reports_its_failure() {
        let control = Arc::new(FaultControl::default());
        control.latency_ms.store(20, Ordering::SeqCst);
        control.disk_full.store(true, Ordering::SeqCst);
        let inner = Arc::new(FaultyStore::new(Arc::new(MemoryStore::new()), control));
        let health = Arc::new(WriteHealth::default());
        let store = MonitoredStore::new(inner, health.clone());
        let mut seen = health.subscribe();
        {
            let mut write = Box::pin(store.put_meta("k", b"v"));
            let polled =
                std::future::poll_fn(|cx| std::task::Poll::Ready(write.as_mut().poll(cx))).await;
            assert!(polled.is_pending());
        }
        let changed = tokio::time::timeout(std::time::Duration::from_secs(10), seen.changed());
        assert!(changed.await.is_ok(), "the failure went unnoticed");
        assert!(!health.is_ok());
        assert_eq!(health.reason(), Some("disk full"));
    }
}
