//! Webhooks: system events POSTed to the configured endpoints, signed the Standard Webhooks way
//! (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "{id}.{timestamp}.{body}">`).
//!
//! One task per endpoint keeps its own queue, in event order: an event is retried with backoff
//! (1 s doubling to 10 min) until it is delivered (a 2xx) or 24 hours old, and is never sent again
//! once an answer said 2xx. Deliveries go through the broker's outbound client, so the egress
//! guard applies (a refused address is never contacted). Bodies carry metadata only: no secret,
//! token id, lease or URL query. The queue lives in memory: a restart forgets undelivered events.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use tokio::sync::broadcast::error::RecvError;

use crate::backends::HttpClient;
use crate::broker::events::{Event, EventType};
use crate::broker::Broker;
use crate::config::WebhookConfig;

/// How long an event is retried.
const GIVE_UP_AFTER_SECS: u64 = 24 * 3600;
/// The longest pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// The most events queued for one endpoint (the oldest are dropped beyond it).
const MAX_QUEUE: usize = 10_000;

/// Starts one delivery task per endpoint; they end when the broker's events close.
pub fn start(broker: &Arc<Broker>, http: &HttpClient, hooks: &[WebhookConfig]) {
    for hook in hooks {
        let endpoint = Endpoint {
            hook: hook.clone(),
            key: signing_key(hook.secret.expose_secret()),
            http: http.clone(),
        };
        tokio::spawn(endpoint.run(broker.clone()));
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
    key: zeroize::Zeroizing<Vec<u8>>,
    http: HttpClient,
}

impl Endpoint {
    fn wants(&self, e: &Event) -> bool {
        e.kind != EventType::Snapshot
            && (self.hook.events.is_empty()
                || self.hook.events.iter().any(|t| t == e.kind.as_str()))
    }

    async fn run(self, broker: Arc<Broker>) {
        let closed = broker.events.closed();
        tokio::pin!(closed);
        let Ok((_, mut live, at)) = broker.events.resume(None) else {
            return;
        };
        let mut cursor = broker.events.cursor(at);
        let mut queue: VecDeque<Arc<Event>> = VecDeque::new();
        let mut backoff = Duration::from_secs(1);
        loop {
            // Take in what arrived, without waiting.
            loop {
                match live.try_recv() {
                    Ok(e) => {
                        cursor = broker.events.cursor(e.seq);
                        if self.wants(&e) {
                            queue.push_back(e);
                        }
                    }
                    Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {
                        self.catch_up(&broker, &mut live, &mut cursor, &mut queue);
                    }
                    Err(_) => break,
                }
            }
            while queue.len() > MAX_QUEUE {
                queue.pop_front();
                crate::metrics::METRICS.webhook("dropped");
            }
            let now = crate::model::unix_now();
            while queue
                .front()
                .is_some_and(|e| now.saturating_sub(e.at) > GIVE_UP_AFTER_SECS)
            {
                queue.pop_front();
                crate::metrics::METRICS.webhook("expired");
            }
            let Some(next) = queue.front().cloned() else {
                tokio::select! {
                    _ = &mut closed => return,
                    got = live.recv() => match got {
                        Ok(e) => {
                            cursor = broker.events.cursor(e.seq);
                            if self.wants(&e) {
                                queue.push_back(e);
                            }
                        }
                        Err(RecvError::Lagged(_)) => {
                            self.catch_up(&broker, &mut live, &mut cursor, &mut queue);
                        }
                        Err(RecvError::Closed) => return,
                    },
                }
                continue;
            };
            match self.deliver(&broker, &next).await {
                Attempt::Delivered | Attempt::Rejected => {
                    queue.pop_front();
                    backoff = Duration::from_secs(1);
                    continue;
                }
                Attempt::Retry => {}
            }
            tokio::select! {
                _ = &mut closed => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Fell behind the live feed: catch up from the log (or, past it, say what was lost).
    fn catch_up(
        &self,
        broker: &Broker,
        live: &mut tokio::sync::broadcast::Receiver<Arc<Event>>,
        cursor: &mut String,
        queue: &mut VecDeque<Arc<Event>>,
    ) {
        match broker.events.resume(Some(cursor)) {
            Ok((missed, rx, at)) => {
                *live = rx;
                *cursor = broker.events.cursor(at);
                queue.extend(missed.into_iter().filter(|e| self.wants(e)));
            }
            Err(_) => {
                tracing::warn!(message = "Webhook endpoint fell behind the event log; events were lost.", host = %host_of(&self.hook.url));
                crate::metrics::METRICS.webhook("dropped");
                *cursor = broker.events.now_cursor();
                if let Ok((_, rx, _)) = broker.events.resume(None) {
                    *live = rx;
                }
            }
        }
    }

    /// One attempt. A 4xx other than 408 and 429 is the receiver's final word on this event: it
    /// is dropped, so one event it will never take cannot hold back the others for a day.
    async fn deliver(&self, broker: &Broker, e: &Event) -> Attempt {
        let id = format!("msg_{}", broker.events.cursor(e.seq));
        let timestamp = crate::model::unix_now();
        let body = payload(e).to_string().into_bytes();
        let req = self
            .http
            .raw()
            .post(&self.hook.url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signature(&self.key, &id, timestamp, &body),
            )
            .body(body);
        let (outcome, attempt) = match self.http.send(req).await {
            Ok(r) if (200..300).contains(&r.status) => ("delivered", Attempt::Delivered),
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
fn payload(e: &Event) -> serde_json::Value {
    let s = &e.system;
    // The health recorded with the event, not the health when a retry finally gets through.
    let (health, reason) = match &s.health {
        Some(m) => (m.health, m.reason.clone()),
        None => crate::broker::health::derive(s, e.at),
    };
    json!({
        "type": e.kind.as_str(),
        "timestamp": crate::util::time::date_time(e.at),
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
            "credential_expires_at": s.credential_expires_at,
            "health": health.as_str(),
            "health_reason": reason,
            "detail": e.detail,
            "at": e.at,
            "connect": (e.kind == EventType::ReauthorizationRequired
                && s.credential_type == crate::model::CredentialType::OAuthAuthorizationCode)
                .then(|| format!("credbrokerctl system connect {}", s.system_id)),
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
}
