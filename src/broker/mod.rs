//! The domain core: registration, checks, rotation, callers. Token issue and caching live in
//! [`crate::broker::tokens`].
//!
//! It depends only on the [`CredentialStore`] trait, the [`Keyring`] and the backend
//! [`Registry`]; no proto or HTTP types appear here.

pub mod backup;
pub mod callers;
pub mod connect;
pub mod events;
pub mod health;
pub mod keys;
pub mod proxy;
pub mod quota;
pub mod schedule;
pub mod tokens;
pub mod watch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use crate::audit::{Audit, AuditConfig, AuditEvent};
use crate::backends::{Backend, EgressPolicy, Issued, Registry, Target};
use crate::broker::callers::is_admin_token;
pub use crate::broker::callers::{AuthRefusal, Caller, CallerScope, Callers, Presented};
use crate::broker::connect::PendingAuthorization;
use crate::broker::tokens::{RefreshSettings, TokenCache};
use crate::crypto::{Keyring, RecordBinding};
use crate::error::BrokerError;
use crate::model::{
    unix_now, AuthCheck, AuthFailure, Credential, CredentialType, Delivery, Role, SystemKind,
    SystemRecord, SystemState,
};
use crate::secret::SecretString;
use crate::store::{CredentialStore, StoreError, STORE_FORMAT_VERSION};
use crate::util::sync::read;

/// How [`Broker::modify_system`] retries a write that lost a race or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Three attempts back to back: best-effort notes and counters.
    Quick,
    /// Up to ten attempts, paced with jitter (about a second in all): a write the vendor's
    /// state already depends on (a rotated refresh token), where every conflict means another
    /// writer made progress.
    Persist,
}

impl Retry {
    fn attempts(self) -> u32 {
        match self {
            Self::Quick => 3,
            Self::Persist => 10,
        }
    }

    /// The wait before attempt `n` (from 2).
    fn pause(self, n: u32) -> Option<Duration> {
        match self {
            Self::Quick => None,
            Self::Persist => {
                let base = 20 * u64::from(n.min(8));
                let jitter = rand::Rng::gen_range(&mut rand::thread_rng(), 0..20u64);
                Some(Duration::from_millis(base + jitter))
            }
        }
    }
}

/// What [`Broker::modify_system`] did.
pub(crate) enum Modified {
    /// The change was written; the record as stored now.
    Written(SystemRecord),
    /// Nothing to write; the record as it is.
    Unchanged(SystemRecord),
}

/// Why [`Broker::modify_system_under`] wrote nothing.
pub(crate) enum Unwritten {
    /// The refresh lock fencing the write was lost (its database session ended).
    LockLost,
    /// Any other failure.
    Failed(BrokerError),
}

impl Unwritten {
    fn into_error(self) -> BrokerError {
        match self {
            Unwritten::LockLost => StoreError::LockLost.into(),
            Unwritten::Failed(e) => e,
        }
    }
}

/// How long the last audit lines may take to be written at shutdown.
const AUDIT_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// The least time between two counts of the systems for `/metrics`.
const COUNT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// The longest one count of the systems for `/metrics` may take.
const COUNT_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

/// A count of the systems for `/metrics`, and when it started.
struct Counted {
    started: tokio::time::Instant,
    counts: Option<crate::metrics::SystemCounts>,
}

/// Systems read per page by the broker's own scans (checks, keys, keep-alive).
pub const SCAN_PAGE: usize = 500;

/// Every stored system in id order, one page at a time: the one paged scan of the store. The
/// last page may be short or empty (an empty store yields one empty page).
pub(crate) struct SystemPages<'a> {
    store: &'a dyn CredentialStore,
    page_size: usize,
    after: Option<String>,
    done: bool,
}

impl SystemPages<'_> {
    /// The next page, or `None` after the last one.
    pub(crate) async fn next(&mut self) -> Result<Option<Vec<SystemRecord>>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let page = self
            .store
            .list_systems(self.after.as_deref(), self.page_size)
            .await?;
        self.done = page.len() < self.page_size;
        self.after = page.last().map(|r| r.system_id.clone());
        Ok(Some(page))
    }

    /// True once the last page has been returned.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }
}

/// Largest `min_valid_seconds` a worker may ask for (one day).
pub const MAX_MIN_VALID_SECONDS: u32 = 86_400;
/// Default page size of `ListSystems`.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page size of `ListSystems`.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Longest system id.
pub const MAX_SYSTEM_ID_LEN: usize = 128;
/// Longest caller name.
pub const MAX_CALLER_NAME_LEN: usize = 64;
/// Name of the admin caller created on first start.
pub const BOOTSTRAP_ADMIN: &str = "admin";

/// What `RegisterSystem` needs.
#[derive(Debug)]
pub struct RegisterInput {
    /// Requested id; empty means generate one.
    pub system_id: String,
    /// Display name.
    pub display_name: String,
    /// Description.
    pub description: String,
    /// Kind.
    pub kind: SystemKind,
    /// Base URL as pasted.
    pub base_url: String,
    /// The credential.
    pub credential: Credential,
    /// Check upstream before saving.
    pub check: bool,
    /// `None`: the deployment's default.
    pub delivery: Option<Delivery>,
}

/// What a check targets.
#[derive(Debug)]
pub enum CheckTarget {
    /// A stored system.
    Stored(String),
    /// A candidate not saved yet.
    Candidate {
        /// Kind.
        kind: SystemKind,
        /// Base URL as pasted.
        base_url: String,
        /// Credential.
        credential: Credential,
    },
}

/// Why the broker could not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The master key does not match the store.
    #[error(
        "the master key does not match this data directory (key check failed); refusing to \
         start. Nothing was changed. Start with the key the store was created with \
         (CREDBROKER_MASTER_KEY_FILE)"
    )]
    WrongKey,
    /// The store's metadata is missing or unreadable.
    #[error("the store is damaged: {0}; refusing to start. Nothing was changed")]
    Damaged(String),
    /// The store holds records written before record authentication.
    #[error(
        "the store holds records without an authentication tag (written by a broker before \
         record authentication, or inserted without the master key); refusing to start. Nothing \
         was changed. If you are upgrading, start once with \
         CREDBROKER_ADOPT_UNAUTHENTICATED_RECORDS=1 to tag them (check the adopted ids it logs)"
    )]
    Unauthenticated,
    /// The admin token file could not be written (the admin caller, if one was committed, gets
    /// it at the next start: its token stays in the pending file).
    #[error(
        "cannot write the admin token file: {0}; refusing to start. The next start finishes \
         the file, or creates the admin caller if none was"
    )]
    AdminToken(String),
    /// Adoption was asked for on a store whose records are already authenticated.
    #[error(
        "CREDBROKER_ADOPT_UNAUTHENTICATED_RECORDS is set, but this store's records are already \
         authenticated; refusing to start. Remove the setting: left on, it would let someone \
         who can write the database have forged records adopted at the next start"
    )]
    AdoptionLeftOn,
    /// Storage failed.
    #[error("storage error during start: {0}")]
    Store(#[from] StoreError),
}

/// Settings the core needs.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Egress rules for base URLs.
    pub egress: EgressPolicy,
    /// Declared validity of static headers.
    pub static_header_ttl: Duration,
    /// OAuth refresh tuning.
    pub refresh: RefreshSettings,
    /// The URL of the broker's HTTP listener (OAuth redirect URIs are built from it).
    pub public_url: Option<String>,
    /// How long a started authorization stays usable.
    pub authorization_ttl: Duration,
    /// How often idle authorization-code grants are checked for keep-alive.
    pub keepalive_interval: Duration,
    /// Refresh an idle grant when its refresh token would die within this long.
    pub keepalive_margin: Duration,
    /// The audit trail's sinks.
    pub audit: AuditConfig,
    /// The data directory was initialized before (its store must not come up empty).
    pub expect_initialized: bool,
    /// Where the bootstrap admin's token is written (durably, before the caller is committed).
    pub admin_token_file: Option<std::path::PathBuf>,
    /// The bootstrap admin's token across the tries of one start.
    pub(crate) start_token: crate::admin_token::StartToken,
    /// Tag records written before record authentication instead of refusing to start.
    pub adopt_unauthenticated_records: bool,
    /// Delivery of static-secret systems registered without one.
    pub default_static_delivery: Delivery,
    /// Lifetime of proxy leases.
    pub lease_ttl: Duration,
    /// Largest request or response body the proxy passes.
    pub proxy_max_body_bytes: u64,
    /// A whole check (token, identity and every permission probe) ends within this.
    pub check_timeout: Duration,
    /// Every stored system is checked again this often (zero: never).
    pub check_interval: Duration,
    /// Scheduled checks running at once, per kind.
    pub checks_per_vendor: usize,
    /// The proxy's quota rules, per kind and per system.
    pub quota: quota::QuotaSettings,
    /// Create the admin caller on a store without callers. Off only where the callers come
    /// from elsewhere: the store a master key replacement fills from the old one
    /// ([`crate::server::rekey`]).
    pub bootstrap_admin: bool,
}

impl Default for BrokerSettings {
    /// The defaults of a broker on its own (the configuration's defaults come from here).
    fn default() -> Self {
        Self {
            egress: EgressPolicy::default(),
            static_header_ttl: Duration::from_secs(3600),
            refresh: RefreshSettings::default(),
            public_url: None,
            authorization_ttl: Duration::from_secs(600),
            keepalive_interval: Duration::from_secs(3600),
            keepalive_margin: Duration::from_secs(7 * 86_400),
            audit: AuditConfig::default(),
            expect_initialized: false,
            admin_token_file: None,
            start_token: Default::default(),
            adopt_unauthenticated_records: false,
            default_static_delivery: Delivery::Proxy,
            lease_ttl: Duration::from_secs(300),
            proxy_max_body_bytes: 256 * 1024 * 1024,
            check_interval: Duration::from_secs(6 * 3600),
            checks_per_vendor: 4,
            check_timeout: Duration::from_secs(10),
            quota: quota::QuotaSettings::default(),
            bootstrap_admin: true,
        }
    }
}

/// The broker core.
pub struct Broker {
    /// Set when shutdown begins (gRPC health turns `NOT_SERVING`; `/readyz` answers 503).
    pub draining: std::sync::atomic::AtomicBool,
    /// Whether writes reach the store (gRPC health service `WRITES_HEALTH_SERVICE`,
    /// `/readyz/writes`).
    pub write_health: Arc<crate::store::WriteHealth>,
    pub(crate) store: Arc<dyn CredentialStore>,
    pub(crate) keyring: RwLock<Keyring>,
    pub(crate) rewrap: crate::broker::keys::RewrapState,
    pub(crate) registry: Registry,
    pub(crate) egress: EgressPolicy,
    /// The settings it was opened with.
    pub settings: BrokerSettings,
    /// Issued headers, single flights, refresh permits and the refresh schedule.
    pub(crate) cache: TokenCache,
    pub(crate) pending_authorizations: Mutex<HashMap<String, PendingAuthorization>>,
    /// The audit trail.
    pub audit: Audit,
    /// Key for proxy leases (derived from the master key).
    pub(crate) lease_key: crate::crypto::SubKey,
    /// Key for the signed "Connect" links in webhooks (derived from the master key).
    pub(crate) link_key: crate::crypto::SubKey,
    /// Key signing the quota readings replicas share (derived from the master key).
    pub(crate) quota_key: crate::crypto::SubKey,
    /// What each system's vendor said about its quota (the proxy keeps workers inside it).
    pub(crate) quotas: quota::Quotas,
    /// `host[:port]` of the public URL, which the proxy's `Host` header must name.
    pub(crate) public_authority: Option<String>,
    /// Vendor 401s seen through the proxy and not yet counted in the store, per system; an
    /// entry means a writer for that system is running (one at a time).
    pub(crate) unauthorized: Mutex<HashMap<String, u64>>,
    /// When a vendor 401 through the proxy last made a system's token be minted again.
    pub(crate) proxy_remints: Mutex<HashMap<String, std::time::Instant>>,
    /// Connected grants whose refresh went through (or that the sweep found renewed), with when
    /// and the end their refresh token had: the keep-alive leaves them alone till halfway (see
    /// [`tokens::KeptAlive`]).
    pub(crate) kept_alive: Mutex<HashMap<String, tokens::KeptAlive>>,
    /// Who may call, and the authentication of each call.
    pub(crate) callers: Callers,
    /// This broker, for vendor exchanges that must outlive the request that started them.
    pub(crate) me: std::sync::Weak<Broker>,
    /// Vendor exchanges in flight (refreshes, code exchanges, logins): detached from their
    /// callers, waited for at shutdown.
    pub(crate) exchanges: tokio_util::task::TaskTracker,
    /// Set once a stop has waited for the exchanges: no new one starts (see
    /// [`Broker::refuse_new_exchanges`]).
    pub(crate) exchanges_refused: std::sync::atomic::AtomicBool,
    /// Held by master-key rotations and retirements (one at a time).
    pub(crate) key_ops: tokio::sync::Mutex<()>,
    /// Held by caller revocations (one at a time: the last-admin rule counts the others).
    pub(crate) caller_ops: tokio::sync::Mutex<()>,
    /// The last count of the systems for `/metrics`, held while one is made (one at a time).
    counted: Arc<tokio::sync::Mutex<Option<Counted>>>,
    /// System events (`WatchSystems`).
    pub events: events::Events,
    /// Scheduled checks.
    pub(crate) schedule: schedule::CheckSchedule,
    /// The lead of the keep-alive sweep and scheduled checks, while this process holds it.
    pub(crate) sweep_lead: tokio::sync::Mutex<Option<crate::store::Lead>>,
    /// Open watches per caller.
    pub(crate) watch_counts: watch::WatchCounts,
    /// Background tasks (webhook deliveries) the server ends, and waits for, at stop.
    pub background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Broker {
    /// Opens the broker on `store`: verifies the master key against the store's key check value
    /// (initializing a fresh store), loads callers, and creates the bootstrap admin on a store
    /// without callers. Returns the admin token when one was created.
    pub async fn open(
        store: Arc<dyn CredentialStore>,
        keyring: Keyring,
        registry: Registry,
        settings: BrokerSettings,
    ) -> Result<(Arc<Self>, Option<SecretString>), OpenError> {
        let write_health = Arc::new(crate::store::WriteHealth::default());
        let store: Arc<dyn CredentialStore> = Arc::new(crate::store::MonitoredStore::new(
            store,
            write_health.clone(),
        ));
        check_format(store.as_ref(), &keyring, &settings).await?;
        let store = authenticate_records(store, &keyring, &settings).await?;
        let audit = Audit::new(settings.audit.clone(), keyring.derive_subkey("audit-hmac"));
        let lease_key = keyring.derive_subkey("proxy-lease");
        let link_key = keyring.derive_subkey("connect-link");
        let quota_key = keyring.derive_subkey("quota-share");
        let quotas = quota::Quotas::new(settings.quota.clone());
        let settings_public_authority = settings.public_url.as_deref().and_then(|public| {
            url::Url::parse(public).ok().and_then(|u| {
                u.host_str().map(|h| match u.port() {
                    Some(p) => format!("{h}:{p}"),
                    None => h.to_owned(),
                })
            })
        });
        let keyring = crate::broker::keys::load_keks(store.as_ref(), keyring).await?;
        let checks_per_vendor = settings.checks_per_vendor;
        let events = events::Events::open(&store).await?;
        let broker = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            exchanges: tokio_util::task::TaskTracker::new(),
            exchanges_refused: std::sync::atomic::AtomicBool::new(false),
            key_ops: tokio::sync::Mutex::new(()),
            caller_ops: tokio::sync::Mutex::new(()),
            counted: Arc::new(tokio::sync::Mutex::new(None)),
            write_health,
            store,
            keyring: RwLock::new(keyring),
            rewrap: Default::default(),
            registry,
            egress: settings.egress.clone(),
            cache: TokenCache::new(settings.refresh.max_concurrent),
            settings,
            draining: std::sync::atomic::AtomicBool::new(false),
            pending_authorizations: Mutex::new(HashMap::new()),
            unauthorized: Mutex::new(HashMap::new()),
            proxy_remints: Mutex::new(HashMap::new()),
            kept_alive: Mutex::new(HashMap::new()),
            audit,
            lease_key,
            link_key,
            quota_key,
            quotas,
            public_authority: settings_public_authority,
            callers: Callers::default(),
            events,
            schedule: schedule::CheckSchedule::new(checks_per_vendor),
            sweep_lead: tokio::sync::Mutex::new(None),
            watch_counts: Default::default(),
            background: Mutex::new(Vec::new()),
        });
        let admin_token = broker.bootstrap().await?;
        Ok((broker, admin_token))
    }

    /// Loads the callers; on a store without any, creates the admin caller (its token file, when
    /// configured, is durable before the caller is committed; see [`crate::admin_token`]).
    async fn bootstrap(&self) -> Result<Option<SecretString>, OpenError> {
        let callers = self.store.list_callers().await?;
        if !callers.is_empty() {
            // An earlier try of this start may have committed its admin before the answer was
            // lost: its token is handed back.
            let earlier = self.settings.start_token.settle();
            let ours = earlier.filter(|t| is_admin_token(&callers, t.expose_secret()));
            self.install_stored_callers(callers)?;
            return Ok(ours);
        }
        if !self.settings.bootstrap_admin {
            return Ok(None);
        }
        // Every try of this start offers the same token (see `StartToken`).
        let token = self.settings.start_token.get_or(new_caller_token);
        let file = self.settings.admin_token_file.as_deref();
        if let Some(f) = file {
            crate::admin_token::stage(f, &token).map_err(token_file_error)?;
        }
        let admin = CallerScope::default();
        let created = self
            .create_caller_with(BOOTSTRAP_ADMIN, Role::Admin, admin, token.clone())
            .await;
        let callers = match created {
            Ok(_) => {
                if let Some(f) = file {
                    crate::admin_token::publish(f).map_err(token_file_error)?;
                }
                self.settings.start_token.settle();
                return Ok(Some(token));
            }
            Err(failed) => self.callers_after_failed_bootstrap(failed).await?,
        };
        // The store may have taken this very admin before its answer was lost.
        let ours = is_admin_token(&callers, token.expose_secret());
        self.install_stored_callers(callers)?;
        self.settings.start_token.settle();
        Ok(ours.then_some(token))
    }

    /// The callers after the admin insert failed: another replica sharing the store created it
    /// first, its row is refused, or the store took it before its answer was lost. A store that
    /// still does not answer, or that failed the insert and holds no caller, ends this try with
    /// its error (one that did not answer: the start waits and tries again).
    async fn callers_after_failed_bootstrap(
        &self,
        failed: StoreError,
    ) -> Result<Vec<crate::model::CallerRecord>, OpenError> {
        let callers = self.store.list_callers().await?;
        if callers.is_empty() {
            if !matches!(failed, StoreError::AlreadyExists) {
                return Err(failed.into());
            }
            tracing::error!(message = "No stored caller passes authentication: nobody can call this broker. Restore the callers from a backup.");
        }
        Ok(callers)
    }

    /// Installs the stored callers, first finishing the admin token file of a first start
    /// that committed its admin but stopped before the file was in place.
    fn install_stored_callers(
        &self,
        callers: Vec<crate::model::CallerRecord>,
    ) -> Result<(), OpenError> {
        if let Some(f) = &self.settings.admin_token_file {
            let is_admin = |token: &str| is_admin_token(&callers, token);
            let resumed = crate::admin_token::resume(f, is_admin).map_err(token_file_error)?;
            if resumed {
                tracing::warn!(message = "Finished writing the admin token file of an interrupted first start.", path = %f.display());
            }
        }
        self.callers.install(callers);
        Ok(())
    }

    /// Follows the changes other replicas make to a shared store: cached tokens of changed
    /// systems are dropped (the next call reads the store), callers are reloaded (a revocation
    /// on one replica is refused on every replica within the feed's latency), and after a
    /// reconnect of the feed everything is resynced.
    pub fn start_change_feed(self: &Arc<Self>) {
        let Some(mut rx) = self.store.changes() else {
            return;
        };
        self.start_quota_sharing();
        let me = Arc::downgrade(self);
        let backstop = me.clone();
        tokio::spawn(async move {
            // A backstop for a feed that lost a message: callers are reloaded periodically.
            let mut every = tokio::time::interval(CALLER_RELOAD_INTERVAL);
            every.tick().await;
            loop {
                every.tick().await;
                let Some(broker) = backstop.upgrade() else {
                    break;
                };
                broker.reload_callers().await;
                broker.sweep_expired_pending().await;
            }
        });
        tokio::spawn(async move {
            loop {
                let change = match rx.recv().await {
                    Ok(c) => c,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        crate::store::Change::Resync
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                let Some(broker) = me.upgrade() else { break };
                broker.apply_change(change).await;
            }
        });
    }

    /// Settles this replica's state for `system_id` after another replica changed its record.
    /// A dead grant, a backoff and a reported token were the vendor's answers about one
    /// credential: they go once another credential is stored (a rotation, a re-connection, a
    /// rotated refresh token), another replica shares a token it minted, or the system is gone;
    /// not for a note, a health check or a 401 count, which would otherwise lift a vendor's
    /// `Retry-After` on every replica but the one that wrote. Kept, the token shared in the
    /// record is cached again (the change notice dropped it).
    pub(crate) async fn settle_remote_change(
        &self,
        f: &mut crate::broker::tokens::Flight,
        system_id: &str,
    ) {
        if let Some(seen) = f.vendor_state_seen() {
            match self.store.get_system_fresh(system_id).await {
                Ok(Some(r)) if crate::broker::tokens::vendor_view(&r) == seen => {
                    // The notice dropped the cached token: the one in the record serves on.
                    self.adopt_shared_token(system_id, &r);
                    return;
                }
                // Nothing learnt: a database that does not answer now says nothing of the vendor.
                // A dead mark, which never ends by itself, is read again by the next mint.
                Err(_) => {
                    f.forget_dead();
                    return;
                }
                Ok(_) => {}
            }
        }
        f.clear_remote_state();
    }

    /// A system deleted on another replica takes its quota standing here with it (a system
    /// registered again under the id would inherit a block or a spent count). Asked of the
    /// store only while the system is held back (blocked, or no calls left): a notice about
    /// any other system costs nothing.
    fn forget_quota_if_gone(self: &Arc<Self>, id: &str) {
        let held_back = self
            .quotas
            .view(id)
            .is_some_and(|v| v.blocked_until_ms.is_some() || v.remaining.is_some_and(|r| r <= 0));
        if !held_back {
            return;
        }
        let (me, id) = (Arc::downgrade(self), id.to_owned());
        tokio::spawn(async move {
            let Some(broker) = me.upgrade() else { return };
            if let Ok(None) = broker.store.get_system_fresh(&id).await {
                broker.quotas.forget(&id);
            }
        });
    }

    /// Runs [`Broker::settle_remote_change`] for `id` in the background (not waiting here for
    /// a refresh in flight). Only an existing entry has such state: none is made for the id.
    fn settle_later(self: &Arc<Self>, id: String) {
        let Some(flight) = self.cache.existing_flight(&id) else {
            return;
        };
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut f = flight.lock().await;
            if let Some(broker) = me.upgrade() {
                // A token cached since the notice (a mint, an earlier settle's adoption) may be
                // of the record as it was before: settled afresh.
                broker.drop_token(&id);
                broker.settle_remote_change(&mut f, &id).await;
            }
        });
    }

    async fn apply_change(self: &Arc<Self>, change: crate::store::Change) {
        use crate::store::Change;
        match change {
            // A notification anyone with database access can send names no map entry.
            Change::System(id) if validate_system_id(&id).is_err() => {}
            Change::System(id) => {
                self.drop_token(&id);
                self.forget_quota_if_gone(&id);
                self.settle_later(id);
            }
            Change::Caller(_) => self.reload_callers().await,
            Change::Meta(key) if key.starts_with("kek") || key == "primary_kek" => {
                if let Err(e) = self.reload_keks().await {
                    tracing::warn!(message = "Could not reload the keys another replica changed.", error = %e);
                }
            }
            Change::Meta(key) if key.starts_with("pending_auth/") => self.forget_pending(&key),
            Change::Meta(_) => {}
            Change::Events => self.events.kick(),
            Change::Quota(payload) => self.merge_quota(&payload),
            Change::Resync => {
                self.events.kick();
                self.cache.clear();
                // Notices may have been missed: every system's standing state is weighed again.
                for id in self.cache.flight_ids() {
                    self.settle_later(id);
                }
                self.reload_callers().await;
                if let Err(e) = self.reload_keks().await {
                    tracing::warn!(message = "Could not reload keys after a resync.", error = %e);
                }
            }
        }
    }

    /// A key derived from the master key for `label` (backups).
    pub(crate) fn derive_key(&self, label: &str) -> crate::crypto::SubKey {
        read(&self.keyring).derive_subkey(label)
    }

    // ----- systems -------------------------------------------------------------------------

    /// Registers a system. Password grants are exchanged first (the password is never stored);
    /// with `check`, the credential is verified upstream and nothing is saved when it fails.
    pub async fn register(
        &self,
        input: RegisterInput,
    ) -> Result<(SystemRecord, Option<AuthCheck>), BrokerError> {
        let backend = self.registry.get(input.kind)?.clone();
        let system_id = if input.system_id.is_empty() {
            generate_id(input.kind)
        } else {
            validate_slug(&input.system_id, MAX_SYSTEM_ID_LEN)
                .map_err(|m| BrokerError::invalid("system_id", m))?;
            input.system_id
        };
        check_credential_type(input.kind, &input.credential)?;
        validate_label("display_name", &input.display_name, MAX_DISPLAY_NAME, false)?;
        validate_label("description", &input.description, MAX_DESCRIPTION, true)?;
        let base_url = backend
            .canonical_base_url(&input.base_url, &self.egress)
            .map_err(|m| BrokerError::invalid("base_url", m))?;
        backend
            .validate_target(&base_url, &input.credential)
            .map_err(|m| BrokerError::invalid("base_url", m))?;
        if self.store.get_system(&system_id).await?.is_some() {
            return Err(already_exists(&system_id));
        }
        let needs_connect =
            input.credential.credential_type() == CredentialType::OAuthAuthorizationCode;
        if needs_connect && input.check {
            return Err(BrokerError::invalid(
                "check",
                "an authorization-code system can be checked only once it is connected; \
                 register it without check, then run StartAuthorization \
                 (`credbrokerctl system connect SYSTEM_ID`)",
            ));
        }
        self.refuse_spending_while_writes_fail(&input.credential, input.check)?;
        let given = input.credential.refresh_token().cloned();
        let prepared = prepare(
            self.settings.check_timeout,
            backend.as_ref(),
            &system_id,
            &base_url,
            input.credential,
            input.check,
            "nothing was saved",
        )
        .await?;
        // From here on, a failure may have spent the given refresh token (see `unkept`).
        let spent = |e| unkept(e, given.as_ref(), &prepared.credential, &system_id);
        let now = unix_now();
        let version = self.first_version(&system_id).await.map_err(spent)?;
        let record = SystemRecord {
            sealed_credential: (self.seal(&system_id, version, &prepared.credential))
                .map_err(spent)?,
            system_id: system_id.clone(),
            display_name: input.display_name,
            description: input.description,
            kind: input.kind,
            base_url,
            credential_type: prepared.credential.credential_type(),
            credential_version: version,
            state: if needs_connect {
                SystemState::AuthorizationPending
            } else {
                SystemState::Active
            },
            state_message: needs_connect.then(|| not_connected(&system_id)),
            created_at: now,
            updated_at: now,
            last_check: prepared.check.clone(),
            credential_expires_at: prepared.credential.expires_at(),
            delivery: self.effective_delivery(input.delivery, &prepared.credential),
            proxy_unauthorized_count: 0,
            shared_token: None,
            last_proxy_unauthorized_at: None,
            revision: 1,
            integrity: None,
            health: None,
            refresh_failure: None,
        };
        let mut record = record;
        let notes = health::refresh(&mut record, now);
        self.store
            .insert_system(&record)
            .await
            .map_err(|e| match e {
                StoreError::AlreadyExists => already_exists(&system_id),
                other => other.into(),
            })
            .map_err(spent)?;
        if let Some(issued) = prepared.issued.filter(|_| prepared.credential.is_oauth()) {
            // The token minted during registration serves the first workers.
            let _ = self.install(&system_id, &record, issued, SystemTime::now(), true);
        }
        self.emit(events::EventType::Registered, &record, "registered");
        // The opening health is part of the registration; only a horizon already near is news.
        let expiring: Vec<_> = notes
            .into_iter()
            .filter(|n| matches!(n, health::Note::Expiring(_)))
            .collect();
        self.announce(&record, &expiring);
        tracing::info!(message = "System registered.", kind = %record.kind, system_id = %record.system_id);
        Ok((record, prepared.check))
    }

    /// Checks a stored or candidate credential. A stored system's `last_check` is updated.
    pub async fn check(&self, target: CheckTarget) -> Result<AuthCheck, BrokerError> {
        match target {
            CheckTarget::Candidate {
                kind,
                base_url,
                credential,
            } => {
                let backend = self.registry.get(kind)?.clone();
                check_credential_type(kind, &credential)?;
                let base_url = backend
                    .canonical_base_url(&base_url, &self.egress)
                    .map_err(|m| BrokerError::invalid("candidate.base_url", m))?;
                backend
                    .validate_target(&base_url, &credential)
                    .map_err(|m| BrokerError::invalid("candidate.base_url", m))?;
                let target = Target {
                    system_id: None,
                    base_url: &base_url,
                    credential: &credential,
                };
                let deadline = self.settings.check_timeout;
                let mut check = match tokio::time::timeout(deadline, async {
                    match backend.issue(&target).await {
                        Ok(issued) => backend.verify(&target, &issued).await,
                        Err(e) => e.to_check(),
                    }
                })
                .await
                {
                    Ok(c) => c,
                    Err(_) => check_timed_out(deadline),
                };
                warn_expiry(
                    &mut check,
                    credential.expires_at(),
                    credential.credential_type(),
                );
                Ok(check)
            }
            CheckTarget::Stored(system_id) => self.check_stored(&system_id, false).await,
        }
    }

    /// Checks a stored system and records the result. `scheduled`: a check the broker ran on
    /// its own, announced (`check.completed`) only when its outcome differs from the last one,
    /// so thousands of unchanged scheduled checks do not crowd the event log.
    pub(crate) async fn check_stored(
        &self,
        system_id: &str,
        scheduled: bool,
    ) -> Result<AuthCheck, BrokerError> {
        let system_id = system_id.to_owned();
        let kind = self.get_system(&system_id).await?.kind;
        let backend = self.registry.get(kind)?.clone();
        // Through the single-flight token path: a check never spends a refresh token
        // behind the cache's back.
        let token = self.token_for_check(&system_id).await;
        // Read after the token: a refresh may have rotated the stored credential.
        let record = self.get_system(&system_id).await?;
        let mut check = match token {
            Ok(token) => {
                let credential = self.open_credential(&record)?;
                let target = Target {
                    system_id: Some(&system_id),
                    base_url: &record.base_url,
                    credential: &credential,
                };
                match tokio::time::timeout(
                    self.settings.check_timeout,
                    backend.verify(&target, &token.to_issued()),
                )
                .await
                {
                    Ok(c) => c,
                    Err(_) => check_timed_out(self.settings.check_timeout),
                }
            }
            Err(BrokerError::DataLoss(m)) => return Err(BrokerError::DataLoss(m)),
            // The broker is stopping: that says nothing of the credential, and nothing is
            // recorded.
            Err(e) if self.refusing_exchanges() => return Err(e),
            Err(e) => {
                let failure = match (&e, self.last_failure(&system_id).await) {
                    (_, Some(f)) => f,
                    (BrokerError::FailedPrecondition(_), None) => {
                        AuthFailure::ReauthorizationRequired
                    }
                    _ => AuthFailure::UpstreamError,
                };
                AuthCheck::failed(failure, e.to_string())
            }
        };
        // Read again: a refresh during the check moved the revision on; the result is
        // recorded on the newest record, not lost to a conflict.
        let record = self.get_system(&system_id).await?;
        warn_expiry(
            &mut check,
            record.credential_expires_at,
            record.credential_type,
        );
        self.record_check(&record, &check, scheduled).await?;
        Ok(check)
    }

    /// Replaces a system's credential, checking the new one first unless `skip_check`. Password
    /// grants are exchanged first. Clears a re-authorization state.
    pub async fn rotate(
        &self,
        system_id: &str,
        credential: Credential,
        skip_check: bool,
    ) -> Result<(SystemRecord, Option<AuthCheck>), BrokerError> {
        let record = self.get_system(system_id).await?;
        let backend = self.registry.get(record.kind)?.clone();
        check_credential_type(record.kind, &credential)?;
        backend
            .validate_target(&record.base_url, &credential)
            .map_err(|m| BrokerError::invalid("credential", m))?;
        self.refuse_spending_while_writes_fail(&credential, !skip_check)?;
        let given = credential.refresh_token().cloned();
        let prepared = prepare(
            self.settings.check_timeout,
            backend.as_ref(),
            system_id,
            &record.base_url,
            credential,
            !skip_check,
            "the old credential stays in use",
        )
        .await?;
        let flight = self.flight(system_id);
        let mut f = flight.lock().await;
        // The check may have had the vendor rotate the credential (a refresh token that turns
        // over when used), so the new one must land: a concurrent write (a health check, a 401
        // count, a re-wrap) is written on top of, and an attempt that landed though its answer
        // was lost is found by its sealing.
        let mut ours: Vec<Vec<u8>> = Vec::new();
        let modified = self
            .modify_system(system_id, Retry::Persist, |current| {
                if is_ours(&ours, &current.sealed_credential) {
                    return Ok(None);
                }
                rotating_the_same(&record, current).map_err(|e| match e {
                    // An earlier attempt may have landed (its answer lost) and been replaced.
                    BrokerError::FailedPrecondition(m) if !ours.is_empty() => {
                        BrokerError::FailedPrecondition(format!(
                            "{m} (an earlier attempt of this rotation may have been stored and \
                             replaced since: check the system)"
                        ))
                    }
                    e => e,
                })?;
                let updated = self.rotated(current, &prepared)?;
                ours.push(updated.sealed_credential.clone());
                Ok(Some(updated))
            })
            .await
            .map_err(|e| unkept(e, given.as_ref(), &prepared.credential, system_id))?;
        let updated = match modified {
            Modified::Written(r) | Modified::Unchanged(r) => r,
        };
        Self::reset_flight(&mut f);
        self.drop_token(system_id);
        if let Some(issued) = prepared.issued.filter(|_| prepared.credential.is_oauth()) {
            let _ = self.install(system_id, &updated, issued, SystemTime::now(), true);
        }
        self.emit(
            events::EventType::Rotated,
            &updated,
            format!("credential version {}", updated.credential_version),
        );
        tracing::info!(message = "Credential rotated.", kind = %updated.kind, system_id = %system_id);
        Ok((updated, prepared.check))
    }

    /// Refuses a check that would hand the vendor a refresh token while writes to the store
    /// fail: a vendor that turns refresh tokens over would issue one with nowhere to keep it,
    /// and the one given would be spent.
    fn refuse_spending_while_writes_fail(
        &self,
        credential: &Credential,
        check: bool,
    ) -> Result<(), BrokerError> {
        if check && credential.refresh_token().is_some() && !self.write_health.is_ok() {
            let why = self.write_health.reason().unwrap_or("writes fail");
            return Err(BrokerError::Unavailable(format!(
                "the store refuses writes ({why}): a check now would hand the vendor the refresh \
                 token, and a new one it issued could not be kept; retry once writes recover"
            )));
        }
        Ok(())
    }

    /// `current` with the prepared credential rotated in, as its next version.
    fn rotated(
        &self,
        current: &SystemRecord,
        prepared: &Prepared,
    ) -> Result<SystemRecord, BrokerError> {
        let system_id = current.system_id.as_str();
        let version = next_version(current)?;
        let mut updated = current.clone();
        updated.sealed_credential = self.seal(system_id, version, &prepared.credential)?;
        updated.credential_type = prepared.credential.credential_type();
        updated.credential_version = version;
        updated.credential_expires_at = prepared.credential.expires_at();
        // A new authorization-code client needs a new authorization.
        let needs_connect =
            prepared.credential.credential_type() == CredentialType::OAuthAuthorizationCode;
        updated.state = if needs_connect {
            SystemState::AuthorizationPending
        } else {
            SystemState::Active
        };
        updated.state_message = needs_connect.then(|| not_connected(system_id));
        // A new credential: a spell of failing refreshes of the old one is over.
        updated.refresh_failure = None;
        updated.updated_at = unix_now();
        if prepared.check.is_some() {
            updated.last_check = prepared.check.clone();
        }
        Ok(updated)
    }

    /// One system's metadata.
    pub async fn get_system(&self, system_id: &str) -> Result<SystemRecord, BrokerError> {
        if system_id.is_empty() {
            return Err(BrokerError::invalid("system_id", "is required"));
        }
        self.store
            .get_system(system_id)
            .await?
            .ok_or_else(|| BrokerError::NotFound(format!("system '{system_id}' not found")))
    }

    /// Adds to `r` what this process knows and could not record: a refresh waiting for an
    /// unreachable shared store shows as a spell of refresh failures (its health says why).
    pub fn add_live_state(&self, r: &mut SystemRecord) {
        // Only while writes fail (the store probe says so each second): a wait noted before the
        // store came back is not news.
        if r.refresh_failure.is_some() || self.write_health.is_ok() {
            return;
        }
        if let Some(since) = self.cache.store_wait(&r.system_id) {
            r.refresh_failure = Some(crate::model::RefreshFailure {
                failure: AuthFailure::Unreachable,
                message: tokens::STORE_DOWN_NOTE.to_owned(),
                since,
            });
        }
    }

    /// Writes `updated` in place of `current`: the one compare-and-swap of a system record (on
    /// its revision, which it bumps). `Conflict` when the record changed since `current` was read.
    pub(crate) async fn swap_system(
        &self,
        current: &SystemRecord,
        updated: SystemRecord,
    ) -> Result<SystemRecord, StoreError> {
        self.swap_system_under(current, updated, None).await
    }

    /// [`Self::swap_system`], written only while `fence`'s refresh lock is held when given.
    async fn swap_system_under(
        &self,
        current: &SystemRecord,
        mut updated: SystemRecord,
        fence: Option<crate::store::Fence>,
    ) -> Result<SystemRecord, StoreError> {
        // The revision is not under the record's tag: one written past any count is refused,
        // not wrapped (a wrapped one would lose every later compare-and-swap on a replica).
        updated.revision = (current.revision.checked_add(1)).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "system '{}': revision exhausted",
                current.system_id
            ))
        })?;
        let notes = health::refresh(&mut updated, unix_now());
        match fence {
            Some(fence) => {
                self.store
                    .update_system_fenced(&updated, current.revision, fence)
                    .await?
            }
            None => self.store.update_system(&updated, current.revision).await?,
        }
        self.announce(&updated, &notes);
        Ok(updated)
    }

    /// Stores a stored system's check result and announces it. A concurrent rotation, refresh or
    /// delete wins over it (the result is still returned to the caller).
    async fn record_check(
        &self,
        record: &SystemRecord,
        check: &AuthCheck,
        only_if_changed: bool,
    ) -> Result<(), BrokerError> {
        let mut updated = record.clone();
        updated.last_check = Some(check.clone());
        let unchanged = record.last_check.as_ref().is_some_and(|last| {
            (
                last.ok,
                last.failure,
                &last.identity,
                &last.missing_permissions,
            ) == (
                check.ok,
                check.failure,
                &check.identity,
                &check.missing_permissions,
            )
        });
        match self.swap_system(record, updated).await {
            Ok(_) if only_if_changed && unchanged => Ok(()),
            Ok(written) => {
                let outcome = match check.failure {
                    None => "ok".to_owned(),
                    Some(f) => format!("failed ({})", f.as_str()),
                };
                self.emit(events::EventType::CheckCompleted, &written, outcome);
                Ok(())
            }
            Err(StoreError::Conflict) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Announces an event (see [`events`]) and audits it: the process that caused it writes the
    /// audit line, with the event's type.
    pub(crate) fn emit(
        &self,
        kind: events::EventType,
        record: &SystemRecord,
        detail: impl Into<String>,
    ) {
        // Not awaited: the batch is written when the future is dropped, if this line leads it,
        // or with the batch it joined.
        drop(self.audit.record(&AuditEvent {
            system_id: Some(&record.system_id),
            event: Some(kind.as_str()),
            ..AuditEvent::now("SystemEvent", "ok", "OK")
        }));
        self.events.emit(kind, record, detail);
    }

    /// Turns what a write changed about a system's health into events.
    fn announce(&self, record: &SystemRecord, notes: &[health::Note]) {
        let reason = record
            .health
            .as_ref()
            .map(|h| h.reason.as_str())
            .unwrap_or_default();
        for note in notes {
            match note {
                health::Note::Changed(from, to) => self.emit(
                    events::EventType::HealthChanged,
                    record,
                    match from {
                        Some(f) => format!("{} → {}: {reason}", f.as_str(), to.as_str()),
                        None => format!("{}: {reason}", to.as_str()),
                    },
                ),
                health::Note::Expiring(days) => self.emit(
                    events::EventType::Expiring,
                    record,
                    format!("within {days} day(s): {reason}"),
                ),
            }
        }
    }

    /// Read-modify-write of one system record: [`Self::swap_system`] re-read and retried as
    /// `retry` says. `change` gets the current record and returns the new one, or `None` when
    /// there is nothing to write.
    pub(crate) async fn modify_system(
        &self,
        system_id: &str,
        retry: Retry,
        change: impl FnMut(&SystemRecord) -> Result<Option<SystemRecord>, BrokerError>,
    ) -> Result<Modified, BrokerError> {
        self.modify_system_under(system_id, retry, None, change)
            .await
            .map_err(Unwritten::into_error)
    }

    /// [`Self::modify_system`] whose writes land only while `fence`'s refresh lock is held
    /// (when given): a lock found lost ends it at once, with nothing written.
    pub(crate) async fn modify_system_under(
        &self,
        system_id: &str,
        retry: Retry,
        fence: Option<crate::store::Fence>,
        mut change: impl FnMut(&SystemRecord) -> Result<Option<SystemRecord>, BrokerError>,
    ) -> Result<Modified, Unwritten> {
        let mut last = BrokerError::Internal("the system record kept changing");
        for attempt in 1..=retry.attempts() {
            if attempt > 1 {
                if let Some(pause) = retry.pause(attempt) {
                    tokio::time::sleep(pause).await;
                }
            }
            let current = match self.get_system(system_id).await {
                Ok(r) => r,
                // A write the vendor's state depends on outlasts a storage blip on the read too.
                Err(e @ BrokerError::Unavailable(_)) if retry == Retry::Persist => {
                    last = e;
                    continue;
                }
                Err(e) => return Err(Unwritten::Failed(e)),
            };
            let Some(updated) = change(&current).map_err(Unwritten::Failed)? else {
                return Ok(Modified::Unchanged(current));
            };
            match self.swap_system_under(&current, updated, fence).await {
                Ok(written) => return Ok(Modified::Written(written)),
                Err(StoreError::LockLost) => return Err(Unwritten::LockLost),
                // A conflict or a storage blip may pass; a full disk or a refused record will not.
                Err(e) => match BrokerError::from(e) {
                    e @ BrokerError::Unavailable(_) => last = e,
                    e => return Err(Unwritten::Failed(e)),
                },
            }
        }
        Err(Unwritten::Failed(last))
    }

    /// [`Self::modify_system`] with a change made in place; `change` returns false when there is
    /// nothing to write. `Ok(true)` when written.
    pub(crate) async fn update_system_with(
        &self,
        system_id: &str,
        mut change: impl FnMut(&mut SystemRecord) -> bool,
    ) -> Result<bool, BrokerError> {
        let modified = self
            .modify_system(system_id, Retry::Quick, |current| {
                let mut updated = current.clone();
                Ok(change(&mut updated).then_some(updated))
            })
            .await?;
        Ok(matches!(modified, Modified::Written(_)))
    }

    /// A page of systems after `after`; the bool says whether more follow.
    pub async fn list_systems(
        &self,
        after: Option<&str>,
        page_size: usize,
    ) -> Result<(Vec<SystemRecord>, bool), BrokerError> {
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(BrokerError::invalid(
                    "page_size",
                    format!("must be at most {MAX_PAGE_SIZE}"),
                ))
            }
            n => n,
        };
        let mut page = self.store.list_systems(after, size + 1).await?;
        let more = page.len() > size;
        page.truncate(size);
        Ok((page, more))
    }

    /// Every stored system, `page_size` at a time, in id order.
    pub(crate) fn system_pages(&self, page_size: usize) -> SystemPages<'_> {
        SystemPages {
            store: self.store.as_ref(),
            page_size: page_size.max(1),
            after: None,
            done: false,
        }
    }

    /// Calls `f` on every stored system, a page at a time, in id order.
    async fn for_each_system(&self, mut f: impl FnMut(&SystemRecord)) -> Result<(), BrokerError> {
        let mut pages = self.system_pages(SCAN_PAGE);
        while let Some(page) = pages.next().await? {
            page.iter().for_each(&mut f);
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    /// Reads every system and authenticates (decrypts) its stored credential: `(systems, errors)`.
    /// Each failure is logged by system id (by `open_credential`); nothing is changed.
    pub async fn verify_store(&self) -> Result<(u64, u64), BrokerError> {
        let (mut systems, mut errors) = (0u64, 0u64);
        self.for_each_system(|r| {
            systems += 1;
            errors += u64::from(self.open_credential(r).is_err());
        })
        .await?;
        // Records the store holds but refuses to list (undecodable, or failing authentication)
        // are errors too.
        let stored = self.store.count_systems().await? as u64;
        let refused = stored.saturating_sub(systems);
        Ok((systems + refused, errors + refused))
    }

    /// [`Self::count_systems_now`] for `/metrics`, which anyone who reaches the HTTP listener
    /// may ask for: one count at a time, at most one a [`COUNT_EVERY`], shared by every request
    /// that came before it started (so each answer still counts what was there when it was
    /// asked). A count runs on its own task: a request that goes away (its deadline, a
    /// disconnect) neither stops it nor frees the turn before it is kept. `None` when the count
    /// failed (logged once per count). The quota book is read live.
    pub async fn system_counts(&self) -> Option<crate::metrics::SystemCounts> {
        let asked = tokio::time::Instant::now();
        let mut last = self.counted.clone().lock_owned().await;
        let mut counts = match last.as_ref().filter(|l| l.started >= asked) {
            Some(l) => l.counts.clone(),
            None => {
                if let Some(l) = last.as_ref() {
                    tokio::time::sleep_until(l.started + COUNT_EVERY).await;
                }
                let me = self.me.upgrade()?;
                // Among the exchanges, which the stop waits for: it keeps the broker (and the
                // store) no longer than the stop does.
                let count = self.exchanges.spawn(async move {
                    let started = tokio::time::Instant::now();
                    let counted = tokio::time::timeout(COUNT_LIMIT, me.count_systems_now()).await;
                    let counts = match counted {
                        Ok(Ok(c)) => Some(c),
                        Ok(Err(e)) => {
                            tracing::warn!(message = "Could not count systems for /metrics.", error = %e);
                            None
                        }
                        Err(_) => {
                            tracing::warn!(message = "Counting the systems for /metrics took too long.");
                            None
                        }
                    };
                    *last = Some(Counted {
                        started,
                        counts: counts.clone(),
                    });
                    counts
                });
                count.await.ok().flatten()
            }
        }?;
        self.count_quotas(&mut counts);
        Some(counts)
    }

    /// How many systems are in each state, in each health by kind, and how far their known
    /// horizons are (for `/metrics`; bounded labels only): one pass over every system.
    async fn count_systems_now(&self) -> Result<crate::metrics::SystemCounts, BrokerError> {
        let mut c = crate::metrics::SystemCounts::default();
        let now = unix_now();
        self.for_each_system(|r| {
            c.by_state[match r.state {
                SystemState::Active => 0,
                SystemState::AuthorizationPending => 1,
                SystemState::ReauthorizationRequired => 2,
            }] += 1;
            let (h, _) = health::derive(r, now);
            *c.by_health.entry((r.kind.slug(), h)).or_default() += 1;
            if let Some(at) = r
                .credential_expires_at
                .filter(|_| r.credential_type != CredentialType::OAuthAuthorizationCode)
            {
                let left = at.saturating_sub(now);
                let bucket = crate::metrics::HORIZON_BUCKETS
                    .iter()
                    .position(|(_, secs)| left <= *secs)
                    .unwrap_or(crate::metrics::HORIZON_BUCKETS.len() - 1);
                c.by_horizon[bucket] += 1;
            }
        })
        .await?;
        Ok(c)
    }

    /// Adds the proxy's quota book, summed by kind, to `c`.
    fn count_quotas(&self, c: &mut crate::metrics::SystemCounts) {
        let now_ms = quota::now_ms();
        for (kind, v) in self.quotas.views() {
            let g = &mut c.quota[crate::metrics::kind_index(kind)];
            g.in_flight += u64::from(v.in_flight);
            if let Some(until) = v.blocked_until_ms {
                g.blocked_systems += 1;
                g.blocked_seconds_max = g
                    .blocked_seconds_max
                    .max(until.saturating_sub(now_ms).div_ceil(1000));
            }
            if let Some(rem) = v
                .remaining
                .filter(|r| g.remaining_min.is_none_or(|m| r < &m))
            {
                g.remaining_min = Some(rem);
                g.limit = v.limit;
            }
        }
    }

    /// The delivery a system gets when `requested` is unspecified: proxy for static secrets
    /// (unless configured otherwise), header for OAuth access tokens.
    pub fn effective_delivery(
        &self,
        requested: Option<Delivery>,
        credential: &Credential,
    ) -> Delivery {
        requested.unwrap_or(if credential.is_oauth() {
            Delivery::Header
        } else {
            self.settings.default_static_delivery
        })
    }

    /// Switches a system's delivery.
    pub async fn set_delivery(
        &self,
        system_id: &str,
        delivery: Option<Delivery>,
    ) -> Result<SystemRecord, BrokerError> {
        let flight = self.flight(system_id);
        let mut f = flight.lock().await;
        let current = self.get_system(system_id).await?;
        let delivery = match delivery {
            Some(d) => d,
            None => {
                if current.credential_type.is_oauth() {
                    Delivery::Header
                } else {
                    self.settings.default_static_delivery
                }
            }
        };
        let mut updated = current.clone();
        updated.delivery = delivery;
        updated.updated_at = unix_now();
        let updated = self.swap_system(&current, updated).await?;
        self.drop_token(system_id);
        // A reported token carries the old delivery: it must never come back.
        f.reported = None;
        tracing::info!(message = "Delivery changed.", system_id = %system_id, delivery = ?delivery);
        Ok(updated)
    }

    /// Deletes a system and drops its cached headers.
    pub async fn delete_system(&self, system_id: &str) -> Result<(), BrokerError> {
        if system_id.is_empty() {
            return Err(BrokerError::invalid("system_id", "is required"));
        }
        let flight = self.flight(system_id);
        let mut f = flight.lock().await;
        // Versions never repeat across incarnations: leases and pending authorizations of
        // this one cannot serve a system registered later under the same id. A refused record
        // (its version unknowable) can be deleted too; the next incarnation then starts past
        // any version a counter could have reached.
        let (last, gone) = match self.store.get_system(system_id).await {
            Ok(current) => (current.as_ref().map(|c| c.credential_version), current),
            Err(StoreError::Tampered(_) | StoreError::Corrupt(_)) => (Some(unix_now()), None),
            Err(e) => return Err(e.into()),
        };
        if let Some(last) = last {
            let last = last.max(self.retired_version(system_id).await?);
            self.store
                .put_meta(&retired_key(system_id), last.to_string().as_bytes())
                .await?;
        }
        if !self.store.delete_system(system_id).await? {
            return Err(BrokerError::NotFound(format!(
                "system '{system_id}' not found"
            )));
        }
        Self::reset_flight(&mut f);
        self.drop_token(system_id);
        self.quotas.forget(system_id);
        drop(f);
        drop(flight);
        self.forget_flight_if_idle(system_id, 0);
        if let Some(record) = gone {
            self.emit(events::EventType::Deleted, &record, "deleted");
        }
        tracing::info!(message = "System deleted.", system_id = %system_id);
        Ok(())
    }

    /// Serializes one kind of administrative operation (`local`, this process) across replicas
    /// too (the store's lock named `key`, an id starting with `~` that no system can have).
    pub(crate) async fn admin_operation<'a>(
        &self,
        local: &'a tokio::sync::Mutex<()>,
        key: &str,
    ) -> Result<
        (
            tokio::sync::MutexGuard<'a, ()>,
            Option<crate::store::RefreshLock>,
        ),
        BrokerError,
    > {
        let local = local.lock().await;
        let shared = self
            .store
            .lock_refresh(key, std::time::Duration::from_secs(30))
            .await?;
        Ok((local, shared))
    }

    /// The first credential version of a system registered as `system_id`: 1, or one past the
    /// last version of a deleted system that had the id.
    async fn first_version(&self, system_id: &str) -> Result<u64, BrokerError> {
        version_after(self.retired_version(system_id).await?, system_id)
    }

    /// `version` for a system put back as `system_id` (a restore), or one past the last
    /// version of a deleted system that had the id when `version` is not past it: versions
    /// never repeat across incarnations.
    pub(crate) async fn version_for_restore(
        &self,
        system_id: &str,
        version: u64,
    ) -> Result<u64, BrokerError> {
        let first = self.first_version(system_id).await?;
        Ok(version.max(first))
    }

    /// The last credential version of deleted systems that had this id (0: none).
    async fn retired_version(&self, system_id: &str) -> Result<u64, BrokerError> {
        let retired = self.store.get_meta(&retired_key(system_id)).await?;
        Ok(retired
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0))
    }

    /// Writes one audit event; `code` is the outcome's canonical code name (`OK`,
    /// `PERMISSION_DENIED`); `token_hmac` is the token id's [`Audit::hmac`], never the id.
    pub fn audit_record(
        &self,
        rpc: &str,
        caller: Option<&str>,
        system_id: Option<&str>,
        code: &'static str,
        token_hmac: Option<&str>,
    ) -> impl std::future::Future<Output = Result<(), crate::audit::AuditError>> + Send + '_ {
        self.audit_record_with(rpc, caller, system_id, (code, token_hmac, None))
    }

    /// [`Self::audit_record`] with what an administrative call changed (see
    /// [`AuditEvent::detail`]).
    pub fn audit_record_with(
        &self,
        rpc: &str,
        caller: Option<&str>,
        system_id: Option<&str>,
        (code, token_hmac, detail): (&'static str, Option<&str>, Option<&str>),
    ) -> impl std::future::Future<Output = Result<(), crate::audit::AuditError>> + Send + '_ {
        self.audit.record(&AuditEvent {
            time: crate::audit::now_rfc3339(),
            caller,
            rpc,
            system_id,
            outcome: if code == "OK" { "ok" } else { "error" },
            code,
            token_hmac,
            method: None,
            path: None,
            duration_ms: None,
            event: None,
            detail,
        })
    }

    /// While writes are failing (always, on a shared store), tries one small durable write so
    /// that health follows the store without a restart (called every second by the server).
    pub async fn probe_writes(&self) {
        // A shared store (PostgreSQL) is probed all the time: a replica that writes nothing
        // must still see the database go away and come back.
        if self.write_health.needs_probe() || self.store.is_shared() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            let _ = self
                .store
                .put_meta("write_probe", now.to_string().as_bytes())
                .await;
        }
    }

    /// Writes what is pending (at shutdown): the store, then the audit trail's lines (for at
    /// most [`AUDIT_DRAIN`]). The store first: a stop cut short while a stalled trail is
    /// waited for loses audit lines, not writes.
    pub async fn flush(&self) -> Result<(), BrokerError> {
        let flushed = self.store.flush().await;
        // Lines whose calls did not wait for them (system events) reach the trail before the
        // process ends with its writer thread.
        if !self.audit.drain(AUDIT_DRAIN).await {
            tracing::warn!(message = "Audit lines not yet written are lost with this stop.");
        }
        Ok(flushed?)
    }

    // ----- helpers -------------------------------------------------------------------------

    pub(crate) fn seal(
        &self,
        system_id: &str,
        version: u64,
        credential: &Credential,
    ) -> Result<Vec<u8>, BrokerError> {
        let plaintext = zeroize::Zeroizing::new(
            serde_json::to_vec(credential)
                .map_err(|_| BrokerError::Internal("could not encode the credential"))?,
        );
        Ok(read(&self.keyring).seal(
            &RecordBinding {
                system_id,
                credential_type: credential.credential_type(),
                version,
            },
            &plaintext,
        ))
    }

    /// `sealed` (made by [`Self::seal`] for this system, version and credential type) under the
    /// key that is primary now: a write sealed once before its retries is re-wrapped when a
    /// rotation made another key primary meanwhile, so that it never lands under a key a retire
    /// may have removed. The data ciphertext stays (see [`crate::crypto::same_sealing`]).
    /// `None` when it cannot be re-wrapped (its key is retired already): seal it again.
    pub(crate) fn on_primary(
        &self,
        system_id: &str,
        version: u64,
        credential_type: crate::model::CredentialType,
        sealed: &[u8],
    ) -> Option<Vec<u8>> {
        let keyring = read(&self.keyring);
        match crate::crypto::parse_header(sealed) {
            Ok(h) if h.kek_id != keyring.primary_id() => {
                let binding = RecordBinding {
                    system_id,
                    credential_type,
                    version,
                };
                keyring.rewrap(&binding, sealed).ok()
            }
            _ => Some(sealed.to_vec()),
        }
    }

    /// The sealing an attempt of a write sealed once before its retries writes: the last of
    /// `ours` on the primary key of the moment, or (its key retired meanwhile) a new sealing,
    /// added to `ours`. Every sealing in `ours` found stored is an attempt that landed.
    pub(crate) fn sealing_for_attempt(
        &self,
        ours: &mut Vec<Vec<u8>>,
        system_id: &str,
        version: u64,
        credential: &Credential,
    ) -> Result<Vec<u8>, BrokerError> {
        let kind = credential.credential_type();
        if let Some(moved) = ours
            .last()
            .and_then(|first| self.on_primary(system_id, version, kind, first))
        {
            return Ok(moved);
        }
        let fresh = self.seal(system_id, version, credential)?;
        ours.push(fresh.clone());
        Ok(fresh)
    }

    pub(crate) fn open_credential(&self, record: &SystemRecord) -> Result<Credential, BrokerError> {
        let plaintext = read(&self.keyring)
            .open(
                &RecordBinding {
                    system_id: &record.system_id,
                    credential_type: record.credential_type,
                    version: record.credential_version,
                },
                &record.sealed_credential,
            )
            .map_err(|e| {
                if let crate::crypto::CryptoError::UnknownKey(id) = e {
                    self.reload_keys_for_read(&record.system_id, id);
                    return BrokerError::Unavailable(format!(
                        "the stored credential of system '{}' is sealed under key {id:08x}, \
                         which this broker does not hold (another replica's new key, not \
                         loaded here yet: the keys are being reloaded; or a retired key); retry",
                        record.system_id
                    ));
                }
                tracing::error!(message = "Stored credential failed to decrypt.", system_id = %record.system_id, error = %e);
                BrokerError::DataLoss(format!(
                    "the stored credential of system '{}' failed authentication (tampered or \
                     corrupt); rotate in a new credential",
                    record.system_id
                ))
            })?;
        serde_json::from_slice(&plaintext).map_err(|_| {
            BrokerError::DataLoss(format!(
                "the stored credential of system '{}' is unreadable",
                record.system_id
            ))
        })
    }
}

/// A credential made ready to store: exchanged when it must be, checked when asked.
struct Prepared {
    credential: Credential,
    check: Option<AuthCheck>,
    issued: Option<Issued>,
}

async fn prepare(
    check_timeout: Duration,
    backend: &dyn Backend,
    system_id: &str,
    base_url: &str,
    credential: Credential,
    check: bool,
    consequence: &str,
) -> Result<Prepared, BrokerError> {
    let credential = match backend.resolve(base_url, &credential).await {
        Ok(Some(settled)) => settled,
        Ok(None) => credential,
        Err(e) => return Err(failed_check(&e.to_check(), consequence)),
    };
    if !check && !credential.requires_exchange() {
        return Ok(Prepared {
            credential,
            check: None,
            issued: None,
        });
    }
    let target = Target {
        system_id: Some(system_id),
        base_url,
        credential: &credential,
    };
    let mut issued = backend
        .issue(&target)
        .await
        .map_err(|e| failed_check(&e.to_check(), consequence))?;
    let result = if check {
        let mut c =
            match tokio::time::timeout(check_timeout, backend.verify(&target, &issued)).await {
                Ok(c) => c,
                Err(_) => check_timed_out(check_timeout),
            };
        warn_expiry(
            &mut c,
            credential.expires_at(),
            credential.credential_type(),
        );
        if !c.ok {
            let e = failed_check(&c, consequence);
            // The check may have had the vendor turn the refresh token over before it failed.
            return Err(match &issued.updated_credential {
                Some(turned) => unkept(e, credential.refresh_token(), turned, system_id),
                None => e,
            });
        }
        Some(c)
    } else {
        None
    };
    let stored = issued.updated_credential.take().unwrap_or(credential);
    Ok(Prepared {
        credential: stored,
        check: result,
        issued: Some(issued),
    })
}

/// How far ahead a check warns about a credential's known expiry.
pub const EXPIRY_WARNING_DAYS: u64 = 30;

/// Adds an expiry warning (or, once expired, a failure) to a check.
/// Connected grants are not warned about: their horizon is an idle limit the keep-alive sweep
/// pushes back, nothing an admin must act on.
fn warn_expiry(check: &mut AuthCheck, expires_at: Option<u64>, kind: CredentialType) {
    if kind == CredentialType::OAuthAuthorizationCode {
        return;
    }
    let Some(at) = expires_at else { return };
    let now = unix_now();
    if at <= now {
        check.ok = false;
        check.failure = Some(crate::model::AuthFailure::ExpiredOrRevoked);
        check.message = format!(
            "the credential's expiry date has passed; create a new one and rotate it in. {}",
            check.message
        );
    } else if at - now <= EXPIRY_WARNING_DAYS * 86_400 {
        let days = (at - now).div_ceil(86_400);
        check.add_sentence(&format!(
            "Warning: the credential expires in {days} day(s); create a new one and rotate it \
             in before then."
        ));
    }
}

fn check_credential_type(kind: SystemKind, credential: &Credential) -> Result<(), BrokerError> {
    let accepted = kind.accepted_credentials();
    if accepted.contains(&credential.credential_type()) {
        return Ok(());
    }
    let names: Vec<&str> = accepted.iter().map(|c| c.field_name()).collect();
    Err(BrokerError::invalid(
        "credential",
        format!(
            "{} does not accept {}; use {}",
            kind.display_name(),
            credential.credential_type(),
            names.join(" or ")
        ),
    ))
}

fn check_timed_out(deadline: Duration) -> AuthCheck {
    AuthCheck::failed(
        AuthFailure::Unreachable,
        format!(
            "the check timed out: it did not finish within the upstream timeout ({} s); the \
             vendor is slow or unreachable",
            deadline.as_secs_f32()
        ),
    )
}

fn failed_check(check: &AuthCheck, consequence: &str) -> BrokerError {
    let class = check.failure.map(|f| f.as_str()).unwrap_or("unknown");
    BrokerError::FailedPrecondition(format!(
        "credential check failed ({class}): {}; {consequence}",
        check.message
    ))
}

fn not_connected(system_id: &str) -> String {
    format!(
        "not connected yet: run `credbrokerctl system connect {system_id}` and allow access at the \
         vendor"
    )
}

fn already_exists(system_id: &str) -> BrokerError {
    BrokerError::AlreadyExists(format!("system '{system_id}' already exists"))
}

/// How often a replica reloads its callers from a shared store whatever the feed says.
pub const CALLER_RELOAD_INTERVAL: Duration = Duration::from_secs(30);

/// Checks a system id named in a request (before it touches the audit trail, a map or the store).
pub fn validate_system_id(system_id: &str) -> Result<(), BrokerError> {
    if system_id.is_empty() {
        return Err(BrokerError::invalid("system_id", "is required"));
    }
    validate_slug(system_id, MAX_SYSTEM_ID_LEN).map_err(|m| BrokerError::invalid("system_id", m))
}

/// The longest display name a system may have, in characters.
pub const MAX_DISPLAY_NAME: usize = 200;
/// The longest description a system may have, in characters.
pub const MAX_DESCRIPTION: usize = 4000;

/// Checks an admin's label (shown on pages and terminals, sent with every event of its
/// system): at most `max` characters, none hidden (see [`crate::util::text::hidden`]); a
/// multi-line one may hold line breaks (a browser's CR LF too) and tabs.
pub fn validate_label(
    field: &'static str,
    text: &str,
    max: usize,
    multi_line: bool,
) -> Result<(), BrokerError> {
    if text.len() > 4 * max || text.chars().count() > max {
        return Err(BrokerError::invalid(
            field,
            format!("is longer than {max} characters"),
        ));
    }
    // A CR only as part of a CR LF: alone it rewrites a terminal's line.
    let lone_cr = text.replace("\r\n", "\n").contains('\r');
    let allowed = |c: char| multi_line && matches!(c, '\n' | '\r' | '\t');
    if lone_cr
        || text
            .chars()
            .any(|c| crate::util::text::hidden(c) && !allowed(c))
    {
        return Err(BrokerError::invalid(
            field,
            "holds control or invisible characters",
        ));
    }
    Ok(())
}

/// Checks a slug: `[a-z0-9][a-z0-9._-]{0,max-1}`.
pub fn validate_slug(s: &str, max: usize) -> Result<(), String> {
    // Length first: a huge value is refused without being scanned (ids are checked on every
    // call, the warm GetAccessToken included).
    let ok = !s.is_empty()
        && s.len() <= max
        && s.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || (i > 0 && matches!(b, b'.' | b'_' | b'-'))
        });
    if !ok {
        return Err(format!(
            "'{}' must match [a-z0-9][a-z0-9._-]{{0,{}}}",
            s.chars().take(140).collect::<String>(),
            max - 1
        ));
    }
    Ok(())
}

fn token_file_error(e: std::io::Error) -> OpenError {
    OpenError::AdminToken(e.to_string())
}

/// Checks the store's format and the master key against it (initializing a fresh store).
async fn check_format(
    store: &dyn CredentialStore,
    keyring: &Keyring,
    settings: &BrokerSettings,
) -> Result<(), OpenError> {
    let kcv_key = format!("kcv/{:08x}", keyring.root_id());
    match store.get_meta("format_version").await? {
        None => {
            if settings.expect_initialized {
                return Err(OpenError::Damaged(
                    "the store has no format record although this data directory was \
             initialized before (truncated or replaced files?); restore it from a \
             backup"
                        .to_owned(),
                ));
            }
            let empty = store.count_systems().await? == 0 && store.list_callers().await?.is_empty();
            if !empty {
                return Err(OpenError::Damaged("format version missing".to_owned()));
            }
            store.put_meta(&kcv_key, &keyring.key_check_value()).await?;
            store
                .put_meta("format_version", STORE_FORMAT_VERSION.as_bytes())
                .await?;
        }
        Some(v) if v == STORE_FORMAT_VERSION.as_bytes() => match store.get_meta(&kcv_key).await? {
            Some(kcv) if keyring.verify_key_check_value(&kcv) => {}
            _ => return Err(OpenError::WrongKey),
        },
        Some(_) => {
            return Err(OpenError::Damaged(
                "unknown store format version".to_owned(),
            ))
        }
    }
    Ok(())
}

/// Wraps the store so that every system and caller record is authenticated under a key derived
/// from the master key. A store written before record authentication is refused unless the
/// operator asks to adopt its records (once, when upgrading).
async fn authenticate_records(
    store: Arc<dyn CredentialStore>,
    keyring: &Keyring,
    settings: &BrokerSettings,
) -> Result<Arc<dyn CredentialStore>, OpenError> {
    use crate::store::{AuthenticatedStore, INTEGRITY_META_KEY};
    let marked = store.get_meta(INTEGRITY_META_KEY).await?.as_deref() == Some(b"1".as_slice());
    if marked && settings.adopt_unauthenticated_records {
        return Err(OpenError::AdoptionLeftOn);
    }
    let empty =
        marked || (store.count_systems().await? == 0 && store.list_callers().await?.is_empty());
    let authenticated = AuthenticatedStore::new(store, keyring.derive_subkey("record-integrity"));
    if !marked {
        if !empty && !settings.adopt_unauthenticated_records {
            return Err(OpenError::Unauthenticated);
        }
        if !empty {
            let (systems, callers) = authenticated.adopt_untagged().await?;
            tracing::warn!(
                message = "Adopted records written before record authentication.",
                systems,
                callers
            );
        }
        authenticated.put_meta(INTEGRITY_META_KEY, b"1").await?;
    }
    Ok(Arc::new(authenticated))
}

/// A rotation checked its credential against `checked`: it is written on top of `current` only
/// while that is the same system (not deleted and registered again, perhaps for another
/// host) with the same credential version (not rotated by someone else meanwhile; health
/// notes, 401 counts and re-wraps leave the version as it is).
fn rotating_the_same(checked: &SystemRecord, current: &SystemRecord) -> Result<(), BrokerError> {
    let id = &current.system_id;
    if (current.kind, current.created_at, &current.base_url)
        != (checked.kind, checked.created_at, &checked.base_url)
    {
        return Err(BrokerError::FailedPrecondition(format!(
            "system '{id}' was deleted and registered again meanwhile; nothing was stored"
        )));
    }
    if current.credential_version != checked.credential_version {
        return Err(BrokerError::FailedPrecondition(format!(
            "the credential of system '{id}' was replaced meanwhile (now version {}); nothing \
             was stored: check it and rotate again",
            current.credential_version
        )));
    }
    Ok(())
}

/// Whether `sealed`, read back from the store, is one of the sealings a write made (see
/// [`Broker::sealing_for_attempt`]).
pub(crate) fn is_ours(ours: &[Vec<u8>], sealed: &[u8]) -> bool {
    ours.iter().any(|o| crate::crypto::same_sealing(o, sealed))
}

/// The version a new credential of `current` gets.
pub(crate) fn next_version(current: &SystemRecord) -> Result<u64, BrokerError> {
    version_after(current.credential_version, &current.system_id)
}

/// The version after `version`; an exhausted counter is an error, never a wrap to 0.
fn version_after(version: u64, system_id: &str) -> Result<u64, BrokerError> {
    version.checked_add(1).ok_or_else(|| {
        BrokerError::FailedPrecondition(format!(
            "the credential versions of '{system_id}' are exhausted; register it under another id"
        ))
    })
}

/// `e`, which stopped `system_id`'s credential prepared from one holding the refresh token
/// `given` from being stored, saying so (and logging it: the caller may be gone) when the vendor
/// turned that refresh token over meanwhile (the given one may be spent).
fn unkept(
    e: BrokerError,
    given: Option<&SecretString>,
    prepared: &Credential,
    system_id: &str,
) -> BrokerError {
    let turned = match (given, prepared.refresh_token()) {
        (Some(a), Some(b)) => a.expose_secret() != b.expose_secret(),
        _ => false,
    };
    if !turned {
        return e;
    }
    tracing::warn!(message = "The vendor issued a new refresh token during a check, and it could not be stored; the one given may be spent.", system_id = %system_id, error = %e);
    e.noted(
        "the vendor issued a new refresh token during the check, which could not be kept, so \
         the one given may be spent: run the grant or the connection again",
    )
}

/// The `meta` key that keeps the last credential version of a deleted system.
fn retired_key(system_id: &str) -> String {
    format!("retired-version/{system_id}")
}

/// A new caller token.
fn new_caller_token() -> SecretString {
    SecretString::new(format!("cbt_{}", crate::util::random::url_token::<32>()))
}

fn generate_id(kind: SystemKind) -> String {
    format!(
        "{}-{}",
        kind.slug().replace('_', "-"),
        crate::util::random::hex_id::<6>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a token file (an embedder), an admin the store committed before its answer was
    /// lost is still handed back: the next try of the start finds its token among the stored
    /// callers.
    #[cfg(feature = "fault-injection")]
    #[tokio::test]
    async fn an_admin_whose_answer_was_lost_is_handed_back_without_a_token_file() {
        use crate::store::faulty::{FaultControl, FaultyStore};
        use std::sync::atomic::Ordering::SeqCst;
        let control = Arc::new(FaultControl::default());
        control.lost_caller_answers.store(1, SeqCst);
        let inner = Arc::new(crate::store::memory::MemoryStore::new());
        let store = Arc::new(FaultyStore::new(inner.clone(), control.clone()));
        let settings = BrokerSettings::default();
        let start = settings.start_token.clone();
        let open = |settings| {
            let key = crate::crypto::MasterKey::from_bytes(zeroize::Zeroizing::new([7u8; 32]));
            let registry = Registry::from_backends(Vec::new());
            Broker::open(store.clone(), Keyring::new(key), registry, settings)
        };
        // The first try meets a store that stopped answering after the commit.
        let first = open(settings.clone()).await.map(|_| ());
        assert!(matches!(
            first,
            Err(OpenError::Store(StoreError::Unreachable(_)))
        ));
        let (broker, token) = open(settings).await.unwrap();
        let token = token.expect("the committed admin's token");
        assert_eq!(control.injected.load(SeqCst), 2);
        assert!(broker.callers.authenticate(token.expose_secret()).is_ok());
        assert_eq!(inner.list_callers().await.unwrap().len(), 1);
        // Settled: nothing of it stays in the settings.
        assert_eq!(
            start
                .get_or(|| SecretString::new("none".to_owned()))
                .expose_secret(),
            "none"
        );
    }

    #[test]
    fn slugs() {
        assert!(validate_slug("acme-asana.1_x", 128).is_ok());
        for bad in ["", "-a", "A", "a b", "a/b", &"a".repeat(129)] {
            assert!(validate_slug(bad, 128).is_err(), "{bad}");
        }
    }
}
