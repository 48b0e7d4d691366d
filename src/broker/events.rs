//! System events: what `WatchSystems` streams and webhooks deliver.
//!
//! Every change is appended to the store's event log (see [`crate::store`]: a day and an hour,
//! at most [`crate::store::MAX_STORED_EVENTS`]; on PostgreSQL one log for every replica) by one
//! publisher task per process, in the order it was emitted. The same task pulls what the log
//! gained (its own appends, and other replicas' when the change feed says so, or every second)
//! into a bounded in-memory ring (the last hour, at most [`MAX_EVENTS`]) and broadcasts it to live
//! watchers. A cursor is `{epoch}.{seq}`: the epoch is the log's (kept in the store), so a cursor
//! stays valid across restarts and replicas, and a cursor of another log is refused as too old
//! instead of silently skipping events. Events carry metadata only: the record's sealed
//! credential and shared token are dropped before it is kept.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, Notify};

use crate::model::{unix_now, SystemRecord};
use crate::store::{CredentialStore, StoreError, StoredEvent};
use crate::util::sync::lock;

/// How far back a watch may resume: an hour (older events stay in the store for webhooks).
pub const RETENTION_SECS: u64 = 3600;
/// The most recent events kept in memory; a watch resuming further back reads the store.
pub const MAX_EVENTS: usize = 4096;
/// How far a live watcher may fall behind before it is told to resume with its cursor.
const LIVE_BUFFER: usize = 4096;
/// The most events waiting for the store (while it fails); beyond it the oldest are dropped.
const MAX_UNPUBLISHED: usize = 50_000;
/// Events appended to the store in one write, at most.
const PUBLISH_BATCH: usize = 512;
/// Events read from the store in one query.
const PULL_BATCH: usize = 2048;
/// The `meta` key holding the log's epoch.
const EPOCH_KEY: &str = "events_epoch";

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

    const ALL: [Self; 8] = [
        Self::Snapshot,
        Self::Registered,
        Self::Deleted,
        Self::Rotated,
        Self::HealthChanged,
        Self::Expiring,
        Self::ReauthorizationRequired,
        Self::CheckCompleted,
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

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
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

/// An event as the store keeps it.
#[derive(Serialize, Deserialize)]
struct Body {
    r#type: String,
    system: SystemRecord,
    at: u64,
    detail: String,
}

impl Event {
    /// An event read from the store; `None` (logged) when it does not decode.
    pub fn decode(stored: &StoredEvent) -> Option<Self> {
        if stored.body.is_empty() {
            // Refused by the record authentication (and logged there).
            return None;
        }
        let body: Body = match serde_json::from_slice(&stored.body) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(message = "A stored event cannot be decoded; it is skipped.", seq = stored.seq, error = %e);
                return None;
            }
        };
        Some(Self {
            seq: stored.seq,
            kind: EventType::parse(&body.r#type)?,
            system: body.system,
            at: body.at,
            detail: body.detail,
        })
    }
}

/// Where a watch starts.
pub struct Opening {
    /// Events to read from the store first, `(after, up to)` (a cursor older than memory).
    pub backlog: Option<(u64, u64)>,
    /// Then these, from memory.
    pub missed: Vec<Arc<Event>>,
    /// Then the live feed.
    pub live: broadcast::Receiver<Arc<Event>>,
    /// The position the live feed starts after (the cursor of a snapshot's events; live events
    /// at or before it are skipped).
    pub at: u64,
}

/// Why a watch cannot resume where it asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CursorError {
    /// Not a cursor this broker hands out.
    Malformed,
    /// Older than the kept log, or from another log.
    TooOld,
}

struct Log {
    /// One past the newest sequence number pulled from the store.
    next: u64,
    ring: VecDeque<Arc<Event>>,
}

struct Shared {
    epoch: String,
    log: Mutex<Log>,
    live: broadcast::Sender<Arc<Event>>,
}

/// The event log, its publisher and its live feed.
pub struct Events {
    shared: Arc<Shared>,
    publish: mpsc::UnboundedSender<(u64, Vec<u8>)>,
    /// Events queued so far, and (the publisher's) events stored and pulled into memory so far.
    emitted: std::sync::atomic::AtomicU64,
    published: tokio::sync::watch::Receiver<u64>,
    /// Wakes the publisher to pull (another replica appended).
    kick: Arc<Notify>,
    closed: tokio::sync::watch::Sender<bool>,
}

fn metadata(system: &SystemRecord) -> SystemRecord {
    let mut meta = system.clone();
    meta.sealed_credential = Vec::new();
    meta.shared_token = None;
    meta.integrity = None;
    meta
}

impl Events {
    /// Opens the log of `store`: its epoch (created on a fresh store), the last hour of events,
    /// and the publisher task (which holds the store only while it writes or reads, and ends with
    /// this value).
    pub async fn open(store: &Arc<dyn CredentialStore>) -> Result<Self, StoreError> {
        // Created once: replicas starting together on a fresh store all adopt the first.
        let fresh: [u8; 6] = rand::random();
        let stored = store
            .init_meta(EPOCH_KEY, crate::util::hex::encode(&fresh).as_bytes())
            .await?;
        let epoch = if is_epoch(&stored) {
            String::from_utf8_lossy(&stored).into_owned()
        } else {
            // Edited by hand: a new epoch (cursors handed out so far are refused as too old).
            let e = crate::util::hex::encode(&fresh);
            tracing::warn!(
                message = "The event log's epoch in the store is malformed; starting a new one."
            );
            store.put_meta(EPOCH_KEY, e.as_bytes()).await?;
            e
        };
        // Only what the ring can hold is read at start, not the whole stored log.
        let newest = store.last_event_seq().await?;
        let shared = Arc::new(Shared {
            epoch,
            log: Mutex::new(Log {
                next: newest.saturating_sub(MAX_EVENTS as u64) + 1,
                ring: VecDeque::new(),
            }),
            live: broadcast::channel(LIVE_BUFFER).0,
        });
        pull(&shared, store.as_ref()).await?;
        let (publish, rx) = mpsc::unbounded_channel();
        let kick = Arc::new(Notify::new());
        let (published_tx, published) = tokio::sync::watch::channel(0);
        let publisher = Publisher {
            published: published_tx,
            shared: shared.clone(),
            store: Arc::downgrade(store),
            rx,
            kick: kick.clone(),
            poll: store.is_shared(),
        };
        tokio::spawn(publisher.run());
        Ok(Self {
            shared,
            publish,
            emitted: std::sync::atomic::AtomicU64::new(0),
            published,
            kick,
            closed: tokio::sync::watch::channel(false).0,
        })
    }

    /// Ends every watch (shutdown): live feeds stop so connections can drain.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// True once [`Self::close`] was called.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Resolves once [`Self::close`] was called.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closed.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }

    /// Events queued but not yet in the store.
    pub fn unpublished(&self) -> usize {
        let emitted = self.emitted.load(std::sync::atomic::Ordering::Relaxed);
        usize::try_from(emitted.saturating_sub(*self.published.borrow())).unwrap_or(usize::MAX)
    }

    /// Another process appended to the shared log: pull it now.
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// A snapshot event for `system` at position `at` (not logged: it is the opening state of
    /// one watch; resuming from its cursor replays everything after the subscription).
    pub fn snapshot(&self, system: &SystemRecord, at: u64) -> Event {
        Event {
            seq: at,
            kind: EventType::Snapshot,
            system: metadata(system),
            at: unix_now(),
            detail: String::new(),
        }
    }

    /// The cursor of `seq`.
    pub fn cursor(&self, seq: u64) -> String {
        format!("{}.{seq}", self.shared.epoch)
    }

    /// The newest sequence number pulled so far.
    pub fn newest(&self) -> u64 {
        lock(&self.shared.log).next - 1
    }

    /// A cursor for "now": resuming from it yields only later events.
    pub fn now_cursor(&self) -> String {
        self.cursor(self.newest())
    }

    /// Queues an event about `system` for the log (it reaches watchers once stored). Never
    /// waits: a state change is not held up by its announcement.
    pub fn emit(&self, kind: EventType, system: &SystemRecord, detail: impl Into<String>) {
        use std::sync::atomic::Ordering;
        let at = unix_now();
        let body = Body {
            r#type: kind.as_str().to_owned(),
            system: metadata(system),
            at,
            detail: detail.into(),
        };
        let Ok(bytes) = serde_json::to_vec(&body) else {
            return;
        };
        if self.unpublished() >= MAX_UNPUBLISHED {
            crate::metrics::METRICS.event_dropped();
            tracing::error!(message = "The event log is not being written; an event is dropped.", r#type = kind.as_str(), system_id = %system.system_id);
            return;
        }
        self.emitted.fetch_add(1, Ordering::Relaxed);
        let _ = self.publish.send((at, bytes));
        tracing::debug!(message = "System event.", r#type = kind.as_str(), system_id = %system.system_id);
    }

    /// Waits (at most `limit`) until every event emitted so far is in memory, so that a watch
    /// opening now finds them in its log, not after its snapshot.
    pub async fn settle(&self, limit: Duration) {
        let target = self.emitted.load(std::sync::atomic::Ordering::Relaxed);
        let mut published = self.published.clone();
        let _ = tokio::time::timeout(limit, published.wait_for(|p| *p >= target)).await;
    }

    /// The newest `limit` events of `system_id` this process holds in memory, newest first.
    pub fn recent_for(&self, system_id: &str, limit: usize) -> Vec<Arc<Event>> {
        let log = lock(&self.shared.log);
        log.ring
            .iter()
            .rev()
            .filter(|e| e.system.system_id == system_id)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Where a watch resuming after `cursor` starts: the events after it (from the store when
    /// memory no longer holds them, then from memory) and a live feed that continues right
    /// after them (subscribed under the same lock, so nothing falls between). A cursor a little
    /// ahead of this process (another replica's, not pulled here yet) starts the live feed
    /// there. Whether the store still holds a backlog is the caller's to check.
    pub fn resume(&self, cursor: Option<&str>) -> Result<Opening, CursorError> {
        let log = lock(&self.shared.log);
        let live = self.shared.live.subscribe();
        let at = log.next - 1;
        let opening = |backlog, missed, at| Opening {
            backlog,
            missed,
            live,
            at,
        };
        let Some(cursor) = cursor else {
            return Ok(opening(None, Vec::new(), at));
        };
        let seq = self.parse(cursor)?;
        if seq >= log.next {
            return match seq - at <= LIVE_BUFFER as u64 {
                true => Ok(opening(None, Vec::new(), seq)),
                false => Err(CursorError::TooOld),
            };
        }
        let oldest_kept = log.ring.front().map(|e| e.seq).unwrap_or(log.next);
        let backlog = (seq + 1 < oldest_kept).then_some((seq, oldest_kept - 1));
        let missed = log.ring.iter().filter(|e| e.seq > seq).cloned().collect();
        Ok(opening(backlog, missed, at))
    }

    /// The sequence number of one of this log's cursors.
    pub fn parse(&self, cursor: &str) -> Result<u64, CursorError> {
        let (epoch, seq) = cursor.split_once('.').ok_or(CursorError::Malformed)?;
        let seq: u64 = seq.parse().map_err(|_| CursorError::Malformed)?;
        if !is_epoch(epoch.as_bytes()) {
            return Err(CursorError::Malformed);
        }
        if epoch != self.shared.epoch {
            return Err(CursorError::TooOld);
        }
        Ok(seq)
    }
}

fn is_epoch(e: &[u8]) -> bool {
    e.len() == 12 && e.iter().all(u8::is_ascii_hexdigit)
}

/// Reads what the store's log gained into the ring and wakes the watchers, in log order.
async fn pull(shared: &Shared, store: &dyn CredentialStore) -> Result<(), StoreError> {
    loop {
        let after = lock(&shared.log).next - 1;
        let rows = store.events_after(after, PULL_BATCH).await?;
        let full = rows.len() == PULL_BATCH;
        let now = unix_now();
        let mut log = lock(&shared.log);
        for row in &rows {
            if row.seq < log.next {
                continue;
            }
            log.next = row.seq + 1;
            if now.saturating_sub(row.at) > RETENTION_SECS {
                continue;
            }
            let Some(event) = Event::decode(row) else {
                continue;
            };
            let event = Arc::new(event);
            log.ring.push_back(event.clone());
            // Sent under the lock: watchers see events in log order.
            let _ = shared.live.send(event);
        }
        while log.ring.len() > MAX_EVENTS
            || log
                .ring
                .front()
                .is_some_and(|e| now.saturating_sub(e.at) > RETENTION_SECS)
        {
            log.ring.pop_front();
        }
        if !full {
            return Ok(());
        }
    }
}

/// Writes queued events to the store in order and pulls the log into memory.
struct Publisher {
    shared: Arc<Shared>,
    store: Weak<dyn CredentialStore>,
    rx: mpsc::UnboundedReceiver<(u64, Vec<u8>)>,
    kick: Arc<Notify>,
    published: tokio::sync::watch::Sender<u64>,
    /// A shared store: poll every second too (a missed notification costs a second at most).
    poll: bool,
}

impl Publisher {
    async fn run(mut self) {
        let mut pending: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut stored = 0;
        let mut backoff = Duration::from_millis(100);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if pending.is_empty() {
                tokio::select! {
                    got = self.rx.recv() => match got {
                        Some(e) => pending.push(e),
                        None => return,
                    },
                    _ = self.kick.notified() => {}
                    _ = tick.tick(), if self.poll => {}
                }
            } else {
                tokio::time::sleep(backoff).await;
            }
            while pending.len() < PUBLISH_BATCH {
                match self.rx.try_recv() {
                    Ok(e) => pending.push(e),
                    Err(_) => break,
                }
            }
            let Some(store) = self.store.upgrade() else {
                return;
            };
            if !pending.is_empty() {
                match store.append_events(&pending).await {
                    Ok(()) => {
                        stored += pending.len() as u64;
                        pending.clear();
                        backoff = Duration::from_millis(100);
                    }
                    Err(e) => {
                        tracing::warn!(message = "Events could not be written to the store; retrying.", events = pending.len(), error = %e);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            match pull(&self.shared, store.as_ref()).await {
                Ok(()) => {
                    self.published.send_replace(stored);
                }
                Err(e) => tracing::debug!(message = "Could not read the event log.", error = %e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> SystemRecord {
        crate::model::sample_system(id)
    }

    async fn open() -> (Events, Arc<dyn CredentialStore>) {
        let store: Arc<dyn CredentialStore> = Arc::new(crate::store::MemoryStore::new());
        (Events::open(&store).await.unwrap(), store)
    }

    /// Waits until the publisher has pulled `n` events in.
    async fn published(ev: &Events, n: u64) {
        for _ in 0..1000 {
            if ev.newest() >= n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        panic!("only {} of {n} events published", ev.newest());
    }

    #[tokio::test]
    async fn resume_replays_what_was_missed_then_goes_live() {
        let (ev, store) = open().await;
        ev.emit(EventType::Registered, &record("a"), "");
        published(&ev, 1).await;
        let mid = ev.now_cursor();
        ev.emit(EventType::Registered, &record("b"), "");
        ev.emit(EventType::Deleted, &record("a"), "");
        published(&ev, 3).await;
        let o = ev.resume(Some(&mid)).unwrap_or_else(|e| panic!("{e:?}"));
        let (missed, mut rx) = (o.missed, o.live);
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
        let live = rx.recv().await.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(live.kind, EventType::Rotated);
        assert_eq!(ev.cursor(live.seq), ev.now_cursor());
        // The log is the store's: reopened (a restart, another replica), cursors still hold.
        let again = Events::open(&store).await.unwrap();
        assert_eq!(again.now_cursor(), ev.now_cursor());
        let o = again.resume(Some(&mid)).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(o.missed.len(), 3);
    }

    #[tokio::test]
    async fn foreign_old_and_broken_cursors_are_refused() {
        let (ev, _store) = open().await;
        let (other, _other_store) = open().await;
        other.emit(EventType::Registered, &record("a"), "");
        published(&other, 1).await;
        assert_eq!(
            ev.resume(Some(&other.now_cursor())).err(),
            Some(CursorError::TooOld)
        );
        assert_eq!(ev.resume(Some("nope")).err(), Some(CursorError::Malformed));
        assert_eq!(
            ev.resume(Some(&format!("{}.x", ev.shared.epoch))).err(),
            Some(CursorError::Malformed)
        );
        let n = MAX_EVENTS as u64 + 10;
        for i in 0..n {
            ev.emit(EventType::CheckCompleted, &record(&format!("s{i}")), "");
            if i % 10_000 == 9_999 {
                published(&ev, i + 1).await;
            }
        }
        published(&ev, n).await;
        // Older than memory: read from the store first, up to where memory starts.
        let o = ev
            .resume(Some(&ev.cursor(1)))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(o.backlog, Some((1, n - MAX_EVENTS as u64)));
        assert_eq!(o.missed.len(), MAX_EVENTS);
        let o = ev
            .resume(Some(&ev.cursor(n - 3)))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((o.backlog, o.missed.len()), (None, 3));
        // A little ahead (another replica's, not pulled here yet): live from there; far: refused.
        assert!(ev.resume(Some(&ev.cursor(n + 5))).is_ok());
        assert_eq!(
            ev.resume(Some(&ev.cursor(n + 1_000_000))).err(),
            Some(CursorError::TooOld)
        );
    }
}
