//! The quota book: what each system's vendor said about its quota, learned from every proxied
//! answer, and the rules that keep the workers inside it.
//!
//! - **Blocked**: the vendor asked for a pause (`Retry-After`, Salesforce's over-quota 403):
//!   until it passes, calls are refused locally without reaching the vendor.
//! - **Reserve**: a metered quota (remaining of limit) is not spent below `reserve_percent` of
//!   its limit, counting the calls in flight, so the reserve stays for admins and the next
//!   window's first sync.
//! - **Concurrency**: at most `max_concurrent` calls per system are in flight; more queue in
//!   arrival order (a fair semaphore) until a slot frees or `max_queue_wait_seconds` passes.
//!
//! A reading is taken from an answer only when it is not older than the one held: a lower count
//! always wins; a higher one only from a call that started after the held reading was taken (an
//! answer overtaken by a newer one cannot raise the count again) or from a new window.
//!
//! With replicas on PostgreSQL, changed readings are sent to the others (coalesced, changes
//! only, every [`SHARE_EVERY`] at most) signed under a key derived from the master key, and
//! merged there the same way: a block anywhere is a block everywhere within a second.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::backends::ratelimit::{RateSignals, MAX_WAIT};
use crate::model::SystemKind;
use crate::util::sync::{lock, read, write};

/// How often changed readings are sent to the other replicas, at most.
pub const SHARE_EVERY: Duration = Duration::from_millis(200);
/// A reserve refusal's `Retry-After` when the vendor names no reset.
const RESERVE_RETRY: Duration = Duration::from_secs(60);
/// A remaining count without a known reset is trusted this long; after it one call at a time
/// may go and bring a fresh count (windows the vendor does not date still move on).
const READING_TTL: Duration = Duration::from_secs(60);
/// Bytes of entries per broadcast (a PostgreSQL notification carries at most 8,000).
const SHARE_BYTES: usize = 6_000;
/// A broadcast older than this is not merged (nor is one replayed later).
const SHARE_MAX_AGE: Duration = Duration::from_secs(5);

/// One system's quota rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaLimits {
    /// Calls in flight at most (0: no cap).
    pub max_concurrent: u32,
    /// Share of a metered quota kept back, percent.
    pub reserve_percent: u8,
    /// A proxied GET answered 429 with a `Retry-After` up to this long is retried once after
    /// the wait (zero: never). Writes are never retried.
    pub local_retry_after_max: Duration,
    /// How long a call waits for a concurrency slot before its local 429.
    pub max_queue_wait: Duration,
}

/// Overrides of [`QuotaLimits`] from the configuration (per kind, per system).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsOverride {
    /// Calls in flight at most (0: no cap).
    pub max_concurrent: Option<u32>,
    /// Percent of a metered quota kept back (0–50).
    pub reserve_percent: Option<u8>,
    /// Longest `Retry-After` a proxied GET is retried after (0: never).
    pub local_retry_after_max_seconds: Option<u64>,
    /// Longest wait for a concurrency slot.
    pub max_queue_wait_seconds: Option<u64>,
}

impl LimitsOverride {
    fn apply(&self, l: &mut QuotaLimits) {
        if let Some(v) = self.max_concurrent {
            l.max_concurrent = v;
        }
        if let Some(v) = self.reserve_percent {
            l.reserve_percent = v;
        }
        if let Some(v) = self.local_retry_after_max_seconds {
            l.local_retry_after_max = Duration::from_secs(v);
        }
        if let Some(v) = self.max_queue_wait_seconds {
            l.max_queue_wait = Duration::from_secs(v);
        }
    }

    /// Problems with the values, for the configuration's error list.
    pub fn problems(&self, what: &str) -> Vec<String> {
        let mut p = Vec::new();
        if self.reserve_percent.is_some_and(|v| v > 50) {
            p.push(format!("{what}: reserve_percent must be between 0 and 50"));
        }
        if self.local_retry_after_max_seconds.is_some_and(|v| v > 60) {
            p.push(format!(
                "{what}: local_retry_after_max_seconds must be at most 60"
            ));
        }
        if self.max_queue_wait_seconds.is_some_and(|v| v > 300) {
            p.push(format!(
                "{what}: max_queue_wait_seconds must be at most 300"
            ));
        }
        if self.max_concurrent.is_some_and(|v| v > 10_000) {
            p.push(format!("{what}: max_concurrent must be at most 10000"));
        }
        p
    }
}

/// The configured quota rules: per kind, then per system.
#[derive(Debug, Clone, Default)]
pub struct QuotaSettings {
    /// Per kind.
    pub kinds: HashMap<SystemKind, LimitsOverride>,
    /// Per system id (wins over its kind's).
    pub systems: HashMap<String, LimitsOverride>,
}

impl QuotaSettings {
    /// The rules for `system_id` of `kind`.
    pub fn limits(&self, kind: SystemKind, system_id: &str) -> QuotaLimits {
        let mut l = QuotaLimits {
            // Salesforce allows 25 concurrent long-running calls per org; Asana 50 GETs in
            // flight per token; the others document no concurrency limit.
            max_concurrent: match kind {
                SystemKind::Salesforce => 25,
                SystemKind::Asana => 50,
                _ => 0,
            },
            reserve_percent: 5,
            local_retry_after_max: Duration::ZERO,
            max_queue_wait: Duration::from_secs(30),
        };
        if let Some(o) = self.kinds.get(&kind) {
            o.apply(&mut l);
        }
        if let Some(o) = self.systems.get(system_id) {
            o.apply(&mut l);
        }
        l
    }
}

/// Why the broker answered a call itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitReason {
    /// The vendor asked for a pause that has not passed.
    Blocked,
    /// The metered quota is down to its reserve.
    Reserve,
    /// No concurrency slot freed in time.
    Concurrency,
}

impl LimitReason {
    /// The metrics label (the metrics' one list of reasons, in this enum's order).
    pub fn as_str(self) -> &'static str {
        crate::metrics::QUOTA_REASONS
            .get(self as usize)
            .copied()
            .unwrap_or("other")
    }
}

/// A local refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// Why.
    pub reason: LimitReason,
    /// When to try again (whole seconds, at least one).
    pub retry_after: Duration,
}

/// A system's quota as the book knows it (`System.quota`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaView {
    /// Calls left, when known.
    pub remaining: Option<i64>,
    /// The window's size, when known.
    pub limit: Option<i64>,
    /// When the window resets (Unix seconds), when known.
    pub reset_at: Option<u64>,
    /// Calls are refused locally until then (Unix milliseconds), when blocked.
    pub blocked_until_ms: Option<u64>,
    /// Calls in flight on this replica.
    pub in_flight: u32,
}

#[derive(Debug, Default)]
struct State {
    remaining: Option<i64>,
    limit: Option<i64>,
    reset_at: Option<u64>,
    /// Unix milliseconds.
    blocked_until: Option<u64>,
    /// When the held remaining count was taken.
    read_at: Option<Instant>,
    in_flight: u32,
    /// When the held window (its reset) was taken.
    window_at: Option<Instant>,
    /// Calls counted locally in this window (vendors that send no remaining count).
    counting: bool,
    counted: i64,
}

impl State {
    /// The remaining count, when it is for a window that has not reset.
    fn remaining(&self, now_s: u64) -> Option<i64> {
        if self.reset_at.is_some_and(|r| r <= now_s) || self.stale() {
            return None;
        }
        match (self.counting, self.limit) {
            (true, Some(limit)) => Some(limit.saturating_sub(self.counted)),
            _ => self.remaining,
        }
    }

    /// A count past [`READING_TTL`] whose window has no known reset, or past [`MAX_WAIT`]
    /// whatever its window: one answer saying "none left until tomorrow" holds calls back at
    /// most as long as any vendor signal may, then a probe asks again.
    fn stale(&self) -> bool {
        self.stale_at(Instant::now())
    }

    fn stale_at(&self, now: Instant) -> bool {
        self.read_at.is_some_and(|at| {
            let age = now.saturating_duration_since(at);
            age > MAX_WAIT || (self.reset_at.is_none() && age > READING_TTL)
        })
    }

    fn screen(&self, limits: &QuotaLimits, now_ms: u64) -> Result<(), Limited> {
        if let Some(until) = self.blocked_until.filter(|u| *u > now_ms) {
            return Err(Limited {
                reason: LimitReason::Blocked,
                retry_after: ceil_secs(until - now_ms),
            });
        }
        let reserve = |limit: i64| {
            limit
                .saturating_mul(i64::from(limits.reserve_percent))
                .saturating_add(99)
                / 100
        };
        if let (true, Some(rem), Some(limit)) = (self.stale(), self.remaining, self.limit) {
            // An old count at the reserve: one probe at a time brings a fresh one.
            if rem <= reserve(limit) && self.in_flight > 0 {
                return Err(Limited {
                    reason: LimitReason::Reserve,
                    retry_after: Duration::from_secs(1),
                });
            }
        }
        let now_s = now_ms / 1000;
        if let (Some(rem), Some(limit)) = (self.remaining(now_s), self.limit) {
            // A local count already includes the calls in flight.
            let pending = if self.counting { 0 } else { self.in_flight };
            if rem.saturating_sub(i64::from(pending)) <= reserve(limit) {
                let retry = self
                    .reset_at
                    .filter(|r| *r > now_s)
                    .map_or(RESERVE_RETRY, |r| Duration::from_secs(r - now_s));
                return Err(Limited {
                    reason: LimitReason::Reserve,
                    retry_after: retry.clamp(Duration::from_secs(1), MAX_WAIT),
                });
            }
        }
        Ok(())
    }

    /// Takes a reading made by a call that started at `started`.
    fn learn(&mut self, s: &Reading, started: Instant) -> Learned {
        let mut l = Learned::default();
        if let Some(until) = s.blocked_until {
            if self.blocked_until.is_none_or(|b| until > b) {
                l.block_started = self.blocked_until.is_none_or(|b| b <= s.now_ms);
                self.blocked_until = Some(until);
                l.changed = true;
            }
        }
        if s.limit.is_some() && s.limit != self.limit {
            self.limit = s.limit;
            l.changed = true;
        }
        // A reset a second or two off is the same window (Zendesk counts it from now); an
        // earlier one is a late answer from a window gone by, and changes nothing.
        let new_window = s.reset_at.is_some_and(|r| match self.reset_at {
            None => true,
            Some(held) if r.abs_diff(held) <= 2 => false,
            Some(held) if r > held => true,
            // Earlier: from a window gone by when its call began before the held window was
            // taken, or when that reset has passed; else the held reset was the wrong one (a
            // broken answer's, far ahead).
            Some(_) => r > s.now_ms / 1000 && self.window_at.is_none_or(|at| started > at),
        });
        if new_window {
            // Moved back, the window keeps what it counted (the same calls reached the vendor).
            let back = self.reset_at.is_some_and(|held| s.reset_at < Some(held));
            self.window_at = Some(Instant::now());
            self.reset_at = s.reset_at;
            // The calls still in flight (this one among them) count in the new window: they
            // may reach the vendor after its reset.
            let in_flight = i64::from(self.in_flight).max(1);
            self.counted = if back {
                self.counted.max(in_flight)
            } else {
                in_flight
            };
            l.changed = true;
        }
        if let Some(counting) = s.count_locally {
            self.counting = counting;
        }
        if let Some(r) = s.remaining {
            // Newer: taken by a call that started after the held reading was taken.
            let newer = self.read_at.is_none_or(|at| started > at);
            if new_window || newer || self.remaining.is_none_or(|cur| r < cur) {
                l.changed |= self.remaining != Some(r);
                self.remaining = Some(r);
                self.read_at = Some(Instant::now());
            }
        } else if s.served && self.read_at.is_some_and(|at| started > at) && self.stale() {
            // A probe the vendor served without a count: the old count is forgotten, not
            // probed for again one call at a time until some answer carries one. An error
            // page's silence (a gateway's 503, a 401) or another replica's broadcast proves
            // nothing and keeps it.
            self.remaining = None;
            self.read_at = None;
            l.changed = true;
        }
        l
    }
}

/// What a reading changed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Learned {
    /// Something the other replicas should hear about.
    pub changed: bool,
    /// A block began (the system was not blocked before).
    pub block_started: bool,
}

/// A reading in the book's terms.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Reading {
    #[serde(rename = "r", skip_serializing_if = "Option::is_none")]
    remaining: Option<i64>,
    #[serde(rename = "l", skip_serializing_if = "Option::is_none")]
    limit: Option<i64>,
    #[serde(rename = "x", skip_serializing_if = "Option::is_none")]
    reset_at: Option<u64>,
    #[serde(rename = "b", skip_serializing_if = "Option::is_none")]
    blocked_until: Option<u64>,
    /// How old the count is (milliseconds), when shared.
    #[serde(rename = "a", skip_serializing_if = "Option::is_none")]
    age_ms: Option<u64>,
    /// Whether the vendor's count is kept locally: said by this replica's own answers only
    /// (another replica's broadcast leaves it as it is).
    #[serde(skip)]
    count_locally: Option<bool>,
    /// This replica's own answer, served by the vendor (never a broadcast).
    #[serde(skip)]
    served: bool,
    #[serde(skip)]
    now_ms: u64,
}

impl Reading {
    fn from_signals(s: &RateSignals, now_ms: u64) -> Self {
        Self {
            remaining: s.remaining,
            limit: s.limit,
            reset_at: s.reset_at,
            blocked_until: s.wait.map(|w| now_ms + w.as_millis() as u64),
            count_locally: s.limit.is_some().then_some(s.count_locally),
            served: s.served,
            now_ms,
            age_ms: None,
        }
    }
}

/// One system's entry in the book.
pub struct SystemQuota {
    kind: SystemKind,
    limits: QuotaLimits,
    slots: Option<Arc<tokio::sync::Semaphore>>,
    state: Mutex<State>,
    /// A block's health change is being announced (one announcement at a time).
    announcing: std::sync::atomic::AtomicBool,
}

impl SystemQuota {
    fn new(kind: SystemKind, limits: QuotaLimits) -> Self {
        Self {
            kind,
            limits,
            slots: (limits.max_concurrent > 0)
                .then(|| Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent as usize))),
            state: Mutex::new(State::default()),
            announcing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// True for the caller that may announce a block now (none is being announced).
    pub fn start_announcing(&self) -> bool {
        !self
            .announcing
            .swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// The announcement ended.
    pub fn stop_announcing(&self) {
        self.announcing
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// The system's kind.
    pub fn kind(&self) -> SystemKind {
        self.kind
    }

    /// Its rules.
    pub fn limits(&self) -> QuotaLimits {
        self.limits
    }

    /// What this system's book knows now.
    pub fn view(&self, now_ms: u64) -> QuotaView {
        let s = lock(&self.state);
        QuotaView {
            remaining: s.remaining(now_ms / 1000),
            limit: s.limit,
            reset_at: s.reset_at,
            blocked_until_ms: s.blocked_until.filter(|b| *b > now_ms),
            in_flight: s.in_flight,
        }
    }
}

/// A call admitted by the book: holds its concurrency slot and counts as in flight until
/// dropped.
pub struct QuotaPermit {
    quota: Arc<SystemQuota>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
    started: Instant,
}

impl QuotaPermit {
    /// The system's entry.
    pub fn quota(&self) -> &Arc<SystemQuota> {
        &self.quota
    }

    /// Whether it holds one of the system's concurrency slots (the system has a cap).
    pub fn holds_slot(&self) -> bool {
        self._slot.is_some()
    }
}

impl Drop for QuotaPermit {
    fn drop(&mut self) {
        let mut s = lock(&self.quota.state);
        s.in_flight = s.in_flight.saturating_sub(1);
    }
}

/// Every system's quota on this replica.
#[derive(Default)]
pub struct Quotas {
    settings: QuotaSettings,
    systems: RwLock<HashMap<String, Arc<SystemQuota>>>,
    /// Systems whose readings changed since the last broadcast.
    dirty: Mutex<HashSet<String>>,
    /// Wakes the broadcaster.
    kick: Arc<tokio::sync::Notify>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Waits in line (arrival order) for a concurrency slot, at most `wait`.
async fn queue(
    slots: &Arc<tokio::sync::Semaphore>,
    wait: Duration,
) -> Result<tokio::sync::OwnedSemaphorePermit, Limited> {
    match tokio::time::timeout(wait, slots.clone().acquire_owned()).await {
        Ok(Ok(p)) => Ok(p),
        _ => Err(Limited {
            reason: LimitReason::Concurrency,
            retry_after: Duration::from_secs(1),
        }),
    }
}

/// The health reason of a system the vendor blocks until `until_ms`.
pub fn blocked_reason(until_ms: u64) -> String {
    format!(
        "the vendor is rate limiting this system: the proxy holds calls back until {}",
        crate::util::time::date_time(until_ms / 1000)
    )
}

fn ceil_secs(ms: u64) -> Duration {
    Duration::from_secs(ms.div_ceil(1000).max(1))
}

impl Quotas {
    /// A book with `settings`.
    pub fn new(settings: QuotaSettings) -> Self {
        Self {
            settings,
            ..Default::default()
        }
    }

    fn entry(&self, system_id: &str, kind: SystemKind) -> Arc<SystemQuota> {
        if let Some(q) = read(&self.systems)
            .get(system_id)
            .filter(|q| q.kind == kind)
        {
            return q.clone();
        }
        let mut map = write(&self.systems);
        match map.get(system_id) {
            Some(q) if q.kind == kind => q.clone(),
            _ => {
                let q = Arc::new(SystemQuota::new(
                    kind,
                    self.settings.limits(kind, system_id),
                ));
                map.insert(system_id.to_owned(), q.clone());
                q
            }
        }
    }

    /// Forgets a deleted system.
    pub fn forget(&self, system_id: &str) {
        write(&self.systems).remove(system_id);
    }

    /// Admits one call to `system_id`, queueing for a concurrency slot when all are taken; a
    /// refusal says why and when to come back.
    pub async fn admit(&self, system_id: &str, kind: SystemKind) -> Result<QuotaPermit, Limited> {
        let quota = self.entry(system_id, kind);
        // Refused at once when blocked or down to the reserve: no point queueing.
        lock(&quota.state).screen(&quota.limits, now_ms())?;
        let slot = match &quota.slots {
            None => None,
            // A free slot is taken without arming a timer; else the call queues.
            Some(slots) => match slots.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => Some(queue(slots, quota.limits.max_queue_wait).await?),
            },
        };
        {
            let mut s = lock(&quota.state);
            s.screen(&quota.limits, now_ms())?;
            s.in_flight += 1;
            s.counted += 1;
        }
        Ok(QuotaPermit {
            quota,
            _slot: slot,
            started: Instant::now(),
        })
    }

    /// Learns from the answer to `permit`'s call.
    pub fn learn(&self, system_id: &str, permit: &QuotaPermit, signals: &RateSignals) -> Learned {
        let reading = Reading::from_signals(signals, now_ms());
        let learned = lock(&permit.quota.state).learn(&reading, permit.started);
        if learned.changed {
            let mut dirty = lock(&self.dirty);
            if !dirty.contains(system_id) {
                dirty.insert(system_id.to_owned());
            }
            drop(dirty);
            self.kick.notify_one();
        }
        learned
    }

    /// What the book knows about `system_id` (nothing before its first proxied call).
    pub fn view(&self, system_id: &str) -> Option<QuotaView> {
        let q = read(&self.systems).get(system_id).cloned()?;
        Some(q.view(now_ms()))
    }

    /// Every known system's view with its kind (for `/metrics`).
    pub fn views(&self) -> Vec<(SystemKind, QuotaView)> {
        let now = now_ms();
        let all: Vec<Arc<SystemQuota>> = read(&self.systems).values().cloned().collect();
        all.iter().map(|q| (q.kind, q.view(now))).collect()
    }

    /// What wakes the broadcaster when readings change.
    pub fn changes(&self) -> Arc<tokio::sync::Notify> {
        self.kick.clone()
    }

    /// The changed readings to send to the other replicas, as JSON batches of at most
    /// [`SHARE_BYTES`]: `{"t": sent at (Unix ms), "e": [{s, k, r, l, x, b, a}]}`. A count that is
    /// stale or past its reset is not sent; `a` is the count's age.
    pub fn changed_batches(&self) -> Vec<String> {
        let ids: Vec<String> = lock(&self.dirty).drain().collect();
        let now = now_ms();
        let mut batches = Vec::new();
        let mut entries: Vec<String> = Vec::new();
        let mut size = 0;
        for id in ids {
            let Some(entry) = self.shared_entry(&id, now) else {
                continue;
            };
            if size + entry.len() > SHARE_BYTES && !entries.is_empty() {
                batches.push(batch(now, &entries));
                (entries, size) = (Vec::new(), 0);
            }
            size += entry.len() + 1;
            entries.push(entry);
        }
        if !entries.is_empty() {
            batches.push(batch(now, &entries));
        }
        batches
    }

    fn shared_entry(&self, id: &str, now: u64) -> Option<String> {
        let q = read(&self.systems).get(id).cloned()?;
        let s = lock(&q.state);
        let fresh = s.remaining(now / 1000).is_some() && !s.counting;
        let r = Reading {
            remaining: s.remaining.filter(|_| fresh),
            limit: s.limit,
            reset_at: s.reset_at,
            blocked_until: s.blocked_until.filter(|b| *b > now),
            age_ms: s
                .read_at
                .filter(|_| fresh)
                .map(|at| at.elapsed().as_millis() as u64),
            ..Default::default()
        };
        let mut v = serde_json::to_value(r).ok()?;
        v["s"] = id.into();
        v["k"] = q.kind.slug().into();
        serde_json::to_string(&v).ok()
    }

    /// Merges another replica's broadcast (the replica that met a block announces it). A
    /// broadcast sent more than [`SHARE_MAX_AGE`] ago is dropped (a replayed one too).
    pub fn merge(&self, batch: &str) {
        #[derive(Deserialize)]
        struct Batch {
            t: u64,
            e: Vec<serde_json::Value>,
        }
        let Ok(b) = serde_json::from_str::<Batch>(batch) else {
            return;
        };
        let now = now_ms();
        if b.t.abs_diff(now) > SHARE_MAX_AGE.as_millis() as u64 {
            return;
        }
        for e in &b.e {
            let (Some(id), Some(kind)) = (
                e["s"].as_str(),
                e["k"].as_str().and_then(SystemKind::from_slug),
            ) else {
                continue;
            };
            if crate::broker::validate_system_id(id).is_err() {
                continue;
            }
            let Ok(mut r) = serde_json::from_value::<Reading>(e.clone()) else {
                continue;
            };
            r.now_ms = now;
            r.remaining = r.remaining.filter(|v| *v >= 0);
            r.limit = r.limit.filter(|v| *v >= 0);
            r.reset_at = r.reset_at.filter(|x| *x <= now / 1000 + 86_400);
            // A replica's clock may run ahead: no block longer than a vendor could ask for.
            r.blocked_until = r
                .blocked_until
                .map(|b| b.min(now + MAX_WAIT.as_millis() as u64));
            let age = Duration::from_millis(r.age_ms.unwrap_or(u64::MAX).min(3_600_000));
            let taken = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            let q = self.entry(id, kind);
            lock(&q.state).learn(&r, taken);
        }
    }
}

fn batch(now: u64, entries: &[String]) -> String {
    format!("{{\"t\":{now},\"e\":[{}]}}", entries.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signals(remaining: i64, limit: i64) -> RateSignals {
        RateSignals {
            remaining: Some(remaining),
            limit: Some(limit),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_reserve_counts_calls_in_flight() {
        let book = Quotas::default();
        let first = book.admit("s", SystemKind::Zendesk).await.unwrap();
        // 10 of 100 left, reserve 5: five more may go out at once, not six.
        book.learn("s", &first, &signals(10, 100));
        drop(first);
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(book.admit("s", SystemKind::Zendesk).await.unwrap());
        }
        let refused = book.admit("s", SystemKind::Zendesk).await.err().unwrap();
        assert_eq!(refused.reason, LimitReason::Reserve);
        assert_eq!(book.view("s").unwrap().in_flight, 5);
    }

    /// A vendor counted locally (ServiceNow: a limit and a reset, no remaining count): the calls
    /// in flight when a window's first answer comes count in it, so no more than the limit less
    /// the reserve go out; a late answer from the window before changes nothing.
    #[tokio::test]
    async fn a_local_count_keeps_the_calls_in_flight_and_ignores_an_older_window() {
        let book = Quotas::default();
        let reset = crate::model::unix_now() + 3600;
        let window = |reset_at| RateSignals {
            limit: Some(20),
            reset_at: Some(reset_at),
            count_locally: true,
            served: true,
            ..Default::default()
        };
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(book.admit("s", SystemKind::ServiceNow).await.unwrap());
        }
        book.learn("s", &held[0], &window(reset));
        while let Ok(p) = book.admit("s", SystemKind::ServiceNow).await {
            held.push(p);
            assert!(held.len() <= 40, "never refused");
        }
        assert!(
            held.len() < 20,
            "{} calls out against a limit of 20",
            held.len()
        );
        let before = book.view("s").unwrap();
        book.learn("s", &held[1], &window(reset - 3600));
        let after = book.view("s").unwrap();
        assert_eq!(after.reset_at, Some(reset));
        assert_eq!(after.remaining, before.remaining);
        // A broken answer's reset far ahead is not held against an honest earlier one whose
        // call began after it was taken.
        let a = book.admit("t", SystemKind::ServiceNow).await.unwrap();
        book.learn("t", &a, &window(reset + 20 * 3600));
        drop(a);
        let b = book.admit("t", SystemKind::ServiceNow).await.unwrap();
        book.learn("t", &b, &window(reset));
        assert_eq!(book.view("t").unwrap().reset_at, Some(reset));
    }

    #[tokio::test]
    async fn an_overtaken_answer_cannot_raise_the_count_but_a_newer_one_can() {
        let book = Quotas::default();
        let a = book.admit("s", SystemKind::JiraCloud).await.unwrap();
        let b = book.admit("s", SystemKind::JiraCloud).await.unwrap();
        book.learn("s", &b, &signals(500, 1000));
        book.learn("s", &a, &signals(501, 1000));
        assert_eq!(book.view("s").unwrap().remaining, Some(500));
        let c = book.admit("s", SystemKind::JiraCloud).await.unwrap();
        book.learn("s", &c, &signals(800, 1000));
        assert_eq!(book.view("s").unwrap().remaining, Some(800));
    }

    /// A count with a reset a day away is believed for an hour at most (then it is probed
    /// like a count without a reset); one without a reset for a minute.
    #[test]
    fn a_count_is_believed_an_hour_at_most() {
        let at = Instant::now();
        let mut st = State {
            remaining: Some(0),
            limit: Some(100),
            reset_at: Some(crate::model::unix_now() + 20 * 3600),
            read_at: Some(at),
            ..State::default()
        };
        assert!(!st.stale_at(at + READING_TTL * 2));
        assert!(!st.stale_at(at + MAX_WAIT));
        assert!(st.stale_at(at + MAX_WAIT + Duration::from_secs(1)));
        st.reset_at = None;
        assert!(st.stale_at(at + READING_TTL * 2));
    }

    #[tokio::test]
    async fn an_old_count_at_the_reserve_lets_one_probe_through_at_a_time() {
        let book = Quotas::default();
        let p = book.admit("s", SystemKind::Zendesk).await.unwrap();
        book.learn("s", &p, &signals(3, 100));
        drop(p);
        assert!(book.admit("s", SystemKind::Zendesk).await.is_err());
        let q = book.entry("s", SystemKind::Zendesk);
        lock(&q.state).read_at = Instant::now().checked_sub(READING_TTL * 2);
        let probe = book.admit("s", SystemKind::Zendesk).await.unwrap();
        assert!(book.admit("s", SystemKind::Zendesk).await.is_err());
        book.learn("s", &probe, &signals(700, 700));
        drop(probe);
        assert!(book.admit("s", SystemKind::Zendesk).await.is_ok());
    }

    /// A book holding 3 of 100 left for Zendesk system "s" (reserve 5), read two minutes ago.
    async fn old_count_at_the_reserve() -> Quotas {
        let book = Quotas::default();
        let p = book.admit("s", SystemKind::Zendesk).await.unwrap();
        book.learn("s", &p, &signals(3, 100));
        drop(p);
        let q = book.entry("s", SystemKind::Zendesk);
        lock(&q.state).read_at = Instant::now().checked_sub(READING_TTL * 2);
        book
    }

    #[tokio::test]
    async fn a_probe_answered_without_a_count_forgets_the_old_count() {
        let book = old_count_at_the_reserve().await;
        let probe = book.admit("s", SystemKind::Zendesk).await.unwrap();
        // An error page without a count proves nothing: still one probe at a time.
        book.learn("s", &probe, &RateSignals::default());
        assert!(book.admit("s", SystemKind::Zendesk).await.is_err());
        // A served answer without one forgets the old count.
        let served = RateSignals {
            served: true,
            ..Default::default()
        };
        book.learn("s", &probe, &served);
        // Calls flow again side by side, not one probe at a time.
        let a = book.admit("s", SystemKind::Zendesk).await.unwrap();
        let b = book.admit("s", SystemKind::Zendesk).await.unwrap();
        drop((probe, a, b));
        assert_eq!(book.view("s").unwrap().remaining, None);
    }

    #[tokio::test]
    async fn another_replicas_broadcast_without_a_count_keeps_an_old_one() {
        let book = old_count_at_the_reserve().await;
        let probe = book.admit("s", SystemKind::Zendesk).await.unwrap();
        book.merge(&batch(
            now_ms(),
            &[r#"{"s":"s","k":"zendesk","l":100,"a":0}"#.to_owned()],
        ));
        assert!(book.admit("s", SystemKind::Zendesk).await.is_err());
        drop(probe);
    }

    #[tokio::test]
    async fn a_block_refuses_with_the_wait_left_and_a_longer_one_wins() {
        let book = Quotas::default();
        let p = book.admit("s", SystemKind::Asana).await.unwrap();
        let wait = |s| RateSignals {
            wait: Some(Duration::from_secs(s)),
            throttled: true,
            ..Default::default()
        };
        assert!(book.learn("s", &p, &wait(30)).block_started);
        assert!(!book.learn("s", &p, &wait(5)).block_started);
        let refused = book.admit("s", SystemKind::Asana).await.err().unwrap();
        assert_eq!(refused.reason, LimitReason::Blocked);
        assert!(
            (29..=30).contains(&refused.retry_after.as_secs()),
            "{refused:?}"
        );
    }
}
