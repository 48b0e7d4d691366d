//! Upstream chaos: token endpoints that trickle, reset, flood, garble, fail or rate-limit with an
//! absurd `Retry-After`. Every call ends within its deadline with a clear, secret-free error, the
//! server keeps serving, and healthy systems are not slowed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use credbroker::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;

use crate::fakes::*;
use crate::support::*;

const CLIENT_ID: &str = "3MVG9-chaos-client";
const SECRET: &str = "chaos-client-secret-canary-64";

#[derive(Debug, Clone, Copy)]
enum Chaos {
    /// Headers promptly, then one body byte every 300 ms.
    Trickle,
    /// Reads the request, then resets the connection.
    Reset,
    /// A 5 MB JSON body.
    Flood,
    /// `200 application/json` that is not JSON.
    Malformed,
    /// 500 with an HTML page.
    ServerError,
    /// 429 with `Retry-After: 99999999`.
    RetryForever,
}

/// Reads one request head (the token POST is small; its body follows the head).
async fn read_request(s: &mut TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut seen = 0;
    while let Ok(n) = s.read(&mut buf[seen..]).await {
        if n == 0 {
            return;
        }
        seen += n;
        if buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") || seen == buf.len() {
            return;
        }
    }
}

async fn answer(mut s: TcpStream, chaos: Chaos) {
    read_request(&mut s).await;
    let head = |status: &str, ct: &str, len: usize, extra: &str| {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: {ct}\r\ncontent-length: {len}\r\n\
             connection: close\r\n{extra}\r\n"
        )
    };
    match chaos {
        Chaos::Trickle => {
            let _ = s
                .write_all(head("200 OK", "application/json", 100_000, "").as_bytes())
                .await;
            loop {
                if s.write_all(b" ").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        Chaos::Reset => {
            let _ = s.set_zero_linger();
            drop(s);
        }
        Chaos::Flood => {
            let body_len = 5 * 1024 * 1024;
            let _ = s
                .write_all(head("200 OK", "application/json", body_len, "").as_bytes())
                .await;
            let mut body = br#"{"access_token":""#.to_vec();
            body.resize(body_len - 2, b'a');
            body.extend_from_slice(b"\"}");
            let _ = s.write_all(&body).await;
        }
        Chaos::Malformed => {
            let body = r#"{"access_token": "tok", "instance_url": "#;
            let _ = s
                .write_all(
                    format!(
                        "{}{body}",
                        head("200 OK", "application/json", body.len(), "")
                    )
                    .as_bytes(),
                )
                .await;
        }
        Chaos::ServerError => {
            let body = "<html><body>Internal Server Error</body></html>";
            let _ = s
                .write_all(
                    format!(
                        "{}{body}",
                        head("500 Internal Server Error", "text/html", body.len(), "")
                    )
                    .as_bytes(),
                )
                .await;
        }
        Chaos::RetryForever => {
            let body = r#"[{"errorCode":"REQUEST_LIMIT_EXCEEDED","message":"TotalRequests Limit exceeded."}]"#;
            let _ = s
                .write_all(
                    format!(
                        "{}{body}",
                        head(
                            "429 Too Many Requests",
                            "application/json",
                            body.len(),
                            "retry-after: 99999999\r\n"
                        )
                    )
                    .as_bytes(),
                )
                .await;
        }
    }
    // Let the client read what was sent before the socket closes.
    tokio::time::sleep(Duration::from_secs(5)).await;
}

/// A raw TCP server on loopback answering every connection with `chaos`; counts connections.
async fn chaos_server(chaos: Chaos) -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(answer(s, chaos));
        }
    });
    (format!("http://{addr}"), seen)
}

fn register(id: &str, base: &str) -> pb::RegisterSystemRequest {
    pb::RegisterSystemRequest {
        system_id: id.into(),
        kind: pb::SystemKind::Salesforce as i32,
        base_url: base.into(),
        credential: Some(pb::Credential {
            credential: Some(pb::credential::Credential::OauthClientCredentials(
                pb::OAuthClientCredentials {
                    client_id: CLIENT_ID.into(),
                    client_secret: SECRET.into(),
                    scopes: vec![],
                    secret_expires_at: None,
                },
            )),
        }),
        // Registered unchecked: the chaos starts at the first token call.
        check: false,
        ..Default::default()
    }
}

fn token(id: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        system_id: id.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_chaos_ends_in_time_with_clear_errors_and_spares_healthy_systems() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    // Long enough that eight healthy mints finish while the trickling upstream is still being
    // waited for, even on a loaded machine.
    config.egress.upstream_timeout = Duration::from_secs(4);
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    let healthy = FakeSalesforce::start(CLIENT_ID, SECRET).await;

    let all = [
        Chaos::Trickle,
        Chaos::Reset,
        Chaos::Flood,
        Chaos::Malformed,
        Chaos::ServerError,
        Chaos::RetryForever,
    ];
    let mut connections = Vec::new();
    for (i, chaos) in all.iter().enumerate() {
        let (base, seen) = chaos_server(*chaos).await;
        connections.push(seen);
        admin
            .register_system(register(&format!("chaos-{i}"), &base))
            .await
            .unwrap();
    }
    for i in 0..8 {
        admin
            .register_system(register(&format!("healthy-{i}"), &healthy.base_url))
            .await
            .unwrap();
    }

    // All chaos systems at once, each on its own connection…
    let mut tasks = Vec::new();
    for (i, chaos) in all.iter().enumerate() {
        let mut c = broker.admin().await;
        let chaos = *chaos;
        tasks.push(tokio::spawn(async move {
            let r = c.get_access_token(token(&format!("chaos-{i}"))).await;
            (chaos, r)
        }));
    }
    // …while healthy systems mint their first tokens (an upstream token call each) unhindered:
    // all eight are done while the trickling upstream is still being waited for.
    for i in 0..8 {
        let t = admin
            .get_access_token(token(&format!("healthy-{i}")))
            .await
            .unwrap()
            .into_inner();
        assert!(t.headers[0].value.starts_with("Bearer "));
    }
    assert!(
        !tasks[0].is_finished(),
        "healthy mints waited for a misbehaving upstream's timeout"
    );
    assert_eq!(healthy.token_calls(), 8);

    for t in tasks {
        // A hang guard, not a speed check: the upstream timeout ends every call.
        let (chaos, r) = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("a call outlived the upstream timeout")
            .unwrap();
        let e = r.expect_err(&format!("{chaos:?} handed out a token"));
        // Every mode is a vendor fault that may pass: never a dead grant.
        assert_eq!(e.code(), Code::Unavailable, "{chaos:?}: {e:?}");
        let msg = e.message().to_owned();
        assert!(
            !msg.contains(SECRET) && !msg.contains("aaaaaaaa"),
            "{chaos:?}: {msg}"
        );
        match chaos {
            Chaos::Trickle => assert!(msg.contains("timed out"), "{chaos:?}: {msg}"),
            Chaos::Flood => assert!(
                msg.contains("response body larger than"),
                "{chaos:?}: {msg}"
            ),
            Chaos::ServerError => assert!(msg.contains("500"), "{chaos:?}: {msg}"),
            Chaos::RetryForever => {
                // Retry-After is honoured but capped (600 s by default), never 99999999 s.
                let secs: u64 = msg
                    .split("retries in ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("no retry delay in: {msg}"));
                assert!((1..=600).contains(&secs), "retry in {secs} s: {msg}");
                assert!(msg.contains("429") || msg.contains("rate"), "{msg}");
            }
            Chaos::Reset => assert!(msg.contains("could not reach"), "{chaos:?}: {msg}"),
            Chaos::Malformed => assert!(msg.contains("unreadable response"), "{chaos:?}: {msg}"),
        }
    }
    // No fault was read as a dead grant: every system is still active.
    for (i, chaos) in all.iter().enumerate() {
        let sys = admin
            .get_system(pb::GetSystemRequest {
                system_id: format!("chaos-{i}"),
            })
            .await
            .unwrap()
            .into_inner()
            .system
            .unwrap();
        assert_eq!(sys.state, pb::SystemState::Active as i32, "{chaos:?}");
    }

    // Asking the rate-limited one again is answered from its backoff: no new connection.
    let before = connections[5].load(Ordering::SeqCst);
    let e = admin.get_access_token(token("chaos-5")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("retries in"), "{}", e.message());
    assert_eq!(connections[5].load(Ordering::SeqCst), before);
    // The server is still healthy and serving.
    let t = admin.get_access_token(token("healthy-0")).await.unwrap();
    assert!(!t.into_inner().headers.is_empty());
    broker.stop().await;
}
