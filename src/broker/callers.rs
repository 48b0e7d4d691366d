//! Callers: who may call the broker, and authentication ("authn") of each call by caller token
//! or client certificate. [`Callers`] owns the in-memory view (by token hash, never the token)
//! and the set of tokens seen revoked; the `impl Broker` below adds what needs the store.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{new_caller_token, validate_slug, Broker, MAX_CALLER_NAME_LEN, MAX_SYSTEM_ID_LEN};
use crate::error::BrokerError;
use crate::model::{unix_now, CallerRecord, Role, SystemKind};
use crate::secret::SecretString;
use crate::store::StoreError;
use crate::util::hex;
use crate::util::sync::{lock, read, write};

/// The most system id patterns one caller may be scoped to.
pub const MAX_CALLER_PATTERNS: usize = 64;

/// An authenticated caller (its `Debug` leaves out the token hash, a console session's key).
#[derive(Clone)]
pub struct Caller {
    /// Caller name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Workers: system id patterns; empty = any.
    pub system_patterns: Vec<String>,
    /// Workers: kinds; empty = any.
    pub kinds: Vec<SystemKind>,
    /// Token expiry, seconds since the epoch.
    pub expires_at: Option<u64>,
    hash: [u8; 32],
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("system_patterns", &self.system_patterns)
            .field("kinds", &self.kinds)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl Caller {
    /// The SHA-256 of the caller's token (what a console session remembers it by).
    pub fn token_hash(&self) -> [u8; 32] {
        self.hash
    }

    fn from_record(c: &CallerRecord, hash: [u8; 32]) -> Self {
        Self {
            name: c.name.clone(),
            role: c.role,
            system_patterns: c.system_patterns.clone(),
            kinds: c.kinds.clone(),
            expires_at: c.expires_at,
            hash,
        }
    }

    /// True when the caller's id patterns admit `system_id` (admins: always).
    pub fn may_use_id(&self, system_id: &str) -> bool {
        self.role == Role::Admin
            || self.system_patterns.is_empty()
            || self
                .system_patterns
                .iter()
                .any(|p| crate::model::pattern_matches(p, system_id))
    }

    /// True when the caller's kinds admit `kind` (admins: always).
    pub fn may_use_kind(&self, kind: SystemKind) -> bool {
        self.role == Role::Admin || self.kinds.is_empty() || self.kinds.contains(&kind)
    }

    /// True when the caller is limited by kind (so even "not found" must not leak).
    pub fn is_kind_scoped(&self) -> bool {
        self.role != Role::Admin && !self.kinds.is_empty()
    }
}

/// What a new caller may do beyond its role.
#[derive(Debug, Clone, Default)]
pub struct CallerScope {
    /// System id patterns (`*` wildcard).
    pub system_patterns: Vec<String>,
    /// Kinds.
    pub kinds: Vec<SystemKind>,
    /// Token expiry, seconds since the epoch.
    pub expires_at: Option<u64>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRefusal {
    /// No caller has this token (or it was revoked).
    Unknown,
    /// The caller's token expired (the caller's name: the refusal is audited under it).
    Expired(String),
    /// A client certificate's names match more than one caller.
    Ambiguous,
}

/// What a call presents to prove who it is (its `Debug` never shows a token).
#[derive(Clone, Copy)]
pub enum Presented<'a> {
    /// A bearer caller token.
    Token(&'a str),
    /// The SAN DNS names of a verified client certificate.
    Certificate(&'a [String]),
    /// A console session's caller, by token hash (set in process only).
    Session(&'a [u8; 32]),
    /// Nothing.
    Nothing,
}

impl std::fmt::Debug for Presented<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token(_) => f.write_str("Token(<redacted>)"),
            Self::Certificate(names) => f.debug_tuple("Certificate").field(names).finish(),
            Self::Session(_) => f.write_str("Session(<redacted>)"),
            Self::Nothing => f.write_str("Nothing"),
        }
    }
}

/// The accepted callers, by token hash and by name (ASCII lower case: a certificate's names
/// match case-insensitively), so neither a proxied call nor a certificate's call scans them all.
#[derive(Default)]
struct Accepted {
    by_hash: HashMap<[u8; 32], Arc<Caller>>,
    by_name: HashMap<String, Vec<Arc<Caller>>>,
}

impl Accepted {
    fn insert(&mut self, caller: Arc<Caller>) {
        self.remove(&caller.hash);
        let named = self.by_name.entry(caller.name.to_ascii_lowercase());
        named.or_default().push(caller.clone());
        self.by_hash.insert(caller.hash, caller);
    }

    fn remove(&mut self, hash: &[u8; 32]) {
        let Some(gone) = self.by_hash.remove(hash) else {
            return;
        };
        let key = gone.name.to_ascii_lowercase();
        if let Some(named) = self.by_name.get_mut(&key) {
            named.retain(|c| c.hash != *hash);
            if named.is_empty() {
                self.by_name.remove(&key);
            }
        }
    }

    /// The callers whose name is `name` ignoring ASCII case (names made through the API are
    /// lower case already, and so are a certificate's names as TLS hands them on: no copy).
    fn named(&self, name: &str) -> &[Arc<Caller>] {
        let found = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_name.get(&name.to_ascii_lowercase())
        } else {
            self.by_name.get(name)
        };
        found.map(Vec::as_slice).unwrap_or(&[])
    }

    /// Leaves out every caller whose token hash is in `revoked`.
    fn without(mut self, revoked: &HashSet<[u8; 32]>) -> Self {
        let gone: Vec<[u8; 32]> = (self.by_hash.keys())
            .filter(|h| revoked.contains(*h))
            .copied()
            .collect();
        for h in &gone {
            self.remove(h);
        }
        self
    }
}

/// The callers this process accepts, by token hash, and the token hashes it saw revoked.
#[derive(Default)]
pub struct Callers {
    accepted: RwLock<Accepted>,
    /// Token hashes of callers seen revoked: never installed again by this process.
    revoked: Mutex<HashSet<[u8; 32]>>,
    /// Callers created by this process, numbered (with the last number): a reload whose read
    /// of the store began before one was created keeps it (its list may not hold it yet);
    /// dropped once a reload's read began after it.
    created: Mutex<(u64, Vec<Created>)>,
    /// Held by a reload from the store (one at a time: a later read installed before an earlier
    /// one would prune a caller the earlier list lacks).
    reloading: tokio::sync::Mutex<()>,
}

/// A caller created by this process, with its number.
type Created = (u64, Arc<Caller>);

/// The most callers created here that a reload keeps beside its list.
const MAX_CREATED_KEPT: usize = 4096;

impl std::fmt::Debug for Callers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callers")
            .field("accepted", &read(&self.accepted).by_hash.len())
            .finish_non_exhaustive()
    }
}

impl Callers {
    /// The number of the last caller created here: taken before a reload reads the store.
    pub(crate) fn created_so_far(&self) -> u64 {
        lock(&self.created).0
    }

    /// Replaces the accepted callers with `callers` (revoked ones left out, and remembered),
    /// read from the store after every caller created here so far.
    pub(crate) fn install(&self, callers: Vec<CallerRecord>) {
        self.install_read_after(callers, self.created_so_far());
    }

    /// [`Self::install`] for a list whose read began after the caller numbered `read_after` was
    /// created here: the callers created since are kept, though the list may not hold them.
    pub(crate) fn install_read_after(&self, callers: Vec<CallerRecord>, read_after: u64) {
        let mut accepted = Accepted::default();
        for c in &callers {
            if let (true, Some(hash)) = (c.revoked, hex::decode::<32>(&c.token_sha256)) {
                lock(&self.revoked).insert(hash);
            }
        }
        for c in callers.iter().filter(|c| !c.revoked) {
            if let Some(hash) = self.usable_hash(c) {
                accepted.insert(Arc::new(Caller::from_record(c, hash)));
            }
        }
        {
            let mut created = lock(&self.created);
            created.1.retain(|(n, _)| *n > read_after);
            for (_, c) in &created.1 {
                accepted.insert(c.clone());
            }
        }
        // Asked again under the lock: a caller revoked since it was read is not put back
        // (`forget` marks it revoked before it takes this lock to drop it).
        let mut current = write(&self.accepted);
        *current = accepted.without(&lock(&self.revoked));
    }

    /// The token hash of a caller that may be installed: never one this process has seen
    /// revoked (a revoked caller's earlier row put back in the store stays refused).
    fn usable_hash(&self, c: &CallerRecord) -> Option<[u8; 32]> {
        let hash = hex::decode::<32>(&c.token_sha256)?;
        if lock(&self.revoked).contains(&hash) {
            tracing::error!(message = "A caller this broker saw revoked is stored as active again (an old row put back?); it stays refused.", caller = %c.name);
            return None;
        }
        Some(hash)
    }

    /// Accepts a caller just created, whose token hashes to `hash`.
    fn insert(&self, record: &CallerRecord, hash: [u8; 32]) {
        let caller = Arc::new(Caller::from_record(record, hash));
        {
            let mut created = lock(&self.created);
            created.0 += 1;
            let n = created.0;
            created.1.push((n, caller.clone()));
            // A reload's read lasts seconds: without reloads (one process, no shared store),
            // only the latest are worth keeping.
            let excess = created.1.len().saturating_sub(MAX_CREATED_KEPT);
            created.1.drain(..excess);
        }
        let mut accepted = write(&self.accepted);
        // As in `install`: never one revoked meanwhile.
        if !lock(&self.revoked).contains(&hash) {
            accepted.insert(caller);
        }
    }

    /// Drops a revoked caller, for good.
    pub(crate) fn forget(&self, c: &CallerRecord) {
        if let Some(hash) = hex::decode::<32>(&c.token_sha256) {
            lock(&self.revoked).insert(hash);
            write(&self.accepted).remove(&hash);
        }
    }

    /// Makes a stored (restored) caller usable at once, or forgets it if it is revoked.
    pub(crate) fn load(&self, record: &CallerRecord) {
        if record.revoked {
            return self.forget(record);
        }
        if let Some(hash) = self.usable_hash(record) {
            self.insert(record, hash);
        }
    }

    /// The caller holding `token`, if any. Revoked callers are not found.
    pub fn authenticate(&self, token: &str) -> Result<Arc<Caller>, AuthRefusal> {
        self.authenticate_hash(&token_sha256(token))
    }

    /// The caller whose token hashes to `hash`, if any. Revoked callers are not found.
    fn authenticate_hash(&self, hash: &[u8; 32]) -> Result<Arc<Caller>, AuthRefusal> {
        let hash = *hash;
        let accepted = read(&self.accepted);
        let c = accepted.by_hash.get(&hash).ok_or(AuthRefusal::Unknown)?;
        // The map lookup is by hash; confirm in constant time anyway.
        if !bool::from(c.hash.ct_eq(&hash)) {
            return Err(AuthRefusal::Unknown);
        }
        if expired(c.expires_at, unix_now()) {
            return Err(AuthRefusal::Expired(c.name.clone()));
        }
        Ok(c.clone())
    }

    /// The active caller with this name.
    pub fn by_name(&self, name: &str) -> Option<Arc<Caller>> {
        let accepted = read(&self.accepted);
        let mut exact = accepted.named(name).iter().filter(|c| c.name == name);
        // The store keeps names unique; two here (memory and store apart) name no one.
        let one = exact.next().filter(|_| exact.next().is_none())?;
        (!expired(one.expires_at, unix_now())).then(|| one.clone())
    }

    /// The caller named by a verified client certificate (its SAN DNS names), if any.
    pub fn authenticate_names(&self, names: &[String]) -> Result<Arc<Caller>, AuthRefusal> {
        let accepted = read(&self.accepted);
        // Each caller once, however many of the names match it.
        let mut matching = names.iter().flat_map(|n| accepted.named(n));
        let c = matching.next().ok_or(AuthRefusal::Unknown)?;
        if matching.any(|other| other.hash != c.hash) {
            return Err(AuthRefusal::Ambiguous);
        }
        if expired(c.expires_at, unix_now()) {
            return Err(AuthRefusal::Expired(c.name.clone()));
        }
        Ok(c.clone())
    }

    /// Authenticates one call (a token wins over a certificate; tokens only when
    /// `bearer_tokens`) and checks it may make a call that needs `need`. A refusal is
    /// `UNAUTHENTICATED` or `PERMISSION_DENIED`, with the caller's name when it was known.
    pub fn authn(
        &self,
        presented: Presented<'_>,
        bearer_tokens: bool,
        need: Role,
    ) -> Result<Arc<Caller>, (BrokerError, Option<String>)> {
        let refused = |r: AuthRefusal, what: &str| {
            let (message, name) = match r {
                AuthRefusal::Unknown => (format!("invalid or revoked {what}"), None),
                AuthRefusal::Expired(name) => (format!("the {what} has expired"), Some(name)),
                AuthRefusal::Ambiguous => (
                    format!("the {what} names more than one caller; refused as ambiguous"),
                    None,
                ),
            };
            (BrokerError::Unauthenticated(message), name)
        };
        let unauthenticated = |m: &str| (BrokerError::Unauthenticated(m.to_owned()), None);
        let caller = match presented {
            Presented::Token(_) if !bearer_tokens => {
                return Err(unauthenticated(
                    "bearer tokens are disabled; present a client certificate",
                ))
            }
            Presented::Token(token) => self
                .authenticate(token)
                .map_err(|r| refused(r, "caller token"))?,
            Presented::Certificate(names) => self
                .authenticate_names(names)
                .map_err(|r| refused(r, "client certificate identity"))?,
            Presented::Session(hash) => self
                .authenticate_hash(hash)
                .map_err(|r| refused(r, "console session"))?,
            Presented::Nothing => {
                return Err(unauthenticated(
                    "missing caller token: send 'authorization: Bearer <token>'",
                ))
            }
        };
        if need == Role::Admin && caller.role != Role::Admin {
            let e = BrokerError::PermissionDenied(format!(
                "caller '{}' has role {}, which may only call GetAccessToken",
                caller.name, caller.role
            ));
            return Err((e, Some(caller.name.clone())));
        }
        Ok(caller)
    }
}

/// What the store keeps of a caller token: its SHA-256.
fn token_sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether `token` is an active admin's among `callers`.
pub(super) fn is_admin_token(callers: &[CallerRecord], token: &str) -> bool {
    let hash = token_sha256(token);
    callers.iter().any(|c| {
        c.role == Role::Admin && !c.revoked && hex::decode::<32>(&c.token_sha256) == Some(hash)
    })
}

impl Broker {
    /// Creates a caller and returns it with its token (shown once).
    pub async fn create_caller(
        &self,
        name: &str,
        role: Role,
        mut scope: CallerScope,
    ) -> Result<(CallerRecord, SecretString), BrokerError> {
        validate_slug(name, MAX_CALLER_NAME_LEN).map_err(|m| BrokerError::invalid("name", m))?;
        if role == Role::Admin && (!scope.system_patterns.is_empty() || !scope.kinds.is_empty()) {
            return Err(BrokerError::invalid(
                "system_patterns",
                "admins cannot be scoped; scope worker callers",
            ));
        }
        // Every call of the caller is checked against its scope: it stays small.
        if scope.system_patterns.len() > MAX_CALLER_PATTERNS {
            return Err(BrokerError::invalid(
                "system_patterns",
                format!("more than {MAX_CALLER_PATTERNS} patterns; use * wildcards"),
            ));
        }
        // Each kind once (a repeated kind is no wider a scope, only a longer one to check).
        let mut kinds = Vec::with_capacity(scope.kinds.len().min(SystemKind::ALL.len()));
        for k in scope.kinds.drain(..) {
            if !kinds.contains(&k) {
                kinds.push(k);
            }
        }
        scope.kinds = kinds;
        for p in &scope.system_patterns {
            validate_slug(&p.replace('*', "x"), MAX_SYSTEM_ID_LEN).map_err(|_| {
                BrokerError::invalid(
                    "system_patterns",
                    format!("'{p}' must be a system id with optional * wildcards"),
                )
            })?;
        }
        if scope.expires_at.is_some_and(|e| e <= unix_now()) {
            return Err(BrokerError::invalid("expires_at", "must be in the future"));
        }
        // Its token is a secret, handed out only once audited: while the trail cannot be
        // written (fail-closed), no caller is created whose token would be withheld.
        if self.audit.fail_closed() && !self.audit.is_healthy() {
            return Err(BrokerError::Unavailable(
                "the audit trail cannot be written; no caller is created until it recovers"
                    .to_owned(),
            ));
        }
        self.create_caller_with(name, role, scope, new_caller_token())
            .await
            .map_err(|e| match e {
                StoreError::AlreadyExists => {
                    BrokerError::AlreadyExists(format!("caller '{name}' already exists"))
                }
                other => other.into(),
            })
    }

    /// [`Broker::create_caller`] with a token chosen before (the bootstrap admin's, written to
    /// its file first), answering with the store's own error.
    pub(super) async fn create_caller_with(
        &self,
        name: &str,
        role: Role,
        scope: CallerScope,
        token: SecretString,
    ) -> Result<(CallerRecord, SecretString), StoreError> {
        let hash = token_sha256(token.expose_secret());
        let record = CallerRecord {
            name: name.to_owned(),
            role,
            token_sha256: hex::encode(&hash),
            created_at: unix_now(),
            revoked: false,
            system_patterns: scope.system_patterns,
            kinds: scope.kinds,
            expires_at: scope.expires_at,
            integrity: None,
        };
        self.store.insert_caller(&record).await?;
        self.callers.insert(&record, hash);
        Ok((record, token))
    }

    /// Every caller.
    pub async fn list_callers(&self) -> Result<Vec<CallerRecord>, BrokerError> {
        Ok(self.store.list_callers().await?)
    }

    /// Revokes a caller; its token stops working at once. An active admin (revoked nowhere, not
    /// expired) cannot be revoked unless another active admin lasts at least as long (no expiry,
    /// or a later one): nobody could administer the broker afterwards.
    /// Revocations run one at a time, across replicas too (the store's lock), so two admins
    /// revoking each other at once cannot both pass that rule.
    pub async fn revoke_caller(&self, name: &str) -> Result<CallerRecord, BrokerError> {
        let _serialized = self
            .admin_operation(&self.caller_ops, CALLER_OPERATIONS_LOCK)
            .await?;
        let callers = self.store.list_callers().await?;
        let mut record = callers
            .iter()
            .find(|c| c.name == name)
            .cloned()
            .ok_or_else(|| BrokerError::NotFound(format!("caller '{name}' not found")))?;
        if record.revoked {
            // Already revoked in the store (by another replica, or by hand): make sure this
            // process forgets it too.
            self.callers.forget(&record);
            return Ok(record);
        }
        let now = unix_now();
        let active =
            |c: &CallerRecord| c.role == Role::Admin && !c.revoked && !expired(c.expires_at, now);
        // Another admin stays only if it lasts as long: one that expires first would leave no
        // admin at all once it has (and nothing but an admin can create one).
        let lasts = |c: &CallerRecord| match (c.expires_at, record.expires_at) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(other), Some(this)) => other >= this,
        };
        let staying = callers
            .iter()
            .filter(|c| c.name != record.name && active(c) && lasts(c))
            .count();
        if active(&record) && staying == 0 {
            return Err(BrokerError::FailedPrecondition(format!(
                "'{name}' is the last admin that stays (any other expires before it); create \
                 another admin, without an expiry or expiring later, before revoking it"
            )));
        }
        self.mark_revoked(&mut record).await?;
        Ok(record)
    }

    /// Stores `record` as revoked and drops it from the accepted callers, for good.
    async fn mark_revoked(&self, record: &mut CallerRecord) -> Result<(), StoreError> {
        record.revoked = true;
        self.store.update_caller(record).await?;
        self.callers.forget(record);
        Ok(())
    }

    /// Revokes `name`, a caller just created whose token could not be handed out (its audit
    /// line failed, fail-closed): nobody holds its token, and it must not stay active. A
    /// failure is logged (the caller then stays until an admin revokes it).
    pub async fn withdraw_caller(&self, name: &str) {
        let withdrawn = async {
            let callers = self.store.list_callers().await?;
            if let Some(mut record) = callers.into_iter().find(|c| c.name == name) {
                self.mark_revoked(&mut record).await?;
            }
            Ok::<_, StoreError>(())
        };
        if let Err(e) = withdrawn.await {
            tracing::error!(message = "A caller whose token was not handed out could not be revoked; revoke it.", caller = %name, error = %e);
        }
    }

    pub(super) async fn reload_callers(&self) {
        let _one_at_a_time = self.callers.reloading.lock().await;
        let read_after = self.callers.created_so_far();
        match self.store.list_callers().await {
            Ok(c) => self.callers.install_read_after(c, read_after),
            Err(e) => {
                tracing::warn!(message = "Could not reload callers from the shared store.", error = %e)
            }
        }
    }
}

/// Whether a caller token with this expiry has expired at `now` (Unix seconds): the one rule.
fn expired(expires_at: Option<u64>, now: u64) -> bool {
    expires_at.is_some_and(|at| at <= now)
}

/// The store lock caller revocations hold (not a valid system id, so it never meets a refresh
/// lock).
const CALLER_OPERATIONS_LOCK: &str = "~caller-operations";

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, token: &str, role: Role) -> CallerRecord {
        let hash = token_sha256(token);
        CallerRecord {
            name: name.to_owned(),
            role,
            token_sha256: hex::encode(&hash),
            created_at: 0,
            revoked: false,
            system_patterns: Vec::new(),
            kinds: Vec::new(),
            expires_at: None,
            integrity: None,
        }
    }

    #[test]
    fn tokens_authenticate_until_revoked_and_never_come_back() {
        let callers = Callers::default();
        let admin = record("root", "cbt_root", Role::Admin);
        let worker = record("w1", "cbt_w1", Role::Worker);
        callers.install(vec![admin.clone(), worker.clone()]);
        assert_eq!(callers.authenticate("cbt_w1").unwrap().name, "w1");
        assert_eq!(
            callers.authenticate("cbt_nope").unwrap_err(),
            AuthRefusal::Unknown
        );
        callers.forget(&worker);
        assert_eq!(
            callers.authenticate("cbt_w1").unwrap_err(),
            AuthRefusal::Unknown
        );
        // Its old active row put back (a replayed store row) stays refused.
        callers.install(vec![admin, worker.clone()]);
        callers.load(&worker);
        assert_eq!(
            callers.authenticate("cbt_w1").unwrap_err(),
            AuthRefusal::Unknown
        );
        assert!(callers.by_name("w1").is_none());
    }

    /// A reload whose read of the store began before a caller was created here (another
    /// replica's change, the 30 s backstop) does not drop it; one that began after it does
    /// (the store is the truth then: a caller missing from it is gone).
    #[test]
    fn a_reload_read_before_a_caller_was_created_keeps_it() {
        let callers = Callers::default();
        let old = record("old", "cbt_old", Role::Worker);
        callers.install(vec![old.clone()]);
        let read_after = callers.created_so_far();
        let new = record("new", "cbt_new", Role::Worker);
        callers.insert(&new, token_sha256("cbt_new"));
        callers.install_read_after(vec![old.clone()], read_after);
        assert!(
            callers.authenticate("cbt_new").is_ok(),
            "a stale reload dropped it"
        );
        assert!(callers.authenticate("cbt_old").is_ok());
        callers.install_read_after(vec![old], callers.created_so_far());
        assert!(callers.authenticate("cbt_new").is_err());
    }

    #[test]
    fn expired_and_ambiguous_are_refused() {
        let callers = Callers::default();
        let mut old = record("old", "cbt_old", Role::Worker);
        old.expires_at = Some(1);
        callers.install(vec![
            old,
            record("svc-a", "cbt_a", Role::Worker),
            record("SVC-A", "cbt_b", Role::Worker),
        ]);
        assert_eq!(
            callers.authenticate("cbt_old").unwrap_err(),
            AuthRefusal::Expired("old".to_owned())
        );
        let names = vec!["svc-a".to_owned()];
        assert_eq!(
            callers.authenticate_names(&names).unwrap_err(),
            AuthRefusal::Ambiguous
        );
    }

    #[test]
    fn names_find_their_caller_until_it_goes() {
        let callers = Callers::default();
        let w1 = record("w1", "cbt_w1", Role::Worker);
        let many: Vec<CallerRecord> = (0..1000)
            .map(|i| record(&format!("svc-{i}"), &format!("cbt_{i}"), Role::Worker))
            .chain([w1.clone()])
            .collect();
        callers.install(many);
        assert_eq!(callers.by_name("svc-999").unwrap().name, "svc-999");
        assert!(callers.by_name("SVC-999").is_none(), "by_name is exact");
        // A certificate's names match ignoring case, each caller once however often named.
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let found = callers.authenticate_names(&names(&["nobody", "W1", "w1"]));
        assert_eq!(found.unwrap().name, "w1");
        let both = callers.authenticate_names(&names(&["w1", "svc-7"]));
        assert_eq!(both.unwrap_err(), AuthRefusal::Ambiguous);
        // Loading the same caller again keeps one entry; revoking it drops it from every index.
        callers.load(&w1);
        assert_eq!(read(&callers.accepted).named("w1").len(), 1);
        assert_eq!(
            callers.authenticate_names(&names(&["w1"])).unwrap().name,
            "w1"
        );
        callers.forget(&w1);
        assert!(callers.by_name("w1").is_none());
        let gone = callers.authenticate_names(&names(&["w1"]));
        assert_eq!(gone.unwrap_err(), AuthRefusal::Unknown);
        assert_eq!(callers.by_name("svc-0").unwrap().name, "svc-0");
        // Two callers of one name (store and memory apart) name no one; Debug hides the hash.
        let twin = record("svc-0", "cbt_twin", Role::Worker);
        callers.load(&twin);
        assert!(callers.by_name("svc-0").is_none());
        let shown = format!("{:?}", callers.authenticate("cbt_twin").unwrap());
        assert!(
            shown.contains("svc-0") && !shown.contains("hash"),
            "{shown}"
        );
        // A hash revoked before a batch lands is left out of it (what `install` asks under the lock).
        let revoked: HashSet<[u8; 32]> = [token_sha256("cbt_twin")].into();
        let mut fresh = Accepted::default();
        fresh.insert(Arc::new(Caller::from_record(
            &twin,
            token_sha256("cbt_twin"),
        )));
        let fresh = fresh.without(&revoked);
        assert!(fresh.by_hash.is_empty() && fresh.by_name.is_empty());
    }

    #[test]
    fn presented_tokens_never_print() {
        let shown = format!("{:?}", Presented::Token("cbt_secret-canary"));
        assert!(!shown.contains("canary"), "{shown}");
    }

    #[test]
    fn authn_says_why_with_the_right_code() {
        let callers = Callers::default();
        callers.install(vec![record("w1", "cbt_w1", Role::Worker)]);
        let code = |r: Result<Arc<Caller>, (BrokerError, Option<String>)>| {
            let (e, name) = r.unwrap_err();
            (e.code(), e.to_string(), name)
        };
        let (c, m, _) = code(callers.authn(Presented::Nothing, true, Role::Worker));
        assert_eq!(c, tonic::Code::Unauthenticated);
        assert!(m.contains("missing caller token"), "{m}");
        let (c, m, _) = code(callers.authn(Presented::Token("cbt_w1"), false, Role::Worker));
        assert_eq!(c, tonic::Code::Unauthenticated);
        assert!(m.contains("bearer tokens are disabled"), "{m}");
        let (c, m, name) = code(callers.authn(Presented::Token("cbt_w1"), true, Role::Admin));
        assert_eq!(
            (c, name.as_deref()),
            (tonic::Code::PermissionDenied, Some("w1"))
        );
        assert!(m.contains("may only call GetAccessToken"), "{m}");
        let ok = callers.authn(Presented::Token("cbt_w1"), true, Role::Worker);
        assert_eq!(ok.unwrap().name, "w1");
    }
}
