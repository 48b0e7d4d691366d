//! The admin console, driven by a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, through WebDriver) against the real broker and the vendor fakes; and the
//! attacks on it, with plain HTTP. Without chromium the browser test prints SKIPPED, unless
//! `CREDBROKER_REQUIRE_BROWSER=1` (as `.ci/run` sets), which makes that a failure.
//! `CREDBROKER_SCREENSHOTS=<dir>` saves the main pages as PNGs (docs/console.md's pictures).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use credbroker::pb;
use fantoccini::{Client as Web, ClientBuilder, Locator};
use std::os::unix::process::CommandExt;
use tonic::Code;

use crate::connect::{authz_code, register, zendesk, ZD_CLIENT, ZD_SECRET};
use crate::fakes::FakeAsana;
use crate::support::*;

const BAD_PAT: &str = "bad-pat-Q7x9-canary";
const GOOD_PAT: &str = "good-pat-K2m4-canary";
const ROTATED_PAT: &str = "rotated-pat-Z8w1-canary";

fn find(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

/// Chromium and its driver, or `None` (SKIPPED unless a browser is required).
fn browser_binaries(test: &str) -> Option<(PathBuf, PathBuf)> {
    let chrome = find(&["/usr/bin/chromium", "/usr/bin/chromium-browser"]);
    let driver = find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]);
    match (chrome, driver) {
        (Some(c), Some(d)) => Some((c, d)),
        _ => {
            assert!(
                std::env::var("CREDBROKER_REQUIRE_BROWSER").as_deref() != Ok("1"),
                "{test}: chromium and chromedriver are required (apt-get install chromium chromium-driver)"
            );
            eprintln!("SKIPPED {test}: no chromium/chromedriver on this machine");
            None
        }
    }
}

/// A headless Chromium session through its own chromedriver; every page it shows is kept.
struct Ui {
    web: Web,
    _driver: Driver,
    base: String,
    seen: Vec<String>,
    shots: Option<PathBuf>,
    _profile: tempfile::TempDir,
}

/// chromedriver, in a process group of its own with the Chromium it starts.
struct Driver(std::process::Child);

impl Drop for Driver {
    /// Kills the whole group: Chromium too, which would otherwise outlive the run (reparented
    /// to init) whenever its session was not closed, after a failure say. Then chromedriver
    /// itself, in case `kill` is missing. (Being a group of its own, it misses a Ctrl-C sent to
    /// the terminal's group; a run interrupted before this drop leaves it behind.)
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &group])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Ui {
    async fn start(chrome: PathBuf, driver: PathBuf, base: String) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Driver(
            std::process::Command::new(driver)
                .process_group(0)
                .arg(format!("--port={port}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let profile = tempfile::tempdir().unwrap();
        let caps = serde_json::json!({"goog:chromeOptions": {
            "binary": chrome,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", format!("--user-data-dir={}", profile.path().display())],
        }});
        let serde_json::Value::Object(caps) = caps else {
            unreachable!()
        };
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        let web = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(w) => break w,
                Err(e) => {
                    assert!(
                        started.elapsed() < Duration::from_secs(30),
                        "chromedriver: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let shots = std::env::var_os("CREDBROKER_SCREENSHOTS").map(PathBuf::from);
        Self {
            web,
            _driver: driver,
            base,
            seen: Vec::new(),
            shots,
            _profile: profile,
        }
    }

    /// Ends the browser session (Chromium exits); `Drop` then stops chromedriver.
    async fn quit(self) {
        self.web.clone().close().await.unwrap();
    }

    async fn record(&mut self) {
        self.seen.push(self.web.source().await.unwrap());
    }

    async fn go(&mut self, path: &str) {
        self.web
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap();
        self.record().await;
    }

    async fn fill(&self, css: &str, text: &str) {
        let e = self.web.find(Locator::Css(css)).await.unwrap();
        e.clear().await.unwrap();
        e.send_keys(text).await.unwrap();
    }

    /// Clicks what navigates, and waits until the next page replaced this one and has loaded.
    async fn click(&mut self, css: &str) {
        self.act(css, None).await;
    }

    /// Types `text` into `css` and presses Enter (the keyboard submits the form), then waits
    /// as [`Self::click`] does.
    async fn type_and_enter(&mut self, css: &str, text: &str) {
        self.act(css, Some(text)).await;
    }

    async fn act(&mut self, css: &str, keys: Option<&str>) {
        let old = self.web.find(Locator::Css("html")).await.unwrap();
        let target = self.web.find(Locator::Css(css)).await.unwrap();
        match keys {
            Some(text) => target.send_keys(&format!("{text}\u{E007}")).await.unwrap(),
            None => target.click().await.unwrap(),
        }
        let started = Instant::now();
        while old.tag_name().await.is_ok() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{css} did not navigate"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.loaded().await;
        self.record().await;
    }

    /// Waits until the current document has loaded.
    async fn loaded(&self) {
        let started = Instant::now();
        loop {
            let state = self.web.execute("return document.readyState", vec![]).await;
            if state.is_ok_and(|s| s == "complete") {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the page did not load"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn text(&self, css: &str) -> String {
        match self.web.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap(),
            Err(e) => {
                let page = self.web.source().await.unwrap_or_default();
                panic!("no {css} on {}: {e}\n{page}", self.path().await)
            }
        }
    }

    async fn path(&self) -> String {
        self.web.current_url().await.unwrap().path().to_owned()
    }

    async fn shot(&self, name: &str) {
        if let Some(dir) = &self.shots {
            std::fs::create_dir_all(dir).unwrap();
            let png = self.web.screenshot().await.unwrap();
            std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
        }
    }

    /// Every visible input, select and textarea on the page has a label.
    async fn every_input_is_labelled(&self) {
        let fields = self
            .web
            .find_all(Locator::Css("input:not([type=hidden]), select, textarea"))
            .await
            .unwrap();
        for f in fields {
            let id = f.attr("id").await.unwrap().unwrap_or_default();
            let by_for = !id.is_empty()
                && !self
                    .web
                    .find_all(Locator::Css(&format!("label[for='{id}']")))
                    .await
                    .unwrap()
                    .is_empty();
            let wrapped = !f
                .find_all(Locator::XPath("ancestor::label"))
                .await
                .unwrap()
                .is_empty();
            let name = f.attr("name").await.unwrap();
            assert!(
                by_for || wrapped,
                "unlabelled field {name:?} on {}",
                self.path().await
            );
        }
    }
}

/// Sign-in (a worker refused), register Asana (a failing check, then a passing one), rotate,
/// switch delivery, connect Zendesk through its consent page, create and revoke a caller, sign
/// out: all in Chromium, with the outcome of each checked through gRPC as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_sets_up_systems_in_the_browser() {
    let test = "an_admin_sets_up_systems_in_the_browser";
    let Some((chrome, driver)) = browser_binaries(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let asana = FakeAsana::start().await;
    asana.add_user(GOOD_PAT, "1201", "Sync Bot", "sync@acme.example");
    asana.add_user(ROTATED_PAT, "1201", "Sync Bot", "sync@acme.example");
    let zd = zendesk().await;
    zd.show_consent_page();
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let worker = worker_token(&mut admin, "sync-worker").await;
    let mut ui = Ui::start(chrome, driver, format!("http://{}", broker.http_addr)).await;

    sign_in_refuses_a_worker_then_admits_the_admin(&mut ui, &worker, &broker.admin_token).await;
    events_arrive_live(&mut ui, &mut admin, &asana.base_url).await;
    register_asana_failing_then_passing(&mut ui, &asana.base_url).await;
    assert_eq!(
        crate::connect::system(&mut admin, "asana-1")
            .await
            .credential_version,
        1
    );
    rotate_and_switch_delivery(&mut ui).await;
    let s = crate::connect::system(&mut admin, "asana-1").await;
    assert_eq!(
        (s.credential_version, s.delivery),
        (2, pb::Delivery::Header as i32)
    );

    admin
        .register_system(register(
            "zd",
            pb::SystemKind::Zendesk,
            &zd.base_url,
            authz_code(ZD_CLIENT, ZD_SECRET),
        ))
        .await
        .unwrap();
    connect_zendesk(&mut ui).await;
    let s = crate::connect::system(&mut admin, "zd").await;
    assert_eq!(s.state, pb::SystemState::Active as i32);

    let token = create_and_revoke_a_caller(&mut ui, broker.addr).await;
    ui.click("nav a[href='/console/keys']").await;
    let k = admin
        .get_key_status(pb::GetKeyStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let main = ui.text("main").await;
    assert!(main.contains(&k.primary_key_id), "{main}");
    let progress = format!(
        "Records on the primary key: {} of {}",
        k.records_on_primary, k.records_total
    );
    assert!(main.contains(&progress), "{main}");
    ui.shot("keys").await;
    ui.click("form.signout button").await;
    assert_eq!(ui.path().await, "/console/sign-in");
    ui.go("/console/systems").await;
    assert_eq!(ui.path().await, "/console/sign-in", "signed out");

    let secrets = [
        BAD_PAT,
        GOOD_PAT,
        ROTATED_PAT,
        ZD_SECRET,
        broker.admin_token.as_str(),
    ];
    for (i, html) in ui.seen.iter().enumerate() {
        for s in secrets {
            assert!(!html.contains(s), "page {i} shows a secret");
        }
    }
    let shown = ui.seen.iter().filter(|h| h.contains(&token)).count();
    assert_eq!(shown, 1, "a new caller's token is on one page only");
    ui.quit().await;
}

/// The Connect link of a `system.reauthorization_required` webhook, opened in a real browser:
/// its page's button leads through the vendor's consent back to an active system (the page's
/// own policy must not stop the browser following the broker's redirect to the vendor).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhooks_connect_link_reconnects_in_the_browser() {
    let test = "a_webhooks_connect_link_reconnects_in_the_browser";
    let Some((chrome, driver)) = browser_binaries(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let zd = zendesk().await;
    let receiver = crate::health::Receiver::default();
    let mut config = test_config(dir.path());
    config.webhooks = vec![credbroker::config::WebhookConfig {
        url: receiver.clone().start("127.0.0.1:0").await,
        secret: credbroker::secret::SecretString::from("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        events: vec!["system.reauthorization_required".into()],
    }];
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    crate::connect::connect_zendesk(&mut admin, &zd).await;
    let tok = admin
        .get_access_token(crate::connect::token_req("zd"))
        .await
        .unwrap()
        .into_inner();
    zd.oauth(|o| o.revoke_all());
    zd.show_consent_page();
    let mut refused = crate::connect::token_req("zd");
    refused.rejected_token_id = tok.token_id;
    let err = admin.get_access_token(refused).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    eventually("the reauthorization webhook", || {
        let sent = !receiver.bodies().is_empty();
        async move { sent }
    })
    .await;
    let body = receiver.bodies().remove(0);
    let link = body["data"]["connect_url"].as_str().unwrap().to_owned();
    let base = format!("http://{}", broker.http_addr);
    let mut ui = Ui::start(chrome, driver, base.clone()).await;
    ui.go(link.strip_prefix(&base).unwrap()).await;
    ui.click("form button").await;
    // The vendor's consent page, reached through the broker's redirect.
    assert!(ui.text("h1").await.contains("wants to access your account"));
    ui.click("#allow").await;
    assert_eq!(ui.path().await, "/oauth/callback");
    assert!(ui.text("body").await.contains("connected"));
    let s = crate::connect::system(&mut admin, "zd").await;
    assert_eq!(s.state, pb::SystemState::Active as i32);
    assert!(ui.seen.iter().all(|page| !page.contains(ZD_SECRET)));
    ui.quit().await;
    broker.stop().await;
}

async fn sign_in_refuses_a_worker_then_admits_the_admin(ui: &mut Ui, worker: &str, admin: &str) {
    ui.go("/console").await;
    assert_eq!(ui.path().await, "/console/sign-in");
    ui.shot("sign-in").await;
    ui.every_input_is_labelled().await;
    ui.fill("#token", worker).await;
    ui.click("form[action='/console/sign-in'] button").await;
    assert!(ui
        .text(".notice")
        .await
        .contains("worker callers cannot sign in"));
    assert_eq!(ui.path().await, "/console/sign-in");
    // The keyboard alone: the token field has the focus, Enter submits.
    let focused = ui
        .web
        .active_element()
        .await
        .unwrap()
        .attr("id")
        .await
        .unwrap();
    assert_eq!(focused.as_deref(), Some("token"));
    ui.type_and_enter("#token", admin).await;
    assert_eq!(ui.path().await, "/console/systems");
}

/// Polls `f` (every 20 ms) until it is true, for at most 10 s.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !f().await {
        assert!(started.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn events_arrive_live(ui: &mut Ui, admin: &mut Client, base_url: &str) {
    ui.click("nav a[href='/console/events']").await;
    let web = ui.web.clone();
    let status = || async {
        let s = web.find(Locator::Css("#events-status")).await.unwrap();
        s.text().await.unwrap().starts_with("Live")
    };
    eventually("the live feed opens", status).await;
    admin
        .register_system(register_asana("live-1", base_url, GOOD_PAT, false))
        .await
        .unwrap();
    let row = || async {
        let body = web.find(Locator::Css("#events-body")).await.unwrap();
        let text = body.text().await.unwrap();
        text.contains("system.registered live-1")
    };
    eventually("the registration appears live", row).await;
    ui.shot("events").await;
    ui.record().await;
}

async fn register_asana_failing_then_passing(ui: &mut Ui, base_url: &str) {
    ui.click("nav a[href='/console/register']").await;
    ui.click("a[href='/console/register?kind=asana']").await;
    ui.click("a[href*='type=personal_access_token']").await;
    ui.every_input_is_labelled().await;
    ui.shot("register").await;
    ui.fill("#system_id", "asana-1").await;
    ui.fill("#display_name", "Asana (Acme)").await;
    ui.fill("#base_url", base_url).await;
    ui.fill("#cred_token", BAD_PAT).await;
    ui.click("form[action='/console/register'] button[type=submit]")
        .await;
    let failed = ui.text(".notice").await;
    assert!(failed.starts_with("Error: not registered"), "{failed}");
    let token_value = ui
        .web
        .find(Locator::Css("#cred_token"))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap();
    assert_eq!(
        token_value.as_deref(),
        Some(""),
        "a secret is never sent back"
    );
    assert_eq!(
        ui.web
            .find(Locator::Css("#system_id"))
            .await
            .unwrap()
            .prop("value")
            .await
            .unwrap()
            .as_deref(),
        Some("asana-1")
    );
    ui.fill("#cred_token", GOOD_PAT).await;
    ui.click("form[action='/console/register'] button[type=submit]")
        .await;
    let done = ui.text(".notice").await;
    assert!(
        done.contains("registered asana-1; the check passed"),
        "{done}"
    );
    assert!(ui.text(".check").await.contains("Sync Bot"));
    ui.shot("system").await;
}

async fn rotate_and_switch_delivery(ui: &mut Ui) {
    ui.fill("form[action$='/rotate'] #cred_token", ROTATED_PAT)
        .await;
    ui.click("form[action$='/rotate'] button").await;
    let n = ui.text(".notice").await;
    assert!(n.contains("rotated (now version 2)"), "{n}");
    let select = ui.web.find(Locator::Css("#delivery")).await.unwrap();
    select.select_by_value("header").await.unwrap();
    ui.click("form[action$='/delivery'] button").await;
    assert!(ui.text(".notice").await.contains("delivery is now header"));
    // The system's recent past: the rotation as an event, and in the audit trail with its caller.
    let main = ui.text("main").await;
    assert!(main.contains("credential.rotated"), "{main}");
    assert!(main.contains("RotateCredential admin OK"), "{main}");
}

async fn connect_zendesk(ui: &mut Ui) {
    ui.go("/console/systems?kind=zendesk").await;
    ui.shot("systems").await;
    ui.click("a[href='/console/systems/zd']").await;
    ui.click("form[action$='/connect'] button").await;
    // The vendor's consent page.
    assert!(ui.text("h1").await.contains("wants to access your account"));
    ui.click("#allow").await;
    let back = url::Url::parse(&format!("{}/console/systems/zd", ui.base)).unwrap();
    ui.web
        .wait()
        .at_most(Duration::from_secs(10))
        .for_url(&back)
        .await
        .unwrap();
    ui.loaded().await;
    ui.record().await;
    let n = ui.text(".notice").await;
    assert!(n.starts_with("Done: connected"), "{n}");
    assert!(ui.text("dl").await.contains("active"));
}

async fn create_and_revoke_a_caller(ui: &mut Ui, addr: std::net::SocketAddr) -> String {
    ui.click("nav a[href='/console/callers']").await;
    ui.every_input_is_labelled().await;
    ui.shot("callers").await;
    ui.fill("#name", "ci-worker").await;
    ui.click("form[action='/console/callers'] button").await;
    let token = ui.text("#new-token").await;
    let mut w = client(addr, Some(&token)).await;
    w.get_access_token(pb::GetAccessTokenRequest {
        system_id: "zd".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    ui.click("form[action='/console/callers/ci-worker/revoke'] button")
        .await;
    assert!(ui
        .text(".notice")
        .await
        .contains("revoked caller ci-worker"));
    let e = w
        .get_access_token(pb::GetAccessTokenRequest {
            system_id: "zd".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    token
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Plain HTTP against the console, keeping every body it was sent.
struct Http {
    http: reqwest::Client,
    base: String,
    seen: Vec<String>,
}

impl Http {
    fn new(addr: std::net::SocketAddr) -> Self {
        Self {
            http: no_redirects(),
            base: format!("http://{addr}"),
            seen: Vec::new(),
        }
    }

    async fn keep(&mut self, r: reqwest::Response) -> (u16, reqwest::header::HeaderMap, String) {
        let (status, headers) = (r.status().as_u16(), r.headers().clone());
        let body = r.text().await.unwrap();
        self.seen.push(body.clone());
        (status, headers, body)
    }

    /// Signs in with `token`: the status and the Set-Cookie header (empty if none).
    async fn sign_in(&mut self, token: &str) -> (u16, String) {
        let r = self
            .http
            .post(format!("{}/console/sign-in", self.base))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap();
        let (status, headers, _) = self.keep(r).await;
        let cookie = headers
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (status, cookie)
    }

    async fn get(&mut self, cookie: &str, path: &str) -> (u16, reqwest::header::HeaderMap, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap();
        self.keep(r).await
    }

    async fn post(
        &mut self,
        cookie: &str,
        path: &str,
        form: &[(&str, &str)],
        extra: &[(&str, &str)],
    ) -> u16 {
        let mut r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("cookie", cookie)
            .form(form);
        for (k, v) in extra {
            r = r.header(*k, *v);
        }
        let r = r.send().await.unwrap();
        self.keep(r).await.0
    }
}

/// A connection started from the console whose code exchange outlives the callback's request
/// deadline: the browser gets 503, the exchange goes on, and the system's console page shows
/// how it ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_past_the_request_deadline_still_reaches_the_console() {
    let dir = tempfile::tempdir().unwrap();
    let zd = zendesk().await;
    let mut config = test_config(dir.path());
    config.server.request_timeout = Duration::from_secs(2);
    config.egress.upstream_timeout = Duration::from_secs(6);
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    crate::connect::register_zendesk(&mut admin, &zd).await;
    let mut h = Http::new(broker.http_addr);
    let (_, set) = h.sign_in(&broker.admin_token).await;
    let cookie = cookie_pair(&set);
    let (_, _, page) = h.get(&cookie, "/console/systems/zd").await;
    let csrf = csrf_in(&page);
    let started = h
        .http
        .post(format!("{}/console/systems/zd/connect", h.base))
        .header("cookie", &cookie)
        .header("origin", &h.base)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    let authorize = started.headers()["location"].to_str().unwrap().to_owned();
    let consent = h.http.get(&authorize).send().await.unwrap();
    let callback = consent.headers()["location"].to_str().unwrap().to_owned();
    zd.oauth(|o| o.token_delay = Duration::from_millis(3_500));
    let r = h.http.get(&callback).send().await.unwrap();
    assert_eq!(
        r.status().as_u16(),
        503,
        "the deadline did not cut the callback"
    );
    // Sent again (the 503 page invites it) while the exchange still runs: it matches no
    // authorization and must not tell the console the connection failed.
    let again = h.http.get(&callback).send().await.unwrap();
    assert_eq!(again.status().as_u16(), 400);
    // The page shows the outcome once (asked every 50 ms until the exchange has ended).
    let mut every = tokio::time::interval(Duration::from_millis(50));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        every.tick().await;
        let (_, _, page) = h.get(&cookie, "/console/systems/zd").await;
        if page.contains("Done: </strong>connected.") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no outcome on the console: {page}"
        );
    }
    let s = admin
        .get_system(pb::GetSystemRequest {
            system_id: "zd".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.system.unwrap().state, pb::SystemState::Active as i32);
    broker.stop().await;
}

/// Form fields or headers.
type Pairs<'a> = &'a [(&'a str, &'a str)];

/// The `name=value` part of a Set-Cookie header.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap_or_default().to_owned()
}

fn csrf_in(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token")
        + 19;
    html[at..].split('"').next().unwrap().to_owned()
}

async fn exists(admin: &mut Client, id: &str) -> bool {
    admin
        .get_system(pb::GetSystemRequest {
            system_id: id.into(),
        })
        .await
        .is_ok()
}

/// A cross-site form, a missing or wrong CSRF token, another site's Origin: nothing changes.
/// The session cookie's flags; the page headers; a value is escaped, a secret never shown; a
/// worker cannot sign in; a revoked caller's session and an expired one go back to sign-in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_refuses_forged_forms_and_ends_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let asana = FakeAsana::start().await;
    let broker = TestBroker::start(dir.path()).await;
    let mut admin = broker.admin().await;
    let mut h = Http::new(broker.http_addr);

    let worker = worker_token(&mut admin, "w1").await;
    assert_eq!(
        h.sign_in(&worker).await,
        (401, String::new()),
        "a worker gets no session"
    );
    let (status, set) = h.sign_in(&broker.admin_token).await;
    assert_eq!(status, 303);
    for flag in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/console",
        "Max-Age=43200",
    ] {
        assert!(set.contains(flag), "{flag} in {set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: {set}");
    let cookie = cookie_pair(&set);

    let mut reg = register_asana("victim", &asana.base_url, GOOD_PAT, false);
    reg.display_name = "<script>alert(1)</script>".into();
    admin.register_system(reg).await.unwrap();
    let (status, headers, page) = h.get(&cookie, "/console/systems/victim").await;
    assert_eq!(status, 200);
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(
        !csp.contains("unsafe") && csp.contains("script-src 'self';"),
        "{csp}"
    );
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["cache-control"], "no-store");
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;") && !page.contains("<script>"));
    let csrf = csrf_in(&page);

    let delete = "/console/systems/victim/delete";
    let confirm = ("confirm", "victim");
    let forged: [(Pairs, Pairs); 4] = [
        (&[confirm], &[]),
        (&[confirm, ("csrf", "not-the-token")], &[]),
        (
            &[confirm, ("csrf", &csrf)],
            &[("origin", "http://evil.example")],
        ),
        (
            &[confirm, ("csrf", &csrf)],
            &[("sec-fetch-site", "cross-site")],
        ),
    ];
    for (i, (form, extra)) in forged.iter().enumerate() {
        assert_eq!(
            h.post(&cookie, delete, form, extra).await,
            403,
            "forgery {i}"
        );
        assert!(
            exists(&mut admin, "victim").await,
            "forgery {i} changed nothing"
        );
    }
    let same_origin = [("origin", h.base.clone())];
    let same_origin: Vec<(&str, &str)> =
        same_origin.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let wrong = [("confirm", "not-victim"), ("csrf", csrf.as_str())];
    assert_eq!(h.post(&cookie, delete, &wrong, &same_origin).await, 400);
    assert!(
        exists(&mut admin, "victim").await,
        "a wrong confirmation deletes nothing"
    );
    assert_eq!(
        h.post(&cookie, delete, &[confirm, ("csrf", &csrf)], &same_origin)
            .await,
        200
    );
    assert!(!exists(&mut admin, "victim").await, "the real form works");

    a_revoked_callers_session_ends(&mut h, &mut admin).await;
    for (i, body) in h.seen.iter().enumerate() {
        for s in [GOOD_PAT, broker.admin_token.as_str(), worker.as_str()] {
            assert!(!body.contains(s), "response {i} shows a secret");
        }
    }
}

async fn a_revoked_callers_session_ends(h: &mut Http, admin: &mut Client) {
    let second = admin
        .create_caller(pb::CreateCallerRequest {
            name: "second-admin".into(),
            role: pb::CallerRole::Admin as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let cookie = cookie_pair(&h.sign_in(&second).await.1);
    assert_eq!(h.get(&cookie, "/console/systems").await.0, 200);
    // A cookie of the same name planted by another host of the site, sent first, does not
    // lock the admin out.
    let shadowed = format!("credbroker_console=planted-by-a-sibling; {cookie}");
    assert_eq!(h.get(&shadowed, "/console/systems").await.0, 200);
    let mut feed = h
        .http
        .get(format!("{}/console/events/stream", h.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(feed.status(), 200);
    admin
        .revoke_caller(pb::RevokeCallerRequest {
            name: "second-admin".into(),
        })
        .await
        .unwrap();
    // The quiet live feed ends with the session too.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while feed.chunk().await.unwrap().is_some() {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the revoked session's event feed is still open"
    );
    let (status, headers, _) = h.get(&cookie, "/console/systems").await;
    assert_eq!(
        (status, headers["location"].to_str().unwrap()),
        (303, "/console/sign-in")
    );
}

/// A session ends at its absolute expiry however busy it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_console_session_goes_back_to_sign_in() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.server.console_session_max = Duration::from_secs(1);
    let broker = TestBroker::start_with(config).await;
    let mut h = Http::new(broker.http_addr);
    let (_, set) = h.sign_in(&broker.admin_token).await;
    assert!(set.contains("Max-Age=1"), "{set}");
    let cookie = cookie_pair(&set);
    assert_eq!(h.get(&cookie, "/console/systems").await.0, 200);
    let started = Instant::now();
    loop {
        let (status, headers, _) = h.get(&cookie, "/console/systems").await;
        if status == 303 {
            assert_eq!(headers["location"], "/console/sign-in");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the session did not end"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "not before its time"
    );
}

/// With TLS on the HTTP listener and the mTLS client CA, an admin's client certificate signs in
/// (one button, no token); a worker's certificate and a browser without one do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_signs_in_with_a_client_certificate() {
    use crate::mtls::{write, Ca};
    let dir = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("console CA");
    let server = ca.leaf(&["localhost", "127.0.0.1"], true);
    let mut config = test_config(dir.path());
    config.tls.http_cert_file = Some(write(certs.path(), "http.pem", &server.0));
    config.tls.http_key_file = Some(write(certs.path(), "http.key", &server.1));
    config.tls.client_ca_file = Some(write(certs.path(), "ca.pem", &ca.pem()));
    let broker = TestBroker::start_with(config).await;
    let mut admin = broker.admin().await;
    let _ = worker_token(&mut admin, "cert-worker").await;
    admin
        .create_caller(pb::CreateCallerRequest {
            name: "ops-admin".into(),
            role: pb::CallerRole::Admin as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let base = format!("https://127.0.0.1:{}", broker.http_addr.port());
    let browser = |identity: Option<(String, String)>| {
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap());
        if let Some((cert, key)) = identity {
            b = b.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
        }
        b.build().unwrap()
    };
    let sign_in = |b: reqwest::Client| {
        let url = format!("{base}/console/sign-in");
        async move {
            let page = b.get(&url).send().await.unwrap().text().await.unwrap();
            let r = b
                .post(&url)
                .form(&[("certificate", "1")])
                .send()
                .await
                .unwrap();
            (
                page,
                r.status().as_u16(),
                r.headers().get("set-cookie").is_some(),
            )
        }
    };

    let (page, status, cookie) = sign_in(browser(Some(ca.leaf(&["ops-admin"], false)))).await;
    assert!(
        page.contains("Sign in as ops-admin with your client certificate"),
        "{page}"
    );
    assert_eq!(
        (status, cookie),
        (303, true),
        "the admin's certificate signs in"
    );

    let (page, status, cookie) = sign_in(browser(Some(ca.leaf(&["cert-worker"], false)))).await;
    assert!(!page.contains("with your client certificate"), "{page}");
    assert_eq!(
        (status, cookie),
        (401, false),
        "a worker's certificate does not"
    );

    let (page, status, cookie) = sign_in(browser(None)).await;
    assert!(!page.contains("with your client certificate"), "{page}");
    assert_eq!((status, cookie), (401, false), "no certificate, no session");
    // The token still works on the same listener.
    let r = browser(None)
        .post(format!("{base}/console/sign-in"))
        .form(&[("token", broker.admin_token.as_str())])
        .send()
        .await
        .unwrap();
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set.contains("; Secure"),
        "under TLS the cookie is Secure: {set}"
    );
}
