//! Webhooks: system events POSTed to the configured endpoints, signed the Standard Webhooks way
//! (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "{id}.{timestamp}.{body}">`).
//!
//! Deliveries follow the store's event log (see [`crate::broker::events`]), one task per
//! endpoint, in log order, from a cursor kept in the store (`webhook/<endpoint>` in `meta`): an
//! event is retried with backoff (1 s doubling to 10 min) until it is delivered (a 2xx), refused
//! for good (a final 4xx) or 24 hours old, and the cursor moves past it only then. So a restart,
//! or another replica taking over, resumes where delivery stopped; an event whose 2xx was not yet
//! recorded when the process died is sent again with the same `webhook-id` (receivers dedupe on
//! it, as Standard Webhooks asks). With replicas on PostgreSQL one replica delivers (it holds the
//! `webhooks` lead; another takes over within seconds when it dies). Deliveries go through the
//! broker's outbound client, so the egress guard applies (a refused address is never contacted).
//! Bodies carry metadata only: no secret, token id, lease or URL query.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;

use crate::backends::HttpClient;
use crate::broker::events::{Event, EventType};
use crate::broker::Broker;
use crate::config::WebhookConfig;

/// How long an event is retried.
const GIVE_UP_AFTER_SECS: u64 = 24 * 3600;
/// The longest pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// Events read from the log at a time.
const READ_BATCH: usize = 100;
/// How often a replica without the lead tries to take it.
const LEAD_RETRY: Duration = Duration::from_secs(2);

/// Starts delivering to the configured endpoints (on one replica at a time); ends when the
/// broker's events close.
pub fn start(broker: &Arc<Broker>, http: &HttpClient, hooks: &[WebhookConfig]) {
    if hooks.is_empty() {
        return;
    }
    let endpoints: Vec<Arc<Endpoint>> = hooks
        .iter()
        .map(|hook| {
            Arc::new(Endpoint {
                hook: hook.clone(),
                keys: signing_keys(hook.secret.expose_secret()),
                // A webhook URL's path may be its secret (Slack, Teams): hosts only in logs.
                http: http.without_path_logs(),
            })
        })
        .collect();
    // Waited for at stop: a delivery in flight finishes and records its cursor (so a
    // graceful restart sends nothing twice).
    let task = tokio::spawn(lead(broker.clone(), endpoints));
    crate::util::sync::lock(&broker.background).push(task);
}

/// How long a stop waits for deliveries in flight.
pub const STOP_WAIT: Duration = Duration::from_secs(5);

/// Takes the `webhooks` lead, delivers while holding it, and tries again when it is lost.
async fn lead(broker: Arc<Broker>, endpoints: Vec<Arc<Endpoint>>) {
    let closed = broker.events.closed();
    tokio::pin!(closed);
    loop {
        let lead = match broker.store.try_lead("webhooks").await {
            Ok(Some(lead)) => lead,
            _ => {
                tokio::select! {
                    _ = &mut closed => return,
                    _ = tokio::time::sleep(LEAD_RETRY) => continue,
                }
            }
        };
        let mut tasks = JoinSet::new();
        for e in &endpoints {
            tasks.spawn(e.clone().run(broker.clone()));
        }
        loop {
            tokio::select! {
                _ = &mut closed => {
                    // The endpoints stop at their next safe point (between events, in a
                    // backoff); one still waiting for an answer after STOP_WAIT is cut off.
                    let all = async { while tasks.join_next().await.is_some() {} };
                    if tokio::time::timeout(STOP_WAIT, all).await.is_err() {
                        tasks.shutdown().await;
                    }
                    return;
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if lead.is_lost() {
                tracing::warn!(
                    message =
                        "Lost the webhooks lead (store connection); another replica takes over."
                );
                tasks.shutdown().await;
                break;
            }
        }
    }
}

/// The HMAC key: the base64 after `whsec_` (Standard Webhooks), else the secret's bytes.
fn signing_key(secret: &str) -> zeroize::Zeroizing<Vec<u8>> {
    zeroize::Zeroizing::new(
        secret
            .strip_prefix("whsec_")
            .and_then(|b| STANDARD.decode(b).ok())
            .unwrap_or_else(|| secret.as_bytes().to_vec()),
    )
}

/// The keys every delivery is signed with: several `whsec_` secrets separated by white space
/// while a receiver's secret is rotated (new and old: the receiver accepts either), else the
/// one secret as written.
fn signing_keys(secret: &str) -> Vec<zeroize::Zeroizing<Vec<u8>>> {
    let words: Vec<&str> = secret.split_whitespace().collect();
    if words.len() > 1 && words.iter().all(|w| w.starts_with("whsec_")) {
        words.into_iter().map(signing_key).collect()
    } else {
        vec![signing_key(secret)]
    }
}

/// The `webhook-signature` header: one signature per key, separated by spaces.
fn signatures(keys: &[zeroize::Zeroizing<Vec<u8>>], id: &str, at: u64, body: &[u8]) -> String {
    let all: Vec<String> = keys.iter().map(|k| signature(k, id, at, body)).collect();
    all.join(" ")
}

/// `v1,<base64 HMAC-SHA256("{id}.{timestamp}.{body}")>`.
pub fn signature(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        // HMAC takes keys of any length; unreachable, but never a panic.
        Err(_) => return String::new(),
    };
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

struct Endpoint {
    hook: WebhookConfig,
    keys: Vec<zeroize::Zeroizing<Vec<u8>>>,
    http: HttpClient,
}

impl Endpoint {
    fn wants(&self, e: &Event) -> bool {
        e.kind != EventType::Snapshot
            && (self.hook.events.is_empty()
                || self.hook.events.iter().any(|t| t == e.kind.as_str()))
    }

    /// Connect links travel only over HTTPS (or to a receiver on this machine).
    fn carries_links(&self) -> bool {
        url::Url::parse(&self.hook.url).is_ok_and(|u| {
            u.scheme() == "https"
                || match u.host() {
                    Some(url::Host::Ipv4(a)) => a.is_loopback(),
                    Some(url::Host::Ipv6(a)) => a.is_loopback(),
                    Some(url::Host::Domain(d)) => d == "localhost",
                    None => false,
                }
        })
    }

    /// Where this endpoint's cursor is kept: a digest of its URL (which may hold a token) and
    /// its event filter (two entries for one URL with different filters keep their own).
    fn cursor_key(&self) -> String {
        let mut events = self.hook.events.clone();
        events.sort();
        let d = Sha256::digest(format!("{}\n{}", self.hook.url, events.join(",")).as_bytes());
        format!("webhook/{}", crate::util::hex::encode(&d[..8]))
    }

    /// The stored cursor; a new endpoint starts at the log's end (its subscription).
    async fn load_cursor(&self, broker: &Broker) -> Option<u64> {
        let key = self.cursor_key();
        match broker.store.get_meta(&key).await {
            Ok(Some(v)) => match String::from_utf8_lossy(&v).parse() {
                Ok(c) => Some(c),
                Err(_) => {
                    tracing::warn!(message = "A webhook delivery cursor in the store is unreadable; delivery starts at the newest event.", host = %host_of(&self.hook.url));
                    let now = broker.events.newest();
                    self.save_cursor(broker, now).await;
                    Some(now)
                }
            },
            Ok(None) => {
                let now = broker.events.newest();
                // A new endpoint, or one whose URL or filter changed (its cursor is named after
                // them): what happened before is not sent.
                tracing::info!(message = "A webhook endpoint without a delivery cursor starts at the newest event.", host = %host_of(&self.hook.url), cursor = now);
                self.save_cursor(broker, now).await;
                Some(now)
            }
            Err(_) => None,
        }
    }

    async fn save_cursor(&self, broker: &Broker, seq: u64) {
        if let Err(e) = broker
            .store
            .put_meta(&self.cursor_key(), seq.to_string().as_bytes())
            .await
        {
            tracing::warn!(message = "Could not record a webhook delivery cursor; a restart sends its events again.", host = %host_of(&self.hook.url), error = %e);
        }
    }

    async fn run(self: Arc<Self>, broker: Arc<Broker>) {
        let mut cursor = loop {
            match self.load_cursor(&broker).await {
                Some(c) => break c,
                None => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        };
        let Ok(opening) = broker.events.resume(None) else {
            return;
        };
        let mut wake = opening.live;
        loop {
            if broker.events.is_closed() {
                return;
            }
            let batch = match broker.store.events_after(cursor, READ_BATCH).await {
                Ok(b) => b,
                Err(_) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let Some(first) = batch.first() else {
                // Woken by the next event pulled into memory (or a minute, as a backstop); the
                // wake-ups that piled up meanwhile are one.
                tokio::select! {
                    _ = broker.events.closed() => return,
                    _ = tokio::time::timeout(Duration::from_secs(60), wake.recv()) => {}
                }
                while !matches!(
                    wake.try_recv(),
                    Err(tokio::sync::broadcast::error::TryRecvError::Empty
                        | tokio::sync::broadcast::error::TryRecvError::Closed)
                ) {}
                continue;
            };
            if first.seq > cursor + 1 && cursor > 0 {
                let lost = first.seq - cursor - 1;
                tracing::warn!(message = "Webhook endpoint fell behind the event log; events were lost.", host = %host_of(&self.hook.url), events = lost);
                crate::metrics::METRICS.webhooks("dropped", lost);
            }
            for stored in &batch {
                if let Some(e) = Event::decode(stored).filter(|e| self.wants(e)) {
                    if !self.deliver_until_done(&broker, &e).await {
                        // Stopping: the cursor stays before this event.
                        self.save_cursor(&broker, cursor).await;
                        return;
                    }
                    self.save_cursor(&broker, stored.seq).await;
                }
                cursor = stored.seq;
            }
            self.save_cursor(&broker, cursor).await;
        }
    }

    /// Retries `e` with backoff until it is delivered, refused for good, or a day old (true),
    /// or the broker stops (false: not done).
    async fn deliver_until_done(&self, broker: &Broker, e: &Event) -> bool {
        let mut backoff = Duration::from_secs(1);
        loop {
            if crate::model::unix_now().saturating_sub(e.at) > GIVE_UP_AFTER_SECS {
                crate::metrics::METRICS.webhook("expired");
                return true;
            }
            if broker.events.is_closed() {
                return false;
            }
            match self.deliver(broker, e).await {
                Attempt::Delivered | Attempt::Rejected => return true,
                Attempt::Retry => {}
            }
            tokio::select! {
                _ = broker.events.closed() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One attempt. A 4xx about this event (400, 413, 422, …) is the receiver's final word on
    /// it: it is dropped, so one event it will never take cannot hold back the others for a
    /// day. 401, 403 and 404 say the receiver is not ready for any event (a secret being
    /// rotated, a deploy half done): retried like an outage, so that window loses nothing.
    /// 408 and 429 are retried too.
    async fn deliver(&self, broker: &Broker, e: &Event) -> Attempt {
        let id = format!("msg_{}", broker.events.cursor(e.seq));
        let timestamp = crate::model::unix_now();
        let body = payload(broker, e, self.carries_links())
            .to_string()
            .into_bytes();
        let req = self
            .http
            .raw()
            .post(&self.hook.url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signatures(&self.keys, &id, timestamp, &body),
            )
            .body(body);
        let (outcome, attempt) = match self.http.send(req).await {
            Ok(r) if (200..300).contains(&r.status) => ("delivered", Attempt::Delivered),
            // Told apart from an outage: an endpoint that stays here needs its receiver fixed.
            Ok(r) if matches!(r.status, 401 | 403 | 404) => ("unauthorized", Attempt::Retry),
            Ok(r) if (400..500).contains(&r.status) && !matches!(r.status, 408 | 429) => {
                ("rejected", Attempt::Rejected)
            }
            Ok(_) => ("refused", Attempt::Retry),
            Err(crate::backends::http::TransportError::Refused(_)) => ("blocked", Attempt::Retry),
            Err(_) => ("unreachable", Attempt::Retry),
        };
        crate::metrics::METRICS.webhook(outcome);
        if outcome != "delivered" {
            tracing::warn!(message = "Webhook delivery failed.", host = %host_of(&self.hook.url), outcome, r#type = e.kind.as_str());
        }
        attempt
    }
}

/// What one delivery attempt means for the event.
enum Attempt {
    Delivered,
    Rejected,
    Retry,
}

/// The endpoint's host, for logs (a URL may carry a token in its query).
fn host_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The Standard Webhooks body: `{type, timestamp, data}`; metadata only.
fn payload(broker: &Broker, e: &Event, links: bool) -> serde_json::Value {
    let s = &e.system;
    let reauth = e.kind == EventType::ReauthorizationRequired
        && s.credential_type == crate::model::CredentialType::OAuthAuthorizationCode;
    let link = (reauth && links).then(|| broker.connect_link(s)).flatten();
    // The health recorded with the event, not the health when a retry finally gets through.
    let (health, reason) = match &s.health {
        Some(m) => (m.health, m.reason.clone()),
        None => crate::broker::health::derive(s, e.at),
    };
    json!({
        "type": e.kind.as_str(),
        "timestamp": crate::audit::rfc3339(i64::try_from(e.at).unwrap_or(i64::MAX), 0).as_str(),
        "data": {
            "system_id": s.system_id,
            "kind": s.kind.slug(),
            "state": match s.state {
                crate::model::SystemState::Active => "active",
                crate::model::SystemState::AuthorizationPending => "authorization_pending",
                crate::model::SystemState::ReauthorizationRequired => "reauthorization_required",
            },
            "credential_type": s.credential_type.field_name(),
            "credential_version": s.credential_version,
            // Events of one system may arrive out of order (several writers): the higher
            // revision is the newer state.
            "revision": s.revision,
            "credential_expires_at": s.credential_expires_at,
            "health": health.as_str(),
            "health_reason": reason,
            "detail": e.detail,
            "at": e.at,
            "connect": reauth
                .then(|| format!("credbrokerctl system connect {}", s.system_id)),
            // A ready link: opening it starts the Connect flow (signed, 24 h, this version).
            "connect_url": link,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks specification's own example.
    #[test]
    fn signatures_match_the_standard_webhooks_example() {
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let sig = signature(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    /// While a secret is rotated, every delivery carries a signature per secret; one raw
    /// secret with spaces in it stays one secret.
    #[test]
    fn a_rotation_signs_with_each_secret() {
        let old = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let both = signing_keys(&format!("whsec_bmV3LXNlY3JldA==\n{old}"));
        let header = signatures(
            &both,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        let sigs: Vec<&str> = header.split(' ').collect();
        assert_eq!(sigs.len(), 2, "{header}");
        assert_eq!(sigs[1], "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert_eq!(signing_keys("a raw secret phrase").len(), 1);
        assert_eq!(
            *signing_keys("a raw secret phrase")[0],
            b"a raw secret phrase".to_vec()
        );
    }
}
