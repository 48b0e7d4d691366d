//! Master key loading and generation.
//!
//! The master key is 32 random bytes, stored base64-encoded in a file. It comes from
//! `CREDBROKER_MASTER_KEY_FILE` when set; otherwise from `<data-dir>/master.key`, which the broker
//! generates (mode 0600) on first start with an empty data directory. It is never overwritten.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// A 256-bit master key. Deliberately has no `Debug`; zeroized on drop.
pub struct MasterKey {
    id: u32,
    bytes: Zeroizing<[u8; 32]>,
}

/// Where the master key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeySource {
    /// Read from an existing file.
    File(PathBuf),
    /// Generated into this file on first start.
    Generated(PathBuf),
}

/// Why the master key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read or written.
    #[error("master key file {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file does not hold 32 base64-encoded bytes.
    #[error("master key file {0} must contain 32 random bytes, base64-encoded")]
    Format(PathBuf),
    /// The data directory has a store but no key.
    #[error(
        "the data directory {0} already holds a store but no master key or key check file was \
         found (set CREDBROKER_MASTER_KEY_FILE to the key it was created with); refusing to start"
    )]
    Missing(PathBuf),
    /// The key file changed while the broker was starting (between two tries).
    #[error(
        "the master key file changed while the broker was starting; refusing to start. Start \
         again with the key the store was created with"
    )]
    Changed,
}

impl MasterKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut());
        Self::from_bytes(bytes)
    }

    /// A key from raw bytes.
    pub fn from_bytes(bytes: Zeroizing<[u8; 32]>) -> Self {
        let digest = Sha256::new()
            .chain_update(b"credbroker-kek-id\0")
            .chain_update(bytes.as_ref())
            .finalize();
        let id = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        Self { id, bytes }
    }

    /// The key id recorded in every record it seals (derived from the key, reveals nothing).
    pub fn id(&self) -> u32 {
        self.id
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// Parses the base64 file format.
    pub fn from_base64(text: &str) -> Option<Self> {
        let decoded = Zeroizing::new(STANDARD.decode(text.trim()).ok()?);
        let arr: [u8; 32] = decoded.as_slice().try_into().ok()?;
        Some(Self::from_bytes(Zeroizing::new(arr)))
    }

    /// The base64 file format.
    ///
    /// # Security
    /// The result is the key in clear; write it only to a 0600 file.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.bytes.as_ref()))
    }

    /// Loads the key: from `explicit` when given, else `<data_dir>/master.key`, else generates it
    /// there when `store_exists` is false.
    pub fn load_or_generate(
        explicit: Option<&Path>,
        data_dir: &Path,
        store_exists: bool,
    ) -> Result<(Self, MasterKeySource), KeyError> {
        if let Some(path) = explicit {
            return Ok((read_key(path)?, MasterKeySource::File(path.to_path_buf())));
        }
        let path = data_dir.join("master.key");
        if path.exists() {
            return Ok((read_key(&path)?, MasterKeySource::File(path)));
        }
        if store_exists {
            return Err(KeyError::Missing(data_dir.to_path_buf()));
        }
        let key = Self::generate();
        write_secret_file(&path, key.to_base64().as_bytes()).map_err(|error| KeyError::Io {
            path: path.clone(),
            error,
        })?;
        Ok((key, MasterKeySource::Generated(path)))
    }
}

/// File (in the data directory) holding the master key's check value.
pub const KEY_CHECK_FILE: &str = "key.check";

/// Verifies the master key against `<data_dir>/key.check` before anything else is opened, so a
/// wrong key never touches the store. On a fresh data directory the file is created.
///
/// Returns `Ok(false)` for a wrong key, `Ok(true)` when the key matches (or the file was created).
pub fn verify_key_check_file(
    data_dir: &Path,
    keyring: &super::Keyring,
    store_exists: bool,
) -> Result<bool, KeyError> {
    let path = data_dir.join(KEY_CHECK_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let kcv = STANDARD
                .decode(text.trim())
                .map_err(|_| KeyError::Format(path.clone()))?;
            Ok(keyring.verify_key_check_value(&kcv))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if store_exists {
                return Err(KeyError::Missing(data_dir.to_path_buf()));
            }
            write_secret_file(&path, STANDARD.encode(keyring.key_check_value()).as_bytes())
                .map_err(|error| KeyError::Io { path, error })?;
            Ok(true)
        }
        Err(error) => Err(KeyError::Io { path, error }),
    }
}

fn read_key(path: &Path) -> Result<MasterKey, KeyError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|error| KeyError::Io {
        path: path.to_path_buf(),
        error,
    })?);
    MasterKey::from_base64(&text).ok_or_else(|| KeyError::Format(path.to_path_buf()))
}

/// Creates `path` with mode 0600 and writes `contents`; fails if the file exists.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(contents)?;
    f.write_all(b"\n")?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, src) = MasterKey::load_or_generate(None, dir.path(), false).unwrap();
        assert!(matches!(src, MasterKeySource::Generated(_)));
        let (k2, src) = MasterKey::load_or_generate(None, dir.path(), true).unwrap();
        assert!(matches!(src, MasterKeySource::File(_)));
        assert_eq!(k1.id(), k2.id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("master.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn missing_key_with_existing_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            MasterKey::load_or_generate(None, dir.path(), true),
            Err(KeyError::Missing(_))
        ));
    }
}
