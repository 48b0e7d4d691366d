//! Redacting secret types.
//!
//! Every secret value (tokens, keys, passwords, client secrets) travels through the broker inside
//! [`SecretString`]. Its `Debug` and `Display` print `[REDACTED]`, its buffer is zeroized on drop,
//! and the only way to read it is [`SecretString::expose_secret`], which keeps every access easy to
//! find with grep.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroize;

/// A secret string: redacted in `Debug`/`Display`, zeroized on drop.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a secret. The caller's `String` is moved, not copied.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// Reveals the secret.
    ///
    /// # Security
    /// Call this only at the edge where the value must leave in clear: an outbound HTTP header,
    /// the encryption of a record, or the gRPC response that hands a header to a worker.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// True when the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for SecretString {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl Drop for SecretString {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString([REDACTED])")
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// Secret bytes (an encoded answer carrying a header): redacted in `Debug`, zeroized on drop.
pub struct SecretBytes(Box<[u8]>);

impl SecretBytes {
    /// Wraps `value`. One with spare capacity is copied into an exact buffer and zeroized
    /// (shrinking in place could move the bytes and free the old buffer uncleared).
    pub fn new(mut value: Vec<u8>) -> Self {
        if value.len() == value.capacity() {
            return Self(value.into_boxed_slice());
        }
        let exact = Box::<[u8]>::from(value.as_slice());
        value.zeroize();
        Self(exact)
    }

    /// Reveals the bytes.
    ///
    /// # Security
    /// Only for the edge where they leave in clear (the gRPC answer handing headers out).
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBytes([REDACTED])")
    }
}

/// Serializes the secret in clear.
///
/// # Security
/// Only the credential sealer serializes secrets, into a zeroizing buffer that is encrypted at
/// once. No other serialized type contains a `SecretString`.
impl Serialize for SecretString {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = SecretString::from("hunter2-canary");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{s}").contains("hunter2"));
        assert_eq!(s.expose_secret(), "hunter2-canary");
    }

    #[test]
    fn secret_bytes_redact_and_keep_their_bytes_whatever_the_capacity() {
        let mut spare = Vec::with_capacity(64);
        spare.extend_from_slice(b"hunter2-canary");
        for v in [b"hunter2-canary".to_vec(), spare] {
            let b = SecretBytes::new(v);
            assert!(!format!("{b:?}").contains("hunter2"));
            assert_eq!(b.expose_secret(), b"hunter2-canary");
        }
    }
}
