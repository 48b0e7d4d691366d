//! The audit writer: a thread of its own writes the batches, in the order they were closed.
//!
//! Written on the async runtime, a sink that blocks (a stdout pipe nobody reads, a stalled disk)
//! blocked the runtime's thread with it, and with it every other call, the health service and
//! `/readyz`. Here it holds up only the calls whose lines wait for it; once a write has taken
//! [`WRITE_LIMIT`], those fail closed, the trail reports unhealthy, and new batches are refused
//! at once until the write returns.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use super::sink::Sinks;
use super::{AuditConfig, AuditError};
use crate::util::sync::lock;

/// How long one batch's write may take before its calls fail closed and new batches are refused.
pub(super) const WRITE_LIMIT: Duration = Duration::from_secs(5);
/// Bytes of lines that may wait for the writer; past them a batch is refused, so memory stays
/// bounded while a slow sink falls behind.
pub(super) const MAX_QUEUED_BYTES: usize = 64 << 20;

/// The outcome of one batch, shared by every call whose event is in it.
///
/// The writer thread wakes only the batch's leader, which wakes the others on its own thread: a
/// task woken from another thread costs its runtime a system call (an `eventfd` write) each, and
/// a batch holds a hundred calls under load. While no leader waits (it was cancelled, or the
/// batch was closed by [`super::Audit::drain`]), the settler wakes everyone.
pub(super) struct Written {
    result: OnceLock<Result<(), AuditError>>,
    notify: Notify,
    relay: Mutex<Relay>,
}

/// Who wakes the calls of a batch once it is settled.
enum Relay {
    /// Its leader (with its waker once it waits).
    Leader(Option<Waker>),
    /// Whoever settles it.
    Settler,
}

impl Default for Written {
    fn default() -> Self {
        Self {
            result: OnceLock::new(),
            notify: Notify::new(),
            relay: Mutex::new(Relay::Settler),
        }
    }
}

impl Written {
    /// Waits as one of the batch's calls.
    pub(super) async fn wait(&self) -> Result<(), AuditError> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.result.get() {
                return r.clone();
            }
            notified.await;
        }
    }

    /// A call has taken the lead: it will wake the others.
    pub(super) fn led(&self) {
        *lock(&self.relay) = Relay::Leader(None);
    }

    /// Waits as the batch's leader, then wakes the others.
    pub(super) fn lead(&self) -> impl Future<Output = Result<(), AuditError>> + '_ {
        std::future::poll_fn(|cx| {
            let mut relay = lock(&self.relay);
            let Some(r) = self.result.get() else {
                *relay = Relay::Leader(Some(cx.waker().clone()));
                return Poll::Pending;
            };
            *relay = Relay::Settler;
            drop(relay);
            self.notify.notify_waiters();
            Poll::Ready(r.clone())
        })
    }

    /// The leader has gone (answered, or cancelled): whoever settles the batch wakes everyone.
    pub(super) fn leader_gone(&self) {
        let mut relay = lock(&self.relay);
        if matches!(*relay, Relay::Settler) {
            return;
        }
        *relay = Relay::Settler;
        drop(relay);
        if self.result.get().is_some() {
            self.notify.notify_waiters();
        }
    }

    /// The first outcome stands (a stalled write's calls may have been failed before it ends).
    pub(super) fn settle(&self, result: Result<(), AuditError>) {
        let mut relay = lock(&self.relay);
        if self.result.set(result).is_err() {
            return;
        }
        match &mut *relay {
            Relay::Leader(waker) => {
                let waker = waker.take();
                drop(relay);
                if let Some(w) = waker {
                    w.wake();
                }
            }
            Relay::Settler => {
                drop(relay);
                self.notify.notify_waiters();
            }
        }
    }
}

/// A closed batch on its way to the sinks; an empty one only marks a place in the queue.
pub(super) struct Batch {
    pub(super) lines: Vec<u8>,
    pub(super) events: u64,
    pub(super) written: Arc<Written>,
}

#[derive(Default)]
struct Queue {
    batches: VecDeque<Batch>,
    bytes: usize,
    /// Since when the batches being written have been, while some are.
    busy: Option<Instant>,
    /// Those batches' outcomes.
    writing: Vec<Arc<Written>>,
    /// The thread waits for a batch (and must be woken for one).
    asleep: bool,
    /// Why no batch is taken any more (the trail was dropped, or the thread did not start).
    closed: Option<&'static str>,
}

impl Queue {
    /// Why a batch of `len` bytes is refused, if it is.
    fn refusal(&self, len: usize) -> Option<AuditError> {
        if let Some(why) = self.closed {
            return Some(AuditError(why.to_owned()));
        }
        if self
            .busy
            .is_some_and(|since| since.elapsed() >= WRITE_LIMIT)
        {
            return Some(stalled());
        }
        (self.bytes + len > MAX_QUEUED_BYTES)
            .then(|| AuditError("the audit trail is too far behind its lines".to_owned()))
    }
}

fn stalled() -> AuditError {
    AuditError(format!(
        "the audit trail has taken no write for {} s (a stalled disk, or a stdout nobody reads)",
        WRITE_LIMIT.as_secs()
    ))
}

/// What the calls and the writer thread share.
pub(super) struct Writer {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Batches written (each one `write` per sink).
    batches: AtomicU64,
    /// Whether the last write succeeded (and who wants to know when that changes).
    health_tx: watch::Sender<bool>,
}

impl Writer {
    /// Starts the thread. If it cannot start, every batch is refused (secret-returning calls
    /// fail closed) and the trail reports unhealthy.
    pub(super) fn start(config: &AuditConfig) -> Arc<Self> {
        let writer = Arc::new(Self {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            batches: AtomicU64::new(0),
            health_tx: watch::channel(true).0,
        });
        let (worker, sinks) = (writer.clone(), Sinks::new(config));
        let spawned = std::thread::Builder::new()
            .name("audit-writer".to_owned())
            .spawn(move || worker.run(sinks));
        if let Err(e) = spawned {
            lock(&writer.queue).closed = Some("the audit writer thread could not start");
            writer.set_health(Some(&AuditError(e.to_string())));
        }
        writer
    }

    pub(super) fn is_healthy(&self) -> bool {
        *self.health_tx.borrow()
    }

    pub(super) fn batches_written(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    pub(super) fn health(&self) -> watch::Receiver<bool> {
        self.health_tx.subscribe()
    }

    /// Marks the trail unhealthy (a trail that cannot be opened at start).
    pub(super) fn report(&self, error: &AuditError) {
        self.set_health(Some(error));
    }

    /// Queues `batch`; a refused one is failed here.
    pub(super) fn hand_over(&self, batch: Batch) {
        let mut q = lock(&self.queue);
        if let Some(e) = q.refusal(batch.lines.len()) {
            drop(q);
            self.finish(&batch, Err(e));
            return;
        }
        q.bytes += batch.lines.len();
        q.batches.push_back(batch);
        // A thread at work takes it when done: no wake (a system call) per batch under load.
        let asleep = std::mem::take(&mut q.asleep);
        drop(q);
        if asleep {
            self.wake.notify_one();
        }
    }

    /// When a write has taken [`WRITE_LIMIT`]: fails its calls and those of every batch queued
    /// behind it (their lines are dropped, and counted), and reports the trail unhealthy. The
    /// write itself cannot be stopped; when it returns, its outcome sets health again.
    pub(super) fn fail_stalled(&self) {
        let (stuck, queued) = {
            let mut q = lock(&self.queue);
            if q.busy.is_none_or(|since| since.elapsed() < WRITE_LIMIT) {
                return;
            }
            q.bytes = 0;
            (q.writing.clone(), std::mem::take(&mut q.batches))
        };
        let e = stalled();
        self.set_health(Some(&e));
        for written in stuck {
            written.settle(Err(e.clone()));
        }
        for batch in queued {
            self.finish(&batch, Err(e.clone()));
        }
    }

    /// No more batches: the thread writes those queued, then ends.
    pub(super) fn close(&self) {
        let mut q = lock(&self.queue);
        q.closed.get_or_insert("the audit trail is closed");
        q.asleep = false;
        drop(q);
        self.wake.notify_one();
    }

    /// Writes what is queued, all of it with one `write` (a thread that fell behind catches
    /// up in one), until closed.
    fn run(&self, mut sinks: Sinks) {
        let (mut taken, mut lines) = (VecDeque::new(), Vec::new());
        while self.take(&mut taken) {
            let all = match taken.len() {
                1 => &taken[0].lines,
                _ => {
                    lines.clear();
                    for batch in &taken {
                        lines.extend_from_slice(&batch.lines);
                    }
                    &lines
                }
            };
            let result = if all.is_empty() {
                Ok(())
            } else {
                self.batches.fetch_add(1, Ordering::Relaxed);
                sinks.write(all)
            };
            self.idle();
            for batch in taken.drain(..) {
                self.finish(&batch, result.clone());
            }
            // A burst's buffer is not kept for ever.
            lines.shrink_to(1 << 20);
        }
    }

    /// Moves every queued batch to `taken`, marked as being written; false once closed and
    /// empty.
    fn take(&self, taken: &mut VecDeque<Batch>) -> bool {
        let mut q = lock(&self.queue);
        loop {
            if !q.batches.is_empty() {
                std::mem::swap(&mut q.batches, taken);
                q.bytes = 0;
                q.busy = Some(Instant::now());
                let writing = taken.iter().map(|b| b.written.clone());
                q.writing.extend(writing);
                return true;
            }
            if q.closed.is_some() {
                return false;
            }
            q.asleep = true;
            q = self
                .wake
                .wait(q)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn idle(&self) {
        let mut q = lock(&self.queue);
        q.busy = None;
        q.writing.clear();
    }

    /// Settles `batch` with `result`: its calls wake, a failure is counted per line, and health
    /// follows (an empty batch, a mark in the queue, leaves health as it is when written).
    fn finish(&self, batch: &Batch, result: Result<(), AuditError>) {
        if batch.lines.is_empty() && result.is_ok() {
            batch.written.settle(result);
            return;
        }
        if result.is_err() {
            for _ in 0..batch.events {
                crate::metrics::METRICS.audit_error();
            }
        }
        self.set_health(result.as_ref().err());
        batch.written.settle(result);
    }

    fn set_health(&self, error: Option<&AuditError>) {
        let ok = error.is_none();
        let changed = self.health_tx.send_if_modified(|healthy| {
            let changed = *healthy != ok;
            *healthy = ok;
            changed
        });
        match error {
            _ if !changed => {}
            None => tracing::info!(message = "Audit sink recovered."),
            Some(e) => tracing::error!(message = "Audit sink failed.", error = %e),
        }
    }
}

#[cfg(test)]
impl Writer {
    /// Back-dates the write under way by [`WRITE_LIMIT`], if one is; whether one was.
    pub(super) fn age_busy(&self) -> bool {
        let mut q = lock(&self.queue);
        let Some(since) = q.busy.as_mut() else {
            return false;
        };
        *since = since.checked_sub(WRITE_LIMIT).unwrap_or(*since);
        true
    }
}
