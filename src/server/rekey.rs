//! Replacing the master key file (`credbroker rekey`), with the broker stopped.
//!
//! Everything under the master key is built again under the new one in a new data directory:
//! the store's format and key check records, every credential (sealed afresh), every system and
//! caller record's tag, and `key.check`. The old data directory is only read, so a run that
//! stops part-way (a crash, Ctrl-C, a full disk) leaves the broker exactly as it was: the new
//! directory is filled under `<to>.rekeying` and renamed to `<to>` only once it is complete and
//! flushed. The old broker must be stopped: the store's lock refuses a copy while it runs, and
//! a refresh it made after the copy (a rotated refresh token) would be lost.
//!
//! What does not come across, because it is bound to the old key or is history: the event log
//! and webhook cursors (the new log starts with a `Registered` event per system), the retired
//! versions of deleted systems, proxy leases and authorization links (made under keys derived
//! from the old key, they stop verifying), and the audit trail's token HMACs (new ones from here
//! on). Callers keep their tokens; the admin token file is copied.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::audit::{AuditConfig, AuditEvent};
use crate::backends::{BackendContext, HttpClient, Registry};
use crate::broker::{Broker, BrokerSettings};
use crate::config::Config;
use crate::crypto::keys::{verify_key_check_file, write_secret_file};
use crate::crypto::{Keyring, MasterKey};
use crate::store::{CredentialStore, SledStore};

use super::{broker_settings, restrict_data_dir, ServeError, ADMIN_TOKEN_FILE};

/// What `credbroker rekey` is asked to do.
#[derive(Debug, Clone)]
pub struct RekeyOptions {
    /// The new data directory: absent, or an empty directory.
    pub to_data_dir: PathBuf,
    /// The new master key file: read when it exists, else generated there. By default
    /// `<to_data_dir>/master.key`, where a broker started on the new directory finds it.
    pub new_master_key_file: Option<PathBuf>,
}

/// What a replacement did.
#[derive(Debug, Clone)]
pub struct Rekeyed {
    /// Systems copied.
    pub systems: u64,
    /// Callers copied.
    pub callers: u64,
    /// The new data directory.
    pub data_dir: PathBuf,
    /// The new master key file.
    pub key_file: PathBuf,
    /// The new key was generated (not read from an existing file).
    pub key_generated: bool,
    /// The old and the new key's ids (they reveal nothing of the keys).
    pub key_ids: (u32, u32),
}

/// Why a replacement did not happen; in every case the old data directory is as it was.
#[derive(Debug, thiserror::Error)]
pub enum RekeyError {
    /// The request cannot be carried out as asked (exit 64).
    #[error("{0}")]
    Usage(String),
    /// The stores or keys refuse it (exit 78): a wrong or missing key, a running broker, a
    /// target that is not empty.
    #[error(transparent)]
    Refused(#[from] ServeError),
    /// The copy failed (exit 1); what was written went to the staging directory only.
    #[error("{0}")]
    Failed(String),
}

impl From<crate::error::BrokerError> for RekeyError {
    fn from(e: crate::error::BrokerError) -> Self {
        Self::Failed(e.to_string())
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> RekeyError {
    RekeyError::Failed(format!("{what} {}: {e}", path.display()))
}

/// Replaces the master key of the store `config` names, into `options.to_data_dir`.
pub async fn rekey(config: &Config, options: &RekeyOptions) -> Result<Rekeyed, RekeyError> {
    if config.store.url.is_some() {
        return Err(RekeyError::Usage(
            "rekey copies the embedded store; a PostgreSQL store's key cannot be replaced this \
             way yet (see docs/operations.md)"
                .to_owned(),
        ));
    }
    let from = config.store.data_dir.clone();
    let target = Target::prepare(&options.to_data_dir, &from)?;
    let old = old_keyring(config, &from)?;
    std::fs::create_dir(&target.staging).map_err(|e| io("cannot create", &target.staging, e))?;
    let done = fill(config, options, &target, old).await;
    if done.is_err() {
        // Only what this run made goes; the old directory was only read.
        let _ = std::fs::remove_dir_all(&target.staging);
    }
    done
}

/// Fills the staging directory from the old store under the new key and renames it into place.
async fn fill(
    config: &Config,
    options: &RekeyOptions,
    target: &Target,
    old: Keyring,
) -> Result<Rekeyed, RekeyError> {
    let from = config.store.data_dir.clone();
    let (new, key_file, key_generated) = new_keyring(options, target, &old)?;
    let key_ids = (old.root_id(), new.root_id());
    if !verify_key_check_file(&target.staging, &new, false).map_err(ServeError::from)? {
        return Err(RekeyError::Failed(
            "the new key check file did not verify".to_owned(),
        ));
    }
    let (source, fresh) = (open(&from).await?, open(&target.staging).await?);
    let registry = idle_registry(config)?;
    let source = open_broker(config, source, old, registry.clone(), &from, true).await?;
    let copy = open_broker(config, fresh, new, registry, &target.staging, false).await?;
    let copied = source.copy_into(&copy).await;
    let flushed = copy.flush().await;
    let (copied, ()) = (copied?, flushed?);
    drop(copy);
    target.complete(&from)?;
    note_in_trail(&source, copied, &target.path).await;
    Ok(Rekeyed {
        systems: copied.systems,
        callers: copied.callers,
        data_dir: target.path.clone(),
        key_file,
        key_generated,
        key_ids,
    })
}

/// The new data directory and where it is filled.
struct Target {
    path: PathBuf,
    staging: PathBuf,
}

impl Target {
    /// Refuses a target that holds anything or lies inside the old directory, or a staging
    /// directory left by an earlier run.
    fn prepare(path: &Path, from: &Path) -> Result<Self, RekeyError> {
        let within = |dir: &Path| {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            let parent = std::fs::canonicalize(parent.unwrap_or(Path::new(".")));
            matches!((parent, std::fs::canonicalize(dir)), (Ok(p), Ok(d)) if p.starts_with(&d))
        };
        if within(from) {
            return Err(RekeyError::Usage(format!(
                "{} lies inside the data directory {}; give a directory beside it",
                path.display(),
                from.display()
            )));
        }
        match std::fs::read_dir(path).map(|mut entries| entries.next().is_some()) {
            Ok(true) => {
                return Err(RekeyError::Usage(format!(
                    "{} is not empty; rekey fills a new data directory",
                    path.display()
                )))
            }
            Ok(false) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot read", path, e)),
        }
        let mut staging = path.as_os_str().to_owned();
        staging.push(".rekeying");
        let staging = PathBuf::from(staging);
        if staging.exists() {
            return Err(RekeyError::Usage(format!(
                "{} exists: an earlier rekey stopped part-way; remove it and run again",
                staging.display()
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            staging,
        })
    }

    /// Copies the admin token file, restricts the modes, and renames the staging directory
    /// into place (durably: the parent directory is synced).
    fn complete(&self, from: &Path) -> Result<(), RekeyError> {
        let token = from.join(ADMIN_TOKEN_FILE);
        if token.is_file() {
            let text = zeroize::Zeroizing::new(
                std::fs::read(&token).map_err(|e| io("cannot read", &token, e))?,
            );
            let to = self.staging.join(ADMIN_TOKEN_FILE);
            write_secret_file(&to, &text).map_err(|e| io("cannot write", &to, e))?;
        }
        restrict_data_dir(&self.staging).map_err(|e| io("cannot restrict", &self.staging, e))?;
        sync_dir(&SledStore::path_in(&self.staging))?;
        sync_dir(&self.staging)?;
        std::fs::rename(&self.staging, &self.path)
            .map_err(|e| io("cannot rename", &self.path, e))?;
        let parent = self.path.parent().filter(|p| !p.as_os_str().is_empty());
        sync_dir(parent.unwrap_or(Path::new(".")))
    }
}

fn sync_dir(dir: &Path) -> Result<(), RekeyError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("cannot sync", dir, e))
}

/// The key the old store was made with, checked against its `key.check` before anything opens.
fn old_keyring(config: &Config, from: &Path) -> Result<Keyring, RekeyError> {
    if !SledStore::exists_in(from) {
        return Err(RekeyError::Usage(format!(
            "{} holds no store (set --data-dir to the broker's data directory)",
            from.display()
        )));
    }
    let file = config.store.master_key_file.as_deref();
    let (key, _) = MasterKey::load_or_generate(file, from, true).map_err(ServeError::from)?;
    let keyring = Keyring::new(key);
    if !verify_key_check_file(from, &keyring, true).map_err(ServeError::from)? {
        return Err(ServeError::Broker(crate::broker::OpenError::WrongKey).into());
    }
    Ok(keyring)
}

/// The new key (read, or generated into its file), which must not be the old one.
fn new_keyring(
    options: &RekeyOptions,
    target: &Target,
    old: &Keyring,
) -> Result<(Keyring, PathBuf, bool), RekeyError> {
    let file = match &options.new_master_key_file {
        Some(f) => f.clone(),
        None => target.path.join("master.key"),
    };
    // A file inside the target is made in the staging directory, which becomes the target.
    let read_at = match file.strip_prefix(&target.path) {
        Ok(inside) => target.staging.join(inside),
        Err(_) => file.clone(),
    };
    let generated = !read_at.exists();
    let key = if generated {
        let key = MasterKey::generate();
        write_secret_file(&read_at, key.to_base64().as_bytes())
            .map_err(|e| io("cannot write", &read_at, e))?;
        // Its name durable too: a target whose key file was lost would be unreadable.
        let parent = read_at.parent().filter(|p| !p.as_os_str().is_empty());
        sync_dir(parent.unwrap_or(Path::new(".")))?;
        key
    } else {
        MasterKey::load_or_generate(Some(&read_at), &target.staging, true)
            .map_err(ServeError::from)?
            .0
    };
    let keyring = Keyring::new(key);
    if keyring.root_id() == old.root_id() {
        return Err(RekeyError::Usage(format!(
            "{} holds the master key in use; give a new key file (or none, to generate one)",
            file.display()
        )));
    }
    Ok((keyring, file, generated))
}

/// The sled store in `dir`; refused while another process (a running broker) holds it.
async fn open(dir: &Path) -> Result<Arc<dyn CredentialStore>, RekeyError> {
    let dir = dir.to_path_buf();
    let store = tokio::task::spawn_blocking(move || SledStore::open_with_cache(&dir, 64))
        .await
        .map_err(|e| RekeyError::Failed(e.to_string()))?
        .map_err(ServeError::from)?;
    Ok(Arc::new(store))
}

/// Backends for opening the brokers; neither reaches a vendor (their exchanges are refused).
fn idle_registry(config: &Config) -> Result<Registry, RekeyError> {
    let egress = config.egress.policy();
    let http = HttpClient::new(
        config.egress.upstream_timeout,
        config.egress.max_upstream_body_bytes,
        &egress,
    )
    .map_err(|e| RekeyError::Failed(e.to_string()))?;
    Ok(Registry::new(&BackendContext {
        http,
        egress,
        oauth: config.vendors.clone(),
    }))
}

/// A broker on `store`: the old one (`initialized`, writing its own audit trail) or the new,
/// empty one (no trail, no admin of its own: its callers are the old ones).
async fn open_broker(
    config: &Config,
    store: Arc<dyn CredentialStore>,
    keyring: Keyring,
    registry: Registry,
    dir: &Path,
    initialized: bool,
) -> Result<Arc<Broker>, RekeyError> {
    let settings = BrokerSettings {
        admin_token_file: None,
        bootstrap_admin: false,
        ..broker_settings(config, config.egress.policy(), None, initialized, dir)
    };
    let settings = match initialized {
        true => settings,
        false => BrokerSettings {
            audit: AuditConfig {
                file: None,
                stdout: false,
                ..settings.audit
            },
            ..settings
        },
    };
    let (broker, _) = Broker::open(store, keyring, registry, settings)
        .await
        .map_err(ServeError::from)?;
    broker.refuse_new_exchanges();
    Ok(broker)
}

/// A line in the old broker's audit trail saying what was done (a failed write is logged: the
/// replacement is complete by then).
async fn note_in_trail(source: &Broker, copied: crate::broker::backup::CopySummary, to: &Path) {
    let detail = format!(
        "systems={} callers={} to={}",
        copied.systems,
        copied.callers,
        to.display()
    );
    let line = AuditEvent {
        detail: Some(&detail),
        ..AuditEvent::now("ReplaceMasterKey", "ok", "OK")
    };
    if let Err(e) = source.audit.record(&line).await {
        tracing::warn!(message = "Could not write the master key replacement to the audit trail.", error = %e);
    }
    let _ = source.flush().await;
}
