//! The backend contract: one table of every system kind the broker serves, and one test per
//! contract row that runs every kind in the table through it (as object_store's
//! `integration.rs` is run by every store).
//!
//! A kind's `setup` starts its loopback fake (`fakes.rs`) and a real broker (`support.rs`,
//! `test_config`) and hands back what `CheckAuthentication` is asked about: a candidate
//! credential for the kinds an admin pastes a secret for (Azure DevOps, Salesforce client
//! credentials, ServiceNow basic, OAuth password grant, client credentials and API key, Zendesk
//! client credentials, Jira Cloud service account and scoped API token, Freshdesk, Freshservice,
//! Asana), or a
//! system connected through the vendor's consent page for the authorization-code kinds (Zendesk,
//! Jira Cloud; the same register → StartAuthorization → browse path `connect.rs` uses). The
//! rows:
//!
//! 1. a good credential is `ok`, with the identity the fake knows;
//! 2. a bad secret is `AUTH_FAILURE_INVALID_CREDENTIALS`;
//! 3. upstream faults are classified: 429 → `RATE_LIMITED`, 5xx → `UPSTREAM_ERROR`, a 200 HTML
//!    page → what the vendor's own tests assert (`MISCONFIGURED`; Azure DevOps: its sign-in
//!    page, `INVALID_CREDENTIALS`), a hang → `UNREACHABLE` within the check deadline
//!    (`test_config`'s 2 s upstream timeout, which is also the check timeout);
//! 4. no secret (token, password, API key, client secret, refresh token, and the base64 forms
//!    Basic auth sends) appears in any check, nor in the error statuses that follow from those
//!    rows (`RegisterSystem` with `check` for a candidate, `GetAccessToken` for a connected
//!    system).
//!
//! Every row runs on a fresh broker and fake, so rows never leak state into each other. Kinds run
//! concurrently; a failing row names every kind (and the row) it fails for. Every kind plays
//! every row: none is skipped.
//!
//! Vendor traps (Azure DevOps' anonymous 200 and scope probes, Zendesk's anonymous `users/me`,
//! ServiceNow's ACL-filtered rows and restricted basic auth, Freshworks' deactivated agents,
//! Asana's 402, Salesforce's legacy logins, …) stay in the per-vendor files.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use base64::Engine;
use credbroker::config::Config;
use credbroker::pb;
use credbroker::pb::AuthFailure as F;
use tonic::Code;

use crate::connect::{
    atlassian, authz_code, browse, jira_config, register, start, zendesk, JIRA_CLIENT, JIRA_SECRET,
    ZD_CLIENT, ZD_SECRET,
};
use crate::support::*;

// ------------------------------------------------------------------------------------------
// The table
// ------------------------------------------------------------------------------------------

/// What a row must answer for a kind: the check fails with this class.
type Expect = F;

/// One kind of backend under the contract.
struct Kind {
    /// Named in every failure.
    name: &'static str,
    /// Starts the fake and a broker; see [`Arm`].
    setup: fn(Prep) -> ArmFuture,
    /// The identity a good credential is found to be: id, display name, email.
    identity: [&'static str; 3],
    /// Row 2.
    bad_secret: Expect,
    /// Row 3: the fake's mode and what the check must say under it.
    faults: [(Mode, Expect); 4],
}

/// A 200 HTML page where JSON belongs: the URL points at something else.
const GARBAGE_IS_MISCONFIGURED: Expect = F::Misconfigured;
/// 429, 503, HTML 200, hang: how every fake with a full `Mode` is classified.
const STANDARD_FAULTS: [(Mode, Expect); 4] = [
    (Mode::RateLimited, F::RateLimited),
    (Mode::ServerError, F::UpstreamError),
    (Mode::Garbage, GARBAGE_IS_MISCONFIGURED),
    (Mode::Hang, F::Unreachable),
];

static KINDS: [Kind; 16] = [
    Kind {
        name: "Azure DevOps (PAT)",
        setup: azure_devops,
        identity: ["u-1", "Proxy User", "proxy@acme.example"],
        bad_secret: F::InvalidCredentials,
        faults: [
            (Mode::RateLimited, F::RateLimited),
            (Mode::ServerError, F::UpstreamError),
            // An HTML page is Azure DevOps' sign-in page: the credential was not accepted
            // (static_backends.rs: azure_devops_tells_the_truth).
            (Mode::Garbage, F::InvalidCredentials),
            (Mode::Hang, F::Unreachable),
        ],
    },
    Kind {
        name: "Salesforce (client credentials)",
        setup: salesforce,
        identity: [SF_USER_ID, "Integration User", "integration@acme.example"],
        bad_secret: F::InvalidCredentials,
        faults: [
            // Salesforce's rate limit is a 403 REQUEST_LIMIT_EXCEEDED on REST, not a 429
            // (oauth.rs: salesforce_api_limit_is_rate_limited_not_a_missing_permission).
            (Mode::RateLimited, F::RateLimited),
            (Mode::ServerError, F::UpstreamError),
            (Mode::Garbage, GARBAGE_IS_MISCONFIGURED),
            // The token endpoint (a login) answers too late.
            (Mode::Hang, F::Unreachable),
        ],
    },
    Kind {
        name: "ServiceNow (basic)",
        setup: servicenow_basic,
        identity: [SN_SYS_ID, "Sync Proxy", "sync@acme.example"],
        bad_secret: F::InvalidCredentials,
        // The HTML page is a hibernating instance (static_backends.rs).
        faults: STANDARD_FAULTS,
    },
    Kind {
        name: "ServiceNow (OAuth password grant)",
        setup: servicenow_oauth,
        identity: [SN_SYS_ID, "Sync Proxy", "sync@acme.example"],
        bad_secret: F::InvalidCredentials,
        // The Table API's faults (the token endpoint answers normally).
        faults: STANDARD_FAULTS,
    },
    Kind {
        name: "Zendesk (connected)",
        setup: zendesk_connected,
        identity: ["9001", "Agent Smith", "agent@acme.example"],
        // The app's client secret was rotated at Zendesk; the next refresh is refused.
        bad_secret: F::InvalidCredentials,
        faults: [
            (Mode::RateLimited, F::RateLimited),
            (Mode::ServerError, F::UpstreamError),
            (Mode::Garbage, GARBAGE_IS_MISCONFIGURED),
            // The access token has lapsed and the token endpoint never answers in time.
            (Mode::Hang, F::Unreachable),
        ],
    },
    Kind {
        name: "Jira Cloud (connected)",
        setup: jira_connected,
        identity: [JIRA_ACCOUNT, "Jira Proxy", "jira@acme.example"],
        // The app's client secret was rotated at Atlassian; the next refresh is refused.
        bad_secret: F::InvalidCredentials,
        faults: [
            (Mode::RateLimited, F::RateLimited),
            (Mode::ServerError, F::UpstreamError),
            (Mode::Garbage, GARBAGE_IS_MISCONFIGURED),
            (Mode::Hang, F::Unreachable),
        ],
    },
    Kind {
        name: "Azure DevOps (Entra service principal)",
        setup: azure_devops_entra,
        identity: ["sp-1", "Sync SP", ""],
        // AADSTS7000215: a wrong client secret.
        bad_secret: F::InvalidCredentials,
        faults: [
            (Mode::RateLimited, F::RateLimited),
            (Mode::ServerError, F::UpstreamError),
            // Azure DevOps' sign-in page: the token was not accepted.
            (Mode::Garbage, F::InvalidCredentials),
            (Mode::Hang, F::Unreachable),
        ],
    },
    Kind {
        name: "Salesforce (JWT bearer)",
        setup: salesforce_jwt,
        identity: [SF_USER_ID, "Integration User", "integration@acme.example"],
        // A key whose certificate is not on the app: "invalid assertion".
        bad_secret: F::InvalidCredentials,
        faults: [
            (Mode::RateLimited, F::RateLimited),
            (Mode::ServerError, F::UpstreamError),
            (Mode::Garbage, GARBAGE_IS_MISCONFIGURED),
            (Mode::Hang, F::Unreachable),
        ],
    },
    Kind {
        name: "Zendesk (client credentials)",
        setup: zendesk_service,
        identity: ["9003", "Ada Admin", "ada@acme.example"],
        bad_secret: F::InvalidCredentials,
        // The API's faults (users/me); the token endpoint answers normally.
        faults: STANDARD_FAULTS,
    },
    Kind {
        name: "Jira Cloud (service account)",
        setup: jira_service,
        identity: [SA_ACCOUNT, "Sync Service", SA_EMAIL],
        bad_secret: F::InvalidCredentials,
        // The site's tenant info and the gateway fail alike; an HTML page where the tenant
        // info belongs means no Atlassian site is there (misconfigured).
        faults: STANDARD_FAULTS,
    },
    Kind {
        name: "Jira Cloud (scoped API token)",
        setup: jira_scoped_token,
        identity: [SA_ACCOUNT, "Sync Service", SA_EMAIL],
        // Atlassian answers an unknown token exactly as an expired one (401 "Client must be
        // authenticated"), and the message says both.
        bad_secret: F::ExpiredOrRevoked,
        faults: STANDARD_FAULTS,
    },
    Kind {
        name: "ServiceNow (client credentials)",
        setup: servicenow_service,
        identity: [SN_SYS_ID, "Sync Proxy", "sync@acme.example"],
        // ServiceNow answers a wrong secret as it answers the grant switched off (401
        // server_error / access_denied): the message names the property and the secret.
        bad_secret: F::Misconfigured,
        faults: STANDARD_FAULTS,
    },
    Kind {
        name: "ServiceNow (API key)",
        setup: servicenow_api_key,
        identity: [SN_SYS_ID, "Sync Proxy", "sync@acme.example"],
        bad_secret: F::InvalidCredentials,
        faults: STANDARD_FAULTS,
    },
    Kind {
        name: "Freshdesk (API key)",
        setup: freshdesk,
        identity: ["42", "Ada Agent", "ada@acme.example"],
        bad_secret: F::InvalidCredentials,
        faults: STANDARD_FAULTS,
    },
    Kind {
        name: "Freshservice (API key)",
        setup: freshservice,
        identity: ["42", "Ada Agent", "ada@acme.example"],
        bad_secret: F::InvalidCredentials,
        faults: STANDARD_FAULTS,
    },
    Kind {
        name: "Asana (PAT)",
        setup: asana,
        identity: ["1201", "Proxy User", "proxy@example.com"],
        bad_secret: F::InvalidCredentials,
        faults: STANDARD_FAULTS,
    },
];

// ------------------------------------------------------------------------------------------
// The tests: one per contract row, over every kind
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_good_credential_is_identified() {
    every_kind("good credential is identified", |k| -> RowFuture {
        Box::pin(good_credential(k))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_bad_secret_is_invalid_credentials() {
    every_kind("bad secret is invalid credentials", |k| -> RowFuture {
        Box::pin(bad_secret(k))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_upstream_faults_are_classified() {
    every_kind("upstream faults are classified", |k| -> RowFuture {
        Box::pin(upstream_faults(k))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_secrets_never_in_messages() {
    every_kind("secrets never in messages", |k| -> RowFuture {
        Box::pin(secrets_never_in_messages(k))
    })
    .await;
}

async fn good_credential(kind: &'static Kind) {
    let row = Row::Good;
    let ctx = context(kind, row);
    let o = run_row(kind, row, false).await;
    let c = &o.check;
    assert!(
        c.ok,
        "{ctx}: not ok ({}): {}",
        class_name(c.failure),
        c.message
    );
    let id = c.identity.clone().unwrap_or_default();
    assert!(!id.id.is_empty(), "{ctx}: no identity: {c:?}");
    assert_eq!(
        [id.id.as_str(), id.display_name.as_str(), id.email.as_str()],
        kind.identity,
        "{ctx}: identity"
    );
    assert!(
        o.unexpected.is_empty(),
        "{ctx}: requests the vendor would not expect: {:?}",
        o.unexpected
    );
    assert_secret_free(&ctx, "check", &format!("{c:?}"), &o.secrets);
}

async fn bad_secret(kind: &'static Kind) {
    let row = Row::BadSecret;
    let Some(want) = expected(kind, row) else {
        unreachable!("the bad-secret row always fails");
    };
    let o = run_row(kind, row, false).await;
    assert_failed(&context(kind, row), &o, want);
}

async fn upstream_faults(kind: &'static Kind) {
    for (mode, _) in kind.faults {
        let row = Row::Fault(mode);
        let Some(want) = expected(kind, row) else {
            unreachable!("a fault row always fails");
        };
        let ctx = context(kind, row);
        let o = run_row(kind, row, false).await;
        assert_failed(&ctx, &o, want);
        if mode == Mode::Hang {
            assert!(
                o.took <= hang_bound(o.deadline),
                "{ctx}: the check took {:?}; the check deadline is {:?}",
                o.took,
                o.deadline
            );
        }
    }
}

async fn secrets_never_in_messages(kind: &'static Kind) {
    for row in rows(kind) {
        let ctx = context(kind, row);
        let o = run_row(kind, row, true).await;
        assert_secret_free(&ctx, "check", &format!("{:?}", o.check), &o.secrets);
        let f = o.follow_up.as_ref().unwrap();
        match (expected(kind, row), &f.refused) {
            (None, None) => {}
            (None, Some(s)) => panic!("{ctx}: the good credential was refused: {s:?}"),
            // A connected system's API faults leave its token endpoint working: the worker is
            // served, and the answer is scanned all the same.
            (Some(_), None) if !o.candidate && matches!(row, Row::Fault(m) if m != Mode::Hang) => {}
            (Some(_), None) => panic!("{ctx}: a failing credential was accepted or served"),
            (Some(want), Some(s)) if o.candidate => {
                // RegisterSystem with `check` refuses with the check's class, nothing saved.
                let class = want
                    .as_str_name()
                    .trim_start_matches("AUTH_FAILURE_")
                    .to_ascii_lowercase();
                assert_eq!(s.code(), Code::FailedPrecondition, "{ctx}: {s:?}");
                assert!(
                    s.message().contains(&format!("({class})")),
                    "{ctx}: the refusal does not say {class}: {}",
                    s.message()
                );
            }
            (Some(_), Some(_)) => {}
        }
        for text in &f.texts {
            assert_secret_free(&ctx, "follow-up answer", text, &o.secrets);
        }
    }
}

// ------------------------------------------------------------------------------------------
// Rows
// ------------------------------------------------------------------------------------------

/// A contract row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Row {
    Good,
    BadSecret,
    Fault(Mode),
}

impl fmt::Display for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Row::Good => write!(f, "good credential"),
            Row::BadSecret => write!(f, "bad secret"),
            Row::Fault(m) => write!(f, "upstream {m:?}"),
        }
    }
}

fn context(kind: &Kind, row: Row) -> String {
    format!("[{} / {row}]", kind.name)
}

/// The class a failing row must report; `None` for the good row.
fn expected(kind: &Kind, row: Row) -> Option<F> {
    let e = match row {
        Row::Good => return None,
        Row::BadSecret => kind.bad_secret,
        Row::Fault(mode) => {
            kind.faults
                .iter()
                .find(|(m, _)| *m == mode)
                .unwrap_or_else(|| panic!("{}: no entry for {mode:?}", kind.name))
                .1
        }
    };
    Some(e)
}

/// The rows a kind runs: all of them.
fn rows(kind: &Kind) -> Vec<Row> {
    let faults = kind.faults.iter().map(|(m, _)| Row::Fault(*m));
    [Row::Good, Row::BadSecret]
        .into_iter()
        .chain(faults)
        .collect()
}

/// What one row's answers were.
struct Outcome {
    check: pb::AuthCheck,
    took: Duration,
    deadline: Duration,
    candidate: bool,
    secrets: Vec<String>,
    unexpected: Vec<String>,
    follow_up: Option<FollowUp>,
}

/// The error-status path after a row's check.
struct FollowUp {
    /// Every answer, as `Debug` text (responses and statuses).
    texts: Vec<String>,
    /// The status when the call was refused.
    refused: Option<tonic::Status>,
}

/// Runs one row on a fresh broker and fake; `follow_up` also takes the row's error-status path.
async fn run_row(kind: &'static Kind, row: Row, follow_up: bool) -> Outcome {
    let ctx = context(kind, row);
    let prep = if row == Row::Good {
        Prep::Plain
    } else {
        Prep::Lapsing
    };
    let mut arm = (kind.setup)(prep).await;
    match row {
        Row::Good => {}
        Row::BadSecret => (arm.spoil)(),
        Row::Fault(mode) => (arm.fault)(mode),
    }
    // Connected kinds: let the cached access token lapse, so the check itself goes upstream.
    tokio::time::sleep(arm.lapse).await;
    let bad = row == Row::BadSecret;
    let started = Instant::now();
    let check = arm.check(&ctx, bad).await;
    let took = started.elapsed();
    let follow_up = if follow_up {
        Some(arm.follow_up(&ctx, bad).await)
    } else {
        None
    };
    let outcome = Outcome {
        check,
        took,
        deadline: arm.deadline,
        candidate: matches!(arm.target, Target::Candidate { .. }),
        secrets: (arm.secrets)()
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect(),
        unexpected: (arm.unexpected)(),
        follow_up,
    };
    let Arm {
        broker,
        admin,
        _dir: dir,
        ..
    } = arm;
    drop(admin);
    broker.stop().await;
    drop(dir);
    outcome
}

fn assert_failed(ctx: &str, o: &Outcome, want: F) {
    let c = &o.check;
    assert!(!c.ok, "{ctx}: reported ok: {}", c.message);
    assert_eq!(
        c.failure,
        want as i32,
        "{ctx}: expected {}, got {}: {}",
        want.as_str_name(),
        class_name(c.failure),
        c.message
    );
    assert_secret_free(ctx, "check", &format!("{c:?}"), &o.secrets);
}

fn assert_secret_free(ctx: &str, what: &str, text: &str, secrets: &[String]) {
    for (i, s) in secrets.iter().enumerate() {
        assert!(
            !text.contains(s.as_str()),
            "{ctx}: secret #{i} of the kind is in the {what}: {text}"
        );
    }
}

fn class_name(v: i32) -> String {
    F::try_from(v)
        .map(|f| f.as_str_name().to_owned())
        .unwrap_or_else(|_| format!("unknown class {v}"))
}

/// How long a check against a hanging vendor may take: the check deadline, twice over (a stored
/// OAuth system's check may wait for a refresh already at the vendor), plus slack for a loaded
/// machine. A check that ignored the deadline would run into `RPC_GUARD` instead.
fn hang_bound(deadline: Duration) -> Duration {
    deadline * 2 + Duration::from_secs(3)
}

/// Every RPC of the suite ends within this, or the row fails (instead of the test hanging).
const RPC_GUARD: Duration = Duration::from_secs(30);

async fn guarded<T>(ctx: &str, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(RPC_GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("{ctx}: {what} did not answer within {RPC_GUARD:?}"))
}

type RowFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs `run` for every kind at once and fails once, naming every kind that failed.
async fn every_kind(row: &str, run: fn(&'static Kind) -> RowFuture) {
    let tasks: Vec<_> = KINDS
        .iter()
        .map(|k| (k.name, tokio::spawn(run(k))))
        .collect();
    let mut failed = Vec::new();
    for (name, task) in tasks {
        if let Err(e) = task.await {
            failed.push(format!("  {name}: {}", panic_text(e)));
        }
    }
    assert!(
        failed.is_empty(),
        "the backend contract row '{row}' fails for {} kind(s):\n{}",
        failed.len(),
        failed.join("\n")
    );
}

fn panic_text(e: tokio::task::JoinError) -> String {
    if e.is_cancelled() {
        return "cancelled".to_owned();
    }
    let p = e.into_panic();
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panicked".to_owned())
}

// ------------------------------------------------------------------------------------------
// Arms: a kind set up for one row
// ------------------------------------------------------------------------------------------

/// What a row needs from the setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prep {
    /// As the vendor normally answers.
    Plain,
    /// Connected kinds: access tokens that live `*_LIFETIME`, so that after `Arm::lapse` a
    /// check must refresh (and meet the spoiled secret or the hanging token endpoint).
    Lapsing,
}

type ArmFuture = Pin<Box<dyn Future<Output = Arm> + Send>>;
type Secrets = Box<dyn Fn() -> Vec<String> + Send + Sync>;
type FaultFn = Box<dyn Fn(Mode) + Send + Sync>;
type Unexpected = Box<dyn Fn() -> Vec<String> + Send + Sync>;

/// What `CheckAuthentication` is asked about.
// One per row, built once: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Target {
    /// A credential not stored yet; `bad` differs from `good` in its secret only.
    Candidate {
        kind: pb::SystemKind,
        base_url: String,
        good: pb::Credential,
        bad: pb::Credential,
    },
    /// A system connected through the vendor's consent page.
    Connected { system_id: &'static str },
}

/// A kind set up for one row: its broker, and handles on its fake.
struct Arm {
    _dir: tempfile::TempDir,
    broker: TestBroker,
    admin: Client,
    /// The broker's upstream timeout (also its check deadline).
    deadline: Duration,
    target: Target,
    /// The secrets in play so far (read after the row: refresh tokens are issued during it).
    secrets: Secrets,
    /// Plays one of the table's non-skipped fault modes at the fake.
    fault: FaultFn,
    /// Connected kinds: makes the stored secret wrong at the vendor (candidates: nothing to do,
    /// the bad credential is sent instead).
    spoil: Box<dyn Fn() + Send + Sync>,
    /// How long until a `Prep::Lapsing` access token has lapsed (zero otherwise).
    lapse: Duration,
    /// The fake's list of requests it did not expect.
    unexpected: Unexpected,
}

impl Arm {
    fn request(&self, bad: bool) -> pb::CheckAuthenticationRequest {
        match &self.target {
            Target::Candidate {
                kind,
                base_url,
                good,
                bad: wrong,
            } => candidate(*kind, base_url, (if bad { wrong } else { good }).clone()),
            Target::Connected { system_id } => pb::CheckAuthenticationRequest {
                target: Some(pb::check_authentication_request::Target::SystemId(
                    (*system_id).to_owned(),
                )),
            },
        }
    }

    async fn check(&mut self, ctx: &str, bad: bool) -> pb::AuthCheck {
        let req = self.request(bad);
        guarded(
            ctx,
            "CheckAuthentication",
            self.admin.check_authentication(req),
        )
        .await
        .unwrap_or_else(|s| panic!("{ctx}: CheckAuthentication failed as an RPC: {s:?}"))
        .into_inner()
        .check
        .unwrap_or_else(|| panic!("{ctx}: the answer has no check"))
    }

    /// A candidate: `RegisterSystem` with `check` and the row's credential (the fake still
    /// plays the row's fault). A connected system: `GetAccessToken` after the check.
    async fn follow_up(&mut self, ctx: &str, bad: bool) -> FollowUp {
        let register = match &self.target {
            Target::Candidate {
                kind,
                base_url,
                good,
                bad: wrong,
            } => Some(pb::RegisterSystemRequest {
                system_id: "contract".into(),
                kind: *kind as i32,
                base_url: base_url.clone(),
                credential: Some((if bad { wrong } else { good }).clone()),
                check: true,
                ..Default::default()
            }),
            Target::Connected { .. } => None,
        };
        let answer = match (register, &self.target) {
            (Some(req), _) => guarded(ctx, "RegisterSystem", self.admin.register_system(req))
                .await
                .map(|r| format!("{:?}", r.into_inner())),
            (None, Target::Connected { system_id }) => {
                let req = pb::GetAccessTokenRequest {
                    system_id: (*system_id).to_owned(),
                    ..Default::default()
                };
                guarded(ctx, "GetAccessToken", self.admin.get_access_token(req))
                    .await
                    // The header is the credential by design; its Debug is redacted.
                    .map(|r| format!("{:?}", r.into_inner()))
            }
            (None, Target::Candidate { .. }) => unreachable!(),
        };
        match answer {
            Ok(text) => FollowUp {
                texts: vec![text],
                refused: None,
            },
            Err(s) => FollowUp {
                texts: vec![format!("{s:?}")],
                refused: Some(s),
            },
        }
    }
}

/// A broker on a fresh data directory with `config` (built on that directory).
async fn broker_with(
    config: impl FnOnce(&std::path::Path) -> Config,
) -> (tempfile::TempDir, TestBroker, Client, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let deadline = config.egress.upstream_timeout;
    let broker = TestBroker::start_with(config).await;
    let admin = broker.admin().await;
    (dir, broker, admin, deadline)
}

async fn candidate_arm(
    target: Target,
    secrets: Secrets,
    fault: FaultFn,
    unexpected: Unexpected,
) -> Arm {
    let (dir, broker, admin, deadline) = broker_with(test_config).await;
    Arm {
        _dir: dir,
        broker,
        admin,
        deadline,
        target,
        secrets,
        fault,
        spoil: Box::new(|| {}),
        lapse: Duration::ZERO,
        unexpected,
    }
}

/// Registers `id` with an authorization-code client and connects it through the vendor's
/// consent page (as `connect.rs` and `edges.rs` do).
async fn connect_system(
    admin: &mut Client,
    id: &str,
    kind: pb::SystemKind,
    base: &str,
    cred: pb::Credential,
) {
    admin
        .register_system(register(id, kind, base, cred))
        .await
        .unwrap();
    let s = start(admin, id).await;
    let (_, status, page) = browse(&s.authorize_url).await;
    assert_eq!(status, 200, "{id}: connecting failed: {page}");
}

fn lapse_for(prep: Prep, lifetime: Duration) -> Duration {
    match prep {
        Prep::Plain => Duration::ZERO,
        Prep::Lapsing => lifetime + Duration::from_millis(100),
    }
}

fn fixed(secrets: Vec<String>) -> Secrets {
    Box::new(move || secrets.clone())
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn client_credentials(id: &str, secret: &str) -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::OauthClientCredentials(
            pb::OAuthClientCredentials {
                client_id: id.into(),
                client_secret: secret.into(),
                scopes: vec![],
                secret_expires_at: None,
            },
        )),
    }
}

fn password_grant(password: &str) -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::OauthPasswordGrant(
            pb::OAuthPasswordGrant {
                client_id: SN_CLIENT.into(),
                client_secret: SN_CLIENT_SECRET.into(),
                username: SN_USER.into(),
                password: password.into(),
            },
        )),
    }
}

// ------------------------------------------------------------------------------------------
// Setups, one per kind
// ------------------------------------------------------------------------------------------

/// Long past every deadline here: what a vendor that never answers looks like.
const VENDOR_HANG: Duration = Duration::from_secs(30);

const ADO_PAT: &str = "ctr-ado-pat-3f2e1";
const ADO_BAD: &str = "ctr-ado-wrong-5b4c3";
const SF_CLIENT: &str = "3MVG9-ctr-client";
const SF_SECRET: &str = "ctr-sf-secret-1c5e8";
const SF_BAD: &str = "ctr-sf-wrong-4d2a7";
/// The user id FakeSalesforce's UserInfo answers with.
const SF_USER_ID: &str = "005000000000001AAA";
const SN_USER: &str = "sync.proxy";
const SN_SYS_ID: &str = "6816f79c";
const SN_PASSWORD: &str = "ctr-sn-pass-5d8b2";
const SN_BAD: &str = "ctr-sn-wrong-3c9a1";
const SN_CLIENT: &str = "ctr-sn-client";
const SN_CLIENT_SECRET: &str = "ctr-sn-secret-8e4f0";
const ZD_ID: &str = "zd";
/// Zendesk access-token lifetime under `Prep::Lapsing` (as connect.rs uses).
const ZD_LIFETIME: Duration = Duration::from_secs(2);
const JIRA_ID: &str = "jira";
const JIRA_SITE: &str = "https://acme.atlassian.net";
const JIRA_ACCOUNT: &str = "5b10ac8d82e05b22cc7d4ef5";
/// Jira access-token lifetime under `Prep::Lapsing` (as edges.rs uses).
const JIRA_LIFETIME: Duration = Duration::from_secs(1);
/// The app's new client secret at Atlassian after an admin rotated it there.
const JIRA_ROTATED_SECRET: &str = "ctr-jira-rotated-secret-9c8d7";
const ZD_ROTATED_SECRET: &str = "ctr-zendesk-rotated-secret-4e1f0";
const FW_KEY: &str = "ctr-fw-key-0a9b8";
const FW_BAD: &str = "ctr-fw-wrong-7e6d5";
const ASANA_PAT: &str = "ctr-asana-pat-7f3e1";
const ASANA_BAD: &str = "ctr-asana-wrong-9a2c4";

fn azure_devops(_: Prep) -> ArmFuture {
    Box::pin(async {
        let fake = FakeAzureDevOps::start().await;
        fake.add_pat(
            ADO_PAT,
            "u-1",
            "Proxy User",
            "proxy@acme.example",
            ADO_ALL_SCOPES,
            true,
        );
        let target = Target::Candidate {
            kind: pb::SystemKind::AzureDevops,
            base_url: fake.base_url.clone(),
            good: pat(ADO_PAT),
            bad: pat(ADO_BAD),
        };
        // Basic auth with an empty user name: `:PAT`.
        let secrets = fixed(vec![
            ADO_PAT.into(),
            ADO_BAD.into(),
            b64(&format!(":{ADO_PAT}")),
            b64(&format!(":{ADO_BAD}")),
        ]);
        let (f, u) = (fake.clone(), fake);
        candidate_arm(
            target,
            secrets,
            Box::new(move |m| f.set_mode(m)),
            Box::new(move || u.server.unexpected()),
        )
        .await
    })
}

fn salesforce(_: Prep) -> ArmFuture {
    Box::pin(async {
        let fake = FakeSalesforce::start(SF_CLIENT, SF_SECRET).await;
        let target = Target::Candidate {
            kind: pb::SystemKind::Salesforce,
            base_url: fake.base_url.clone(),
            good: client_credentials(SF_CLIENT, SF_SECRET),
            bad: client_credentials(SF_CLIENT, SF_BAD),
        };
        let (f, u) = (fake.clone(), fake);
        let fault: FaultFn = Box::new(move |m| match m {
            // The org's API allocation is used up (403 REQUEST_LIMIT_EXCEEDED); the check meets
            // it on REST, where it goes when the app has no identity scopes.
            Mode::RateLimited => {
                f.set_userinfo(false);
                f.set_api_limit_exhausted(true);
            }
            // Logins (the token endpoint) answer long after the deadline.
            Mode::Hang => f.set_login_delay(VENDOR_HANG),
            other => f.set_api_mode(other),
        });
        candidate_arm(
            target,
            fixed(vec![SF_SECRET.into(), SF_BAD.into()]),
            fault,
            Box::new(move || u.server.unexpected()),
        )
        .await
    })
}

fn servicenow_basic(_: Prep) -> ArmFuture {
    Box::pin(async {
        let fake = FakeServiceNow::start().await;
        fake.add_user(
            SN_USER,
            SN_PASSWORD,
            SN_SYS_ID,
            "Sync Proxy",
            "sync@acme.example",
        );
        let target = Target::Candidate {
            kind: pb::SystemKind::Servicenow,
            base_url: fake.base_url.clone(),
            good: basic_cred(SN_USER, SN_PASSWORD),
            bad: basic_cred(SN_USER, SN_BAD),
        };
        let secrets = fixed(vec![
            SN_PASSWORD.into(),
            SN_BAD.into(),
            b64(&format!("{SN_USER}:{SN_PASSWORD}")),
            b64(&format!("{SN_USER}:{SN_BAD}")),
        ]);
        let (f, u) = (fake.clone(), fake);
        candidate_arm(
            target,
            secrets,
            Box::new(move |m| f.set_mode(m)),
            Box::new(move || u.server.unexpected()),
        )
        .await
    })
}

fn servicenow_oauth(_: Prep) -> ArmFuture {
    Box::pin(async {
        let fake = FakeServiceNow::start().await;
        fake.add_user(
            SN_USER,
            SN_PASSWORD,
            SN_SYS_ID,
            "Sync Proxy",
            "sync@acme.example",
        );
        fake.add_client(SN_CLIENT, SN_CLIENT_SECRET);
        let target = Target::Candidate {
            kind: pb::SystemKind::Servicenow,
            base_url: fake.base_url.clone(),
            good: password_grant(SN_PASSWORD),
            bad: password_grant(SN_BAD),
        };
        let (f, s, u) = (fake.clone(), fake.clone(), fake);
        // The refresh token the password grant was exchanged for counts too.
        let secrets: Secrets = Box::new(move || {
            let mut v: Vec<String> =
                vec![SN_CLIENT_SECRET.into(), SN_PASSWORD.into(), SN_BAD.into()];
            v.extend(s.newest_refresh_token(SN_USER));
            v
        });
        candidate_arm(
            target,
            secrets,
            Box::new(move |m| f.set_mode(m)),
            Box::new(move || u.server.unexpected()),
        )
        .await
    })
}

fn zendesk_connected(prep: Prep) -> ArmFuture {
    Box::pin(async move {
        let fake = zendesk().await;
        if prep == Prep::Lapsing {
            fake.set_access_lifetime(ZD_LIFETIME.as_secs());
        }
        let (dir, broker, mut admin, deadline) = broker_with(test_config).await;
        connect_system(
            &mut admin,
            ZD_ID,
            pb::SystemKind::Zendesk,
            &fake.base_url,
            authz_code(ZD_CLIENT, ZD_SECRET),
        )
        .await;
        let (f, s, b, u) = (fake.clone(), fake.clone(), fake.clone(), fake);
        Arm {
            _dir: dir,
            broker,
            admin,
            deadline,
            target: Target::Connected { system_id: ZD_ID },
            secrets: Box::new(move || {
                let mut v = vec![ZD_SECRET.to_owned(), ZD_ROTATED_SECRET.to_owned()];
                v.extend(s.newest_refresh_token("agent"));
                v
            }),
            fault: Box::new(move |m| match m {
                Mode::Hang => f.oauth(|o| o.token_delay = VENDOR_HANG),
                other => f.set_mode(other),
            }),
            // The stored ZD_SECRET is no longer the app's secret.
            spoil: Box::new(move || b.set_client_secret(ZD_CLIENT, ZD_ROTATED_SECRET)),
            lapse: lapse_for(prep, ZD_LIFETIME),
            unexpected: Box::new(move || u.server.unexpected()),
        }
    })
}

fn jira_connected(prep: Prep) -> ArmFuture {
    Box::pin(async move {
        let fake = atlassian().await;
        if prep == Prep::Lapsing {
            fake.oauth(|o| o.access_lifetime = JIRA_LIFETIME.as_secs());
        }
        let (dir, broker, mut admin, deadline) =
            broker_with(|p: &std::path::Path| jira_config(p, &fake)).await;
        connect_system(
            &mut admin,
            JIRA_ID,
            pb::SystemKind::JiraCloud,
            JIRA_SITE,
            authz_code(JIRA_CLIENT, JIRA_SECRET),
        )
        .await;
        let (f, b, u) = (fake.clone(), fake.clone(), fake);
        Arm {
            _dir: dir,
            broker,
            admin,
            deadline,
            target: Target::Connected { system_id: JIRA_ID },
            // FakeAtlassian does not expose its refresh tokens: the client secrets are scanned.
            secrets: fixed(vec![JIRA_SECRET.into(), JIRA_ROTATED_SECRET.into()]),
            fault: Box::new(move |m| match m {
                Mode::Hang => f.oauth(|o| o.token_delay = VENDOR_HANG),
                other => f.set_mode(other),
            }),
            // The stored JIRA_SECRET is no longer the app's secret.
            spoil: Box::new(move || b.add_client(JIRA_CLIENT, JIRA_ROTATED_SECRET)),
            lapse: lapse_for(prep, JIRA_LIFETIME),
            unexpected: Box::new(move || u.server.unexpected()),
        }
    })
}

const ENTRA_TENANT: &str = "ctr-tenant.onmicrosoft.com";
const ENTRA_SECRET: &str = "ctr-entra-secret-4c1a9";
const ENTRA_BAD: &str = "ctr-entra-wrong-7b2e5";

fn entra_secret(authority: &str, secret: &str) -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::EntraClientCredentials(
            pb::EntraClientCredentials {
                tenant_id: ENTRA_TENANT.into(),
                client_id: "ctr-app".into(),
                client_secret: secret.into(),
                authority_url: authority.into(),
                ..Default::default()
            },
        )),
    }
}

fn azure_devops_entra(_: Prep) -> ArmFuture {
    Box::pin(async {
        let entra = crate::fake_entra::FakeEntra::start(ENTRA_TENANT).await;
        entra.add_app(
            "ctr-app",
            crate::fake_entra::AppAuth::Secret {
                value: ENTRA_SECRET.into(),
                expired: false,
            },
        );
        let fake = FakeAzureDevOps::start().await;
        fake.trust(&entra);
        fake.add_principal("ctr-app", "sp-1", "Sync SP", true);
        let target = Target::Candidate {
            kind: pb::SystemKind::AzureDevops,
            base_url: fake.base_url.clone(),
            good: entra_secret(&entra.authority, ENTRA_SECRET),
            bad: entra_secret(&entra.authority, ENTRA_BAD),
        };
        let (f, u, e) = (fake.clone(), fake, entra);
        candidate_arm(
            target,
            fixed(vec![ENTRA_SECRET.into(), ENTRA_BAD.into()]),
            Box::new(move |m| f.set_mode(m)),
            Box::new(move || {
                let mut v = u.server.unexpected();
                v.extend(e.server.unexpected());
                v
            }),
        )
        .await
    })
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn jwt_bearer(login_url: &str, key: &str) -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::SalesforceJwtBearer(
            pb::SalesforceJwtBearer {
                client_id: "ctr-jwt-app".into(),
                username: "integration@acme.example".into(),
                private_key_pem: fixture(key),
                login_url: login_url.into(),
            },
        )),
    }
}

fn salesforce_jwt(_: Prep) -> ArmFuture {
    Box::pin(async {
        let fake = FakeSalesforce::start(SF_CLIENT, SF_SECRET).await;
        fake.add_jwt_app(
            "ctr-jwt-app",
            crate::fake_entra::public_key(&fixture("salesforce-jwt.key")),
        );
        fake.preauthorize("integration@acme.example", true);
        let target = Target::Candidate {
            kind: pb::SystemKind::Salesforce,
            base_url: fake.base_url.clone(),
            good: jwt_bearer(&fake.base_url, "salesforce-jwt.key"),
            bad: jwt_bearer(&fake.base_url, "other.key"),
        };
        let (f, u) = (fake.clone(), fake);
        let fault: FaultFn = Box::new(move |m| match m {
            Mode::RateLimited => {
                f.set_userinfo(false);
                f.set_api_limit_exhausted(true);
            }
            Mode::Hang => f.set_login_delay(VENDOR_HANG),
            other => f.set_api_mode(other),
        });
        // The keys' PEM bodies: no part of a private key may appear anywhere.
        let key_lines = |name: &str| -> Vec<String> {
            fixture(name)
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .map(str::to_owned)
                .collect()
        };
        let mut secrets = key_lines("salesforce-jwt.key");
        secrets.extend(key_lines("other.key"));
        candidate_arm(
            target,
            fixed(secrets),
            fault,
            Box::new(move || u.server.unexpected()),
        )
        .await
    })
}

const ZD_SC_ID: &str = "ctr-zd-service";
const ZD_SC_SECRET: &str = "ctr-zd-cc-secret-2b7d1";
const ZD_SC_BAD: &str = "ctr-zd-cc-wrong-6a3e9";
const SA_ID: &str = "ctr-atl-sa";
const SA_SECRET: &str = "ctr-atl-sa-secret-1f4c2";
const SA_BAD: &str = "ctr-atl-sa-wrong-8d5b3";
const SA_ACCOUNT: &str = "712020:ctr-svc";
const SA_EMAIL: &str = "ctr-svc@serviceaccount.atlassian.com";
const SCOPED: &str = "ctr-scoped-token-3e8a1";
const SCOPED_BAD: &str = "ctr-scoped-wrong-0c7f4";
const SN_SC_ID: &str = "ctr-sn-cc";
const SN_SC_SECRET: &str = "ctr-sn-cc-secret-5a1d6";
const SN_SC_BAD: &str = "ctr-sn-cc-wrong-2e9b7";
const SN_KEY: &str = "ctr-sn-key-7c3f0";
const SN_KEY_BAD: &str = "ctr-sn-key-wrong-4b6a2";

fn zendesk_service(_: Prep) -> ArmFuture {
    Box::pin(async {
        let fake = zendesk().await;
        fake.add_user("ada", 9003, "Ada Admin", "ada@acme.example", "admin");
        fake.add_service_client(ZD_SC_ID, ZD_SC_SECRET, "ada");
        let target = Target::Candidate {
            kind: pb::SystemKind::Zendesk,
            base_url: fake.base_url.clone(),
            good: client_credentials(ZD_SC_ID, ZD_SC_SECRET),
            bad: client_credentials(ZD_SC_ID, ZD_SC_BAD),
        };
        let (f, u) = (fake.clone(), fake);
        candidate_arm(
            target,
            fixed(vec![ZD_SC_SECRET.into(), ZD_SC_BAD.into()]),
            Box::new(move |m| f.set_mode(m)),
            Box::new(move || u.server.unexpected()),
        )
        .await
    })
}

/// A fake Atlassian whose origin is also the site (tenant info names `cloud-acme`), with a
/// service account that has an OAuth 2.0 credential and a scoped API token.
async fn atlassian_service() -> FakeAtlassian {
    let fake = atlassian().await;
    fake.add_user("svc", SA_ACCOUNT, "Sync Service", SA_EMAIL);
    fake.add_service_client(SA_ID, SA_SECRET, "svc");
    fake.add_api_token(SCOPED, SA_EMAIL, "svc", true);
    fake.set_site_cloud_id(Some("cloud-acme"));
    fake
}

/// A candidate on a broker that knows the fake Atlassian's hosts.
async fn jira_candidate_arm(
    fake: FakeAtlassian,
    good: pb::Credential,
    bad: pb::Credential,
    secrets: Vec<String>,
) -> Arm {
    let (dir, broker, admin, deadline) =
        broker_with(|p: &std::path::Path| jira_config(p, &fake)).await;
    let target = Target::Candidate {
        kind: pb::SystemKind::JiraCloud,
        base_url: fake.origin.clone(),
        good,
        bad,
    };
    let (f, u) = (fake.clone(), fake);
    Arm {
        _dir: dir,
        broker,
        admin,
        deadline,
        target,
        secrets: fixed(secrets),
        fault: Box::new(move |m| f.set_mode(m)),
        spoil: Box::new(|| {}),
        lapse: Duration::ZERO,
        unexpected: Box::new(move || u.server.unexpected()),
    }
}

fn jira_service(_: Prep) -> ArmFuture {
    Box::pin(async {
        let fake = atlassian_service().await;
        jira_candidate_arm(
            fake,
            client_credentials(SA_ID, SA_SECRET),
            client_credentials(SA_ID, SA_BAD),
            vec![SA_SECRET.into(), SA_BAD.into()],
        )
        .await
    })
}

fn email_api_token(email: &str, token: &str) -> pb::Credential {
    pb::Credential {
        credential: Some(pb::credential::Credential::EmailApiToken(
            pb::EmailApiToken {
                email: email.into(),
                token: token.into(),
                expires_at: None,
                scoped: true,
            },
        )),
    }
}

fn jira_scoped_token(_: Prep) -> ArmFuture {
    Box::pin(async {
        let fake = atlassian_service().await;
        jira_candidate_arm(
            fake,
            email_api_token(SA_EMAIL, SCOPED),
            email_api_token(SA_EMAIL, SCOPED_BAD),
            vec![
                SCOPED.into(),
                SCOPED_BAD.into(),
                b64(&format!("{SA_EMAIL}:{SCOPED}")),
                b64(&format!("{SA_EMAIL}:{SCOPED_BAD}")),
            ],
        )
        .await
    })
}

async fn servicenow_user() -> FakeServiceNow {
    let fake = FakeServiceNow::start().await;
    fake.add_user(
        SN_USER,
        SN_PASSWORD,
        SN_SYS_ID,
        "Sync Proxy",
        "sync@acme.example",
    );
    fake
}

fn servicenow_service(_: Prep) -> ArmFuture {
    Box::pin(async {
        let fake = servicenow_user().await;
        fake.add_service_client(SN_SC_ID, SN_SC_SECRET, Some(SN_USER));
        fake.enable_client_credentials(true);
        let target = Target::Candidate {
            kind: pb::SystemKind::Servicenow,
            base_url: fake.base_url.clone(),
            good: client_credentials(SN_SC_ID, SN_SC_SECRET),
            bad: client_credentials(SN_SC_ID, SN_SC_BAD),
        };
        let (f, u) = (fake.clone(), fake);
        candidate_arm(
            target,
            fixed(vec![SN_SC_SECRET.into(), SN_SC_BAD.into()]),
            Box::new(move |m| f.set_mode(m)),
            Box::new(move || u.server.unexpected()),
        )
        .await
    })
}

fn servicenow_api_key(_: Prep) -> ArmFuture {
    Box::pin(async {
        let fake = servicenow_user().await;
        fake.add_api_key(SN_KEY, SN_USER, false, true);
        let target = Target::Candidate {
            kind: pb::SystemKind::Servicenow,
            base_url: fake.base_url.clone(),
            good: api_key(SN_KEY),
            bad: api_key(SN_KEY_BAD),
        };
        let (f, u) = (fake.clone(), fake);
        candidate_arm(
            target,
            fixed(vec![SN_KEY.into(), SN_KEY_BAD.into()]),
            Box::new(move |m| f.set_mode(m)),
            Box::new(move || u.server.unexpected()),
        )
        .await
    })
}

fn freshworks(product: Freshworks, kind: pb::SystemKind) -> ArmFuture {
    Box::pin(async move {
        let fake = FakeFreshworks::start(product).await;
        fake.add_key(FW_KEY, 42, "Ada Agent", "ada@acme.example");
        let target = Target::Candidate {
            kind,
            base_url: fake.base_url.clone(),
            good: api_key(FW_KEY),
            bad: api_key(FW_BAD),
        };
        // Basic auth as `key:X`.
        let secrets = fixed(vec![
            FW_KEY.into(),
            FW_BAD.into(),
            b64(&format!("{FW_KEY}:X")),
            b64(&format!("{FW_BAD}:X")),
        ]);
        let (f, u) = (fake.clone(), fake);
        candidate_arm(
            target,
            secrets,
            Box::new(move |m| f.set_mode(m)),
            Box::new(move || u.server.unexpected()),
        )
        .await
    })
}

fn freshdesk(_: Prep) -> ArmFuture {
    freshworks(Freshworks::Desk, pb::SystemKind::Freshdesk)
}

fn freshservice(_: Prep) -> ArmFuture {
    freshworks(Freshworks::Service, pb::SystemKind::Freshservice)
}

fn asana(_: Prep) -> ArmFuture {
    Box::pin(async {
        let fake = FakeAsana::start().await;
        fake.add_user(ASANA_PAT, "1201", "Proxy User", "proxy@example.com");
        let target = Target::Candidate {
            kind: pb::SystemKind::Asana,
            base_url: fake.base_url.clone(),
            good: pat(ASANA_PAT),
            bad: pat(ASANA_BAD),
        };
        let (f, u) = (fake.clone(), fake);
        candidate_arm(
            target,
            fixed(vec![ASANA_PAT.into(), ASANA_BAD.into()]),
            Box::new(move |m| f.set_mode(m)),
            Box::new(move || u.server.unexpected()),
        )
        .await
    })
}
