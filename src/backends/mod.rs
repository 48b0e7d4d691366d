//! Upstream systems behind one [`Backend`] trait.
//!
//! A backend knows three things about its vendor: which base URLs are right
//! ([`Backend::canonical_base_url`]), how to turn a credential into ready-to-send headers
//! ([`Backend::issue`]), and how to prove with those headers who they authenticate as and what is
//! missing ([`Backend::verify`]). Checks of stored OAuth systems go through the broker's
//! single-flight token path, so a check never spends a refresh token behind the cache's back.
//! The seam covers all three credential families:
//! - static secrets (PAT, API key, basic): `issue` builds the header locally, no upstream call;
//! - refreshable OAuth grants: `issue` calls the token endpoint and may return an
//!   `updated_credential` (a rotated refresh token) that the broker persists before handing the
//!   access token out;
//! - authorization-code grants: the same as refreshable grants once the code was exchanged.
//!
//! Registration is one exhaustive `match` in [`registry`]; kinds without a backend in this build
//! are refused with `UNIMPLEMENTED`.

pub mod asana;
pub mod azure_devops;
pub mod classify;
pub mod connector;
pub mod egress;
pub mod entra;
pub mod freshdesk;
pub mod freshservice;
pub mod freshworks;
pub mod http;
pub mod jira_cloud;
pub mod jwt;
pub mod oauth;
pub mod ratelimit;
pub mod salesforce;
pub mod servicenow;
pub mod zendesk;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::error::BrokerError;
use crate::model::{AuthCheck, AuthFailure, Credential, SystemKind};
use crate::secret::SecretString;

pub use self::http::{EgressPolicy, HttpClient};

/// What a backend works on: a stored system or a candidate that is not saved yet.
#[derive(Debug)]
pub struct Target<'a> {
    /// The system id, when the target is stored.
    pub system_id: Option<&'a str>,
    /// The canonical base URL.
    pub base_url: &'a str,
    /// The credential.
    pub credential: &'a Credential,
}

/// One ready-to-send HTTP header. The value is secret.
#[derive(Debug, Clone)]
pub struct Header {
    /// Header name.
    pub name: &'static str,
    /// Header value.
    pub value: SecretString,
}

/// The longest header value handed out (an Entra token with many claims runs to a few KiB;
/// common servers refuse a header line past 8–16 KiB).
pub const MAX_HEADER_VALUE: usize = 16 * 1024;

impl Header {
    /// Whether the value can go into an HTTP request as it is: printable ASCII and spaces, at
    /// most [`MAX_HEADER_VALUE`] bytes. A vendor's token with a CR/LF, another control byte or
    /// non-ASCII text would inject headers at a worker's HTTP stack or be dropped by the proxy.
    /// A value that starts or ends with a space is not sent as it is either (HTTP trims it):
    /// an empty access token makes `Bearer `, which would only earn the workers 401s.
    pub fn sendable(&self) -> bool {
        let v = self.value.expose_secret().as_bytes();
        !v.is_empty()
            && v.len() <= MAX_HEADER_VALUE
            && v.iter().all(|b| (0x20..0x7f).contains(b))
            && v.first() != Some(&b' ')
            && v.last() != Some(&b' ')
    }
}

/// What [`Backend::issue`] returns.
#[derive(Debug)]
pub struct Issued {
    /// Headers the worker sends.
    pub headers: Vec<Header>,
    /// When the headers stop working; `None` for static secrets without a known expiry.
    pub expires_at: Option<SystemTime>,
    /// Where the worker sends its API calls.
    pub api_base_url: String,
    /// A credential to persist (flushed) before the headers are handed out, e.g. a rotated
    /// refresh token.
    pub updated_credential: Option<Credential>,
    /// The upstream user id the token belongs to, when the token endpoint says so.
    pub subject: Option<String>,
}

impl Issued {
    /// Headers from a static secret (PAT, API key, password): no expiry of their own, nothing to
    /// persist.
    pub fn static_header(header: Header, api_base_url: impl Into<String>) -> Self {
        Self {
            headers: vec![header],
            expires_at: None,
            api_base_url: api_base_url.into(),
            updated_credential: None,
            subject: None,
        }
    }
}

/// Why [`Backend::issue`] failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The upstream refused the credential or grant for good (`invalid_grant`, `invalid_client`,
    /// revoked consent, wrong password): retrying cannot help, a person must act.
    #[error("{message}")]
    Rejected {
        /// The check failure class this corresponds to.
        failure: AuthFailure,
        /// For a human: what happened and what to do.
        message: String,
    },
    /// Temporary: timeouts, connection errors, 5xx, 429, garbage answers.
    #[error("{message}")]
    Transient {
        /// `Unreachable`, `RateLimited` or `UpstreamError`.
        failure: AuthFailure,
        /// For a human.
        message: String,
        /// The upstream's `Retry-After`, when it sent one.
        retry_after: Option<std::time::Duration>,
    },
    /// The stored credential cannot be used by this backend.
    #[error("{0}")]
    Unsupported(String),
}

impl BackendError {
    /// The check that reports this error.
    pub fn to_check(&self) -> AuthCheck {
        match self {
            Self::Rejected { failure, message }
            | Self::Transient {
                failure, message, ..
            } => AuthCheck::failed(*failure, message.clone()),
            Self::Unsupported(m) => AuthCheck::failed(AuthFailure::Misconfigured, m.clone()),
        }
    }

    /// A transient failure from a transport error.
    pub fn unreachable(vendor: &str, e: &http::TransportError) -> Self {
        Self::Transient {
            failure: AuthFailure::Unreachable,
            message: format!("could not reach {vendor} ({e})"),
            retry_after: None,
        }
    }
}

impl From<BackendError> for BrokerError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Rejected { message, .. } => BrokerError::FailedPrecondition(message),
            BackendError::Transient { message, .. } => BrokerError::Unavailable(message),
            BackendError::Unsupported(m) => BrokerError::FailedPrecondition(m),
        }
    }
}

/// One upstream system.
#[async_trait]
pub trait Backend: Send + Sync {
    /// The kind this backend serves.
    fn kind(&self) -> SystemKind;

    /// Turns what an admin pasted into the one canonical base URL, or says what to enter instead.
    ///
    /// # Behavior
    /// - https URLs must have the vendor's host shape;
    /// - with `egress.allow_http`, any `http://` URL is taken as given (a stand-in for the
    ///   vendor, e.g. a fake on loopback) without host-shape rules.
    fn canonical_base_url(&self, raw: &str, egress: &EgressPolicy) -> Result<String, String>;

    /// Refuses a base URL that cannot work with this credential type (e.g. Salesforce's generic
    /// login host for the client-credentials flow). Default: every URL is fine.
    fn validate_target(&self, _base_url: &str, _credential: &Credential) -> Result<(), String> {
        Ok(())
    }

    /// Settles what a credential needs from the vendor before it is stored, without minting
    /// a token (Jira Cloud: the site's cloud id, which its tenant info gives without any
    /// user). `Some` is the credential to store instead. Default: nothing to settle.
    async fn resolve(
        &self,
        _base_url: &str,
        _credential: &Credential,
    ) -> Result<Option<Credential>, BackendError> {
        Ok(None)
    }

    /// Builds the headers a worker sends.
    ///
    /// # Behavior
    /// - static secrets: builds the header locally, no upstream call, `expires_at = None`;
    /// - OAuth grants: calls the token endpoint; when the upstream rotated the refresh token (or
    ///   a password was exchanged for one), returns the credential to store in
    ///   `updated_credential`, which the broker persists before handing the headers out.
    async fn issue(&self, target: &Target<'_>) -> Result<Issued, BackendError>;

    /// Verifies upstream, with headers from [`Backend::issue`], who the credential authenticates
    /// as and which permissions a sync needs are missing. Never fails: every problem is an
    /// [`AuthCheck`] with a failure class.
    async fn verify(&self, target: &Target<'_>, issued: &Issued) -> AuthCheck;

    /// Authorization-code flows: whether the vendor takes PKCE (S256).
    fn uses_pkce(&self) -> bool {
        false
    }

    /// How long a refresh token the vendor turned over may still be presented once more
    /// (Atlassian: 10 minutes, `upstreams.md` §5). Within it the broker settles a refresh whose
    /// answer was lost by presenting the stored token again. Default: none (at the others a
    /// turned-over token is dead, and one not turned over stays valid: nothing to hurry).
    fn reuse_leeway(&self) -> Option<std::time::Duration> {
        None
    }

    /// Authorization-code flows: the vendor's consent page for this client.
    fn authorize_url(
        &self,
        _target: &Target<'_>,
        _request: &AuthorizeRequest<'_>,
    ) -> Result<String, BackendError> {
        Err(BackendError::Unsupported(format!(
            "{} systems do not use an authorization-code flow",
            self.kind().display_name()
        )))
    }

    /// Authorization-code flows: exchanges the code; `updated_credential` carries the credential
    /// with its new grant.
    async fn exchange_code(
        &self,
        _target: &Target<'_>,
        _code: &str,
        _request: &AuthorizeRequest<'_>,
    ) -> Result<Issued, BackendError> {
        Err(BackendError::Unsupported(format!(
            "{} systems do not use an authorization-code flow",
            self.kind().display_name()
        )))
    }
}

/// The parameters of one authorization flow.
#[derive(Debug)]
pub struct AuthorizeRequest<'a> {
    /// The one-time `state`.
    pub state: &'a str,
    /// The exact redirect URI registered with the vendor.
    pub redirect_uri: &'a str,
    /// PKCE S256 challenge (authorize) …
    pub pkce_challenge: Option<&'a str>,
    /// … and verifier (exchange).
    pub pkce_verifier: Option<&'a SecretString>,
}

/// Shared plumbing handed to every backend.
#[derive(Clone)]
pub struct BackendContext {
    /// The one outbound HTTP client.
    pub http: HttpClient,
    /// Egress rules.
    pub egress: EgressPolicy,
    /// OAuth lifetimes the vendors do not tell.
    pub oauth: oauth::OAuthSettings,
}

#[cfg(test)]
impl BackendContext {
    /// A context for unit tests: 1 s timeouts, https only.
    pub fn for_tests() -> Self {
        Self {
            http: HttpClient::new(
                std::time::Duration::from_secs(1),
                1024,
                &EgressPolicy::default(),
            )
            .unwrap_or_else(|e| panic!("test client: {e}")),
            egress: EgressPolicy::default(),
            oauth: oauth::OAuthSettings::default(),
        }
    }
}

/// The backends of this build, by kind.
#[derive(Clone)]
pub struct Registry {
    backends: Vec<(SystemKind, Arc<dyn Backend>)>,
}

impl Registry {
    /// Builds every backend this build has.
    pub fn new(ctx: &BackendContext) -> Self {
        let backends = SystemKind::ALL
            .into_iter()
            .filter_map(|k| registry(k, ctx).map(|b| (k, b)))
            .collect();
        Self { backends }
    }

    /// A registry of exactly these backends (tests put fakes here).
    pub fn from_backends(backends: Vec<(SystemKind, Arc<dyn Backend>)>) -> Self {
        Self { backends }
    }

    /// The backend for `kind`, or `UNIMPLEMENTED`.
    pub fn get(&self, kind: SystemKind) -> Result<&Arc<dyn Backend>, BrokerError> {
        self.backends
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, b)| b)
            .ok_or_else(|| {
                BrokerError::Unimplemented(format!(
                    "{} systems are not supported by this credbroker build yet",
                    kind.display_name()
                ))
            })
    }
}

/// One exhaustive match: a new kind is a compile error until it is listed here.
fn registry(kind: SystemKind, ctx: &BackendContext) -> Option<Arc<dyn Backend>> {
    match kind {
        SystemKind::Asana => Some(Arc::new(asana::AsanaBackend::new(ctx.clone()))),
        SystemKind::AzureDevOps => {
            Some(Arc::new(azure_devops::AzureDevOpsBackend::new(ctx.clone())))
        }
        SystemKind::Freshdesk => Some(Arc::new(freshdesk::FreshdeskBackend::new(ctx.clone()))),
        SystemKind::Freshservice => Some(Arc::new(freshservice::FreshserviceBackend::new(
            ctx.clone(),
        ))),
        SystemKind::ServiceNow => Some(Arc::new(servicenow::ServiceNowBackend::new(ctx.clone()))),
        SystemKind::Salesforce => Some(Arc::new(salesforce::SalesforceBackend::new(ctx.clone()))),
        SystemKind::Zendesk => Some(Arc::new(zendesk::ZendeskBackend::new(ctx.clone()))),
        SystemKind::JiraCloud => Some(Arc::new(jira_cloud::JiraCloudBackend::new(ctx.clone()))),
    }
}

/// ServiceNow's inbound REST API key header.
pub const SN_API_KEY_HEADER: &str = "x-sn-apikey";

/// Every header name a backend hands out: `authorization` and vendors' own.
pub const HEADER_NAMES: &[&str] = &["authorization", SN_API_KEY_HEADER];

/// `name` as one of [`HEADER_NAMES`] (replicas and backups carry header names as text).
pub fn known_header_name(name: &str) -> Option<&'static str> {
    HEADER_NAMES.iter().copied().find(|n| *n == name)
}

/// A header value marked sensitive-by-construction.
pub fn bearer(token: &SecretString) -> Header {
    Header {
        name: "authorization",
        value: SecretString::new(format!("Bearer {}", token.expose_secret())),
    }
}

/// `Authorization: Basic base64(user:password)`.
pub fn basic(user: &str, password: &str) -> Header {
    use base64::Engine;
    let raw = zeroize::Zeroizing::new(format!("{user}:{password}"));
    Header {
        name: "authorization",
        value: SecretString::new(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw.as_bytes())
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token a worker's HTTP stack would carry as it is, and none other: an empty access
    /// token (`Bearer `), a CR/LF, non-ASCII text or an oversized value is not handed out.
    #[test]
    fn only_a_header_sent_as_it_is_is_sendable() {
        let of = |t: &str| bearer(&SecretString::from(t)).sendable();
        assert!(of("at-1.2_3"));
        for bad in ["", "at ", "at\r\nX-Injected: 1", "at-é"] {
            assert!(!of(bad), "{bad:?}");
        }
        assert!(!of(&"a".repeat(MAX_HEADER_VALUE)));
    }
}
