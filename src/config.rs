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

/// The broker's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Data directory (store, generated master key, admin token).
    pub data_dir: PathBuf,
    /// Master key file; `None` means `<data_dir>/master.key`.
    pub master_key_file: Option<PathBuf>,
    /// `postgres://…` selects the PostgreSQL store (replicas); `None` means sled in the data
    /// directory. Holds a password: redacted in `Debug`.
    pub store_url: Option<crate::secret::SecretString>,
    /// CA certificate (PEM) that verifies the PostgreSQL server under `sslmode=require`.
    pub store_ca_file: Option<PathBuf>,
    /// Emit JSON logs.
    pub log_json: bool,
    /// Accept `http://` base URLs (fakes, labs).
    pub egress_allow_http: bool,
    /// Private destinations the egress guard admits (CIDRs and host names).
    pub egress_allow: crate::backends::egress::AllowList,
    /// Server-side cap on any RPC's duration.
    pub request_timeout: Duration,
    /// Cap on any outbound upstream call.
    pub upstream_timeout: Duration,
    /// How long in-flight RPCs may run after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Largest accepted request message.
    pub max_request_bytes: usize,
    /// Largest upstream response body read.
    pub max_upstream_body_bytes: usize,
    /// Concurrent RPCs per connection.
    pub concurrency_limit_per_connection: usize,
    /// HTTP/2 max concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// How long a static header handed to a worker is declared valid before it asks again.
    pub static_header_ttl: Duration,
    /// Refresh an OAuth token when this fraction of its lifetime remains.
    pub refresh_ahead_fraction: f64,
    /// …but at least this long before expiry (capped at half the lifetime).
    pub refresh_ahead_min: Duration,
    /// Upstream token calls in flight at once, across all systems.
    pub max_concurrent_refreshes: usize,
    /// Longest back-off between retries of a failing token endpoint.
    pub refresh_retry_max: Duration,
    /// Salesforce access-token lifetime when introspection is not allowed.
    pub salesforce_token_lifetime: Duration,
    /// ServiceNow refresh-token lifespan (as configured on the instance; default 100 days).
    pub servicenow_refresh_token_lifespan: Duration,
    /// HTTP listen address (`None`: no HTTP listener).
    pub http_listen: Option<SocketAddr>,
    /// The URL people and vendors reach the HTTP listener at (redirect URIs are built from it);
    /// `None` means `http://{http_listen}`.
    pub public_url: Option<String>,
    /// Atlassian's authorization server.
    pub jira_auth_url: String,
    /// Atlassian's API gateway.
    pub jira_api_url: String,
    /// Zendesk access-token lifetime asked for.
    pub zendesk_access_token_ttl: Duration,
    /// Zendesk refresh-token lifetime asked for.
    pub zendesk_refresh_token_ttl: Duration,
    /// How long a started authorization (its `state`) stays usable.
    pub authorization_ttl: Duration,
    /// How often idle authorization-code grants are checked for keep-alive.
    pub keepalive_interval: Duration,
    /// Refresh an idle grant when its refresh token would die within this long.
    pub keepalive_margin: Duration,
    /// Audit file; `None` means `<data-dir>/audit.log`.
    pub audit_file: Option<PathBuf>,
    /// No audit file at all (`CREDBROKER_AUDIT_FILE=off`).
    pub audit_file_off: bool,
    /// Also write audit events to stdout.
    pub audit_stdout: bool,
    /// Refuse secret-returning RPCs when the audit sink fails.
    pub audit_fail_closed: bool,
    /// Rotate the audit file at this size.
    pub audit_max_bytes: u64,
    /// Rotated audit files kept.
    pub audit_keep: usize,
    /// Server certificate (PEM); with `tls_key_file`, the gRPC listener speaks TLS.
    pub tls_cert_file: Option<PathBuf>,
    /// Server private key (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// CA for client certificates (PEM): mTLS; certificate names map to callers.
    pub tls_client_ca_file: Option<PathBuf>,
    /// Accept bearer caller tokens (switch off to require client certificates).
    pub bearer_tokens: bool,
    /// How long a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
    /// How often certificate files are checked for changes (SIGHUP reloads at once).
    pub tls_reload_interval: Duration,
    /// Delivery of static-secret systems registered without one.
    pub default_static_delivery: crate::model::Delivery,
    /// Lifetime of proxy leases.
    pub lease_ttl: Duration,
    /// Largest request or response body the proxy passes.
    pub proxy_max_body_bytes: u64,
    /// The proxy gives up when the upstream sends nothing for this long.
    pub proxy_read_timeout: Duration,
    /// The HTTP listener closes a connection whose next request head (the first, or the next on
    /// an idle keep-alive connection) does not arrive whole within this.
    pub http_header_timeout: Duration,
    /// Open HTTP connections at most; more are closed at once.
    pub http_max_connections: usize,
    /// Tag records written before record authentication (an upgrade step; off by default).
    pub adopt_unauthenticated_records: bool,
    /// Certificate (PEM) of the HTTP listener; with `http_tls_key_file`, it speaks HTTPS.
    pub http_tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of the HTTP listener.
    pub http_tls_key_file: Option<PathBuf>,
}

impl Default for Config {
    /// Each component's own defaults, plus the process's (listeners, data directory, limits).
    fn default() -> Self {
        let broker = crate::broker::BrokerSettings::default();
        let refresh = broker.refresh.clone();
        let oauth = crate::backends::oauth::OAuthSettings::default();
        let audit = crate::audit::AuditConfig::default();
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 50051))),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            master_key_file: None,
            store_url: None,
            store_ca_file: None,
            log_json: false,
            egress_allow_http: false,
            egress_allow: Default::default(),
            request_timeout: Duration::from_secs(30),
            upstream_timeout: broker.check_timeout,
            shutdown_grace: Duration::from_secs(10),
            max_request_bytes: 64 * 1024,
            max_upstream_body_bytes: 1024 * 1024,
            concurrency_limit_per_connection: 256,
            max_concurrent_streams: 256,
            static_header_ttl: broker.static_header_ttl,
            refresh_ahead_fraction: refresh.ahead_fraction,
            refresh_ahead_min: refresh.ahead_min,
            max_concurrent_refreshes: refresh.max_concurrent,
            refresh_retry_max: refresh.retry_max,
            salesforce_token_lifetime: oauth.salesforce_token_lifetime,
            servicenow_refresh_token_lifespan: oauth.servicenow_refresh_token_lifespan,
            http_listen: DEFAULT_HTTP_LISTEN.parse().ok(),
            public_url: None,
            jira_auth_url: oauth.jira_auth_url,
            jira_api_url: oauth.jira_api_url,
            zendesk_access_token_ttl: oauth.zendesk_access_token_ttl,
            zendesk_refresh_token_ttl: oauth.zendesk_refresh_token_ttl,
            authorization_ttl: broker.authorization_ttl,
            keepalive_interval: broker.keepalive_interval,
            keepalive_margin: broker.keepalive_margin,
            audit_file: None,
            audit_file_off: false,
            audit_stdout: audit.stdout,
            audit_fail_closed: audit.fail_closed,
            audit_max_bytes: audit.max_bytes,
            audit_keep: audit.keep,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            bearer_tokens: true,
            tls_handshake_timeout: Duration::from_secs(10),
            tls_reload_interval: Duration::from_secs(10),
            default_static_delivery: broker.default_static_delivery,
            lease_ttl: broker.lease_ttl,
            proxy_max_body_bytes: broker.proxy_max_body_bytes,
            proxy_read_timeout: Duration::from_secs(60),
            http_header_timeout: Duration::from_secs(10),
            http_max_connections: 1024,
            adopt_unauthenticated_records: broker.adopt_unauthenticated_records,
            http_tls_cert_file: None,
            http_tls_key_file: None,
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
    /// Address or `off`.
    pub http_listen: Option<String>,
    /// URL.
    pub public_url: Option<String>,
    /// URL.
    pub jira_auth_url: Option<String>,
    /// URL.
    pub jira_api_url: Option<String>,
    /// Seconds (300 – 172800).
    pub zendesk_access_token_ttl_secs: Option<u64>,
    /// Seconds (604800 – 7776000).
    pub zendesk_refresh_token_ttl_secs: Option<u64>,
    /// Seconds.
    pub keepalive_interval_secs: Option<u64>,
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
    /// Bool.
    pub adopt_unauthenticated_records: Option<bool>,
    /// Path.
    pub http_tls_cert_file: Option<PathBuf>,
    /// Path.
    pub http_tls_key_file: Option<PathBuf>,
}

/// Values from flags or the environment (highest precedence).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen` / `CREDBROKER_LISTEN`.
    pub listen: Option<String>,
    /// `--data-dir` / `CREDBROKER_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// `CREDBROKER_MASTER_KEY_FILE`.
    pub master_key_file: Option<PathBuf>,
    /// `--store-url` / `CREDBROKER_STORE_URL`.
    pub store_url: Option<crate::secret::SecretString>,
    /// `--store-ca-file` / `CREDBROKER_STORE_CA_FILE`.
    pub store_ca_file: Option<PathBuf>,
    /// `CREDBROKER_LOG_FORMAT`.
    pub log_format: Option<String>,
    /// `CREDBROKER_EGRESS_ALLOW_HTTP`.
    pub egress_allow_http: Option<String>,
    /// `CREDBROKER_EGRESS_ALLOW` (comma-separated).
    pub egress_allow: Option<String>,
    /// `--http-listen` / `CREDBROKER_HTTP_LISTEN`.
    pub http_listen: Option<String>,
    /// `--public-url` / `CREDBROKER_PUBLIC_URL`.
    pub public_url: Option<String>,
    /// `CREDBROKER_JIRA_AUTH_URL`.
    pub jira_auth_url: Option<String>,
    /// `CREDBROKER_JIRA_API_URL`.
    pub jira_api_url: Option<String>,
    /// `CREDBROKER_AUDIT_FILE` (path or `off`).
    pub audit_file: Option<String>,
    /// `CREDBROKER_AUDIT_STDOUT`.
    pub audit_stdout: Option<String>,
    /// `CREDBROKER_AUDIT_FAIL_CLOSED`.
    pub audit_fail_closed: Option<String>,
    /// `CREDBROKER_TLS_CERT`.
    pub tls_cert_file: Option<PathBuf>,
    /// `CREDBROKER_TLS_KEY`.
    pub tls_key_file: Option<PathBuf>,
    /// `CREDBROKER_TLS_CLIENT_CA`.
    pub tls_client_ca_file: Option<PathBuf>,
    /// `CREDBROKER_BEARER_TOKENS`.
    pub bearer_tokens: Option<String>,
    /// `CREDBROKER_DEFAULT_STATIC_DELIVERY`.
    pub default_static_delivery: Option<String>,
    /// `CREDBROKER_ADOPT_UNAUTHENTICATED_RECORDS`.
    pub adopt_unauthenticated_records: Option<String>,
    /// `CREDBROKER_HTTP_TLS_CERT`.
    pub http_tls_cert_file: Option<PathBuf>,
    /// `CREDBROKER_HTTP_TLS_KEY`.
    pub http_tls_key_file: Option<PathBuf>,
}

impl Config {
    /// Builds the config from an optional TOML text and overrides, reporting every problem.
    pub fn build(file: Option<&str>, o: &Overrides) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let mut f: FileConfig = match file {
            Some(text) => toml::from_str(text).unwrap_or_else(|e| {
                errors.push(format!("config file: {}", e.message()));
                FileConfig::default()
            }),
            None => FileConfig::default(),
        };
        let mut c = Config::default();
        c.apply_server_and_store(&mut f, o, &mut errors);
        c.apply_timeouts_and_refresh(&f, &mut errors);
        c.apply_http_and_vendors(&mut f, o, &mut errors);
        c.apply_audit_and_tls(&mut f, o, &mut errors);
        c.apply_proxy_and_limits(&mut f, o, &mut errors);
        if errors.is_empty() {
            Ok(c)
        } else {
            Err(errors)
        }
    }

    /// The listeners' and store's settings, the log format and the plain-HTTP egress switch.
    fn apply_server_and_store(
        &mut self,
        f: &mut FileConfig,
        o: &Overrides,
        errors: &mut Vec<String>,
    ) {
        if let Some(listen) = o.listen.clone().or(f.listen.take()) {
            match listen.parse() {
                Ok(a) => self.listen = a,
                Err(_) => errors.push(format!(
                    "listen: '{listen}' is not an address like 127.0.0.1:50051"
                )),
            }
        }
        if let Some(d) = o.data_dir.clone().or(f.data_dir.take()) {
            self.data_dir = d;
        }
        self.master_key_file = o.master_key_file.clone().or(f.master_key_file.take());
        self.store_url = o
            .store_url
            .clone()
            .or(f.store_url.take())
            .filter(|u| !u.expose_secret().trim().is_empty());
        if let Some(u) = &self.store_url {
            if !crate::store::postgres::is_postgres_url(u.expose_secret()) {
                errors.push(
                    "store url: must start with postgres:// (leave it unset for the embedded sled store)"
                        .to_owned(),
                );
            }
        }
        self.store_ca_file = o.store_ca_file.clone().or(f.store_ca_file.take());
        match o.log_format.clone().or(f.log_format.take()).as_deref() {
            None | Some("text") | Some("") => {}
            Some("json") => self.log_json = true,
            Some(other) => errors.push(format!("log format: '{other}' must be 'text' or 'json'")),
        }
        match o.egress_allow_http.as_deref() {
            None => self.egress_allow_http = f.egress_allow_http.unwrap_or(false),
            Some(v) => match parse_bool(v) {
                Some(b) => self.egress_allow_http = b,
                None => errors.push(format!(
                    "CREDBROKER_EGRESS_ALLOW_HTTP: '{v}' must be 1/0/true/false"
                )),
            },
        }
    }

    /// Timeouts, static header lifetime and the OAuth refresh schedule.
    fn apply_timeouts_and_refresh(&mut self, f: &FileConfig, errors: &mut Vec<String>) {
        secs(
            f.request_timeout_secs,
            "request_timeout_secs",
            errors,
            &mut self.request_timeout,
        );
        secs(
            f.upstream_timeout_secs,
            "upstream_timeout_secs",
            errors,
            &mut self.upstream_timeout,
        );
        secs(
            f.shutdown_grace_secs,
            "shutdown_grace_secs",
            errors,
            &mut self.shutdown_grace,
        );
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
            &mut self.refresh_retry_max,
        );
        secs(
            f.salesforce_token_lifetime_secs,
            "salesforce_token_lifetime_secs",
            errors,
            &mut self.salesforce_token_lifetime,
        );
        secs(
            f.servicenow_refresh_token_lifespan_secs,
            "servicenow_refresh_token_lifespan_secs",
            errors,
            &mut self.servicenow_refresh_token_lifespan,
        );
        if let Some(v) = f.refresh_ahead_min_secs {
            self.refresh_ahead_min = Duration::from_secs(v);
        }
        match f.refresh_ahead_fraction {
            Some(v) if v > 0.0 && v <= 0.9 => self.refresh_ahead_fraction = v,
            Some(v) => errors.push(format!("refresh_ahead_fraction: {v} must be in (0, 0.9]")),
            None => {}
        }
        match f.max_concurrent_refreshes {
            Some(0) => errors.push("max_concurrent_refreshes must be greater than 0".to_owned()),
            Some(v) => self.max_concurrent_refreshes = v,
            None => {}
        }
    }

    /// The egress allow-list, the HTTP listener, public and Jira URLs, Zendesk lifetimes, keep-alive.
    fn apply_http_and_vendors(
        &mut self,
        f: &mut FileConfig,
        o: &Overrides,
        errors: &mut Vec<String>,
    ) {
        let allow = o
            .egress_allow
            .clone()
            .or(f.egress_allow.take().map(|v| v.join(",")));
        if let Some(a) = allow {
            match crate::backends::egress::AllowList::parse(&a) {
                Ok(list) => self.egress_allow = list,
                Err(e) => errors.push(format!("egress allow-list: {e}")),
            }
        }
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
        if let Some(u) = url_setting(
            "jira auth url",
            o.jira_auth_url.clone().or(f.jira_auth_url.take()),
            errors,
        ) {
            self.jira_auth_url = u;
        }
        if let Some(u) = url_setting(
            "jira api url",
            o.jira_api_url.clone().or(f.jira_api_url.take()),
            errors,
        ) {
            self.jira_api_url = u;
        }
        match f.zendesk_access_token_ttl_secs {
            Some(v) if (300..=172_800).contains(&v) => {
                self.zendesk_access_token_ttl = Duration::from_secs(v)
            }
            Some(v) => errors.push(format!(
                "zendesk_access_token_ttl_secs: {v} must be 300 – 172800 (Zendesk's limits)"
            )),
            None => {}
        }
        match f.zendesk_refresh_token_ttl_secs {
            Some(v) if (604_800..=7_776_000).contains(&v) => {
                self.zendesk_refresh_token_ttl = Duration::from_secs(v)
            }
            Some(v) => errors.push(format!(
                "zendesk_refresh_token_ttl_secs: {v} must be 604800 – 7776000 (Zendesk's limits)"
            )),
            None => {}
        }
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
    }

    /// The audit trail, record adoption and TLS (gRPC and HTTP), with their consistency rules.
    fn apply_audit_and_tls(&mut self, f: &mut FileConfig, o: &Overrides, errors: &mut Vec<String>) {
        match o.audit_file.clone().or(f.audit_file.take()).as_deref() {
            None => {}
            Some("off") => self.audit_file_off = true,
            Some(p) => self.audit_file = Some(PathBuf::from(p)),
        }
        if let Some(v) = flag(
            "CREDBROKER_AUDIT_STDOUT",
            o.audit_stdout.clone(),
            f.audit_stdout,
            errors,
        ) {
            self.audit_stdout = v;
        }
        if let Some(v) = flag(
            "CREDBROKER_AUDIT_FAIL_CLOSED",
            o.audit_fail_closed.clone(),
            f.audit_fail_closed,
            errors,
        ) {
            self.audit_fail_closed = v;
        }
        if let Some(v) = flag(
            "CREDBROKER_ADOPT_UNAUTHENTICATED_RECORDS",
            o.adopt_unauthenticated_records.clone(),
            f.adopt_unauthenticated_records,
            errors,
        ) {
            self.adopt_unauthenticated_records = v;
        }
        self.tls_cert_file = o.tls_cert_file.clone().or(f.tls_cert_file.take());
        self.tls_key_file = o.tls_key_file.clone().or(f.tls_key_file.take());
        self.tls_client_ca_file = o.tls_client_ca_file.clone().or(f.tls_client_ca_file.take());
        if let Some(v) = flag(
            "CREDBROKER_BEARER_TOKENS",
            o.bearer_tokens.clone(),
            f.bearer_tokens,
            errors,
        ) {
            self.bearer_tokens = v;
        }
        self.http_tls_cert_file = o.http_tls_cert_file.clone().or(f.http_tls_cert_file.take());
        self.http_tls_key_file = o.http_tls_key_file.clone().or(f.http_tls_key_file.take());
        if self.http_tls_cert_file.is_some() != self.http_tls_key_file.is_some() {
            errors.push("HTTP TLS needs both a certificate and a key (CREDBROKER_HTTP_TLS_CERT and CREDBROKER_HTTP_TLS_KEY)".to_owned());
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            errors.push("TLS needs both a certificate and a key (CREDBROKER_TLS_CERT and CREDBROKER_TLS_KEY)".to_owned());
        }
        if self.tls_client_ca_file.is_some() && self.tls_cert_file.is_none() {
            errors.push("a client CA (mTLS) needs a server certificate and key".to_owned());
        }
        if !self.bearer_tokens && self.tls_client_ca_file.is_none() {
            errors.push("bearer tokens can be switched off only with client certificates (CREDBROKER_TLS_CLIENT_CA)".to_owned());
        }
        secs(
            f.tls_handshake_timeout_secs,
            "tls_handshake_timeout_secs",
            errors,
            &mut self.tls_handshake_timeout,
        );
        secs(
            f.tls_reload_interval_secs,
            "tls_reload_interval_secs",
            errors,
            &mut self.tls_reload_interval,
        );
    }

    /// Delivery default, proxy, HTTP limits, audit file size and request limits.
    fn apply_proxy_and_limits(
        &mut self,
        f: &mut FileConfig,
        o: &Overrides,
        errors: &mut Vec<String>,
    ) {
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
            &mut self.proxy_read_timeout,
        );
        if let Some(v) = f.proxy_max_body_bytes {
            self.proxy_max_body_bytes = v;
        }
        secs(
            f.http_header_timeout_secs,
            "http_header_timeout_secs",
            errors,
            &mut self.http_header_timeout,
        );
        match f.http_max_connections {
            Some(0) => errors.push("http_max_connections must be greater than 0".to_owned()),
            Some(v) => self.http_max_connections = v,
            None => {}
        }
        if let Some(v) = f.audit_max_bytes {
            self.audit_max_bytes = v.max(4096);
        }
        if let Some(v) = f.audit_keep {
            self.audit_keep = v;
        }
        if let Some(v) = f.max_request_bytes {
            self.max_request_bytes = v;
        }
        if let Some(v) = f.max_upstream_body_bytes {
            self.max_upstream_body_bytes = v;
        }
        if let Some(v) = f.concurrency_limit_per_connection {
            self.concurrency_limit_per_connection = v;
        }
        if let Some(v) = f.max_concurrent_streams {
            self.max_concurrent_streams = v;
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

/// Sets `target` from whole seconds `v` (refusing 0).
fn secs(v: Option<u64>, name: &str, errors: &mut Vec<String>, target: &mut Duration) {
    if let Some(s) = v {
        if s == 0 {
            errors.push(format!("{name} must be greater than 0"));
        } else {
            *target = Duration::from_secs(s);
        }
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
        "0" | "false" | "no" | "off" | "" => Some(false),
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
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.upstream_timeout, Duration::from_secs(3));

        let bad = Overrides {
            listen: Some("nope".into()),
            log_format: Some("xml".into()),
            ..Default::default()
        };
        let errs = Config::build(Some("request_timeout_secs = 0"), &bad).unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
    }

    #[test]
    fn store_url_from_toml_or_env_is_redacted_and_checked() {
        let c = Config::build(
            Some("store_url = \"postgres://cb:toml-pw-77@db:5432/cb?sslmode=require\"\n"),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            c.store_url.as_ref().map(|u| u.expose_secret()),
            Some("postgres://cb:toml-pw-77@db:5432/cb?sslmode=require")
        );
        assert!(!format!("{c:?}").contains("toml-pw-77"));
        let env = Overrides {
            store_url: Some("postgresql://cb:env-pw@db/cb".into()),
            ..Default::default()
        };
        let c = Config::build(Some("store_url = \"postgres://x@y/z\""), &env).unwrap();
        assert_eq!(
            c.store_url.as_ref().map(|u| u.expose_secret()),
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
    fn unknown_keys_are_errors() {
        assert!(Config::build(Some("lisen = \"x\""), &Overrides::default()).is_err());
    }
}
