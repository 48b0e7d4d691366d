//! Random identifiers and tokens, all from the operating system's generator.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore;

/// `N` random bytes.
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut raw = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    raw
}

/// `N` random bytes as lower-case hex (ids in logs, keys and replica names).
pub fn hex_id<const N: usize>() -> String {
    super::hex::encode(&bytes::<N>())
}

/// `N` random bytes as lower-case hex from the thread's CSPRNG (seeded from the OS, no system
/// call per id): for ids that must be unique, never for secrets (request ids).
pub fn cheap_hex_id<const N: usize>() -> String {
    let mut raw = [0u8; N];
    rand::thread_rng().fill_bytes(&mut raw);
    super::hex::encode(&raw)
}

/// `N` random bytes as unpadded URL-safe base64 (tokens, OAuth `state`, lease ids).
pub fn url_token<const N: usize>() -> String {
    URL_SAFE_NO_PAD.encode(bytes::<N>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_alphabets() {
        assert_eq!(hex_id::<6>().len(), 12);
        assert_eq!(url_token::<32>().len(), 43);
        assert!(url_token::<12>()
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(bytes::<16>(), bytes::<16>());
    }
}
