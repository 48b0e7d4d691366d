//! [`SledStore`]: the embedded default store, one sled database under the data directory.
//!
//! sled holds an exclusive file lock on its directory, so a second broker on the same data
//! directory fails at open with [`OpenError::Locked`]. Writes are made durable with an explicit
//! flush on a blocking thread before any mutating call returns; sled's own limits (it uses
//! `sync_file_range`, not `fsync`, for its log) are documented in the README.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{decode, encode, CredentialStore, StoreError};
use crate::model::{CallerRecord, SystemRecord};

/// The sled-backed store.
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    systems: sled::Tree,
    callers: sled::Tree,
    meta: sled::Tree,
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

    /// Opens (or creates) the store in `data_dir/store`.
    pub fn open(data_dir: &Path) -> Result<Self, OpenError> {
        let path = Self::path_in(data_dir);
        let db = sled::Config::new()
            .path(&path)
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
        Ok(Self {
            systems: tree("systems")?,
            callers: tree("callers")?,
            meta: tree("meta")?,
            db,
        })
    }

    async fn durable(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Backend(format!("flush task: {e}")))?
            .map(|_| ())
            .map_err(backend)
    }
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

#[async_trait]
impl CredentialStore for SledStore {
    async fn get_system(&self, system_id: &str) -> Result<Option<SystemRecord>, StoreError> {
        match self.systems.get(system_id.as_bytes()).map_err(backend)? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
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
        for item in iter.take(limit) {
            let (_, v) = item.map_err(backend)?;
            out.push(decode(&v)?);
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
        self.durable().await
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
            .compare_and_swap(key, Some(current), Some(bytes))
            .map_err(backend)?
            .map_err(|_| StoreError::Conflict)?;
        self.durable().await
    }

    async fn delete_system(&self, system_id: &str) -> Result<bool, StoreError> {
        let existed = self
            .systems
            .remove(system_id.as_bytes())
            .map_err(backend)?
            .is_some();
        self.durable().await?;
        Ok(existed)
    }

    async fn count_systems(&self) -> Result<usize, StoreError> {
        Ok(self.systems.len())
    }

    async fn list_callers(&self) -> Result<Vec<CallerRecord>, StoreError> {
        self.callers
            .iter()
            .map(|item| {
                let (_, v) = item.map_err(backend)?;
                decode(&v)
            })
            .collect()
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
}
