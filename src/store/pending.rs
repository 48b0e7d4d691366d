//! A PostgreSQL store still being connected to: a replica that starts from its snapshot while
//! the database is away. Every call fails as the database's fault until the connection is made
//! (in the background, every two seconds); then the change feed resyncs the mirror above.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{Change, CredentialStore, Lead, PostgresStore, RefreshLock, StoreError, StoredEvent};
use crate::model::{CallerRecord, SystemRecord};

/// How often the connection is tried again.
const RETRY: Duration = Duration::from_secs(2);

/// See the module docs.
pub struct PendingPostgres {
    ready: Arc<OnceLock<Arc<PostgresStore>>>,
    changes: broadcast::Sender<Change>,
}

impl PendingPostgres {
    /// Connects to `url` in the background until it succeeds.
    pub fn connect_in_background(
        url: crate::secret::SecretString,
        ca_file: Option<std::path::PathBuf>,
    ) -> Arc<Self> {
        let me = Arc::new(Self {
            ready: Arc::new(OnceLock::new()),
            changes: broadcast::channel(4096).0,
        });
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            let mut attempt = 0u32;
            let pg = loop {
                // Tries only while the store is in use.
                if weak.strong_count() == 0 {
                    return;
                }
                match PostgresStore::connect(url.expose_secret(), ca_file.as_deref()).await {
                    Ok(pg) => break Arc::new(pg),
                    Err(StoreError::Unreachable(e)) => {
                        // Said at the first try and then about every 30 s: a database stuck
                        // starting up is as visible as one that is down.
                        if attempt.is_multiple_of(15) {
                            tracing::warn!(message = "The store is not available (no answer, or starting up or shutting down); still serving the snapshot.", error = %e);
                        }
                        attempt = attempt.wrapping_add(1);
                        tokio::time::sleep(RETRY).await;
                    }
                    Err(e) => {
                        // It answers but refuses (a login, a schema): serving the snapshot on
                        // while someone fixes it, and saying so.
                        tracing::error!(message = "The store answers but cannot be used; still serving the snapshot.", error = %e);
                        tokio::time::sleep(RETRY * 15).await;
                    }
                }
            };
            let feed = pg.changes();
            let Some(me) = weak.upgrade() else { return };
            let _ = me.ready.set(pg);
            tracing::info!(message = "The store answers again; resyncing from it.");
            let _ = me.changes.send(Change::Resync);
            drop(me);
            let Some(mut rx) = feed else { return };
            loop {
                let change = match rx.recv().await {
                    Ok(c) => c,
                    Err(broadcast::error::RecvError::Lagged(_)) => Change::Resync,
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                let Some(me) = weak.upgrade() else { break };
                let _ = me.changes.send(change);
            }
        });
        me
    }

    fn pg(&self) -> Result<&Arc<PostgresStore>, StoreError> {
        self.ready
            .get()
            .ok_or_else(|| StoreError::Unreachable("the store is not reachable yet".to_owned()))
    }
}

#[async_trait]
impl CredentialStore for PendingPostgres {
    async fn get_system(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        self.pg()?.get_system(system_id).await
    }

    async fn get_system_fresh(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        self.get_system(system_id).await
    }

    async fn list_systems(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SystemRecord>, StoreError> {
        self.pg()?.list_systems(after, limit).await
    }

    async fn insert_system(&self, record: &SystemRecord) -> Result<(), StoreError> {
        self.pg()?.insert_system(record).await
    }

    async fn update_system_fenced(
        &self,
        record: &SystemRecord,
        expected_revision: u64,
        fence: super::Fence,
    ) -> Result<(), StoreError> {
        self.pg()?
            .update_system_fenced(record, expected_revision, fence)
            .await
    }

    async fn update_system(
        &self,
        record: &SystemRecord,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        self.pg()?.update_system(record, expected_revision).await
    }

    async fn delete_system(&self, system_id: &str) -> Result<bool, StoreError> {
        self.pg()?.delete_system(system_id).await
    }

    async fn count_systems(&self) -> Result<usize, StoreError> {
        self.pg()?.count_systems().await
    }

    async fn list_callers(&self) -> Result<Vec<CallerRecord>, StoreError> {
        self.pg()?.list_callers().await
    }

    async fn insert_caller(&self, record: &CallerRecord) -> Result<(), StoreError> {
        self.pg()?.insert_caller(record).await
    }

    async fn update_caller(&self, record: &CallerRecord) -> Result<(), StoreError> {
        self.pg()?.update_caller(record).await
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.pg()?.get_meta(key).await
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.pg()?.put_meta(key, value).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.pg()?.flush().await
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn lock_refresh(
        &self,
        system_id: &str,
        wait: Duration,
    ) -> Result<Option<RefreshLock>, StoreError> {
        self.pg()?.lock_refresh(system_id, wait).await
    }

    fn changes(&self) -> Option<broadcast::Receiver<Change>> {
        Some(self.changes.subscribe())
    }

    async fn append_events(&self, events: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        self.pg()?.append_events(events).await
    }

    async fn events_after(&self, seq: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.pg()?.events_after(seq, limit).await
    }

    async fn last_event_seq(&self) -> Result<u64, StoreError> {
        self.pg()?.last_event_seq().await
    }

    async fn init_meta(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.pg()?.init_meta(key, value).await
    }

    async fn take_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.pg()?.take_meta(key).await
    }

    async fn try_lead(&self, duty: &str) -> Result<Option<Lead>, StoreError> {
        self.pg()?.try_lead(duty).await
    }

    async fn broadcast_quota(&self, payload: &str) -> Result<(), StoreError> {
        self.pg()?.broadcast_quota(payload).await
    }
}
