//! Replacing the master key file (`credbroker rekey`), with the broker stopped.
//!
//! Everything under the master key is built again under the new one in a new data directory:
//! the store's format and key check records, every credential (sealed afresh), every system and
//! caller record's tag, and `key.check`. The old store's records are only read (sled opens its
//! files as the broker does), so a run that stops part-way (a crash, Ctrl-C, a full disk) leaves
//! the broker as it was: the new directory is filled under `<to>.rekeying`, its every file and
//! directory synced, the old directory marked ([`SUPERSEDED_FILE`]), and the new one renamed to
//! `<to>` only then. The old broker must be stopped: the data directory's lock, which a broker
//! holds for its whole life, refuses a copy while it runs, and the marker keeps it from
//! starting (or reopening its store) again by mistake, since a refresh it made then (a rotated
//! refresh token) would be missing from the new directory.
//!
//! What does not come across, because it is bound to the old key or is history: the event log
//! and webhook cursors (the new log starts empty), the retired versions of deleted systems,
//! proxy leases and authorization links (made under keys derived from the old key, they stop
//! verifying), and the audit trail's token HMACs (new ones from here on). Callers keep their
//! tokens; the admin token file and an audit trail kept in the data directory are copied. When
//! run as root, the new directory's files are given to the old directory's owner, and a key
//! file generated outside it to the old key file's owner.

mod files;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::audit::{AuditConfig, AuditEvent};
use crate::backends::Registry;
use crate::broker::{Broker, BrokerSettings};
use crate::config::Config;
use crate::crypto::keys::verify_key_check_file;
use crate::crypto::{Keyring, MasterKey};
use crate::store::{CredentialStore, SledStore};

use self::files::{absolute, Owner, Target, Trail};
use super::{broker_settings, sled_keyring, ServeError};

pub use self::files::superseded;

pub use crate::store::sled::SUPERSEDED_FILE;

/// Where a rekey into `to` fills the new directory before renaming it to `to`.
fn staging_of(to: &Path) -> PathBuf {
    let mut staging = to.as_os_str().to_owned();
    staging.push(".rekeying");
    PathBuf::from(staging)
}

/// What to do about a directory marked as copied into `to`: a rekey that stopped part-way
/// leaves `<to>.rekeying` (and the marker may go); a finished one does not, and then the
/// directory is not to be used again unless on purpose.
pub fn superseded_advice(dir: &Path, to: &str) -> String {
    if staging_of(Path::new(to)).exists() {
        return format!(
            "was being copied under a new master key into {to} when the copy stopped part-way: \
             remove {to}.rekeying and {}/{SUPERSEDED_FILE}, then start the broker or run the \
             rekey again",
            dir.display()
        );
    }
    format!(
        "was copied under a new master key into {to} (credbroker rekey): start the broker on \
         that directory (wherever it was moved). Remove {}/{SUPERSEDED_FILE} only to go back to \
         the old key on purpose, and then stop using the new directory: each would refresh \
         tokens the other lacks",
        dir.display()
    )
}

/// What `credbroker rekey` is asked to do.
#[derive(Debug, Clone)]
pub struct RekeyOptions {
    /// The new data directory: absent, or an empty directory.
    pub to_data_dir: PathBuf,
    /// The new master key file: read when it exists (a regular file or a link to one, no one
    /// but its owner may write it and no one but its owner and group read it, owned by root,
    /// this user, the old directory's owner or the old key file's), else generated there. By
    /// default `<to_data_dir>/master.key`, where a broker started on the new directory finds
    /// it.
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
    /// Entries of the old directory that were not copied (a config file, TLS material).
    pub left_behind: Vec<String>,
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

/// Replaces the master key of the store `config` names, into `options.to_data_dir`.
pub async fn rekey(config: &Config, options: &RekeyOptions) -> Result<Rekeyed, RekeyError> {
    if config.store.url.is_some() {
        return Err(RekeyError::Usage(
            "rekey copies the embedded store; a PostgreSQL store's key cannot be replaced this \
             way yet (see docs/operations.md)"
                .to_owned(),
        ));
    }
    let from = absolute(&config.store.data_dir)?;
    let target = Target::prepare(&options.to_data_dir, &from)?;
    let old = old_keyring(&from, config.store.master_key_file.as_deref())?;
    files::make_private_dir(&target.staging)?;
    let mut made_key = None;
    let done = fill(config, options, (&from, &target), old, &mut made_key).await;
    if done.is_err() {
        // Only what this run made goes; the old store was only read.
        if let Err(e) = std::fs::remove_dir_all(&target.staging) {
            tracing::warn!(message = "Could not remove the staging directory; remove it before running again.", path = %target.staging.display(), error = %e);
        }
        if let Some(key) = made_key {
            if let Err(e) = std::fs::remove_file(&key) {
                tracing::warn!(message = "Could not remove the new key file this run made; remove it by hand.", path = %key.display(), error = %e);
            }
        }
    }
    done
}

/// Fills the staging directory from the old store under the new key and renames it into place;
/// a key file it generates outside the target is named in `made_key`.
async fn fill(
    config: &Config,
    options: &RekeyOptions,
    (from, target): (&Path, &Target),
    old: Keyring,
    made_key: &mut Option<PathBuf>,
) -> Result<Rekeyed, RekeyError> {
    let from = from.to_path_buf();
    let owner = Owner::of(&from)?;
    // First the old directory's lock, which a broker holds for its whole life, then its
    // store: no broker can be running, nor start, while this copies.
    let _held = crate::store::sled::DirLock::take(&from).map_err(ServeError::from)?;
    let cache = config.store.cache_mib;
    let source = open(&from, cache).await.map_err(RekeyError::Refused)?;
    let old_file = config.store.master_key_file.clone();
    let old_file = old_file.unwrap_or_else(|| from.join("master.key"));
    let new = new_keyring(options, target, (&old, &from, &old_file, owner), made_key)?;
    let key_ids = (old.root_id(), new.keyring.root_id());
    let trail = Trail::of(config, &from);
    // What will be copied is checked before the store is: a refusal costs no copy.
    files::check_copyable(&from, &trail, owner)?;
    files::clear_partial_marker(&from)?;
    let trail_owners = trail.owners(&from);
    let staged = |e: ServeError| RekeyError::Failed(e.to_string());
    verify_key_check_file(&target.staging, &new.keyring, false).map_err(|e| staged(e.into()))?;
    let fresh = open(&target.staging, cache).await.map_err(staged)?;
    // Neither broker reaches a vendor: their exchanges are refused.
    let (.., registry) = super::backends(config).map_err(RekeyError::Failed)?;
    let source = open_broker(config, source, old, registry.clone(), &from, true).await?;
    let copy = open_broker(config, fresh, new.keyring, registry, &target.staging, false)
        .await
        .map_err(|e| RekeyError::Failed(e.to_string()))?;
    let copied = source.copy_into(&copy).await;
    let flushed = copy.flush().await;
    drop(copy);
    let (copied, ()) = (copied?, flushed?);
    let detail = format!(
        "systems={} callers={} to={}",
        copied.systems,
        copied.callers,
        target.path.display()
    );
    let line = AuditEvent {
        detail: Some(&detail),
        ..AuditEvent::now("ReplaceMasterKey", "ok", "OK")
    };
    target.complete(&from, (&trail, &line), owner)?;
    files::stop_point("renamed");
    note_in_old_trail(&source, &line).await;
    // Lines written as root (or a rotation) must leave the trail the broker's to write.
    trail.give_back(&from, owner, &trail_owners);
    Ok(Rekeyed {
        systems: copied.systems,
        callers: copied.callers,
        data_dir: target.path.clone(),
        key_file: new.file,
        key_generated: new.generated,
        key_ids,
        left_behind: files::left_behind(&from, &trail),
    })
}

/// The key the old store was made with, checked against its `key.check` before anything opens.
fn old_keyring(from: &Path, key_file: Option<&Path>) -> Result<Keyring, RekeyError> {
    if let Some(to) = superseded(from) {
        let advice = superseded_advice(from, &to);
        return Err(RekeyError::Usage(format!("{} {advice}", from.display())));
    }
    if !SledStore::exists_in(from) {
        return Err(RekeyError::Usage(format!(
            "{} holds no store (set --data-dir to the broker's data directory)",
            from.display()
        )));
    }
    Ok(sled_keyring(key_file, from, true)?.0)
}

/// The new key and its file.
struct NewKey {
    keyring: Keyring,
    file: PathBuf,
    generated: bool,
}

/// The new key (read from its file, or generated into it), which must not be the old one nor
/// kept in the old directory; a file generated outside the target is named in `made`.
fn new_keyring(
    options: &RekeyOptions,
    target: &Target,
    (old, from, old_file, owner): (&Keyring, &Path, &Path, Owner),
    made: &mut Option<PathBuf>,
) -> Result<NewKey, RekeyError> {
    // By its real name: the one printed and written in the trail must outlive the old
    // directory (a name through `old/..` would not).
    let file = match &options.new_master_key_file {
        Some(f) => files::canonical_name(&absolute(f)?),
        None => target.path.join("master.key"),
    };
    let usage = |why: &str| RekeyError::Usage(format!("{} {why}", file.display()));
    if files::within(&file, from) {
        return Err(usage(
            "lies in the old data directory, which goes once the new one serves",
        ));
    }
    // A file inside the target is made in the staging directory, which becomes the target.
    let (at, outside) = match file.strip_prefix(&target.path) {
        Ok(inside) => (target.staging.join(inside), false),
        Err(_) => (file.clone(), true),
    };
    let generated = std::fs::symlink_metadata(&at).is_err();
    let key = if generated {
        let key = MasterKey::generate();
        // Outside the target, kept as the old key file is (a root-owned key the broker's
        // group reads).
        let like = (outside && owner.root()).then_some(old_file);
        files::write_key(&at, &key, like)?;
        if outside {
            *made = Some(at.clone());
        }
        key
    } else {
        // A link (a mounted secret) is read at its real name, which must not be in the old
        // directory either.
        let real =
            std::fs::canonicalize(&at).map_err(|e| usage(&format!("cannot be read: {e}")))?;
        if files::within(&real, from) {
            return Err(usage(
                "leads into the old data directory, which goes once the new one serves",
            ));
        }
        files::read_new_key(&real, owner, old_file).map_err(|why| usage(&why))?
    };
    let keyring = Keyring::new(key);
    if keyring.root_id() == old.root_id() {
        return Err(usage(
            "holds the master key in use; give a new key file (or none)",
        ));
    }
    Ok(NewKey {
        keyring,
        file,
        generated,
    })
}

/// The sled store in `dir`; refused while another process (a running broker) holds it.
async fn open(dir: &Path, cache_mib: u64) -> Result<Arc<dyn CredentialStore>, ServeError> {
    let dir = dir.to_path_buf();
    let store = tokio::task::spawn_blocking(move || SledStore::open_with_cache(&dir, cache_mib))
        .await
        .map_err(|e| ServeError::Transport(e.to_string()))??;
    Ok(Arc::new(store))
}

/// A broker on `store`: the old one (`initialized`, writing its own audit trail, adopting
/// nothing) or the new, empty one (no trail of its own, no admin of its own: its callers are
/// the old ones).
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
        adopt_unauthenticated_records: false,
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

/// The replacement's line in the old trail (the copied one ends with it already); a failed
/// write is logged: the replacement is complete by then.
async fn note_in_old_trail(source: &Broker, line: &AuditEvent<'_>) {
    let written = source.audit.record(line).await;
    let _ = source.flush().await;
    if let Err(e) = written {
        tracing::warn!(message = "Could not write the master key replacement to the old audit trail.", error = %e);
    }
}
