//! The gRPC server: health, reflection and the `CredentialBroker` service on one listener.
//!
//! [`run`] is the one entry point (the binary and the tests both use it):
//! 1. serve health (`NOT_SERVING`) and reflection at once, so load balancers and `grpcurl` get
//!    answers while the broker starts; broker RPCs answer `UNAVAILABLE` until ready;
//! 2. open the store, load and verify the master key, load callers (bootstrap admin on first
//!    start), then report `SERVING`;
//! 3. on the shutdown signal: `NOT_SERVING`, end health watches, stop accepting, let in-flight
//!    RPCs finish within the grace period, flush the store, return.

pub mod broker_svc;
pub mod console;
pub mod convert;
pub mod cores;
pub mod http;
pub mod proxy;
pub mod rekey;
mod stall;
pub mod tls;
pub mod token_route;
pub mod webhooks;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::audit::AuditConfig;
use crate::backends::{BackendContext, HttpClient, Registry};
use crate::broker::tokens::RefreshSettings;
use crate::broker::{Broker, BrokerSettings, OpenError as BrokerOpenError};
use crate::config::Config;
use crate::crypto::keys::{verify_key_check_file, KeyError};
use crate::crypto::{Keyring, MasterKey, MasterKeySource};
use crate::store::sled::OpenError as StoreOpenError;
use crate::store::{
    CredentialStore, PostgresStore, ReopeningSledStore, SledStore, StoreError,
    WRITES_HEALTH_SERVICE,
};

pub use broker_svc::BrokerService;

/// The fully qualified name of the broker service (for health).
pub const SERVICE_NAME: &str = "credbroker.v1.CredentialBroker";
/// File (in the data directory) holding the bootstrap admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// Default audit file (in the data directory).
pub const AUDIT_FILE: &str = "audit.log";

/// Why the server did not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {error}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// The master key could not be loaded.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreOpenError),
    /// The PostgreSQL store could not be reached or migrated.
    #[error("PostgreSQL store: {0}")]
    Postgres(String),
    /// The key does not match, or the store is damaged.
    #[error(transparent)]
    Broker(#[from] BrokerOpenError),
    /// The TLS material could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// The HTTP client could not be built.
    #[error("outbound HTTP client: {0}")]
    Http(String),
    /// The gRPC transport failed.
    #[error("gRPC server: {0}")]
    Transport(String),
    /// The data directory's store was copied under a new master key (`credbroker rekey`).
    #[error("the store in {dir} {}", rekey::superseded_advice(dir, to))]
    Superseded {
        /// This data directory.
        dir: PathBuf,
        /// Where it was copied to.
        to: String,
    },
}

/// Hooks for embedding and tests.
#[derive(Default)]
pub struct StartupHooks {
    /// When set, the store is opened only after this resolves (health stays `NOT_SERVING`
    /// meanwhile). Lets a test observe the starting state, or an embedder fetch a key first.
    pub before_open: Option<oneshot::Receiver<()>>,
    /// A bound HTTP listener to use instead of binding `config.server.http_listen`.
    pub http_listener: Option<TcpListener>,
    /// Wraps the opened store before the broker uses it (fault injection in tests, an
    /// embedder's instrumentation). Called again for the store a replica falls back to (its
    /// snapshot) when the database stops answering while the broker opens.
    pub wrap_store: Option<StoreWrapper>,
}

/// See [`StartupHooks::wrap_store`].
pub type StoreWrapper =
    Box<dyn Fn(Arc<dyn CredentialStore>) -> Arc<dyn CredentialStore> + Send + Sync>;

/// Serves on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    run_with_hooks(
        listener,
        config,
        shutdown,
        StartupHooks {
            wrap_store: test_store_latency(),
            ..StartupHooks::default()
        },
    )
    .await
}

/// Test builds only (feature `fault-injection`, never in a release): `CREDBROKER_TEST_STORE_LATENCY_MS`
/// slows every store operation of the real binary, so a crash test can land a kill -9 inside a
/// long operation (a master-key re-wrap).
#[cfg(feature = "fault-injection")]
fn test_store_latency() -> Option<StoreWrapper> {
    let ms: u64 = std::env::var("CREDBROKER_TEST_STORE_LATENCY_MS")
        .ok()?
        .parse()
        .ok()?;
    let control = Arc::new(crate::store::faulty::FaultControl::default());
    control
        .latency_ms
        .store(ms, std::sync::atomic::Ordering::SeqCst);
    tracing::warn!(
        message = "Test build: every store operation is slowed.",
        latency_ms = ms
    );
    Some(Box::new(move |inner| {
        Arc::new(crate::store::faulty::FaultyStore::new(
            inner,
            control.clone(),
        )) as Arc<dyn CredentialStore>
    }))
}

#[cfg(not(feature = "fault-injection"))]
fn test_store_latency() -> Option<StoreWrapper> {
    None
}

/// After the drain: the last events are settled, then a replica's mirror writes its last
/// snapshot (which then holds every change this replica made).
async fn settle(broker: &Broker, mirror: Option<Arc<crate::store::MirroredStore>>) {
    settle_events(broker).await;
    if let Some(mirror) = mirror {
        mirror.write_last_snapshot().await;
    }
}

/// The events of the last changes reach the store before it closes (at most 2 s), and every
/// watch ends.
async fn settle_events(broker: &Broker) {
    broker
        .events
        .settle(std::time::Duration::from_secs(2))
        .await;
    if broker.events.unpublished() > 0 {
        tracing::warn!(
            message = "Events not yet in the store are lost with this stop.",
            events = broker.events.unpublished()
        );
    }
    broker.events.close();
    // Webhook deliveries end at their next safe point; none outlives the stop (each holds the
    // broker, and with it the store).
    let tasks = std::mem::take(&mut *crate::util::sync::lock(&broker.background));
    for mut t in tasks {
        let wait = webhooks::STOP_WAIT + std::time::Duration::from_secs(1);
        if tokio::time::timeout(wait, &mut t).await.is_err() {
            t.abort();
            let _ = t.await;
        }
    }
    let _ = broker.flush().await;
}

/// [`run`] with [`StartupHooks`].
pub async fn run_with_hooks(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    hooks: StartupHooks,
) -> Result<(), ServeError> {
    let core: Arc<OnceLock<Arc<Broker>>> = Arc::new(OnceLock::new());
    let (tls, http_tls) = load_tls(&config)?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let mut tls_tasks = Vec::new();
    // Extra cores' runtimes end when dropped, on every way out.
    let (health, mut server_task, extra_cores) = start_grpc(
        listener,
        &config,
        &core,
        tls.as_ref(),
        &mut tls_tasks,
        stop_rx,
    )
    .await?;

    let (http_stop_tx, http_stop_rx) = oneshot::channel::<()>();
    let (http_serving, public_url) = match start_http(
        &config,
        hooks.http_listener,
        &core,
        http_tls.clone(),
        &mut tls_tasks,
        http_stop_rx,
    )
    .await
    {
        Ok(started) => started,
        Err(e) => {
            let _ = stop_tx.send(());
            return Err(e);
        }
    };

    let (http_task, http_cores) = http_serving.map_or((None, None), |(t, c)| (Some(t), c));
    if let Some(gate) = hooks.before_open {
        let _ = gate.await;
    }
    // A replica waiting for its database (not ready) still stops when told to.
    tokio::pin!(shutdown);
    let opened = tokio::select! {
        opened = open_broker(&config, public_url, hooks.wrap_store) => opened.map(Some),
        () = &mut shutdown => Ok(None),
    };
    let Ok(Some((broker, mirror))) = opened else {
        let _ = stop_tx.send(());
        let _ = http_stop_tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(2), server_task).await;
        return opened.map(|_| ());
    };
    // Before the broker takes calls or answers `/readyz`: a trail that cannot be opened is
    // reported from the first answer on.
    broker.audit.check_at_start();
    let _ = core.set(broker.clone());
    broker.start_change_feed();
    let refresher = broker.start_refresher();
    broker.resume_rewrap().await;
    let watchers = announce_serving(&broker, &health).await;
    tracing::info!(message = "credbroker is serving.");
    spawn_integrity_check(&broker);

    let early_exit = tokio::select! {
        _ = &mut shutdown => None,
        res = &mut server_task => Some(res),
    };
    if let Some(res) = early_exit {
        let _ = http_stop_tx.send(());
        return after_server_ended(&config, &broker, refresher, res).await;
    }

    for w in watchers {
        w.abort();
    }
    broker
        .draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    broker.events.close();
    announce_draining(&health).await;
    let _ = stop_tx.send(());
    let _ = http_stop_tx.send(());
    let extras = [extra_cores, http_cores];
    drain_within_grace(
        &config,
        &broker,
        refresher,
        (http_task, server_task),
        &extras,
    )
    .await;
    settle(&broker, mirror).await;
    for t in tls_tasks {
        t.abort();
    }
    for cores in extras.into_iter().flatten() {
        cores.finish(Duration::from_secs(2)).await;
    }
    drop(core);
    drop(broker);
    tracing::info!(message = "credbroker stopped.");
    Ok(())
}

/// The gRPC server ended by itself: what it started is drained, and its outcome returned.
async fn after_server_ended(
    config: &Config,
    broker: &Broker,
    refresher: crate::broker::tokens::Refresher,
    res: Result<Result<(), String>, tokio::task::JoinError>,
) -> Result<(), ServeError> {
    // Ends watches and webhook deliveries (tracked with the exchanges drained next).
    settle_events(broker).await;
    refresher.shutdown().await;
    broker.refuse_new_exchanges();
    broker.drain_exchanges(config.server.shutdown_grace).await;
    broker.stop_rewrap().await;
    let _ = broker.flush().await;
    match res {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ServeError::Transport(e)),
        Err(e) => Err(ServeError::Transport(e.to_string())),
    }
}

/// The gRPC server (the broker's service, health and reflection) on `listener`, serving until
/// `stop_rx` fires; health says NOT_SERVING until the broker is open.
async fn start_grpc(
    listener: TcpListener,
    config: &Config,
    core: &Arc<OnceLock<Arc<Broker>>>,
    tls: Option<&Tls>,
    tls_tasks: &mut Vec<JoinHandle<()>>,
    stop_rx: oneshot::Receiver<()>,
) -> Result<(HealthReporter, cores::ServerTask, Option<cores::ExtraCores>), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // Every service is known from the start (NOT_SERVING until the broker is open): a monitor
    // watching the writes service while the broker starts hears when it opens.
    for service in HEALTH_SERVICES {
        health
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Transport(e.to_string()))?
        .max_decoding_message_size(PROBE_REQUEST_BYTES);
    // Health and reflection answer anyone: their requests are a name or two, so a peer cannot
    // have tonic set aside its default 4 MiB per stream for them before anything is checked.
    let health_service = health_service.max_decoding_message_size(PROBE_REQUEST_BYTES);

    let service = token_route::BrokerRoutes::new(
        BrokerService::new(core.clone(), config.tls.bearer_tokens),
        config.server.max_request_bytes,
    );

    let router = tonic::transport::Server::builder()
        .timeout(config.server.request_timeout)
        .concurrency_limit_per_connection(config.server.concurrency_limit_per_connection)
        .max_concurrent_streams(config.server.max_concurrent_streams)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .http2_max_header_list_size(16 * 1024)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service);
    if tls.is_none() && listener.local_addr().is_ok_and(|a| !a.ip().is_loopback()) {
        tracing::warn!(message = "The gRPC listener serves plaintext on a non-loopback address; caller tokens and headers cross it in clear. Configure tls_cert_file/tls_key_file.");
    }
    if let Some(reloader) = tls {
        tls_tasks.extend(reloader.watch(config.tls.reload_interval));
        tracing::info!(
            message = "gRPC listener speaks TLS.",
            client_certificates = config.tls.client_ca_file.is_some()
        );
    }
    let threads = config.server.serving_threads;
    let slots = Arc::new(tokio::sync::Semaphore::new(
        config.server.grpc_max_connections.max(1),
    ));
    // A new connection must send its preface within the HTTP listener's header timeout (see
    // SilentCut).
    let serve = grpc_server(
        router,
        tls.cloned(),
        config.server.http_header_timeout,
        slots,
    );
    let (server_task, extra) = cores::serve_on_cores(threads, listener, stop_rx, serve)
        .await
        .map_err(ServeError::Transport)?;
    if extra.is_some() {
        tracing::info!(message = "gRPC served by one runtime per core.", threads);
    }
    Ok((health, server_task, extra))
}

/// Every gRPC health service the broker reports: the server's, the broker's, its writes'.
const HEALTH_SERVICES: [&str; 3] = ["", SERVICE_NAME, WRITES_HEALTH_SERVICE];

/// The largest health or reflection request read (a service or symbol name).
const PROBE_REQUEST_BYTES: usize = 4 * 1024;

/// Serves the gRPC `router` on a listener until told to stop (the main runtime's listener and
/// each extra core's).
///
/// Past `slots` open connections (shared by every core's runtime), a new one is closed at once,
/// before any TLS handshake.
fn grpc_server(
    router: tonic::transport::server::Router,
    tls: Option<Tls>,
    silent: Duration,
    slots: Arc<tokio::sync::Semaphore>,
) -> impl Fn(TcpListener, tokio::sync::watch::Receiver<bool>) -> GrpcServing + Clone + Send + 'static
{
    use tokio_stream::StreamExt as _;
    move |listener, stop| {
        let (router, tls, slots) = (router.clone(), tls.clone(), slots.clone());
        Box::pin(async move {
            let stop = cores::stopped(stop);
            let served = match tls {
                None => {
                    let incoming = plaintext_incoming(listener, slots, silent);
                    router.serve_with_incoming_shutdown(incoming, stop).await
                }
                Some(reloader) => {
                    let (incoming, accept_task) = reloader.incoming(listener, slots);
                    let incoming =
                        incoming.map(move |r| r.map(|io| stall::SilentCut::new(io, silent)));
                    let served = router.serve_with_incoming_shutdown(incoming, stop).await;
                    accept_task.abort();
                    served
                }
            };
            served.map_err(|e| e.to_string())
        })
    }
}

/// The plaintext gRPC listener's connections, each tuned (see [`tuned`]) and holding a place
/// under the connection cap (past it, a new one is closed at once). An accept error (out of
/// descriptors) waits 50 ms before the next accept, as the TLS and HTTP listeners do, instead of
/// spinning.
fn plaintext_incoming(
    listener: TcpListener,
    slots: Arc<tokio::sync::Semaphore>,
    silent: Duration,
) -> impl tokio_stream::Stream<Item = std::io::Result<stall::SilentCut<tokio::net::TcpStream>>> {
    use tokio_stream::StreamExt as _;
    TcpListenerStream::new(listener)
        .then(|r| async move {
            if let Err(e) = &r {
                tracing::warn!(message = "Accept failed.", error = %e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r
        })
        .filter_map(move |r| {
            let io = match r {
                Ok(io) => tuned(io),
                Err(_) => return None,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                crate::metrics::METRICS.grpc_refused();
                return None;
            };
            Some(Ok(stall::SilentCut::new(io, silent).holding(slot)))
        })
}

/// An accepted gRPC connection's socket, Nagle off: a small answer leaves at once (as on the
/// HTTP listener). tonic sets `tcp_nodelay` only on listeners it binds itself, not on those
/// handed to `serve_with_incoming`; dead peers are found by the HTTP/2 keep-alive pings.
pub(crate) fn tuned(tcp: tokio::net::TcpStream) -> tokio::net::TcpStream {
    let _ = tcp.set_nodelay(true);
    tcp
}

/// One listener's gRPC serving.
type GrpcServing = std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Health says NOT_SERVING to its watchers, then ends their streams so they do not hold the
/// graceful shutdown open: every service's, the writes one's too (a monitor watching it held
/// each shutdown for the whole grace period).
async fn announce_draining(health: &HealthReporter) {
    for service in HEALTH_SERVICES {
        health
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut health_clear = health.clone();
    for service in HEALTH_SERVICES {
        health_clear.clear_service_status(service).await;
    }
}

/// Waits for the listeners, the calls in flight and the vendor exchanges within one grace
/// period, then stops the refresher and the re-wrap and flushes the store.
async fn drain_within_grace(
    config: &Config,
    broker: &Arc<Broker>,
    refresher: crate::broker::tokens::Refresher,
    (http_task, mut server_task): (Option<cores::ServerTask>, cores::ServerTask),
    extras: &[Option<cores::ExtraCores>],
) {
    // One grace period for the whole drain (listeners, calls, vendor exchanges, which all run
    // meanwhile), not one per stage: an orchestrator's kill deadline is a single number.
    let deadline = tokio::time::Instant::now() + config.server.shutdown_grace;
    if let Some(t) = http_task {
        let _ = tokio::time::timeout_at(deadline, t).await;
    }
    let ran_out = match tokio::time::timeout_at(deadline, &mut server_task).await {
        Ok(_) => {
            tracing::info!(message = "In-flight calls drained.");
            false
        }
        Err(_) => {
            tracing::warn!(
                message = "Shutdown grace period ran out; abandoning remaining calls.",
                grace_secs = config.server.shutdown_grace.as_secs()
            );
            server_task.abort();
            true
        }
    };
    refresher.shutdown().await;
    // The abandoned calls start no vendor exchange from here on.
    broker.refuse_new_exchanges();
    // A refresh or code exchange the vendor has already answered must reach the store: its
    // old refresh token may be dead already.
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    if !broker.drain_exchanges(left).await {
        tracing::warn!(
            message = "Vendor exchanges still running after the grace period; stopping anyway."
        );
    }
    // Only now are the extra threads' abandoned calls cut: an exchange a call there started
    // runs on that thread's runtime, and cutting it first dropped the exchange mid-way (a
    // refresh token the vendor had rotated, lost).
    if ran_out {
        for c in extras.iter().flatten() {
            c.cut();
        }
    }
    broker.stop_rewrap().await;
    if let Err(e) = broker.flush().await {
        tracing::error!(message = "Final flush failed.", error = %e);
    }
}

/// A listener's reloadable TLS settings.
type Tls = Arc<tls::TlsReloader>;

/// The gRPC and HTTP listeners' TLS, when configured.
fn load_tls(config: &Config) -> Result<(Option<Tls>, Option<Tls>), ServeError> {
    let tls = match (&config.tls.cert_file, &config.tls.key_file) {
        (Some(cert), Some(key)) => Some(Arc::new(
            tls::TlsReloader::load(tls::TlsSettings {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: config.tls.client_ca_file.clone(),
                client_optional: false,
                handshake_timeout: config.tls.handshake_timeout,
                alpn: vec![b"h2".to_vec()],
            })
            .map_err(ServeError::Tls)?,
        )),
        _ => None,
    };
    let http_tls = match (&config.tls.http_cert_file, &config.tls.http_key_file) {
        (Some(cert), Some(key)) => Some(Arc::new(
            tls::TlsReloader::load(tls::TlsSettings {
                cert: cert.clone(),
                key: key.clone(),
                // The console's certificate sign-in: verified when presented, never required.
                client_ca: config
                    .server
                    .console
                    .then(|| config.tls.client_ca_file.clone())
                    .flatten(),
                client_optional: true,
                handshake_timeout: config.tls.handshake_timeout,
                alpn: vec![b"http/1.1".to_vec()],
            })
            .map_err(|e| ServeError::Tls(format!("HTTP listener: {e}")))?,
        )),
        _ => None,
    };
    Ok((tls, http_tls))
}

/// The HTTP listener (OAuth callback, proxy, `/metrics`, `/readyz`), if there is one, and the
/// public URL (the configured one, else the listener's own address).
async fn start_http(
    config: &Config,
    listener: Option<TcpListener>,
    core: &Arc<OnceLock<Arc<Broker>>>,
    http_tls: Option<Arc<tls::TlsReloader>>,
    tls_tasks: &mut Vec<JoinHandle<()>>,
    http_stop_rx: oneshot::Receiver<()>,
) -> Result<(Option<cores::Serving>, Option<String>), ServeError> {
    let http_listener = match listener {
        Some(l) => Some(l),
        None => match config.server.http_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                ServeError::Transport(format!("cannot listen for HTTP on {addr}: {e}"))
            })?),
            None => None,
        },
    };
    let mut public_url = config.server.public_url.clone();
    let http_task = match http_listener {
        Some(l) => {
            let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(message = "HTTP listening.", addr = %addr, tls = http_tls.is_some());
            let scheme = if http_tls.is_some() { "https" } else { "http" };
            if public_url.is_none() {
                if l.local_addr().is_ok_and(|a| a.ip().is_unspecified()) {
                    tracing::warn!(message = "No public URL is set, and the HTTP listener's address names no host: proxy leases and OAuth redirects would point workers and browsers at it (itself, on their machine). Set public_url (CREDBROKER_PUBLIC_URL) to the URL they reach this broker at.", addr = %addr);
                }
                public_url = Some(format!("{scheme}://{addr}"));
            }
            if let Some(r) = &http_tls {
                tls_tasks.extend(r.watch(config.tls.reload_interval));
            } else if l.local_addr().is_ok_and(|a| !a.ip().is_loopback()) {
                tracing::warn!(message = "The HTTP listener serves plain HTTP on a non-loopback address; configure http_tls_cert_file/http_tls_key_file or put TLS in front of it (OAuth callbacks and proxy leases cross it).", addr = %addr);
            }
            let proxy_client = proxy::ProxyClient::new(
                &config.egress.policy(),
                &config.egress.proxy_systems,
                config.egress.upstream_timeout.min(Duration::from_secs(10)),
                config.proxy.read_timeout,
            )
            .map_err(ServeError::Http)?;
            let console = config.server.console.then(|| {
                console::Console::new(
                    core.clone(),
                    console::ConsoleSettings {
                        idle: config.server.console_session_idle,
                        absolute: config.server.console_session_max,
                        secure_cookie: http_tls.is_some()
                            || public_url
                                .as_deref()
                                .is_some_and(|u| u.starts_with("https://")),
                        bearer_tokens: config.tls.bearer_tokens,
                    },
                )
            });
            let deadline = config.server.request_timeout;
            let app = http::router(core.clone(), Some(proxy_client), console, deadline);
            let limits = http::HttpLimits {
                header_timeout: config.server.http_header_timeout,
                // A worker may stall an answer as long as a vendor may stall one.
                write_stall: config.proxy.read_timeout,
                connections: Arc::new(tokio::sync::Semaphore::new(
                    config.server.http_max_connections.max(1),
                )),
            };
            let tls = http_tls.clone();
            let serve = move |l, stop| {
                let (app, limits, tls) = (app.clone(), limits.clone(), tls.clone());
                async move {
                    http::serve(l, app, limits, tls, cores::stopped(stop)).await;
                    Ok(())
                }
            };
            let threads = config.server.serving_threads;
            Some(
                cores::serve_on_cores(threads, l, http_stop_rx, serve)
                    .await
                    .map_err(ServeError::Transport)?,
            )
        }
        None => None,
    };
    Ok((http_task, public_url))
}

/// Health as it stands once the broker is open (a write or the audit sink may have failed
/// while starting), and the watchers that follow every change from here on.
async fn announce_serving(broker: &Arc<Broker>, health: &HealthReporter) -> [JoinHandle<()>; 4] {
    // Subscribed before the statuses are read: a change after the read is not missed (and
    // none is announced twice).
    let watched = (broker.audit.health(), broker.write_health.subscribe());
    let writes = status_of(broker.write_health.is_ok());
    let audit = status_of(broker.audit.is_healthy());
    health.set_service_status("", audit).await;
    health.set_service_status(SERVICE_NAME, audit).await;
    health
        .set_service_status(WRITES_HEALTH_SERVICE, writes)
        .await;
    spawn_health_watchers(broker, health, watched)
}

/// Tasks that keep gRPC health current: the main services follow the audit sink, a separate
/// service follows the store's writes, and a probe tries a write every second (and the audit
/// sink, while it is failing).
fn spawn_health_watchers(
    broker: &Arc<Broker>,
    health: &HealthReporter,
    (mut audit_health, mut writes): (watch::Receiver<bool>, watch::Receiver<bool>),
) -> [JoinHandle<()>; 4] {
    // Health follows the audit sink: NOT_SERVING while it cannot be written.
    let health_audit = health.clone();
    let audit_watch = tokio::spawn(async move {
        while audit_health.changed().await.is_ok() {
            let s = status_of(*audit_health.borrow());
            health_audit.set_service_status("", s).await;
            health_audit.set_service_status(SERVICE_NAME, s).await;
        }
    });
    // A separate health service follows the store's writes (disk full, I/O errors): tokens
    // keep flowing from memory while it is NOT_SERVING, so the main service stays SERVING.
    let health_writes = health.clone();
    let write_watch = tokio::spawn(async move {
        while writes.changed().await.is_ok() {
            let s = status_of(*writes.borrow());
            health_writes
                .set_service_status(WRITES_HEALTH_SERVICE, s)
                .await;
        }
    });
    let prober = broker.clone();
    let write_probe = every_second(move || {
        let prober = prober.clone();
        async move { prober.probe_writes().await }
    });
    // On its own: a store probe stuck on a stalled disk does not hold it up.
    let checker = broker.clone();
    let audit_probe = every_second(move || {
        let checker = checker.clone();
        async move { checker.audit.recheck().await }
    });
    [audit_watch, write_watch, write_probe, audit_probe]
}

/// A health status from whether something works.
fn status_of(ok: bool) -> ServingStatus {
    if ok {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Runs `probe` once a second (a slow one delays the next, never piles up) until aborted.
fn every_second<F, Fut>(mut probe: F) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            probe().await;
        }
    })
}

/// Startup integrity check, in the background so serving does not wait for it: every stored
/// credential must still authenticate under the keyring.
fn spawn_integrity_check(broker: &Arc<Broker>) {
    let verifier = broker.clone();
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        match verifier.verify_store().await {
            Ok((systems, 0)) => tracing::info!(
                message = "Store integrity check passed.",
                systems,
                errors = 0u64,
                took_ms = started.elapsed().as_millis() as u64
            ),
            Ok((systems, errors)) => tracing::error!(
                message = "Store integrity check found records that do not decrypt or fail authentication.",
                systems,
                errors,
                took_ms = started.elapsed().as_millis() as u64
            ),
            Err(e) => {
                tracing::error!(message = "Store integrity check could not read the store.", error = %e)
            }
        }
    });
}

/// What opening a store yields: the store, the keyring holding the master key, its id, where the
/// key came from, whether the store existed before, and a replica's mirror (to serve outages
/// once the broker has started on it).
type OpenedStore = (
    Arc<dyn CredentialStore>,
    Keyring,
    u32,
    MasterKeySource,
    bool,
    Option<LoadedMirror>,
);

/// A replica's mirror, loaded from the database, that starts serving outages once the broker
/// has opened on it.
struct LoadedMirror {
    mirror: Arc<crate::store::MirroredStore>,
    /// The database was initialized and a snapshot may serve: should the database stop
    /// answering before the broker has opened, the replica starts from its snapshot, as it
    /// would had the database stopped a moment earlier, if it holds what the mirror loaded.
    snapshot_fallback: bool,
}

/// The replica snapshot's file under the data directory.
pub const REPLICA_SNAPSHOT_FILE: &str = "replica-snapshot";

/// Replicas: the database is the record of truth (its key check value verifies the master
/// key); the data directory keeps only local files and the sealed snapshot of the mirror. While
/// the database does not answer (at the first connection, while the mirror loads, or while the
/// broker opens on it: [`Opening::open`]), a replica
/// starts from its snapshot (when allowed, present and usable) or waits, not ready, until it
/// does.
async fn open_postgres(
    config: &Config,
    url: &crate::secret::SecretString,
    data_dir: &Path,
) -> Result<OpenedStore, ServeError> {
    let snapshot_path = data_dir.join(REPLICA_SNAPSHOT_FILE);
    if !config.store.replica_snapshot {
        // Off means none kept: an old one must not serve after it is turned on again.
        let _ = std::fs::remove_file(&snapshot_path);
    }
    let from_snapshot = config.store.replica_snapshot && snapshot_path.is_file();
    let loaded = match PostgresStore::connect(url.expose_secret(), config.store.ca_file.as_deref())
        .await
    {
        Ok(pg) => load_mirror(config, pg, data_dir, from_snapshot).await?,
        Err(StoreError::Unreachable(e)) if from_snapshot => {
            tracing::warn!(message = "The store is not available (no answer, or starting up or shutting down); starting from the replica snapshot.", error = %e);
            None
        }
        Err(StoreError::Unreachable(_)) => {
            let pg = connect_waiting(config, url).await?;
            load_mirror(config, pg, data_dir, false).await?
        }
        Err(e) => return Err(ServeError::Postgres(e.to_string())),
    };
    if let Some(opened) = loaded {
        return Ok(opened);
    }
    match start_from_snapshot(config, url, data_dir) {
        Ok(opened) => Ok(opened),
        Err(e) => {
            tracing::error!(message = "Cannot start from the replica snapshot; waiting for the store.", error = %e);
            let pg = connect_waiting(config, url).await?;
            // Without a snapshot allowed it waits, so `None` cannot come back; an error if it did.
            load_mirror(config, pg, data_dir, false)
                .await?
                .ok_or_else(|| ServeError::Postgres("the store did not answer".to_owned()))
        }
    }
}

/// Reads whether the store was initialized and loads every row into the mirror. A database
/// that stops answering meanwhile (a restart) is waited for, or, with `snapshot_allowed`,
/// means starting from the snapshot instead (`None`).
async fn load_mirror(
    config: &Config,
    pg: PostgresStore,
    data_dir: &Path,
    snapshot_allowed: bool,
) -> Result<Option<OpenedStore>, ServeError> {
    let pg: Arc<dyn CredentialStore> = Arc::new(pg);
    let Some(format) = startup_step(snapshot_allowed, || pg.get_meta("format_version")).await?
    else {
        return Ok(None);
    };
    let exists = format.is_some();
    let (keyring, key_id, source, file) = replica_key(config, data_dir, exists)?;
    let every = config.store.replica_snapshot_interval;
    let snapshot = config.store.replica_snapshot.then_some((file, every));
    // Every row mirrored in memory: every system stays servable while the database is away.
    let open = || crate::store::MirroredStore::open(pg.clone(), snapshot.clone());
    // A database found uninitialized (recreated?) is never bypassed by an older snapshot.
    let Some(mirrored) = startup_step(snapshot_allowed && exists, open).await? else {
        return Ok(None);
    };
    tracing::info!(
        message = "Store: PostgreSQL, mirrored in memory.",
        initialized = exists,
        systems = mirrored.mirrored_systems()
    );
    let store: Arc<dyn CredentialStore> = mirrored.clone();
    let loaded = LoadedMirror {
        mirror: mirrored,
        snapshot_fallback: snapshot_allowed && exists,
    };
    Ok(Some((store, keyring, key_id, source, false, Some(loaded))))
}

/// One start-up step against the database: tried once when a snapshot may serve instead
/// (`None` when the database does not answer), else waited for while it does not.
async fn startup_step<T, F, Fut>(
    snapshot_allowed: bool,
    mut step: F,
) -> Result<Option<T>, ServeError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    if !snapshot_allowed {
        return while_unreachable(step).await.map(Some);
    }
    match step().await.map_err(StartUpError::verdict) {
        Ok(v) => Ok(Some(v)),
        Err(Verdict::Wait(e)) => {
            tracing::warn!(message = "The store stopped answering while the replica started; starting from the replica snapshot.", error = %e);
            Ok(None)
        }
        Err(Verdict::End(e)) => Err(e),
    }
}

/// Connects to the database, waiting (not ready) while it does not answer; a database that
/// answers but refuses (a login, a missing database, a bad URL) ends the start.
async fn connect_waiting(
    config: &Config,
    url: &crate::secret::SecretString,
) -> Result<PostgresStore, ServeError> {
    let ca_file = config.store.ca_file.as_deref();
    while_unreachable(|| PostgresStore::connect(url.expose_secret(), ca_file)).await
}

/// Runs a start-up step against the database until it answers: while it does not (no answer,
/// starting up or shutting down), waits 2 s between tries, not ready, warning on the first
/// try and every 15th; any other error ends the start.
async fn while_unreachable<T, E, F, Fut>(mut step: F) -> Result<T, ServeError>
where
    E: StartUpError,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0u64;
    loop {
        let e = match step().await.map_err(StartUpError::verdict) {
            Ok(v) => return Ok(v),
            Err(Verdict::End(e)) => return Err(e),
            Err(Verdict::Wait(e)) => e,
        };
        if attempt.is_multiple_of(15) {
            tracing::warn!(message = "The store is not available (no answer, or starting up or shutting down); not ready until it is.", error = %e);
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// What a failed start-up step means for the start.
enum Verdict {
    /// The store did not answer (what it said): wait, then try the step again.
    Wait(String),
    /// The start ends with this error.
    End(ServeError),
}

/// The error of a start-up step.
trait StartUpError {
    fn verdict(self) -> Verdict;
}

/// The database's own errors (the start-up steps before the broker opens run on PostgreSQL).
impl StartUpError for StoreError {
    fn verdict(self) -> Verdict {
        match self {
            StoreError::Unreachable(e) => Verdict::Wait(e),
            e => Verdict::End(ServeError::Postgres(e.to_string())),
        }
    }
}

/// A step that judged its own error.
impl StartUpError for Verdict {
    fn verdict(self) -> Verdict {
        self
    }
}

impl StartUpError for ServeError {
    fn verdict(self) -> Verdict {
        match self {
            ServeError::Broker(BrokerOpenError::Store(StoreError::Unreachable(e))) => {
                Verdict::Wait(e)
            }
            e => Verdict::End(e),
        }
    }
}

/// The master key (checked by the broker against the store's key check value) and the
/// snapshot file sealed under a key derived from it.
fn replica_key(
    config: &Config,
    data_dir: &Path,
    exists: bool,
) -> Result<
    (
        Keyring,
        u32,
        MasterKeySource,
        crate::store::mirror::SnapshotFile,
    ),
    ServeError,
> {
    let (key, source) =
        MasterKey::load_or_generate(config.store.master_key_file.as_deref(), data_dir, exists)?;
    let key_id = key.id();
    let keyring = Keyring::new(key);
    let file = crate::store::mirror::SnapshotFile {
        path: data_dir.join(REPLICA_SNAPSHOT_FILE),
        key: keyring.derive_subkey("replica-snapshot"),
    };
    Ok((keyring, key_id, source, file))
}

/// A replica started while the database is away, serving from its snapshot; the database is
/// connected to in the background.
fn start_from_snapshot(
    config: &Config,
    url: &crate::secret::SecretString,
    data_dir: &Path,
) -> Result<OpenedStore, ServeError> {
    start_from_snapshot_if(config, url, data_dir, None)?
        .ok_or_else(|| ServeError::Postgres("the replica snapshot did not start".to_owned()))
}

/// [`start_from_snapshot`]; with `agreeing`, only when the snapshot holds the systems and
/// callers that loaded mirror holds (`None` when it does not).
fn start_from_snapshot_if(
    config: &Config,
    url: &crate::secret::SecretString,
    data_dir: &Path,
    agreeing: Option<&crate::store::MirroredStore>,
) -> Result<Option<OpenedStore>, ServeError> {
    use crate::store::MirroredStore;
    let (keyring, key_id, source, file) = replica_key(config, data_dir, true)?;
    // The background connection starts only with a start from the snapshot.
    let pending = || -> Arc<dyn CredentialStore> {
        crate::store::pending::PendingPostgres::connect_in_background(
            url.clone(),
            config.store.ca_file.clone(),
        )
    };
    let every = config.store.replica_snapshot_interval;
    let started = match agreeing {
        None => MirroredStore::from_snapshot(pending(), file, every).map(Some),
        Some(loaded) => MirroredStore::from_snapshot_agreeing(pending, file, every, loaded),
    };
    let Some(mirrored) = started.map_err(|e| ServeError::Postgres(e.to_string()))? else {
        return Ok(None);
    };
    // Serving already; handed back so that its last snapshot is written at a graceful stop.
    let served = LoadedMirror {
        mirror: mirrored.clone(),
        snapshot_fallback: false,
    };
    Ok(Some((
        mirrored,
        keyring,
        key_id,
        source,
        false,
        Some(served),
    )))
}

/// The master key for the sled store in `data_dir`, checked against its `key.check` (or
/// generated, for a new store), unless the directory was copied under a new key.
fn sled_keyring(
    key_file: Option<&Path>,
    data_dir: &Path,
    store_exists: bool,
) -> Result<(Keyring, u32, MasterKeySource), ServeError> {
    if let Some(to) = rekey::superseded(data_dir) {
        let dir = data_dir.to_path_buf();
        return Err(ServeError::Superseded { dir, to });
    }
    let (key, source) = MasterKey::load_or_generate(key_file, data_dir, store_exists)?;
    let key_id = key.id();
    let keyring = Keyring::new(key);
    // Before the store is opened: sled writes to its files on open, and a wrong key
    // must leave the data directory exactly as it was.
    if !verify_key_check_file(data_dir, &keyring, store_exists)? {
        return Err(ServeError::Broker(BrokerOpenError::WrongKey));
    }
    Ok((keyring, key_id, source))
}

/// The embedded sled store in the data directory, opened only once the master key is known to
/// be the right one.
async fn open_sled(config: &Config, data_dir: &Path) -> Result<OpenedStore, ServeError> {
    let store_exists = SledStore::exists_in(data_dir);
    let initialized = store_exists || data_dir.join(crate::crypto::keys::KEY_CHECK_FILE).exists();
    let key_file = config.store.master_key_file.as_deref();
    let (keyring, key_id, source) = sled_keyring(key_file, data_dir, store_exists)?;
    // Held for the broker's life (sled's own lock goes while it reopens a failed store).
    let lock = crate::store::sled::DirLock::take(data_dir)?;
    let dir = data_dir.to_path_buf();
    let cache = config.store.cache_mib;
    let store = tokio::task::spawn_blocking(move || SledStore::open_with_cache(&dir, cache))
        .await
        .map_err(|e| ServeError::Transport(e.to_string()))??;
    if let Err(e) = restrict_data_dir(data_dir) {
        tracing::warn!(message = "Could not restrict the store's file modes.", error = %e);
    }
    Ok((
        Arc::new(ReopeningSledStore::new(store, data_dir, lock)) as Arc<dyn CredentialStore>,
        keyring,
        key_id,
        source,
        initialized,
        None,
    ))
}

/// Where and how the audit trail is written.
fn audit_config(config: &Config, data_dir: &Path) -> AuditConfig {
    AuditConfig {
        file: if config.audit.file_off {
            None
        } else {
            Some(
                config
                    .audit
                    .file
                    .clone()
                    .unwrap_or_else(|| data_dir.join(AUDIT_FILE)),
            )
        },
        stdout: config.audit.stdout,
        max_bytes: config.audit.max_bytes,
        keep: config.audit.keep,
        fail_closed: config.audit.fail_closed,
    }
}

async fn open_broker(
    config: &Config,
    public_url: Option<String>,
    wrap_store: Option<StoreWrapper>,
) -> Result<(Arc<Broker>, Option<Arc<crate::store::MirroredStore>>), ServeError> {
    let data_dir = config.store.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|error| ServeError::DataDir {
        path: data_dir.clone(),
        error,
    })?;
    if let Err(e) = restrict_data_dir(&data_dir) {
        // A volume the broker does not own (a mounted secret, a group-writable volume).
        tracing::warn!(message = "Could not make the data directory private (0700, files 0600).", error = %e);
    }
    let (mut store, keyring, key_id, source, initialized, mirror) = match &config.store.url {
        Some(url) => open_postgres(config, url, &data_dir).await?,
        None => open_sled(config, &data_dir).await?,
    };
    match &source {
        MasterKeySource::Generated(path) => tracing::warn!(
            message = "Generated a new master key inside the data directory. Production keeps the master key elsewhere (CREDBROKER_MASTER_KEY_FILE) and backs it up; without it the stored credentials cannot be decrypted.",
            path = %path.display()
        ),
        MasterKeySource::File(path) => {
            tracing::info!(message = "Master key loaded.", path = %path.display(), key_id = %format!("{key_id:08x}"))
        }
    }
    if let Some(wrap) = &wrap_store {
        store = wrap(store);
    }
    let (egress, http, registry) = backends(config).map_err(ServeError::Http)?;
    let settings = broker_settings(config, egress, public_url, initialized, &data_dir);
    let opening = Opening {
        config,
        data_dir: &data_dir,
        wrap_store: wrap_store.as_ref(),
        first_key: keyring.key_check_value(),
        registry,
        settings,
    };
    let (broker, admin_token, mirror) = opening.open(store, keyring, mirror).await?;
    if admin_token.is_some() {
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        tracing::info!(message = "Created the admin caller; its token is in the admin token file.", path = %path.display());
    }
    webhooks::start(&broker, &http, &config.webhooks);
    Ok((broker, mirror))
}

/// The opened broker, the bootstrap admin's token when it was created, and a replica's mirror.
type OpenedBroker = (
    Arc<Broker>,
    Option<crate::secret::SecretString>,
    Option<Arc<crate::store::MirroredStore>>,
);

/// What every try at opening the broker on a store shares.
struct Opening<'a> {
    config: &'a Config,
    data_dir: &'a Path,
    wrap_store: Option<&'a StoreWrapper>,
    /// The key check value of the master key the first try loaded.
    first_key: Vec<u8>,
    registry: Registry,
    settings: BrokerSettings,
}

impl Opening<'_> {
    /// Opens the broker on `store`. A database that stops answering while the broker reads its
    /// format record, keys and callers is waited for like every start-up step, or, for a
    /// replica whose snapshot may serve, means starting from the snapshot. A replica's mirror
    /// answers for the database once the broker has opened on it; it comes back with the broker
    /// (its last snapshot is written at a graceful stop).
    async fn open(
        &self,
        store: Arc<dyn CredentialStore>,
        keyring: Keyring,
        mirror: Option<LoadedMirror>,
    ) -> Result<OpenedBroker, ServeError> {
        let mut keyring = Some(keyring);
        if let Some(m) = mirror.as_ref().filter(|m| m.snapshot_fallback) {
            match self.try_open(store.clone(), keyring.take()).await {
                Ok((broker, token)) => {
                    m.mirror.serve_outages();
                    return Ok((broker, token, Some(m.mirror.clone())));
                }
                Err(Verdict::End(e)) => return Err(e),
                Err(Verdict::Wait(e)) => {
                    if let Some((snapshot, served)) = self.snapshot_agreeing(&m.mirror, &e) {
                        // The loaded mirror goes: its tasks hold it weakly and end with it.
                        drop((store, mirror));
                        let (broker, token) = self.waiting(snapshot, None).await?;
                        return Ok((broker, token, Some(served)));
                    }
                }
            }
        }
        let (broker, token) = self.waiting(store, keyring).await?;
        if let Some(m) = &mirror {
            m.mirror.serve_outages();
        }
        Ok((broker, token, mirror.map(|m| m.mirror)))
    }

    /// The replica's snapshot as the store (wrapped like the first) and its mirror, when it
    /// holds what `loaded` holds; else `None` (logged), and the start waits for the database.
    fn snapshot_agreeing(
        &self,
        loaded: &crate::store::MirroredStore,
        unanswered: &str,
    ) -> Option<(Arc<dyn CredentialStore>, Arc<crate::store::MirroredStore>)> {
        tracing::warn!(message = "The store stopped answering while the broker opened; starting from the replica snapshot if it holds what the mirror loaded.", error = %unanswered);
        let url = self.config.store.url.as_ref()?;
        match start_from_snapshot_if(self.config, url, self.data_dir, Some(loaded)) {
            Ok(Some((snapshot, .., served))) => {
                let snapshot = match self.wrap_store {
                    Some(wrap) => wrap(snapshot),
                    None => snapshot,
                };
                Some((snapshot, served?.mirror))
            }
            Ok(None) => {
                tracing::warn!(
                    message = "The replica snapshot is behind the database; waiting for the store."
                );
                None
            }
            Err(e) => {
                tracing::error!(message = "Cannot start from the replica snapshot; waiting for the store.", error = %e);
                None
            }
        }
    }

    /// Tries until the store answers.
    async fn waiting(
        &self,
        store: Arc<dyn CredentialStore>,
        mut keyring: Option<Keyring>,
    ) -> Result<(Arc<Broker>, Option<crate::secret::SecretString>), ServeError> {
        while_unreachable(|| {
            let ring = keyring.take();
            let store = store.clone();
            async move { self.try_open(store, ring).await }
        })
        .await
    }

    /// One try. Each try after the first loads the master key again: a keyring is never copied.
    async fn try_open(
        &self,
        store: Arc<dyn CredentialStore>,
        keyring: Option<Keyring>,
    ) -> Result<(Arc<Broker>, Option<crate::secret::SecretString>), Verdict> {
        let ring = match keyring {
            Some(ring) => ring,
            None => {
                reload_keyring(self.config, self.data_dir, &self.first_key).map_err(Verdict::End)?
            }
        };
        let (registry, settings) = (self.registry.clone(), self.settings.clone());
        Broker::open(store, ring, registry, settings)
            .await
            .map_err(|e| ServeError::from(e).verdict())
    }
}

/// The master key again, for another try at opening the broker: the one the first try loaded
/// (`first`, its key check value), or the start ends (the key file was replaced meanwhile).
fn reload_keyring(config: &Config, data_dir: &Path, first: &[u8]) -> Result<Keyring, ServeError> {
    let file = config.store.master_key_file.as_deref();
    let (key, _) = MasterKey::load_or_generate(file, data_dir, true)?;
    let keyring = Keyring::new(key);
    if !keyring.verify_key_check_value(first) {
        return Err(ServeError::Key(crate::crypto::keys::KeyError::Changed));
    }
    Ok(keyring)
}

/// The egress policy, the outbound HTTP client and the vendors' backends the configuration
/// asks for.
fn backends(
    config: &Config,
) -> Result<(crate::backends::EgressPolicy, HttpClient, Registry), String> {
    let egress = config.egress.policy();
    let http = HttpClient::new(
        config.egress.upstream_timeout,
        config.egress.max_upstream_body_bytes,
        &egress,
    )?;
    let registry = Registry::new(&BackendContext {
        http: http.clone(),
        egress: egress.clone(),
        oauth: config.vendors.clone(),
    });
    Ok((egress, http, registry))
}

/// The broker's settings from the configuration.
fn broker_settings(
    config: &Config,
    egress: crate::backends::EgressPolicy,
    public_url: Option<String>,
    initialized: bool,
    data_dir: &Path,
) -> BrokerSettings {
    BrokerSettings {
        egress,
        static_header_ttl: config.refresh.static_header_ttl,
        refresh: RefreshSettings {
            ahead_fraction: config.refresh.ahead_fraction,
            ahead_min: config.refresh.ahead_min,
            max_concurrent: config.refresh.max_concurrent,
            retry_max: config.refresh.retry_max,
            ..RefreshSettings::default()
        },
        public_url,
        authorization_ttl: config.refresh.authorization_ttl,
        keepalive_interval: config.refresh.keepalive_interval,
        keepalive_margin: config.refresh.keepalive_margin,
        expect_initialized: initialized,
        adopt_unauthenticated_records: config.store.adopt_unauthenticated_records,
        admin_token_file: Some(data_dir.join(ADMIN_TOKEN_FILE)),
        start_token: Default::default(),
        default_static_delivery: config.proxy.default_static_delivery,
        lease_ttl: config.proxy.lease_ttl,
        proxy_max_body_bytes: config.proxy.max_body_bytes,
        check_timeout: config.egress.upstream_timeout,
        check_interval: config.refresh.check_interval,
        checks_per_vendor: config.refresh.checks_per_vendor,
        audit: audit_config(config, data_dir),
        quota: config.quota.clone(),
        bootstrap_admin: true,
    }
}

/// Makes the data directory and the sled store's directory 0700, and the broker's own files in
/// them 0600: other local users read neither sealed records nor the audit trail. Files the
/// broker did not create are left alone.
fn restrict_data_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    mode(dir, 0o700)?;
    let staged = crate::admin_token::companions(ADMIN_TOKEN_FILE);
    for name in [
        AUDIT_FILE,
        ADMIN_TOKEN_FILE,
        "master.key",
        crate::crypto::keys::KEY_CHECK_FILE,
    ]
    .into_iter()
    .chain(staged.iter().map(String::as_str))
    {
        let p = dir.join(name);
        if p.is_file() {
            mode(&p, 0o600)?;
        }
    }
    let store = SledStore::path_in(dir);
    if store.is_dir() {
        mode(&store, 0o700)?;
        for entry in std::fs::read_dir(&store)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                mode(&entry.path(), 0o600)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

    /// A plaintext gRPC connection is served with Nagle off (tonic leaves sockets handed to
    /// `serve_with_incoming` as accepted), and past the cap a new one is closed at once.
    #[tokio::test]
    async fn plaintext_grpc_connections_are_tuned_and_capped() {
        use tokio_stream::StreamExt as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let incoming = plaintext_incoming(listener, slots.clone(), Duration::from_secs(5));
        tokio::pin!(incoming);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let served = incoming.next().await.unwrap().unwrap();
        assert!(served.get_ref().nodelay().unwrap());
        assert_eq!(slots.available_permits(), 0);
        // Past the cap: closed at once (its read ends), while the stream serves nothing.
        let mut refused = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::select! {
            read = tokio::io::AsyncReadExt::read(&mut refused, &mut buf) => read,
            next = incoming.next() => panic!("served past the cap: {:?}", next.is_some()),
        };
        drop(served);
        let _next = tokio::net::TcpStream::connect(addr).await.unwrap();
        let next = incoming.next().await.unwrap().unwrap();
        assert!(next.get_ref().nodelay().unwrap());
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    /// A start-up step is tried again while the database does not answer (a restart between
    /// connecting and loading the mirror); any other error ends the start at once.
    #[tokio::test(start_paused = true)]
    async fn a_start_up_step_waits_out_only_an_unreachable_store() {
        let tries = AtomicU32::new(0);
        let got = while_unreachable(|| async {
            match tries.fetch_add(1, SeqCst) {
                0..=2 => Err(StoreError::Unreachable("starting up".into())),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(got.ok(), Some(3));
        let tries = AtomicU32::new(0);
        let got: Result<(), _> = while_unreachable(|| async {
            tries.fetch_add(1, SeqCst);
            Err(StoreError::Backend("password authentication failed".into()))
        })
        .await;
        assert!(matches!(got, Err(ServeError::Postgres(_))));
        assert_eq!(tries.load(SeqCst), 1);
    }

    /// With a snapshot allowed, a start-up step the database does not answer is tried once and
    /// yields `None` (start from the snapshot); other errors still end the start.
    #[tokio::test(start_paused = true)]
    async fn a_start_up_step_gives_way_to_the_snapshot_when_one_may_serve() {
        let tries = AtomicU32::new(0);
        let got = startup_step(true, || async {
            tries.fetch_add(1, SeqCst);
            Err::<(), _>(StoreError::Unreachable("restarting".into()))
        })
        .await;
        assert!(matches!(got, Ok(None)));
        assert_eq!(tries.load(SeqCst), 1);
        let got = startup_step(true, || async {
            Err::<(), _>(StoreError::Corrupt("x".into()))
        });
        assert!(matches!(got.await, Err(ServeError::Postgres(_))));
        let tries = AtomicU32::new(0);
        let got = startup_step(false, || async {
            match tries.fetch_add(1, SeqCst) {
                0 => Err(StoreError::Unreachable("restarting".into())),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(got.ok().flatten(), Some(1));
    }
}
