//! Credential health: derived from a system's record, with a reason an admin can act on.
//!
//! - **Failing** needs an admin: re-authorization required, not connected yet, a check that found
//!   the credential invalid, expired or short of permissions, or a known expiry that has passed.
//! - **Degraded** is transient: the last check failed as unreachable, rate limited or an upstream
//!   error, token refreshes are failing so (until one succeeds), or the vendor answered 401
//!   through the proxy within the last hour.
//! - **Expiring**: a known horizon (an admin-supplied expiry, a ServiceNow refresh token's
//!   lifespan) within [`WARNING_DAYS`]`[0]` days. Connected grants' idle limits are kept alive by
//!   the sweep and are not horizons an admin acts on.
//!
//! [`refresh`] runs on every write of a record (`Broker::swap_system`) and, because time alone
//! moves a horizon closer, on the keep-alive sweep; what changed becomes events.

use crate::model::{
    AuthFailure, CredentialType, HealthMark, SystemHealth, SystemRecord, SystemState,
};

/// Expiry warnings: the window, then again at 7 and at 1 day(s).
pub const WARNING_DAYS: [u64; 3] = [30, 7, 1];
/// Vendor 401s through the proxy this recent make a system degraded.
pub const PROXY_401_WINDOW_SECS: u64 = 3600;

/// What a write changed about a system's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// The health changed (from, to).
    Changed(Option<SystemHealth>, SystemHealth),
    /// A warning threshold was crossed: the horizon is this many days away (at most).
    Expiring(u64),
}

/// The health `r` is in at `now`, and why.
pub fn derive(r: &SystemRecord, now: u64) -> (SystemHealth, String) {
    if let Some(failing) = failing(r, now) {
        return (SystemHealth::Failing, failing);
    }
    if let Some(degraded) = degraded(r, now) {
        return (SystemHealth::Degraded, degraded);
    }
    match horizon_at(r, now) {
        Some(at) if at.saturating_sub(now) <= WARNING_DAYS[0] * 86_400 => (
            SystemHealth::Expiring,
            format!(
                "the {} expires in {} day(s) ({}); {}",
                what_expires(r.credential_type),
                at.saturating_sub(now).div_ceil(86_400),
                crate::util::time::date(at),
                renew_hint(r.credential_type)
            ),
        ),
        _ => (SystemHealth::Healthy, String::new()),
    }
}

fn failing(r: &SystemRecord, now: u64) -> Option<String> {
    match r.state {
        SystemState::ReauthorizationRequired => {
            return Some(
                r.state_message.clone().unwrap_or_else(|| {
                    "the grant needs to be re-authorized by an admin".to_owned()
                }),
            )
        }
        SystemState::AuthorizationPending => {
            return Some(format!(
                "not connected yet: run `credbrokerctl system connect {}`",
                r.system_id
            ))
        }
        SystemState::Active => {}
    }
    if let Some(c) = r.last_check.as_ref().filter(|c| !c.ok) {
        if !c.failure.is_some_and(is_transient) {
            return Some(format!("the last check failed: {}", c.message));
        }
    }
    match horizon_at(r, now) {
        Some(at) if at <= now => Some(format!(
            "the {} expired on {}; {}",
            what_expires(r.credential_type),
            crate::util::time::date(at),
            renew_hint(r.credential_type)
        )),
        _ => None,
    }
}

fn degraded(r: &SystemRecord, now: u64) -> Option<String> {
    if let Some(c) = r.last_check.as_ref().filter(|c| !c.ok) {
        return Some(format!("the last check failed: {}", c.message));
    }
    if let Some(f) = &r.refresh_failure {
        return Some(format!(
            "token refreshes have been failing since {}: {}; the broker keeps retrying and \
             serves the cached token while it is valid",
            crate::util::time::date_time(f.since),
            f.message
        ));
    }
    match r.last_proxy_unauthorized_at {
        Some(at) if now.saturating_sub(at) <= PROXY_401_WINDOW_SECS => Some(format!(
            "the vendor answered 401 through the proxy ({} so far, the last at {}): the \
             credential may have been revoked or lost a permission; run a check",
            r.proxy_unauthorized_count,
            crate::util::time::date_time(at)
        )),
        _ => None,
    }
}

fn is_transient(f: AuthFailure) -> bool {
    matches!(
        f,
        AuthFailure::Unreachable | AuthFailure::RateLimited | AuthFailure::UpstreamError
    )
}

/// A connected grant this close to its idle limit was not kept alive (the sweep refreshes it
/// within the keep-alive margin, at the latest two sweeps before this): from here on it is a
/// horizon an admin must watch.
pub const IDLE_GRANT_ALERT_SECS: u64 = 3 * 86_400;

/// The horizon an admin must act on. A connected grant's idle limit counts only once the
/// keep-alive sweep has failed to push it back (within [`IDLE_GRANT_ALERT_SECS`]).
fn horizon_at(r: &SystemRecord, now: u64) -> Option<u64> {
    let at = r.credential_expires_at?;
    if r.credential_type == CredentialType::OAuthAuthorizationCode
        && at.saturating_sub(now) > IDLE_GRANT_ALERT_SECS
    {
        return None;
    }
    Some(at)
}

fn what_expires(t: CredentialType) -> &'static str {
    match t {
        CredentialType::OAuthRefreshToken => "refresh token",
        CredentialType::OAuthAuthorizationCode => {
            "idle grant (the keep-alive refresh is not getting through)"
        }
        CredentialType::OAuthClientCredentials | CredentialType::EntraClientCredentials => {
            "client secret"
        }
        CredentialType::ApiKey => "API key",
        CredentialType::EmailApiToken => "API token",
        CredentialType::PersonalAccessToken => "personal access token",
        _ => "credential",
    }
}

fn renew_hint(t: CredentialType) -> &'static str {
    match t {
        CredentialType::OAuthRefreshToken => {
            "run a new password grant (`credbrokerctl system rotate … --credential-type \
             oauth-password-grant`)"
        }
        CredentialType::OAuthAuthorizationCode => {
            "check the vendor, or reconnect it (`credbrokerctl system connect`)"
        }
        _ => "create a new one at the vendor and rotate it in (`credbrokerctl system rotate`)",
    }
}

/// The warning threshold `r` is inside at `now` (30, 7 or 1 days), if any.
fn threshold(r: &SystemRecord, now: u64) -> Option<u64> {
    let at = horizon_at(r, now)?;
    let left = at.checked_sub(now)?;
    WARNING_DAYS
        .iter()
        .rev()
        .copied()
        .find(|d| left <= d * 86_400)
}

/// True when [`refresh`] would change `r` at `now` (the sweep writes only those).
pub fn is_stale(r: &SystemRecord, now: u64) -> bool {
    let mut probe = r.clone();
    !refresh(&mut probe, now).is_empty()
}

/// Brings `r.health` up to date at `now`; returns what changed. A record without a mark (new,
/// or from before health tracking) counts as healthy since it was created: only a real change
/// is news.
pub fn refresh(r: &mut SystemRecord, now: u64) -> Vec<Note> {
    let (health, reason) = derive(r, now);
    let previous = r.health.take().unwrap_or(HealthMark {
        health: SystemHealth::Healthy,
        reason: String::new(),
        since: r.created_at,
        warned_days: None,
        warned_for: None,
    });
    let crossed = threshold(r, now);
    let horizon = horizon_at(r, now);
    // Warnings already sent count only for the horizon they were about.
    let warned = previous
        .warned_days
        .filter(|_| previous.warned_for == horizon);
    let mut notes = Vec::new();
    let since = if previous.health == health {
        previous.since
    } else {
        notes.push(Note::Changed(Some(previous.health), health));
        now
    };
    // Each threshold once per horizon.
    let warned_days = match (crossed, warned) {
        (Some(t), Some(w)) if t >= w => Some(w),
        (Some(t), _) => {
            notes.push(Note::Expiring(t));
            Some(t)
        }
        (None, _) => None,
    };
    r.health = Some(HealthMark {
        health,
        reason,
        since,
        warned_days,
        warned_for: warned_days.and(horizon),
    });
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AuthCheck, SystemKind};

    fn record(t: CredentialType, expires_at: Option<u64>) -> SystemRecord {
        SystemRecord {
            kind: SystemKind::AzureDevOps,
            base_url: "https://dev.azure.com/acme".into(),
            credential_type: t,
            credential_expires_at: expires_at,
            sealed_credential: Vec::new(),
            ..crate::model::sample_system("s")
        }
    }

    const DAY: u64 = 86_400;

    #[test]
    fn a_pat_crosses_30_7_and_1_days_once_each_then_fails() {
        let now = 1_800_000_000;
        let mut r = record(CredentialType::PersonalAccessToken, Some(now + 40 * DAY));
        assert!(
            refresh(&mut r, now).is_empty(),
            "healthy from the start is no news"
        );
        assert!(refresh(&mut r, now + DAY).is_empty());
        let mut seen = Vec::new();
        for day in 1..=41 {
            seen.extend(refresh(&mut r, now + day * DAY));
        }
        assert_eq!(
            seen,
            vec![
                Note::Changed(Some(SystemHealth::Healthy), SystemHealth::Expiring),
                Note::Expiring(30),
                Note::Expiring(7),
                Note::Expiring(1),
                Note::Changed(Some(SystemHealth::Expiring), SystemHealth::Failing),
            ]
        );
        let mark = r.health.clone().unwrap_or_else(|| panic!("no mark"));
        assert!(mark.reason.contains("expired on"), "{}", mark.reason);
        assert_eq!(mark.since, now + 40 * DAY);
        // A new credential 20 days out is warned about again.
        let later = now + 41 * DAY;
        r.credential_expires_at = Some(later + 20 * DAY);
        assert_eq!(
            refresh(&mut r, later),
            vec![
                Note::Changed(Some(SystemHealth::Failing), SystemHealth::Expiring),
                Note::Expiring(30),
            ]
        );
    }

    #[test]
    fn checks_proxy_401s_and_states_map_to_their_health() {
        let now = 1_800_000_000;
        let mut r = record(CredentialType::PersonalAccessToken, None);
        r.last_check = Some(AuthCheck::failed(AuthFailure::RateLimited, "slow down"));
        assert_eq!(derive(&r, now).0, SystemHealth::Degraded);
        r.last_check = Some(AuthCheck::failed(
            AuthFailure::InsufficientPermissions,
            "missing: itil role",
        ));
        let (h, why) = derive(&r, now);
        assert_eq!(h, SystemHealth::Failing);
        assert!(why.contains("itil role"));
        r.last_check = None;
        r.proxy_unauthorized_count = 3;
        r.last_proxy_unauthorized_at = Some(now - 60);
        assert_eq!(derive(&r, now).0, SystemHealth::Degraded);
        assert_eq!(derive(&r, now + 2 * 3600).0, SystemHealth::Healthy);
        r.state = SystemState::ReauthorizationRequired;
        assert_eq!(derive(&r, now).0, SystemHealth::Failing);
        // A connected grant's idle horizon is the sweep's business, until the sweep fails.
        let g = record(CredentialType::OAuthAuthorizationCode, Some(now + 20 * DAY));
        assert_eq!(derive(&g, now).0, SystemHealth::Healthy);
        let (h, why) = derive(&g, now + 18 * DAY);
        assert_eq!(h, SystemHealth::Expiring);
        assert!(why.contains("keep-alive"), "{why}");
    }
}
