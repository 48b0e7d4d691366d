//! ServiceNow. Basic auth: `Authorization: Basic base64(user:password)` for a proxy user.
//!
//! `CheckAuthentication` (`docs/systems/servicenow.md`):
//! - identity from `GET /api/now/table/sys_user?sysparm_query=user_name=…`; ACLs can filter the
//!   row away and answer 200 with an empty `result`, which is reported as missing read access,
//!   never as success;
//! - a 401 can mean a wrong password, a missing `snc_platform_rest_api_access` role, a REST API
//!   access policy, or the Basic Auth Restriction of newer releases; the message says so;
//! - roles (`snc_platform_rest_api_access`, `itil`, the import roles) are read from
//!   `sys_user_has_role`, and read access to `sys_journal_field` (comments) is probed.

use async_trait::async_trait;
use serde::Deserialize;

use super::classify::{common, not_the_api, note_unverified, unreachable, with_missing};
use super::http::{parse_base_url, url_string};
use super::oauth::{self, OAuthHttp};
use super::{basic, Backend, BackendContext, BackendError, EgressPolicy, Header, Issued, Target};
use crate::model::{unix_now, AuthCheck, AuthFailure, Credential, Identity, SystemKind};
use crate::secret::SecretString;
use oauth2::{RefreshToken, ResourceOwnerPassword, ResourceOwnerUsername};
use std::time::Duration;

const VENDOR: &str = "ServiceNow";
const URL_HINT: &str = "enter the instance URL, e.g. https://acme.service-now.com";
/// Roles a sync's proxy user needs (the incumbent sync tool's setup guide).
pub const REQUIRED_ROLES: &[&str] = &[
    "snc_platform_rest_api_access",
    "itil",
    "import_set_loader",
    "import_transformer",
    "import_scheduler",
];
/// Named in `missing_permissions` when ACLs hide `sys_user`.
pub const SYS_USER_READ: &str = "read access to sys_user";
/// Named in `missing_permissions` when comments cannot be read.
pub const JOURNAL_READ: &str = "read ACL on sys_journal_field (comments)";
/// Named when basic auth is restricted for the account.
pub const BASIC_AUTH_EXCEPTION: &str =
    "snc_basic_auth_api_access role (or Web Service Access Only)";

/// The ServiceNow backend.
pub struct ServiceNowBackend {
    ctx: BackendContext,
}

impl ServiceNowBackend {
    /// A backend using the shared plumbing.
    pub fn new(ctx: BackendContext) -> Self {
        Self { ctx }
    }
}

#[async_trait]
impl Backend for ServiceNowBackend {
    fn kind(&self) -> SystemKind {
        SystemKind::ServiceNow
    }

    fn canonical_base_url(&self, raw: &str, egress: &EgressPolicy) -> Result<String, String> {
        let mut base = parse_base_url(raw, egress)?;
        if base.is_stand_in {
            return Ok(url_string(&base.url));
        }
        let host = base.url.host_str().unwrap_or_default();
        if host == "service-now.com" || host == "www.service-now.com" {
            return Err(format!(
                "that is ServiceNow's own site, not an instance; {URL_HINT}"
            ));
        }
        // The REST API lives at the instance root; a pasted UI link is reduced to it.
        base.url.set_path("");
        Ok(url_string(&base.url))
    }

    async fn verify(&self, target: &Target<'_>, issued: &Issued) -> AuthCheck {
        let auth = issued.headers.as_slice();
        let base = target.base_url;
        // With OAuth the user name is known only when it was given (or came with a password
        // grant); otherwise ask for the calling user.
        let query = match username(target.credential) {
            // `^` joins conditions in an encoded query: such a name would add its own.
            Some(u) if u.contains('^') => {
                return AuthCheck::failed(
                    AuthFailure::Misconfigured,
                    "a ServiceNow user name with '^' in it cannot be looked up (the character \
                     joins conditions in a query): check the user name",
                )
            }
            Some(u) => format!("user_name={u}"),
            None => "sys_id=javascript:gs.getUserID()".to_owned(),
        };
        let url = table_url(
            base,
            "sys_user",
            &[
                ("sysparm_query", &query),
                ("sysparm_limit", "1"),
                ("sysparm_fields", "sys_id,user_name,name,email,active"),
            ],
        );
        let resp = match self.ctx.http.get(&url, auth).await {
            Ok(r) => r,
            Err(e) => return unreachable(VENDOR, &e),
        };
        let user =
            match resp.status {
                200 => match serde_json::from_slice::<TableResult<UserRow>>(&resp.body) {
                    Ok(t) => match t.result.into_iter().next() {
                        Some(u) => u,
                        None => {
                            let mut c = AuthCheck::failed(
                            AuthFailure::InsufficientPermissions,
                            "authenticated, but ACLs hide the account's own sys_user record (200 \
                             with an empty result): grant the proxy user read access to sys_user \
                             (the itil role does), then check again",
                        );
                            c.missing_permissions = vec![SYS_USER_READ.to_owned()];
                            return c;
                        }
                    },
                    Err(_) => return not_the_api(
                        VENDOR,
                        "the instance may be hibernating, or the URL is not a ServiceNow instance",
                    ),
                },
                401 => return unauthorized(&resp.body, target.credential),
                403 => {
                    let mut c = AuthCheck::failed(
                        AuthFailure::InsufficientPermissions,
                        "ServiceNow refused to read sys_user (403 ACL): grant the proxy user read \
                     access to sys_user",
                    );
                    c.missing_permissions = vec![SYS_USER_READ.to_owned()];
                    return c;
                }
                _ => return common(VENDOR, &resp, URL_HINT),
            };
        // The account found must be the one named: a name the instance reads as more than a
        // name (a `javascript:` value is run) would otherwise show another account's identity
        // and roles.
        if let Some(named) = username(target.credential) {
            if !user
                .user_name
                .as_deref()
                .is_some_and(|found| found.eq_ignore_ascii_case(named))
            {
                return AuthCheck::failed(
                    AuthFailure::Misconfigured,
                    "the ServiceNow account found is not the user name given: check the user \
                     name",
                );
            }
        }
        if user.active.as_deref() == Some("false") {
            return AuthCheck::failed(
                AuthFailure::ExpiredOrRevoked,
                "the ServiceNow account is inactive; reactivate it or use another account",
            );
        }
        let identity = Identity {
            id: user.sys_id.clone(),
            display_name: user.name.unwrap_or_default(),
            email: user.email.unwrap_or_default(),
        };
        let check = AuthCheck::ok(identity, authenticates(target.credential));
        let (missing, unverified) = self.probe(base, auth, &user.sys_id).await;
        let mut check = with_missing(
            check,
            missing,
            "Grant the roles and ACLs in ServiceNow (User Administration → Users → Roles), then \
             check again.",
        );
        note_unverified(&mut check, &unverified);
        check
    }

    async fn issue(&self, target: &Target<'_>) -> Result<Issued, BackendError> {
        let base = target.base_url;
        match target.credential {
            Credential::Basic { username, password } => Ok(Issued::static_header(
                basic(username, password.expose_secret()),
                base,
            )),
            Credential::ApiKey { key, .. } => Ok(Issued::static_header(api_key_header(key), base)),
            Credential::OAuthPasswordGrant {
                client_id,
                client_secret,
                username,
                password,
            } => {
                let client = oauth::client(client_id, Some(client_secret), &token_url(base))?;
                let http = OAuthHttp::form(&self.ctx.http);
                let resp = client
                    .exchange_password(
                        &ResourceOwnerUsername::new(username.clone()),
                        &ResourceOwnerPassword::new(password.expose_secret().to_owned()),
                    )
                    .request_async(&http)
                    .await
                    .map_err(|e| classify_token_error(&e, &http))?;
                self.password_exchanged(base, client_id, client_secret, username, &resp)
            }
            Credential::OAuthRefreshToken { .. } => self.refresh(target).await,
            Credential::OAuthClientCredentials { .. } => self.client_credentials(target).await,
            _ => Err(BackendError::Unsupported(
                "ServiceNow accepts basic, oauth_refresh_token, oauth_password_grant, \
                 oauth_client_credentials or api_key"
                    .to_owned(),
            )),
        }
    }
}

/// `x-sn-apikey: {key}` (an inbound REST API key).
fn api_key_header(key: &SecretString) -> Header {
    Header {
        name: super::SN_API_KEY_HEADER,
        value: key.clone(),
    }
}

fn token_url(base: &str) -> String {
    format!("{base}/oauth_token.do")
}

impl ServiceNowBackend {
    /// After a password grant: the password is dropped, only the refresh token is kept.
    fn password_exchanged(
        &self,
        base: &str,
        client_id: &str,
        client_secret: &SecretString,
        username: &str,
        resp: &oauth::VendorTokenResponse,
    ) -> Result<Issued, BackendError> {
        let lifespan = self.ctx.oauth.servicenow_refresh_token_lifespan;
        let refresh = oauth::refresh_token(resp).ok_or_else(|| BackendError::Transient {
            failure: AuthFailure::UpstreamError,
            message: "ServiceNow's password grant returned no refresh token".to_owned(),
            retry_after: None,
        })?;
        let mut issued = oauth::issued_from(resp, DEFAULT_ACCESS_LIFETIME, base.to_owned());
        issued.updated_credential = Some(Credential::OAuthRefreshToken {
            client_id: client_id.to_owned(),
            client_secret: client_secret.clone(),
            refresh_token: refresh,
            username: Some(username.to_owned()),
            refresh_expires_at: Some(unix_now() + lifespan.as_secs()),
        });
        Ok(issued)
    }

    async fn refresh(&self, target: &Target<'_>) -> Result<Issued, BackendError> {
        let Credential::OAuthRefreshToken {
            client_id,
            client_secret,
            refresh_token,
            username,
            refresh_expires_at,
        } = target.credential
        else {
            return Err(BackendError::Unsupported("not a refresh token".to_owned()));
        };
        let lifespan = self.ctx.oauth.servicenow_refresh_token_lifespan;
        if refresh_expires_at.is_some_and(|at| at <= unix_now()) {
            return Err(BackendError::Rejected {
                failure: AuthFailure::ReauthorizationRequired,
                message: format!(
                    "the ServiceNow refresh token has expired (its lifespan is {} days); {REAUTH_HINT}",
                    lifespan.as_secs() / 86_400
                ),
            });
        }
        let client = oauth::client(client_id, Some(client_secret), &token_url(target.base_url))?;
        let http = OAuthHttp::form(&self.ctx.http);
        let resp = client
            .exchange_refresh_token(&RefreshToken::new(refresh_token.expose_secret().to_owned()))
            .request_async(&http)
            .await
            .map_err(|e| classify_token_error(&e, &http))?;
        let mut issued =
            oauth::issued_from(&resp, DEFAULT_ACCESS_LIFETIME, target.base_url.to_owned());
        // ServiceNow returns the same refresh token; persist only a real change (or the first
        // time its expiry becomes known).
        let returned = oauth::refresh_token(&resp);
        let rotated = returned.as_ref().is_some_and(|r| r != refresh_token);
        if rotated || refresh_expires_at.is_none() {
            issued.updated_credential = Some(Credential::OAuthRefreshToken {
                client_id: client_id.clone(),
                client_secret: client_secret.clone(),
                refresh_token: returned
                    .filter(|_| rotated)
                    .unwrap_or_else(|| refresh_token.clone()),
                username: username.clone(),
                // A new refresh token lives its own lifespan from now.
                refresh_expires_at: refresh_expires_at
                    .filter(|_| !rotated)
                    .or(Some(unix_now() + lifespan.as_secs())),
            });
        }
        Ok(issued)
    }

    /// The inbound client-credentials grant (Washington DC and later): no refresh token, a new
    /// access token is minted ahead of expiry.
    async fn client_credentials(&self, target: &Target<'_>) -> Result<Issued, BackendError> {
        let cc = oauth::ClientCredentials::of(target.credential)
            .ok_or_else(|| BackendError::Unsupported("not client credentials".to_owned()))?;
        let http = OAuthHttp::form(&self.ctx.http);
        let resp = cc
            .mint(&http, &token_url(target.base_url), &[], classify_cc_error)
            .await?;
        Ok(oauth::issued_from(
            &resp,
            DEFAULT_ACCESS_LIFETIME,
            target.base_url.to_owned(),
        ))
    }
}

/// Access-token lifetime when ServiceNow leaves out `expires_in` (its documented default).
const DEFAULT_ACCESS_LIFETIME: Duration = Duration::from_secs(1800);
const REAUTH_HINT: &str = "run a new password grant with \
    `credbrokerctl system rotate SYSTEM_ID --credential-type oauth-password-grant --client-id ID \
    --username USER` (the password is exchanged, never stored)";

fn classify_token_error(e: &oauth::TokenRequestError, http: &OAuthHttp) -> BackendError {
    oauth::classify(
        VENDOR,
        e,
        http.last(),
        REAUTH_HINT,
        "check the client id and secret of the Application Registry entry and the user's \
         password (the user must be active and not locked out)",
    )
}

/// The system property that switches the inbound client-credentials grant on.
pub const CC_PROPERTY: &str = "glide.oauth.inbound.client.credential.grant_type.enabled";
/// The OAuth entity field naming the user client-credentials tokens act as.
pub const CC_APP_USER_FIELD: &str = "OAuth Application User";

/// The client-credentials grant's own refusals, before the shared classification: ServiceNow
/// answers 401 `server_error`/`access_denied` while the grant is switched off (and, it seems,
/// for a wrong secret), and `unauthorized_client` when no application user is set.
fn classify_cc_error(e: &oauth::TokenRequestError, http: &OAuthHttp) -> BackendError {
    if let oauth2::RequestTokenError::ServerResponse(r) = e {
        let code = r.error().as_ref().to_owned();
        let desc = r
            .error_description()
            .map(|d| d.to_ascii_lowercase())
            .unwrap_or_default();
        let status = http.last().map(|m| m.status).unwrap_or(0);
        if code == "server_error" && desc.contains("access_denied") && status < 500 {
            return BackendError::Rejected {
                failure: AuthFailure::Misconfigured,
                message: format!(
                    "ServiceNow refused the client-credentials grant (access_denied). The \
                     instance must allow it: create the system property {CC_PROPERTY} = true \
                     (Washington DC or later), set the {CC_APP_USER_FIELD} on the OAuth \
                     entity (System OAuth → Application Registry), and check that the client id \
                     and secret are that entity's"
                ),
            };
        }
        if code == "unauthorized_client" || desc.contains("integration user") {
            // The instance's own word, cut and cleaned like any vendor text.
            let code = crate::backends::classify::shown(&code);
            return BackendError::Rejected {
                failure: AuthFailure::Misconfigured,
                message: format!(
                    "ServiceNow has no user for the client-credentials tokens ({code}): add the \
                     {CC_APP_USER_FIELD} field to the OAuth entity form (System OAuth → \
                     Application Registry) and pick the user the sync runs as"
                ),
            };
        }
    }
    oauth::classify(
        VENDOR,
        e,
        http.last(),
        &format!("check the OAuth entity's client id and secret and the {CC_APP_USER_FIELD}"),
        "check the client id and secret of the Application Registry entry",
    )
}

fn username(credential: &Credential) -> Option<&str> {
    match credential {
        Credential::Basic { username, .. } | Credential::OAuthPasswordGrant { username, .. } => {
            Some(username)
        }
        Credential::OAuthRefreshToken { username, .. } => username.as_deref(),
        _ => None,
    }
}

impl ServiceNowBackend {
    async fn probe(&self, base: &str, auth: &[Header], sys_id: &str) -> (Vec<String>, Vec<String>) {
        let mut missing = Vec::new();
        let mut unverified = Vec::new();
        let roles_url = table_url(
            base,
            "sys_user_has_role",
            &[
                ("sysparm_query", &format!("user={sys_id}^state=active")),
                ("sysparm_fields", "role.name"),
                ("sysparm_limit", "500"),
            ],
        );
        match self.ctx.http.get(&roles_url, auth).await {
            Ok(r) if r.status == 200 => {
                match serde_json::from_slice::<TableResult<RoleRow>>(&r.body) {
                    Ok(t) if !t.result.is_empty() => {
                        let have: Vec<String> =
                            t.result.into_iter().filter_map(|r| r.role_name).collect();
                        if !have.iter().any(|r| r == "admin") {
                            for role in REQUIRED_ROLES {
                                if !have.iter().any(|h| h == role) {
                                    missing.push(format!("{role} role"));
                                }
                            }
                        }
                    }
                    _ => unverified
                        .push("roles (sys_user_has_role is hidden from this account)".to_owned()),
                }
            }
            Ok(r) => unverified.push(format!(
                "roles (sys_user_has_role answered HTTP {})",
                r.status
            )),
            Err(e) => unverified.push(format!("roles ({e})")),
        }
        let journal_url = table_url(
            base,
            "sys_journal_field",
            &[("sysparm_limit", "1"), ("sysparm_fields", "sys_id")],
        );
        match self.ctx.http.get(&journal_url, auth).await {
            Ok(r) if r.status == 200 => {}
            Ok(r) if matches!(r.status, 401 | 403) => missing.push(JOURNAL_READ.to_owned()),
            Ok(r) => unverified.push(format!("sys_journal_field read (HTTP {})", r.status)),
            Err(e) => unverified.push(format!("sys_journal_field read ({e})")),
        }
        unverified
            .push("create/write ACLs on sys_journal_field (they would need a write)".to_owned());
        (missing, unverified)
    }
}

fn table_url(base: &str, table: &str, query: &[(&str, &str)]) -> String {
    let mut url = format!("{base}/api/now/table/{table}");
    let encoded: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(query)
        .finish();
    if !encoded.is_empty() {
        url.push('?');
        url.push_str(&encoded);
    }
    url
}

/// What a passing identity lookup proves, in the credential's words.
fn authenticates(credential: &Credential) -> &'static str {
    match credential {
        Credential::Basic { .. } => "the user name and password authenticate",
        Credential::ApiKey { .. } => "the API key authenticates (x-sn-apikey)",
        Credential::OAuthClientCredentials { .. } => {
            "the client-credentials grant authenticates as the OAuth Application User"
        }
        _ => "the OAuth grant authenticates",
    }
}

fn unauthorized(body: &[u8], credential: &Credential) -> AuthCheck {
    match credential {
        Credential::ApiKey { .. } => {
            return AuthCheck::failed(
                AuthFailure::InvalidCredentials,
                "ServiceNow did not accept the API key (401). The key is wrong, inactive or \
                 expired (expired keys are deleted after 7 days), or no REST API Access Policy \
                 applies its API Key authentication profile (x-sn-apikey) to the Table API: \
                 System Web Services → API Access Policies → REST API Access Policies (token \
                 authentication is not allowed on the Global policy)",
            )
        }
        Credential::Basic { .. } => {}
        _ => {
            return AuthCheck::failed(
                AuthFailure::InvalidCredentials,
                "ServiceNow did not accept the access token (401): the user it acts as may be \
                 inactive or lack the snc_platform_rest_api_access role, or a REST API access \
                 policy blocks OAuth for the Table API",
            )
        }
    }
    let detail = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .and_then(|b| b.error)
        .map(|e| {
            format!(
                "{} {}",
                e.message.unwrap_or_default(),
                e.detail.unwrap_or_default()
            )
            .to_ascii_lowercase()
        })
        .unwrap_or_default();
    if detail.contains("basic auth") {
        let mut c = AuthCheck::failed(
            AuthFailure::InsufficientPermissions,
            "basic auth is restricted on this instance: mark the account Web Service Access \
             Only, grant it snc_basic_auth_api_access, or register it with OAuth instead",
        );
        c.missing_permissions = vec![BASIC_AUTH_EXCEPTION.to_owned()];
        return c;
    }
    AuthCheck::failed(
        AuthFailure::InvalidCredentials,
        "ServiceNow rejected the user name or password (401). If they are right, the account \
         needs the snc_platform_rest_api_access role, or a REST API access policy or the Basic \
         Auth Restriction blocks it",
    )
}

#[derive(Deserialize)]
struct TableResult<T> {
    #[serde(default = "Vec::new")]
    result: Vec<T>,
}

#[derive(Deserialize)]
struct UserRow {
    #[serde(default)]
    sys_id: String,
    user_name: Option<String>,
    name: Option<String>,
    email: Option<String>,
    active: Option<String>,
}

#[derive(Deserialize)]
struct RoleRow {
    #[serde(rename = "role.name")]
    role_name: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: Option<ErrorDetail>,
}

#[derive(Deserialize)]
struct ErrorDetail {
    message: Option<String>,
    detail: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_code_is_shown_cut_and_cleaned() {
        use oauth2::basic::{BasicErrorResponse, BasicErrorResponseType};
        let ctx = BackendContext::for_tests();
        let http = OAuthHttp::form(&ctx.http);
        let hostile = format!("x\r\nFAKE LOG LINE\u{1b}[2J{}", "y".repeat(10_000));
        let e = oauth2::RequestTokenError::ServerResponse(BasicErrorResponse::new(
            BasicErrorResponseType::Extension(hostile),
            Some("no integration user".to_owned()),
            None,
        ));
        let BackendError::Rejected { message, .. } = classify_cc_error(&e, &http) else {
            panic!("not a refusal");
        };
        assert!(!message.chars().any(char::is_control), "{message:?}");
        assert!(message.len() < 600, "{} bytes", message.len());
        assert!(message.contains("OAuth Application User"), "{message}");
    }

    #[test]
    fn base_urls() {
        let b = ServiceNowBackend::new(BackendContext::for_tests());
        let p = EgressPolicy::default();
        assert_eq!(
            b.canonical_base_url("acme.service-now.com", &p).unwrap(),
            "https://acme.service-now.com"
        );
        assert_eq!(
            b.canonical_base_url("https://ACME.service-now.com/now/nav/ui/home", &p)
                .unwrap(),
            "https://acme.service-now.com"
        );
        assert!(b
            .canonical_base_url("https://www.service-now.com", &p)
            .is_err());
        assert!(b
            .canonical_base_url("http://acme.service-now.com", &p)
            .is_err());
    }

    #[test]
    fn table_urls_encode_queries() {
        assert_eq!(
            table_url(
                "https://x",
                "sys_user",
                &[("sysparm_query", "user_name=a b&c")]
            ),
            "https://x/api/now/table/sys_user?sysparm_query=user_name%3Da+b%26c"
        );
    }
}
