//! The proxy's upstream connector: straight to the vendor (the guard resolving every name), or
//! through the corporate egress proxy as a CONNECT tunnel to the address the guard checked.
//!
//! Through the egress proxy the broker resolves the vendor's name itself, keeps only allowed
//! addresses, and asks the proxy for `CONNECT <checked-ip>:<port>`: the proxy cannot be steered
//! to another address by DNS, and a target outside the allow-list is refused before the proxy
//! hears of it. The proxy's own host passes the guard too (it is connected to like any other).
//! TLS to the vendor runs inside the tunnel with the vendor's name (SNI and certificate).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::http::Uri;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::egress::{EgressPolicy, GuardDns, ProxyRoute};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Stream = MaybeHttpsStream<TokioIo<TcpStream>>;
type ToProxy = hyper_rustls::HttpsConnector<HttpConnector<GuardDns>>;

/// Connects to a vendor directly or through the egress proxy, as the policy and the route say.
/// Cheap to clone (hyper's pooled client clones its connector for every request, a pooled
/// connection reused or not).
#[derive(Clone)]
pub struct EgressConnector(std::sync::Arc<Parts>);

struct Parts {
    direct: HttpConnector<GuardDns>,
    tunnel: Option<Tunnel<ToProxy>>,
    policy: EgressPolicy,
    route: ProxyRoute,
}

/// A plain TCP connector whose resolver is the guard.
pub fn guarded_tcp(
    policy: &EgressPolicy,
    connect_timeout: std::time::Duration,
) -> HttpConnector<GuardDns> {
    let mut http = HttpConnector::new_with_resolver(GuardDns::new(policy.clone()));
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http
}

impl EgressConnector {
    /// A connector for `route` under `policy`; `tls` is the client configuration used to reach
    /// an `https://` proxy.
    pub fn new(
        policy: &EgressPolicy,
        route: ProxyRoute,
        connect_timeout: std::time::Duration,
        tls: rustls::ClientConfig,
    ) -> Result<Self, String> {
        let direct = guarded_tcp(policy, connect_timeout);
        let tunnel = match &policy.proxy {
            Some(p) if route != ProxyRoute::Direct => {
                let to_proxy = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(tls)
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(direct.clone());
                let uri: Uri = p
                    .url
                    .as_str()
                    .parse()
                    .map_err(|_| "the egress proxy URL is not usable".to_owned())?;
                let mut t = Tunnel::new(uri, to_proxy);
                if let Some(auth) = &p.authorization {
                    let mut v = axum::http::HeaderValue::from_str(auth.expose_secret())
                        .map_err(|_| "the egress proxy credentials are not a header".to_owned())?;
                    v.set_sensitive(true);
                    t = t.with_auth(v);
                }
                Some(t)
            }
            _ => None,
        };
        Ok(Self(std::sync::Arc::new(Parts {
            direct,
            tunnel,
            policy: policy.clone(),
            route,
        })))
    }
}

impl Parts {
    fn tunnels(&self, host: &str) -> bool {
        match (&self.policy.proxy, self.route) {
            (None, _) | (_, ProxyRoute::Direct) => false,
            (Some(_), ProxyRoute::Proxy) => true,
            (Some(p), ProxyRoute::Auto) => !p.bypasses(host),
        }
    }
}

impl tower::Service<Uri> for EgressConnector {
    type Response = Stream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let host = dst.host().unwrap_or("").to_owned();
        let port = dst
            .port_u16()
            .unwrap_or(if dst.scheme_str() == Some("https") {
                443
            } else {
                80
            });
        let parts = &self.0;
        match parts.tunnel.clone().filter(|_| parts.tunnels(&host)) {
            Some(mut tunnel) => {
                let policy = parts.policy.clone();
                Box::pin(async move {
                    let addr = policy.checked_target(&host, port).await?;
                    let target: Uri = format!("http://{addr}").parse()?;
                    std::future::poll_fn(|cx| tower::Service::poll_ready(&mut tunnel, cx)).await?;
                    Ok(tower::Service::call(&mut tunnel, target).await?)
                })
            }
            None => {
                let mut direct = parts.direct.clone();
                Box::pin(async move {
                    let io = tower::Service::call(&mut direct, dst).await?;
                    Ok(MaybeHttpsStream::Http(io))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tower::Service;

    use super::*;
    use crate::backends::egress::{AllowList, EgressProxy};

    fn tls() -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
    }

    fn through(proxy: std::net::SocketAddr, allow: &str) -> EgressConnector {
        let policy = EgressPolicy {
            allow_http: true,
            allow: AllowList::parse(allow).unwrap(),
            proxy: Some(EgressProxy::parse(&format!("http://{proxy}"), None, "").unwrap()),
        };
        EgressConnector::new(&policy, ProxyRoute::Auto, Duration::from_secs(1), tls()).unwrap()
    }

    #[tokio::test]
    async fn a_name_is_judged_by_the_guard_before_the_proxy_hears_of_it() {
        let proxy = TcpListener::bind("127.0.0.2:0").await.unwrap();
        let addr = proxy.local_addr().unwrap();
        // The proxy is allowed; `localhost` (127.0.0.1) is not.
        let err = through(addr, "127.0.0.2/32")
            .call("http://localhost:9/".parse().unwrap())
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("egress guard"), "{err}");
        let contacted = tokio::time::timeout(Duration::from_millis(50), proxy.accept()).await;
        assert!(contacted.is_err(), "the proxy was contacted");

        // Allowed, it is tunnelled to the address the guard checked, not the name.
        let mut allowed = through(addr, "127.0.0.0/8");
        tokio::spawn(async move { allowed.call("http://localhost:9/".parse().unwrap()).await });
        let (mut conn, _) = proxy.accept().await.unwrap();
        let mut head = [0u8; 64];
        let n = conn.read(&mut head).await.unwrap();
        let line = String::from_utf8_lossy(&head[..n]).to_string();
        assert!(line.starts_with("CONNECT 127.0.0.1:9 HTTP/1.1"), "{line}");
    }

    #[test]
    fn no_proxy_rules_and_credentials() {
        let p = EgressProxy::parse(
            "http://proxy.corp:3128",
            Some("u:pw-canary-9"),
            "localhost, .corp.example,10.0.0.0/8,*.lab",
        )
        .unwrap();
        for direct in [
            "localhost",
            "a.corp.example",
            "corp.example",
            "10.1.2.3",
            "x.lab",
        ] {
            assert!(p.bypasses(direct), "{direct}");
        }
        for proxied in ["api.asana.com", "evilcorp.example", "11.0.0.1", "lab"] {
            assert!(!p.bypasses(proxied), "{proxied}");
        }
        assert!(!format!("{p:?}").contains("pw-canary-9"));
        let e = EgressProxy::parse("http://u:pw-canary-9@proxy.corp:3128", None, "").unwrap_err();
        assert!(
            e.contains("credentials") && !e.contains("pw-canary-9"),
            "{e}"
        );
        assert!(EgressProxy::parse("socks5://proxy:1080", None, "").is_err());
        assert!(EgressProxy::parse("http://proxy:3128", Some("no-colon"), "").is_err());
    }
}
