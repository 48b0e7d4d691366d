//! Prometheus metrics, exposed at `/metrics` on the HTTP listener.
//!
//! Every label set is bounded (RPC names, gRPC codes, system kinds, fixed outcomes): no system
//! ids, caller names or URLs, and never a secret. Counters are atomics indexed by those fixed
//! sets, so recording costs a few relaxed atomic adds on the hot path.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

use crate::model::SystemKind;

/// The RPCs metrics are kept for.
pub const RPCS: &[&str] = &[
    "RegisterSystem",
    "CheckAuthentication",
    "GetAccessToken",
    "RotateCredential",
    "GetSystem",
    "ListSystems",
    "DeleteSystem",
    "CreateCaller",
    "ListCallers",
    "RevokeCaller",
    "StartAuthorization",
    "RotateMasterKey",
    "GetKeyStatus",
    "RetireKey",
    "SetDelivery",
    "ExportBackup",
    "RestoreBackup",
    "WatchSystems",
];
/// Webhook delivery outcomes.
pub const WEBHOOK_OUTCOMES: &[&str] = &[
    "delivered",
    "rejected",
    "refused",
    "unauthorized",
    "blocked",
    "unreachable",
    "expired",
    "dropped",
];
const CODES: usize = 17;
/// Latency bucket bounds, seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Refresh outcomes.
pub const OUTCOMES: &[&str] = &["ok", "rejected", "transient"];

struct Histogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: (0..BUCKETS.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{}le=\"{b}\"}} {cumulative}",
                if labels.is_empty() { "" } else { "," }
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{}le=\"+Inf\"}} {count}",
            if labels.is_empty() { "" } else { "," }
        );
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// The process's metrics.
pub struct Metrics {
    rpc_counts: Vec<AtomicU64>,
    rpc_latency: Vec<Histogram>,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    refreshes: Vec<AtomicU64>,
    upstream: Histogram,
    upstream_errors: AtomicU64,
    audit_errors: AtomicU64,
    audit_dropped: AtomicU64,
    http_refused: AtomicU64,
    grpc_refused: AtomicU64,
    store_write_errors: AtomicU64,
    records_refused: AtomicU64,
    proxy: Vec<AtomicU64>,
    webhooks: Vec<AtomicU64>,
    scheduled_checks: Vec<AtomicU64>,
    events_dropped: AtomicU64,
    quota_refusals: Vec<AtomicU64>,
    vendor_throttled: Vec<AtomicU64>,
}

/// The global registry.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    rpc_counts: (0..RPCS.len() * CODES).map(|_| AtomicU64::new(0)).collect(),
    rpc_latency: (0..RPCS.len()).map(|_| Histogram::new()).collect(),
    cache_hits: AtomicU64::new(0),
    cache_misses: AtomicU64::new(0),
    refreshes: (0..SystemKind::ALL.len() * OUTCOMES.len())
        .map(|_| AtomicU64::new(0))
        .collect(),
    upstream: Histogram::new(),
    upstream_errors: AtomicU64::new(0),
    audit_errors: AtomicU64::new(0),
    audit_dropped: AtomicU64::new(0),
    http_refused: AtomicU64::new(0),
    grpc_refused: AtomicU64::new(0),
    store_write_errors: AtomicU64::new(0),
    records_refused: AtomicU64::new(0),
    proxy: (0..6).map(|_| AtomicU64::new(0)).collect(),
    webhooks: WEBHOOK_OUTCOMES.iter().map(|_| AtomicU64::new(0)).collect(),
    scheduled_checks: CHECK_OUTCOMES.iter().map(|_| AtomicU64::new(0)).collect(),
    events_dropped: AtomicU64::new(0),
    quota_refusals: (0..SystemKind::ALL.len() * QUOTA_REASONS.len())
        .map(|_| AtomicU64::new(0))
        .collect(),
    vendor_throttled: SystemKind::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
});

/// Why the proxy refused a call itself, in `crate::broker::quota::LimitReason`'s order.
pub const QUOTA_REASONS: &[&str] = &["blocked", "reserve", "concurrency"];

/// A gauge of [`QuotaGauges`]: name, help, reading.
type QuotaGauge = (&'static str, &'static str, fn(&QuotaGauges) -> Option<i64>);

/// The proxy's quota book, summed up per kind (no system ids as labels).
#[derive(Debug, Default, Clone, Copy)]
pub struct QuotaGauges {
    /// The lowest remaining count among the kind's systems, when any is known.
    pub remaining_min: Option<i64>,
    /// The limit of that system.
    pub limit: Option<i64>,
    /// Calls in flight.
    pub in_flight: u64,
    /// Systems the proxy holds back.
    pub blocked_systems: u64,
    /// The longest block left, seconds.
    pub blocked_seconds_max: u64,
}

/// Systems counted for `/metrics` (see `Broker::system_counts`).
#[derive(Debug, Default, Clone)]
pub struct SystemCounts {
    /// Active, authorization pending, re-authorization required.
    pub by_state: [u64; 3],
    /// By kind and health.
    pub by_health: std::collections::BTreeMap<(&'static str, crate::model::SystemHealth), u64>,
    /// Systems with a known horizon, by how far it is ([`HORIZON_BUCKETS`]).
    pub by_horizon: [u64; 5],
    /// The proxy's quota book by kind ([`SystemKind::ALL`] order).
    pub quota: [QuotaGauges; 8],
}

/// Horizon buckets: (label, at most this many seconds away); the last takes the rest.
pub const HORIZON_BUCKETS: [(&str, u64); 5] = [
    ("expired", 0),
    ("1d", 86_400),
    ("7d", 7 * 86_400),
    ("30d", 30 * 86_400),
    ("later", u64::MAX),
];

/// Scheduled check outcomes.
pub const CHECK_OUTCOMES: &[&str] = &["ok", "failed", "error"];

/// The position of `k` in [`SystemKind::ALL`].
pub fn kind_index(k: SystemKind) -> usize {
    SystemKind::ALL.iter().position(|x| *x == k).unwrap_or(0)
}

impl Metrics {
    /// One finished RPC.
    pub fn rpc(&self, rpc: &str, code: tonic::Code, took: Duration) {
        if let Some(i) = RPCS.iter().position(|r| *r == rpc) {
            let c = (code as usize).min(CODES - 1);
            self.rpc_counts[i * CODES + c].fetch_add(1, Ordering::Relaxed);
            self.rpc_latency[i].observe(took);
        }
    }

    /// A `GetAccessToken` answered from memory (`hit`) or not.
    pub fn cache(&self, hit: bool) {
        if hit {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.cache_misses.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One upstream token call for `kind`: outcome is `ok`, `rejected` or `transient`.
    pub fn refresh(&self, kind: SystemKind, outcome: &str) {
        let o = OUTCOMES.iter().position(|x| *x == outcome).unwrap_or(2);
        self.refreshes[kind_index(kind) * OUTCOMES.len() + o].fetch_add(1, Ordering::Relaxed);
    }

    /// One webhook delivery attempt (or an event given up on: `expired`).
    pub fn webhook(&self, outcome: &str) {
        self.webhooks(outcome, 1);
    }

    /// `n` webhook deliveries (or events) of one outcome.
    pub fn webhooks(&self, outcome: &str, n: u64) {
        if let Some(i) = WEBHOOK_OUTCOMES.iter().position(|o| *o == outcome) {
            self.webhooks[i].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// An event dropped because the store's event log could not be written for too long.
    pub fn event_dropped(&self) {
        self.events_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// One scheduled check.
    pub fn scheduled_check(&self, outcome: &str) {
        if let Some(i) = CHECK_OUTCOMES.iter().position(|o| *o == outcome) {
            self.scheduled_checks[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One outbound HTTP exchange.
    pub fn upstream(&self, took: Duration, ok: bool) {
        self.upstream.observe(took);
        if !ok {
            self.upstream_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An audit event that could not be written.
    pub fn audit_error(&self) {
        self.audit_errors(1);
    }

    /// `n` audit events that could not be written.
    pub fn audit_errors(&self, n: u64) {
        self.audit_errors.fetch_add(n, Ordering::Relaxed);
    }

    /// A stored record refused on read (undecodable, or failing authentication).
    pub fn record_refused(&self) {
        self.records_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// An audit line for a refused call left out by the rate limit.
    pub fn audit_dropped(&self) {
        self.audit_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// An HTTP connection closed at once because the listener was at its connection cap.
    pub fn http_refused(&self) {
        self.http_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A gRPC connection closed at once because the listener was at its connection cap.
    pub fn grpc_refused(&self) {
        self.grpc_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A store write (or flush) that failed.
    pub fn store_write_error(&self) {
        self.store_write_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A proxied call the broker refused itself, by kind and reason ([`QUOTA_REASONS`]).
    pub fn quota_refusal(&self, kind: SystemKind, reason: &str) {
        let r = QUOTA_REASONS.iter().position(|x| *x == reason).unwrap_or(0);
        self.quota_refusals[kind_index(kind) * QUOTA_REASONS.len() + r]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// A vendor refused a proxied call for quota (429, Salesforce's over-quota 403).
    pub fn vendor_throttled(&self, kind: SystemKind) {
        self.vendor_throttled[kind_index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    fn render_quota(&self, out: &mut String, systems: Option<&SystemCounts>) {
        out.push_str("# HELP credbroker_proxy_local_refusals_total Proxied calls the broker answered itself (x-credbroker-limited: local), by kind and reason.\n# TYPE credbroker_proxy_local_refusals_total counter\n");
        for (k, kind) in SystemKind::ALL.iter().enumerate() {
            for (r, reason) in QUOTA_REASONS.iter().enumerate() {
                let n = self.quota_refusals[k * QUOTA_REASONS.len() + r].load(Ordering::Relaxed);
                let _ = writeln!(out, "credbroker_proxy_local_refusals_total{{kind=\"{kind}\",reason=\"{reason}\"}} {n}");
            }
        }
        out.push_str("# HELP credbroker_proxy_vendor_throttled_total Proxied calls the vendor refused for quota (429, Salesforce's REQUEST_LIMIT_EXCEEDED), by kind.\n# TYPE credbroker_proxy_vendor_throttled_total counter\n");
        for (k, kind) in SystemKind::ALL.iter().enumerate() {
            let n = self.vendor_throttled[k].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "credbroker_proxy_vendor_throttled_total{{kind=\"{kind}\"}} {n}"
            );
        }
        let Some(c) = systems else { return };
        let gauges: [QuotaGauge; 5] = [
            (
                "credbroker_upstream_quota_remaining",
                "The lowest remaining vendor quota among the kind's systems.",
                |g| g.remaining_min,
            ),
            (
                "credbroker_upstream_quota_limit",
                "The quota limit of that system.",
                |g| g.limit,
            ),
            (
                "credbroker_upstream_in_flight",
                "Proxied calls in flight.",
                |g| Some(g.in_flight as i64),
            ),
            (
                "credbroker_upstream_blocked_systems",
                "Systems the proxy holds back at the vendor's request.",
                |g| Some(g.blocked_systems as i64),
            ),
            (
                "credbroker_upstream_blocked_seconds",
                "The longest hold-back left, seconds.",
                |g| Some(g.blocked_seconds_max as i64),
            ),
        ];
        for (name, help, get) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (k, kind) in SystemKind::ALL.iter().enumerate() {
                if let Some(v) = get(&c.quota[k]) {
                    let _ = writeln!(out, "{name}{{kind=\"{kind}\"}} {v}");
                }
            }
        }
    }

    /// One proxied call, by the status class of its answer.
    pub fn proxy(&self, status: u16) {
        let class = (status / 100).min(5) as usize;
        self.proxy[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition; `systems_by_state` comes from the store.
    /// `store_writable` is the serving broker's [`crate::store::WriteHealth`].
    pub fn render(&self, systems: Option<&SystemCounts>, store_writable: Option<bool>) -> String {
        let mut out = String::with_capacity(16 * 1024);
        self.render_rpcs(&mut out);
        out.push_str("# HELP credbroker_token_cache_total GetAccessToken answers from memory (hit) or not (miss).\n# TYPE credbroker_token_cache_total counter\n");
        let _ = writeln!(
            out,
            "credbroker_token_cache_total{{result=\"hit\"}} {}",
            self.cache_hits.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "credbroker_token_cache_total{{result=\"miss\"}} {}",
            self.cache_misses.load(Ordering::Relaxed)
        );
        out.push_str("# HELP credbroker_token_refresh_total Upstream token calls by system kind and outcome.\n# TYPE credbroker_token_refresh_total counter\n");
        for (k, kind) in SystemKind::ALL.iter().enumerate() {
            for (o, outcome) in OUTCOMES.iter().enumerate() {
                let n = self.refreshes[k * OUTCOMES.len() + o].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "credbroker_token_refresh_total{{kind=\"{kind}\",outcome=\"{outcome}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP credbroker_upstream_duration_seconds Outbound HTTP exchanges.\n# TYPE credbroker_upstream_duration_seconds histogram\n");
        self.upstream
            .render(&mut out, "credbroker_upstream_duration_seconds", "");
        self.render_counters(&mut out);
        if let Some(w) = store_writable {
            out.push_str("# HELP credbroker_store_writable 1 while writes reach the store, 0 while they fail.\n# TYPE credbroker_store_writable gauge\n");
            let _ = writeln!(out, "credbroker_store_writable {}", u8::from(w));
        }
        out.push_str("# HELP credbroker_proxy_requests_total Proxied calls by HTTP status class of the answer.\n# TYPE credbroker_proxy_requests_total counter\n");
        for (class, n) in self.proxy.iter().enumerate() {
            let _ = writeln!(
                out,
                "credbroker_proxy_requests_total{{class=\"{class}xx\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP credbroker_webhook_deliveries_total Webhook delivery attempts by outcome.\n# TYPE credbroker_webhook_deliveries_total counter\n");
        for (o, outcome) in WEBHOOK_OUTCOMES.iter().enumerate() {
            let _ = writeln!(
                out,
                "credbroker_webhook_deliveries_total{{outcome=\"{outcome}\"}} {}",
                self.webhooks[o].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP credbroker_events_dropped_total System events dropped unlogged (the store refused them too long).\n# TYPE credbroker_events_dropped_total counter\ncredbroker_events_dropped_total {}",
            self.events_dropped.load(Ordering::Relaxed)
        );
        out.push_str("# HELP credbroker_scheduled_checks_total Scheduled checks by outcome.\n# TYPE credbroker_scheduled_checks_total counter\n");
        for (o, outcome) in CHECK_OUTCOMES.iter().enumerate() {
            let _ = writeln!(
                out,
                "credbroker_scheduled_checks_total{{outcome=\"{outcome}\"}} {}",
                self.scheduled_checks[o].load(Ordering::Relaxed)
            );
        }
        self.render_quota(&mut out, systems);
        if let Some(c) = systems {
            render_systems(&mut out, c);
        }
        out
    }

    fn render_rpcs(&self, out: &mut String) {
        out.push_str("# HELP credbroker_rpc_total RPCs by method and gRPC code.\n# TYPE credbroker_rpc_total counter\n");
        for (i, rpc) in RPCS.iter().enumerate() {
            for c in 0..CODES {
                let n = self.rpc_counts[i * CODES + c].load(Ordering::Relaxed);
                if n > 0 {
                    let code = crate::error::code_name(tonic::Code::from(c as i32));
                    let _ = writeln!(
                        out,
                        "credbroker_rpc_total{{method=\"{rpc}\",code=\"{code}\"}} {n}"
                    );
                }
            }
        }
        out.push_str("# HELP credbroker_rpc_duration_seconds RPC latency by method.\n# TYPE credbroker_rpc_duration_seconds histogram\n");
        for (i, rpc) in RPCS.iter().enumerate() {
            if self.rpc_latency[i].count.load(Ordering::Relaxed) > 0 {
                self.rpc_latency[i].render(
                    out,
                    "credbroker_rpc_duration_seconds",
                    &format!("method=\"{rpc}\""),
                );
            }
        }
    }

    fn render_counters(&self, out: &mut String) {
        for (name, help, value) in [
            (
                "credbroker_upstream_errors_total",
                "Outbound exchanges that failed (timeout, connect, refused, too large).",
                &self.upstream_errors,
            ),
            (
                "credbroker_http_connections_refused_total",
                "HTTP connections closed at the connection cap.",
                &self.http_refused,
            ),
            (
                "credbroker_grpc_connections_refused_total",
                "gRPC connections closed at the connection cap.",
                &self.grpc_refused,
            ),
            (
                "credbroker_audit_dropped_total",
                "Audit lines for refused or unauthenticated calls left out by the rate limit.",
                &self.audit_dropped,
            ),
            (
                "credbroker_audit_errors_total",
                "Audit events that could not be written.",
                &self.audit_errors,
            ),
            (
                "credbroker_store_records_refused_total",
                "Stored system or caller records refused on read: undecodable, or failing authentication (edited without the master key).",
                &self.records_refused,
            ),
            (
                "credbroker_store_write_errors_total",
                "Store writes or flushes that failed (I/O error, disk full).",
                &self.store_write_errors,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
    }
}

fn render_systems(out: &mut String, c: &SystemCounts) {
    out.push_str(
        "# HELP credbroker_systems Registered systems by state.\n# TYPE credbroker_systems gauge\n",
    );
    for (state, n) in [
        "active",
        "authorization_pending",
        "reauthorization_required",
    ]
    .iter()
    .zip(c.by_state)
    {
        let _ = writeln!(out, "credbroker_systems{{state=\"{state}\"}} {n}");
    }
    out.push_str("# HELP credbroker_systems_health Registered systems by kind and credential health.\n# TYPE credbroker_systems_health gauge\n");
    for ((kind, health), n) in &c.by_health {
        let _ = writeln!(
            out,
            "credbroker_systems_health{{kind=\"{kind}\",health=\"{}\"}} {n}",
            health.as_str()
        );
    }
    out.push_str("# HELP credbroker_credential_horizon_systems Systems with a known credential horizon, by how far it is.\n# TYPE credbroker_credential_horizon_systems gauge\n");
    for ((label, _), n) in HORIZON_BUCKETS.iter().zip(c.by_horizon) {
        let _ = writeln!(
            out,
            "credbroker_credential_horizon_systems{{within=\"{label}\"}} {n}"
        );
    }
}
