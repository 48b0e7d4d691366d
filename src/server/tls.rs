//! TLS and mTLS for the gRPC listener, with certificates that reload without dropping
//! connections.
//!
//! A custom acceptor (tokio-rustls) takes the current `rustls::ServerConfig` for each new
//! connection; [`TlsReloader::reload`] swaps it (on SIGHUP, or when the files change), so existing
//! connections keep their session and new ones get the new certificate. Handshakes run off the
//! accept loop with a timeout, so a client that never sends a ClientHello cannot stall others.
//! With a client CA, client certificates are required and their SAN DNS names are handed to the
//! service as connect info, where they map to callers.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

/// Where the certificate material lives.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA for client certificates (PEM); when set, client certificates are verified (and
    /// required unless `client_optional`).
    pub client_ca: Option<PathBuf>,
    /// A connection without a client certificate is accepted too (the HTTP listener: vendors'
    /// callbacks and browsers without one).
    pub client_optional: bool,
    /// How long a handshake may take.
    pub handshake_timeout: Duration,
    /// ALPN protocols offered (`h2` for gRPC, `http/1.1` for the HTTP listener).
    pub alpn: Vec<Vec<u8>>,
}

/// The current TLS configuration, swappable at run time.
pub struct TlsReloader {
    settings: TlsSettings,
    current: RwLock<Arc<ServerConfig>>,
    stamps: Mutex<Vec<Option<SystemTime>>>,
}

impl std::fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsReloader")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn build(s: &TlsSettings) -> Result<ServerConfig, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&s.cert)
        .map_err(|e| format!("certificate {}: {e}", s.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate {}: {e}", s.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "certificate {}: no PEM certificate found",
            s.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&s.key)
        .map_err(|e| format!("private key {}: {e}", s.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &s.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("client CA {}: {e}", ca.display()))?
            {
                let c = c.map_err(|e| format!("client CA {}: {e}", ca.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if s.client_optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate/key: {e}"))?;
    cfg.alpn_protocols = s.alpn.clone();
    Ok(cfg)
}

impl TlsReloader {
    /// Loads the files.
    pub fn load(settings: TlsSettings) -> Result<Self, String> {
        let cfg = build(&settings)?;
        let me = Self {
            current: RwLock::new(Arc::new(cfg)),
            stamps: Mutex::new(Vec::new()),
            settings,
        };
        *crate::util::sync::lock(&me.stamps) = me.file_stamps();
        Ok(me)
    }

    /// Re-reads the files; on error the old configuration stays.
    pub fn reload(&self) -> Result<(), String> {
        let cfg = build(&self.settings)?;
        *crate::util::sync::write(&self.current) = Arc::new(cfg);
        *crate::util::sync::lock(&self.stamps) = self.file_stamps();
        tracing::info!(message = "TLS certificates reloaded.");
        Ok(())
    }

    /// Reloads when a file's modification time changed.
    pub fn reload_if_changed(&self) {
        let now = self.file_stamps();
        let changed = *crate::util::sync::lock(&self.stamps) != now;
        if changed {
            if let Err(e) = self.reload() {
                tracing::warn!(message = "TLS reload failed; keeping the current certificates.", error = %e);
                *crate::util::sync::lock(&self.stamps) = now;
            }
        }
    }

    fn file_stamps(&self) -> Vec<Option<SystemTime>> {
        let s = &self.settings;
        [Some(&s.cert), Some(&s.key), s.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    /// An acceptor with the current certificates (for one new connection).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config())
    }

    /// How long a handshake may take.
    pub fn handshake_timeout(&self) -> Duration {
        self.settings.handshake_timeout
    }

    /// Reloads when the files change (checked every `interval`) and on SIGHUP, until the
    /// returned tasks are aborted.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        let r = self.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                r.reload_if_changed();
            }
        }));
        #[cfg(unix)]
        {
            let r = self.clone();
            if let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            {
                tasks.push(tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        if let Err(e) = r.reload() {
                            tracing::warn!(message = "TLS reload on SIGHUP failed; keeping the current certificates.", error = %e);
                        }
                    }
                }));
            }
        }
        tasks
    }

    fn config(&self) -> Arc<ServerConfig> {
        crate::util::sync::read(&self.current).clone()
    }

    /// Accepts TCP connections and yields completed TLS streams.
    /// Past `slots` open connections, a new one is closed before its handshake.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
        slots: Arc<tokio::sync::Semaphore>,
    ) -> (ReceiverStream<Result<TlsStream, io::Error>>, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(256);
        let me = self.clone();
        let task = tokio::spawn(async move {
            loop {
                let (tcp, remote) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(message = "Accept failed.", error = %e);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    crate::metrics::METRICS.grpc_refused();
                    continue;
                };
                let tcp = super::tuned(tcp);
                let acceptor = tokio_rustls::TlsAcceptor::from(me.config());
                let tx = tx.clone();
                let timeout = me.settings.handshake_timeout;
                tokio::spawn(async move {
                    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let names = client_names(&stream);
                            let _ = tx
                                .send(Ok(TlsStream {
                                    inner: stream,
                                    remote,
                                    names: Arc::new(names),
                                    _slot: slot,
                                }))
                                .await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(message = "TLS handshake failed.", error = %e)
                        }
                        Err(_) => tracing::debug!(message = "TLS handshake timed out."),
                    }
                });
            }
        });
        (ReceiverStream::new(rx), task)
    }
}

/// The SAN DNS names of the connection's verified client certificate (lowercase; empty without
/// one).
pub(crate) fn client_names(stream: &tokio_rustls::server::TlsStream<TcpStream>) -> Vec<String> {
    let (_, conn) = stream.get_ref();
    let Some(cert) = conn.peer_certificates().and_then(|c| c.first()) else {
        return Vec::new();
    };
    match webpki::EndEntityCert::try_from(cert) {
        Ok(ee) => ee
            .valid_dns_names()
            .map(|n| n.to_ascii_lowercase())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// A server-side TLS connection.
pub struct TlsStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    remote: SocketAddr,
    names: Arc<Vec<String>>,
    /// The connection's place under the listener's connection cap.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// The HTTP listener's requests: the SAN DNS names of the connection's verified client
/// certificate (empty without one). Set by the listener only.
#[derive(Debug, Clone, Default)]
pub struct ClientNames(pub Arc<Vec<String>>);

/// What handlers learn about a TLS connection.
#[derive(Debug, Clone)]
pub struct TlsConnectInfo {
    /// The peer address.
    pub remote: SocketAddr,
    /// SAN DNS names of the verified client certificate (empty without one).
    pub client_names: Arc<Vec<String>>,
}

impl tonic::transport::server::Connected for TlsStream {
    type ConnectInfo = TlsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        TlsConnectInfo {
            remote: self.remote,
            client_names: self.names.clone(),
        }
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
