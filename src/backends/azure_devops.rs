//! Azure DevOps Services and Server: a PAT sent as `Authorization: Basic base64(":" + PAT)`, or
//! (Services) a Microsoft Entra service principal's bearer token (`entra.rs`).
//!
//! `CheckAuthentication` never trusts a status alone (`docs/systems/azure-devops.md`):
//! - `_apis/connectionData` answers 200 to anonymous callers: the body's `authenticatedUser` must
//!   not be the anonymous identity; a malformed header gets a 203 HTML sign-in page;
//! - a missing scope is a 401 `TF400813`, like a bad PAT, so after identity succeeds each scope a
//!   sync needs is probed with one cheap read, and Project Collection Administrators membership
//!   with the permissions API (as the incumbent sync tool's troubleshooting guide does).
//!
//! Base URLs: `https://dev.azure.com/{org}`, `https://{org}.visualstudio.com`, or a Server
//! collection URL (`https://server/tfs/Collection`).

use async_trait::async_trait;
use serde::Deserialize;

use super::classify::{
    common, not_the_api, note_unverified, retry_after_secs, unreachable, with_missing,
};
use super::http::{parse_base_url, url_string, UpstreamResponse};
use super::{basic, Backend, BackendContext, BackendError, EgressPolicy, Header, Issued, Target};
use crate::model::{AuthCheck, AuthFailure, Credential, Identity, SystemKind};

const VENDOR: &str = "Azure DevOps";
const URL_HINT: &str = "enter the organization URL (https://dev.azure.com/{organization}) or, for \
                        Azure DevOps Server, the collection URL (https://server/tfs/Collection)";
/// The anonymous identity Azure DevOps reports for unauthenticated callers.
const ANONYMOUS_ID: &str = "aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa";
/// Headers that make Azure DevOps answer 401 instead of redirecting to a sign-in page, and
/// the two without which connectionData gives the anonymous user's answer whatever the
/// credential (Git Credential Manager's finding, upstreams.md §1.2): an encoding this client
/// reads (no compression) and a cache directive.
const EXTRA: &[(&str, &str)] = &[
    ("x-tfs-fedauthredirect", "Suppress"),
    ("accept-encoding", "identity"),
    ("cache-control", "no-cache"),
];
/// Security namespace and bits of Exalate's "is the proxy user a collection admin" probe.
const PCA_PROBE: &str =
    "_apis/permissions/11238e09-49f2-40c7-94d0-8f0307204ce4/15?alwaysAllowAdministrators=true";

/// Scope names as the PAT dialog shows them.
pub const SCOPE_WORK_ITEMS: &str = "Work Items (Read & Write)";
/// See [`SCOPE_WORK_ITEMS`].
pub const SCOPE_PROJECT: &str = "Project and Team (Read)";
/// See [`SCOPE_WORK_ITEMS`].
pub const SCOPE_IDENTITY: &str = "Identity (Read)";
/// See [`SCOPE_WORK_ITEMS`].
pub const SCOPE_ENTITLEMENTS: &str = "Member Entitlement Management (Read)";
/// The group the proxy user must belong to.
pub const PCA_GROUP: &str = "Project Collection Administrators membership";

/// The Azure DevOps backend.
pub struct AzureDevOpsBackend {
    ctx: BackendContext,
}

impl AzureDevOpsBackend {
    /// A backend using the shared plumbing.
    pub fn new(ctx: BackendContext) -> Self {
        Self { ctx }
    }
}

/// Where the organization-level services live for a base URL.
#[derive(Debug, PartialEq, Eq)]
enum Deployment {
    /// `https://dev.azure.com/{org}`.
    Services { org: String },
    /// `https://{org}.visualstudio.com`.
    Legacy { org: String },
    /// Azure DevOps Server (or a stand-in): everything under the collection URL.
    Server,
}

fn deployment(base: &str) -> Deployment {
    let Ok(url) = url::Url::parse(base) else {
        return Deployment::Server;
    };
    match url.host_str() {
        Some("dev.azure.com") if url.scheme() == "https" => Deployment::Services {
            org: url.path().trim_matches('/').to_owned(),
        },
        Some(h) if url.scheme() == "https" && h.ends_with(".visualstudio.com") => {
            Deployment::Legacy {
                org: h.trim_end_matches(".visualstudio.com").to_owned(),
            }
        }
        _ => Deployment::Server,
    }
}

/// The base URL of an organization-level service (`vssps` for identities, `vsaex` for
/// entitlements).
fn service_base(base: &str, service: &str) -> String {
    match deployment(base) {
        Deployment::Services { org } => format!("https://{service}.dev.azure.com/{org}"),
        Deployment::Legacy { org } => format!("https://{org}.{service}.visualstudio.com"),
        Deployment::Server => base.to_owned(),
    }
}

fn pat_header(credential: &Credential) -> Option<Header> {
    match credential {
        Credential::PersonalAccessToken {
            token, username, ..
        } => Some(basic(
            username.as_deref().unwrap_or(""),
            token.expose_secret(),
        )),
        _ => None,
    }
}

#[async_trait]
impl Backend for AzureDevOpsBackend {
    fn kind(&self) -> SystemKind {
        SystemKind::AzureDevOps
    }

    fn canonical_base_url(&self, raw: &str, egress: &EgressPolicy) -> Result<String, String> {
        let mut base = parse_base_url(raw, egress)?;
        if base.is_stand_in {
            return Ok(url_string(&base.url));
        }
        let host = base.url.host_str().unwrap_or_default().to_owned();
        let segments: Vec<String> = base
            .url
            .path_segments()
            .map(|s| s.filter(|p| !p.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default();
        if host == "dev.azure.com" {
            // Keep the organization; a pasted project or work-item URL is reduced to it.
            let Some(org) = segments.first() else {
                return Err(format!(
                    "add your organization: https://dev.azure.com/{{organization}}; {URL_HINT}"
                ));
            };
            base.url.set_path(org);
        } else if host.ends_with(".visualstudio.com") {
            if host.split('.').count() != 3 {
                return Err(format!("'{host}' is not an organization host; {URL_HINT}"));
            }
            base.url.set_path("");
        } else if segments.is_empty() {
            return Err(format!(
                "an Azure DevOps Server URL needs the collection, e.g. https://{host}/tfs/DefaultCollection"
            ));
        }
        Ok(url_string(&base.url))
    }

    fn validate_target(&self, base_url: &str, credential: &Credential) -> Result<(), String> {
        if !is_principal(credential) {
            return Ok(());
        }
        // Entra tokens for Azure DevOps work in every organization the principal belongs to:
        // they go to Azure DevOps Services only (or a stand-in under allow_http).
        let stand_in = base_url.starts_with("http://") && self.ctx.egress.allow_http;
        if deployment(base_url) == Deployment::Server && !stand_in {
            return Err(
                "Entra service principals work with Azure DevOps Services (dev.azure.com, \
                 *.visualstudio.com); Azure DevOps Server needs a PAT"
                    .to_owned(),
            );
        }
        super::entra::check_app(
            credential,
            self.ctx.egress.allow_http,
            &self.ctx.oauth.entra_federated_token_dir,
        )
    }

    async fn verify(&self, target: &Target<'_>, issued: &Issued) -> AuthCheck {
        let auth = issued.headers.as_slice();
        let url = format!("{}/_apis/connectionData", target.base_url);
        let resp = match self.ctx.http.get_with(&url, auth, EXTRA).await {
            Ok(r) => r,
            Err(e) => return unreachable(VENDOR, &e),
        };
        let identity = match identify(&resp, target.credential) {
            Ok(id) => id,
            Err(check) => return check,
        };
        let principal = is_principal(target.credential);
        let mut check = AuthCheck::ok(
            identity,
            if principal {
                "the service principal authenticates"
            } else {
                "the PAT authenticates"
            },
        );
        let (missing, unverified) = self.probe_permissions(target.base_url, auth).await;
        if let Some(delay) = throttling(&resp) {
            check
                .message
                .push_str(&format!(" Azure DevOps is throttling this user ({delay})."));
        }
        let mut check = with_missing(
            check,
            missing,
            if principal {
                "Give the service principal an access level and add it to Project Collection \
                 Administrators (Organization settings → Users / Permissions), then check again."
            } else {
                "Edit the PAT's scopes (User settings → Personal access tokens) or add the proxy \
                 user to Project Collection Administrators, then check again."
            },
        );
        note_unverified(&mut check, &unverified);
        if let Some(note) =
            crate::model::legacy_note(SystemKind::AzureDevOps, target.credential.credential_type())
        {
            check.add_sentence(note);
        }
        check
    }

    async fn issue(&self, target: &Target<'_>) -> Result<Issued, BackendError> {
        if let Some(app) = super::entra::EntraApp::of(target.credential) {
            let resp = app
                .mint(
                    &self.ctx.http,
                    super::entra::AZURE_DEVOPS_SCOPE,
                    &self.ctx.oauth.entra_federated_token_dir,
                )
                .await?;
            return Ok(super::oauth::issued_from(
                &resp,
                std::time::Duration::from_secs(3600),
                target.base_url.to_owned(),
            ));
        }
        let header = pat_header(target.credential).ok_or_else(|| {
            BackendError::Unsupported(
                "Azure DevOps accepts a personal access token or an Entra service principal"
                    .to_owned(),
            )
        })?;
        Ok(Issued::static_header(header, target.base_url))
    }
}

impl AzureDevOpsBackend {
    /// Probes each scope a sync needs; returns (missing, not verifiable).
    async fn probe_permissions(&self, base: &str, auth: &[Header]) -> (Vec<String>, Vec<String>) {
        let vssps = service_base(base, "vssps");
        let vsaex = service_base(base, "vsaex");
        let probes = [
            (SCOPE_PROJECT, format!("{base}/_apis/projects?$top=1&api-version=7.1")),
            (SCOPE_WORK_ITEMS, format!("{base}/_apis/wit/fields?api-version=7.1")),
            (SCOPE_IDENTITY, format!("{vssps}/_apis/identities?searchFilter=General&filterValue=a&queryMembership=None&api-version=7.1")),
            (SCOPE_ENTITLEMENTS, format!("{vsaex}/_apis/userentitlements?top=1&api-version=7.1")),
        ];
        let mut missing = Vec::new();
        let mut unverified = Vec::new();
        for (scope, url) in probes {
            match self.ctx.http.get_with(&url, auth, EXTRA).await {
                Ok(r) if r.status == 200 && r.is_json() => {}
                Ok(r) if matches!(r.status, 401 | 403 | 203) => missing.push(scope.to_owned()),
                Ok(r) => unverified.push(format!("{scope} (probe answered HTTP {})", r.status)),
                Err(e) => unverified.push(format!("{scope} ({e})")),
            }
        }
        match self
            .ctx
            .http
            .get_with(&format!("{base}/{PCA_PROBE}"), auth, EXTRA)
            .await
        {
            Ok(r) if r.status == 200 => match serde_json::from_slice::<PermissionResult>(&r.body) {
                Ok(p) if p.value.first() == Some(&true) => {}
                Ok(_) => missing.push(PCA_GROUP.to_owned()),
                Err(_) => unverified.push(format!("{PCA_GROUP} (unreadable answer)")),
            },
            Ok(r) if matches!(r.status, 401 | 403) => missing.push(PCA_GROUP.to_owned()),
            Ok(r) => unverified.push(format!("{PCA_GROUP} (probe answered HTTP {})", r.status)),
            Err(e) => unverified.push(format!("{PCA_GROUP} ({e})")),
        }
        if !missing.iter().any(|m| m == SCOPE_WORK_ITEMS) {
            unverified.push(format!("the write half of {SCOPE_WORK_ITEMS}"));
        }
        unverified.push("User Profile (Read), which only global PATs can prove".to_owned());
        (missing, unverified)
    }
}

fn is_principal(credential: &Credential) -> bool {
    matches!(credential, Credential::EntraClientCredentials { .. })
}

/// A 401/403 for a service principal: TF401444 (never added to the organization) and TF400813
/// (not authorized) each name their fix.
fn principal_refused(resp: &UpstreamResponse) -> AuthCheck {
    let body = String::from_utf8_lossy(&resp.body);
    let (what, fix) = if body.contains("TF401444") {
        (
            "the service principal has not been added to this organization (TF401444)",
            "Organization settings → Users → Add users, search the app's name, give it an \
             access level (Basic for repositories)",
        )
    } else {
        (
            "Azure DevOps does not let the service principal in (TF400813)",
            "add it to the organization (Organization settings → Users → Add users, with the \
             app from the tenant connected to the organization) and to the projects it syncs",
        )
    };
    let mut c = AuthCheck::failed(
        AuthFailure::InsufficientPermissions,
        format!("the token is valid, but {what}: {fix}"),
    );
    c.missing_permissions = vec!["membership in the organization".to_owned()];
    c
}

/// The identity from a connectionData answer, or the failing check.
// Called once per check, off the hot path; boxing the check would only add noise.
#[allow(clippy::result_large_err)]
fn identify(resp: &UpstreamResponse, credential: &Credential) -> Result<Identity, AuthCheck> {
    if is_principal(credential) && matches!(resp.status, 401 | 403) {
        return Err(principal_refused(resp));
    }
    match resp.status {
        200 if resp.is_json() => {}
        200 | 203 => {
            return Err(AuthCheck::failed(
                AuthFailure::InvalidCredentials,
                "Azure DevOps answered with a sign-in page instead of data: the PAT was not \
                 accepted (malformed, expired or revoked); create a new PAT and rotate it in",
            ))
        }
        401 => {
            return Err(AuthCheck::failed(
                AuthFailure::InvalidCredentials,
                "Azure DevOps rejected the PAT (401 TF400813). The likeliest cause: it was \
                 created for \"All accessible organizations\"; such global PATs stopped working \
                 on 2026-12-01. Create a PAT for this organization only, or move to an Entra \
                 service principal (entra_client_credentials). Otherwise it is wrong, expired or \
                 revoked: create a new PAT for this organization and rotate it in",
            ))
        }
        403 => {
            return Err(AuthCheck::failed(
                AuthFailure::InsufficientPermissions,
                "Azure DevOps refused the PAT (403): the organization's policies may block this \
                 PAT or this user's access",
            ))
        }
        _ => return Err(common(VENDOR, resp, URL_HINT)),
    }
    let data: ConnectionData =
        serde_json::from_slice(&resp.body).map_err(|_| not_the_api(VENDOR, URL_HINT))?;
    let user = data.authenticated_user.unwrap_or_default();
    let anonymous = user.id.is_empty()
        || user.id.eq_ignore_ascii_case(ANONYMOUS_ID)
        || user
            .provider_display_name
            .as_deref()
            .is_none_or(str::is_empty);
    if anonymous {
        return Err(AuthCheck::failed(
            AuthFailure::InvalidCredentials,
            "Azure DevOps treated the request as anonymous: the PAT was not accepted; check that \
             it belongs to this organization and has not expired, then rotate it in",
        ));
    }
    let email = user
        .properties
        .as_ref()
        .and_then(|p| p.get("Account"))
        .and_then(|a| a.get("$value"))
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    Ok(Identity {
        id: user.id,
        display_name: user.provider_display_name.unwrap_or_default(),
        email,
    })
}

/// A throttling note when Azure DevOps delays this user (it may send these on a 200).
fn throttling(resp: &UpstreamResponse) -> Option<String> {
    // A decimal number of seconds; anything else from the network is not repeated.
    let delay = resp
        .headers
        .get("x-ratelimit-delay")
        .and_then(|v| v.to_str().ok())
        .map(|d| {
            let secs = d.trim().parse::<f64>().ok()?;
            // Whole seconds, rounded up, at most a day.
            (secs.is_finite() && secs >= 0.0).then(|| secs.ceil().min(86_400.0) as u64)
        });
    match (delay, retry_after_secs(resp)) {
        (Some(Some(d)), _) => Some(format!("requests delayed by {d} s")),
        (Some(None), _) => Some("requests delayed".to_owned()),
        (None, Some(s)) => Some(format!("retry after {s} s")),
        _ => None,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConnectionData {
    authenticated_user: Option<IdentityDto>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct IdentityDto {
    #[serde(default)]
    id: String,
    provider_display_name: Option<String>,
    properties: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct PermissionResult {
    #[serde(default)]
    value: Vec<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> AzureDevOpsBackend {
        AzureDevOpsBackend::new(BackendContext::for_tests())
    }

    /// The delay header is a number of seconds; anything else is not repeated to the admin.
    #[test]
    fn a_throttling_note_repeats_only_a_number() {
        let with = |delay: &str| {
            let mut headers = reqwest::header::HeaderMap::new();
            if let Ok(v) = reqwest::header::HeaderValue::from_str(delay) {
                headers.insert("x-ratelimit-delay", v);
            }
            throttling(&UpstreamResponse {
                status: 200,
                headers,
                body: Vec::new(),
            })
        };
        assert_eq!(with("2.5").as_deref(), Some("requests delayed by 3 s"));
        assert_eq!(with("0.04").as_deref(), Some("requests delayed by 1 s"));
        assert_eq!(
            with("1e308").as_deref(),
            Some("requests delayed by 86400 s")
        );
        assert_eq!(with("-1").as_deref(), Some("requests delayed"));
        let hostile = format!("1 s; visit https://evil.example/{}", "a".repeat(5000));
        assert_eq!(with(&hostile).as_deref(), Some("requests delayed"));
        assert_eq!(with("NaN").as_deref(), Some("requests delayed"));
        assert_eq!(with("").as_deref(), Some("requests delayed"));
    }

    #[test]
    fn base_urls_admins_paste() {
        let b = backend();
        let p = EgressPolicy::default();
        let ok = [
            ("https://dev.azure.com/Acme", "https://dev.azure.com/Acme"),
            ("dev.azure.com/acme/", "https://dev.azure.com/acme"),
            (
                "https://DEV.azure.com/acme/Project/_workitems",
                "https://dev.azure.com/acme",
            ),
            (
                "https://acme.visualstudio.com/",
                "https://acme.visualstudio.com",
            ),
            (
                "https://tfs.corp.example/tfs/DefaultCollection/",
                "https://tfs.corp.example/tfs/DefaultCollection",
            ),
        ];
        for (raw, want) in ok {
            assert_eq!(b.canonical_base_url(raw, &p).unwrap(), want, "{raw}");
        }
        for bad in [
            "https://dev.azure.com",
            "https://tfs.corp.example",
            "http://dev.azure.com/acme",
            "https://u:p@dev.azure.com/acme",
            "https://dev.azure.com/acme#x",
        ] {
            assert!(b.canonical_base_url(bad, &p).is_err(), "{bad}");
        }
    }

    #[test]
    fn service_hosts() {
        assert_eq!(
            service_base("https://dev.azure.com/acme", "vssps"),
            "https://vssps.dev.azure.com/acme"
        );
        assert_eq!(
            service_base("https://acme.visualstudio.com", "vsaex"),
            "https://acme.vsaex.visualstudio.com"
        );
        assert_eq!(
            service_base("https://tfs/tfs/C", "vssps"),
            "https://tfs/tfs/C"
        );
    }

    #[test]
    fn header_uses_empty_user_unless_given() {
        let h = pat_header(&Credential::PersonalAccessToken {
            token: "p".into(),
            username: None,
            expires_at: None,
        })
        .unwrap();
        assert_eq!(h.value.expose_secret(), "Basic OnA="); // base64(":p")
        let h = pat_header(&Credential::PersonalAccessToken {
            token: "p".into(),
            username: Some("u".into()),
            expires_at: None,
        })
        .unwrap();
        assert_eq!(h.value.expose_secret(), "Basic dTpw"); // base64("u:p")
    }
}
