//! `WatchSystems`, the domain half: who may see which system, and where a watch starts (a
//! snapshot of the matching systems, or the events after a cursor).

use std::sync::Arc;

use super::callers::Caller;
use super::events::{CursorError, Opening};
use super::{Broker, SCAN_PAGE};
use crate::error::BrokerError;
use crate::model::{SystemKind, SystemRecord};

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

impl Broker {
    /// Where a watch starts, and its live feed: without `after`, a snapshot of every matching
    /// system (taken after subscribing, so nothing that happens meanwhile is lost); with it,
    /// the matching events after that cursor.
    pub async fn watch(
        &self,
        caller: &Caller,
        filter: &WatchFilter,
        after: Option<&str>,
    ) -> Result<Opening, BrokerError> {
        if filter.system_ids.len() > MAX_WATCHED_IDS {
            return Err(BrokerError::invalid(
                "system_ids",
                format!("names more than {MAX_WATCHED_IDS} systems"),
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
        let (missed, rx, at) = self.events.resume(after).map_err(|e| match e {
            CursorError::Malformed => {
                BrokerError::invalid("after", "is not a cursor this broker handed out")
            }
            CursorError::TooOld => BrokerError::OutOfRange(
                "the cursor is older than the kept event log (an hour), or from before a restart \
                 or another replica; watch again without `after` for a fresh snapshot"
                    .to_owned(),
            ),
        })?;
        if after.is_some() {
            let missed = missed
                .into_iter()
                .filter(|e| filter.admits(caller, &e.system))
                .collect();
            return Ok((missed, rx, at));
        }
        let mut opening = Vec::new();
        let mut pages = self.system_pages(SCAN_PAGE);
        while let Some(page) = pages.next().await? {
            opening.extend(
                page.iter()
                    .filter(|r| filter.admits(caller, r))
                    .map(|r| Arc::new(self.events.snapshot(r, at))),
            );
        }
        Ok((opening, rx, at))
    }
}
