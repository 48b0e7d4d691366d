//! `WatchSystems`, the domain half: who may see which system, where a watch starts (a snapshot
//! of the matching systems, or the events after a cursor), and how many watches a caller may
//! hold open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use super::callers::Caller;
use super::events::{CursorError, Event, RETENTION_SECS};
use super::Broker;
use crate::error::BrokerError;
use crate::model::unix_now;
use crate::model::{SystemKind, SystemRecord};
use crate::util::sync::lock;

/// The most system ids one watch may name.
pub const MAX_WATCHED_IDS: usize = 1000;

/// Which systems a watch is about.
#[derive(Debug, Clone, Default)]
pub struct WatchFilter {
    /// Only these ids (empty: all).
    pub system_ids: Vec<String>,
    /// Only these kinds (empty: all).
    pub kinds: Vec<SystemKind>,
}

impl WatchFilter {
    /// True when `caller` may see `r` and the filter names it.
    pub fn admits(&self, caller: &Caller, r: &SystemRecord) -> bool {
        caller.may_use_id(&r.system_id)
            && caller.may_use_kind(r.kind)
            && (self.system_ids.is_empty() || self.system_ids.contains(&r.system_id))
            && (self.kinds.is_empty() || self.kinds.contains(&r.kind))
    }
}

/// The most watches one caller may have open at once (each holds a live feed and a task).
pub const MAX_WATCHES_PER_CALLER: usize = 16;

/// Open watches per caller name.
pub(crate) type WatchCounts = Arc<Mutex<HashMap<String, usize>>>;

/// One open watch of a caller: released when dropped (the watch ended).
pub struct WatchSlot {
    counts: WatchCounts,
    caller: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        if let Some(n) = counts.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.caller);
            }
        }
    }
}

/// Where a watch starts.
pub struct WatchStart {
    /// Events to read from the store first, `(after, up to)`, page by page as the client takes
    /// them (a cursor older than what memory holds).
    pub backlog: Option<(u64, u64)>,
    /// Events after the cursor asked for (none for a snapshot).
    pub missed: Vec<Arc<Event>>,
    /// The live feed.
    pub live: broadcast::Receiver<Arc<Event>>,
    /// The position the live feed starts after (the cursor of the snapshot's events).
    pub at: u64,
    /// True when the watch opens with a snapshot of the matching systems, read page by page
    /// as the client takes it (never buffered whole).
    pub snapshot: bool,
    /// The caller's slot, held while the watch runs.
    pub slot: WatchSlot,
}

impl Broker {
    fn take_watch_slot(&self, caller: &Caller) -> Result<WatchSlot, BrokerError> {
        let mut counts = lock(&self.watch_counts);
        let n = counts.entry(caller.name.clone()).or_insert(0);
        if *n >= MAX_WATCHES_PER_CALLER {
            return Err(BrokerError::ResourceExhausted(format!(
                "caller '{}' already has {MAX_WATCHES_PER_CALLER} watches open; end one first",
                caller.name
            )));
        }
        *n += 1;
        Ok(WatchSlot {
            counts: self.watch_counts.clone(),
            caller: caller.name.clone(),
        })
    }

    /// Where a watch starts, and its live feed: without `after`, a snapshot of every matching
    /// system (taken after subscribing, so nothing that happens meanwhile is lost); with it,
    /// the matching events after that cursor.
    pub async fn watch(
        &self,
        caller: &Caller,
        filter: &WatchFilter,
        after: Option<&str>,
    ) -> Result<WatchStart, BrokerError> {
        if filter.system_ids.len() > MAX_WATCHED_IDS {
            return Err(BrokerError::invalid(
                "system_ids",
                format!("names more than {MAX_WATCHED_IDS} systems"),
            ));
        }
        if filter.kinds.len() > SystemKind::ALL.len() {
            return Err(BrokerError::invalid(
                "kinds",
                format!(
                    "names more than the {} kinds there are",
                    SystemKind::ALL.len()
                ),
            ));
        }
        if let Some(bad) = filter
            .system_ids
            .iter()
            .find(|id| super::validate_system_id(id).is_err())
        {
            return Err(BrokerError::invalid(
                "system_ids",
                format!(
                    "'{}' is not a system id",
                    bad.chars().take(64).collect::<String>()
                ),
            ));
        }
        // Events of changes made before this call are in the log before the watch opens.
        self.events.settle(std::time::Duration::from_secs(2)).await;
        let too_old = || {
            BrokerError::OutOfRange(
                "the cursor is older than the kept event log (an hour), or of another store; \
                 watch again without `after` for a fresh snapshot"
                    .to_owned(),
            )
        };
        let opening = self.events.resume(after).map_err(|e| match e {
            CursorError::Malformed => {
                BrokerError::invalid("after", "is not a cursor this broker handed out")
            }
            CursorError::TooOld => too_old(),
        })?;
        if let Some((seq, _)) = opening.backlog {
            // Older than memory: the store must still hold what follows the cursor, within
            // the hour a watch may resume from.
            let next = self.store.events_after(seq, 1).await?;
            let kept = next.first().is_some_and(|e| {
                e.seq == seq + 1 && unix_now().saturating_sub(e.at) <= RETENTION_SECS
            });
            if !kept {
                return Err(too_old());
            }
        }
        let slot = self.take_watch_slot(caller)?;
        let missed = opening
            .missed
            .into_iter()
            .filter(|e| filter.admits(caller, &e.system))
            .collect();
        Ok(WatchStart {
            backlog: opening.backlog,
            missed,
            live: opening.live,
            at: opening.at,
            snapshot: after.is_none(),
            slot,
        })
    }
}
