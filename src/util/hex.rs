//! Lower-case hex, the one encoding of hashes, ids and tags in logs and keys.

/// Lower-case hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// Exactly `N` bytes from `2 * N` hex digits (either case); `None` for anything else.
pub fn decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    // `from_str_radix` alone would also take a sign ("+f").
    if s.len() != 2 * N || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let bytes: [u8; 4] = [0x00, 0x0f, 0xa0, 0xff];
        assert_eq!(encode(&bytes), "000fa0ff");
        assert_eq!(decode::<4>("000fa0ff"), Some(bytes));
        assert_eq!(decode::<4>("000FA0FF"), Some(bytes));
    }

    #[test]
    fn refuses_wrong_length_and_digits() {
        assert_eq!(decode::<2>("abc"), None);
        assert_eq!(decode::<2>("abcdef"), None);
        assert_eq!(decode::<2>("zz00"), None);
        assert_eq!(decode::<2>("+f00"), None);
        assert_eq!(decode::<2>("é0"), None);
    }
}
