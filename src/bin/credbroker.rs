//! `credbroker`: the server. Parses flags and environment, sets up logging, binds the listener
//! and hands over to `credbroker::server::run`.

#![warn(clippy::too_many_lines)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use credbroker::config::{Config, Overrides};

/// Exit code for bad configuration (EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit code for a refused start (EX_CONFIG): wrong key, locked or damaged data directory.
const EXIT_CONFIG: u8 = 78;

/// credbroker: a gRPC credential broker for sync engines.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Args {
    /// Optional TOML config file; every setting has a default.
    #[arg(long, env = "CREDBROKER_CONFIG")]
    config: Option<PathBuf>,
    /// Tokio runtime: auto (current_thread when the process has one CPU, else multi-thread),
    /// multi, current, or per-core (a current_thread runtime per CPU for each listener, all
    /// accepting on the one socket).
    #[arg(long, env = "CREDBROKER_RUNTIME", default_value = "auto")]
    runtime: String,
    /// Every other setting (flags and environment override the file).
    #[command(flatten)]
    overrides: Overrides,
    /// Without a command, the broker serves.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Replace the master key file, with the broker stopped: copies the store into a new data
    /// directory under a new key (the old directory is only read). See docs/operations.md.
    Rekey(RekeyArgs),
}

#[derive(Debug, clap::Args)]
struct RekeyArgs {
    /// The new data directory (absent or empty); filled beside it under `<dir>.rekeying`.
    #[arg(long)]
    to_data_dir: PathBuf,
    /// The new master key file: read when it exists (no bits for others, no group write), else
    /// generated (mode 0600; outside the target and run as root, with the old key file's
    /// owner, group and group read). Default: `<to-data-dir>/master.key`.
    #[arg(long)]
    new_master_key_file: Option<PathBuf>,
    /// Optional TOML config file of the broker whose key is replaced.
    #[arg(long, env = "CREDBROKER_CONFIG")]
    config: Option<PathBuf>,
    /// The broker's settings (its data directory and master key file, as it is started with).
    #[command(flatten)]
    overrides: Overrides,
}

/// A flag or environment value clap refused (a number that is not one, an empty path, a
/// misspelt flag) is bad configuration like any other: exit 64, as the docs promise. `--help`
/// and `--version` print and exit 0.
fn refused_flags(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    if e.use_stderr() {
        ExitCode::from(EXIT_USAGE)
    } else {
        ExitCode::SUCCESS
    }
}

fn load_config(file: Option<&std::path::Path>, overrides: &Overrides) -> Result<Config, ExitCode> {
    Config::load(file, overrides).map_err(|errors| {
        for e in errors {
            eprintln!("credbroker: configuration error: {e}");
        }
        ExitCode::from(EXIT_USAGE)
    })
}

/// `credbroker rekey`: prints what it did and what to do next, or why nothing changed.
fn rekey_main(args: RekeyArgs) -> ExitCode {
    use credbroker::server::rekey::{rekey, RekeyError, RekeyOptions};
    let config = match load_config(args.config.as_deref(), &args.overrides) {
        Ok(c) => c,
        Err(code) => return code,
    };
    credbroker::telemetry::init(config.server.log_json);
    let options = RekeyOptions {
        to_data_dir: args.to_data_dir,
        new_master_key_file: args.new_master_key_file,
    };
    let runtime = match credbroker::server::cores::main_runtime(true) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("credbroker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(rekey(&config, &options)) {
        Ok(done) => {
            let (old, new) = done.key_ids;
            let made = if done.key_generated {
                "generated"
            } else {
                "read"
            };
            println!(
                "Copied {} systems and {} callers from {} (key {old:08x}) into {} under the new \
                 master key {new:08x} ({made}: {}).",
                done.systems,
                done.callers,
                config.store.data_dir.display(),
                done.data_dir.display(),
                done.key_file.display()
            );
            println!(
                "Next: start the broker with --data-dir {} --master-key-file {} and check it \
                 (systems, a token). Keep the old directory and key until then; the old \
                 directory now refuses to start (remove its superseded-by file to go back).",
                done.data_dir.display(),
                done.key_file.display()
            );
            if !done.left_behind.is_empty() {
                println!(
                    "Not copied from the old directory (move what the broker needs): {}.",
                    done.left_behind.join(", ")
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("credbroker: rekey: {e}; nothing was changed");
            ExitCode::from(match e {
                RekeyError::Usage(_) => EXIT_USAGE,
                RekeyError::Refused(_) => EXIT_CONFIG,
                RekeyError::Failed(_) => 1,
            })
        }
    }
}

fn main() -> ExitCode {
    // First, before any secret is in memory.
    let limits = credbroker::limits::apply();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => return refused_flags(&e),
    };
    if let Some(Command::Rekey(rekey)) = args.command {
        return rekey_main(rekey);
    }
    let overrides = args.overrides;
    let mut config = match load_config(args.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(code) => return code,
    };
    credbroker::telemetry::init(config.server.log_json);
    limits.log(
        config.server.grpc_max_connections,
        config.server.http_max_connections,
    );
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let current = match args.runtime.as_str() {
        "current" => true,
        "multi" => false,
        "auto" => cpus == 1,
        "per-core" => {
            config.server.serving_threads = cpus;
            true
        }
        other => {
            eprintln!("credbroker: configuration error: --runtime '{other}' must be auto, multi, current or per-core");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // On one core a current-thread runtime is the cheaper one; the multi-thread one runs
    // without its LIFO slot (see `main_runtime`). Blocking work (store flushes) runs on the
    // blocking pool either way.
    let runtime = match credbroker::server::cores::main_runtime(current) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("credbroker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.server.listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(message = "Cannot bind the listen address.", addr = %config.server.listen, error = %e);
                eprintln!("credbroker: cannot listen on {}: {e}", config.server.listen);
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(message = "gRPC listening.", addr = %addr, data_dir = %config.store.data_dir.display());
        match credbroker::server::run(listener, config, credbroker::shutdown::signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(message = "credbroker refused to start.", error = %e);
                eprintln!("credbroker: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        }
    })
}
