//! The lifecycle at its edges: callers that give up mid-exchange, shutdown mid-refresh, demand
//! that asks for more than a vendor grants, and out-of-scope callers.
//!
//! The cancellation harness drives each rotating and non-rotating refresh (ServiceNow, Zendesk,
//! Jira), against fakes that rotate the grant on receipt and answer slowly, through a store that
//! is slow too; the caller is dropped before the vendor is reached, while it works, after it
//! rotated and while the result is being written. Afterwards the grant works and no rotated-out
//! refresh token was ever presented.

use std::sync::Arc;
use std::time::{Duration, Instant};

use credbroker::config::Config;
use credbroker::pb;
use credbroker::store::faulty::{FaultControl, FaultyStore};
use tonic::Code;

use crate::connect::{
    atlassian, authz_code, browse, jira_config, register, start, zendesk, JIRA_CLIENT, JIRA_SECRET,
    ZD_CLIENT, ZD_SECRET,
};
use crate::oauth::{refresh_cred, servicenow, sf_login, sf_register, sn_register, USER};
use crate::support::*;

const ID: &str = "edge";
/// The Jira site every Jira test registers.
const JIRA_SITE: &str = "https://acme.atlassian.net/";
/// How long the vendor takes to answer a token request (it rotates the grant on receipt).
const VENDOR_DELAY: Duration = Duration::from_millis(700);
/// Added to every store operation while the harness runs.
const STORE_LATENCY_MS: u64 = 60;

/// The client's own deadline ended the call (tonic reports a client-side timeout as
/// `CANCELLED`, the server's as `DEADLINE_EXCEEDED`).
fn gave_up(s: &tonic::Status) -> bool {
    matches!(s.code(), Code::Cancelled | Code::DeadlineExceeded)
}

fn wrap(control: &Arc<FaultControl>) -> credbroker::server::StoreWrapper {
    let control = control.clone();
    Box::new(move |inner| Arc::new(FaultyStore::new(inner, control.clone())))
}

/// What the harness needs of a fake vendor's token endpoint.
trait TokenEndpoint: Send {
    fn calls(&self) -> usize;
    fn reuse(&self) -> usize;
}

impl TokenEndpoint for FakeServiceNow {
    fn calls(&self) -> usize {
        self.token_calls()
    }
    fn reuse(&self) -> usize {
        self.reuse_detected()
    }
}

impl TokenEndpoint for FakeZendesk {
    fn calls(&self) -> usize {
        self.token_calls()
    }
    fn reuse(&self) -> usize {
        self.reuse_detected()
    }
}

impl TokenEndpoint for FakeSalesforce {
    fn calls(&self) -> usize {
        self.token_calls()
    }
    // Logins rotate nothing: a login made twice costs a login, which `calls` counts.
    fn reuse(&self) -> usize {
        0
    }
}

impl TokenEndpoint for FakeAtlassian {
    fn calls(&self) -> usize {
        self.token_calls()
    }
    fn reuse(&self) -> usize {
        self.reuse_detected()
    }
}

/// A vendor under test, connected as system [`ID`], and the broker configuration it needs.
struct Vendor {
    config: Config,
    fake: Box<dyn TokenEndpoint>,
}

#[derive(Clone, Copy, Debug)]
enum Which {
    ServiceNowRotating,
    ServiceNowStatic,
    Zendesk,
    Jira,
    SalesforceSoap,
}

/// Registers system [`ID`] with an authorization-code client and connects it through the
/// vendor's consent page.
async fn connect_by_consent(
    broker: &TestBroker,
    kind: pb::SystemKind,
    base: &str,
    cred: pb::Credential,
) {
    let mut admin = broker.admin().await;
    admin
        .register_system(register(ID, kind, base, cred))
        .await
        .unwrap();
    let s = start(&mut admin, ID).await;
    assert_eq!(browse(&s.authorize_url).await.1, 200);
}

/// Starts the vendor and a broker with a slow store, and connects system [`ID`]; the vendor
/// answers slowly from then on.
async fn connect(
    which: Which,
    dir: &std::path::Path,
    ctl: &Arc<FaultControl>,
) -> (TestBroker, Vendor) {
    match which {
        Which::ServiceNowRotating | Which::ServiceNowStatic => {
            let fake = servicenow(1800).await;
            let rotate = matches!(which, Which::ServiceNowRotating);
            fake.oauth(|o| {
                o.rotate = rotate;
                o.token_delay = VENDOR_DELAY;
            });
            let rt = fake.issue_refresh_token(USER);
            let config = test_config(dir);
            let broker = TestBroker::start_wrapped(config.clone(), wrap(ctl)).await;
            broker
                .admin()
                .await
                .register_system(sn_register(ID, &fake.base_url, refresh_cred(&rt), false))
                .await
                .unwrap();
            let fake = Box::new(fake);
            (broker, Vendor { config, fake })
        }
        Which::Zendesk => {
            let fake = zendesk().await;
            let config = test_config(dir);
            let broker = TestBroker::start_wrapped(config.clone(), wrap(ctl)).await;
            let cred = authz_code(ZD_CLIENT, ZD_SECRET);
            connect_by_consent(&broker, pb::SystemKind::Zendesk, &fake.base_url, cred).await;
            fake.oauth(|o| o.token_delay = VENDOR_DELAY);
            let fake = Box::new(fake);
            (broker, Vendor { config, fake })
        }
        Which::SalesforceSoap => {
            let fake = FakeSalesforce::start("edge-sf-client", "edge-sf-secret").await;
            fake.add_user(
                "integration@acme.example",
                "sf-pass-canary-8",
                "sf-sectoken-canary-5",
            );
            let config = test_config(dir);
            let broker = TestBroker::start_wrapped(config.clone(), wrap(ctl)).await;
            let cred = sf_login("sf-pass-canary-8", false);
            broker
                .admin()
                .await
                .register_system(sf_register(ID, &fake.base_url, cred, false))
                .await
                .unwrap();
            fake.set_login_delay(VENDOR_DELAY);
            let fake = Box::new(fake);
            (broker, Vendor { config, fake })
        }
        Which::Jira => {
            let fake = atlassian().await;
            let config = jira_config(dir, &fake);
            let broker = TestBroker::start_wrapped(config.clone(), wrap(ctl)).await;
            let cred = authz_code(JIRA_CLIENT, JIRA_SECRET);
            connect_by_consent(&broker, pb::SystemKind::JiraCloud, JIRA_SITE, cred).await;
            fake.oauth(|o| o.token_delay = VENDOR_DELAY);
            let fake = Box::new(fake);
            (broker, Vendor { config, fake })
        }
    }
}

/// Forces refreshes (by reporting the current token as rejected) and drops each call at a later
/// point; then stops the broker while a refresh is at the vendor, restarts, and uses the grant.
async fn cancellation_harness(which: Which) {
    let dir = tempfile::tempdir().unwrap();
    let ctl = Arc::new(FaultControl::default());
    let (broker, vendor) = connect(which, dir.path(), &ctl).await;
    let mut admin = broker.admin().await;
    let mut current = token_with_deadline(&mut admin, ID, "", Duration::from_secs(30))
        .await
        .unwrap()
        .token_id;
    ctl.latency_ms
        .store(STORE_LATENCY_MS, std::sync::atomic::Ordering::SeqCst);
    let drops = [
        Duration::from_millis(5),
        Duration::from_millis(150),
        VENDOR_DELAY + Duration::from_millis(40),
        VENDOR_DELAY + Duration::from_millis(150),
        VENDOR_DELAY + Duration::from_millis(300),
    ];
    for deadline in drops {
        let forced_at = Instant::now();
        let before = vendor.fake.calls();
        let dropped = token_with_deadline(&mut admin, ID, &current, deadline).await;
        if let Err(s) = &dropped {
            assert!(gave_up(s), "{which:?}: {s:?}");
        }
        // The next worker gets the refreshed token; the exchange happened once.
        let next = token_with_deadline(&mut admin, ID, &current, Duration::from_secs(30))
            .await
            .unwrap_or_else(|s| panic!("{which:?}, dropped at {deadline:?}: {s:?}"));
        assert_ne!(next.token_id, current, "{which:?}: no refresh happened");
        assert_eq!(vendor.fake.calls(), before + 1, "{which:?} at {deadline:?}");
        assert_eq!(
            vendor.fake.reuse(),
            0,
            "{which:?}: a rotated-out refresh token was presented"
        );
        current = next.token_id;
        // A report within a second of the last forced refresh is not honoured again.
        tokio::time::sleep_until((forced_at + Duration::from_millis(1_050)).into()).await;
    }

    // Shutdown while the vendor holds a refresh: the exchange finishes and is stored.
    let before = vendor.fake.calls();
    let _ = token_with_deadline(&mut admin, ID, &current, Duration::from_millis(100)).await;
    eventually(
        Duration::from_secs(10),
        "the vendor received the refresh",
        || vendor.fake.calls() == before + 1,
    )
    .await;
    broker.stop().await;
    ctl.heal();
    let broker = TestBroker::start_with(vendor.config.clone()).await;
    let mut admin = broker.admin().await;
    let after = token_with_deadline(&mut admin, ID, "", Duration::from_secs(30))
        .await
        .unwrap_or_else(|s| panic!("{which:?}: the grant died across the shutdown: {s:?}"));
    assert!(after.headers[0].value.starts_with("Bearer "));
    assert_eq!(
        vendor.fake.reuse(),
        0,
        "{which:?}: the old refresh token was presented"
    );
    let sys = admin
        .get_system(pb::GetSystemRequest {
            system_id: ID.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .system
        .unwrap();
    assert_eq!(sys.state, pb::SystemState::Active as i32, "{which:?}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_callers_never_lose_a_servicenow_rotating_grant() {
    cancellation_harness(Which::ServiceNowRotating).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_callers_never_lose_a_servicenow_non_rotating_grant() {
    cancellation_harness(Which::ServiceNowStatic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_callers_never_lose_a_zendesk_grant() {
    cancellation_harness(Which::Zendesk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_callers_never_lose_a_jira_grant() {
    cancellation_harness(Which::Jira).await;
}

/// A SOAP `login()` per session (Salesforce): a caller that gives up mid-login costs no second
/// login (logins count against the user's daily limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_callers_never_cost_a_second_salesforce_soap_login() {
    cancellation_harness(Which::SalesforceSoap).await;
}

/// A SOAP `login()` answer that says the session lives 0 s does not make every call a new
/// login (Salesforce caps logins per user).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_session_lifetime_does_not_make_every_call_a_salesforce_login() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSalesforce::start("edge-sf-client", "edge-sf-secret").await;
    fake.add_user(
        "integration@acme.example",
        "sf-pass-canary-8",
        "sf-sectoken-canary-5",
    );
    fake.set_lifetime(0);
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(sf_register(
            ID,
            &fake.base_url,
            sf_login("sf-pass-canary-8", false),
            false,
        ))
        .await
        .unwrap();
    let before = fake.token_calls();
    for _ in 0..10 {
        token_with_deadline(&mut admin, ID, "", Duration::from_secs(10))
            .await
            .unwrap();
    }
    let logins = fake.token_calls() - before;
    assert!(logins <= 1, "{logins} logins for 10 calls");
    broker.stop().await;
}

/// The issue's reproduction: a lapsed Jira token, a slow vendor, three workers with 300 ms
/// deadlines. The grant survives and the next worker is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_short_deadlines_on_a_lapsed_jira_token_keep_the_grant() {
    let dir = tempfile::tempdir().unwrap();
    let fake = atlassian().await;
    fake.oauth(|o| o.access_lifetime = 1);
    let broker = TestBroker::start_with(jira_config(dir.path(), &fake)).await;
    let cred = authz_code(JIRA_CLIENT, JIRA_SECRET);
    connect_by_consent(&broker, pb::SystemKind::JiraCloud, JIRA_SITE, cred).await;
    let mut admin = broker.admin().await;
    let exchanged = fake.token_calls();
    fake.oauth(|o| {
        o.token_delay = Duration::from_millis(1_500);
        o.access_lifetime = 1800;
    });
    // Let the exchange's one-second token lapse while nobody uses it.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for _ in 0..3 {
        let s = token_with_deadline(&mut admin, ID, "", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(gave_up(&s), "{s:?}");
    }
    let tok = token_with_deadline(&mut admin, ID, "", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(tok.headers[0].value.starts_with("Bearer at-"));
    assert_eq!(
        fake.token_calls(),
        exchanged + 1,
        "one refresh for all four workers"
    );
    assert_eq!(fake.reuse_detected(), 0);
    broker.stop().await;
}

/// A browser that closes the tab while the broker exchanges the code: the grant is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_tab_during_the_code_exchange_keeps_the_grant() {
    let dir = tempfile::tempdir().unwrap();
    let fake = zendesk().await;
    fake.oauth(|o| o.token_delay = Duration::from_millis(800));
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(register(
            ID,
            pb::SystemKind::Zendesk,
            &fake.base_url,
            authz_code(ZD_CLIENT, ZD_SECRET),
        ))
        .await
        .unwrap();
    let s = start(&mut admin, ID).await;
    let http = no_redirects();
    let consent = http.get(&s.authorize_url).send().await.unwrap();
    let callback = consent.headers()["location"].to_str().unwrap().to_owned();
    let closed = http
        .get(&callback)
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(closed.unwrap_err().is_timeout());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sys = admin
            .get_system(pb::GetSystemRequest {
                system_id: ID.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .system
            .unwrap();
        if sys.state == pb::SystemState::Active as i32 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the exchange never completed: {sys:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tok = token_with_deadline(&mut admin, ID, "", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(tok.headers[0].value.starts_with("Bearer at-"));
    assert_eq!(
        fake.token_calls(),
        1,
        "the code was exchanged once; no refresh needed"
    );
    broker.stop().await;
}

/// `min_valid_seconds` beyond the vendor's lifetime: the fresh token is served as is, with its
/// real expiry; 60 calls make one refresh. A worker scoped to another kind causes none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demand_beyond_the_token_lifetime_cannot_drive_refreshes() {
    let dir = tempfile::tempdir().unwrap();
    let fake = servicenow(600).await;
    fake.oauth(|o| o.rotate = true);
    let rt = fake.issue_refresh_token(USER);
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(sn_register(ID, &fake.base_url, refresh_cred(&rt), false))
        .await
        .unwrap();
    let zd_worker = admin
        .create_caller(pb::CreateCallerRequest {
            name: "zd-only".into(),
            role: pb::CallerRole::Worker as i32,
            kinds: vec![pb::SystemKind::Zendesk as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut zd = client(broker.addr, Some(&zd_worker)).await;
    let greedy = |id: &str| pb::GetAccessTokenRequest {
        system_id: id.into(),
        min_valid_seconds: 86_400,
        ..Default::default()
    };
    // The out-of-scope worker first: refused before anything is minted, the same way for a
    // system that exists and one that does not.
    let other = zd.get_access_token(greedy(ID)).await.unwrap_err();
    let missing = zd
        .get_access_token(greedy("no-such-system"))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    assert_eq!(missing.code(), Code::PermissionDenied);
    assert_eq!(
        other.message().replace(ID, "X"),
        missing.message().replace("no-such-system", "X")
    );
    assert_eq!(
        fake.token_calls(),
        0,
        "an out-of-scope caller caused a refresh"
    );

    let mut ids = std::collections::HashSet::new();
    for _ in 0..60 {
        let t = admin
            .get_access_token(greedy(ID))
            .await
            .unwrap()
            .into_inner();
        let expires = t.expires_at.unwrap().seconds;
        let now = credbroker::model::unix_now() as i64;
        assert!(expires <= now + 600, "the real expiry is reported");
        ids.insert(t.token_id);
    }
    assert_eq!(fake.token_calls(), 1, "60 greedy calls made one refresh");
    assert_eq!(ids.len(), 1);
    for _ in 0..20 {
        zd.get_access_token(greedy(ID)).await.unwrap_err();
    }
    assert_eq!(fake.token_calls(), 1);
    assert_eq!(fake.reuse_detected(), 0);
    broker.stop().await;
}

/// Unauthenticated callers with huge ids cannot rotate the audit trail away, and an id outside
/// the grammar never reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_traffic_cannot_rewrite_the_trail() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let audit = dir.path().join("audit.log");
    let lines = || {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let before = lines();
    // As long as `GetAccessToken` reads (1 KiB): a longer message is refused unread, before
    // anything is audited (`unknown_callers_are_refused_before_their_message_is_read`).
    let huge = "x".repeat(900);
    let mut anon = client(broker.addr, None).await;
    let started = Instant::now();
    for _ in 0..300 {
        let e = anon
            .get_access_token(pb::GetAccessTokenRequest {
                system_id: huge.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let secs = started.elapsed().as_secs() + 1;
    let written = lines() - before;
    let cap = credbroker::audit::MAX_REFUSAL_LINES_PER_SEC as u64 * (secs + 1);
    assert!(written as u64 <= cap, "{written} lines in {secs} s");
    assert!(written > 0, "refusals are still audited");
    // An authenticated caller's out-of-grammar id is refused before it touches anything.
    let mut admin = broker.admin().await;
    let e = admin
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: huge.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().len() < 1_000, "the id is not echoed whole");
    let trail = std::fs::read_to_string(&audit).unwrap();
    assert!(
        !trail.contains(&huge[..200]),
        "an out-of-grammar id reached the trail"
    );
    assert!(
        trail.len() < 200_000,
        "the trail grew by {} bytes",
        trail.len()
    );
    broker.stop().await;
}

/// Nor can anonymous OAuth callbacks: a state that matches no authorization (made up, or not
/// even shaped like one) is refused and counts against the same budget of lines a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_oauth_callbacks_cannot_fill_the_trail() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let audit = dir.path().join("audit.log");
    let callbacks = || {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(r#""rpc":"OAuthCallback""#))
            .count()
    };
    let http = reqwest::Client::new();
    let url = format!("http://{}/oauth/callback", broker.http_addr);
    let started = Instant::now();
    // Ten at a time, so that the 300 take well under the seconds whose budget would let them all
    // through (each second adds 50 lines to what the assertion allows).
    let mut calls = tokio::task::JoinSet::new();
    for worker in 0..10 {
        let (http, url) = (http.clone(), url.clone());
        calls.spawn(async move {
            for i in (worker..300).step_by(10) {
                let state = match i % 3 {
                    0 => format!("{:0>43}", i),
                    1 => "s".repeat(5_000),
                    _ => String::new(),
                };
                let query = [("state", state.as_str()), ("code", "made-up")];
                let r = http.get(&url).query(&query).send().await.unwrap();
                assert_eq!(r.status(), 400, "{i}");
            }
        });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap();
    }
    let secs = started.elapsed().as_secs() + 1;
    let written = callbacks();
    let cap = credbroker::audit::MAX_REFUSAL_LINES_PER_SEC as usize * (secs as usize + 1);
    assert!(written <= cap, "{written} lines in {secs} s");
    assert!(written > 0, "refusals are still audited");
    broker.stop().await;
}

/// A request body sent a byte at a time (or not at all) cannot hold one of the HTTP listener's
/// connections for longer than the request deadline: the request gets 503 and its connection
/// is closed, and the listener's other routes answer meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_never_arrives_is_cut_at_the_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.server.request_timeout = Duration::from_secs(1);
    let broker = TestBroker::start_with(config).await;
    let mut slow = tokio::net::TcpStream::connect(broker.http_addr)
        .await
        .unwrap();
    let head = "POST /oauth/start HTTP/1.1\r\nHost: broker\r\n\
                Content-Type: application/x-www-form-urlencoded\r\n\
                Content-Length: 4000\r\n\r\nsystem=";
    slow.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let ready = reqwest::get(format!("http://{}/readyz", broker.http_addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the connection was still open after 10 s");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));
    broker.stop().await;
}

/// What anyone who reaches the ports may send before anything is checked is sized to what the
/// route needs: health and reflection read a name or two (not tonic's default 4 MiB, set aside
/// per stream as soon as a message's length is declared), and the Connect form is refused past
/// 8 KiB before it is read (not axum's default 2 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_requests_are_refused_past_their_size_before_they_are_read() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", broker.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let big = "s".repeat(64 * 1024);
    let mut health = HealthClient::new(ch.clone());
    let e = health
        .check(HealthCheckRequest {
            service: big.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    let ok = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(ok.into_inner().status, ServingStatus::Serving as i32);
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(big.clone())),
    };
    // Reflection ends the exchange without an answer (it would name the symbol unknown).
    let answered = match ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter(vec![ask]))
        .await
    {
        Err(e) => Err(e),
        Ok(answer) => answer.into_inner().message().await,
    };
    assert!(
        matches!(&answered, Ok(None))
            || matches!(&answered, Err(e) if e.code() == Code::OutOfRange),
        "{answered:?}"
    );
    let form = reqwest::Client::new()
        .post(format!("http://{}/oauth/start", broker.http_addr))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("link={big}"))
        .send()
        .await
        .unwrap();
    assert_eq!(form.status().as_u16(), 413);
    broker.stop().await;
}

/// A caller the broker does not know is refused before its message is read: a message far
/// over the size limit is answered UNAUTHENTICATED (not OUT_OF_RANGE, which meant it was being
/// read), and the refusal is audited as before. `GetAccessToken`, which answers before it
/// authenticates, reads 1 KiB at most, for anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_callers_are_refused_before_their_message_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let fake = FakeAsana::start().await;
    let mut big = register_asana("anon-big", &fake.base_url, "anon-secret", false);
    big.description = "x".repeat(200 * 1024);
    for token in [None, Some("cbk_not-a-caller")] {
        let mut anon = client(broker.addr, token).await;
        let e = anon.register_system(big.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{token:?}: {e:?}");
    }
    let trail = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    let refused = trail
        .lines()
        .filter(|l| l.contains(r#""rpc":"RegisterSystem""#) && l.contains("UNAUTHENTICATED"))
        .count();
    assert_eq!(refused, 2, "{trail}");
    assert!(!trail.contains("anon-secret"));
    let mut admin = broker.admin().await;
    let long_id = pb::GetAccessTokenRequest {
        system_id: "s".repeat(2 * 1024),
        ..Default::default()
    };
    for c in [&mut admin, &mut client(broker.addr, None).await] {
        let e = c.get_access_token(long_id.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    }
    // A worker's admin call is refused unread too (PERMISSION_DENIED, audited by name).
    let worker = admin
        .create_caller(pb::CreateCallerRequest {
            name: "gate-worker".into(),
            role: pb::CallerRole::Worker as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut as_worker = client(broker.addr, Some(&worker)).await;
    let e = as_worker.register_system(big.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let trail = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    assert!(
        trail
            .lines()
            .any(|l| l.contains(r#""caller":"gate-worker""#)
                && l.contains(r#""rpc":"RegisterSystem""#)
                && l.contains("PERMISSION_DENIED")),
        "{trail}"
    );
    // A known caller's message is read as before.
    let e = admin.register_system(big).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    broker.stop().await;
}

/// A gRPC connection that never speaks, or stops part way through the HTTP/2 preface, is closed
/// once the header timeout has passed, so such connections cannot pile up and hold the
/// connection cap's slots; a client that has spoken keeps its idle connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_grpc_connection_is_closed() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.server.http_header_timeout = Duration::from_secs(1);
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    admin
        .list_systems(pb::ListSystemsRequest::default())
        .await
        .unwrap();
    // One silent, one that sends part of the preface and stops.
    let started = Instant::now();
    for sent in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        use tokio::io::AsyncWriteExt;
        let mut silent = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
        silent.write_all(sent).await.unwrap();
        let mut got = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut got)).await;
        assert!(
            read.is_ok(),
            "the connection that sent {} bytes was still open after 10 s",
            sent.len()
        );
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    // Past the timeout, the client that spoke still has its connection.
    admin
        .list_systems(pb::ListSystemsRequest::default())
        .await
        .unwrap();
    broker.stop().await;
}

/// The proxy's refusals too: a huge method or path never reaches the trail whole, so a few
/// anonymous requests cannot push the trail out of rotation.
#[tokio::test]
async fn anonymous_proxy_requests_cannot_fill_the_trail() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let audit = dir.path().join("audit.log");
    let size = || std::fs::metadata(&audit).map(|m| m.len()).unwrap_or(0);
    let before = size();
    let method = reqwest::Method::from_bytes("M".repeat(20_000).as_bytes()).unwrap();
    let path = format!("/proxy/acme/{}", "p".repeat(60_000));
    let http = reqwest::Client::new();
    for _ in 0..40 {
        let r = http
            .request(method.clone(), format!("http://{}{path}", broker.http_addr))
            .bearer_auth("cbl_forged.lease")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let r = http
        .get(format!("http://{}{path}", broker.http_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    broker.stop().await;
    let trail = std::fs::read_to_string(&audit).unwrap();
    let grown = size() - before;
    let lines = trail.lines().filter(|l| l.contains(r#""rpc":"Proxy""#));
    let seen: Vec<(String, String)> = lines
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            (field("method"), field("path"))
        })
        .collect();
    assert!(!seen.is_empty(), "refusals are still audited");
    assert!(seen.iter().any(|(m, _)| m == "OTHER") && seen.iter().any(|(m, _)| m == "GET"));
    assert!(
        seen.iter().all(|(_, p)| p == "/…(+60001 bytes)"),
        "the cut is noted: {:?}",
        seen.first()
    );
    assert!(
        !trail.contains(&"M".repeat(200)),
        "a method reached the trail whole"
    );
    assert!(
        !trail.contains(&"p".repeat(300)),
        "a path reached the trail whole"
    );
    assert!(grown < 41 * 1_024, "the trail grew by {grown} bytes");
}

/// Two admins (or a retry) rotating the master key at once: every key stays usable after a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_master_key_rotations_leave_every_key_usable() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeAsana::start().await;
    fake.add_user("pat-keys-canary", "1", "U", "u@example.com");
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    admin
        .register_system(register_asana(
            "keys",
            &fake.base_url,
            "pat-keys-canary",
            false,
        ))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let mut c = broker.admin().await;
        tasks.push(tokio::spawn(async move {
            c.rotate_master_key(pb::RotateMasterKeyRequest {})
                .await
                .unwrap()
                .into_inner()
                .key_id
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    broker.stop().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let status = admin
        .get_key_status(pb::GetKeyStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    for id in &ids {
        assert!(
            status.keys.iter().any(|k| &k.key_id == id),
            "key {id} was lost: {status:?}"
        );
    }
    assert!(ids.contains(&status.primary_key_id), "{status:?}");
    auth_header(&mut admin, "keys").await.unwrap();
    broker.stop().await;
}

/// The data directory is the broker's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_and_its_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let broker = TestBroker::start(&data).await;
    // One audited call so the trail exists.
    broker
        .admin()
        .await
        .list_systems(pb::ListSystemsRequest::default())
        .await
        .unwrap();
    broker.stop().await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    for f in ["audit.log", "admin.token", "master.key"] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    for f in std::fs::read_dir(data.join("store")).unwrap() {
        let f = f.unwrap();
        if f.file_type().unwrap().is_file() {
            assert_eq!(mode(&f.path()), 0o600, "{:?}", f.path());
        }
    }
}

/// A broker whose HTTP listener cuts a connection without a whole request head after
/// `header_timeout` and holds at most `cap` connections.
async fn http_limited(dir: &std::path::Path, header_timeout: Duration, cap: usize) -> TestBroker {
    let mut config = test_config(dir);
    config.server.http_header_timeout = header_timeout;
    config.server.http_max_connections = cap;
    TestBroker::start_with(config).await
}

/// Hundreds of connections that never finish their headers neither hold sockets for long nor
/// stop callbacks, probes or gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_connections_are_cut_and_starve_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let broker = http_limited(dir.path(), Duration::from_secs(1), 400).await;
    let mut stalled = Vec::new();
    for _ in 0..300 {
        let mut s = tokio::net::TcpStream::connect(broker.http_addr)
            .await
            .unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        stalled.push(s);
    }
    // Meanwhile everything else is served.
    let r = reqwest::get(format!("http://{}/readyz", broker.http_addr))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    broker
        .admin()
        .await
        .list_systems(pb::ListSystemsRequest::default())
        .await
        .unwrap();
    // Each stalled connection is closed by the broker once the header timeout passes.
    let started = Instant::now();
    for s in &mut stalled {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("a stalled connection was kept open")
            .unwrap_or(0);
        let answer = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    broker.stop().await;
}

/// Past the connection cap a new HTTP connection is closed at once without an answer, and a
/// freed slot serves again. (Its own broker: a connection the broker cut a moment ago may still
/// hold its slot while the client already sees it closed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connections_past_the_cap_are_closed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = http_limited(dir.path(), Duration::from_secs(60), 40).await;
    let url = format!("http://{}/healthz", broker.http_addr);
    // Accepted in the order they connect, each takes a slot it keeps while it stays silent.
    let mut open = Vec::new();
    for _ in 0..40 {
        open.push(
            tokio::net::TcpStream::connect(broker.http_addr)
                .await
                .unwrap(),
        );
    }
    let fresh = || {
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let r = fresh().get(&url).send().await;
    assert!(r.is_err(), "a connection past the cap was served");
    // A closed connection gives its slot back once the broker has seen it close: asked again
    // every 20 ms until then.
    drop(open.pop());
    let mut every = tokio::time::interval(Duration::from_millis(20));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        every.tick().await;
        match fresh().get(&url).send().await {
            Ok(r) => break assert_eq!(r.status(), 200),
            Err(e) if Instant::now() > deadline => panic!("a freed slot never served: {e}"),
            Err(_) => {}
        }
    }
    drop(open);
    broker.stop().await;
}

/// Past `grpc_max_connections` a new gRPC connection is closed at once (and counted), so idle
/// or hostile sockets cannot take every descriptor; a freed slot serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_connections_past_the_cap_are_closed_at_once() {
    let _serial = GRPC_CAP_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.server.grpc_max_connections = 3;
    config.server.http_header_timeout = Duration::from_secs(60);
    let broker = TestBroker::start_with(config).await;
    let list = || async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", broker.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        let header = format!("Bearer {}", broker.admin_token);
        let mut c = pb::credential_broker_client::CredentialBrokerClient::new(channel);
        let mut req = tonic::Request::new(pb::ListSystemsRequest::default());
        req.metadata_mut()
            .insert("authorization", header.parse().unwrap());
        tokio::time::timeout(Duration::from_secs(5), c.list_systems(req)).await
    };
    let refused = || async {
        let metrics = reqwest::get(format!("http://{}/metrics", broker.http_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("credbroker_grpc_connections_refused_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = refused().await;
    // Silent connections (cut only after 60 s) take the slots; once three are held, a new
    // connection is refused. A silent one that met a slot still held by a client that just
    // left was refused itself (the broker closed it): it is replaced. Without a cap no
    // connection is ever refused.
    let mut open = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        open.retain(still_open);
        if open.len() < 3 {
            open.push(tokio::net::TcpStream::connect(broker.addr).await.unwrap());
            continue;
        }
        let r = list().await.expect("a connection past the cap hung");
        if r.is_err() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no connection was refused past the cap of 3"
        );
    }
    assert!(refused().await > before, "the refusal was not counted");
    // A closed connection gives its slot back once the broker has seen it close.
    drop(open.pop());
    drop(open.pop());
    let mut every = tokio::time::interval(Duration::from_millis(20));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        every.tick().await;
        match list().await {
            Ok(Ok(_)) => break,
            _ if Instant::now() > deadline => panic!("a freed slot never served"),
            _ => {}
        }
    }
    drop(open);
    broker.stop().await;
}

/// Deleting a system and registering its id again starts a new incarnation whose versions go
/// on from the old one's: the old incarnation's leases and authorization links are refused.
#[tokio::test]
async fn a_re_registered_id_refuses_the_old_incarnations_leases_and_links() {
    let dir = tempfile::tempdir().unwrap();
    let asana = FakeAsana::start().await;
    asana.add_user("inc-pat-1", "1", "Sync", "sync@example.com");
    let zd = zendesk().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let proxied = |req: pb::RegisterSystemRequest| pb::RegisterSystemRequest {
        delivery: pb::Delivery::Proxy as i32,
        ..req
    };
    admin
        .register_system(proxied(register_asana(
            "inc",
            &asana.base_url,
            "inc-pat-1",
            false,
        )))
        .await
        .unwrap();
    let old = token_with_deadline(&mut admin, "inc", "", Duration::from_secs(10))
        .await
        .unwrap();
    let get = |t: &pb::GetAccessTokenResponse| {
        let mut req = reqwest::Client::new().get(format!("{}/users/me", t.api_base_url));
        for h in &t.headers {
            req = req.header(&h.name, &h.value);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(get(&old).await, 200);
    admin
        .register_system(register(
            "inc-zd",
            pb::SystemKind::Zendesk,
            &zd.base_url,
            authz_code(ZD_CLIENT, ZD_SECRET),
        ))
        .await
        .unwrap();
    let link = start(&mut admin, "inc-zd").await;

    for id in ["inc", "inc-zd"] {
        admin
            .delete_system(pb::DeleteSystemRequest {
                system_id: id.into(),
            })
            .await
            .unwrap();
    }
    admin
        .register_system(proxied(register_asana(
            "inc",
            &asana.base_url,
            "inc-pat-1",
            false,
        )))
        .await
        .unwrap();
    admin
        .register_system(register(
            "inc-zd",
            pb::SystemKind::Zendesk,
            &zd.base_url,
            authz_code(ZD_CLIENT, ZD_SECRET),
        ))
        .await
        .unwrap();
    let reader = admin.clone();
    let version = |id: &'static str| {
        let mut admin = reader.clone();
        async move {
            admin
                .get_system(pb::GetSystemRequest {
                    system_id: id.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .system
                .unwrap()
                .credential_version
        }
    };
    assert_eq!(
        version("inc").await,
        2,
        "versions go on across incarnations"
    );
    assert_eq!(
        get(&old).await,
        401,
        "an old incarnation's lease is refused"
    );
    let new = token_with_deadline(&mut admin, "inc", "", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(get(&new).await, 200);
    let (_, status, page) = browse(&link.authorize_url).await;
    assert_eq!(status, 409, "an old incarnation's link is refused: {page}");
    assert_eq!(
        zd.token_calls(),
        0,
        "no code was exchanged for the new incarnation"
    );
    let sys = version("inc-zd").await;
    assert_eq!(sys, 2);
    broker.stop().await;
}

/// The bootstrap admin's token file is durable before the admin caller is committed: a file
/// that cannot be written leaves no admin behind (the next start bootstraps), and a start that
/// stopped between the commit and the file's rename is finished by the next one.
#[tokio::test]
async fn the_admin_token_file_is_never_lost_to_an_interrupted_first_start() {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("admin.token.pending");
    std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    let log = match spawn_process(dir.path(), &logs.path().join("a.log"), &[]) {
        Err((status, log)) => {
            assert!(!status.success());
            log
        }
        Ok(mut p) => {
            let status = tokio::task::spawn_blocking(move || p.child.wait().unwrap())
                .await
                .unwrap();
            assert!(!status.success(), "started without its admin token file");
            std::fs::read_to_string(logs.path().join("a.log")).unwrap()
        }
    };
    assert!(log.contains("admin token file"), "{log}");
    std::fs::remove_dir_all(&blocker).unwrap();

    // The failed start committed no admin: this one bootstraps, and its token works.
    let broker = TestBroker::start(dir.path()).await;
    let token = broker.admin_token.clone();
    let mut admin = broker.admin().await;
    admin.list_callers(pb::ListCallersRequest {}).await.unwrap();
    broker.stop().await;

    // Stopped after the commit, before the rename: the next start puts the file in place.
    std::fs::rename(dir.path().join("admin.token"), &blocker).unwrap();
    let broker = TestBroker::start(dir.path()).await;
    assert_eq!(broker.admin_token, token);
    assert!(!blocker.exists());
    broker
        .admin()
        .await
        .list_callers(pb::ListCallersRequest {})
        .await
        .unwrap();
    broker.stop().await;
}

/// A store that stops answering while the broker starts (a database restarting while the broker
/// reads its format record, keys and callers) is waited for: the start goes on once it answers.
/// An admin caller the store took before its answer was lost is found when the start tries
/// again, and its token file is put in place: one admin, and its token works. An admin insert
/// that found no answer, with no admin stored, is tried again too (not "damaged").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_stops_answering_while_the_broker_starts_is_waited_for() {
    // The start's first read finds no answer.
    start_through_a_fault(|c| &c.unreachable, 1).await;
    // The admin insert is committed, its answer lost, and the read after it does not answer.
    start_through_a_fault(|c| &c.lost_caller_answers, 2).await;
    // The admin insert finds no answer, and the read after it finds no admin: tried again.
    start_through_a_fault(|c| &c.unanswered_caller_inserts, 1).await;
    // The admin insert finds no answer and commits only after the next try read the callers:
    // that try stages the same token, so the token file holds the stored admin's.
    start_through_a_fault(|c| &c.late_caller_commits, 1).await;
}

/// A first start with `knob` set to 1: it serves after `injected` injected faults, with one
/// admin whose token (from its file) works, and no pending token file left.
async fn start_through_a_fault(
    knob: fn(&FaultControl) -> &std::sync::atomic::AtomicU32,
    injected: u64,
) {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let ctl = Arc::new(FaultControl::default());
    knob(&ctl).store(1, SeqCst);
    let broker = TestBroker::start_wrapped(test_config(dir.path()), wrap(&ctl)).await;
    assert_eq!(ctl.injected.load(SeqCst), injected);
    assert!(!dir.path().join("admin.token.pending").exists());
    let mut admin = broker.admin().await;
    let callers = admin.list_callers(pb::ListCallersRequest {}).await.unwrap();
    let callers = callers.into_inner().callers;
    assert_eq!(callers.len(), 1, "{callers:?}");
    broker.stop().await;
}

/// `/metrics` answers anyone who reaches the HTTP listener, and counting the systems reads
/// every one of them: a flood of scrapes shares one count at a time (at most one a second),
/// and every answer still counts what was there when it was asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_metrics_scrapes_shares_its_counts_of_the_systems() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let ctl = Arc::new(FaultControl::default());
    let asana = FakeAsana::start().await;
    let broker = TestBroker::start_wrapped(test_config(dir.path()), wrap(&ctl)).await;
    let mut admin = broker.admin().await;
    let url = format!("http://{}/metrics", broker.http_addr);
    let scrape = move |url: String| async move {
        let body = reqwest::get(url).await.unwrap().text().await.unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix("credbroker_systems{state=\"active\"} "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    assert_eq!(scrape(url.clone()).await, Some(0));
    admin
        .register_system(register_asana(
            "counted",
            &asana.base_url,
            "metrics-pat",
            false,
        ))
        .await
        .unwrap();
    // Asked after the registration: counted, though the last count is not a second old.
    let before = ctl.system_pages.load(SeqCst);
    assert_eq!(scrape(url.clone()).await, Some(1));
    let pages_per_count = ctl.system_pages.load(SeqCst) - before;
    assert!(pages_per_count >= 1);
    ctl.latency_ms.store(30, SeqCst);
    let before = ctl.system_pages.load(SeqCst);
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..40 {
        flood.spawn(scrape(url.clone()));
    }
    let answers = flood.join_all().await;
    ctl.heal();
    assert!(answers.iter().all(|a| *a == Some(1)), "{answers:?}");
    let pages = ctl.system_pages.load(SeqCst) - before;
    assert!(
        pages <= 2 * pages_per_count,
        "40 scrapes read {pages} pages ({pages_per_count} per count)"
    );
    broker.stop().await;
}

/// A scrape that goes away mid-count (its deadline) neither stops the count nor frees the turn:
/// the next scrape, asked after that count started, waits for it to end and then, as it must
/// count what was there when it asked, for the next count a second after it; it never starts a
/// count of its own beside the abandoned one. (On a loaded machine a broken build could pass by
/// being slow; a sound one cannot fail.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_scrape_that_goes_away_leaves_its_count_running() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let ctl = Arc::new(FaultControl::default());
    let asana = FakeAsana::start().await;
    let broker = TestBroker::start_wrapped(test_config(dir.path()), wrap(&ctl)).await;
    let mut admin = broker.admin().await;
    let reg = register_asana("counted", &asana.base_url, "metrics-pat", false);
    admin.register_system(reg).await.unwrap();
    let url = format!("http://{}/metrics", broker.http_addr);
    ctl.latency_ms.store(400, SeqCst);
    let asked = std::time::Instant::now();
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let gone = impatient.get(&url).send().await.unwrap_err();
    assert!(gone.is_timeout(), "{gone}");
    let body = reqwest::get(&url).await.unwrap().text().await.unwrap();
    let answered = asked.elapsed();
    ctl.heal();
    assert!(
        body.lines()
            .any(|l| l == "credbroker_systems{state=\"active\"} 1"),
        "{body}"
    );
    assert!(
        answered >= Duration::from_secs(1),
        "answered {answered:?} after the abandoned scrape: its count was stopped or its turn freed"
    );
    broker.stop().await;
}

/// A watch whose client goes away while its snapshot still reads the store (slowly here) ends
/// there and frees its slot: a caller that opens and drops watches is not shut out of new ones
/// for as long as the abandoned scans would take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_dropped_during_its_snapshot_frees_its_slot() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let ctl = Arc::new(FaultControl::default());
    let asana = FakeAsana::start().await;
    let broker = TestBroker::start_wrapped(test_config(dir.path()), wrap(&ctl)).await;
    let mut admin = broker.admin().await;
    let reg = register_asana("watched", &asana.base_url, "watch-pat", false);
    admin.register_system(reg).await.unwrap();
    ctl.latency_ms.store(5_000, SeqCst);
    let request = pb::WatchSystemsRequest::default;
    let mut open = Vec::new();
    for _ in 0..credbroker::broker::watch::MAX_WATCHES_PER_CALLER {
        open.push(admin.watch_systems(request()).await.unwrap().into_inner());
    }
    drop(open);
    let dropped = Instant::now();
    loop {
        match admin.watch_systems(request()).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted => {
                let waited = dropped.elapsed();
                assert!(
                    waited < Duration::from_secs(3),
                    "slots still held after {waited:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    ctl.heal();
    broker.stop().await;
}

/// Two admins revoking each other at once, while the store is slow: revocations run one at a
/// time, so one of them stays; and an admin whose token has expired does not count as the one
/// that may stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_admin_stays_when_admins_revoke_each_other_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = Arc::new(FaultControl::default());
    let broker = TestBroker::start_wrapped(test_config(dir.path()), wrap(&ctl)).await;
    let mut admin = broker.admin().await;
    let create = |name: &str, expires_at| pb::CreateCallerRequest {
        name: name.into(),
        role: pb::CallerRole::Admin as i32,
        expires_at,
        ..Default::default()
    };
    let token = admin.create_caller(create("second", None)).await.unwrap();
    let mut second = client(broker.addr, Some(&token.into_inner().token)).await;
    ctl.latency_ms
        .store(40, std::sync::atomic::Ordering::SeqCst);
    let revoke = |name: &str| pb::RevokeCallerRequest { name: name.into() };
    let (first_out, second_out) = tokio::join!(
        admin.revoke_caller(revoke("second")),
        second.revoke_caller(revoke("admin")),
    );
    ctl.heal();
    let refused = [&first_out, &second_out]
        .iter()
        .filter(|r| matches!(r, Err(e) if e.code() == Code::FailedPrecondition))
        .count();
    assert_eq!(
        (
            first_out.is_ok() as usize + second_out.is_ok() as usize,
            refused
        ),
        (1, 1),
        "{first_out:?} {second_out:?}"
    );
    let (mut left, left_name) = if first_out.is_ok() {
        (admin, "admin")
    } else {
        (second, "second")
    };
    // An admin that expires soon, then has expired: it is no other admin.
    let soon = std::time::SystemTime::now() + Duration::from_secs(2);
    let soon = prost_types::Timestamp::from(soon);
    let token = left
        .create_caller(create("brief", Some(soon)))
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut brief = client(broker.addr, Some(&token)).await;
    // While it is still active it does not count either: once it expired, no admin would be
    // left, for good.
    let e = left.revoke_caller(revoke(left_name)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("expiring later"), "{}", e.message());
    let deadline = Instant::now() + Duration::from_secs(10);
    while brief.list_callers(pb::ListCallersRequest {}).await.is_ok() {
        assert!(Instant::now() < deadline, "the brief admin never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = left.revoke_caller(revoke(left_name)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // The expired admin itself can be revoked: that leaves the active one.
    left.revoke_caller(revoke("brief"))
        .await
        .expect("an expired admin is no last admin");
    left.list_callers(pb::ListCallersRequest {})
        .await
        .expect("the last admin still administers");
    broker.stop().await;
}

/// Admin changes belong to nobody's request either: a revocation, deletion or delivery switch
/// whose caller gives up while the store is slow is applied in full (stored, evicted from
/// memory) and audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_whose_caller_gives_up_are_applied_in_full_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = Arc::new(FaultControl::default());
    let asana = FakeAsana::start().await;
    let broker = TestBroker::start_wrapped(test_config(dir.path()), wrap(&ctl)).await;
    let mut admin = broker.admin().await;
    for id in ["gone", "switched"] {
        admin
            .register_system(register_asana(id, &asana.base_url, "admin-edge-pat", false))
            .await
            .unwrap();
    }
    let token = admin
        .create_caller(pb::CreateCallerRequest {
            name: "w".into(),
            role: pb::CallerRole::Worker as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut worker = client(broker.addr, Some(&token)).await;
    for id in ["gone", "switched"] {
        assert_eq!(
            auth_header(&mut worker, id).await.unwrap(),
            "Bearer admin-edge-pat"
        );
    }

    ctl.latency_ms
        .store(300, std::sync::atomic::Ordering::SeqCst);
    let gave = admin
        .delete_system(short(pb::DeleteSystemRequest {
            system_id: "gone".into(),
        }))
        .await
        .unwrap_err();
    assert!(gave_up(&gave), "{gave:?}");
    let gave = admin
        .set_delivery(short(pb::SetDeliveryRequest {
            system_id: "switched".into(),
            delivery: pb::Delivery::Proxy as i32,
        }))
        .await
        .unwrap_err();
    assert!(gave_up(&gave), "{gave:?}");
    let gave = admin
        .revoke_caller(short(pb::RevokeCallerRequest { name: "w".into() }))
        .await
        .unwrap_err();
    assert!(gave_up(&gave), "{gave:?}");
    ctl.heal();

    // The three run on, each in its own time: wait for each effect (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pending = vec!["revoked", "deleted", "switched"];
    while !pending.is_empty() {
        let mut still = Vec::new();
        for effect in pending {
            let seen = match effect {
                "revoked" => matches!(
                    auth_header(&mut worker, "switched").await,
                    Err(s) if s.code() == Code::Unauthenticated
                ),
                "deleted" => matches!(
                    auth_header(&mut admin, "gone").await,
                    Err(s) if s.code() == Code::NotFound
                ),
                _ => admin
                    .get_access_token(pb::GetAccessTokenRequest {
                        system_id: "switched".into(),
                        ..Default::default()
                    })
                    .await
                    .is_ok_and(|t| t.into_inner().api_base_url.contains("/proxy/")),
            };
            if !seen {
                still.push(effect);
            }
        }
        assert!(
            still.is_empty() || Instant::now() < deadline,
            "never applied: {still:?} (a deleted system's header, a revoked worker or the raw \
             header after the switch to proxy delivery is still served)"
        );
        pending = still;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.stop().await;
    let trail = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    // Each line names what it changed (the delivery set, the caller revoked).
    for (rpc, detail) in [
        ("DeleteSystem", serde_json::Value::Null),
        ("SetDelivery", "delivery=proxy".into()),
        ("RevokeCaller", "caller=w".into()),
    ] {
        assert!(
            trail.lines().any(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["rpc"] == rpc && v["outcome"] == "ok" && v["detail"] == detail
            }),
            "{rpc} left no audit line with {detail}"
        );
    }
}

/// `m` with a 50 ms client deadline.
fn short<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.set_timeout(Duration::from_millis(50));
    r
}

/// An answer longer than the token route's codec buffer (1,000 bytes; an Entra or Atlassian
/// access token is a JWT of a few KiB) arrives whole: on its first hand-out, encoded then, and
/// from the bytes kept with the token after.
#[tokio::test]
async fn a_token_longer_than_the_routes_buffer_is_handed_out_whole() {
    let dir = tempfile::tempdir().unwrap();
    let asana = FakeAsana::start().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let long = format!("2/{}", "j".repeat(5000));
    admin
        .register_system(register_asana("long", &asana.base_url, &long, false))
        .await
        .unwrap();
    let token = worker_token(&mut admin, "long-reader").await;
    let mut worker = client(broker.addr, Some(&token)).await;
    for _ in 0..2 {
        let answer = worker
            .get_access_token(pb::GetAccessTokenRequest {
                system_id: "long".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.headers.len(), 1);
        assert_eq!(answer.headers[0].value, format!("Bearer {long}"));
    }
    broker.stop().await;
}

/// `GetAccessToken` reads a request of up to 1 KiB (the token route's cap) and refuses one byte
/// more, before anything else looks at it.
#[tokio::test]
async fn a_token_request_is_read_up_to_one_kib_and_refused_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    for (size, refused) in [(1024, false), (1025, true)] {
        let request = pb::GetAccessTokenRequest {
            // A two-byte length and a one-byte tag: the message is the id's length plus 3.
            system_id: "s".repeat(size - 3),
            ..Default::default()
        };
        assert_eq!(prost::Message::encoded_len(&request), size);
        let e = admin.get_access_token(request).await.unwrap_err();
        let expected = if refused {
            Code::OutOfRange
        } else {
            Code::InvalidArgument
        };
        assert_eq!(e.code(), expected, "{size} bytes: {e:?}");
    }
    broker.stop().await;
}
