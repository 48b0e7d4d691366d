//! System events: what `WatchSystems` streams (and, later, webhooks deliver).
//!
//! Every change is appended to a bounded log (the last hour, at most [`MAX_EVENTS`]) under a
//! sequence number and broadcast to live watchers. A cursor is `{epoch}.{seq}`: the epoch is
//! random per process, so a cursor from before a restart (or from another replica) is refused as
//! too old instead of silently skipping events. Events carry metadata only: the record's sealed
//! credential and shared token are dropped before it is kept.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::model::{unix_now, SystemRecord};
use crate::util::sync::lock;

/// How long events are kept for resuming watchers.
pub const RETENTION_SECS: u64 = 3600;
/// The most events kept, whatever their age.
pub const MAX_EVENTS: usize = 50_000;
/// How far a live watcher may fall behind before it is told to resume with its cursor.
const LIVE_BUFFER: usize = 4096;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// The opening state of a watch (one per matching system).
    Snapshot,
    /// A system was registered.
    Registered,
    /// A system was deleted.
    Deleted,
    /// A system's credential was rotated.
    Rotated,
    /// A system's health changed (recovery included).
    HealthChanged,
    /// A known horizon crossed a warning threshold (30, 7, 1 days).
    Expiring,
    /// A grant or service identity was refused for good: an admin must act.
    ReauthorizationRequired,
    /// A stored system was checked.
    CheckCompleted,
}

impl EventType {
    /// Every type a webhook may subscribe to (the snapshot is a watch's own).
    pub const NAMES: [&'static str; 7] = [
        "system.registered",
        "system.deleted",
        "credential.rotated",
        "system.health_changed",
        "credential.expiring",
        "system.reauthorization_required",
        "check.completed",
    ];

    /// The type string (the same on the stream and in webhooks).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Snapshot => "system.snapshot",
            Self::Registered => "system.registered",
            Self::Deleted => "system.deleted",
            Self::Rotated => "credential.rotated",
            Self::HealthChanged => "system.health_changed",
            Self::Expiring => "credential.expiring",
            Self::ReauthorizationRequired => "system.reauthorization_required",
            Self::CheckCompleted => "check.completed",
        }
    }
}

/// One event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Position in the log.
    pub seq: u64,
    /// What happened.
    pub kind: EventType,
    /// The system's metadata after the change (before, for a deletion); no secrets.
    pub system: SystemRecord,
    /// Seconds since the epoch.
    pub at: u64,
    /// For a human.
    pub detail: String,
}

/// Where a watch starts (the events to send first), its live feed, and the position the feed
/// starts after (the cursor of a snapshot's events).
pub type Opening = (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>, u64);

/// Why a watch cannot resume where it asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CursorError {
    /// Not a cursor this broker hands out.
    Malformed,
    /// Older than the kept log, or from before a restart.
    TooOld,
}

struct Log {
    next: u64,
    ring: VecDeque<Arc<Event>>,
}

/// The event log and its live feed.
pub struct Events {
    epoch: String,
    log: Mutex<Log>,
    live: broadcast::Sender<Arc<Event>>,
    closed: tokio::sync::watch::Sender<bool>,
}

impl Default for Events {
    fn default() -> Self {
        let b: [u8; 6] = rand::random();
        Self {
            epoch: crate::util::hex::encode(&b),
            log: Mutex::new(Log {
                next: 1,
                ring: VecDeque::new(),
            }),
            live: broadcast::channel(LIVE_BUFFER).0,
            closed: tokio::sync::watch::channel(false).0,
        }
    }
}

impl Events {
    /// Ends every watch (shutdown): live feeds stop so connections can drain.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Resolves once [`Self::close`] was called.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closed.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }

    /// A snapshot event for `system` at position `at` (not logged: it is the opening state of
    /// one watch; resuming from its cursor replays everything after the subscription).
    pub fn snapshot(&self, system: &SystemRecord, at: u64) -> Event {
        let mut meta = system.clone();
        meta.sealed_credential = Vec::new();
        meta.shared_token = None;
        Event {
            seq: at,
            kind: EventType::Snapshot,
            system: meta,
            at: unix_now(),
            detail: String::new(),
        }
    }

    /// The cursor of `seq`.
    pub fn cursor(&self, seq: u64) -> String {
        format!("{}.{seq}", self.epoch)
    }

    /// A cursor for "now": resuming from it yields only later events.
    pub fn now_cursor(&self) -> String {
        self.cursor(lock(&self.log).next - 1)
    }

    /// Appends an event about `system` and wakes the watchers.
    pub fn emit(&self, kind: EventType, system: &SystemRecord, detail: impl Into<String>) {
        let mut meta = system.clone();
        meta.sealed_credential = Vec::new();
        meta.shared_token = None;
        let now = unix_now();
        let event = {
            let mut log = lock(&self.log);
            let event = Arc::new(Event {
                seq: log.next,
                kind,
                system: meta,
                at: now,
                detail: detail.into(),
            });
            log.next += 1;
            log.ring.push_back(event.clone());
            while log.ring.len() > MAX_EVENTS
                || log
                    .ring
                    .front()
                    .is_some_and(|e| now.saturating_sub(e.at) > RETENTION_SECS)
            {
                log.ring.pop_front();
            }
            // Sent under the lock: watchers see events in log order.
            let _ = self.live.send(event.clone());
            event
        };
        tracing::debug!(message = "System event.", r#type = kind.as_str(), system_id = %event.system.system_id, seq = event.seq);
    }

    /// The events after `cursor` still in the log, and a live feed that continues right after
    /// them (subscribed under the same lock, so nothing falls between the two).
    pub fn resume(&self, cursor: Option<&str>) -> Result<Opening, CursorError> {
        let log = lock(&self.log);
        let rx = self.live.subscribe();
        let at = log.next - 1;
        let Some(cursor) = cursor else {
            return Ok((Vec::new(), rx, at));
        };
        let (epoch, seq) = cursor.split_once('.').ok_or(CursorError::Malformed)?;
        let seq: u64 = seq.parse().map_err(|_| CursorError::Malformed)?;
        if epoch.len() != self.epoch.len() || !epoch.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CursorError::Malformed);
        }
        if epoch != self.epoch || seq >= log.next {
            return Err(CursorError::TooOld);
        }
        let oldest_kept = log.ring.front().map(|e| e.seq).unwrap_or(log.next);
        if seq + 1 < oldest_kept {
            return Err(CursorError::TooOld);
        }
        let missed = log.ring.iter().filter(|e| e.seq > seq).cloned().collect();
        Ok((missed, rx, at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CredentialType, Delivery, SystemKind, SystemState};

    fn record(id: &str) -> SystemRecord {
        SystemRecord {
            system_id: id.into(),
            display_name: String::new(),
            description: String::new(),
            kind: SystemKind::Asana,
            base_url: "https://app.asana.com".into(),
            credential_type: CredentialType::PersonalAccessToken,
            credential_version: 1,
            state: SystemState::Active,
            state_message: None,
            created_at: 0,
            updated_at: 0,
            last_check: None,
            credential_expires_at: None,
            delivery: Delivery::Proxy,
            proxy_unauthorized_count: 0,
            last_proxy_unauthorized_at: None,
            health: None,
            refresh_failure: None,
            sealed_credential: vec![1, 2, 3],
            revision: 1,
            shared_token: None,
            integrity: None,
        }
    }

    #[test]
    fn resume_replays_what_was_missed_then_goes_live() {
        let ev = Events::default();
        ev.emit(EventType::Registered, &record("a"), "");
        let mid = ev.now_cursor();
        ev.emit(EventType::Registered, &record("b"), "");
        ev.emit(EventType::Deleted, &record("a"), "");
        let (missed, mut rx, _) = ev.resume(Some(&mid)).unwrap_or_else(|e| panic!("{e:?}"));
        let ids: Vec<_> = missed
            .iter()
            .map(|e| (e.kind, e.system.system_id.clone()))
            .collect();
        assert_eq!(
            ids,
            vec![
                (EventType::Registered, "b".to_owned()),
                (EventType::Deleted, "a".to_owned())
            ]
        );
        assert!(missed.iter().all(|e| e.system.sealed_credential.is_empty()));
        ev.emit(EventType::Rotated, &record("b"), "");
        let live = rx.try_recv().unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(live.kind, EventType::Rotated);
        assert_eq!(ev.cursor(live.seq), ev.now_cursor());
    }

    #[test]
    fn foreign_old_and_broken_cursors_are_refused() {
        let ev = Events::default();
        let other = Events::default();
        other.emit(EventType::Registered, &record("a"), "");
        assert_eq!(
            ev.resume(Some(&other.now_cursor())).err(),
            Some(CursorError::TooOld)
        );
        assert_eq!(ev.resume(Some("nope")).err(), Some(CursorError::Malformed));
        assert_eq!(
            ev.resume(Some(&format!("{}.x", ev.epoch))).err(),
            Some(CursorError::Malformed)
        );
        for i in 0..(MAX_EVENTS + 10) {
            ev.emit(EventType::CheckCompleted, &record(&format!("s{i}")), "");
        }
        assert_eq!(
            ev.resume(Some(&ev.cursor(1))).err(),
            Some(CursorError::TooOld)
        );
        assert!(ev.resume(Some(&ev.cursor(20))).is_ok());
    }
}
