//! The token cache and refresher without a server: a broker on the in-memory store with a fake
//! backend whose every answer the test scripts, and tokio's paused clock to move time.

#![cfg(test)]

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use zeroize::Zeroizing;

use crate::backends::{Backend, BackendError, EgressPolicy, Header, Issued, Registry, Target};
use crate::broker::connect::StateCheck;
use crate::broker::{Broker, BrokerSettings, RegisterInput};
use crate::crypto::keys::MasterKey;
use crate::crypto::Keyring;
use crate::error::BrokerError;
use crate::model::{AuthCheck, AuthFailure, Credential, Identity, SystemKind};
use crate::model::{CallerRecord, SystemRecord, SystemState};
use crate::secret::SecretString;
use crate::store::memory::MemoryStore;
use crate::store::{CredentialStore, RefreshLock, StoreError, StoredEvent};

const SYSTEM: &str = "acme-snow";
const LIFETIME: Duration = Duration::from_secs(100);

/// One scripted answer of the fake token endpoint.
enum Answer {
    /// A token valid for [`LIFETIME`]; `Some(rt)` also rotates the refresh token to `rt`.
    Token(Option<&'static str>),
    Transient(Option<Duration>),
    /// The call was sent and no answer came in time: the vendor may have acted on it.
    Unknown,
    /// The client is refused (`invalid_client`).
    Rejected,
    /// The grant is refused (`invalid_grant`): a spent or revoked refresh token.
    GrantRefused,
    /// A token that is no header value (CR LF in it), with the refresh token rotated to `rt`.
    Unsendable(&'static str),
}

/// A token endpoint that answers from a script (then with plain tokens), counts its calls, and
/// can hold every call until the test opens its gate.
struct FakeBackend {
    script: Mutex<VecDeque<Answer>>,
    calls: AtomicUsize,
    gate: tokio::sync::Semaphore,
    entered: tokio::sync::Notify,
}

impl FakeBackend {
    fn new(gated: bool, script: Vec<Answer>) -> Arc<Self> {
        Arc::new(Self {
            script: Mutex::new(script.into()),
            calls: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(if gated { 0 } else { 1 << 20 }),
            entered: tokio::sync::Notify::new(),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn open_gate(&self) {
        self.gate.add_permits(1 << 20);
    }
}

#[async_trait]
impl Backend for FakeBackend {
    fn kind(&self) -> SystemKind {
        SystemKind::ServiceNow
    }

    fn canonical_base_url(&self, raw: &str, _egress: &EgressPolicy) -> Result<String, String> {
        Ok(raw.to_owned())
    }

    async fn issue(&self, target: &Target<'_>) -> Result<Issued, BackendError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        self.entered.notify_one();
        let _permit = self.gate.acquire().await;
        let answer = self.script.lock().unwrap().pop_front();
        let mut tail = "";
        let rotated = match answer.unwrap_or(Answer::Token(None)) {
            Answer::Token(rotated) => rotated,
            Answer::Unsendable(rt) => {
                tail = "\r\nX-Injected: 1";
                Some(rt)
            }
            Answer::Transient(retry_after) => {
                return Err(BackendError::Transient {
                    failure: AuthFailure::UpstreamError,
                    message: "token endpoint answered 503".to_owned(),
                    retry_after,
                })
            }
            Answer::Unknown => {
                return Err(BackendError::Transient {
                    failure: AuthFailure::UpstreamError,
                    message: "could not reach the token endpoint (timed out after 10s)".to_owned(),
                    retry_after: None,
                })
            }
            Answer::Rejected => {
                return Err(BackendError::Rejected {
                    failure: AuthFailure::InvalidCredentials,
                    message: "invalid_client".to_owned(),
                })
            }
            Answer::GrantRefused => {
                return Err(BackendError::Rejected {
                    failure: AuthFailure::ReauthorizationRequired,
                    message: "invalid_grant".to_owned(),
                })
            }
        };
        let updated_credential = rotated.map(|rt| match target.credential.clone() {
            Credential::OAuthRefreshToken {
                client_id,
                client_secret,
                username,
                refresh_expires_at,
                ..
            } => Credential::OAuthRefreshToken {
                client_id,
                client_secret,
                refresh_token: SecretString::new(rt.to_owned()),
                username,
                refresh_expires_at,
            },
            other => other,
        });
        Ok(Issued {
            headers: vec![Header {
                name: "authorization",
                value: SecretString::new(format!("Bearer access-{n}{tail}")),
            }],
            expires_at: Some(SystemTime::now() + LIFETIME),
            api_base_url: target.base_url.to_owned(),
            updated_credential,
            subject: None,
        })
    }

    async fn verify(&self, _target: &Target<'_>, _issued: &Issued) -> AuthCheck {
        AuthCheck::ok(Identity::default(), "the grant authenticates")
    }

    /// As Atlassian's (a fake that stands for a vendor with the leeway).
    fn reuse_leeway(&self) -> Option<Duration> {
        Some(Duration::from_secs(600))
    }
}

/// A broker on the memory store with `backend` for ServiceNow and one OAuth system registered.
async fn broker_with(backend: Arc<FakeBackend>) -> Arc<Broker> {
    broker_on(backend, Arc::new(MemoryStore::new())).await
}

/// A broker on `store` with `backend` for ServiceNow and one OAuth system registered.
async fn broker_on(backend: Arc<FakeBackend>, store: Arc<dyn CredentialStore>) -> Arc<Broker> {
    let broker = open_on(backend, store).await;
    broker.register(snow(SYSTEM)).await.unwrap();
    broker
}

/// A broker on `store` with `backend` for ServiceNow (another replica, when `store` is shared).
async fn open_on(backend: Arc<FakeBackend>, store: Arc<dyn CredentialStore>) -> Arc<Broker> {
    let backend: Arc<dyn Backend> = backend;
    let registry = Registry::from_backends(vec![(SystemKind::ServiceNow, backend)]);
    let settings = BrokerSettings {
        keepalive_interval: Duration::from_secs(365 * 86_400),
        ..BrokerSettings::default()
    };
    let key = MasterKey::from_bytes(Zeroizing::new([7u8; 32]));
    let (broker, _) = Broker::open(store, Keyring::new(key), registry, settings)
        .await
        .unwrap();
    broker
}

/// The refresh token the store holds for the system now.
async fn stored_refresh_token(broker: &Broker) -> String {
    let record = broker.get_system(SYSTEM).await.unwrap();
    match broker.open_credential(&record).unwrap() {
        Credential::OAuthRefreshToken { refresh_token, .. } => {
            refresh_token.expose_secret().to_owned()
        }
        other => panic!("unexpected credential {:?}", other.credential_type()),
    }
}

/// A worker asks for a token and goes away (its deadline) while the vendor is answering; the
/// vendor answers, and every exchange in flight has finished when this returns.
async fn drop_caller_mid_exchange(broker: &Arc<Broker>, backend: &FakeBackend) {
    let caller = tokio::spawn({
        let b = broker.clone();
        async move { b.access_token(SYSTEM, 0, None).await }
    });
    backend.entered.notified().await;
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    backend.open_gate();
    assert!(broker.drain_exchanges(Duration::from_secs(5)).await);
}

/// Once a stop has waited for the calls, a call it abandoned (its task lives on) starts no
/// vendor exchange: the exit would cut it, and a refresh token the vendor rotated in it would
/// be lost. The exchange already running is waited for and stored; a call queued behind it
/// still gets the token it brought; only a call that needs a new one is refused; and no
/// detached work starts.
#[tokio::test]
async fn once_exchanges_are_refused_no_new_one_reaches_the_vendor() {
    let backend = FakeBackend::new(true, vec![Answer::Token(Some("rt-2"))]);
    let broker = broker_with(backend.clone()).await;
    let running = tokio::spawn({
        let b = broker.clone();
        async move { b.access_token(SYSTEM, 0, None).await }
    });
    backend.entered.notified().await;
    // A second call waits behind the running refresh for the system's lock.
    let queued = tokio::spawn({
        let b = broker.clone();
        async move { b.access_token(SYSTEM, 0, None).await }
    });
    tokio::task::yield_now().await;
    broker.refuse_new_exchanges();
    backend.open_gate();
    assert!(broker.drain_exchanges(Duration::from_secs(5)).await);
    let fresh = running.await.unwrap().unwrap();
    assert_eq!(stored_refresh_token(&broker).await, "rt-2");
    assert_eq!(queued.await.unwrap().unwrap().token_id, fresh.token_id);
    let refused = broker
        .access_token(SYSTEM, 0, Some(&fresh.token_id))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, BrokerError::Unavailable(_)),
        "{refused:?}"
    );
    assert_eq!(backend.calls(), 1, "an exchange started after the drain");
    assert!(broker.run_detached(async { 1 }).await.is_none());
}

#[tokio::test]
async fn many_waiters_share_one_upstream_call() {
    let backend = FakeBackend::new(true, vec![]);
    let broker = broker_with(backend.clone()).await;
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let b = broker.clone();
            tokio::spawn(async move { b.access_token(SYSTEM, 0, None).await })
        })
        .collect();
    backend.entered.notified().await;
    backend.open_gate();
    let mut ids = Vec::new();
    for w in waiters {
        ids.push(w.await.unwrap().unwrap().token_id.clone());
    }
    assert_eq!(backend.calls(), 1, "one upstream call for 20 waiters");
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
}

#[tokio::test(start_paused = true)]
async fn a_used_token_is_refreshed_once_ahead_of_expiry() {
    let backend = FakeBackend::new(false, vec![]);
    let broker = broker_with(backend.clone()).await;
    let refresher = broker.start_refresher();
    let first = broker.access_token(SYSTEM, 0, None).await.unwrap();
    // Handed out from the cache: a token workers use is the one renewed ahead.
    let warm = broker.answers_from_cache(SYSTEM, 0, "").unwrap();
    broker.hand_out_cached(warm);
    // Ahead fraction 0.2 of a 100 s lifetime: the refresh is due at 80 s, not before.
    tokio::time::sleep(Duration::from_secs(79)).await;
    assert_eq!(backend.calls(), 1, "refreshed too early");
    tokio::time::sleep(Duration::from_secs(2)).await;
    while backend.calls() < 2 {
        backend.entered.notified().await;
    }
    assert!(broker.drain_exchanges(Duration::from_secs(5)).await);
    let second = broker.cached(SYSTEM).unwrap();
    assert_ne!(second.token_id, first.token_id);
    // The new token is not used yet: it is not renewed again ahead of its own expiry.
    tokio::time::sleep(Duration::from_secs(90)).await;
    assert_eq!(backend.calls(), 2, "an unused token was renewed");
    refresher.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn checking_an_idle_system_does_not_keep_its_tokens_renewed() {
    let backend = FakeBackend::new(false, vec![]);
    let broker = broker_with(backend.clone()).await;
    let refresher = broker.start_refresher();
    let checked = broker
        .check(crate::broker::CheckTarget::Stored(SYSTEM.to_owned()))
        .await
        .unwrap();
    assert!(checked.ok);
    assert_eq!(backend.calls(), 1, "the check minted one token");
    // Nobody uses it: no renewal ahead of its expiry (at 80 s), none after.
    tokio::time::sleep(Duration::from_secs(150)).await;
    assert_eq!(backend.calls(), 1, "a token only a check used was renewed");
    refresher.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_endpoint_is_backed_off_not_hammered() {
    let backend = FakeBackend::new(false, vec![Answer::Transient(None)]);
    let broker = broker_with(backend.clone()).await;
    let err = broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    assert!(matches!(err, BrokerError::Unavailable(_)), "{err:?}");
    // Within the backoff (retry_base 1 s, jittered to 0.5–1 s) nothing reaches the vendor.
    for _ in 0..10 {
        let again = broker.access_token(SYSTEM, 0, None).await.unwrap_err();
        assert!(again.to_string().contains("retries in"), "{again}");
    }
    assert_eq!(backend.calls(), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    broker.access_token(SYSTEM, 0, None).await.unwrap();
    assert_eq!(backend.calls(), 2);
}

/// A refresh that timed out after it was sent (the vendor may have turned the refresh token
/// over) is settled by the broker itself within Atlassian's 10-minute reuse leeway, though no
/// worker, check or keep-alive comes back: a vendor's long `Retry-After` meanwhile does not
/// push the next try past it.
#[tokio::test(start_paused = true)]
async fn an_unknown_refresh_outcome_is_settled_within_the_reuse_leeway() {
    let backend = FakeBackend::new(
        false,
        vec![
            Answer::Unknown,
            Answer::Transient(Some(Duration::from_secs(600))),
            Answer::Token(Some("rt-2")),
        ],
    );
    let broker = broker_with(backend.clone()).await;
    let refresher = broker.start_refresher();
    // A check (nothing cached, nobody waiting after it) meets the timeout.
    let checked = broker
        .check(crate::broker::CheckTarget::Stored(SYSTEM.to_owned()))
        .await
        .unwrap();
    assert!(!checked.ok);
    assert_eq!(backend.calls(), 1);
    let noted = broker.get_system(SYSTEM).await.unwrap().state_message;
    assert!(noted.is_some_and(|m| m.contains("outcome is unknown")));
    let started = tokio::time::Instant::now();
    let tries = async {
        while backend.calls() < 3 {
            backend.entered.notified().await;
        }
    };
    let in_time = tokio::time::timeout(Duration::from_secs(3600), tries).await;
    assert!(
        in_time.is_ok(),
        "not presented again: {} calls",
        backend.calls()
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(300), "settled after {took:?}");
    assert!(broker.drain_exchanges(Duration::from_secs(5)).await);
    assert_eq!(stored_refresh_token(&broker).await, "rt-2");
    let record = broker.get_system(SYSTEM).await.unwrap();
    assert_eq!(record.state_message, None, "the note is cleared");
    // Settled: nothing more is presented.
    tokio::time::sleep(Duration::from_secs(1800)).await;
    assert_eq!(backend.calls(), 3);
    refresher.shutdown().await;
}

/// Settling stops at the end of the window, and when another credential is stored meanwhile
/// (an admin's reconnect) nothing is presented for the old one.
#[tokio::test(start_paused = true)]
async fn settling_an_unknown_outcome_stops_at_the_window_or_another_credential() {
    let backend = FakeBackend::new(false, (0..40).map(|_| Answer::Unknown).collect());
    let broker = broker_with(backend.clone()).await;
    let refresher = broker.start_refresher();
    broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    tokio::time::sleep(Duration::from_secs(660)).await;
    let within = backend.calls();
    assert!(within >= 4, "tried {within} times within the window");
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(backend.calls(), within, "presented again after the window");
    refresher.shutdown().await;

    // The reconnect is made on another replica: this one's refresh state is not reset by it.
    let store = Arc::new(MemoryStore::new());
    let backend = FakeBackend::new(false, (0..40).map(|_| Answer::Unknown).collect());
    let broker = broker_on(backend.clone(), store.clone()).await;
    let other = open_on(FakeBackend::new(false, vec![]), store).await;
    let refresher = broker.start_refresher();
    broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    other
        .rotate(SYSTEM, admins_credential(), true)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(
        backend.calls(),
        1,
        "the replaced credential was presented again"
    );
    refresher.shutdown().await;
}

/// A try that gets the vendor's answer settles it, even when the store then refuses the
/// credential it brought (kept pending for the store): it is not presented again, which would
/// turn it over again and again. A stopped refresher presents nothing.
#[tokio::test(start_paused = true)]
async fn an_answered_try_or_a_stop_ends_the_settling() {
    let store = Shared::new(usize::MAX);
    let backend = FakeBackend::new(false, vec![Answer::Unknown, Answer::Token(Some("rt-2"))]);
    let broker = broker_on(backend.clone(), store.clone()).await;
    let refresher = broker.start_refresher();
    broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    store.updates_down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1800)).await;
    assert_eq!(
        backend.calls(),
        2,
        "presented again after the vendor answered"
    );
    refresher.shutdown().await;

    let backend = FakeBackend::new(false, (0..40).map(|_| Answer::Unknown).collect());
    let broker = broker_with(backend.clone()).await;
    let refresher = broker.start_refresher();
    broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    refresher.shutdown().await;
    tokio::time::sleep(Duration::from_secs(1800)).await;
    assert_eq!(backend.calls(), 1, "presented after the refresher stopped");
}

/// Asking for more validity than the vendor grants (3600 s of a 100 s token) re-mints at most
/// once per half lifetime, not every `min_demand_interval` (each Zendesk refresh revokes the
/// token every other worker holds). (Expiries here are on the wall clock, which a paused test
/// does not move; ages are on tokio's.)
#[tokio::test(start_paused = true)]
async fn demand_beyond_any_token_re_mints_once_per_half_lifetime() {
    let backend = FakeBackend::new(false, vec![]);
    let broker = broker_with(backend.clone()).await;
    for _ in 0..200 {
        broker.access_token(SYSTEM, 3600, None).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Minted at 0 s, then about every 50 s: 5 calls in 200 s (every 10 s would be 20).
    let calls = backend.calls();
    assert!((4..=5).contains(&calls), "{calls} token calls");
}

/// A demand the cached token cannot meet re-mints once the token is older than half its
/// lifetime (or the demand interval), however close to the lifetime the demand is (asking
/// 1795 s of 1800-s tokens must not re-mint every 10 s either).
#[tokio::test(start_paused = true)]
async fn a_demand_below_the_lifetime_re_mints_once_per_half_lifetime_too() {
    let token = |age_secs: u64, left_secs: u64| super::IssuedToken {
        headers: Vec::new(),
        expires_at: SystemTime::now() + Duration::from_secs(left_secs),
        api_base_url: String::new(),
        credential_version: 1,
        kind: SystemKind::Zendesk,
        delivery: Default::default(),
        token_id: "t".to_owned(),
        refreshable: true,
        subject: None,
        used: Default::default(),
        minted_at: tokio::time::Instant::now() - Duration::from_secs(age_secs),
        lifetime: Duration::from_secs(1800),
        audit_hmac: Default::default(),
        upstream_base: Default::default(),
        answer: Default::default(),
    };
    tokio::time::advance(Duration::from_secs(3600)).await;
    let need = SystemTime::now() + Duration::from_secs(1795);
    let fresh_for = Duration::from_secs(10);
    assert!(
        token(100, 1700).serves(need, fresh_for),
        "re-minted after 100 s"
    );
    assert!(token(899, 901).serves(need, fresh_for));
    assert!(!token(900, 900).serves(need, fresh_for), "kept past half");
    assert!(token(0, 1800).serves(need, fresh_for));
    // Expired: never served.
    assert!(!token(100, 0).serves(need, fresh_for));
    let static_token = super::IssuedToken {
        refreshable: false,
        ..token(1, 1700)
    };
    assert!(!static_token.serves(need, fresh_for));
}

#[tokio::test(start_paused = true)]
async fn a_vendor_retry_after_is_honoured() {
    let backend = FakeBackend::new(
        false,
        vec![Answer::Transient(Some(Duration::from_secs(30)))],
    );
    let broker = broker_with(backend.clone()).await;
    broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    tokio::time::sleep(Duration::from_secs(29)).await;
    broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    assert_eq!(
        backend.calls(),
        1,
        "called again inside the vendor's Retry-After"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.access_token(SYSTEM, 0, None).await.unwrap();
    assert_eq!(backend.calls(), 2);
}

/// Another replica's write that leaves the credential alone (a note, a health check, a 401
/// count) does not lift the vendor's `Retry-After` here; a credential rotated there does, as
/// the backoff was about the old one.
#[tokio::test(start_paused = true)]
async fn only_another_credential_lifts_a_vendors_retry_after() {
    let store = Arc::new(MemoryStore::new());
    let backend = FakeBackend::new(
        false,
        vec![Answer::Transient(Some(Duration::from_secs(30)))],
    );
    let broker = broker_on(backend.clone(), store.clone()).await;
    let other = open_on(FakeBackend::new(false, vec![]), store).await;
    let settled = |broker: Arc<Broker>| async move {
        let flight = broker.flight(SYSTEM);
        let mut f = flight.lock().await;
        broker.settle_remote_change(&mut f, SYSTEM).await;
    };
    broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    other
        .update_system_with(SYSTEM, |r| {
            r.description = "noted on another replica".to_owned();
            true
        })
        .await
        .unwrap();
    settled(broker.clone()).await;
    broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    assert_eq!(
        backend.calls(),
        1,
        "called again inside the vendor's Retry-After"
    );
    other
        .rotate(SYSTEM, admins_credential(), false)
        .await
        .unwrap();
    settled(broker.clone()).await;
    broker.access_token(SYSTEM, 0, None).await.unwrap();
    assert_eq!(backend.calls(), 2, "the new credential was not tried");
}

#[tokio::test]
async fn backoff_doubles_and_is_capped() {
    let broker = broker_with(FakeBackend::new(false, vec![])).await;
    for failures in 1..=12u32 {
        let d = broker.backoff_delay(failures, None);
        let full = Duration::from_secs(1 << (failures - 1).min(16)).min(Duration::from_secs(300));
        assert!(
            d >= full / 2 && d <= full,
            "{failures}: {d:?} outside {full:?}/2..={full:?}"
        );
    }
    let absurd = broker.backoff_delay(1, Some(Duration::from_secs(99_999_999)));
    assert_eq!(absurd, Duration::from_secs(600), "Retry-After is capped");
}

#[tokio::test]
async fn a_dropped_caller_never_loses_a_rotated_refresh_token() {
    let backend = FakeBackend::new(true, vec![Answer::Token(Some("rt-2"))]);
    let broker = broker_with(backend.clone()).await;
    drop_caller_mid_exchange(&broker, &backend).await;
    assert_eq!(stored_refresh_token(&broker).await, "rt-2");
    // The token minted for the dropped caller serves the next one without a second call.
    broker.access_token(SYSTEM, 0, None).await.unwrap();
    assert_eq!(backend.calls(), 1);
}

#[tokio::test]
async fn a_dropped_caller_still_records_a_dead_grant() {
    let backend = FakeBackend::new(true, vec![Answer::Rejected]);
    let broker = broker_with(backend.clone()).await;
    drop_caller_mid_exchange(&broker, &backend).await;
    let record = broker.get_system(SYSTEM).await.unwrap();
    assert_eq!(
        record.state,
        crate::model::SystemState::ReauthorizationRequired
    );
    let err = broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    assert!(matches!(err, BrokerError::FailedPrecondition(_)), "{err:?}");
    // A dead grant is not retried upstream.
    assert_eq!(backend.calls(), 1);
}

/// A store shared with other (imagined) replicas: refreshes take its lock and read the record
/// again with a fresh read, which answers only `fresh_answers` more times, then finds the
/// database away. Its ordinary reads keep answering, as a replica's mirror does.
#[derive(Default)]
struct Shared {
    inner: MemoryStore,
    fresh_answers: AtomicUsize,
    fresh_reads: AtomicUsize,
    /// Updates fail as unreachable while set; `updates` counts the tries.
    updates_down: std::sync::atomic::AtomicBool,
    updates: AtomicUsize,
    /// What the ordinary reads answer for these ids instead: a mirror's stale copy.
    mirrored: Mutex<Vec<SystemRecord>>,
    /// `take_meta` fails as unreachable while set.
    meta_down: std::sync::atomic::AtomicBool,
    /// Refresh locks cannot be had while set (as when this replica's lock slots are all held).
    locks_busy: std::sync::atomic::AtomicBool,
    /// The next update lands, then answers unreachable (its answer lost).
    lose_next_answer: std::sync::atomic::AtomicBool,
    /// A lost answer's record is re-wrapped before the answer is lost (as another replica's key
    /// rotation would, between the write and its retry).
    rewrap_lost: std::sync::atomic::AtomicBool,
    /// After a lost answer, the next ordinary read answers the record as it was before the write
    /// (a replica's mirror, serving while the database is away, has not seen it yet).
    stale_after_lost: std::sync::atomic::AtomicBool,
    /// The stale copy put in `mirrored` by `stale_after_lost` goes with the next update (the
    /// mirror catches up).
    stale_once: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn new(fresh_answers: usize) -> Arc<Self> {
        let s = Self::default();
        s.fresh_answers.store(fresh_answers, Ordering::SeqCst);
        Arc::new(s)
    }

    /// [`rewrap`]s `id`'s stored record.
    async fn rewrap(&self, id: &str) {
        let mut r = self.inner.get_system(id).await.unwrap().unwrap();
        rewrap(&mut r);
        let ring = Keyring::new(MasterKey::from_bytes(Zeroizing::new([7u8; 32])));
        let read = r.revision;
        r.revision += 1;
        // Tagged as the replica's authenticated store would (this store is below that layer).
        let tagger = crate::store::AuthenticatedStore::new(
            Arc::new(MemoryStore::new()),
            ring.derive_subkey("record-integrity"),
        );
        r.integrity = Some(tagger.system_tag(&r));
        self.inner.update_system(&r, read).await.unwrap();
    }
}

/// Re-wraps `r`'s sealed credential as a replica's key rotation does (the data key wrapped anew;
/// here under the same KEK, which changes the sealed bytes all the same).
fn rewrap(r: &mut SystemRecord) {
    let binding = crate::crypto::RecordBinding {
        system_id: &r.system_id,
        credential_type: r.credential_type,
        version: r.credential_version,
    };
    let ring = Keyring::new(MasterKey::from_bytes(Zeroizing::new([7u8; 32])));
    let rewrapped = ring.rewrap(&binding, &r.sealed_credential).unwrap();
    assert_ne!(rewrapped, r.sealed_credential);
    r.sealed_credential = rewrapped;
}

#[async_trait]
impl CredentialStore for Shared {
    async fn get_system(&self, id: &str) -> Result<Option<SystemRecord>, StoreError> {
        let mirrored = (self.mirrored.lock().unwrap().iter())
            .find(|r| r.system_id == id)
            .cloned();
        match mirrored {
            Some(r) => Ok(Some(r)),
            None => self.inner.get_system(id).await,
        }
    }
    async fn get_system_fresh(&self, id: &str) -> Result<Option<SystemRecord>, StoreError> {
        self.fresh_reads.fetch_add(1, Ordering::SeqCst);
        let left = self.fresh_answers.load(Ordering::SeqCst);
        if left == 0 {
            return Err(StoreError::Unreachable("the database is away".into()));
        }
        self.fresh_answers.store(left - 1, Ordering::SeqCst);
        self.inner.get_system_fresh(id).await
    }
    async fn list_systems(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SystemRecord>, StoreError> {
        self.inner.list_systems(after, limit).await
    }
    async fn insert_system(&self, r: &SystemRecord) -> Result<(), StoreError> {
        self.inner.insert_system(r).await
    }
    async fn update_system_fenced(
        &self,
        r: &SystemRecord,
        rev: u64,
        fence: crate::store::Fence,
    ) -> Result<(), StoreError> {
        // The locks this test store hands out cannot be lost.
        let _ = fence;
        self.update_system(r, rev).await
    }
    async fn update_system(&self, r: &SystemRecord, rev: u64) -> Result<(), StoreError> {
        self.updates.fetch_add(1, Ordering::SeqCst);
        if self.updates_down.load(Ordering::SeqCst) {
            return Err(StoreError::Unreachable("the database is away".into()));
        }
        if self.stale_once.swap(false, Ordering::SeqCst) {
            self.mirrored.lock().unwrap().clear();
        }
        let before = self.inner.get_system(&r.system_id).await?;
        self.inner.update_system(r, rev).await?;
        if self.lose_next_answer.swap(false, Ordering::SeqCst) {
            if self.stale_after_lost.swap(false, Ordering::SeqCst) {
                self.mirrored.lock().unwrap().extend(before);
                self.stale_once.store(true, Ordering::SeqCst);
            }
            if self.rewrap_lost.load(Ordering::SeqCst) {
                self.rewrap(&r.system_id).await;
            }
            return Err(StoreError::Unreachable("the answer was lost".into()));
        }
        Ok(())
    }
    async fn delete_system(&self, id: &str) -> Result<bool, StoreError> {
        self.inner.delete_system(id).await
    }
    async fn count_systems(&self) -> Result<usize, StoreError> {
        self.inner.count_systems().await
    }
    async fn list_callers(&self) -> Result<Vec<CallerRecord>, StoreError> {
        self.inner.list_callers().await
    }
    async fn insert_caller(&self, r: &CallerRecord) -> Result<(), StoreError> {
        self.inner.insert_caller(r).await
    }
    async fn update_caller(&self, r: &CallerRecord) -> Result<(), StoreError> {
        self.inner.update_caller(r).await
    }
    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_meta(key).await
    }
    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner.put_meta(key, value).await
    }
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    fn is_shared(&self) -> bool {
        true
    }
    async fn lock_refresh(
        &self,
        _id: &str,
        _wait: Duration,
    ) -> Result<Option<RefreshLock>, StoreError> {
        if self.locks_busy.load(Ordering::SeqCst) {
            return Err(StoreError::Backend(
                "too many refreshes hold this replica's refresh locks; retry shortly".into(),
            ));
        }
        Ok(Some(RefreshLock::new(())))
    }
    async fn append_events(&self, events: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        self.inner.append_events(events).await
    }
    async fn events_after(&self, seq: u64, n: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.events_after(seq, n).await
    }
    async fn last_event_seq(&self) -> Result<u64, StoreError> {
        self.inner.last_event_seq().await
    }
    async fn init_meta(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.inner.init_meta(key, value).await
    }
    async fn take_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if self.meta_down.load(Ordering::SeqCst) {
            return Err(StoreError::Unreachable("the database is away".into()));
        }
        self.inner.take_meta(key).await
    }
}

/// Under the replica refresh lock the record is read from the database itself: when that
/// read fails, the refresh waits like any store outage instead of spending whatever refresh
/// token a mirror copy holds (another replica may have rotated it).
#[tokio::test]
async fn a_refresh_under_the_replica_lock_never_uses_a_mirror_copy() {
    let backend = FakeBackend::new(false, vec![]);
    let store = Shared::new(0);
    let broker = broker_on(backend.clone(), store.clone()).await;
    let err = broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    assert!(matches!(err, BrokerError::Unavailable(_)), "{err:?}");
    assert_eq!(
        backend.calls(),
        0,
        "refreshed with a credential not read fresh"
    );
    let record = broker.get_system(SYSTEM).await.unwrap();
    assert_eq!(record.state, SystemState::Active);
}

/// A vendor's refusal is weighed against the stored credential before the grant is declared
/// dead: while the database cannot be read, the system is not marked for re-authorization
/// (another replica may have rotated the credential the refusal was for). Once it answers
/// again, the kept refusal stands if the refused credential is still the stored one: the grant
/// is marked dead with no second upstream call (the vendor is not handed a refused refresh
/// token again and again).
#[tokio::test(start_paused = true)]
async fn a_refusal_is_weighed_once_the_shared_store_answers_without_a_second_vendor_call() {
    let backend = FakeBackend::new(false, vec![Answer::Rejected]);
    let store = Shared::new(1);
    let broker = broker_on(backend.clone(), store.clone()).await;
    let err = broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    assert!(matches!(err, BrokerError::Unavailable(_)), "{err:?}");
    let record = broker.get_system(SYSTEM).await.unwrap();
    assert_eq!(record.state, SystemState::Active);
    store.fresh_answers.store(usize::MAX, Ordering::SeqCst);
    kept_refusal_stands_after_the_pause(&broker, &backend).await;
}

/// Past the store's pause, a kept refusal stands: the grant is marked dead, with no second
/// vendor call.
async fn kept_refusal_stands_after_the_pause(broker: &Broker, backend: &FakeBackend) {
    tokio::time::advance(Duration::from_secs(120)).await;
    let err = broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    assert!(matches!(err, BrokerError::FailedPrecondition(_)), "{err:?}");
    assert_eq!(
        backend.calls(),
        1,
        "the refused credential was presented again"
    );
    let record = broker.get_system(SYSTEM).await.unwrap();
    assert_eq!(record.state, SystemState::ReauthorizationRequired);
}

/// A worker's mint on a shared store, held at the vendor (which will give `answer` once the
/// test opens its gate): the broker, the vendor, the store and the worker's call.
async fn mint_held_at_the_vendor(
    answer: Answer,
) -> (
    Arc<Broker>,
    Arc<FakeBackend>,
    Arc<Shared>,
    tokio::task::JoinHandle<Result<Arc<crate::broker::tokens::IssuedToken>, BrokerError>>,
) {
    let backend = FakeBackend::new(true, vec![answer]);
    let store = Shared::new(usize::MAX);
    let broker = broker_on(backend.clone(), store.clone()).await;
    let caller = tokio::spawn({
        let b = broker.clone();
        async move { b.access_token(SYSTEM, 0, None).await }
    });
    backend.entered.notified().await;
    (broker, backend, store, caller)
}

/// Another replica's write to the system while the vendor is answering this one's refresh.
async fn change_meanwhile(store: &Arc<Shared>, change: impl FnOnce(&mut SystemRecord)) {
    change_system(store, SYSTEM, change).await;
}

/// Writes `change` to system `id` as another replica would.
async fn change_system(store: &Arc<Shared>, id: &str, change: impl FnOnce(&mut SystemRecord)) {
    let key = MasterKey::from_bytes(Zeroizing::new([7u8; 32]));
    let other = crate::store::AuthenticatedStore::new(
        store.clone(),
        Keyring::new(key).derive_subkey("record-integrity"),
    );
    let mut record = other.get_system(id).await.unwrap().unwrap();
    let revision = record.revision;
    change(&mut record);
    record.revision = revision + 1;
    other.update_system(&record, revision).await.unwrap();
}

/// A refresh the vendor refuses while another replica writes `change` to the system; what the
/// worker got.
async fn refused_while(
    change: impl FnOnce(&mut SystemRecord),
) -> (
    Result<Arc<crate::broker::tokens::IssuedToken>, BrokerError>,
    Arc<Broker>,
    Arc<FakeBackend>,
) {
    let (broker, backend, store, caller) = mint_held_at_the_vendor(Answer::Rejected).await;
    change_meanwhile(&store, change).await;
    backend.open_gate();
    (caller.await.unwrap(), broker, backend)
}

/// A refusal is for the credential presented: when another replica re-connected the system
/// meanwhile (a new credential, waiting for its authorization), the refusal neither overwrites
/// that state nor marks the new grant dead.
#[tokio::test]
async fn a_refusal_never_marks_a_credential_replaced_meanwhile() {
    let (got, broker, backend) = refused_while(|r| {
        r.sealed_credential = b"another credential".to_vec();
        r.credential_version += 1;
        r.state = SystemState::AuthorizationPending;
    })
    .await;
    let err = got.unwrap_err();
    assert!(matches!(err, BrokerError::FailedPrecondition(_)), "{err:?}");
    let record = broker.get_system(SYSTEM).await.unwrap();
    assert_eq!(record.state, SystemState::AuthorizationPending);
    assert_eq!(backend.calls(), 1);
}

/// A write that changed the record but not its credential (a health note) is no reason to
/// present the refused credential a second time.
#[tokio::test]
async fn a_refusal_stands_when_only_the_record_changed_meanwhile() {
    let (got, broker, backend) =
        refused_while(|r| r.description = "noted elsewhere".to_owned()).await;
    let err = got.unwrap_err();
    assert!(matches!(err, BrokerError::FailedPrecondition(_)), "{err:?}");
    assert_eq!(backend.calls(), 1);
    let record = broker.get_system(SYSTEM).await.unwrap();
    assert_eq!(record.state, SystemState::ReauthorizationRequired);
}

/// Nor is a key rotation's re-wrap, which keeps the credential: the refusal stands and the grant
/// is marked.
#[tokio::test]
async fn a_refusal_stands_when_the_credential_was_only_rewrapped_meanwhile() {
    let (got, broker, backend) = refused_while(rewrap).await;
    let err = got.unwrap_err();
    assert!(matches!(err, BrokerError::FailedPrecondition(_)), "{err:?}");
    assert_eq!(backend.calls(), 1);
    let record = broker.get_system(SYSTEM).await.unwrap();
    assert_eq!(record.state, SystemState::ReauthorizationRequired);
}

/// A database that grants the refresh lock but cannot answer the read under it (its connection
/// pool exhausted, say) is waited for with a growing backoff, not asked again every second.
#[tokio::test(start_paused = true)]
async fn a_lock_without_a_read_backs_off_more_each_time() {
    let backend = FakeBackend::new(false, vec![]);
    let store = Shared::new(0);
    let broker = broker_on(backend.clone(), store.clone()).await;
    for _ in 0..120 {
        let err = broker.access_token(SYSTEM, 0, None).await.unwrap_err();
        assert!(matches!(err, BrokerError::Unavailable(_)), "{err:?}");
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    let reads = store.fresh_reads.load(Ordering::SeqCst);
    assert!(
        reads <= 12,
        "{reads} reads in two minutes: the backoff does not grow"
    );
    assert_eq!(backend.calls(), 0);
}

/// A refusal kept while the store was away is for the credential refused: when another
/// replica rotated the grant meanwhile, this one forgets the refusal and refreshes with the new
/// refresh token once the store answers.
#[tokio::test(start_paused = true)]
async fn a_kept_refusal_is_forgotten_once_another_replica_rotated_the_grant() {
    let backend = FakeBackend::new(false, vec![Answer::Rejected]);
    let store = Shared::new(1);
    let broker = broker_on(backend.clone(), store.clone()).await;
    let err = broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    assert!(matches!(err, BrokerError::Unavailable(_)), "{err:?}");
    store.fresh_answers.store(usize::MAX, Ordering::SeqCst);
    let other_vendor = FakeBackend::new(false, vec![Answer::Token(Some("rt-2"))]);
    let other = open_on(other_vendor.clone(), store.clone()).await;
    other.access_token(SYSTEM, 0, None).await.unwrap();
    assert_eq!(stored_refresh_token(&other).await, "rt-2");
    // Past the backoff, this replica needs a token valid longer than the other's: it must
    // refresh itself.
    tokio::time::advance(Duration::from_secs(120)).await;
    let longer = LIFETIME.as_secs() as u32 + 20;
    broker.access_token(SYSTEM, longer, None).await.unwrap();
    assert_eq!(backend.calls(), 2);
    let record = broker.get_system(SYSTEM).await.unwrap();
    assert_eq!(record.state, SystemState::Active);
}

/// A broker on a shared store whose first mint rotates the refresh token to `rt-2` while the
/// store refuses writes: the worker got UNAVAILABLE and `rt-2` is pending. Writes stay refused.
async fn with_a_refused_rotation() -> (Arc<Broker>, Arc<FakeBackend>, Arc<Shared>) {
    let backend = FakeBackend::new(false, vec![Answer::Token(Some("rt-2"))]);
    let store = Shared::new(usize::MAX);
    let broker = broker_on(backend.clone(), store.clone()).await;
    store.updates_down.store(true, Ordering::SeqCst);
    let err = broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    assert!(matches!(err, BrokerError::Unavailable(_)), "{err:?}");
    (broker, backend, store)
}

/// A rotated refresh token this replica could not store is kept for the next try only while
/// the record is at its credential version: when an admin rotated the credential on another
/// replica meanwhile, the admin's credential is used and stays stored, not overwritten by the
/// old grant's token.
#[tokio::test(start_paused = true)]
async fn a_pending_refresh_token_yields_to_a_credential_rotated_elsewhere() {
    let (broker, backend, store) = with_a_refused_rotation().await;
    store.updates_down.store(false, Ordering::SeqCst);
    let other = open_on(FakeBackend::new(false, vec![]), store.clone()).await;
    other
        .rotate(SYSTEM, admins_credential(), true)
        .await
        .unwrap();
    // At once (the clock stands still): the background writer has not run, so only the mint's
    // own check keeps the old grant's token out.
    broker.access_token(SYSTEM, 0, None).await.unwrap();
    assert_eq!(backend.calls(), 2);
    assert_eq!(stored_refresh_token(&broker).await, "rt-admin");
    let record = broker.get_system(SYSTEM).await.unwrap();
    assert_eq!(
        (record.state, record.credential_version),
        (SystemState::Active, 2)
    );
}

/// A refresh lock this replica cannot have now (its lock slots all held by other refreshes, or
/// another replica holding the system's lock too long) leaves workers the token that is still
/// valid, as a store outage does (past its expiry they hear UNAVAILABLE and retry).
#[tokio::test(start_paused = true)]
async fn a_busy_refresh_lock_leaves_workers_their_valid_token() {
    let store = Shared::new(usize::MAX);
    let backend = FakeBackend::new(false, vec![]);
    let broker = broker_on(backend.clone(), store.clone()).await;
    let first = broker.access_token(SYSTEM, 0, None).await.unwrap();
    store.locks_busy.store(true, Ordering::SeqCst);
    let kept = broker
        .access_token(SYSTEM, 0, Some(&first.token_id))
        .await
        .unwrap();
    assert_eq!(kept.token_id, first.token_id);
    assert_eq!(backend.calls(), 1);
    store.locks_busy.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let next = broker
        .access_token(SYSTEM, 0, Some(&first.token_id))
        .await
        .unwrap();
    assert_ne!(next.token_id, first.token_id);
    assert_eq!(backend.calls(), 2);
}

/// A worker's report of a rejected token forces a re-mint; when the vendor's token endpoint
/// fails then (a 429), the reported token, still valid, keeps serving the other workers through
/// the backoff instead of every worker getting UNAVAILABLE.
#[tokio::test]
async fn a_report_the_vendor_cannot_act_on_takes_no_worker_s_token_away() {
    let backend = FakeBackend::new(
        false,
        vec![
            Answer::Token(None),
            Answer::Transient(Some(Duration::from_secs(60))),
        ],
    );
    let broker = broker_with(backend.clone()).await;
    let first = broker.access_token(SYSTEM, 0, None).await.unwrap();
    let reporter = broker
        .access_token(SYSTEM, 0, Some(&first.token_id))
        .await
        .unwrap();
    assert_eq!(reporter.token_id, first.token_id);
    assert_eq!(backend.calls(), 2, "the report forced a re-mint");
    for _ in 0..3 {
        let other = broker.access_token(SYSTEM, 0, None).await.unwrap();
        assert_eq!(other.token_id, first.token_id);
    }
    assert_eq!(
        backend.calls(),
        2,
        "the vendor was asked again inside its Retry-After"
    );
}

/// A write sealed once before its retries (a grant, a pending refresh token) lands under the
/// key that is primary when it is written, not the one primary when it was sealed: a retire of
/// the old key must never leave it unreadable.
#[tokio::test]
async fn a_sealing_made_before_a_rotation_is_written_on_the_new_primary() {
    let broker = broker_with(FakeBackend::new(false, vec![])).await;
    let record = broker.get_system(SYSTEM).await.unwrap();
    let credential = broker.open_credential(&record).unwrap();
    let kind = credential.credential_type();
    let sealed = broker.seal(SYSTEM, 7, &credential).unwrap();
    let old = crate::crypto::parse_header(&sealed).unwrap().kek_id;
    assert_eq!(
        broker.on_primary(SYSTEM, 7, kind, &sealed),
        Some(sealed.clone())
    );
    let new = broker.rotate_master_key().await.unwrap();
    assert_ne!(new, old);
    let moved = broker.on_primary(SYSTEM, 7, kind, &sealed).unwrap();
    assert_eq!(crate::crypto::parse_header(&moved).unwrap().kek_id, new);
    assert!(crate::crypto::same_sealing(&moved, &sealed));
    let mut reread = record.clone();
    (reread.sealed_credential, reread.credential_version) = (moved, 7);
    let opened = serde_json::to_vec(&broker.open_credential(&reread).unwrap()).unwrap();
    assert!(
        opened == serde_json::to_vec(&credential).unwrap(),
        "opens as it was"
    );
}

/// When the key a write was sealed under is retired during its retries, the write is sealed
/// again under the primary (and that sealing is its own too), never written under the
/// removed key.
#[tokio::test(start_paused = true)]
async fn a_sealing_whose_key_was_retired_meanwhile_is_sealed_again() {
    let broker = broker_with(FakeBackend::new(false, vec![])).await;
    let credential = broker
        .open_credential(&broker.get_system(SYSTEM).await.unwrap())
        .unwrap();
    let first = broker.rotate_master_key().await.unwrap();
    let sealed = broker.seal(SYSTEM, 7, &credential).unwrap();
    let second = broker.rotate_master_key().await.unwrap();
    for _ in 0..100 {
        if broker.retire_key(&format!("{first:08x}")).await.is_ok() {
            break;
        }
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    let kind = credential.credential_type();
    assert_eq!(broker.on_primary(SYSTEM, 7, kind, &sealed), None, "retired");
    let mut ours = vec![sealed];
    let written = broker
        .sealing_for_attempt(&mut ours, SYSTEM, 7, &credential)
        .unwrap();
    assert_eq!(
        crate::crypto::parse_header(&written).unwrap().kek_id,
        second
    );
    assert_eq!(ours.len(), 2);
    assert!(crate::broker::is_ours(&ours, &written));
}

/// A replica behind another's key rotation holds a rotated refresh token the store refused
/// before; the record it finds is sealed under a key it has not loaded. That is no other
/// credential: the token is kept, the keys reloaded, and it is stored.
#[tokio::test(start_paused = true)]
async fn a_pending_refresh_token_outlives_a_key_this_replica_has_not_loaded() {
    let (broker, _backend, store) = with_a_refused_rotation().await;
    store.updates_down.store(false, Ordering::SeqCst);
    let other = open_on(FakeBackend::new(false, vec![]), store.clone()).await;
    let new = other.rotate_master_key().await.unwrap();
    for _ in 0..100 {
        let r = store.inner.get_system(SYSTEM).await.unwrap().unwrap();
        if crate::crypto::parse_header(&r.sealed_credential)
            .unwrap()
            .kek_id
            == new
        {
            break;
        }
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    for _ in 0..60 {
        if stored_refresh_token(&other).await == "rt-2" {
            break;
        }
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(stored_refresh_token(&other).await, "rt-2");
    drop(broker);
}

/// A stored credential damaged while a rotated refresh token waits to be stored (it cannot
/// be opened: DATA_LOSS) is no other credential: the live token is written over it.
#[tokio::test(start_paused = true)]
async fn a_pending_refresh_token_heals_a_damaged_stored_credential() {
    let (broker, _backend, store) = with_a_refused_rotation().await;
    store.updates_down.store(false, Ordering::SeqCst);
    // Before the background writer's first try (the clock is paused).
    change_meanwhile(&store, |r| {
        let last = r.sealed_credential.len() - 1;
        r.sealed_credential[last] ^= 1;
    })
    .await;
    let damaged = broker.get_system(SYSTEM).await.unwrap();
    assert!(matches!(
        broker.open_credential(&damaged),
        Err(BrokerError::DataLoss(_))
    ));
    for _ in 0..60 {
        let r = broker.get_system(SYSTEM).await.unwrap();
        if broker.open_credential(&r).is_ok() {
            break;
        }
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(stored_refresh_token(&broker).await, "rt-2");
}

/// A rotation checked its credential against the record it read: while it waits on the
/// vendor, the system deleted and registered again (for another host), or its credential
/// rotated by someone else, means nothing is stored.
#[tokio::test]
async fn a_rotation_stores_nothing_on_a_system_replaced_while_it_was_checked() {
    let replaced: [fn(&mut SystemRecord); 2] = [
        |r| {
            r.created_at += 1;
            r.base_url = "https://other.service-now.example".to_owned();
        },
        |r| r.credential_version += 1,
    ];
    for change in replaced {
        let backend = FakeBackend::new(true, vec![]);
        let store = Shared::new(usize::MAX);
        let broker = broker_on(backend.clone(), store.clone()).await;
        let rotation = tokio::spawn({
            let b = broker.clone();
            async move { b.rotate(SYSTEM, admins_credential(), false).await }
        });
        backend.entered.notified().await;
        change_meanwhile(&store, change).await;
        let before = broker.get_system(SYSTEM).await.unwrap();
        backend.open_gate();
        let err = rotation.await.unwrap().unwrap_err();
        assert!(matches!(err, BrokerError::FailedPrecondition(_)), "{err:?}");
        let after = broker.get_system(SYSTEM).await.unwrap();
        assert_eq!(after.sealed_credential, before.sealed_credential);
        assert_eq!(after.credential_version, before.credential_version);
    }
}

/// A replica that missed another's master-key rotation (a notice lost, a reload that failed)
/// and meets a record re-wrapped under the new key answers UNAVAILABLE, not DATA_LOSS, and
/// reloads the keys: the next call serves.
#[tokio::test(start_paused = true)]
async fn a_record_under_a_key_not_loaded_here_makes_the_keys_reload() {
    let store = Shared::new(usize::MAX);
    let backend = FakeBackend::new(false, vec![]);
    let broker = broker_on(backend.clone(), store.clone()).await;
    let other = open_on(FakeBackend::new(false, vec![]), store.clone()).await;
    let new = other.rotate_master_key().await.unwrap();
    let kek = |store: &Arc<Shared>| {
        let store = store.clone();
        async move {
            let r = store.inner.get_system(SYSTEM).await.unwrap().unwrap();
            crate::crypto::parse_header(&r.sealed_credential)
                .unwrap()
                .kek_id
        }
    };
    for _ in 0..100 {
        if kek(&store).await == new {
            break;
        }
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    assert_eq!(kek(&store).await, new, "the record was re-wrapped");
    let err = broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    assert!(matches!(err, BrokerError::Unavailable(_)), "{err:?}");
    for _ in 0..10 {
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    broker.access_token(SYSTEM, 0, None).await.unwrap();
    assert_eq!(backend.calls(), 1);
}

/// OAuth states carry a tag under a key derived from the master key: a replica (same master
/// key) accepts one another made; a made-up, altered or foreign one is refused.
#[tokio::test]
async fn only_states_made_with_this_master_key_are_accepted() {
    let store = Shared::new(usize::MAX);
    let broker = broker_on(FakeBackend::new(false, vec![]), store.clone()).await;
    let replica = open_on(FakeBackend::new(false, vec![]), store).await;
    let state = broker.new_state();
    assert_eq!(state.len(), 43);
    assert!(broker.state_is_ours(&state) && replica.state_is_ours(&state));
    assert_ne!(broker.new_state(), state);
    let mut altered = state.clone().into_bytes();
    altered[0] = if altered[0] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    let foreign = {
        let backend: Arc<dyn Backend> = FakeBackend::new(false, vec![]);
        let registry = Registry::from_backends(vec![(SystemKind::ServiceNow, backend)]);
        let key = MasterKey::from_bytes(Zeroizing::new([8u8; 32]));
        let store = Arc::new(MemoryStore::new());
        let (other, _) = Broker::open(
            store,
            Keyring::new(key),
            registry,
            BrokerSettings::default(),
        )
        .await
        .unwrap();
        other.new_state()
    };
    // Tagged right, but past its expiry (a leaked callback replayed later).
    let stale = {
        let mut body = [7u8; 16];
        let past = u32::try_from(crate::model::unix_now() - 10).unwrap();
        body[12..].copy_from_slice(&past.to_be_bytes());
        crate::broker::connect::encode_state(broker.link_key.as_bytes(), body)
    };
    for refused in [
        altered.as_str(),
        &foreign,
        &stale,
        &"0".repeat(43),
        "",
        &state[..42],
    ] {
        assert!(!broker.state_is_ours(refused), "{refused}");
    }
    assert_eq!(broker.state_check(&stale), StateCheck::Expired);
    assert_eq!(broker.state_check(&foreign), StateCheck::Foreign);
    // A state lives at least as long as its authorization (whole seconds, rounded up).
    let raw =
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &state).unwrap();
    let expires = u64::from(u32::from_be_bytes(raw[12..16].try_into().unwrap()));
    let ttl = broker.settings.authorization_ttl.as_secs();
    let now = crate::model::unix_now();
    assert!(
        (now + ttl..=now + ttl + 2).contains(&expires),
        "expires {expires}, now {now}, ttl {ttl}"
    );
    // A v1 state (made by the version before, all random) is still accepted.
    let v1 = {
        use crate::broker::connect::{tag_in, STATE_V1};
        let body = [3u8; 16];
        let mut raw = [0u8; 32];
        raw[..16].copy_from_slice(&body);
        raw[16..].copy_from_slice(&tag_in(broker.link_key.as_bytes(), STATE_V1, &body));
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, raw)
    };
    assert_eq!(broker.state_check(&v1), StateCheck::Live);
}

/// A callback whose authorization this replica holds, while the shared store does not answer:
/// whether another replica took it is unknown, so nothing is exchanged, the browser is asked
/// to retry, and the authorization is kept for that retry.
#[tokio::test]
async fn a_store_error_at_the_callback_keeps_the_authorization_for_a_retry() {
    let store = Shared::new(usize::MAX);
    let broker = broker_on(FakeBackend::new(false, vec![]), store.clone()).await;
    let state = broker.new_state();
    let held = crate::broker::connect::PendingAuthorization::for_test("gone");
    (broker.pending_authorizations.lock().unwrap()).insert(state.clone(), held);
    store.meta_down.store(true, Ordering::SeqCst);
    let params = HashMap::from([
        ("state".to_owned(), state.clone()),
        ("code".to_owned(), "a-code".to_owned()),
    ]);
    let page = broker.complete_authorization(&params).await;
    assert_eq!(
        page.outcome,
        crate::broker::connect::Outcome::TryAgain,
        "{}",
        page.message
    );
    assert_eq!(
        page.system_id.as_deref(),
        Some("gone"),
        "audited for its system"
    );
    assert!(broker
        .pending_authorizations
        .lock()
        .unwrap()
        .contains_key(&state));
}

/// A connect started and never finished leaves no shared row behind once it expired; a live
/// one (this replica's or another's) is left alone.
#[tokio::test]
async fn an_expired_unused_authorization_leaves_no_shared_row() {
    use crate::broker::connect::{pending_key, PendingAuthorization};
    let store = Shared::new(usize::MAX);
    let broker = broker_on(FakeBackend::new(false, vec![]), store.clone()).await;
    let (old, live, elsewhere) = (broker.new_state(), broker.new_state(), broker.new_state());
    for state in [&old, &live, &elsewhere] {
        store
            .put_meta(&pending_key(state), b"sealed")
            .await
            .unwrap();
    }
    {
        let mut held = broker.pending_authorizations.lock().unwrap();
        held.insert(old.clone(), PendingAuthorization::expired_for_test("a"));
        held.insert(live.clone(), PendingAuthorization::for_test("b"));
    }
    // The store away: nothing removed, nothing forgotten.
    store.meta_down.store(true, Ordering::SeqCst);
    broker.sweep_expired_pending().await;
    assert!(broker
        .pending_authorizations
        .lock()
        .unwrap()
        .contains_key(&old));
    store.meta_down.store(false, Ordering::SeqCst);
    broker.sweep_expired_pending().await;
    assert_eq!(store.get_meta(&pending_key(&old)).await.unwrap(), None);
    for state in [&live, &elsewhere] {
        assert!(store.get_meta(&pending_key(state)).await.unwrap().is_some());
    }
    {
        let held = broker.pending_authorizations.lock().unwrap();
        assert!(!held.contains_key(&old) && held.contains_key(&live));
    }

    // Its callback, come late to the replica that started it: answered expired without a
    // store read, and its row still goes with the next sweep.
    let mut body = [9u8; 16];
    let past = u32::try_from(crate::model::unix_now() - 1).unwrap();
    body[12..].copy_from_slice(&past.to_be_bytes());
    let late = crate::broker::connect::encode_state(broker.link_key.as_bytes(), body);
    store
        .put_meta(&pending_key(&late), b"sealed")
        .await
        .unwrap();
    (broker.pending_authorizations.lock().unwrap())
        .insert(late.clone(), PendingAuthorization::expired_for_test("a"));
    let params = HashMap::from([
        ("state".to_owned(), late.clone()),
        ("code".to_owned(), "a-code".to_owned()),
    ]);
    let page = broker.complete_authorization(&params).await;
    assert!(page.message.contains("expired"), "{}", page.message);
    broker.sweep_expired_pending().await;
    assert_eq!(store.get_meta(&pending_key(&late)).await.unwrap(), None);
}

/// A stale state (tagged right, past its expiry) replayed at the callback gets the expired
/// page, and the shared store's authorization under it is neither read nor consumed.
#[tokio::test]
async fn a_stale_state_is_answered_expired_without_touching_the_shared_store() {
    let store = Shared::new(usize::MAX);
    let broker = broker_on(FakeBackend::new(false, vec![]), store.clone()).await;
    let mut body = [9u8; 16];
    let past = u32::try_from(crate::model::unix_now() - 1).unwrap();
    body[12..].copy_from_slice(&past.to_be_bytes());
    let stale = crate::broker::connect::encode_state(broker.link_key.as_bytes(), body);
    let key = crate::broker::connect::pending_key(&stale);
    store.put_meta(&key, b"sealed authorization").await.unwrap();
    let params = HashMap::from([
        ("state".to_owned(), stale.clone()),
        ("code".to_owned(), "a-code".to_owned()),
    ]);
    let page = broker.complete_authorization(&params).await;
    assert_eq!(page.title, "Authorization link expired", "{}", page.message);
    assert!(
        page.message.contains("Nothing was changed"),
        "{}",
        page.message
    );
    assert_eq!(
        store.get_meta(&key).await.unwrap().as_deref(),
        Some(&b"sealed authorization"[..]),
        "the stale state's authorization was consumed"
    );
}

/// A rewrap under another key (a master-key rotation) re-seals the stored credential without
/// changing it: a refresh token the store refused is still the one to use and store.
#[tokio::test]
async fn a_pending_refresh_token_survives_a_rewrap_of_the_credential_it_replaces() {
    let (broker, backend, store) = with_a_refused_rotation().await;
    store.updates_down.store(false, Ordering::SeqCst);
    let record = broker.get_system(SYSTEM).await.unwrap();
    let same = broker.open_credential(&record).unwrap();
    let resealed = broker
        .seal(SYSTEM, record.credential_version, &same)
        .unwrap();
    assert_ne!(resealed, record.sealed_credential);
    change_meanwhile(&store, |r| r.sealed_credential = resealed).await;
    broker.access_token(SYSTEM, 0, None).await.unwrap();
    assert_eq!(stored_refresh_token(&broker).await, "rt-2");
    assert_eq!(backend.calls(), 2);
}

/// A vendor 401 through the proxy re-mints a system's token at most once a minute (a 401 that
/// is not about the token, such as a scope the grant lacks, must not drive a refresh a second).
#[tokio::test]
async fn a_proxy_401_re_mints_at_most_once_a_minute_per_system() {
    use crate::broker::proxy::PROXY_REMINT_INTERVAL;
    let broker = broker_with(FakeBackend::new(false, vec![])).await;
    let t0 = std::time::Instant::now();
    assert!(broker.may_remint_for_proxy(SYSTEM, t0));
    let soon = t0 + PROXY_REMINT_INTERVAL - Duration::from_secs(1);
    assert!(!broker.may_remint_for_proxy(SYSTEM, soon));
    assert!(broker.may_remint_for_proxy("another", soon));
    assert!(broker.may_remint_for_proxy(SYSTEM, t0 + PROXY_REMINT_INTERVAL));
}

/// Once the stop has begun, a vendor 401 through the proxy starts no re-mint: the stop may no
/// longer wait for it, and a refresh cut off mid-rotation would lose the grant. Before the
/// stop, the same 401 does start one.
#[tokio::test(start_paused = true)]
async fn a_proxy_401_during_the_stop_starts_no_re_mint() {
    let backend = FakeBackend::new(false, vec![]);
    let broker = broker_with(backend.clone()).await;
    let token = broker.access_token(SYSTEM, 0, None).await.unwrap();
    assert!(token.refreshable);
    assert_eq!(backend.calls(), 1);
    broker.draining.store(true, Ordering::Relaxed);
    broker.note_proxy_unauthorized(SYSTEM, &token);
    for _ in 0..10 {
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    assert_eq!(backend.calls(), 1, "a re-mint started during the stop");
    broker.draining.store(false, Ordering::Relaxed);
    broker.note_proxy_unauthorized(SYSTEM, &token);
    for _ in 0..10 {
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    assert_eq!(backend.calls(), 2, "the same 401 before the stop re-mints");
}

/// A reported token carries the delivery it was minted for: after a switch to proxy delivery
/// it never comes back as a fallback (it would hand a worker the vendor's headers).
#[tokio::test]
async fn a_reported_token_is_no_fallback_after_a_delivery_switch() {
    let backend = FakeBackend::new(
        false,
        vec![
            Answer::Token(None),
            Answer::Token(Some("rt-2")),
            Answer::Transient(Some(Duration::from_secs(60))),
        ],
    );
    let store = Shared::new(usize::MAX);
    let broker = broker_on(backend.clone(), store.clone()).await;
    let first = broker.access_token(SYSTEM, 0, None).await.unwrap();
    assert_eq!(first.delivery, crate::model::Delivery::Header);
    // The forced re-mint's rotated refresh token cannot be stored: the report stays open.
    store.updates_down.store(true, Ordering::SeqCst);
    let reported = broker.access_token(SYSTEM, 0, Some(&first.token_id)).await;
    assert!(
        matches!(reported, Err(BrokerError::Unavailable(_))),
        "{reported:?}"
    );
    store.updates_down.store(false, Ordering::SeqCst);
    let proxy = Some(crate::model::Delivery::Proxy);
    broker.set_delivery(SYSTEM, proxy).await.unwrap();
    // No token shared in the record to adopt: the next demand asks the vendor.
    change_meanwhile(&store, |r| r.shared_token = None).await;
    let got = broker.access_token(SYSTEM, 0, None).await;
    assert!(
        !matches!(&got, Ok(t) if t.delivery == crate::model::Delivery::Header),
        "a header-delivery token came back after the switch"
    );
    assert_eq!(backend.calls(), 3);
}

/// A rotated refresh token the store refused is stored in the background once the store takes
/// writes again, with no further demand and no second vendor call: meanwhile it lived only in
/// this process.
#[tokio::test(start_paused = true)]
async fn a_refresh_token_the_store_refused_is_stored_once_it_takes_writes() {
    let (broker, backend, store) = with_a_refused_rotation().await;
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(stored_refresh_token(&broker).await, "rt-1");
    store.updates_down.store(false, Ordering::SeqCst);
    for _ in 0..60 {
        if stored_refresh_token(&broker).await == "rt-2" {
            break;
        }
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(stored_refresh_token(&broker).await, "rt-2");
    assert_eq!(backend.calls(), 1, "the vendor was asked again");
}

/// Another replica that refreshes with the stored refresh token this replica already spent
/// (its rotated one could not be stored) is refused and marks the grant for re-authorization;
/// this replica's background writer then stores the live refresh token and puts the system back
/// in service, here and, once told of the change, on the other replica.
#[tokio::test(start_paused = true)]
async fn a_grant_marked_dead_for_a_spent_refresh_token_is_revived_by_the_live_one() {
    revival(false, |_| {}).await;
}

/// The same when the reviving write lands but its answer is lost: the writer finds its own
/// write on the retry and knows it revived the grant.
#[tokio::test(start_paused = true)]
async fn a_revival_whose_answer_was_lost_still_revives_here() {
    revival(true, |_| {}).await;
}

/// The same when another replica's key rotation re-wrapped the revived record before the retry
/// read it: a re-wrap keeps the credential, so the write is still found to be this one's.
#[tokio::test(start_paused = true)]
async fn a_revival_whose_answer_was_lost_then_rewrapped_still_revives_here() {
    revival(true, |s| s.rewrap_lost.store(true, Ordering::SeqCst)).await;
}

/// The same when the retry first read the record as it was before the write (from a mirror
/// that had not seen it), wrote again and met the first write: every attempt writes the one
/// sealing, so the first is still found to be this one's.
#[tokio::test(start_paused = true)]
async fn a_revival_whose_answer_was_lost_then_read_stale_still_revives_here() {
    revival(true, |s| s.stale_after_lost.store(true, Ordering::SeqCst)).await;
}

/// A revival by this replica after another marked the grant dead; `lose_the_answer` loses the
/// answer of the write that revives it, and `meanwhile` sets what else the store does then.
async fn revival(lose_the_answer: bool, meanwhile: impl FnOnce(&Shared)) {
    let (broker, backend, other, other_backend, store) =
        marked_by_another_replica(Answer::GrantRefused).await;
    store
        .lose_next_answer
        .store(lose_the_answer, Ordering::SeqCst);
    meanwhile(&store);
    // This replica reads the mark too, before its background writer runs.
    let err = broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    assert!(matches!(err, BrokerError::FailedPrecondition(_)), "{err:?}");
    for _ in 0..60 {
        if stored_refresh_token(&broker).await == "rt-2" {
            break;
        }
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(stored_refresh_token(&broker).await, "rt-2");
    let revived = broker.get_system(SYSTEM).await.unwrap();
    assert_eq!(revived.state, SystemState::Active);
    assert_eq!(revived.state_message, None);
    assert!(revived.refresh_failure.is_none());
    // The writer's own replica serves again at once (no change notice of its own write).
    let here = broker.access_token(SYSTEM, 0, None).await.unwrap();
    assert_eq!(backend.calls(), 2);
    let flight = other.flight(SYSTEM);
    other
        .settle_remote_change(&mut *flight.lock().await, SYSTEM)
        .await;
    // The other replica, told of the change, serves the token this one minted with rt-2.
    let there = other.access_token(SYSTEM, 0, None).await.unwrap();
    assert_eq!(there.token_id, here.token_id);
    assert_eq!(other_backend.calls(), 1);
}

/// A mark for another reason than a refused grant (here the client refused: a revoked app
/// secret) is not undone by the pending refresh token: only an admin fixes that.
#[tokio::test(start_paused = true)]
async fn a_grant_marked_dead_for_a_refused_client_stays_dead() {
    let (broker, _, _, _, _) = marked_by_another_replica(Answer::Rejected).await;
    for _ in 0..60 {
        if stored_refresh_token(&broker).await == "rt-2" {
            break;
        }
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(stored_refresh_token(&broker).await, "rt-2");
    let record = broker.get_system(SYSTEM).await.unwrap();
    assert_eq!(record.state, SystemState::ReauthorizationRequired);
}

/// [`with_a_refused_rotation`], then another replica refreshes with the stored (spent) refresh
/// token, is refused with `refusal` and marks the grant for re-authorization; writes work again.
async fn marked_by_another_replica(
    refusal: Answer,
) -> (
    Arc<Broker>,
    Arc<FakeBackend>,
    Arc<Broker>,
    Arc<FakeBackend>,
    Arc<Shared>,
) {
    let (broker, backend, store) = with_a_refused_rotation().await;
    store.updates_down.store(false, Ordering::SeqCst);
    let other_backend = FakeBackend::new(false, vec![refusal]);
    let other = open_on(other_backend.clone(), store.clone()).await;
    let err = other.access_token(SYSTEM, 0, None).await.unwrap_err();
    assert!(matches!(err, BrokerError::FailedPrecondition(_)), "{err:?}");
    let marked = other.get_system(SYSTEM).await.unwrap();
    assert_eq!(marked.state, SystemState::ReauthorizationRequired);
    (broker, backend, other, other_backend, store)
}

/// A change notice met while the database does not answer says nothing of the vendor: the
/// backoff stands.
#[tokio::test(start_paused = true)]
async fn a_backoff_stands_when_the_database_cannot_say_what_changed() {
    let store = Shared::new(usize::MAX);
    let backend = FakeBackend::new(
        false,
        vec![Answer::Transient(Some(Duration::from_secs(30)))],
    );
    let broker = broker_on(backend.clone(), store.clone()).await;
    broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    store.fresh_answers.store(0, Ordering::SeqCst);
    let flight = broker.flight(SYSTEM);
    broker
        .settle_remote_change(&mut *flight.lock().await, SYSTEM)
        .await;
    store.fresh_answers.store(usize::MAX, Ordering::SeqCst);
    broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    assert_eq!(
        backend.calls(),
        1,
        "called again inside the vendor's Retry-After"
    );
}

/// An unsendable token's answer rotated the refresh token: the rotation is stored and the
/// vendor fault backs off. The change notice of that write, this replica's own, lifts no
/// back-off (the flight's view of the record follows its own write).
#[tokio::test(start_paused = true)]
async fn its_own_rotation_write_lifts_no_back_off() {
    let store = Shared::new(usize::MAX);
    let backend = FakeBackend::new(false, vec![Answer::Unsendable("rt-2")]);
    let broker = broker_on(backend.clone(), store.clone()).await;
    broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    assert_eq!(backend.calls(), 1);
    let flight = broker.flight(SYSTEM);
    broker
        .settle_remote_change(&mut *flight.lock().await, SYSTEM)
        .await;
    broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    assert_eq!(backend.calls(), 1, "called again inside the back-off");
}

/// A system deleted on another replica while the vendor blocks it: its block goes here too,
/// so a system registered again under the id does not inherit it.
#[tokio::test]
async fn a_block_goes_with_a_system_deleted_elsewhere() {
    let store = Shared::new(usize::MAX);
    let broker = broker_on(FakeBackend::new(false, vec![]), store.clone()).await;
    let permit = broker
        .quotas
        .admit(SYSTEM, SystemKind::ServiceNow)
        .await
        .unwrap();
    let blocked = crate::backends::ratelimit::RateSignals {
        throttled: true,
        wait: Some(Duration::from_secs(600)),
        ..Default::default()
    };
    broker.quotas.learn(SYSTEM, &permit, &blocked);
    drop(permit);
    assert!(broker
        .quotas
        .view(SYSTEM)
        .unwrap()
        .blocked_until_ms
        .is_some());
    // A notice while the system still exists changes nothing.
    broker
        .apply_change(crate::store::Change::System(SYSTEM.into()))
        .await;
    store.inner.delete_system(SYSTEM).await.unwrap();
    broker
        .apply_change(crate::store::Change::System(SYSTEM.into()))
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while broker.quotas.view(SYSTEM).is_some() {
        assert!(std::time::Instant::now() < deadline, "the block stayed");
        tokio::task::yield_now().await;
    }
    assert!(store.fresh_reads.load(Ordering::SeqCst) >= 2);
}

/// A key rotation's re-wrap on another replica keeps the credential: its change notice lifts
/// no vendor's `Retry-After` here.
#[tokio::test(start_paused = true)]
async fn a_rewrap_elsewhere_leaves_a_vendors_retry_after_standing() {
    let store = Shared::new(usize::MAX);
    let backend = FakeBackend::new(
        false,
        vec![Answer::Transient(Some(Duration::from_secs(30)))],
    );
    let broker = broker_on(backend.clone(), store.clone()).await;
    broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    store.rewrap(SYSTEM).await;
    let flight = broker.flight(SYSTEM);
    broker
        .settle_remote_change(&mut *flight.lock().await, SYSTEM)
        .await;
    broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    assert_eq!(
        backend.calls(),
        1,
        "called again inside the vendor's Retry-After"
    );
}

/// A dead mark is not kept on a change notice the database cannot explain now: unlike a
/// backoff it never ends by itself, so the next mint reads the record again (here: an admin
/// rotated a new credential in on another replica).
#[tokio::test(start_paused = true)]
async fn a_dead_mark_is_read_again_after_a_notice_the_database_could_not_explain() {
    let store = Shared::new(usize::MAX);
    let backend = FakeBackend::new(false, vec![Answer::GrantRefused]);
    let broker = broker_on(backend.clone(), store.clone()).await;
    let err = broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    assert!(matches!(err, BrokerError::FailedPrecondition(_)), "{err:?}");
    let other = open_on(FakeBackend::new(false, vec![]), store.clone()).await;
    other
        .rotate(SYSTEM, admins_credential(), false)
        .await
        .unwrap();
    store.fresh_answers.store(0, Ordering::SeqCst);
    let flight = broker.flight(SYSTEM);
    broker
        .settle_remote_change(&mut *flight.lock().await, SYSTEM)
        .await;
    store.fresh_answers.store(usize::MAX, Ordering::SeqCst);
    broker.access_token(SYSTEM, 0, None).await.unwrap();
    assert_eq!(backend.calls(), 2);
}

/// While this replica backs off after the vendor's 429, another replica's note (its change
/// notice drops this replica's cached token) does not leave workers without a token: the one
/// shared in the record serves.
#[tokio::test(start_paused = true)]
async fn a_note_from_another_replica_leaves_a_backed_off_replica_its_token() {
    let store = Shared::new(usize::MAX);
    let backend = FakeBackend::new(
        false,
        vec![
            Answer::Token(None),
            Answer::Transient(Some(Duration::from_secs(30))),
        ],
    );
    let broker = broker_on(backend.clone(), store.clone()).await;
    let first = broker.access_token(SYSTEM, 0, None).await.unwrap();
    let kept = broker
        .access_token(SYSTEM, 0, Some(&first.token_id))
        .await
        .unwrap();
    assert_eq!(
        kept.token_id, first.token_id,
        "the reported token serves on"
    );
    assert_eq!(backend.calls(), 2);
    let other = open_on(FakeBackend::new(false, vec![]), store.clone()).await;
    other
        .update_system_with(SYSTEM, |r| {
            r.description = "noted on another replica".to_owned();
            true
        })
        .await
        .unwrap();
    broker
        .apply_change(crate::store::Change::System(SYSTEM.to_owned()))
        .await;
    let flight = broker.flight(SYSTEM);
    broker
        .settle_remote_change(&mut *flight.lock().await, SYSTEM)
        .await;
    let after = broker.access_token(SYSTEM, 0, None).await.unwrap();
    assert_eq!(after.token_id, first.token_id);
    assert_eq!(
        backend.calls(),
        2,
        "called again inside the vendor's Retry-After"
    );
}

/// A token minted from the old credential while another replica rotated the credential is
/// neither shared nor cached as the new credential's (the replicas would hand out the old
/// identity's token), with or without a rotated refresh token.
#[tokio::test]
async fn a_token_of_a_credential_rotated_meanwhile_is_not_shared() {
    token_of_a_credential_rotated_meanwhile(None).await;
    token_of_a_credential_rotated_meanwhile(Some("rt-2")).await;
}

async fn token_of_a_credential_rotated_meanwhile(rotated: Option<&'static str>) {
    let (broker, backend, store, caller) = mint_held_at_the_vendor(Answer::Token(rotated)).await;
    let other = open_on(FakeBackend::new(false, vec![]), store.clone()).await;
    other
        .rotate(SYSTEM, admins_credential(), true)
        .await
        .unwrap();
    backend.open_gate();
    let err = caller.await.unwrap().unwrap_err();
    assert!(matches!(err, BrokerError::Unavailable(_)), "{err:?}");
    let record = store.inner.get_system(SYSTEM).await.unwrap().unwrap();
    assert_eq!(record.credential_version, 2);
    assert!(
        record.shared_token.is_none(),
        "the old credential's token was shared"
    );
    assert!(
        broker.cached(SYSTEM).is_none(),
        "the old credential's token is cached"
    );
    assert_eq!(stored_refresh_token(&broker).await, "rt-admin");
}

/// The credential an admin rotates to in these tests.
fn admins_credential() -> Credential {
    Credential::OAuthRefreshToken {
        client_id: "client".to_owned(),
        client_secret: SecretString::new("client-secret".to_owned()),
        refresh_token: SecretString::new("rt-admin".to_owned()),
        username: None,
        refresh_expires_at: None,
    }
}

/// A refusal the shared store could not record (its writes fail) is kept: meanwhile the store
/// is not asked again at the request rate, the vendor not at all, and once writes succeed the
/// grant is marked dead with no second vendor call.
#[tokio::test(start_paused = true)]
async fn a_refusal_the_store_could_not_record_is_marked_later_without_the_vendor() {
    let backend = FakeBackend::new(false, vec![Answer::Rejected]);
    let store = Shared::new(usize::MAX);
    let broker = broker_on(backend.clone(), store.clone()).await;
    store.updates_down.store(true, Ordering::SeqCst);
    let err = broker.access_token(SYSTEM, 0, None).await.unwrap_err();
    assert!(matches!(err, BrokerError::FailedPrecondition(_)), "{err:?}");
    let tried = store.updates.load(Ordering::SeqCst);
    for _ in 0..20 {
        let err = broker.access_token(SYSTEM, 0, None).await.unwrap_err();
        assert!(matches!(err, BrokerError::Unavailable(_)), "{err:?}");
    }
    assert_eq!(
        store.updates.load(Ordering::SeqCst),
        tried,
        "no pause before the next try"
    );
    store.updates_down.store(false, Ordering::SeqCst);
    kept_refusal_stands_after_the_pause(&broker, &backend).await;
}

/// The keep-alive sweep reads a replica's mirrored copy; under the refresh lock the grant is
/// judged again on the database's record, and one another replica kept alive meanwhile (its
/// refresh token's end now beyond the margin) is not refreshed a second time.
#[tokio::test]
async fn a_grant_kept_alive_meanwhile_is_not_refreshed_again() {
    use crate::broker::tokens::Reason;
    let backend = FakeBackend::new(false, vec![]);
    // Zendesk: a kind whose grants come from the authorization-code flow.
    let as_zendesk: Arc<dyn Backend> = backend.clone();
    let registry = Registry::from_backends(vec![(SystemKind::Zendesk, as_zendesk)]);
    let key = MasterKey::from_bytes(Zeroizing::new([7u8; 32]));
    let store = Shared::new(usize::MAX);
    let open = Broker::open(
        store.clone(),
        Keyring::new(key),
        registry,
        Default::default(),
    );
    let (broker, _) = open.await.unwrap();
    let now = crate::util::time::unix_now();
    // Refresh tokens that die in a day (within the 7-day margin).
    for id in ["kept", "due"] {
        register_grant(&broker, id, now + 86_400).await;
        // Connected (the flow itself is the integration tests' business).
        change_system(&store, id, |r| r.state = SystemState::Active).await;
    }
    // Another replica kept "kept" alive: the database says a year, the mirror still a day.
    let stale = store.inner.get_system("kept").await.unwrap().unwrap();
    store.mirrored.lock().unwrap().push(stale);
    change_system(&store, "kept", |r| {
        r.credential_expires_at = Some(now + 365 * 86_400)
    })
    .await;
    let keep_alive = |id| broker.mint_detached(id, SystemTime::now(), Reason::KeepAlive);
    let not_due = keep_alive("kept").await.unwrap_err();
    assert!(
        format!("{not_due}").contains("not due any more"),
        "{not_due}"
    );
    assert_eq!(backend.calls(), 0, "refreshed a grant that was not due");
    // Judged on the fresh read (the mirror's copy says due).
    let fresh_reads = store.fresh_reads.load(Ordering::SeqCst);
    keep_alive("due").await.unwrap();
    assert_eq!(store.fresh_reads.load(Ordering::SeqCst), fresh_reads + 1);
    assert_eq!(backend.calls(), 1);
}

/// A broker whose Zendesk backend is `backend`, with `settings`, holding the active grant
/// "idle" whose refresh token ends in `left` seconds; and a sweep that waits for its refreshes.
async fn idle_grant(
    backend: &Arc<FakeBackend>,
    settings: BrokerSettings,
    left: u64,
) -> (Arc<Broker>, Arc<Shared>) {
    let as_zendesk: Arc<dyn Backend> = backend.clone();
    let registry = Registry::from_backends(vec![(SystemKind::Zendesk, as_zendesk)]);
    let key = MasterKey::from_bytes(Zeroizing::new([7u8; 32]));
    let store = Shared::new(usize::MAX);
    let open = Broker::open(store.clone(), Keyring::new(key), registry, settings);
    let (broker, _) = open.await.unwrap();
    let now = crate::util::time::unix_now();
    register_grant(&broker, "idle", now + left).await;
    change_system(&store, "idle", |r| r.state = SystemState::Active).await;
    (broker, store)
}

/// One keep-alive sweep, its refreshes waited for.
async fn sweep(broker: &Arc<Broker>) {
    let mut tasks = tokio::task::JoinSet::new();
    broker.keepalive_sweep(&mut tasks).await;
    while tasks.join_next().await.is_some() {}
}

/// A grant whose refresh token the vendor does not renew (this fake's), or renews for no longer
/// than the margin (Zendesk's shortest lifespan is the default margin), is within the margin
/// again right after the sweep kept it alive: it is not refreshed again at every sweep (hourly).
/// One that someone else renewed meanwhile is not idle; one whose end moved earlier than that
/// is judged again.
#[tokio::test]
async fn an_idle_grant_is_kept_alive_once_not_at_every_sweep() {
    let backend = FakeBackend::new(false, vec![]);
    // Six days left: within the margin (7), outside the health's 3-day alert.
    let (broker, store) = idle_grant(&backend, Default::default(), 6 * 86_400).await;
    let now = crate::util::time::unix_now();
    sweep(&broker).await;
    assert_eq!(backend.calls(), 1, "the idle grant was not kept alive");
    sweep(&broker).await;
    sweep(&broker).await;
    assert_eq!(backend.calls(), 1, "kept alive again at the next sweeps");
    // Renewed by someone else (another replica): not idle, noted again.
    let ends = |secs| move |r: &mut SystemRecord| r.credential_expires_at = Some(now + secs);
    change_system(&store, "idle", ends(13 * 86_400 / 2)).await;
    sweep(&broker).await;
    assert_eq!(
        backend.calls(),
        1,
        "a grant renewed meanwhile was refreshed"
    );
    // Its end moved earlier than that (connected again with a shorter grant): judged again.
    change_system(&store, "idle", ends(25 * 86_400 / 4)).await;
    sweep(&broker).await;
    assert_eq!(
        backend.calls(),
        2,
        "a grant whose end moved earlier was not judged again"
    );
}

/// A grant a worker's refresh renewed is not idle: the sweep leaves it alone. One within the
/// health's 3-day alert and two sweeps of its end is refreshed at every sweep.
#[tokio::test]
async fn a_grant_in_use_is_left_alone_and_one_near_its_end_is_refreshed_at_every_sweep() {
    use crate::broker::tokens::Reason;
    let backend = FakeBackend::new(false, vec![]);
    let (broker, store) = idle_grant(&backend, Default::default(), 6 * 86_400).await;
    let demand = Reason::Demand { rejected: None };
    broker
        .mint_detached("idle", SystemTime::now(), demand)
        .await
        .unwrap();
    sweep(&broker).await;
    assert_eq!(backend.calls(), 1, "a grant in use was kept alive");
    let now = crate::util::time::unix_now();
    let near = now + 3 * 86_400 + 3_000;
    change_system(&store, "idle", |r| r.credential_expires_at = Some(near)).await;
    sweep(&broker).await;
    sweep(&broker).await;
    assert_eq!(
        backend.calls(),
        3,
        "a grant near its end was not refreshed at each sweep"
    );
}

/// A keep-alive the vendor's outage failed answers with the cached token, as any mint does while
/// it is still valid; it is not taken for a refresh, and the next sweep tries again.
#[tokio::test]
async fn a_failed_keep_alive_is_tried_again_at_the_next_sweep() {
    use crate::broker::tokens::Reason;
    let script = vec![Answer::Token(None), Answer::Transient(None)];
    let backend = FakeBackend::new(false, script);
    let mut settings = BrokerSettings::default();
    // No pause after the failure: the next sweep may try at once.
    settings.refresh.retry_base = Duration::ZERO;
    let (broker, store) = idle_grant(&backend, settings, 6 * 86_400).await;
    let demand = Reason::Demand { rejected: None };
    broker
        .mint_detached("idle", SystemTime::now(), demand)
        .await
        .unwrap();
    // Reconnected with an earlier end: due, with a valid token cached.
    let now = crate::util::time::unix_now();
    let sooner = now + 5 * 86_400;
    change_system(&store, "idle", |r| r.credential_expires_at = Some(sooner)).await;
    sweep(&broker).await;
    assert_eq!(backend.calls(), 2, "the keep-alive was not tried");
    sweep(&broker).await;
    assert_eq!(backend.calls(), 3, "a failed keep-alive was taken for done");
}

/// The keep-alive's verdict: halfway from when the end was noted, the clock stepped back, an
/// end close enough, renewed or moved earlier.
#[test]
fn the_keep_alive_refreshes_a_grant_halfway_to_the_end_it_noted() {
    use super::{keepalive_verdict as verdict, KeptAlive, Verdict::*};
    let (now, day) = (1_800_000_000u64, 86_400u64);
    let soon = 7_200;
    // (The broker's `soon` is the health's 3-day alert and two sweeps.)
    let noted = |since, end| Some(KeptAlive { since, end });
    // Noted a day ago, ending in six days: a day of the 3.5 gone.
    assert_eq!(
        verdict(noted(now - day, now + 6 * day), now + 6 * day, now, soon),
        NotDue
    );
    // Halfway (3.5 days of 7) and past it.
    let since = now - 7 * day / 2;
    assert_eq!(
        verdict(
            noted(since, now + 7 * day / 2),
            now + 7 * day / 2,
            now,
            soon
        ),
        Due
    );
    assert_eq!(
        verdict(noted(since, now + 3 * day), now + 3 * day, now, soon),
        Due
    );
    // Never seen: due.
    assert_eq!(verdict(None, now + 6 * day, now, soon), Due);
    // Within two sweeps of its end, whatever was noted.
    assert_eq!(verdict(noted(now, now + soon), now + soon, now, soon), Due);
    // The clock went back before the note: due, not skipped for longer.
    assert_eq!(
        verdict(noted(now + day, now + 8 * day), now + 8 * day, now, soon),
        Due
    );
    // Renewed (the end moved on), or moved earlier.
    assert_eq!(
        verdict(noted(now - day, now + 5 * day), now + 6 * day, now, soon),
        Renewed
    );
    assert_eq!(
        verdict(noted(now - day, now + 6 * day), now + 5 * day, now, soon),
        Due
    );
    // Far-off values do not overflow.
    assert_eq!(
        verdict(noted(u64::MAX - 1, u64::MAX), u64::MAX, u64::MAX - 1, soon),
        Due
    );
    assert_eq!(verdict(noted(0, u64::MAX), u64::MAX, 1, soon), NotDue);
}

/// Registers `id` as a completed authorization-code grant whose refresh token dies at `dies_at`.
async fn register_grant(broker: &Broker, id: &str, dies_at: u64) {
    let grant = crate::model::Grant {
        refresh_token: SecretString::new(format!("rt-{id}")),
        refresh_expires_at: Some(dies_at),
        granted_scopes: Vec::new(),
        cloud_id: None,
        instance_url: None,
        authorized_at: dies_at - 400 * 86_400,
    };
    broker
        .register(RegisterInput {
            system_id: id.to_owned(),
            display_name: String::new(),
            description: String::new(),
            kind: SystemKind::Zendesk,
            base_url: "https://acme.zendesk.example".to_owned(),
            credential: Credential::OAuthAuthorizationCode {
                client_id: "client".to_owned(),
                client_secret: SecretString::new("client-secret".to_owned()),
                scopes: Vec::new(),
                grant: Some(grant),
            },
            check: false,
            delivery: None,
        })
        .await
        .unwrap();
}

#[test]
fn a_flights_debug_shows_the_refused_credentials_length_not_its_bytes() {
    let flight = super::Flight {
        refused: Some((
            vec![0xAB; 40],
            AuthFailure::InvalidCredentials,
            "invalid_grant".to_owned(),
        )),
        ..Default::default()
    };
    let shown = format!("{flight:?}");
    assert!(shown.contains("Some((40, InvalidCredentials"), "{shown}");
    assert!(!shown.contains("171"), "{shown}");
}

/// A stored revision at its limit (the revision is not under the record's tag, so whoever
/// can write the database can set it) is refused as corrupt, not wrapped to 0.
#[tokio::test]
async fn a_revision_at_its_limit_is_refused_not_wrapped() {
    let store = Arc::new(MemoryStore::new());
    let broker = broker_on(FakeBackend::new(false, vec![]), store.clone()).await;
    let mut record = store.get_system(SYSTEM).await.unwrap().unwrap();
    let was = record.revision;
    record.revision = u64::MAX;
    store.update_system(&record, was).await.unwrap();
    let e = broker
        .set_delivery(SYSTEM, Some(crate::model::Delivery::Proxy))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");
    let stored = store.get_system(SYSTEM).await.unwrap().unwrap();
    assert_eq!(stored.revision, u64::MAX);
    // A re-wrap goes past it: the other records end on the new key.
    for id in ["b-other", "c-other"] {
        broker.register(snow(id)).await.unwrap();
    }
    let key = broker.rotate_master_key().await.unwrap();
    let status = loop {
        let s = broker.key_status().await.unwrap();
        if !s.rewrap_running {
            break s;
        }
        tokio::task::yield_now().await;
    };
    let on_new = status.keys.iter().find(|k| k.id == key).map(|k| k.records);
    assert_eq!((on_new, status.total), (Some(2), 3), "{status:?}");
}

/// A ServiceNow registration of `id` (unchecked).
fn snow(id: &str) -> RegisterInput {
    RegisterInput {
        system_id: id.to_owned(),
        display_name: String::new(),
        description: String::new(),
        kind: SystemKind::ServiceNow,
        base_url: "https://acme.service-now.example".to_owned(),
        credential: Credential::OAuthRefreshToken {
            client_id: "client".to_owned(),
            client_secret: SecretString::new("client-secret".to_owned()),
            refresh_token: SecretString::new("rt-1".to_owned()),
            username: None,
            refresh_expires_at: None,
        },
        check: false,
        delivery: None,
    }
}
