//! The proxy's HTTP side: the `/proxy/{system_id}/…` handler and the upstream client. The
//! broker decides who may call what (`crate::broker::proxy`); this module moves the bytes.
//!
//! It forwards only to the registered host: absolute-form requests, foreign `Host` headers and
//! path escapes (`..`, `.`, encoded slashes or dots, backslashes) are refused; upstream redirects
//! are not followed (a `Location` under the same base is rewritten to the proxy); hop-by-hop
//! headers are dropped and the worker's `Authorization` and cookies never reach the vendor, nor
//! the vendor's session cookies the worker; the egress guard applies to every connection; both
//! bodies stream within a size cap.

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio_stream::StreamExt;

use crate::backends::ratelimit::read as read_signals;
use crate::broker::proxy::{
    is_clean_path, mask_path, under_base, ProxyGrant, ProxyRefusal, UNUSABLE_BASE,
};
use crate::broker::quota::QuotaPermit;
use crate::broker::tokens::IssuedToken;
use crate::broker::Broker;

/// Answers up to this size with a known length are passed whole instead of streamed.
const SMALL_BODY: u64 = 64 * 1024;

/// Methods never forwarded: TRACE/TRACK echo the request (the injected credential with it),
/// CONNECT would open a tunnel past every check.
const REFUSED_METHODS: &[&str] = &["TRACE", "TRACK", "CONNECT"];

/// Headers that describe one hop, never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

type Connector = hyper_rustls::HttpsConnector<crate::backends::connector::EgressConnector>;
type Upstream = hyper_util::client::legacy::Client<Connector, Body>;

/// The proxy's upstream client: hyper's pooled HTTP/1.1 client over rustls (webpki roots), whose
/// connections pass the egress guard, directly or through the egress proxy
/// ([`crate::backends::connector`]); it never follows redirects.
#[derive(Clone)]
pub struct ProxyClient {
    client: Upstream,
    /// Systems routed otherwise than `no_proxy` says, and their clients.
    routed: std::collections::HashMap<String, Upstream>,
    read_timeout: Duration,
}

impl std::fmt::Debug for ProxyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyClient")
            .field("read_timeout", &self.read_timeout)
            .finish_non_exhaustive()
    }
}

impl ProxyClient {
    /// A client whose every connection passes `egress`; `read_timeout` bounds the wait for the
    /// answer's head and for each body chunk.
    pub fn new(
        egress: &crate::backends::egress::EgressPolicy,
        routes: &std::collections::HashMap<String, crate::backends::egress::ProxyRoute>,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Result<Self, String> {
        use crate::backends::egress::ProxyRoute;
        let tls = tls_config()?;
        let build = |route| -> Result<Upstream, String> {
            let connector = crate::backends::connector::EgressConnector::new(
                egress,
                route,
                connect_timeout,
                tls.clone(),
            )?;
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http()
                .enable_http1()
                .wrap_connector(connector);
            Ok(
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(90))
                    .build(https),
            )
        };
        let client = build(ProxyRoute::Auto)?;
        let (direct, proxied) = (build(ProxyRoute::Direct)?, build(ProxyRoute::Proxy)?);
        let routed = routes
            .iter()
            .map(|(id, route)| {
                let c = match route {
                    ProxyRoute::Auto => client.clone(),
                    ProxyRoute::Direct => direct.clone(),
                    ProxyRoute::Proxy => proxied.clone(),
                };
                (id.clone(), c)
            })
            .collect();
        Ok(Self {
            client,
            routed,
            read_timeout,
        })
    }

    /// The client for `system_id`'s calls.
    fn for_system(&self, system_id: &str) -> &Upstream {
        self.routed.get(system_id).unwrap_or(&self.client)
    }
}

/// rustls with the web's roots (vendors, and an `https://` egress proxy).
fn tls_config() -> Result<rustls::ClientConfig, String> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    Ok(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// Serves one proxied request (`/proxy/{system_id}/…`).
pub async fn serve(broker: &Broker, client: Option<&ProxyClient>, req: Request) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let raw_path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let rest = raw_path.strip_prefix("/proxy/").unwrap_or("");
    let (system_id, tail) = match rest.find('/') {
        Some(i) => (rest[..i].to_owned(), rest[i..].to_owned()),
        None => (rest.to_owned(), String::new()),
    };
    // An id outside the grammar never reaches the trail, a map or the store.
    let system_id = match crate::broker::validate_system_id(&system_id) {
        Ok(()) => system_id,
        Err(_) => String::new(),
    };
    let masked = mask_path(&tail);
    let call = Call {
        system_id: &system_id,
        tail: &tail,
        query: query.as_deref(),
        masked: &masked,
        started,
    };
    let (resp, caller) = match screen(broker, &req, &system_id, &tail) {
        Err(refused) => (refused.into_response(), None),
        Ok(()) => forward(broker, client, req, &call).await,
    };
    let status = resp.status().as_u16();
    crate::metrics::METRICS.proxy(status);
    broker
        .audit_proxied(
            caller.as_deref(),
            &system_id,
            method.as_str(),
            &masked,
            status,
            started.elapsed(),
        )
        .await;
    resp
}

/// The parts of a proxied request's target.
struct Call<'a> {
    system_id: &'a str,
    tail: &'a str,
    query: Option<&'a str>,
    masked: &'a str,
    started: std::time::Instant,
}

/// Writes the outcome line of an admitted call whose worker went away (its request dropped:
/// a deadline, a disconnect, the stop's grace) before the call ended; disarmed when it ends.
struct Abandoned<'a> {
    broker: &'a Broker,
    caller: &'a str,
    call: &'a Call<'a>,
    method: axum::http::Method,
    armed: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            let c = self.call;
            let method = self.method.as_str();
            let took = c.started.elapsed();
            (self.broker).audit_proxy_abandoned(self.caller, c.system_id, method, c.masked, took);
        }
    }
}

/// Forwards a screened request the broker admits: the caller's lease checked, the call audited
/// first. Returns the answer and the lease's caller, when it named one.
async fn forward(
    broker: &Broker,
    client: Option<&ProxyClient>,
    req: Request,
    call: &Call<'_>,
) -> (Response, Option<String>) {
    let lease = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let grant = match broker
        .admit_proxy_call(lease, call.system_id, call.tail, call.query)
        .await
    {
        Ok(grant) => grant,
        Err((refused, caller)) => return (Refusal::from(refused).into_response(), caller),
    };
    let mut abandoned = Abandoned {
        broker,
        caller: &grant.caller,
        call,
        method: req.method().clone(),
        armed: true,
    };
    let answer = send(broker, client, req, call, &grant).await;
    abandoned.armed = false;
    drop(abandoned);
    (
        answer.unwrap_or_else(Refusal::into_response),
        Some(grant.caller),
    )
}

/// Sends an admitted call upstream and relays the answer.
async fn send(
    broker: &Broker,
    client: Option<&ProxyClient>,
    req: Request,
    call: &Call<'_>,
    grant: &ProxyGrant,
) -> Result<Response, Refusal> {
    let Some(client) = client else {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the proxy is not configured",
        ));
    };
    let uri = axum::http::Uri::try_from(grant.url.as_str())
        .map_err(|_| Refusal::new(StatusCode::BAD_GATEWAY, UNUSABLE_BASE))?;
    let cap = broker.settings.proxy_max_body_bytes;
    let forward = forward_request(req, uri, &grant.token, cap)?;
    let permit = broker
        .admit_quota(grant, call.system_id)
        .await
        .map_err(Refusal::limited)?;
    let again = retryable(&forward, &permit);
    let method = forward.method().clone();
    broker
        .audit_forwarding(&grant.caller, call.system_id, method.as_str(), call.masked)
        .await?;
    let upstream = client.for_system(call.system_id);
    let at = (upstream, client.read_timeout);
    let about = Leftover {
        broker,
        call,
        grant,
        token: &grant.token,
        method: &method,
    };
    let (mut resp, mut permit) = exchange(at, forward, permit, about).await?;
    // Learned from the head at once: a worker going away meanwhile loses no signal.
    let wait = learn(broker, (call.system_id, &grant.token), &permit, &resp);
    if let (Some(mut retry), Some(wait)) = (again, wait) {
        drop(resp);
        drop(permit);
        tokio::time::sleep(wait).await;
        let again = broker
            .admit_quota(grant, call.system_id)
            .await
            .map_err(Refusal::limited)?;
        // Asked once the call holds its slot again: a lease that lapsed during either wait
        // (caller revoked, credential rotated, …) gets no call sent for it, and the call goes
        // with the system's current headers.
        let token = broker.still_granted(call.system_id, grant).await?;
        for name in crate::backends::HEADER_NAMES {
            retry.headers_mut().remove(*name);
        }
        put_credential(retry.headers_mut(), &token);
        broker
            .audit_forwarding(&grant.caller, call.system_id, method.as_str(), call.masked)
            .await?;
        let about = Leftover {
            token: &token,
            ..about
        };
        (resp, permit) = exchange(at, retry, again, about).await?;
        learn(broker, (call.system_id, &token), &permit, &resp);
    }
    let redirects = Redirects {
        api_base_url: &grant.token.api_base_url,
        public_url: broker.settings.public_url.as_deref(),
        system_id: call.system_id,
    };
    let status = resp.status().as_u16();
    let kind = grant.token.kind;
    let signals_in_body = crate::backends::ratelimit::needs_body(kind, status);
    let timing = (client.read_timeout, cap);
    let (response, held) = answer(resp, &redirects, timing, permit, signals_in_body).await;
    if let Some((body, permit)) = held.filter(|_| signals_in_body) {
        let now = crate::model::unix_now();
        let signals = read_signals(kind, status, response.headers(), Some(&body), now);
        broker.learn_quota(call.system_id, &permit, &signals);
    }
    Ok(response)
}

/// A copy of `forward` to send once more after a vendor's short `Retry-After`: only a bodiless
/// GET or HEAD, and only when the system allows local retries. Never a write.
fn retryable(
    forward: &axum::http::Request<Body>,
    permit: &crate::broker::quota::QuotaPermit,
) -> Option<axum::http::Request<Body>> {
    let read = matches!(forward.method().as_str(), "GET" | "HEAD");
    let bodiless = http_body::Body::size_hint(forward.body()).exact() == Some(0);
    if !read || !bodiless || permit.quota().limits().local_retry_after_max.is_zero() {
        return None;
    }
    let mut copy = axum::http::Request::new(Body::empty());
    *copy.method_mut() = forward.method().clone();
    *copy.uri_mut() = forward.uri().clone();
    *copy.headers_mut() = forward.headers().clone();
    copy.headers_mut().remove("content-length");
    Some(copy)
}

/// Learns from an answer's head: its quota signals, and a 401 (see
/// [`Broker::note_proxy_unauthorized`]); for a 429 whose own `Retry-After` fits the system's
/// `local_retry_after_max`, the wait before a read may be sent again.
fn learn(
    broker: &Broker,
    (system_id, token): (&str, &IssuedToken),
    permit: &QuotaPermit,
    resp: &axum::http::Response<hyper::body::Incoming>,
) -> Option<Duration> {
    let status = resp.status().as_u16();
    let kind = permit.quota().kind();
    let now = crate::model::unix_now();
    let signals = read_signals(kind, status, resp.headers(), None, now);
    broker.learn_quota(system_id, permit, &signals);
    if status == 401 {
        broker.note_proxy_unauthorized(system_id, token);
    }
    let max = permit.quota().limits().local_retry_after_max;
    if status != 429 || max.is_zero() {
        return None;
    }
    // The pause the book now holds (a 429 holds at least a second, `Retry-After: 0` too):
    // retried any sooner, the call would meet the broker's own block.
    let asked = crate::backends::ratelimit::retry_after(resp.headers(), now)?;
    let wait = signals.wait.map_or(asked, |held| held.max(asked));
    (wait <= max).then_some(wait)
}

/// One upstream exchange, bounded by the client's read timeout for the answer's head (counted
/// from the last chunk of the worker's body, [`UploadMoved`]), holding the call's quota permit
/// (handed back with the answer).
async fn exchange(
    (upstream, read_timeout): (&Upstream, Duration),
    forward: axum::http::Request<Body>,
    permit: QuotaPermit,
    about: Leftover<'_>,
) -> Result<(axum::http::Response<hyper::body::Incoming>, QuotaPermit), Refusal> {
    let until = tokio::time::Instant::now() + read_timeout;
    let moved = forward.extensions().get::<UploadMoved>().cloned();
    let mut at = AtVendor {
        request: Some(upstream.request(forward)),
        permit: Some(permit),
        until,
        about,
    };
    let mut head = std::future::poll_fn(|cx| match at.request.as_mut() {
        Some(r) => std::future::Future::poll(std::pin::Pin::new(r), cx),
        None => std::task::Poll::Pending,
    });
    let mut deadline = until;
    let answer = loop {
        match tokio::time::timeout_at(deadline, &mut head).await {
            Ok(head) => break Ok(head),
            Err(late) => {
                let later = moved.as_ref().and_then(|m| m.deadline(read_timeout));
                match later.filter(|l| *l > tokio::time::Instant::now()) {
                    Some(later) => {
                        deadline = later;
                        // A worker gone from here on leaves the request running as long.
                        at.until = later;
                    }
                    None => break Err(late),
                }
            }
        }
    };
    at.request = None;
    let permit = at.permit.take();
    match (answer, permit) {
        (Ok(Ok(r)), Some(permit)) => Ok((r, permit)),
        _ if moved.as_ref().is_some_and(UploadMoved::went_over_cap) => Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is larger than the proxy allows",
        )),
        (Err(_), _) => Err(Refusal::new(
            StatusCode::GATEWAY_TIMEOUT,
            "the upstream did not answer in time",
        )),
        // Connected, then the connection broke before an answer: the request (a write too) may
        // have reached the vendor, and a worker must not take it for one that did not.
        (Ok(Err(e)), _) if !e.is_connect() => Err(Refusal::new(
            StatusCode::BAD_GATEWAY,
            "the upstream's connection broke before its answer: the request may have reached it",
        )),
        _ => Err(Refusal::new(
            StatusCode::BAD_GATEWAY,
            "the upstream could not be reached",
        )),
    }
}

/// A request at the vendor with its call's quota permit. Dropped before the answer's head came
/// (the worker went away: a deadline, a disconnect) on a system with a concurrency cap, the
/// request runs on in the background until that head or the read timeout, holding the permit:
/// the slot frees when the vendor is done with the call, so workers that give up early cannot
/// pile more calls on a vendor than its cap allows (and the cap bounds these requests). The
/// answer is learnt from as any other (quota signals, a 401) and gets its own outcome line after
/// the call's `cancelled` one. On a system without a cap the request is cancelled.
struct AtVendor<'a> {
    request: Option<hyper_util::client::legacy::ResponseFuture>,
    permit: Option<QuotaPermit>,
    until: tokio::time::Instant,
    about: Leftover<'a>,
}

/// The call a request at the vendor belongs to.
#[derive(Clone, Copy)]
struct Leftover<'a> {
    broker: &'a Broker,
    call: &'a Call<'a>,
    grant: &'a ProxyGrant,
    /// The system's headers this try carries (the grant's, or a retry's fresher ones).
    token: &'a std::sync::Arc<IssuedToken>,
    method: &'a axum::http::Method,
}

impl Drop for AtVendor<'_> {
    fn drop(&mut self) {
        let (Some(request), Some(permit)) = (self.request.take(), self.permit.take()) else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !permit.holds_slot() {
            return;
        }
        let a = self.about;
        // Held weakly while the vendor works: a stopping broker is not kept open by it.
        let broker = a.broker.me.clone();
        let system_id = a.call.system_id.to_owned();
        let (caller, token) = (a.grant.caller.clone(), a.token.clone());
        let (method, masked) = (a.method.clone(), a.call.masked.to_owned());
        let (until, started) = (self.until, a.call.started);
        rt.spawn(async move {
            let Ok(Ok(head)) = tokio::time::timeout_at(until, request).await else {
                return;
            };
            let Some(broker) = broker.upgrade() else {
                return;
            };
            let status = head.status().as_u16();
            learn(&broker, (&system_id, &token), &permit, &head);
            drop((head, permit));
            let (path, took) = (masked.as_str(), started.elapsed());
            let caller = Some(caller.as_str());
            (broker.audit_proxied(caller, &system_id, method.as_str(), path, status, took)).await;
        });
    }
}

/// Refuses what is never proxied, whoever asks: unsafe methods, absolute-form targets,
/// another Host, path escapes.
fn screen(broker: &Broker, req: &Request, system_id: &str, tail: &str) -> Result<(), Refusal> {
    let method = req.method();
    if REFUSED_METHODS
        .iter()
        .any(|m| m.eq_ignore_ascii_case(method.as_str()))
    {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "TRACE, TRACK and CONNECT are not proxied",
        ));
    }
    if req.uri().authority().is_some() || req.uri().scheme().is_some() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "absolute-form requests are refused",
        ));
    }
    if let Some(want) = &broker.public_authority {
        // A Host that is not visible ASCII names no broker either.
        let host = req.headers().get("host").map(|h| h.to_str().ok());
        if host.is_some_and(|host| !host.is_some_and(|h| h.eq_ignore_ascii_case(want))) {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "the Host header does not name this broker",
            ));
        }
    }
    if system_id.is_empty() || !is_clean_path(tail) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "path escapes are refused",
        ));
    }
    Ok(())
}

/// A request the broker answers itself, with a JSON error; a quota refusal also carries
/// `Retry-After` and `x-credbroker-limited: local`.
struct Refusal(StatusCode, String, Option<Duration>);

impl Refusal {
    fn new(status: StatusCode, message: &str) -> Self {
        Self(status, message.to_owned(), None)
    }

    fn limited(l: crate::broker::quota::Limited) -> Self {
        use crate::broker::quota::LimitReason;
        let secs = l.retry_after.as_secs();
        let why = match l.reason {
            LimitReason::Blocked => "the vendor asked for a pause",
            LimitReason::Reserve => "the vendor's quota is down to the reserve kept for admins",
            LimitReason::Concurrency => "the system's concurrent calls are all in use",
        };
        let message = format!("refused by credbroker, not the vendor: {why}; retry after {secs} s");
        Self(StatusCode::TOO_MANY_REQUESTS, message, Some(l.retry_after))
    }

    fn into_response(self) -> Response {
        let mut r = error(self.0, &self.1);
        if let Some(wait) = self.2 {
            let h = r.headers_mut();
            h.insert("retry-after", HeaderValue::from(wait.as_secs().max(1)));
            h.insert("x-credbroker-limited", HeaderValue::from_static("local"));
        }
        r
    }
}

impl From<ProxyRefusal> for Refusal {
    fn from(r: ProxyRefusal) -> Self {
        match r {
            ProxyRefusal::Lease => Refusal::new(
                StatusCode::UNAUTHORIZED,
                "invalid, expired or revoked lease; ask GetAccessToken for a new one",
            ),
            ProxyRefusal::Upstream(why) => Refusal::new(StatusCode::BAD_GATEWAY, &why),
            ProxyRefusal::Unaudited => Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the audit trail cannot be written; nothing is forwarded until it recovers",
            ),
        }
    }
}

/// Sets the system's credential headers from `token` (replacing any of the same name).
fn put_credential(headers: &mut HeaderMap, token: &IssuedToken) {
    for h in &token.headers {
        let Ok(mut v) = HeaderValue::from_str(h.value.expose_secret()) else {
            continue;
        };
        v.set_sensitive(true);
        if let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) {
            headers.insert(name, v);
        }
    }
}

/// The request to send upstream: the worker's headers without hop-by-hop ones, its
/// authorization or other credential headers or cookies, plus the system's headers; the body
/// capped at `cap` bytes.
fn forward_request(
    req: Request,
    uri: axum::http::Uri,
    token: &IssuedToken,
    cap: u64,
) -> Result<axum::http::Request<Body>, Refusal> {
    let method = req.method().clone();
    let declared = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cap) {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is larger than the proxy allows",
        ));
    }
    let mut headers = HeaderMap::new();
    for (k, v) in req.headers() {
        let name = k.as_str();
        // The worker's lease, cookies and any credential header a backend hands out
        // (`x-sn-apikey`) never reach the vendor: only the system's own credential does.
        if HOP_BY_HOP.contains(&name)
            || name == "cookie"
            || crate::backends::known_header_name(name).is_some()
        {
            continue;
        }
        headers.append(k.clone(), v.clone());
    }
    put_credential(&mut headers, token);
    // A bodiless request (most API reads) is forwarded without a streamed body, so no
    // chunked encoding or body pipe is needed.
    let bodiless = http_body::Body::size_hint(req.body()).exact() == Some(0);
    let mut forward = axum::http::Request::new(Body::empty());
    // Only a body is streamed, and has progress to note.
    if !bodiless {
        let moved = UploadMoved::default();
        let progress = moved.clone();
        let upload = req.into_body().into_data_stream().map(move |chunk| {
            let chunk = chunk.map_err(|e| std::io::Error::other(e.to_string()))?;
            if !progress.moved(chunk.len(), cap) {
                return Err(std::io::Error::other("request body over the proxy's cap"));
            }
            Ok::<_, std::io::Error>(chunk)
        });
        *forward.body_mut() = Body::from_stream(upload);
        forward.extensions_mut().insert(moved);
    }
    *forward.method_mut() = method;
    *forward.uri_mut() = uri;
    *forward.headers_mut() = headers;
    Ok(forward)
}

/// How the worker's body is moving, carried in the forwarded request's extensions: a vendor
/// answers once it has the whole body, so the read timeout for the answer's head runs from the
/// last chunk, and a slow upload is not taken for the vendor's silence; but only while the
/// upload averages [`MIN_UPLOAD_RATE`] and for [`MAX_UPLOAD`] at most, so a worker trickling
/// bytes cannot hold a connection and a concurrency slot for ever.
#[derive(Clone)]
struct UploadMoved(std::sync::Arc<std::sync::Mutex<Progress>>);

/// See [`UploadMoved`].
struct Progress {
    started: tokio::time::Instant,
    last: tokio::time::Instant,
    bytes: u64,
    /// The body went over the proxy's cap (answered 413, not as a broken vendor).
    over_cap: bool,
}

/// The slowest average upload that keeps pushing the answer's deadline back (32 kbit/s).
const MIN_UPLOAD_RATE: u64 = 4 * 1024;
/// The longest an upload can push the answer's deadline back from the call's start.
const MAX_UPLOAD: Duration = Duration::from_secs(3600);

impl Default for UploadMoved {
    fn default() -> Self {
        let now = tokio::time::Instant::now();
        Self(std::sync::Arc::new(std::sync::Mutex::new(Progress {
            started: now,
            last: now,
            bytes: 0,
            over_cap: false,
        })))
    }
}

impl UploadMoved {
    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A chunk of `len` bytes passed on; false (and noted) when it takes the body over `cap`.
    fn moved(&self, len: usize, cap: u64) -> bool {
        let mut p = self.progress();
        p.last = tokio::time::Instant::now();
        p.bytes = p.bytes.saturating_add(len as u64);
        p.over_cap = p.bytes > cap;
        !p.over_cap
    }

    fn went_over_cap(&self) -> bool {
        self.progress().over_cap
    }

    /// The answer's deadline as the upload has it now (`read_timeout` after its last chunk),
    /// if the upload has earned one: at least [`MIN_UPLOAD_RATE`] on average since the call
    /// began (a second's grace), and no later than [`MAX_UPLOAD`] after it.
    fn deadline(&self, read_timeout: Duration) -> Option<tokio::time::Instant> {
        let p = self.progress();
        let elapsed = p.started.elapsed().as_secs();
        let steady = p.bytes >= MIN_UPLOAD_RATE.saturating_mul(elapsed.saturating_sub(1));
        let at = (p.last + read_timeout).min(p.started + MAX_UPLOAD);
        steady.then_some(at)
    }
}

/// Where a vendor's redirect under the system's base URL points at the proxy instead.
struct Redirects<'a> {
    api_base_url: &'a str,
    public_url: Option<&'a str>,
    system_id: &'a str,
}

impl Redirects<'_> {
    /// `location` through the proxy, when it stays under the registered base by whole path
    /// segments (`/acme` does not cover `/acme2`).
    fn through_proxy(&self, location: &HeaderValue) -> Option<HeaderValue> {
        HeaderValue::from_str(&self.proxied(location.to_str().ok()?)?).ok()
    }

    /// `url` through the proxy, when it lies under the registered base.
    fn proxied(&self, url: &str) -> Option<String> {
        let rest = under_base(url, self.api_base_url)?;
        Some(match self.public_url {
            Some(public) => format!(
                "{}/proxy/{}{rest}",
                public.trim_end_matches('/'),
                self.system_id
            ),
            None => rest.to_owned(),
        })
    }

    /// A `Link` header (RFC 8288: `<url>; rel="next", …`, Freshdesk's and Freshservice's
    /// pagination) with each target under the base pointed at the proxy, so a worker that
    /// follows it sends its lease to the broker, not to the vendor; `None` when none is.
    fn links_through_proxy(&self, link: &HeaderValue) -> Option<HeaderValue> {
        let text = link.to_str().ok()?;
        let mut out = String::with_capacity(text.len() + 64);
        let (mut changed, mut quoted, mut from) = (false, false, 0);
        let mut chars = text.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                // A parameter's quoted string (`title="a<b"`) holds no target.
                '"' => quoted = !quoted,
                '\\' if quoted => {
                    chars.next();
                }
                '<' if !quoted => {
                    // A `<` never closed: the rest is kept as it is.
                    let Some(len) = text[i..].find('>') else {
                        break;
                    };
                    let target = &text[i + 1..i + len];
                    if let Some(p) = self.proxied(target) {
                        out.push_str(&text[from..=i]);
                        out.push_str(&p);
                        from = i + len;
                        changed = true;
                    }
                    // Past the target and its `>`.
                    while chars.next().is_some_and(|(j, _)| j < i + len) {}
                }
                _ => {}
            }
        }
        out.push_str(&text[from..]);
        changed.then(|| HeaderValue::from_str(&out).ok()).flatten()
    }
}

/// The worker's answer: the vendor's status and headers (no session cookies; redirects under
/// the base URL rewritten to the proxy) and its body, whole when small, else streamed, capped at
/// `cap` bytes and cut when the vendor stalls for `read_timeout`. The call's quota permit is
/// held until the body has streamed; a body passed whole is returned with it (its quota signals
/// may be in it). `signals_in_body` (Salesforce's over-quota 403): held whole also when its
/// length is not given (a chunked answer), up to the same small size.
async fn answer(
    resp: axum::http::Response<hyper::body::Incoming>,
    redirects: &Redirects<'_>,
    (read_timeout, cap): (Duration, u64),
    permit: crate::broker::quota::QuotaPermit,
    signals_in_body: bool,
) -> (
    Response,
    Option<(axum::body::Bytes, crate::broker::quota::QuotaPermit)>,
) {
    let status = resp.status();
    let mut out = HeaderMap::new();
    for (k, v) in resp.headers() {
        // A vendor session (JSESSIONID, sid, …) would outlive the lease, its revocation
        // and the audit trail: it never reaches the worker.
        // Nor does a vendor's own `x-credbroker-limited`: only the broker marks its refusals.
        if HOP_BY_HOP.contains(&k.as_str())
            || k == "set-cookie"
            || k == "set-cookie2"
            || k == "x-credbroker-limited"
        {
            continue;
        }
        let rewritten = match k.as_str() {
            "location" => redirects.through_proxy(v),
            "link" => redirects.links_through_proxy(v),
            _ => None,
        };
        if let Some(nv) = rewritten {
            out.append(k.clone(), nv);
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    let length = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let incoming = resp.into_body();
    // Small answers with a known length (most API JSON) are passed whole; the rest streams.
    if length.is_some_and(|n| n <= SMALL_BODY) || (signals_in_body && length.is_none()) {
        let held = http_body_util::Limited::new(incoming, SMALL_BODY as usize);
        let whole =
            tokio::time::timeout(read_timeout, http_body_util::BodyExt::collect(held)).await;
        return match whole {
            Ok(Ok(collected)) => {
                let bytes = collected.to_bytes();
                let mut response = Response::new(Body::from(bytes.clone()));
                *response.status_mut() = status;
                *response.headers_mut() = out;
                (response, Some((bytes, permit)))
            }
            Ok(Err(_)) | Err(_) => (
                error(StatusCode::BAD_GATEWAY, "the upstream answer broke off"),
                None,
            ),
        };
    }
    let mut seen = 0u64;
    let chunks = http_body_util::BodyExt::into_data_stream(incoming).timeout(read_timeout);
    let download = chunks.map(move |chunk| {
        // In flight (a concurrency slot) until the body is done or dropped.
        let _held = &permit;
        let chunk = chunk
            .map_err(|_| std::io::Error::other("the upstream stalled"))?
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        seen += chunk.len() as u64;
        if seen > cap {
            return Err(std::io::Error::other("response body over the proxy's cap"));
        }
        Ok::<_, std::io::Error>(chunk)
    });
    let mut response = Response::new(Body::from_stream(download));
    *response.status_mut() = status;
    *response.headers_mut() = out;
    (response, None)
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        [("content-type", "application/json")],
        serde_json::json!({ "error": message }).to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_targets_under_the_base_go_through_the_proxy() {
        let r = Redirects {
            api_base_url: "https://acme.freshdesk.com/api/v2",
            public_url: Some("https://broker.example"),
            system_id: "fd",
        };
        let link = |v: &str| {
            r.links_through_proxy(&HeaderValue::from_str(v).unwrap())
                .map(|h| h.to_str().unwrap().to_owned())
        };
        let via = "https://broker.example/proxy/fd";
        assert_eq!(
            link(r#"<https://acme.freshdesk.com/api/v2/tickets?page=2>; rel="next""#),
            Some(format!(r#"<{via}/tickets?page=2>; rel="next""#))
        );
        // Two targets, one elsewhere; a quoted `<` is no target; a `<` never closed keeps the
        // rewrites before it.
        assert_eq!(
            link(
                r#"<https://elsewhere.example/x>; rel="help"; title="a<b", <https://acme.freshdesk.com/api/v2/t?p=3>; rel="last", <https://acme.freshdesk.com/api/v2/open"#
            ),
            Some(format!(
                r#"<https://elsewhere.example/x>; rel="help"; title="a<b", <{via}/t?p=3>; rel="last", <https://acme.freshdesk.com/api/v2/open"#
            ))
        );
        assert_eq!(link(r#"<https://elsewhere.example/x>; rel="next""#), None);
        assert_eq!(link("<<<"), None);
        assert_eq!(
            link(r#"title="\"<https://acme.freshdesk.com/api/v2/x>""#),
            None
        );
    }
}
