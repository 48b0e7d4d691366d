//! Proxy delivery: workers reach the vendor through the broker with a lease and never hold the
//! secret.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use credbroker::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;

use crate::support::*;

fn reg(
    id: &str,
    kind: pb::SystemKind,
    base: &str,
    cred: pb::Credential,
) -> pb::RegisterSystemRequest {
    // Delivery unspecified: static secrets default to the proxy.
    pb::RegisterSystemRequest {
        system_id: id.into(),
        kind: kind as i32,
        base_url: base.into(),
        credential: Some(cred),
        check: true,
        ..Default::default()
    }
}

fn tok(id: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        system_id: id.into(),
        ..Default::default()
    }
}

async fn worker(broker: &TestBroker, admin: &mut Client, name: &str) -> Client {
    let t = worker_token(admin, name).await;
    client(broker.addr, Some(&t)).await
}

/// What a worker does: `api_base_url + path` with the headers it got.
async fn call(t: &pb::GetAccessTokenResponse, path: &str, extra: &[(&str, &str)]) -> (u16, String) {
    let mut req = reqwest::Client::new().get(format!("{}{path}", t.api_base_url));
    for h in &t.headers {
        req = req.header(&h.name, &h.value);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_static_kind_reaches_its_vendor_through_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let mut w = worker(&broker, &mut admin, "proxy-worker").await;

    let asana = FakeAsana::start().await;
    asana.add_user("px-asana-pat", "11", "A", "a@example.com");
    let ado = FakeAzureDevOps::start().await;
    ado.add_pat(
        "px-ado-pat",
        "u-9",
        "ADO User",
        "ado@example.com",
        ADO_ALL_SCOPES,
        true,
    );
    let fd = FakeFreshworks::start(Freshworks::Desk).await;
    fd.add_key("px-fd-key", 5, "Desk Agent", "fd@example.com");
    let fs = FakeFreshworks::start(Freshworks::Service).await;
    fs.add_key("px-fs-key", 6, "Service Agent", "fs@example.com");
    let sn = FakeServiceNow::start().await;
    sn.add_user(
        "px.user",
        "px-sn-password",
        "5ab",
        "SN User",
        "sn@example.com",
    );
    let api_key = |k: &str| pb::Credential {
        credential: Some(pb::credential::Credential::ApiKey(pb::ApiKey {
            key: k.into(),
            expires_at: None,
        })),
    };
    let cases = [
        (reg("p-asana", pb::SystemKind::Asana, &asana.base_url, pat("px-asana-pat")), "/users/me", vec![], "\"gid\":\"11\"", "px-asana-pat"),
        (reg("p-ado", pb::SystemKind::AzureDevops, &ado.base_url, pat("px-ado-pat")), "/_apis/connectionData", vec![("accept", "application/json"), ("x-tfs-fedauthredirect", "Suppress"), ("accept-encoding", "identity"), ("cache-control", "no-cache")], "\"id\":\"u-9\"", "px-ado-pat"),
        (reg("p-fd", pb::SystemKind::Freshdesk, &fd.base_url, api_key("px-fd-key")), "/agents/me", vec![], "\"id\":5", "px-fd-key"),
        (reg("p-fs", pb::SystemKind::Freshservice, &fs.base_url, api_key("px-fs-key")), "/agents/me", vec![], "\"id\":6", "px-fs-key"),
        (
            reg("p-sn", pb::SystemKind::Servicenow, &sn.base_url, pb::Credential { credential: Some(pb::credential::Credential::Basic(pb::BasicCredential { username: "px.user".into(), password: "px-sn-password".into() })) }),
            "/api/now/table/sys_user?sysparm_query=user_name%3Dpx.user&sysparm_limit=1&sysparm_fields=sys_id",
            vec![],
            "\"sys_id\":\"5ab\"",
            "px-sn-password",
        ),
    ];
    for (req, path, extra, expect, secret) in cases {
        let id = req.system_id.clone();
        let sys = admin
            .register_system(req)
            .await
            .unwrap()
            .into_inner()
            .system
            .unwrap();
        assert_eq!(sys.delivery, pb::Delivery::Proxy as i32, "{id}");
        let t = w.get_access_token(tok(&id)).await.unwrap().into_inner();
        assert_eq!(
            t.api_base_url,
            format!("http://{}/proxy/{id}", broker.http_addr)
        );
        let header = &t.headers[0].value;
        assert!(header.starts_with("Bearer cbl_"), "{header}");
        // Nothing the worker holds or sends contains the secret, in clear or base64.
        for form in [
            secret.to_owned(),
            STANDARD.encode(secret),
            STANDARD.encode(format!("{secret}:X")),
            STANDARD.encode(format!(":{secret}")),
        ] {
            assert!(
                !header.contains(&form) && !t.api_base_url.contains(&form),
                "{id}: the lease carries the secret"
            );
        }
        let expires = t.expires_at.unwrap().seconds - credbroker::model::unix_now() as i64;
        assert!((290..=300).contains(&expires), "lease lifetime {expires}");
        let (status, body) = call(&t, path, &extra).await;
        assert_eq!(status, 200, "{id}: {body}");
        assert!(body.contains(expect), "{id}: {body}");
        assert!(!body.contains(secret));
    }
    for u in [
        asana.unexpected(),
        ado.server.unexpected(),
        fd.server.unexpected(),
        fs.server.unexpected(),
        sn.server.unexpected(),
    ] {
        assert!(u.is_empty(), "{u:?}");
    }
    // Two audit events per proxied call (before forwarding, and its outcome), with the path and
    // no header values.
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    let (forwarding, proxied): (Vec<serde_json::Value>, Vec<serde_json::Value>) = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["rpc"] == "Proxy")
        .partition(|e| e["outcome"] == "forwarding");
    assert_eq!(forwarding.len(), 5);
    assert_eq!(proxied.len(), 5);
    assert!(proxied
        .iter()
        .all(|e| e["caller"] == "proxy-worker" && e["code"] == "200" && e["method"] == "GET"));
    assert!(!audit.contains("cbl_"), "a lease is in the audit trail");
    broker.stop().await;
}

/// Every kind of bad lease gets 401 and nothing reaches the vendor; each lease that an event
/// (rotation, delivery switch, revocation, deletion) kills is shown to work just before it, so
/// the 401 after it is the event's doing (leases here live the default 300 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_leases_get_401_and_nothing_is_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let mut w = worker(&broker, &mut admin, "w1").await;
    let fake = FakeAsana::start().await;
    fake.add_user("pat-a", "1", "A", "a@example.com");
    fake.add_user("pat-b", "2", "B", "b@example.com");
    fake.add_user("pat-a2", "1", "A", "a@example.com");
    for (id, p) in [("sys-a", "pat-a"), ("sys-b", "pat-b")] {
        admin
            .register_system(reg(id, pb::SystemKind::Asana, &fake.base_url, pat(p)))
            .await
            .unwrap();
    }
    // Every request that reaches the vendor from now on is one of the controls, counted here.
    let mut forwarded = fake.me_calls();
    let mut works = |t: pb::GetAccessTokenResponse, what: &'static str| {
        forwarded += 1;
        async move {
            assert_eq!(call(&t, "/users/me", &[]).await.0, 200, "{what}: control");
            t
        }
    };
    let a = w.get_access_token(tok("sys-a")).await.unwrap().into_inner();
    let a = works(a, "sys-a").await;

    let mut forged = a.clone();
    forged.headers[0].value = "Bearer cbl_eyJzIjoic3lzLWEifQ.AAAA".into();
    let mut tampered = a.clone();
    tampered.headers[0].value = a.headers[0].value.replacen("cbl_e", "cbl_f", 1);
    let mut none = a.clone();
    none.headers.clear();
    let mut other = a.clone();
    other.api_base_url = a.api_base_url.replace("/sys-a", "/sys-b");
    for (name, t) in [
        ("forged", &forged),
        ("tampered", &tampered),
        ("missing", &none),
        ("other system", &other),
    ] {
        assert_eq!(call(t, "/users/me", &[]).await.0, 401, "{name}");
    }
    // After a rotation…
    admin
        .rotate_credential(pb::RotateCredentialRequest {
            system_id: "sys-a".into(),
            credential: Some(pat("pat-a2")),
            skip_check: true,
        })
        .await
        .unwrap();
    assert_eq!(call(&a, "/users/me", &[]).await.0, 401, "post-rotation");
    // …a delivery switch…
    let b = w.get_access_token(tok("sys-b")).await.unwrap().into_inner();
    let b = works(b, "sys-b").await;
    admin
        .set_delivery(pb::SetDeliveryRequest {
            system_id: "sys-b".into(),
            delivery: pb::Delivery::Header as i32,
        })
        .await
        .unwrap();
    assert_eq!(
        call(&b, "/users/me", &[]).await.0,
        401,
        "after switching to header delivery"
    );
    admin
        .set_delivery(pb::SetDeliveryRequest {
            system_id: "sys-b".into(),
            delivery: pb::Delivery::Proxy as i32,
        })
        .await
        .unwrap();
    // …a revocation…
    let b = w.get_access_token(tok("sys-b")).await.unwrap().into_inner();
    let b = works(b, "w1 on sys-b").await;
    admin
        .revoke_caller(pb::RevokeCallerRequest { name: "w1".into() })
        .await
        .unwrap();
    assert_eq!(call(&b, "/users/me", &[]).await.0, 401, "revoked caller");
    // …and a deletion.
    let b2 = admin
        .get_access_token(tok("sys-b"))
        .await
        .unwrap()
        .into_inner();
    let b2 = works(b2, "admin on sys-b").await;
    admin
        .delete_system(pb::DeleteSystemRequest {
            system_id: "sys-b".into(),
        })
        .await
        .unwrap();
    assert_eq!(call(&b2, "/users/me", &[]).await.0, 401, "deleted system");
    assert_eq!(
        fake.me_calls(),
        forwarded,
        "a refused request reached the vendor"
    );
    broker.stop().await;
}

/// A lease works until its `expires_at`, and not after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_expires_at_its_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    // Expiry has whole-second resolution: a 4 s lease lives between 3 and 4 s, ample for the
    // control call even on a loaded machine.
    config.proxy.lease_ttl = Duration::from_secs(4);
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    let fake = FakeAsana::start().await;
    fake.add_user("pat-x", "1", "A", "a@example.com");
    admin
        .register_system(reg(
            "sys-x",
            pb::SystemKind::Asana,
            &fake.base_url,
            pat("pat-x"),
        ))
        .await
        .unwrap();
    let t = admin
        .get_access_token(tok("sys-x"))
        .await
        .unwrap()
        .into_inner();
    let registered = fake.me_calls();
    assert_eq!(call(&t, "/users/me", &[]).await.0, 200);
    let expires = std::time::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(t.expires_at.unwrap().seconds).unwrap());
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(left <= Duration::from_secs(4), "expires in {left:?}");
    // Waiting out the lease is the point of the test, not a readiness wait.
    tokio::time::sleep(left + Duration::from_millis(100)).await;
    assert_eq!(call(&t, "/users/me", &[]).await.0, 401, "expired");
    assert_eq!(fake.me_calls(), registered + 1);
    broker.stop().await;
}

/// Sends one raw HTTP/1.1 request and returns the status code.
async fn raw(addr: std::net::SocketAddr, request: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_escapes_absolute_urls_and_host_overrides_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let fake = FakeAsana::start().await;
    fake.add_user("pat-esc", "1", "A", "a@example.com");
    admin
        .register_system(reg(
            "esc",
            pb::SystemKind::Asana,
            &fake.base_url,
            pat("pat-esc"),
        ))
        .await
        .unwrap();
    let t = admin
        .get_access_token(tok("esc"))
        .await
        .unwrap()
        .into_inner();
    let auth = &t.headers[0].value;
    let host = broker.http_addr.to_string();
    let fake_origin = fake.base_url.trim_end_matches("/api/1.0").to_owned();
    let ok = format!("GET /proxy/esc/users/me HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n");
    assert_eq!(
        raw(broker.http_addr, &ok).await,
        200,
        "the control request must work"
    );
    let before = fake.server.count("");
    let refused = [
        format!("GET /proxy/esc/../esc/users/me HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"),
        format!("GET /proxy/esc/%2e%2e/users/me HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"),
        format!("GET /proxy/esc/%2E%2e/%2E/users/me HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"),
        format!("GET /proxy/esc/users%2f..%2fme HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"),
        format!("GET /proxy/esc/./users/me HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"),
        // Absolute form naming another authority, with a path the proxy would serve.
        format!("GET {fake_origin}/proxy/esc/users/me HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"),
        format!("GET /proxy/esc/users/me HTTP/1.1\r\nHost: internal.example\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"),
        // A Host that is not ASCII names no broker; a dot segment with parameters is a dot segment.
        format!("GET /proxy/esc/users/me HTTP/1.1\r\nHost: {host}\u{e9}\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"),
        format!("GET /proxy/esc/..;x/esc/users/me HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"),
    ];
    for r in &refused {
        let code = raw(broker.http_addr, r).await;
        assert_eq!(code, 400, "for {}", r.lines().next().unwrap());
    }
    assert_eq!(
        fake.server.count(""),
        before,
        "an escaped request reached the vendor (at any path)"
    );
    broker.stop().await;
}

/// Resident memory of process `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A vendor with a 50 MB download, an upload sink, redirects and a 401, streaming throughout.
/// Asana's 401 unless the request carries `Bearer {secret}`.
fn refuse_unless_bearer(req: &Request, secret: &str) -> Option<Response> {
    let ok = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {secret}"));
    (!ok).then(|| {
        (
            StatusCode::UNAUTHORIZED,
            "{\"errors\":[{\"message\":\"Not Authorized\"}]}",
        )
            .into_response()
    })
}

/// Registers an Asana-style system `id` at `base` with PAT `secret` (unchecked, proxy delivery)
/// and returns its `GetAccessToken` answer and the lease header value.
async fn lease(
    admin: &mut Client,
    id: &str,
    base: &str,
    secret: &str,
) -> (pb::GetAccessTokenResponse, String) {
    let mut req = reg(id, pb::SystemKind::Asana, base, pat(secret));
    req.check = false;
    admin.register_system(req).await.unwrap();
    let t = admin.get_access_token(tok(id)).await.unwrap().into_inner();
    let auth = t.headers[0].value.clone();
    (t, auth)
}

/// Serves `app` on loopback; returns its Asana-style base URL.
async fn serve_vendor(app: axum::Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}/api/1.0")
}

/// The vendor's base URL and how many uploads reached it.
async fn streaming_vendor(secret: &'static str) -> (String, Arc<AtomicUsize>) {
    let uploads = Arc::new(AtomicUsize::new(0));
    let counted = uploads.clone();
    let app = axum::Router::new().fallback(move |req: Request| {
        let counted = counted.clone();
        async move {
            if let Some(refused) = refuse_unless_bearer(&req, secret) {
                return refused;
            }
            let host = req
                .headers()
                .get("host")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            match req.uri().path() {
                "/api/1.0/big" => {
                    let chunk = axum::body::Bytes::from(vec![b'x'; 64 * 1024]);
                    let stream = tokio_stream::iter(
                        (0..800).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
                    );
                    Response::new(Body::from_stream(stream))
                }
                "/api/1.0/upload" => {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let mut n = 0usize;
                    let mut s = req.into_body().into_data_stream();
                    while let Some(c) = s.next().await {
                        n += c.unwrap().len();
                    }
                    (StatusCode::OK, format!("{{\"bytes\":{n}}}")).into_response()
                }
                "/api/1.0/slow" => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    (StatusCode::OK, "{\"data\":[]}").into_response()
                }
                // Takes the whole body, then works on it for 800 ms.
                "/api/1.0/upload-then-work" => {
                    let mut s = req.into_body().into_data_stream();
                    while let Some(c) = s.next().await {
                        c.unwrap();
                    }
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    (StatusCode::CREATED, "{}").into_response()
                }
                "/api/1.0/moved" => (
                    StatusCode::FOUND,
                    [("location", format!("http://{host}/api/1.0/users/me"))],
                    "",
                )
                    .into_response(),
                "/api/1.0/away" => (
                    StatusCode::FOUND,
                    [("location", "https://elsewhere.example/x")],
                    "",
                )
                    .into_response(),
                // Freshdesk's way to the next page.
                "/api/1.0/paged" => (
                    StatusCode::OK,
                    [(
                        "link",
                        format!(
                            "<http://{host}/api/1.0/tasks?page=2>; rel=\"next\", \
                             <https://elsewhere.example/x>; rel=\"help\""
                        ),
                    )],
                    "[]",
                )
                    .into_response(),
                _ => (StatusCode::NOT_FOUND, "").into_response(),
            }
        }
    });
    (serve_vendor(app).await, uploads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_in_bounded_memory_and_redirects_are_not_followed() {
    // The broker as its own process, so its memory is its own (default body cap: 256 MiB).
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let proc = spawn_process(dir.path(), &logs.path().join("broker.log"), &[])
        .unwrap_or_else(|(s, log)| panic!("exited {s}: {log}"));
    wait_for_health(
        proc.addr,
        tonic_health::pb::health_check_response::ServingStatus::Serving,
    )
    .await;
    let pid = proc.child.id();
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let mut admin = client(proc.addr, Some(token.trim())).await;
    let (base, uploads) = streaming_vendor("stream-pat").await;
    let (t, auth) = lease(&mut admin, "big", &base, "stream-pat").await;
    let http = no_redirects();

    let before = rss_kib(pid);
    let mut peak = before;
    // 50 MB down.
    let r = http
        .get(format!("{}/big", t.api_base_url))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut down = 0usize;
    while let Some(c) = stream.next().await {
        down += c.unwrap().len();
        peak = peak.max(rss_kib(pid));
    }
    assert_eq!(down, 800 * 64 * 1024);
    // 10 MB up.
    let chunk = axum::body::Bytes::from(vec![b'y'; 64 * 1024]);
    let up = tokio_stream::iter((0..160).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let r = http
        .post(format!("{}/upload", t.api_base_url))
        .header("authorization", &auth)
        .body(reqwest::Body::wrap_stream(up))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.text().await.unwrap(),
        format!("{{\"bytes\":{}}}", 160 * 64 * 1024)
    );
    peak = peak.max(rss_kib(pid));
    eprintln!("proxy streaming: broker RSS before {before} KiB, peak {peak} KiB");
    assert!(
        peak - before < 30 * 1024,
        "the broker grew by {} KiB while streaming 60 MB",
        peak - before
    );
    assert_eq!(uploads.load(Ordering::SeqCst), 1);

    // A declared body over the cap is refused before anything is forwarded.
    let url = url::Url::parse(&t.api_base_url).unwrap();
    let http_addr: std::net::SocketAddr =
        format!("{}:{}", url.host_str().unwrap(), url.port().unwrap())
            .parse()
            .unwrap();
    let over = format!(
        "POST {}/upload HTTP/1.1\r\nHost: {http_addr}\r\nAuthorization: {auth}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        url.path(),
        300u64 * 1024 * 1024
    );
    assert_eq!(raw(http_addr, &over).await, 413);
    assert_eq!(
        uploads.load(Ordering::SeqCst),
        1,
        "an upload over the cap reached the vendor"
    );
    // Redirects: under the same base the Location is rewritten to the proxy; elsewhere it is
    // passed back untouched; neither is followed.
    let r = http
        .get(format!("{}/moved", t.api_base_url))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(
        r.headers()["location"],
        format!("{}/users/me", t.api_base_url).as_str()
    );
    let r = http
        .get(format!("{}/away", t.api_base_url))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "https://elsewhere.example/x");
    // A Link header's targets under the base likewise (a worker following the next page sends
    // its lease to the broker, not to the vendor); others untouched.
    let r = http
        .get(format!("{}/paged", t.api_base_url))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["link"],
        format!(
            "<{}/tasks?page=2>; rel=\"next\", <https://elsewhere.example/x>; rel=\"help\"",
            t.api_base_url
        )
        .as_str()
    );
    drop(admin);
    assert_eq!(
        tokio::task::spawn_blocking(move || proc.terminate())
            .await
            .unwrap(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vendor_401_through_the_proxy_is_surfaced_on_the_system() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let fake = FakeAsana::start().await;
    fake.add_user("pat-401", "1", "A", "a@example.com");
    admin
        .register_system(reg(
            "s401",
            pb::SystemKind::Asana,
            &fake.base_url,
            pat("pat-401"),
        ))
        .await
        .unwrap();
    let t = admin
        .get_access_token(tok("s401"))
        .await
        .unwrap()
        .into_inner();
    fake.revoke("pat-401");
    let (status, body) = call(&t, "/users/me", &[]).await;
    assert_eq!(status, 401);
    assert!(
        body.contains("Not Authorized"),
        "the vendor's answer passes through: {body}"
    );
    let sys = counted_401s(&mut admin, "s401", 1).await;
    assert!(sys.last_proxy_unauthorized_at.is_some());
    // A storm of them: each one counted, none lost to the writes' coalescing.
    let mut storm = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let t = t.clone();
        storm.spawn(async move { call(&t, "/users/me", &[]).await.0 });
    }
    while let Some(status) = storm.join_next().await {
        assert_eq!(status.unwrap(), 401);
    }
    counted_401s(&mut admin, "s401", 41).await;
    broker.stop().await;
}

/// The system once its `proxy_unauthorized_count` (written in the background) reaches `want`;
/// fails past it or after 10 s.
async fn counted_401s(admin: &mut Client, id: &str, want: u64) -> pb::System {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let sys = admin
            .get_system(pb::GetSystemRequest {
                system_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .system
            .unwrap();
        assert!(sys.proxy_unauthorized_count <= want, "{sys:?}");
        if sys.proxy_unauthorized_count == want {
            return sys;
        }
        assert!(std::time::Instant::now() < deadline, "counted {sys:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A vendor that answers `/api/1.0/hang` never, `/api/1.0/stall` with a head and half a body
/// and then nothing, and everything else at once.
async fn slow_vendor(secret: &'static str) -> String {
    let app = axum::Router::new().fallback(move |req: Request| async move {
        if let Some(refused) = refuse_unless_bearer(&req, secret) {
            return refused;
        }
        match req.uri().path() {
            "/api/1.0/hang" => {
                std::future::pending::<()>().await;
                unreachable!()
            }
            "/api/1.0/stall" => {
                let first = tokio_stream::iter([Ok::<_, std::io::Error>(axum::body::Bytes::from(
                    vec![b'x'; 100 * 1024],
                ))]);
                let never = tokio_stream::pending::<Result<axum::body::Bytes, std::io::Error>>();
                Response::builder()
                    .header("content-length", "1000000")
                    .body(Body::from_stream(first.chain(never)))
                    .unwrap()
            }
            _ => (StatusCode::OK, "{\"data\":{\"gid\":\"1\"}}").into_response(),
        }
    });
    serve_vendor(app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vendor_that_stops_answering_gets_a_504_or_a_cut_body_within_the_read_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.proxy.read_timeout = Duration::from_millis(400);
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    let base = slow_vendor("slow-pat").await;
    let mut req = reg("slow", pb::SystemKind::Asana, &base, pat("slow-pat"));
    req.check = false;
    admin.register_system(req).await.unwrap();
    let t = admin
        .get_access_token(tok("slow"))
        .await
        .unwrap()
        .into_inner();

    let started = std::time::Instant::now();
    let (status, body) = call(&t, "/hang", &[]).await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("did not answer in time"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // The head arrives, then the body stalls: the worker sees the body break off.
    let r = reqwest::Client::new()
        .get(format!("{}/stall", t.api_base_url))
        .header("authorization", &t.headers[0].value)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let started = std::time::Instant::now();
    assert!(
        r.bytes().await.is_err(),
        "a stalled body must not look whole"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // The proxy is fine afterwards.
    let (status, body) = call(&t, "/users/me", &[]).await;
    assert_eq!(status, 200, "{body}");
    broker.stop().await;
}

/// A vendor that reads a write and then drops the connection: the worker is told the request
/// may have reached it, not that it could not be reached (which invites a second write); one
/// that is not listening at all could not be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_answer_was_lost_is_not_reported_as_unsent() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/api/1.0", l.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = l.accept().await {
            // Reads what the proxy sends (head and body), then hangs up without answering.
            let mut buf = vec![0u8; 64 * 1024];
            let mut seen = Vec::new();
            while !String::from_utf8_lossy(&seen).contains("\"x\"") {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            drop(sock);
        }
    });
    let (t, auth) = lease(&mut admin, "hangs-up", &base, "hup-pat").await;
    let r = reqwest::Client::new()
        .post(format!("{}/tasks", t.api_base_url))
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .body("{\"name\":\"x\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let body = r.text().await.unwrap();
    assert!(body.contains("may have reached it"), "{body}");

    // Nobody listening: could not be reached.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone = format!("http://{}/api/1.0", closed.local_addr().unwrap());
    drop(closed);
    let (t, auth) = lease(&mut admin, "nobody", &gone, "none-pat").await;
    let r = reqwest::Client::new()
        .post(format!("{}/tasks", t.api_base_url))
        .header("authorization", &auth)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let body = r.text().await.unwrap();
    assert!(body.contains("could not be reached"), "{body}");
    broker.stop().await;
}

/// A slow upload is not the vendor's silence: the read timeout for the answer's head runs from
/// the worker's last chunk. An upload that stops still ends within it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_taken_for_a_silent_vendor() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.proxy.read_timeout = Duration::from_millis(400);
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    let (base, uploads) = streaming_vendor("up-pat").await;
    let (t, auth) = lease(&mut admin, "slow-up", &base, "up-pat").await;
    let http = reqwest::Client::new();
    // Ten chunks 150 ms apart: 1.5 s of upload against a 0.4 s read timeout.
    let chunk = axum::body::Bytes::from(vec![b'u'; 10 * 1024]);
    let paced = tokio_stream::StreamExt::throttle(
        tokio_stream::iter((0..10).map(move |_| Ok::<_, std::io::Error>(chunk.clone()))),
        Duration::from_millis(150),
    );
    let started = std::time::Instant::now();
    let r = http
        .post(format!("{}/upload", t.api_base_url))
        .header("authorization", &auth)
        .body(reqwest::Body::wrap_stream(paced))
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1200));
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.text().await.unwrap(),
        format!("{{\"bytes\":{}}}", 10 * 10 * 1024)
    );
    assert_eq!(uploads.load(Ordering::SeqCst), 1);

    // One chunk, then nothing: the vendor never has the whole body, and the call ends within
    // the read timeout of that chunk, not never.
    let first = tokio_stream::iter([Ok::<_, std::io::Error>(axum::body::Bytes::from(vec![
        b'u';
        1024
    ]))]);
    let stuck = first.chain(tokio_stream::pending());
    let started = std::time::Instant::now();
    let r = http
        .post(format!("{}/upload", t.api_base_url))
        .header("authorization", &auth)
        .header("content-length", "100000")
        .body(reqwest::Body::wrap_stream(stuck))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(5));

    // A byte every 300 ms, for ever: far below the least rate that keeps pushing the deadline
    // back, so the call ends within a few read timeouts, not whenever the worker likes.
    let trickle = tokio_stream::StreamExt::throttle(
        tokio_stream::iter(std::iter::repeat_with(|| {
            Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"u"))
        })),
        Duration::from_millis(300),
    );
    let started = std::time::Instant::now();
    let sent = http
        .post(format!("{}/upload", t.api_base_url))
        .header("authorization", &auth)
        .body(reqwest::Body::wrap_stream(trickle))
        .send();
    let r = tokio::time::timeout(Duration::from_secs(10), sent).await;
    let r = r
        .expect("a trickled upload held the call for 10 s")
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    broker.stop().await;
}

/// A broker whose system `id` (at [`streaming_vendor`]) takes one proxied call at a time and
/// queues none, with the proxy's `read_timeout`; its lease and the lease's header value.
async fn one_slot(
    dir: &std::path::Path,
    id: &str,
    read_timeout: Duration,
) -> (TestBroker, pb::GetAccessTokenResponse, String) {
    let mut config = test_config(dir);
    config.proxy.read_timeout = read_timeout;
    let one = credbroker::broker::quota::LimitsOverride {
        max_concurrent: Some(1),
        max_queue_wait_seconds: Some(0),
        ..Default::default()
    };
    config.quota.systems.insert(id.into(), one);
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    let pat: &'static str = Box::leak(format!("{id}-pat").into_boxed_str());
    let (base, _) = streaming_vendor(pat).await;
    let (t, auth) = lease(&mut admin, id, &base, pat).await;
    (broker, t, auth)
}

/// A worker that gives up after a slow upload, while the vendor works on it: the call keeps the
/// system's concurrency slot until the vendor answers (the deadline the upload earned), so the
/// worker's retry cannot put a second upload on the vendor past its cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_gives_up_after_a_slow_upload_keeps_the_slot_until_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let read_timeout = Duration::from_millis(1000);
    let (broker, t, auth) = one_slot(dir.path(), "slow-up", read_timeout).await;
    // Six chunks 150 ms apart (the last at about 0.75 s); the vendor then works for 0.8 s, past
    // the read timeout counted from the call's start (1 s), within the one the upload earned
    // (1.75 s). The worker gives up at 1.05 s, while the vendor works.
    let chunk = axum::body::Bytes::from(vec![b'u'; 8 * 1024]);
    let paced = tokio_stream::StreamExt::throttle(
        tokio_stream::iter((0..6).map(move |_| Ok::<_, std::io::Error>(chunk.clone()))),
        Duration::from_millis(150),
    );
    let gave_up = reqwest::Client::new()
        .post(format!("{}/upload-then-work", t.api_base_url))
        .header("authorization", &auth)
        .body(reqwest::Body::wrap_stream(paced))
        .timeout(Duration::from_millis(1050))
        .send()
        .await;
    assert!(gave_up.unwrap_err().is_timeout());
    let (status, body) = call(&t, "/users/me", &[]).await;
    assert_eq!(
        status, 429,
        "the vendor still works on the abandoned upload: {body}"
    );
    broker.stop().await;
}

/// A chunked upload past the proxy's body cap is the worker's fault, answered 413, not a broken
/// vendor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upload_over_the_cap_is_answered_413() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.proxy.max_body_bytes = 4096;
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    let (base, _) = streaming_vendor("cap-pat").await;
    let (t, auth) = lease(&mut admin, "capped", &base, "cap-pat").await;
    let chunk = axum::body::Bytes::from(vec![b'c'; 1024]);
    let up = tokio_stream::iter((0..8).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let r = reqwest::Client::new()
        .post(format!("{}/upload", t.api_base_url))
        .header("authorization", &auth)
        .body(reqwest::Body::wrap_stream(up))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    broker.stop().await;
}

/// A worker that goes away while the vendor is still answering (its client deadline): the call
/// still gets its outcome line in the trail, `cancelled`, after the `forwarding` one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_its_worker_abandons_still_gets_an_outcome_line() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let base = slow_vendor("gone-pat").await;
    let mut req = reg("gone", pb::SystemKind::Asana, &base, pat("gone-pat"));
    req.check = false;
    admin.register_system(req).await.unwrap();
    let mut w = worker(&broker, &mut admin, "impatient").await;
    let t = w.get_access_token(tok("gone")).await.unwrap().into_inner();
    let gave_up = reqwest::Client::new()
        .get(format!("{}/hang", t.api_base_url))
        .header("authorization", &t.headers[0].value)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gave_up.unwrap_err().is_timeout());
    let audit = dir.path().join("audit.log");
    let lines = || {
        let trail = std::fs::read_to_string(&audit).unwrap_or_default();
        let of_the_call = |l: &&str| l.contains(r#""caller":"impatient""#) && l.contains("/hang");
        trail
            .lines()
            .filter(of_the_call)
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| v["outcome"].as_str().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(10), "the outcome line", || {
        lines().len() == 2
    })
    .await;
    assert_eq!(lines(), ["forwarding", "cancelled"]);
    broker.stop().await;
}

/// What the session vendor saw: (method, cookie header) per request.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;

/// A vendor that opens a session on every answer (ServiceNow's `JSESSIONID`) and redirects to a
/// sibling path that shares the base's prefix but not its segments.
async fn session_vendor(secret: &'static str, seen: Seen) -> String {
    let app = axum::Router::new().fallback(move |req: Request| {
        let seen = seen.clone();
        async move {
            if let Some(refused) = refuse_unless_bearer(&req, secret) {
                return refused;
            }
            let cookie = req
                .headers()
                .get("cookie")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            seen.lock()
                .unwrap()
                .push((req.method().to_string(), cookie));
            let host = req.headers()["host"].to_str().unwrap().to_owned();
            let location = match req.uri().path() {
                "/api/1.0/sibling" => format!("http://{host}/api/1.02/x"),
                _ => format!("http://{host}/api/1.0/next?page=2"),
            };
            (
                StatusCode::FOUND,
                [
                    (
                        "set-cookie",
                        "JSESSIONID=vendor-session-canary; Path=/; HttpOnly".to_owned(),
                    ),
                    (
                        "set-cookie",
                        "glide_user_route=glide.canary; Path=/".to_owned(),
                    ),
                    ("location", location),
                ],
                "",
            )
                .into_response()
        }
    });
    serve_vendor(app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendor_sessions_and_unsafe_methods_never_cross_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let seen: Seen = Default::default();
    let base = session_vendor("session-pat", seen.clone()).await;
    let (t, auth) = lease(&mut admin, "sess", &base, "session-pat").await;
    let http = no_redirects();

    let r = http
        .get(format!("{}/users/me", t.api_base_url))
        .header("authorization", &auth)
        .header("cookie", "JSESSIONID=worker-cookie-canary")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert!(r.headers().get("set-cookie").is_none(), "{:?}", r.headers());
    assert_eq!(
        r.headers()["location"],
        format!("{}/next?page=2", t.api_base_url).as_str(),
        "a Location under the base is rewritten to the proxy"
    );
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [("GET".to_owned(), String::new())]
    );
    // `/api/1.02` is not under `/api/1.0`: passed back untouched, not rewritten.
    let r = http
        .get(format!("{}/sibling", t.api_base_url))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    let sibling = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(sibling.ends_with("/api/1.02/x"), "{sibling}");
    assert!(!sibling.contains("/proxy/"), "{sibling}");
    let calls = seen.lock().unwrap().len();
    for method in ["TRACE", "TRACK"] {
        let r = http
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}/users/me", t.api_base_url),
            )
            .header("authorization", &auth)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method}");
    }
    assert_eq!(seen.lock().unwrap().len(), calls, "nothing was forwarded");

    // No audit, no forward.
    let path = dir.path().join("audit.log");
    std::fs::rename(&path, dir.path().join("audit.before")).unwrap();
    std::os::unix::fs::symlink("/dev/full", &path).unwrap();
    let r = http
        .post(format!("{}/users/me", t.api_base_url))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        seen.lock().unwrap().len(),
        calls,
        "forwarded without an audit line"
    );
    std::fs::remove_file(&path).unwrap();
    broker.stop().await;
}

/// The proxy's connections go through the egress guard's resolver: a host name that passes the
/// registration checks (it is no IP literal and not `localhost`) but resolves to loopback is
/// refused when the proxy connects, unless the allow-list admits loopback. The machine's own
/// name (in /etc/hosts, resolving to a loopback address: 127.0.0.1 here, 127.0.1.1 on stock
/// Debian) is such a name; the vendor listens on whichever address it resolves to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_resolves_through_the_egress_guard() {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned();
    let resolved: Vec<_> = tokio::net::lookup_host((name.as_str(), 80))
        .await
        .unwrap_or_else(|e| panic!("the machine's name {name} does not resolve: {e}"))
        .collect();
    let ip = resolved
        .iter()
        .map(|a| a.ip())
        .find(|ip| ip.is_loopback())
        .unwrap_or_else(|| {
            panic!(
                "this test needs the machine's name ({name}) to resolve to loopback: {resolved:?}"
            )
        });
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().fallback(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        async { (StatusCode::OK, "{\"data\":{}}") }
    });
    let l = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    let base = format!("http://{name}:{port}/api/1.0");
    for (allow_loopback, expected) in [(true, 200), (false, 502)] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        config.egress.allow = if allow_loopback {
            credbroker::backends::egress::AllowList::parse("127.0.0.0/8,::1/128").unwrap()
        } else {
            Default::default()
        };
        let broker = TestBroker::start_with(config).await;
        let mut admin = broker.admin().await;
        let (t, auth) = lease(&mut admin, "named", &base, "named-pat").await;
        let before = hits.load(Ordering::SeqCst);
        let r = no_redirects()
            .get(format!("{}/users/me", t.api_base_url))
            .header("authorization", &auth)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            expected,
            "allow loopback: {allow_loopback}"
        );
        let reached = hits.load(Ordering::SeqCst) - before;
        assert_eq!(
            reached,
            usize::from(allow_loopback),
            "allow loopback: {allow_loopback}"
        );
        broker.stop().await;
    }
}

/// An OAuth system on proxy delivery whose access token the vendor stops accepting before it
/// expires (a Salesforce session revoked or timed out): the proxy reports the refused token as a
/// worker with the headers would, so the next proxied call goes out with a new one, after one
/// re-mint for however many calls saw the 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_vendor_refuses_through_the_proxy_is_minted_again_once() {
    use crate::fakes::FakeSalesforce;
    use crate::oauth::{sf_cc, sf_register, SF_ID, SF_SECRET};
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSalesforce::start(SF_ID, SF_SECRET).await;
    fake.set_lifetime(3000);
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let mut register = sf_register("sf-px", &fake.base_url, sf_cc(SF_SECRET), false);
    register.delivery = pb::Delivery::Proxy as i32;
    admin.register_system(register).await.unwrap();
    let mut w = worker(&broker, &mut admin, "sf-px-worker").await;
    let lease = w.get_access_token(tok("sf-px")).await.unwrap().into_inner();
    let path = "/services/data/v62.0/";
    assert_eq!(call(&lease, path, &[]).await.0, 200);
    let minted = fake.token_calls();
    fake.revoke_sessions();
    let mut refused = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let lease = lease.clone();
        refused.spawn(async move { call(&lease, path, &[]).await.0 });
    }
    // The first 401 starts the re-mint at once: a call sent after it may already succeed.
    let mut statuses = Vec::new();
    while let Some(status) = refused.join_next().await {
        statuses.push(status.unwrap());
    }
    assert!(statuses.contains(&401), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| [200, 401].contains(s)),
        "{statuses:?}"
    );
    eventually(Duration::from_secs(10), "a re-mint after the 401", || {
        fake.token_calls() > minted
    })
    .await;
    assert_eq!(
        call(&lease, path, &[]).await.0,
        200,
        "the lease works again"
    );
    assert_eq!(fake.token_calls(), minted + 1, "one re-mint for every 401");
    broker.stop().await;
}

/// A worker that gives up on a call the vendor is still working on does not free the system's
/// concurrency slot for another call on top: the call runs on, and the slot frees when the
/// vendor has answered (here after 1 s), not sooner and not at the proxy's 5 s limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_gives_up_early_does_not_pile_calls_on_the_vendor() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, t, auth) = one_slot(dir.path(), "slow", Duration::from_secs(5)).await;
    let sent = std::time::Instant::now();
    let gave_up = reqwest::Client::new()
        .get(format!("{}/slow", t.api_base_url))
        .header("authorization", &auth)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gave_up.unwrap_err().is_timeout());
    let (status, body) = call(&t, "/users/me", &[]).await;
    assert_eq!(
        status, 429,
        "the vendor still works on the abandoned call: {body}"
    );
    loop {
        let (status, body) = call(&t, "/users/me", &[]).await;
        if status != 429 {
            assert_eq!(status, 404, "{body}");
            break;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "the slot stayed taken"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let freed = sent.elapsed();
    assert!(
        freed >= Duration::from_millis(900) && freed < Duration::from_secs(4),
        "freed after {freed:?}: the vendor answered after 1 s"
    );
    // The trail says the worker left, then what the vendor answered.
    let audit = dir.path().join("audit.log");
    let lines = || {
        let trail = std::fs::read_to_string(&audit).unwrap_or_default();
        trail
            .lines()
            .filter(|l| l.contains("/slow"))
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| format!("{} {}", v["outcome"].as_str().unwrap_or(""), v["code"]))
            .collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(10), "the vendor's outcome line", || {
        lines().len() == 3
    })
    .await;
    assert_eq!(
        lines(),
        [
            "forwarding \"FORWARDING\"",
            "cancelled \"CANCELLED\"",
            "ok \"200\""
        ]
    );
    broker.stop().await;
}

/// A worker that stops reading a large answer (frozen, or holding the connection on purpose)
/// does not keep the system's concurrency slot: once a write has waited as long as the proxy
/// waits for a vendor, its connection is closed and the slot freed for the other workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_stops_reading_frees_the_system_s_slot() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.proxy.read_timeout = Duration::from_millis(500);
    let one = credbroker::broker::quota::LimitsOverride {
        max_concurrent: Some(1),
        max_queue_wait_seconds: Some(0),
        ..Default::default()
    };
    config.quota.systems.insert("stuck".into(), one);
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    let (base, _) = streaming_vendor("stuck-pat").await;
    let (t, auth) = lease(&mut admin, "stuck", &base, "stuck-pat").await;
    // Worker A asks for 50 MB, reads the head, and stops reading.
    let mut a = tokio::net::TcpStream::connect(broker.http_addr)
        .await
        .unwrap();
    let host = broker.http_addr;
    let get =
        format!("GET /proxy/stuck/big HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\n\r\n");
    a.write_all(get.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    a.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // Meanwhile the slot is A's: worker B is refused locally.
    let (status, body) = call(&t, "/users/me", &[]).await;
    assert_eq!(status, 429, "{body}");
    // A's stalled answer is cut within the limit, and B is served.
    let started = std::time::Instant::now();
    loop {
        let (status, body) = call(&t, "/users/me", &[]).await;
        if status != 429 {
            // The vendor's own answer: it serves no such path.
            assert_eq!(status, 404, "{body}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the slot stayed taken"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(a);
    broker.stop().await;
}
