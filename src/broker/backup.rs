//! Online backup and restore (`ExportBackup`, `RestoreBackup`, `credbrokerctl backup|restore`).
//!
//! # Format
//! A backup is a sequence of chunks. Each chunk is `"CBK1" | nonce(12) | AES-256-GCM(ct+tag)`
//! under a key derived from the master key (label `backup-v1`), with AAD `credbroker-backup/v1`.
//! The plaintext is JSON: the backup id, the chunk's sequence number, whether it is the last,
//! up to [`CHUNK_SYSTEMS`] systems (metadata plus the credential, which exists in clear only
//! inside the encrypted chunk) and, in the last chunk, every caller (token hashes only) and the
//! totals. Chunks out of order, from another backup, missing at the end, altered or made under
//! another master key are refused before anything is written.
//!
//! # Semantics
//! - Export runs while the broker serves: it pages through the store, so each record is
//!   consistent and the set is the store as each page was read (a write racing the export may or
//!   may not be in it).
//! - Restore re-seals every credential under the restoring broker's current key and inserts
//!   what is missing; a system or caller that already exists is left exactly as it is and
//!   counted as skipped. Restoring into an empty broker therefore reproduces the backup.
//! - The same master key must be loaded on both sides; without it a backup cannot be read.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::broker::Broker;
use crate::error::BrokerError;
use crate::model::{unix_now, CallerRecord, Credential, SystemRecord};
use crate::store::StoreError;

/// Systems per chunk (keeps each chunk well under the gRPC message cap).
pub const CHUNK_SYSTEMS: usize = 50;
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

impl Broker {
    /// Exports the store as sealed chunks, sending each to `tx` as it is made (the receiver
    /// going away stops the export).
    pub async fn export_backup(&self, tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, BrokerError>>) {
        let cipher = cipher(self);
        let backup_id = crate::util::random::hex_id::<8>();
        let created_at = unix_now();
        let mut seq = 0u64;
        let mut total = 0u64;
        let result: Result<(), BrokerError> = async {
            let mut pages = self.system_pages(CHUNK_SYSTEMS);
            while let Some(page) = pages.next().await? {
                let done = pages.is_done();
                let mut systems = Vec::with_capacity(page.len());
                for mut record in page {
                    let credential = self.open_credential(&record)?;
                    record.sealed_credential = Vec::new();
                    record.shared_token = None;
                    systems.push(BackupSystem { record, credential });
                }
                total += systems.len() as u64;
                let last = done;
                let callers = if last {
                    self.store.list_callers().await?
                } else {
                    Vec::new()
                };
                let chunk = Chunk {
                    backup_id: backup_id.clone(),
                    seq,
                    last,
                    created_at,
                    systems,
                    callers,
                    total_systems: total,
                };
                let bytes = seal(&cipher, &chunk)?;
                if tx.send(Ok(bytes)).await.is_err() {
                    return Ok(());
                }
                seq += 1;
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
            for s in &chunk.systems {
                if s.record.credential_type != s.credential.credential_type() {
                    return Err(BrokerError::invalid(
                        "chunk",
                        format!(
                            "system '{}' has an inconsistent credential",
                            s.record.system_id
                        ),
                    ));
                }
            }
            opened.push(chunk);
        }
        let mut summary = RestoreSummary::default();
        for chunk in opened {
            for s in chunk.systems {
                let mut record = s.record;
                record.sealed_credential =
                    self.seal(&record.system_id, record.credential_version, &s.credential)?;
                record.revision = 1;
                match self.store.insert_system(&record).await {
                    Ok(()) => summary.systems_restored += 1,
                    Err(StoreError::AlreadyExists) => summary.systems_skipped += 1,
                    Err(e) => return Err(e.into()),
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
}
