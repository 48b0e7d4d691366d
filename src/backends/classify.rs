//! Shared classification of upstream answers for authentication checks.
//!
//! Each backend handles the statuses whose meaning is vendor-specific (what a 401 or 403 means,
//! how the identity looks) and hands everything else to [`common`], so rate limits, outages,
//! wrong URLs and garbage bodies are reported the same way for every vendor.

use super::http::{TransportError, UpstreamResponse};
use crate::model::{AuthCheck, AuthFailure};

/// Maps a transport failure to an `UNREACHABLE` check.
pub fn unreachable(vendor: &str, e: &TransportError) -> AuthCheck {
    AuthCheck::failed(
        AuthFailure::Unreachable,
        format!("could not reach {vendor} ({e}); check the base URL and the network path"),
    )
}

/// Vendor text for a message (a site name, a role): see [`crate::util::text::visible`], at
/// most 120 characters. Messages reach admins' terminals, pages and logs.
pub fn shown(text: &str) -> String {
    crate::util::text::visible(text, 120)
}

/// Seconds to wait, from `Retry-After` or (Azure DevOps, Jira) `X-RateLimit-Reset` as epoch.
pub fn retry_after_secs(resp: &UpstreamResponse) -> Option<u64> {
    resp.retry_after().or_else(|| {
        let reset: u64 = resp
            .headers
            .get("x-ratelimit-reset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())?;
        Some(reset.saturating_sub(crate::model::unix_now()))
    })
}

/// The answer for statuses every vendor means the same way: 404 (wrong URL), 429 (rate limit),
/// 5xx (outage), redirects, and anything unexpected.
pub fn common(vendor: &str, resp: &UpstreamResponse, url_hint: &str) -> AuthCheck {
    match resp.status {
        404 => AuthCheck::failed(
            AuthFailure::Misconfigured,
            format!("no {vendor} API at this URL (404); {url_hint}"),
        ),
        429 => AuthCheck::failed(
            AuthFailure::RateLimited,
            match retry_after_secs(resp) {
                Some(s) => format!("{vendor} rate-limited the check (429); retry after {s} s"),
                None => format!("{vendor} rate-limited the check (429); retry later"),
            },
        ),
        300..=399 => AuthCheck::failed(
            AuthFailure::Misconfigured,
            format!(
                "{vendor} answered with a redirect (HTTP {}), which the broker does not follow; \
                 {url_hint}",
                resp.status
            ),
        ),
        s if s >= 500 => AuthCheck::failed(
            AuthFailure::UpstreamError,
            format!("{vendor} failed with HTTP {s}; try again later"),
        ),
        s => AuthCheck::failed(
            AuthFailure::UpstreamError,
            format!("{vendor} answered with unexpected HTTP {s}"),
        ),
    }
}

/// A 200 whose body is not the JSON the vendor sends: the URL points at something else (a
/// portal, a sign-in page, a hibernating instance).
pub fn not_the_api(vendor: &str, url_hint: &str) -> AuthCheck {
    AuthCheck::failed(
        AuthFailure::Misconfigured,
        format!("the URL answered, but not as the {vendor} API does; {url_hint}"),
    )
}

/// Appends the permissions that could not be verified to a check's message.
pub fn note_unverified(check: &mut AuthCheck, unverified: &[String]) {
    if !unverified.is_empty() {
        check.add_sentence(&format!(
            "Not verified (would need a write or an API this credential cannot call): {}.",
            unverified.join("; ")
        ));
    }
}

/// Turns a passing identity check into `INSUFFICIENT_PERMISSIONS` when permissions are missing.
pub fn with_missing(mut check: AuthCheck, missing: Vec<String>, fix: &str) -> AuthCheck {
    if !missing.is_empty() {
        check.ok = false;
        check.failure = Some(AuthFailure::InsufficientPermissions);
        check.message = format!("authenticated, but missing: {}. {fix}", missing.join(", "));
        check.missing_permissions = missing;
    }
    check
}
