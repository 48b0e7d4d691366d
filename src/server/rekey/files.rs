//! The files of a master key replacement: the target and its staging directory, the copied
//! admin token and audit trail, the marker left in the old directory, and the new key file.
//! Every file taken from a directory is opened as a regular file, not through a symlink, without
//! blocking, and checked (fstat) to be a regular file; a copied one with other hard links must be
//! the old directory owner's (a root run must not copy `/etc/shadow` for an `audit.log.3` link).

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use super::{RekeyError, SUPERSEDED_FILE};
use crate::audit::AuditEvent;
use crate::config::Config;
use crate::crypto::keys::KEY_CHECK_FILE;
use crate::crypto::MasterKey;
use crate::server::{audit_config, restrict_data_dir, ADMIN_TOKEN_FILE};
use crate::store::SledStore;

/// The most of the marker a broker reads (for its message).
const MARKER_READ: u64 = 4096;

pub(super) fn io(what: &str, path: &Path, e: std::io::Error) -> RekeyError {
    RekeyError::Failed(format!("{what} {}: {e}", path.display()))
}

/// `path` made absolute and normalized (`new/` and `./new` alike), symlinks left as they are.
pub(super) fn absolute(path: &Path) -> Result<PathBuf, RekeyError> {
    let abs = std::path::absolute(path).map_err(|e| io("cannot resolve", path, e))?;
    Ok(abs.components().collect())
}

/// Whether `path` lies in `dir`, by its name or by where its parent really is (through links
/// and `..`).
pub(super) fn within(path: &Path, dir: &Path) -> bool {
    match (real(parent_of(path)), std::fs::canonicalize(dir)) {
        (Some(p), Ok(d)) => p.starts_with(d),
        _ => path.starts_with(dir),
    }
}

/// Where `path` really is: its nearest existing ancestor resolved (links, `..`), the rest as
/// written (a target not made yet).
fn real(path: &Path) -> Option<PathBuf> {
    let mut rest = Vec::new();
    let mut at = path;
    loop {
        if let Ok(found) = std::fs::canonicalize(at) {
            return Some(rest.iter().rev().fold(found, |p: PathBuf, n| p.join(n)));
        }
        rest.push(at.file_name()?.to_owned());
        at = at.parent()?;
    }
}

/// `path` with its parent's real name (the name the marker gives, the same however the target
/// was named).
pub(super) fn canonical_name(path: &Path) -> PathBuf {
    // Through the nearest existing ancestor: a key file named inside a target not made yet
    // resolves as the target does.
    match (real(parent_of(path)), path.file_name()) {
        (Some(p), Some(name)) => p.join(name),
        _ => path.to_path_buf(),
    }
}

pub(super) fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

pub(super) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}

/// A directory made 0700 from the start (sealed records and token hashes go in it).
pub(super) fn make_private_dir(dir: &Path) -> Result<(), RekeyError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| io("cannot create", dir, e))
}

/// Syncs every file and directory under `dir`, and `dir` itself.
fn sync_tree(dir: &Path) -> Result<(), RekeyError> {
    let entries = std::fs::read_dir(dir).map_err(|e| io("cannot read", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io("cannot read", dir, e))?;
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("cannot sync", &path, e))?;
        }
    }
    sync_dir(dir).map_err(|e| io("cannot sync", dir, e))
}

/// `path` opened for reading when it is a regular file, not through a link, and without
/// blocking on a FIFO; `None` when it is absent. A device or FIFO seen first is not opened at
/// all; one swapped in after that look is opened without blocking and refused. With `follow`,
/// a link to a regular file is followed (a key file mounted from a secret store).
fn open_regular(path: &Path, follow: bool) -> std::io::Result<Option<std::fs::File>> {
    use rustix::fs::{Mode, OFlags};
    let seen = match follow {
        true => std::fs::metadata(path),
        false => std::fs::symlink_metadata(path),
    };
    match seen {
        Ok(m) if !m.is_file() => return Err(not_regular()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        _ => {}
    }
    let mut flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    if !follow {
        flags |= OFlags::NOFOLLOW;
    }
    let file = match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(fd) => std::fs::File::from(fd),
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(rustix::io::Errno::LOOP) => return Err(not_regular()),
        Err(e) => return Err(e.into()),
    };
    if !file.metadata()?.is_file() {
        return Err(not_regular());
    }
    Ok(Some(file))
}

fn not_regular() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")
}

/// `src` opened for copying, if it is there: a regular file, and, if it has other hard links
/// (a snapshot made with `cp -al` gives every file two), one the old directory's owner owns,
/// not another file of the system's linked in.
fn open_copyable(src: &Path, owner: Owner) -> Result<Option<std::fs::File>, RekeyError> {
    let refused = |why: String| RekeyError::Usage(format!("{} {why}", src.display()));
    let file = match open_regular(src, false) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            return Err(refused(format!(
                "is {e} (a link?): the broker's own files are"
            )))
        }
        Err(e) => return Err(io("cannot copy", src, e)),
    };
    let Some(file) = file else {
        return Ok(None);
    };
    let meta = file.metadata().map_err(|e| io("cannot copy", src, e))?;
    if meta.nlink() > 1 && meta.uid() != owner.uid {
        return Err(refused(format!(
            "has other hard links and is owned by uid {}, not the data directory's owner: \
             find out what it is linked to before anything else",
            meta.uid()
        )));
    }
    Ok(Some(file))
}

/// Checks, before anything is copied, the files [`Target::complete`] will copy.
pub(super) fn check_copyable(from: &Path, trail: &Trail, owner: Owner) -> Result<(), RekeyError> {
    let names = std::iter::once(ADMIN_TOKEN_FILE.into()).chain(trail.names());
    for name in names {
        open_copyable(&from.join(name), owner)?;
    }
    Ok(())
}

/// Copies the file `src`, if there is one ([`open_copyable`]), to the new file `dst` (mode
/// 0600).
fn copy_regular(src: &Path, dst: &Path, owner: Owner) -> Result<(), RekeyError> {
    let Some(mut from) = open_copyable(src, owner)? else {
        return Ok(());
    };
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(|e| io("cannot create", dst, e))?;
    std::io::copy(&mut from, &mut to).map_err(|e| io("cannot copy", src, e))?;
    Ok(())
}

/// Test builds only (feature `fault-injection`, never in a release):
/// `CREDBROKER_TEST_REKEY_STOP_AT=<step>` ends the process where rekey reaches `step`, with no
/// clean-up run (as a kill there would), so a test can see what each step leaves.
#[cfg(feature = "fault-injection")]
pub(super) fn stop_point(step: &str) {
    if std::env::var("CREDBROKER_TEST_REKEY_STOP_AT").is_ok_and(|at| at == step) {
        std::process::exit(137);
    }
}

#[cfg(not(feature = "fault-injection"))]
pub(super) fn stop_point(_: &str) {}

/// Where [`mark`] writes the marker's text before linking it in.
const PARTIAL_MARKER: &str = "superseded-by.partial";

/// Where the directory was copied to, when it was: anything at its marker counts (a marker the
/// broker cannot read still stops it), and what is read of it is cut and stripped of control
/// characters for the message.
pub fn superseded(dir: &Path) -> Option<String> {
    let marker = dir.join(SUPERSEDED_FILE);
    let read = || -> std::io::Result<String> {
        let mut text = Vec::new();
        if let Some(f) = open_regular(&marker, false)? {
            f.take(MARKER_READ).read_to_end(&mut text)?;
        }
        Ok(String::from_utf8_lossy(&text).to_string())
    };
    // A directory the broker cannot search fails its start on its own, with its own words.
    if !crate::store::sled::is_superseded(dir) {
        return None;
    }
    Some(match read() {
        Ok(text) => text.chars().filter(|c| !c.is_control()).collect(),
        Err(e) => format!("(unreadable marker: {e})"),
    })
}

/// Marks `from` as copied into `to`, durably and whole: the text is written and synced under
/// another name first, then linked in (a link never replaces, so an entry already there, planted,
/// fails it). A run stopped part-way leaves no marker or a whole one, never an empty one.
fn mark(from: &Path, to: &Path) -> Result<(), RekeyError> {
    // A partial marker a stopped run left was cleared before the copy (under the lock).
    let (marker, partial) = (from.join(SUPERSEDED_FILE), from.join(PARTIAL_MARKER));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&partial)
        .map_err(|e| io("cannot create", &partial, e))?;
    let written = file
        .write_all(format!("{}\n", to.display()).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| io("cannot write", &partial, e))
        .and_then(|()| {
            stop_point("partial");
            link_new(&partial, &marker).map_err(|e| io("cannot create", &marker, e))
        });
    stop_point("linked");
    let _ = std::fs::remove_file(&partial);
    written?;
    sync_dir(from).map_err(|e| unmark(from, io("cannot sync", from, e)))?;
    stop_point("marked");
    Ok(())
}

/// Removes a partial marker a stopped run left (only rekey writes that name); anything there
/// that cannot be removed (a directory) fails the run before it copies.
pub(super) fn clear_partial_marker(from: &Path) -> Result<(), RekeyError> {
    let partial = from.join(PARTIAL_MARKER);
    match std::fs::remove_file(&partial) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("cannot remove", &partial, e)),
        _ => Ok(()),
    }
}

/// Gives `from`'s file the name `to` too, never replacing what is there: a hard link, or where
/// the file system has none (on Linux), a rename that does not replace.
fn link_new(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(from, to) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => rename_new(from, to, e),
        done => done,
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn rename_new(from: &Path, to: &Path, link_failed: std::io::Error) -> std::io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE).map_err(|e| {
        let why = format!("{link_failed}; and a rename that does not replace: {e}");
        std::io::Error::new(link_failed.kind(), why)
    })
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn rename_new(_: &Path, _: &Path, link_failed: std::io::Error) -> std::io::Result<()> {
    Err(link_failed)
}

/// Takes `from`'s marker away again, durably, after `why` failed the run.
fn unmark(from: &Path, why: RekeyError) -> RekeyError {
    let marker = from.join(SUPERSEDED_FILE);
    match std::fs::remove_file(&marker).and_then(|()| sync_dir(from)) {
        Ok(()) => why,
        Err(left) => RekeyError::Failed(format!(
            "{why}; and cannot remove {} ({left}): remove it by hand",
            marker.display()
        )),
    }
}

/// The owner of the old directory: a root run gives it the new files.
#[derive(Debug, Clone, Copy)]
pub(super) struct Owner {
    uid: u32,
    gid: u32,
    /// This process's effective user.
    euid: u32,
}

impl Owner {
    pub(super) fn of(dir: &Path) -> Result<Self, RekeyError> {
        let meta = std::fs::metadata(dir).map_err(|e| io("cannot read", dir, e))?;
        Ok(Self {
            uid: meta.uid(),
            gid: meta.gid(),
            euid: rustix::process::geteuid().as_raw(),
        })
    }

    /// Whether this run is root's (and so gives files away).
    pub(super) fn root(&self) -> bool {
        self.euid == 0
    }

    /// Whether `uid` may own the new key file: root, this user or the old directory's owner.
    fn may_own(&self, uid: u32) -> bool {
        uid == 0 || uid == self.uid || uid == self.euid
    }

    /// Gives `path` to the owner (only a root run changes anything).
    pub(super) fn give(&self, path: &Path) -> Result<(), RekeyError> {
        if !self.root() {
            return Ok(());
        }
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
            .map_err(|e| io("cannot give", path, e))
    }

    fn give_tree(&self, dir: &Path) -> Result<(), RekeyError> {
        self.give(dir)?;
        for entry in std::fs::read_dir(dir).map_err(|e| io("cannot read", dir, e))? {
            let entry = entry.map_err(|e| io("cannot read", dir, e))?;
            match entry.file_type().is_ok_and(|t| t.is_dir()) {
                true => self.give_tree(&entry.path())?,
                false => self.give(&entry.path())?,
            }
        }
        Ok(())
    }
}

/// Writes `key` to the new file `at` (mode 0600), durably, name and all. With `like` (given
/// only to a root run), the file gets that file's owner and group, and group read if it has it
/// (a root-owned key the broker's group reads), all on the one open file, never by name again.
pub(super) fn write_key(at: &Path, key: &MasterKey, like: Option<&Path>) -> Result<(), RekeyError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(at)
        .map_err(|e| io("cannot create", at, e))?;
    let written = fill_key(file, at, key, like);
    if written.is_err() {
        // The file this run made, half done: the next run must not find it and read it.
        if let Err(e) = std::fs::remove_file(at) {
            tracing::warn!(message = "Could not remove the key file this run began; remove it by hand.", path = %at.display(), error = %e);
        }
    }
    written
}

/// [`write_key`]'s work on the file it created.
fn fill_key(
    mut file: std::fs::File,
    at: &Path,
    key: &MasterKey,
    like: Option<&Path>,
) -> Result<(), RekeyError> {
    use std::os::unix::fs::PermissionsExt;
    let text = key.to_base64();
    file.write_all(text.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .map_err(|e| io("cannot write", at, e))?;
    if let Some(old) = like {
        let old = std::fs::metadata(old).map_err(|e| io("cannot read", old, e))?;
        std::os::unix::fs::fchown(&file, Some(old.uid()), Some(old.gid()))
            .map_err(|e| io("cannot give", at, e))?;
        let mode = 0o600 | (old.mode() & 0o040);
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| io("cannot restrict", at, e))?;
    }
    file.sync_all().map_err(|e| io("cannot sync", at, e))?;
    // Its name durable too: a target whose key file was lost would be unreadable.
    let dir = parent_of(at);
    sync_dir(dir).map_err(|e| io("cannot sync", dir, e))
}

/// An existing new key file at its real name (a link to it, as for a key mounted from a
/// secret store, resolved by the caller): a regular file no one but its owner and group may
/// read and only its owner write (no bits for others, no group write: 0600, 0640, 0400, 0440
/// and the like), owned by root, this user, the old directory's owner or the old key file's
/// (one planted by someone else would hand them the new key).
pub(super) fn read_new_key(at: &Path, owner: Owner, old_key: &Path) -> Result<MasterKey, String> {
    let mut file = open_regular(at, false)
        .map_err(|e| format!("cannot be read: {e}"))?
        .ok_or("is gone")?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot be read: {e}"))?;
    // The old key file's owner too: a key this command generated and kept like the old one.
    let old_owner = std::fs::metadata(old_key).map(|m| m.uid()).ok();
    if meta.mode() & 0o027 != 0 || !(owner.may_own(meta.uid()) || old_owner == Some(meta.uid())) {
        return Err(
            "must be writable by its owner only and readable by no one but its owner \
                    and group (0600, 0640, 0400, 0440), owned by root, this user, the data \
                    directory's owner or the old key file's"
                .into(),
        );
    }
    let mut text = zeroize::Zeroizing::new(String::new());
    file.read_to_string(&mut text)
        .map_err(|e| format!("cannot be read: {e}"))?;
    MasterKey::from_base64(&text).ok_or_else(|| "must hold 32 bytes, base64-encoded".into())
}

/// The new data directory and where it is filled.
pub(super) struct Target {
    pub(super) path: PathBuf,
    pub(super) staging: PathBuf,
}

impl Target {
    /// Refuses a target that is not an absent path or an empty directory on its parent's file
    /// system, that lies inside the old directory, or whose staging directory exists.
    pub(super) fn prepare(path: &Path, from: &Path) -> Result<Self, RekeyError> {
        let path = absolute(path)?;
        let usage = |why: &str| Err(RekeyError::Usage(format!("{} {why}", path.display())));
        if !matches!(path.components().next_back(), Some(Component::Normal(_))) {
            return usage("must end in a directory's name");
        }
        if within(&path, from) {
            return usage("lies inside the old data directory; give one beside it");
        }
        if let Some(why) = unusable(&path)? {
            return usage(why);
        }
        let staging = super::staging_of(&path);
        // By its real name from here on: the name printed, written in the trail and the marker
        // must outlive the old directory (a name through `old/..` would not).
        let path = canonical_name(&path);
        let staging = canonical_name(&staging);
        if std::fs::symlink_metadata(&staging).is_ok() {
            return Err(RekeyError::Usage(format!(
                "{} exists: an earlier rekey stopped part-way; remove it and run again",
                staging.display()
            )));
        }
        Ok(Self { path, staging })
    }

    /// Copies the admin token file and the trail (ending it with `line`), restricts the modes,
    /// gives the files to the old directory's owner, syncs them all, marks the old directory,
    /// and renames the staging directory into place (the mark goes again if that fails).
    pub(super) fn complete(
        &self,
        from: &Path,
        (trail, line): (&Trail, &AuditEvent<'_>),
        owner: Owner,
    ) -> Result<(), RekeyError> {
        let token = ADMIN_TOKEN_FILE;
        copy_regular(&from.join(token), &self.staging.join(token), owner)?;
        trail.copy(from, &self.staging, owner)?;
        trail
            .append(&self.staging, line)
            .map_err(|e| io("cannot write the trail in", &self.staging, e))?;
        restrict_data_dir(&self.staging).map_err(|e| io("cannot restrict", &self.staging, e))?;
        owner.give_tree(&self.staging)?;
        // sled's own flush does not sync every file it writes (nor their names).
        sync_tree(&self.staging)?;
        stop_point("staged");
        mark(from, &self.path)?;
        if let Err(e) = std::fs::rename(&self.staging, &self.path) {
            let why = io("cannot rename into", &self.path, e);
            return Err(unmark(from, why));
        }
        if let Err(e) = sync_dir(parent_of(&self.path)) {
            tracing::warn!(message = "Could not sync the new data directory's parent.", error = %e);
        }
        Ok(())
    }
}

/// Why `path` cannot become the new data directory, if it cannot: anything but an absent path
/// or an empty directory on its parent's file system (a mount point could not be renamed onto).
fn unusable(path: &Path) -> Result<Option<&'static str>, RekeyError> {
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
    let parent = parent_of(path);
    let parent = std::fs::metadata(parent).map_err(|e| io("cannot read", parent, e))?;
    if parent.dev() != meta.dev() {
        return Ok(Some("is a mount point; give a directory inside it"));
    }
    Ok(None)
}

/// The old broker's audit trail, when it is kept in the data directory (and so moves with it):
/// its file name, and how many rotated files (`.1` … `.N`) may sit beside it.
pub(super) struct Trail {
    in_data_dir: Option<(std::ffi::OsString, usize)>,
}

impl Trail {
    pub(super) fn of(config: &Config, from: &Path) -> Self {
        let audit = audit_config(config, from);
        let name = audit.file.and_then(|f| {
            let inside = absolute(parent_of(&f)).is_ok_and(|p| p == from);
            inside
                .then(|| f.file_name().map(|n| n.to_owned()))
                .flatten()
        });
        if name.is_some() && config.audit.file.is_some() {
            tracing::warn!(message = "The audit file setting names a file in the old data directory; the trail is copied, so point the setting at the new directory.");
        }
        Self {
            in_data_dir: name.map(|n| (n, audit.keep)),
        }
    }

    /// The trail's file names: the file and its rotated ones (named as the sink rotates them).
    fn names(&self) -> Vec<std::ffi::OsString> {
        let Some((name, keep)) = &self.in_data_dir else {
            return Vec::new();
        };
        let rotated = (1..=*keep).map(|i| crate::audit::rotated(Path::new(name), i));
        std::iter::once(name.clone())
            .chain(rotated.map(PathBuf::into_os_string))
            .collect()
    }

    /// Copies the trail and its rotated files from `from` into `dir` (mode 0600; lines and
    /// HMACs, no secret).
    fn copy(&self, from: &Path, dir: &Path, owner: Owner) -> Result<(), RekeyError> {
        for name in self.names() {
            copy_regular(&from.join(&name), &dir.join(&name), owner)?;
        }
        Ok(())
    }

    /// The owners of the old trail's files, before this run writes to it.
    pub(super) fn owners(&self, from: &Path) -> Vec<Option<(u32, u32)>> {
        let owner = |name| {
            let meta = std::fs::symlink_metadata(from.join(name)).ok()?;
            meta.is_file().then(|| (meta.uid(), meta.gid()))
        };
        self.names().into_iter().map(owner).collect()
    }

    /// Gives the old trail's files back: lines this run wrote as root (or a rotation it caused)
    /// must leave them as they were (`before`), or, for a file it made, the old directory's
    /// owner's, for the broker to write if it starts there again.
    pub(super) fn give_back(&self, from: &Path, owner: Owner, before: &[Option<(u32, u32)>]) {
        if !owner.root() {
            return;
        }
        for (i, name) in self.names().into_iter().enumerate() {
            let path = from.join(name);
            // The file itself, opened without following a link, and only the trail's own.
            let Ok(Some(file)) = open_regular(&path, false) else {
                continue;
            };
            if file.metadata().map_or(true, |m| m.nlink() > 1) {
                continue;
            }
            let (uid, gid) = before
                .get(i)
                .copied()
                .flatten()
                .unwrap_or((owner.uid, owner.gid));
            if let Err(e) = std::os::unix::fs::fchown(&file, Some(uid), Some(gid)) {
                tracing::warn!(message = "Could not give the old audit trail back to its owner.", path = %path.display(), error = %e);
            }
        }
    }

    /// Appends `line` to the copied trail in `dir`, durably.
    pub(super) fn append(&self, dir: &Path, line: &AuditEvent<'_>) -> std::io::Result<()> {
        let Some((name, _)) = &self.in_data_dir else {
            return Ok(());
        };
        let mut text = serde_json::to_vec(line)?;
        text.push(b'\n');
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(dir.join(name))?;
        file.write_all(&text)?;
        file.sync_all()
    }
}

/// The entries of the old directory that were not copied (a config file, TLS material): the
/// store, the keys, the admin token and the trail are, in their own ways.
pub(super) fn left_behind(from: &Path, trail: &Trail) -> Vec<String> {
    let store = SledStore::path_in(from);
    let mut known: Vec<std::ffi::OsString> = trail.names();
    let token = crate::admin_token::companions(ADMIN_TOKEN_FILE);
    let fixed = [
        ADMIN_TOKEN_FILE,
        "master.key",
        KEY_CHECK_FILE,
        SUPERSEDED_FILE,
        PARTIAL_MARKER,
        crate::store::sled::DIR_LOCK_FILE,
    ];
    known.extend(fixed.into_iter().map(Into::into));
    known.extend(token.iter().map(Into::into));
    known.extend(store.file_name().map(|n| n.to_owned()));
    let Ok(entries) = std::fs::read_dir(from) else {
        return Vec::new();
    };
    let mut left: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| !known.contains(n))
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    left.sort();
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_is_linked_in_whole_and_never_over_one_already_there() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (from, to) = (dir.path(), Path::new("/srv/new"));
        let (marker, partial) = (from.join(SUPERSEDED_FILE), from.join(PARTIAL_MARKER));
        // A run stopped before it linked its text in left this behind.
        std::fs::write(&partial, "/srv/ha").expect("a stale partial marker");
        clear_partial_marker(from).expect("cleared");
        mark(from, to).expect("marked");
        let text = std::fs::read_to_string(&marker).expect("the marker");
        assert_eq!(text, "/srv/new\n");
        assert!(!partial.exists(), "the partial text stayed");
        // One already there (planted, or an earlier run's) is not replaced.
        assert!(mark(from, Path::new("/srv/other")).is_err());
        let text = std::fs::read_to_string(&marker).expect("the marker");
        assert_eq!(text, "/srv/new\n");
        assert!(!partial.exists(), "the partial text stayed");
    }
}
