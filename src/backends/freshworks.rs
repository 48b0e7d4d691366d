//! Shared plumbing for Freshworks products (Freshdesk, Freshservice): an API key sent as
//! `Authorization: Basic base64(key + ":X")`, identity from `GET /api/v2/agents/me`, errors as
//! `{"code": "...", "message": "..."}` (`docs/systems/freshdesk.md`,
//! `docs/systems/freshservice.md`).

use serde::Deserialize;

use super::classify::{common, not_the_api, unreachable, with_missing};
use super::{basic, BackendContext, BackendError, Header, Issued, Target};
use crate::model::{AuthCheck, AuthFailure, Credential, Identity};

/// What differs between the Freshworks products.
pub struct Product {
    /// Product name for messages.
    pub vendor: &'static str,
    /// Where the admin finds the API key.
    pub key_location: &'static str,
    /// What to enter as base URL.
    pub url_hint: &'static str,
    /// The permission a 403 on `agents/me` means is missing, and how to fix it.
    pub me_forbidden: Option<(&'static str, &'static str)>,
}

/// The API root for a stored base URL.
pub fn api_base(base_url: &str) -> String {
    format!("{base_url}/api/v2")
}

fn key_header(credential: &Credential) -> Option<Header> {
    match credential {
        Credential::ApiKey { key, .. } => Some(basic(key.expose_secret(), "X")),
        _ => None,
    }
}

/// Headers for a worker.
pub fn issue(product: &Product, target: &Target<'_>) -> Result<Issued, BackendError> {
    let header = key_header(target.credential).ok_or_else(|| {
        BackendError::Unsupported(format!("{} accepts only an API key", product.vendor))
    })?;
    Ok(Issued::static_header(header, api_base(target.base_url)))
}

/// Checks the key: identity from `agents/me`, then a ticket read.
pub async fn verify(
    ctx: &BackendContext,
    product: &Product,
    target: &Target<'_>,
    issued: &Issued,
) -> AuthCheck {
    let auth = issued.headers.as_slice();
    let api = api_base(target.base_url);
    let resp = match ctx.http.get(&format!("{api}/agents/me"), auth).await {
        Ok(r) => r,
        Err(e) => return unreachable(product.vendor, &e),
    };
    let vendor = product.vendor;
    let check = match resp.status {
        200 => match parse_agent(&resp.body) {
            Some(agent) => {
                if agent.active == Some(false) {
                    return AuthCheck::failed(
                        AuthFailure::ExpiredOrRevoked,
                        format!("the {vendor} agent that owns this API key is deactivated; reactivate it or use another agent's key"),
                    );
                }
                AuthCheck::ok(agent.identity, "the API key authenticates")
            }
            None => return not_the_api(vendor, product.url_hint),
        },
        401 => {
            return AuthCheck::failed(
                AuthFailure::InvalidCredentials,
                format!(
                    "{vendor} rejected the API key (401); copy it again from {} (regenerating \
                     a key revokes the old one at once)",
                    product.key_location
                ),
            )
        }
        403 => {
            return match product.me_forbidden {
                Some((permission, fix)) => {
                    let mut c = AuthCheck::failed(
                        AuthFailure::InsufficientPermissions,
                        format!("{vendor} refused the key (403 access_denied): {fix}"),
                    );
                    c.missing_permissions = vec![permission.to_owned()];
                    c
                }
                None => AuthCheck::failed(
                    AuthFailure::InsufficientPermissions,
                    format!("{vendor} refused the key (403 access_denied): the agent's role lacks permission"),
                ),
            }
        }
        _ => return common(vendor, &resp, product.url_hint),
    };
    // A sync reads and writes tickets: the agent must at least see them.
    let mut missing = Vec::new();
    match ctx
        .http
        .get(&format!("{api}/tickets?per_page=1"), auth)
        .await
    {
        Ok(r) if r.status == 403 => missing.push("Tickets (view)".to_owned()),
        _ => {}
    }
    let mut check = with_missing(
        check,
        missing,
        &format!("Give the agent's role access to tickets in {vendor}'s admin settings, then check again."),
    );
    if check.ok {
        check
            .message
            .push_str(" Ticket write access is not verified (it would need a write).");
    }
    check
}

struct Agent {
    identity: Identity,
    active: Option<bool>,
}

/// Reads `agents/me`: Freshservice wraps it (`{"agent": {id, first_name, last_name, email,
/// active}}`), Freshdesk does not (`{id, contact: {name, email, active}}`).
fn parse_agent(body: &[u8]) -> Option<Agent> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    if let Some(a) = v.get("agent") {
        let a: ServiceAgent = serde_json::from_value(a.clone()).ok()?;
        let name = [a.first_name, a.last_name]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
        return Some(Agent {
            identity: Identity {
                id: a.id.to_string(),
                display_name: name,
                email: a.email.unwrap_or_default(),
            },
            active: a.active,
        });
    }
    let a: DeskAgent = serde_json::from_value(v).ok()?;
    let contact = a.contact.unwrap_or_default();
    Some(Agent {
        identity: Identity {
            id: a.id.to_string(),
            display_name: contact.name.unwrap_or_default(),
            email: contact.email.unwrap_or_default(),
        },
        active: contact.active,
    })
}

#[derive(Deserialize)]
struct ServiceAgent {
    id: u64,
    first_name: Option<String>,
    last_name: Option<String>,
    email: Option<String>,
    active: Option<bool>,
}

#[derive(Deserialize)]
struct DeskAgent {
    id: u64,
    contact: Option<Contact>,
}

#[derive(Deserialize, Default)]
struct Contact {
    name: Option<String>,
    email: Option<String>,
    active: Option<bool>,
}

/// Parses a `{domain}.{suffix}` URL and returns its canonical root.
pub fn canonical_root(
    raw: &str,
    egress: &super::EgressPolicy,
    suffix: &str,
    allow_custom: bool,
    hint: &str,
) -> Result<String, String> {
    let mut base = super::http::parse_base_url(raw, egress)?;
    if base.is_stand_in {
        let path = base.url.path().trim_end_matches("/api/v2").to_owned();
        base.url.set_path(&path);
        return Ok(super::http::url_string(&base.url));
    }
    let host = base.url.host_str().unwrap_or_default().to_owned();
    let is_product_host = host.ends_with(suffix) && host.len() > suffix.len() + 1;
    if !is_product_host && !allow_custom {
        return Err(hint.to_owned());
    }
    if host.ends_with(".freshservice.com") && suffix != ".freshservice.com"
        || host.ends_with(".freshdesk.com") && suffix != ".freshdesk.com"
    {
        return Err(format!(
            "'{host}' belongs to another Freshworks product; {hint}"
        ));
    }
    base.url.set_path("");
    Ok(super::http::url_string(&base.url))
}
