//! Asana: a personal access token sent as `Authorization: Bearer {PAT}`.
//!
//! Base URL `https://app.asana.com/api/1.0`; who-am-I `GET /users/me` →
//! `data{gid, name, email}`. Errors: 401 not authorized, 402 premium only, 403 forbidden, 429
//! with `Retry-After`, 5xx. See `docs/systems/asana.md`.

use async_trait::async_trait;
use serde::Deserialize;

use super::classify::{common, unreachable};
use super::http::{parse_base_url, url_string, UpstreamResponse};
use super::{bearer, Backend, BackendContext, BackendError, EgressPolicy, Issued, Target};
use crate::model::{AuthCheck, AuthFailure, Credential, Identity, SystemKind};

/// Asana's API base.
pub const DEFAULT_BASE_URL: &str = "https://app.asana.com/api/1.0";
const HOST: &str = "app.asana.com";
const API_PATH: &str = "/api/1.0";

/// The Asana backend.
pub struct AsanaBackend {
    ctx: BackendContext,
}

impl AsanaBackend {
    /// A backend using the shared plumbing.
    pub fn new(ctx: BackendContext) -> Self {
        Self { ctx }
    }
}

#[async_trait]
impl Backend for AsanaBackend {
    fn kind(&self) -> SystemKind {
        SystemKind::Asana
    }

    fn canonical_base_url(&self, raw: &str, egress: &EgressPolicy) -> Result<String, String> {
        if raw.trim().is_empty() {
            return Ok(DEFAULT_BASE_URL.to_owned());
        }
        let mut base = parse_base_url(raw, egress)?;
        if base.is_stand_in {
            return Ok(url_string(&base.url));
        }
        if base.url.host_str() != Some(HOST) || base.url.port().is_some() {
            return Err(format!(
                "Asana's API lives at {DEFAULT_BASE_URL}; enter that (or leave base_url empty)"
            ));
        }
        match base.url.path() {
            "" | "/" => base.url.set_path(API_PATH),
            API_PATH => {}
            _ => {
                return Err(format!(
                    "unexpected path for Asana; enter {DEFAULT_BASE_URL} (or leave base_url empty)"
                ))
            }
        }
        Ok(url_string(&base.url))
    }

    async fn verify(&self, target: &Target<'_>, issued: &Issued) -> AuthCheck {
        let url = format!("{}/users/me", target.base_url);
        match self.ctx.http.get(&url, &issued.headers).await {
            Ok(resp) => classify(&resp),
            Err(e) => unreachable("Asana", &e),
        }
    }

    async fn issue(&self, target: &Target<'_>) -> Result<Issued, BackendError> {
        let Credential::PersonalAccessToken { token, .. } = target.credential else {
            return Err(BackendError::Unsupported(
                "Asana accepts only a personal access token".to_owned(),
            ));
        };
        Ok(Issued::static_header(bearer(token), target.base_url))
    }
}

fn classify(resp: &UpstreamResponse) -> AuthCheck {
    match resp.status {
        200 => match serde_json::from_slice::<MeResponse>(&resp.body) {
            Ok(MeResponse { data: Some(user) }) if !user.gid.is_empty() => AuthCheck::ok(
                Identity {
                    id: user.gid,
                    display_name: user.name.unwrap_or_default(),
                    email: user.email.unwrap_or_default(),
                },
                "the personal access token authenticates",
            ),
            _ => AuthCheck::failed(
                AuthFailure::Misconfigured,
                "the URL answered 200 but not with an Asana user; is the base URL Asana's API \
                 (https://app.asana.com/api/1.0)?",
            ),
        },
        401 => AuthCheck::failed(
            AuthFailure::InvalidCredentials,
            "Asana rejected the personal access token (401 Not Authorized); create a new one \
             under Settings → Apps → Manage Developer Apps and rotate it in",
        ),
        402 => AuthCheck::failed(
            AuthFailure::InsufficientPermissions,
            "Asana answered 402: the workspace needs a premium plan for this API",
        ),
        403 => AuthCheck::failed(
            AuthFailure::InsufficientPermissions,
            "Asana answered 403: the token's user may not read its profile, or a super admin \
             disallowed personal access tokens in this domain",
        ),
        _ => common("Asana", resp, "use https://app.asana.com/api/1.0"),
    }
}

#[derive(Deserialize)]
struct MeResponse {
    data: Option<MeUser>,
}

#[derive(Deserialize)]
struct MeUser {
    #[serde(default)]
    gid: String,
    name: Option<String>,
    email: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> AsanaBackend {
        AsanaBackend::new(BackendContext::for_tests())
    }

    #[test]
    fn base_url_forms() {
        let b = backend();
        let p = EgressPolicy::default();
        assert_eq!(b.canonical_base_url("", &p).unwrap(), DEFAULT_BASE_URL);
        assert_eq!(
            b.canonical_base_url("https://APP.asana.com/", &p).unwrap(),
            DEFAULT_BASE_URL
        );
        assert_eq!(
            b.canonical_base_url("app.asana.com/api/1.0/", &p).unwrap(),
            DEFAULT_BASE_URL
        );
        assert!(b
            .canonical_base_url("https://evil.example.com/api/1.0", &p)
            .is_err());
        assert!(b.canonical_base_url("http://127.0.0.1:9/x", &p).is_err());
        let allow = EgressPolicy {
            allow_http: true,
            allow: crate::backends::egress::AllowList::parse("127.0.0.1").unwrap(),
            ..Default::default()
        };
        assert_eq!(
            b.canonical_base_url("http://127.0.0.1:9/x/", &allow)
                .unwrap(),
            "http://127.0.0.1:9/x"
        );
    }
}
