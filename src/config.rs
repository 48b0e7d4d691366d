//! Configuration: every setting has a default; a TOML file, environment variables and flags
//! override it in that order (flag > env > file > default).
//!
//! The binary parses flags and environment with clap into [`Overrides`]; tests build a
//! [`Config`] directly, so nothing here reads or mutates the process environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default gRPC listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./data";
/// Default HTTP listen address (OAuth callback, later metrics and proxy).
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";

/// The broker's settings, one section per concern. The TOML file and the environment stay flat
/// (their keys are the public names); [`Config::build`] fills each section with its own
/// `apply`.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Listeners, request limits, shutdown, logs.
    pub server: ServerConfig,
    /// The data directory, the master key and the store.
    pub store: StoreConfig,
    /// TLS of both listeners, and how callers authenticate.
    pub tls: TlsConfig,
    /// The audit trail.
    pub audit: AuditTrailConfig,
    /// Outbound calls: the egress guard and upstream limits.
    pub egress: EgressConfig,
    /// Token lifetimes, refreshes, authorizations and keep-alive.
    pub refresh: RefreshConfig,
    /// Proxy delivery.
    pub proxy: ProxyConfig,
    /// Per-vendor OAuth settings.
    pub vendors: crate::backends::oauth::OAuthSettings,
    /// Webhook endpoints for system events.
    pub webhooks: Vec<WebhookConfig>,
    /// The proxy's quota rules (`[quota.<kind>]`, `[quota.systems.<id>]`).
    pub quota: crate::broker::quota::QuotaSettings,
}

/// `[quota]`: a table per kind (`[quota.salesforce]`) and per system (`[quota.systems.<id>]`).
#[derive(Debug, Default, Deserialize)]
pub struct QuotaFile {
    /// Per system id.
    #[serde(default)]
    pub systems: std::collections::HashMap<String, crate::broker::quota::LimitsOverride>,
    /// Per kind slug.
    #[serde(flatten)]
    pub kinds: std::collections::HashMap<String, crate::broker::quota::LimitsOverride>,
}

fn quota_settings(
    f: &mut FileConfig,
    errors: &mut Vec<String>,
) -> crate::broker::quota::QuotaSettings {
    let mut q = crate::broker::quota::QuotaSettings::default();
    let Some(file) = f.quota.take() else {
        return q;
    };
    for (slug, o) in file.kinds {
        errors.extend(o.problems(&format!("quota.{slug}")));
        match crate::model::SystemKind::from_slug(&slug) {
            Some(kind) => {
                if q.kinds.insert(kind, o).is_some() {
                    errors.push(format!(
                        "quota.{slug}: the kind {} is configured twice (spelt two ways)",
                        kind.slug()
                    ));
                }
            }
            None => errors.push(format!(
                "quota.{slug}: not a system kind (one of {})",
                crate::model::SystemKind::ALL.map(|k| k.slug()).join(", ")
            )),
        }
    }
    for (id, o) in file.systems {
        errors.extend(o.problems(&format!("quota.systems.{id}")));
        if crate::broker::validate_system_id(&id).is_err() {
            errors.push(format!("quota.systems.{id}: not a valid system id"));
        }
        q.systems.insert(id, o);
    }
    q
}

/// One webhook endpoint (`[[webhooks]]`). `Debug` shows the host only (a URL may carry a token).
#[derive(Clone)]
pub struct WebhookConfig {
    /// Where events are POSTed.
    pub url: String,
    /// The signing secret (Standard Webhooks: `whsec_` + base64, several separated by white
    /// space while one is rotated; or raw bytes).
    pub secret: crate::secret::SecretString,
    /// Event types delivered (empty: all).
    pub events: Vec<String>,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = url::Url::parse(&self.url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_default();
        f.debug_struct("WebhookConfig")
            .field("host", &host)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

/// `[[webhooks]]` in the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWebhook {
    /// URL.
    pub url: String,
    /// Path of the file holding the signing secret.
    pub secret_file: PathBuf,
    /// Event types (empty: all).
    #[serde(default)]
    pub events: Vec<String>,
}

/// Listeners, request limits, shutdown, logs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// HTTP listen address (`None`: no HTTP listener).
    pub http_listen: Option<SocketAddr>,
    /// The URL people and vendors reach the HTTP listener at (redirect URIs are built from it);
    /// `None` means `http://{http_listen}`.
    pub public_url: Option<String>,
    /// Server-side cap on any RPC's duration.
    pub request_timeout: Duration,
    /// How long in-flight RPCs may run after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Largest accepted request message.
    pub max_request_bytes: usize,
    /// Concurrent RPCs per connection.
    pub concurrency_limit_per_connection: usize,
    /// HTTP/2 max concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// The HTTP listener closes a connection whose next request head (the first, or the next on
    /// an idle keep-alive connection) does not arrive whole within this.
    pub http_header_timeout: Duration,
    /// Open HTTP connections at most; more are closed at once.
    pub http_max_connections: usize,
    /// Open gRPC connections at most (TLS handshakes in flight included); more are closed at
    /// once.
    pub grpc_max_connections: usize,
    /// Serve the admin console under `/console` on the HTTP listener.
    pub console: bool,
    /// A console session unused this long is over.
    pub console_session_idle: Duration,
    /// A console session is over this long after sign-in.
    pub console_session_max: Duration,
    /// Emit JSON logs.
    pub log_json: bool,
    /// Threads serving gRPC and HTTP, each a `current_thread` runtime accepting on its own
    /// handle of the `listen` and `http_listen` sockets (`credbroker --runtime per-core`);
    /// 1: the main runtime alone.
    pub serving_threads: usize,
}

/// The most a connection cap may be (far above any descriptor limit; a semaphore takes no more
/// than `usize::MAX >> 3` permits).
pub const MAX_CONNECTIONS: usize = 1_000_000;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 50051))),
            http_listen: DEFAULT_HTTP_LISTEN.parse().ok(),
            public_url: None,
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            max_request_bytes: 64 * 1024,
            concurrency_limit_per_connection: 256,
            max_concurrent_streams: 256,
            http_header_timeout: Duration::from_secs(10),
            http_max_connections: 1024,
            grpc_max_connections: 4096,
            console: true,
            console_session_idle: Duration::from_secs(30 * 60),
            console_session_max: Duration::from_secs(12 * 3600),
            log_json: false,
            serving_threads: 1,
        }
    }
}

/// The data directory, the master key and the store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Data directory (store, generated master key, admin token).
    pub data_dir: PathBuf,
    /// Master key file; `None` means `<data_dir>/master.key`.
    pub master_key_file: Option<PathBuf>,
    /// `postgres://…` selects the PostgreSQL store (replicas); `None` means sled in the data
    /// directory. Holds a password: redacted in `Debug`.
    pub url: Option<crate::secret::SecretString>,
    /// CA certificate (PEM) that verifies the PostgreSQL server under `sslmode=require`.
    pub ca_file: Option<PathBuf>,
    /// Tag records written before record authentication (an upgrade step; off by default).
    pub adopt_unauthenticated_records: bool,
    /// Replicas: keep a sealed snapshot of the mirrored rows under the data directory and start
    /// from it while PostgreSQL is away (off: stay not-ready until it answers).
    pub replica_snapshot: bool,
    /// How often a changed mirror is written to the snapshot.
    pub replica_snapshot_interval: Duration,
    /// The embedded sled store's page cache, MiB.
    pub cache_mib: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            master_key_file: None,
            url: None,
            ca_file: None,
            adopt_unauthenticated_records: crate::broker::BrokerSettings::default()
                .adopt_unauthenticated_records,
            replica_snapshot: true,
            replica_snapshot_interval: Duration::from_secs(30),
            cache_mib: crate::store::sled::DEFAULT_CACHE_MIB,
        }
    }
}

/// TLS of both listeners, and how callers authenticate.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Server certificate (PEM); with `key_file`, the gRPC listener speaks TLS.
    pub cert_file: Option<PathBuf>,
    /// Server private key (PEM).
    pub key_file: Option<PathBuf>,
    /// CA for client certificates (PEM): mTLS; certificate names map to callers.
    pub client_ca_file: Option<PathBuf>,
    /// Accept bearer caller tokens (switch off to require client certificates).
    pub bearer_tokens: bool,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// How often certificate files are checked for changes (SIGHUP reloads at once).
    pub reload_interval: Duration,
    /// Certificate (PEM) of the HTTP listener; with `http_key_file`, it speaks HTTPS.
    pub http_cert_file: Option<PathBuf>,
    /// Private key (PEM) of the HTTP listener.
    pub http_key_file: Option<PathBuf>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            bearer_tokens: true,
            handshake_timeout: Duration::from_secs(10),
            reload_interval: Duration::from_secs(10),
            http_cert_file: None,
            http_key_file: None,
        }
    }
}

/// The audit trail.
#[derive(Debug, Clone)]
pub struct AuditTrailConfig {
    /// Audit file; `None` means `<data-dir>/audit.log`.
    pub file: Option<PathBuf>,
    /// No audit file at all (`CREDBROKER_AUDIT_FILE=off`).
    pub file_off: bool,
    /// Also write audit events to stdout.
    pub stdout: bool,
    /// Refuse secret-returning RPCs when the audit sink fails.
    pub fail_closed: bool,
    /// Rotate the audit file at this size.
    pub max_bytes: u64,
    /// Rotated audit files kept.
    pub keep: usize,
}

impl Default for AuditTrailConfig {
    fn default() -> Self {
        let audit = crate::audit::AuditConfig::default();
        Self {
            file: None,
            file_off: false,
            stdout: audit.stdout,
            fail_closed: audit.fail_closed,
            max_bytes: audit.max_bytes,
            keep: audit.keep,
        }
    }
}

/// Outbound calls: the egress guard and upstream limits.
#[derive(Debug, Clone)]
pub struct EgressConfig {
    /// Accept `http://` base URLs (fakes, labs).
    pub allow_http: bool,
    /// Private destinations the egress guard admits (CIDRs and host names).
    pub allow: crate::backends::egress::AllowList,
    /// Cap on any outbound upstream call (and on a whole check).
    pub upstream_timeout: Duration,
    /// Largest upstream response body read.
    pub max_upstream_body_bytes: usize,
    /// The corporate egress proxy, if any.
    pub proxy: Option<crate::backends::egress::EgressProxy>,
    /// Per-system routes of proxied calls (`direct` or `proxy`), overriding `no_proxy`.
    pub proxy_systems: std::collections::HashMap<String, crate::backends::egress::ProxyRoute>,
}

impl EgressConfig {
    /// The egress guard every outbound client enforces.
    pub fn policy(&self) -> crate::backends::egress::EgressPolicy {
        crate::backends::egress::EgressPolicy {
            allow_http: self.allow_http,
            allow: self.allow.clone(),
            proxy: self.proxy.clone(),
        }
    }

    fn apply_proxy(&mut self, f: &mut FileConfig, o: &Overrides, errors: &mut Vec<String>) {
        let url = o.egress_proxy.clone().or(f.egress_proxy_url.take());
        let no_proxy = o
            .egress_no_proxy
            .clone()
            .or(f.egress_no_proxy.take().map(|v| v.join(",")))
            .unwrap_or_default();
        let creds_file = o
            .egress_proxy_credentials_file
            .clone()
            .or(f.egress_proxy_credentials_file.take());
        let credentials = match &creds_file {
            None => None,
            Some(p) => match std::fs::read_to_string(p) {
                Ok(c) => Some(c),
                Err(e) => {
                    errors.push(format!(
                        "egress proxy credentials file {}: {e}",
                        p.display()
                    ));
                    None
                }
            },
        };
        if let Some(url) = url.filter(|u| !u.trim().is_empty()) {
            match crate::backends::egress::EgressProxy::parse(
                &url,
                credentials.as_deref(),
                &no_proxy,
            ) {
                Ok(p) => self.proxy = Some(p),
                Err(e) => errors.push(format!("egress proxy: {e}")),
            }
        } else if creds_file.is_some() {
            errors.push("egress proxy credentials file given without an egress proxy URL".into());
        }
        for (id, route) in f.egress_proxy_systems.take().unwrap_or_default() {
            use crate::backends::egress::ProxyRoute;
            let route = match route.as_str() {
                "direct" => ProxyRoute::Direct,
                "proxy" => ProxyRoute::Proxy,
                other => {
                    errors.push(format!(
                        "egress_proxy_systems.{id}: '{other}' must be 'direct' or 'proxy'"
                    ));
                    continue;
                }
            };
            if crate::broker::validate_system_id(&id).is_err() {
                errors.push(format!("egress_proxy_systems.{id}: not a valid system id"));
            }
            self.proxy_systems.insert(id, route);
        }
    }
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            allow_http: false,
            allow: Default::default(),
            upstream_timeout: crate::broker::BrokerSettings::default().check_timeout,
            max_upstream_body_bytes: 1024 * 1024,
            proxy: None,
            proxy_systems: Default::default(),
        }
    }
}

/// Token lifetimes, refreshes, authorizations and keep-alive.
#[derive(Debug, Clone)]
pub struct RefreshConfig {
    /// How long a static header handed to a worker is declared valid before it asks again.
    pub static_header_ttl: Duration,
    /// Refresh an OAuth token when this fraction of its lifetime remains.
    pub ahead_fraction: f64,
    /// …but at least this long before expiry (capped at half the lifetime).
    pub ahead_min: Duration,
    /// Upstream token calls in flight at once, across all systems.
    pub max_concurrent: usize,
    /// Longest back-off between retries of a failing token endpoint.
    pub retry_max: Duration,
    /// How long a started authorization (its `state`) stays usable.
    pub authorization_ttl: Duration,
    /// How often idle authorization-code grants are checked for keep-alive.
    pub keepalive_interval: Duration,
    /// Refresh an idle grant when its refresh token would die within this long.
    pub keepalive_margin: Duration,
    /// Every stored system is checked again this often (zero: never).
    pub check_interval: Duration,
    /// Scheduled checks running at once, per kind.
    pub checks_per_vendor: usize,
}

impl Default for RefreshConfig {
    fn default() -> Self {
        let broker = crate::broker::BrokerSettings::default();
        Self {
            static_header_ttl: broker.static_header_ttl,
            ahead_fraction: broker.refresh.ahead_fraction,
            ahead_min: broker.refresh.ahead_min,
            max_concurrent: broker.refresh.max_concurrent,
            retry_max: broker.refresh.retry_max,
            authorization_ttl: broker.authorization_ttl,
            keepalive_interval: broker.keepalive_interval,
            keepalive_margin: broker.keepalive_margin,
            check_interval: broker.check_interval,
            checks_per_vendor: broker.checks_per_vendor,
        }
    }
}

/// Proxy delivery.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Delivery of static-secret systems registered without one.
    pub default_static_delivery: crate::model::Delivery,
    /// Lifetime of proxy leases.
    pub lease_ttl: Duration,
    /// Largest request or response body the proxy passes.
    pub max_body_bytes: u64,
    /// The proxy gives up when the upstream sends nothing for this long.
    pub read_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        let broker = crate::broker::BrokerSettings::default();
        Self {
            default_static_delivery: broker.default_static_delivery,
            lease_ttl: broker.lease_ttl,
            max_body_bytes: broker.proxy_max_body_bytes,
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// The TOML file's shape; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Config::listen`].
    pub listen: Option<String>,
    /// See [`Config::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`Config::master_key_file`].
    pub master_key_file: Option<PathBuf>,
    /// See [`Config::store_url`].
    pub store_url: Option<crate::secret::SecretString>,
    /// See [`Config::store_ca_file`].
    pub store_ca_file: Option<PathBuf>,
    /// `text` or `json`.
    pub log_format: Option<String>,
    /// See [`Config::egress_allow_http`].
    pub egress_allow_http: Option<bool>,
    /// CIDRs and host names, e.g. `["10.20.0.0/16", "tfs.corp.example"]`.
    pub egress_allow: Option<Vec<String>>,
    /// Seconds.
    pub request_timeout_secs: Option<u64>,
    /// Seconds.
    pub upstream_timeout_secs: Option<u64>,
    /// Seconds.
    pub shutdown_grace_secs: Option<u64>,
    /// Bytes.
    pub max_request_bytes: Option<usize>,
    /// Bytes.
    pub max_upstream_body_bytes: Option<usize>,
    /// Count.
    pub concurrency_limit_per_connection: Option<usize>,
    /// Count.
    pub max_concurrent_streams: Option<u32>,
    /// Seconds.
    pub static_header_ttl_secs: Option<u64>,
    /// Fraction in (0, 0.9].
    pub refresh_ahead_fraction: Option<f64>,
    /// Seconds.
    pub refresh_ahead_min_secs: Option<u64>,
    /// Count.
    pub max_concurrent_refreshes: Option<usize>,
    /// Seconds.
    pub refresh_retry_max_secs: Option<u64>,
    /// Seconds.
    pub salesforce_token_lifetime_secs: Option<u64>,
    /// Seconds.
    pub servicenow_refresh_token_lifespan_secs: Option<u64>,
    /// Seconds.
    pub salesforce_refresh_idle_secs: Option<u64>,
    /// Seconds.
    pub jira_refresh_idle_secs: Option<u64>,
    /// Address or `off`.
    pub http_listen: Option<String>,
    /// URL.
    pub public_url: Option<String>,
    /// URL.
    pub jira_auth_url: Option<String>,
    /// URL.
    pub jira_api_url: Option<String>,
    /// Directory.
    pub entra_federated_token_dir: Option<PathBuf>,
    /// Webhook endpoints.
    pub webhooks: Option<Vec<FileWebhook>>,
    /// Seconds (300 – 172800).
    pub zendesk_access_token_ttl_secs: Option<u64>,
    /// Seconds (604800 – 7776000).
    pub zendesk_refresh_token_ttl_secs: Option<u64>,
    /// Seconds.
    pub keepalive_interval_secs: Option<u64>,
    /// Seconds (0: off).
    pub check_interval_secs: Option<u64>,
    /// Count.
    pub checks_per_vendor: Option<usize>,
    /// Seconds.
    pub keepalive_margin_secs: Option<u64>,
    /// Path or `off`.
    pub audit_file: Option<String>,
    /// Bool.
    pub audit_stdout: Option<bool>,
    /// Bool.
    pub audit_fail_closed: Option<bool>,
    /// Bytes.
    pub audit_max_bytes: Option<u64>,
    /// Count.
    pub audit_keep: Option<usize>,
    /// Path.
    pub tls_cert_file: Option<PathBuf>,
    /// Path.
    pub tls_key_file: Option<PathBuf>,
    /// Path.
    pub tls_client_ca_file: Option<PathBuf>,
    /// Bool.
    pub bearer_tokens: Option<bool>,
    /// Seconds.
    pub tls_handshake_timeout_secs: Option<u64>,
    /// Seconds.
    pub tls_reload_interval_secs: Option<u64>,
    /// `proxy` or `header`.
    pub default_static_delivery: Option<String>,
    /// Seconds.
    pub lease_ttl_secs: Option<u64>,
    /// Bytes.
    pub proxy_max_body_bytes: Option<u64>,
    /// Seconds.
    pub proxy_read_timeout_secs: Option<u64>,
    /// Seconds.
    pub http_header_timeout_secs: Option<u64>,
    /// Connections.
    pub http_max_connections: Option<usize>,
    /// Connections.
    pub grpc_max_connections: Option<usize>,
    /// Bool.
    pub console: Option<bool>,
    /// Seconds.
    pub console_session_idle_secs: Option<u64>,
    /// Seconds.
    pub console_session_max_secs: Option<u64>,
    /// Bool.
    pub adopt_unauthenticated_records: Option<bool>,
    /// Path.
    pub http_tls_cert_file: Option<PathBuf>,
    /// Path.
    pub http_tls_key_file: Option<PathBuf>,
    /// `[quota.<kind>]` and `[quota.systems.<id>]` tables.
    pub quota: Option<QuotaFile>,
    /// Bool.
    pub replica_snapshot: Option<bool>,
    /// Seconds.
    pub replica_snapshot_interval_secs: Option<u64>,
    /// MiB.
    pub store_cache_mib: Option<u64>,
    /// URL.
    pub egress_proxy_url: Option<String>,
    /// Path (`user:password`).
    pub egress_proxy_credentials_file: Option<PathBuf>,
    /// Host names, domains, IPs, CIDRs.
    pub egress_no_proxy: Option<Vec<String>>,
    /// System id → `direct` or `proxy`.
    pub egress_proxy_systems: Option<std::collections::HashMap<String, String>>,
}

/// Values from flags or the environment (highest precedence).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "CREDBROKER_LISTEN")]
    pub listen: Option<String>,
    /// Data directory (store, generated master key, admin token) [default: ./data].
    #[arg(long, env = "CREDBROKER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Master key file (32 random bytes, base64) [default: <data-dir>/master.key, generated].
    #[arg(long, env = "CREDBROKER_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// PostgreSQL store for replicas (postgres://user:pass@host/db?sslmode=require); unset: the
    /// embedded sled store in the data directory.
    #[arg(long, env = "CREDBROKER_STORE_URL", hide_env_values = true, value_parser = secret_arg)]
    pub store_url: Option<crate::secret::SecretString>,
    /// CA certificate (PEM) verifying the PostgreSQL server [default: public web roots].
    #[arg(long, env = "CREDBROKER_STORE_CA_FILE")]
    pub store_ca_file: Option<PathBuf>,
    /// Serve the admin console under /console on the HTTP listener (1, the default, or 0).
    #[arg(long, env = "CREDBROKER_CONSOLE")]
    pub console: Option<String>,
    /// Console sessions end after this many seconds unused [default: 1800].
    #[arg(long, env = "CREDBROKER_CONSOLE_SESSION_IDLE_SECS")]
    pub console_session_idle_secs: Option<u64>,
    /// Console sessions end this many seconds after sign-in [default: 43200].
    #[arg(long, env = "CREDBROKER_CONSOLE_SESSION_MAX_SECS")]
    pub console_session_max_secs: Option<u64>,
    /// Replicas: start from the sealed snapshot while PostgreSQL is away (1, the default), or
    /// stay not-ready until it answers (0).
    #[arg(long, env = "CREDBROKER_REPLICA_SNAPSHOT")]
    pub replica_snapshot: Option<String>,
    /// Replicas: how often a changed mirror is written to the snapshot, seconds [default: 30].
    #[arg(long, env = "CREDBROKER_REPLICA_SNAPSHOT_INTERVAL_SECS")]
    pub replica_snapshot_interval_secs: Option<u64>,
    /// The embedded sled store's page cache, MiB (4 to 1048576) [default: 32].
    #[arg(long, env = "CREDBROKER_STORE_CACHE_MIB")]
    pub store_cache_mib: Option<u64>,
    /// Log format: text or json.
    #[arg(long, env = "CREDBROKER_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Accept http:// base URLs (fakes on loopback, labs): 1 or 0.
    #[arg(long, env = "CREDBROKER_EGRESS_ALLOW_HTTP")]
    pub egress_allow_http: Option<String>,
    /// Private destinations the egress guard admits: comma-separated CIDRs and host names.
    #[arg(long, env = "CREDBROKER_EGRESS_ALLOW")]
    pub egress_allow: Option<String>,
    /// Corporate egress proxy for every upstream connection (http:// or https://, no
    /// credentials in the URL).
    #[arg(long, env = "CREDBROKER_EGRESS_PROXY")]
    pub egress_proxy: Option<String>,
    /// Hosts reached without the egress proxy: comma-separated names, .domains, IPs, CIDRs.
    #[arg(long, env = "CREDBROKER_EGRESS_NO_PROXY")]
    pub egress_no_proxy: Option<String>,
    /// File holding the egress proxy's `user:password`.
    #[arg(long, env = "CREDBROKER_EGRESS_PROXY_CREDENTIALS_FILE")]
    pub egress_proxy_credentials_file: Option<PathBuf>,
    /// HTTP listen address for the OAuth callback, or `off` [default: 127.0.0.1:8080].
    #[arg(long, env = "CREDBROKER_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// URL people and vendors reach the HTTP listener at [default: http://{http-listen}].
    #[arg(long, env = "CREDBROKER_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Atlassian authorization server [default: https://auth.atlassian.com].
    #[arg(long, env = "CREDBROKER_JIRA_AUTH_URL")]
    pub jira_auth_url: Option<String>,
    /// Atlassian API gateway [default: https://api.atlassian.com].
    #[arg(long, env = "CREDBROKER_JIRA_API_URL")]
    pub jira_api_url: Option<String>,
    /// The only directory Entra federated token files are read from
    /// [default: /var/run/secrets/azure/tokens].
    #[arg(long, env = "CREDBROKER_ENTRA_FEDERATED_TOKEN_DIR")]
    pub entra_federated_token_dir: Option<PathBuf>,
    /// One webhook endpoint for every system event (more, with filters: `[[webhooks]]`).
    #[arg(long, env = "CREDBROKER_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// The file holding that endpoint's signing secret.
    #[arg(long, env = "CREDBROKER_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Audit file (JSON lines, rotated by size), or `off` [default: <data-dir>/audit.log].
    #[arg(long, env = "CREDBROKER_AUDIT_FILE")]
    pub audit_file: Option<String>,
    /// Also write audit events to stdout: 1 or 0.
    #[arg(long, env = "CREDBROKER_AUDIT_STDOUT")]
    pub audit_stdout: Option<String>,
    /// Refuse secret-returning RPCs while the audit sink fails: 1 (default) or 0.
    #[arg(long, env = "CREDBROKER_AUDIT_FAIL_CLOSED")]
    pub audit_fail_closed: Option<String>,
    /// Server certificate (PEM) for TLS on the gRPC listener.
    #[arg(
        long = "tls-cert",
        value_name = "TLS_CERT",
        env = "CREDBROKER_TLS_CERT"
    )]
    pub tls_cert_file: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long = "tls-key", value_name = "TLS_KEY", env = "CREDBROKER_TLS_KEY")]
    pub tls_key_file: Option<PathBuf>,
    /// CA for client certificates (PEM): mTLS; a certificate's SAN DNS name is the caller name.
    #[arg(
        long = "tls-client-ca",
        value_name = "TLS_CLIENT_CA",
        env = "CREDBROKER_TLS_CLIENT_CA"
    )]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Accept bearer caller tokens: 1 (default) or 0 (client certificates only).
    #[arg(long, env = "CREDBROKER_BEARER_TOKENS")]
    pub bearer_tokens: Option<String>,
    /// Delivery of static-secret systems registered without one: proxy (default) or header.
    #[arg(long, env = "CREDBROKER_DEFAULT_STATIC_DELIVERY")]
    pub default_static_delivery: Option<String>,
    /// Once, when upgrading a store written before record authentication: tag its untagged
    /// records (1/0). Off by default: a forged row would be adopted too.
    #[arg(long, env = "CREDBROKER_ADOPT_UNAUTHENTICATED_RECORDS")]
    pub adopt_unauthenticated_records: Option<String>,
    /// Certificate (PEM) for the HTTP listener: with --http-tls-key it serves HTTPS (reloaded
    /// when the files change and on SIGHUP).
    #[arg(
        long = "http-tls-cert",
        value_name = "HTTP_TLS_CERT",
        env = "CREDBROKER_HTTP_TLS_CERT"
    )]
    pub http_tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) for the HTTP listener.
    #[arg(
        long = "http-tls-key",
        value_name = "HTTP_TLS_KEY",
        env = "CREDBROKER_HTTP_TLS_KEY"
    )]
    pub http_tls_key_file: Option<PathBuf>,
}

/// A secret flag or environment value, held redacted from the moment it is parsed.
fn secret_arg(s: &str) -> Result<crate::secret::SecretString, std::convert::Infallible> {
    Ok(crate::secret::SecretString::from(s))
}

impl Config {
    /// Builds the config from an optional TOML text and overrides, reporting every problem.
    pub fn build(file: Option<&str>, o: &Overrides) -> Result<Self, Vec<String>> {
        let mut o = o.clone();
        let mut errors: Vec<String> = o
            .take_empty()
            .into_iter()
            .map(|name| {
                let env = format!("CREDBROKER_{}", name.to_ascii_uppercase());
                format!("{name}: set but empty ({env} or its flag); unset it or give a value")
            })
            .collect();
        let o = &o;
        let mut f: FileConfig = match file {
            Some(text) => toml::from_str(text).unwrap_or_else(|e| {
                errors.push(format!("config file: {}", e.message()));
                FileConfig::default()
            }),
            None => FileConfig::default(),
        };
        let mut c = Config::default();
        c.server.apply(&mut f, o, &mut errors);
        c.store.apply(&mut f, o, &mut errors);
        c.tls.apply(&mut f, o, &mut errors);
        c.audit.apply(&mut f, o, &mut errors);
        c.egress.apply(&mut f, o, &mut errors);
        c.refresh.apply(&mut f, o, &mut errors);
        c.proxy.apply(&mut f, o, &mut errors);
        apply_vendors(&mut c.vendors, &mut f, o, &mut errors);
        c.webhooks = webhooks(&mut f, o, &mut errors);
        c.quota = quota_settings(&mut f, &mut errors);
        if errors.is_empty() {
            Ok(c)
        } else {
            Err(errors)
        }
    }

    /// Reads the TOML file at `path`, if any, and builds the config.
    pub fn load(path: Option<&Path>, o: &Overrides) -> Result<Self, Vec<String>> {
        let text = match path {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| vec![format!("config file {}: {e}", p.display())])?,
            ),
            None => None,
        };
        Self::build(text.as_deref(), o)
    }
}

impl Overrides {
    /// The settings given an empty value (a flag, or a `CREDBROKER_*` variable a deployment
    /// template left empty): refused, each named, rather than read as "off" or as unset, which
    /// would each switch something silently (fail-closed auditing, a listener, the console).
    /// They are cleared, so that nothing else reports them again.
    fn take_empty(&mut self) -> Vec<&'static str> {
        let text = [
            ("listen", &mut self.listen),
            ("console", &mut self.console),
            ("replica_snapshot", &mut self.replica_snapshot),
            ("log_format", &mut self.log_format),
            ("egress_allow_http", &mut self.egress_allow_http),
            ("egress_allow", &mut self.egress_allow),
            ("egress_proxy", &mut self.egress_proxy),
            ("egress_no_proxy", &mut self.egress_no_proxy),
            ("http_listen", &mut self.http_listen),
            ("public_url", &mut self.public_url),
            ("jira_auth_url", &mut self.jira_auth_url),
            ("jira_api_url", &mut self.jira_api_url),
            ("webhook_url", &mut self.webhook_url),
            ("audit_file", &mut self.audit_file),
            ("audit_stdout", &mut self.audit_stdout),
            ("audit_fail_closed", &mut self.audit_fail_closed),
            ("bearer_tokens", &mut self.bearer_tokens),
            ("default_static_delivery", &mut self.default_static_delivery),
            (
                "adopt_unauthenticated_records",
                &mut self.adopt_unauthenticated_records,
            ),
        ];
        let mut empty = Vec::new();
        for (name, v) in text {
            if v.as_deref().is_some_and(|t| t.trim().is_empty()) {
                *v = None;
                empty.push(name);
            }
        }
        if self.store_url.as_ref().is_some_and(|u| u.is_empty()) {
            self.store_url = None;
            empty.push("store_url");
        }
        empty
    }
}

impl ServerConfig {
    /// The console's switch and session lifetimes.
    fn apply_console(&mut self, f: &mut FileConfig, o: &Overrides, errors: &mut Vec<String>) {
        if let Some(v) = flag("CREDBROKER_CONSOLE", o.console.clone(), f.console, errors) {
            self.console = v;
        }
        secs(
            o.console_session_idle_secs.or(f.console_session_idle_secs),
            "console_session_idle_secs",
            errors,
            &mut self.console_session_idle,
        );
        secs(
            o.console_session_max_secs.or(f.console_session_max_secs),
            "console_session_max_secs",
            errors,
            &mut self.console_session_max,
        );
    }

    /// The listeners, request limits, shutdown and log format.
    fn apply(&mut self, f: &mut FileConfig, o: &Overrides, errors: &mut Vec<String>) {
        if let Some(listen) = o.listen.clone().or(f.listen.take()) {
            match listen.parse() {
                Ok(a) => self.listen = a,
                Err(_) => errors.push(format!(
                    "listen: '{listen}' is not an address like 127.0.0.1:50051"
                )),
            }
        }
        match o.log_format.clone().or(f.log_format.take()).as_deref() {
            None | Some("text") | Some("") => {}
            Some("json") => self.log_json = true,
            Some(other) => errors.push(format!("log format: '{other}' must be 'text' or 'json'")),
        }
        secs(
            f.request_timeout_secs,
            "request_timeout_secs",
            errors,
            &mut self.request_timeout,
        );
        secs(
            f.shutdown_grace_secs,
            "shutdown_grace_secs",
            errors,
            &mut self.shutdown_grace,
        );
        match o.http_listen.clone().or(f.http_listen.take()).as_deref() {
            None => {}
            Some("off") | Some("") => self.http_listen = None,
            Some(a) => match a.parse() {
                Ok(addr) => self.http_listen = Some(addr),
                Err(_) => errors.push(format!(
                    "http listen: '{a}' is not an address like 127.0.0.1:8080 (or 'off')"
                )),
            },
        }
        self.public_url = url_setting(
            "public url",
            o.public_url.clone().or(f.public_url.take()),
            errors,
        );
        secs(
            f.http_header_timeout_secs,
            "http_header_timeout_secs",
            errors,
            &mut self.http_header_timeout,
        );
        for (value, name, field) in [
            (
                f.http_max_connections,
                "http_max_connections",
                &mut self.http_max_connections,
            ),
            (
                f.grpc_max_connections,
                "grpc_max_connections",
                &mut self.grpc_max_connections,
            ),
        ] {
            match value {
                Some(0) => errors.push(format!("{name} must be greater than 0")),
                Some(v) if v > MAX_CONNECTIONS => {
                    errors.push(format!("{name} must be at most {MAX_CONNECTIONS}"))
                }
                Some(v) => *field = v,
                None => {}
            }
        }
        self.apply_console(f, o, errors);
        bounded(
            f.max_request_bytes,
            "max_request_bytes",
            (1, 64 << 20),
            errors,
            &mut self.max_request_bytes,
        );
        bounded(
            f.concurrency_limit_per_connection,
            "concurrency_limit_per_connection",
            (1, 65_536),
            errors,
            &mut self.concurrency_limit_per_connection,
        );
        bounded(
            f.max_concurrent_streams,
            "max_concurrent_streams",
            (1, 65_536),
            errors,
            &mut self.max_concurrent_streams,
        );
    }
}

impl StoreConfig {
    /// The data directory, the master key, the store and record adoption.
    fn apply(&mut self, f: &mut FileConfig, o: &Overrides, errors: &mut Vec<String>) {
        if let Some(d) = o.data_dir.clone().or(f.data_dir.take()) {
            self.data_dir = d;
        }
        self.master_key_file = o.master_key_file.clone().or(f.master_key_file.take());
        self.url = o
            .store_url
            .clone()
            .or(f.store_url.take())
            .filter(|u| !u.expose_secret().trim().is_empty());
        if let Some(u) = &self.url {
            if !crate::store::postgres::is_postgres_url(u.expose_secret()) {
                errors.push(
                    "store url: must start with postgres:// (leave it unset for the embedded sled store)"
                        .to_owned(),
                );
            }
        }
        self.ca_file = o.store_ca_file.clone().or(f.store_ca_file.take());
        if let Some(v) = flag(
            "CREDBROKER_ADOPT_UNAUTHENTICATED_RECORDS",
            o.adopt_unauthenticated_records.clone(),
            f.adopt_unauthenticated_records,
            errors,
        ) {
            self.adopt_unauthenticated_records = v;
        }
        if let Some(v) = flag(
            "CREDBROKER_REPLICA_SNAPSHOT",
            o.replica_snapshot.clone(),
            f.replica_snapshot,
            errors,
        ) {
            self.replica_snapshot = v;
        }
        secs(
            o.replica_snapshot_interval_secs
                .or(f.replica_snapshot_interval_secs),
            "replica_snapshot_interval_secs",
            errors,
            &mut self.replica_snapshot_interval,
        );
        if let Some(m) = o.store_cache_mib.or(f.store_cache_mib) {
            // Ignored by a PostgreSQL store, as the replica settings are by sled: one
            // environment can serve both kinds of instance.
            match crate::store::sled::check_cache_mib(m) {
                Ok(m) => self.cache_mib = m,
                Err(e) => errors.push(format!("store_cache_mib (CREDBROKER_STORE_CACHE_MIB): {e}")),
            }
        }
    }
}

impl TlsConfig {
    /// TLS of both listeners and bearer tokens, with their consistency rules.
    fn apply(&mut self, f: &mut FileConfig, o: &Overrides, errors: &mut Vec<String>) {
        self.cert_file = o.tls_cert_file.clone().or(f.tls_cert_file.take());
        self.key_file = o.tls_key_file.clone().or(f.tls_key_file.take());
        self.client_ca_file = o.tls_client_ca_file.clone().or(f.tls_client_ca_file.take());
        if let Some(v) = flag(
            "CREDBROKER_BEARER_TOKENS",
            o.bearer_tokens.clone(),
            f.bearer_tokens,
            errors,
        ) {
            self.bearer_tokens = v;
        }
        self.http_cert_file = o.http_tls_cert_file.clone().or(f.http_tls_cert_file.take());
        self.http_key_file = o.http_tls_key_file.clone().or(f.http_tls_key_file.take());
        if self.http_cert_file.is_some() != self.http_key_file.is_some() {
            errors.push("HTTP TLS needs both a certificate and a key (CREDBROKER_HTTP_TLS_CERT and CREDBROKER_HTTP_TLS_KEY)".to_owned());
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            errors.push("TLS needs both a certificate and a key (CREDBROKER_TLS_CERT and CREDBROKER_TLS_KEY)".to_owned());
        }
        if self.client_ca_file.is_some() && self.cert_file.is_none() {
            errors.push("a client CA (mTLS) needs a server certificate and key".to_owned());
        }
        if !self.bearer_tokens && self.client_ca_file.is_none() {
            errors.push("bearer tokens can be switched off only with client certificates (CREDBROKER_TLS_CLIENT_CA)".to_owned());
        }
        secs(
            f.tls_handshake_timeout_secs,
            "tls_handshake_timeout_secs",
            errors,
            &mut self.handshake_timeout,
        );
        secs(
            f.tls_reload_interval_secs,
            "tls_reload_interval_secs",
            errors,
            &mut self.reload_interval,
        );
    }
}

impl AuditTrailConfig {
    /// The audit trail.
    fn apply(&mut self, f: &mut FileConfig, o: &Overrides, errors: &mut Vec<String>) {
        match o.audit_file.clone().or(f.audit_file.take()).as_deref() {
            None => {}
            Some("off") => self.file_off = true,
            Some(p) => self.file = Some(PathBuf::from(p)),
        }
        if let Some(v) = flag(
            "CREDBROKER_AUDIT_STDOUT",
            o.audit_stdout.clone(),
            f.audit_stdout,
            errors,
        ) {
            self.stdout = v;
        }
        if let Some(v) = flag(
            "CREDBROKER_AUDIT_FAIL_CLOSED",
            o.audit_fail_closed.clone(),
            f.audit_fail_closed,
            errors,
        ) {
            self.fail_closed = v;
        }
        if let Some(v) = f.audit_max_bytes {
            self.max_bytes = v.max(4096);
        }
        if let Some(v) = f.audit_keep {
            self.keep = v;
        }
    }
}

impl EgressConfig {
    /// The egress guard and upstream limits.
    fn apply(&mut self, f: &mut FileConfig, o: &Overrides, errors: &mut Vec<String>) {
        match o.egress_allow_http.as_deref() {
            None => self.allow_http = f.egress_allow_http.unwrap_or(false),
            Some(v) => match parse_bool(v) {
                Some(b) => self.allow_http = b,
                None => errors.push(format!(
                    "CREDBROKER_EGRESS_ALLOW_HTTP: '{v}' must be 1/0/true/false"
                )),
            },
        }
        secs(
            f.upstream_timeout_secs,
            "upstream_timeout_secs",
            errors,
            &mut self.upstream_timeout,
        );
        let allow = o
            .egress_allow
            .clone()
            .or(f.egress_allow.take().map(|v| v.join(",")));
        if let Some(a) = allow {
            match crate::backends::egress::AllowList::parse(&a) {
                Ok(list) => self.allow = list,
                Err(e) => errors.push(format!("egress allow-list: {e}")),
            }
        }
        if let Some(v) = f.max_upstream_body_bytes {
            self.max_upstream_body_bytes = v;
        }
        self.apply_proxy(f, o, errors);
    }
}

impl RefreshConfig {
    /// Token lifetimes, the refresh schedule, authorizations and keep-alive.
    fn apply(&mut self, f: &mut FileConfig, _: &Overrides, errors: &mut Vec<String>) {
        secs(
            f.static_header_ttl_secs,
            "static_header_ttl_secs",
            errors,
            &mut self.static_header_ttl,
        );
        secs(
            f.refresh_retry_max_secs,
            "refresh_retry_max_secs",
            errors,
            &mut self.retry_max,
        );
        secs_or_zero(
            f.refresh_ahead_min_secs,
            "refresh_ahead_min_secs",
            errors,
            &mut self.ahead_min,
        );
        match f.refresh_ahead_fraction {
            Some(v) if v > 0.0 && v <= 0.9 => self.ahead_fraction = v,
            Some(v) => errors.push(format!("refresh_ahead_fraction: {v} must be in (0, 0.9]")),
            None => {}
        }
        bounded(
            f.max_concurrent_refreshes,
            "max_concurrent_refreshes",
            (1, 65_536),
            errors,
            &mut self.max_concurrent,
        );
        secs(
            f.keepalive_interval_secs,
            "keepalive_interval_secs",
            errors,
            &mut self.keepalive_interval,
        );
        secs(
            f.keepalive_margin_secs,
            "keepalive_margin_secs",
            errors,
            &mut self.keepalive_margin,
        );
        secs_or_zero(
            f.check_interval_secs,
            "check_interval_secs",
            errors,
            &mut self.check_interval,
        );
        match f.checks_per_vendor {
            Some(0) => errors.push("checks_per_vendor must be greater than 0".to_owned()),
            Some(v) => self.checks_per_vendor = v,
            None => {}
        }
    }
}

impl ProxyConfig {
    /// Proxy delivery.
    fn apply(&mut self, f: &mut FileConfig, o: &Overrides, errors: &mut Vec<String>) {
        match o
            .default_static_delivery
            .clone()
            .or(f.default_static_delivery.take())
            .as_deref()
        {
            None => {}
            Some("proxy") => self.default_static_delivery = crate::model::Delivery::Proxy,
            Some("header") => self.default_static_delivery = crate::model::Delivery::Header,
            Some(v) => errors.push(format!(
                "default static delivery: '{v}' must be 'proxy' or 'header'"
            )),
        }
        secs(
            f.lease_ttl_secs,
            "lease_ttl_secs",
            errors,
            &mut self.lease_ttl,
        );
        secs(
            f.proxy_read_timeout_secs,
            "proxy_read_timeout_secs",
            errors,
            &mut self.read_timeout,
        );
        if let Some(v) = f.proxy_max_body_bytes {
            self.max_body_bytes = v;
        }
    }
}

/// The webhook endpoints: `[[webhooks]]`, plus the one the environment names.
fn webhooks(f: &mut FileConfig, o: &Overrides, errors: &mut Vec<String>) -> Vec<WebhookConfig> {
    let mut listed = f.webhooks.take().unwrap_or_default();
    match (&o.webhook_url, &o.webhook_secret_file) {
        (Some(url), Some(secret_file)) => listed.push(FileWebhook {
            url: url.clone(),
            secret_file: secret_file.clone(),
            events: Vec::new(),
        }),
        (None, None) => {}
        _ => errors.push(
            "CREDBROKER_WEBHOOK_URL and CREDBROKER_WEBHOOK_SECRET_FILE go together".to_owned(),
        ),
    }
    let mut out = Vec::new();
    for mut w in listed {
        // One filter, however it is written: the order and repeats of `events` change nothing
        // (two entries differing only there would share one delivery cursor).
        w.events.sort();
        w.events.dedup();
        let url_ok = url::Url::parse(&w.url)
            .is_ok_and(|u| matches!(u.scheme(), "https" | "http") && u.host_str().is_some());
        if !url_ok {
            // Not echoed: a URL may carry a token.
            errors.push("webhooks: a url is not an http(s) URL".to_owned());
            continue;
        }
        if out
            .iter()
            .any(|o: &WebhookConfig| o.url == w.url && o.events == w.events)
        {
            // Not echoed either. Two such endpoints would share one delivery cursor.
            errors.push("webhooks: the same url and events are listed twice".to_owned());
            continue;
        }
        if let Some(bad) = w
            .events
            .iter()
            .find(|e| !crate::broker::events::EventType::NAMES.contains(&e.as_str()))
        {
            errors.push(format!(
                "webhooks: unknown event type {bad} (known: {})",
                crate::broker::events::EventType::NAMES.join(", ")
            ));
            continue;
        }
        // A byte-order mark (a file saved by Notepad) is no part of the secret.
        let read = std::fs::read_to_string(&w.secret_file)
            .map(|s| s.trim_start_matches('\u{feff}').trim().to_owned());
        match read {
            // One `whsec_` secret, or several separated by white space (a rotation); each
            // a non-empty key in base64.
            Ok(s)
                if s.starts_with("whsec_")
                    && s.split_whitespace().any(|w| {
                        w.strip_prefix("whsec_").is_none_or(|b| {
                            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b)
                                .map_or(true, |k| k.is_empty())
                        })
                    }) =>
            {
                errors.push(format!(
                    "webhooks: {} starts with whsec_ but a key in it is empty or not base64",
                    w.secret_file.display()
                ))
            }
            Ok(s) if !s.trim().is_empty() => out.push(WebhookConfig {
                url: w.url,
                secret: crate::secret::SecretString::from(s.trim()),
                events: w.events,
            }),
            Ok(_) => errors.push(format!("webhooks: {} is empty", w.secret_file.display())),
            Err(e) => errors.push(format!(
                "webhooks: cannot read {} ({})",
                w.secret_file.display(),
                e.kind()
            )),
        }
    }
    out
}

/// Per-vendor OAuth settings.
fn apply_vendors(
    vendors: &mut crate::backends::oauth::OAuthSettings,
    f: &mut FileConfig,
    o: &Overrides,
    errors: &mut Vec<String>,
) {
    secs(
        f.salesforce_token_lifetime_secs,
        "salesforce_token_lifetime_secs",
        errors,
        &mut vendors.salesforce_token_lifetime,
    );
    secs(
        f.salesforce_refresh_idle_secs,
        "salesforce_refresh_idle_secs",
        errors,
        &mut vendors.salesforce_refresh_idle_limit,
    );
    secs(
        f.jira_refresh_idle_secs,
        "jira_refresh_idle_secs",
        errors,
        &mut vendors.jira_refresh_idle_limit,
    );
    secs(
        f.servicenow_refresh_token_lifespan_secs,
        "servicenow_refresh_token_lifespan_secs",
        errors,
        &mut vendors.servicenow_refresh_token_lifespan,
    );
    if let Some(u) = url_setting(
        "jira auth url",
        o.jira_auth_url.clone().or(f.jira_auth_url.take()),
        errors,
    ) {
        vendors.jira_auth_url = u;
    }
    if let Some(u) = url_setting(
        "jira api url",
        o.jira_api_url.clone().or(f.jira_api_url.take()),
        errors,
    ) {
        vendors.jira_api_url = u;
    }
    if let Some(d) = o
        .entra_federated_token_dir
        .clone()
        .or(f.entra_federated_token_dir.take())
    {
        if d.is_absolute() {
            vendors.entra_federated_token_dir = d;
        } else {
            errors.push(format!(
                "entra_federated_token_dir: {} must be an absolute path",
                d.display()
            ));
        }
    }
    match f.zendesk_access_token_ttl_secs {
        // Zendesk takes more than 300 and less than 172800 seconds.
        Some(v) if (301..172_800).contains(&v) => {
            vendors.zendesk_access_token_ttl = Duration::from_secs(v)
        }
        Some(v) => errors.push(format!(
            "zendesk_access_token_ttl_secs: {v} must be 301 – 172799 (Zendesk's limits)"
        )),
        None => {}
    }
    match f.zendesk_refresh_token_ttl_secs {
        Some(v) if (604_800..=7_776_000).contains(&v) => {
            vendors.zendesk_refresh_token_ttl = Duration::from_secs(v)
        }
        Some(v) => errors.push(format!(
            "zendesk_refresh_token_ttl_secs: {v} must be 604800 – 7776000 (Zendesk's limits)"
        )),
        None => {}
    }
}

/// The longest duration any setting takes, in seconds (ten years): a longer one would overflow
/// the clock arithmetic it meets (a deadline, an expiry) and stop the broker.
const MAX_SECS: u64 = 10 * 365 * 86_400;

/// Sets `target` from whole seconds `v` (refusing 0 and more than [`MAX_SECS`]).
fn secs(v: Option<u64>, name: &str, errors: &mut Vec<String>, target: &mut Duration) {
    if v == Some(0) {
        errors.push(format!("{name} must be greater than 0"));
    } else {
        secs_or_zero(v, name, errors, target);
    }
}

/// Sets `target` from whole seconds `v`, 0 included (refusing more than [`MAX_SECS`]).
fn secs_or_zero(v: Option<u64>, name: &str, errors: &mut Vec<String>, target: &mut Duration) {
    match v {
        Some(s) if s > MAX_SECS => {
            errors.push(format!("{name} must be at most {MAX_SECS} (ten years)"))
        }
        Some(s) => *target = Duration::from_secs(s),
        None => {}
    }
}

/// Sets `target` from `v` when it is within `lo..=hi`, else reports it.
fn bounded<T: PartialOrd + std::fmt::Display + Copy>(
    v: Option<T>,
    name: &str,
    (lo, hi): (T, T),
    errors: &mut Vec<String>,
    target: &mut T,
) {
    match v {
        Some(v) if v < lo || v > hi => errors.push(format!("{name} must be {lo} – {hi}")),
        Some(v) => *target = v,
        None => {}
    }
}

/// An http(s) URL setting without its trailing slash.
fn url_setting(name: &str, v: Option<String>, errors: &mut Vec<String>) -> Option<String> {
    let v = v?;
    match url::Url::parse(&v) {
        Ok(u) if matches!(u.scheme(), "https" | "http") && u.host_str().is_some() => {
            Some(v.trim_end_matches('/').to_owned())
        }
        _ => {
            errors.push(format!("{name}: '{v}' is not an http(s) URL"));
            None
        }
    }
}

/// A switch: the environment's value (which must parse) wins over the file's.
fn flag(
    name: &str,
    env: Option<String>,
    file: Option<bool>,
    errors: &mut Vec<String>,
) -> Option<bool> {
    match env {
        Some(v) => parse_bool(&v).or_else(|| {
            errors.push(format!("{name}: '{v}' must be 1/0/true/false"));
            None
        }),
        None => file,
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_and_all_errors_reported() {
        let o = Overrides {
            listen: Some("127.0.0.1:7000".into()),
            ..Default::default()
        };
        let c = Config::build(
            Some("listen = \"127.0.0.1:6000\"\nupstream_timeout_secs = 3\n"),
            &o,
        )
        .unwrap();
        assert_eq!(c.server.listen.port(), 7000);
        assert_eq!(c.egress.upstream_timeout, Duration::from_secs(3));

        let bad = Overrides {
            listen: Some("nope".into()),
            log_format: Some("xml".into()),
            ..Default::default()
        };
        let errs = Config::build(Some("request_timeout_secs = 0"), &bad).unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
    }

    /// Values that would stop or freeze the broker are refused at start, each named: zero or
    /// absurd limits (a connection's RPCs, streams, request size, concurrent refreshes),
    /// durations past ten years, a quota kind spelt twice.
    #[test]
    fn limits_that_would_stop_the_broker_are_refused() {
        let o = Overrides::default();
        let refused = |file: &str, name: &str| {
            let errs = Config::build(Some(file), &o).unwrap_err();
            assert!(errs.iter().any(|e| e.contains(name)), "{file}: {errs:?}");
        };
        refused(
            "concurrency_limit_per_connection = 0",
            "concurrency_limit_per_connection",
        );
        refused(
            "concurrency_limit_per_connection = 9223372036854775807",
            "concurrency_limit_per_connection",
        );
        refused("max_concurrent_streams = 0", "max_concurrent_streams");
        refused("max_request_bytes = 0", "max_request_bytes");
        refused(
            "max_request_bytes = 9223372036854775807",
            "max_request_bytes",
        );
        refused(
            "max_concurrent_refreshes = 9223372036854775807",
            "max_concurrent_refreshes",
        );
        for name in [
            "static_header_ttl_secs",
            "shutdown_grace_secs",
            "lease_ttl_secs",
            "check_interval_secs",
            "refresh_ahead_min_secs",
        ] {
            refused(&format!("{name} = 9223372036854775807"), name);
        }
        refused(
            "[quota.jira-cloud]\nmax_concurrent = 2\n[quota.jira_cloud]\nmax_concurrent = 3\n",
            "configured twice",
        );
        let c = Config::build(
            Some("check_interval_secs = 0\nshutdown_grace_secs = 315360000"),
            &o,
        );
        assert!(c.is_ok(), "{:?}", c.err());
    }

    /// An empty value (a template's `${VAR}` left empty) is refused, named: read as "off" or
    /// as unset it would switch something silently.
    #[test]
    fn empty_overrides_are_refused_by_name() {
        let o = Overrides {
            audit_fail_closed: Some(String::new()),
            http_listen: Some(" ".into()),
            ..Default::default()
        };
        let errs = Config::build(Some("audit_fail_closed = true"), &o).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].contains("CREDBROKER_HTTP_LISTEN")
                || errs[1].contains("CREDBROKER_HTTP_LISTEN")
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("CREDBROKER_AUDIT_FAIL_CLOSED")),
            "{errs:?}"
        );
    }

    /// A secret file may hold one secret, or several `whsec_` ones (a rotation); a `whsec_`
    /// file with anything else in it is refused, naming the file, never its content.
    #[test]
    fn webhook_secret_files_hold_one_secret_or_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let with = |content: &str| {
            let file = dir.path().join("secret");
            std::fs::write(&file, content).unwrap();
            let o = Overrides {
                webhook_url: Some("https://hooks.example.com/x".into()),
                webhook_secret_file: Some(file),
                ..Default::default()
            };
            Config::build(None, &o)
        };
        let rotation = "whsec_bmV3LXNlY3JldA==\nwhsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n";
        for ok in [
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            rotation,
            "any raw text",
        ] {
            assert!(with(ok).is_ok(), "{ok}");
        }
        assert!(with("\u{feff}whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\r\n").is_ok());
        for bad in [
            "whsec_!!!",
            "whsec_bmV3LXNlY3JldA== plain-canary",
            "whsec_AA== whsec_%%",
            "whsec_",
            "whsec_bmV3LXNlY3JldA== whsec_",
        ] {
            let errs = with(bad).unwrap_err();
            assert!(
                errs.iter().any(|e| e.contains("not base64"))
                    && !errs.iter().any(|e| e.contains("canary")),
                "{bad}: {errs:?}"
            );
        }
    }

    /// One URL with one filter written in two orders (or with a repeat) is listed twice: the
    /// two would share one delivery cursor.
    #[test]
    fn a_webhook_filter_written_twice_in_another_order_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let entry = |events: &str| {
            format!(
                "[[webhooks]]\nurl = \"https://hooks.example.com/x\"\nsecret_file = {:?}\nevents = [{events}]\n",
                secret.display().to_string()
            )
        };
        let a = "\"system.deleted\", \"credential.expiring\"";
        let b = "\"credential.expiring\", \"system.deleted\", \"system.deleted\"";
        let errs = Config::build(Some(&(entry(a) + &entry(b))), &Overrides::default()).unwrap_err();
        assert!(errs.iter().any(|e| e.contains("listed twice")), "{errs:?}");
        let one = Config::build(Some(&entry(b)), &Overrides::default()).unwrap();
        assert_eq!(
            one.webhooks[0].events,
            vec![
                "credential.expiring".to_owned(),
                "system.deleted".to_owned()
            ]
        );
    }

    #[test]
    fn connection_caps_are_read_and_bounded() {
        let c = Config::build(
            Some("grpc_max_connections = 10\nhttp_max_connections = 20\n"),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            (c.server.grpc_max_connections, c.server.http_max_connections),
            (10, 20)
        );
        for bad in ["0", "1000001", "9223372036854775807"] {
            for name in ["grpc_max_connections", "http_max_connections"] {
                let errs = Config::build(Some(&format!("{name} = {bad}\n")), &Overrides::default())
                    .unwrap_err();
                assert!(
                    errs.iter().any(|e| e.contains(name)),
                    "{name} = {bad}: {errs:?}"
                );
            }
        }
    }

    #[test]
    fn store_cache_size_from_toml_or_env_is_bounded() {
        let c = Config::build(None, &Overrides::default()).unwrap();
        assert_eq!(c.store.cache_mib, 32);
        let c = Config::build(Some("store_cache_mib = 256\n"), &Overrides::default()).unwrap();
        assert_eq!(c.store.cache_mib, 256);
        let env = |m| Overrides {
            store_cache_mib: Some(m),
            ..Default::default()
        };
        let c = Config::build(Some("store_cache_mib = 256\n"), &env(8)).unwrap();
        assert_eq!(c.store.cache_mib, 8);
        for edge in [4, 1 << 20] {
            assert_eq!(
                Config::build(None, &env(edge)).unwrap().store.cache_mib,
                edge
            );
        }
        // Accepted (and unused) beside a PostgreSQL store: one environment for every instance.
        let pg = "store_url = \"postgres://x@y/z\"\n";
        assert_eq!(
            Config::build(Some(pg), &env(64)).unwrap().store.cache_mib,
            64
        );
        for bad in [0, 3, (1 << 20) + 1, u64::MAX] {
            let o = Overrides {
                store_cache_mib: Some(bad),
                ..Default::default()
            };
            let errs = Config::build(None, &o).unwrap_err();
            assert!(
                errs.iter().any(|e| e.contains("store_cache_mib")),
                "{errs:?}"
            );
        }
    }

    #[test]
    fn store_url_from_toml_or_env_is_redacted_and_checked() {
        let c = Config::build(
            Some("store_url = \"postgres://cb:toml-pw-77@db:5432/cb?sslmode=require\"\n"),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            c.store.url.as_ref().map(|u| u.expose_secret()),
            Some("postgres://cb:toml-pw-77@db:5432/cb?sslmode=require")
        );
        assert!(!format!("{c:?}").contains("toml-pw-77"));
        let env = Overrides {
            store_url: Some("postgresql://cb:env-pw@db/cb".into()),
            ..Default::default()
        };
        let c = Config::build(Some("store_url = \"postgres://x@y/z\""), &env).unwrap();
        assert_eq!(
            c.store.url.as_ref().map(|u| u.expose_secret()),
            Some("postgresql://cb:env-pw@db/cb")
        );
        let bad = Overrides {
            store_url: Some("mysql://cb:pw@db/cb".into()),
            ..Default::default()
        };
        let errs = Config::build(None, &bad).unwrap_err();
        assert!(errs.iter().any(|e| e.contains("postgres://")), "{errs:?}");
        assert!(!errs.iter().any(|e| e.contains("pw@")), "{errs:?}");
    }

    #[test]
    fn quota_tables_and_the_egress_proxy_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("proxy");
        std::fs::write(&creds, "corp:egress-pw-canary-4\n").unwrap();
        let toml = format!(
            "egress_proxy_url = \"http://proxy.corp:3128\"\n\
             egress_proxy_credentials_file = \"{}\"\n\
             egress_no_proxy = [\"tfs.corp\"]\n\
             [egress_proxy_systems]\nsn-lab = \"direct\"\n\
             [quota.salesforce]\nmax_concurrent = 10\n\
             [quota.systems.sf-prod]\nreserve_percent = 20\n",
            creds.display()
        );
        let c = Config::build(Some(&toml), &Overrides::default()).unwrap();
        let sf = crate::model::SystemKind::Salesforce;
        assert_eq!(c.quota.limits(sf, "sf-other").max_concurrent, 10);
        assert_eq!(c.quota.limits(sf, "sf-prod").reserve_percent, 20);
        assert_eq!(c.quota.limits(sf, "sf-prod").max_concurrent, 10);
        let p = c.egress.proxy.as_ref().unwrap();
        assert!(p.bypasses("tfs.corp") && !p.bypasses("acme.my.salesforce.com"));
        assert!(p.authorization.is_some());
        assert!(!format!("{c:?}").contains("egress-pw-canary-4"));
        assert_eq!(
            c.egress.proxy_systems.get("sn-lab"),
            Some(&crate::backends::egress::ProxyRoute::Direct)
        );
        let bad = "egress_proxy_url = \"http://u:egress-pw-canary-4@proxy:3128\"\n\
                   [quota.salesfarce]\nmax_concurrent = 1\n\
                   [quota.zendesk]\nreserve_percent = 90\n\
                   [egress_proxy_systems]\nx = \"sideways\"\n";
        let errs = Config::build(Some(bad), &Overrides::default()).unwrap_err();
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(!errs.join("\n").contains("egress-pw-canary-4"), "{errs:?}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(Config::build(Some("lisen = \"x\""), &Overrides::default()).is_err());
    }
}
