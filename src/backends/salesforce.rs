//! Salesforce (`docs/systems/salesforce.md`).
//!
//! - **Client credentials** (`oauth_client_credentials`, an External Client App with a Run As
//!   user): `POST {my-domain}/services/oauth2/token`. The response has no `expires_in`: the
//!   expiry comes from token introspection when the app allows it, else a configured
//!   conservative lifetime; workers report 401s with `rejected_token_id` and get a re-mint.
//!   The generic `login.`/`test.salesforce.com` hosts do not support this flow and are refused.
//! - **Legacy login** (`salesforce_login`): the OAuth username-password flow when a client id and
//!   secret are given, else SOAP `login()`; the security token is appended to the password only
//!   on the wire. Both flows are being retired by Salesforce; checks say so.
//!
//! Workers get `Authorization: Bearer …` and `api_base_url` = the `instance_url` (or the SOAP
//! `serverUrl`'s origin). Identity: `/services/oauth2/userinfo`, falling back to
//! `/services/data/vNN.N/` (never the unauthenticated `/services/data/`).

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use oauth2::{ResourceOwnerPassword, ResourceOwnerUsername, Scope, TokenResponse};
use serde::Deserialize;

use super::classify::{common, not_the_api, unreachable};
use super::http::{parse_base_url, url_string};
use super::oauth::{self, OAuthHttp};
use super::{
    bearer, jwt, AuthorizeRequest, Backend, BackendContext, BackendError, EgressPolicy, Issued,
    Target,
};
use crate::model::{AuthCheck, AuthFailure, Credential, Identity, SystemKind};
use crate::secret::SecretString;

const VENDOR: &str = "Salesforce";
/// REST API version used for the fallback identity probe.
pub const API_VERSION: &str = "v62.0";
/// SOAP API version for `login()` (removed from 65.0 on).
const SOAP_VERSION: &str = "64.0";
const SETUP_DELAY_NOTE: &str = "Changes to an External Client App can take 10–20 minutes to \
                                apply, so a check right after setup may succeed a little later.";
const RETIREMENT_NOTE: &str = "Salesforce is retiring the username-password flow and SOAP \
                               login() (Summer '27): move to an External Client App with the \
                               Client Credentials Flow and register it as \
                               oauth_client_credentials.";

/// The Salesforce backend.
pub struct SalesforceBackend {
    ctx: BackendContext,
}

impl SalesforceBackend {
    /// A backend using the shared plumbing.
    pub fn new(ctx: BackendContext) -> Self {
        Self { ctx }
    }
}

fn is_generic_login_host(base_url: &str) -> bool {
    url::Url::parse(base_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .is_some_and(|h| h == "login.salesforce.com" || h == "test.salesforce.com")
}

#[async_trait]
impl Backend for SalesforceBackend {
    fn kind(&self) -> SystemKind {
        SystemKind::Salesforce
    }

    fn canonical_base_url(&self, raw: &str, egress: &EgressPolicy) -> Result<String, String> {
        let mut base = parse_base_url(raw, egress)?;
        if base.is_stand_in {
            return Ok(url_string(&base.url));
        }
        let host = base.url.host_str().unwrap_or_default();
        if !host.ends_with(".salesforce.com") {
            return Err(
                "enter your My Domain URL, e.g. https://acme.my.salesforce.com (sandbox: \
                 https://acme--dev.sandbox.my.salesforce.com)"
                    .to_owned(),
            );
        }
        base.url.set_path("");
        Ok(url_string(&base.url))
    }

    fn validate_target(&self, base_url: &str, credential: &Credential) -> Result<(), String> {
        if matches!(credential, Credential::OAuthClientCredentials { .. })
            && is_generic_login_host(base_url)
        {
            return Err(
                "the client credentials flow is not supported on login.salesforce.com or \
                 test.salesforce.com; enter your My Domain URL, e.g. https://acme.my.salesforce.com"
                    .to_owned(),
            );
        }
        Ok(())
    }

    async fn issue(&self, target: &Target<'_>) -> Result<Issued, BackendError> {
        let token_url = format!("{}/services/oauth2/token", target.base_url);
        let http = OAuthHttp::form(&self.ctx.http);
        match target.credential {
            Credential::OAuthClientCredentials {
                client_id,
                client_secret,
                scopes,
                ..
            } => {
                let client = oauth::client(client_id, Some(client_secret), &token_url)?;
                let resp = client
                    .exchange_client_credentials()
                    .add_scopes(scopes.iter().map(|s| Scope::new(s.clone())))
                    .request_async(&http)
                    .await
                    .map_err(|e| classify(&e, &http, true))?;
                let mut issued = self.issued_from_response(target.base_url, &resp)?;
                if let Some(exp) = self
                    .introspect(target.base_url, client_id, client_secret, &resp)
                    .await
                {
                    issued.expires_at = Some(exp);
                }
                Ok(issued)
            }
            Credential::SalesforceLogin {
                username,
                password,
                security_token,
                client_id: Some(client_id),
                client_secret,
            } => {
                let client = oauth::client(client_id, client_secret.as_ref(), &token_url)?;
                let wire_password = zeroize::Zeroizing::new(format!(
                    "{}{}",
                    password.expose_secret(),
                    security_token.expose_secret()
                ));
                let resp = client
                    .exchange_password(
                        &ResourceOwnerUsername::new(username.clone()),
                        &ResourceOwnerPassword::new(wire_password.to_string()),
                    )
                    .request_async(&http)
                    .await
                    .map_err(|e| classify(&e, &http, false))?;
                self.issued_from_response(target.base_url, &resp)
            }
            Credential::SalesforceLogin {
                username,
                password,
                security_token,
                client_id: None,
                ..
            } => {
                self.soap_login(target.base_url, username, password, security_token)
                    .await
            }
            Credential::SalesforceJwtBearer { .. } => self.jwt_bearer(target).await,
            Credential::OAuthAuthorizationCode { .. } => self.refresh_grant(target).await,
            _ => Err(BackendError::Unsupported(
                "Salesforce accepts oauth_client_credentials, salesforce_jwt_bearer, \
                 oauth_authorization_code or salesforce_login"
                    .to_owned(),
            )),
        }
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
            &format!("{}/services/oauth2/authorize", target.base_url),
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
        let redirect = oauth2::RedirectUrl::new(request.redirect_uri.to_owned())
            .map_err(|_| BackendError::Unsupported("invalid redirect URI".to_owned()))?;
        let client = oauth::client(
            flow.client_id,
            Some(flow.client_secret),
            &format!("{}/services/oauth2/token", target.base_url),
        )?
        .set_redirect_uri(redirect);
        let http = OAuthHttp::form(&self.ctx.http);
        let mut req = client.exchange_code(oauth2::AuthorizationCode::new(code.to_owned()));
        if let Some(v) = request.pkce_verifier {
            req =
                req.set_pkce_verifier(oauth2::PkceCodeVerifier::new(v.expose_secret().to_owned()));
        }
        let resp = req
            .request_async(&http)
            .await
            .map_err(|e| classify_grant(&e, &http))?;
        self.issued_with_grant(target, &resp, None)
    }

    async fn verify(&self, target: &Target<'_>, issued: &Issued) -> AuthCheck {
        let api = issued.api_base_url.as_str();
        let legacy = matches!(target.credential, Credential::SalesforceLogin { .. });
        let mut check = match self
            .ctx
            .http
            .get(&format!("{api}/services/oauth2/userinfo"), &issued.headers)
            .await
        {
            Ok(r) if r.status == 200 => match serde_json::from_slice::<UserInfo>(&r.body) {
                Ok(u) if !u.user_id.is_empty() => AuthCheck::ok(
                    Identity {
                        id: u.user_id,
                        display_name: u.name.or(u.preferred_username).unwrap_or_default(),
                        email: u.email.unwrap_or_default(),
                    },
                    "the credential authenticates",
                ),
                _ => self.rest_probe(api, issued).await,
            },
            // UserInfo needs identity scopes an api-only app may lack: fall back to REST.
            Ok(r) if matches!(r.status, 401 | 403) => self.rest_probe(api, issued).await,
            Ok(r) => common(VENDOR, &r, "use the My Domain URL"),
            Err(e) => unreachable(VENDOR, &e),
        };
        if legacy {
            check.add_sentence(RETIREMENT_NOTE);
        }
        check
    }
}

impl SalesforceBackend {
    /// Where workers send API calls: the instance URL Salesforce returned, accepted only on the
    /// registered host or another Salesforce host (tokens never go anywhere else).
    fn api_base(&self, base: &str, instance_url: &str) -> Result<String, BackendError> {
        let unusable = |why: &str| BackendError::Transient {
            failure: AuthFailure::UpstreamError,
            message: format!("Salesforce returned an unusable instance_url ({why})"),
            retry_after: None,
        };
        let parsed = parse_base_url(instance_url, &self.ctx.egress).map_err(|e| unusable(&e))?;
        let registered = url::Url::parse(base).map_err(|_| unusable("bad base URL"))?;
        let same_origin = parsed.url.host_str() == registered.host_str()
            && parsed.url.port_or_known_default() == registered.port_or_known_default();
        let salesforce_host = !parsed.is_stand_in
            && parsed
                .url
                .host_str()
                .is_some_and(|h| h.ends_with(".salesforce.com"));
        if !same_origin && !salesforce_host {
            return Err(unusable(
                "not the registered host and not a Salesforce host",
            ));
        }
        let mut u = parsed.url;
        u.set_path("");
        Ok(url_string(&u))
    }

    fn issued_from_response(
        &self,
        base: &str,
        resp: &oauth::VendorTokenResponse,
    ) -> Result<Issued, BackendError> {
        let instance =
            resp.extra_fields()
                .instance_url
                .as_deref()
                .ok_or_else(|| BackendError::Transient {
                    failure: AuthFailure::UpstreamError,
                    message: "Salesforce's token response has no instance_url".to_owned(),
                    retry_after: None,
                })?;
        let mut issued = oauth::issued_from(
            resp,
            self.ctx.oauth.salesforce_token_lifetime,
            self.api_base(base, instance)?,
        );
        // Identity URL: https://login.salesforce.com/id/{orgId}/{userId}
        issued.subject = resp
            .extra_fields()
            .id
            .as_deref()
            .and_then(|id| id.rsplit('/').next())
            .map(str::to_owned);
        Ok(issued)
    }

    /// The token's real expiry from introspection, when the app allows it.
    async fn introspect(
        &self,
        base: &str,
        client_id: &str,
        client_secret: &SecretString,
        resp: &oauth::VendorTokenResponse,
    ) -> Option<SystemTime> {
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("token", resp.access_token().secret())
            .append_pair("token_type_hint", "access_token")
            .append_pair("client_id", client_id)
            .append_pair("client_secret", client_secret.expose_secret())
            .finish();
        let r = self
            .ctx
            .http
            .post(
                &format!("{base}/services/oauth2/introspect"),
                &[
                    ("content-type", "application/x-www-form-urlencoded"),
                    ("accept", "application/json"),
                ],
                body.into_bytes(),
            )
            .await
            .ok()?;
        if r.status != 200 {
            return None;
        }
        let i: Introspection = serde_json::from_slice(&r.body).ok()?;
        let exp = i.exp.filter(|_| i.active)?;
        // A hostile or broken answer (`exp` near u64::MAX) must not overflow the clock.
        let at = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(exp))?;
        let left = at.duration_since(SystemTime::now()).ok()?;
        Some(oauth::expiry_in(left))
    }

    async fn rest_probe(&self, api: &str, issued: &Issued) -> AuthCheck {
        match self
            .ctx
            .http
            .get(
                &format!("{api}/services/data/{API_VERSION}/"),
                &issued.headers,
            )
            .await
        {
            Ok(r) if r.status == 200 && r.is_json() => AuthCheck::ok(
                Identity {
                    id: issued.subject.clone().unwrap_or_default(),
                    ..Identity::default()
                },
                "the credential authenticates (the app has no identity scopes, so only the user \
                 id is known)",
            ),
            // A page where the API belongs (a Site or community URL, a login page).
            Ok(r) if r.status == 200 => not_the_api(VENDOR, "use the My Domain URL"),
            Ok(r) if r.status == 401 => AuthCheck::failed(
                AuthFailure::InvalidCredentials,
                "Salesforce refused the session (401 INVALID_SESSION_ID): the token was revoked \
                 or API access is blocked for this user",
            ),
            // The org's rolling 24-hour allocation is used up: a 403, but no permission is missing.
            Ok(r) if r.status == 403 && rest_error_code(&r.body).as_deref() == Some(LIMIT) => {
                AuthCheck::failed(
                    AuthFailure::RateLimited,
                    "Salesforce's API request limit is exhausted (403 REQUEST_LIMIT_EXCEEDED): the \
                     org's rolling 24-hour allocation is used up; calls work again as the window \
                     moves (Setup → Company Information shows the usage)",
                )
            }
            Ok(r) if r.status == 403 => AuthCheck::failed(
                AuthFailure::InsufficientPermissions,
                "Salesforce refused REST access (403): give the app the api scope and the Run As \
                 user the API Enabled permission",
            ),
            Ok(r) => common(VENDOR, &r, "use the My Domain URL"),
            Err(e) => unreachable(VENDOR, &e),
        }
    }

    async fn soap_login(
        &self,
        base: &str,
        username: &str,
        password: &SecretString,
        security_token: &SecretString,
    ) -> Result<Issued, BackendError> {
        let envelope = zeroize::Zeroizing::new(format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\
             <env:Envelope xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" \
             xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" \
             xmlns:env=\"http://schemas.xmlsoap.org/soap/envelope/\"><env:Body>\
             <n1:login xmlns:n1=\"urn:partner.soap.sforce.com\"><n1:username>{}</n1:username>\
             <n1:password>{}{}</n1:password></n1:login></env:Body></env:Envelope>",
            xml_escape(username),
            xml_escape(password.expose_secret()),
            xml_escape(security_token.expose_secret()),
        ));
        let r = self
            .ctx
            .http
            .post(
                &format!("{base}/services/Soap/u/{SOAP_VERSION}"),
                &[
                    ("content-type", "text/xml; charset=UTF-8"),
                    ("soapaction", "login"),
                ],
                envelope.as_bytes().to_vec(),
            )
            .await
            .map_err(|e| BackendError::unreachable(VENDOR, &e))?;
        let body = String::from_utf8_lossy(&r.body);
        if let Some(fault) = xml_tag(&body, "faultcode") {
            let code = fault.rsplit(':').next().unwrap_or_default().to_owned();
            return Err(match code.as_str() {
                "INVALID_LOGIN" | "LOGIN_MUST_USE_SECURITY_TOKEN" | "INVALID_PASSWORD" => {
                    BackendError::Rejected {
                        failure: AuthFailure::InvalidCredentials,
                        message: format!(
                        "Salesforce refused the login ({code}): check the user name, password and \
                         security token (reset it under Settings → My Personal Information → Reset \
                         My Security Token)"
                    ),
                    }
                }
                "PASSWORD_LOCKOUT" | "INACTIVE_USER" | "INACTIVE_ORG" => BackendError::Rejected {
                    failure: AuthFailure::ExpiredOrRevoked,
                    message: format!("Salesforce refused the login ({code})"),
                },
                "API_DISABLED_FOR_ORG" | "UNSUPPORTED_CLIENT" | "INVALID_OPERATION" => {
                    BackendError::Rejected {
                        failure: AuthFailure::Misconfigured,
                        message: format!(
                            "Salesforce refused SOAP login() ({code}). {RETIREMENT_NOTE}"
                        ),
                    }
                }
                _ if code == LIMIT => BackendError::Transient {
                    failure: AuthFailure::RateLimited,
                    message: "Salesforce's API request limit is exhausted (REQUEST_LIMIT_EXCEEDED)"
                        .to_owned(),
                    retry_after: None,
                },
                _ => BackendError::Transient {
                    failure: AuthFailure::UpstreamError,
                    message: "Salesforce's login() failed with an unexpected fault".to_owned(),
                    retry_after: None,
                },
            });
        }
        if r.status != 200 {
            return Err(BackendError::Transient {
                failure: if r.status == 429 {
                    AuthFailure::RateLimited
                } else {
                    AuthFailure::UpstreamError
                },
                message: format!("Salesforce's login() answered HTTP {}", r.status),
                retry_after: r.retry_after().map(Duration::from_secs),
            });
        }
        let garbage = || BackendError::Transient {
            failure: AuthFailure::UpstreamError,
            message: "Salesforce's login() answer was unreadable".to_owned(),
            retry_after: None,
        };
        let session = xml_tag(&body, "sessionId").ok_or_else(garbage)?;
        let server = xml_tag(&body, "serverUrl").ok_or_else(garbage)?;
        let valid = xml_tag(&body, "sessionSecondsValid")
            .and_then(|s| s.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(self.ctx.oauth.salesforce_token_lifetime)
            .min(self.ctx.oauth.salesforce_token_lifetime);
        Ok(Issued {
            headers: vec![bearer(&SecretString::new(session))],
            // Held between the least and most any token is believed for: a lifetime of 0
            // would make every call a new login (and Salesforce caps logins per user).
            expires_at: Some(super::oauth::expiry_in(
                valid.max(MIN_SOAP_SESSION.min(self.ctx.oauth.salesforce_token_lifetime)),
            )),
            api_base_url: self.api_base(base, &server)?,
            updated_credential: None,
            subject: xml_tag(&body, "userId"),
        })
    }
}

fn classify(
    e: &oauth::TokenRequestError,
    http: &OAuthHttp,
    client_credentials: bool,
) -> BackendError {
    let hint = if client_credentials {
        format!(
            "check the Consumer Key and Secret, that the Client Credentials Flow is enabled and a \
             Run As user is set. {SETUP_DELAY_NOTE}"
        )
    } else {
        format!("check the user name, password and security token. {RETIREMENT_NOTE}")
    };
    let mut err = oauth::classify(VENDOR, e, http.last(), &hint, &hint);
    // Client credentials have no refresh token to lose: invalid_grant means bad setup or a
    // wrong host, not a dead grant.
    if let BackendError::Rejected { failure, message } = &mut err {
        if *failure == AuthFailure::ReauthorizationRequired {
            *failure = AuthFailure::InvalidCredentials;
            *message = format!("Salesforce refused the credentials (invalid_grant): {hint}");
        }
    }
    err
}

/// Scopes "Connect with Salesforce" asks for when the admin names none.
pub const DEFAULT_SCOPES: &[&str] = &["api", "refresh_token"];
const RECONNECT: &str = "reconnect it with `credbrokerctl system connect SYSTEM_ID`";
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// How long a JWT bearer assertion is valid for (Salesforce: at most 3 minutes).
const JWT_LIFETIME_SECS: u64 = 180;

fn scopes_or_default(scopes: &[String]) -> Vec<String> {
    if scopes.is_empty() {
        DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect()
    } else {
        scopes.to_vec()
    }
}

impl SalesforceBackend {
    /// The JWT bearer flow: a JWT signed with the app's key (`iss` = consumer key, `sub` = the
    /// user, `aud` = the login host, `exp` ≤ 3 minutes) for an access token. No refresh token and
    /// no `expires_in` come back: the token is kept for `salesforce_token_lifetime`.
    async fn jwt_bearer(&self, target: &Target<'_>) -> Result<Issued, BackendError> {
        let Credential::SalesforceJwtBearer {
            client_id,
            username,
            private_key_pem,
            login_url,
        } = target.credential
        else {
            return Err(BackendError::Unsupported(
                "not a JWT bearer credential".to_owned(),
            ));
        };
        let unusable = |why: String| BackendError::Rejected {
            failure: AuthFailure::Misconfigured,
            message: format!("the stored private key {why}; rotate in a new one"),
        };
        let signer = jwt::Signer::from_pem(private_key_pem).map_err(unusable)?;
        let claims = serde_json::json!({
            "iss": client_id,
            "sub": username,
            "aud": audience(login_url),
            "exp": crate::model::unix_now() + JWT_LIFETIME_SECS,
        });
        let assertion = signer
            .sign(jwt::Alg::Rs256, serde_json::json!({}), &claims)
            .map_err(unusable)?;
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", JWT_BEARER_GRANT)
            .append_pair("assertion", assertion.expose_secret())
            .finish();
        let r = self
            .ctx
            .http
            .post(
                &format!("{login_url}/services/oauth2/token"),
                &[
                    ("content-type", "application/x-www-form-urlencoded"),
                    ("accept", "application/json"),
                ],
                body.into_bytes(),
            )
            .await
            .map_err(|e| BackendError::unreachable("Salesforce's token endpoint", &e))?;
        if r.status == 200 {
            let resp: oauth::VendorTokenResponse =
                serde_json::from_slice(&r.body).map_err(|_| BackendError::Transient {
                    failure: AuthFailure::UpstreamError,
                    message: "Salesforce's token answer was unreadable".to_owned(),
                    retry_after: None,
                })?;
            return self.issued_from_response(target.base_url, &resp);
        }
        Err(jwt_bearer_refusal(&r))
    }

    /// "Connect with Salesforce": refreshes the grant; a rotated refresh token is stored before
    /// the access token is handed out, and the idle limit restarts.
    async fn refresh_grant(&self, target: &Target<'_>) -> Result<Issued, BackendError> {
        let flow = oauth::code_flow(target.credential, VENDOR)?;
        let grant = flow.connected(VENDOR, RECONNECT)?;
        let client = oauth::client(
            flow.client_id,
            Some(flow.client_secret),
            &format!("{}/services/oauth2/token", target.base_url),
        )?;
        let http = OAuthHttp::form(&self.ctx.http);
        let resp = client
            .exchange_refresh_token(&oauth2::RefreshToken::new(
                grant.refresh_token.expose_secret().to_owned(),
            ))
            .request_async(&http)
            .await
            .map_err(|e| classify_grant(&e, &http))?;
        self.issued_with_grant(target, &resp, Some(grant))
    }

    /// The access token and the credential carrying the (maybe rotated) grant.
    fn issued_with_grant(
        &self,
        target: &Target<'_>,
        resp: &oauth::VendorTokenResponse,
        previous: Option<&crate::model::Grant>,
    ) -> Result<Issued, BackendError> {
        let flow = oauth::code_flow(target.credential, VENDOR)?;
        // A refresh answer may leave out instance_url: the one from the grant still holds.
        let instance = resp
            .extra_fields()
            .instance_url
            .clone()
            .or_else(|| previous.and_then(|g| g.instance_url.clone()))
            .unwrap_or_else(|| target.base_url.to_owned());
        // The grant must be kept whatever else is wrong with the answer: a rotated refresh token
        // is the only one that still works. An unusable instance_url falls back to the
        // registered host.
        let api = self
            .api_base(target.base_url, &instance)
            .or_else(|_| self.api_base(target.base_url, target.base_url))?;
        let mut issued = oauth::issued_from(resp, self.ctx.oauth.salesforce_token_lifetime, api);
        let idle = self.ctx.oauth.salesforce_refresh_idle_limit;
        issued.updated_credential = Some(oauth::credential_with_grant(
            flow.client_id,
            flow.client_secret,
            oauth::GrantScopes {
                stored: flow.scopes,
                asked: &scopes_or_default(flow.scopes),
            },
            resp,
            previous,
            Some(crate::model::unix_now().saturating_add(idle.as_secs())),
            None,
            VENDOR,
        )?);
        Ok(issued)
    }
}

/// The JWT's `aud`: sandboxes (`test.` and `*.sandbox.my.salesforce.com`) expect
/// `https://test.salesforce.com` and production My Domains `https://login.salesforce.com`, even
/// when the token is requested from the My Domain; anything else (an Experience Cloud site, a
/// stand-in) is its own audience.
fn audience(login_url: &str) -> String {
    let host = url::Url::parse(login_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
        .unwrap_or_default();
    if host == "test.salesforce.com" || host.ends_with(".sandbox.my.salesforce.com") {
        "https://test.salesforce.com".to_owned()
    } else if host == "login.salesforce.com" || host.ends_with(".my.salesforce.com") {
        "https://login.salesforce.com".to_owned()
    } else {
        login_url.to_owned()
    }
}

/// What Salesforce's refusal of a JWT bearer assertion means for the admin.
fn jwt_bearer_refusal(r: &super::http::UpstreamResponse) -> BackendError {
    let retry_after = r.retry_after().map(Duration::from_secs);
    if r.status == 429 || r.status >= 500 {
        return BackendError::Transient {
            failure: if r.status == 429 {
                AuthFailure::RateLimited
            } else {
                AuthFailure::UpstreamError
            },
            message: format!("Salesforce's token endpoint answered HTTP {}", r.status),
            retry_after,
        };
    }
    #[derive(serde::Deserialize)]
    struct Refusal {
        #[serde(default)]
        error: String,
        #[serde(default)]
        error_description: String,
    }
    let e: Refusal = serde_json::from_slice(&r.body).unwrap_or(Refusal {
        error: String::new(),
        error_description: String::new(),
    });
    if e.error.is_empty() {
        // Not Salesforce's OAuth error shape (a proxy's page, a wrong host, the 403 of an
        // exhausted API allocation): try again later rather than give the system up.
        return BackendError::Transient {
            failure: AuthFailure::UpstreamError,
            message: format!(
                "Salesforce's token endpoint answered HTTP {} without an OAuth error; check the \
                 login URL if this persists",
                r.status
            ),
            retry_after,
        };
    }
    let desc = e.error_description.to_ascii_lowercase();
    if desc.contains("expired authorization code") {
        // Salesforce's word for an assertion whose `exp` had passed (`upstreams.md` §13.1):
        // a clock that drifts usually heals (NTP), so the system is not given up (as Entra's
        // AADSTS700024).
        return BackendError::Transient {
            failure: AuthFailure::Misconfigured,
            message: "Salesforce found the JWT bearer assertion expired when it read it: check \
                      the broker host's clock"
                .to_owned(),
            retry_after,
        };
    }
    let (failure, fix) = match (e.error.as_str(), desc.as_str()) {
        (_, d) if d.contains("hasn't approved") || d.contains("not approved") => (
            AuthFailure::Misconfigured,
            "the user is not pre-authorized for the app: in the External Client App's \
             policies set Permitted Users to \"Admin approved users are pre-authorized\" and add \
             the user's profile or permission set",
        ),
        ("invalid_app_access", _) => (
            AuthFailure::InsufficientPermissions,
            "the user is not admin-approved for the app: add the user's profile or permission \
             set to the External Client App's policies",
        ),
        (_, d) if d.contains("audience") => (
            AuthFailure::Misconfigured,
            "the audience (login URL) is wrong: use https://login.salesforce.com for production, \
             https://test.salesforce.com for a sandbox, or the org's My Domain",
        ),
        (_, d) if d.contains("invalid assertion") || d.contains("signature") => (
            AuthFailure::InvalidCredentials,
            "the signature does not match a certificate on the app: upload this key's \
             certificate under the External Client App's settings (Enable JWT Bearer Flow)",
        ),
        ("invalid_client_id", _) | ("invalid_client", _) => (
            AuthFailure::InvalidCredentials,
            "the consumer key is unknown: copy the External Client App's Consumer Key",
        ),
        ("unsupported_grant_type", _) => (
            AuthFailure::Misconfigured,
            "this host does not take the JWT bearer flow: check the login URL",
        ),
        _ => (
            AuthFailure::InvalidCredentials,
            "check the consumer key, the user name and the certificate uploaded to the app",
        ),
    };
    // The vendor's code goes into a message: only a short snake_case word is repeated.
    let code =
        if e.error.len() <= 40 && e.error.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            e.error.clone()
        } else {
            format!("HTTP {}", r.status)
        };
    BackendError::Rejected {
        failure,
        message: format!("Salesforce refused the JWT bearer assertion ({code}): {fix}"),
    }
}

/// A refused refresh of a connected grant (invalid_grant: revoked, rotated out, or idle too
/// long) means reconnecting.
fn classify_grant(e: &oauth::TokenRequestError, http: &OAuthHttp) -> BackendError {
    oauth::classify(
        VENDOR,
        e,
        http.last(),
        &format!(
            "the grant was revoked, rotated out or unused past the app's idle limit; {RECONNECT}"
        ),
        "check the External Client App's consumer key and secret",
    )
}

/// The least a SOAP session is believed to live: Salesforce's shortest session timeout is 15
/// minutes, so a smaller `sessionSecondsValid` is a broken answer, and believing it would make
/// every call a new login.
const MIN_SOAP_SESSION: Duration = Duration::from_secs(60);

/// The text of the first `<tag>` (with or without namespace prefix).
fn xml_tag(body: &str, tag: &str) -> Option<String> {
    let start = body
        .find(&format!("<{tag}>"))
        .map(|i| i + tag.len() + 2)
        .or_else(|| {
            let needle = format!(":{tag}>");
            body.find(&needle).map(|i| i + needle.len())
        })?;
    let rest = body.get(start..)?;
    let end = rest.find("</")?;
    Some(rest[..end].trim().to_owned())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

#[derive(Deserialize)]
struct UserInfo {
    #[serde(default)]
    user_id: String,
    name: Option<String>,
    preferred_username: Option<String>,
    email: Option<String>,
}

#[derive(Deserialize)]
struct Introspection {
    #[serde(default)]
    active: bool,
    exp: Option<u64>,
}

/// Salesforce's error code for an exhausted API allocation.
const LIMIT: &str = "REQUEST_LIMIT_EXCEEDED";

/// The `errorCode` of a REST error body (`[{"message": …, "errorCode": …}]`), if it is one.
fn rest_error_code(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get(0)?.get("errorCode")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_audiences() {
        for (login, aud) in [
            (
                "https://login.salesforce.com",
                "https://login.salesforce.com",
            ),
            (
                "https://acme.my.salesforce.com",
                "https://login.salesforce.com",
            ),
            ("https://test.salesforce.com", "https://test.salesforce.com"),
            (
                "https://acme--dev.sandbox.my.salesforce.com",
                "https://test.salesforce.com",
            ),
            (
                "https://community.acme.example",
                "https://community.acme.example",
            ),
        ] {
            assert_eq!(audience(login), aud, "{login}");
        }
    }

    /// Each of Salesforce's JWT bearer refusals (`upstreams.md` §13.1) maps to its own fix.
    #[test]
    fn jwt_bearer_refusals_name_the_fix() {
        let answer =
            |status: u16, error: &str, description: &str| super::super::http::UpstreamResponse {
                status,
                headers: Default::default(),
                body: serde_json::to_vec(
                    &serde_json::json!({"error": error, "error_description": description}),
                )
                .unwrap_or_default(),
            };
        let cases = [
            (
                answer(400, "invalid_grant", "user hasn't approved this consumer"),
                AuthFailure::Misconfigured,
                "pre-authorized",
            ),
            (
                answer(
                    400,
                    "invalid_app_access",
                    "user is not admin approved to access this app",
                ),
                AuthFailure::InsufficientPermissions,
                "admin-approved",
            ),
            (
                answer(400, "invalid_grant", "invalid assertion"),
                AuthFailure::InvalidCredentials,
                "certificate",
            ),
            (
                answer(400, "invalid_grant", "audience is invalid"),
                AuthFailure::Misconfigured,
                "test.salesforce.com",
            ),
            (
                answer(400, "invalid_grant", "expired authorization code"),
                AuthFailure::Misconfigured,
                "clock",
            ),
            (
                answer(400, "invalid_client_id", "client identifier invalid"),
                AuthFailure::InvalidCredentials,
                "Consumer Key",
            ),
            (
                answer(400, "unsupported_grant_type", "grant type not supported"),
                AuthFailure::Misconfigured,
                "login URL",
            ),
            (answer(503, "", ""), AuthFailure::UpstreamError, "HTTP 503"),
            (
                answer(403, "", ""),
                AuthFailure::UpstreamError,
                "without an OAuth error",
            ),
            (answer(429, "", ""), AuthFailure::RateLimited, "HTTP 429"),
        ];
        // A clock that drifts heals: the system is not given up for it (retried, not rejected).
        let expired =
            jwt_bearer_refusal(&answer(400, "invalid_grant", "expired authorization code"));
        assert!(matches!(expired, BackendError::Transient { .. }));
        for (r, want, needle) in cases {
            let e = jwt_bearer_refusal(&r);
            let c = e.to_check();
            assert_eq!(c.failure, Some(want), "{}", c.message);
            assert!(c.message.contains(needle), "{}", c.message);
        }
    }

    #[test]
    fn xml_tags_and_escaping() {
        let body = "<soapenv:Body><loginResponse><result><serverUrl>https://acme.my.salesforce.com/services/Soap/u/64.0/00D</serverUrl><sessionId>00D!abc</sessionId></result></loginResponse>";
        assert_eq!(xml_tag(body, "sessionId").as_deref(), Some("00D!abc"));
        assert_eq!(
            xml_tag("<sf:faultcode>sf:INVALID_LOGIN</sf:faultcode>", "faultcode").as_deref(),
            Some("sf:INVALID_LOGIN")
        );
        assert_eq!(xml_escape("a<b&'\""), "a&lt;b&amp;&apos;&quot;");
    }

    #[test]
    fn generic_login_hosts_are_refused_for_client_credentials() {
        assert!(is_generic_login_host("https://login.salesforce.com"));
        assert!(is_generic_login_host("https://test.salesforce.com"));
        assert!(!is_generic_login_host("https://acme.my.salesforce.com"));
    }
}
