//! A fake Microsoft Entra ID token endpoint (`upstreams.md` §12): the client-credentials grant
//! for Azure DevOps' resource, with a client secret, a certificate-signed client assertion
//! (verified with the registered certificate's public key: PS256 signature, `x5t#S256`, `aud`,
//! `iss`/`sub`, the `nbf`/`exp` window, a `jti` never seen before) or a federated token; each
//! failure answers with Entra's `AADSTS` code.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::Method;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{RsaKeyPair, UnparsedPublicKey, RSA_PSS_2048_8192_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};

use crate::fakes::{FakeUpstream, Reply, Req};

/// Azure DevOps' resource, as the broker must ask for it.
pub const ADO_SCOPE: &str = "499b84ac-1321-427f-aa17-267ca6975798/.default";

/// How an app may prove itself.
#[derive(Clone)]
pub enum AppAuth {
    /// A client secret; `expired` answers AADSTS7000222.
    Secret { value: String, expired: bool },
    /// A certificate: its SHA-256 thumbprint and its RSA public key (PKCS#1 DER).
    Certificate {
        thumbprint: String,
        public_key: Vec<u8>,
    },
    /// A federated credential: the token the workload presents.
    Federated { token: String },
}

struct EntraState {
    tenant: String,
    apps: HashMap<String, AppAuth>,
    tokens: Arc<Mutex<HashMap<String, String>>>,
    seen_jti: HashSet<String>,
    token_calls: usize,
    lifetime: u64,
    delay: Duration,
    seq: u64,
}

/// The fake. Its authority URL is its origin.
#[derive(Clone)]
pub struct FakeEntra {
    /// The authority URL (`http://127.0.0.1:PORT`).
    pub authority: String,
    /// The server.
    pub server: FakeUpstream,
    state: Arc<Mutex<EntraState>>,
}

/// The SHA-256 thumbprint and PKCS#1 public key of a PEM certificate and its PEM key.
pub fn certificate_auth(certificate_pem: &str, private_key_pem: &str) -> AppAuth {
    let der = CertificateDer::from_pem_slice(certificate_pem.as_bytes()).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
    AppAuth::Certificate {
        thumbprint: URL_SAFE_NO_PAD.encode(digest.as_ref()),
        public_key: public_key(private_key_pem),
    }
}

/// The PKCS#1 DER public key of a PEM private key.
pub fn public_key(private_key_pem: &str) -> Vec<u8> {
    let PrivateKeyDer::Pkcs8(k) =
        PrivateKeyDer::from_pem_slice(private_key_pem.as_bytes()).unwrap()
    else {
        panic!("fixtures are PKCS#8");
    };
    let pair = RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()).unwrap();
    ring::signature::KeyPair::public_key(&pair)
        .as_ref()
        .to_vec()
}

impl FakeEntra {
    /// Starts the fake for one tenant.
    pub async fn start(tenant: &str) -> Self {
        let state = Arc::new(Mutex::new(EntraState {
            tenant: tenant.to_owned(),
            apps: HashMap::new(),
            tokens: Arc::new(Mutex::new(HashMap::new())),
            seen_jti: HashSet::new(),
            token_calls: 0,
            lifetime: 3599,
            delay: Duration::ZERO,
            seq: 0,
        }));
        let st = state.clone();
        let origin = Arc::new(Mutex::new(String::new()));
        let o2 = origin.clone();
        let server = FakeUpstream::start(move |req| {
            let origin = o2.lock().unwrap().clone();
            let mut s = st.lock().unwrap();
            let r = token(&mut s, req, &origin);
            if s.delay.is_zero() {
                r
            } else {
                Reply::Delay(s.delay, Box::new(r))
            }
        })
        .await;
        *origin.lock().unwrap() = server.origin.clone();
        Self {
            authority: server.origin.clone(),
            server,
            state,
        }
    }

    /// Registers an app (client id) with how it proves itself.
    pub fn add_app(&self, client_id: &str, auth: AppAuth) {
        self.state
            .lock()
            .unwrap()
            .apps
            .insert(client_id.to_owned(), auth);
    }

    /// The issued tokens (token → client id), for the Azure DevOps fake to trust.
    pub fn tokens(&self) -> Arc<Mutex<HashMap<String, String>>> {
        self.state.lock().unwrap().tokens.clone()
    }

    /// Token requests so far.
    pub fn token_calls(&self) -> usize {
        self.state.lock().unwrap().token_calls
    }

    /// Delays every answer.
    pub fn set_delay(&self, d: Duration) {
        self.state.lock().unwrap().delay = d;
    }
}

fn aadsts(status: u16, error: &str, code: u32, text: &str) -> Reply {
    Reply::Json(
        status,
        json!({"error": error,
            "error_description": format!("AADSTS{code}: {text}\r\nTrace ID: 0000\r\nCorrelation ID: 0000\r\nTimestamp: 2026-12-02 00:00:00Z"),
            "error_codes": [code], "timestamp": "2026-12-02 00:00:00Z", "trace_id": "0000", "correlation_id": "0000",
            "error_uri": "https://login.microsoftonline.com/error?code=".to_owned() + &code.to_string()}),
    )
}

fn token(s: &mut EntraState, req: &Req, origin: &str) -> Reply {
    let Some(tenant) = req
        .path
        .strip_prefix('/')
        .and_then(|p| p.strip_suffix("/oauth2/v2.0/token"))
    else {
        return Reply::Unexpected("not a v2.0 token endpoint".into());
    };
    if req.method != Method::POST
        || !req
            .header("content-type")
            .starts_with("application/x-www-form-urlencoded")
    {
        return Reply::Unexpected("Entra's token endpoint takes form-encoded POSTs".into());
    }
    s.token_calls += 1;
    if tenant != s.tenant {
        return aadsts(
            400,
            "invalid_request",
            90002,
            &format!("Tenant '{tenant}' not found."),
        );
    }
    let f = req.form();
    if f.get("grant_type").map(String::as_str) != Some("client_credentials")
        || f.get("scope").map(String::as_str) != Some(ADO_SCOPE)
    {
        return Reply::Unexpected(
            "client_credentials for Azure DevOps' .default scope expected".into(),
        );
    }
    let client = f.get("client_id").cloned().unwrap_or_default();
    let Some(auth) = s.apps.get(&client).cloned() else {
        return aadsts(
            400,
            "unauthorized_client",
            700016,
            &format!("Application with identifier '{client}' was not found in the directory."),
        );
    };
    let token_url = format!("{origin}{}", req.path);
    if let Err(r) = authenticate(s, &auth, &f, &client, &token_url) {
        return r;
    }
    s.seq += 1;
    let access = format!("eyJ0eXAi.entra-{}-{}.sig", s.seq, client);
    s.tokens.lock().unwrap().insert(access.clone(), client);
    Reply::Json(
        200,
        json!({"token_type": "Bearer", "expires_in": s.lifetime, "ext_expires_in": s.lifetime, "access_token": access}),
    )
}

fn authenticate(
    s: &mut EntraState,
    auth: &AppAuth,
    f: &HashMap<String, String>,
    client: &str,
    token_url: &str,
) -> Result<(), Reply> {
    let assertion = f.get("client_assertion");
    if assertion.is_some()
        && f.get("client_assertion_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    {
        return Err(Reply::Unexpected("client_assertion_type missing".into()));
    }
    match (auth, f.get("client_secret"), assertion) {
        (AppAuth::Secret { value, expired }, Some(given), None) => {
            if given != value {
                Err(aadsts(401, "invalid_client", 7000215, "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID."))
            } else if *expired {
                Err(aadsts(401, "invalid_client", 7000222, "The provided client secret keys for app are expired."))
            } else {
                Ok(())
            }
        }
        (AppAuth::Federated { token }, None, Some(a)) => {
            if a == token {
                Ok(())
            } else {
                Err(aadsts(400, "invalid_client", 700211, "No matching federated identity record found for presented assertion issuer."))
            }
        }
        (AppAuth::Certificate { thumbprint, public_key }, None, Some(a)) => {
            verify_assertion(s, a, thumbprint, public_key, client, token_url)
        }
        (_, None, None) => Err(aadsts(401, "invalid_client", 7000218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.")),
        _ => Err(aadsts(401, "invalid_client", 700027, "Client assertion failed signature validation.")),
    }
}

fn verify_assertion(
    s: &mut EntraState,
    jwt: &str,
    thumbprint: &str,
    public_key: &[u8],
    client: &str,
    token_url: &str,
) -> Result<(), Reply> {
    let bad_sig = || {
        aadsts(
            401,
            "invalid_client",
            700027,
            "Client assertion failed signature validation.",
        )
    };
    let parts: Vec<&str> = jwt.split('.').collect();
    if parts.len() != 3 {
        return Err(bad_sig());
    }
    let decode = |p: &str| -> Option<Value> {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).ok()?).ok()
    };
    let (Some(header), Some(claims), Ok(sig)) = (
        decode(parts[0]),
        decode(parts[1]),
        URL_SAFE_NO_PAD.decode(parts[2]),
    ) else {
        return Err(bad_sig());
    };
    if header["alg"] != "PS256" || header["x5t#S256"] != thumbprint {
        return Err(aadsts(401, "invalid_client", 700027, &format!("The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found., Thumbprint of key used by client: '{}']", header["x5t#S256"])));
    }
    let signed = format!("{}.{}", parts[0], parts[1]);
    UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, public_key)
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| bad_sig())?;
    let now = credbroker::model::unix_now() as i64;
    let (nbf, exp) = (
        claims["nbf"].as_i64().unwrap_or(i64::MAX),
        claims["exp"].as_i64().unwrap_or(0),
    );
    if nbf > now + 60 || exp < now || exp - now > 600 {
        return Err(aadsts(
            400,
            "invalid_client",
            700024,
            "Client assertion is not within its valid time range.",
        ));
    }
    if claims["aud"] != token_url || claims["iss"] != client || claims["sub"] != client {
        return Err(Reply::Unexpected(format!(
            "assertion aud/iss/sub wrong: {claims}"
        )));
    }
    let jti = claims["jti"].as_str().unwrap_or_default().to_owned();
    if jti.is_empty() || !s.seen_jti.insert(jti) {
        return Err(Reply::Unexpected(
            "a client assertion's jti was reused".into(),
        ));
    }
    Ok(())
}
