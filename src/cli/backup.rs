//! `credbrokerctl backup` and `restore`: an encrypted export streamed to a file, and its
//! restore.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;

use super::{Client, Output, BACKUP_HEADER};
use crate::pb;
use crate::pb::credential_broker_client::CredentialBrokerClient;

/// Runs `backup --out PATH`.
pub(super) async fn run_backup(client: &mut Client, out: Output, path: &Path) -> Result<()> {
    let (chunks, bytes) = backup(client, path).await?;
    if out == Output::Json {
        println!(
            "{}",
            json!({"file": path.display().to_string(), "chunks": chunks, "bytes": bytes})
        );
    } else {
        println!(
            "backup written to {} ({chunks} chunks, {bytes} bytes, encrypted)",
            path.display()
        );
    }
    Ok(())
}

/// Runs `restore --in PATH`.
pub(super) async fn run_restore(client: &mut Client, out: Output, input: &Path) -> Result<()> {
    let chunks = read_backup(input)?;
    let r = client
        .restore_backup(tokio_stream::iter(
            chunks.into_iter().map(|chunk| pb::BackupChunk { chunk }),
        ))
        .await
        .map_err(|s| match s.code() {
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => anyhow!(
                "{}: no answer in time. Once the backup was verified, the broker writes it to \
                 the end even without an answer; run the same restore again to see the result \
                 (what was restored then shows as already present)",
                s.message()
            ),
            _ => anyhow!(s),
        })?
        .into_inner();
    if out == Output::Json {
        println!(
            "{}",
            json!({
                "systems_restored": r.systems_restored,
                "systems_skipped": r.systems_skipped,
                "callers_restored": r.callers_restored,
                "callers_skipped": r.callers_skipped,
            })
        );
    } else {
        println!(
                    "restored {} systems ({} already present, unchanged) and {} callers ({} already present)",
                    r.systems_restored, r.systems_skipped, r.callers_restored, r.callers_skipped
                );
    }
    Ok(())
}

/// Streams `ExportBackup` into `path` (through `<path>.partial`, renamed when complete).
async fn backup<S>(
    client: &mut CredentialBrokerClient<S>,
    path: &std::path::Path,
) -> Result<(u64, u64)>
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::Error: Into<tonic::codegen::StdError>,
    S::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <S::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    use base64::Engine;
    use std::io::Write;
    if path.exists() {
        bail!("{} exists; choose a new file name", path.display());
    }
    let partial = path.with_extension("partial");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let file = opts
        .open(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let mut w = std::io::BufWriter::new(file);
    let result: Result<(u64, u64)> = async {
        writeln!(w, "{BACKUP_HEADER}")?;
        let mut stream = client
            .export_backup(pb::ExportBackupRequest {})
            .await?
            .into_inner();
        let (mut chunks, mut bytes) = (0u64, 0u64);
        while let Some(c) = stream.message().await? {
            chunks += 1;
            bytes += c.chunk.len() as u64;
            writeln!(
                w,
                "{}",
                base64::engine::general_purpose::STANDARD.encode(&c.chunk)
            )?;
        }
        let file = w
            .into_inner()
            .map_err(|e| anyhow!("write: {}", e.error()))?;
        file.sync_all()?;
        Ok((chunks, bytes))
    }
    .await;
    match result {
        Ok(v) => {
            std::fs::rename(&partial, path)?;
            Ok(v)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

/// Reads a backup file's chunks.
fn read_backup(path: &std::path::Path) -> Result<Vec<Vec<u8>>> {
    use base64::Engine;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines();
    if lines.next() != Some(BACKUP_HEADER) {
        bail!("{} is not a credbroker backup", path.display());
    }
    lines
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            base64::engine::general_purpose::STANDARD
                .decode(l.trim())
                .map_err(|_| anyhow!("{}: chunk {i} is not valid base64", path.display()))
        })
        .collect()
}
