//! `credbrokerctl`: the admin CLI. It talks to the broker over gRPC (sled locks the data
//! directory, so the CLI never opens the store itself).
//!
//! Secrets are never taken from argv: they come from a file (`--secret-file`,
//! `--secret FIELD=file:PATH`), standard input (`--secret-stdin`, `--secret FIELD=stdin`), an
//! environment variable (`--secret FIELD=env:VAR`) or an interactive prompt.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::model::{CredentialType, SystemKind};
use crate::pb;
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
    /// CA certificate (PEM) to verify a TLS server (implies https).
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
    /// oauth-password-grant, salesforce-login, oauth-authorization-code (default: the kind's
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
    /// PAT expiry: YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or Unix seconds.
    #[arg(long)]
    pub expires_at: Option<String>,
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

async fn connect(cli: &Cli) -> Result<Client> {
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
    let tls =
        cli.ca_cert.is_some() || cli.client_cert.is_some() || cli.addr.starts_with("https://");
    let addr = if cli.addr.contains("://") {
        cli.addr.clone()
    } else {
        format!("{}://{}", if tls { "https" } else { "http" }, cli.addr)
    };
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
        return audit_tail(&path, system.as_deref(), caller.as_deref(), *lines, out);
    }
    let mut client = connect(&cli).await?;
    match cli.command {
        Command::System(cmd) => match cmd {
            SystemCmd::Register(a) => {
                let kind = parse_kind(&a.kind)?;
                let credential = build_credential(kind, &a.credential)?;
                let resp = client
                    .register_system(pb::RegisterSystemRequest {
                        system_id: a.system_id,
                        display_name: a.name,
                        description: a.description,
                        kind: crate::server::convert::kind_to_proto(kind) as i32,
                        base_url: a.base_url,
                        credential: Some(credential),
                        check: a.check,
                        delivery: parse_delivery(a.delivery.as_deref())? as i32,
                    })
                    .await?
                    .into_inner();
                let sys = resp.system.unwrap_or_default();
                print_system(out, &sys, resp.check.as_ref(), "registered");
            }
            SystemCmd::List { page_size } => {
                let mut all = Vec::new();
                let mut page_token = String::new();
                loop {
                    let resp = client
                        .list_systems(pb::ListSystemsRequest {
                            page_size,
                            page_token: page_token.clone(),
                        })
                        .await?
                        .into_inner();
                    all.extend(resp.systems);
                    if resp.next_page_token.is_empty() {
                        break;
                    }
                    page_token = resp.next_page_token;
                }
                if out == Output::Json {
                    println!("{}", Value::Array(all.iter().map(system_json).collect()));
                } else if all.is_empty() {
                    println!("no systems");
                } else {
                    println!(
                        "{:<32} {:<14} {:<8} {:<26} BASE URL",
                        "ID", "KIND", "VERSION", "STATE"
                    );
                    for s in &all {
                        println!(
                            "{:<32} {:<14} {:<8} {:<26} {}",
                            s.system_id,
                            kind_name(s.kind),
                            s.credential_version,
                            state_name(s.state),
                            s.base_url
                        );
                    }
                }
            }
            SystemCmd::Show { system_id } => {
                let sys = client
                    .get_system(pb::GetSystemRequest { system_id })
                    .await?
                    .into_inner()
                    .system
                    .unwrap_or_default();
                print_system(out, &sys, sys.last_check.as_ref(), "");
            }
            SystemCmd::Check {
                system_id,
                kind,
                base_url,
                credential,
            } => {
                use pb::check_authentication_request::Target;
                let target = match (system_id, kind) {
                    (Some(id), None) => Target::SystemId(id),
                    (None, Some(k)) => {
                        let kind = parse_kind(&k)?;
                        Target::Candidate(pb::CandidateSystem {
                            kind: crate::server::convert::kind_to_proto(kind) as i32,
                            base_url,
                            credential: Some(build_credential(kind, &credential)?),
                        })
                    }
                    _ => bail!("give either a SYSTEM_ID or --kind (with a candidate credential)"),
                };
                let check = client
                    .check_authentication(pb::CheckAuthenticationRequest {
                        target: Some(target),
                    })
                    .await?
                    .into_inner()
                    .check
                    .unwrap_or_default();
                if out == Output::Json {
                    println!("{}", check_json(&check));
                } else {
                    print_check(&check);
                }
                if !check.ok {
                    bail!("the check failed");
                }
            }
            SystemCmd::Rotate {
                system_id,
                skip_check,
                credential,
            } => {
                let current = client
                    .get_system(pb::GetSystemRequest {
                        system_id: system_id.clone(),
                    })
                    .await?
                    .into_inner()
                    .system
                    .unwrap_or_default();
                let kind = kind_from_proto(current.kind)?;
                let credential = build_credential(kind, &credential)?;
                let resp = client
                    .rotate_credential(pb::RotateCredentialRequest {
                        system_id,
                        credential: Some(credential),
                        skip_check,
                    })
                    .await?
                    .into_inner();
                print_system(
                    out,
                    &resp.system.unwrap_or_default(),
                    resp.check.as_ref(),
                    "rotated",
                );
            }
            SystemCmd::SetDelivery {
                system_id,
                delivery,
            } => {
                let d = if delivery == "default" {
                    pb::Delivery::Unspecified
                } else {
                    parse_delivery(Some(&delivery))?
                };
                let sys = client
                    .set_delivery(pb::SetDeliveryRequest {
                        system_id,
                        delivery: d as i32,
                    })
                    .await?
                    .into_inner()
                    .system
                    .unwrap_or_default();
                print_system(out, &sys, None, "updated");
            }
            SystemCmd::Connect { system_id, poll_ms } => {
                connect_system(&mut client, out, system_id, poll_ms).await?;
            }
            SystemCmd::Delete { system_id } => {
                client
                    .delete_system(pb::DeleteSystemRequest {
                        system_id: system_id.clone(),
                    })
                    .await?;
                if out == Output::Json {
                    println!("{}", json!({"deleted": system_id}));
                } else {
                    println!("deleted {system_id}");
                }
            }
        },
        Command::Token(TokenCmd::Get {
            system_id,
            min_valid_seconds,
            rejected_token_id,
        }) => {
            let t = client
                .get_access_token(pb::GetAccessTokenRequest {
                    system_id,
                    min_valid_seconds,
                    rejected_token_id,
                })
                .await?
                .into_inner();
            if out == Output::Json {
                println!(
                    "{}",
                    json!({
                        "headers": t.headers.iter().map(|h| json!({"name": h.name, "value": h.value})).collect::<Vec<_>>(),
                        "expires_at": t.expires_at.as_ref().map(ts_string),
                        "api_base_url": t.api_base_url,
                        "credential_version": t.credential_version,
                        "token_id": t.token_id,
                    })
                );
            } else {
                for h in &t.headers {
                    println!("{}: {}", h.name, h.value);
                }
                println!("api_base_url: {}", t.api_base_url);
                println!(
                    "expires_at: {}",
                    t.expires_at.as_ref().map(ts_string).unwrap_or_default()
                );
                println!("credential_version: {}", t.credential_version);
                println!("token_id: {}", t.token_id);
            }
        }
        Command::Audit(_) => {}
        Command::Backup { out: path } => {
            let (chunks, bytes) = backup(&mut client, &path).await?;
            if out == Output::Json {
                println!(
                    "{}",
                    json!({"file": path.display().to_string(), "chunks": chunks, "bytes": bytes})
                );
            } else {
                println!(
                    "backup written to {} ({chunks} chunks, {bytes} bytes, encrypted)",
                    path.display()
                );
            }
        }
        Command::Restore { input } => {
            let chunks = read_backup(&input)?;
            let r = client
                .restore_backup(tokio_stream::iter(
                    chunks.into_iter().map(|chunk| pb::BackupChunk { chunk }),
                ))
                .await?
                .into_inner();
            if out == Output::Json {
                println!(
                    "{}",
                    json!({
                        "systems_restored": r.systems_restored,
                        "systems_skipped": r.systems_skipped,
                        "callers_restored": r.callers_restored,
                        "callers_skipped": r.callers_skipped,
                    })
                );
            } else {
                println!(
                    "restored {} systems ({} already present, unchanged) and {} callers ({} already present)",
                    r.systems_restored, r.systems_skipped, r.callers_restored, r.callers_skipped
                );
            }
        }
        Command::Key(cmd) => match cmd {
            KeyCmd::Rotate => {
                let r = client
                    .rotate_master_key(pb::RotateMasterKeyRequest {})
                    .await?
                    .into_inner();
                if out == Output::Json {
                    println!("{}", json!({"key_id": r.key_id}));
                } else {
                    println!(
                        "new primary key {}; records are being re-wrapped (see `key status`)",
                        r.key_id
                    );
                }
            }
            KeyCmd::Status => {
                let s = client
                    .get_key_status(pb::GetKeyStatusRequest {})
                    .await?
                    .into_inner();
                if out == Output::Json {
                    println!(
                        "{}",
                        json!({
                            "primary_key_id": s.primary_key_id,
                            "rewrap_running": s.rewrap_running,
                            "records_total": s.records_total,
                            "records_on_primary": s.records_on_primary,
                            "keys": s.keys.iter().map(|k| json!({"key_id": k.key_id, "primary": k.primary, "root": k.root, "records": k.records})).collect::<Vec<_>>(),
                        })
                    );
                } else {
                    println!(
                        "primary: {}  re-wrapped: {}/{}{}",
                        s.primary_key_id,
                        s.records_on_primary,
                        s.records_total,
                        if s.rewrap_running { " (running)" } else { "" }
                    );
                    for k in &s.keys {
                        println!(
                            "  {}  records {:>8}{}{}",
                            k.key_id,
                            k.records,
                            if k.primary { "  primary" } else { "" },
                            if k.root {
                                "  root (master key file)"
                            } else {
                                ""
                            }
                        );
                    }
                }
            }
            KeyCmd::Retire { key_id } => {
                client
                    .retire_key(pb::RetireKeyRequest {
                        key_id: key_id.clone(),
                    })
                    .await?;
                if out == Output::Json {
                    println!("{}", json!({"retired": key_id}));
                } else {
                    println!("retired key {key_id}");
                }
            }
        },
        Command::Caller(cmd) => match cmd {
            CallerCmd::Add {
                name,
                role,
                systems,
                kinds,
                expires_at,
            } => {
                let role = match role.as_str() {
                    "admin" => pb::CallerRole::Admin,
                    "worker" => pb::CallerRole::Worker,
                    other => bail!("--role must be admin or worker, not '{other}'"),
                };
                let resp = client
                    .create_caller(pb::CreateCallerRequest {
                        name,
                        role: role as i32,
                        system_patterns: systems,
                        kinds: kinds
                            .iter()
                            .map(|k| {
                                parse_kind(k)
                                    .map(|k| crate::server::convert::kind_to_proto(k) as i32)
                            })
                            .collect::<Result<Vec<_>>>()?,
                        expires_at: expires_at
                            .as_deref()
                            .map(parse_time)
                            .transpose()?
                            .map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
                    })
                    .await?
                    .into_inner();
                let c = resp.caller.unwrap_or_default();
                if out == Output::Json {
                    println!(
                        "{}",
                        json!({"caller": caller_json(&c), "token": resp.token})
                    );
                } else {
                    println!("created caller {} ({})", c.name, role_name(c.role));
                    println!("token (shown once): {}", resp.token);
                }
            }
            CallerCmd::List => {
                let resp = client
                    .list_callers(pb::ListCallersRequest {})
                    .await?
                    .into_inner();
                if out == Output::Json {
                    println!(
                        "{}",
                        Value::Array(resp.callers.iter().map(caller_json).collect())
                    );
                } else {
                    println!("{:<32} {:<8} {:<8} CREATED", "NAME", "ROLE", "REVOKED");
                    for c in &resp.callers {
                        println!(
                            "{:<32} {:<8} {:<8} {}",
                            c.name,
                            role_name(c.role),
                            c.revoked,
                            c.created_at.as_ref().map(ts_string).unwrap_or_default()
                        );
                    }
                }
            }
            CallerCmd::Revoke { name } => {
                let c = client
                    .revoke_caller(pb::RevokeCallerRequest { name })
                    .await?
                    .into_inner()
                    .caller
                    .unwrap_or_default();
                if out == Output::Json {
                    println!("{}", caller_json(&c));
                } else {
                    println!("revoked caller {}", c.name);
                }
            }
        },
    }
    Ok(())
}

async fn connect_system(
    client: &mut Client,
    out: Output,
    system_id: String,
    poll_ms: u64,
) -> Result<()> {
    let before = client
        .get_system(pb::GetSystemRequest {
            system_id: system_id.clone(),
        })
        .await?
        .into_inner()
        .system
        .unwrap_or_default();
    let start = client
        .start_authorization(pb::StartAuthorizationRequest {
            system_id: system_id.clone(),
        })
        .await?
        .into_inner();
    let expires = start.expires_at.unwrap_or_default();
    if out == Output::Json {
        println!(
            "{}",
            json!({"authorize_url": start.authorize_url, "redirect_uri": start.redirect_uri, "expires_at": ts_string(&expires)})
        );
    } else {
        println!(
            "Open this URL in a browser, sign in and allow access:\n\n  {}\n",
            start.authorize_url
        );
        println!("(The vendor sends the browser back to {}; it must be registered with the OAuth client.)", start.redirect_uri);
    }
    use std::io::Write;
    let mut last_message = before.state_message.clone();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(poll_ms.max(50))).await;
        let sys = client
            .get_system(pb::GetSystemRequest {
                system_id: system_id.clone(),
            })
            .await?
            .into_inner()
            .system
            .unwrap_or_default();
        if sys.state == pb::SystemState::Active as i32
            && sys.credential_version > before.credential_version
        {
            if out == Output::Json {
                println!("{}", system_json(&sys));
            } else {
                eprintln!();
                println!(
                    "connected: {} is active (credential version {})",
                    sys.system_id, sys.credential_version
                );
            }
            return Ok(());
        }
        if sys.state_message != last_message && !sys.state_message.is_empty() {
            eprintln!("\n{}", sys.state_message);
            last_message = sys.state_message.clone();
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let left = expires.seconds - now;
        if left <= 0 {
            bail!("the authorization expired before it was completed; run `credbrokerctl system connect {system_id}` again");
        }
        if out == Output::Text {
            eprint!(
                "\rwaiting for the authorization… {:02}:{:02} left ",
                left / 60,
                left % 60
            );
            let _ = std::io::stderr().flush();
        }
    }
}

fn audit_tail(
    path: &std::path::Path,
    system: Option<&str>,
    caller: Option<&str>,
    n: usize,
    out: Output,
) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the audit file {}", path.display()))?;
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| system.is_none_or(|s| e["system_id"] == s))
        .filter(|e| caller.is_none_or(|c| e["caller"] == c))
        .collect();
    for e in &events[events.len().saturating_sub(n)..] {
        if out == Output::Json {
            println!("{e}");
        } else {
            let s = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
            println!(
                "{} {:<20} {:<20} {:<24} {:<18} {}",
                s("time"),
                s("caller"),
                s("rpc"),
                s("system_id"),
                s("code"),
                s("token_hmac")
            );
        }
    }
    Ok(())
}

fn parse_delivery(s: Option<&str>) -> Result<pb::Delivery> {
    match s {
        None => Ok(pb::Delivery::Unspecified),
        Some("header") => Ok(pb::Delivery::Header),
        Some("proxy") => Ok(pb::Delivery::Proxy),
        Some(other) => bail!("--delivery must be header or proxy, not '{other}'"),
    }
}

fn delivery_name(v: i32) -> &'static str {
    match pb::Delivery::try_from(v) {
        Ok(pb::Delivery::Header) => "header",
        Ok(pb::Delivery::Proxy) => "proxy",
        _ => "default",
    }
}

fn parse_kind(s: &str) -> Result<SystemKind> {
    SystemKind::from_slug(s).ok_or_else(|| {
        let all: Vec<String> = SystemKind::ALL
            .iter()
            .map(|k| k.slug().replace('_', "-"))
            .collect();
        anyhow!("unknown kind '{s}'; one of: {}", all.join(", "))
    })
}

fn kind_from_proto(v: i32) -> Result<SystemKind> {
    crate::server::convert::kind(v, "kind").map_err(|e| anyhow!("{e}"))
}

fn parse_credential_type(s: &str) -> Result<CredentialType> {
    let norm = s.trim().to_ascii_lowercase().replace('-', "_");
    [
        CredentialType::PersonalAccessToken,
        CredentialType::ApiKey,
        CredentialType::Basic,
        CredentialType::OAuthClientCredentials,
        CredentialType::OAuthRefreshToken,
        CredentialType::OAuthPasswordGrant,
        CredentialType::SalesforceLogin,
        CredentialType::OAuthAuthorizationCode,
    ]
    .into_iter()
    .find(|t| t.field_name() == norm)
    .ok_or_else(|| anyhow!("unknown credential type '{s}'"))
}

/// The secret fields of a credential type, main secret first, with whether each is required.
fn secret_fields(t: CredentialType) -> &'static [(&'static str, bool)] {
    match t {
        CredentialType::PersonalAccessToken => &[("token", true)],
        CredentialType::ApiKey => &[("key", true)],
        CredentialType::Basic => &[("password", true)],
        CredentialType::OAuthClientCredentials => &[("client_secret", true)],
        CredentialType::OAuthRefreshToken => &[("client_secret", true), ("refresh_token", true)],
        CredentialType::OAuthPasswordGrant => &[("password", true), ("client_secret", true)],
        CredentialType::SalesforceLogin => &[
            ("password", true),
            ("security_token", true),
            ("client_secret", false),
        ],
        CredentialType::OAuthAuthorizationCode => &[("client_secret", true)],
    }
}

struct SecretReader {
    stdin_used: bool,
}

impl SecretReader {
    fn read(&mut self, field: &str, source: &str) -> Result<String> {
        let value = if source == "stdin" {
            if self.stdin_used {
                bail!("only one secret can come from standard input");
            }
            self.stdin_used = true;
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the secret from standard input")?;
            s
        } else if let Some(path) = source.strip_prefix("file:") {
            std::fs::read_to_string(path).with_context(|| format!("reading {field} from {path}"))?
        } else if let Some(var) = source.strip_prefix("env:") {
            std::env::var(var).with_context(|| format!("reading {field} from ${var}"))?
        } else {
            bail!("secret source for {field} must be file:PATH, stdin or env:VAR");
        };
        Ok(value.trim_end_matches(['\r', '\n']).to_owned())
    }
}

fn gather_secrets(
    t: CredentialType,
    a: &CredentialArgs,
) -> Result<std::collections::HashMap<&'static str, String>> {
    let fields = secret_fields(t);
    let mut reader = SecretReader { stdin_used: false };
    let mut out = std::collections::HashMap::new();
    let main = fields[0].0;
    if let Some(path) = &a.secret_file {
        out.insert(
            main,
            reader.read(main, &format!("file:{}", path.display()))?,
        );
    }
    if a.secret_stdin {
        if out.contains_key(main) {
            bail!("--secret-file and --secret-stdin both give {main}");
        }
        out.insert(main, reader.read(main, "stdin")?);
    }
    for spec in &a.secrets {
        let (field, source) = spec
            .split_once('=')
            .ok_or_else(|| anyhow!("--secret takes FIELD=SOURCE, e.g. token=file:/run/pat"))?;
        let known = fields
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(f, _)| *f)
            .ok_or_else(|| {
                let names: Vec<&str> = fields.iter().map(|(f, _)| *f).collect();
                anyhow!(
                    "{} has no secret field '{field}' (fields: {})",
                    t,
                    names.join(", ")
                )
            })?;
        out.insert(known, reader.read(known, source)?);
    }
    for (field, required) in fields {
        if out.contains_key(field) || !required {
            continue;
        }
        if std::io::stdin().is_terminal() {
            let v = rpassword::prompt_password(format!("{field}: "))
                .with_context(|| format!("reading {field} from the terminal"))?;
            out.insert(field, v);
        } else {
            bail!(
                "{field} is required: use --secret-file PATH, --secret-stdin or --secret {field}=file:PATH \
                 (secrets are never taken from the command line)"
            );
        }
    }
    Ok(out)
}

fn build_credential(kind: SystemKind, a: &CredentialArgs) -> Result<pb::Credential> {
    use pb::credential::Credential as C;
    let t = match &a.credential_type {
        Some(s) => parse_credential_type(s)?,
        None => kind.accepted_credentials()[0],
    };
    let mut s = gather_secrets(t, a)?;
    let mut take = |f: &str| s.remove(f).unwrap_or_default();
    let username = a.username.clone().unwrap_or_default();
    let client_id = a.client_id.clone().unwrap_or_default();
    let inner = match t {
        CredentialType::PersonalAccessToken => C::PersonalAccessToken(pb::PersonalAccessToken {
            token: take("token"),
            username,
            expires_at: a
                .expires_at
                .as_deref()
                .map(parse_time)
                .transpose()?
                .map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
        }),
        CredentialType::ApiKey => C::ApiKey(pb::ApiKey { key: take("key") }),
        CredentialType::Basic => C::Basic(pb::BasicCredential {
            username,
            password: take("password"),
        }),
        CredentialType::OAuthClientCredentials => {
            C::OauthClientCredentials(pb::OAuthClientCredentials {
                client_id,
                client_secret: take("client_secret"),
                scopes: a.scopes.clone(),
            })
        }
        CredentialType::OAuthRefreshToken => C::OauthRefreshToken(pb::OAuthRefreshToken {
            client_id,
            client_secret: take("client_secret"),
            refresh_token: take("refresh_token"),
            username,
        }),
        CredentialType::OAuthPasswordGrant => C::OauthPasswordGrant(pb::OAuthPasswordGrant {
            client_id,
            client_secret: take("client_secret"),
            username,
            password: take("password"),
        }),
        CredentialType::SalesforceLogin => C::SalesforceLogin(pb::SalesforceLogin {
            username,
            password: take("password"),
            security_token: take("security_token"),
            client_id,
            client_secret: take("client_secret"),
        }),
        CredentialType::OAuthAuthorizationCode => {
            C::OauthAuthorizationCode(pb::OAuthAuthorizationCode {
                client_id,
                client_secret: take("client_secret"),
                scopes: a.scopes.clone(),
            })
        }
    };
    Ok(pb::Credential {
        credential: Some(inner),
    })
}

/// Parses `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM:SSZ` or Unix seconds.
pub fn parse_time(s: &str) -> Result<i64> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let bad = || anyhow!("'{s}' is not YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or Unix seconds");
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t.trim_end_matches('Z'))),
        None => (s, None),
    };
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = match (d.next(), d.next(), d.next(), d.next()) {
        (Some(Ok(y)), Some(Ok(m)), Some(Ok(dd)), None) => (y, m, dd),
        _ => return Err(bad()),
    };
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return Err(bad());
    }
    let mut secs = crate::util::time::days_from_civil(y, m, day) * 86_400;
    if let Some(t) = time {
        let parts: Vec<i64> = t
            .split(':')
            .map(|p| p.parse::<i64>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        match parts.as_slice() {
            [h, mi, se] if *h < 24 && *mi < 60 && *se < 61 => secs += h * 3600 + mi * 60 + se,
            _ => return Err(bad()),
        }
    }
    Ok(secs)
}

/// RFC 3339 (UTC) rendering of a timestamp.
pub fn ts_string(t: &prost_types::Timestamp) -> String {
    let days = t.seconds.div_euclid(86_400);
    let rem = t.seconds.rem_euclid(86_400);
    let (y, m, d) = crate::util::time::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

fn kind_name(v: i32) -> String {
    kind_from_proto(v)
        .map(|k| k.slug().replace('_', "-"))
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn state_name(v: i32) -> &'static str {
    match pb::SystemState::try_from(v) {
        Ok(pb::SystemState::Active) => "active",
        Ok(pb::SystemState::AuthorizationPending) => "authorization_pending",
        Ok(pb::SystemState::ReauthorizationRequired) => "reauthorization_required",
        _ => "unknown",
    }
}

fn role_name(v: i32) -> &'static str {
    match pb::CallerRole::try_from(v) {
        Ok(pb::CallerRole::Admin) => "admin",
        Ok(pb::CallerRole::Worker) => "worker",
        _ => "unknown",
    }
}

fn failure_name(v: i32) -> String {
    pb::AuthFailure::try_from(v)
        .map(|f| {
            f.as_str_name()
                .trim_start_matches("AUTH_FAILURE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn cred_type_name(v: i32) -> String {
    pb::CredentialType::try_from(v)
        .map(|f| {
            f.as_str_name()
                .trim_start_matches("CREDENTIAL_TYPE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn check_json(c: &pb::AuthCheck) -> Value {
    json!({
        "ok": c.ok,
        "failure": if c.ok { Value::Null } else { Value::String(failure_name(c.failure)) },
        "message": c.message,
        "identity": c.identity.as_ref().map(|i| json!({"id": i.id, "display_name": i.display_name, "email": i.email})),
        "missing_permissions": c.missing_permissions,
        "checked_at": c.checked_at.as_ref().map(ts_string),
    })
}

fn system_json(s: &pb::System) -> Value {
    json!({
        "system_id": s.system_id,
        "display_name": s.display_name,
        "description": s.description,
        "kind": kind_name(s.kind),
        "base_url": s.base_url,
        "credential_type": cred_type_name(s.credential_type),
        "credential_version": s.credential_version,
        "state": state_name(s.state),
        "state_message": s.state_message,
        "delivery": delivery_name(s.delivery),
        "proxy_unauthorized_count": s.proxy_unauthorized_count,
        "created_at": s.created_at.as_ref().map(ts_string),
        "updated_at": s.updated_at.as_ref().map(ts_string),
        "credential_expires_at": s.credential_expires_at.as_ref().map(ts_string),
        "last_check": s.last_check.as_ref().map(check_json),
    })
}

fn caller_json(c: &pb::Caller) -> Value {
    json!({
        "name": c.name,
        "role": role_name(c.role),
        "revoked": c.revoked,
        "created_at": c.created_at.as_ref().map(ts_string),
        "system_patterns": c.system_patterns,
        "kinds": c.kinds.iter().map(|k| kind_name(*k)).collect::<Vec<_>>(),
        "expires_at": c.expires_at.as_ref().map(ts_string),
    })
}

fn print_check(c: &pb::AuthCheck) {
    if c.ok {
        println!("check: ok");
    } else {
        println!("check: FAILED ({})", failure_name(c.failure));
    }
    if let Some(i) = &c.identity {
        println!("identity: {} ({}) <{}>", i.display_name, i.id, i.email);
    }
    if !c.missing_permissions.is_empty() {
        println!("missing permissions: {}", c.missing_permissions.join(", "));
    }
    if !c.message.is_empty() {
        println!("message: {}", c.message);
    }
}

fn print_system(out: Output, s: &pb::System, check: Option<&pb::AuthCheck>, verb: &str) {
    if out == Output::Json {
        let mut v = system_json(s);
        if let (Some(c), Some(obj)) = (check, v.as_object_mut()) {
            obj.insert("check".to_owned(), check_json(c));
        }
        println!("{v}");
        return;
    }
    if !verb.is_empty() {
        println!("{verb} {}", s.system_id);
    }
    println!("id: {}", s.system_id);
    if !s.display_name.is_empty() {
        println!("name: {}", s.display_name);
    }
    println!("kind: {}", kind_name(s.kind));
    println!("base_url: {}", s.base_url);
    println!(
        "credential: {} (version {})",
        cred_type_name(s.credential_type),
        s.credential_version
    );
    println!("state: {}", state_name(s.state));
    println!("delivery: {}", delivery_name(s.delivery));
    if s.proxy_unauthorized_count > 0 {
        println!(
            "vendor 401s through the proxy: {} (last {})",
            s.proxy_unauthorized_count,
            s.last_proxy_unauthorized_at
                .as_ref()
                .map(ts_string)
                .unwrap_or_default()
        );
    }
    if !s.state_message.is_empty() {
        println!("state_message: {}", s.state_message);
    }
    if let Some(e) = &s.credential_expires_at {
        println!("credential_expires_at: {}", ts_string(e));
    }
    if let Some(c) = check {
        print_check(c);
    }
}

/// Streams `ExportBackup` into `path` (through `<path>.partial`, renamed when complete).
async fn backup<S>(
    client: &mut CredentialBrokerClient<S>,
    path: &std::path::Path,
) -> Result<(u64, u64)>
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::Error: Into<tonic::codegen::StdError>,
    S::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <S::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    use base64::Engine;
    use std::io::Write;
    if path.exists() {
        bail!("{} exists; choose a new file name", path.display());
    }
    let partial = path.with_extension("partial");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let file = opts
        .open(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let mut w = std::io::BufWriter::new(file);
    let result: Result<(u64, u64)> = async {
        writeln!(w, "{BACKUP_HEADER}")?;
        let mut stream = client
            .export_backup(pb::ExportBackupRequest {})
            .await?
            .into_inner();
        let (mut chunks, mut bytes) = (0u64, 0u64);
        while let Some(c) = stream.message().await? {
            chunks += 1;
            bytes += c.chunk.len() as u64;
            writeln!(
                w,
                "{}",
                base64::engine::general_purpose::STANDARD.encode(&c.chunk)
            )?;
        }
        let file = w
            .into_inner()
            .map_err(|e| anyhow!("write: {}", e.error()))?;
        file.sync_all()?;
        Ok((chunks, bytes))
    }
    .await;
    match result {
        Ok(v) => {
            std::fs::rename(&partial, path)?;
            Ok(v)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

/// Reads a backup file's chunks.
fn read_backup(path: &std::path::Path) -> Result<Vec<Vec<u8>>> {
    use base64::Engine;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines();
    if lines.next() != Some(BACKUP_HEADER) {
        bail!("{} is not a credbroker backup", path.display());
    }
    lines
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            base64::engine::general_purpose::STANDARD
                .decode(l.trim())
                .map_err(|_| anyhow!("{}: chunk {i} is not valid base64", path.display()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_parsing_round_trips() {
        let t = parse_time("2027-01-31").unwrap();
        assert_eq!(
            ts_string(&prost_types::Timestamp {
                seconds: t,
                nanos: 0
            }),
            "2027-01-31T00:00:00Z"
        );
        let t = parse_time("2026-11-23T15:04:05Z").unwrap();
        assert_eq!(
            ts_string(&prost_types::Timestamp {
                seconds: t,
                nanos: 0
            }),
            "2026-11-23T15:04:05Z"
        );
        assert_eq!(parse_time("0").unwrap(), 0);
        assert!(parse_time("2027-13-01").is_err());
        assert!(parse_time("soon").is_err());
    }
}
