//! Scheduled checks: every stored system is checked again every `check_interval` (default 6
//! hours), at an offset of up to a tenth of the interval derived from its id (so a thousand
//! systems registered together do not come due together), at most `checks_per_vendor` at a time
//! per kind (so they never stampede one vendor). Results feed health like any check.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Broker, CheckTarget};
use crate::model::{SystemKind, SystemRecord, SystemState};
use crate::util::sync::lock;

/// Which scheduled checks are running, and the per-kind limits.
pub(crate) struct CheckSchedule {
    running: Mutex<HashSet<String>>,
    permits: HashMap<SystemKind, Arc<Semaphore>>,
}

impl CheckSchedule {
    /// A schedule allowing `per_vendor` checks at a time per kind.
    pub(crate) fn new(per_vendor: usize) -> Self {
        Self {
            running: Mutex::new(HashSet::new()),
            permits: SystemKind::ALL
                .into_iter()
                .map(|k| (k, Arc::new(Semaphore::new(per_vendor.max(1)))))
                .collect(),
        }
    }
}

/// A system's offset within the interval: up to a tenth of it, stable per id.
fn offset(system_id: &str, interval_secs: u64) -> u64 {
    let h = Sha256::digest(system_id.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    u64::from_le_bytes(b) % (interval_secs / 10 + 1)
}

/// True when `r` is due for its scheduled check at `now`.
fn due(r: &SystemRecord, now: u64, interval_secs: u64) -> bool {
    let last = r.last_check.as_ref().map_or(r.created_at, |c| c.checked_at);
    r.state == SystemState::Active
        && last
            .saturating_add(interval_secs)
            .saturating_sub(offset(&r.system_id, interval_secs))
            <= now
}

impl Broker {
    /// Starts the scheduled checks of `page` that are due and not already running.
    pub(crate) fn schedule_checks(
        self: &Arc<Self>,
        page: &[SystemRecord],
        now: u64,
        tasks: &mut JoinSet<()>,
    ) {
        let interval = self.settings.check_interval.as_secs();
        if interval == 0 {
            return;
        }
        for r in page.iter().filter(|r| due(r, now, interval)) {
            if !lock(&self.schedule.running).insert(r.system_id.clone()) {
                continue;
            }
            let Some(permits) = self.schedule.permits.get(&r.kind).cloned() else {
                continue;
            };
            let me = self.clone();
            let id = r.system_id.clone();
            tasks.spawn(async move {
                if let Ok(_permit) = permits.acquire_owned().await {
                    let outcome = me.check(CheckTarget::Stored(id.clone())).await;
                    crate::metrics::METRICS.scheduled_check(match &outcome {
                        Ok(c) if c.ok => "ok",
                        Ok(_) => "failed",
                        Err(_) => "error",
                    });
                }
                lock(&me.schedule.running).remove(&id);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_spread_within_a_tenth() {
        let interval = 21_600;
        let offsets: HashSet<u64> = (0..200)
            .map(|i| offset(&format!("sys-{i}"), interval))
            .collect();
        assert!(offsets.iter().all(|o| *o <= interval / 10));
        assert!(
            offsets.len() > 150,
            "offsets should spread: {}",
            offsets.len()
        );
        assert_eq!(offset("a", interval), offset("a", interval));
    }
}
