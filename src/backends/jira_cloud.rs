//! Jira Cloud: OAuth 2.0 (3LO) authorization code, then rotating refresh tokens
//! (`docs/systems/jira-cloud.md`).
//!
//! - Authorize at `{auth}/authorize` with `audience=api.atlassian.com`, `offline_access` and
//!   `prompt=consent`; token: `POST {auth}/oauth/token` (JSON body, client secret mandatory).
//! - After the exchange, `{api}/oauth/token/accessible-resources` lists the sites the grant
//!   covers; the one whose `url` matches the registered site is kept (its `id` is the cloud id)
//!   and workers call `{api}/ex/jira/{cloudId}`. No match: the system stays pending with the list.
//! - Refresh tokens rotate; reusing one outside a 10-minute leeway revokes the whole grant; they
//!   die after 90 days unused, so the broker keeps idle grants alive.
//! - A missing scope is a 401 "scope does not match": scopes are compared, not guessed.

use std::time::Duration;

use async_trait::async_trait;
use oauth2::{AuthorizationCode, RedirectUrl, RefreshToken};
use serde::Deserialize;

use super::classify::{common, not_the_api, shown, unreachable};
use super::http::{parse_base_url, url_string};
use super::oauth::{self, OAuthHttp};
use super::{
    basic, bearer, AuthorizeRequest, Backend, BackendContext, BackendError, EgressPolicy, Issued,
    Target,
};
use crate::model::{unix_now, AuthCheck, AuthFailure, Credential, Identity, SystemKind};
use crate::secret::SecretString;

const VENDOR: &str = "Jira Cloud";
const URL_HINT: &str = "enter your site URL, e.g. https://acme.atlassian.net";
/// Scopes asked for when the admin names none (`offline_access` is always added).
pub const DEFAULT_SCOPES: &[&str] = &["read:jira-work", "write:jira-work", "read:jira-user"];
/// Tries of the site list right after a code exchange, the longest `Retry-After` waited for
/// between them.
const SITE_LIST_TRIES: u32 = 3;
const MAX_SITE_LIST_PAUSE: Duration = Duration::from_secs(5);
/// The retries end this long after the first try began.
const SITE_LIST_BUDGET: Duration = Duration::from_secs(15);
const RECONNECT: &str = "reconnect it with `credbrokerctl system connect SYSTEM_ID`";

/// The Jira Cloud backend.
pub struct JiraCloudBackend {
    ctx: BackendContext,
}

impl JiraCloudBackend {
    /// A backend using the shared plumbing.
    pub fn new(ctx: BackendContext) -> Self {
        Self { ctx }
    }
}

fn scopes_with_offline(scopes: &[String]) -> Vec<String> {
    let mut v: Vec<String> = if scopes.is_empty() {
        DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect()
    } else {
        scopes.to_vec()
    };
    if !v.iter().any(|s| s == "offline_access") {
        v.push("offline_access".to_owned());
    }
    v
}

fn normalize_site(url: &str) -> String {
    url.trim().trim_end_matches('/').to_ascii_lowercase()
}

#[async_trait]
impl Backend for JiraCloudBackend {
    fn reuse_leeway(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_secs(600))
    }

    fn kind(&self) -> SystemKind {
        SystemKind::JiraCloud
    }

    async fn resolve(
        &self,
        base_url: &str,
        credential: &Credential,
    ) -> Result<Option<Credential>, BackendError> {
        let unresolved = matches!(
            credential,
            Credential::OAuthClientCredentials { cloud_id: None, .. }
                | Credential::EmailApiToken {
                    scoped: true,
                    cloud_id: None,
                    ..
                }
        );
        if !unresolved {
            return Ok(None);
        }
        let id = self.cloud_id_of(base_url).await?;
        Ok(with_cloud_id(credential, &id))
    }

    fn canonical_base_url(&self, raw: &str, egress: &EgressPolicy) -> Result<String, String> {
        let mut base = parse_base_url(raw, egress)?;
        if base.is_stand_in {
            return Ok(url_string(&base.url));
        }
        let host = base.url.host_str().unwrap_or_default();
        if !host.ends_with(".atlassian.net") || host.split('.').count() != 3 {
            return Err(URL_HINT.to_owned());
        }
        base.url.set_path("");
        Ok(url_string(&base.url))
    }

    fn authorize_url(
        &self,
        target: &Target<'_>,
        request: &AuthorizeRequest<'_>,
    ) -> Result<String, BackendError> {
        let flow = oauth::code_flow(target.credential, VENDOR)?;
        let client_id = flow.client_id;
        let scopes = flow.scopes;
        let mut url = url::Url::parse(&format!("{}/authorize", self.ctx.oauth.jira_auth_url))
            .map_err(|_| BackendError::Unsupported("invalid Atlassian auth URL".to_owned()))?;
        url.query_pairs_mut()
            .append_pair("audience", "api.atlassian.com")
            .append_pair("client_id", client_id)
            .append_pair("scope", &scopes_with_offline(scopes).join(" "))
            .append_pair("redirect_uri", request.redirect_uri)
            .append_pair("state", request.state)
            .append_pair("response_type", "code")
            .append_pair("prompt", "consent");
        Ok(url.to_string())
    }

    async fn exchange_code(
        &self,
        target: &Target<'_>,
        code: &str,
        request: &AuthorizeRequest<'_>,
    ) -> Result<Issued, BackendError> {
        let flow = oauth::code_flow(target.credential, VENDOR)?;
        let client_id = flow.client_id;
        let client_secret = flow.client_secret;
        let scopes = flow.scopes;
        let redirect = RedirectUrl::new(request.redirect_uri.to_owned())
            .map_err(|_| BackendError::Unsupported("invalid redirect URI".to_owned()))?;
        let client = oauth::client(client_id, Some(client_secret), &self.token_url())?
            .set_redirect_uri(redirect);
        let http = OAuthHttp::json(&self.ctx.http);
        let resp = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .request_async(&http)
            .await
            .map_err(|e| classify(&e, &http))?;
        let access =
            SecretString::from(oauth2::TokenResponse::access_token(&resp).secret().as_str());
        let cloud_id = self.pick_site(target.base_url, &access).await?;
        self.issued(client_id, client_secret, scopes, &resp, None, cloud_id)
    }

    async fn issue(&self, target: &Target<'_>) -> Result<Issued, BackendError> {
        match target.credential {
            Credential::OAuthClientCredentials { .. } => {
                return self.client_credentials(target).await
            }
            Credential::EmailApiToken { .. } => return self.api_token(target).await,
            _ => {}
        }
        let flow = oauth::code_flow(target.credential, VENDOR)?;
        let client_id = flow.client_id;
        let client_secret = flow.client_secret;
        let scopes = flow.scopes;
        let grant = flow.connected(VENDOR, RECONNECT)?;
        let cloud_id = grant
            .cloud_id
            .clone()
            .ok_or_else(|| BackendError::Rejected {
                failure: AuthFailure::ReauthorizationRequired,
                message: format!("the Jira Cloud grant has no site; {RECONNECT}"),
            })?;
        let client = oauth::client(client_id, Some(client_secret), &self.token_url())?;
        let http = OAuthHttp::json(&self.ctx.http);
        let resp = client
            .exchange_refresh_token(&RefreshToken::new(
                grant.refresh_token.expose_secret().to_owned(),
            ))
            .request_async(&http)
            .await
            .map_err(|e| classify(&e, &http))?;
        self.issued(
            client_id,
            client_secret,
            scopes,
            &resp,
            Some(grant),
            cloud_id,
        )
    }

    async fn verify(&self, target: &Target<'_>, issued: &Issued) -> AuthCheck {
        let url = format!("{}/rest/api/3/myself", issued.api_base_url);
        let resp = match self.ctx.http.get(&url, &issued.headers).await {
            Ok(r) => r,
            Err(e) => return unreachable(VENDOR, &e),
        };
        let credential = target.credential;
        let missing = missing_grant_scopes(credential);
        let check = match resp.status {
            200 => match serde_json::from_slice::<Myself>(&resp.body) {
                Ok(m) if !m.account_id.is_empty() => myself_check(m, credential),
                _ => return not_the_api(VENDOR, URL_HINT),
            },
            401 => return unauthorized(credential, &resp.body, missing),
            403 => return forbidden(credential),
            404 if !matches!(credential, Credential::EmailApiToken { scoped: false, .. }) => {
                return AuthCheck::failed(
                    AuthFailure::Misconfigured,
                    "Atlassian's API gateway does not know the site's cloud id (404); check the \
                     site URL, then rotate the credential in again (the cloud id is looked up \
                     anew)",
                )
            }
            _ => return common(VENDOR, &resp, URL_HINT),
        };
        if !check.ok {
            return check;
        }
        super::classify::with_missing(
            check,
            missing,
            &format!("Grant the scopes to the app and {RECONNECT}."),
        )
    }
}

/// Authorization-code grants: the scopes asked for that the grant lacks.
fn missing_grant_scopes(credential: &Credential) -> Vec<String> {
    match credential {
        Credential::OAuthAuthorizationCode {
            scopes,
            grant: Some(g),
            ..
        } => oauth::missing_scopes(&scopes_with_offline(scopes), &g.granted_scopes),
        _ => Vec::new(),
    }
}

/// What the admin does when a check of this credential fails.
fn fix_hint(credential: &Credential) -> &'static str {
    match credential {
        Credential::OAuthClientCredentials { .. } => {
            "check the service account's OAuth 2.0 credential at admin.atlassian.com → Directory \
             → Service accounts"
        }
        Credential::EmailApiToken { .. } => {
            "create a new API token (id.atlassian.com → Security → API tokens, or the service \
             account's Credentials tab) and rotate it in"
        }
        _ => RECONNECT,
    }
}

fn myself_check(m: Myself, credential: &Credential) -> AuthCheck {
    if m.active == Some(false) {
        return AuthCheck::failed(
            AuthFailure::ExpiredOrRevoked,
            format!(
                "the Atlassian account is deactivated; {}",
                fix_hint(credential)
            ),
        );
    }
    let what = match credential {
        Credential::OAuthClientCredentials { .. } => "the service account's credential",
        Credential::EmailApiToken { .. } => "the API token",
        _ => "the grant",
    };
    AuthCheck::ok(
        Identity {
            id: m.account_id,
            display_name: m.display_name.unwrap_or_default(),
            email: m.email_address.unwrap_or_default(),
        },
        format!("{what} authenticates"),
    )
}

/// Atlassian's answer to an expired or revoked API token (and to no valid authentication).
const NOT_AUTHENTICATED: &str = "Client must be authenticated";

fn unauthorized(credential: &Credential, body: &[u8], missing: Vec<String>) -> AuthCheck {
    let text = String::from_utf8_lossy(body);
    // "Unauthorized; scope does not match" is a 401, not a 403.
    if !missing.is_empty() || text.contains("scope does not match") {
        let message = match credential {
            Credential::OAuthAuthorizationCode { .. } => format!(
                "Jira refused the token: scope does not match; grant the scopes and {RECONNECT}"
            ),
            _ => "Jira refused the token: scope does not match. The credential needs \
                  read:jira-user, read:jira-work and write:jira-work; scopes cannot be changed \
                  after creation, so create a new credential with them and rotate it in"
                .to_owned(),
        };
        let mut c = AuthCheck::failed(AuthFailure::InsufficientPermissions, message);
        c.missing_permissions = if missing.is_empty() {
            vec!["read:jira-user scope".to_owned()]
        } else {
            missing
        };
        return c;
    }
    let Credential::EmailApiToken { scoped, .. } = credential else {
        return AuthCheck::failed(
            AuthFailure::InvalidCredentials,
            format!(
                "Jira could not authenticate the token (401); {}",
                fix_hint(credential)
            ),
        );
    };
    let mut c = if text.contains(NOT_AUTHENTICATED) {
        AuthCheck::failed(
            AuthFailure::ExpiredOrRevoked,
            "Atlassian did not accept the API token (401 \"Client must be authenticated\"): it \
             has expired or was revoked (Atlassian tokens last at most a year), or the e-mail \
             and token do not belong together; create a new token and rotate it in",
        )
    } else {
        AuthCheck::failed(
            AuthFailure::InvalidCredentials,
            "Atlassian did not accept the e-mail and API token (401); check both and rotate a \
             new token in",
        )
    };
    if !scoped {
        c.add_sentence(
            "A scoped token (service accounts can only create scoped ones) works only through \
             api.atlassian.com: register it with scoped = true (--scoped).",
        );
    }
    c
}

fn forbidden(credential: &Credential) -> AuthCheck {
    let mut c = AuthCheck::failed(
        AuthFailure::InsufficientPermissions,
        match credential {
            Credential::OAuthClientCredentials { .. } => {
                "Jira refused the service account (403): it has no Jira product access; give \
                 it app access at admin.atlassian.com → Directory → Service accounts → the \
                 account → App access, then grant it the projects' permissions"
            }
            _ => "Jira refused the token (403): the user lacks product access (Browse users and groups)",
        },
    );
    c.missing_permissions = vec!["Jira product access".to_owned()];
    c
}

impl JiraCloudBackend {
    fn token_url(&self) -> String {
        format!("{}/oauth/token", self.ctx.oauth.jira_auth_url)
    }

    fn gateway(&self, cloud_id: &str) -> String {
        format!("{}/ex/jira/{cloud_id}", self.ctx.oauth.jira_api_url)
    }

    /// The stored cloud id, or the one the site's tenant-info endpoint names (`true`: found
    /// now, to be stored).
    async fn cloud_id(
        &self,
        site: &str,
        stored: Option<&str>,
    ) -> Result<(String, bool), BackendError> {
        match stored {
            Some(id) => Ok((id.to_owned(), false)),
            None => Ok((self.cloud_id_of(site).await?, true)),
        }
    }

    /// The site's cloud id from `{site}/_edge/tenant_info`, which answers without any user.
    async fn cloud_id_of(&self, site: &str) -> Result<String, BackendError> {
        let url = format!("{site}/_edge/tenant_info");
        let r = self
            .ctx
            .http
            .get(&url, &[])
            .await
            .map_err(|e| BackendError::unreachable(VENDOR, &e))?;
        let no_site = |why: String| BackendError::Rejected {
            failure: AuthFailure::Misconfigured,
            message: format!("there is no Atlassian site at {site} ({why}); {URL_HINT}"),
        };
        match r.status {
            200 => serde_json::from_slice::<TenantInfo>(&r.body)
                .ok()
                .map(|t| t.cloud_id)
                .filter(|id| valid_cloud_id(id))
                .ok_or_else(|| no_site("its tenant info is not an Atlassian answer".to_owned())),
            429 | 500.. => Err(BackendError::Transient {
                failure: if r.status == 429 {
                    AuthFailure::RateLimited
                } else {
                    AuthFailure::UpstreamError
                },
                message: format!("the site's tenant info answered HTTP {}", r.status),
                retry_after: r.retry_after().map(Duration::from_secs),
            }),
            s => Err(no_site(format!("its tenant info answered HTTP {s}"))),
        }
    }

    /// A service account's OAuth 2.0 client credentials: a 60-minute token, no refresh token,
    /// minted again ahead of expiry; calls go through the API gateway.
    async fn client_credentials(&self, target: &Target<'_>) -> Result<Issued, BackendError> {
        let cc = oauth::ClientCredentials::of(target.credential)
            .ok_or_else(|| BackendError::Unsupported("not client credentials".to_owned()))?;
        let (cloud_id, found) = self.cloud_id(target.base_url, cc.cloud_id).await?;
        // A form body with only the documented parameters, as the grant is used in the wild.
        let http = OAuthHttp::form(&self.ctx.http);
        let resp = cc
            .mint(&http, &self.token_url(), &[], |e, http| {
                oauth::classify(
                    VENDOR,
                    e,
                    http.last(),
                    fix_hint(target.credential),
                    "check the service account's client id and secret (admin.atlassian.com → \
                         Directory → Service accounts → Credentials); a deleted credential cannot \
                         be recovered, create a new one",
                )
            })
            .await?;
        let mut issued =
            oauth::issued_from(&resp, Duration::from_secs(3600), self.gateway(&cloud_id));
        if found {
            issued.updated_credential = with_cloud_id(target.credential, &cloud_id);
        }
        Ok(issued)
    }

    /// `Authorization: Basic base64(email:token)`: at the site, or through the API gateway for
    /// a scoped token.
    async fn api_token(&self, target: &Target<'_>) -> Result<Issued, BackendError> {
        let Credential::EmailApiToken {
            email,
            token,
            scoped,
            cloud_id,
            ..
        } = target.credential
        else {
            return Err(BackendError::Unsupported("not an API token".to_owned()));
        };
        let header = basic(email, token.expose_secret());
        if !scoped {
            return Ok(Issued::static_header(header, target.base_url));
        }
        let (id, found) = self.cloud_id(target.base_url, cloud_id.as_deref()).await?;
        let mut issued = Issued::static_header(header, self.gateway(&id));
        if found {
            issued.updated_credential = with_cloud_id(target.credential, &id);
        }
        Ok(issued)
    }

    /// The cloud id of the registered site among the sites the grant covers.
    ///
    /// The code is spent and the fresh grant lives only in this call until a site is picked,
    /// so a list that failed on the way (a 5xx, a 429 with a `Retry-After` of at most 5 s, the
    /// network) is asked for again, at most three times within 15 s, before the grant is given
    /// up.
    async fn pick_site(&self, site: &str, access: &SecretString) -> Result<String, BackendError> {
        let give_up = tokio::time::Instant::now() + SITE_LIST_BUDGET;
        let mut pause = Duration::from_secs(1);
        let mut tries = 1;
        let sites = loop {
            let answer = if tries == 1 {
                self.accessible_resources(access).await
            } else {
                tokio::time::timeout_at(give_up, self.accessible_resources(access))
                    .await
                    .unwrap_or_else(|_| {
                        Err((site_list_failed("took too long".to_owned(), None), false))
                    })
            };
            let wait = match &answer {
                Err((BackendError::Transient { retry_after, .. }, true)) => retry_after
                    .map_or(Some(pause), |d| {
                        (d <= MAX_SITE_LIST_PAUSE).then_some(d.max(pause))
                    }),
                _ => None,
            };
            match wait {
                Some(w) if tries < SITE_LIST_TRIES && tokio::time::Instant::now() + w < give_up => {
                    tokio::time::sleep(w).await;
                    pause *= 2;
                    tries += 1;
                }
                _ => break answer.map_err(|(e, _)| e)?,
            }
        };
        let want = normalize_site(site);
        if let Some(s) = sites.iter().find(|s| normalize_site(&s.url) == want) {
            // It goes into every API URL (`/ex/jira/{id}`): the shape tenant_info checks too.
            if !valid_cloud_id(&s.id) {
                return Err(BackendError::Transient {
                    failure: AuthFailure::UpstreamError,
                    message: "Atlassian's accessible-resources named a malformed cloud id"
                        .to_owned(),
                    retry_after: None,
                });
            }
            return Ok(s.id.clone());
        }
        // Vendor text, shown to an admin: a few sites, each cut short, no control characters.
        let list: Vec<String> = sites
            .iter()
            .take(10)
            .map(|s| shown(&format!("{} ({})", s.url, s.name)))
            .collect();
        Err(BackendError::Rejected {
            failure: AuthFailure::Misconfigured,
            message: if list.is_empty() {
                format!("the grant covers no Jira site; pick {site} on the consent page and connect again")
            } else {
                format!(
                    "the grant covers {} but not {site}; pick {site} on the consent page (or fix \
                     the site URL) and connect again",
                    list.join(", ")
                )
            },
        })
    }

    /// The sites the grant covers (`GET {api}/oauth/token/accessible-resources`); a failure
    /// says whether asking again may help (the network, a 5xx, a 429).
    async fn accessible_resources(
        &self,
        access: &SecretString,
    ) -> Result<Vec<Resource>, (BackendError, bool)> {
        let url = format!(
            "{}/oauth/token/accessible-resources",
            self.ctx.oauth.jira_api_url
        );
        let r = self
            .ctx
            .http
            .get(&url, &[bearer(access)])
            .await
            .map_err(|e| (BackendError::unreachable(VENDOR, &e), true))?;
        if r.status != 200 {
            let again = r.status == 429 || r.status >= 500;
            let why = format!("answered HTTP {}", r.status);
            let retry_after = r.retry_after().map(Duration::from_secs);
            return Err((site_list_failed(why, retry_after), again));
        }
        serde_json::from_slice(&r.body).map_err(|_| {
            (
                site_list_failed("answer was unreadable".to_owned(), None),
                false,
            )
        })
    }

    fn issued(
        &self,
        client_id: &str,
        client_secret: &SecretString,
        scopes: &[String],
        resp: &oauth::VendorTokenResponse,
        previous: Option<&crate::model::Grant>,
        cloud_id: String,
    ) -> Result<Issued, BackendError> {
        let api_base = format!("{}/ex/jira/{cloud_id}", self.ctx.oauth.jira_api_url);
        let mut issued = oauth::issued_from(resp, Duration::from_secs(3600), api_base);
        issued.updated_credential = Some(oauth::credential_with_grant(
            client_id,
            client_secret,
            oauth::GrantScopes {
                stored: scopes,
                asked: &scopes_with_offline(scopes),
            },
            resp,
            previous,
            Some(unix_now() + self.ctx.oauth.jira_refresh_idle_limit.as_secs()),
            Some(cloud_id),
            VENDOR,
        )?);
        Ok(issued)
    }
}

fn classify(e: &oauth::TokenRequestError, http: &OAuthHttp) -> BackendError {
    oauth::classify(
        VENDOR,
        e,
        http.last(),
        &format!("the grant is expired or revoked; {RECONNECT}"),
        "check the app's client id and secret in the Atlassian developer console",
    )
}

/// Atlassian's site list failed: `why` ends "Atlassian's accessible-resources …".
fn site_list_failed(why: String, retry_after: Option<Duration>) -> BackendError {
    BackendError::Transient {
        failure: AuthFailure::UpstreamError,
        message: format!("Atlassian's accessible-resources {why}"),
        retry_after,
    }
}

/// `credential` with the site's cloud id stored (service accounts and scoped tokens).
fn with_cloud_id(credential: &Credential, id: &str) -> Option<Credential> {
    let mut settled = credential.clone();
    match &mut settled {
        Credential::OAuthClientCredentials { cloud_id, .. }
        | Credential::EmailApiToken { cloud_id, .. } => *cloud_id = Some(id.to_owned()),
        _ => return None,
    }
    Some(settled)
}

/// Cloud ids are UUIDs; anything else from the network is not put into a URL.
fn valid_cloud_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TenantInfo {
    cloud_id: String,
}

#[derive(Deserialize)]
struct Resource {
    id: String,
    #[serde(default)]
    name: String,
    url: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Myself {
    #[serde(default)]
    account_id: String,
    display_name: Option<String>,
    email_address: Option<String>,
    active: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Site names and URLs from the vendor reach an admin's message cut short and without
    /// control characters; a cloud id that would change an API URL's path is refused.
    #[test]
    fn vendor_text_is_cut_and_cloud_ids_are_checked() {
        let hostile = format!(
            "evil\r\nX-Injected: 1\u{202E}gnp.exe\u{200B}\u{2028}{}",
            "a".repeat(10_000)
        );
        let s = shown(&hostile);
        assert!(s.starts_with("evilX-Injected: 1gnp.exeaaa"), "{s}");
        assert_eq!(s.chars().count(), 120, "{s}");
        assert!(valid_cloud_id("1324a887-45db-1bf4-1e99-ef0ff456d421"));
        for bad in ["", "../admin", "a/b", "id?x=1", &"a".repeat(65)] {
            assert!(!valid_cloud_id(bad), "{bad}");
        }
    }
}
