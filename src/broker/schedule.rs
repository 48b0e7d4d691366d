//! Scheduled checks: every stored system is checked again every `check_interval` (default 6
//! hours), at an offset of up to a tenth of the interval derived from its id (so a thousand
//! systems registered together do not come due together), at most `checks_per_vendor` at a time
//! per kind (so they never stampede one vendor). Results feed health like any check.
//!
//! Each sweep collects the systems that are due; one batch per kind then works through them,
//! most overdue first, with at most `checks_per_vendor` checks in flight, and paced: a batch's
//! starts are spread over a tenth of the interval (the jitter window), so the first sweep after
//! an upgrade, which finds every system due, does not turn into a stampede on the broker itself
//! (10,000 systems at the default 6 hours: one start every 0.2 s). A kind whose previous batch
//! is still running is left for the next sweep (its systems stay due).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio::task::JoinSet;

use super::Broker;
use crate::model::{SystemKind, SystemRecord, SystemState};
use crate::util::sync::lock;

/// The kinds with a batch of scheduled checks running, and the per-kind limit.
pub(crate) struct CheckSchedule {
    busy: Mutex<HashSet<SystemKind>>,
    per_vendor: usize,
}

impl CheckSchedule {
    /// A schedule allowing `per_vendor` checks at a time per kind.
    pub(crate) fn new(per_vendor: usize) -> Self {
        Self {
            busy: Mutex::new(HashSet::new()),
            per_vendor: per_vendor.max(1),
        }
    }
}

/// The pause between two starts of a batch of `n` checks: the batch spread over a tenth of
/// the interval.
fn pace(interval: std::time::Duration, n: usize) -> std::time::Duration {
    (interval / 10)
        .checked_div(u32::try_from(n).unwrap_or(u32::MAX).max(1))
        .unwrap_or_default()
}

/// A system's offset within the interval: up to a tenth of it, stable per id.
fn offset(system_id: &str, interval_secs: u64) -> u64 {
    let h = Sha256::digest(system_id.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    u64::from_le_bytes(b) % (interval_secs / 10 + 1)
}

/// When `r` is due for its scheduled check, if it is active.
fn due_at(r: &SystemRecord, interval_secs: u64) -> Option<u64> {
    let last = r.last_check.as_ref().map_or(r.created_at, |c| c.checked_at);
    (r.state == SystemState::Active).then(|| {
        last.saturating_add(interval_secs)
            .saturating_sub(offset(&r.system_id, interval_secs))
    })
}

/// The systems of one sweep that are due, by kind.
#[derive(Default)]
pub(crate) struct Due {
    by_kind: HashMap<SystemKind, Vec<(u64, String)>>,
}

impl Due {
    /// Adds the systems of `page` due at `now`.
    pub(crate) fn collect(&mut self, page: &[SystemRecord], now: u64, interval_secs: u64) {
        if interval_secs == 0 {
            return;
        }
        for r in page {
            if let Some(at) = due_at(r, interval_secs).filter(|at| *at <= now) {
                self.by_kind
                    .entry(r.kind)
                    .or_default()
                    .push((at, r.system_id.clone()));
            }
        }
    }
}

impl Broker {
    /// Starts one batch per kind for the systems in `due` (unless that kind's last batch is
    /// still running).
    pub(crate) fn schedule_checks(self: &Arc<Self>, due: Due, tasks: &mut JoinSet<()>) {
        for (kind, mut systems) in due.by_kind {
            if !lock(&self.schedule.busy).insert(kind) {
                continue;
            }
            systems.sort();
            let me = self.clone();
            let spacing = pace(self.settings.check_interval, systems.len());
            tasks.spawn(async move {
                let mut running = JoinSet::new();
                let started = tokio::time::Instant::now();
                for (i, (_, id)) in systems.into_iter().enumerate() {
                    tokio::time::sleep_until(started + spacing * i as u32).await;
                    if !me.still_leads().await {
                        // Another replica leads now and runs its own batch.
                        break;
                    }
                    while running.len() >= me.schedule.per_vendor {
                        running.join_next().await;
                    }
                    let b = me.clone();
                    running.spawn(async move {
                        let outcome = b.check_stored(&id, true).await;
                        crate::metrics::METRICS.scheduled_check(match &outcome {
                            Ok(c) if c.ok => "ok",
                            Ok(_) => "failed",
                            Err(_) => "error",
                        });
                    });
                }
                while running.join_next().await.is_some() {}
                lock(&me.schedule.busy).remove(&kind);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_spread_over_a_tenth_of_the_interval() {
        let six_hours = std::time::Duration::from_secs(21_600);
        assert_eq!(pace(six_hours, 10_000).as_millis(), 216);
        assert_eq!(pace(six_hours, 1), std::time::Duration::from_secs(2160));
        assert_eq!(
            pace(std::time::Duration::ZERO, 5),
            std::time::Duration::ZERO
        );
        assert_eq!(pace(six_hours, 0), std::time::Duration::from_secs(2160));
    }

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
