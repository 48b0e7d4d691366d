//! `credbrokerctl`: the admin CLI. It talks to the broker over gRPC (sled locks the data
//! directory, so the CLI never opens the store itself).
//!
//! Secrets are never taken from argv: they come from a file (`--secret-file`,
//! `--secret FIELD=file:PATH`), standard input (`--secret-stdin`, `--secret FIELD=stdin`), an
//! environment variable (`--secret FIELD=env:VAR`) or an interactive prompt.

mod audit;
mod backup;
mod caller;
mod format;
mod key;
mod secrets;
mod system;
mod token;
mod watch;

pub use format::{parse_time, ts_string};

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::pb::credential_broker_client::CredentialBrokerClient;
use crate::server::ADMIN_TOKEN_FILE;

/// credbrokerctl: administer a credbroker server over gRPC.
#[derive(Debug, Parser)]
#[command(name = "credbrokerctl", version, about)]
pub struct Cli {
    /// Server address.
    #[arg(
        long,
        env = "CREDBROKER_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub addr: String,
    /// Caller token (default: read from --token-file, else <data-dir>/admin.token).
    #[arg(long, env = "CREDBROKER_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// File holding the caller token.
    #[arg(long, env = "CREDBROKER_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// The server's data directory, to find admin.token.
    #[arg(
        long,
        env = "CREDBROKER_DATA_DIR",
        default_value = "./data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,
    /// CA certificate (PEM) to verify a TLS server (implies https, an `http://` address too).
    #[arg(long, env = "CREDBROKER_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS; its SAN name is the caller.
    #[arg(long, env = "CREDBROKER_CLIENT_CERT", global = true)]
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "CREDBROKER_CLIENT_KEY", global = true)]
    pub client_key: Option<PathBuf>,
    /// TLS server name to verify [default: the host of --addr].
    #[arg(long, global = true)]
    pub tls_server_name: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// For scripts.
    Json,
}

/// Top-level commands.
// Parsed once per process; the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage systems.
    #[command(subcommand)]
    System(SystemCmd),
    /// See what a worker gets.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Manage callers.
    #[command(subcommand)]
    Caller(CallerCmd),
    /// Read the audit trail (the server's audit file; no server connection needed).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Rotate and inspect the keys that wrap stored credentials.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Write an encrypted backup of every system and caller (online; needs the same master key
    /// to restore).
    Backup {
        /// The backup file to create (mode 0600; refused if it exists).
        #[arg(long = "out", short = 'o')]
        out: PathBuf,
    },
    /// Restore a backup into the server: missing systems and callers are added, existing ones
    /// are left unchanged.
    Restore {
        /// The backup file.
        #[arg(long = "in", short = 'i')]
        input: PathBuf,
    },
}

/// First line of a backup file.
pub const BACKUP_HEADER: &str = "credbroker-backup v1";

/// `key …`
#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Make a new key-encryption key primary, online; records are re-wrapped in the background.
    Rotate,
    /// Keys, records per key, re-wrap progress.
    Status,
    /// Retire a key no record uses any more.
    Retire {
        /// Hex key id (from `key status`).
        key_id: String,
    },
}

/// `audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// The last events, optionally filtered.
    Tail {
        /// Only events for this system.
        #[arg(long)]
        system: Option<String>,
        /// Only events by this caller.
        #[arg(long)]
        caller: Option<String>,
        /// How many events.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// The audit file [default: <data-dir>/audit.log].
        #[arg(long, env = "CREDBROKER_AUDIT_FILE")]
        file: Option<PathBuf>,
    },
}

/// `system …`
#[derive(Debug, Subcommand)]
pub enum SystemCmd {
    /// Register a system.
    Register(RegisterArgs),
    /// List systems.
    List {
        /// Page size (all pages are fetched).
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
    /// Show one system.
    Show {
        /// System id.
        system_id: String,
    },
    /// Check a stored system, or a candidate credential (with --kind).
    Check {
        /// System id (omit to check a candidate).
        system_id: Option<String>,
        /// Candidate kind.
        #[arg(long)]
        kind: Option<String>,
        /// Candidate base URL.
        #[arg(long, default_value = "")]
        base_url: String,
        /// Candidate credential.
        #[command(flatten)]
        credential: CredentialArgs,
    },
    /// Rotate a system's credential (checked first unless --skip-check).
    Rotate {
        /// System id.
        system_id: String,
        /// Do not check the new credential first.
        #[arg(long)]
        skip_check: bool,
        /// The new credential.
        #[command(flatten)]
        credential: CredentialArgs,
    },
    /// Switch a system between header and proxy delivery.
    SetDelivery {
        /// System id.
        system_id: String,
        /// header, proxy or default.
        delivery: String,
    },
    /// Print system events as they happen (a snapshot first): registrations, rotations,
    /// health changes, expiry warnings, checks. Runs until interrupted.
    Watch {
        /// Only this system (repeatable).
        #[arg(long = "system")]
        system_ids: Vec<String>,
        /// Only this kind (repeatable).
        #[arg(long = "kind")]
        kinds: Vec<String>,
        /// Resume after this cursor (printed with every event in --output json).
        #[arg(long)]
        after: Option<String>,
    },
    /// One line per system with its health and why, worst first.
    Health,
    /// Delete a system and its credential.
    Delete {
        /// System id.
        system_id: String,
    },
    /// Connect a Zendesk or Jira Cloud system: prints the vendor URL to open (nothing is opened
    /// automatically) and waits until the system is active or the authorization expires.
    Connect {
        /// System id.
        system_id: String,
        /// How often to look for completion, in milliseconds.
        #[arg(long, default_value_t = 2000)]
        poll_ms: u64,
    },
}

/// `system register` arguments.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// System kind: asana, azure-devops, salesforce, servicenow, zendesk, jira-cloud, freshdesk,
    /// freshservice.
    #[arg(long)]
    pub kind: String,
    /// System id (generated when omitted).
    #[arg(long = "id", default_value = "")]
    pub system_id: String,
    /// Display name.
    #[arg(long, default_value = "")]
    pub name: String,
    /// Description.
    #[arg(long, default_value = "")]
    pub description: String,
    /// Base URL (empty = the vendor default where there is one).
    #[arg(long, default_value = "")]
    pub base_url: String,
    /// Check the credential upstream before saving; nothing is saved when it fails.
    #[arg(long)]
    pub check: bool,
    /// header or proxy (default: proxy for static secrets, header for OAuth).
    #[arg(long)]
    pub delivery: Option<String>,
    /// The credential.
    #[command(flatten)]
    pub credential: CredentialArgs,
}

/// Credential input (non-secret fields as flags, secrets from files, stdin, env or a prompt).
#[derive(Debug, Args, Default)]
pub struct CredentialArgs {
    /// personal-access-token, api-key, basic, oauth-client-credentials, oauth-refresh-token,
    /// oauth-password-grant, salesforce-login, oauth-authorization-code,
    /// entra-client-credentials, salesforce-jwt-bearer, email-api-token (default: the kind's
    /// first supported type).
    #[arg(long)]
    pub credential_type: Option<String>,
    /// User name (basic, password grant, Salesforce login; optional for PATs).
    #[arg(long)]
    pub username: Option<String>,
    /// OAuth client id.
    #[arg(long)]
    pub client_id: Option<String>,
    /// OAuth scope (repeatable).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// Expiry of a PAT, API key, API token or client secret, as the vendor's UI shows it:
    /// YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or Unix seconds.
    #[arg(long)]
    pub expires_at: Option<String>,
    /// E-mail address of the account an API token belongs to (email-api-token).
    #[arg(long)]
    pub email: Option<String>,
    /// The API token is scoped: it only works through api.atlassian.com (email-api-token).
    #[arg(long)]
    pub scoped: bool,
    /// Entra directory (tenant) id or verified domain (entra-client-credentials).
    #[arg(long)]
    pub tenant_id: Option<String>,
    /// Entra authority for sovereign clouds (default https://login.microsoftonline.com).
    #[arg(long)]
    pub authority_url: Option<String>,
    /// A federated token file on the broker's host, read for every token (workload identity;
    /// entra-client-credentials).
    #[arg(long)]
    pub federated_token_file: Option<String>,
    /// Salesforce login host: https://login.salesforce.com, https://test.salesforce.com or the
    /// org's My Domain (salesforce-jwt-bearer).
    #[arg(long)]
    pub login_url: Option<String>,
    /// Read the main secret (token, key, password, client secret) from this file.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Read the main secret from standard input.
    #[arg(long)]
    pub secret_stdin: bool,
    /// FIELD=file:PATH, FIELD=stdin or FIELD=env:VAR for any secret field (repeatable).
    #[arg(long = "secret")]
    pub secrets: Vec<String>,
}

/// `token …`
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Get the headers a worker would get.
    Get {
        /// System id.
        system_id: String,
        /// The headers must stay valid at least this long.
        #[arg(long, default_value_t = 0)]
        min_valid_seconds: u32,
        /// Report headers the upstream rejected (their token_id): a new token is minted.
        #[arg(long, default_value = "")]
        rejected_token_id: String,
    },
}

/// `caller …`
#[derive(Debug, Subcommand)]
pub enum CallerCmd {
    /// Create a caller and print its token (shown once).
    Add {
        /// Caller name.
        name: String,
        /// admin or worker.
        #[arg(long, default_value = "worker")]
        role: String,
        /// Workers: system id patterns they may use, comma-separated (`acme-*`).
        #[arg(long, value_delimiter = ',')]
        systems: Vec<String>,
        /// Workers: kinds they may use, comma-separated (`asana,jira-cloud`).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
        /// Token expiry: YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or Unix seconds.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// List callers.
    List,
    /// Revoke a caller.
    Revoke {
        /// Caller name.
        name: String,
    },
}

type Client = CredentialBrokerClient<InterceptedService<Channel, AuthInterceptor>>;

/// Adds the caller token to every request.
#[derive(Clone)]
pub struct AuthInterceptor {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// Runs the CLI; returns the process exit code.
pub async fn main(cli: Cli) -> i32 {
    let output = cli.output;
    match dispatch(cli).await {
        Ok(()) => 0,
        Err(e) => {
            if let Some(status) = e.downcast_ref::<Status>() {
                let code = format!("{:?}", status.code());
                if output == Output::Json {
                    eprintln!(
                        "{}",
                        json!({"error": {"code": code, "message": status.message()}})
                    );
                } else {
                    eprintln!("error: {code}: {}", status.message());
                }
            } else if output == Output::Json {
                eprintln!("{}", json!({"error": {"message": format!("{e:#}")}}));
            } else {
                eprintln!("error: {e:#}");
            }
            1
        }
    }
}

/// Whether to speak TLS, and the address to dial: `https` with a CA or client certificate
/// (`certificate`), where an `http://` address (the default one, or one written so) becomes
/// `https://` rather than send the caller token in clear to a server nobody checked.
fn server_address(addr: &str, certificate: bool) -> Result<(bool, String)> {
    let Some((scheme, rest)) = addr.split_once("://") else {
        let scheme = if certificate { "https" } else { "http" };
        return Ok((certificate, format!("{scheme}://{addr}")));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "https" => Ok((true, addr.to_owned())),
        "http" if certificate => Ok((true, format!("https://{rest}"))),
        other if certificate => {
            bail!("--ca-cert and --client-cert need an https:// address, not {other}://")
        }
        _ => Ok((false, addr.to_owned())),
    }
}

/// Whether `args` give `--token` itself (not `--token-file`).
fn token_on_command_line(args: impl Iterator<Item = std::ffi::OsString>) -> bool {
    args.take_while(|a| a != "--")
        .any(|a| a == "--token" || a.to_string_lossy().starts_with("--token="))
}

async fn connect(cli: &Cli) -> Result<Client> {
    if token_on_command_line(std::env::args_os()) {
        eprintln!(
            "warning: --token puts the caller token in the process list, where local users can \
             read it; use CREDBROKER_TOKEN, --token-file or the default admin.token instead"
        );
    }
    // An empty token (CREDBROKER_TOKEN left empty by a template) is refused: taken for none,
    // a worker's script would run as the admin whose token file it can read.
    if cli.token.as_ref().is_some_and(|t| t.trim().is_empty()) {
        bail!("CREDBROKER_TOKEN (or --token) is set but empty; unset it or give a caller token");
    }
    let token = match (&cli.token, &cli.token_file) {
        (None, None) if cli.client_cert.is_some() => String::new(),
        (Some(t), _) => t.trim().to_owned(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the token file {}", f.display()))?
            .trim()
            .to_owned(),
        (None, None) => {
            let path = cli.data_dir.join(ADMIN_TOKEN_FILE);
            std::fs::read_to_string(&path)
                .with_context(|| {
                    format!(
                        "no caller token: pass --token/CREDBROKER_TOKEN or --token-file, or run \
                         next to the server's data directory ({} not readable)",
                        path.display()
                    )
                })?
                .trim()
                .to_owned()
        }
    };
    let header = if token.is_empty() {
        None
    } else {
        let mut h: MetadataValue<tonic::metadata::Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| anyhow!("the caller token contains characters not allowed in a header"))?;
        h.set_sensitive(true);
        Some(h)
    };
    let certificate = cli.ca_cert.is_some() || cli.client_cert.is_some();
    let (tls, addr) = server_address(&cli.addr, certificate)?;
    let mut endpoint =
        Channel::from_shared(addr.clone()).map_err(|_| anyhow!("invalid --addr '{addr}'"))?;
    if tls {
        let mut cfg = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &cli.ca_cert {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            cfg = cfg.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        match (&cli.client_cert, &cli.client_key) {
            (Some(c), Some(k)) => {
                let cert = std::fs::read(c).with_context(|| format!("reading {}", c.display()))?;
                let key = std::fs::read(k).with_context(|| format!("reading {}", k.display()))?;
                cfg = cfg.identity(tonic::transport::Identity::from_pem(cert, key));
            }
            (None, None) => {}
            _ => bail!("--client-cert and --client-key go together"),
        }
        if let Some(name) = &cli.tls_server_name {
            cfg = cfg.domain_name(name.clone());
        }
        endpoint = endpoint.tls_config(cfg).context("TLS settings")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to credbroker at {addr}"))?;
    Ok(CredentialBrokerClient::with_interceptor(
        channel,
        AuthInterceptor { header },
    ))
}

async fn dispatch(cli: Cli) -> Result<()> {
    let out = cli.output;
    if let Command::Audit(AuditCmd::Tail {
        system,
        caller,
        lines,
        file,
    }) = &cli.command
    {
        let path = file
            .clone()
            .unwrap_or_else(|| cli.data_dir.join(crate::server::AUDIT_FILE));
        return audit::audit_tail(&path, system.as_deref(), caller.as_deref(), *lines, out);
    }
    let mut client = connect(&cli).await?;
    match cli.command {
        Command::System(cmd) => system::run(&mut client, out, cmd).await,
        Command::Token(cmd) => token::run(&mut client, out, cmd).await,
        Command::Caller(cmd) => caller::run(&mut client, out, cmd).await,
        Command::Key(cmd) => key::run(&mut client, out, cmd).await,
        Command::Backup { out: path } => backup::run_backup(&mut client, out, &path).await,
        Command::Restore { input } => backup::run_restore(&mut client, out, &input).await,
        Command::Audit(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::{server_address, token_on_command_line};

    #[test]
    fn a_certificate_makes_the_address_https() {
        let at = |a: &str, c: bool| server_address(a, c).ok();
        let https = |a: &str| Some((true, a.to_owned()));
        assert_eq!(at("http://h:1", true), https("https://h:1"));
        assert_eq!(at("HTTP://h:1", true), https("https://h:1"));
        assert_eq!(at("h:1", true), https("https://h:1"));
        assert_eq!(at("HTTPS://h:1", false), https("HTTPS://h:1"));
        assert_eq!(
            at("http://h:1", false),
            Some((false, "http://h:1".to_owned()))
        );
        assert_eq!(at("h:1", false), Some((false, "http://h:1".to_owned())));
        assert!(at("grpc://h:1", true).is_none());
    }

    #[test]
    fn a_token_on_the_command_line_is_noticed() {
        let args = |a: &[&str]| a.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let on = |a: &[&str]| token_on_command_line(args(a).into_iter());
        assert!(on(&["credbrokerctl", "--token", "cbt_x", "system", "list"]));
        assert!(on(&["credbrokerctl", "--token=cbt_x", "system", "list"]));
        assert!(!on(&[
            "credbrokerctl",
            "--token-file",
            "t",
            "system",
            "list"
        ]));
        assert!(!on(&["credbrokerctl", "secret", "set", "--", "--token"]));
    }
}
