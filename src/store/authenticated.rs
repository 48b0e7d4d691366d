//! [`AuthenticatedStore`]: someone who can write the database but lacks the master key cannot
//! change what the broker trusts.
//!
//! Every system and caller record carries `integrity`, an HMAC-SHA256 under a key derived from
//! the master key over the fields an attacker would want to change: for a system its id, kind,
//! base URL, credential type and version, delivery, state and its message, the credential's
//! expiry, the sealed credential and the shared token;
//! for a caller every field (role, token hash, revocation, scope, expiry). The wrapper sets the tag
//! on every write and checks it on every read. A record that fails is refused *alone*: a read of
//! it answers [`StoreError::Tampered`] (`DATA_LOSS`), a listing leaves it out, and both log its id
//! and count it (`credbroker_store_records_refused_total`). It is never used upstream.
//!
//! What a tag cannot stop: putting back a whole earlier row the broker itself wrote (a revoked
//! caller's row from before its revocation, say). The broker refuses to un-revoke a caller it has
//! seen revoked; beyond that, replay needs a monotonic counter outside the database
//! (`docs/threat-model.md`).

use std::sync::Arc;

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{Change, CredentialStore, RefreshLock, StoreError, StoredEvent};
use crate::model::{CallerRecord, SystemRecord};

/// The `meta` key that marks a store whose records all carry tags.
pub const INTEGRITY_META_KEY: &str = "record_integrity";

/// Wraps a store: tags records on write, checks them on read.
pub struct AuthenticatedStore {
    inner: Arc<dyn CredentialStore>,
    key: crate::crypto::SubKey,
}

impl AuthenticatedStore {
    /// Wraps `inner`; `key` is derived from the master key (label `record-integrity`).
    pub fn new(inner: Arc<dyn CredentialStore>, key: crate::crypto::SubKey) -> Self {
        Self { inner, key }
    }

    /// The tag `record` should carry.
    pub fn system_tag(&self, record: &SystemRecord) -> String {
        tag(self.key.as_bytes(), &system_fields(record))
    }

    /// The tag `record` should carry.
    pub fn caller_tag(&self, record: &CallerRecord) -> String {
        tag(self.key.as_bytes(), &caller_fields(record))
    }

    /// The record if its tag holds (handed on without it: the tag is the store's business).
    fn check_system(&self, mut r: SystemRecord) -> Result<SystemRecord, StoreError> {
        match r.integrity.take() {
            Some(t) if verify(self.key.as_bytes(), &system_fields(&r), &t) => Ok(r),
            _ => Err(refused("system", &r.system_id)),
        }
    }

    fn check_caller(&self, mut r: CallerRecord) -> Result<CallerRecord, StoreError> {
        match r.integrity.take() {
            Some(t) if verify(self.key.as_bytes(), &caller_fields(&r), &t) => Ok(r),
            _ => Err(refused("caller", &r.name)),
        }
    }

    fn tagged_system(&self, record: &SystemRecord) -> SystemRecord {
        let mut r = record.clone();
        r.integrity = Some(self.system_tag(record));
        r
    }

    fn tagged_caller(&self, record: &CallerRecord) -> CallerRecord {
        let mut r = record.clone();
        r.integrity = Some(self.caller_tag(record));
        r
    }

    /// Records without a tag, for adopting a store written before tags existed:
    /// `(systems, callers)` tagged and written back. Records whose tag is present but wrong are
    /// left alone (they stay refused).
    pub async fn adopt_untagged(&self) -> Result<(u64, u64), StoreError> {
        let (mut systems, mut callers) = (0, 0);
        let mut after: Option<String> = None;
        loop {
            let page = self.inner.list_systems(after.as_deref(), 256).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.system_id.clone());
            for r in page.iter().filter(|r| r.integrity.is_none()) {
                tracing::warn!(message = "Adopting a system record written before record authentication.", system_id = %r.system_id);
                // A new revision: a writer holding the old one loses its compare-and-swap
                // instead of overwriting the tag.
                let mut adopted = r.clone();
                adopted.revision = r.revision.saturating_add(1);
                self.inner
                    .update_system(&self.tagged_system(&adopted), r.revision)
                    .await?;
                systems += 1;
            }
        }
        for c in self.inner.list_callers().await? {
            if c.integrity.is_none() {
                tracing::warn!(message = "Adopting a caller record written before record authentication.", caller = %c.name);
                self.inner.update_caller(&self.tagged_caller(&c)).await?;
                callers += 1;
            }
        }
        Ok((systems, callers))
    }
}

fn refused(what: &str, id: &str) -> StoreError {
    crate::metrics::METRICS.record_refused();
    let shown = super::shown_key(id);
    tracing::error!(
        message = "A stored record failed authentication (edited without the master key?); it is refused and never used.",
        record = what,
        id = %shown,
    );
    StoreError::Tampered(format!("{what} '{shown}' failed authentication"))
}

fn tag(key: &[u8; 32], fields: &[Vec<u8>]) -> String {
    mac(key, fields)
        .map(|m| URL_SAFE_NO_PAD.encode(m.finalize().into_bytes()))
        .unwrap_or_default()
}

fn verify(key: &[u8; 32], fields: &[Vec<u8>], tag: &str) -> bool {
    match (URL_SAFE_NO_PAD.decode(tag), mac(key, fields)) {
        // Constant-time comparison.
        (Ok(t), Some(m)) => m.verify_slice(&t).is_ok(),
        _ => false,
    }
}

/// HMAC over length-prefixed fields (no two field lists give the same input).
fn mac(key: &[u8; 32], fields: &[Vec<u8>]) -> Option<Hmac<Sha256>> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).ok()?;
    for f in fields {
        m.update(&(f.len() as u64).to_be_bytes());
        m.update(f);
    }
    Some(m)
}

/// The serde name of an enum value (the stored spelling, stable across versions).
fn name<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn system_fields(r: &SystemRecord) -> Vec<Vec<u8>> {
    let shared = r.shared_token.as_ref();
    vec![
        b"credbroker/record/v1/system".to_vec(),
        r.system_id.as_bytes().to_vec(),
        name(&r.kind),
        r.base_url.as_bytes().to_vec(),
        name(&r.credential_type),
        r.credential_version.to_be_bytes().to_vec(),
        name(&r.delivery),
        name(&r.state),
        // Shown to workers and admins as is, and enforced (a static credential's expiry).
        name(&r.state_message),
        name(&r.credential_expires_at),
        r.sealed_credential.clone(),
        vec![u8::from(shared.is_some())],
        shared.map(|s| s.sealed.clone()).unwrap_or_default(),
        shared
            .map(|s| s.expires_at_ms)
            .unwrap_or(0)
            .to_be_bytes()
            .to_vec(),
        shared
            .map(|s| s.token_id.as_bytes().to_vec())
            .unwrap_or_default(),
    ]
}

fn caller_fields(r: &CallerRecord) -> Vec<Vec<u8>> {
    vec![
        b"credbroker/record/v1/caller".to_vec(),
        r.name.as_bytes().to_vec(),
        name(&r.role),
        r.token_sha256.as_bytes().to_vec(),
        r.created_at.to_be_bytes().to_vec(),
        vec![u8::from(r.revoked)],
        name(&r.system_patterns),
        name(&r.kinds),
        name(&r.expires_at),
    ]
}

#[async_trait]
impl CredentialStore for AuthenticatedStore {
    async fn get_system(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        match self.inner.get_system(system_id).await? {
            Some(r) => self.check_system(r).map(Some),
            None => Ok(None),
        }
    }

    async fn get_system_fresh(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        match self.inner.get_system_fresh(system_id).await? {
            Some(r) => self.check_system(r).map(Some),
            None => Ok(None),
        }
    }

    async fn list_systems(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SystemRecord>, StoreError> {
        // Records failing authentication are left out.
        super::fill_page(after, limit, |cursor, want| async move {
            let page = self.inner.list_systems(cursor.as_deref(), want).await?;
            Ok(super::Batch {
                rows: page.len(),
                last_key: page.last().map(|r| r.system_id.clone()),
                accepted: page
                    .into_iter()
                    .filter_map(|r| self.check_system(r).ok())
                    .collect(),
            })
        })
        .await
    }

    async fn insert_system(&self, record: &SystemRecord) -> Result<(), StoreError> {
        self.inner.insert_system(&self.tagged_system(record)).await
    }

    async fn update_system_fenced(
        &self,
        record: &SystemRecord,
        expected_revision: u64,
        fence: super::Fence,
    ) -> Result<(), StoreError> {
        self.inner
            .update_system_fenced(&self.tagged_system(record), expected_revision, fence)
            .await
    }

    async fn update_system(
        &self,
        record: &SystemRecord,
        expected_revision: u64,
    ) -> Result<(), StoreError> {
        self.inner
            .update_system(&self.tagged_system(record), expected_revision)
            .await
    }

    async fn delete_system(&self, system_id: &str) -> Result<bool, StoreError> {
        self.inner.delete_system(system_id).await
    }

    async fn count_systems(&self) -> Result<usize, StoreError> {
        self.inner.count_systems().await
    }

    async fn count_callers(&self) -> Result<usize, StoreError> {
        self.inner.count_callers().await
    }

    async fn list_callers(&self) -> Result<Vec<CallerRecord>, StoreError> {
        let all = self.inner.list_callers().await?;
        Ok(all
            .into_iter()
            .filter_map(|c| self.check_caller(c).ok())
            .collect())
    }

    async fn insert_caller(&self, record: &CallerRecord) -> Result<(), StoreError> {
        self.inner.insert_caller(&self.tagged_caller(record)).await
    }

    async fn update_caller(&self, record: &CallerRecord) -> Result<(), StoreError> {
        self.inner.update_caller(&self.tagged_caller(record)).await
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_meta(key).await
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner.put_meta(key, value).await
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
        wait: std::time::Duration,
    ) -> Result<Option<RefreshLock>, StoreError> {
        self.inner.lock_refresh(system_id, wait).await
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
        self.inner.changes()
    }

    async fn append_events(&self, events: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        let tagged: Vec<(u64, Vec<u8>)> = events
            .iter()
            .map(|(at, body)| {
                let mut b = tag(self.key.as_bytes(), &event_fields(*at, body)).into_bytes();
                b.push(b'.');
                b.extend_from_slice(body);
                (*at, b)
            })
            .collect();
        self.inner.append_events(&tagged).await
    }

    /// Events whose tag fails (written without the master key) come back with an empty body
    /// (logged and counted): readers skip them and still move past their sequence numbers.
    async fn events_after(&self, seq: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let mut rows = self.inner.events_after(seq, limit).await?;
        for e in &mut rows {
            let dot = e.body.iter().position(|b| *b == b'.');
            let ok = dot.is_some_and(|dot| {
                std::str::from_utf8(&e.body[..dot]).is_ok_and(|t| {
                    verify(
                        self.key.as_bytes(),
                        &event_fields(e.at, &e.body[dot + 1..]),
                        t,
                    )
                })
            });
            match dot.filter(|_| ok) {
                Some(dot) => {
                    e.body.drain(..=dot);
                }
                None => {
                    let _ = refused("event", &e.seq.to_string());
                    e.body.clear();
                }
            }
        }
        Ok(rows)
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
        self.inner.init_meta(key, value).await
    }

    async fn take_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.take_meta(key).await
    }
}

/// An event's tag covers its time and its body (what watchers and webhook receivers are told).
fn event_fields(at: u64, body: &[u8]) -> Vec<Vec<u8>> {
    vec![
        b"credbroker/record/v1/event".to_vec(),
        at.to_be_bytes().to_vec(),
        body.to_vec(),
    ]
}
