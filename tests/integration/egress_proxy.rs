//! Egress through a corporate proxy: every upstream connection (checks, proxied calls) goes
//! through it, the egress guard still judges each final target, `no_proxy` hosts go direct,
//! and the proxy's credentials never show.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use credbroker::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::fakes::FakeAsana;
use crate::support::*;

const PROXY_USER: &str = "corp-sync";
const PROXY_PASSWORD: &str = "proxy-canary-pw-2718";
/// The address the test proxy connects out from: a request the vendor sees from it came
/// through the proxy.
const PROXY_EGRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// A small HTTP proxy: CONNECT tunnels and absolute-form requests, `Proxy-Authorization`
/// required. Records what it was asked for ("CONNECT 127.0.0.1:80", "GET 127.0.0.1:80").
#[derive(Clone)]
struct CorpProxy {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<String>>>,
}

impl CorpProxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        tokio::spawn(async move {
            loop {
                let (conn, _) = listener.accept().await.unwrap();
                tokio::spawn(serve(conn, log.clone()));
            }
        });
        Self { addr, asked }
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

async fn serve(mut conn: TcpStream, asked: Arc<Mutex<Vec<String>>>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).await.unwrap_or(0) == 0 || head.len() > 16 * 1024 {
            return;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let mut words = text.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let want = format!(
        "proxy-authorization: basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{PROXY_USER}:{PROXY_PASSWORD}")
        )
    )
    .to_ascii_lowercase();
    if !text.to_ascii_lowercase().contains(&want) {
        let _ = conn
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    }
    let authority = match method {
        "CONNECT" => target.to_owned(),
        _ => url::Url::parse(target)
            .ok()
            .map(|u| {
                format!(
                    "{}:{}",
                    u.host_str().unwrap_or(""),
                    u.port_or_known_default().unwrap_or(80)
                )
            })
            .unwrap_or_default(),
    };
    asked.lock().unwrap().push(format!("{method} {authority}"));
    let Ok(dest) = authority.parse::<SocketAddr>() else {
        let _ = conn
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    };
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(IpAddr::V4(PROXY_EGRESS), 0))
        .unwrap();
    let Ok(mut upstream) = socket.connect(dest).await else {
        let _ = conn
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    };
    if method == "CONNECT" {
        conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .unwrap();
    } else {
        // Absolute-form: the vendor (hyper) takes the request line as it is.
        upstream.write_all(&head).await.unwrap();
    }
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
}

/// A worker's GET of `/users/me` through the broker's proxy for `id`: the status.
async fn proxied_get(admin: &mut Client, id: &str) -> u16 {
    let t = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    reqwest::Client::new()
        .get(format!("{}/users/me", t.api_base_url))
        .header("authorization", &t.headers[0].value)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The port of a fake's base URL (`http://127.0.0.1:PORT/...`).
fn port_of(base_url: &str) -> String {
    url::Url::parse(base_url)
        .unwrap()
        .port()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_upstream_call_goes_through_the_egress_proxy_and_the_guard_still_judges_targets() {
    let proxy = CorpProxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("proxy.creds");
    std::fs::write(&creds, format!("{PROXY_USER}:{PROXY_PASSWORD}\n")).unwrap();
    let proxied = FakeAsana::start().await;
    proxied.add_user("egress-pat-1", "7", "Via Proxy", "p@example.com");
    let direct = FakeAsana::start().await;
    direct.add_user("egress-pat-2", "8", "Direct", "d@example.com");
    let data = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let proxy_url = format!("http://{}", proxy.addr);
    let p = spawn_process(
        data.path(),
        &logs.path().join("broker.log"),
        &[
            ("CREDBROKER_EGRESS_PROXY", proxy_url.as_str()),
            ("CREDBROKER_EGRESS_NO_PROXY", "localhost"),
            (
                "CREDBROKER_EGRESS_PROXY_CREDENTIALS_FILE",
                creds.to_str().unwrap(),
            ),
        ],
    )
    .unwrap_or_else(|(s, log)| panic!("exited {s}: {log}"));
    wait_for_health(p.addr, ServingStatus::Serving).await;
    let token = std::fs::read_to_string(data.path().join("admin.token")).unwrap();
    let mut admin = client(p.addr, Some(token.trim())).await;

    // Through the proxy: the check (reqwest) and the proxied call (hyper, CONNECT).
    let reg = pb::RegisterSystemRequest {
        delivery: pb::Delivery::Proxy as i32,
        ..register_asana("via-proxy", &proxied.base_url, "egress-pat-1", true)
    };
    let c = admin
        .register_system(reg)
        .await
        .unwrap()
        .into_inner()
        .check
        .unwrap();
    assert!(c.ok, "{}", c.message);
    let port = port_of(&proxied.base_url);
    assert!(
        proxy.asked().contains(&format!("GET 127.0.0.1:{port}")),
        "{:?}",
        proxy.asked()
    );
    assert_eq!(proxied_get(&mut admin, "via-proxy").await, 200);
    assert!(
        proxy.asked().contains(&format!("CONNECT 127.0.0.1:{port}")),
        "{:?}",
        proxy.asked()
    );
    assert_eq!(
        proxied.server.peers(),
        [IpAddr::V4(PROXY_EGRESS)].into(),
        "every call reached the vendor from the proxy"
    );

    // `no_proxy` (localhost) goes direct: the proxy never hears of it.
    let local = direct.base_url.replace("127.0.0.1", "localhost");
    let reg = pb::RegisterSystemRequest {
        delivery: pb::Delivery::Proxy as i32,
        ..register_asana("direct", &local, "egress-pat-2", true)
    };
    assert!(
        admin
            .register_system(reg)
            .await
            .unwrap()
            .into_inner()
            .check
            .unwrap()
            .ok
    );
    assert_eq!(proxied_get(&mut admin, "direct").await, 200);
    let dport = port_of(&direct.base_url);
    assert!(
        !proxy
            .asked()
            .iter()
            .any(|a| a.ends_with(&format!(":{dport}"))),
        "{:?}",
        proxy.asked()
    );
    assert_eq!(
        direct.server.peers(),
        [IpAddr::V4(Ipv4Addr::LOCALHOST)].into()
    );

    // A target outside the allow-list is refused though the proxy could reach it.
    let outside = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let outside_url = format!("http://{}/api/1.0", outside.local_addr().unwrap());
    let refused = admin
        .register_system(register_asana(
            "outside",
            &outside_url,
            "egress-pat-3",
            true,
        ))
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("egress guard"),
        "{}",
        refused.message()
    );
    assert!(
        !proxy.asked().iter().any(|a| a.contains("127.0.0.2")),
        "{:?}",
        proxy.asked()
    );

    let log = p.log();
    p.stop().await;
    for secret in [PROXY_PASSWORD, "egress-pat-1", "egress-pat-2"] {
        assert!(!log.contains(secret), "the broker logged {secret}");
        assert!(!c.message.contains(secret));
    }
}
