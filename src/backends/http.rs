//! The one outbound HTTP client and the base-URL rules every backend shares.
//!
//! The client follows no redirects, ignores `HTTP(S)_PROXY` from the environment, applies a
//! connect and a total timeout, and caps response bodies. Errors never carry the URL (query
//! strings can hold secrets) or the body.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION};
use url::Url;

use super::Header;

/// Default cap on an upstream response body.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

pub use super::egress::EgressPolicy;

/// The shared outbound client.
#[derive(Clone, Debug)]
pub struct HttpClient {
    client: reqwest::Client,
    max_body: usize,
    timeout: Duration,
    egress: EgressPolicy,
    /// Paths go into the debug log (off for URLs whose path may be a secret: webhooks).
    log_paths: bool,
}

/// A transport failure, without URL or body.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The upstream did not answer in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// DNS, connect or TLS failed.
    #[error("connection failed")]
    Connect,
    /// The egress guard refused the destination.
    #[error("{0}")]
    Refused(String),
    /// The body exceeded the cap.
    #[error("response body larger than {0} bytes")]
    TooLarge(usize),
    /// Anything else.
    #[error("request failed: {0}")]
    Other(String),
}

/// A buffered upstream response.
#[derive(Debug)]
pub struct UpstreamResponse {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// The body (at most the cap).
    pub body: Vec<u8>,
}

impl UpstreamResponse {
    /// `Retry-After` in seconds, when present and numeric.
    pub fn retry_after(&self) -> Option<u64> {
        self.headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
    }

    /// True when the content type says JSON.
    pub fn is_json(&self) -> bool {
        self.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("json"))
    }
}

impl HttpClient {
    /// Builds the client (the egress guard resolves every host name).
    pub fn new(timeout: Duration, max_body: usize, egress: &EgressPolicy) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // Never the environment's HTTP(S)_PROXY: only the configured egress proxy.
            .no_proxy();
        if let Some(p) = &egress.proxy {
            let (proxy, url) = (p.clone(), p.url.clone());
            let mut route =
                reqwest::Proxy::custom(move |target| proxy.applies_to(target).then(|| url.clone()));
            if let Some(auth) = &p.authorization {
                let mut v = HeaderValue::from_str(auth.expose_secret())
                    .map_err(|_| "the egress proxy credentials are not a header".to_owned())?;
                v.set_sensitive(true);
                route = route.custom_http_auth(v);
            }
            builder = builder.proxy(route);
        }
        let client = builder
            .dns_resolver(egress.resolver())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("credbroker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.without_url().to_string())?;
        Ok(Self {
            client,
            max_body,
            timeout,
            egress: egress.clone(),
            log_paths: true,
        })
    }

    /// The same client, logging hosts only: for URLs that carry their secret in the path (a
    /// Slack, Teams or Discord webhook).
    pub fn without_path_logs(&self) -> Self {
        Self {
            log_paths: false,
            ..self.clone()
        }
    }

    /// The underlying reqwest client (same settings), for requests the helpers do not cover.
    pub fn raw(&self) -> &reqwest::Client {
        &self.client
    }

    /// POST `body` to `url` with fixed headers.
    pub async fn post(
        &self,
        url: &str,
        headers: &[(&'static str, &'static str)],
        body: Vec<u8>,
    ) -> Result<UpstreamResponse, TransportError> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(
                reqwest::header::HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        self.send(self.client.post(url).headers(map).body(body))
            .await
    }

    /// GET `url` with the credential headers and `Accept: application/json`.
    pub async fn get(
        &self,
        url: &str,
        auth: &[Header],
    ) -> Result<UpstreamResponse, TransportError> {
        self.get_with(url, auth, &[]).await
    }

    /// [`HttpClient::get`] with extra fixed headers.
    pub async fn get_with(
        &self,
        url: &str,
        auth: &[Header],
        extra: &[(&'static str, &'static str)],
    ) -> Result<UpstreamResponse, TransportError> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        for (name, value) in extra {
            headers.insert(
                reqwest::header::HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        for h in auth {
            let mut v = HeaderValue::from_str(h.value.expose_secret()).map_err(|_| {
                TransportError::Other("credential is not a valid header value".into())
            })?;
            v.set_sensitive(true);
            let name = if h.name == "authorization" {
                AUTHORIZATION
            } else {
                reqwest::header::HeaderName::from_static(h.name)
            };
            headers.insert(name, v);
        }
        let req = self.client.get(url).headers(headers);
        self.send(req).await
    }

    /// Sends a request and buffers the body up to the cap, all within the timeout.
    pub async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<UpstreamResponse, TransportError> {
        let mut req = req.build().map_err(|e| self.classify(e))?;
        // Host and path only: queries may carry codes or tokens and are never logged.
        let (method, host, path) = (
            req.method().clone(),
            req.url().host_str().unwrap_or("").to_owned(),
            if self.log_paths {
                req.url().path().to_owned()
            } else {
                "(not logged)".to_owned()
            },
        );
        // Literal IPs never reach the resolver: check them here, before any connection.
        self.egress
            .check_url(req.url())
            .map_err(TransportError::Refused)?;
        // Through the egress proxy the proxy resolves the name: the guard judges it first.
        if let Some(p) = self
            .egress
            .proxy
            .as_ref()
            .filter(|p| p.applies_to(req.url()))
        {
            let port = req.url().port_or_known_default().unwrap_or(443);
            let checked =
                tokio::time::timeout(self.timeout, self.egress.checked_target(&host, port))
                    .await
                    .map_err(|_| TransportError::Timeout(self.timeout))?
                    .map_err(|e| TransportError::Refused(e.0))?;
            if req.url().scheme() == "http" {
                // Plain http goes to the proxy as an absolute-form request: name the checked
                // address, so the proxy cannot resolve the name elsewhere.
                let authority = req
                    .url()
                    .port()
                    .map_or(host.clone(), |p| format!("{host}:{p}"));
                if req.url_mut().set_ip_host(checked.ip()).is_ok() {
                    if let Ok(v) = HeaderValue::from_str(&authority) {
                        req.headers_mut().insert(reqwest::header::HOST, v);
                    }
                }
            }
            tracing::trace!(message = "Upstream call through the egress proxy.", proxy = ?p.url.host_str());
        }
        let fut = async {
            let mut resp = self
                .client
                .execute(req)
                .await
                .map_err(|e| self.classify(e))?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| self.classify(e))? {
                if body.len() + chunk.len() > self.max_body {
                    return Err(TransportError::TooLarge(self.max_body));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(UpstreamResponse {
                status,
                headers,
                body,
            })
        };
        // reqwest's timeout covers the whole exchange too; this guards the body loop as well.
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| TransportError::Timeout(self.timeout))
            .and_then(|r| r);
        let took = started.elapsed();
        crate::metrics::METRICS.upstream(took, result.is_ok());
        match &result {
            Ok(r) => {
                tracing::debug!(message = "Upstream call.", %method, %host, %path, status = r.status, took_ms = took.as_millis() as u64)
            }
            Err(e) => {
                tracing::debug!(message = "Upstream call failed.", %method, %host, %path, error = %e, took_ms = took.as_millis() as u64)
            }
        }
        result
    }

    fn classify(&self, e: reqwest::Error) -> TransportError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
        while let Some(s) = source {
            if let Some(g) = s.downcast_ref::<super::egress::GuardError>() {
                return TransportError::Refused(g.0.clone());
            }
            source = s.source();
        }
        if e.is_timeout() {
            TransportError::Timeout(self.timeout)
        } else if e.is_connect() {
            TransportError::Connect
        } else {
            TransportError::Other(e.without_url().to_string())
        }
    }
}

/// A parsed base URL and whether it is an `http://` stand-in (host-shape rules skipped).
#[derive(Debug)]
pub struct BaseUrl {
    /// The URL, without trailing slash on its path.
    pub url: Url,
    /// True for an allowed `http://` stand-in.
    pub is_stand_in: bool,
}

/// Parses what an admin pasted: adds `https://` when no scheme is given, lowercases the host,
/// and refuses credentials, fragments, queries and schemes other than https (http only when the
/// policy allows it).
pub fn parse_base_url(raw: &str, egress: &EgressPolicy) -> Result<BaseUrl, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err("a base URL is required".to_owned());
    }
    let with_scheme = if raw.contains("://") {
        raw.to_owned()
    } else {
        format!("https://{raw}")
    };
    let mut url = Url::parse(&with_scheme).map_err(|e| format!("not a valid URL ({e})"))?;
    let is_stand_in = match url.scheme() {
        "https" => false,
        "http" if egress.allow_http => true,
        "http" => {
            return Err(
                "plain http is refused; use the https URL (http is allowed only with \
                 CREDBROKER_EGRESS_ALLOW_HTTP=1)"
                    .to_owned(),
            )
        }
        other => return Err(format!("scheme '{other}' is not allowed; use https")),
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "the URL must not contain a user name or password; put credentials in `credential`"
                .to_owned(),
        );
    }
    if url.fragment().is_some() {
        return Err("the URL must not contain a fragment (#…)".to_owned());
    }
    if url.query().is_some() {
        return Err("the URL must not contain a query string (?…)".to_owned());
    }
    if url.host_str().is_none_or(|h| h.is_empty()) {
        return Err("the URL has no host".to_owned());
    }
    egress.check_url(&url)?;
    let path = url.path().trim_end_matches('/').to_owned();
    url.set_path(&path);
    Ok(BaseUrl { url, is_stand_in })
}

/// The URL as a string without a trailing slash.
pub fn url_string(url: &Url) -> String {
    url.as_str().trim_end_matches('/').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_canonicalizes() {
        let p = EgressPolicy::default();
        let b = parse_base_url("App.Asana.com/api/1.0/", &p).unwrap();
        assert_eq!(url_string(&b.url), "https://app.asana.com/api/1.0");
        assert!(!b.is_stand_in);
    }

    #[test]
    fn refuses_bad_shapes() {
        let p = EgressPolicy::default();
        for bad in [
            "",
            "http://127.0.0.1:1",
            "ftp://x",
            "https://u:p@host",
            "https://host/#frag",
            "https://host/?q=1",
            "https://",
        ] {
            assert!(parse_base_url(bad, &p).is_err(), "{bad} accepted");
        }
        let allow = EgressPolicy {
            allow_http: true,
            allow: super::super::egress::AllowList::parse("127.0.0.1").unwrap(),
            ..Default::default()
        };
        assert!(
            parse_base_url("http://127.0.0.1:1/x", &allow)
                .unwrap()
                .is_stand_in
        );
    }
}
