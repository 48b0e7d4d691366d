//! Replacing the master key file (`credbroker rekey`), with the broker stopped.
//!
//! Everything under the master key is built again under the new one in a new data directory:
//! the store's format and key check records, every credential (sealed afresh), every system and
//! caller record's tag, and `key.check`. The old store's records are only read (sled opens its
//! files as the broker does), so a run that stops part-way (a crash, Ctrl-C, a full disk) leaves
//! the broker as it was: the new directory is filled under `<to>.rekeying`, its every file and
//! directory synced, and renamed to `<to>` only then. The old broker must be stopped: the
//! store's lock refuses a copy while it runs, and afterwards a marker in the old directory
//! ([`SUPERSEDED_FILE`]) keeps it from starting again by mistake, since a refresh it made then
//! (a rotated refresh token) would be missing from the new directory.
//!
//! What does not come across, because it is bound to the old key or is history: the event log
//! and webhook cursors (the new log starts empty), the retired versions of deleted systems,
//! proxy leases and authorization links (made under keys derived from the old key, they stop
//! verifying), and the audit trail's token HMACs (new ones from here on). Callers keep their
//! tokens; the admin token file and the audit trail kept in the data directory are copied.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::audit::{AuditConfig, AuditEvent};
use crate::backends::{BackendContext, HttpClient, Registry};
use crate::broker::backup::CopySummary;
use crate::broker::{Broker, BrokerSettings};
use crate::config::Config;
use crate::crypto::keys::{verify_key_check_file, write_secret_file};
use crate::crypto::{Keyring, MasterKey};
use crate::store::{CredentialStore, SledStore};

use super::{audit_config, broker_settings, restrict_data_dir, ServeError, ADMIN_TOKEN_FILE};

/// Left in a data directory whose store was copied under a new key; a broker refuses to start
/// there while it exists (it names the new directory).
pub const SUPERSEDED_FILE: &str = "superseded-by";

/// What `credbroker rekey` is asked to do.
#[derive(Debug, Clone)]
pub struct RekeyOptions {
    /// The new data directory: absent, or an empty directory.
    pub to_data_dir: PathBuf,
    /// The new master key file: read when it exists (mode 0600), else generated there. By
    /// default `<to_data_dir>/master.key`, where a broker started on the new directory finds it.
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

/// Why a replacement did not happen; in every case the old store is as it was.
#[derive(Debug, thiserror::Error)]
pub enum RekeyError {
    /// The request cannot be carried out as asked (exit 64).
    #[error("{0}")]
    Usage(String),
    /// The old store or key refuses it (exit 78): a wrong or missing key, a running broker.
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
    let old = old_keyring(&from, config.store.master_key_file.as_deref())?;
    make_private_dir(&target.staging)?;
    let mut made_key = None;
    let done = fill(config, options, &target, old, &mut made_key).await;
    if done.is_err() {
        // Only what this run made goes; the old store was only read.
        let _ = std::fs::remove_dir_all(&target.staging);
        if let Some(key) = made_key {
            let _ = std::fs::remove_file(key);
        }
    }
    done
}

/// Fills the staging directory from the old store under the new key and renames it into place;
/// a key file it generates outside the target is named in `made_key`.
async fn fill(
    config: &Config,
    options: &RekeyOptions,
    target: &Target,
    old: Keyring,
    made_key: &mut Option<PathBuf>,
) -> Result<Rekeyed, RekeyError> {
    let from = config.store.data_dir.clone();
    // First the old store: its lock stands for the broker being stopped.
    let source = open(&from).await.map_err(RekeyError::Refused)?;
    let new = new_keyring(options, target, &old, made_key)?;
    let key_ids = (old.root_id(), new.keyring.root_id());
    let staged = |e: ServeError| RekeyError::Failed(e.to_string());
    verify_key_check_file(&target.staging, &new.keyring, false).map_err(|e| staged(e.into()))?;
    let fresh = open(&target.staging).await.map_err(staged)?;
    let registry = idle_registry(config)?;
    let source = open_broker(config, source, old, registry.clone(), &from, true).await?;
    let copy = open_broker(config, fresh, new.keyring, registry, &target.staging, false)
        .await
        .map_err(|e| RekeyError::Failed(e.to_string()))?;
    let copied = source.copy_into(&copy).await;
    let flushed = copy.flush().await;
    let (copied, ()) = (copied?, flushed?);
    let trail = Trail::of(config, &from);
    target.complete(&from, &trail)?;
    note_in_trails(&source, copied, &target.path, &trail).await;
    supersede(&from, &target.path);
    Ok(Rekeyed {
        systems: copied.systems,
        callers: copied.callers,
        data_dir: target.path.clone(),
        key_file: new.file,
        key_generated: new.generated,
        key_ids,
    })
}

/// The new data directory and where it is filled.
struct Target {
    path: PathBuf,
    staging: PathBuf,
}

impl Target {
    /// Refuses a target that is not an empty directory on the parent's file system (or
    /// absent), one inside the old directory, and a staging directory left by an earlier run.
    fn prepare(path: &Path, from: &Path) -> Result<Self, RekeyError> {
        // `new/` and `new` alike: the staging directory goes beside it, not inside.
        let path: PathBuf = path.components().collect();
        let parent = parent_of(&path);
        let inside = match (std::fs::canonicalize(parent), std::fs::canonicalize(from)) {
            (Ok(p), Ok(f)) => p.starts_with(f),
            _ => false,
        };
        let usage = |why: &str| Err(RekeyError::Usage(format!("{} {why}", path.display())));
        if inside {
            return usage(&format!(
                "lies inside the data directory {}; give a directory beside it",
                from.display()
            ));
        }
        if let Some(why) = unusable(&path, parent)? {
            return usage(why);
        }
        let mut staging = path.as_os_str().to_owned();
        staging.push(".rekeying");
        let staging = PathBuf::from(staging);
        if std::fs::symlink_metadata(&staging).is_ok() {
            return Err(RekeyError::Usage(format!(
                "{} exists: an earlier rekey stopped part-way; remove it and run again",
                staging.display()
            )));
        }
        Ok(Self { path, staging })
    }

    /// Copies the admin token file and the trail, restricts the modes, syncs every file and
    /// directory, and renames the staging directory into place.
    fn complete(&self, from: &Path, trail: &Trail) -> Result<(), RekeyError> {
        let token = from.join(ADMIN_TOKEN_FILE);
        if token.is_file() {
            let text = zeroize::Zeroizing::new(
                std::fs::read(&token).map_err(|e| io("cannot read", &token, e))?,
            );
            let to = self.staging.join(ADMIN_TOKEN_FILE);
            write_secret_file(&to, &text).map_err(|e| io("cannot write", &to, e))?;
        }
        trail.copy(from, &self.staging)?;
        restrict_data_dir(&self.staging).map_err(|e| io("cannot restrict", &self.staging, e))?;
        // sled's own flush does not sync every file it writes (nor their names).
        sync_tree(&self.staging)?;
        std::fs::rename(&self.staging, &self.path)
            .map_err(|e| io("cannot rename", &self.path, e))?;
        if let Err(e) = sync_dir(parent_of(&self.path)) {
            tracing::warn!(message = "Could not sync the new data directory's parent.", error = %e);
        }
        Ok(())
    }
}

/// Why `path` cannot become the new data directory, if it cannot: anything but an absent path
/// or an empty directory of `parent`'s file system (a mount point could not be renamed onto).
fn unusable(path: &Path, parent: &Path) -> Result<Option<&'static str>, RekeyError> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("cannot read", path, e)),
    };
    if !meta.is_dir() {
        return Ok(Some("is not a directory; rekey fills a new data directory"));
    }
    let mut entries = std::fs::read_dir(path).map_err(|e| io("cannot read", path, e))?;
    if entries.next().is_some() {
        return Ok(Some("is not empty; rekey fills a new data directory"));
    }
    let parent_dev = std::fs::metadata(parent).map_err(|e| io("cannot read", parent, e))?;
    if parent_dev.dev() != meta.dev() {
        return Ok(Some(
            "is a mount point; give a directory inside it (it is filled beside the target, then \
             renamed)",
        ));
    }
    Ok(None)
}

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The staging directory, 0700 from the start (sealed records and token hashes go in it).
fn make_private_dir(dir: &Path) -> Result<(), RekeyError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| io("cannot create", dir, e))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}

/// Syncs every file and directory under `dir`, and `dir` itself.
fn sync_tree(dir: &Path) -> Result<(), RekeyError> {
    let entries = std::fs::read_dir(dir).map_err(|e| io("cannot read", dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| io("cannot read", dir, e))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("cannot sync", &path, e))?;
        }
    }
    sync_dir(dir).map_err(|e| io("cannot sync", dir, e))
}

/// The key the old store was made with, checked against its `key.check` before anything opens.
fn old_keyring(from: &Path, key_file: Option<&Path>) -> Result<Keyring, RekeyError> {
    if let Some(to) = superseded(from) {
        return Err(RekeyError::Usage(format!(
            "{} was already copied under a new key into {to}",
            from.display()
        )));
    }
    if !SledStore::exists_in(from) {
        return Err(RekeyError::Usage(format!(
            "{} holds no store (set --data-dir to the broker's data directory)",
            from.display()
        )));
    }
    let (key, _) = MasterKey::load_or_generate(key_file, from, true).map_err(ServeError::from)?;
    let keyring = Keyring::new(key);
    if !verify_key_check_file(from, &keyring, true).map_err(ServeError::from)? {
        return Err(ServeError::Broker(crate::broker::OpenError::WrongKey).into());
    }
    Ok(keyring)
}

/// The new key and its file.
struct NewKey {
    keyring: Keyring,
    file: PathBuf,
    generated: bool,
}

/// The new key (read from its file, or generated into it), which must not be the old one; a
/// file generated outside the target is named in `made`.
fn new_keyring(
    options: &RekeyOptions,
    target: &Target,
    old: &Keyring,
    made: &mut Option<PathBuf>,
) -> Result<NewKey, RekeyError> {
    let file = match &options.new_master_key_file {
        Some(f) => f.components().collect(),
        None => target.path.join("master.key"),
    };
    // A file inside the target is made in the staging directory, which becomes the target.
    let (at, outside) = match file.strip_prefix(&target.path) {
        Ok(inside) => (target.staging.join(inside), false),
        Err(_) => (file.clone(), true),
    };
    let generated = std::fs::symlink_metadata(&at).is_err();
    let key = if generated {
        let key = MasterKey::generate();
        write_secret_file(&at, key.to_base64().as_bytes())
            .map_err(|e| io("cannot write", &at, e))?;
        if outside {
            *made = Some(at.clone());
        }
        // Its name durable too: a target whose key file was lost would be unreadable.
        sync_dir(parent_of(&at)).map_err(|e| io("cannot sync", parent_of(&at), e))?;
        key
    } else {
        read_new_key(&at)?
    };
    let keyring = Keyring::new(key);
    if keyring.root_id() == old.root_id() {
        return Err(RekeyError::Usage(format!(
            "{} holds the master key in use; give a new key file (or none, to generate one)",
            file.display()
        )));
    }
    Ok(NewKey {
        keyring,
        file,
        generated,
    })
}

/// An existing new key file: a regular file only its owner may read.
fn read_new_key(at: &Path) -> Result<MasterKey, RekeyError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(at).map_err(|e| io("cannot read", at, e))?;
    if !meta.is_file() || meta.mode() & 0o077 != 0 {
        return Err(RekeyError::Usage(format!(
            "{} must be a regular file of mode 0600 (it holds the new master key)",
            at.display()
        )));
    }
    let dir = parent_of(at);
    Ok(MasterKey::load_or_generate(Some(at), dir, true)
        .map_err(ServeError::from)?
        .0)
}

/// The sled store in `dir`; refused while another process (a running broker) holds it.
async fn open(dir: &Path) -> Result<Arc<dyn CredentialStore>, ServeError> {
    let dir = dir.to_path_buf();
    let store = tokio::task::spawn_blocking(move || SledStore::open_with_cache(&dir, 64))
        .await
        .map_err(|e| ServeError::Transport(e.to_string()))??;
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
    .map_err(RekeyError::Failed)?;
    Ok(Registry::new(&BackendContext {
        http,
        egress,
        oauth: config.vendors.clone(),
    }))
}

/// A broker on `store`: the old one (`initialized`, writing its own audit trail) or the new,
/// empty one (no trail of its own, no admin of its own: its callers are the old ones).
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

/// The old broker's audit trail, when it is kept in the data directory (and so must move with
/// it): its file name, and how many rotated files (`.1` … `.N`) may sit beside it.
struct Trail {
    in_data_dir: Option<(std::ffi::OsString, usize)>,
}

impl Trail {
    fn of(config: &Config, from: &Path) -> Self {
        let audit = audit_config(config, from);
        let name = audit
            .file
            .filter(|f| f.parent() == Some(from))
            .and_then(|f| f.file_name().map(|n| n.to_owned()));
        Self {
            in_data_dir: name.map(|n| (n, audit.keep)),
        }
    }

    /// Copies the trail and its rotated files from `from` into `dir` (mode 0600; lines and
    /// HMACs, no secret).
    fn copy(&self, from: &Path, dir: &Path) -> Result<(), RekeyError> {
        use std::os::unix::fs::PermissionsExt;
        let Some((name, keep)) = &self.in_data_dir else {
            return Ok(());
        };
        for suffix in std::iter::once(String::new()).chain((1..=*keep).map(|i| format!(".{i}"))) {
            let mut file = name.clone();
            file.push(&suffix);
            let (src, dst) = (from.join(&file), dir.join(&file));
            if !src.is_file() {
                continue;
            }
            std::fs::copy(&src, &dst).map_err(|e| io("cannot copy", &src, e))?;
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| io("cannot restrict", &dst, e))?;
        }
        Ok(())
    }

    /// Appends `line` to the copied trail in `dir`, durably.
    fn append(&self, dir: &Path, line: &AuditEvent<'_>) -> std::io::Result<()> {
        use std::io::Write;
        let Some((name, _)) = &self.in_data_dir else {
            return Ok(());
        };
        let mut text = serde_json::to_vec(line)?;
        text.push(b'\n');
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(dir.join(name))?;
        file.write_all(&text)?;
        file.sync_all()
    }
}

/// A line in the old and (when it moved) the new trail saying what was done (a failed write is
/// logged: the replacement is complete by then).
async fn note_in_trails(source: &Broker, copied: CopySummary, to: &Path, trail: &Trail) {
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
    let written = source.audit.record(&line).await;
    let _ = source.flush().await;
    let copied = trail.append(to, &line);
    if let Err(e) = written
        .map_err(|e| e.to_string())
        .and(copied.map_err(|e| e.to_string()))
    {
        tracing::warn!(message = "Could not write the master key replacement to the audit trail.", error = %e);
    }
}

/// Where the old directory was copied to, when it was.
pub fn superseded(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(SUPERSEDED_FILE)).ok()?;
    Some(text.trim().to_owned())
}

/// Marks the old directory as copied into `to` (a failure is logged: the copy is complete).
fn supersede(from: &Path, to: &Path) {
    let to = std::fs::canonicalize(to).unwrap_or_else(|_| to.to_path_buf());
    let marker = from.join(SUPERSEDED_FILE);
    let written =
        std::fs::write(&marker, format!("{}\n", to.display())).and_then(|()| sync_dir(from));
    if let Err(e) = written {
        tracing::warn!(message = "Could not mark the old data directory as superseded; do not start a broker on it.", path = %marker.display(), error = %e);
    }
}
