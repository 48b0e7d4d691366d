//! Signed JWTs for the flows where a client proves itself with a key instead of a secret:
//! Microsoft Entra client assertions (PS256 with the certificate's `x5t#S256`) and Salesforce's
//! JWT bearer flow (RS256).
//!
//! `ring` (already in the tree under rustls) signs; `rustls-pki-types` reads the PEM. The
//! signed JWT is itself a short-lived credential, so it is a [`SecretString`].

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{RsaEncoding, RsaKeyPair, RSA_PKCS1_SHA256, RSA_PSS_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

use crate::secret::SecretString;

/// The signature algorithm of a JWT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256 (Salesforce).
    Rs256,
    /// RSASSA-PSS with SHA-256 (Entra's current client assertions).
    Ps256,
}

impl Alg {
    /// The `alg` header value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Ps256 => "PS256",
        }
    }

    fn encoding(self) -> &'static dyn RsaEncoding {
        match self {
            Self::Rs256 => &RSA_PKCS1_SHA256,
            Self::Ps256 => &RSA_PSS_SHA256,
        }
    }
}

/// An RSA private key that signs JWTs. `Debug` prints nothing of the key.
pub struct Signer {
    key: RsaKeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

impl Signer {
    /// Reads an RSA private key from PEM (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`).
    /// The error says what is wrong, never what the key holds.
    pub fn from_pem(pem: &SecretString) -> Result<Self, String> {
        let der = PrivateKeyDer::from_pem_slice(pem.expose_secret().as_bytes())
            .map_err(|_| "is not a PEM private key".to_owned())?;
        let key = match &der {
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            _ => return Err("must be an RSA private key (PKCS#8 or PKCS#1)".to_owned()),
        }
        .map_err(|_| "is not a usable RSA private key (2048 bits or more)".to_owned())?;
        Ok(Self { key })
    }

    /// `base64url(header).base64url(claims).base64url(signature)`; `alg` is set in the header.
    pub fn sign(&self, alg: Alg, header: Value, claims: &Value) -> Result<SecretString, String> {
        let mut header = header;
        if let Some(h) = header.as_object_mut() {
            h.insert("alg".to_owned(), Value::String(alg.name().to_owned()));
        }
        let encode = |v: &Value| {
            serde_json::to_vec(v)
                .map(|b| URL_SAFE_NO_PAD.encode(b))
                .map_err(|_| "the JWT could not be encoded".to_owned())
        };
        let input = format!("{}.{}", encode(&header)?, encode(claims)?);
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                alg.encoding(),
                &SystemRandom::new(),
                input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| "the JWT could not be signed".to_owned())?;
        Ok(SecretString::new(format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        )))
    }
}

/// base64url of the SHA-256 of a PEM certificate's DER: Entra's `x5t#S256`.
pub fn thumbprint_s256(certificate_pem: &str) -> Result<String, String> {
    let der = CertificateDer::from_pem_slice(certificate_pem.as_bytes())
        .map_err(|_| "is not a PEM certificate".to_owned())?;
    let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
    Ok(URL_SAFE_NO_PAD.encode(digest.as_ref()))
}

/// True when `token` has a JWT's shape: three dot-separated base64url parts, the first two
/// non-empty. Used on files before their contents are sent anywhere.
pub fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && !parts[0].is_empty()
        && !parts[1].is_empty()
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A fresh random id for `jti` (GUID-shaped, as Entra's own clients send).
pub fn unique_id() -> String {
    let b: [u8; 16] = rand::random();
    let h = crate::util::hex::encode(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert!(looks_like_jwt("eyJh.eyJi.c2ln"));
        assert!(looks_like_jwt("eyJh.eyJi."));
        assert!(!looks_like_jwt("-----BEGIN PRIVATE KEY-----"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a.b.c.d"));
        assert!(!looks_like_jwt("a b.c.d"));
        let id = unique_id();
        assert_eq!(id.len(), 36);
        assert_ne!(id, unique_id());
    }

    #[test]
    fn bad_keys_say_what_is_wrong_without_echoing() {
        let e = Signer::from_pem(&SecretString::from("not a key s3cr3t")).unwrap_err();
        assert!(!e.contains("s3cr3t"));
        assert!(thumbprint_s256("nope").is_err());
    }
}
