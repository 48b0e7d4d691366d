//! Envelope encryption of stored credentials.
//!
//! # Security model
//! - **Key hierarchy.** One master key (KEK, 256 bits) per installation, loaded from a file. Every
//!   sealed record gets a fresh random 256-bit data key (DEK); the DEK encrypts the credential and
//!   the KEK wraps the DEK. Each DEK encrypts exactly one message, so the AES-GCM random-nonce
//!   budget (about 2^32 messages per key) applies only to KEK wraps.
//! - **Nonces.** 96-bit, from the OS RNG, fresh for every wrap and every seal.
//! - **AAD.** The data AAD binds `cred-broker/v1`, the system id, the credential type and the
//!   credential version; the wrap AAD binds `dek`, the system id, the version and the KEK id. A
//!   ciphertext copied into another record, or replayed from an older version, fails to decrypt.
//!   A rollback of the whole database is out of scope (as in Vault's model).
//! - **Record format** (all integers big-endian):
//!   `"CB" | fmt_ver(1) | kek_id(u32) | wrapped_len(u16) | wrapped_dek | nonce(12) | ct+tag`,
//!   where `wrapped_dek = nonce_w(12) | AES-256-GCM(KEK, DEK)`.
//! - **Key check.** The store keeps a key check value (a sealed constant) per KEK id, so a wrong
//!   master key is detected at start before anything is read or written.
//! - Key material has no `Debug` and is zeroized on drop.

pub mod keys;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use rand::RngCore;
use zeroize::Zeroizing;

pub use keys::{MasterKey, MasterKeySource};

use crate::model::CredentialType;

/// A key derived from the master key for one purpose ([`Keyring::derive_subkey`]). Like the
/// master key, it is zeroized on drop and its `Debug` shows no bytes.
#[derive(Clone)]
pub struct SubKey(Zeroizing<[u8; KEY_LEN]>);

impl SubKey {
    /// The key's bytes, borrowed (no `Deref`: a `*key` would be an unwiped copy).
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl From<[u8; KEY_LEN]> for SubKey {
    fn from(bytes: [u8; KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }
}

impl std::fmt::Debug for SubKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SubKey(..)")
    }
}

/// Format version of sealed records.
pub const FORMAT_VERSION: u8 = 1;
const MAGIC: &[u8; 2] = b"CB";
const NONCE_LEN: usize = 12;
const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

/// What a sealed record is bound to.
#[derive(Debug, Clone, Copy)]
pub struct RecordBinding<'a> {
    /// The system id the record belongs to.
    pub system_id: &'a str,
    /// The credential type.
    pub credential_type: CredentialType,
    /// The credential version.
    pub version: u64,
}

/// Why a record could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// The header is malformed or truncated.
    #[error("sealed record is malformed")]
    Malformed,
    /// The record names a KEK this keyring does not hold.
    #[error("sealed record uses unknown key id {0:08x}")]
    UnknownKey(u32),
    /// Authentication failed (tampered, swapped or wrong key).
    #[error("sealed record failed authentication")]
    Authentication,
}

/// The parsed header of a sealed record (for tests and diagnostics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedHeader {
    /// Format version.
    pub format_version: u8,
    /// KEK id.
    pub kek_id: u32,
    /// Length of the wrapped DEK.
    pub wrapped_len: usize,
}

/// The keys the broker holds: the root (the master key file) and the key-encryption keys (KEKs)
/// that wrap data keys. The root is itself the first KEK; `key rotate` adds KEKs (stored in the
/// store, sealed by the root) and makes the newest primary. The id in every record names its KEK,
/// so old records stay readable until they are re-wrapped.
pub struct Keyring {
    root: MasterKey,
    keks: Vec<MasterKey>,
    primary: u32,
}

impl Keyring {
    /// A keyring whose root (and only KEK) is `root`.
    pub fn new(root: MasterKey) -> Self {
        Self {
            primary: root.id(),
            root,
            keks: Vec::new(),
        }
    }

    /// The primary KEK's id (new records are sealed with it).
    pub fn primary_id(&self) -> u32 {
        self.primary
    }

    /// The root key's id.
    pub fn root_id(&self) -> u32 {
        self.root.id()
    }

    /// Every KEK id, root first.
    pub fn kek_ids(&self) -> Vec<u32> {
        std::iter::once(self.root.id())
            .chain(self.keks.iter().map(|k| k.id()))
            .collect()
    }

    fn key(&self, id: u32) -> Option<&MasterKey> {
        if self.root.id() == id {
            return Some(&self.root);
        }
        self.keks.iter().find(|k| k.id() == id)
    }

    /// Adds a KEK (unsealed from the store).
    pub fn add_kek(&mut self, kek: MasterKey) {
        if self.key(kek.id()).is_none() {
            self.keks.push(kek);
        }
    }

    /// Makes `id` primary; false when the keyring does not hold it.
    pub fn set_primary(&mut self, id: u32) -> bool {
        let known = self.key(id).is_some();
        if known {
            self.primary = id;
        }
        known
    }

    /// Drops a non-primary, non-root KEK.
    pub fn remove_kek(&mut self, id: u32) {
        if id != self.primary {
            self.keks.retain(|k| k.id() != id);
        }
    }

    /// Seals a KEK under the root for storage.
    pub fn seal_kek(&self, kek: &MasterKey) -> Vec<u8> {
        seal_raw(self.root.bytes(), &kek_aad(kek.id()), kek.bytes())
    }

    /// Opens a stored KEK.
    pub fn open_kek(&self, id: u32, sealed: &[u8]) -> Result<MasterKey, CryptoError> {
        let bytes = open_raw(self.root.bytes(), &kek_aad(id), sealed)?;
        let arr: [u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| CryptoError::Malformed)?;
        let key = MasterKey::from_bytes(Zeroizing::new(arr));
        if key.id() != id {
            return Err(CryptoError::Malformed);
        }
        Ok(key)
    }

    /// Re-wraps a record's data key under the primary KEK; the data ciphertext is unchanged.
    pub fn rewrap(
        &self,
        binding: &RecordBinding<'_>,
        sealed: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let header = parse_header(sealed)?;
        let old = self
            .key(header.kek_id)
            .ok_or(CryptoError::UnknownKey(header.kek_id))?;
        let new = self
            .key(self.primary)
            .ok_or(CryptoError::UnknownKey(self.primary))?;
        let wrapped = sealed
            .get(9..9 + header.wrapped_len)
            .ok_or(CryptoError::Malformed)?;
        let body = sealed
            .get(9 + header.wrapped_len..)
            .ok_or(CryptoError::Malformed)?;
        let dek = open_raw(old.bytes(), &wrap_aad(binding, header.kek_id), wrapped)?;
        let rewrapped = seal_raw(new.bytes(), &wrap_aad(binding, new.id()), &dek);
        let mut out = Vec::with_capacity(sealed.len());
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&new.id().to_be_bytes());
        out.extend_from_slice(&(rewrapped.len() as u16).to_be_bytes());
        out.extend_from_slice(&rewrapped);
        out.extend_from_slice(body);
        Ok(out)
    }

    /// Seals `plaintext` for `binding` under a fresh data key.
    pub fn seal(&self, binding: &RecordBinding<'_>, plaintext: &[u8]) -> Vec<u8> {
        let kek = self.key(self.primary).unwrap_or(&self.root);
        let mut dek = Zeroizing::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(dek.as_mut());
        let wrap_aad = wrap_aad(binding, kek.id());
        let wrapped = seal_raw(kek.bytes(), &wrap_aad, dek.as_ref());
        let data_aad = data_aad(binding);
        let body = seal_raw(&dek, &data_aad, plaintext);

        let mut out = Vec::with_capacity(2 + 1 + 4 + 2 + wrapped.len() + body.len());
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&kek.id().to_be_bytes());
        // The wrapped DEK is always 12 + 32 + 16 bytes, far below u16::MAX.
        out.extend_from_slice(&(wrapped.len() as u16).to_be_bytes());
        out.extend_from_slice(&wrapped);
        out.extend_from_slice(&body);
        out
    }

    /// Opens a record sealed for `binding`.
    pub fn open(
        &self,
        binding: &RecordBinding<'_>,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let header = parse_header(sealed)?;
        let kek = self
            .key(header.kek_id)
            .ok_or(CryptoError::UnknownKey(header.kek_id))?;
        let wrapped_start = 9;
        let wrapped = sealed
            .get(wrapped_start..wrapped_start + header.wrapped_len)
            .ok_or(CryptoError::Malformed)?;
        let body = sealed
            .get(wrapped_start + header.wrapped_len..)
            .ok_or(CryptoError::Malformed)?;
        let dek = open_raw(kek.bytes(), &wrap_aad(binding, header.kek_id), wrapped)?;
        let dek: Zeroizing<[u8; KEY_LEN]> = Zeroizing::new(
            dek.as_slice()
                .try_into()
                .map_err(|_| CryptoError::Malformed)?,
        );
        open_raw(&dek, &data_aad(binding), body)
    }

    /// A 256-bit key derived from the root key for another purpose (`label`), e.g. the audit
    /// HMAC key. Deterministic: the same master key gives the same subkey.
    pub fn derive_subkey(&self, label: &str) -> SubKey {
        use hmac::{Hmac, Mac};
        let mut key = SubKey(Zeroizing::new([0; KEY_LEN]));
        if let Ok(mut mac) = <Hmac<sha2::Sha256> as Mac>::new_from_slice(self.root.bytes()) {
            mac.update(b"credbroker/subkey/");
            mac.update(label.as_bytes());
            let mut out = mac.finalize().into_bytes();
            key.0.copy_from_slice(&out);
            zeroize::Zeroize::zeroize(out.as_mut_slice());
        }
        key
    }

    /// A key check value for the root key: a sealed constant the store keeps.
    pub fn key_check_value(&self) -> Vec<u8> {
        seal_raw(self.root.bytes(), KCV_AAD, KCV_PLAINTEXT)
    }

    /// True when `kcv` was made by the root key.
    pub fn verify_key_check_value(&self, kcv: &[u8]) -> bool {
        matches!(open_raw(self.root.bytes(), KCV_AAD, kcv), Ok(p) if p.as_slice() == KCV_PLAINTEXT)
    }
}

const KCV_AAD: &[u8] = b"cred-broker/v1|kcv";
const KCV_PLAINTEXT: &[u8] = b"credbroker key check value";

/// Whether `a` and `b` are one sealing of a credential: the same data ciphertext, which a
/// re-wrap under another KEK keeps (only the wrapped data key changes) and every new sealing
/// changes (a fresh data key and nonce). Bytes that do not parse are compared whole, and are
/// never the same as bytes that do.
pub fn same_sealing(a: &[u8], b: &[u8]) -> bool {
    match (sealed_data(a), sealed_data(b)) {
        (Some(a), Some(b)) => a == b,
        (None, None) => a == b,
        _ => false,
    }
}

/// The data ciphertext of a sealed record (see [`same_sealing`]); `None` if it does not parse.
pub fn sealed_data(sealed: &[u8]) -> Option<&[u8]> {
    let header = parse_header(sealed).ok()?;
    sealed.get(9 + header.wrapped_len..)
}

/// Parses a sealed record's header.
pub fn parse_header(sealed: &[u8]) -> Result<SealedHeader, CryptoError> {
    if sealed.len() < 9 || &sealed[0..2] != MAGIC {
        return Err(CryptoError::Malformed);
    }
    let format_version = sealed[2];
    if format_version != FORMAT_VERSION {
        return Err(CryptoError::Malformed);
    }
    let kek_id = u32::from_be_bytes([sealed[3], sealed[4], sealed[5], sealed[6]]);
    let wrapped_len = u16::from_be_bytes([sealed[7], sealed[8]]) as usize;
    if wrapped_len != NONCE_LEN + KEY_LEN + TAG_LEN
        || sealed.len() < 9 + wrapped_len + NONCE_LEN + TAG_LEN
    {
        return Err(CryptoError::Malformed);
    }
    Ok(SealedHeader {
        format_version,
        kek_id,
        wrapped_len,
    })
}

fn kek_aad(id: u32) -> Vec<u8> {
    let mut aad = b"cred-broker/v1|kek|".to_vec();
    aad.extend_from_slice(&id.to_be_bytes());
    aad
}

fn data_aad(b: &RecordBinding<'_>) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64 + b.system_id.len());
    aad.extend_from_slice(b"cred-broker/v1\0");
    aad.extend_from_slice(b.system_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(b.credential_type.field_name().as_bytes());
    aad.push(0);
    aad.extend_from_slice(&b.version.to_be_bytes());
    aad
}

fn wrap_aad(b: &RecordBinding<'_>, kek_id: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(32 + b.system_id.len());
    aad.extend_from_slice(b"dek\0");
    aad.extend_from_slice(b.system_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&b.version.to_be_bytes());
    aad.extend_from_slice(&kek_id.to_be_bytes());
    aad
}

/// `nonce | AES-256-GCM(key, plaintext, aad)`.
fn seal_raw(key: &[u8; KEY_LEN], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key));
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    // Encryption with a valid key and in-memory buffers cannot fail; an empty result would fail
    // authentication on open, never silently succeed.
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .unwrap_or_default();
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

fn open_raw(
    key: &[u8; KEY_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(CryptoError::Malformed);
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key));
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::Authentication)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn subkeys_are_per_label_show_no_bytes_and_are_wiped_on_drop() {
        let ring = Keyring::new(MasterKey::generate());
        let (a, b) = (
            ring.derive_subkey("audit-hmac"),
            ring.derive_subkey("proxy-lease"),
        );
        assert_eq!(a.as_bytes(), ring.derive_subkey("audit-hmac").as_bytes());
        assert_ne!(a.as_bytes(), b.as_bytes());
        assert_ne!(a.as_bytes(), &[0; KEY_LEN]);
        let shown = format!("{a:?} {b:?}");
        assert_eq!(shown, "SubKey(..) SubKey(..)");
        // The wipe is `Zeroizing`'s drop; a plain array would need none.
        assert!(std::mem::needs_drop::<SubKey>());
    }

    fn binding(id: &str, v: u64) -> RecordBinding<'_> {
        RecordBinding {
            system_id: id,
            credential_type: CredentialType::PersonalAccessToken,
            version: v,
        }
    }

    #[test]
    fn seal_open_round_trip_and_header() {
        let kr = Keyring::new(MasterKey::generate());
        let sealed = kr.seal(&binding("a", 1), b"secret-canary");
        let h = parse_header(&sealed).unwrap();
        assert_eq!(h.kek_id, kr.primary_id());
        assert_eq!(h.format_version, FORMAT_VERSION);
        assert_eq!(
            kr.open(&binding("a", 1), &sealed).unwrap().as_slice(),
            b"secret-canary"
        );
        assert!(!sealed.windows(13).any(|w| w == b"secret-canary"));
    }

    #[test]
    fn wrong_binding_fails() {
        let kr = Keyring::new(MasterKey::generate());
        let sealed = kr.seal(&binding("a", 1), b"x");
        assert_eq!(
            kr.open(&binding("b", 1), &sealed),
            Err(CryptoError::Authentication)
        );
        assert_eq!(
            kr.open(&binding("a", 2), &sealed),
            Err(CryptoError::Authentication)
        );
    }

    #[test]
    fn every_single_byte_flip_fails() {
        let kr = Keyring::new(MasterKey::generate());
        let sealed = kr.seal(&binding("a", 1), b"payload");
        for i in 0..sealed.len() {
            let mut m = sealed.clone();
            m[i] ^= 0x01;
            assert!(
                kr.open(&binding("a", 1), &m).is_err(),
                "flip at {i} went unnoticed"
            );
        }
        assert!(kr
            .open(&binding("a", 1), &sealed[..sealed.len() - 1])
            .is_err());
    }

    #[test]
    fn nonces_and_ciphertexts_are_distinct() {
        let kr = Keyring::new(MasterKey::generate());
        let mut seen = HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(kr.seal(&binding("a", 1), b"same")));
        }
    }

    #[test]
    fn rotation_rewraps_without_touching_data() {
        let mut kr = Keyring::new(MasterKey::generate());
        let sealed = kr.seal(&binding("a", 1), b"secret");
        let kek = MasterKey::generate();
        let stored = kr.seal_kek(&kek);
        let id = kek.id();
        kr.add_kek(kr.open_kek(id, &stored).unwrap());
        assert!(kr.set_primary(id));
        // Old records stay readable; new ones use the new KEK.
        assert_eq!(
            kr.open(&binding("a", 1), &sealed).unwrap().as_slice(),
            b"secret"
        );
        assert_eq!(
            parse_header(&kr.seal(&binding("b", 1), b"x"))
                .unwrap()
                .kek_id,
            id
        );
        let rewrapped = kr.rewrap(&binding("a", 1), &sealed).unwrap();
        assert_eq!(parse_header(&rewrapped).unwrap().kek_id, id);
        assert_eq!(
            &rewrapped[rewrapped.len() - 30..],
            &sealed[sealed.len() - 30..]
        );
        assert_eq!(
            kr.open(&binding("a", 1), &rewrapped).unwrap().as_slice(),
            b"secret"
        );
        assert!(kr.open_kek(id ^ 1, &stored).is_err());
        // Still the same sealing, as far as the broker's "is this the credential I saw" goes.
        assert_ne!(rewrapped, sealed);
        assert!(same_sealing(&rewrapped, &sealed));
        let again = kr.seal(&binding("a", 1), b"secret");
        assert!(
            !same_sealing(&again, &sealed),
            "a new sealing is another one"
        );
        assert!(!same_sealing(&again[..again.len() - 1], &again));
        // Its data part alone, without a header, is not the sealing either.
        let data = sealed_data(&sealed).unwrap();
        assert!(!same_sealing(data, &sealed));
        assert!(!same_sealing(&sealed, data));
        assert!(same_sealing(b"not sealed", b"not sealed"));
        assert!(!same_sealing(b"not sealed", b"not sealeD"));
    }

    #[test]
    fn key_check_value_detects_wrong_key() {
        let a = Keyring::new(MasterKey::generate());
        let b = Keyring::new(MasterKey::generate());
        let kcv = a.key_check_value();
        assert!(a.verify_key_check_value(&kcv));
        assert!(!b.verify_key_check_value(&kcv));
    }
}
