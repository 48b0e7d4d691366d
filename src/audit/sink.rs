//! Where a batch of audit lines goes: stdout and/or a size-rotated file. Only the writer thread
//! ([`super::writer`]) writes here, one batch at a time.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

use super::{AuditConfig, AuditError};

/// The sinks a batch is written to.
pub(super) struct Sinks {
    stdout: bool,
    file: Option<FileSink>,
    /// Rotate the file at this size.
    max_bytes: u64,
    /// Rotated files kept.
    keep: usize,
}

struct FileSink {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    /// (device, inode) of the open file, to notice external rotation or removal.
    id: Option<(u64, u64)>,
    /// The file's last line is unended (cut short by a crash or a failed write).
    torn: bool,
}

impl Sinks {
    pub(super) fn new(config: &AuditConfig) -> Self {
        Self {
            stdout: config.stdout,
            file: config.file.clone().map(|path| FileSink {
                path,
                file: None,
                size: 0,
                id: None,
                torn: false,
            }),
            max_bytes: config.max_bytes,
            keep: config.keep,
        }
    }

    /// Writes `lines` (whole lines) to every sink.
    pub(super) fn write(&mut self, lines: &[u8]) -> Result<(), AuditError> {
        if self.stdout {
            let mut out = std::io::stdout().lock();
            out.write_all(lines)
                .and_then(|_| out.flush())
                .map_err(|e| AuditError(e.to_string()))?;
        }
        let Some(sink) = self.file.as_mut() else {
            return Ok(());
        };
        if sink.size + lines.len() as u64 > self.max_bytes && sink.size > 0 {
            sink.rotate(self.keep);
        }
        sink.write(lines)
    }
}

impl FileSink {
    fn write(&mut self, lines: &[u8]) -> Result<(), AuditError> {
        // Follow the path: after an external rotation, removal or replacement, reopen it.
        if self.file.is_some() {
            let current = std::fs::metadata(&self.path).ok().and_then(|m| file_id(&m));
            if current.is_none() || current != self.id {
                self.file = None;
            }
        }
        if self.file.is_none() {
            self.reopen()?;
        }
        // A line cut short before (a crash mid-write) is ended first, so the next one stands
        // on its own line.
        let start: &[u8] = if self.torn { b"\n" } else { b"" };
        let Some(f) = self.file.as_mut() else {
            return Ok(());
        };
        let (written, res) = append(f, &[start, lines]);
        match res {
            Ok(()) => {
                self.size += written;
                self.torn = false;
                Ok(())
            }
            Err(e) => {
                // The part of the batch that reached the file is cut off again (a full disk
                // takes a line's head and refuses its tail), else the next batch's first line
                // would be glued to it: the file shrinks by exactly those bytes, from its end
                // as it is now (a copy-truncate rotation may have emptied it meanwhile), never
                // grows. If that fails too, the reopen finds the line unended. Reopened next
                // time: the file may have been replaced or the disk freed.
                if let Some(f) = self.file.take() {
                    take_back(&f, written);
                }
                Err(AuditError(e.to_string()))
            }
        }
    }

    fn reopen(&mut self) -> Result<(), AuditError> {
        let f = open_trail(&self.path).map_err(|e| AuditError(e.to_string()))?;
        let meta = f.metadata().ok();
        self.size = meta.as_ref().map(|m| m.len()).unwrap_or(0);
        self.torn = self.size > 0 && !ends_a_line(&self.path, self.size);
        self.id = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| file_id(&m))
            .or_else(|| meta.as_ref().and_then(file_id));
        self.file = Some(f);
        Ok(())
    }

    fn rotate(&mut self, keep: usize) {
        self.file = None;
        let name = |i: usize| rotated(&self.path, i);
        for i in (1..keep).rev() {
            let _ = std::fs::rename(name(i), name(i + 1));
        }
        if keep > 0 {
            let _ = std::fs::rename(&self.path, name(1));
        } else {
            let _ = std::fs::remove_file(&self.path);
        }
        self.size = 0;
    }
}

/// The trail's `i`th rotated file (`audit.log.1` … `.N`) beside `path`.
pub(crate) fn rotated(path: &std::path::Path, i: usize) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{i}"));
    PathBuf::from(p)
}

/// Whether the last byte (of `size`) of the file at `path` ends a line; true when it cannot
/// be read (the trail may be writable only, and is written on regardless).
fn ends_a_line(path: &std::path::Path, size: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut last = [0u8; 1];
    match File::open(path).and_then(|f| f.read_at(&mut last, size.saturating_sub(1))) {
        Ok(1) => last[0] == b'\n',
        _ => true,
    }
}

/// Opens the trail for appending, created owner-only.
pub(super) fn open_trail(path: &std::path::Path) -> std::io::Result<File> {
    std::os::unix::fs::OpenOptionsExt::mode(OpenOptions::new().create(true).append(true), 0o600)
        .open(path)
}

/// Cuts the last `written` bytes off `f`, if it still has that many (best effort).
fn take_back(f: &File, written: u64) {
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if written > 0 && len >= written {
        let _ = f.set_len(len - written);
    }
}

/// Appends `parts` to `f` (opened to append); how many bytes reached it, and whether all did.
fn append(f: &mut File, parts: &[&[u8]]) -> (u64, std::io::Result<()>) {
    let mut written = 0u64;
    for part in parts {
        let mut rest = *part;
        while !rest.is_empty() {
            match f.write(rest) {
                Ok(0) => return (written, Err(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    written += n as u64;
                    rest = &rest[n..];
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return (written, Err(e)),
            }
        }
    }
    (written, f.flush())
}

#[cfg(unix)]
fn file_id(m: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(_: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}
