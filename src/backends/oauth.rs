//! Shared OAuth plumbing on the `oauth2` crate: one client type for every vendor, an HTTP adapter
//! that goes through the broker's own client (no redirects, no proxies, timeouts, capped bodies)
//! and remembers the status and `Retry-After` of the last answer, and one classification of
//! token-endpoint failures into permanent (`Rejected`) and temporary (`Transient`).
//!
//! # Security
//! Token-endpoint bodies are never logged or put into messages (`RequestTokenError::Parse`
//! carries the raw body, which may hold tokens); only the OAuth `error` code is used.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use oauth2::basic::{
    BasicErrorResponse, BasicErrorResponseType, BasicRevocationErrorResponse,
    BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::{
    AsyncHttpClient, AuthType, Client, ClientId, ClientSecret, EndpointNotSet, EndpointSet,
    ExtraTokenFields, HttpRequest, HttpResponse, RequestTokenError, StandardRevocableToken,
    StandardTokenResponse, TokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};

use super::http::{HttpClient, TransportError};
use super::{bearer, BackendError, Issued};
use crate::model::{AuthFailure, Credential, Grant};
use crate::secret::SecretString;

/// Vendor settings: lifetimes the vendors do not announce, and the Atlassian hosts.
#[derive(Debug, Clone)]
pub struct OAuthSettings {
    /// Salesforce tokens carry no `expires_in`; used when introspection is not allowed.
    pub salesforce_token_lifetime: Duration,
    /// ServiceNow refresh-token lifespan (not in any response; default 100 days).
    pub servicenow_refresh_token_lifespan: Duration,
    /// Salesforce "Connect with …" grants die after this long unused (the External Client
    /// App's idle refresh-token limit; default 30 days): the keep-alive sweep refreshes before.
    pub salesforce_refresh_idle_limit: Duration,
    /// Atlassian refresh tokens die after this long unused (90 days): the keep-alive sweep
    /// refreshes before.
    pub jira_refresh_idle_limit: Duration,
    /// Zendesk access-token lifetime asked for (`expires_in`; 5 min – 48 h, default 30 min).
    pub zendesk_access_token_ttl: Duration,
    /// Zendesk refresh-token lifetime asked for (7 – 90 days, default 30 days).
    pub zendesk_refresh_token_ttl: Duration,
    /// The only directory federated token files (Entra workload identity) are read from.
    pub entra_federated_token_dir: std::path::PathBuf,
    /// Atlassian's authorization server (`https://auth.atlassian.com`).
    pub jira_auth_url: String,
    /// Atlassian's API gateway (`https://api.atlassian.com`).
    pub jira_api_url: String,
}

impl Default for OAuthSettings {
    fn default() -> Self {
        Self {
            salesforce_token_lifetime: Duration::from_secs(30 * 60),
            servicenow_refresh_token_lifespan: Duration::from_secs(8_640_000),
            salesforce_refresh_idle_limit: Duration::from_secs(30 * 86_400),
            jira_refresh_idle_limit: Duration::from_secs(90 * 86_400),
            entra_federated_token_dir: std::path::PathBuf::from("/var/run/secrets/azure/tokens"),
            zendesk_access_token_ttl: Duration::from_secs(30 * 60),
            zendesk_refresh_token_ttl: Duration::from_secs(30 * 86_400),
            jira_auth_url: "https://auth.atlassian.com".to_owned(),
            jira_api_url: "https://api.atlassian.com".to_owned(),
        }
    }
}

/// Scopes granted, from a token response (space-separated `scope`), else the requested ones.
pub fn granted_scopes(resp: &VendorTokenResponse, requested: &[String]) -> Vec<String> {
    match resp.scopes() {
        Some(s) => s.iter().map(|s| s.to_string()).collect(),
        None => requested.to_vec(),
    }
}

/// A random PKCE pair: (S256 challenge, verifier).
pub fn pkce_pair() -> (String, SecretString) {
    let (challenge, verifier) = oauth2::PkceCodeChallenge::new_random_sha256();
    (
        challenge.as_str().to_owned(),
        SecretString::new(verifier.secret().clone()),
    )
}

/// Vendor fields beside the standard token response.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct VendorFields {
    /// Salesforce: where API calls go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_url: Option<String>,
    /// Salesforce: the identity URL (`…/id/{orgId}/{userId}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Zendesk: the refresh token's lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token_expires_in: Option<u64>,
}

impl ExtraTokenFields for VendorFields {}

/// The token response every backend reads.
pub type VendorTokenResponse = StandardTokenResponse<VendorFields, BasicTokenType>;

/// The one OAuth client type (token endpoint set, nothing else).
pub type OAuthClient = Client<
    BasicErrorResponse,
    VendorTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// A token endpoint error after the request ran.
pub type TokenRequestError = RequestTokenError<TransportError, BasicErrorResponse>;

/// The parts of an authorization-code credential ("Connect with …").
pub struct CodeFlow<'a> {
    /// The OAuth client's id.
    pub client_id: &'a str,
    /// The OAuth client's secret.
    pub client_secret: &'a SecretString,
    /// The scopes asked for.
    pub scopes: &'a [String],
    /// The grant, once connected.
    pub grant: Option<&'a Grant>,
}

/// `credential`'s authorization-code parts; `vendor` accepts nothing else.
pub fn code_flow<'a>(
    credential: &'a Credential,
    vendor: &str,
) -> Result<CodeFlow<'a>, BackendError> {
    match credential {
        Credential::OAuthAuthorizationCode {
            client_id,
            client_secret,
            scopes,
            grant,
        } => Ok(CodeFlow {
            client_id,
            client_secret,
            scopes,
            grant: grant.as_ref(),
        }),
        _ => Err(BackendError::Unsupported(format!(
            "this {vendor} flow needs an oauth_authorization_code credential"
        ))),
    }
}

/// The parts of an `oauth_client_credentials` credential (a service identity).
pub struct ClientCredentials<'a> {
    /// The OAuth client's id.
    pub client_id: &'a str,
    /// The OAuth client's secret.
    pub client_secret: &'a SecretString,
    /// The scopes asked for (empty: the client's own).
    pub scopes: &'a [String],
    /// Jira Cloud: the site's cloud id, once found.
    pub cloud_id: Option<&'a str>,
}

impl<'a> ClientCredentials<'a> {
    /// `credential`'s client-credentials parts, if it is one.
    pub fn of(credential: &'a Credential) -> Option<Self> {
        match credential {
            Credential::OAuthClientCredentials {
                client_id,
                client_secret,
                scopes,
                cloud_id,
                ..
            } => Some(Self {
                client_id,
                client_secret,
                scopes,
                cloud_id: cloud_id.as_deref(),
            }),
            _ => None,
        }
    }

    /// Runs the client-credentials grant at `token_url`, with the vendor's own `extra`
    /// parameters; failures go through `classify`.
    pub async fn mint(
        &self,
        http: &OAuthHttp,
        token_url: &str,
        extra: &[(&'static str, String)],
        classify: impl Fn(&TokenRequestError, &OAuthHttp) -> BackendError,
    ) -> Result<VendorTokenResponse, BackendError> {
        let client = client(self.client_id, Some(self.client_secret), token_url)?;
        let mut req = client
            .exchange_client_credentials()
            .add_scopes(self.scopes.iter().map(|s| oauth2::Scope::new(s.clone())));
        for (k, v) in extra {
            req = req.add_extra_param(*k, v.clone());
        }
        req.request_async(http)
            .await
            .map_err(|e| classify(&e, http))
    }
}

impl<'a> CodeFlow<'a> {
    /// The grant, or "not connected yet" (`reconnect` says how to connect).
    pub fn connected(&self, vendor: &str, reconnect: &str) -> Result<&'a Grant, BackendError> {
        self.grant.ok_or_else(|| BackendError::Rejected {
            failure: AuthFailure::ReauthorizationRequired,
            message: format!("the {vendor} system is not connected yet; {reconnect}"),
        })
    }
}

/// A vendor's consent page for a PKCE code flow: `endpoint` with the standard parameters
/// (`response_type=code`, client, redirect URI, scopes, state, and the S256 challenge).
pub fn authorize_url(
    endpoint: &str,
    client_id: &str,
    scopes: &[String],
    request: &super::AuthorizeRequest<'_>,
) -> Result<String, BackendError> {
    let mut url = url::Url::parse(endpoint)
        .map_err(|_| BackendError::Unsupported("invalid base URL".to_owned()))?;
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", client_id)
        .append_pair("redirect_uri", request.redirect_uri)
        .append_pair("scope", &scopes.join(" "))
        .append_pair("state", request.state);
    if let Some(challenge) = request.pkce_challenge {
        url.query_pairs_mut()
            .append_pair("code_challenge", challenge)
            .append_pair("code_challenge_method", "S256");
    }
    Ok(url.to_string())
}

/// Builds a client for `token_url`; client authentication goes in the request body (what
/// Salesforce, ServiceNow, Zendesk and Atlassian document) unless `basic_auth`.
pub fn client(
    client_id: &str,
    client_secret: Option<&SecretString>,
    token_url: &str,
) -> Result<OAuthClient, BackendError> {
    let url = TokenUrl::new(token_url.to_owned())
        .map_err(|_| BackendError::Unsupported("the token endpoint URL is not valid".to_owned()))?;
    let mut c = Client::new(ClientId::new(client_id.to_owned()))
        .set_token_uri(url)
        .set_auth_type(AuthType::RequestBody);
    if let Some(s) = client_secret {
        c = c.set_client_secret(ClientSecret::new(s.expose_secret().to_owned()));
    }
    Ok(c)
}

/// What the last token-endpoint answer looked like (status and `Retry-After`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ResponseMeta {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After` seconds.
    pub retry_after: Option<u64>,
}

/// The `oauth2` HTTP adapter over the broker's client.
pub struct OAuthHttp {
    http: HttpClient,
    json_body: bool,
    last: Mutex<Option<ResponseMeta>>,
}

impl OAuthHttp {
    /// Form-encoded token requests (RFC 6749).
    pub fn form(http: &HttpClient) -> Self {
        Self {
            http: http.clone(),
            json_body: false,
            last: Mutex::new(None),
        }
    }

    /// Token requests with a JSON body (Zendesk, Atlassian): the form the `oauth2` crate builds
    /// is re-encoded as a JSON object.
    pub fn json(http: &HttpClient) -> Self {
        Self {
            json_body: true,
            ..Self::form(http)
        }
    }

    /// Status and `Retry-After` of the last answer.
    pub fn last(&self) -> Option<ResponseMeta> {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<'c> AsyncHttpClient<'c> for OAuthHttp {
    type Error = TransportError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, TransportError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let mut headers = parts.headers;
            let body = if self.json_body {
                let map: serde_json::Map<String, serde_json::Value> =
                    url::form_urlencoded::parse(&body)
                        .map(|(k, v)| (k.into_owned(), serde_json::Value::String(v.into_owned())))
                        .collect();
                headers.insert(
                    reqwest::header::CONTENT_TYPE,
                    reqwest::header::HeaderValue::from_static("application/json"),
                );
                serde_json::to_vec(&map).map_err(|e| TransportError::Other(e.to_string()))?
            } else {
                body
            };
            let req = self
                .http
                .raw()
                .request(parts.method, parts.uri.to_string())
                .headers(headers)
                .body(body);
            let resp = self.http.send(req).await?;
            *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(ResponseMeta {
                status: resp.status,
                retry_after: resp.retry_after(),
            });
            let (status, read) = relabelled(resp.status, &resp.body);
            let mut builder = oauth2::http::Response::builder().status(status);
            for (k, v) in &resp.headers {
                if read.is_none() || k != reqwest::header::CONTENT_TYPE {
                    builder = builder.header(k, v);
                }
            }
            if read.is_some() {
                builder = builder.header(reqwest::header::CONTENT_TYPE, "application/json");
            }
            builder
                .body(read.unwrap_or(resp.body))
                .map_err(|e| TransportError::Other(e.to_string()))
        })
    }
}

/// The status and (rewritten) body the oauth2 crate is handed for a token endpoint's answer.
/// The crate reads a token answer only under exactly 200, and an error answer under anything
/// else. A 2xx that carries an access token (a gateway's 201 or 203) is the vendor's token
/// answer, maybe with a rotated refresh token in it: handed on as 200, not dropped as
/// unreadable. A 2xx that carries only an OAuth `error` is handed on as 400, so the vendor's
/// word on the grant (`invalid_grant`) is still read as such.
fn relabelled(status: u16, body: &[u8]) -> (u16, Option<Vec<u8>>) {
    if !(200..300).contains(&status) {
        return (status, None);
    }
    let Some(read) = lenient_token_answer(body) else {
        return (status, None);
    };
    let answer = serde_json::from_slice::<serde_json::Value>(&read).ok();
    let text = |key: &str| answer.as_ref().and_then(|v| v.get(key)?.as_str());
    // Under 200 only the vendor's verdict on the grant itself (`invalid_grant`), which the
    // crate would read as a token answer and fail to parse, so that it passed for an outage. A
    // gateway's 200 with another error stays unreadable, and so a passing fault: one answer
    // of that kind must not send a person to reconnect.
    let status = match (status, text("error")) {
        _ if text("access_token").is_some() => 200,
        (200, Some("invalid_grant")) => 400,
        (200, _) => 200,
        (_, Some(_)) => 400,
        (s, None) => s,
    };
    (status, Some(read))
}

/// A 2xx token answer rewritten into RFC 6749 §5.1's shape, from the shapes vendors really send:
/// lifetimes as strings (Entra's v1 endpoint answers `"expires_in": "3599"`,
/// MicrosoftDocs/azure-docs#54997) or as fractions, no `token_type`, `scope` as an array, a JSON
/// body labelled as something else. The strict parse after it would otherwise throw the whole
/// answer away, and with it a refresh token the vendor has already rotated (the old one is dead
/// at Zendesk). A lifetime that is no number at all, or 0 (no token lives no time; believed, it
/// would make about every call a mint), is dropped: the vendor's default lifetime applies, held
/// between the bounds like any other. Anything but a JSON object is left alone.
fn lenient_token_answer(body: &[u8]) -> Option<Vec<u8>> {
    use serde_json::Value;
    let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    for key in ["expires_in", "refresh_token_expires_in"] {
        match map.get(key).map(seconds) {
            Some(Some(n)) if n > 0 => {
                map.insert(key.to_owned(), n.into());
            }
            Some(_) => {
                map.remove(key);
            }
            None => {}
        }
    }
    if !map.get("token_type").is_some_and(Value::is_string) {
        map.insert("token_type".to_owned(), "Bearer".into());
    }
    match map.get("scope") {
        Some(Value::Array(items)) => {
            let joined: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
            let joined = joined.join(" ");
            map.insert("scope".to_owned(), joined.into());
        }
        Some(Value::String(_)) | None => {}
        Some(_) => {
            map.remove("scope");
        }
    }
    if !map.get("refresh_token").is_some_and(Value::is_string) {
        map.remove("refresh_token");
    }
    // A token padded with spaces is the token (the server it is sent to would trim them).
    if let Some(Value::String(t)) = map.get_mut("access_token") {
        let trimmed = t.trim();
        if trimmed.len() != t.len() {
            *t = trimmed.to_owned();
        }
    }
    serde_json::to_vec(&map).ok()
}

/// Whole seconds from a JSON number or a string holding one.
fn seconds(v: &serde_json::Value) -> Option<u64> {
    let whole = |f: f64| (f.is_finite() && f >= 0.0 && f < u64::MAX as f64).then_some(f as u64);
    match v {
        serde_json::Value::Number(n) => n.as_u64().or_else(|| n.as_f64().and_then(whole)),
        serde_json::Value::String(s) => {
            let s = s.trim();
            s.parse().ok().or_else(|| s.parse().ok().and_then(whole))
        }
        _ => None,
    }
}

/// Classifies a token-endpoint failure. `reauth_hint` tells the admin how to recover from a dead
/// grant; `invalid_credentials_hint` from a wrong client id/secret or password.
pub fn classify(
    vendor: &str,
    err: &TokenRequestError,
    meta: Option<ResponseMeta>,
    reauth_hint: &str,
    invalid_credentials_hint: &str,
) -> BackendError {
    let status = meta.map(|m| m.status).unwrap_or(0);
    let retry_after = meta.and_then(|m| m.retry_after).map(Duration::from_secs);
    let transient = |failure, message: String| BackendError::Transient {
        failure,
        message,
        retry_after,
    };
    let rejected = |failure, message: String| BackendError::Rejected { failure, message };
    if let RequestTokenError::Request(e) = err {
        return BackendError::unreachable(&format!("{vendor}'s token endpoint"), e);
    }
    if status == 429 {
        return transient(
            AuthFailure::RateLimited,
            format!("{vendor}'s token endpoint rate-limited the broker (429)"),
        );
    }
    if status >= 500 {
        return transient(
            AuthFailure::UpstreamError,
            format!("{vendor}'s token endpoint failed with HTTP {status}"),
        );
    }
    let code = match err {
        RequestTokenError::ServerResponse(r) => Some(r.error().clone()),
        _ => None,
    };
    match code {
        Some(BasicErrorResponseType::InvalidGrant) => rejected(
            AuthFailure::ReauthorizationRequired,
            format!("{vendor} rejected the grant (invalid_grant): {reauth_hint}"),
        ),
        Some(BasicErrorResponseType::InvalidClient) => rejected(
            AuthFailure::InvalidCredentials,
            format!("{vendor} rejected the client (invalid_client): {invalid_credentials_hint}"),
        ),
        Some(BasicErrorResponseType::UnauthorizedClient)
        | Some(BasicErrorResponseType::UnsupportedGrantType)
        | Some(BasicErrorResponseType::InvalidScope)
        | Some(BasicErrorResponseType::InvalidRequest) => rejected(
            AuthFailure::Misconfigured,
            format!(
                "{vendor} refused the token request ({}): the app is not set up for this flow \
                 or these scopes",
                code.as_ref().map(|c| c.as_ref()).unwrap_or_default()
            ),
        ),
        Some(BasicErrorResponseType::Extension(ref ext)) => match ext.as_str() {
            "rate_limit_exceeded" => transient(
                AuthFailure::RateLimited,
                format!("{vendor}'s token endpoint rate-limited the broker"),
            ),
            // RFC 6749's code for a passing outage: nothing is wrong with the grant.
            "temporarily_unavailable" => transient(
                AuthFailure::UpstreamError,
                format!("{vendor}'s token endpoint is temporarily unavailable"),
            ),
            "inactive_user" | "inactive_org" => rejected(
                AuthFailure::ExpiredOrRevoked,
                format!("{vendor} answered {ext}: the user or organization is inactive"),
            ),
            "invalid_client_id" | "access_denied" | "unauthorized" => rejected(
                AuthFailure::InvalidCredentials,
                format!("{vendor} rejected the client ({ext}): {invalid_credentials_hint}"),
            ),
            _ if matches!(status, 400 | 401 | 403) => rejected(
                AuthFailure::InvalidCredentials,
                format!("{vendor} refused the token request (HTTP {status}): {invalid_credentials_hint}"),
            ),
            _ => transient(
                AuthFailure::UpstreamError,
                format!("{vendor}'s token endpoint answered with an unexpected error"),
            ),
        },
        // A 401/403 without an `error` member is not the vendor's word on the grant (every
        // vendor here answers token errors with one): a CDN or firewall challenge (HTML, or
        // RFC 9457 problem JSON), a gateway's `{"message":"Forbidden"}`, a proxy's login page.
        // Marking the grant dead would make an admin reconnect for it. An `error` of another
        // shape (ServiceNow's `{"error":{…},"status":"failure"}`) is still the vendor refusing.
        None if matches!(status, 401 | 403) && !vendor_error_body(err) => transient(
            AuthFailure::UpstreamError,
            format!(
                "{vendor}'s token endpoint answered HTTP {status} with a page that is no OAuth \
                 answer (a proxy or firewall in the way?)"
            ),
        ),
        None if matches!(status, 401 | 403) => rejected(
            AuthFailure::InvalidCredentials,
            format!("{vendor} refused the token request (HTTP {status}): {invalid_credentials_hint}"),
        ),
        None => transient(
            AuthFailure::UpstreamError,
            format!("{vendor}'s token endpoint answered with an unreadable response (HTTP {status})"),
        ),
    }
}

/// Whether a token-endpoint failure came with a JSON object that has an `error` member (of a
/// shape the OAuth client did not read); an HTML page, problem JSON or an unexpected content
/// type is not.
fn vendor_error_body(err: &TokenRequestError) -> bool {
    #[derive(serde::Deserialize)]
    struct WithError {
        #[serde(rename = "error")]
        _error: serde::de::IgnoredAny,
    }
    match err {
        RequestTokenError::Parse(_, body) => serde_json::from_slice::<WithError>(body).is_ok(),
        _ => false,
    }
}

/// The longest token lifetime a vendor's answer is believed for (48 h, Zendesk's maximum).
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(48 * 3600);
/// The shortest: an `expires_in` of 0 must not make every call a mint.
pub const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(1);

/// When a token that lives `lifetime` (as a vendor said, so held between
/// [`MIN_TOKEN_LIFETIME`] and [`MAX_TOKEN_LIFETIME`]) stops working.
pub fn expiry_in(lifetime: Duration) -> SystemTime {
    SystemTime::now() + lifetime.clamp(MIN_TOKEN_LIFETIME, MAX_TOKEN_LIFETIME)
}

/// The access-token header and expiry from a token response. `default_lifetime` applies when the
/// response has no `expires_in`.
pub fn issued_from(
    resp: &VendorTokenResponse,
    default_lifetime: Duration,
    api_base_url: String,
) -> Issued {
    let lifetime = resp.expires_in().unwrap_or(default_lifetime);
    Issued {
        headers: vec![bearer(&SecretString::from(
            resp.access_token().secret().as_str(),
        ))],
        expires_at: Some(expiry_in(lifetime)),
        api_base_url,
        updated_credential: None,
        subject: None,
    }
}

/// The refresh token in a response, if any. An empty one counts as none: stored, it would
/// replace a working grant with nothing.
pub fn refresh_token(resp: &VendorTokenResponse) -> Option<SecretString> {
    new_refresh_token(resp).map(|t| SecretString::from(t.secret().as_str()))
}

/// The one rule for "the response carries a refresh token" (no copy of it is made).
fn new_refresh_token(resp: &VendorTokenResponse) -> Option<&oauth2::RefreshToken> {
    resp.refresh_token().filter(|t| !t.secret().is_empty())
}

/// When the refresh token a response leaves in force expires, for vendors whose refresh tokens
/// live a fixed time from their issue (Zendesk): `now + ttl` for a new one; a response without
/// one keeps the stored token, and with it the stored token's expiry.
pub fn fixed_refresh_expiry(
    resp: &VendorTokenResponse,
    previous: Option<&crate::model::Grant>,
    now: u64,
    ttl: Duration,
) -> Option<u64> {
    match previous {
        Some(kept) if new_refresh_token(resp).is_none() => kept.refresh_expires_at,
        _ => Some(now.saturating_add(ttl.as_secs())),
    }
}

/// The scopes of an authorization-code flow.
pub struct GrantScopes<'a> {
    /// As the admin gave them, and stored so (none: the vendor's defaults).
    pub stored: &'a [String],
    /// What the flow asked the vendor for (the defaults filled in).
    pub asked: &'a [String],
}

/// The authorization-code credential carrying the grant from a token response. A response
/// without a refresh token keeps `previous` (the stored one). A response without `scope` is
/// taken to have granted what the grant had before, else what the flow asked for (see
/// [`GrantScopes`]).
#[allow(clippy::too_many_arguments)] // One call site per vendor; the scopes are named (two lists).
pub fn credential_with_grant(
    client_id: &str,
    client_secret: &SecretString,
    GrantScopes {
        stored: scopes,
        asked,
    }: GrantScopes<'_>,
    resp: &VendorTokenResponse,
    previous: Option<&crate::model::Grant>,
    refresh_expires_at: Option<u64>,
    cloud_id: Option<String>,
    vendor: &str,
) -> Result<crate::model::Credential, BackendError> {
    let refresh_token = refresh_token(resp)
        .or_else(|| previous.map(|g| g.refresh_token.clone()))
        .ok_or_else(|| BackendError::Rejected {
            failure: AuthFailure::Misconfigured,
            message: format!(
                "{vendor} issued no refresh token; the app must allow offline access (refresh \
                 tokens), then connect again"
            ),
        })?;
    Ok(crate::model::Credential::OAuthAuthorizationCode {
        client_id: client_id.to_owned(),
        client_secret: client_secret.clone(),
        scopes: scopes.to_vec(),
        grant: Some(crate::model::Grant {
            refresh_token,
            refresh_expires_at,
            granted_scopes: granted_scopes(
                resp,
                previous
                    .map(|g| g.granted_scopes.as_slice())
                    .filter(|granted| !granted.is_empty())
                    .unwrap_or(asked),
            ),
            cloud_id: cloud_id.or_else(|| previous.and_then(|g| g.cloud_id.clone())),
            instance_url: resp
                .extra_fields()
                .instance_url
                .clone()
                .or_else(|| previous.and_then(|g| g.instance_url.clone())),
            authorized_at: previous
                .map(|g| g.authorized_at)
                .unwrap_or_else(crate::model::unix_now),
        }),
    })
}

/// Scopes in `needed` that `granted` lacks.
pub fn missing_scopes(needed: &[String], granted: &[String]) -> Vec<String> {
    needed
        .iter()
        .filter(|n| !granted.iter().any(|g| g == *n))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token answer without `scope` keeps the scopes the grant had, and one that had none
    /// (stored from such an answer before) gets what the flow asked for; an answer that names
    /// its scopes is believed, narrower or not.
    #[test]
    fn an_answer_without_scope_has_what_was_asked_unless_the_grant_knew_better() {
        let granted = |answer: &str, previous: Option<Vec<&str>>| {
            let resp: VendorTokenResponse = serde_json::from_str(answer).unwrap();
            let previous = previous.map(|had| crate::model::Grant {
                refresh_token: SecretString::new("rt-0".to_owned()),
                refresh_expires_at: None,
                granted_scopes: had.iter().map(|s| s.to_string()).collect(),
                cloud_id: None,
                instance_url: None,
                authorized_at: 0,
            });
            let asked = ["read".to_owned(), "write".to_owned()];
            let scopes = GrantScopes {
                stored: &[],
                asked: &asked,
            };
            let secret = SecretString::new("s".to_owned());
            let c = credential_with_grant(
                "c",
                &secret,
                scopes,
                &resp,
                previous.as_ref(),
                None,
                None,
                "V",
            );
            match c.unwrap() {
                crate::model::Credential::OAuthAuthorizationCode {
                    grant: Some(g),
                    scopes,
                    ..
                } => {
                    assert!(scopes.is_empty(), "the stored scopes stay as given");
                    g.granted_scopes
                }
                other => panic!("{other:?}"),
            }
        };
        let bare = r#"{"access_token":"a","token_type":"bearer","refresh_token":"r"}"#;
        let narrow =
            r#"{"access_token":"a","token_type":"bearer","refresh_token":"r","scope":"read"}"#;
        assert_eq!(granted(bare, None), ["read", "write"]);
        assert_eq!(granted(bare, Some(vec![])), ["read", "write"]);
        assert_eq!(granted(bare, Some(vec!["read"])), ["read"]);
        assert_eq!(granted(narrow, None), ["read"]);
    }

    /// A passing outage the vendor names (`temporarily_unavailable`) and a 401/403 without an
    /// OAuth error body (a firewall's page) are retried later; `invalid_grant` kills the grant.
    /// A token answer under any 2xx reaches the oauth2 crate as 200; an OAuth error under a
    /// 2xx (200 included) as an error answer; anything else keeps its status.
    #[test]
    fn token_and_error_answers_under_another_2xx_keep_their_meaning() {
        let token = br#"{"access_token":"a","token_type":"Bearer","refresh_token":"r"}"#;
        let error = br#"{"error":"invalid_grant"}"#;
        for status in [200, 201, 203] {
            assert_eq!(relabelled(status, token).0, 200, "{status}");
        }
        assert_eq!(relabelled(201, error).0, 400);
        assert_eq!(relabelled(200, error).0, 400, "only invalid_grant");
        let other = br#"{"error":"invalid_request"}"#;
        assert_eq!(relabelled(200, other).0, 200, "another error under 200");
        let both = br#"{"error":"x","access_token":"a"}"#;
        assert_eq!(relabelled(200, both).0, 200);
        assert_eq!(relabelled(202, br#"{"queued":true}"#).0, 202);
        assert_eq!(relabelled(203, b"<html>sign in</html>"), (203, None));
        assert_eq!(relabelled(400, error), (400, None));
    }

    #[test]
    fn only_the_vendors_own_word_on_the_grant_rejects_it() {
        let meta = |status| {
            Some(ResponseMeta {
                status,
                retry_after: None,
            })
        };
        let coded = |code: BasicErrorResponseType| {
            RequestTokenError::ServerResponse(BasicErrorResponse::new(code, None, None))
        };
        let ext = |c: &str| coded(BasicErrorResponseType::Extension(c.to_owned()));
        let judge = |e: &TokenRequestError, status| classify("V", e, meta(status), "r", "i");
        for (err, status) in [
            (ext("temporarily_unavailable"), 400),
            (ext("temporarily_unavailable"), 401),
            (
                RequestTokenError::Other("unexpected content type".to_owned()),
                401,
            ),
            (
                RequestTokenError::Other("unexpected content type".to_owned()),
                403,
            ),
        ] {
            let got = judge(&err, status);
            assert!(
                matches!(got, BackendError::Transient { .. }),
                "{status}: {got:?}"
            );
        }
        for (err, status) in [
            (coded(BasicErrorResponseType::InvalidGrant), 400),
            (ext("server_error"), 401),
        ] {
            let got = judge(&err, status);
            assert!(
                matches!(got, BackendError::Rejected { .. }),
                "{status}: {got:?}"
            );
        }
    }

    fn answer(expires_in: Option<Duration>) -> VendorTokenResponse {
        let mut r = VendorTokenResponse::new(
            oauth2::AccessToken::new("at".to_owned()),
            BasicTokenType::Bearer,
            VendorFields::default(),
        );
        r.set_expires_in(expires_in.as_ref());
        r
    }

    #[test]
    fn a_fixed_lifetime_refresh_token_keeps_its_expiry_until_it_is_replaced() {
        let kept = crate::model::Grant {
            refresh_token: SecretString::from("rt-1"),
            refresh_expires_at: Some(1_000),
            granted_scopes: Vec::new(),
            cloud_id: None,
            instance_url: None,
            authorized_at: 0,
        };
        let ttl = Duration::from_secs(30 * 86_400);
        let without = answer(None);
        assert_eq!(
            fixed_refresh_expiry(&without, Some(&kept), 500, ttl),
            Some(1_000)
        );
        let mut empty = answer(None);
        empty.set_refresh_token(Some(oauth2::RefreshToken::new(String::new())));
        assert_eq!(
            fixed_refresh_expiry(&empty, Some(&kept), 500, ttl),
            Some(1_000)
        );
        assert!(refresh_token(&empty).is_none());
        let mut with = answer(None);
        with.set_refresh_token(Some(oauth2::RefreshToken::new("rt-2".to_owned())));
        let renewed = Some(500 + ttl.as_secs());
        assert_eq!(fixed_refresh_expiry(&with, Some(&kept), 500, ttl), renewed);
        assert_eq!(fixed_refresh_expiry(&with, None, 500, ttl), renewed);
        assert_eq!(
            fixed_refresh_expiry(&with, None, u64::MAX, ttl),
            Some(u64::MAX)
        );
    }

    #[test]
    fn a_vendors_lifetime_is_held_between_the_bounds() {
        let now = SystemTime::now();
        for (said, lo, hi) in [
            (Some(Duration::MAX), MAX_TOKEN_LIFETIME, MAX_TOKEN_LIFETIME),
            (
                Some(Duration::from_secs(u64::MAX)),
                MAX_TOKEN_LIFETIME,
                MAX_TOKEN_LIFETIME,
            ),
            (Some(Duration::ZERO), MIN_TOKEN_LIFETIME, MIN_TOKEN_LIFETIME),
            (
                Some(Duration::from_secs(3599)),
                Duration::from_secs(3599),
                Duration::from_secs(3599),
            ),
            (None, Duration::from_secs(1800), Duration::from_secs(1800)),
        ] {
            let issued = issued_from(&answer(said), Duration::from_secs(1800), String::new());
            let at = issued.expires_at.unwrap_or(now);
            let left = at.duration_since(now).unwrap_or_default();
            assert!(
                left >= lo && left <= hi + Duration::from_secs(5),
                "{said:?}: {left:?}"
            );
        }
    }

    #[test]
    fn token_answers_in_vendors_shapes_are_read_as_rfc_6749_has_them() {
        let read = |body: &str| -> VendorTokenResponse {
            let fixed = lenient_token_answer(body.as_bytes()).unwrap();
            serde_json::from_slice(&fixed).unwrap()
        };
        let r = read(
            r#"{"access_token":"at","expires_in":"3599","refresh_token":"rt-2",
                "refresh_token_expires_in":"2592000","scope":["a","b"]}"#,
        );
        assert_eq!(r.expires_in(), Some(Duration::from_secs(3599)));
        assert_eq!(r.extra_fields().refresh_token_expires_in, Some(2_592_000));
        assert_eq!(
            refresh_token(&r).map(|t| t.expose_secret().to_owned()),
            Some("rt-2".to_owned())
        );
        assert_eq!(r.scopes().map(Vec::len), Some(2));
        for fraction in ["1799.6", r#""1799.6""#] {
            let body = format!(r#"{{"access_token":"at","expires_in":{fraction}}}"#);
            assert_eq!(read(&body).expires_in(), Some(Duration::from_secs(1799)));
        }
        for garbage in [
            r#""soon""#,
            "-5",
            r#""NaN""#,
            "null",
            "[]",
            "1e300",
            "0",
            "0.4",
            r#""0""#,
        ] {
            let body =
                format!(r#"{{"access_token":"at","expires_in":{garbage},"refresh_token":null}}"#);
            let r = read(&body);
            assert_eq!(r.expires_in(), None, "{garbage}");
            assert!(refresh_token(&r).is_none());
        }
        assert!(lenient_token_answer(b"<html>").is_none());
        assert!(lenient_token_answer(b"[1]").is_none());
    }
}
