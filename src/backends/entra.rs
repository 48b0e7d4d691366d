//! Microsoft Entra ID: access tokens for a service principal through the client-credentials
//! grant (`docs/systems/azure-devops.md`, `upstreams.md` §12).
//!
//! - `POST {authority}/{tenant}/oauth2/v2.0/token`, form-encoded, `scope={resource}/.default`.
//! - The app proves itself with its client secret, a client assertion signed with its
//!   certificate's key (PS256, `x5t#S256` = the certificate's SHA-256 thumbprint, `aud` = the
//!   token endpoint, a five-minute `exp`, a fresh `jti`), or the contents of a federated token
//!   file (workload identity), read again for every token because Kubernetes rotates it.
//! - No refresh token: a new token is minted ahead of expiry (`expires_in`, about an hour).
//! - Failures carry an `AADSTSnnnn` code in `error_description`; the common ones get their own
//!   class and a message naming the fix.

use std::path::Path;
use std::time::Duration;

use oauth2::{RequestTokenError, Scope};
use serde_json::json;

use super::http::HttpClient;
use super::jwt::{self, Alg, Signer};
use super::oauth::{self, OAuthHttp, TokenRequestError, VendorTokenResponse};
use super::BackendError;
use crate::model::{AuthFailure, Credential, EntraAuth};
use crate::secret::SecretString;

/// The public cloud's authority.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
/// Azure DevOps' resource (its application id), as Microsoft's documentation asks.
pub const AZURE_DEVOPS_SCOPE: &str = "499b84ac-1321-427f-aa17-267ca6975798/.default";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How long a client assertion is valid for.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(300);
/// The largest federated token file read (projected tokens are about 1 KiB).
const MAX_FEDERATED_TOKEN: u64 = 16 * 1024;
const VENDOR: &str = "Microsoft Entra ID";

/// An Entra app registration, as a credential names it.
pub struct EntraApp<'a> {
    tenant_id: &'a str,
    client_id: &'a str,
    auth: &'a EntraAuth,
    authority_url: &'a str,
}

impl<'a> EntraApp<'a> {
    /// The app in `credential`, if it is one.
    pub fn of(credential: &'a Credential) -> Option<Self> {
        match credential {
            Credential::EntraClientCredentials {
                tenant_id,
                client_id,
                auth,
                authority_url,
                ..
            } => Some(Self {
                tenant_id,
                client_id,
                auth,
                authority_url,
            }),
            _ => None,
        }
    }

    fn token_url(&self) -> String {
        format!(
            "{}/{}/oauth2/v2.0/token",
            self.authority_url.trim_end_matches('/'),
            self.tenant_id
        )
    }

    /// A token for `scope` (`{resource}/.default`); a federated token file is read only
    /// inside `federated_dir`.
    pub async fn mint(
        &self,
        http: &HttpClient,
        scope: &str,
        federated_dir: &Path,
    ) -> Result<VendorTokenResponse, BackendError> {
        let token_url = self.token_url();
        let secret = match self.auth {
            EntraAuth::Secret { client_secret } => Some(client_secret),
            _ => None,
        };
        let client = oauth::client(self.client_id, secret, &token_url)?;
        let mut req = client
            .exchange_client_credentials()
            .add_scope(Scope::new(scope.to_owned()));
        let assertion = match self.auth {
            EntraAuth::Secret { .. } => None,
            EntraAuth::Certificate {
                certificate_pem,
                private_key_pem,
            } => Some(self.client_assertion(&token_url, certificate_pem, private_key_pem)?),
            EntraAuth::FederatedTokenFile { path } => {
                Some(read_federated_token(path, federated_dir).await?)
            }
        };
        if let Some(a) = &assertion {
            req = req
                .add_extra_param("client_assertion_type", ASSERTION_TYPE)
                .add_extra_param("client_assertion", a.expose_secret().to_owned());
        }
        let oauth_http = OAuthHttp::form(http);
        req.request_async(&oauth_http)
            .await
            .map_err(|e| classify(&e, &oauth_http, self.tenant_id))
    }

    /// A client assertion signed with the certificate's key.
    fn client_assertion(
        &self,
        token_url: &str,
        certificate_pem: &str,
        private_key_pem: &SecretString,
    ) -> Result<SecretString, BackendError> {
        let unusable = |why: String| BackendError::Rejected {
            failure: AuthFailure::Misconfigured,
            message: format!("the stored certificate or key {why}; rotate in a new pair"),
        };
        let thumbprint = jwt::thumbprint_s256(certificate_pem).map_err(unusable)?;
        let signer = Signer::from_pem(private_key_pem).map_err(unusable)?;
        let now = crate::model::unix_now();
        let claims = json!({
            "aud": token_url,
            "iss": self.client_id,
            "sub": self.client_id,
            "jti": jwt::unique_id(),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME.as_secs(),
        });
        signer
            .sign(
                Alg::Ps256,
                json!({"typ": "JWT", "x5t#S256": thumbprint}),
                &claims,
            )
            .map_err(unusable)
    }
}

/// The known Entra authorities (public and sovereign clouds); anything else only as a stand-in
/// under `allow_http`.
pub const KNOWN_AUTHORITIES: &[&str] = &[
    "login.microsoftonline.com",
    "login.microsoftonline.us",
    "login.partner.microsoftonline.cn",
    "login.chinacloudapi.cn",
];

/// Refuses an authority that is not Entra's (a client secret or assertion goes there) and a
/// federated token file outside `federated_dir` (its contents go there).
pub fn check_app(
    credential: &Credential,
    allow_http: bool,
    federated_dir: &Path,
) -> Result<(), String> {
    let Some(app) = EntraApp::of(credential) else {
        return Ok(());
    };
    let url = url::Url::parse(app.authority_url).map_err(|_| "authority_url is not a URL")?;
    let known = url.scheme() == "https"
        && url
            .host_str()
            .is_some_and(|h| KNOWN_AUTHORITIES.contains(&h));
    let stand_in = allow_http && url.scheme() == "http";
    if !(known || stand_in) {
        return Err(format!(
            "authority_url must be an Entra authority ({})",
            KNOWN_AUTHORITIES.join(", ")
        ));
    }
    if let EntraAuth::FederatedTokenFile { path } = app.auth {
        let p = Path::new(path);
        let inside = p.starts_with(federated_dir)
            && !p
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir));
        if !inside {
            return Err(format!(
                "federated_token_file must be inside {} (entra_federated_token_dir)",
                federated_dir.display()
            ));
        }
    }
    Ok(())
}

/// The federated token, read now (the file is rotated under the broker), only inside
/// `federated_dir` (symlinks resolved), at most [`MAX_FEDERATED_TOKEN`] bytes, within two
/// seconds, and only if it looks like a JWT: nothing else from the broker's disk is sent.
async fn read_federated_token(
    path: &str,
    federated_dir: &Path,
) -> Result<SecretString, BackendError> {
    let unreadable = |why: String| BackendError::Transient {
        failure: AuthFailure::Misconfigured,
        message: format!("the federated token file {path} {why}"),
        retry_after: None,
    };
    let read = async {
        let real = tokio::fs::canonicalize(path).await?;
        let dir = tokio::fs::canonicalize(federated_dir).await?;
        if !real.starts_with(&dir) {
            return Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        }
        // A FIFO or device would block or never end: regular files only.
        if !tokio::fs::metadata(&real).await?.is_file() {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        let file = tokio::fs::File::open(&real).await?;
        let mut raw = String::new();
        tokio::io::AsyncReadExt::read_to_string(
            &mut tokio::io::AsyncReadExt::take(file, MAX_FEDERATED_TOKEN + 1),
            &mut raw,
        )
        .await?;
        Ok(raw)
    };
    let raw = match tokio::time::timeout(Duration::from_secs(2), read).await {
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => return Err(unreadable(format!("cannot be read ({})", e.kind()))),
        Err(_) => return Err(unreadable("took too long to read".to_owned())),
    };
    let token = SecretString::from(raw.trim());
    if raw.len() as u64 > MAX_FEDERATED_TOKEN || !jwt::looks_like_jwt(token.expose_secret()) {
        // Transient: a writer may be half-way through replacing it.
        return Err(unreadable(
            "does not hold a JWT; point it at the projected service account token (e.g. \
             /var/run/secrets/azure/tokens/azure-identity-token)"
                .to_owned(),
        ));
    }
    Ok(token)
}

/// The `AADSTSnnnn` code at the start of an Entra `error_description`.
fn aadsts(e: &TokenRequestError) -> Option<u32> {
    let RequestTokenError::ServerResponse(r) = e else {
        return None;
    };
    let d = r.error_description()?;
    let rest = d.trim_start().strip_prefix("AADSTS")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// What an Entra failure means, in Entra's words, with the fix.
fn classify(e: &TokenRequestError, http: &OAuthHttp, tenant: &str) -> BackendError {
    let rejected = |failure, message: String| BackendError::Rejected { failure, message };
    let portal = "Entra admin center → App registrations → the app";
    match aadsts(e) {
        Some(700016) => rejected(
            AuthFailure::Misconfigured,
            format!(
                "Entra does not know this application (client) id in tenant {tenant} \
                 (AADSTS700016): check the client id, and that the app is registered in the \
                 tenant connected to the Azure DevOps organization"
            ),
        ),
        Some(90002) => rejected(
            AuthFailure::Misconfigured,
            format!("Entra has no tenant {tenant} (AADSTS90002): use the directory (tenant) id of the tenant connected to the organization"),
        ),
        Some(7000215) => rejected(
            AuthFailure::InvalidCredentials,
            format!("Entra rejected the client secret (AADSTS7000215): it is wrong, or the secret's ID was given instead of its Value; create a new secret in {portal} → Certificates & secrets and rotate it in"),
        ),
        Some(7000222) => rejected(
            AuthFailure::ExpiredOrRevoked,
            format!("the client secret has expired (AADSTS7000222): create a new one in {portal} → Certificates & secrets and rotate it in"),
        ),
        Some(700027) => rejected(
            AuthFailure::InvalidCredentials,
            format!("Entra could not verify the client assertion (AADSTS700027): the certificate is not uploaded to the app, or the key does not belong to it; upload the certificate in {portal} → Certificates & secrets"),
        ),
        // A clock that drifts or a projected token not yet renewed usually heals: retried.
        Some(700024) => BackendError::Transient {
            failure: AuthFailure::Misconfigured,
            message: "Entra found the client assertion outside its time window (AADSTS700024): check the broker host's clock, or that the federated token file is being refreshed".to_owned(),
            retry_after: None,
        },
        Some(70021 | 700211 | 700212 | 700213) => rejected(
            AuthFailure::Misconfigured,
            format!("Entra found no federated credential matching the token (AADSTS{}): add a federated credential for this workload's issuer and subject in {portal} → Certificates & secrets → Federated credentials", aadsts(e).unwrap_or_default()),
        ),
        Some(7000112) => rejected(
            AuthFailure::ExpiredOrRevoked,
            "the application is disabled in the tenant (AADSTS7000112): enable it in Enterprise applications".to_owned(),
        ),
        Some(53003) => rejected(
            AuthFailure::InsufficientPermissions,
            "a Conditional Access policy blocks this service principal (AADSTS53003): exempt it or allow the broker's network location".to_owned(),
        ),
        Some(500011) => rejected(
            AuthFailure::Misconfigured,
            "Azure DevOps is not known in this tenant (AADSTS500011): the tenant must be the one connected to the organization".to_owned(),
        ),
        _ => oauth::classify(
            VENDOR,
            e,
            http.last(),
            "check the app registration",
            &format!("check the client id and its secret or certificate in {portal}"),
        ),
    }
}
