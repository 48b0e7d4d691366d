//! Domain types: systems, credentials, checks and callers. No proto or HTTP types here.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::secret::SecretString;

/// The upstream systems credbroker knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SystemKind {
    /// Azure DevOps Services and Server.
    AzureDevOps,
    /// Salesforce.
    Salesforce,
    /// ServiceNow.
    ServiceNow,
    /// Zendesk.
    Zendesk,
    /// Jira Cloud.
    JiraCloud,
    /// Freshdesk.
    Freshdesk,
    /// Freshservice.
    Freshservice,
    /// Asana.
    Asana,
}

impl SystemKind {
    /// Every kind, in proto order.
    pub const ALL: [SystemKind; 8] = [
        Self::AzureDevOps,
        Self::Salesforce,
        Self::ServiceNow,
        Self::Zendesk,
        Self::JiraCloud,
        Self::Freshdesk,
        Self::Freshservice,
        Self::Asana,
    ];

    /// The slug used in ids, the CLI and logs.
    pub fn slug(self) -> &'static str {
        match self {
            Self::AzureDevOps => "azure_devops",
            Self::Salesforce => "salesforce",
            Self::ServiceNow => "servicenow",
            Self::Zendesk => "zendesk",
            Self::JiraCloud => "jira_cloud",
            Self::Freshdesk => "freshdesk",
            Self::Freshservice => "freshservice",
            Self::Asana => "asana",
        }
    }

    /// The vendor's product name, for messages.
    pub fn display_name(self) -> &'static str {
        match self {
            Self::AzureDevOps => "Azure DevOps",
            Self::Salesforce => "Salesforce",
            Self::ServiceNow => "ServiceNow",
            Self::Zendesk => "Zendesk",
            Self::JiraCloud => "Jira Cloud",
            Self::Freshdesk => "Freshdesk",
            Self::Freshservice => "Freshservice",
            Self::Asana => "Asana",
        }
    }

    /// Parses a slug (`asana`, `azure-devops`, `azure_devops`).
    pub fn from_slug(s: &str) -> Option<Self> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        Self::ALL.into_iter().find(|k| k.slug() == norm)
    }

    /// The credential types this kind really supports (see `docs/systems/`).
    pub fn accepted_credentials(self) -> &'static [CredentialType] {
        use CredentialType as C;
        match self {
            Self::AzureDevOps => &[C::PersonalAccessToken, C::EntraClientCredentials],
            Self::Salesforce => &[
                C::OAuthClientCredentials,
                C::SalesforceLogin,
                C::SalesforceJwtBearer,
                C::OAuthAuthorizationCode,
            ],
            Self::ServiceNow => &[
                C::Basic,
                C::OAuthRefreshToken,
                C::OAuthPasswordGrant,
                C::OAuthClientCredentials,
                C::ApiKey,
            ],
            Self::Zendesk => &[C::OAuthAuthorizationCode, C::OAuthClientCredentials],
            Self::JiraCloud => &[
                C::OAuthAuthorizationCode,
                C::OAuthClientCredentials,
                C::EmailApiToken,
            ],
            Self::Freshdesk => &[C::ApiKey],
            Self::Freshservice => &[C::ApiKey],
            Self::Asana => &[C::PersonalAccessToken],
        }
    }
}

/// What a system on a credential the vendor is retiring should move to, and when: shown as the
/// system's `state_message` (when it has none of its own) and in its checks. Nothing stops
/// working before the vendor stops it.
pub fn legacy_note(kind: SystemKind, credential_type: CredentialType) -> Option<&'static str> {
    match (kind, credential_type) {
        (SystemKind::AzureDevOps, CredentialType::PersonalAccessToken) => Some(
            "Legacy: Microsoft steers automation from PATs to Microsoft Entra service principals \
             (entra_client_credentials); global PATs stopped working on 2026-12-01 and \
             organizations may restrict PAT creation.",
        ),
        (SystemKind::Salesforce, CredentialType::SalesforceLogin) => Some(
            "Legacy: Salesforce retires SOAP login() in Summer '27 (gone from API 65.0) and blocks \
             the username-password flow by default in new orgs; move to salesforce_jwt_bearer, \
             oauth_client_credentials or Connect with Salesforce (oauth_authorization_code).",
        ),
        _ => None,
    }
}

impl fmt::Display for SystemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.slug())
    }
}

/// The type of a credential, without its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialType {
    /// `personal_access_token`.
    PersonalAccessToken,
    /// `api_key`.
    ApiKey,
    /// `basic`.
    Basic,
    /// `oauth_client_credentials`.
    OAuthClientCredentials,
    /// `oauth_refresh_token`.
    OAuthRefreshToken,
    /// `oauth_password_grant`.
    OAuthPasswordGrant,
    /// `salesforce_login`.
    SalesforceLogin,
    /// `oauth_authorization_code`.
    OAuthAuthorizationCode,
    /// `entra_client_credentials`.
    EntraClientCredentials,
    /// `salesforce_jwt_bearer`.
    SalesforceJwtBearer,
    /// `email_api_token`.
    EmailApiToken,
}

impl CredentialType {
    /// Every type, in proto order.
    pub const ALL: [CredentialType; 11] = [
        Self::PersonalAccessToken,
        Self::ApiKey,
        Self::Basic,
        Self::OAuthClientCredentials,
        Self::OAuthRefreshToken,
        Self::OAuthPasswordGrant,
        Self::SalesforceLogin,
        Self::OAuthAuthorizationCode,
        Self::EntraClientCredentials,
        Self::SalesforceJwtBearer,
        Self::EmailApiToken,
    ];

    /// The proto oneof field name.
    pub fn field_name(self) -> &'static str {
        match self {
            Self::PersonalAccessToken => "personal_access_token",
            Self::ApiKey => "api_key",
            Self::Basic => "basic",
            Self::OAuthClientCredentials => "oauth_client_credentials",
            Self::OAuthRefreshToken => "oauth_refresh_token",
            Self::OAuthPasswordGrant => "oauth_password_grant",
            Self::SalesforceLogin => "salesforce_login",
            Self::OAuthAuthorizationCode => "oauth_authorization_code",
            Self::EntraClientCredentials => "entra_client_credentials",
            Self::SalesforceJwtBearer => "salesforce_jwt_bearer",
            Self::EmailApiToken => "email_api_token",
        }
    }

    /// True for a service identity's grant: every token is minted from the stored credential
    /// alone (no refresh token or user consent to lose), so a refusal means the vendor's setup
    /// or the secret changed.
    pub fn is_service_identity(self) -> bool {
        matches!(
            self,
            Self::OAuthClientCredentials | Self::EntraClientCredentials | Self::SalesforceJwtBearer
        )
    }

    /// True for credentials whose headers come from a token endpoint (they expire and
    /// refresh); the one answer to "is this OAuth".
    pub fn is_oauth(self) -> bool {
        !matches!(
            self,
            Self::PersonalAccessToken | Self::ApiKey | Self::Basic | Self::EmailApiToken
        )
    }
}

impl fmt::Display for CredentialType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.field_name())
    }
}

/// A credential with its secret values. `Debug` is hand-written and prints no secret.
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Credential {
    /// A personal access token.
    PersonalAccessToken {
        /// The token.
        token: SecretString,
        /// Optional user name.
        username: Option<String>,
        /// Optional admin-supplied expiry, seconds since the epoch.
        expires_at: Option<u64>,
    },
    /// An API key.
    ApiKey {
        /// The key.
        key: SecretString,
        /// Optional admin-supplied expiry, seconds since the epoch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
    },
    /// User name and password.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: SecretString,
    },
    /// OAuth client credentials.
    OAuthClientCredentials {
        /// Client id.
        client_id: String,
        /// Client secret.
        client_secret: SecretString,
        /// Requested scopes.
        scopes: Vec<String>,
        /// Jira Cloud: the site's cloud id, found from the site URL when the system is registered.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cloud_id: Option<String>,
        /// When the client secret expires, seconds since the epoch, when the admin said.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret_expires_at: Option<u64>,
    },
    /// A Microsoft Entra service principal (Azure DevOps).
    EntraClientCredentials {
        /// Directory (tenant) id or verified domain.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// How the app proves itself.
        auth: EntraAuth,
        /// `https://login.microsoftonline.com` or a sovereign cloud's authority.
        authority_url: String,
        /// When the client secret (or certificate) expires, seconds since the epoch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret_expires_at: Option<u64>,
    },
    /// Salesforce OAuth 2.0 JWT bearer flow.
    SalesforceJwtBearer {
        /// The External Client App's consumer key.
        client_id: String,
        /// The pre-authorized user the tokens act as.
        username: String,
        /// The private key (PEM) whose certificate is uploaded to the app.
        private_key_pem: SecretString,
        /// The JWT's audience and token host: login, test or the org's My Domain.
        login_url: String,
    },
    /// An OAuth refresh token.
    OAuthRefreshToken {
        /// Client id.
        client_id: String,
        /// Client secret.
        client_secret: SecretString,
        /// Refresh token.
        refresh_token: SecretString,
        /// The user the grant belongs to, when known (ServiceNow identity lookups need it).
        #[serde(default)]
        username: Option<String>,
        /// When the refresh token stops working, seconds since the epoch, when known.
        #[serde(default)]
        refresh_expires_at: Option<u64>,
    },
    /// An OAuth password grant (the password is exchanged, never stored by the OAuth backends).
    OAuthPasswordGrant {
        /// Client id.
        client_id: String,
        /// Client secret.
        client_secret: SecretString,
        /// User name.
        username: String,
        /// Password.
        password: SecretString,
    },
    /// Salesforce legacy login.
    SalesforceLogin {
        /// User name.
        username: String,
        /// Password.
        password: SecretString,
        /// Security token (appended to the password only on the wire).
        security_token: SecretString,
        /// Optional client id (OAuth username-password flow).
        client_id: Option<String>,
        /// Optional client secret.
        client_secret: Option<SecretString>,
    },
    /// An OAuth authorization-code client, and the grant once a person authorized it.
    OAuthAuthorizationCode {
        /// Client id.
        client_id: String,
        /// Client secret.
        client_secret: SecretString,
        /// Requested scopes.
        scopes: Vec<String>,
        /// The grant, after the authorization flow completed.
        #[serde(default)]
        grant: Option<Grant>,
    },
    /// An e-mail address and API token sent as Basic auth (Jira Cloud).
    EmailApiToken {
        /// The account's e-mail address.
        email: String,
        /// The API token.
        token: SecretString,
        /// Optional admin-supplied expiry, seconds since the epoch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
        /// A scoped token: only works through the API gateway with the site's cloud id.
        #[serde(default)]
        scoped: bool,
        /// The site's cloud id, found from the site URL when a scoped token is registered.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cloud_id: Option<String>,
    },
}

/// How an Entra app proves itself at the token endpoint: exactly one way.
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum EntraAuth {
    /// A client secret (its Value, not its ID).
    Secret {
        /// The secret.
        client_secret: SecretString,
    },
    /// A certificate uploaded to the app and its private key: a signed client assertion.
    Certificate {
        /// The certificate (PEM); its SHA-256 thumbprint names the key to Entra.
        certificate_pem: String,
        /// The private key (PEM).
        private_key_pem: SecretString,
    },
    /// A federated token file (workload identity), read again for every token.
    FederatedTokenFile {
        /// The file's path on the broker's host.
        path: String,
    },
}

/// An authorized OAuth grant (authorization-code flows).
#[derive(Clone, Serialize, Deserialize)]
pub struct Grant {
    /// The refresh token (rotated on every use by Zendesk and Atlassian).
    pub refresh_token: SecretString,
    /// When the refresh token stops working unless used, seconds since the epoch.
    pub refresh_expires_at: Option<u64>,
    /// Scopes the vendor granted.
    pub granted_scopes: Vec<String>,
    /// Jira Cloud: the site's cloud id.
    pub cloud_id: Option<String>,
    /// Salesforce: the `instance_url` of the last token answer (where API calls go).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_url: Option<String>,
    /// When the grant was made, seconds since the epoch.
    pub authorized_at: u64,
}

impl Credential {
    /// The credential's type.
    pub fn credential_type(&self) -> CredentialType {
        match self {
            Self::PersonalAccessToken { .. } => CredentialType::PersonalAccessToken,
            Self::ApiKey { .. } => CredentialType::ApiKey,
            Self::Basic { .. } => CredentialType::Basic,
            Self::OAuthClientCredentials { .. } => CredentialType::OAuthClientCredentials,
            Self::OAuthRefreshToken { .. } => CredentialType::OAuthRefreshToken,
            Self::OAuthPasswordGrant { .. } => CredentialType::OAuthPasswordGrant,
            Self::SalesforceLogin { .. } => CredentialType::SalesforceLogin,
            Self::OAuthAuthorizationCode { .. } => CredentialType::OAuthAuthorizationCode,
            Self::EntraClientCredentials { .. } => CredentialType::EntraClientCredentials,
            Self::SalesforceJwtBearer { .. } => CredentialType::SalesforceJwtBearer,
            Self::EmailApiToken { .. } => CredentialType::EmailApiToken,
        }
    }

    /// When the credential stops working, when known: the admin-supplied expiry of a PAT, API
    /// key or API token, or a refresh token's tracked expiry.
    pub fn expires_at(&self) -> Option<u64> {
        match self {
            Self::PersonalAccessToken { expires_at, .. }
            | Self::ApiKey { expires_at, .. }
            | Self::EmailApiToken { expires_at, .. } => *expires_at,
            Self::OAuthClientCredentials {
                secret_expires_at, ..
            }
            | Self::EntraClientCredentials {
                secret_expires_at, ..
            } => *secret_expires_at,
            Self::OAuthRefreshToken {
                refresh_expires_at, ..
            } => *refresh_expires_at,
            Self::OAuthAuthorizationCode { grant: Some(g), .. } => g.refresh_expires_at,
            _ => None,
        }
    }

    /// True for credentials whose headers come from a token endpoint (they expire and refresh).
    pub fn is_oauth(&self) -> bool {
        self.credential_type().is_oauth()
    }

    /// The refresh token a token endpoint is handed (and may turn over when used), if any.
    pub fn refresh_token(&self) -> Option<&SecretString> {
        match self {
            Self::OAuthRefreshToken { refresh_token, .. } => Some(refresh_token),
            Self::OAuthAuthorizationCode { grant: Some(g), .. } => Some(&g.refresh_token),
            _ => None,
        }
    }

    /// True when the credential must be exchanged upstream before it can be stored (a password
    /// grant: the password is never stored).
    pub fn requires_exchange(&self) -> bool {
        matches!(self, Self::OAuthPasswordGrant { .. })
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("type", &self.credential_type())
            .finish_non_exhaustive()
    }
}

/// How workers get a system's credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// The real auth header.
    #[default]
    Header,
    /// A lease for the broker's proxy.
    Proxy,
}

impl Delivery {
    /// The snake_case name (as stored).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Header => "header",
            Self::Proxy => "proxy",
        }
    }
}

/// Lifecycle state of a system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SystemState {
    /// Serving tokens.
    Active,
    /// Waiting for an authorization-code flow to finish.
    AuthorizationPending,
    /// The grant is dead; an admin must re-authorize.
    ReauthorizationRequired,
}

/// A system's credential health (see `broker::health`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SystemHealth {
    /// Nothing known to be wrong or coming.
    Healthy,
    /// A known horizon is inside the warning window.
    Expiring,
    /// Transient trouble.
    Degraded,
    /// Needs an admin.
    Failing,
}

impl SystemHealth {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Expiring => "expiring",
            Self::Degraded => "degraded",
            Self::Failing => "failing",
        }
    }
}

/// The health a system was last found in, with its reason and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthMark {
    /// The health.
    pub health: SystemHealth,
    /// What is wrong or coming, and what to do.
    pub reason: String,
    /// Seconds since the epoch.
    pub since: u64,
    /// The last expiry warning threshold announced (30, 7 or 1 days), so each is sent once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warned_days: Option<u64>,
    /// The horizon those warnings were about: a new one (a rotation) starts them again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warned_for: Option<u64>,
}

/// A spell of failing token refreshes (unreachable, rate limited, upstream errors), or, on a
/// system marked for re-authorization, why the vendor refused it (a refused grant may be revived
/// by a replica holding its live refresh token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshFailure {
    /// How the first refresh of the spell failed.
    pub failure: AuthFailure,
    /// What the vendor (or the network) said; no secret.
    pub message: String,
    /// Seconds since the epoch.
    pub since: u64,
}

/// Why a check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthFailure {
    /// The upstream rejected the credential.
    InvalidCredentials,
    /// Authenticated, but permissions a sync needs are missing.
    InsufficientPermissions,
    /// The credential expired or was revoked.
    ExpiredOrRevoked,
    /// The OAuth grant must be re-authorized by a person.
    ReauthorizationRequired,
    /// DNS, connect, TLS or timeout.
    Unreachable,
    /// The upstream rate-limited the check.
    RateLimited,
    /// The URL or setup is wrong.
    Misconfigured,
    /// The upstream failed (5xx, garbage).
    UpstreamError,
}

impl AuthFailure {
    /// The snake_case name used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidCredentials => "invalid_credentials",
            Self::InsufficientPermissions => "insufficient_permissions",
            Self::ExpiredOrRevoked => "expired_or_revoked",
            Self::ReauthorizationRequired => "reauthorization_required",
            Self::Unreachable => "unreachable",
            Self::RateLimited => "rate_limited",
            Self::Misconfigured => "misconfigured",
            Self::UpstreamError => "upstream_error",
        }
    }
}

/// Who a credential authenticates as.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Upstream user id.
    pub id: String,
    /// Display name.
    pub display_name: String,
    /// E-mail, when the upstream reveals it.
    pub email: String,
}

impl Identity {
    /// The vendor's text cut to what is fit to show: no control or invisible characters, an
    /// id and an e-mail of at most 320 characters, a name of at most 200.
    pub fn shown(self) -> Self {
        use crate::util::text::visible;
        Self {
            id: visible(&self.id, 320),
            display_name: visible(&self.display_name, 200),
            email: visible(&self.email, 320),
        }
    }
}

/// The outcome of an authentication check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthCheck {
    /// True when the credential authenticates with every permission a sync needs.
    pub ok: bool,
    /// Set when `ok` is false.
    pub failure: Option<AuthFailure>,
    /// For a human: what was found, what to fix.
    pub message: String,
    /// The identity, when authentication succeeded.
    pub identity: Option<Identity>,
    /// Permissions (named as the vendor's UI names them) that are missing.
    pub missing_permissions: Vec<String>,
    /// When the check ran, seconds since the epoch.
    pub checked_at: u64,
}

impl AuthCheck {
    /// A passing check. The identity is the vendor's text: it is kept only as far as it is
    /// fit to show (see [`Identity::shown`]), since it is stored, sent in events and shown.
    pub fn ok(identity: Identity, message: impl Into<String>) -> Self {
        Self {
            ok: true,
            failure: None,
            message: message.into(),
            identity: Some(identity.shown()),
            missing_permissions: Vec::new(),
            checked_at: unix_now(),
        }
    }

    /// A failing check.
    pub fn failed(failure: AuthFailure, message: impl Into<String>) -> Self {
        Self {
            ok: false,
            failure: Some(failure),
            message: message.into(),
            identity: None,
            missing_permissions: Vec::new(),
            checked_at: unix_now(),
        }
    }

    /// Adds `sentence` to the message, ending the sentence before it first, so notes never run
    /// into each other ("the PAT authenticates. Not verified: …").
    pub fn add_sentence(&mut self, sentence: &str) {
        let kept = self.message.trim_end().len();
        self.message.truncate(kept);
        if !self.message.is_empty() {
            if !self.message.ends_with(['.', '!', '?']) {
                self.message.push('.');
            }
            self.message.push(' ');
        }
        self.message.push_str(sentence);
    }
}

/// A registered system's metadata (clear) plus its sealed credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemRecord {
    /// The system id.
    pub system_id: String,
    /// Display name.
    pub display_name: String,
    /// Description.
    pub description: String,
    /// Kind.
    pub kind: SystemKind,
    /// Canonical base URL.
    pub base_url: String,
    /// Credential type (metadata).
    pub credential_type: CredentialType,
    /// Starts at 1; +1 on every rotation.
    pub credential_version: u64,
    /// Lifecycle state.
    pub state: SystemState,
    /// Why the system is not active (what to do), when it is not.
    #[serde(default)]
    pub state_message: Option<String>,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// Seconds since the epoch.
    pub updated_at: u64,
    /// The last check, if any.
    pub last_check: Option<AuthCheck>,
    /// Admin-supplied credential expiry, seconds since the epoch.
    pub credential_expires_at: Option<u64>,
    /// How workers get the credential (records from before proxy delivery: header).
    #[serde(default)]
    pub delivery: Delivery,
    /// Vendor 401s seen through the proxy.
    #[serde(default)]
    pub proxy_unauthorized_count: u64,
    /// When the last one was seen, seconds since the epoch.
    #[serde(default)]
    pub last_proxy_unauthorized_at: Option<u64>,
    /// The health last derived (absent on records from before health tracking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthMark>,
    /// The token refreshes of this system have been failing transiently since (cleared by the
    /// next success): the system is degraded meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_failure: Option<RefreshFailure>,
    /// The sealed credential (see `crypto`).
    #[serde(with = "b64")]
    pub sealed_credential: Vec<u8>,
    /// Bumped on every write; used for compare-and-swap.
    pub revision: u64,
    /// Replicas only (a shared store): the access token last issued from this credential,
    /// sealed, so another replica uses it instead of refreshing again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_token: Option<SharedToken>,
    /// MAC over the security-relevant fields under a key derived from the master key (set and
    /// checked by [`crate::store::AuthenticatedStore`]; a row edited without the key fails it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity: Option<String>,
}

/// An issued OAuth access token as replicas share it through the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedToken {
    /// Headers and API base URL, sealed under the master key and bound to the system.
    #[serde(with = "b64")]
    pub sealed: Vec<u8>,
    /// Expiry, milliseconds since the epoch.
    pub expires_at_ms: u64,
    /// The token id every replica hands out for it.
    pub token_id: String,
}

/// A caller's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// `GetAccessToken` only.
    Worker,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Admin => "admin",
            Self::Worker => "worker",
        })
    }
}

/// A caller as stored: its token is kept only as a SHA-256 hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerRecord {
    /// Unique name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// SHA-256 of the bearer token, hex.
    pub token_sha256: String,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// Revoked callers are refused.
    pub revoked: bool,
    /// Workers: system id patterns (`*` wildcard) they may use; empty = any.
    #[serde(default)]
    pub system_patterns: Vec<String>,
    /// Workers: kinds they may use; empty = any.
    #[serde(default)]
    pub kinds: Vec<SystemKind>,
    /// The token is refused after this, seconds since the epoch.
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// MAC over every field under a key derived from the master key (see
    /// [`crate::store::AuthenticatedStore`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity: Option<String>,
}

/// Matches `id` against a pattern where `*` stands for any run of characters.
pub fn pattern_matches(pattern: &str, id: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == id;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !id.starts_with(first)
        || !id[first.len()..].ends_with(last)
        || id.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &id[first.len()..id.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

pub use crate::util::time::unix_now;

mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

/// A proxied Asana system with a made-up sealed credential (tests only).
#[cfg(test)]
pub(crate) fn sample_system(id: &str) -> SystemRecord {
    SystemRecord {
        system_id: id.into(),
        display_name: String::new(),
        description: String::new(),
        kind: SystemKind::Asana,
        base_url: "https://app.asana.com".into(),
        credential_type: CredentialType::PersonalAccessToken,
        credential_version: 1,
        state: SystemState::Active,
        state_message: None,
        created_at: 0,
        updated_at: 0,
        last_check: None,
        credential_expires_at: None,
        delivery: Delivery::Proxy,
        proxy_unauthorized_count: 0,
        last_proxy_unauthorized_at: None,
        health: None,
        refresh_failure: None,
        sealed_credential: vec![1, 2, 3],
        revision: 1,
        shared_token: None,
        integrity: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_notes_are_separate_sentences() {
        let identity = Identity::default();
        let mut c = AuthCheck::ok(identity.clone(), "the PAT authenticates ");
        c.add_sentence("Not verified: x.");
        assert_eq!(c.message, "the PAT authenticates. Not verified: x.");
        c.add_sentence("Warning: soon.");
        assert_eq!(
            c.message,
            "the PAT authenticates. Not verified: x. Warning: soon."
        );
        let mut empty = AuthCheck::ok(identity, "");
        empty.add_sentence("Only this.");
        assert_eq!(empty.message, "Only this.");
    }

    #[test]
    fn credential_debug_has_no_secret() {
        let c = Credential::Basic {
            username: "u".into(),
            password: "pw-canary-123".into(),
        };
        assert!(!format!("{c:?}").contains("pw-canary-123"));
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("acme-*", "acme-jira"));
        assert!(!pattern_matches("acme-*", "other-jira"));
        assert!(pattern_matches("*-jira", "acme-jira"));
        assert!(pattern_matches("a*b*c", "axxbyyc"));
        assert!(!pattern_matches("a*b*c", "axxc"));
        assert!(pattern_matches("exact", "exact"));
        assert!(!pattern_matches("exact", "exactly"));
        assert!(pattern_matches("*", "anything"));
        // What `acme-*` covers (docs/security.md, Callers): the whole id, case-sensitive, any tail.
        assert!(pattern_matches("acme-*", "acme-eu-jira"));
        assert!(!pattern_matches("acme-*", "acme2-jira"));
        assert!(!pattern_matches("acme-*", "xacme-jira"));
        assert!(!pattern_matches("acme-*", "ACME-jira"));
        assert!(!pattern_matches("acme-*", "acme"));
        assert!(!pattern_matches("*-jira", "acme-jira2"));
    }

    #[test]
    fn kind_slugs_round_trip() {
        for k in SystemKind::ALL {
            assert_eq!(SystemKind::from_slug(k.slug()), Some(k));
        }
        assert_eq!(
            SystemKind::from_slug("Azure-DevOps"),
            Some(SystemKind::AzureDevOps)
        );
    }
}
