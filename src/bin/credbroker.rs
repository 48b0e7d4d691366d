//! `credbroker`: the server. Parses flags and environment, sets up logging, binds the listener
//! and hands over to `credbroker::server::run`.

#![warn(clippy::too_many_lines)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use credbroker::config::{Config, Overrides};

/// Exit code for bad configuration (EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit code for a refused start (EX_CONFIG): wrong key, locked or damaged data directory.
const EXIT_CONFIG: u8 = 78;

/// credbroker: a gRPC credential broker for sync engines.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "CREDBROKER_LISTEN")]
    listen: Option<String>,
    /// Data directory (store, generated master key, admin token) [default: ./data].
    #[arg(long, env = "CREDBROKER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Optional TOML config file; every setting has a default.
    #[arg(long, env = "CREDBROKER_CONFIG")]
    config: Option<PathBuf>,
    /// Master key file (32 random bytes, base64) [default: <data-dir>/master.key, generated].
    #[arg(long, env = "CREDBROKER_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
    /// PostgreSQL store for replicas (postgres://user:pass@host/db?sslmode=require); unset: the
    /// embedded sled store in the data directory.
    #[arg(long, env = "CREDBROKER_STORE_URL", hide_env_values = true)]
    store_url: Option<String>,
    /// CA certificate (PEM) verifying the PostgreSQL server [default: public web roots].
    #[arg(long, env = "CREDBROKER_STORE_CA_FILE")]
    store_ca_file: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, env = "CREDBROKER_LOG_FORMAT")]
    log_format: Option<String>,
    /// Accept http:// base URLs (fakes on loopback, labs): 1 or 0.
    #[arg(long, env = "CREDBROKER_EGRESS_ALLOW_HTTP")]
    egress_allow_http: Option<String>,
    /// Private destinations the egress guard admits: comma-separated CIDRs and host names.
    #[arg(long, env = "CREDBROKER_EGRESS_ALLOW")]
    egress_allow: Option<String>,
    /// Audit file (JSON lines, rotated by size), or `off` [default: <data-dir>/audit.log].
    #[arg(long, env = "CREDBROKER_AUDIT_FILE")]
    audit_file: Option<String>,
    /// Also write audit events to stdout: 1 or 0.
    #[arg(long, env = "CREDBROKER_AUDIT_STDOUT")]
    audit_stdout: Option<String>,
    /// Refuse secret-returning RPCs while the audit sink fails: 1 (default) or 0.
    #[arg(long, env = "CREDBROKER_AUDIT_FAIL_CLOSED")]
    audit_fail_closed: Option<String>,
    /// Server certificate (PEM) for TLS on the gRPC listener.
    #[arg(long, env = "CREDBROKER_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "CREDBROKER_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA for client certificates (PEM): mTLS; a certificate's SAN DNS name is the caller name.
    #[arg(long, env = "CREDBROKER_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Accept bearer caller tokens: 1 (default) or 0 (client certificates only).
    #[arg(long, env = "CREDBROKER_BEARER_TOKENS")]
    bearer_tokens: Option<String>,
    /// Delivery of static-secret systems registered without one: proxy (default) or header.
    #[arg(long, env = "CREDBROKER_DEFAULT_STATIC_DELIVERY")]
    default_static_delivery: Option<String>,
    /// Once, when upgrading a store written before record authentication: tag its untagged
    /// records (1/0). Off by default: a forged row would be adopted too.
    #[arg(long, env = "CREDBROKER_ADOPT_UNAUTHENTICATED_RECORDS")]
    adopt_unauthenticated_records: Option<String>,
    /// Certificate (PEM) for the HTTP listener: with --http-tls-key it serves HTTPS (reloaded
    /// when the files change and on SIGHUP).
    #[arg(long, env = "CREDBROKER_HTTP_TLS_CERT")]
    http_tls_cert: Option<PathBuf>,
    /// Private key (PEM) for the HTTP listener.
    #[arg(long, env = "CREDBROKER_HTTP_TLS_KEY")]
    http_tls_key: Option<PathBuf>,
    /// Tokio runtime: auto (current_thread when the process has one CPU, else multi-thread),
    /// multi, or current.
    #[arg(long, env = "CREDBROKER_RUNTIME", default_value = "auto")]
    runtime: String,
    /// HTTP listen address for the OAuth callback, or `off` [default: 127.0.0.1:8080].
    #[arg(long, env = "CREDBROKER_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// URL people and vendors reach the HTTP listener at [default: http://{http-listen}].
    #[arg(long, env = "CREDBROKER_PUBLIC_URL")]
    public_url: Option<String>,
    /// Atlassian authorization server [default: https://auth.atlassian.com].
    #[arg(long, env = "CREDBROKER_JIRA_AUTH_URL")]
    jira_auth_url: Option<String>,
    /// Atlassian API gateway [default: https://api.atlassian.com].
    #[arg(long, env = "CREDBROKER_JIRA_API_URL")]
    jira_api_url: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let overrides = Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        master_key_file: args.master_key_file,
        store_url: args.store_url.map(credbroker::secret::SecretString::new),
        store_ca_file: args.store_ca_file,
        log_format: args.log_format,
        egress_allow_http: args.egress_allow_http,
        egress_allow: args.egress_allow,
        audit_file: args.audit_file,
        audit_stdout: args.audit_stdout,
        audit_fail_closed: args.audit_fail_closed,
        tls_cert_file: args.tls_cert,
        tls_key_file: args.tls_key,
        tls_client_ca_file: args.tls_client_ca,
        bearer_tokens: args.bearer_tokens,
        default_static_delivery: args.default_static_delivery,
        adopt_unauthenticated_records: args.adopt_unauthenticated_records,
        http_tls_cert_file: args.http_tls_cert,
        http_tls_key_file: args.http_tls_key,
        http_listen: args.http_listen,
        public_url: args.public_url,
        jira_auth_url: args.jira_auth_url,
        jira_api_url: args.jira_api_url,
    };
    let config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(errors) => {
            for e in errors {
                eprintln!("credbroker: configuration error: {e}");
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    credbroker::telemetry::init(config.server.log_json);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let current = match args.runtime.as_str() {
        "current" => true,
        "multi" => false,
        "auto" => cpus == 1,
        other => {
            eprintln!("credbroker: configuration error: --runtime '{other}' must be auto, multi or current");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // On one core, tokio's multi-thread scheduler costs about half the throughput of a
    // current-thread runtime (its LIFO slot makes hyper flush one response per write; see
    // docs/benchmarks.md); blocking work (store flushes) runs on the blocking pool either way.
    let built = if current {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    let runtime = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("credbroker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.server.listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(message = "Cannot bind the listen address.", addr = %config.server.listen, error = %e);
                eprintln!("credbroker: cannot listen on {}: {e}", config.server.listen);
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(message = "gRPC listening.", addr = %addr, data_dir = %config.store.data_dir.display());
        match credbroker::server::run(listener, config, credbroker::shutdown::signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(message = "credbroker refused to start.", error = %e);
                eprintln!("credbroker: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        }
    })
}
