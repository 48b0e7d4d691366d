//! The bootstrap admin token file, written so that a crash at any point leaves either no admin
//! caller (bootstrap runs again at the next start) or an admin caller whose token is in the file.
//!
//! Order: the token is written and synced to `<file>.pending` *before* the caller is committed,
//! then renamed into place (and the directory synced). A start that finds callers and a pending
//! file whose token belongs to an active admin finishes the rename; any other pending file is
//! stale and removed.

use std::io;
use std::path::{Path, PathBuf};

use crate::secret::SecretString;

fn pending(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".pending");
    PathBuf::from(name)
}

/// Writes `token` durably to the pending file (replacing a stale one).
pub fn stage(file: &Path, token: &SecretString) -> io::Result<()> {
    let p = pending(file);
    match std::fs::remove_file(&p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    crate::crypto::keys::write_secret_file(&p, token.expose_secret().as_bytes())?;
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

/// At a start with callers: finishes a bootstrap that committed its admin but stopped before
/// the file was in place (`is_admin` says whether a token belongs to an active admin). True
/// when it did.
pub fn resume(file: &Path, is_admin: impl Fn(&str) -> bool) -> io::Result<bool> {
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
