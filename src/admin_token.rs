//! The bootstrap admin token file, written so that a crash at any point leaves either no admin
//! caller (bootstrap runs again at the next start) or an admin caller whose token is in the file.
//!
//! Order: the token is written and synced to `<file>.pending` *before* the caller is committed,
//! then renamed into place (and the directory synced). A start that finds callers and a pending
//! file whose token belongs to an active admin finishes the rename; any other pending file is
//! stale and removed.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::secret::SecretString;

/// The bootstrap admin's token for one start, kept across its tries: a start tried again after
/// the store stopped answering stages the same token, so an admin that an earlier try's insert
/// committed late (seen only after that try gave up) still finds its token in the file. Clones
/// share it (each try gets a clone of the start's settings); it is emptied once the bootstrap
/// is settled, and a pending file is never read back for a token.
#[derive(Clone, Default)]
pub struct StartToken(Arc<Mutex<Option<SecretString>>>);

impl StartToken {
    /// This start's token, `fresh()` on its first try.
    pub fn get_or(&self, fresh: impl FnOnce() -> SecretString) -> SecretString {
        crate::util::sync::lock(&self.0)
            .get_or_insert_with(fresh)
            .clone()
    }

    /// The bootstrap is settled: the token, if a try took one, leaves here.
    pub fn settle(&self) -> Option<SecretString> {
        crate::util::sync::lock(&self.0).take()
    }
}

impl std::fmt::Debug for StartToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StartToken(..)")
    }
}

fn with_suffix(file: &Path, suffix: &str) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn pending(file: &Path) -> PathBuf {
    with_suffix(file, ".pending")
}

/// Where [`stage`] writes before its rename; a crash may leave it, and every start removes it.
fn staging(file: &Path) -> PathBuf {
    with_suffix(file, ".pending.tmp")
}

/// The names of the files kept beside `file_name` (the data directory's modes cover them).
pub fn companions(file_name: &str) -> [String; 2] {
    [
        format!("{file_name}.pending"),
        format!("{file_name}.pending.tmp"),
    ]
}

/// Writes `token` durably to the pending file, replacing a stale one in one rename: a pending
/// file that is there stays whole until the new one is.
pub fn stage(file: &Path, token: &SecretString) -> io::Result<()> {
    let tmp = staging(file);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    crate::crypto::keys::write_secret_file(&tmp, token.expose_secret().as_bytes())?;
    std::fs::rename(&tmp, pending(file))?;
    sync_dir(file)
}

/// Moves the pending file into place (replacing a file left from an earlier store).
pub fn publish(file: &Path) -> io::Result<()> {
    std::fs::rename(pending(file), file)?;
    sync_dir(file)
}

/// Drops the pending file, if any.
pub fn discard(file: &Path) {
    let _ = std::fs::remove_file(pending(file));
}

/// Removes what a stage cut short left (a copy of a token that may be the admin's).
fn clear_staging(file: &Path) {
    let _ = std::fs::remove_file(staging(file));
}

/// At a start with callers: finishes a bootstrap that committed its admin but stopped before
/// the file was in place (`is_admin` says whether a token belongs to an active admin). True
/// when it did.
pub fn resume(file: &Path, is_admin: impl Fn(&str) -> bool) -> io::Result<bool> {
    clear_staging(file);
    let p = pending(file);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => zeroize::Zeroizing::new(t),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let committed = is_admin(text.trim());
    if committed {
        publish(file)?;
    } else {
        discard(file);
    }
    Ok(committed)
}

fn sync_dir(file: &Path) -> io::Result<()> {
    match file.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(t: &str) -> SecretString {
        SecretString::new(t.to_owned())
    }

    #[test]
    fn every_try_of_a_start_stages_the_same_token_until_it_is_settled() {
        let start = StartToken::default();
        let again = start.clone();
        assert_eq!(start.get_or(|| token("first")).expose_secret(), "first");
        // A try after the store stopped answering (a clone of the settings) offers the same.
        assert_eq!(again.get_or(|| token("fresh")).expose_secret(), "first");
        // Another start does not.
        let other = StartToken::default();
        assert_eq!(other.get_or(|| token("other")).expose_secret(), "other");
        assert_eq!(again.settle().unwrap().expose_secret(), "first");
        assert_eq!(start.get_or(|| token("fresh")).expose_secret(), "fresh");
        assert_eq!(format!("{start:?}"), "StartToken(..)");
    }

    #[test]
    fn staging_replaces_a_pending_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin.token");
        stage(&file, &token("first")).unwrap();
        // A temporary file left by a crash is replaced, not refused.
        std::fs::write(staging(&file), "torn").unwrap();
        stage(&file, &token("second")).unwrap();
        assert_eq!(
            std::fs::read_to_string(pending(&file)).unwrap().trim(),
            "second"
        );
        assert!(!staging(&file).exists());
        publish(&file).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), "second");
        // A start with callers removes a leftover of a stage cut short, copy of a token or not.
        std::fs::write(staging(&file), "second").unwrap();
        assert!(!resume(&file, |_| true).unwrap());
        assert!(!staging(&file).exists());
    }
}
