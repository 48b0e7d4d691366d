//! Proto ⇄ domain conversions. Field problems become `INVALID_ARGUMENT` naming the field.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost::Message;
use prost_types::Timestamp;
use zeroize::Zeroize;

use crate::broker::tokens::IssuedToken;
use crate::error::BrokerError;
use crate::model::{
    AuthCheck, AuthFailure, CallerRecord, Credential, CredentialType, Role, SystemHealth,
    SystemKind, SystemRecord, SystemState,
};
use crate::pb;
use crate::secret::{SecretBytes, SecretString};

/// Proto kind → domain kind.
pub fn kind(value: i32, field: &'static str) -> Result<SystemKind, BrokerError> {
    use pb::SystemKind as P;
    match P::try_from(value) {
        Ok(P::AzureDevops) => Ok(SystemKind::AzureDevOps),
        Ok(P::Salesforce) => Ok(SystemKind::Salesforce),
        Ok(P::Servicenow) => Ok(SystemKind::ServiceNow),
        Ok(P::Zendesk) => Ok(SystemKind::Zendesk),
        Ok(P::JiraCloud) => Ok(SystemKind::JiraCloud),
        Ok(P::Freshdesk) => Ok(SystemKind::Freshdesk),
        Ok(P::Freshservice) => Ok(SystemKind::Freshservice),
        Ok(P::Asana) => Ok(SystemKind::Asana),
        Ok(P::Unspecified) => Err(BrokerError::invalid(
            field,
            "is required (SYSTEM_KIND_ASANA, …)",
        )),
        Err(_) => Err(BrokerError::invalid(
            field,
            format!("unknown system kind {value}"),
        )),
    }
}

/// Domain kind → proto kind.
pub fn kind_to_proto(k: SystemKind) -> pb::SystemKind {
    use pb::SystemKind as P;
    match k {
        SystemKind::AzureDevOps => P::AzureDevops,
        SystemKind::Salesforce => P::Salesforce,
        SystemKind::ServiceNow => P::Servicenow,
        SystemKind::Zendesk => P::Zendesk,
        SystemKind::JiraCloud => P::JiraCloud,
        SystemKind::Freshdesk => P::Freshdesk,
        SystemKind::Freshservice => P::Freshservice,
        SystemKind::Asana => P::Asana,
    }
}

/// The credential type a proto value names, if any.
pub fn credential_type(v: i32) -> Option<CredentialType> {
    CredentialType::ALL
        .into_iter()
        .find(|t| cred_type_to_proto(*t) as i32 == v)
}

fn cred_type_to_proto(t: CredentialType) -> pb::CredentialType {
    use pb::CredentialType as P;
    match t {
        CredentialType::PersonalAccessToken => P::PersonalAccessToken,
        CredentialType::ApiKey => P::ApiKey,
        CredentialType::Basic => P::Basic,
        CredentialType::OAuthClientCredentials => P::OauthClientCredentials,
        CredentialType::OAuthRefreshToken => P::OauthRefreshToken,
        CredentialType::OAuthPasswordGrant => P::OauthPasswordGrant,
        CredentialType::SalesforceLogin => P::SalesforceLogin,
        CredentialType::OAuthAuthorizationCode => P::OauthAuthorizationCode,
        CredentialType::EntraClientCredentials => P::EntraClientCredentials,
        CredentialType::SalesforceJwtBearer => P::SalesforceJwtBearer,
        CredentialType::EmailApiToken => P::EmailApiToken,
    }
}

/// A token-like secret: trimmed, non-empty, and valid in an HTTP header.
fn token(v: String, field: &'static str) -> Result<SecretString, BrokerError> {
    let s = SecretString::new(v);
    let trimmed = s.expose_secret().trim();
    if trimmed.is_empty() {
        return Err(BrokerError::invalid(field, "is required"));
    }
    if trimmed.chars().any(|c| c.is_control() || c == ' ') || !trimmed.is_ascii() {
        return Err(BrokerError::invalid(
            field,
            "contains spaces, control or non-ASCII characters, which no vendor issues; paste \
             the value exactly as the vendor shows it",
        ));
    }
    if trimmed.len() > MAX_SECRET_BYTES {
        return Err(BrokerError::invalid(field, TOO_LONG));
    }
    Ok(if trimmed.len() == s.expose_secret().len() {
        s
    } else {
        SecretString::from(trimmed)
    })
}

/// A password: kept exactly as given, must be non-empty and free of control characters.
fn password(v: String, field: &'static str) -> Result<SecretString, BrokerError> {
    let s = SecretString::new(v);
    if s.is_empty() {
        return Err(BrokerError::invalid(field, "is required"));
    }
    if s.expose_secret().chars().any(|c| c.is_control()) {
        return Err(BrokerError::invalid(field, "contains control characters"));
    }
    if s.expose_secret().len() > MAX_SECRET_BYTES {
        return Err(BrokerError::invalid(field, TOO_LONG));
    }
    Ok(s)
}

/// The longest token or password taken (as a header, with its `Bearer ` or base64 `Basic `
/// form, it must stay under [`crate::backends::MAX_HEADER_VALUE`], else it would be refused at
/// every use).
const MAX_SECRET_BYTES: usize = 8 * 1024;
const TOO_LONG: &str = "is longer than 8 KiB, which no vendor issues";

fn plain(v: String, field: &'static str) -> Result<String, BrokerError> {
    optional(v, field)?.ok_or_else(|| BrokerError::invalid(field, "is required"))
}

/// A user name or client id, when given: trimmed, free of control characters, at most 1 KiB
/// (it goes into a Basic header, a token request or a JWT next to the secret).
fn optional(v: String, field: &'static str) -> Result<Option<String>, BrokerError> {
    let t = v.trim();
    if t.chars().any(|c| c.is_control()) {
        return Err(BrokerError::invalid(field, "contains control characters"));
    }
    if t.len() > MAX_NAME_BYTES {
        return Err(BrokerError::invalid(field, "is longer than 1 KiB"));
    }
    Ok((!t.is_empty()).then(|| t.to_owned()))
}

const MAX_NAME_BYTES: usize = 1024;

/// An optional expiry the admin copied from the vendor's UI.
fn expiry(ts: Option<Timestamp>, field: &'static str) -> Result<Option<u64>, BrokerError> {
    match ts {
        Some(ts) if ts.seconds > 0 => Ok(Some(ts.seconds as u64)),
        Some(_) => Err(BrokerError::invalid(field, "must be after 1970")),
        None => Ok(None),
    }
}

/// An account's e-mail address as it goes into `Basic base64(email:token)`.
fn email(v: String, field: &'static str) -> Result<String, BrokerError> {
    let e = plain(v, field)?;
    let valid = e.len() <= 254
        && !e.contains([':', ' '])
        && e.split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'));
    if !valid {
        return Err(BrokerError::invalid(
            field,
            "must be the account's e-mail address (name@example.com)",
        ));
    }
    Ok(e)
}

/// The most scopes one credential asks for (Atlassian allows 50 per token).
const MAX_SCOPES: usize = 50;

/// OAuth scopes: each one word of printable ASCII, at most [`MAX_SCOPES`] of them (they are
/// sent on every token request; a space would split one scope into two).
fn scopes(v: Vec<String>, field: &'static str) -> Result<Vec<String>, BrokerError> {
    if v.len() > MAX_SCOPES {
        return Err(BrokerError::invalid(
            field,
            format!("has {} scopes; at most {MAX_SCOPES}", v.len()),
        ));
    }
    v.into_iter()
        .map(|s| {
            let t = s.trim();
            let ok = !t.is_empty() && t.len() <= 256 && t.chars().all(|c| c.is_ascii_graphic());
            if ok {
                Ok(t.to_owned())
            } else {
                Err(BrokerError::invalid(
                    field,
                    "each scope is one word of printable ASCII (at most 256 characters)",
                ))
            }
        })
        .collect()
}

/// Entra's tenant: a GUID or a verified domain, never `common`/`organizations`/`consumers`
/// (they reject the client-credentials grant).
fn tenant(v: String, field: &'static str) -> Result<String, BrokerError> {
    let t = plain(v, field)?;
    let shaped = t.len() <= 100
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && t.split('.').all(|label| !label.is_empty());
    if !shaped {
        return Err(BrokerError::invalid(
            field,
            "must be the directory (tenant) id or a verified domain of the tenant",
        ));
    }
    if ["common", "organizations", "consumers"].contains(&t.to_ascii_lowercase().as_str()) {
        return Err(BrokerError::invalid(
            field,
            "must name the tenant (its id or verified domain); common, organizations and \
             consumers do not issue client-credentials tokens",
        ));
    }
    Ok(t)
}

/// An origin (`scheme://host[:port]`, no path) for an authority or login URL.
fn origin(v: &str, default: &str, field: &'static str) -> Result<String, BrokerError> {
    let raw = if v.trim().is_empty() {
        default
    } else {
        v.trim()
    };
    let url = url::Url::parse(raw)
        .map_err(|_| BrokerError::invalid(field, "must be a URL like https://host"))?;
    let plain_origin = matches!(url.scheme(), "https" | "http")
        && url.host_str().is_some()
        && url.username().is_empty()
        && url.password().is_none()
        && url.query().is_none()
        && url.fragment().is_none()
        && url.path().trim_matches('/').is_empty();
    if !plain_origin {
        return Err(BrokerError::invalid(
            field,
            "must be an origin like https://host (no path, query or credentials)",
        ));
    }
    Ok(url.origin().ascii_serialization())
}

fn private_key(v: String, field: &'static str) -> Result<SecretString, BrokerError> {
    let key = SecretString::new(v);
    crate::backends::jwt::Signer::from_pem(&key).map_err(|why| BrokerError::invalid(field, why))?;
    Ok(key)
}

fn entra(e: pb::EntraClientCredentials) -> Result<Credential, BrokerError> {
    use crate::model::EntraAuth;
    const F: &str = "credential.entra_client_credentials";
    let given = [
        !e.client_secret.is_empty(),
        !e.client_certificate_pem.is_empty() || !e.client_private_key_pem.is_empty(),
        !e.federated_token_file.trim().is_empty(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(BrokerError::invalid(
            F,
            "needs exactly one of client_secret, the client_certificate_pem + \
             client_private_key_pem pair, or federated_token_file",
        ));
    }
    let auth = if given[0] {
        EntraAuth::Secret {
            client_secret: token(
                e.client_secret,
                "credential.entra_client_credentials.client_secret",
            )?,
        }
    } else if given[1] {
        crate::backends::jwt::thumbprint_s256(&e.client_certificate_pem).map_err(|why| {
            BrokerError::invalid(
                "credential.entra_client_credentials.client_certificate_pem",
                why,
            )
        })?;
        EntraAuth::Certificate {
            certificate_pem: e.client_certificate_pem,
            private_key_pem: private_key(
                e.client_private_key_pem,
                "credential.entra_client_credentials.client_private_key_pem",
            )?,
        }
    } else {
        let path = e.federated_token_file.trim().to_owned();
        if !std::path::Path::new(&path).is_absolute() || path.chars().any(|c| c.is_control()) {
            return Err(BrokerError::invalid(
                "credential.entra_client_credentials.federated_token_file",
                "must be an absolute path on the broker's host",
            ));
        }
        EntraAuth::FederatedTokenFile { path }
    };
    Ok(Credential::EntraClientCredentials {
        tenant_id: tenant(e.tenant_id, "credential.entra_client_credentials.tenant_id")?,
        client_id: plain(e.client_id, "credential.entra_client_credentials.client_id")?,
        auth,
        authority_url: origin(
            &e.authority_url,
            crate::backends::entra::DEFAULT_AUTHORITY,
            "credential.entra_client_credentials.authority_url",
        )?,
        secret_expires_at: expiry(
            e.secret_expires_at,
            "credential.entra_client_credentials.secret_expires_at",
        )?,
    })
}

fn salesforce_jwt(j: pb::SalesforceJwtBearer) -> Result<Credential, BrokerError> {
    Ok(Credential::SalesforceJwtBearer {
        client_id: plain(j.client_id, "credential.salesforce_jwt_bearer.client_id")?,
        username: plain(j.username, "credential.salesforce_jwt_bearer.username")?,
        private_key_pem: private_key(
            j.private_key_pem,
            "credential.salesforce_jwt_bearer.private_key_pem",
        )?,
        login_url: origin(
            &j.login_url,
            "https://login.salesforce.com",
            "credential.salesforce_jwt_bearer.login_url",
        )?,
    })
}

/// Proto credential → domain credential.
pub fn credential(
    c: Option<pb::Credential>,
    field: &'static str,
) -> Result<Credential, BrokerError> {
    use pb::credential::Credential as C;
    let inner = c
        .and_then(|c| c.credential)
        .ok_or_else(|| BrokerError::invalid(field, "is required (set one credential type)"))?;
    Ok(match inner {
        C::PersonalAccessToken(p) => Credential::PersonalAccessToken {
            token: token(p.token, "credential.personal_access_token.token")?,
            username: optional(p.username, "credential.personal_access_token.username")?,
            expires_at: expiry(p.expires_at, "credential.personal_access_token.expires_at")?,
        },
        C::ApiKey(k) => Credential::ApiKey {
            key: token(k.key, "credential.api_key.key")?,
            expires_at: expiry(k.expires_at, "credential.api_key.expires_at")?,
        },
        C::EmailApiToken(t) => Credential::EmailApiToken {
            email: email(t.email, "credential.email_api_token.email")?,
            token: token(t.token, "credential.email_api_token.token")?,
            expires_at: expiry(t.expires_at, "credential.email_api_token.expires_at")?,
            scoped: t.scoped,
            cloud_id: None,
        },
        C::Basic(b) => Credential::Basic {
            username: plain(b.username, "credential.basic.username")?,
            password: password(b.password, "credential.basic.password")?,
        },
        C::OauthClientCredentials(o) => Credential::OAuthClientCredentials {
            client_id: plain(o.client_id, "credential.oauth_client_credentials.client_id")?,
            client_secret: token(
                o.client_secret,
                "credential.oauth_client_credentials.client_secret",
            )?,
            scopes: scopes(o.scopes, "credential.oauth_client_credentials.scopes")?,
            cloud_id: None,
            secret_expires_at: expiry(
                o.secret_expires_at,
                "credential.oauth_client_credentials.secret_expires_at",
            )?,
        },
        C::EntraClientCredentials(e) => entra(e)?,
        C::SalesforceJwtBearer(j) => salesforce_jwt(j)?,
        C::OauthRefreshToken(o) => Credential::OAuthRefreshToken {
            client_id: plain(o.client_id, "credential.oauth_refresh_token.client_id")?,
            client_secret: token(
                o.client_secret,
                "credential.oauth_refresh_token.client_secret",
            )?,
            refresh_token: token(
                o.refresh_token,
                "credential.oauth_refresh_token.refresh_token",
            )?,
            username: optional(o.username, "credential.oauth_refresh_token.username")?,
            refresh_expires_at: None,
        },
        C::OauthPasswordGrant(o) => Credential::OAuthPasswordGrant {
            client_id: plain(o.client_id, "credential.oauth_password_grant.client_id")?,
            client_secret: token(
                o.client_secret,
                "credential.oauth_password_grant.client_secret",
            )?,
            username: plain(o.username, "credential.oauth_password_grant.username")?,
            password: password(o.password, "credential.oauth_password_grant.password")?,
        },
        C::SalesforceLogin(s) => Credential::SalesforceLogin {
            username: plain(s.username, "credential.salesforce_login.username")?,
            password: password(s.password, "credential.salesforce_login.password")?,
            security_token: token(
                s.security_token,
                "credential.salesforce_login.security_token",
            )?,
            client_id: optional(s.client_id, "credential.salesforce_login.client_id")?,
            client_secret: if s.client_secret.is_empty() {
                None
            } else {
                Some(token(
                    s.client_secret,
                    "credential.salesforce_login.client_secret",
                )?)
            },
        },
        C::OauthAuthorizationCode(o) => Credential::OAuthAuthorizationCode {
            client_id: plain(o.client_id, "credential.oauth_authorization_code.client_id")?,
            client_secret: token(
                o.client_secret,
                "credential.oauth_authorization_code.client_secret",
            )?,
            scopes: scopes(o.scopes, "credential.oauth_authorization_code.scopes")?,
            grant: None,
        },
    })
}

/// Seconds since the epoch → proto timestamp.
pub fn ts(secs: u64) -> Timestamp {
    Timestamp {
        seconds: i64::try_from(secs).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

/// `SystemTime` → proto timestamp.
pub fn ts_from(t: SystemTime) -> Timestamp {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Domain check → proto check.
pub fn check(c: &AuthCheck) -> pb::AuthCheck {
    use pb::AuthFailure as P;
    pb::AuthCheck {
        ok: c.ok,
        failure: match c.failure {
            None => P::Unspecified,
            Some(AuthFailure::InvalidCredentials) => P::InvalidCredentials,
            Some(AuthFailure::InsufficientPermissions) => P::InsufficientPermissions,
            Some(AuthFailure::ExpiredOrRevoked) => P::ExpiredOrRevoked,
            Some(AuthFailure::ReauthorizationRequired) => P::ReauthorizationRequired,
            Some(AuthFailure::Unreachable) => P::Unreachable,
            Some(AuthFailure::RateLimited) => P::RateLimited,
            Some(AuthFailure::Misconfigured) => P::Misconfigured,
            Some(AuthFailure::UpstreamError) => P::UpstreamError,
        } as i32,
        message: c.message.clone(),
        // Cleaned on the way out too: a record stored or restored before the rule existed.
        identity: c.identity.clone().map(|i| {
            let i = i.shown();
            pb::Identity {
                id: i.id,
                display_name: i.display_name,
                email: i.email,
            }
        }),
        missing_permissions: c.missing_permissions.clone(),
        checked_at: Some(ts(c.checked_at)),
    }
}

/// Domain record → proto system (metadata only). Health is derived now (a horizon's days left
/// change without a write); since when comes from the last recorded health.
pub fn system(r: &SystemRecord) -> pb::System {
    let now = crate::model::unix_now();
    let (health, reason) = crate::broker::health::derive(r, now);
    let since = r
        .health
        .as_ref()
        .filter(|m| m.health == health)
        .map(|m| m.since)
        .unwrap_or(now);
    pb::System {
        system_id: r.system_id.clone(),
        display_name: r.display_name.clone(),
        description: r.description.clone(),
        kind: kind_to_proto(r.kind) as i32,
        base_url: r.base_url.clone(),
        credential_type: cred_type_to_proto(r.credential_type) as i32,
        credential_version: r.credential_version,
        state: match r.state {
            SystemState::Active => pb::SystemState::Active,
            SystemState::AuthorizationPending => pb::SystemState::AuthorizationPending,
            SystemState::ReauthorizationRequired => pb::SystemState::ReauthorizationRequired,
        } as i32,
        created_at: Some(ts(r.created_at)),
        updated_at: Some(ts(r.updated_at)),
        last_check: r.last_check.as_ref().map(check),
        credential_expires_at: r.credential_expires_at.map(ts),
        state_message: r
            .state_message
            .clone()
            .or_else(|| crate::model::legacy_note(r.kind, r.credential_type).map(str::to_owned))
            .unwrap_or_default(),
        delivery: match r.delivery {
            crate::model::Delivery::Header => pb::Delivery::Header,
            crate::model::Delivery::Proxy => pb::Delivery::Proxy,
        } as i32,
        proxy_unauthorized_count: r.proxy_unauthorized_count,
        last_proxy_unauthorized_at: r.last_proxy_unauthorized_at.map(ts),
        health: health_to_proto(health) as i32,
        health_reason: reason,
        health_since: Some(ts(since)),
        quota: None,
    }
}

/// [`system`] with what the proxy's quota book knows: `System.quota`, and while the vendor
/// blocks the system, a degraded health saying so (unless it is failing anyway).
pub fn system_with_quota(
    r: &SystemRecord,
    view: Option<crate::broker::quota::QuotaView>,
) -> pb::System {
    let mut s = system(r);
    let Some(v) = view else {
        return s;
    };
    s.quota = Some(pb::UpstreamQuota {
        remaining: v.remaining.unwrap_or(-1),
        limit: v.limit.unwrap_or(-1),
        reset_at: v.reset_at.map(ts),
        blocked_until: v.blocked_until_ms.map(|ms| Timestamp {
            seconds: (ms / 1000) as i64,
            nanos: ((ms % 1000) * 1_000_000) as i32,
        }),
        in_flight: v.in_flight,
    });
    if let Some(until) = v.blocked_until_ms {
        if s.health != pb::SystemHealth::Failing as i32 {
            s.health = pb::SystemHealth::Degraded as i32;
            s.health_reason = crate::broker::quota::blocked_reason(until);
        }
    }
    s
}

/// Domain health → proto health.
pub fn health_to_proto(h: SystemHealth) -> pb::SystemHealth {
    match h {
        SystemHealth::Healthy => pb::SystemHealth::Healthy,
        SystemHealth::Expiring => pb::SystemHealth::Expiring,
        SystemHealth::Degraded => pb::SystemHealth::Degraded,
        SystemHealth::Failing => pb::SystemHealth::Failing,
    }
}

/// Domain event → proto event.
/// Domain event → proto event. The system's health is the one recorded with the event (not
/// re-derived when sent). Workers get the system without what only admins read (its check,
/// messages, description and base URL), as `GetSystem` is admin-only.
pub fn event(e: &crate::broker::events::Event, cursor: String, admin: bool) -> pb::SystemEvent {
    let mut s = system(&e.system);
    if let Some(mark) = &e.system.health {
        s.health = health_to_proto(mark.health) as i32;
        s.health_reason = mark.reason.clone();
        s.health_since = Some(ts(mark.since));
    }
    if !admin {
        s.last_check = None;
        s.state_message.clear();
        s.description.clear();
        s.base_url.clear();
        s.health_reason.clear();
    }
    pb::SystemEvent {
        cursor,
        r#type: e.kind.as_str().to_owned(),
        system: Some(s),
        at: Some(ts(e.at)),
        detail: if admin {
            e.detail.clone()
        } else {
            String::new()
        },
    }
}

/// Proto delivery → domain delivery (`None`: the deployment's default).
pub fn delivery(value: i32) -> Result<Option<crate::model::Delivery>, BrokerError> {
    match pb::Delivery::try_from(value) {
        Ok(pb::Delivery::Unspecified) => Ok(None),
        Ok(pb::Delivery::Header) => Ok(Some(crate::model::Delivery::Header)),
        Ok(pb::Delivery::Proxy) => Ok(Some(crate::model::Delivery::Proxy)),
        Err(_) => Err(BrokerError::invalid(
            "delivery",
            format!("unknown delivery {value}"),
        )),
    }
}

/// Proto role → domain role.
pub fn role(value: i32) -> Result<Role, BrokerError> {
    match pb::CallerRole::try_from(value) {
        Ok(pb::CallerRole::Admin) => Ok(Role::Admin),
        Ok(pb::CallerRole::Worker) => Ok(Role::Worker),
        _ => Err(BrokerError::invalid(
            "role",
            "must be CALLER_ROLE_ADMIN or CALLER_ROLE_WORKER",
        )),
    }
}

/// Domain caller → proto caller.
pub fn caller(c: &CallerRecord) -> pb::Caller {
    pb::Caller {
        name: c.name.clone(),
        role: match c.role {
            Role::Admin => pb::CallerRole::Admin,
            Role::Worker => pb::CallerRole::Worker,
        } as i32,
        created_at: Some(ts(c.created_at)),
        revoked: c.revoked,
        system_patterns: c.system_patterns.clone(),
        kinds: c.kinds.iter().map(|k| kind_to_proto(*k) as i32).collect(),
        expires_at: c.expires_at.map(ts),
    }
}

/// A `GetAccessTokenResponse` to send: a cached token's (encoded once per token, then handed
/// out as those bytes) or one built for this call (a lease).
pub enum TokenAnswer {
    /// Cached headers.
    Issued(Arc<IssuedToken>),
    /// An answer of its own (boxed: a lease's answer is the rarer one, and inline it would
    /// size every call's future, see `token_route`'s test).
    Message(Box<pb::GetAccessTokenResponse>),
}

impl TokenAnswer {
    /// As a message (for callers in process).
    pub fn into_message(self) -> pb::GetAccessTokenResponse {
        match self {
            Self::Issued(t) => token_response(&t),
            Self::Message(m) => *m,
        }
    }

    /// Appends the encoded message to `buf`.
    pub fn encode(&self, buf: &mut tonic::codec::EncodeBuf<'_>) {
        match self {
            Self::Issued(t) => prost::bytes::BufMut::put_slice(buf, t.answer(encoded_answer)),
            Self::Message(m) => {
                // Room for the whole message first: grown while it is written, the buffer would
                // leave the part written so far (a lease's header) behind in a freed chunk.
                // (`put_slice` above reserves the whole answer at once.)
                buf.reserve(m.encoded_len());
                m.encode_raw(buf)
            }
        }
    }
}

/// The answer handing `t` out.
fn token_response(t: &IssuedToken) -> pb::GetAccessTokenResponse {
    pb::GetAccessTokenResponse {
        headers: t
            .headers
            .iter()
            .map(|h| pb::HttpHeader {
                name: h.name.to_owned(),
                value: h.value.expose_secret().to_owned(),
            })
            .collect(),
        expires_at: Some(ts_from(t.expires_at)),
        api_base_url: t.api_base_url.clone(),
        credential_version: t.credential_version,
        token_id: t.token_id.clone(),
    }
}

/// [`token_response`], encoded; the message's copies of the header values are zeroized.
fn encoded_answer(t: &IssuedToken) -> SecretBytes {
    let mut message = token_response(t);
    let bytes = SecretBytes::new(message.encode_to_vec());
    for h in &mut message.headers {
        h.value.zeroize();
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An identity stored before the rule (or restored from an old backup) is cleaned on its
    /// way out, so no reader (the CLI's terminal, the console, a watch) gets it raw.
    #[test]
    fn a_stored_raw_identity_is_cleaned_on_the_way_out() {
        let mut c = AuthCheck::failed(crate::model::AuthFailure::UpstreamError, "x");
        c.identity = Some(crate::model::Identity {
            id: "id".into(),
            display_name: format!("Eve\u{1b}]0;owned\u{7}{}", "e".repeat(500)),
            email: "eve@example.com\u{202E}".into(),
        });
        let out = check(&c).identity.unwrap_or_default();
        assert!(
            out.display_name.starts_with("Eve]0;owned"),
            "{}",
            out.display_name
        );
        assert_eq!(out.display_name.chars().count(), 200);
        assert_eq!(out.email, "eve@example.com");
    }
}
