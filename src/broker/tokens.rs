//! The token cache: how `GetAccessToken` answers thousands of calls a second without waiting on
//! upstreams, refreshes each OAuth token once, ahead of expiry, and never loses a refresh token.
//!
//! # Design
//! - **Hot path**: a read-locked map from system id to the current [`IssuedToken`]. A call whose
//!   token stays valid for `min_valid_seconds` returns it: no disk, no decryption, no upstream.
//! - **Single flight**: every mint for a system runs under that system's [`Flight`] lock, and
//!   re-checks the cache after taking it, so concurrent misses cause one upstream call and all
//!   callers get its result. Different systems mint in parallel; a global semaphore caps
//!   concurrent upstream token calls.
//! - **Refresh ahead**: a minted OAuth token is scheduled for refresh when a fraction of its
//!   lifetime remains; the background refresher renews tokens that workers used, so workers do
//!   not wait. Idle tokens lapse and are minted on the next demand.
//! - **Rotation is durable first**: a rotated refresh token (or any updated credential) is
//!   sealed and flushed before the new access token is cached or returned. If the write fails
//!   the new credential is kept in memory, retried on the next mint, and nothing is handed out.
//! - **Failures**: a permanent rejection (`invalid_grant`, wrong client) marks the system
//!   `REAUTHORIZATION_REQUIRED` (after re-reading the stored credential once, in case another
//!   path rotated it) and stops upstream calls for it; a transient one backs off exponentially
//!   with jitter, honouring `Retry-After` (capped), while a still-valid token keeps being served.
//! - **Rejection reports**: a worker whose call got a 401 sends the `token_id`; if it is still
//!   current it is discarded and re-minted once, however many workers report it.

// tokio's clock, not std's: the same instant in production, and one tests can pause and advance.
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

use rand::Rng;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::backends::{Backend, BackendError, Header, Issued, Target};
use crate::broker::is_ours;
use crate::broker::{Broker, Modified, Retry, Unwritten, MAX_MIN_VALID_SECONDS, SCAN_PAGE};
use crate::crypto::{same_sealing, RecordBinding};
use crate::error::BrokerError;
use crate::model::{unix_now, AuthFailure, Credential, SharedToken, SystemRecord, SystemState};
use crate::secret::SecretString;
use crate::store::StoreError;
use crate::util::sync::{lock, read, write};

/// Headers handed to a worker, cached until they expire.
#[derive(Debug)]
pub struct IssuedToken {
    /// Ready-to-send headers.
    pub headers: Vec<Header>,
    /// When the headers stop being valid.
    pub expires_at: SystemTime,
    /// Where the worker sends its API calls.
    pub api_base_url: String,
    /// The credential version the headers come from.
    pub credential_version: u64,
    /// The system's kind (for callers scoped by kind).
    pub kind: crate::model::SystemKind,
    /// How workers get it.
    pub delivery: crate::model::Delivery,
    /// Opaque id; new for every mint.
    pub token_id: String,
    /// True for OAuth access tokens (refreshed ahead), false for static secrets.
    pub refreshable: bool,
    /// The upstream user the token belongs to, when known.
    pub subject: Option<String>,
    used: AtomicBool,
    /// When this process minted (or adopted) it: a fresh token is served as is, so demand for
    /// more validity than the vendor grants cannot drive a refresh per call.
    minted_at: Instant,
    /// How long it was valid for when minted (or adopted): about what a new one would last.
    lifetime: Duration,
    /// The token id's audit HMAC, computed on first use (every hand-out is audited).
    audit_hmac: std::sync::OnceLock<String>,
    /// The base proxied calls are built on (`api_base_url` normalized), or why the egress
    /// guard refuses it: judged on the first proxied call, since the base decides the host of
    /// every call under it.
    upstream_base: std::sync::OnceLock<Result<String, String>>,
    /// The gRPC answer handing this token out, encoded on its first hand-out (the answer is the
    /// same for every hand-out of one token).
    answer: std::sync::OnceLock<crate::secret::SecretBytes>,
}

impl IssuedToken {
    /// The HMAC under which the audit trail records this token's id.
    pub fn audit_hmac(&self, audit: &crate::audit::Audit) -> &str {
        self.audit_hmac.get_or_init(|| audit.hmac(&self.token_id))
    }

    /// The base proxied calls are built on, as `judge` finds `api_base_url` (judged once per
    /// token).
    pub(crate) fn upstream_base(
        &self,
        judge: impl FnOnce(&str) -> Result<String, String>,
    ) -> &Result<String, String> {
        self.upstream_base.get_or_init(|| judge(&self.api_base_url))
    }

    /// The answer handing this token out, as `encode` makes it on the first call (one caller:
    /// `server::convert::TokenAnswer::encode`, so every hand-out sends the same bytes).
    pub(crate) fn answer(&self, encode: impl FnOnce(&Self) -> crate::secret::SecretBytes) -> &[u8] {
        self.answer.get_or_init(|| encode(self)).expose_secret()
    }

    /// True while the token is valid until `need_until`, or (a refreshable token) while it is
    /// still valid and younger than `fresh_for` or half its lifetime, whichever is longer: a
    /// demand beyond what it has left re-mints at most once per half lifetime, whatever
    /// `min_valid_seconds` says (each Zendesk refresh revokes the token every other worker
    /// holds). Served meanwhile, it still has at least half its lifetime left.
    pub(crate) fn serves(&self, need_until: SystemTime, fresh_for: Duration) -> bool {
        if self.expires_at >= need_until {
            return true;
        }
        self.refreshable
            && self.expires_at > SystemTime::now()
            && self.minted_at.elapsed() < fresh_for.max(self.lifetime / 2)
    }

    fn mark_used(&self) {
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
    }

    /// The token as backend input (for verification).
    pub fn to_issued(&self) -> Issued {
        Issued {
            headers: self.headers.clone(),
            expires_at: Some(self.expires_at),
            api_base_url: self.api_base_url.clone(),
            updated_credential: None,
            subject: self.subject.clone(),
        }
    }
}

/// What a vendor's refusal means once weighed against the stored credential.
enum Refusal {
    /// The stored credential changed meanwhile: try the new one.
    Retry(Box<SystemRecord>),
    /// The refused credential is the stored one: the grant is dead.
    Stands,
    /// The system is gone or no longer usable.
    Fail(BrokerError),
    /// The shared store cannot say: wait for it as for any outage.
    Wait(String),
}

/// What marking a refused grant for re-authorization came to.
enum Marked {
    /// Marked (or already marked): the grant is dead; the stored state message.
    Dead(String),
    /// The stored credential is another one now: nothing to mark.
    Replaced,
    /// The system was deleted meanwhile.
    Gone,
    /// The shared store could not take the mark (unavailable, or the record kept changing):
    /// the refusal is kept for the next try, after a pause.
    Unrecorded,
}

/// Why the record read under the replica refresh lock cannot be minted with.
enum FreshRead {
    /// The store did not answer: an outage to wait out, not a verdict on the grant.
    Down(String),
    /// The system is gone, inactive or unusable, or its record failed to load.
    Refused(BrokerError),
    /// The refresh lock cannot be had now: this replica's lock slots are all held, or another
    /// replica holds the system's lock for too long. Contention, not a verdict on anything.
    Busy(String),
}

/// What replicas share of an issued token (sealed; see [`SharedToken`]).
#[derive(serde::Serialize, serde::Deserialize)]
struct SharedPayload {
    headers: Vec<(String, String)>,
    api_base_url: String,
    subject: Option<String>,
}

/// A token about to be shared with the other replicas, in clear until sealed into a record.
pub(crate) struct Share {
    plain: zeroize::Zeroizing<Vec<u8>>,
    expires_at_ms: u64,
    token_id: String,
}

impl Share {
    fn new(
        headers: &[crate::backends::Header],
        api_base_url: &str,
        subject: &Option<String>,
        expires_at: Option<SystemTime>,
        token_id: String,
    ) -> Self {
        let payload = SharedPayload {
            headers: headers
                .iter()
                .map(|h| (h.name.to_owned(), h.value.expose_secret().to_owned()))
                .collect(),
            api_base_url: api_base_url.to_owned(),
            subject: subject.clone(),
        };
        Self {
            plain: zeroize::Zeroizing::new(serde_json::to_vec(&payload).unwrap_or_default()),
            expires_at_ms: expires_at
                .and_then(|e| e.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
            token_id,
        }
    }

    /// What a freshly issued token will be shared as (under a new token id).
    fn of(issued: &Issued) -> Self {
        Self::new(
            &issued.headers,
            &issued.api_base_url,
            &issued.subject,
            issued.expires_at,
            crate::util::random::url_token::<12>(),
        )
    }

    /// Sealed for `current` (bound to its credential version); `None` when it did not encode.
    fn sealed(
        &self,
        broker: &Broker,
        system_id: &str,
        current: &SystemRecord,
    ) -> Option<SharedToken> {
        if self.plain.is_empty() {
            return None;
        }
        Some(SharedToken {
            sealed: read(&broker.keyring).seal(&shared_binding(system_id, current), &self.plain),
            expires_at_ms: self.expires_at_ms,
            token_id: self.token_id.clone(),
        })
    }
}

/// The AAD binding of a shared token: the system, its credential type and version, and a
/// suffix that keeps it apart from the credential itself.
fn shared_binding<'a>(system_id: &'a str, record: &SystemRecord) -> RecordBinding<'a> {
    RecordBinding {
        system_id,
        credential_type: record.credential_type,
        version: record.credential_version ^ SHARED_TOKEN_VERSION_TAG,
    }
}

/// Longer than any token or lease id the broker makes (16 characters today).
const MAX_TOKEN_ID_LEN: usize = 64;

/// The least time a stop gives its last try to store the credentials the store refused.
const PENDING_AT_STOP: Duration = Duration::from_secs(2);

/// Why a vendor exchange was not started: the broker is stopping.
const SHUTTING_DOWN: &str = "shutting down";

/// How a transport timeout reads in a backend's message (`TransportError::Timeout`): the request
/// was sent and no answer came, so the vendor may have acted on it.
const OUTCOME_UNKNOWN_MARK: &str = "timed out after";

/// XORed into the version of a shared token's binding (a credential version never gets near).
const SHARED_TOKEN_VERSION_TAG: u64 = 0x5348_4152_4544_0000;

/// Refresh tuning.
#[derive(Debug, Clone)]
pub struct RefreshSettings {
    /// Refresh when this fraction of the token's lifetime remains.
    pub ahead_fraction: f64,
    /// …but at least this long before expiry (capped at half the lifetime).
    pub ahead_min: Duration,
    /// Upstream token calls in flight at once, across all systems.
    pub max_concurrent: usize,
    /// First retry delay after a transient failure (doubles each time, with jitter).
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Longest `Retry-After` honoured.
    pub retry_after_cap: Duration,
    /// A rejection report for a token minted less than this long ago does not re-mint again.
    pub min_forced_remint: Duration,
    /// Demand (`min_valid_seconds` beyond what the cached token has left) refreshes a system at
    /// most once per this interval; a rejection report of the current token is not limited.
    pub min_demand_interval: Duration,
}

impl Default for RefreshSettings {
    fn default() -> Self {
        Self {
            ahead_fraction: 0.2,
            ahead_min: Duration::from_secs(10),
            max_concurrent: 16,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            retry_after_cap: Duration::from_secs(600),
            min_forced_remint: Duration::from_secs(1),
            min_demand_interval: Duration::from_secs(10),
        }
    }
}

/// A credential the vendor issued that the store refused, and what it replaces: any other
/// stored credential (a reconnect or rotation, a refresh on another replica, or this very write
/// having landed after all) makes it moot; a rewrap under another key does not.
#[derive(Clone)]
struct Pending {
    /// The credential version it belongs to.
    version: u64,
    /// SHA-256 of the replaced credential's plaintext (`None`: it could not be read; the
    /// version alone decides).
    replaces: Option<[u8; 32]>,
    credential: Credential,
}

/// Per-system refresh state, guarded by the system's single-flight lock. `Debug` is
/// hand-written: it shows the refused sealed credential's length, not its bytes.
#[derive(Default)]
pub struct Flight {
    backoff_until: Option<Instant>,
    failures: u32,
    last_failure: Option<AuthFailure>,
    /// A credential the upstream issued that is not yet durable (its write failed).
    pending: Option<Pending>,
    /// Set when the grant is dead: the message to return, with no upstream call.
    dead: Option<String>,
    last_forced: Option<Instant>,
    /// Refreshes in a row that met an unreachable store (non-zero: the backoff is the shared
    /// store's outage, not the vendor's).
    store_failures: u32,
    /// A vendor's refusal not yet settled: not weighed against the stored credential, or not
    /// recorded, because the shared store was away. The refused sealed credential, the failure
    /// and the vendor's message. The refusal stands, with no second upstream call, once the
    /// store shows that credential still stored; any other credential forgets it.
    refused: Option<(Vec<u8>, AuthFailure, String)>,
    /// The token a worker reported rejected, dropped from the cache for the forced re-mint:
    /// put back while the re-mint cannot happen (the vendor's endpoint failing), so one report
    /// never takes every worker's token away.
    pub(crate) reported: Option<Arc<IssuedToken>>,
    /// What the vendor's answers above (a dead grant, a backoff, a reported token) were
    /// about: a digest of the sealed credential and shared token of the record the last mint
    /// attempt read (see [`vendor_view`]).
    seen: Option<[u8; 32]>,
    /// A refresh that presented a refresh token and timed out after it was sent: the vendor
    /// may have turned the token over, and the answer is lost. See [`Unsettled`].
    unsettled: Option<Unsettled>,
}

/// An unknown outcome the broker settles on its own, at a vendor with a reuse leeway
/// ([`Backend::reuse_leeway`]; Atlassian lets a turned-over refresh token be presented again
/// for 10 minutes): the refresher presents the stored refresh token again, at most
/// [`UNSETTLED_RETRY_MAX`] apart, without waiting for a worker, a check or the hourly
/// keep-alive (each might come too late), until the vendor answers a refresh (a token, or a
/// refusal), another credential is stored, or the leeway has passed.
struct Unsettled {
    since: Instant,
    /// The vendor's leeway: how long the presented token may be presented again.
    window: Duration,
    /// The sealed credential that was presented (another one stored settles it).
    presented: Vec<u8>,
}

/// The longest wait between two of those tries (a vendor's longer `Retry-After` included), so
/// several fall within the leeway.
const UNSETTLED_RETRY_MAX: Duration = Duration::from_secs(120);

/// The shortest wait between two of those tries when nothing else set one (the store was
/// away, say).
const UNSETTLED_RETRY_MIN: Duration = Duration::from_secs(10);

/// The refresher's schedule entry for presenting a system's stored refresh token again (no
/// token id has this shape: they are URL-safe base64).
const UNSETTLED_MARK: &str = "~unsettled";

impl std::fmt::Debug for Flight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let refused = self
            .refused
            .as_ref()
            .map(|(sealed, failure, message)| (sealed.len(), failure, message));
        f.debug_struct("Flight")
            .field("backoff_until", &self.backoff_until)
            .field("failures", &self.failures)
            .field("last_failure", &self.last_failure)
            .field(
                "pending (version)",
                &self.pending.as_ref().map(|p| p.version),
            )
            .field("dead", &self.dead)
            .field("last_forced", &self.last_forced)
            .field("store_failures", &self.store_failures)
            .field("refused (sealed length, failure, message)", &refused)
            .field("reported", &self.reported.as_ref().map(|t| &t.token_id))
            .field("seen", &self.seen.is_some())
            .field("unsettled", &self.unsettled.as_ref().map(|u| u.since))
            .finish()
    }
}

impl Flight {
    /// Forgets a dead grant, any backoff and a reported token (the stored system changed
    /// elsewhere).
    pub(crate) fn clear_remote_state(&mut self) {
        self.dead = None;
        self.backoff_until = None;
        self.reported = None;
    }

    /// Forgets a dead grant (the next mint reads the record again and finds out).
    pub(crate) fn forget_dead(&mut self) {
        self.dead = None;
    }

    /// The [`vendor_view`] of the record the vendor's standing answers (a dead grant, its
    /// backoff, a reported token) were given for, if there are any. `None` also when the
    /// backoff is the shared store's: a change from the store is news that it is back.
    pub(crate) fn vendor_state_seen(&self) -> Option<[u8; 32]> {
        let standing =
            self.dead.is_some() || self.backoff_until.is_some() || self.reported.is_some();
        self.seen.filter(|_| standing && self.store_failures == 0)
    }
}

/// Why a mint runs.
#[derive(Debug)]
pub(crate) enum Reason {
    /// A worker (or a check) needs headers; `rejected` is a reported token id.
    Demand { rejected: Option<String> },
    /// The refresher renews this token ahead of expiry.
    Ahead { token_id: String },
    /// The keep-alive sweep renews an idle grant before its refresh token dies.
    KeepAlive,
    /// The broker presents the stored refresh token again after an unknown outcome
    /// ([`Unsettled`]).
    Unsettled,
}

/// The background refresher; stop it before the store closes.
pub struct Refresher {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Refresher {
    /// Stops the loop. Refreshes already started are not cancelled: they run on as vendor
    /// exchanges ([`Broker::drain_exchanges`] waits for them).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// A scheduled refresh: when, which system, which token.
type ScheduleEntry = (Instant, String, String);

/// The token cache's own state: the headers issued per system, each system's single-flight
/// lock with its refresh state, the permits for upstream token calls, and the schedule of
/// refreshes ahead of expiry.
#[derive(Debug)]
pub struct TokenCache {
    tokens: std::sync::RwLock<HashMap<String, Arc<IssuedToken>>>,
    flights: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Flight>>>>,
    permits: tokio::sync::Semaphore,
    schedule: std::sync::Mutex<BTreeSet<ScheduleEntry>>,
    scheduled: tokio::sync::Notify,
    /// Systems whose refresh waits for an unreachable shared store, and since when (seconds
    /// since the epoch): their health says so, though nothing can be written while it lasts.
    store_waits: std::sync::Mutex<HashMap<String, u64>>,
}

impl TokenCache {
    /// An empty cache allowing `max_concurrent` upstream token calls at once.
    pub fn new(max_concurrent: usize) -> Self {
        Self {
            tokens: Default::default(),
            flights: Default::default(),
            permits: tokio::sync::Semaphore::new(max_concurrent.max(1)),
            schedule: Default::default(),
            scheduled: tokio::sync::Notify::new(),
            store_waits: Default::default(),
        }
    }

    /// Since when the system's refresh has waited for the store, if it does.
    pub(crate) fn store_wait(&self, system_id: &str) -> Option<u64> {
        lock(&self.store_waits).get(system_id).copied()
    }

    /// Notes the wait; true when it begins (it was not noted yet).
    fn begin_store_wait(&self, system_id: &str) -> bool {
        let mut waits = lock(&self.store_waits);
        if waits.contains_key(system_id) {
            return false;
        }
        waits.insert(system_id.to_owned(), crate::model::unix_now());
        true
    }

    fn end_store_wait(&self, system_id: &str) {
        let mut waits = lock(&self.store_waits);
        if !waits.is_empty() {
            waits.remove(system_id);
        }
    }

    /// The system's cached headers.
    pub(crate) fn get(&self, system_id: &str) -> Option<Arc<IssuedToken>> {
        read(&self.tokens).get(system_id).cloned()
    }

    fn insert(&self, system_id: &str, token: Arc<IssuedToken>) {
        write(&self.tokens).insert(system_id.to_owned(), token);
    }

    /// Forgets the system's cached headers (it changed or is gone; a wait for the store ends).
    pub(crate) fn remove(&self, system_id: &str) {
        write(&self.tokens).remove(system_id);
        self.end_store_wait(system_id);
    }

    /// Forgets every cached header (a resync).
    pub(crate) fn clear(&self) {
        write(&self.tokens).clear();
        lock(&self.store_waits).clear();
    }

    /// The ids of the systems that have a flight (refresh state) now.
    pub(crate) fn flight_ids(&self) -> Vec<String> {
        lock(&self.flights).keys().cloned().collect()
    }

    /// The system's single-flight lock (made on first use).
    pub(crate) fn flight(&self, system_id: &str) -> Arc<tokio::sync::Mutex<Flight>> {
        lock(&self.flights)
            .entry(system_id.to_owned())
            .or_default()
            .clone()
    }

    /// Every system's single-flight lock there is now.
    fn flights(&self) -> Vec<(String, Arc<tokio::sync::Mutex<Flight>>)> {
        (lock(&self.flights).iter())
            .map(|(id, f)| (id.clone(), f.clone()))
            .collect()
    }

    /// The system's single-flight lock, if it has one (none is made).
    pub(crate) fn existing_flight(
        &self,
        system_id: &str,
    ) -> Option<Arc<tokio::sync::Mutex<Flight>>> {
        lock(&self.flights).get(system_id).cloned()
    }

    /// Drops the system's flight entry unless someone else holds or waits for it (a
    /// registration racing with this lookup keeps its single-flight lock). `held` is how many
    /// references the caller itself still holds.
    pub(crate) fn forget_flight_if_idle(&self, system_id: &str, held: usize) {
        let mut flights = lock(&self.flights);
        if flights
            .get(system_id)
            .is_some_and(|f| Arc::strong_count(f) <= 1 + held)
        {
            flights.remove(system_id);
        }
    }

    /// A permit for one upstream token call.
    async fn permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, BrokerError> {
        self.permits
            .acquire()
            .await
            .map_err(|_| BrokerError::Unavailable(SHUTTING_DOWN.to_owned()))
    }

    /// Schedules a refresh of `token_id` of `system_id` at `at`.
    fn schedule_at(&self, system_id: &str, token_id: &str, at: Instant) {
        lock(&self.schedule).insert((at, system_id.to_owned(), token_id.to_owned()));
        self.scheduled.notify_one();
    }

    /// When the next scheduled refresh is due.
    fn next_due(&self) -> Option<Instant> {
        lock(&self.schedule).first().map(|(at, _, _)| *at)
    }

    /// Takes the scheduled refreshes due at `now`.
    fn take_due(&self, now: Instant) -> Vec<ScheduleEntry> {
        let mut entries = lock(&self.schedule);
        let mut due = Vec::new();
        while entries.first().is_some_and(|(at, _, _)| *at <= now) {
            if let Some(e) = entries.pop_first() {
                due.push(e);
            }
        }
        due
    }
}

impl Broker {
    /// Headers for `system_id`, valid at least `min_valid` seconds (as far as the upstream's
    /// token lifetime allows: a freshly minted token is served as is, with its real expiry).
    /// `rejected` is the `token_id` of headers the upstream refused.
    ///
    /// A vendor exchange this starts runs detached: dropping the returned future (a client
    /// deadline, a disconnect) never cancels a refresh half-way.
    pub async fn access_token(
        &self,
        system_id: &str,
        min_valid: u32,
        rejected: Option<&str>,
    ) -> Result<Arc<IssuedToken>, BrokerError> {
        if min_valid > MAX_MIN_VALID_SECONDS {
            return Err(BrokerError::invalid(
                "min_valid_seconds",
                format!("must be at most {MAX_MIN_VALID_SECONDS}"),
            ));
        }
        if let Some(t) = self.answers_from_cache(system_id, min_valid, rejected.unwrap_or_default())
        {
            return Ok(self.hand_out_cached(t));
        }
        crate::broker::validate_system_id(system_id)?;
        let need_until = SystemTime::now() + Duration::from_secs(u64::from(min_valid));
        // A report longer than any token id names no token: it is not copied along.
        let rejected = rejected
            .filter(|r| !r.is_empty() && r.len() <= MAX_TOKEN_ID_LEN)
            .map(str::to_owned);
        crate::metrics::METRICS.cache(false);
        let t = self
            .mint_detached(system_id, need_until, Reason::Demand { rejected })
            .await?;
        t.mark_used();
        Ok(t)
    }

    /// A token for checking `system_id` (a scheduled or an admin's check): the same
    /// single-flight path, but the token is not marked as used, so checking an idle system does
    /// not make the refresher renew its tokens ahead from then on.
    pub(crate) async fn token_for_check(
        &self,
        system_id: &str,
    ) -> Result<Arc<IssuedToken>, BrokerError> {
        if let Some(t) = self.answers_from_cache(system_id, 0, "") {
            return Ok(t);
        }
        crate::broker::validate_system_id(system_id)?;
        self.mint_detached(
            system_id,
            SystemTime::now(),
            Reason::Demand { rejected: None },
        )
        .await
    }

    /// `GetAccessToken`'s policy for `caller`: the id is validated and the caller's scope (ids,
    /// then kinds) checked before any mint, and an out-of-scope caller gets the same answer
    /// whether or not the system exists or works.
    pub async fn access_token_for(
        &self,
        caller: &crate::broker::Caller,
        system_id: &str,
        min_valid: u32,
        rejected: Option<&str>,
    ) -> Result<Arc<IssuedToken>, BrokerError> {
        crate::broker::validate_system_id(system_id)?;
        let denied = || {
            BrokerError::PermissionDenied(format!(
                "caller '{}' may not access system '{system_id}'",
                caller.name
            ))
        };
        if !caller.may_use_id(system_id) {
            return Err(denied());
        }
        if caller.is_kind_scoped() {
            let kind = match self.cached(system_id) {
                Some(t) => Some(t.kind),
                // A store that cannot answer is UNAVAILABLE (retry), not a refusal for good; a
                // record it cannot read is a refusal like a missing one (no DATA_LOSS telling
                // the worker that a system of another kind exists).
                None => match self
                    .store
                    .get_system(system_id)
                    .await
                    .map_err(BrokerError::from)
                {
                    Ok(r) => r.map(|r| r.kind),
                    Err(e @ BrokerError::Unavailable(_)) => return Err(e),
                    Err(e) => {
                        tracing::warn!(message = "A worker's system could not be read; refused.", system_id = %system_id, error = %e);
                        None
                    }
                },
            };
            if !kind.is_some_and(|k| caller.may_use_kind(k)) {
                return Err(denied());
            }
        }
        let token = match self.access_token(system_id, min_valid, rejected).await {
            // Deleted since the kind was looked up: still nothing to learn for this caller.
            Err(BrokerError::NotFound(_)) if caller.is_kind_scoped() => return Err(denied()),
            other => other?,
        };
        if !caller.may_use_kind(token.kind) {
            return Err(denied());
        }
        Ok(token)
    }

    /// Runs [`Self::mint`] as a task of its own, tracked for shutdown: the exchange and the
    /// durable write of its result finish even when the caller stops waiting.
    pub(crate) async fn mint_detached(
        &self,
        system_id: &str,
        need_until: SystemTime,
        reason: Reason,
    ) -> Result<Arc<IssuedToken>, BrokerError> {
        let Some(me) = self.me.upgrade() else {
            return Err(BrokerError::Unavailable(SHUTTING_DOWN.to_owned()));
        };
        // The wait for the system's lock stays in the caller's future (a caller that gives up
        // leaves nothing behind); only the holder runs detached, so there is at most one such
        // task per system.
        let flight = self.flight(system_id);
        let mut f = flight.lock_owned().await;
        let id = system_id.to_owned();
        let task = self.exchanges.spawn(tracing::Instrument::instrument(
            async move { me.mint_locked(&mut f, &id, need_until, reason).await },
            tracing::Span::current(),
        ));
        task.await
            .unwrap_or_else(|_| Err(BrokerError::Unavailable(SHUTTING_DOWN.to_owned())))
    }

    /// The backend to ask for a token, unless a stop has refused new exchanges (see
    /// [`Self::refuse_new_exchanges`]): checked in the detached mint, after every way of
    /// answering without the vendor, so a call waiting behind a refresh still gets its result.
    fn backend_to_ask(
        &self,
        kind: crate::model::SystemKind,
    ) -> Result<Arc<dyn Backend>, BrokerError> {
        if self.refusing_exchanges() {
            return Err(BrokerError::Unavailable(SHUTTING_DOWN.to_owned()));
        }
        Ok(self.registry.get(kind)?.clone())
    }

    /// Runs `work` (a vendor exchange and the durable write of its result) as a tracked task
    /// that the caller may stop waiting for without stopping it. `None` if the task panicked,
    /// or if a stop has refused new exchanges (the work is not started).
    pub fn run_detached<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> impl std::future::Future<Output = Option<T>> + Send + 'static {
        // Held across the flag's read: a drain cannot finish its wait between the read and the
        // spawn and leave the work running unwaited.
        let held = self.exchanges.token();
        let task = (!self.refusing_exchanges()).then(|| {
            self.exchanges.spawn(tracing::Instrument::instrument(
                work,
                tracing::Span::current(),
            ))
        });
        drop(held);
        async move { task?.await.ok() }
    }

    /// From now on no vendor exchange starts: a stop calls this once the calls it waits for are
    /// done or abandoned. An abandoned call's task lives on (the server cuts only its accept
    /// loop), and an exchange it started after the drain would be cut by the exit, a refresh
    /// token the vendor rotated in it lost. Exchanges already running are still waited for.
    pub fn refuse_new_exchanges(&self) {
        self.exchanges_refused.store(true, Ordering::SeqCst);
    }

    /// True once [`Self::refuse_new_exchanges`] was called.
    pub(crate) fn refusing_exchanges(&self) -> bool {
        self.exchanges_refused.load(Ordering::SeqCst)
    }

    /// Waits (at most `grace`) for the vendor exchanges in flight; new ones are still accepted
    /// meanwhile. True when none is left.
    pub async fn drain_exchanges(&self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        self.exchanges.close();
        let done = tokio::time::timeout_at(deadline, self.exchanges.wait())
            .await
            .is_ok();
        self.exchanges.reopen();
        self.store_pending_at_stop(deadline).await;
        done
    }

    /// At a stop, within what is left of its grace (`deadline`, but at least
    /// [`PENDING_AT_STOP`]: a grace used up by calls leaves these their own time): one last try
    /// to store each credential the vendor issued that the store refused (a rotated refresh
    /// token, perhaps the only live one), since the retries in the background end with the
    /// process. The systems nothing else holds first, then those a refresh or a retry holds.
    /// Each one that may be left unstored is logged by system.
    async fn store_pending_at_stop(&self, deadline: tokio::time::Instant) {
        let deadline = deadline.max(tokio::time::Instant::now() + PENDING_AT_STOP);
        let mut busy = Vec::new();
        for (id, flight) in self.cache.flights() {
            let Ok(mut f) = flight.try_lock() else {
                busy.push((id, flight));
                continue;
            };
            self.store_pending_by(deadline, &id, &mut f).await;
        }
        for (id, flight) in busy {
            let Ok(mut f) = tokio::time::timeout_at(deadline, flight.lock()).await else {
                tracing::error!(message = "A refresh was still under way at the stop; what it got may not be stored, and the system may need to be connected again.", system_id = %id);
                continue;
            };
            self.store_pending_by(deadline, &id, &mut f).await;
        }
    }

    /// Stores `f`'s pending credential, if any, by `deadline`; logs it when it may not be.
    async fn store_pending_by(&self, deadline: tokio::time::Instant, id: &str, f: &mut Flight) {
        if f.pending.is_none() {
            return;
        }
        let stored = tokio::time::timeout_at(deadline, self.store_pending(id, f)).await;
        if !stored.unwrap_or(false) {
            tracing::error!(message = "A credential the vendor issued may not be stored at the stop; the system may need to be connected again.", system_id = %id);
        }
    }

    /// The cached token `access_token` would answer these arguments with, without minting (and
    /// so without any log line or upstream call), if there is one. The RPC layer skips its
    /// tracing span then and hands the token out with [`Self::warm_for`] (scope checked).
    pub fn answers_from_cache(
        &self,
        system_id: &str,
        min_valid: u32,
        rejected: &str,
    ) -> Option<Arc<IssuedToken>> {
        if min_valid > MAX_MIN_VALID_SECONDS {
            return None;
        }
        let need_until = SystemTime::now() + Duration::from_secs(u64::from(min_valid));
        let fresh_for = self.settings.refresh.min_demand_interval;
        self.cached(system_id).filter(|t| {
            (rejected.is_empty() || rejected != t.token_id) && t.serves(need_until, fresh_for)
        })
    }

    /// A token found by [`Self::answers_from_cache`] handed out to `caller`, if its scope
    /// allows the system (else `None`: the full path decides, and hides what it must).
    pub fn warm_for(
        &self,
        caller: &crate::broker::Caller,
        system_id: &str,
        t: Arc<IssuedToken>,
    ) -> Option<Arc<IssuedToken>> {
        (caller.may_use_id(system_id) && caller.may_use_kind(t.kind))
            .then(|| self.hand_out_cached(t))
    }

    /// Hands out a token found by [`Self::answers_from_cache`] (counted as a cache hit, and as
    /// in use for the refresher).
    pub(crate) fn hand_out_cached(&self, t: Arc<IssuedToken>) -> Arc<IssuedToken> {
        t.mark_used();
        crate::metrics::METRICS.cache(true);
        t
    }

    /// The failure class of the last failed mint of `system_id`, if any.
    pub(crate) async fn last_failure(&self, system_id: &str) -> Option<AuthFailure> {
        let flight = self.flight(system_id);
        let f = flight.lock().await;
        f.last_failure
    }

    pub(crate) fn cached(&self, system_id: &str) -> Option<Arc<IssuedToken>> {
        self.cache.get(system_id)
    }

    pub(crate) fn drop_token(&self, system_id: &str) {
        self.cache.remove(system_id);
    }

    pub(crate) fn flight(&self, system_id: &str) -> Arc<tokio::sync::Mutex<Flight>> {
        self.cache.flight(system_id)
    }

    /// See [`TokenCache::forget_flight_if_idle`].
    pub(crate) fn forget_flight_if_idle(&self, system_id: &str, held: usize) {
        self.cache.forget_flight_if_idle(system_id, held);
    }

    /// Resets a system's refresh state after an admin replaced its credential.
    pub(crate) fn reset_flight(f: &mut Flight) {
        *f = Flight::default();
    }

    /// The credential the vendor issued that is not yet stored, while `record` still holds the
    /// credential it replaces; else it is dropped (another credential was stored meanwhile:
    /// it wins).
    fn pending_for(&self, f: &mut Flight, record: &SystemRecord) -> Option<Credential> {
        let p = f.pending.as_ref()?;
        // One this broker cannot open yet is no other credential: the pending one stays.
        if self.still_replaces(p, record).unwrap_or(true) {
            return Some(p.credential.clone());
        }
        dropped_pending(&record.system_id);
        f.pending = None;
        None
    }

    /// Whether `record` still holds the credential `p` replaces; an error while this broker
    /// cannot open it yet (a key it has not loaded: UNAVAILABLE), which says nothing either way.
    fn still_replaces(&self, p: &Pending, record: &SystemRecord) -> Result<bool, BrokerError> {
        if p.version != record.credential_version {
            return Ok(false);
        }
        let Some(replaces) = p.replaces else {
            return Ok(true);
        };
        match self.open_credential(record) {
            Ok(c) => Ok(credential_digest(&c) == Some(replaces)),
            Err(e @ BrokerError::Unavailable(_)) => Err(e),
            // A stored credential that cannot be read (damaged) is no other credential: the
            // live one in `p` replaces it.
            Err(_) => Ok(true),
        }
    }

    /// SHA-256 of `record`'s credential, opened (the same after a rewrap under another key).
    fn credential_digest(&self, record: &SystemRecord) -> Option<[u8; 32]> {
        credential_digest(&self.open_credential(record).ok()?)
    }

    /// What callers get while no token can be minted: the cached token, or else the one a
    /// worker reported rejected, put back in the cache while it is valid (see
    /// [`Flight::reported`]).
    fn fallback(
        &self,
        f: &mut Flight,
        system_id: &str,
        current: Option<Arc<IssuedToken>>,
    ) -> Option<Arc<IssuedToken>> {
        if current.is_some() {
            return current;
        }
        let reported = f.reported.take()?;
        if reported.expires_at <= SystemTime::now() {
            return None;
        }
        self.cache.insert(system_id, reported.clone());
        Some(reported)
    }

    /// Mints headers with the system's single-flight lock held (`f` is its state).
    async fn mint_locked(
        &self,
        f: &mut Flight,
        system_id: &str,
        need_until: SystemTime,
        reason: Reason,
    ) -> Result<Arc<IssuedToken>, BrokerError> {
        let mut current = self.cached(system_id);
        if let Some(answer) =
            self.answer_without_minting(f, system_id, need_until, &reason, &mut current)
        {
            return answer;
        }
        if let Some(msg) = &f.dead {
            return Err(BrokerError::FailedPrecondition(msg.clone()));
        }
        if let Some(until) = f.backoff_until.filter(|until| Instant::now() < *until) {
            return self.answer_in_backoff(f, system_id, current, until);
        }
        let mut record = self.mintable_record(f, system_id).await?;
        // Replicas (a shared store): one upstream refresh per expiry across processes. Use
        // what another replica did if it serves; else take the store's refresh lock (held for
        // the upstream call, released with the session if this process dies), look again at
        // the database's record, and refresh only if still needed.
        let mut replica_lock = None;
        if record.credential_type.is_oauth() && self.store.is_shared() {
            let ask = (need_until, &reason, current.as_ref());
            if let Some(answer) = self.answer_from_record(system_id, &record, ask) {
                return answer;
            }
            (replica_lock, record) = match self.lock_and_reread(f, system_id).await {
                Ok(held) => held,
                Err(FreshRead::Down(e)) => return self.on_store_down(f, system_id, current, &e),
                Err(FreshRead::Refused(e)) => return Err(e),
                Err(FreshRead::Busy(e)) => return self.on_lock_busy(f, system_id, current, e),
            };
            let ask = (need_until, &reason, current.as_ref());
            if let Some(answer) = self.answer_from_record(system_id, &record, ask) {
                return answer;
            }
        }
        if let Some(answer) = self.answer_for_reason(f, system_id, &reason, &record, &current) {
            return answer;
        }
        if let Some(rejected) = Self::refused_before(f, &record) {
            return Err(self
                .on_rejected(f, system_id, &record, true, rejected)
                .await);
        }
        let backend = self.backend_to_ask(record.kind)?;
        let mut reread = false;
        loop {
            let credential = match self.pending_for(f, &record) {
                Some(c) => c,
                None => self.open_credential(&record)?,
            };
            let oauth = credential.is_oauth();
            let result = self
                .issue(backend.as_ref(), system_id, &record, &credential)
                .await?;
            match result {
                Ok(issued) => {
                    let lock = replica_lock.as_ref();
                    return self
                        .on_issued(f, system_id, record, issued, need_until, (oauth, lock))
                        .await;
                }
                Err(BackendError::Rejected { failure, message }) => {
                    if !reread && f.pending.is_none() {
                        reread = true;
                        match self.weigh_refusal(f, system_id, &record, oauth).await {
                            Refusal::Retry(fresh) => {
                                if lost(replica_lock.as_ref()).await {
                                    // Not presented without the lock: another replica's
                                    // locked refresh may be presenting it now.
                                    return Err(lock_lost());
                                }
                                record = *fresh;
                                continue;
                            }
                            Refusal::Stands => {}
                            Refusal::Fail(e) => return Err(e),
                            Refusal::Wait(e) => {
                                f.refused = Some((record.sealed_credential, failure, message));
                                return self.on_store_down(f, system_id, current, &e);
                            }
                        }
                    }
                    let rejected = (failure, message);
                    return Err(self
                        .on_rejected(f, system_id, &record, oauth, rejected)
                        .await);
                }
                Err(BackendError::Transient {
                    failure,
                    message,
                    retry_after,
                }) => {
                    let transient = (failure, message, retry_after);
                    return self
                        .on_transient(f, system_id, &record, current, oauth, transient)
                        .await;
                }
                Err(BackendError::Unsupported(m)) => {
                    return Err(BrokerError::FailedPrecondition(m))
                }
            }
        }
    }

    /// What the mint's reason settles once the record is read (under the replica lock, with
    /// replicas): a keep-alive on a store of its own as [`Self::keepalive_answer`] (with
    /// replicas [`Self::answer_from_record`] did); an unknown outcome another credential or the
    /// window's end settled ([`settled_by`]).
    fn answer_for_reason(
        &self,
        f: &mut Flight,
        system_id: &str,
        reason: &Reason,
        record: &SystemRecord,
        current: &Option<Arc<IssuedToken>>,
    ) -> Option<Result<Arc<IssuedToken>, BrokerError>> {
        match reason {
            Reason::KeepAlive if !self.store.is_shared() => {
                self.keepalive_answer(system_id, record, current.as_ref())
            }
            Reason::Unsettled if settled_by(f, record) => Some(settled(current.as_ref())),
            _ => None,
        }
    }

    /// What the request's reason settles before any minting: a cached token that still serves,
    /// a recently forced re-mint, or an ahead-of-time refresh that lost its token. A worker's
    /// rejected token is dropped (and `current` cleared) so a new one is minted.
    fn answer_without_minting(
        &self,
        f: &mut Flight,
        system_id: &str,
        need_until: SystemTime,
        reason: &Reason,
        current: &mut Option<Arc<IssuedToken>>,
    ) -> Option<Result<Arc<IssuedToken>, BrokerError>> {
        let fresh_for = self.settings.refresh.min_demand_interval;
        match reason {
            Reason::Demand { rejected } => {
                if let Some(c) = current.clone() {
                    if rejected.as_deref() != Some(c.token_id.as_str()) {
                        if c.serves(need_until, fresh_for) {
                            return Some(Ok(c));
                        }
                    } else if f
                        .last_forced
                        .is_some_and(|t| t.elapsed() < self.settings.refresh.min_forced_remint)
                        && c.expires_at > SystemTime::now()
                    {
                        return Some(Ok(c));
                    } else {
                        f.last_forced = Some(Instant::now());
                        self.drop_token(system_id);
                        f.reported = current.take();
                        tracing::info!(message = "Worker reported a rejected token; minting a new one.", system_id = %system_id);
                    }
                }
            }
            Reason::Ahead { token_id } => match current {
                Some(c) if c.token_id == *token_id => {}
                Some(c) => return Some(Ok(c.clone())),
                None => {
                    return Some(Err(BrokerError::Unavailable(
                        "token no longer cached".to_owned(),
                    )))
                }
            },
            // Judged on the record ([`Self::answer_for_reason`]).
            Reason::KeepAlive | Reason::Unsettled => {}
        }
        None
    }

    /// The system's record, if a mint may be tried now: the system is active (a grant found
    /// dead is remembered in `f`) and its stored base URL still passes the egress guard.
    async fn mintable_record(
        &self,
        f: &mut Flight,
        system_id: &str,
    ) -> Result<SystemRecord, BrokerError> {
        let record = match self.get_system(system_id).await {
            Ok(r) => r,
            Err(BrokerError::NotFound(_)) => return Err(self.system_gone(system_id)),
            Err(e) => return Err(e),
        };
        Self::mintable(f, system_id, record, &self.egress)
    }

    /// `record` if a mint may be tried with it: see [`Broker::mintable_record`].
    fn mintable(
        f: &mut Flight,
        system_id: &str,
        record: SystemRecord,
        egress: &crate::backends::egress::EgressPolicy,
    ) -> Result<SystemRecord, BrokerError> {
        f.seen = Some(vendor_view(&record));
        match record.state {
            SystemState::Active => {}
            SystemState::AuthorizationPending => {
                return Err(BrokerError::FailedPrecondition(
                    record.state_message.clone().unwrap_or_else(|| {
                        format!(
                            "system '{system_id}' is waiting for its authorization: run \
                         `credbrokerctl system connect {system_id}`"
                        )
                    }),
                ))
            }
            SystemState::ReauthorizationRequired => {
                let msg = record.state_message.clone().unwrap_or_else(|| {
                    format!("system '{system_id}' needs to be re-authorized by an admin")
                });
                f.dead = Some(msg.clone());
                return Err(BrokerError::FailedPrecondition(msg));
            }
        }
        // Call time: a stored base URL must still pass the egress guard (host names are checked
        // again when the connection is made).
        if let Err(reason) = url::Url::parse(&record.base_url)
            .map_err(|e| e.to_string())
            .and_then(|u| egress.check_url(&u))
        {
            return Err(BrokerError::FailedPrecondition(reason));
        }
        Ok(record)
    }

    /// Takes the replica refresh lock (held for the upstream call, released with the session
    /// if this process dies) and reads the record again under it.
    async fn lock_and_reread(
        &self,
        f: &mut Flight,
        system_id: &str,
    ) -> Result<(Option<crate::store::RefreshLock>, SystemRecord), FreshRead> {
        let wait = self.settings.check_timeout + Duration::from_secs(5);
        let lock = match self.store.lock_refresh(system_id, wait).await {
            Ok(lock) => lock,
            Err(StoreError::Unreachable(e)) => return Err(FreshRead::Down(e)),
            Err(StoreError::Backend(e)) => return Err(FreshRead::Busy(e)),
            Err(e) => return Err(FreshRead::Refused(e.into())),
        };
        let fresh = self.mintable_fresh(f, system_id).await;
        if !matches!(fresh, Err(FreshRead::Down(_))) {
            // The store answered: whatever happens next is not its outage.
            f.store_failures = 0;
            self.cache.end_store_wait(system_id);
        }
        Ok((lock, fresh?))
    }

    /// A refusal kept while the store was away, if `record` (read from the store itself) still
    /// holds the refused credential; any other credential forgets it.
    fn refused_before(f: &mut Flight, record: &SystemRecord) -> Option<(AuthFailure, String)> {
        let (sealed, failure, message) = f.refused.take()?;
        same_sealing(&sealed, &record.sealed_credential).then_some((failure, message))
    }

    /// After the vendor refused `record`'s credential: another path (a rotation, another
    /// replica) may have replaced it meanwhile, so the store itself is read again before the
    /// grant is declared dead. With replicas, an unreachable store is an outage, not a verdict;
    /// any other read error leaves the refusal standing (a store this process owns cannot
    /// change under its flight lock).
    async fn weigh_refusal(
        &self,
        f: &mut Flight,
        system_id: &str,
        record: &SystemRecord,
        oauth: bool,
    ) -> Refusal {
        match self.store.get_system_fresh(system_id).await {
            Ok(Some(fresh))
                if !same_sealing(&fresh.sealed_credential, &record.sealed_credential) =>
            {
                match Self::mintable(f, system_id, fresh, &self.egress) {
                    Ok(fresh) => Refusal::Retry(Box::new(fresh)),
                    Err(e) => Refusal::Fail(e),
                }
            }
            Ok(Some(_)) => Refusal::Stands,
            Ok(None) => Refusal::Fail(self.system_gone(system_id)),
            Err(StoreError::Unreachable(e)) if oauth && self.store.is_shared() => Refusal::Wait(e),
            Err(_) => Refusal::Stands,
        }
    }

    /// A system found deleted: its token and (unless another mint waits) its flight are
    /// dropped, since maps keyed by request data only ever hold existing systems.
    fn system_gone(&self, system_id: &str) -> BrokerError {
        self.drop_token(system_id);
        self.forget_flight_if_idle(system_id, 1);
        BrokerError::NotFound(format!("system '{system_id}' not found"))
    }

    /// The record read again from the store itself under the replica refresh lock (never a
    /// replica's mirror copy, whose refresh token another replica may have spent), if a mint
    /// may still be tried with it.
    async fn mintable_fresh(
        &self,
        f: &mut Flight,
        system_id: &str,
    ) -> Result<SystemRecord, FreshRead> {
        match self.store.get_system_fresh(system_id).await {
            Ok(Some(record)) => {
                Self::mintable(f, system_id, record, &self.egress).map_err(FreshRead::Refused)
            }
            Ok(None) => Err(FreshRead::Refused(self.system_gone(system_id))),
            Err(StoreError::Unreachable(e)) => Err(FreshRead::Down(e)),
            Err(e) => Err(FreshRead::Refused(e.into())),
        }
    }

    /// One call to the backend's token endpoint (under a refresh permit for OAuth), counted.
    async fn issue(
        &self,
        backend: &dyn Backend,
        system_id: &str,
        record: &SystemRecord,
        credential: &Credential,
    ) -> Result<Result<Issued, BackendError>, BrokerError> {
        if !credential.is_oauth()
            && record
                .credential_expires_at
                .is_some_and(|e| e <= unix_now())
        {
            return Err(BrokerError::FailedPrecondition(format!(
                "the credential of system '{system_id}' has expired; rotate in a new one"
            )));
        }
        let permit = if credential.is_oauth() {
            Some(self.cache.permit().await?)
        } else {
            None
        };
        let result = backend
            .issue(&Target {
                system_id: Some(system_id),
                base_url: &record.base_url,
                credential,
            })
            .await;
        drop(permit);
        crate::metrics::METRICS.refresh(
            record.kind,
            match &result {
                Ok(_) => "ok",
                Err(BackendError::Rejected { .. }) => "rejected",
                Err(_) => "transient",
            },
        );
        Ok(result)
    }

    /// A successful mint: a rotated credential is stored first (no token is handed out on a
    /// grant the store does not hold), then the headers are cached (and shared with the other
    /// replicas when a replica refresh lock was taken). `flags` is `(oauth, that lock)`.
    async fn on_issued(
        &self,
        f: &mut Flight,
        system_id: &str,
        mut record: SystemRecord,
        mut issued: Issued,
        need_until: SystemTime,
        (oauth, lock): (bool, Option<&crate::store::RefreshLock>),
    ) -> Result<Arc<IssuedToken>, BrokerError> {
        // The vendor answered: an earlier lost answer is settled (what it issued is kept
        // below, or pending until the store takes it).
        f.unsettled = None;
        let mut shared = lock.is_some();
        let updated = issued
            .updated_credential
            .take()
            .or_else(|| self.pending_for(f, &record));
        // A token that cannot be sent as a header is handed to no one (nor shared), but what
        // the same answer rotated is kept like any other.
        let sendable = issued.headers.iter().all(Header::sendable);
        // With replicas, a rotated credential and the token it brought are written together:
        // one write, one notification.
        let mut shared_with = None;
        if let Some(newcred) = updated {
            let share =
                (shared && sendable && issued.expires_at.is_some()).then(|| Share::of(&issued));
            match self
                .keep_updated(f, system_id, &mut record, newcred, (share, lock))
                .await?
            {
                Kept::Held(with) => shared_with = with,
                // Not shared either: a holder's newer token may be in the record by now.
                Kept::Unlocked => shared = false,
            }
        }
        if !sendable {
            // A vendor fault like any other: back-off, the token still held while it lives,
            // the spell noted on the system.
            let fault = (AuthFailure::UpstreamError, unsendable(record.kind), None);
            let current = self.cached(system_id);
            return self
                .on_transient(f, system_id, &record, current, oauth, fault)
                .await;
        }
        f.failures = 0;
        f.backoff_until = None;
        f.last_failure = None;
        f.reported = None;
        let written = shared_with.is_some();
        let token =
            self.install_with_id(system_id, &record, issued, need_until, oauth, shared_with)?;
        self.note_renewed(&record);
        if shared && !written && !self.share_token(system_id, &token).await {
            self.drop_token(system_id);
            return Err(changed_meanwhile());
        }
        if record.state_message.is_some() || record.refresh_failure.is_some() {
            // A note of an unknown outcome, a spell of failures: settled by this success.
            self.note_refreshed(system_id).await;
        }
        Ok(token)
    }

    /// Stores `newcred`, which the vendor issued for `record`'s credential, with the token
    /// `share` in the same write, before any token of it is handed out; `record` becomes the
    /// record as written. Under a replica refresh lock the write is fenced by it; a lock found
    /// lost sends it down [`Broker::keep_without_lock`].
    async fn keep_updated(
        &self,
        f: &mut Flight,
        system_id: &str,
        record: &mut SystemRecord,
        newcred: Credential,
        (share, lock): (Option<Share>, Option<&crate::store::RefreshLock>),
    ) -> Result<Kept, BrokerError> {
        let fence = lock.and_then(crate::store::RefreshLock::fence);
        let written = self
            .persist_credential(system_id, record, &newcred, (share.as_ref(), fence))
            .await;
        match written {
            Ok(r) if r.credential_version != record.credential_version => {
                // Rotated or reconnected meanwhile (on another replica): nothing was written,
                // and a token of the old credential is not the new one's.
                f.pending = None;
                Err(changed_meanwhile())
            }
            Ok(r) => {
                f.pending = None;
                // The record as this write left it: its own change notice is no news.
                f.seen = Some(vendor_view(&r));
                *record = r;
                Ok(Kept::Held(share.map(|s| s.token_id)))
            }
            Err(Unwritten::LockLost) => {
                self.keep_without_lock(f, system_id, record, newcred)
                    .await?;
                Ok(Kept::Unlocked)
            }
            Err(Unwritten::Failed(e)) => Err(self.keep_refused(f, system_id, record, newcred, &e)),
        }
    }

    /// The store refused `newcred`, which the vendor issued for `record`'s credential: it is
    /// kept in `f` and stored in the background (no token is handed out meanwhile).
    fn keep_refused(
        &self,
        f: &mut Flight,
        system_id: &str,
        record: &SystemRecord,
        newcred: Credential,
        e: &BrokerError,
    ) -> BrokerError {
        tracing::error!(message = "Could not persist a rotated credential; not handing out the new token.", system_id = %system_id, error = %e);
        // A pending credential already kept knows what it replaces (the record may be one this
        // replica cannot open now): that stays the check.
        let first = f.pending.is_none();
        f.pending = Some(Pending {
            version: record.credential_version,
            replaces: self.replaced_by_pending(f, record),
            credential: newcred,
        });
        if first {
            self.store_pending_later(system_id);
        }
        BrokerError::Unavailable(
            "the updated credential (a rotated refresh token or a looked-up site id) could not \
             be saved; retry shortly"
                .to_owned(),
        )
    }

    /// What a credential issued now replaces: the pending one's, if one is kept, else `record`'s.
    fn replaced_by_pending(&self, f: &Flight, record: &SystemRecord) -> Option<[u8; 32]> {
        match &f.pending {
            Some(p) => p.replaces,
            None => self.credential_digest(record),
        }
    }

    /// A credential the vendor issued while this replica's refresh lock was lost (its database
    /// session ended during the call; the fenced write found out): another replica may have
    /// taken the lock since, sent the same credential to the vendor after this one did, and
    /// stored what it got, which the broker then keeps. So `newcred` is stored only while the
    /// record still holds the credential it replaces, the rule of a credential the store
    /// refused ([`Broker::persist_pending`], which also revives a grant marked dead for
    /// presenting that spent credential). A lock holder's fenced write, which compares only the
    /// version, still overwrites it: its call was sent later.
    async fn keep_without_lock(
        &self,
        f: &mut Flight,
        system_id: &str,
        record: &SystemRecord,
        newcred: Credential,
    ) -> Result<(), BrokerError> {
        tracing::warn!(message = "The replica refresh lock was lost during the vendor's call; storing the updated credential only if no other replica stored one since.", system_id = %system_id);
        let p = Pending {
            version: record.credential_version,
            replaces: self.replaced_by_pending(f, record),
            credential: newcred,
        };
        match self.persist_pending(system_id, &p).await {
            Ok(Some(revived)) => {
                f.pending = None;
                if revived {
                    f.clear_remote_state();
                }
                Ok(())
            }
            Ok(None) => {
                f.pending = None;
                dropped_pending(system_id);
                Err(changed_meanwhile())
            }
            Err(BrokerError::NotFound(_)) => {
                f.pending = None;
                Err(self.system_gone(system_id))
            }
            Err(e) => Err(self.keep_refused(f, system_id, record, p.credential, &e)),
        }
    }

    /// The vendor refused the credential: an OAuth grant is dead until an admin reconnects.
    async fn on_rejected(
        &self,
        f: &mut Flight,
        system_id: &str,
        record: &SystemRecord,
        oauth: bool,
        (failure, message): (AuthFailure, String),
    ) -> BrokerError {
        f.pending = None;
        f.reported = None;
        // The vendor's word on the presented token: nothing is left to settle.
        f.unsettled = None;
        f.last_failure = Some(failure);
        self.drop_token(system_id);
        // Kept as the vendor said it (a kept refusal comes back through here).
        let refused = (record.sealed_credential.clone(), failure, message.clone());
        let message = if record.credential_type.is_service_identity() {
            // Nothing is spent by trying again, but only an admin can fix what the vendor
            // refused; a rotation checks first and puts the system back in service.
            format!(
                "{message}; once that is fixed, rotate the credential in again (`credbrokerctl \
                 system rotate {system_id}` with the same flags): it is checked first and the \
                 system serves again"
            )
        } else {
            message
        };
        if oauth {
            tracing::warn!(message = "Grant rejected; system needs re-authorization.", kind = %record.kind, system_id = %system_id, error = %message);
            match self
                .mark_reauthorization_required(system_id, (failure, &message), record)
                .await
            {
                Marked::Dead(stored) => {
                    f.dead = Some(stored.clone());
                    return BrokerError::FailedPrecondition(stored);
                }
                Marked::Replaced => {}
                Marked::Gone => return self.system_gone(system_id),
                // Kept for the next try, after a pause, which marks it with no vendor call.
                Marked::Unrecorded => {
                    f.refused = Some(refused);
                    self.back_off_for_store(f);
                    self.cache.begin_store_wait(system_id);
                }
            }
        }
        BrokerError::FailedPrecondition(message)
    }

    /// One more try that met the shared store away: the next waits longer (jittered, up to
    /// [`STORE_RETRY_MAX`]).
    fn back_off_for_store(&self, f: &mut Flight) -> Duration {
        f.store_failures = f.store_failures.saturating_add(1);
        let delay = self
            .backoff_delay(f.store_failures, None)
            .min(STORE_RETRY_MAX);
        f.backoff_until = Some(Instant::now() + delay);
        delay
    }

    /// What a caller gets while this replica backs off: the cached or reported token while
    /// valid, else UNAVAILABLE.
    fn answer_in_backoff(
        &self,
        f: &mut Flight,
        system_id: &str,
        current: Option<Arc<IssuedToken>>,
        until: Instant,
    ) -> Result<Arc<IssuedToken>, BrokerError> {
        let msg = if f.store_failures > 0 {
            STORE_DOWN_NOTE.to_owned()
        } else {
            "the upstream token endpoint is failing".to_owned()
        };
        let current = self.fallback(f, system_id, current);
        stale_or_unavailable(current, msg, until - Instant::now())
    }

    /// The refresh lock cannot be had now (see [`FreshRead::Busy`]): the cached token serves
    /// while valid and its refresh is tried again shortly (no backoff: nothing failed).
    fn on_lock_busy(
        &self,
        f: &mut Flight,
        system_id: &str,
        current: Option<Arc<IssuedToken>>,
        error: String,
    ) -> Result<Arc<IssuedToken>, BrokerError> {
        tracing::warn!(message = "Token refresh could not take the refresh lock; retrying shortly.", system_id = %system_id, error = %error);
        let current = self.fallback(f, system_id, current);
        if let Some(c) = current
            .as_ref()
            .filter(|c| c.expires_at > SystemTime::now())
        {
            let jitter = rand::Rng::gen_range(&mut rand::thread_rng(), 0..1000u64);
            let again = Instant::now() + Duration::from_millis(1000 + jitter);
            self.schedule_at(system_id, &c.token_id, again);
        }
        stale_or_unavailable(current, error, Duration::from_secs(1))
    }

    /// A refresh met an unreachable shared store before reaching the vendor, or before a
    /// vendor's refusal could be weighed against the stored credential (nothing was spent): the
    /// cached token serves while valid, the refresh is tried again (backing off, jittered, up to
    /// [`STORE_RETRY_MAX`]), and the system's health says why it waits.
    fn on_store_down(
        &self,
        f: &mut Flight,
        system_id: &str,
        current: Option<Arc<IssuedToken>>,
        error: &str,
    ) -> Result<Arc<IssuedToken>, BrokerError> {
        let delay = self.back_off_for_store(f);
        let current = self.fallback(f, system_id, current);
        if self.cache.begin_store_wait(system_id) {
            tracing::warn!(message = "Token refresh waits for the database.", system_id = %system_id, error = %error);
        } else {
            tracing::debug!(message = "Token refresh still waits for the database.", system_id = %system_id, error = %error);
        }
        if let Some(c) = current
            .as_ref()
            .filter(|c| c.expires_at > SystemTime::now())
        {
            self.schedule_at(system_id, &c.token_id, Instant::now() + delay);
        }
        stale_or_unavailable(current, STORE_DOWN_NOTE.to_owned(), delay)
    }

    /// A transient failure: back off (honouring the vendor's `Retry-After`), note an unknown
    /// outcome and, when the call presented a refresh token, settle it ([`Unsettled`]); serve
    /// the cached token while it is still valid.
    async fn on_transient(
        &self,
        f: &mut Flight,
        system_id: &str,
        record: &SystemRecord,
        current: Option<Arc<IssuedToken>>,
        oauth: bool,
        (failure, message, retry_after): (AuthFailure, String, Option<Duration>),
    ) -> Result<Arc<IssuedToken>, BrokerError> {
        f.failures = f.failures.saturating_add(1);
        f.last_failure = Some(failure);
        let unknown = oauth && message.contains(OUTCOME_UNKNOWN_MARK);
        // A spell to settle begins: an unknown outcome for a refresh token not yet being
        // settled, at a vendor with a reuse leeway.
        let begins = (unknown
            && presents_refresh_token(record.credential_type)
            && !f
                .unsettled
                .as_ref()
                .is_some_and(|u| same_sealing(&u.presented, &record.sealed_credential)))
        .then(|| self.registry.get(record.kind).ok()?.reuse_leeway())
        .flatten();
        if let Some(window) = begins {
            f.unsettled = Some(Unsettled {
                since: Instant::now(),
                window,
                presented: record.sealed_credential.clone(),
            });
        }
        let mut delay = self.backoff_delay(f.failures, retry_after);
        if f.unsettled.is_some() {
            delay = delay.min(UNSETTLED_RETRY_MAX);
        }
        f.backoff_until = Some(Instant::now() + delay);
        let current = self.fallback(f, system_id, current);
        tracing::warn!(message = "Token refresh failed; backing off.", kind = %record.kind, system_id = %system_id, error = %message, retry_in_ms = delay.as_millis() as u64);
        if let Some(me) = self
            .me
            .upgrade()
            .filter(|_| record.refresh_failure.is_none())
        {
            // The start of a spell (written once, not per attempt): the system is degraded.
            // Written aside, so callers waiting for the cached token never wait on the store.
            // Tracked with the exchanges: a stop waits for it.
            let (id, message) = (system_id.to_owned(), message.clone());
            self.exchanges.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(3), async {
                    // A refresh that succeeded meanwhile ended the spell: nothing to mark.
                    if me.last_failure(&id).await.is_some() {
                        me.note_refresh_failure(&id, failure, &message).await;
                    }
                })
                .await;
            });
        }
        if begins.is_some() {
            self.schedule_at(system_id, UNSETTLED_MARK, Instant::now() + delay);
        }
        if unknown {
            // The request reached the vendor, the answer did not reach us: the
            // vendor may have rotated the refresh token. The stored one is presented
            // again soon (Atlassian's reuse leeway exists for exactly this).
            let note = format!(
                "the last token refresh timed out after it was sent, so its outcome \
                 is unknown; the broker retries with the stored refresh token in {} s \
                 (vendors with a reuse leeway accept it); if the vendor refuses it, \
                 reconnect the system",
                delay.as_secs().max(1)
            );
            self.note_state_message(system_id, Some(note)).await;
        }
        if let Some(c) = current
            .as_ref()
            .filter(|c| c.expires_at > SystemTime::now())
        {
            self.schedule_at(system_id, &c.token_id, Instant::now() + delay);
        }
        stale_or_unavailable(current, message, delay)
    }

    /// Presents the stored refresh token again ([`Unsettled`]; the refresher runs this for an
    /// [`UNSETTLED_MARK`] entry, so a stop ends it), and schedules the next try when the
    /// outcome is still unknown: when that try's backoff ends, at least
    /// [`UNSETTLED_RETRY_MIN`] from now.
    async fn present_again(self: Arc<Self>, system_id: String) {
        // A system deleted meanwhile has no flight any more (none is made for it), and one
        // settled meanwhile has nothing to present.
        let Some(flight) = self.cache.existing_flight(&system_id) else {
            return;
        };
        if flight.lock().await.unsettled.is_none() {
            return;
        }
        tracing::info!(message = "Presenting the stored refresh token again after a refresh whose outcome is unknown.", system_id = %system_id);
        let _ = self
            .mint_detached(&system_id, SystemTime::now(), Reason::Unsettled)
            .await;
        let mut f = flight.lock().await;
        let Some(u) = f.unsettled.as_ref() else {
            return;
        };
        if u.since.elapsed() >= u.window || f.dead.is_some() {
            f.unsettled = None;
            return;
        }
        let soonest = Instant::now() + UNSETTLED_RETRY_MIN;
        let at = f.backoff_until.map_or(soonest, |until| until.max(soonest));
        self.schedule_at(&system_id, UNSETTLED_MARK, at);
    }

    /// Caches freshly issued headers (and schedules their refresh) and returns them.
    pub(crate) fn install(
        &self,
        system_id: &str,
        record: &SystemRecord,
        issued: Issued,
        need_until: SystemTime,
        refreshable: bool,
    ) -> Result<Arc<IssuedToken>, BrokerError> {
        self.install_with_id(system_id, record, issued, need_until, refreshable, None)
    }

    /// [`Broker::install`] keeping a given token id (a token another replica issued).
    fn install_with_id(
        &self,
        system_id: &str,
        record: &SystemRecord,
        issued: Issued,
        need_until: SystemTime,
        refreshable: bool,
        token_id: Option<String>,
    ) -> Result<Arc<IssuedToken>, BrokerError> {
        // Every way in (a mint, a connect's exchange, a registration's check, another replica's
        // share) passes here: a value that cannot be sent as a header is handed to no one.
        if issued.headers.is_empty() || !issued.headers.iter().all(Header::sendable) {
            return Err(BrokerError::Unavailable(unsendable(record.kind)));
        }
        // New headers (minted, adopted from another replica, after a rotation): no wait is left.
        self.cache.end_store_wait(system_id);
        let now = SystemTime::now();
        let expires_at = match issued.expires_at {
            Some(e) => e,
            None => {
                let want = need_until.duration_since(now).unwrap_or_default();
                let mut e = now + self.settings.static_header_ttl.max(want);
                if let Some(cred_exp) = record.credential_expires_at {
                    e = e.min(SystemTime::UNIX_EPOCH + Duration::from_secs(cred_exp));
                }
                if e < need_until {
                    return Err(BrokerError::FailedPrecondition(format!(
                        "system '{system_id}' cannot provide headers valid that long (the \
                         credential expires sooner)"
                    )));
                }
                e
            }
        };
        let token_id = token_id.unwrap_or_else(crate::util::random::url_token::<12>);
        let token = Arc::new(IssuedToken {
            headers: issued.headers,
            expires_at,
            api_base_url: issued.api_base_url,
            credential_version: record.credential_version,
            kind: record.kind,
            delivery: record.delivery,
            token_id,
            refreshable,
            subject: issued.subject,
            used: AtomicBool::new(false),
            minted_at: Instant::now(),
            lifetime: expires_at.duration_since(now).unwrap_or_default(),
            audit_hmac: std::sync::OnceLock::new(),
            upstream_base: std::sync::OnceLock::new(),
            answer: std::sync::OnceLock::new(),
        });
        self.cache.insert(system_id, token.clone());
        if refreshable {
            let lifetime = token.lifetime;
            let margin = lifetime
                .mul_f64(self.settings.refresh.ahead_fraction)
                .max(self.settings.refresh.ahead_min.min(lifetime / 2));
            self.schedule_at(
                system_id,
                &token.token_id,
                Instant::now() + lifetime.saturating_sub(margin),
            );
        }
        Ok(token)
    }

    /// Caches the token another replica shared in `record`, while it is valid and the system
    /// active.
    pub(crate) fn adopt_shared_token(&self, system_id: &str, record: &SystemRecord) {
        if record.state == SystemState::Active {
            let ask = (SystemTime::now(), &Reason::Demand { rejected: None }, None);
            let _ = self.answer_from_record(system_id, record, ask);
        }
    }

    /// A keep-alive's answer, judged again on `record` (read under the system's lock): none
    /// while the grant is still due; else the cached token if it is still valid. A grant that a
    /// refresh renewed since the sweep read it (a worker's, another replica's) is not
    /// refreshed again, and a keep-alive never adopts an access token, which would not renew
    /// the grant.
    fn keepalive_answer(
        &self,
        system_id: &str,
        record: &SystemRecord,
        current: Option<&Arc<IssuedToken>>,
    ) -> Option<Result<Arc<IssuedToken>, BrokerError>> {
        if self.keepalive_due(record) {
            return None;
        }
        tracing::info!(message = "The idle grant is not due any more (refreshed or replaced meanwhile); not refreshed.", system_id = %system_id);
        let valid = current
            .filter(|c| c.expires_at > SystemTime::now())
            .cloned();
        let not_due = "not due any more: the grant was refreshed or replaced meanwhile";
        Some(valid.ok_or(BrokerError::Unavailable(not_due.to_owned())))
    }

    /// What another replica's work, as `record` shows it, answers without a refresh (`ask`:
    /// until when the token must serve, why the mint runs, the cached token): a keep-alive as
    /// [`Self::keepalive_answer`]; any other mint takes the token another replica stored if it
    /// serves, installed in the cache under its own token id.
    fn answer_from_record(
        &self,
        system_id: &str,
        record: &SystemRecord,
        (need_until, reason, current): (SystemTime, &Reason, Option<&Arc<IssuedToken>>),
    ) -> Option<Result<Arc<IssuedToken>, BrokerError>> {
        if matches!(reason, Reason::KeepAlive) {
            return self.keepalive_answer(system_id, record, current);
        }
        if matches!(reason, Reason::Unsettled) {
            // Another replica's access token settles nothing: only another credential does
            // (judged in `mint_locked`).
            return None;
        }
        let shared = record.shared_token.as_ref()?;
        let expires = SystemTime::UNIX_EPOCH + Duration::from_millis(shared.expires_at_ms);
        if expires < need_until {
            return None;
        }
        match reason {
            Reason::Demand { rejected: Some(id) } if *id == shared.token_id => return None,
            Reason::Ahead { .. } if current.is_some_and(|c| c.expires_at >= expires) => {
                return None
            }
            _ => {}
        }
        if current.is_some_and(|c| c.token_id == shared.token_id) {
            return None;
        }
        let plain = read(&self.keyring)
            .open(&shared_binding(system_id, record), &shared.sealed)
            .ok()?;
        let payload: SharedPayload = serde_json::from_slice(&plain).ok()?;
        let headers = payload
            .headers
            .into_iter()
            .filter_map(|(name, value)| {
                let name = crate::backends::known_header_name(&name)?;
                Some(Header {
                    name,
                    value: SecretString::new(value),
                })
            })
            .collect();
        let issued = Issued {
            headers,
            expires_at: Some(expires),
            api_base_url: payload.api_base_url,
            updated_credential: None,
            subject: payload.subject,
        };
        tracing::debug!(message = "Using the token another replica refreshed.", system_id = %system_id);
        self.install_with_id(
            system_id,
            record,
            issued,
            need_until,
            true,
            Some(shared.token_id.clone()),
        )
        .ok()
        .map(Ok)
    }

    /// Stores `token` sealed in the system's record for the other replicas.
    /// False when the credential was rotated or reconnected meanwhile (nothing shared: the
    /// token is the old credential's).
    async fn share_token(&self, system_id: &str, token: &IssuedToken) -> bool {
        let share = Share::new(
            &token.headers,
            &token.api_base_url,
            &token.subject,
            Some(token.expires_at),
            token.token_id.clone(),
        );
        let shared = self
            .modify_system(system_id, Retry::Quick, |current| {
                if current.credential_version != token.credential_version {
                    // Rotated or reconnected meanwhile (on another replica): a token of the
                    // old credential must not be handed out as the new one's.
                    return Ok(None);
                }
                let mut updated = current.clone();
                updated.shared_token = share.sealed(self, system_id, current);
                Ok(Some(updated))
            })
            .await;
        match shared {
            Ok(Modified::Unchanged(_)) => false,
            Ok(Modified::Written(_)) => true,
            Err(e) => {
                tracing::warn!(message = "Could not share a refreshed token with the other replicas.", system_id = %system_id, error = %e);
                true
            }
        }
    }

    /// Keeps trying, in the background, to store the credential the vendor issued and the store
    /// refused (a rotated refresh token lives only in this process meanwhile), without asking
    /// the vendor again: until it is stored, or made moot by another version or a deletion.
    fn store_pending_later(&self, system_id: &str) {
        let (me, id) = (self.me.clone(), system_id.to_owned());
        tokio::spawn(async move {
            let mut wait = Duration::from_secs(1);
            loop {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
                let Some(broker) = me.upgrade() else { return };
                if broker.try_store_pending(&id).await {
                    return;
                }
            }
        });
    }

    /// One try of [`Self::store_pending_later`]: true once nothing is left to store.
    async fn try_store_pending(&self, system_id: &str) -> bool {
        // A system deleted meanwhile has no flight any more: nothing to store.
        let Some(flight) = self.cache.existing_flight(system_id) else {
            return true;
        };
        let mut f = flight.lock().await;
        self.store_pending(system_id, &mut f).await
    }

    /// [`Self::try_store_pending`] under the system's single-flight lock (`f`).
    async fn store_pending(&self, system_id: &str, f: &mut Flight) -> bool {
        let Some(p) = f.pending.take() else {
            return true;
        };
        match self.persist_pending(system_id, &p).await {
            Ok(Some(revived)) => {
                if revived {
                    // This replica may have read the mark meanwhile; no change notice of its
                    // own write comes to tell it.
                    f.clear_remote_state();
                }
                tracing::info!(message = "Stored the updated credential the store refused before.", system_id = %system_id, revived = revived);
                true
            }
            Ok(None) => {
                dropped_pending(system_id);
                true
            }
            Err(BrokerError::NotFound(_)) => true,
            Err(_) => {
                f.pending = Some(p);
                false
            }
        }
    }

    /// Stores `p` while the stored record still holds the credential it replaces (checked on
    /// every attempt: this path holds no refresh lock, so another replica may store its own
    /// meanwhile); `Some(true)` when that also put the system back in service. A record marked
    /// for re-authorization with that very credential, because the vendor refused the grant
    /// (`invalid_grant`), is revived: the mark came from a replica that presented the refresh
    /// token this one had already spent, and `p` holds the grant's live one (if the user revoked
    /// the grant, its next refresh finds out and marks it again). A refused client, an inactive
    /// user or a misconfigured app is no such mark and stays.
    async fn persist_pending(
        &self,
        system_id: &str,
        p: &Pending,
    ) -> Result<Option<bool>, BrokerError> {
        // Sealed once: every attempt writes this sealing (on the primary key of the moment), so
        // one found stored (re-wrapped or not) is an attempt that landed though its answer was
        // lost; `revived` is whether the last attempt that wrote revived the grant.
        let mut ours = vec![self.seal(system_id, p.version, &p.credential)?];
        let mut revived = false;
        let modified = self
            .modify_system(system_id, Retry::Persist, |current| {
                // A credential this replica cannot open yet (its keys behind another's
                // rotation) is an error, not another credential: `p` is kept.
                if is_ours(&ours, &current.sealed_credential) || !self.still_replaces(p, current)? {
                    return Ok(None);
                }
                revived = revivable(current);
                let mut updated = current.clone();
                updated.sealed_credential =
                    self.sealing_for_attempt(&mut ours, system_id, p.version, &p.credential)?;
                updated.credential_expires_at = p.credential.expires_at();
                if revived {
                    updated.state = SystemState::Active;
                    updated.state_message = None;
                    updated.refresh_failure = None;
                    updated.updated_at = unix_now();
                }
                Ok(Some(updated))
            })
            .await?;
        Ok(match modified {
            Modified::Written(_) => Some(revived),
            Modified::Unchanged(r) if is_ours(&ours, &r.sealed_credential) => Some(revived),
            Modified::Unchanged(_) => None,
        })
    }

    /// Seals and durably stores an upstream-updated credential under the same version; under
    /// a replica refresh lock, fenced by it (written only while the lock is held, else
    /// [`Unwritten::LockLost`]).
    async fn persist_credential(
        &self,
        system_id: &str,
        used: &SystemRecord,
        credential: &Credential,
        (share, fence): (Option<&Share>, Option<crate::store::Fence>),
    ) -> Result<SystemRecord, Unwritten> {
        let modified = self
            .modify_system_under(system_id, Retry::Persist, fence, |current| {
                if current.credential_version != used.credential_version {
                    // An admin rotated the credential meanwhile: theirs wins.
                    return Ok(None);
                }
                let mut updated = current.clone();
                updated.sealed_credential =
                    self.seal(system_id, current.credential_version, credential)?;
                updated.credential_expires_at = credential.expires_at();
                if let Some(share) = share {
                    updated.shared_token = share.sealed(self, system_id, current);
                }
                Ok(Some(updated))
            })
            .await?;
        match modified {
            Modified::Written(r) | Modified::Unchanged(r) => Ok(r),
        }
    }

    /// Sets (or clears) an active system's `state_message`; best effort.
    /// A refresh succeeded: clears an unknown-outcome note and a spell of failures.
    async fn note_refreshed(&self, system_id: &str) {
        let _ = self
            .update_system_with(system_id, |r| {
                if r.state != SystemState::Active {
                    // Marked meanwhile: the mark's message and failure class stay.
                    return false;
                }
                let note = r.state_message.take().is_some();
                note | r.refresh_failure.take().is_some()
            })
            .await;
    }

    async fn note_refresh_failure(&self, system_id: &str, failure: AuthFailure, message: &str) {
        let _ = self
            .update_system_with(system_id, |r| {
                if r.refresh_failure.is_some() || r.state != SystemState::Active {
                    return false;
                }
                r.refresh_failure = Some(crate::model::RefreshFailure {
                    failure,
                    message: message.to_owned(),
                    since: unix_now(),
                });
                true
            })
            .await;
    }

    async fn note_state_message(&self, system_id: &str, message: Option<String>) {
        let _ = self
            .update_system_with(system_id, |r| {
                let change = r.state == SystemState::Active && r.state_message != message;
                r.state_message.clone_from(&message);
                change
            })
            .await;
    }

    /// Marks the system for re-authorization after `refused`'s credential was refused, unless
    /// another credential is stored now; emits the event once.
    async fn mark_reauthorization_required(
        &self,
        system_id: &str,
        (failure, message): (AuthFailure, &str),
        refused: &SystemRecord,
    ) -> Marked {
        let marked = self
            .modify_system(system_id, Retry::Quick, |current| {
                if !same_sealing(&current.sealed_credential, &refused.sealed_credential) {
                    // A new credential arrived meanwhile (a rotation, a re-connection): the
                    // refusal was for the old one.
                    return Ok(None);
                }
                if current.state == SystemState::ReauthorizationRequired {
                    // Already marked (by another replica, or a racing refusal): no second event.
                    return Ok(None);
                }
                let mut r = current.clone();
                r.state = SystemState::ReauthorizationRequired;
                r.state_message = Some(message.to_owned());
                r.updated_at = unix_now();
                // Why, for a revival (see `persist_pending`): only a refused grant is revived.
                r.refresh_failure = Some(crate::model::RefreshFailure {
                    failure,
                    message: message.to_owned(),
                    since: r.updated_at,
                });
                Ok(Some(r))
            })
            .await;
        match marked {
            Ok(Modified::Written(r)) => {
                self.emit(
                    crate::broker::events::EventType::ReauthorizationRequired,
                    &r,
                    message,
                );
                Marked::Dead(message.to_owned())
            }
            Ok(Modified::Unchanged(r))
                if !same_sealing(&r.sealed_credential, &refused.sealed_credential) =>
            {
                Marked::Replaced
            }
            // Marked already (another replica's words, which every replica then repeats).
            Ok(Modified::Unchanged(r)) => {
                Marked::Dead(r.state_message.unwrap_or_else(|| message.to_owned()))
            }
            Err(BrokerError::NotFound(_)) => Marked::Gone,
            Err(e) => {
                tracing::warn!(message = "Could not record the re-authorization state.", system_id = %system_id, error = %e);
                if matches!(e, BrokerError::Unavailable(_)) && self.store.is_shared() {
                    Marked::Unrecorded
                } else {
                    Marked::Dead(message.to_owned())
                }
            }
        }
    }

    fn backoff_delay(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        let s = &self.settings.refresh;
        let exp = s
            .retry_base
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
            .min(s.retry_max);
        let jittered = exp.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
        match retry_after {
            Some(r) => jittered.max(r.min(s.retry_after_cap)),
            None => jittered,
        }
    }

    fn schedule_at(&self, system_id: &str, token_id: &str, at: Instant) {
        self.cache.schedule_at(system_id, token_id, at);
    }

    /// Starts the background refresher.
    pub fn start_refresher(self: &Arc<Self>) -> Refresher {
        let (stop, rx) = watch::channel(false);
        let me = self.clone();
        let task = tokio::spawn(async move { me.refresh_loop(rx).await });
        Refresher { stop, task }
    }

    async fn refresh_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tasks = JoinSet::new();
        let mut keepalive = tokio::time::interval(self.settings.keepalive_interval);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = self.cache.next_due();
            let sleep = async move {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = sleep => {}
                _ = self.cache.scheduled.notified() => {}
                _ = stop.changed() => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = keepalive.tick() => self.keepalive_sweep(&mut tasks).await,
            }
            for (_, system_id, token_id) in self.cache.take_due(Instant::now()) {
                if token_id == UNSETTLED_MARK {
                    tasks.spawn(self.clone().present_again(system_id));
                    continue;
                }
                let Some(current) = self.cached(&system_id) else {
                    continue;
                };
                // Only tokens workers use are renewed ahead; idle ones lapse.
                if current.token_id != token_id || !current.used.load(Ordering::Relaxed) {
                    continue;
                }
                let me = self.clone();
                tasks.spawn(async move {
                    let _ = me
                        .mint_detached(&system_id, SystemTime::now(), Reason::Ahead { token_id })
                        .await;
                });
            }
        }
        tasks.shutdown().await;
    }
}

impl Broker {
    /// True while this process leads the sweep: always on a store of its own; with replicas,
    /// one at a time (another takes over within a sweep interval when it dies).
    async fn leads_sweep(&self) -> bool {
        let mut lead = self.sweep_lead.lock().await;
        if lead.as_ref().is_some_and(|l| !l.is_lost()) {
            return true;
        }
        *lead = self.store.try_lead("sweep").await.ok().flatten();
        lead.is_some()
    }

    /// True while this process still holds the sweep's lead (a paced batch stops when not).
    pub(crate) async fn still_leads(&self) -> bool {
        self.sweep_lead
            .lock()
            .await
            .as_ref()
            .is_some_and(|l| !l.is_lost())
    }

    /// Whether `r` is an idle authorization-code grant whose refresh token dies within the
    /// keep-alive margin and that no refresh renewed lately (see [`KeptAlive`]): the sweep
    /// refreshes it. A grant found renewed since it was noted is noted again.
    fn keepalive_due(&self, r: &SystemRecord) -> bool {
        let now = unix_now();
        let horizon = now.saturating_add(self.settings.keepalive_margin.as_secs());
        let Some(end) = r.credential_expires_at.filter(|end| *end <= horizon) else {
            return false;
        };
        if r.state != SystemState::Active
            || r.credential_type != crate::model::CredentialType::OAuthAuthorizationCode
        {
            return false;
        }
        // Refreshed before the health calls it a horizon (the sweep failed to push it back),
        // with two sweeps to spare, whatever was noted.
        let sweeps = self.settings.keepalive_interval.saturating_mul(2);
        let spare = sweeps.max(Duration::from_secs(3600)).as_secs();
        let soon = crate::broker::health::IDLE_GRANT_ALERT_SECS.saturating_add(spare);
        let mut kept = lock(&self.kept_alive);
        match keepalive_verdict(kept.get(&r.system_id).copied(), end, now, soon) {
            Verdict::Due => true,
            Verdict::NotDue => false,
            Verdict::Renewed => {
                kept.insert(r.system_id.clone(), KeptAlive { since: now, end });
                false
            }
        }
    }

    /// Notes a refresh of an authorization-code grant that went through (whatever asked for
    /// it): from now, the end its refresh token has (see [`KeptAlive`]).
    fn note_renewed(&self, record: &SystemRecord) {
        let code = crate::model::CredentialType::OAuthAuthorizationCode;
        if let Some(end) = record
            .credential_expires_at
            .filter(|_| record.credential_type == code)
        {
            let since = unix_now();
            lock(&self.kept_alive).insert(record.system_id.clone(), KeptAlive { since, end });
        }
    }

    /// Refreshes idle authorization-code grants whose refresh token would die within the
    /// keep-alive margin (Atlassian: 90 days unused; Zendesk: the refresh-token lifetime), so an
    /// unused system does not die quietly; starts the scheduled checks that are due, and writes
    /// the health that time alone changed (a horizon closer, a degraded spell over).
    async fn keepalive_sweep(self: &Arc<Self>, tasks: &mut JoinSet<()>) {
        // What is past its end or beyond the margin is judged by the margin alone again (pruned
        // by every replica: each notes its own refreshes, the leader or not).
        let now = unix_now();
        let horizon = now.saturating_add(self.settings.keepalive_margin.as_secs());
        lock(&self.kept_alive).retain(|_, k| now < k.end && k.end <= horizon);
        if !self.leads_sweep().await {
            return;
        }
        let mut pages = self.system_pages(SCAN_PAGE);
        let mut due = crate::broker::schedule::Due::default();
        loop {
            let page = match pages.next().await {
                Ok(Some(p)) => p,
                Ok(None) => {
                    self.schedule_checks(due, tasks);
                    return;
                }
                Err(e) => {
                    tracing::warn!(message = "Keep-alive sweep could not list systems.", error = %e);
                    return;
                }
            };
            let now = unix_now();
            due.collect(&page, now, self.settings.check_interval.as_secs());
            // Time alone moved a horizon or ended a degraded spell: write the new health (the
            // write announces it), one record after another.
            let stale: Vec<String> = page
                .iter()
                .filter(|r| crate::broker::health::is_stale(r, now))
                .map(|r| r.system_id.clone())
                .collect();
            if !stale.is_empty() {
                let me = self.clone();
                tasks.spawn(async move {
                    for id in stale {
                        let _ = me
                            .update_system_with(&id, |r| {
                                crate::broker::health::is_stale(r, unix_now())
                            })
                            .await;
                    }
                });
            }
            for r in &page {
                if self.keepalive_due(r) {
                    let me = self.clone();
                    let id = r.system_id.clone();
                    tracing::info!(message = "Keeping an idle grant alive.", system_id = %id);
                    tasks.spawn(async move {
                        let _ = me
                            .mint_detached(&id, SystemTime::now(), Reason::KeepAlive)
                            .await;
                    });
                }
            }
        }
    }
}

/// What the keep-alive sweep knows of a grant's refresh token: the end it last saw, and since
/// when (a refresh that went through on this broker, or the sweep that found the end moved on:
/// another replica's refresh). A refresh token whose lifespan is no longer than the margin
/// (Zendesk's shortest, 7 days, is the default margin) is within the margin again right after
/// every refresh, and one the vendor does not renew keeps its end: judged by the margin alone,
/// either would be refreshed at every sweep (hourly), and each Zendesk refresh revokes the
/// access token workers hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeptAlive {
    since: u64,
    end: u64,
}

/// The keep-alive's verdict on a grant within the margin.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Due,
    NotDue,
    /// Renewed since it was noted (a worker's refresh, another replica's, a reconnect): not
    /// idle; noted again from now.
    Renewed,
}

/// The verdict on a grant whose refresh token ends at `end`, `noted` as the sweep last knew it:
/// due when first seen, when its end moved earlier, once half the time from `since` to its
/// end has gone (or the clock went back before `since`), and always within `soon` of its end
/// (a lifespan that short is refreshed at every sweep, as the margin alone would).
fn keepalive_verdict(noted: Option<KeptAlive>, end: u64, now: u64, soon: u64) -> Verdict {
    if end.saturating_sub(now) <= soon {
        return Verdict::Due;
    }
    match noted {
        Some(k) if end > k.end => Verdict::Renewed,
        Some(k) if end == k.end => {
            let halfway = k.since + end.saturating_sub(k.since) / 2;
            if k.since <= now && now < halfway {
                Verdict::NotDue
            } else {
                Verdict::Due
            }
        }
        _ => Verdict::Due,
    }
}

/// Why a refresh waits while the shared store is unreachable.
pub(crate) const STORE_DOWN_NOTE: &str =
    "the database is unreachable, and a refreshed token is stored \
     before it is handed out, so the refresh waits for the database";
/// The longest a refresh that met an unreachable store waits before it tries the store again.
const STORE_RETRY_MAX: Duration = Duration::from_secs(30);

/// How [`Broker::keep_updated`] stored a credential.
enum Kept {
    /// Under the refresh lock (or with none to take), with the id of the token shared in the
    /// same write, if one was.
    Held(Option<String>),
    /// After the refresh lock was lost: under the pending credential's rule, nothing shared.
    Unlocked,
}

/// Whether `lock` (a replica refresh lock taken for a vendor call) was lost meanwhile.
async fn lost(lock: Option<&crate::store::RefreshLock>) -> bool {
    match lock {
        Some(l) => !l.still_held().await,
        None => false,
    }
}

/// A refresh that lost its replica refresh lock and must not go on without it.
fn lock_lost() -> BrokerError {
    BrokerError::Unavailable(
        "this replica lost the system's refresh lock (its database session ended); retry"
            .to_owned(),
    )
}

/// A mint whose credential was rotated or reconnected while the vendor answered.
fn changed_meanwhile() -> BrokerError {
    BrokerError::Unavailable(
        "the credential was rotated or reconnected meanwhile; retry for a token of the new one"
            .to_owned(),
    )
}

/// SHA-256 of a credential's JSON.
fn credential_digest(c: &Credential) -> Option<[u8; 32]> {
    use sha2::Digest;
    let json = zeroize::Zeroizing::new(serde_json::to_vec(c).ok()?);
    Some(sha2::Sha256::digest(json.as_slice()).into())
}

/// Whether `r` was marked for re-authorization because the vendor refused its grant (what
/// presenting a refresh token another replica already spent earns).
fn revivable(r: &SystemRecord) -> bool {
    r.state == SystemState::ReauthorizationRequired
        && r.refresh_failure
            .as_ref()
            .is_some_and(|f| f.failure == AuthFailure::ReauthorizationRequired)
}

fn dropped_pending(system_id: &str) {
    tracing::warn!(message = "Dropped an updated credential the store had refused: another one is stored now.", system_id = %system_id);
}

/// What of a record the vendor's answers are about: its state, delivery, sealed credential and
/// the token another replica shared (SHA-256 over them). A new credential, a re-connection, a
/// delivery switch or a token minted elsewhere changes it; a note, a health check, a 401 count
/// or a re-wrap under another key (only the credential's data ciphertext counts) does not.
pub(crate) fn vendor_view(record: &SystemRecord) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update([record.state as u8, record.delivery as u8]);
    let data = crate::crypto::sealed_data(&record.sealed_credential);
    let sealing = data.unwrap_or(&record.sealed_credential);
    h.update([u8::from(data.is_some())]);
    h.update((sealing.len() as u64).to_be_bytes());
    h.update(sealing);
    if let Some(t) = &record.shared_token {
        h.update(&t.sealed);
    }
    h.finalize().into()
}

/// Whether credentials of type `t` hold a refresh token (one a vendor may turn over).
fn presents_refresh_token(t: crate::model::CredentialType) -> bool {
    use crate::model::CredentialType as C;
    matches!(t, C::OAuthRefreshToken | C::OAuthAuthorizationCode)
}

/// Whether `record` settles `f`'s unknown outcome without presenting anything: another
/// credential is stored (a refresh here or on another replica went through, an admin
/// reconnected), or the window has passed. Forgets it then.
fn settled_by(f: &mut Flight, record: &SystemRecord) -> bool {
    let Some(u) = f.unsettled.as_ref() else {
        return true;
    };
    let done =
        !same_sealing(&u.presented, &record.sealed_credential) || u.since.elapsed() >= u.window;
    if done {
        f.unsettled = None;
    }
    done
}

/// The answer to a settling try that had nothing to present: the cached token while valid.
fn settled(current: Option<&Arc<IssuedToken>>) -> Result<Arc<IssuedToken>, BrokerError> {
    current
        .filter(|c| c.expires_at > SystemTime::now())
        .cloned()
        .ok_or_else(|| BrokerError::Unavailable("the refresh's outcome is settled".to_owned()))
}

fn stale_or_unavailable(
    current: Option<Arc<IssuedToken>>,
    message: String,
    retry_in: Duration,
) -> Result<Arc<IssuedToken>, BrokerError> {
    match current {
        Some(c) if c.expires_at > SystemTime::now() => Ok(c),
        _ => Err(BrokerError::Unavailable(format!(
            "{message}; no valid token is cached; the broker retries in {} s",
            retry_in.as_secs().max(1)
        ))),
    }
}

/// Why a vendor's token is not handed out (its content never appears).
fn unsendable(kind: crate::model::SystemKind) -> String {
    format!(
        "{} issued a token that cannot be sent as an HTTP header (empty, control or \
         non-ASCII characters, or over {} KiB); retrying later",
        kind.display_name(),
        crate::backends::MAX_HEADER_VALUE / 1024
    )
}

#[cfg(test)]
#[path = "tokens_tests.rs"]
mod tests;
