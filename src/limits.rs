//! Process limits the server sets for itself at start (`docs/security.md`, leak channels):
//!
//! - **No core dumps**, and the process is not dumpable: a crash would otherwise write the master
//!   key and the tokens in memory to a core file on the host, and a local user running as the
//!   same uid could attach a debugger and read them.
//! - **The open-file limit raised to its hard limit**: the common soft limit (1024) is below
//!   the default connection caps, so descriptors would run out first, and with them vendor
//!   connections, the audit file's reopen and the database.

/// What [`apply`] managed to set, to be logged once logging is up.
#[derive(Debug, Default)]
pub struct Applied {
    /// Why core dumps could not be turned off, if they could not.
    pub dumps_left_on: Option<String>,
    /// The open-file limit now in force (`None`: unlimited or unknown).
    pub open_files: Option<u64>,
}

/// Sets the limits above for this process. Failures are reported, not fatal.
#[cfg(target_os = "linux")]
pub fn apply() -> Applied {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let no_core = setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    );
    let not_dumpable =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
    let dumps_left_on = match (no_core, not_dumpable) {
        (Ok(()), Ok(())) => None,
        (Err(e), _) | (_, Err(e)) => Some(e.to_string()),
    };
    let files = getrlimit(Resource::Nofile);
    if files.maximum.is_some() && files.current < files.maximum {
        let raised = Rlimit {
            current: files.maximum,
            maximum: files.maximum,
        };
        let _ = setrlimit(Resource::Nofile, raised);
    }
    Applied {
        dumps_left_on,
        open_files: getrlimit(Resource::Nofile).current,
    }
}

/// Elsewhere nothing is set.
#[cfg(not(target_os = "linux"))]
pub fn apply() -> Applied {
    Applied {
        dumps_left_on: Some("not supported on this platform".into()),
        open_files: None,
    }
}

/// Descriptors kept for everything but inbound connections: the store, the audit file, vendor
/// and database connections, the runtime's own.
pub const RESERVED_FILES: u64 = 256;

impl Applied {
    /// Logs what was set, and warns when the connection caps (`grpc` + twice `http`) and the
    /// reserve need more descriptors than the limit allows: the caps would then never be reached, and
    /// descriptors would run out first.
    pub fn log(&self, grpc: usize, http: usize) {
        if let Some(e) = &self.dumps_left_on {
            tracing::warn!(message = "Core dumps could not be turned off; a crash may write secrets in memory to disk.", error = %e);
        }
        // A proxied call holds a vendor connection besides the worker's.
        let needed = (grpc as u64)
            .saturating_add((http as u64).saturating_mul(2))
            .saturating_add(RESERVED_FILES);
        match self.open_files {
            Some(limit) if limit < needed => tracing::warn!(
                message = "The open-file limit is below the connection caps: descriptors run out before the caps are reached. Raise the limit (LimitNOFILE=, ulimit -n) or lower grpc_max_connections/http_max_connections.",
                open_files = limit,
                needed
            ),
            _ => tracing::info!(message = "Process limits set.", open_files = ?self.open_files, core_dumps_off = self.dumps_left_on.is_none()),
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// This (test) process after `apply`: not dumpable, no core file. (The integration test
    /// reads the server's limits from /proc; dumpability only the process itself can read.)
    #[test]
    fn apply_leaves_the_process_not_dumpable_and_without_cores() {
        let applied = apply();
        assert_eq!(applied.dumps_left_on, None);
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            rustix::process::DumpableBehavior::NotDumpable
        );
        let core = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!(core.current, Some(0));
    }
}
