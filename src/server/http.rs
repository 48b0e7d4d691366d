//! The HTTP listener: the admin console (`/console`, see `console`), the OAuth callback page
//! (`/oauth/callback`), the delivery proxy
//! (`/proxy/...`), Prometheus metrics (`/metrics`) and plain HTTP probes (`/healthz`: the
//! process is up; `/readyz`: the store is open and the audit trail writable; `/readyz/writes`:
//! writes reach the store).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use axum::extract::{FromRef, Query, Request, State};
use axum::http::StatusCode;
use axum::response::Html;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::console::Console;
use super::proxy::ProxyClient;
use crate::broker::connect::{LinkOutcome, Outcome};
use crate::broker::Broker;

/// What the HTTP handlers share: the gRPC service's core cell and the proxy's upstream client
/// (cloned per request, so only pointers).
#[derive(Clone)]
struct HttpState {
    core: Arc<OnceLock<Arc<Broker>>>,
    proxy: Option<Arc<ProxyClient>>,
    console: Option<Arc<Console>>,
}

impl FromRef<HttpState> for Arc<OnceLock<Arc<Broker>>> {
    fn from_ref(s: &HttpState) -> Self {
        s.core.clone()
    }
}

/// The Connect button's form (a link's id and token): anything larger is refused with 413
/// before it is parsed, not read up to axum's default 2 MiB by anyone who can reach the port.
const START_FORM_BYTES: usize = 8 * 1024;

/// The HTTP routes, sharing the gRPC service's core cell; `proxy` forwards proxied calls;
/// `console` adds the admin console under `/console`. A request to any route but the proxy's
/// (whose calls stream and have their own limits) must be whole and answered within
/// `deadline`, body included, else it gets 503 and its connection is closed: a slowly trickled
/// body cannot hold one of the listener's connections for long.
pub fn router(
    core: Arc<OnceLock<Arc<Broker>>>,
    proxy_client: Option<ProxyClient>,
    console: Option<Arc<Console>>,
    deadline: std::time::Duration,
) -> Router {
    let pages = console.clone().map(super::console::router);
    let app = Router::new()
        .route("/oauth/callback", get(callback))
        .route(
            "/oauth/start",
            get(start_link_page)
                .post(start_link)
                .layer(axum::extract::DefaultBodyLimit::max(START_FORM_BYTES)),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/readyz/writes", get(readyz_writes))
        // The proxy's paths are matched by prefix, not by a route: a route's wildcard would be
        // percent-decoded into a parameter on every proxied call, which the proxy never reads.
        .fallback(proxy)
        .with_state(HttpState {
            core,
            proxy: proxy_client.map(Arc::new),
            console,
        });
    let app = match pages {
        Some(p) => app.merge(p),
        None => app,
    };
    // Matched routes only: the proxy is the fallback.
    app.route_layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| async move {
            within(deadline, next.run(req)).await
        },
    ))
}

/// `answer`, or 503 (and the connection closed) once `deadline` has passed. Not 408: browsers
/// send a request again by themselves after a 408, and a request that did arrive whole may
/// still complete (the broker's changes run to the end on their own).
async fn within(
    deadline: std::time::Duration,
    answer: impl std::future::Future<Output = Response>,
) -> Response {
    match tokio::time::timeout(deadline, answer).await {
        Ok(r) => r,
        Err(_) => {
            let mut r = page(
                503,
                "Took too long",
                "The request was not received and answered in time. If it was sent whole, \
                 what it asked for may still complete: check before sending it again.",
            )
            .into_response();
            r.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            r
        }
    }
}

async fn readyz(State(core): State<Arc<OnceLock<Arc<Broker>>>>) -> (StatusCode, &'static str) {
    match core.get() {
        None => (StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
        Some(b) if b.draining.load(std::sync::atomic::Ordering::Relaxed) => {
            (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
        }
        Some(b) if !b.audit.is_healthy() => {
            (StatusCode::SERVICE_UNAVAILABLE, "audit trail unwritable\n")
        }
        Some(_) => (StatusCode::OK, "ready\n"),
    }
}

/// 200 while writes reach the store, 503 with the reason while they fail (`GetAccessToken` is
/// still served then; `/readyz` stays 200).
async fn readyz_writes(State(core): State<Arc<OnceLock<Arc<Broker>>>>) -> (StatusCode, String) {
    match core.get() {
        None => (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_owned()),
        Some(b) => match b.write_health.reason() {
            None => (StatusCode::OK, "writes ok\n".to_owned()),
            Some(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("writes failing: {reason}\n"),
            ),
        },
    }
}

async fn metrics(State(core): State<Arc<OnceLock<Arc<Broker>>>>) -> Response {
    let counts = match core.get() {
        Some(broker) => broker.system_counts().await,
        None => None,
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::METRICS.render(counts.as_ref(), core.get().map(|b| b.write_health.is_ok())),
    )
        .into_response()
}

async fn callback(
    State(http): State<HttpState>,
    Query(params): Query<HashMap<String, String>>,
) -> (StatusCode, Html<String>) {
    let (status, title, message, next) = callback_outcome(&http.core, http.console, params).await;
    page_then(status, &title, &message, next.as_deref())
}

/// What the callback did: its HTTP status, the page's title and message, and where the browser
/// goes next (a flow started from the console: on to the system's page, which shows the
/// outcome).
async fn callback_outcome(
    core: &OnceLock<Arc<Broker>>,
    console: Option<Arc<Console>>,
    params: HashMap<String, String>,
) -> (u16, String, String, Option<String>) {
    let Some(broker) = core.get() else {
        let m = "credbroker is starting; reload this page in a moment.";
        return (503, "Starting".to_owned(), m.to_owned(), None);
    };
    let state = params.get("state").cloned().unwrap_or_default();
    // A state this broker did not make starts nothing (no store read, no background work).
    if !broker.state_is_ours(&state) {
        let p = broker.complete_authorization(&params).await;
        audit_callback(broker, &p).await;
        let next = console.and_then(|c| hand_off(&c, &state, &p));
        return (http_status(p.outcome), p.title, p.message, next);
    }
    // The code exchange belongs to no browser: a closed tab (or the route's deadline) must not
    // drop a grant the vendor has already issued (the code is single use), so it runs to the
    // end on its own and tells the console how it ended.
    let b = broker.clone();
    let done = broker.run_detached(async move {
        let p = b.complete_authorization(&params).await;
        audit_callback(&b, &p).await;
        let next = console.and_then(|c| hand_off(&c, &state, &p));
        (p, next)
    });
    match done.await {
        Some((p, next)) => (http_status(p.outcome), p.title, p.message, next),
        None => {
            let m = "credbroker is stopping; try again in a moment.";
            (503, "Stopping".to_owned(), m.to_owned(), None)
        }
    }
}

/// Tells the console how a flow it started ended, and where the browser goes next: only when
/// the callback settled an authorization (not one that matched none, such as a duplicate of a
/// callback still under way, nor one to be sent again).
fn hand_off(
    console: &Console,
    state: &str,
    p: &crate::broker::connect::CallbackPage,
) -> Option<String> {
    if p.system_id.is_none() || p.outcome == Outcome::TryAgain {
        return None;
    }
    console.connect_finished(state, p.outcome == Outcome::Connected, &p.message)
}

/// Audits a callback; one whose state matched no authorization is anonymous traffic and counts
/// against the refusal budget (it cannot rotate the trail away).
async fn audit_callback(broker: &Broker, p: &crate::broker::connect::CallbackPage) {
    if p.system_id.is_none() && !broker.audit.admit_refusal() {
        return;
    }
    let code = if p.outcome == Outcome::Connected {
        "OK"
    } else {
        "FAILED_PRECONDITION"
    };
    let _ = broker
        .audit_record("OAuthCallback", None, p.system_id.as_deref(), code, None)
        .await;
}

/// A signed "Connect" link from a webhook, opened: a page with one button (a POST), so that
/// link previews and scanners, which only GET, start nothing.
async fn start_link_page(
    State(core): State<Arc<OnceLock<Arc<Broker>>>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let Some(broker) = core.get() else {
        return starting();
    };
    match broker.check_connect_link(&params).await {
        Ok(system_id) => {
            let hidden: String = ["system", "v", "exp", "sig"]
                .iter()
                .map(|k| {
                    format!(
                        "<input type=\"hidden\" name=\"{k}\" value=\"{}\">",
                        escape(params.get(*k).map(String::as_str).unwrap_or_default())
                    )
                })
                .collect();
            let body = format!(
                "<!doctype html><html><head><meta charset=\"utf-8\"><title>Connect – credbroker</title>\
                 </head><body><h1>Connect {id}</h1><p>The vendor refused this system's grant; \
                 connect it again with the account the sync should act as.</p>\
                 <form method=\"post\" action=\"\">{hidden}\
                 <button type=\"submit\">Connect {id}</button></form></body></html>",
                id = escape(&system_id)
            );
            no_store((StatusCode::OK, Html(body)).into_response())
        }
        Err(outcome) => {
            audit_link(broker, &params, &outcome).await;
            link_refusal(outcome)
        }
    }
}

/// The Connect button: checks the link again, starts the authorization and sends the browser to
/// the vendor's consent page.
async fn start_link(
    State(core): State<Arc<OnceLock<Arc<Broker>>>>,
    body: axum::body::Bytes,
) -> Response {
    let Some(broker) = core.get() else {
        return starting();
    };
    let params: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let outcome = broker.follow_connect_link(&params).await;
    audit_link(broker, &params, &outcome).await;
    match outcome {
        LinkOutcome::Consent(url) => no_store(axum::response::Redirect::to(&url).into_response()),
        other => link_refusal(other),
    }
}

/// Audits a link's use; refusals of forged links count against the anonymous-refusal budget
/// (they cannot rotate the trail away).
async fn audit_link(broker: &Broker, params: &HashMap<String, String>, outcome: &LinkOutcome) {
    let (code, system_id) = match outcome {
        LinkOutcome::Consent(_) => ("OK", params.get("system").map(String::as_str)),
        LinkOutcome::Stale(_) if broker.audit.admit_refusal() => (
            "FAILED_PRECONDITION",
            params.get("system").map(String::as_str),
        ),
        LinkOutcome::Invalid if broker.audit.admit_refusal() => ("PERMISSION_DENIED", None),
        LinkOutcome::Stale(_) | LinkOutcome::Invalid => return,
    };
    let _ = broker
        .audit_record("ConnectLink", None, system_id, code, None)
        .await;
}

fn link_refusal(outcome: LinkOutcome) -> Response {
    let page = match outcome {
        LinkOutcome::Stale(why) => page(410, "Link no longer valid", &why),
        _ => page(
            403,
            "Not a valid link",
            "This link was not made by this credbroker, or it was altered.",
        ),
    };
    no_store(page.into_response())
}

/// Pages about a link are not cached, and never pass the link on as a referrer.
fn no_store(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    h.insert(
        axum::http::header::REFERRER_POLICY,
        axum::http::HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        axum::http::header::X_FRAME_OPTIONS,
        axum::http::HeaderValue::from_static("DENY"),
    );
    // No `form-action`: Chromium and WebKit apply it to the redirects a form's answer makes
    // too, and the Connect button's answer is a redirect to the vendor's consent page.
    h.insert(
        axum::http::header::CONTENT_SECURITY_POLICY,
        axum::http::HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    );
    r
}

fn starting() -> Response {
    page(
        503,
        "Starting",
        "credbroker is starting; reload this page in a moment.",
    )
    .into_response()
}

async fn proxy(State(s): State<HttpState>, req: Request) -> Response {
    let proxied = req
        .uri()
        .path()
        .strip_prefix("/proxy/")
        .is_some_and(|rest| !rest.is_empty());
    if !proxied {
        return StatusCode::NOT_FOUND.into_response();
    }
    match s.core.get() {
        Some(broker) => super::proxy::serve(broker, s.proxy.as_deref(), req).await,
        None => (StatusCode::SERVICE_UNAVAILABLE, "credbroker is starting").into_response(),
    }
}

/// The HTTP status the admin's browser gets for a callback's outcome.
fn http_status(outcome: Outcome) -> u16 {
    match outcome {
        Outcome::Connected => 200,
        Outcome::Invalid => 400,
        Outcome::NotFound => 404,
        Outcome::Conflict => 409,
        Outcome::Internal => 500,
        Outcome::VendorFailed => 502,
        Outcome::Unavailable | Outcome::TryAgain => 503,
    }
}

fn page(status: u16, title: &str, message: &str) -> (StatusCode, Html<String>) {
    page_then(status, title, message, None)
}

/// [`page`], leading on to `next` (a path on this listener) at once and by a link.
fn page_then(
    status: u16,
    title: &str,
    message: &str,
    next: Option<&str>,
) -> (StatusCode, Html<String>) {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (refresh, link) = match next {
        Some(p) => (
            format!(
                "<meta http-equiv=\"refresh\" content=\"0; url={}\">",
                escape(p)
            ),
            format!(
                "<p><a id=\"back\" href=\"{}\">Back to the console</a></p>",
                escape(p)
            ),
        ),
        None => Default::default(),
    };
    (
        code,
        Html(format!(
            "<!doctype html><html><head><meta charset=\"utf-8\">{refresh}<title>{t} – credbroker</title>\
             <style>body{{font-family:sans-serif;max-width:40em;margin:4em auto;line-height:1.5}}\
             </style></head><body><h1>{t}</h1><p>{m}</p>{link}</body></html>",
            t = escape(title),
            m = escape(message)
        )),
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A connection's byte stream: plain TCP, or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// `tcp` itself without TLS; else the TLS stream once its handshake completes in time, with
/// the names of the client certificate it verified (if any).
async fn secure(
    tcp: tokio::net::TcpStream,
    tls: Option<&super::tls::TlsReloader>,
) -> Option<(Box<dyn Io>, super::tls::ClientNames)> {
    let Some(r) = tls else {
        return Some((Box::new(tcp), super::tls::ClientNames::default()));
    };
    match tokio::time::timeout(r.handshake_timeout(), r.acceptor().accept(tcp)).await {
        Ok(Ok(stream)) => {
            let names = super::tls::ClientNames(Arc::new(super::tls::client_names(&stream)));
            Some((Box::new(stream), names))
        }
        Ok(Err(e)) => {
            tracing::debug!(message = "HTTP TLS handshake failed.", error = %e);
            None
        }
        Err(_) => {
            tracing::debug!(message = "HTTP TLS handshake timed out.");
            None
        }
    }
}

/// Limits of the HTTP listener, which may face the internet (OAuth callbacks, the proxy).
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// A request head (the first, or the next on an idle keep-alive connection) must arrive
    /// whole within this, else the connection is closed.
    pub header_timeout: std::time::Duration,
    /// Every write of an answer must make progress within this (the peer reads it), else the
    /// connection is closed and its request ends (see `stall`).
    pub write_stall: std::time::Duration,
    /// One permit per open connection, shared by every serving thread; past the last one a new
    /// connection is closed at once.
    pub connections: Arc<tokio::sync::Semaphore>,
}

/// Serves `app` on `listener` until `stop` fires, then lets open connections finish their
/// requests (the caller bounds how long). Slow or idle connections are cut by the header
/// timeout, and past the connection cap new ones are closed, so hundreds of them cannot starve
/// OAuth callbacks, the proxy or probes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: HttpLimits,
    tls: Option<Arc<super::tls::TlsReloader>>,
    stop: impl std::future::Future<Output = ()>,
) {
    let (permits, header_timeout) = (limits.connections, limits.header_timeout);
    let write_stall = limits.write_stall;
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let connections = tokio_util::task::TaskTracker::new();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            a = listener.accept() => a,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of descriptors or the like: back off a little instead of spinning.
                tracing::warn!(message = "HTTP accept failed.", error = %e);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            crate::metrics::METRICS.http_refused();
            continue;
        };
        // Small responses must not wait for Nagle and delayed ACKs.
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let mut closing = closing.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            // The handshake runs off the accept loop, bounded like the gRPC listener's.
            let Some((io, names)) = secure(tcp, tls.as_deref()).await else {
                return;
            };
            // Every request carries the connection's verified client certificate names (the
            // network cannot set an extension; a request's own headers never reach this). Most
            // connections have none: their requests (the proxy's) get no extension map at all.
            let app = tower::ServiceBuilder::new()
                .map_request(move |mut r: hyper::Request<hyper::body::Incoming>| {
                    if !names.0.is_empty() {
                        r.extensions_mut().insert(names.clone());
                    }
                    r
                })
                .service(app);
            let service = hyper_util::service::TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(
                    hyper_util::rt::TokioIo::new(super::stall::StallCut::new(io, write_stall)),
                    service,
                );
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = closing.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(permit);
        });
    }
    // New connections are refused from here on, not left waiting in the backlog.
    drop(listener);
    let _ = closing_tx.send(true);
    connections.close();
    connections.wait().await;
}
