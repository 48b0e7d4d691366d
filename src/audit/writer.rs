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

    /// The first outcome stands (a stalled write's calls may have been failed before it ends);
    /// whether this one did.
    pub(super) fn settle(&self, result: Result<(), AuditError>) -> bool {
        let mut relay = lock(&self.relay);
        if self.result.set(result).is_err() {
            return false;
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
        true
    }
}

/// A closed batch on its way to the sinks; an empty one only marks a place in the queue.
pub(super) struct Batch {
    lines: Vec<u8>,
    events: u64,
    written: Arc<Written>,
    /// When it was closed: its lines have waited since.
    since: Instant,
}

impl Batch {
    pub(super) fn new(lines: Vec<u8>, events: u64, written: Arc<Written>) -> Self {
        Self {
            lines,
            events,
            written,
            since: Instant::now(),
        }
    }
}

#[derive(Default)]
struct Queue {
    batches: VecDeque<Batch>,
    /// Bytes of lines queued or being written.
    bytes: usize,
    /// The batches being written (their outcomes, lines, and since when they waited), in
    /// the order they were closed.
    writing: Vec<(Arc<Written>, u64, Instant)>,
    /// The thread waits for a batch (and must be woken for one).
    asleep: bool,
    /// Why no batch is taken any more (the trail was dropped, or the thread did not start or
    /// stopped).
    closed: Option<&'static str>,
}

impl Queue {
    /// A line has waited [`WRITE_LIMIT`] for its write (a write that does not return, or a
    /// sink so slow that lines queue behind it that long).
    fn stalled(&self) -> bool {
        let oldest = match self.writing.first() {
            Some(&(_, _, since)) => Some(since),
            None => self.batches.front().map(|b| b.since),
        };
        oldest.is_some_and(|since| since.elapsed() >= WRITE_LIMIT)
    }

    /// Why a batch of `len` bytes is refused, if it is, and whether that makes the trail
    /// unhealthy (a full queue does not: the sink works, only behind).
    fn refusal(&self, len: usize) -> Option<(AuditError, bool)> {
        if let Some(why) = self.closed {
            return Some((AuditError(why.to_owned()), true));
        }
        if self.stalled() {
            return Some((stalled(), true));
        }
        (self.bytes + len > MAX_QUEUED_BYTES).then(|| {
            let e = AuditError("the audit trail is too far behind its lines".to_owned());
            (e, false)
        })
    }
}

fn stalled() -> AuditError {
    AuditError(format!(
        "the audit trail has taken no write for {} s (a stalled disk, or a stdout nobody reads)",
        WRITE_LIMIT.as_secs()
    ))
}

/// Lines taken for one `write`: whole batches up to this many bytes (at least one batch), so
/// a thread that fell behind catches up in few writes, and a slow sink that still moves is
/// timed per megabyte, not per backlog.
const TAKE_BYTES: usize = 1 << 20;

/// What the calls and the writer thread share.
pub(super) struct Writer {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Batches written (each one `write` per sink).
    batches: AtomicU64,
    /// Whether the last write succeeded (and who wants to know when that changes). Changed
    /// only under the queue's lock, so the last decision stands.
    health_tx: watch::Sender<bool>,
}

impl Writer {
    /// Starts the writer thread and its watchdog. If either cannot start, every batch is
    /// refused (secret-returning calls fail closed) and the trail reports unhealthy.
    pub(super) fn start(config: &AuditConfig) -> Arc<Self> {
        let writer = Arc::new(Self {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            batches: AtomicU64::new(0),
            health_tx: watch::channel(true).0,
        });
        let (worker, sinks) = (writer.clone(), Sinks::new(config));
        let watched = Arc::downgrade(&writer);
        let started = std::thread::Builder::new()
            .name("audit-writer".to_owned())
            .spawn(move || worker.run(sinks))
            .and_then(|_| {
                std::thread::Builder::new()
                    .name("audit-watchdog".to_owned())
                    .spawn(move || watch_for_stalls(&watched))
            });
        if let Err(e) = started {
            writer.stop("the audit writer thread could not start", &e.to_string());
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
        let changed = self.publish(&mut lock(&self.queue), false);
        log_health(changed, Some(error));
    }

    /// Queues `batch`; a refused one is handed back with why (and health says so), to be
    /// failed by the caller once it holds no lock.
    pub(super) fn hand_over(&self, batch: Batch) -> Result<(), (Batch, AuditError)> {
        let mut q = lock(&self.queue);
        if let Some((e, unhealthy)) = q.refusal(batch.lines.len()) {
            let changed = unhealthy && self.publish(&mut q, false);
            drop(q);
            log_health(changed, Some(&e));
            return Err((batch, e));
        }
        q.bytes += batch.lines.len();
        q.batches.push_back(batch);
        // A thread at work takes it when done: no wake (a system call) per batch under load.
        let asleep = std::mem::take(&mut q.asleep);
        drop(q);
        if asleep {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// When a write has taken [`WRITE_LIMIT`]: fails its calls and those of every batch queued
    /// behind it (their lines are dropped, and counted), and reports the trail unhealthy. The
    /// write itself cannot be stopped; it may still land its lines, and when it returns its
    /// outcome sets health again.
    pub(super) fn fail_stalled(&self) {
        let (stuck, queued, changed) = {
            let mut q = lock(&self.queue);
            if !q.stalled() {
                return;
            }
            let queued = std::mem::take(&mut q.batches);
            let dropped: usize = queued.iter().map(|b| b.lines.len()).sum();
            q.bytes = q.bytes.saturating_sub(dropped);
            let changed = self.publish(&mut q, false);
            (q.writing.clone(), queued, changed)
        };
        let e = stalled();
        log_health(changed, Some(&e));
        for (written, events, _) in stuck {
            fail_lines(&written, events, e.clone());
        }
        for batch in queued {
            fail(batch, e.clone());
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

    /// The trail cannot be written any more: fails what is queued or being written, and
    /// refuses the rest.
    fn stop(&self, why: &'static str, error: &str) {
        let (queued, writing, changed) = {
            let mut q = lock(&self.queue);
            q.closed = Some(why);
            q.bytes = 0;
            let changed = self.publish(&mut q, false);
            (
                std::mem::take(&mut q.batches),
                std::mem::take(&mut q.writing),
                changed,
            )
        };
        log_health(changed, Some(&AuditError(error.to_owned())));
        for (written, events, _) in writing {
            fail_lines(&written, events, AuditError(why.to_owned()));
        }
        for batch in queued {
            fail(batch, AuditError(why.to_owned()));
        }
    }

    /// Writes what is queued, a megabyte at a time, until closed.
    fn run(&self, mut sinks: Sinks) {
        // A thread that ends any other way (a panic, in a build that unwinds: release builds
        // abort) leaves no call waiting.
        struct Stopped<'a>(&'a Writer);
        impl Drop for Stopped<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0
                        .stop("the audit writer thread stopped", "it panicked");
                }
            }
        }
        let _stopped = Stopped(self);
        let (mut taken, mut lines) = (VecDeque::new(), Vec::new());
        // The outcome of the last write, which a take of marks only reports.
        let mut last = Ok(());
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
                last.clone()
            } else {
                self.batches.fetch_add(1, Ordering::Relaxed);
                sinks.write(all)
            };
            last = result.clone();
            let written: usize = taken.iter().map(|b| b.lines.len()).sum();
            let changed = self.idle(written, result.is_ok());
            log_health(changed, result.as_ref().err());
            for batch in taken.drain(..) {
                if batch.written.settle(result.clone()) && result.is_err() {
                    count_errors(batch.events);
                }
            }
            // A burst's buffer is not kept for ever.
            lines.shrink_to(TAKE_BYTES);
        }
    }

    /// Moves queued batches (up to [`TAKE_BYTES`]) to `taken`, marked as being written; false
    /// once closed and empty.
    fn take(&self, taken: &mut VecDeque<Batch>) -> bool {
        let mut q = lock(&self.queue);
        loop {
            if !q.batches.is_empty() {
                let mut size = 0;
                while let Some(batch) = q.batches.pop_front() {
                    size += batch.lines.len();
                    q.writing
                        .push((batch.written.clone(), batch.events, batch.since));
                    taken.push_back(batch);
                    if q.batches
                        .front()
                        .is_none_or(|b| size + b.lines.len() > TAKE_BYTES)
                    {
                        break;
                    }
                }
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

    /// A write of `bytes` returned: nothing is being written, and health follows its outcome
    /// (unless it wrote only marks); whether health changed.
    fn idle(&self, bytes: usize, ok: bool) -> bool {
        let mut q = lock(&self.queue);
        q.writing.clear();
        q.bytes = q.bytes.saturating_sub(bytes);
        bytes > 0 && self.publish(&mut q, ok)
    }

    /// Sets health while the queue is locked (`_q`); whether it changed.
    fn publish(&self, _q: &mut Queue, ok: bool) -> bool {
        self.health_tx.send_if_modified(|healthy| {
            let changed = *healthy != ok;
            *healthy = ok;
            changed
        })
    }
}

/// Logs a change of health, once no lock is held.
fn log_health(changed: bool, error: Option<&AuditError>) {
    match error {
        _ if !changed => {}
        None => tracing::info!(message = "Audit sink recovered."),
        Some(e) => tracing::error!(message = "Audit sink failed.", error = %e),
    }
}

/// Fails a batch that will not be written.
pub(super) fn fail(batch: Batch, error: AuditError) {
    fail_lines(&batch.written, batch.events, error);
}

/// Fails the `events` lines `written` stands for, counting them unless they were settled
/// before (a stalled write's calls are failed once).
fn fail_lines(written: &Written, events: u64, error: AuditError) {
    if written.settle(Err(error)) {
        count_errors(events);
    }
}

/// Counts `events` lines that were not written.
fn count_errors(events: u64) {
    crate::metrics::METRICS.audit_errors(events);
}

/// Fails the calls of a stalled write once a second, on a thread of its own: the writer's is
/// the one stuck, and the runtime's probe may not run (a broker shutting down).
fn watch_for_stalls(writer: &std::sync::Weak<Writer>) {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let Some(writer) = writer.upgrade() else {
            return;
        };
        if lock(&writer.queue).closed.is_some() {
            return;
        }
        writer.fail_stalled();
    }
}

#[cfg(test)]
impl Writer {
    /// Back-dates the write under way by [`WRITE_LIMIT`], if one is; whether one was.
    pub(super) fn age_busy(&self) -> bool {
        let mut q = lock(&self.queue);
        let Some((_, _, since)) = q.writing.first_mut() else {
            return false;
        };
        *since = since.checked_sub(WRITE_LIMIT).unwrap_or(*since);
        true
    }
}
