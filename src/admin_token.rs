//! The bootstrap admin token file, written so that a crash at any point leaves either no admin
//! caller (bootstrap runs again at the next start) or an admin caller whose token is in the file.
//!
//! Order: the token is written and synced to `<file>.pending` *before* the caller is committed,
//! then renamed into place (and the directory synced). A start that finds callers and a pending
//! file whose token belongs to an active admin finishes the rename; any other pending file is
//! stale and removed.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};

use crate::secret::SecretString;

/// Tokens this process staged and has not published or discarded, by file. A start tried again
/// after the store stopped answering stages the same token: an admin that an earlier try's
/// insert committed late (seen only after the try gave up) still finds its token in the file.
static STAGED: LazyLock<Mutex<HashMap<PathBuf, SecretString>>> = LazyLock::new(Default::default);

/// The token to stage for `file`: the one this process staged there before and has not
/// published or discarded, else `fresh()`. A pending file this process did not write is never
/// trusted for a token.
pub fn token_to_stage(file: &Path, fresh: impl FnOnce() -> SecretString) -> SecretString {
    let staged = crate::util::sync::lock(&STAGED);
    staged.get(file).cloned().unwrap_or_else(fresh)
}

fn forget(file: &Path) {
    crate::util::sync::lock(&STAGED).remove(file);
}

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
    crate::util::sync::lock(&STAGED).insert(file.to_path_buf(), token.clone());
    sync_dir(file)
}

/// Moves the pending file into place (replacing a file left from an earlier store).
pub fn publish(file: &Path) -> io::Result<()> {
    std::fs::rename(pending(file), file)?;
    forget(file);
    sync_dir(file)
}

/// Drops the pending file, if any.
pub fn discard(file: &Path) {
    forget(file);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn token(t: &str) -> SecretString {
        SecretString::new(t.to_owned())
    }

    fn to_stage(file: &Path, fresh: &str) -> String {
        token_to_stage(file, || token(fresh))
            .expose_secret()
            .to_owned()
    }

    #[test]
    fn a_staged_token_is_staged_again_until_published_or_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let (file, other) = (dir.path().join("admin.token"), dir.path().join("b.token"));
        assert_eq!(to_stage(&file, "fresh"), "fresh");
        stage(&file, &token("first")).unwrap();
        // A try after the store stopped answering offers the same token; another file does not.
        assert_eq!(to_stage(&file, "fresh"), "first");
        assert_eq!(to_stage(&other, "fresh"), "fresh");
        publish(&file).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), "first");
        assert_eq!(to_stage(&file, "fresh"), "fresh");
        stage(&file, &token("second")).unwrap();
        discard(&file);
        assert_eq!(to_stage(&file, "fresh"), "fresh");
        // A pending file this process did not write is never taken for a token.
        std::fs::write(pending(&file), "planted").unwrap();
        assert_eq!(to_stage(&file, "fresh"), "fresh");
    }
}
