//! [`MemoryStore`]: an in-memory store for tests and for embedding. Not durable.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{CredentialStore, StoreError};
use crate::model::{CallerRecord, SystemRecord};

/// In-memory store; every method behaves like the durable ones except that nothing survives the
/// process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    systems: BTreeMap<String, SystemRecord>,
    callers: BTreeMap<String, CallerRecord>,
    meta: BTreeMap<String, Vec<u8>>,
    events: BTreeMap<u64, (u64, Vec<u8>)>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, StoreError> {
        self.inner
            .lock()
            .map_err(|_| StoreError::Backend("memory store lock poisoned".to_owned()))
    }
}

#[async_trait]
impl CredentialStore for MemoryStore {
    async fn get_system(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        Ok(self.lock()?.systems.get(system_id).cloned())
    }

    async fn get_system_fresh(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        self.get_system(system_id).await
    }

    async fn list_systems(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SystemRecord>, StoreError> {
        let inner = self.lock()?;
        let iter: Box<dyn Iterator<Item = &SystemRecord>> = match after {
            Some(a) => Box::new(
                inner
                    .systems
                    .range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                    .map(|(_, v)| v),
            ),
            None => Box::new(inner.systems.values()),
        };
        Ok(iter.take(limit).cloned().collect())
    }

    async fn insert_system(&self, record: &SystemRecord) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        if inner.systems.contains_key(&record.system_id) {
            return Err(StoreError::AlreadyExists);
        }
        inner
            .systems
            .insert(record.system_id.clone(), record.clone());
        Ok(())
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
        let mut inner = self.lock()?;
        match inner.systems.get(&record.system_id) {
            Some(cur) if cur.revision == expected_revision => {
                inner
                    .systems
                    .insert(record.system_id.clone(), record.clone());
                Ok(())
            }
            _ => Err(StoreError::Conflict),
        }
    }

    async fn delete_system(&self, system_id: &str) -> Result<bool, StoreError> {
        Ok(self.lock()?.systems.remove(system_id).is_some())
    }

    async fn count_systems(&self) -> Result<usize, StoreError> {
        Ok(self.lock()?.systems.len())
    }

    async fn list_callers(&self) -> Result<Vec<CallerRecord>, StoreError> {
        Ok(self.lock()?.callers.values().cloned().collect())
    }

    async fn insert_caller(&self, record: &CallerRecord) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        if inner.callers.contains_key(&record.name) {
            return Err(StoreError::AlreadyExists);
        }
        inner.callers.insert(record.name.clone(), record.clone());
        Ok(())
    }

    async fn update_caller(&self, record: &CallerRecord) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        if !inner.callers.contains_key(&record.name) {
            return Err(StoreError::Conflict);
        }
        inner.callers.insert(record.name.clone(), record.clone());
        Ok(())
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock()?.meta.get(key).cloned())
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.lock()?.meta.insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn append_events(&self, events: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        let mut next = inner.events.keys().next_back().copied().unwrap_or(0) + 1;
        for (at, body) in events {
            inner.events.insert(next, (*at, body.clone()));
            next += 1;
        }
        let cutoff = crate::model::unix_now().saturating_sub(super::EVENT_RETENTION_SECS);
        let oldest_kept = next.saturating_sub(super::MAX_STORED_EVENTS);
        inner
            .events
            .retain(|seq, (at, _)| *seq + 1 == next || (*seq >= oldest_kept && *at >= cutoff));
        Ok(())
    }

    async fn last_event_seq(&self) -> Result<u64, StoreError> {
        Ok(self.lock()?.events.keys().next_back().copied().unwrap_or(0))
    }

    async fn take_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut inner = self.lock()?;
        Ok(inner.meta.remove(key).filter(|v| !v.is_empty()))
    }

    async fn init_meta(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        Ok(self
            .lock()?
            .meta
            .entry(key.to_owned())
            .or_insert_with(|| value.to_vec())
            .clone())
    }

    async fn events_after(
        &self,
        seq: u64,
        limit: usize,
    ) -> Result<Vec<super::StoredEvent>, StoreError> {
        Ok(self
            .lock()?
            .events
            .range(seq.saturating_add(1)..)
            .take(limit)
            .map(|(seq, (at, body))| super::StoredEvent {
                seq: *seq,
                at: *at,
                body: body.clone(),
            })
            .collect())
    }
}
