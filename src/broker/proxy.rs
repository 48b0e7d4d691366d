//! Proxy delivery, the domain's part: leases, and who may call which system through the
//! proxy at which URL. The HTTP plumbing (the upstream client, headers, bodies) is
//! `crate::server::proxy`.
//!
//! For a system with [`Delivery::Proxy`], `GetAccessToken` returns `Authorization: Bearer <lease>`
//! and `api_base_url = {public_url}/proxy/{system_id}`. A lease is signed (HMAC-SHA256 under a key
//! derived from the master key) and bound to the system, the caller and the credential version,
//! and expires after `lease_ttl`. Leases die early when the credential rotates, the system is
//! deleted or leaves proxy delivery, or the caller is revoked. Every proxied call is audited
//! before it is forwarded, and once more with its outcome (method, path with ids masked, status,
//! duration), never a body or a header value.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::backends::ratelimit::RateSignals;
use crate::broker::events::EventType;
use crate::broker::quota::{Limited, QuotaPermit};
use crate::broker::tokens::IssuedToken;
use crate::broker::{Broker, Caller};
use crate::error::BrokerError;
use crate::model::{unix_now, Delivery, HealthMark, SystemHealth};
use crate::secret::SecretString;

/// The longest proxied path the audit trail records (masked; a longer one is cut at a segment
/// boundary and its remaining length noted): a line must not carry a request's whole target,
/// or anyone could fill the trail with a few requests.
pub const MAX_AUDITED_PATH: usize = 256;

/// The longest HTTP method the audit trail records as it is; a longer one is `OTHER`.
const MAX_AUDITED_METHOD: usize = 16;

/// `method` as the audit trail records it.
fn audited_method(method: &str) -> &str {
    if method.len() <= MAX_AUDITED_METHOD {
        method
    } else {
        "OTHER"
    }
}

/// The audit event of a proxied call: who on which system (an empty id, one outside the
/// grammar, is left out), the method and masked path, the outcome and code, and how long it
/// took when it ended.
fn proxy_event<'a>(
    (caller, system_id): (Option<&'a str>, &'a str),
    (method, masked): (&'a str, &'a str),
    (outcome, code): (&'a str, &'a str),
    took: Option<Duration>,
) -> crate::audit::AuditEvent<'a> {
    crate::audit::AuditEvent {
        time: crate::audit::now_rfc3339(),
        caller,
        rpc: "Proxy",
        system_id: Some(system_id).filter(|s| !s.is_empty()),
        outcome,
        code,
        token_hmac: None,
        method: Some(audited_method(method)),
        path: Some(masked),
        duration_ms: took.map(|d| d.as_millis() as u64),
        event: None,
        detail: None,
    }
}

/// The least time between two re-mints a vendor 401 through the proxy starts for one system.
pub const PROXY_REMINT_INTERVAL: Duration = Duration::from_secs(60);

/// Prefix of proxy leases.
pub const LEASE_PREFIX: &str = "cbl_";

#[derive(Serialize, Deserialize)]
struct Claims {
    /// System id.
    s: String,
    /// Caller name.
    c: String,
    /// Credential version.
    v: u64,
    /// Expiry, Unix seconds.
    e: u64,
    /// Lease id.
    n: String,
}

/// The part of `location` after `base` when `location` lies under `base` by whole path
/// segments.
pub fn under_base<'a>(location: &'a str, base: &str) -> Option<&'a str> {
    let rest = location.strip_prefix(base.trim_end_matches('/'))?;
    (rest.is_empty() || rest.starts_with(['/', '?', '#'])).then_some(rest)
}

fn mac(key: &[u8; 32]) -> Option<Hmac<Sha256>> {
    <Hmac<Sha256> as Mac>::new_from_slice(key).ok()
}

impl Broker {
    /// Signs a lease for `caller` on `system_id` at `version`: (lease, expiry, lease id).
    pub fn issue_lease(
        &self,
        caller: &str,
        system_id: &str,
        version: u64,
    ) -> Option<(SecretString, SystemTime, String)> {
        let id = crate::util::random::url_token::<12>();
        let ttl = self.settings.lease_ttl;
        let claims = Claims {
            s: system_id.to_owned(),
            c: caller.to_owned(),
            v: version,
            e: unix_now() + ttl.as_secs().max(1),
            n: id.clone(),
        };
        let payload = serde_json::to_vec(&claims).ok()?;
        let mut m = mac(self.lease_key.as_bytes())?;
        m.update(&payload);
        let sig = m.finalize().into_bytes();
        let lease = format!(
            "{LEASE_PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(sig)
        );
        Some((
            SecretString::new(lease),
            SystemTime::UNIX_EPOCH + Duration::from_secs(claims.e),
            id,
        ))
    }

    fn verify_lease(&self, lease: &str, system_id: &str) -> Option<Claims> {
        let body = lease.strip_prefix(LEASE_PREFIX)?;
        let (payload_b64, sig_b64) = body.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(payload_b64).ok()?;
        let sig = URL_SAFE_NO_PAD.decode(sig_b64).ok()?;
        let mut m = mac(self.lease_key.as_bytes())?;
        m.update(&payload);
        // Constant-time comparison.
        m.verify_slice(&sig).ok()?;
        let claims: Claims = serde_json::from_slice(&payload).ok()?;
        (claims.s == system_id && claims.e > unix_now()).then_some(claims)
    }

    /// What `caller` is handed for `token`, the system's current headers: the headers
    /// themselves (header delivery), or a lease for the broker's proxy (proxy delivery: the
    /// worker never holds the secret).
    pub fn hand_out(
        &self,
        caller: &Caller,
        system_id: &str,
        token: Arc<IssuedToken>,
    ) -> Result<HandOut, BrokerError> {
        if token.delivery != Delivery::Proxy {
            return Ok(HandOut::Headers(token));
        }
        let base = self.settings.public_url.as_deref().ok_or_else(|| {
            BrokerError::FailedPrecondition(
                "proxy delivery needs the HTTP listener (CREDBROKER_HTTP_LISTEN)".to_owned(),
            )
        })?;
        let (authorization, expires_at, lease_id) = self
            .issue_lease(&caller.name, system_id, token.credential_version)
            .ok_or(BrokerError::Internal("could not sign a lease"))?;
        Ok(HandOut::Lease(Lease {
            authorization,
            expires_at,
            api_base_url: format!("{}/proxy/{system_id}", base.trim_end_matches('/')),
            credential_version: token.credential_version,
            lease_id,
        }))
    }

    /// Admits one proxied call: `lease` must be valid for `system_id`, its caller may still use
    /// the system, and the system is still proxied at the lease's credential version. On
    /// refusal, the caller's name when the lease named one.
    pub async fn admit_proxy_call(
        &self,
        lease: &str,
        system_id: &str,
        tail: &str,
        query: Option<&str>,
    ) -> Result<ProxyGrant, (ProxyRefusal, Option<String>)> {
        let Some(claims) = self.verify_lease(lease, system_id) else {
            return Err((ProxyRefusal::Lease, None));
        };
        let granted = async {
            let token = self.proxied_token(system_id, &claims.c, claims.v).await?;
            let url = self.upstream_url(&token, tail, query)?;
            Ok((token, url))
        };
        match granted.await {
            Ok((token, url)) => Ok(ProxyGrant {
                caller: claims.c,
                lease_expires: claims.e,
                token,
                url,
            }),
            Err(refused) => Err((refused, Some(claims.c))),
        }
    }

    /// The system's current headers while `grant` would still be admitted: its lease has not
    /// expired, its caller may still use `system_id` (not revoked, expired or re-scoped) and
    /// the system is still proxied at the lease's credential version (not rotated, deleted or
    /// switched to header delivery). Asked again before a call waited out for a local retry
    /// is sent, which then carries these headers (refreshed meanwhile, perhaps).
    pub async fn still_granted(
        &self,
        system_id: &str,
        grant: &ProxyGrant,
    ) -> Result<Arc<IssuedToken>, ProxyRefusal> {
        if grant.lease_expires <= unix_now() {
            return Err(ProxyRefusal::Lease);
        }
        let version = grant.token.credential_version;
        self.proxied_token(system_id, &grant.caller, version).await
    }

    /// The system's cached headers, if `caller` may still use the system and it is still
    /// proxied at the lease's credential `version`.
    async fn proxied_token(
        &self,
        system_id: &str,
        caller: &str,
        version: u64,
    ) -> Result<Arc<IssuedToken>, ProxyRefusal> {
        let Some(caller) = self
            .callers
            .by_name(caller)
            .filter(|c| c.may_use_id(system_id))
        else {
            return Err(ProxyRefusal::Lease);
        };
        // The cached headers carry the delivery and credential version; the cache entry is
        // dropped on rotation, deletion and delivery changes, so no store read is needed here.
        let token = match self.access_token(system_id, 0, None).await {
            Ok(t) => t,
            Err(BrokerError::NotFound(_)) => return Err(ProxyRefusal::Lease),
            Err(e) => return Err(ProxyRefusal::Upstream(e.to_string())),
        };
        let current = token.delivery == Delivery::Proxy && token.credential_version == version;
        if !current || !caller.may_use_kind(token.kind) {
            return Err(ProxyRefusal::Lease);
        }
        Ok(token)
    }

    /// The vendor URL of `tail` (and `query`) under the system's base URL, which the egress
    /// guard judges once per token: `tail` is empty or starts with `/` and the query follows a
    /// `?`, so the base alone decides the host.
    fn upstream_url(
        &self,
        token: &IssuedToken,
        tail: &str,
        query: Option<&str>,
    ) -> Result<String, ProxyRefusal> {
        // Anything else after the base could make it name another host or port.
        if !(tail.is_empty() || tail.starts_with('/')) || query.is_some_and(|q| q.contains('#')) {
            return Err(unusable_base());
        }
        let base = token
            .upstream_base(|base| self.judge_base(base))
            .as_ref()
            .map_err(|why| ProxyRefusal::Upstream(why.clone()))?;
        let mut target =
            String::with_capacity(base.len() + tail.len() + 1 + query.map_or(0, str::len));
        target.push_str(base);
        target.push_str(tail);
        if let Some(q) = query {
            target.push('?');
            target.push_str(q);
        }
        Ok(target)
    }

    /// `base` as the URL parser normalizes it (IDNA, default port, dot segments), when the
    /// egress guard lets calls go there.
    fn judge_base(&self, base: &str) -> Result<String, String> {
        let url = url::Url::parse(base).map_err(|_| UNUSABLE_BASE.to_owned())?;
        self.egress.check_url(&url)?;
        let mut normalized = String::from(url);
        // The parser writes an empty path as `/`; the call's own path follows the base.
        if normalized.ends_with('/') && !base.ends_with('/') {
            normalized.pop();
        }
        Ok(normalized)
    }

    /// No audit, no forward: the call may change data at the vendor.
    pub async fn audit_forwarding(
        &self,
        caller: &str,
        system_id: &str,
        method: &str,
        masked: &str,
    ) -> Result<(), ProxyRefusal> {
        let audited = self
            .audit
            .record(&proxy_event(
                (Some(caller), system_id),
                (method, masked),
                ("forwarding", "FORWARDING"),
                None,
            ))
            .await;
        if audited.is_err() && self.audit.fail_closed() {
            return Err(ProxyRefusal::Unaudited);
        }
        Ok(())
    }

    /// The audit event of a finished proxied call (a refusal without a known caller only
    /// within the refusal rate limit). `status` is the HTTP status the worker got.
    pub async fn audit_proxied(
        &self,
        caller: Option<&str>,
        system_id: &str,
        method: &str,
        masked: &str,
        status: u16,
        duration: Duration,
    ) {
        if caller.is_none() && !self.audit.admit_refusal() {
            return;
        }
        let code = status.to_string();
        let outcome = if (200..400).contains(&status) {
            "ok"
        } else {
            "error"
        };
        let _ = self
            .audit
            .record(&proxy_event(
                (caller, system_id),
                (method, masked),
                (outcome, &code),
                Some(duration),
            ))
            .await;
    }

    /// The audit event of an admitted proxied call its worker went away from before it ended
    /// (`outcome: cancelled`). Written without waiting: the event joins its batch at once, and
    /// a batch's leader dropped here writes it.
    pub fn audit_proxy_abandoned(
        &self,
        caller: &str,
        system_id: &str,
        method: &str,
        masked: &str,
        duration: Duration,
    ) {
        drop(self.audit.record(&proxy_event(
            (Some(caller), system_id),
            (method, masked),
            ("cancelled", "CANCELLED"),
            Some(duration),
        )));
    }

    /// Admits a proxied call under the system's quota (see [`crate::broker::quota`]); a
    /// refusal is counted by reason.
    pub async fn admit_quota(
        &self,
        grant: &ProxyGrant,
        system_id: &str,
    ) -> Result<QuotaPermit, Limited> {
        let kind = grant.token.kind;
        let admitted = self.quotas.admit(system_id, kind).await;
        if let Err(limited) = &admitted {
            crate::metrics::METRICS.quota_refusal(kind, limited.reason.as_str());
        }
        admitted
    }

    /// Learns from the vendor's answer to an admitted call; a block that begins here is
    /// announced as a health change (and its end likewise).
    pub fn learn_quota(&self, system_id: &str, permit: &QuotaPermit, signals: &RateSignals) {
        let kind = permit.quota().kind();
        if signals.throttled {
            crate::metrics::METRICS.vendor_throttled(kind);
        }
        let learned = self.quotas.learn(system_id, permit, signals);
        // Short pauses (Asana's second, Azure DevOps' delays) are not health changes.
        let long = signals.wait.is_some_and(|w| w >= ANNOUNCED_BLOCK);
        if learned.block_started && long && permit.quota().start_announcing() {
            self.announce_block(system_id, permit.quota().clone());
        }
    }

    /// `system.health_changed` to degraded while the vendor blocks the system, and back when
    /// the block has passed (announced by the replica that met the block). A system already
    /// failing is left so (a block is no improvement). After each end the announcer waits
    /// [`ANNOUNCE_COOL_DOWN`]: a block that came and went meanwhile is not announced, one still
    /// on then is; so a vendor that blocks again and again costs two events per cool-down.
    fn announce_block(&self, system_id: &str, quota: Arc<crate::broker::quota::SystemQuota>) {
        let announcing = Announcing(quota);
        let (weak, id) = (self.me.clone(), system_id.to_owned());
        tokio::spawn(async move {
            // The book of the system met (a system deleted and registered again has another).
            let quota = announcing.0.clone();
            let _announcing = announcing;
            loop {
                if !announce_degraded(&weak, &id, &quota).await {
                    return;
                }
                wait_out_block(&quota).await;
                if !announce_recovered(&weak, &id).await {
                    return;
                }
                tokio::time::sleep(ANNOUNCE_COOL_DOWN).await;
                // Only a block long enough to announce, still on after the cool-down.
                let left = blocked_until(&quota)
                    .map(|until| until.saturating_sub(crate::broker::quota::now_ms()));
                if left.is_none_or(|ms| ms < ANNOUNCED_BLOCK.as_millis() as u64) {
                    return;
                }
            }
        });
    }

    fn quota_tag(&self, body: &str) -> Option<String> {
        let mut m = mac(self.quota_key.as_bytes())?;
        m.update(body.as_bytes());
        Some(crate::util::hex::encode(&m.finalize().into_bytes()))
    }

    /// Sends this replica's changed quota readings to the others sharing the store, signed,
    /// until the broker is gone.
    pub(crate) fn start_quota_sharing(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let (changes, closed) = (self.quotas.changes(), self.events.closed());
        tokio::spawn(async move {
            tokio::pin!(closed);
            loop {
                // Waits holding no broker: it can be dropped meanwhile.
                tokio::select! {
                    () = changes.notified() => {}
                    () = &mut closed => break,
                }
                // Coalesces what changes meanwhile into one round of broadcasts.
                tokio::time::sleep(crate::broker::quota::SHARE_EVERY).await;
                let Some(broker) = me.upgrade() else { break };
                broker.share_quota().await;
            }
        });
    }

    async fn share_quota(&self) {
        for batch in self.quotas.changed_batches() {
            let Some(tag) = self.quota_tag(&batch) else {
                continue;
            };
            let sent = self.store.broadcast_quota(&format!("{tag}.{batch}")).await;
            if let Err(e) = sent {
                tracing::warn!(message = "Could not share quota readings with the other replicas.", error = %e);
            }
        }
    }

    /// Merges another replica's quota readings, when they carry this deployment's signature.
    pub(crate) fn merge_quota(&self, payload: &str) {
        let Some((tag, batch)) = payload.split_once('.') else {
            return;
        };
        let Some(want) = self.quota_tag(batch) else {
            return;
        };
        let same: bool = subtle::ConstantTimeEq::ct_eq(want.as_bytes(), tag.as_bytes()).into();
        if !same {
            // Whoever can NOTIFY could fill the log: once a minute at most.
            static LAST_WARNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let now = unix_now();
            let last = LAST_WARNED.load(std::sync::atomic::Ordering::Relaxed);
            if now >= last + 60 {
                LAST_WARNED.store(now, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    message =
                        "Refused quota readings that do not carry this deployment's signature."
                );
            }
            return;
        }
        self.quotas.merge(batch);
    }

    /// Counts a vendor 401 seen through the proxy on the system (surfaced in `System`), in the
    /// background: one writer per system at a time adds every 401 seen in the second before
    /// each write, so a storm of them is a write a second, and the worker's answer never waits
    /// for the store. An OAuth access token the vendor refused is reported as a worker with the
    /// headers would (`rejected_token_id`): one re-mint, in the background, for however many
    /// calls saw it refused, and at most one per [`PROXY_REMINT_INTERVAL`] (a 401 that is not
    /// about the token, such as a scope the grant lacks, must not drive a refresh a second).
    pub fn note_proxy_unauthorized(&self, system_id: &str, token: &IssuedToken) {
        let Some(broker) = self.me.upgrade() else {
            return;
        };
        // A 401 for a token already replaced is no news (and must not use up the minute).
        let current = self
            .cached(system_id)
            .is_some_and(|c| c.token_id == token.token_id);
        // Not once the stop has begun: its wait for exchanges in flight may be over, and a
        // refresh cut off mid-rotation would lose the grant.
        let stopping = self.draining.load(std::sync::atomic::Ordering::Relaxed);
        if token.refreshable
            && current
            && !stopping
            && self.may_remint_for_proxy(system_id, Instant::now())
        {
            let (broker, id, refused) =
                (broker.clone(), system_id.to_owned(), token.token_id.clone());
            tokio::spawn(async move {
                // A failure is the grant's own (recorded on the system); nothing to add.
                let _ = broker.access_token(&id, 0, Some(&refused)).await;
            });
        }
        let lead = {
            let mut seen = crate::util::sync::lock(&self.unauthorized);
            let n = seen.entry(system_id.to_owned()).or_insert(0);
            *n += 1;
            *n == 1
        };
        if lead {
            let id = system_id.to_owned();
            tokio::spawn(async move { broker.count_unauthorized(&id).await });
        }
    }

    /// Whether a vendor 401 through the proxy may make `system_id`'s token be minted again at
    /// `now` (see [`Self::note_proxy_unauthorized`]); if so, the time is noted.
    pub(crate) fn may_remint_for_proxy(&self, system_id: &str, now: Instant) -> bool {
        let mut last = crate::util::sync::lock(&self.proxy_remints);
        match last.get(system_id) {
            Some(at) if now.saturating_duration_since(*at) < PROXY_REMINT_INTERVAL => false,
            _ => {
                last.insert(system_id.to_owned(), now);
                true
            }
        }
    }

    /// The writer of [`Self::note_proxy_unauthorized`]: adds what was seen until nothing is left.
    async fn count_unauthorized(&self, system_id: &str) {
        let mut written = 0;
        loop {
            // The 401s of the next second join this write.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let n = {
                let mut seen = crate::util::sync::lock(&self.unauthorized);
                let total = seen.get(system_id).copied().unwrap_or(0);
                if total == written {
                    seen.remove(system_id);
                    return;
                }
                total - written
            };
            let counted = self
                .update_system_with(system_id, |r| {
                    r.proxy_unauthorized_count += n;
                    r.last_proxy_unauthorized_at = Some(unix_now());
                    true
                })
                .await;
            written += n;
            if counted.is_ok() {
                tracing::warn!(message = "The vendor rejected the credential through the proxy (401).", system_id = %system_id, count = n);
            }
        }
    }
}
/// Blocks at least this long are announced as health changes.
const ANNOUNCED_BLOCK: Duration = Duration::from_secs(5);
/// After a block's end is announced, the next is announced no sooner than this.
const ANNOUNCE_COOL_DOWN: Duration = Duration::from_secs(60);

/// When the block on `quota`'s system ends, if it is blocked.
fn blocked_until(quota: &crate::broker::quota::SystemQuota) -> Option<u64> {
    quota.view(crate::broker::quota::now_ms()).blocked_until_ms
}

/// Announces the block on `id` as a health change to degraded; false when there is nothing to
/// announce (no block now, no record, or the system already failing).
async fn announce_degraded(
    weak: &std::sync::Weak<Broker>,
    id: &str,
    quota: &crate::broker::quota::SystemQuota,
) -> bool {
    let Some(me) = weak.upgrade() else {
        return false;
    };
    let Some(until) = blocked_until(quota) else {
        return false;
    };
    let Ok(record) = me.get_system(id).await else {
        return false;
    };
    let now = unix_now();
    let (before, _) = crate::broker::health::derive(&record, now);
    if before == SystemHealth::Failing {
        return false;
    }
    let reason = crate::broker::quota::blocked_reason(until);
    let mut blocked = record.clone();
    blocked.health = Some(HealthMark {
        health: SystemHealth::Degraded,
        reason: reason.clone(),
        since: now,
        warned_days: None,
        warned_for: None,
    });
    me.emit(
        EventType::HealthChanged,
        &blocked,
        format!("{} → degraded: {reason}", before.as_str()),
    );
    true
}

/// Returns once no block is left on `quota`'s system (it may be extended meanwhile).
async fn wait_out_block(quota: &crate::broker::quota::SystemQuota) {
    while let Some(until) = blocked_until(quota) {
        let left = until.saturating_sub(crate::broker::quota::now_ms());
        tokio::time::sleep(Duration::from_millis(left.max(1))).await;
    }
}

/// Announces the end of the block on `id`, with the health the record has now; a store that
/// does not answer is asked again a few times (else subscribers would see degraded for good).
/// False when no end could be announced (the system gone, the store away, the broker stopped).
async fn announce_recovered(weak: &std::sync::Weak<Broker>, id: &str) -> bool {
    for attempt in 0..5u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(u64::from(attempt) * 2)).await;
        }
        let Some(me) = weak.upgrade() else {
            return false;
        };
        let record = match me.get_system(id).await {
            Ok(r) => r,
            Err(BrokerError::NotFound(_)) => return false,
            Err(_) => continue,
        };
        let (after, why) = crate::broker::health::derive(&record, unix_now());
        let why = if why.is_empty() {
            "the rate limit has passed".to_owned()
        } else {
            why
        };
        me.emit(
            EventType::HealthChanged,
            &record,
            format!("degraded → {}: {why}", after.as_str()),
        );
        return true;
    }
    false
}

/// Lets the next block be announced once this announcement ends (or is dropped).
struct Announcing(Arc<crate::broker::quota::SystemQuota>);

impl Drop for Announcing {
    fn drop(&mut self) {
        self.0.stop_announcing();
    }
}

/// What a worker is handed by `GetAccessToken`.
pub enum HandOut {
    /// The system's headers, ready to send to the vendor.
    Headers(Arc<IssuedToken>),
    /// A lease for the broker's proxy.
    Lease(Lease),
}

/// A signed, short-lived permission to call one system through the broker's proxy.
pub struct Lease {
    /// The lease itself, sent as `Authorization: Bearer …` to the proxy.
    pub authorization: SecretString,
    /// When the proxy stops accepting it.
    pub expires_at: SystemTime,
    /// The proxy's URL for the system.
    pub api_base_url: String,
    /// The credential version the lease is bound to.
    pub credential_version: u64,
    /// The lease's id (audited, never the lease).
    pub lease_id: String,
}

/// A proxied call the broker admits.
pub struct ProxyGrant {
    /// The lease's caller.
    pub caller: String,
    /// The lease's expiry, Unix seconds.
    pub lease_expires: u64,
    /// The system's current headers (sent upstream, never to the worker).
    pub token: Arc<IssuedToken>,
    /// Where the call goes.
    pub url: String,
}

/// Why a proxied call is not forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyRefusal {
    /// No valid lease for this system, or its caller, the system, its delivery or its
    /// credential version changed since: ask `GetAccessToken` again.
    Lease,
    /// The system cannot be called as registered (why, without a secret).
    Upstream(String),
    /// The audit trail cannot be written (fail-closed): nothing is forwarded.
    Unaudited,
}

/// Why a call to a system cannot be sent as registered.
pub const UNUSABLE_BASE: &str = "the registered base URL is not usable";

fn unusable_base() -> ProxyRefusal {
    ProxyRefusal::Upstream(UNUSABLE_BASE.to_owned())
}

/// True when no path segment escapes (`..`, `.`, also with `;parameters` or encoded, encoded
/// separators, backslashes, NUL) and every `%` starts a two-hex-digit escape (IIS also decodes
/// `%u002e`, which Azure DevOps Server may sit behind).
pub fn is_clean_path(tail: &str) -> bool {
    if tail.contains('\\') || !escapes_well_formed(tail) {
        return false;
    }
    tail.split('/').skip(1).all(|seg| {
        // Plain segments (the usual API path) need no decoding.
        if !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~' | b':' | b'@'))
        {
            return true;
        }
        let decoded = url::form_urlencoded::parse(format!("x={seg}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let lower = seg.to_ascii_lowercase();
        // Servlet containers drop a segment's `;parameters` before resolving it: `..;x` is `..`.
        let name = decoded.split(';').next().unwrap_or_default();
        name != ".."
            && name != "."
            && !decoded.contains('/')
            && !decoded.contains('\\')
            && !decoded.contains('\0')
            && !lower.contains("%2f")
            && !lower.contains("%5c")
            && !lower.contains("%00")
    })
}

/// True when every `%` in `s` is followed by two hex digits.
fn escapes_well_formed(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter().enumerate().all(|(i, c)| {
        *c != b'%'
            || b.get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    })
}

/// The path with id-like segments replaced by `{id}` (for the audit trail), cut after
/// [`MAX_AUDITED_PATH`] bytes at a segment boundary with the length left out noted.
pub fn mask_path(tail: &str) -> String {
    let mut masked = String::with_capacity(tail.len().min(MAX_AUDITED_PATH) + 16);
    // Bytes of `tail` shown (masked or not) so far.
    let mut shown = 0;
    for (i, seg) in tail.split('/').enumerate() {
        let part = if id_like(seg) { "{id}" } else { seg };
        if masked.len() + 1 + part.len() > MAX_AUDITED_PATH {
            masked.push_str(&format!("/…(+{} bytes)", tail.len() - shown));
            break;
        }
        if i > 0 {
            masked.push('/');
            shown += 1;
        }
        masked.push_str(part);
        shown += seg.len();
    }
    masked
}

/// A path segment that looks like a record id: all digits, or 8+ letters, digits and dashes
/// with at least one digit.
fn id_like(seg: &str) -> bool {
    let digits = seg.bytes().filter(u8::is_ascii_digit).count();
    !seg.is_empty()
        && (digits == seg.len()
            || (seg.len() >= 8
                && digits > 0
                && seg.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')))
}

#[cfg(test)]
mod tests {
    use super::{mask_path, under_base};

    #[test]
    fn ids_are_masked_by_whole_segments() {
        assert_eq!(mask_path(""), "");
        assert_eq!(mask_path("/users/me"), "/users/me");
        assert_eq!(mask_path("/tasks/1204/stories"), "/tasks/{id}/stories");
        assert_eq!(
            mask_path("/rest/api/3/issue/PROJ-1234/x/"),
            "/rest/api/{id}/issue/{id}/x/"
        );
        assert_eq!(
            mask_path("/objects/0a1b2c3d-77/ünï/abcdefgh"),
            "/objects/{id}/ünï/abcdefgh"
        );
    }

    #[test]
    fn dot_segments_with_parameters_are_escapes_too() {
        use super::is_clean_path;
        for escape in [
            "/a/..;x/b",
            "/a/.;/b",
            "/..;jsessionid=1/admin",
            "/a/%2e%2e;x/b",
            "/a/%u002e%u002e/b",
            "/a/%U002E./b",
            "/a/b%",
            "/a/b%2",
            "/a/%zz/b",
        ] {
            assert!(!is_clean_path(escape), "{escape}");
        }
        for clean in ["/a/b;v=1", "/a/..x;y/b", "/a/b", "/a/;x", "/a/%20b/%C3%A9"] {
            assert!(is_clean_path(clean), "{clean}");
        }
    }

    #[test]
    fn long_paths_and_methods_are_cut_for_the_trail() {
        let long = format!("/a/{}/b/{}", "x".repeat(200), "y".repeat(60_000));
        let masked = mask_path(&long);
        let kept = 3 + 200 + 2;
        assert_eq!(
            masked,
            format!("/a/{}/b/…(+{} bytes)", "x".repeat(200), long.len() - kept)
        );
        // One segment longer than the cap: nothing of it is shown.
        let one = format!("/{}", "z".repeat(1_000));
        assert_eq!(mask_path(&one), "/…(+1001 bytes)");
        let at_cap = format!("/{}", "w".repeat(super::MAX_AUDITED_PATH - 1));
        assert_eq!(mask_path(&at_cap), at_cap);
        assert_eq!(super::audited_method("PATCH"), "PATCH");
        assert_eq!(super::audited_method(&"M".repeat(17)), "OTHER");
    }

    #[test]
    fn locations_are_under_the_base_by_whole_segments() {
        let base = "https://acme.example/acme";
        assert_eq!(under_base("https://acme.example/acme", base), Some(""));
        assert_eq!(under_base("https://acme.example/acme/x", base), Some("/x"));
        assert_eq!(
            under_base("https://acme.example/acme?a=1", base),
            Some("?a=1")
        );
        assert_eq!(under_base("https://acme.example/acme2/x", base), None);
        assert_eq!(under_base("https://acme.example.evil/acme", base), None);
        assert_eq!(
            under_base("https://acme.example/acme/", "https://acme.example/acme/"),
            Some("/")
        );
    }
}
