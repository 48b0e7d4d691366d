//! Online key rotation: key-encryption keys (KEKs) stored in the store's metadata sealed by the
//! root (the master key file), a background job that re-wraps every record's data key under the
//! primary KEK, status, and retirement of keys nothing uses.
//!
//! # Crash safety
//! A new KEK is written (and flushed) before it becomes primary, and the primary pointer before
//! any record uses it. Re-wrapping replaces one record at a time with compare-and-swap, so a crash
//! leaves every record sealed under either its old or its new KEK, both readable; the job resumes
//! at the next start. A key is retired only when a full scan finds no record using it.
//!
//! # Metadata keys
//! `kek_index` (comma-separated hex ids), `kek/<hex id>` (the KEK sealed by the root),
//! `primary_kek` (hex id; absent means the root).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use crate::broker::{Broker, OpenError, SCAN_PAGE};
use crate::crypto::{parse_header, Keyring, MasterKey, RecordBinding};
use crate::error::BrokerError;
use crate::store::{CredentialStore, StoreError};
use crate::util::sync::{lock, read, write};

/// Re-wrap job state.
#[derive(Debug, Default)]
pub struct RewrapState {
    running: AtomicBool,
    /// Asked for since the running pass began (a second rotation): one more pass follows, so
    /// records that pass had gone by are re-wrapped under the newest key too.
    again: AtomicBool,
    stop: AtomicBool,
    task: Mutex<Option<JoinHandle<()>>>,
    rewrapped: AtomicU64,
    /// When a read last made the keys be reloaded (seconds since the epoch).
    reloaded_for_read: AtomicU64,
}

/// A key's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    /// KEK id.
    pub id: u32,
    /// Primary (new records).
    pub primary: bool,
    /// The master key file itself.
    pub root: bool,
    /// Records it protects.
    pub records: u64,
}

/// Keyring status.
#[derive(Debug, Clone)]
pub struct KeyringStatus {
    /// Primary id.
    pub primary: u32,
    /// Every key.
    pub keys: Vec<KeyStatus>,
    /// Whether the re-wrap job runs.
    pub rewrap_running: bool,
    /// Records in total.
    pub total: u64,
}

fn hex_id(id: u32) -> String {
    format!("{id:08x}")
}

fn parse_id(s: &str) -> Option<u32> {
    u32::from_str_radix(s.trim(), 16).ok()
}

/// Loads the stored KEKs into a keyring holding the root.
pub async fn load_keks(
    store: &dyn CredentialStore,
    mut keyring: Keyring,
) -> Result<Keyring, OpenError> {
    let index = store.get_meta("kek_index").await?.unwrap_or_default();
    for id in String::from_utf8_lossy(&index)
        .split(',')
        .filter_map(parse_id)
    {
        let sealed = store
            .get_meta(&format!("kek/{}", hex_id(id)))
            .await?
            .ok_or_else(|| {
                OpenError::Damaged(format!("key {} is listed but missing", hex_id(id)))
            })?;
        let kek = keyring.open_kek(id, &sealed).map_err(|_| {
            OpenError::Damaged(format!(
                "key {} does not open with the master key",
                hex_id(id)
            ))
        })?;
        keyring.add_kek(kek);
    }
    if let Some(p) = store.get_meta("primary_kek").await? {
        let id = parse_id(&String::from_utf8_lossy(&p))
            .ok_or_else(|| OpenError::Damaged("unreadable primary key id".to_owned()))?;
        if !keyring.set_primary(id) {
            return Err(OpenError::Damaged(format!(
                "primary key {} is unknown",
                hex_id(id)
            )));
        }
    }
    Ok(keyring)
}

impl Broker {
    /// A record names a key this keyring does not hold: another replica rotated the master key
    /// and this one missed the news (a reload that failed, a notice lost). The keys are
    /// reloaded in the background, at most once a second, so that the next read finds it.
    pub(crate) fn reload_keys_for_read(&self, system_id: &str, key_id: u32) {
        let now = crate::model::unix_now();
        let last = self.rewrap.reloaded_for_read.load(Ordering::SeqCst);
        // A changed second, not a later one: a clock stepped back must not stop the reloads.
        if now == last
            || self
                .rewrap
                .reloaded_for_read
                .compare_exchange(last, now, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return;
        }
        // Logged with each reload (at most once a second), not with each read.
        tracing::warn!(message = "A stored credential is sealed under a key this broker does not hold; reloading the keys.", system_id = %system_id, key_id = %hex_id(key_id));
        let Some(me) = self.me.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            if let Err(e) = me.reload_keks().await {
                tracing::warn!(message = "Could not reload keys for a record under a key not held here.", error = %e);
            }
        });
    }

    /// Replicas: brings the keyring in line with the KEKs another replica stored (a rotation
    /// or retirement started elsewhere). New keys are added, retired ones removed, the primary
    /// follows the store.
    pub(crate) async fn reload_keks(&self) -> Result<(), BrokerError> {
        let index = self.store.get_meta("kek_index").await?.unwrap_or_default();
        let listed: Vec<u32> = String::from_utf8_lossy(&index)
            .split(',')
            .filter_map(parse_id)
            .collect();
        let known = read(&self.keyring).kek_ids();
        let mut sealed = Vec::new();
        for id in listed.iter().filter(|id| !known.contains(id)) {
            if let Some(s) = self.store.get_meta(&format!("kek/{}", hex_id(*id))).await? {
                sealed.push((*id, s));
            }
        }
        let primary = self
            .store
            .get_meta("primary_kek")
            .await?
            .and_then(|p| parse_id(&String::from_utf8_lossy(&p)));
        let mut keyring = write(&self.keyring);
        for (id, s) in sealed {
            match keyring.open_kek(id, &s) {
                Ok(kek) => keyring.add_kek(kek),
                Err(_) => {
                    tracing::error!(message = "A key stored by another replica does not open with this master key.", key_id = %hex_id(id))
                }
            }
        }
        let root = keyring.root_id();
        for id in keyring.kek_ids() {
            if id != root && !listed.contains(&id) {
                keyring.remove_kek(id);
            }
        }
        if let Some(p) = primary {
            keyring.set_primary(p);
        }
        Ok(())
    }

    /// Serializes key operations: in this process, and across replicas through the store's lock;
    /// on a shared store the keyring is re-read under the lock, so each operation builds on the
    /// last one's index instead of overwriting it.
    async fn key_operation(
        &self,
    ) -> Result<
        (
            tokio::sync::MutexGuard<'_, ()>,
            Option<crate::store::RefreshLock>,
        ),
        BrokerError,
    > {
        let (local, shared) = self
            .admin_operation(&self.key_ops, KEY_OPERATIONS_LOCK)
            .await?;
        if self.store.is_shared() {
            self.reload_keks().await?;
        }
        Ok((local, shared))
    }

    /// Creates a new KEK, makes it primary, and starts re-wrapping. Returns its id.
    pub async fn rotate_master_key(self: &Arc<Self>) -> Result<u32, BrokerError> {
        let _serialized = self.key_operation().await?;
        // A new id (32 bits): one that collided would overwrite a kept key's stored copy.
        let known = read(&self.keyring).kek_ids();
        let mut kek = MasterKey::generate();
        while known.contains(&kek.id()) {
            kek = MasterKey::generate();
        }
        let id = kek.id();
        let sealed = read(&self.keyring).seal_kek(&kek);
        // Durable before use: the KEK, then the index, then the primary pointer.
        self.store
            .put_meta(&format!("kek/{}", hex_id(id)), &sealed)
            .await?;
        let mut ids: Vec<u32> = read(&self.keyring).kek_ids().into_iter().skip(1).collect();
        ids.push(id);
        let index: Vec<String> = ids.iter().map(|i| hex_id(*i)).collect();
        self.store
            .put_meta("kek_index", index.join(",").as_bytes())
            .await?;
        {
            let mut kr = write(&self.keyring);
            kr.add_kek(kek);
        }
        self.store
            .put_meta("primary_kek", hex_id(id).as_bytes())
            .await?;
        write(&self.keyring).set_primary(id);
        tracing::info!(message = "New key-encryption key is primary; re-wrapping records.", key_id = %hex_id(id));
        self.start_rewrap();
        Ok(id)
    }

    /// Starts the re-wrap job, or has the running one make one more pass once it is done.
    pub fn start_rewrap(self: &Arc<Self>) {
        // Set before `running` is asked: a job that has just finished sees it (below).
        self.rewrap.again.store(true, Ordering::SeqCst);
        if self.rewrap.running.swap(true, Ordering::SeqCst) {
            return;
        }
        self.rewrap.stop.store(false, Ordering::SeqCst);
        let me = self.clone();
        let task = tokio::spawn(async move { me.rewrap_passes().await });
        *lock(&self.rewrap.task) = Some(task);
    }

    /// Re-wrap passes while more are asked for (and no stop is), then marks the job ended.
    async fn rewrap_passes(&self) {
        let r = &self.rewrap;
        loop {
            r.again.store(false, Ordering::SeqCst);
            if let Err(e) = self.rewrap_all().await {
                tracing::warn!(message = "Re-wrap stopped; it resumes at the next start or rotation.", error = %e);
            }
            r.running.store(false, Ordering::SeqCst);
            // A pass asked for while this one ran, unless a new job took it over meanwhile.
            let more = r.again.load(Ordering::SeqCst) && !r.stop.load(Ordering::SeqCst);
            if !more || r.running.swap(true, Ordering::SeqCst) {
                return;
            }
        }
    }

    /// Stops the re-wrap job (at shutdown) and waits for it.
    pub async fn stop_rewrap(&self) {
        self.rewrap.stop.store(true, Ordering::SeqCst);
        let task = lock(&self.rewrap.task).take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    /// Resumes an unfinished re-wrap (at start).
    pub async fn resume_rewrap(self: &Arc<Self>) {
        if let Ok(status) = self.key_status().await {
            let on_primary = status
                .keys
                .iter()
                .find(|k| k.primary)
                .map(|k| k.records)
                .unwrap_or(0);
            if on_primary < status.total {
                tracing::info!(
                    message = "Resuming the re-wrap of records.",
                    remaining = status.total - on_primary
                );
                self.start_rewrap();
            }
        }
    }

    async fn rewrap_all(&self) -> Result<(), BrokerError> {
        let mut pages = self.system_pages(SCAN_PAGE);
        while let Some(page) = pages.next().await? {
            for r in &page {
                if self.rewrap.stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                self.rewrap_one(&r.system_id).await?;
            }
        }
        Ok(())
    }

    async fn rewrap_one(&self, system_id: &str) -> Result<(), BrokerError> {
        for _ in 0..5 {
            let Some(r) = self.store.get_system(system_id).await? else {
                return Ok(());
            };
            let primary = read(&self.keyring).primary_id();
            match parse_header(&r.sealed_credential) {
                Ok(h) if h.kek_id == primary => return Ok(()),
                Ok(_) => {}
                // A damaged record stays as it is; reads report DATA_LOSS for it alone.
                Err(_) => return Ok(()),
            }
            let binding = RecordBinding {
                system_id: &r.system_id,
                credential_type: r.credential_type,
                version: r.credential_version,
            };
            let Ok(sealed) = read(&self.keyring).rewrap(&binding, &r.sealed_credential) else {
                tracing::error!(message = "A record failed authentication during re-wrap.", system_id = %system_id);
                return Ok(());
            };
            let mut updated = r.clone();
            updated.sealed_credential = sealed;
            match self.swap_system(&r, updated).await {
                Ok(_) => {
                    self.rewrap.rewrapped.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(StoreError::Conflict) => continue,
                // A record whose stored fields cannot be written on (a revision at its
                // limit) stays as it is, like a damaged one: the others are re-wrapped.
                Err(StoreError::Corrupt(e) | StoreError::Tampered(e)) => {
                    tracing::error!(message = "A record could not be re-wrapped.", system_id = %system_id, error = %e);
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Keys and the records each protects.
    pub async fn key_status(&self) -> Result<KeyringStatus, BrokerError> {
        let (primary, root, ids) = {
            let kr = read(&self.keyring);
            (kr.primary_id(), kr.root_id(), kr.kek_ids())
        };
        let mut counts: BTreeMap<u32, u64> = ids.iter().map(|i| (*i, 0)).collect();
        let mut total = 0;
        let mut pages = self.system_pages(SCAN_PAGE);
        while let Some(page) = pages.next().await? {
            for r in &page {
                total += 1;
                if let Ok(h) = parse_header(&r.sealed_credential) {
                    *counts.entry(h.kek_id).or_default() += 1;
                }
            }
        }
        Ok(KeyringStatus {
            primary,
            keys: counts
                .into_iter()
                .map(|(id, records)| KeyStatus {
                    id,
                    primary: id == primary,
                    root: id == root,
                    records,
                })
                .collect(),
            rewrap_running: self.rewrap.running.load(Ordering::SeqCst),
            total,
        })
    }

    /// Retires a KEK no record uses; answers its id as parsed.
    pub async fn retire_key(&self, key_id: &str) -> Result<u32, BrokerError> {
        let id = parse_id(key_id)
            .ok_or_else(|| BrokerError::invalid("key_id", "must be a hex key id"))?;
        // Named as parsed from here on (the request's text may be padded).
        let key_id = hex_id(id);
        let _serialized = self.key_operation().await?;
        let status = self.key_status().await?;
        let Some(k) = status.keys.iter().find(|k| k.id == id) else {
            return Err(BrokerError::NotFound(format!("key {key_id} not found")));
        };
        if k.primary || k.root {
            return Err(BrokerError::FailedPrecondition(format!(
                "key {key_id} is the {} key and cannot be retired",
                if k.primary { "primary" } else { "root" }
            )));
        }
        if k.records > 0 {
            return Err(BrokerError::FailedPrecondition(format!(
                "key {key_id} still protects {} record(s); wait for the re-wrap to finish",
                k.records
            )));
        }
        let remaining: Vec<String> = read(&self.keyring)
            .kek_ids()
            .into_iter()
            .skip(1)
            .filter(|i| *i != id)
            .map(hex_id)
            .collect();
        self.store
            .put_meta("kek_index", remaining.join(",").as_bytes())
            .await?;
        self.store
            .put_meta(&format!("kek/{}", hex_id(id)), b"")
            .await?;
        write(&self.keyring).remove_kek(id);
        tracing::info!(message = "Key retired.", key_id = %key_id);
        Ok(id)
    }
}

/// The store lock key operations hold (not a valid system id, so it never meets a refresh lock).
const KEY_OPERATIONS_LOCK: &str = "~key-operations";
