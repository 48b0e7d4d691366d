//! Zendesk: "Connect with Zendesk" (OAuth authorization code with PKCE S256), then rotating
//! refresh tokens (`docs/systems/zendesk.md`).
//!
//! - Authorize: `{base}/oauth/authorizations/new`; token: `POST {base}/oauth/tokens` with a JSON
//!   body. The broker asks for explicit `expires_in` / `refresh_token_expires_in` so it always
//!   knows both lifetimes; a response without them gets the documented defaults, never
//!   "forever".
//! - A refresh returns a new refresh token and deletes the previous pair at once: the token
//!   cache's single flight and durable rotation are what keep the grant alive.
//! - Identity: `GET /api/v2/users/me.json` answers 200 even to anonymous callers, so the user
//!   must have a non-null id and the agent or admin role.

use std::time::Duration;

use async_trait::async_trait;
use oauth2::{AuthorizationCode, PkceCodeVerifier, RedirectUrl, RefreshToken};
use serde::Deserialize;

use super::classify::{common, not_the_api, shown, unreachable};
use super::http::{parse_base_url, url_string};
use super::oauth::{self, OAuthHttp};
use super::{
    AuthorizeRequest, Backend, BackendContext, BackendError, EgressPolicy, Issued, Target,
};
use crate::model::{unix_now, AuthCheck, AuthFailure, Credential, Identity, SystemKind};

const VENDOR: &str = "Zendesk";
const URL_HINT: &str = "enter your Zendesk address, e.g. https://acme.zendesk.com";
/// Scopes asked for when the admin names none.
pub const DEFAULT_SCOPES: &[&str] = &["read", "write"];
const RECONNECT: &str = "reconnect it with `credbrokerctl system connect SYSTEM_ID`";

/// The Zendesk backend.
pub struct ZendeskBackend {
    ctx: BackendContext,
}

impl ZendeskBackend {
    /// A backend using the shared plumbing.
    pub fn new(ctx: BackendContext) -> Self {
        Self { ctx }
    }
}

fn scopes_or_default(scopes: &[String]) -> Vec<String> {
    if scopes.is_empty() {
        DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect()
    } else {
        scopes.to_vec()
    }
}

#[async_trait]
impl Backend for ZendeskBackend {
    fn kind(&self) -> SystemKind {
        SystemKind::Zendesk
    }

    fn canonical_base_url(&self, raw: &str, egress: &EgressPolicy) -> Result<String, String> {
        let mut base = parse_base_url(raw, egress)?;
        if base.is_stand_in {
            return Ok(url_string(&base.url));
        }
        let host = base.url.host_str().unwrap_or_default();
        if !host.ends_with(".zendesk.com") || host.split('.').count() != 3 {
            return Err(URL_HINT.to_owned());
        }
        base.url.set_path("");
        Ok(url_string(&base.url))
    }

    fn uses_pkce(&self) -> bool {
        true
    }

    fn authorize_url(
        &self,
        target: &Target<'_>,
        request: &AuthorizeRequest<'_>,
    ) -> Result<String, BackendError> {
        let flow = oauth::code_flow(target.credential, VENDOR)?;
        oauth::authorize_url(
            &format!("{}/oauth/authorizations/new", target.base_url),
            flow.client_id,
            &scopes_or_default(flow.scopes),
            request,
        )
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
        let client = oauth::client(client_id, Some(client_secret), &self.token_url(target))?
            .set_redirect_uri(redirect);
        let http = OAuthHttp::json(&self.ctx.http);
        let mut req = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .add_extra_param("scope", scopes_or_default(scopes).join(" "))
            .add_extra_param(
                "expires_in",
                self.ctx
                    .oauth
                    .zendesk_access_token_ttl
                    .as_secs()
                    .to_string(),
            )
            .add_extra_param(
                "refresh_token_expires_in",
                self.ctx
                    .oauth
                    .zendesk_refresh_token_ttl
                    .as_secs()
                    .to_string(),
            );
        if let Some(v) = request.pkce_verifier {
            req = req.set_pkce_verifier(PkceCodeVerifier::new(v.expose_secret().to_owned()));
        }
        let resp = req
            .request_async(&http)
            .await
            .map_err(|e| classify(&e, &http))?;
        self.issued(target, &resp, None)
    }

    async fn issue(&self, target: &Target<'_>) -> Result<Issued, BackendError> {
        if let Some(cc) = oauth::ClientCredentials::of(target.credential) {
            return self.client_credentials(target, &cc).await;
        }
        let flow = oauth::code_flow(target.credential, VENDOR)?;
        let client_id = flow.client_id;
        let client_secret = flow.client_secret;
        let grant = flow.connected(VENDOR, RECONNECT)?;
        let client = oauth::client(client_id, Some(client_secret), &self.token_url(target))?;
        let http = OAuthHttp::json(&self.ctx.http);
        let resp = client
            .exchange_refresh_token(&RefreshToken::new(
                grant.refresh_token.expose_secret().to_owned(),
            ))
            .add_extra_param(
                "expires_in",
                self.ctx
                    .oauth
                    .zendesk_access_token_ttl
                    .as_secs()
                    .to_string(),
            )
            .add_extra_param(
                "refresh_token_expires_in",
                self.ctx
                    .oauth
                    .zendesk_refresh_token_ttl
                    .as_secs()
                    .to_string(),
            )
            .request_async(&http)
            .await
            .map_err(|e| classify(&e, &http))?;
        self.issued(target, &resp, Some(grant))
    }

    async fn verify(&self, target: &Target<'_>, issued: &Issued) -> AuthCheck {
        let fix = fix_hint(target.credential);
        let resp = match self
            .ctx
            .http
            .get(
                &format!("{}/api/v2/users/me.json", target.base_url),
                &issued.headers,
            )
            .await
        {
            Ok(r) => r,
            Err(e) => return unreachable(VENDOR, &e),
        };
        let mut check = match resp.status {
            200 => match serde_json::from_slice::<Me>(&resp.body) {
                Ok(Me { user: Some(u) }) => match (u.id, u.role.as_deref()) {
                    (None, _) => {
                        return AuthCheck::failed(
                            AuthFailure::InvalidCredentials,
                            format!(
                            "Zendesk treated the token as anonymous (users/me has no id); {fix}"
                        ),
                        )
                    }
                    (Some(_), Some("agent" | "admin")) => AuthCheck::ok(
                        Identity {
                            id: u.id.map(|i| i.to_string()).unwrap_or_default(),
                            display_name: u.name.unwrap_or_default(),
                            email: u.email.unwrap_or_default(),
                        },
                        "the grant authenticates",
                    ),
                    (Some(_), role) => {
                        let mut c = AuthCheck::failed(
                            AuthFailure::InsufficientPermissions,
                            format!(
                                "the Zendesk user the token acts as is a{} {}, not an agent or \
                                 admin; {}",
                                if role.unwrap_or("").starts_with(['a', 'e']) {
                                    "n"
                                } else {
                                    ""
                                },
                                role.map_or_else(|| "unknown role".to_owned(), shown),
                                if matches!(
                                    target.credential,
                                    Credential::OAuthClientCredentials { .. }
                                ) {
                                    "the token acts as the admin who created the OAuth client: \
                                     have an agent or admin create it"
                                } else {
                                    "reconnect as an agent or admin"
                                }
                            ),
                        );
                        c.missing_permissions = vec!["agent or admin role".to_owned()];
                        return c;
                    }
                },
                _ => return not_the_api(VENDOR, URL_HINT),
            },
            401 => {
                return AuthCheck::failed(
                    AuthFailure::InvalidCredentials,
                    format!("Zendesk could not authenticate the token (401); {fix}"),
                )
            }
            403 => {
                return AuthCheck::failed(
                    AuthFailure::InsufficientPermissions,
                    format!("Zendesk refused the token (403): a scope or role is missing; {fix}"),
                )
            }
            _ => return common(VENDOR, &resp, URL_HINT),
        };
        if let Credential::OAuthAuthorizationCode {
            scopes,
            grant: Some(g),
            ..
        } = target.credential
        {
            let missing = oauth::missing_scopes(&scopes_or_default(scopes), &g.granted_scopes);
            check = super::classify::with_missing(
                check,
                missing,
                &format!("Ask for the scopes and {RECONNECT}."),
            );
        }
        check
    }
}

/// What the admin does when a check fails.
fn fix_hint(credential: &Credential) -> &'static str {
    match credential {
        Credential::OAuthClientCredentials { .. } => CC_HINT,
        _ => RECONNECT,
    }
}

const CC_HINT: &str = "check the OAuth client in Zendesk Admin Center → Apps and integrations → \
                       APIs → OAuth clients (kind Confidential, its allowed scopes) and that OAuth \
                       access is enabled in the API settings";

impl ZendeskBackend {
    /// The client-credentials grant (confidential clients): always with an explicit
    /// `expires_in`; no refresh token is kept, a new token is minted ahead of expiry.
    async fn client_credentials(
        &self,
        target: &Target<'_>,
        cc: &oauth::ClientCredentials<'_>,
    ) -> Result<Issued, BackendError> {
        let ttl = self.ctx.oauth.zendesk_access_token_ttl;
        let scopes = scopes_or_default(cc.scopes);
        let cc = oauth::ClientCredentials {
            scopes: &scopes,
            ..*cc
        };
        let http = OAuthHttp::json(&self.ctx.http);
        let resp = cc
            .mint(
                &http,
                &self.token_url(target),
                &[("expires_in", ttl.as_secs().to_string())],
                |e, http| {
                    oauth::classify(
                        VENDOR,
                        e,
                        http.last(),
                        CC_HINT,
                        "check the OAuth client's unique identifier (not its numeric id) and \
                         secret in Zendesk Admin Center → Apps and integrations → APIs → OAuth \
                         clients; the client must be Confidential",
                    )
                },
            )
            .await?;
        Ok(oauth::issued_from(&resp, ttl, target.base_url.to_owned()))
    }

    fn token_url(&self, target: &Target<'_>) -> String {
        format!("{}/oauth/tokens", target.base_url)
    }

    fn issued(
        &self,
        target: &Target<'_>,
        resp: &oauth::VendorTokenResponse,
        previous: Option<&crate::model::Grant>,
    ) -> Result<Issued, BackendError> {
        let flow = oauth::code_flow(target.credential, VENDOR)?;
        let client_id = flow.client_id;
        let client_secret = flow.client_secret;
        let scopes = flow.scopes;
        // Documented defaults when the response does not say: 30 min / the asked-for TTL.
        let mut issued = oauth::issued_from(
            resp,
            Duration::from_secs(30 * 60),
            target.base_url.to_owned(),
        );
        let refresh_ttl = resp
            .extra_fields()
            .refresh_token_expires_in
            .map(Duration::from_secs)
            .unwrap_or(self.ctx.oauth.zendesk_refresh_token_ttl)
            // Zendesk's maximum is 90 days; a larger answer is not believed. A shorter one is
            // (believing more than was said would let the keep-alive come too late).
            .min(Duration::from_secs(90 * 86_400));
        issued.updated_credential = Some(oauth::credential_with_grant(
            client_id,
            client_secret,
            oauth::GrantScopes {
                stored: scopes,
                asked: &scopes_or_default(scopes),
            },
            resp,
            previous,
            oauth::fixed_refresh_expiry(resp, previous, unix_now(), refresh_ttl),
            None,
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
        "check the OAuth client's unique identifier and secret in Zendesk Admin Center → Apps and \
         integrations → APIs → OAuth Clients",
    )
}

#[derive(Deserialize)]
struct Me {
    user: Option<MeUser>,
}

#[derive(Deserialize)]
struct MeUser {
    id: Option<u64>,
    name: Option<String>,
    email: Option<String>,
    role: Option<String>,
}
