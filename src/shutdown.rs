//! Shutdown signals: SIGINT or SIGTERM (containers send SIGTERM). SIGHUP does not stop the
//! broker.

use std::future::Future;

/// Resolves on the first SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled, so a signal sent once the broker has said it is listening is
/// never met by the default action.
///
/// SIGHUP is caught and logged: its default action would end the process with no drain (a
/// `systemctl reload`, a logrotate `kill -HUP`). With TLS it also reloads the certificates
/// (`server::tls`).
pub fn signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        let hup = signal(SignalKind::hangup()).ok();
        async move {
            let (Ok(mut term), Ok(mut int)) = (term, int) else {
                let _ = tokio::signal::ctrl_c().await;
                return;
            };
            let mut hup = hup;
            loop {
                let hangup = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = term.recv() => {
                        tracing::info!(message = "SIGTERM received; shutting down.");
                        return;
                    }
                    _ = int.recv() => {
                        tracing::info!(message = "SIGINT received; shutting down.");
                        return;
                    }
                    Some(()) = hangup => {
                        tracing::info!(message = "SIGHUP received; serving on (it reloads TLS certificates when TLS is configured, and stops nothing).");
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
