//! The audit trail: one structured event per RPC (and per OAuth callback), as JSON lines to a
//! size-rotated file and/or stdout.
//!
//! Events carry time, caller, RPC, system id, outcome and gRPC code, and the id of any token
//! handed out as an HMAC-SHA256 under a per-installation key derived from the master key (as
//! Vault's audit hashing does): correlatable, never reversible. No secret is ever written.
//!
//! When the sink cannot be written, secret-returning RPCs (`GetAccessToken`, `CreateCaller`) fail
//! closed unless `audit_fail_closed = false`, and health reports `NOT_SERVING` until a write
//! succeeds again.
//!
//! Writes are group-committed: an event joins the open batch, the first event of a batch leads it
//! (it lets the other calls of the same scheduler tick add theirs, then writes the whole batch with
//! one `write`), and every call waits until the batch holding its event has been written, so an
//! RPC still answers only after its audit line is in the file, and still fails closed when it is
//! not. Under load this turns one `stat` + one `write` per call into one per batch.
//!
//! The batches are written by a thread of their own ([`writer`]), never on the async runtime: a
//! sink that blocks holds up only the calls waiting for their lines, and those fail closed after
//! a few seconds ([`writer::WRITE_LIMIT`]) while every other call, health and `/readyz` go on.

mod sink;
pub(crate) use sink::rotated;
mod writer;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

use tokio::sync::watch;
use writer::{Batch, Writer, Written};

/// Default size at which the audit file is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 100 * 1024 * 1024;
/// Default number of rotated files kept.
pub const DEFAULT_KEEP: usize = 5;

/// Where events go.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// JSON-lines file (rotated by size), if any.
    pub file: Option<PathBuf>,
    /// Also (or only) to stdout.
    pub stdout: bool,
    /// Rotate the file at this size.
    pub max_bytes: u64,
    /// Rotated files kept (`audit.log.1` … `.N`).
    pub keep: usize,
    /// Refuse secret-returning RPCs when the sink fails.
    pub fail_closed: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            file: None,
            stdout: false,
            max_bytes: DEFAULT_MAX_BYTES,
            keep: DEFAULT_KEEP,
            fail_closed: true,
        }
    }
}

/// One audit event.
#[derive(Debug, Serialize)]
pub struct AuditEvent<'a> {
    /// RFC 3339 UTC.
    pub time: Timestamp,
    /// The caller's name, when authenticated.
    pub caller: Option<&'a str>,
    /// The RPC (or `OAuthCallback`).
    pub rpc: &'a str,
    /// The system concerned.
    pub system_id: Option<&'a str>,
    /// `ok` or `error`.
    pub outcome: &'a str,
    /// The gRPC code name (`OK`, `PERMISSION_DENIED`, …).
    pub code: &'a str,
    /// HMAC of the token id handed out, if any.
    pub token_hmac: Option<&'a str>,
    /// Proxied calls: the HTTP method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'a str>,
    /// Proxied calls: the path below the system, ids masked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<&'a str>,
    /// Proxied calls: how long the call took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// System events (`rpc` = `SystemEvent`): the event type, as `WatchSystems` names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<&'a str>,
    /// What an administrative call changed, beyond a system (`caller=NAME role=ROLE`, `key=ID`,
    /// `delivery=proxy`): no secrets, only names the broker validated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
}

impl<'a> AuditEvent<'a> {
    /// An event of `rpc` now, with its outcome and code and no other field.
    pub fn now(rpc: &'a str, outcome: &'a str, code: &'a str) -> Self {
        Self {
            time: now_rfc3339(),
            caller: None,
            rpc,
            system_id: None,
            outcome,
            code,
            token_hmac: None,
            method: None,
            path: None,
            duration_ms: None,
            event: None,
            detail: None,
        }
    }
}

/// Why an event could not be written.
#[derive(Debug, Clone, thiserror::Error)]
#[error("audit sink unavailable: {0}")]
pub struct AuditError(String);

/// The batch being filled.
#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    events: u64,
    /// A call has taken the lead for this batch and will write it.
    led: bool,
    written: Arc<Written>,
}

/// How a call joined its batch.
enum Joined<'a> {
    Leader(Leader<'a>),
    Follower(Arc<Written>),
}

/// The call that leads a batch. Dropped before it handed the batch over (its future may be
/// cancelled: a client that goes away), it hands it over then, and once gone it leaves waking the
/// batch's other calls to whoever settles it: they must not wait forever.
struct Leader<'a> {
    audit: &'a Audit,
    written: Arc<Written>,
    handed_over: bool,
}

impl Leader<'_> {
    /// Hands the batch to the writer, then waits for it and wakes its other calls.
    async fn lead(mut self) -> Result<(), AuditError> {
        self.audit.flush();
        self.handed_over = true;
        self.written.lead().await
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if !self.handed_over {
            self.audit.flush();
        }
        self.written.leader_gone();
    }
}

/// The audit writer.
pub struct Audit {
    config: AuditConfig,
    /// HMAC-SHA256 keyed once; cloned per token.
    mac: Option<Hmac<Sha256>>,
    pending: Mutex<Pending>,
    /// The thread that writes the batches, and the trail's health.
    writer: Arc<Writer>,
    /// Lines for refused and unauthenticated calls in the current second: (second, count).
    refusals: std::sync::Mutex<(u64, u32)>,
    /// While the sink fails: when [`Audit::recheck`] may try it next, and the wait after that.
    rechecks: std::sync::Mutex<Option<(std::time::Instant, std::time::Duration)>>,
}

/// The first wait between two [`Audit::recheck`] tries of a failing sink; it doubles up to
/// [`RECHECK_MAX`], so a sink failing for hours (a file gone, stdout still written) gets a try
/// every 15 s, not a line a second, and a freed disk is found within 15 s.
const RECHECK_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
/// The longest wait between two tries.
const RECHECK_MAX: std::time::Duration = std::time::Duration::from_secs(15);
/// How long [`Audit::check_at_start`] waits for the trail to open.
const OPEN_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Lines a second kept for refused and unauthenticated calls; the rest are counted in
/// `credbroker_audit_dropped_total`, so anonymous traffic cannot rotate the trail away.
pub const MAX_REFUSAL_LINES_PER_SEC: u32 = 50;

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Audit {
    /// An audit writer with `key` for token HMACs.
    pub fn new(config: AuditConfig, key: crate::crypto::SubKey) -> Self {
        Self {
            mac: <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes()).ok(),
            pending: Mutex::new(Pending::default()),
            writer: Writer::start(&config),
            refusals: std::sync::Mutex::new((0, 0)),
            rechecks: std::sync::Mutex::new(None),
            config,
        }
    }

    /// The audit file, when the trail is written to one.
    pub fn file_path(&self) -> Option<&std::path::Path> {
        self.config.file.as_deref()
    }

    /// Whether a line for a refused or unauthenticated call may be written now (at most
    /// [`MAX_REFUSAL_LINES_PER_SEC`] a second); a dropped one is counted.
    pub fn admit_refusal(&self) -> bool {
        let now = crate::model::unix_now();
        let mut r = crate::util::sync::lock(&self.refusals);
        if r.0 != now {
            *r = (now, 0);
        }
        r.1 += 1;
        let admitted = r.1 <= MAX_REFUSAL_LINES_PER_SEC;
        if !admitted {
            crate::metrics::METRICS.audit_dropped();
        }
        admitted
    }

    /// Whether secret-returning RPCs must fail when writing fails.
    pub fn fail_closed(&self) -> bool {
        self.config.fail_closed
    }

    /// True while the last write succeeded.
    pub fn is_healthy(&self) -> bool {
        self.writer.is_healthy()
    }

    /// How many batches have been written so far.
    pub fn batches_written(&self) -> u64 {
        self.writer.batches_written()
    }

    /// A receiver that sees health changes.
    pub fn health(&self) -> watch::Receiver<bool> {
        self.writer.health()
    }

    /// HMAC-SHA256 of `value` under the installation's audit key, hex (first 16 bytes).
    pub fn hmac(&self, value: &str) -> String {
        let Some(mut mac) = self.mac.clone() else {
            return String::new();
        };
        mac.update(value.as_bytes());
        crate::util::hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// Writes one event to every sink; the future resolves once the batch holding it has been
    /// written. The event joins its batch right away (so the future holds only a few pointers,
    /// not the event); the first call of a batch leads it: its future hands the batch to the
    /// writer thread when polled after one scheduler yield (or when dropped), and wakes the
    /// batch's other calls once it is written.
    pub fn record<'s>(
        &'s self,
        event: &AuditEvent<'_>,
    ) -> impl Future<Output = Result<(), AuditError>> + Send + 's {
        let joined = {
            let mut p = crate::util::sync::lock(&self.pending);
            // Serialized straight into the batch; a failed event leaves no partial line.
            let start = p.lines.len();
            match serde_json::to_writer(&mut p.lines, event) {
                Err(e) => {
                    p.lines.truncate(start);
                    Err(AuditError(e.to_string()))
                }
                Ok(()) => {
                    p.lines.push(b'\n');
                    p.events += 1;
                    let lead = !std::mem::replace(&mut p.led, true);
                    if lead {
                        p.written.led();
                    }
                    let written = p.written.clone();
                    Ok(if lead {
                        Joined::Leader(Leader {
                            audit: self,
                            written,
                            handed_over: false,
                        })
                    } else {
                        Joined::Follower(written)
                    })
                }
            }
        };
        async move {
            match joined? {
                Joined::Follower(written) => written.wait().await,
                Joined::Leader(leader) => {
                    // Let the calls that are ready in this tick join the batch, then write it.
                    tokio::task::yield_now().await;
                    leader.lead().await
                }
            }
        }
    }

    /// While the sink is failing, tries it again with a line of its own, whose success makes
    /// the broker healthy again. Without it a failed trail was tried only by calls, and once a
    /// load balancer had taken the broker out of service for it, none came: it stayed unready
    /// after the disk was freed. Does nothing while the sink is healthy; while it fails, tries
    /// at once, then after 1 s, 2 s, … and every 15 s at most.
    pub async fn recheck(&self) {
        if !self.recheck_due() {
            return;
        }
        let line = AuditEvent {
            detail: Some("a check of the trail, which could not be written before"),
            ..AuditEvent::now("AuditCheck", "ok", "OK")
        };
        // Bounded: behind a stalled write it would wait as long as the write.
        let _ = tokio::time::timeout(writer::WRITE_LIMIT, self.record(&line)).await;
    }

    /// Whether [`Self::recheck`] should try the sink now (and when it may next).
    fn recheck_due(&self) -> bool {
        let mut next = crate::util::sync::lock(&self.rechecks);
        if self.is_healthy() {
            *next = None;
            return false;
        }
        let now = std::time::Instant::now();
        let (at, wait) = next.get_or_insert((now, RECHECK_FIRST));
        if now < *at {
            return false;
        }
        *at = now + *wait;
        *wait = (*wait * 2).min(RECHECK_MAX);
        true
    }

    /// At start: opens the audit file as a write would, so a trail that cannot be opened (a
    /// missing directory, no permission, a directory in its place) is reported before the
    /// first call, not at it. On a thread of its own, waited for at most [`OPEN_LIMIT`]: an
    /// open can block (a FIFO nobody reads), and must not hold up the start; one that does is
    /// reported like a failed one, and the writer's own open then counts as a stalled write.
    pub fn check_at_start(&self) {
        let Some(path) = self.config.file.clone() else {
            return;
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let opening = std::thread::Builder::new()
            .name("audit-open".to_owned())
            .spawn(move || {
                let _ = tx.send(sink::open_trail(&path).map(drop));
            });
        let opened = match opening {
            Err(e) => Err(e.to_string()),
            Ok(_) => match rx.recv_timeout(OPEN_LIMIT) {
                Ok(opened) => opened.map_err(|e| e.to_string()),
                Err(_) => Err(format!(
                    "opening the trail took more than {} s",
                    OPEN_LIMIT.as_secs()
                )),
            },
        };
        if let Err(e) = opened {
            self.writer.report(&AuditError(e));
        }
    }

    /// Waits (at most `within`) until every line recorded before it is written; whether they
    /// were. At shutdown, so lines whose calls did not wait for them (system events) are not
    /// lost with the process.
    pub async fn drain(&self, within: std::time::Duration) -> bool {
        self.flush();
        // A mark behind them, which only the thread settles (a batch's leader may not run
        // again to wake others).
        let mark = Arc::new(Written::default());
        self.queue(Batch::new(Vec::new(), 0, mark.clone()));
        matches!(tokio::time::timeout(within, mark.wait()).await, Ok(Ok(())))
    }

    /// Hands the open batch to the writer (called by its leader). Batches reach the sinks in
    /// the order they were closed: each is queued under the lock that closes it.
    fn flush(&self) {
        let refused = {
            let mut p = crate::util::sync::lock(&self.pending);
            // The next batch starts with room for one like this (one allocation, not a dozen
            // while it grows).
            let room = Vec::with_capacity(p.lines.len().min(1 << 20));
            let taken = std::mem::replace(
                &mut *p,
                Pending {
                    lines: room,
                    ..Pending::default()
                },
            );
            self.writer
                .hand_over(Batch::new(taken.lines, taken.events, taken.written))
        };
        // Failed once no lock is held.
        if let Err((batch, e)) = refused {
            writer::fail(batch, e);
        }
    }

    /// Hands `batch` to the writer; a refused one fails.
    fn queue(&self, batch: Batch) {
        if let Err((batch, e)) = self.writer.hand_over(batch) {
            writer::fail(batch, e);
        }
    }
}

impl Drop for Audit {
    /// The thread writes what is queued, then ends.
    fn drop(&mut self) {
        self.writer.close();
    }
}

/// An RFC 3339 UTC time with milliseconds (`2026-11-23T21:16:57.123Z`), formatted on the stack:
/// every audit event carries one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Timestamp([u8; 24]);

impl Timestamp {
    /// The text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and separators are ever written.
        std::str::from_utf8(&self.0).unwrap_or("1970-01-01T00:00:00.000Z")
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// RFC 3339 UTC time of now, with milliseconds.
pub fn now_rfc3339() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs() as i64, d.subsec_millis())
}

pub(crate) fn rfc3339(secs: i64, millis: u32) -> Timestamp {
    // Four digits of year: 1970 to 9999 (a time someone wrote far off is shown at the bound).
    let secs = secs.clamp(0, 253_402_300_799);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, day) = crate::util::time::civil_from_days(days);
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: i64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v.rem_euclid(10)) as u8;
            v /= 10;
        }
    };
    put(0, 4, y);
    put(5, 2, m);
    put(8, 2, day);
    put(11, 2, rem / 3600);
    put(14, 2, (rem / 60) % 60);
    put(17, 2, rem % 60);
    put(20, 3, i64::from(millis));
    Timestamp(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0, 0).as_str(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(1_795_468_617, 123).as_str(),
            "2026-11-23T21:16:57.123Z"
        );
        assert_eq!(
            rfc3339(951_782_400 + 86_399, 999).as_str(),
            "2000-02-29T23:59:59.999Z"
        );
        assert_eq!(
            serde_json::to_string(&rfc3339(0, 7)).unwrap(),
            "\"1970-01-01T00:00:00.007Z\""
        );
    }

    #[tokio::test]
    async fn writes_rotates_and_hmacs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::new(
            AuditConfig {
                file: Some(path.clone()),
                max_bytes: 300,
                keep: 2,
                ..Default::default()
            },
            [7; 32].into(),
        );
        let h = audit.hmac("token-123");
        assert_eq!(h.len(), 32);
        assert_ne!(
            h,
            Audit::new(AuditConfig::default(), [8; 32].into()).hmac("token-123")
        );
        for _ in 0..10 {
            audit
                .record(&AuditEvent {
                    time: now_rfc3339(),
                    caller: Some("w"),
                    rpc: "GetAccessToken",
                    system_id: Some("s"),
                    outcome: "ok",
                    code: "OK",
                    token_hmac: Some(&h),
                    method: None,
                    path: None,
                    duration_ms: None,
                    event: None,
                    detail: None,
                })
                .await
                .unwrap();
        }
        assert!(
            path.exists()
                && dir.path().join("audit.log.1").exists()
                && dir.path().join("audit.log.2").exists()
        );
        assert!(!dir.path().join("audit.log.3").exists());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
        assert!(!text.contains("token-123"));
    }

    /// An audit trail writing to `audit.log` in `dir`, keyed with `[seed; 32]`.
    fn on_a_file(dir: &std::path::Path, seed: u8) -> (Audit, std::path::PathBuf) {
        let path = dir.join("audit.log");
        let config = AuditConfig {
            file: Some(path.clone()),
            ..Default::default()
        };
        (Audit::new(config, [seed; 32].into()), path)
    }

    /// A batch's leader polled once (it yields) and a follower of the batch polled once (it
    /// waits), boxed so that dropping one really drops its future.
    async fn led_and_followed<'a>(
        audit: &'a Audit,
        leader: &'a AuditEvent<'a>,
        follower: &'a AuditEvent<'a>,
    ) -> (
        std::pin::Pin<Box<impl Future<Output = Result<(), AuditError>> + 'a>>,
        std::pin::Pin<Box<impl Future<Output = Result<(), AuditError>> + 'a>>,
    ) {
        let mut leader = Box::pin(audit.record(leader));
        assert!(poll_once(leader.as_mut()).await.is_pending());
        let mut follower = Box::pin(audit.record(follower));
        assert!(poll_once(follower.as_mut()).await.is_pending());
        (leader, follower)
    }

    /// Reads `pipe` on a thread of its own up to the end of the line naming `caller`, and
    /// sends what it read; then reads on (closed, the pipe would fail writes still under way).
    fn read_until(
        mut pipe: std::fs::File,
        caller: &'static str,
    ) -> std::sync::mpsc::Receiver<Vec<u8>> {
        use std::io::Read;
        let (tx, rx) = std::sync::mpsc::channel();
        let needle = format!(r#""caller":"{caller}""#);
        std::thread::spawn(move || {
            let (mut seen, mut buf) = (Vec::new(), vec![0; 1 << 16]);
            let whole = |seen: &[u8]| {
                seen.ends_with(b"\n") && String::from_utf8_lossy(seen).contains(&needle)
            };
            while !whole(&seen) {
                let n = pipe.read(&mut buf).unwrap();
                seen.extend_from_slice(&buf[..n]);
            }
            tx.send(seen).unwrap();
            while pipe.read(&mut buf).is_ok_and(|n| n > 0) {}
        });
        rx
    }

    fn event(caller: &str) -> AuditEvent<'_> {
        AuditEvent {
            time: now_rfc3339(),
            caller: Some(caller),
            rpc: "GetAccessToken",
            system_id: Some("s"),
            outcome: "ok",
            code: "OK",
            token_hmac: None,
            method: None,
            path: None,
            duration_ms: None,
            event: None,
            detail: None,
        }
    }

    /// A trail whose last line a crash cut short: the next line starts on a line of its own.
    #[tokio::test]
    async fn a_line_cut_short_before_is_ended_first() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, path) = on_a_file(dir.path(), 5);
        std::fs::write(&path, "{\"whole\":1}\n{\"time\":\"2026-").unwrap();
        audit.record(&event("w")).await.unwrap();
        audit.record(&event("v")).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[1], "{\"time\":\"2026-");
        for l in [lines[0], lines[2], lines[3]] {
            assert!(serde_json::from_str::<serde_json::Value>(l).is_ok(), "{l}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_events_share_writes_and_each_call_returns_after_its_line_landed() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, path) = on_a_file(dir.path(), 3);
        let audit = Arc::new(audit);
        let mut tasks = Vec::new();
        for i in 0..400 {
            let (audit, path) = (audit.clone(), path.clone());
            tasks.push(tokio::spawn(async move {
                let name = format!("caller-{i}");
                audit.record(&event(&name)).await.unwrap();
                // Answered only once the line is in the file.
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(text.contains(&format!("\"{name}\"")), "{name} missing");
            }));
        }
        let joined = async {
            for t in tasks {
                t.await.unwrap();
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), joined)
            .await
            .expect("calls of a written batch were never woken");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 400);
        assert!(text
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
        let batches = audit.batches_written();
        assert!(
            batches < 400,
            "{batches} writes for 400 concurrent events: nothing was batched"
        );
    }

    async fn poll_once<F: std::future::Future>(
        mut f: std::pin::Pin<&mut F>,
    ) -> std::task::Poll<F::Output> {
        std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx))).await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_cancelled_leader_still_writes_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, path) = on_a_file(dir.path(), 4);
        let (leader_event, follower_event) = (event("leader"), event("follower"));
        let (leader, follower) = led_and_followed(&audit, &leader_event, &follower_event).await;
        // The leader's caller goes away before it handed the batch over.
        drop(leader);
        tokio::time::timeout(std::time::Duration::from_secs(5), follower)
            .await
            .expect("the follower was stranded by its cancelled leader")
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"leader\"") && text.contains("\"follower\""));
        assert_eq!(audit.batches_written(), 1);
    }

    /// Sets its flag when woken.
    #[derive(Default)]
    struct Flag(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The writer thread wakes a batch's leader only; a leader that goes after that, before it
    /// woke the others, wakes them as it goes.
    #[tokio::test(flavor = "current_thread")]
    async fn a_leader_gone_after_its_batch_was_written_still_wakes_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, _) = on_a_file(dir.path(), 6);
        let (leader_event, follower_event) = (event("leader"), event("follower"));
        let (mut leader, follower) = led_and_followed(&audit, &leader_event, &follower_event).await;
        // Polled again with a waker of its own: it hands the batch over and waits.
        let woken = Arc::new(Flag::default());
        let waker = std::task::Waker::from(woken.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(leader.as_mut().poll(&mut cx).is_pending());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !woken.0.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the leader was never woken"
            );
            tokio::task::yield_now().await;
        }
        drop(leader);
        tokio::time::timeout(std::time::Duration::from_secs(5), follower)
            .await
            .expect("the others of a batch whose leader went were never woken")
            .unwrap();
    }

    /// An audit trail whose file is `/dev/full` (opens, every write fails), in `dir`.
    fn on_dev_full(dir: &std::path::Path) -> (Audit, std::path::PathBuf) {
        let path = dir.join("audit.log");
        std::os::unix::fs::symlink("/dev/full", &path).unwrap();
        let config = AuditConfig {
            file: Some(path.clone()),
            ..Default::default()
        };
        (Audit::new(config, [1; 32].into()), path)
    }

    #[tokio::test]
    async fn unwritable_sink_is_reported_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, path) = on_dev_full(dir.path());
        let ev = AuditEvent::now("x", "ok", "OK");
        assert!(audit.record(&ev).await.is_err());
        assert!(!audit.is_healthy());
        std::fs::remove_file(&path).unwrap();
        assert!(audit.record(&ev).await.is_ok());
        assert!(audit.is_healthy());
    }

    /// A trail whose sink stopped taking writes (a pipe nobody reads; `path` is one, held
    /// open by the returned handle, which reads nothing until asked).
    fn on_a_stalled_pipe(dir: &std::path::Path) -> (Audit, std::fs::File) {
        let path = dir.join("audit.pipe");
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        assert!(made.unwrap().success());
        let pipe = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let config = AuditConfig {
            file: Some(path),
            ..Default::default()
        };
        (Audit::new(config, [2; 32].into()), pipe)
    }

    /// A write that does not return holds up only the calls whose lines wait for it: they fail
    /// once it has taken the limit, later ones are refused at once, and the trail is unhealthy
    /// until the write returns. Lines are never written on the caller's thread.
    #[tokio::test(flavor = "current_thread")]
    async fn a_stalled_write_fails_its_calls_and_refuses_new_ones_until_it_returns() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let (audit, pipe) = on_a_stalled_pipe(dir.path());
        // More than any pipe holds (64 KiB, 1 MiB with 64-KiB pages): the write blocks.
        let long = "x".repeat(4 << 20);
        let stuck_event = AuditEvent {
            detail: Some(&long),
            ..event("stuck")
        };
        let stuck = audit.record(&stuck_event);
        tokio::pin!(stuck);
        assert!(poll_once(stuck.as_mut()).await.is_pending());
        assert!(!audit.drain(Duration::from_millis(100)).await);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !audit.writer.age_busy() {
            assert!(
                std::time::Instant::now() < deadline,
                "the write never began"
            );
            tokio::task::yield_now().await;
        }
        audit.writer.fail_stalled();
        let e = tokio::time::timeout(Duration::from_secs(5), stuck)
            .await
            .expect("the calls of a stalled write were left waiting");
        assert!(e.unwrap_err().to_string().contains("no write"));
        assert!(!audit.is_healthy());
        let later = tokio::time::timeout(Duration::from_secs(5), audit.record(&event("later")))
            .await
            .expect("a new line waited behind a stalled write");
        assert!(later.is_err());
        // The pipe is read again: the write returns, and the trail is healthy.
        let mut health = audit.health();
        let read = read_until(pipe, "after");
        tokio::time::timeout(Duration::from_secs(10), health.wait_for(|ok| *ok))
            .await
            .unwrap()
            .unwrap();
        let after = tokio::time::timeout(Duration::from_secs(5), audit.record(&event("after")));
        after.await.unwrap().unwrap();
        assert!(audit.drain(Duration::from_secs(5)).await);
        let seen = read.recv_timeout(Duration::from_secs(10)).unwrap();
        let seen = String::from_utf8(seen).unwrap();
        assert!(seen.contains("\"stuck\"") && !seen.contains("\"later\""));
    }

    /// Batches queued behind a write go out in the order they were closed, a megabyte at most
    /// per write: three of 600 KiB take three writes, not one.
    #[tokio::test(flavor = "current_thread")]
    async fn queued_batches_are_written_in_order_a_megabyte_at_a_time() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let (audit, pipe) = on_a_stalled_pipe(dir.path());
        let (long, big) = ("x".repeat(4 << 20), "y".repeat(600 << 10));
        let stuck_event = AuditEvent {
            detail: Some(&long),
            ..event("stuck")
        };
        let events: Vec<_> = ["A", "B", "C"]
            .into_iter()
            .map(|name| AuditEvent {
                detail: Some(&big),
                ..event(name)
            })
            .collect();
        // Each leads a batch of its own: made and polled twice before the next joins (the
        // first poll yields, the second hands the batch over).
        let mut calls = Vec::new();
        for e in std::iter::once(&stuck_event).chain(&events) {
            let mut call = Box::pin(audit.record(e));
            assert!(poll_once(call.as_mut()).await.is_pending());
            assert!(poll_once(call.as_mut()).await.is_pending());
            calls.push(call);
        }
        let read = read_until(pipe, "C");
        for call in calls {
            let done = tokio::time::timeout(Duration::from_secs(10), call).await;
            done.expect("a queued batch was never written").unwrap();
        }
        let seen = read.recv_timeout(Duration::from_secs(10)).unwrap();
        let seen = String::from_utf8_lossy(&seen);
        let at = |name: &str| seen.find(&format!(r#""caller":"{name}""#)).expect(name);
        assert!(at("stuck") < at("A") && at("A") < at("B") && at("B") < at("C"));
        assert_eq!(audit.batches_written(), 4);
    }

    /// A trail whose open blocks (a FIFO nobody reads) is reported at start after a short
    /// wait, instead of holding the start up for as long as the open blocks.
    #[test]
    fn a_trail_whose_open_blocks_is_reported_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.pipe");
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        assert!(made.unwrap().success());
        let config = AuditConfig {
            file: Some(path.clone()),
            ..Default::default()
        };
        let audit = Arc::new(Audit::new(config, [9; 32].into()));
        let (tx, rx) = std::sync::mpsc::channel();
        let checking = audit.clone();
        std::thread::spawn(move || {
            checking.check_at_start();
            tx.send(()).unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("the start waited for the trail's open");
        assert!(!audit.is_healthy());
        // A reader lets the blocked open go (and its thread end).
        drop(std::fs::File::open(&path).unwrap());
    }

    /// A failing sink is tried again at once, then after a growing wait: a probe every second
    /// does not write a line a second (to stdout, say, while the file is what fails).
    #[tokio::test]
    async fn a_failing_sink_is_rechecked_at_a_growing_interval() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, path) = on_dev_full(dir.path());
        audit.recheck().await;
        assert_eq!(audit.batches_written(), 0, "a healthy sink is left alone");
        audit.check_at_start();
        assert!(audit.is_healthy(), "/dev/full opens");
        assert!(audit.record(&event("x")).await.is_err());
        let failed = audit.batches_written();
        for _ in 0..5 {
            audit.recheck().await;
        }
        assert_eq!(audit.batches_written(), failed + 1);
        assert!(!audit.is_healthy());
        std::fs::remove_file(&path).unwrap();
        // The next try is a second away; back-dated here instead of waited for.
        if let Some((at, _)) = crate::util::sync::lock(&audit.rechecks).as_mut() {
            *at = std::time::Instant::now();
        }
        audit.recheck().await;
        assert!(audit.is_healthy());
        let written = std::fs::read_to_string(&path).unwrap();
        assert!(written.contains(r#""rpc":"AuditCheck""#), "{written}");
    }
}
