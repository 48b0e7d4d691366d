//! Proxy delivery: workers never hold a static secret.
//!
//! For a system with [`Delivery::Proxy`], `GetAccessToken` returns `Authorization: Bearer <lease>`
//! and `api_base_url = {public_url}/proxy/{system_id}`. A lease is signed (HMAC-SHA256 under a key
//! derived from the master key) and bound to the system, the caller and the credential version,
//! and expires after `lease_ttl`. The proxy on the HTTP listener checks it in constant time, drops
//! it, adds the real credential header and forwards to the registered base URL plus the path and
//! query, streaming both bodies within a size cap.
//!
//! It forwards only to the registered host: absolute-form requests, foreign `Host` headers and
//! path escapes (`..`, `.`, encoded slashes or dots, backslashes) are refused; upstream redirects
//! are not followed (a `Location` under the same base is rewritten to the proxy); hop-by-hop
//! headers are dropped and the worker's `Authorization` never reaches the vendor; the egress guard
//! applies to every connection. Leases die early when the credential rotates, the system is
//! deleted or leaves proxy delivery, or the caller is revoked. Every proxied call is one audit
//! event (method, path with ids masked, status, duration), never a body or a header value.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio_stream::StreamExt;

use crate::broker::tokens::IssuedToken;
use crate::broker::{Broker, Caller};
use crate::error::BrokerError;
use crate::model::{unix_now, Delivery};
use crate::secret::SecretString;

/// Answers up to this size with a known length are passed whole instead of streamed.
const SMALL_BODY: u64 = 64 * 1024;

/// Prefix of proxy leases.
pub const LEASE_PREFIX: &str = "cbl_";

#[derive(Serialize, Deserialize)]
struct Claims {
    /// System id.
    s: String,
    /// Caller name.
    c: String,
    /// Credential version.
    v: u64,
    /// Expiry, Unix seconds.
    e: u64,
    /// Lease id.
    n: String,
}

/// Methods never forwarded: TRACE/TRACK echo the request (the injected credential with it),
/// CONNECT would open a tunnel past every check.
const REFUSED_METHODS: &[&str] = &["TRACE", "TRACK", "CONNECT"];

/// The part of `location` after `base` when `location` lies under `base` by whole path
/// segments.
fn under_base<'a>(location: &'a str, base: &str) -> Option<&'a str> {
    let rest = location.strip_prefix(base.trim_end_matches('/'))?;
    (rest.is_empty() || rest.starts_with(['/', '?', '#'])).then_some(rest)
}

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

type Connector = hyper_rustls::HttpsConnector<
    hyper_util::client::legacy::connect::HttpConnector<crate::backends::egress::GuardDns>,
>;

/// The proxy's upstream client: hyper's pooled HTTP/1.1 client over rustls (webpki roots), whose
/// resolver is the egress guard; it never follows redirects.
#[derive(Clone)]
pub struct ProxyClient {
    client: hyper_util::client::legacy::Client<Connector, Body>,
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
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Result<Self, String> {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new_with_resolver(
            crate::backends::egress::GuardDns::new(egress.clone()),
        );
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(https);
        Ok(Self {
            client,
            read_timeout,
        })
    }
}

fn mac(key: &[u8; 32]) -> Option<Hmac<Sha256>> {
    <Hmac<Sha256> as Mac>::new_from_slice(key).ok()
}

impl Broker {
    /// Signs a lease for `caller` on `system_id` at `version`: (lease, expiry, lease id).
    pub fn issue_lease(
        &self,
        caller: &str,
        system_id: &str,
        version: u64,
    ) -> Option<(SecretString, SystemTime, String)> {
        let id = crate::util::random::url_token::<12>();
        let ttl = self.settings.lease_ttl;
        let claims = Claims {
            s: system_id.to_owned(),
            c: caller.to_owned(),
            v: version,
            e: unix_now() + ttl.as_secs().max(1),
            n: id.clone(),
        };
        let payload = serde_json::to_vec(&claims).ok()?;
        let mut m = mac(&self.lease_key)?;
        m.update(&payload);
        let sig = m.finalize().into_bytes();
        let lease = format!(
            "{LEASE_PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(sig)
        );
        Some((
            SecretString::new(lease),
            SystemTime::UNIX_EPOCH + Duration::from_secs(claims.e),
            id,
        ))
    }

    fn verify_lease(&self, lease: &str, system_id: &str) -> Option<Claims> {
        let body = lease.strip_prefix(LEASE_PREFIX)?;
        let (payload_b64, sig_b64) = body.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(payload_b64).ok()?;
        let sig = URL_SAFE_NO_PAD.decode(sig_b64).ok()?;
        let mut m = mac(&self.lease_key)?;
        m.update(&payload);
        // Constant-time comparison.
        m.verify_slice(&sig).ok()?;
        let claims: Claims = serde_json::from_slice(&payload).ok()?;
        (claims.s == system_id && claims.e > unix_now()).then_some(claims)
    }

    /// What `caller` is handed for `token`, the system's current headers: the headers
    /// themselves (header delivery), or a lease for the broker's proxy (proxy delivery: the
    /// worker never holds the secret).
    pub fn hand_out(
        &self,
        caller: &Caller,
        system_id: &str,
        token: Arc<IssuedToken>,
    ) -> Result<HandOut, BrokerError> {
        if token.delivery != Delivery::Proxy {
            return Ok(HandOut::Headers(token));
        }
        let base = self.settings.public_url.as_deref().ok_or_else(|| {
            BrokerError::FailedPrecondition(
                "proxy delivery needs the HTTP listener (CREDBROKER_HTTP_LISTEN)".to_owned(),
            )
        })?;
        let (authorization, expires_at, lease_id) = self
            .issue_lease(&caller.name, system_id, token.credential_version)
            .ok_or(BrokerError::Internal("could not sign a lease"))?;
        Ok(HandOut::Lease(Lease {
            authorization,
            expires_at,
            api_base_url: format!("{}/proxy/{system_id}", base.trim_end_matches('/')),
            credential_version: token.credential_version,
            lease_id,
        }))
    }

    /// Serves one proxied request (`/proxy/{system_id}/…`).
    pub async fn proxy(&self, req: Request) -> Response {
        let started = Instant::now();
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
        let (resp, caller) = self
            .proxy_inner(req, &system_id, &tail, query.as_deref(), &masked)
            .await;
        let status = resp.status();
        crate::metrics::METRICS.proxy(status.as_u16());
        // Refusals of callers without a valid lease are rate-limited like the gRPC side's.
        if caller.is_none() && !self.audit.admit_refusal() {
            return resp;
        }
        let _ = self
            .audit
            .record(&crate::audit::AuditEvent {
                time: crate::audit::now_rfc3339(),
                caller: caller.as_deref(),
                rpc: "Proxy",
                system_id: Some(system_id.as_str()).filter(|s| !s.is_empty()),
                outcome: if status.is_success() || status.is_redirection() {
                    "ok"
                } else {
                    "error"
                },
                code: status.as_str(),
                token_hmac: None,
                method: Some(method.as_str()),
                path: Some(&masked),
                duration_ms: Some(started.elapsed().as_millis() as u64),
            })
            .await;
        resp
    }

    async fn proxy_inner(
        &self,
        req: Request,
        system_id: &str,
        tail: &str,
        query: Option<&str>,
        masked: &str,
    ) -> (Response, Option<String>) {
        if let Err(refused) = self.screen(&req, system_id, tail) {
            return (refused.into_response(), None);
        }
        let lease = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let Some(claims) = self.verify_lease(lease, system_id) else {
            return (lease_denied().into_response(), None);
        };
        let answer = self
            .forward(req, system_id, tail, query, masked, &claims)
            .await;
        (
            answer.unwrap_or_else(Refusal::into_response),
            Some(claims.c),
        )
    }

    /// Refuses what is never proxied, whoever asks: unsafe methods, absolute-form targets,
    /// another Host, path escapes.
    fn screen(&self, req: &Request, system_id: &str, tail: &str) -> Result<(), Refusal> {
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
        if let Some(want) = &self.public_authority {
            let host = req.headers().get("host").and_then(|h| h.to_str().ok());
            if host.is_some_and(|host| !host.eq_ignore_ascii_case(want)) {
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

    /// Forwards a request whose lease verified: the caller must still be allowed, the system
    /// still proxied at the lease's credential version, and the call audited first.
    async fn forward(
        &self,
        req: Request,
        system_id: &str,
        tail: &str,
        query: Option<&str>,
        masked: &str,
        claims: &Claims,
    ) -> Result<Response, Refusal> {
        let token = self.proxied_token(system_id, claims).await?;
        let uri = self.upstream_uri(&token, tail, query)?;
        let Some(client) = self.settings.proxy_client.clone() else {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the proxy is not configured",
            ));
        };
        let cap = self.settings.proxy_max_body_bytes;
        let forward = forward_request(req, uri, &token, cap)?;
        self.audit_forwarding(&claims.c, system_id, forward.method(), masked)
            .await?;
        let read_timeout = client.read_timeout;
        let resp = match tokio::time::timeout(read_timeout, client.client.request(forward)).await {
            Ok(Ok(r)) => r,
            Err(_) => {
                return Err(Refusal::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the upstream did not answer in time",
                ))
            }
            Ok(Err(_)) => {
                return Err(Refusal::new(
                    StatusCode::BAD_GATEWAY,
                    "the upstream could not be reached",
                ))
            }
        };
        if resp.status() == StatusCode::UNAUTHORIZED {
            self.note_proxy_unauthorized(system_id).await;
        }
        let proxy_base = self
            .settings
            .public_url
            .as_ref()
            .map(|u| format!("{}/proxy/{system_id}", u.trim_end_matches('/')))
            .unwrap_or_default();
        Ok(answer(resp, &token.api_base_url, &proxy_base, read_timeout, cap).await)
    }

    /// The system's cached headers, if the lease's caller may still use the system and it is
    /// still proxied at the lease's credential version.
    async fn proxied_token(
        &self,
        system_id: &str,
        claims: &Claims,
    ) -> Result<Arc<IssuedToken>, Refusal> {
        let caller_ok = self
            .caller_by_name(&claims.c)
            .is_some_and(|c| c.may_use_id(system_id));
        if !caller_ok {
            return Err(lease_denied());
        }
        // The cached headers carry the delivery and credential version; the cache entry is
        // dropped on rotation, deletion and delivery changes, so no store read is needed here.
        let token = match self.access_token(system_id, 0, None).await {
            Ok(t) => t,
            Err(BrokerError::NotFound(_)) => return Err(lease_denied()),
            Err(e) => return Err(Refusal::new(StatusCode::BAD_GATEWAY, &e.to_string())),
        };
        if token.delivery != Delivery::Proxy || token.credential_version != claims.v {
            return Err(lease_denied());
        }
        Ok(token)
    }

    /// The vendor URL of `tail` under the system's base URL, through the egress guard.
    fn upstream_uri(
        &self,
        token: &IssuedToken,
        tail: &str,
        query: Option<&str>,
    ) -> Result<axum::http::Uri, Refusal> {
        let unusable = || {
            Refusal::new(
                StatusCode::BAD_GATEWAY,
                "the registered base URL is not usable",
            )
        };
        let target = format!(
            "{}{tail}{}",
            token.api_base_url,
            query.map(|q| format!("?{q}")).unwrap_or_default()
        );
        let url = url::Url::parse(&target).map_err(|_| unusable())?;
        if let Err(reason) = self.egress.check_url(&url) {
            return Err(Refusal::new(StatusCode::BAD_GATEWAY, &reason));
        }
        axum::http::Uri::try_from(url.as_str()).map_err(|_| unusable())
    }

    /// No audit, no forward: the call may change data at the vendor.
    async fn audit_forwarding(
        &self,
        caller: &str,
        system_id: &str,
        method: &axum::http::Method,
        masked: &str,
    ) -> Result<(), Refusal> {
        let audited = self
            .audit
            .record(&crate::audit::AuditEvent {
                time: crate::audit::now_rfc3339(),
                caller: Some(caller),
                rpc: "Proxy",
                system_id: Some(system_id),
                outcome: "forwarding",
                code: "FORWARDING",
                token_hmac: None,
                method: Some(method.as_str()),
                path: Some(masked),
                duration_ms: None,
            })
            .await;
        if audited.is_err() && self.audit.fail_closed() {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the audit trail cannot be written; nothing is forwarded until it recovers",
            ));
        }
        Ok(())
    }

    /// Counts a vendor 401 seen through the proxy on the system (surfaced in `System`).
    async fn note_proxy_unauthorized(&self, system_id: &str) {
        let counted = self
            .update_system_with(system_id, |r| {
                r.proxy_unauthorized_count += 1;
                r.last_proxy_unauthorized_at = Some(unix_now());
                true
            })
            .await;
        if counted.is_ok() {
            tracing::warn!(message = "The vendor rejected the credential through the proxy (401).", system_id = %system_id);
        }
    }
}

/// What a worker is handed by `GetAccessToken`.
pub enum HandOut {
    /// The system's headers, ready to send to the vendor.
    Headers(Arc<IssuedToken>),
    /// A lease for the broker's proxy.
    Lease(Lease),
}

/// A signed, short-lived permission to call one system through the broker's proxy.
pub struct Lease {
    /// The lease itself, sent as `Authorization: Bearer …` to the proxy.
    pub authorization: SecretString,
    /// When the proxy stops accepting it.
    pub expires_at: SystemTime,
    /// The proxy's URL for the system.
    pub api_base_url: String,
    /// The credential version the lease is bound to.
    pub credential_version: u64,
    /// The lease's id (audited, never the lease).
    pub lease_id: String,
}

/// A request the broker answers itself, with a JSON error.
struct Refusal(StatusCode, String);

impl Refusal {
    fn new(status: StatusCode, message: &str) -> Self {
        Self(status, message.to_owned())
    }

    fn into_response(self) -> Response {
        error(self.0, &self.1)
    }
}

fn lease_denied() -> Refusal {
    Refusal::new(
        StatusCode::UNAUTHORIZED,
        "invalid, expired or revoked lease; ask GetAccessToken for a new one",
    )
}

/// The request to send upstream: the worker's headers without hop-by-hop ones, its
/// authorization or cookies, plus the system's headers; the body capped at `cap` bytes.
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
        if HOP_BY_HOP.contains(&name) || name == "authorization" || name == "cookie" {
            continue;
        }
        headers.append(k.clone(), v.clone());
    }
    for h in &token.headers {
        let Ok(mut v) = HeaderValue::from_str(h.value.expose_secret()) else {
            continue;
        };
        v.set_sensitive(true);
        if let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) {
            headers.insert(name, v);
        }
    }
    // A bodiless request (most API reads) is forwarded without a streamed body, so no
    // chunked encoding or body pipe is needed.
    let bodiless = http_body::Body::size_hint(req.body()).exact() == Some(0);
    let mut seen = 0u64;
    let upload = req.into_body().into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(|e| std::io::Error::other(e.to_string()))?;
        seen += chunk.len() as u64;
        if seen > cap {
            return Err(std::io::Error::other("request body over the proxy's cap"));
        }
        Ok::<_, std::io::Error>(chunk)
    });
    let mut forward = axum::http::Request::new(if bodiless {
        Body::empty()
    } else {
        Body::from_stream(upload)
    });
    *forward.method_mut() = method;
    *forward.uri_mut() = uri;
    *forward.headers_mut() = headers;
    Ok(forward)
}

/// The worker's answer: the vendor's status and headers (no session cookies; redirects under
/// the base URL rewritten to the proxy) and its body, whole when small, else streamed, capped at
/// `cap` bytes and cut when the vendor stalls for `read_timeout`.
async fn answer(
    resp: axum::http::Response<hyper::body::Incoming>,
    api_base_url: &str,
    proxy_base: &str,
    read_timeout: Duration,
    cap: u64,
) -> Response {
    let status = resp.status();
    let mut out = HeaderMap::new();
    for (k, v) in resp.headers() {
        // A vendor session (JSESSIONID, sid, …) would outlive the lease, its revocation
        // and the audit trail: it never reaches the worker.
        if HOP_BY_HOP.contains(&k.as_str()) || k == "set-cookie" || k == "set-cookie2" {
            continue;
        }
        if k == "location" {
            // Rewrite only redirects that stay under the registered base, by whole path
            // segments (`/acme` does not cover `/acme2`).
            if let Some(rest) = v.to_str().ok().and_then(|l| under_base(l, api_base_url)) {
                if let Ok(nv) = HeaderValue::from_str(&format!("{proxy_base}{rest}")) {
                    out.append(k.clone(), nv);
                    continue;
                }
            }
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
    if length.is_some_and(|n| n <= SMALL_BODY) {
        let whole =
            tokio::time::timeout(read_timeout, http_body_util::BodyExt::collect(incoming)).await;
        return match whole {
            Ok(Ok(collected)) => {
                let bytes = collected.to_bytes();
                let mut response = Response::new(Body::from(bytes));
                *response.status_mut() = status;
                *response.headers_mut() = out;
                response
            }
            Ok(Err(_)) | Err(_) => error(StatusCode::BAD_GATEWAY, "the upstream answer broke off"),
        };
    }
    let mut seen = 0u64;
    let chunks = http_body_util::BodyExt::into_data_stream(incoming).timeout(read_timeout);
    let download = chunks.map(move |chunk| {
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
    response
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        [("content-type", "application/json")],
        serde_json::json!({ "error": message }).to_string(),
    )
        .into_response()
}

/// True when no path segment escapes (`..`, `.`, encoded separators, backslashes, NUL).
pub fn is_clean_path(tail: &str) -> bool {
    if tail.contains('\\') {
        return false;
    }
    tail.split('/').skip(1).all(|seg| {
        // Plain segments (the usual API path) need no decoding.
        if !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~' | b':' | b'@'))
        {
            return true;
        }
        let decoded = url::form_urlencoded::parse(format!("x={seg}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let lower = seg.to_ascii_lowercase();
        decoded != ".."
            && decoded != "."
            && !decoded.contains('/')
            && !decoded.contains('\\')
            && !decoded.contains('\0')
            && !lower.contains("%2f")
            && !lower.contains("%5c")
            && !lower.contains("%00")
    })
}

/// The path with id-like segments replaced by `{id}` (for the audit trail).
pub fn mask_path(tail: &str) -> String {
    tail.split('/')
        .map(|seg| {
            let digits = seg.chars().filter(|c| c.is_ascii_digit()).count();
            if !seg.is_empty()
                && (digits == seg.len()
                    || (seg.len() >= 8
                        && digits > 0
                        && seg.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')))
            {
                "{id}".to_owned()
            } else {
                seg.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::under_base;

    #[test]
    fn locations_are_under_the_base_by_whole_segments() {
        let base = "https://acme.example/acme";
        assert_eq!(under_base("https://acme.example/acme", base), Some(""));
        assert_eq!(under_base("https://acme.example/acme/x", base), Some("/x"));
        assert_eq!(
            under_base("https://acme.example/acme?a=1", base),
            Some("?a=1")
        );
        assert_eq!(under_base("https://acme.example/acme2/x", base), None);
        assert_eq!(under_base("https://acme.example.evil/acme", base), None);
        assert_eq!(
            under_base("https://acme.example/acme/", "https://acme.example/acme/"),
            Some("/")
        );
    }
}
