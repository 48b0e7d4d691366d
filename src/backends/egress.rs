//! The egress guard (SSRF): outbound connections go only to public addresses unless an explicit
//! allow-list (`CREDBROKER_EGRESS_ALLOW`: CIDRs and host names) permits them.
//!
//! - Refused: loopback, unspecified, private (RFC 1918), link-local (incl. the cloud metadata
//!   address 169.254.169.254), CGNAT, benchmarking, IETF-reserved, multicast and reserved ranges,
//!   IPv6 loopback/unique-local (incl. fd00:ec2::254)/link-local/multicast/documentation, NAT64,
//!   and IPv4-mapped or -compatible IPv6. `IpAddr::is_global` is unstable, hence our own predicate.
//! - Literal IPs (including WHATWG encodings such as `2130706433` or `0x7f.1`, which the URL
//!   parser normalizes) are checked when a base URL is registered and before every request.
//! - Host names are checked at connect time by a resolver that returns only the addresses that
//!   pass, so the address actually connected to is the one checked (DNS rebinding). Redirects
//!   stay off, so nothing reaches another host.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// Which outbound destinations are allowed.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    /// Accept `http://` base URLs (for fakes on loopback and lab setups). Off by default.
    pub allow_http: bool,
    /// Private destinations explicitly permitted.
    pub allow: AllowList,
    /// A corporate HTTP(S) proxy every upstream connection goes through (except `no_proxy`
    /// hosts). The guard still judges each final target, and the proxy's own address.
    pub proxy: Option<EgressProxy>,
}

/// How one system's proxied calls leave (`[egress_proxy_systems]`), overriding `no_proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyRoute {
    /// Through the egress proxy when its host is not in `no_proxy` (the default).
    Auto,
    /// Straight to the vendor.
    Direct,
    /// Through the egress proxy, whatever `no_proxy` says.
    Proxy,
}

/// A corporate egress proxy: CONNECT tunnels (and absolute-form requests for plain-http targets
/// of the checks' client). `Debug` names its host only.
#[derive(Clone)]
pub struct EgressProxy {
    /// `http://host:port` or `https://host:port`.
    pub url: url::Url,
    /// `Proxy-Authorization` (Basic), from the credentials file.
    pub authorization: Option<crate::secret::SecretString>,
    /// Hosts reached directly: exact names, `.suffix` or `*.suffix` domains, IPs, CIDRs, `*`.
    no_proxy: Vec<String>,
}

impl std::fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressProxy")
            .field("host", &self.url.host_str())
            .field("port", &self.url.port_or_known_default())
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "[redacted]"),
            )
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

impl EgressProxy {
    /// The proxy at `url` (credentials never in it: `credentials` is `user:password` from a
    /// file), bypassed for the comma-separated `no_proxy` hosts.
    pub fn parse(url: &str, credentials: Option<&str>, no_proxy: &str) -> Result<Self, String> {
        let parsed = url::Url::parse(url.trim())
            .map_err(|_| "the egress proxy is not a URL like http://proxy.corp:3128".to_owned())?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err("the egress proxy must be an http:// or https:// URL with a host".into());
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(
                "the egress proxy URL must not carry credentials: put user:password in \
                 egress_proxy_credentials_file (CREDBROKER_EGRESS_PROXY_CREDENTIALS_FILE)"
                    .into(),
            );
        }
        if parsed.path() != "/" || parsed.query().is_some() {
            return Err("the egress proxy URL takes no path or query".into());
        }
        let authorization = match credentials.map(str::trim).filter(|c| !c.is_empty()) {
            None => None,
            Some(c) if c.contains(':') => Some(crate::secret::SecretString::new(format!(
                "Basic {}",
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, c)
            ))),
            Some(_) => {
                return Err("the egress proxy credentials file must hold user:password".into())
            }
        };
        let no_proxy = no_proxy
            .split(',')
            .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        Ok(Self {
            url: parsed,
            authorization,
            no_proxy,
        })
    }

    /// True when `host` is reached directly (`egress_no_proxy`).
    pub fn bypasses(&self, host: &str) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok();
        self.no_proxy.iter().any(|rule| {
            if rule == "*" {
                return true;
            }
            if let (Some(ip), Ok(net)) = (ip, rule.parse::<IpNet>()) {
                return net.contains(&ip);
            }
            if let (Some(ip), Ok(one)) = (ip, rule.parse::<IpAddr>()) {
                return ip == one;
            }
            // `*.x`: subdomains of x; `.x` and `x`: x and its subdomains.
            match rule.strip_prefix("*.") {
                Some(suffix) => host.ends_with(&format!(".{suffix}")),
                None => {
                    let domain = rule.trim_start_matches('.');
                    host == domain || host.ends_with(&format!(".{domain}"))
                }
            }
        })
    }

    /// True when a connection to `url` goes through the proxy.
    pub fn applies_to(&self, url: &url::Url) -> bool {
        url.host_str().is_some_and(|h| !self.bypasses(h))
    }
}

/// CIDRs and host names admitted despite the guard.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    nets: Vec<IpNet>,
    hosts: Vec<String>,
}

impl AllowList {
    /// Parses `10.0.0.0/8,tfs.corp.example,127.0.0.1` (CIDRs, single addresses, host names).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut list = Self::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            if let Ok(net) = item.parse::<IpNet>() {
                list.nets.push(net);
            } else if let Ok(ip) = item.parse::<IpAddr>() {
                list.nets.push(IpNet::from(ip));
            } else if item
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '*'))
            {
                list.hosts.push(item.to_ascii_lowercase());
            } else {
                return Err(format!(
                    "'{item}' is neither a CIDR, an IP address nor a host name"
                ));
            }
        }
        Ok(list)
    }

    /// True when nothing is allow-listed.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty() && self.hosts.is_empty()
    }

    fn allows_ip(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(&ip))
    }

    fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.iter().any(|h| match h.strip_prefix("*.") {
            Some(suffix) => host.ends_with(&format!(".{suffix}")),
            None => *h == host,
        })
    }
}

/// Why an address is not public, if it is not.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    let in_net = |net: &str| net.parse::<ipnet::Ipv4Net>().is_ok_and(|n| n.contains(&ip));
    if ip.is_loopback() {
        Some("loopback")
    } else if o[0] == 0 {
        Some("unspecified (0.0.0.0/8)")
    } else if ip.is_private() {
        Some("private")
    } else if ip == Ipv4Addr::new(169, 254, 169, 254) {
        Some("cloud metadata")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if in_net("100.64.0.0/10") {
        Some("carrier-grade NAT")
    } else if in_net("198.18.0.0/15") {
        Some("benchmarking")
    } else if in_net("192.0.0.0/24") {
        Some("IETF protocol assignments")
    } else if in_net("192.0.2.0/24") || in_net("198.51.100.0/24") || in_net("203.0.113.0/24") {
        Some("documentation")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if o[0] >= 240 {
        Some("reserved")
    } else {
        None
    }
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.to_ipv4_mapped().is_some() {
        Some("IPv4-mapped IPv6")
    } else if s[0..6] == [0, 0, 0, 0, 0, 0] {
        Some("IPv4-compatible IPv6")
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        Some("NAT64")
    } else if s[0] & 0xfe00 == 0xfc00 {
        Some("unique-local (incl. fd00:ec2::254 metadata)")
    } else if s[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if s[0] & 0xffc0 == 0xfec0 {
        Some("site-local")
    } else if s[0] == 0x2002 {
        Some("6to4 (embeds an IPv4 address)")
    } else if s[0] == 0x2001 && s[1] == 0 {
        Some("Teredo (embeds an IPv4 address)")
    } else if s[0] & 0xff00 == 0xff00 {
        Some("multicast")
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        Some("documentation")
    } else {
        None
    }
}

impl EgressPolicy {
    /// Checks an address the broker is about to connect to for `host`.
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), String> {
        match forbidden_reason(ip) {
            Some(reason) if !self.allow.allows_ip(ip) && !self.allow.allows_host(host) => {
                Err(format!(
                    "the egress guard refused {host}: it is a {reason} address ({ip}); add it to \
                 CREDBROKER_EGRESS_ALLOW if this is intended"
                ))
            }
            _ => Ok(()),
        }
    }

    /// Checks a URL's host where that needs no DNS: literal IPs and `localhost` names.
    pub fn check_url(&self, url: &url::Url) -> Result<(), String> {
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            other => {
                return Err(format!(
                    "the egress guard refused {other}:// to {}: only https is allowed \
                     (plain http needs CREDBROKER_EGRESS_ALLOW_HTTP=1)",
                    url.host_str().unwrap_or("")
                ))
            }
        }
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check_ip(&ip.to_string(), IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip(&format!("[{ip}]"), IpAddr::V6(ip)),
            Some(url::Host::Domain(d)) => {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                if (d == "localhost" || d.ends_with(".localhost")) && !self.allow.allows_host(&d) {
                    return self.check_ip(&d, IpAddr::V4(Ipv4Addr::LOCALHOST));
                }
                Ok(())
            }
            None => Err("the URL has no host".to_owned()),
        }
    }

    /// The resolver reqwest uses: only addresses that pass the guard are returned.
    pub fn resolver(&self) -> Arc<GuardResolver> {
        Arc::new(GuardResolver {
            policy: self.clone(),
        })
    }
}

/// The error a refused resolution carries (found again in reqwest's error chain).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GuardError(pub String);

impl EgressPolicy {
    /// The address to reach `host:port` at, judged by the guard: a literal IP is checked, a
    /// name is resolved and only allowed addresses are kept. Used when a proxy would otherwise
    /// resolve the name itself.
    pub async fn checked_target(&self, host: &str, port: u16) -> Result<SocketAddr, GuardError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            self.check_ip(host, ip).map_err(GuardError)?;
            return Ok(SocketAddr::new(ip, port));
        }
        let addrs = self.resolve_allowed(bare).await?;
        addrs
            .first()
            .map(|a| SocketAddr::new(a.ip(), port))
            .ok_or_else(|| GuardError(format!("{bare} did not resolve")))
    }
}

/// A DNS resolver that filters out refused addresses.
#[derive(Debug)]
pub struct GuardResolver {
    policy: EgressPolicy,
}

impl EgressPolicy {
    /// Resolves `host` and keeps only the addresses the guard allows; none left is an error.
    pub async fn resolve_allowed(&self, host: &str) -> Result<Vec<SocketAddr>, GuardError> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
            .await
            .map_err(|e| GuardError(format!("{host} did not resolve: {e}")))?
            .collect();
        let mut refused = None;
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match self.check_ip(host, a.ip()) {
                Ok(()) => true,
                Err(e) => {
                    refused = Some(e);
                    false
                }
            })
            .collect();
        if allowed.is_empty() {
            return Err(GuardError(
                refused.unwrap_or_else(|| format!("{host} did not resolve")),
            ));
        }
        Ok(allowed)
    }
}

impl reqwest::dns::Resolve for GuardResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            match policy.resolve_allowed(&host).await {
                Ok(allowed) => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
                Err(e) => Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
            }
        })
    }
}

/// The same guard as a resolver for hyper's connector (the proxy's upstream client).
#[derive(Debug, Clone)]
pub struct GuardDns {
    policy: EgressPolicy,
}

impl GuardDns {
    /// A resolver enforcing `policy`.
    pub fn new(policy: EgressPolicy) -> Self {
        Self { policy }
    }
}

impl tower::Service<hyper_util::client::legacy::connect::dns::Name> for GuardDns {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = GuardError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, GuardError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), GuardError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move { policy.resolve_allowed(&host).await.map(Vec::into_iter) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_http_url_is_refused_while_plain_http_is_off() {
        let url = url::Url::parse("http://tfs.example.com/tfs").unwrap();
        let off = EgressPolicy::default();
        let e = off.check_url(&url).unwrap_err();
        assert!(e.contains("egress guard") && e.contains("http://"), "{e}");
        let on = EgressPolicy {
            allow_http: true,
            ..Default::default()
        };
        assert!(on.check_url(&url).is_ok());
        let ftp = url::Url::parse("ftp://files.example.com/").unwrap();
        assert!(on.check_url(&ftp).is_err());
        let https = url::Url::parse("https://tfs.example.com/tfs").unwrap();
        assert!(off.check_url(&https).is_ok());
    }

    #[tokio::test]
    async fn the_proxy_resolver_refuses_names_that_resolve_to_loopback() {
        use std::str::FromStr;
        use tower::Service;
        let name = |n: &str| hyper_util::client::legacy::connect::dns::Name::from_str(n).unwrap();
        let e = GuardDns::new(EgressPolicy::default())
            .call(name("localhost"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("egress guard"), "{e}");
        let allowed = GuardDns::new(EgressPolicy {
            allow: AllowList::parse("127.0.0.1/32").unwrap(),
            ..Default::default()
        })
        .call(name("localhost"))
        .await
        .unwrap()
        .collect::<Vec<_>>();
        assert!(!allowed.is_empty());
        assert!(allowed
            .iter()
            .all(|a| a.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }

    #[test]
    fn ssrf_matrix_is_refused_by_default() {
        let p = EgressPolicy::default();
        for raw in [
            "http://127.0.0.1/",
            "http://localhost/",
            "http://[::1]/",
            "http://0.0.0.0/",
            "http://10.0.0.1/",
            "http://172.16.0.1/",
            "http://192.168.1.1/",
            "http://169.254.169.254/",
            "http://[fd00:ec2::254]/",
            "http://100.64.0.1/",
            "http://[::ffff:127.0.0.1]/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://198.18.0.1/",
            "http://224.0.0.1/",
            "http://[64:ff9b::7f00:1]/",
            "http://[2002:7f00:1::1]/",
            "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
            "http://[fec0::1]/",
        ] {
            let url = url::Url::parse(raw).unwrap();
            assert!(p.check_url(&url).is_err(), "{raw} was allowed");
        }
        for ok in [
            "https://8.8.8.8/",
            "https://[2606:4700::1111]/",
            "https://example.com/",
        ] {
            assert!(p.check_url(&url::Url::parse(ok).unwrap()).is_ok(), "{ok}");
        }
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_that_resolve_to_loopback() {
        use reqwest::dns::Resolve;
        let refused = EgressPolicy::default().resolver();
        let err = match refused.resolve("localhost".parse().unwrap()).await {
            Ok(_) => panic!("localhost resolved through the guard"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("egress guard"), "{err}");
        let allowed = EgressPolicy {
            allow: AllowList::parse("127.0.0.0/8,::1").unwrap(),
            ..Default::default()
        }
        .resolver();
        let addrs: Vec<_> = allowed
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }

    #[test]
    fn allow_list_admits_cidrs_and_hosts() {
        let p = EgressPolicy {
            allow: AllowList::parse("10.1.0.0/16, tfs.corp.example,*.lab.example,127.0.0.1")
                .unwrap(),
            ..Default::default()
        };
        assert!(p.check_ip("x", "10.1.2.3".parse().unwrap()).is_ok());
        assert!(p.check_ip("x", "10.2.0.1".parse().unwrap()).is_err());
        assert!(p
            .check_ip("tfs.corp.example", "10.9.9.9".parse().unwrap())
            .is_ok());
        assert!(p
            .check_ip("a.lab.example", "192.168.0.1".parse().unwrap())
            .is_ok());
        assert!(p
            .check_url(&url::Url::parse("https://127.0.0.1:8/").unwrap())
            .is_ok());
        assert!(AllowList::parse("not a host!").is_err());
    }
}
