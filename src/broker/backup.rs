//! Online backup and restore (`ExportBackup`, `RestoreBackup`, `credbrokerctl backup|restore`).
//!
//! # Format
//! A backup is a sequence of chunks. Each chunk is `"CBK1" | nonce(12) | AES-256-GCM(ct+tag)`
//! under a key derived from the master key (label `backup-v1`), with AAD `credbroker-backup/v1`.
//! The plaintext is JSON: the backup id, the chunk's sequence number, whether it is the last,
//! up to [`CHUNK_SYSTEMS`] systems and, unless one system alone is larger, up to [`CHUNK_BYTES`]
//! (metadata plus the credential, which exists in clear only inside the encrypted chunk), the
//! callers (token hashes only: in the last chunk, or in chunks of their own just before it when
//! they do not fit) and, in the last chunk, the totals. Chunks out of order, from another
//! backup, missing at the end, altered or made under another master key are refused before
//! anything is written.
//!
//! # Semantics
//! - Export runs while the broker serves: it pages through the store, so each record is
//!   consistent and the set is the store as each page was read (a write racing the export may or
//!   may not be in it).
//! - Restore re-seals every credential under the restoring broker's current key and inserts
//!   what is missing; a system or caller that already exists is left exactly as it is and
//!   counted as skipped. Restoring into an empty broker therefore reproduces the backup. A
//!   system deleted here since takes a credential version past its last one (versions never
//!   repeat: its old leases stay dead).
//! - The same master key must be loaded on both sides; without it a backup cannot be read.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::broker::Broker;
use crate::error::BrokerError;
use crate::model::{unix_now, CallerRecord, Credential, SystemRecord};
use crate::store::StoreError;

/// Systems per chunk, at most.
pub const CHUNK_SYSTEMS: usize = 50;
/// A chunk larger than this sealed is cut in two (while it holds more than one system), so
/// that large credentials (private keys, certificates) keep every chunk well under the
/// `RestoreBackup` message limit ([`RESTORE_MESSAGE_BYTES`]).
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// The largest `RestoreBackup` message the server takes: room for any chunk the export can send
/// (a chunk over [`CHUNK_BYTES`] holds one system, and the export's answers are cut at 4 MiB;
/// see `server::token_route`).
pub const RESTORE_MESSAGE_BYTES: usize = 8 * 1024 * 1024;
const MAGIC: &[u8; 4] = b"CBK1";
const AAD: &[u8] = b"credbroker-backup/v1";
const NONCE_LEN: usize = 12;

#[derive(Serialize, Deserialize)]
struct BackupSystem {
    record: SystemRecord,
    credential: Credential,
}

#[derive(Serialize, Deserialize)]
struct Chunk {
    backup_id: String,
    seq: u64,
    last: bool,
    created_at: u64,
    systems: Vec<BackupSystem>,
    #[serde(default)]
    callers: Vec<CallerRecord>,
    #[serde(default)]
    total_systems: u64,
}

/// What a restore did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RestoreSummary {
    /// Systems inserted.
    pub systems_restored: u64,
    /// Systems already present (left unchanged).
    pub systems_skipped: u64,
    /// Callers inserted.
    pub callers_restored: u64,
    /// Callers already present (left unchanged).
    pub callers_skipped: u64,
}

fn cipher(broker: &Broker) -> Aes256Gcm {
    let key = broker.derive_key("backup-v1");
    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key.as_bytes()))
}

fn seal(cipher: &Aes256Gcm, chunk: &Chunk) -> Result<Vec<u8>, BrokerError> {
    let plain = Zeroizing::new(
        serde_json::to_vec(chunk)
            .map_err(|_| BrokerError::Internal("could not encode a backup chunk"))?,
    );
    let nonce = crate::util::random::bytes::<NONCE_LEN>();
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &plain,
                aad: AAD,
            },
        )
        .map_err(|_| BrokerError::Internal("could not encrypt a backup chunk"))?;
    let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + ct.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

fn open(cipher: &Aes256Gcm, bytes: &[u8], index: usize) -> Result<Chunk, BrokerError> {
    let bad = |why: &str| BrokerError::invalid("chunk", format!("backup chunk {index}: {why}"));
    if bytes.len() < MAGIC.len() + NONCE_LEN + 16 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad("not a credbroker backup chunk"));
    }
    let nonce = &bytes[MAGIC.len()..MAGIC.len() + NONCE_LEN];
    let plain = Zeroizing::new(
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: &bytes[MAGIC.len() + NONCE_LEN..],
                    aad: AAD,
                },
            )
            .map_err(|_| bad("does not decrypt (altered, or made under another master key)"))?,
    );
    serde_json::from_slice(&plain).map_err(|_| bad("unreadable content"))
}

/// Refuses a chunk holding a system whose credential is not of the record's type.
fn consistent(chunk: &Chunk) -> Result<(), BrokerError> {
    match chunk
        .systems
        .iter()
        .find(|s| s.record.credential_type != s.credential.credential_type())
    {
        Some(s) => Err(BrokerError::invalid(
            "chunk",
            format!(
                "system '{}' has an inconsistent credential",
                s.record.system_id
            ),
        )),
        None => Ok(()),
    }
}

/// An export under way: what its chunks share and how far it got.
struct Export {
    cipher: Aes256Gcm,
    backup_id: String,
    created_at: u64,
    /// The next chunk's sequence number.
    seq: u64,
    /// Systems in the chunks made so far.
    total: u64,
    /// See [`CHUNK_BYTES`].
    chunk_bytes: usize,
}

impl Export {
    /// Seals one page of systems as the next chunk, or as several when it would be larger than
    /// [`CHUNK_BYTES`] (halved until each fits, or holds one system). The callers come with the
    /// backup's last page (`last`): in its last chunk, or, when they do not fit there, in
    /// chunks of their own before it, cut the same way (a restore reads callers from every
    /// chunk).
    fn seal_page(
        &mut self,
        systems: Vec<BackupSystem>,
        last: bool,
        callers: Vec<CallerRecord>,
    ) -> Result<Vec<Vec<u8>>, BrokerError> {
        let mut sealed = Vec::new();
        let mut parts: std::collections::VecDeque<Part> = [(systems, callers)].into();
        while let Some((systems, callers)) = parts.pop_front() {
            let chunk = Chunk {
                backup_id: self.backup_id.clone(),
                seq: self.seq,
                last: last && parts.is_empty(),
                created_at: self.created_at,
                total_systems: self.total + systems.len() as u64,
                systems,
                callers,
            };
            let bytes = seal(&self.cipher, &chunk)?;
            if bytes.len() > self.chunk_bytes {
                if let Some((first, second)) = halves(chunk.systems, chunk.callers) {
                    parts.push_front(second);
                    parts.push_front(first);
                    continue;
                }
            }
            self.seq += 1;
            self.total = chunk.total_systems;
            sealed.push(bytes);
        }
        Ok(sealed)
    }
}

/// What one chunk holds: systems, and callers.
type Part = (Vec<BackupSystem>, Vec<CallerRecord>);

/// A chunk's content cut in two, in order (systems first, callers after), or `None` when it
/// holds a single system or caller.
fn halves(mut systems: Vec<BackupSystem>, mut callers: Vec<CallerRecord>) -> Option<(Part, Part)> {
    if systems.len() > 1 {
        let second = systems.split_off(systems.len() / 2);
        Some(((systems, Vec::new()), (second, callers)))
    } else if !systems.is_empty() && !callers.is_empty() {
        Some(((systems, Vec::new()), (Vec::new(), callers)))
    } else if callers.len() > 1 {
        let second = callers.split_off(callers.len() / 2);
        Some(((Vec::new(), callers), (Vec::new(), second)))
    } else {
        None
    }
}

impl Broker {
    /// Exports the store as sealed chunks, sending each to `tx` as it is made (the receiver
    /// going away stops the export).
    pub async fn export_backup(&self, tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, BrokerError>>) {
        let mut export = Export {
            cipher: cipher(self),
            backup_id: crate::util::random::hex_id::<8>(),
            created_at: unix_now(),
            seq: 0,
            total: 0,
            chunk_bytes: CHUNK_BYTES,
        };
        let result: Result<(), BrokerError> = async {
            let mut pages = self.system_pages(CHUNK_SYSTEMS);
            while let Some(page) = pages.next().await? {
                let last = pages.is_done();
                let mut systems = Vec::with_capacity(page.len());
                for mut record in page {
                    let credential = self.open_credential(&record)?;
                    record.sealed_credential = Vec::new();
                    record.shared_token = None;
                    systems.push(BackupSystem { record, credential });
                }
                let callers = if last {
                    self.store.list_callers().await?
                } else {
                    Vec::new()
                };
                for bytes in export.seal_page(systems, last, callers)? {
                    if tx.send(Ok(bytes)).await.is_err() {
                        return Ok(());
                    }
                }
                let (backup_id, total, seq) = (&export.backup_id, export.total, export.seq);
                if last {
                    tracing::info!(message = "Backup exported.", backup_id = %backup_id, systems = total, chunks = seq);
                    let stored = self.store.count_systems().await? as u64;
                    if stored > total {
                        tracing::error!(message = "The backup leaves out stored records that are refused (undecodable, or failing authentication); see the earlier errors naming them.", backup_id = %backup_id, left_out = stored - total);
                    }
                    return Ok(());
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::error!(message = "Backup export failed.", error = %e);
            let _ = tx.send(Err(e)).await;
        }
    }

    /// Restores sealed `chunks` (all of one backup, in order). Every chunk is verified before
    /// anything is written; then missing systems and callers are inserted and existing ones
    /// left unchanged.
    pub async fn restore_backup(&self, chunks: &[Vec<u8>]) -> Result<RestoreSummary, BrokerError> {
        if chunks.is_empty() {
            return Err(BrokerError::invalid("chunk", "the backup is empty"));
        }
        let cipher = cipher(self);
        let mut opened = Vec::with_capacity(chunks.len());
        let mut backup_id = None;
        let mut systems = 0u64;
        for (i, bytes) in chunks.iter().enumerate() {
            let chunk = open(&cipher, bytes, i)?;
            let id = backup_id.get_or_insert_with(|| chunk.backup_id.clone());
            if chunk.backup_id != *id || chunk.seq != i as u64 {
                return Err(BrokerError::invalid(
                    "chunk",
                    format!("backup chunk {i} is out of order or from another backup"),
                ));
            }
            if chunk.last != (i + 1 == chunks.len()) {
                return Err(BrokerError::invalid(
                    "chunk",
                    "the backup is truncated or has chunks after its last one",
                ));
            }
            systems += chunk.systems.len() as u64;
            if chunk.last && chunk.total_systems != systems {
                return Err(BrokerError::invalid(
                    "chunk",
                    "the backup's system count does not match its chunks",
                ));
            }
            consistent(&chunk)?;
            opened.push(chunk);
        }
        let mut summary = RestoreSummary::default();
        for chunk in opened {
            self.restore_chunk(chunk, &mut summary, true).await?;
        }
        tracing::info!(
            message = "Backup restored.",
            systems_restored = summary.systems_restored,
            systems_skipped = summary.systems_skipped,
            callers_restored = summary.callers_restored,
            callers_skipped = summary.callers_skipped
        );
        Ok(summary)
    }

    /// Inserts one opened chunk's missing systems and callers, counting them in `summary`;
    /// with `announce`, each restored system is an event.
    async fn restore_chunk(
        &self,
        chunk: Chunk,
        summary: &mut RestoreSummary,
        announce: bool,
    ) -> Result<(), BrokerError> {
        for s in chunk.systems {
            let id = s.record.system_id.clone();
            // Under the system's single-flight lock, as a delete is: one landing between
            // the version read and the insert would see its version repeated. A flight
            // made only for this is dropped again if nothing was restored (one that was
            // there holds the system's refresh state: it stays).
            let made = self.cache.existing_flight(&id).is_none();
            let flight = self.flight(&id);
            let guard = flight.lock().await;
            let restored = self.restore_system(s, announce).await;
            drop(guard);
            drop(flight);
            if made && !matches!(restored, Ok(true)) {
                self.forget_flight_if_idle(&id, 0);
            }
            match restored? {
                true => summary.systems_restored += 1,
                false => summary.systems_skipped += 1,
            }
        }
        for c in chunk.callers {
            match self.store.insert_caller(&c).await {
                Ok(()) => {
                    self.callers.load(&c);
                    summary.callers_restored += 1
                }
                Err(StoreError::AlreadyExists) => summary.callers_skipped += 1,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// What [`Broker::copy_into`] copied.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopySummary {
    /// Systems copied (every one the source stores).
    pub systems: u64,
    /// Callers copied (every one the source stores).
    pub callers: u64,
}

impl Broker {
    /// Copies every system and caller into `target`, an empty broker under another master key
    /// (a master key replacement: [`crate::server::rekey`]): the records go through a backup
    /// made here, each chunk opened as it is made and restored there (each credential sealed
    /// under the target's key). Nothing is written here. Fails, leaving the target to be thrown
    /// away, unless the target ends with exactly what this store holds: a record this broker
    /// refuses (undecodable, failing authentication) would otherwise be left behind unnoticed.
    pub async fn copy_into(&self, target: &Broker) -> Result<CopySummary, BrokerError> {
        let from = cipher(self);
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        // Chunk by chunk: one in clear at a time, whatever the store's size.
        let copy = async {
            let mut restored = RestoreSummary::default();
            let mut index = 0;
            while let Some(bytes) = rx.recv().await {
                let bytes: Vec<u8> = bytes?;
                let chunk = open(&from, &bytes, index)?;
                consistent(&chunk)?;
                // No events: the copy's log starts empty (see `crate::server::rekey`).
                target.restore_chunk(chunk, &mut restored, false).await?;
                index += 1;
            }
            Ok::<_, BrokerError>(restored)
        };
        let ((), restored) = tokio::join!(self.export_backup(tx), copy);
        let restored = restored?;
        let stored = (
            self.store.count_systems().await? as u64,
            self.store.count_callers().await? as u64,
        );
        let copied = (restored.systems_restored, restored.callers_restored);
        if copied != stored || restored.systems_skipped + restored.callers_skipped > 0 {
            return Err(BrokerError::FailedPrecondition(format!(
                "copied {} of {} systems and {} of {} callers into a store that must start \
                 empty; the store holds records this broker refuses (see the errors naming \
                 them) or the target was not empty",
                copied.0, stored.0, copied.1, stored.1
            )));
        }
        Ok(CopySummary {
            systems: copied.0,
            callers: copied.1,
        })
    }
}

impl Broker {
    /// Inserts one backed-up system, re-sealed, past any version a deleted one had; false
    /// when the system exists already (left as it is).
    async fn restore_system(&self, s: BackupSystem, announce: bool) -> Result<bool, BrokerError> {
        let mut record = s.record;
        let id = record.system_id.clone();
        let version = self.version_for_restore(&id, record.credential_version);
        record.credential_version = version.await?;
        record.sealed_credential = self.seal(&id, record.credential_version, &s.credential)?;
        record.revision = 1;
        match self.store.insert_system(&record).await {
            Ok(()) => {
                // Watches and webhooks hear of it as of any registration.
                if announce {
                    self.emit(super::events::EventType::Registered, &record, "restored");
                }
                Ok(true)
            }
            Err(StoreError::AlreadyExists) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretString;

    fn system(i: usize) -> BackupSystem {
        BackupSystem {
            record: crate::model::sample_system(&format!("s{i}")),
            credential: Credential::PersonalAccessToken {
                token: SecretString::new("k".repeat(1000)),
                username: None,
                expires_at: None,
            },
        }
    }

    /// An export under way, cutting chunks past 4,000 bytes.
    fn export(backup_id: &str) -> Export {
        Export {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&[3u8; 32])),
            backup_id: backup_id.to_owned(),
            created_at: 1,
            seq: 0,
            total: 0,
            chunk_bytes: 4000,
        }
    }

    /// A worker caller named `name`, scoped to `patterns`.
    fn caller(name: String, system_patterns: Vec<String>) -> CallerRecord {
        CallerRecord {
            name,
            role: crate::model::Role::Worker,
            token_sha256: "00".repeat(32),
            created_at: 1,
            revoked: false,
            system_patterns,
            kinds: Vec::new(),
            expires_at: None,
            integrity: None,
        }
    }

    /// Pages too large for one chunk are cut until each chunk fits; the chunks read back in
    /// order, numbered on across pages, with the running total, and only the very last one is
    /// marked last and carries the callers.
    #[test]
    fn pages_too_large_for_one_chunk_are_cut_and_read_back_in_order() {
        let mut export = export("b1");
        let caller = caller("worker-1".to_owned(), Vec::new());
        let mut sealed = export
            .seal_page((0..3).map(system).collect(), false, Vec::new())
            .unwrap();
        let first_page = sealed.len();
        sealed.extend(
            export
                .seal_page((3..10).map(system).collect(), true, vec![caller])
                .unwrap(),
        );
        assert!(
            first_page >= 2 && sealed.len() >= first_page + 3,
            "{}",
            sealed.len()
        );
        let mut ids = Vec::new();
        for (i, bytes) in sealed.iter().enumerate() {
            assert!(bytes.len() <= 4000, "chunk {i}: {} bytes", bytes.len());
            let chunk = open(&export.cipher, bytes, i).unwrap();
            let end = i + 1 == sealed.len();
            assert_eq!((chunk.seq, chunk.last), (i as u64, end));
            assert_eq!(chunk.callers.len(), usize::from(end));
            ids.extend(chunk.systems.iter().map(|s| s.record.system_id.clone()));
            assert_eq!(chunk.total_systems, ids.len() as u64);
        }
        let want: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
        assert_eq!(ids, want);
    }

    /// Callers too many for the last chunk go in chunks of their own before it, each within
    /// the size, and every one reads back.
    #[test]
    fn callers_too_many_for_one_chunk_are_cut_too() {
        let mut export = export("b2");
        let patterns = || (0..4).map(|p| format!("{p}-{}", "x".repeat(100))).collect();
        let callers: Vec<CallerRecord> = (0..40)
            .map(|i| caller(format!("worker-{i}"), patterns()))
            .collect();
        let sealed = export
            .seal_page((0..2).map(system).collect(), true, callers)
            .unwrap();
        assert!(sealed.len() > 3, "{}", sealed.len());
        let (mut names, mut systems) = (Vec::new(), 0);
        for (i, bytes) in sealed.iter().enumerate() {
            assert!(bytes.len() <= 4000, "chunk {i}: {} bytes", bytes.len());
            let chunk = open(&export.cipher, bytes, i).unwrap();
            assert_eq!((chunk.seq, chunk.last), (i as u64, i + 1 == sealed.len()));
            systems += chunk.systems.len();
            names.extend(chunk.callers.into_iter().map(|c| c.name));
        }
        let want: Vec<String> = (0..40).map(|i| format!("worker-{i}")).collect();
        assert_eq!((names, systems), (want, 2));
    }
}
