//! mTLS: client-certificate identities map to callers, bearer tokens switched off, the scope
//! matrix over TLS, handshake failures, the handshake timeout, and certificate reload without
//! dropping connections.

use std::path::Path;
use std::time::Duration;

use credbroker::pb;
use credbroker::pb::credential_broker_client::CredentialBrokerClient;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use tokio::io::AsyncReadExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::support::*;

pub(crate) struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    pub(crate) fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// (certificate PEM, key PEM) for `names` (SAN DNS names or IPs).
    pub(crate) fn leaf(&self, names: &[&str], server: bool) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    Channel::from_shared(format!("https://127.0.0.1:{}", addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

pub(crate) async fn tls_client(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<&(String, String)>,
    token: Option<&str>,
) -> Result<Client, tonic::transport::Error> {
    let ch = tls_channel(addr, ca, identity).await?;
    let header = token.map(|t| format!("Bearer {t}").parse().unwrap());
    Ok(CredentialBrokerClient::with_interceptor(ch, AuthFn(header)))
}

/// Handshakes with `identity` (or none) and reads once: what the server's alert says, or what
/// else happened.
async fn tls_alert(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<&(String, String)>,
) -> String {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    match connector.connect(name, tcp).await {
        Err(e) => format!("handshake: {e}"),
        Ok(mut stream) => {
            let mut byte = [0u8; 1];
            match stream.read(&mut byte).await {
                Err(e) => format!("read: {e}"),
                Ok(n) => format!("read {n} bytes, no alert"),
            }
        }
    }
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_identities_scopes_handshakes_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("credbroker test CA");
    let other_ca = Ca::new("someone else's CA");
    let server = ca.leaf(&["localhost", "127.0.0.1"], true);
    let admin_id = ca.leaf(&["admin"], false);
    let worker_id = ca.leaf(&["mtls-worker"], false);
    let nobody_id = ca.leaf(&["nobody"], false);
    let foreign_id = other_ca.leaf(&["admin"], false);
    let cert_file = write(certs.path(), "server.pem", &server.0);
    let key_file = write(certs.path(), "server.key", &server.1);
    let ca_file = write(certs.path(), "ca.pem", &ca.pem());

    let mut config = test_config(dir.path());
    config.tls.cert_file = Some(cert_file.clone());
    config.tls.key_file = Some(key_file.clone());
    config.tls.client_ca_file = Some(ca_file);
    config.tls.bearer_tokens = false;
    config.tls.handshake_timeout = Duration::from_secs(1);
    config.tls.reload_interval = Duration::from_millis(100);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(credbroker::server::run(listener, config, async {
        let _ = stop_rx.await;
    }));
    // Health over TLS (no bearer token needed, only the client certificate).
    let ch = loop {
        if let Ok(ch) = tls_channel(addr, &ca.pem(), Some(&admin_id)).await {
            break ch;
        }
        tokio::task::yield_now().await;
    };
    let mut health = HealthClient::new(ch);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    while watch.message().await.unwrap().unwrap().status != ServingStatus::Serving as i32 {}

    // The bootstrap admin is whoever presents a certificate named "admin".
    let fake = FakeAsana::start().await;
    let mut admin = tls_client(addr, &ca.pem(), Some(&admin_id), None)
        .await
        .unwrap();
    for id in ["acme-asana", "globex-asana"] {
        admin
            .register_system(register_asana(id, &fake.base_url, "pat-mtls", false))
            .await
            .unwrap();
    }
    admin
        .create_caller(pb::CreateCallerRequest {
            name: "mtls-worker".into(),
            role: pb::CallerRole::Worker as i32,
            system_patterns: vec!["acme-*".into()],
            ..Default::default()
        })
        .await
        .unwrap();

    // Scope matrix over mTLS.
    let mut worker = tls_client(addr, &ca.pem(), Some(&worker_id), None)
        .await
        .unwrap();
    let tok = |id: &str| pb::GetAccessTokenRequest {
        system_id: id.into(),
        ..Default::default()
    };
    assert_eq!(
        worker
            .get_access_token(tok("acme-asana"))
            .await
            .unwrap()
            .into_inner()
            .headers[0]
            .value,
        "Bearer pat-mtls"
    );
    assert_eq!(
        worker
            .get_access_token(tok("globex-asana"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        worker
            .get_access_token(tok("globex-missing"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        worker
            .list_systems(pb::ListSystemsRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    // A certificate whose name is no caller, and bearer tokens while they are switched off.
    let mut nobody = tls_client(addr, &ca.pem(), Some(&nobody_id), None)
        .await
        .unwrap();
    assert_eq!(
        nobody
            .get_access_token(tok("acme-asana"))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    // A certificate naming several callers (here the worker and the admin) is refused as
    // ambiguous, not served as whichever matched first.
    let both_id = ca.leaf(&["mtls-worker", "admin"], false);
    let mut both = tls_client(addr, &ca.pem(), Some(&both_id), None)
        .await
        .unwrap();
    let e = both
        .list_systems(pb::ListSystemsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    assert!(e.message().contains("ambiguous"), "{}", e.message());
    let admin_token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let mut bearer = tls_client(addr, &ca.pem(), Some(&nobody_id), Some(admin_token.trim()))
        .await
        .unwrap();
    let e = bearer
        .list_systems(pb::ListSystemsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("disabled"));
    // A certificate from another CA, and no certificate at all: the handshake fails.
    // The server's TLS alert names why. TLS 1.3 sends it after the client's Finished, so a
    // client learns it by reading; a gRPC client may see the socket close first, so this
    // handshakes and reads by hand.
    for (id, alert) in [
        (Some(&foreign_id), "UnknownCA"),
        (None, "CertificateRequired"),
    ] {
        let failure = tls_alert(addr, &ca.pem(), id).await;
        assert!(
            failure.contains(&format!("received fatal alert: {alert}")),
            "{failure}"
        );
    }
    // Revocation takes effect on the next call.
    admin
        .revoke_caller(pb::RevokeCallerRequest {
            name: "mtls-worker".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        worker
            .get_access_token(tok("acme-asana"))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    // An idle connection that never sends a ClientHello is closed within the handshake timeout.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("idle connection kept open");
    assert_eq!(n.unwrap_or(0), 0);

    // Reload: a server certificate from a new CA is picked up from the files without a restart;
    // the existing connection keeps working.
    let new_ca = Ca::new("rotated server CA");
    assert!(
        tls_client(addr, &new_ca.pem(), Some(&admin_id), None)
            .await
            .is_err(),
        "trusted the new CA before the reload"
    );
    let new_server = new_ca.leaf(&["localhost", "127.0.0.1"], true);
    std::fs::write(&key_file, &new_server.1).unwrap();
    std::fs::write(&cert_file, &new_server.0).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut fresh = loop {
        if let Ok(mut c) = tls_client(addr, &new_ca.pem(), Some(&admin_id), None).await {
            if c.list_systems(pb::ListSystemsRequest::default())
                .await
                .is_ok()
            {
                break c;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        fresh
            .list_systems(pb::ListSystemsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .systems
            .len(),
        2
    );
    assert_eq!(
        admin
            .list_systems(pb::ListSystemsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .systems
            .len(),
        2
    );

    // credbrokerctl over mTLS, with no token at all.
    let admin_cert = write(certs.path(), "admin.pem", &admin_id.0);
    let admin_key = write(certs.path(), "admin.key", &admin_id.1);
    let new_ca_file = write(certs.path(), "new-ca.pem", &new_ca.pem());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_credbrokerctl"))
            .args([
                "--output",
                "json",
                "system",
                "list",
                "--tls-server-name",
                "localhost",
            ])
            // Written `HTTP://`: a CA certificate asks for TLS all the same (else a token
            // would go out in clear).
            .arg("--addr")
            .arg(format!("HTTP://{addr}"))
            .arg("--ca-cert")
            .arg(new_ca_file)
            .arg("--client-cert")
            .arg(admin_cert)
            .arg("--client-key")
            .arg(admin_key)
            .env_remove("CREDBROKER_TOKEN")
            .env("CREDBROKER_DATA_DIR", "/nonexistent")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);

    let _ = stop_tx.send(());
    task.await.unwrap().unwrap();
}

/// An HTTPS client that trusts only `ca` (a new connection per client: no pooled session).
fn https_client(ca: &Ca) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .build()
        .unwrap()
}

/// The HTTP listener (OAuth callbacks, the proxy, probes) speaks TLS with its own certificate,
/// hands out `https://` proxy URLs, refuses plaintext, and picks up a replaced certificate
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_listener_speaks_tls_and_reloads_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (ca, next_ca) = (Ca::new("http CA"), Ca::new("next http CA"));
    let leaf = ca.leaf(&["localhost", "127.0.0.1"], true);
    let cert_file = write(certs.path(), "http.pem", &leaf.0);
    let key_file = write(certs.path(), "http.key", &leaf.1);
    let mut config = test_config(dir.path());
    config.tls.http_cert_file = Some(cert_file.clone());
    config.tls.http_key_file = Some(key_file.clone());
    config.tls.reload_interval = Duration::from_millis(100);
    let broker = TestBroker::start_with(config).await;
    let base = format!("https://127.0.0.1:{}", broker.http_addr.port());

    let r = https_client(&ca)
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let plain = reqwest::get(format!("http://{}/healthz", broker.http_addr)).await;
    assert!(plain.is_err(), "plaintext was served: {plain:?}");

    // Proxy leases point at the HTTPS listener, and work through it.
    let asana = FakeAsana::start().await;
    asana.add_user("https-pat", "1", "Sync", "sync@example.com");
    let mut admin = broker.admin().await;
    admin
        .register_system(pb::RegisterSystemRequest {
            delivery: pb::Delivery::Proxy as i32,
            ..register_asana("tls-proxy", &asana.base_url, "https-pat", false)
        })
        .await
        .unwrap();
    let t = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "tls-proxy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(t.api_base_url.starts_with(&base), "{}", t.api_base_url);
    let mut req = https_client(&ca).get(format!("{}/users/me", t.api_base_url));
    for h in &t.headers {
        req = req.header(&h.name, &h.value);
    }
    assert_eq!(req.send().await.unwrap().status(), 200);

    // A replaced certificate is served to new connections without a restart.
    let next = next_ca.leaf(&["localhost", "127.0.0.1"], true);
    std::fs::write(&key_file, &next.1).unwrap();
    std::fs::write(&cert_file, &next.0).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while https_client(&next_ca)
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(https_client(&ca)
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_err());
    broker.stop().await;
}

/// Over TLS the gRPC connection cap counts connections still in their handshake: past it a new
/// one is closed before its handshake, and a freed slot serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_grpc_connections_past_the_cap_are_closed_before_the_handshake() {
    let _serial = GRPC_CAP_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("credbroker test CA");
    let server = ca.leaf(&["localhost", "127.0.0.1"], true);
    let mut config = test_config(dir.path());
    config.tls.cert_file = Some(write(certs.path(), "server.pem", &server.0));
    config.tls.key_file = Some(write(certs.path(), "server.key", &server.1));
    config.tls.handshake_timeout = Duration::from_secs(30);
    config.server.grpc_max_connections = 2;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(credbroker::server::run(listener, config, async {
        let _ = stop_rx.await;
    }));
    let serving = |ch: Channel| async move {
        let mut health = HealthClient::new(ch);
        let r = health.check(HealthCheckRequest::default()).await;
        r.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
    };
    // Ready: asked every 20 ms until served.
    let mut every = tokio::time::interval(Duration::from_millis(20));
    let first = loop {
        every.tick().await;
        if let Ok(ch) = tls_channel(addr, &ca.pem(), None).await {
            if serving(ch.clone()).await {
                break ch;
            }
        }
    };
    // A silent socket (no handshake) takes the slot `first` leaves; then a new connection is
    // refused. A silent one that met a slot still held by a channel just dropped was refused
    // itself (the broker closed it): it is replaced. Without a cap before the handshake no
    // connection is ever refused.
    let mut silent = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        silent.retain(crate::support::still_open);
        if silent.is_empty() {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            continue;
        }
        let past = tokio::time::timeout(Duration::from_secs(5), tls_channel(addr, &ca.pem(), None))
            .await
            .expect("a connection past the cap hung");
        match past {
            Err(_) => break,
            Ok(ch) if !serving(ch.clone()).await => break,
            Ok(_) => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no connection was refused past the cap of 2"
        );
    }
    assert!(serving(first.clone()).await);
    // The silent connections closed, a slot serves again once the broker has seen it close.
    drop(silent);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        every.tick().await;
        if let Ok(ch) = tls_channel(addr, &ca.pem(), None).await {
            if serving(ch).await {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a freed slot never served"
        );
    }
    drop(first);
    let _ = stop_tx.send(());
    task.await.unwrap().unwrap();
}
