//! Authorization-code flows hosted by the broker ("Connect with Zendesk / Jira Cloud").
//!
//! `StartAuthorization` creates a one-time `state` (random, bound to the system and its
//! credential version, valid for `authorization_ttl`, single use) and a PKCE verifier where the
//! vendor takes PKCE; both stay in memory (replicas on a shared store also keep them sealed in the
//! store, so the browser may come back through any replica; still single use). The vendor sends the browser back to
//! `/oauth/callback`, where the code is exchanged and the grant stored as a new credential version
//! (the system becomes active). Vendor errors, and forged, replayed or expired states, get a clear
//! page and change nothing. The code, the tokens and the client secret never appear in pages or
//! logs.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use crate::backends::{oauth, AuthorizeRequest, BackendError, Target};
use crate::broker::{is_ours, Broker, Modified, Retry};
use crate::error::BrokerError;
use crate::model::{unix_now, AuthFailure, CredentialType, SystemState};
use crate::secret::SecretString;
use crate::store::StoreError;
use crate::util::sync::{lock, read};

/// A pending authorization as replicas share it (sealed in the store's metadata under
/// `pending_auth/<SHA-256 of the state>`; taken (removed) when a callback uses it).
#[derive(serde::Serialize, serde::Deserialize)]
struct SharedPending {
    system_id: String,
    credential_version: u64,
    verifier: Option<String>,
    redirect_uri: String,
    expires_at_ms: u64,
}

pub(crate) fn pending_key(state: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(state.as_bytes());
    format!(
        "pending_auth/{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn pending_binding(key: &str) -> crate::crypto::RecordBinding<'_> {
    crate::crypto::RecordBinding {
        system_id: key,
        credential_type: CredentialType::OAuthAuthorizationCode,
        version: 0,
    }
}

/// A started authorization, waiting for its callback.
pub struct PendingAuthorization {
    system_id: String,
    credential_version: u64,
    verifier: Option<SecretString>,
    redirect_uri: String,
    expires: Instant,
}

#[cfg(test)]
impl PendingAuthorization {
    /// One for `system_id`, valid a minute.
    pub(crate) fn for_test(system_id: &str) -> Self {
        Self {
            system_id: system_id.to_owned(),
            credential_version: 1,
            verifier: None,
            redirect_uri: "http://127.0.0.1/oauth/callback".to_owned(),
            expires: Instant::now() + Duration::from_secs(60),
        }
    }

    pub(crate) fn expired_for_test(system_id: &str) -> Self {
        let mut p = Self::for_test(system_id);
        p.expires = Instant::now();
        p
    }
}

/// What the callback shows the person in the browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackPage {
    /// How it ended.
    pub outcome: Outcome,
    /// Page title.
    pub title: String,
    /// What happened and what to do (no secrets).
    pub message: String,
    /// The system the callback was for, when the state was known.
    pub system_id: Option<String>,
}

/// How a callback ended (the server shows each its own way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The grant is stored; the system is active.
    Connected,
    /// The callback itself is unusable (no or unknown state, a vendor-reported error).
    Invalid,
    /// The system is gone.
    NotFound,
    /// The system changed meanwhile; nothing was stored.
    Conflict,
    /// The vendor's code exchange failed.
    VendorFailed,
    /// The broker could not do its part (sealing, reading).
    Internal,
    /// The grant could not be stored now.
    Unavailable,
    /// Nothing was used (the store did not answer when the authorization was to be taken):
    /// the same callback may be sent again.
    TryAgain,
}

impl CallbackPage {
    fn new(outcome: Outcome, title: &str, message: impl Into<String>) -> Self {
        Self {
            outcome,
            title: title.to_owned(),
            message: message.into(),
            system_id: None,
        }
    }
}

/// A system with a new grant: active, and a spell of failing refreshes of the old one is over.
fn connected(r: &mut crate::model::SystemRecord) {
    r.state = SystemState::Active;
    r.state_message = None;
    r.refresh_failure = None;
    r.updated_at = unix_now();
}

fn connect_hint(system_id: &str) -> String {
    format!("start again with `credbrokerctl system connect {system_id}`")
}

impl Broker {
    /// The redirect URI vendors send the browser back to, when the broker has an HTTP listener.
    pub fn redirect_uri(&self) -> Option<String> {
        self.settings
            .public_url
            .as_ref()
            .map(|u| format!("{}/oauth/callback", u.trim_end_matches('/')))
    }

    /// Starts an authorization-code flow: (authorize URL, expiry, redirect URI).
    pub async fn start_authorization(
        &self,
        system_id: &str,
    ) -> Result<(String, SystemTime, String), BrokerError> {
        let record = self.get_system(system_id).await?;
        if record.credential_type != CredentialType::OAuthAuthorizationCode {
            return Err(BrokerError::FailedPrecondition(format!(
                "system '{system_id}' does not use an authorization-code flow ({} has no \
                 'Connect' step)",
                record.credential_type
            )));
        }
        let redirect_uri = self.redirect_uri().ok_or_else(|| {
            BrokerError::FailedPrecondition(
                "the broker has no HTTP listener for the OAuth callback; set \
                 CREDBROKER_HTTP_LISTEN and CREDBROKER_PUBLIC_URL"
                    .to_owned(),
            )
        })?;
        let backend = self.registry.get(record.kind)?.clone();
        let credential = self.open_credential(&record)?;
        let state = self.new_state();
        let (challenge, verifier) = if backend.uses_pkce() {
            let (c, v) = oauth::pkce_pair();
            (Some(c), Some(v))
        } else {
            (None, None)
        };
        let url = backend
            .authorize_url(
                &Target {
                    system_id: Some(system_id),
                    base_url: &record.base_url,
                    credential: &credential,
                },
                &AuthorizeRequest {
                    state: &state,
                    redirect_uri: &redirect_uri,
                    pkce_challenge: challenge.as_deref(),
                    pkce_verifier: None,
                },
            )
            .map_err(BrokerError::from)?;
        let ttl = self.settings.authorization_ttl;
        {
            let mut pending = lock(&self.pending_authorizations);
            let now = Instant::now();
            if !self.store.is_shared() {
                // Replicas keep them until the sweep has removed their shared rows.
                pending.retain(|_, p| p.expires > now);
            }
            pending.insert(
                state.clone(),
                PendingAuthorization {
                    system_id: system_id.to_owned(),
                    credential_version: record.credential_version,
                    verifier,
                    redirect_uri: redirect_uri.clone(),
                    expires: now + ttl,
                },
            );
        }
        if self.store.is_shared() {
            // Replicas: the browser may come back through any of them.
            let shared = SharedPending {
                system_id: system_id.to_owned(),
                credential_version: record.credential_version,
                verifier: lock(&self.pending_authorizations)
                    .get(&state)
                    .and_then(|p| p.verifier.as_ref().map(|v| v.expose_secret().to_owned())),
                redirect_uri: redirect_uri.clone(),
                expires_at_ms: (SystemTime::now() + ttl)
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or_default(),
            };
            let plain = zeroize::Zeroizing::new(
                serde_json::to_vec(&shared)
                    .map_err(|_| BrokerError::Internal("could not encode the authorization"))?,
            );
            let key = pending_key(&state);
            let sealed = read(&self.keyring).seal(&pending_binding(&key), &plain);
            self.store.put_meta(&key, &sealed).await?;
        }
        tracing::info!(message = "Authorization started.", kind = %record.kind, system_id = %system_id);
        Ok((url, SystemTime::now() + ttl, redirect_uri))
    }

    /// The pending authorization of a live `state`, consumed (single use): `local` when this
    /// process started it, else (replicas) the one another replica stored. With a shared store
    /// the stored copy is taken atomically either way: of two replicas handed the same callback
    /// one exchanges the code (a second exchange of a used code may make the vendor revoke the
    /// grant the first one got). A store error leaves it unknown whether another replica took
    /// it: the local copy is kept for a retry and nothing is exchanged.
    async fn take_pending(
        &self,
        state: &str,
        local: Option<PendingAuthorization>,
    ) -> Result<Option<PendingAuthorization>, StoreError> {
        if !self.store.is_shared() {
            return Ok(local);
        }
        let taken = self.store.take_meta(&pending_key(state)).await;
        match (local, taken) {
            (Some(p), Ok(t)) => Ok(t.map(|_| p)),
            (Some(p), Err(e)) => {
                lock(&self.pending_authorizations).insert(state.to_owned(), p);
                Err(e)
            }
            (None, Ok(Some(sealed))) => Ok(self.open_shared_pending(state, &sealed)),
            (None, Ok(None)) => Ok(None),
            (None, Err(e)) => Err(e),
        }
    }

    /// A pending authorization another replica started and stored sealed.
    fn open_shared_pending(&self, state: &str, sealed: &[u8]) -> Option<PendingAuthorization> {
        let key = pending_key(state);
        let plain = read(&self.keyring)
            .open(&pending_binding(&key), sealed)
            .ok()?;
        let p: SharedPending = serde_json::from_slice(&plain).ok()?;
        let left = Duration::from_millis(
            p.expires_at_ms.saturating_sub(
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or_default(),
            ),
        );
        Some(PendingAuthorization {
            system_id: p.system_id,
            credential_version: p.credential_version,
            verifier: p.verifier.map(SecretString::new),
            redirect_uri: p.redirect_uri,
            expires: Instant::now() + left,
        })
    }

    /// Replicas: the authorizations this process started that expired unused are forgotten
    /// and their shared rows removed, so a connect the admin never finished leaves nothing
    /// behind. Run with the periodic caller reload. One whose row could not be removed is kept
    /// for the next sweep; a row whose replica stopped before the sweep stays (useless: the
    /// state in its URL has expired too).
    pub(crate) async fn sweep_expired_pending(&self) {
        if !self.store.is_shared() {
            return;
        }
        let now = Instant::now();
        let expired: Vec<(String, PendingAuthorization)> = {
            let mut held = lock(&self.pending_authorizations);
            let states: Vec<String> = held
                .iter()
                .filter(|(_, p)| p.expires <= now)
                .map(|(s, _)| s.clone())
                .collect();
            states
                .into_iter()
                .filter_map(|s| held.remove(&s).map(|p| (s, p)))
                .collect()
        };
        for (state, p) in expired {
            if let Err(e) = self.store.take_meta(&pending_key(&state)).await {
                tracing::warn!(message = "An expired authorization's shared row could not be removed; tried again later.", error = %e);
                lock(&self.pending_authorizations).insert(state, p);
            }
        }
    }

    /// Another replica consumed the shared authorization stored under `key`.
    pub(crate) fn forget_pending(&self, key: &str) {
        lock(&self.pending_authorizations).retain(|state, _| pending_key(state) != key);
    }

    /// Completes a flow from the callback's query parameters.
    pub async fn complete_authorization(&self, params: &HashMap<String, String>) -> CallbackPage {
        let Some(state) = params.get("state").filter(|s| !s.is_empty()) else {
            return CallbackPage::new(
                Outcome::Invalid,
                "Authorization failed",
                "The callback carries no state; start the connection again from credbrokerctl.",
            );
        };
        // Single use: the state is consumed whatever happens next.
        let local = lock(&self.pending_authorizations).remove(state);
        let check = self.state_check(state);
        if check == StateCheck::Expired {
            // Made here, replayed late: no store read for it. One this process holds goes
            // back for the sweep to remove its shared row.
            let page = expired_page(local.as_ref().map(|p| p.system_id.as_str()));
            if let Some(p) = local {
                lock(&self.pending_authorizations).insert(state.clone(), p);
            }
            return page;
        }
        let system_id = local.as_ref().map(|p| p.system_id.clone());
        let pending = match local {
            // Not one this broker made: no store read for it.
            _ if check == StateCheck::Foreign => None,
            local => match self.take_pending(state, local).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(message = "Could not take a pending authorization from the store.", error = %e);
                    return CallbackPage {
                        system_id,
                        ..CallbackPage::new(
                            Outcome::TryAgain,
                            "Try again in a moment",
                            "The broker's store did not answer. Nothing was changed; reload \
                             this page in a moment.",
                        )
                    };
                }
            },
        };
        let Some(p) = pending else {
            return CallbackPage::new(
                Outcome::Invalid,
                "Authorization link not valid",
                "This authorization link is unknown, was already used, or belongs to another \
                 broker. Nothing was changed; start the connection again with `credbrokerctl \
                 system connect SYSTEM_ID`.",
            );
        };
        let hint = connect_hint(&p.system_id);
        let page = self.complete_pending(&p, state, params, &hint).await;
        CallbackPage {
            system_id: Some(p.system_id.clone()),
            ..page
        }
    }

    async fn complete_pending(
        &self,
        p: &PendingAuthorization,
        state: &str,
        params: &HashMap<String, String>,
        hint: &str,
    ) -> CallbackPage {
        if p.expires <= Instant::now() {
            return expired_page(Some(&p.system_id));
        }
        if let Some(err) = params.get("error") {
            let code: String = err
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(64)
                .collect();
            return CallbackPage::new(
                Outcome::Invalid,
                "Authorization was not granted",
                format!("The vendor answered '{code}' (access was not allowed). Nothing was changed for '{}'; {hint}.", p.system_id),
            );
        }
        let Some(code) = params.get("code").filter(|c| !c.is_empty()) else {
            return CallbackPage::new(
                Outcome::Invalid,
                "Authorization failed",
                format!("The callback carries no code. Nothing was changed; {hint}."),
            );
        };
        match self.finish(p, state, code).await {
            Ok(()) => CallbackPage::new(
                Outcome::Connected,
                "Connected",
                format!(
                    "System '{}' is connected and active. You can close this page.",
                    p.system_id
                ),
            ),
            Err((status, message)) => CallbackPage::new(status, "Authorization failed", message),
        }
    }

    async fn finish(
        &self,
        p: &PendingAuthorization,
        state: &str,
        code: &str,
    ) -> Result<(), (Outcome, String)> {
        let hint = connect_hint(&p.system_id);
        let record = self.get_system(&p.system_id).await.map_err(|_| {
            (
                Outcome::NotFound,
                format!(
                    "System '{}' no longer exists; nothing was stored.",
                    p.system_id
                ),
            )
        })?;
        if record.credential_version != p.credential_version {
            return Err((Outcome::Conflict, format!("The credential of '{}' changed since this authorization started; nothing was stored; {hint}.", p.system_id)));
        }
        let backend = self
            .registry
            .get(record.kind)
            .map_err(|e| (Outcome::Internal, e.to_string()))?
            .clone();
        let credential = self
            .open_credential(&record)
            .map_err(|e| (Outcome::Internal, e.to_string()))?;
        let result = backend
            .exchange_code(
                &Target {
                    system_id: Some(&p.system_id),
                    base_url: &record.base_url,
                    credential: &credential,
                },
                code,
                &AuthorizeRequest {
                    state,
                    redirect_uri: &p.redirect_uri,
                    pkce_challenge: None,
                    pkce_verifier: p.verifier.as_ref(),
                },
            )
            .await;
        let mut issued = match result {
            Ok(i) => i,
            Err(BackendError::Rejected { failure, message }) => {
                if failure == AuthFailure::Misconfigured && record.state != SystemState::Active {
                    // E.g. the grant covers other Jira sites: keep the system pending, say why.
                    self.set_state_message(&p.system_id, &message).await;
                }
                return Err((
                    Outcome::Invalid,
                    format!("{message}. Nothing else was changed."),
                ));
            }
            Err(e) => {
                return Err((
                    Outcome::VendorFailed,
                    format!("{e}. Nothing was changed; {hint}."),
                ))
            }
        };
        let Some(new_credential) = issued.updated_credential.take() else {
            return Err((
                Outcome::VendorFailed,
                "the vendor's answer carried no grant".to_owned(),
            ));
        };
        let flight = self.flight(&p.system_id);
        let mut f = flight.lock().await;
        let updated = self.store_grant(p, &new_credential, &hint).await?;
        Self::reset_flight(&mut f);
        self.drop_token(&p.system_id);
        let _ = self.install(&p.system_id, &updated, issued, SystemTime::now(), true);
        tracing::info!(message = "Authorization completed; system active.", kind = %updated.kind, system_id = %p.system_id);
        Ok(())
    }

    /// Stores the grant the vendor just issued, as the next credential version of the record
    /// the authorization started from. After a concurrent write that leaves the credential
    /// alone (a health check, a 401 count, a label) the record is read again and the grant
    /// stored on top of it: the code is spent, so losing this write would cost the user a new
    /// consent.
    async fn store_grant(
        &self,
        p: &PendingAuthorization,
        credential: &crate::model::Credential,
        hint: &str,
    ) -> Result<crate::model::SystemRecord, (Outcome, String)> {
        let not_stored = |e: BrokerError| match e {
            BrokerError::NotFound(_) => (
                Outcome::NotFound,
                format!(
                    "System '{}' was deleted meanwhile; nothing was stored.",
                    p.system_id
                ),
            ),
            e @ (BrokerError::Unavailable(_) | BrokerError::ResourceExhausted(_)) => (
                Outcome::Unavailable,
                format!("the grant could not be stored ({e}); {hint}"),
            ),
            e => (Outcome::Internal, e.to_string()),
        };
        // Sealed once: every attempt writes this sealing (on the primary key of the moment), so
        // one found stored (re-wrapped or not) is an attempt that landed though its answer was
        // lost.
        let version =
            crate::broker::version_after(p.credential_version, &p.system_id).map_err(not_stored)?;
        let mut ours = vec![self
            .seal(&p.system_id, version, credential)
            .map_err(not_stored)?];
        let modified = self
            .modify_system(&p.system_id, Retry::Persist, |current| {
                if is_ours(&ours, &current.sealed_credential)
                    || current.credential_version != p.credential_version
                {
                    return Ok(None);
                }
                let mut updated = current.clone();
                updated.sealed_credential =
                    self.sealing_for_attempt(&mut ours, &p.system_id, version, credential)?;
                updated.credential_version = version;
                updated.credential_expires_at = credential.expires_at();
                connected(&mut updated);
                Ok(Some(updated))
            })
            .await
            .map_err(not_stored)?;
        match modified {
            Modified::Written(updated) => Ok(updated),
            Modified::Unchanged(r) if is_ours(&ours, &r.sealed_credential) => Ok(r),
            Modified::Unchanged(_) => Err((
                Outcome::Conflict,
                format!("The credential changed meanwhile; nothing was stored; {hint}."),
            )),
        }
    }

    async fn set_state_message(&self, system_id: &str, message: &str) {
        let _ = self
            .update_system_with(system_id, |r| {
                r.state_message = Some(message.to_owned());
                true
            })
            .await;
    }
}

/// Default lifetime of a started authorization.
pub const DEFAULT_AUTHORIZATION_TTL: Duration = Duration::from_secs(600);

/// How long a signed "Connect" link (in a `system.reauthorization_required` webhook) stays
/// valid: as long as the webhook is retried.
pub const CONNECT_LINK_TTL_SECS: u64 = 24 * 3600;

/// A followed "Connect" link: where to send the browser, or why not.
#[derive(Debug)]
pub enum LinkOutcome {
    /// The consent page of a freshly started authorization.
    Consent(String),
    /// Not a link this broker signed (or altered).
    Invalid,
    /// Expired, or the system changed since (reconnected, rotated, deleted).
    Stale(String),
}

impl Broker {
    /// A signed link that starts the Connect flow of `r` when opened (for webhooks): the
    /// system, its credential version and an expiry, under an HMAC with a key derived from the
    /// master key. `None` where the kind has no Connect step or the broker no public URL.
    pub fn connect_link(&self, r: &crate::model::SystemRecord) -> Option<String> {
        if r.credential_type != CredentialType::OAuthAuthorizationCode {
            return None;
        }
        let base = self.settings.public_url.as_deref()?.trim_end_matches('/');
        let exp = unix_now() + CONNECT_LINK_TTL_SECS;
        let sig = link_signature(
            self.link_key.as_bytes(),
            &r.system_id,
            r.credential_version,
            exp,
        );
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("system", &r.system_id)
            .append_pair("v", &r.credential_version.to_string())
            .append_pair("exp", &exp.to_string())
            .append_pair("sig", &sig)
            .finish();
        Some(format!("{base}/oauth/start?{query}"))
    }

    /// Checks a "Connect" link (signature, expiry, credential version) without acting on it:
    /// `Ok(system id)` when it may be followed.
    pub async fn check_connect_link(
        &self,
        params: &HashMap<String, String>,
    ) -> Result<String, LinkOutcome> {
        let get = |k: &str| params.get(k).map(String::as_str).unwrap_or_default();
        let (system_id, sig) = (get("system"), get("sig"));
        let (Ok(version), Ok(exp)) = (get("v").parse::<u64>(), get("exp").parse::<u64>()) else {
            return Err(LinkOutcome::Invalid);
        };
        let want = link_signature(self.link_key.as_bytes(), system_id, version, exp);
        if want.is_empty()
            || !bool::from(subtle::ConstantTimeEq::ct_eq(
                want.as_bytes(),
                sig.as_bytes(),
            ))
        {
            return Err(LinkOutcome::Invalid);
        }
        let stale = |why: &str| {
            Err(LinkOutcome::Stale(format!(
                "{why}; {}",
                connect_hint(system_id)
            )))
        };
        if exp < unix_now() {
            return stale("this link has expired");
        }
        match self.get_system(system_id).await {
            Ok(r) if r.credential_version == version => Ok(system_id.to_owned()),
            Ok(_) | Err(BrokerError::NotFound(_)) => {
                stale("the system was reconnected, rotated or deleted since this link was made")
            }
            Err(_) => Err(LinkOutcome::Stale(
                "the broker cannot read the system right now; try again in a moment".to_owned(),
            )),
        }
    }

    /// Follows a checked "Connect" link: starts the authorization (as `StartAuthorization`
    /// does), at most [`MAX_LINK_FLOWS`] live at a time per system (a leaked link cannot pile
    /// up pending authorizations).
    pub async fn follow_connect_link(&self, params: &HashMap<String, String>) -> LinkOutcome {
        let system_id = match self.check_connect_link(params).await {
            Ok(id) => id,
            Err(outcome) => return outcome,
        };
        let live = {
            let now = Instant::now();
            lock(&self.pending_authorizations)
                .values()
                .filter(|p| p.system_id == system_id && p.expires > now)
                .count()
        };
        if live >= MAX_LINK_FLOWS {
            return LinkOutcome::Stale(format!(
                "{MAX_LINK_FLOWS} Connect flows for this system are already open; finish one in \
                 the tab where it started, or wait ten minutes"
            ));
        }
        match self.start_authorization(&system_id).await {
            Ok((url, _, _)) => LinkOutcome::Consent(url),
            Err(e) => {
                tracing::warn!(message = "A Connect link could not start the authorization.", system_id = %system_id, error = %e);
                LinkOutcome::Stale(
                    "the authorization could not be started right now; try again in a moment"
                        .to_owned(),
                )
            }
        }
    }
}

/// The page for an authorization past its lifetime; `system_id` when it is known here.
fn expired_page(system_id: Option<&str>) -> CallbackPage {
    let message = match system_id {
        Some(id) => format!(
            "The authorization for '{id}' expired. Nothing was changed; {}.",
            connect_hint(id)
        ),
        None => "This authorization link expired. Nothing was changed; start the connection \
                 again with `credbrokerctl system connect SYSTEM_ID`."
            .to_owned(),
    };
    CallbackPage {
        system_id: system_id.map(str::to_owned),
        ..CallbackPage::new(Outcome::Invalid, "Authorization link expired", message)
    }
}

/// Authorizations a Connect link may have open at once per system.
pub const MAX_LINK_FLOWS: usize = 3;

/// Domains of the state tags: v2 states carry their expiry; v1 states (made by the version
/// before, all random) are still accepted for one release so that authorizations started on
/// an older replica during a rolling upgrade complete on a newer one (the stored
/// authorization's own expiry still bounds them).
const STATE_V2: &[u8] = b"credbroker/oauth-state/v2\0";
pub(crate) const STATE_V1: &[u8] = b"credbroker/oauth-state/v1\0";

/// The tag of an OAuth `state`'s body (its random part and, from v2, its expiry): the first 16
/// bytes of its HMAC-SHA256 under the link key, in `domain`, kept apart from the links'
/// signatures.
pub(crate) fn tag_in(key: &[u8; 32], domain: &[u8], body: &[u8]) -> [u8; 16] {
    use hmac::Mac;
    let mut tag = [0u8; 16];
    if let Ok(mut mac) = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key) {
        mac.update(domain);
        mac.update(body);
        tag.copy_from_slice(&mac.finalize().into_bytes()[..16]);
    }
    tag
}

/// A state from its body (12 random bytes, then its expiry in seconds since the epoch, big
/// endian) and the body's v2 [`tag_in`], URL-safe base64: 43 characters.
pub(crate) fn encode_state(key: &[u8; 32], body: [u8; 16]) -> String {
    use base64::Engine;
    let mut raw = [0u8; 32];
    raw[..16].copy_from_slice(&body);
    raw[16..].copy_from_slice(&tag_in(key, STATE_V2, &body));
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

/// What a callback's `state` is, judged from the state alone (no store read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateCheck {
    /// Not made with this master key, or altered: nothing is looked up for it.
    Foreign,
    /// Made here, past its expiry (a leaked callback replayed later): the expired page, nothing
    /// looked up in a shared store and no background work.
    Expired,
    /// Made here and still within its lifetime.
    Live,
}

impl Broker {
    /// A new OAuth `state`, valid at least as long as the authorization it starts (its expiry is
    /// in whole seconds, rounded up; see [`encode_state`]). Only a broker with this master key
    /// (this one, its replicas) makes states that [`Self::state_check`] accepts.
    pub(crate) fn new_state(&self) -> String {
        let ttl = self.settings.authorization_ttl.as_secs_f64().ceil();
        let expires = unix_now().saturating_add(ttl as u64).saturating_add(1);
        let mut body = [0u8; 16];
        body[..12].copy_from_slice(&crate::util::random::bytes::<12>());
        body[12..].copy_from_slice(&u32::try_from(expires).unwrap_or(u32::MAX).to_be_bytes());
        encode_state(self.link_key.as_bytes(), body)
    }

    /// Whether `state` is one this broker (or a replica) made and has not expired.
    pub fn state_is_ours(&self, state: &str) -> bool {
        self.state_check(state) == StateCheck::Live
    }

    /// Judges `state` before any store read or background work: a made-up or altered one is
    /// foreign; a tagged one past its expiry is expired.
    pub fn state_check(&self, state: &str) -> StateCheck {
        use base64::Engine;
        if state.len() != 43 {
            return StateCheck::Foreign;
        }
        let Ok(raw) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(state) else {
            return StateCheck::Foreign;
        };
        let Some((body, tag)) = raw.split_at_checked(16) else {
            return StateCheck::Foreign;
        };
        let key = self.link_key.as_bytes();
        let tagged = |domain| -> bool {
            subtle::ConstantTimeEq::ct_eq(tag_in(key, domain, body).as_slice(), tag).into()
        };
        if !tagged(STATE_V2) {
            // v1: only a replica's stored authorization can still match one (a single process
            // lost its own at the upgrade's restart).
            return if self.store.is_shared() && tagged(STATE_V1) {
                StateCheck::Live
            } else {
                StateCheck::Foreign
            };
        }
        let expires = body
            .get(12..16)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, u32::from_be_bytes);
        if u64::from(expires) > unix_now() {
            StateCheck::Live
        } else {
            StateCheck::Expired
        }
    }
}

fn link_signature(key: &[u8; 32], system_id: &str, version: u64, exp: u64) -> String {
    use base64::Engine;
    use hmac::Mac;
    let Ok(mut mac) = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(b"credbroker/connect-link/v1\0");
    mac.update(&(system_id.len() as u64).to_be_bytes());
    mac.update(system_id.as_bytes());
    mac.update(&version.to_be_bytes());
    mac.update(&exp.to_be_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}
