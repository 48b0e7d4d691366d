//! Fake upstream vendors on loopback. Each answers as `shared/upstreams.md` says the real system
//! does (traps included) and records every request it did not expect (wrong path, wrong header
//! format); tests assert that list is empty.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// A request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Req {
    /// HTTP method.
    pub method: Method,
    /// Path.
    pub path: String,
    /// Decoded query pairs.
    pub query: HashMap<String, String>,
    /// Headers.
    pub headers: HeaderMap,
}

impl Req {
    /// A header as text ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The decoded `Basic` credentials, `Err` when the header is present but malformed.
    pub fn basic(&self) -> Option<Result<(String, String), ()>> {
        let h = self.header("authorization");
        if h.is_empty() {
            return None;
        }
        let Some(b64) = h.strip_prefix("Basic ") else {
            return Some(Err(()));
        };
        let Ok(raw) = STANDARD.decode(b64) else {
            return Some(Err(()));
        };
        let Ok(text) = String::from_utf8(raw) else {
            return Some(Err(()));
        };
        Some(
            text.split_once(':')
                .map(|(u, p)| (u.to_owned(), p.to_owned()))
                .ok_or(()),
        )
    }
}

/// What the fake answers.
pub enum Reply {
    /// JSON with a status.
    Json(u16, Value),
    /// JSON with a status and extra headers.
    JsonWith(u16, Vec<(&'static str, String)>, Value),
    /// A raw body with a content type.
    Raw(u16, &'static str, String),
    /// Never answers.
    Hang,
    /// Not a request the real system would get from a correct client: recorded, answered 404.
    Unexpected(String),
}

type Handler = dyn Fn(&Req) -> Reply + Send + Sync;

/// A scripted HTTP server on 127.0.0.1:0.
#[derive(Clone)]
pub struct FakeUpstream {
    /// `http://127.0.0.1:PORT`.
    pub origin: String,
    log: Arc<Mutex<Vec<Req>>>,
    unexpected: Arc<Mutex<Vec<String>>>,
}

impl FakeUpstream {
    /// Starts a fake answering every request through `handler`.
    pub async fn start(handler: impl Fn(&Req) -> Reply + Send + Sync + 'static) -> Self {
        let handler: Arc<Handler> = Arc::new(handler);
        let log = Arc::new(Mutex::new(Vec::new()));
        let unexpected = Arc::new(Mutex::new(Vec::new()));
        let (l2, u2) = (log.clone(), unexpected.clone());
        let app = Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap| {
            let handler = handler.clone();
            let (log, unexpected) = (l2.clone(), u2.clone());
            async move {
                let query = uri
                    .query()
                    .map(|q| {
                        url::form_urlencoded::parse(q.as_bytes())
                            .into_owned()
                            .collect()
                    })
                    .unwrap_or_default();
                let req = Req {
                    method,
                    path: uri.path().to_owned(),
                    query,
                    headers,
                };
                log.lock().unwrap().push(req.clone());
                match handler(&req) {
                    Reply::Json(s, v) => {
                        (StatusCode::from_u16(s).unwrap(), axum::Json(v)).into_response()
                    }
                    Reply::JsonWith(s, hs, v) => {
                        let mut r =
                            (StatusCode::from_u16(s).unwrap(), axum::Json(v)).into_response();
                        for (k, val) in hs {
                            r.headers_mut().insert(k, val.parse().unwrap());
                        }
                        r
                    }
                    Reply::Raw(s, ct, body) => (
                        StatusCode::from_u16(s).unwrap(),
                        [("content-type", ct)],
                        body,
                    )
                        .into_response(),
                    Reply::Hang => {
                        std::future::pending::<()>().await;
                        unreachable!()
                    }
                    Reply::Unexpected(why) => {
                        unexpected
                            .lock()
                            .unwrap()
                            .push(format!("{} {}: {why}", req.method, req.path));
                        (StatusCode::NOT_FOUND, "unexpected request").into_response()
                    }
                }
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            origin: format!("http://{addr}"),
            log,
            unexpected,
        }
    }

    /// Requests whose path starts with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path.starts_with(prefix))
            .count()
    }

    /// Requests the fake did not expect.
    pub fn unexpected(&self) -> Vec<String> {
        self.unexpected.lock().unwrap().clone()
    }
}

/// Fault modes shared by the fakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Behave as the real system does.
    Normal,
    /// 429 with `Retry-After: 30`.
    RateLimited,
    /// 503.
    ServerError,
    /// 200 with an HTML page.
    Garbage,
    /// Never answer.
    Hang,
    /// Asana: 402 premium only.
    PaymentRequired,
    /// Azure DevOps: connectionData answers as to an anonymous caller.
    Anonymous,
    /// Azure DevOps: 203 with an HTML sign-in page.
    SignInPage,
}

fn fault(mode: Mode) -> Option<Reply> {
    match mode {
        Mode::RateLimited => Some(Reply::JsonWith(
            429,
            vec![("retry-after", "30".into())],
            json!({"error": "rate limited"}),
        )),
        Mode::ServerError => Some(Reply::Json(503, json!({"error": "unavailable"}))),
        Mode::Garbage => Some(Reply::Raw(
            200,
            "text/html",
            "<html><body>Sign in</body></html>".into(),
        )),
        Mode::Hang => Some(Reply::Hang),
        _ => None,
    }
}

// ------------------------------------------------------------------------------------------
// Asana
// ------------------------------------------------------------------------------------------

struct AsanaState {
    users: HashMap<String, Value>,
    mode: Mode,
}

/// A fake Asana API (`{base}/users/me`).
#[derive(Clone)]
pub struct FakeAsana {
    /// `http://127.0.0.1:PORT/api/1.0`.
    pub base_url: String,
    /// The server.
    pub server: FakeUpstream,
    state: Arc<Mutex<AsanaState>>,
}

impl FakeAsana {
    /// Starts the fake.
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(AsanaState {
            users: HashMap::new(),
            mode: Mode::Normal,
        }));
        let st = state.clone();
        let server = FakeUpstream::start(move |req| {
            if req.path != "/api/1.0/users/me" {
                return Reply::Unexpected("unknown path".into());
            }
            let auth = req.header("authorization");
            if !auth.starts_with("Bearer ") || req.header("accept") != "application/json" {
                return Reply::Unexpected("wants Authorization: Bearer and Accept: application/json".into());
            }
            let s = st.lock().unwrap();
            if s.mode == Mode::PaymentRequired {
                return Reply::Json(402, json!({"errors":[{"message":"This feature is only available to premium users."}]}));
            }
            if let Some(r) = fault(s.mode) {
                return r;
            }
            match s.users.get(&auth["Bearer ".len()..]) {
                Some(u) => Reply::Json(200, json!({"data": u})),
                None => Reply::Json(401, json!({"errors":[{"message":"Not Authorized"}]})),
            }
        })
        .await;
        Self {
            base_url: format!("{}/api/1.0", server.origin),
            server,
            state,
        }
    }

    /// Makes `pat` a valid token of user `gid`.
    pub fn add_user(&self, pat: &str, gid: &str, name: &str, email: &str) {
        self.state.lock().unwrap().users.insert(
            pat.to_owned(),
            json!({"gid": gid, "name": name, "email": email, "resource_type": "user", "workspaces": []}),
        );
    }

    /// Invalidates `pat`.
    pub fn revoke(&self, pat: &str) {
        self.state.lock().unwrap().users.remove(pat);
    }

    /// Switches the answer mode.
    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    /// `/users/me` requests so far.
    pub fn me_calls(&self) -> usize {
        self.server.count("/api/1.0/users/me")
    }

    /// Unexpected requests.
    pub fn unexpected(&self) -> Vec<String> {
        self.server.unexpected()
    }
}

// ------------------------------------------------------------------------------------------
// Azure DevOps
// ------------------------------------------------------------------------------------------

/// Every PAT scope the broker probes.
pub const ADO_ALL_SCOPES: &[&str] = &[
    "vso.project",
    "vso.work_write",
    "vso.identity",
    "vso.memberentitlementmanagement",
];

struct AdoUser {
    id: String,
    name: String,
    email: String,
    scopes: HashSet<&'static str>,
    pca: bool,
}

struct AdoState {
    pats: HashMap<String, AdoUser>,
    mode: Mode,
    throttle_on_200: bool,
}

/// A fake Azure DevOps organization at `{origin}/acme` (a stand-in URL, so every service is
/// under it as on Azure DevOps Server).
#[derive(Clone)]
pub struct FakeAzureDevOps {
    /// `http://127.0.0.1:PORT/acme`.
    pub base_url: String,
    /// The server.
    pub server: FakeUpstream,
    state: Arc<Mutex<AdoState>>,
}

const TF400813_ANON: &str =
    "TF400813: Resource not available for anonymous access. Client authentication required.";

fn ado_401(msg: &str) -> Reply {
    Reply::Json(
        401,
        json!({"$id":"1","innerException":null,"message":msg,
        "typeName":"Microsoft.TeamFoundation.Framework.Server.UnauthorizedRequestException, Microsoft.TeamFoundation.Framework.Server",
        "typeKey":"UnauthorizedRequestException","errorCode":0,"eventId":3000}),
    )
}

fn ado_identity(id: &str, name: Option<&str>, email: &str) -> Value {
    let mut v = json!({"id": id, "descriptor": format!("Microsoft.IdentityModel.Claims.ClaimsIdentity;{id}"),
        "subjectDescriptor": "aad.x", "isActive": true,
        "properties": {"Account": {"$type": "System.String", "$value": email}}});
    if let Some(n) = name {
        v["providerDisplayName"] = json!(n);
    }
    v
}

impl FakeAzureDevOps {
    /// Starts the fake.
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(AdoState {
            pats: HashMap::new(),
            mode: Mode::Normal,
            throttle_on_200: false,
        }));
        let st = state.clone();
        let server = FakeUpstream::start(move |req| {
            let Some(rest) = req.path.strip_prefix("/acme/_apis/") else {
                return Reply::Unexpected("not under the organization URL".into());
            };
            if req.header("accept") != "application/json" || req.header("x-tfs-fedauthredirect") != "Suppress" {
                return Reply::Unexpected("wants Accept: application/json and X-TFS-FedAuthRedirect: Suppress".into());
            }
            let s = st.lock().unwrap();
            if s.mode == Mode::SignInPage {
                return Reply::Raw(203, "text/html; charset=utf-8", "<html><title>Azure DevOps Services | Sign In</title></html>".into());
            }
            if let Some(r) = fault(s.mode) {
                return r;
            }
            let anonymous_connection = json!({"authenticatedUser": ado_identity("aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa", None, ""),
                "authorizedUser": ado_identity("aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa", None, ""),
                "instanceId": "6a1b", "deploymentType": "hosted"});
            if s.mode == Mode::Anonymous && rest == "connectionData" {
                return Reply::Json(200, anonymous_connection);
            }
            let user = match req.basic() {
                // No credentials: connectionData answers as to an anonymous caller.
                None if rest == "connectionData" => return Reply::Json(200, anonymous_connection),
                None => return ado_401(TF400813_ANON),
                Some(Err(())) => {
                    return Reply::Raw(203, "text/html; charset=utf-8", "<html><title>Sign In</title></html>".into())
                }
                Some(Ok((user, pat))) => {
                    if !user.is_empty() {
                        return Reply::Unexpected("the documented form is an empty user name".into());
                    }
                    match s.pats.get(&pat) {
                        Some(u) => u,
                        None => return ado_401(TF400813_ANON),
                    }
                }
            };
            let denied = || ado_401(&format!("TF400813: The user '{}' is not authorized to access this resource.", user.id));
            let needs_version = |r: Reply| if req.query.contains_key("api-version") { r } else { Reply::Unexpected("api-version missing".into()) };
            let reply = match rest {
                "connectionData" => Reply::Json(200, json!({
                    "authenticatedUser": ado_identity(&user.id, Some(&user.name), &user.email),
                    "authorizedUser": ado_identity(&user.id, Some(&user.name), &user.email),
                    "instanceId": "6a1b", "deploymentType": "hosted"})),
                "projects" => needs_version(if user.scopes.contains("vso.project") { Reply::Json(200, json!({"count":1,"value":[{"id":"p1","name":"Proj"}]})) } else { denied() }),
                "wit/fields" => needs_version(if user.scopes.contains("vso.work_write") { Reply::Json(200, json!({"count":1,"value":[{"referenceName":"System.Title"}]})) } else { denied() }),
                "identities" => needs_version(if user.scopes.contains("vso.identity") { Reply::Json(200, json!({"count":0,"value":[]})) } else { denied() }),
                "userentitlements" => needs_version(if user.scopes.contains("vso.memberentitlementmanagement") { Reply::Json(200, json!({"members":[]})) } else { denied() }),
                "permissions/11238e09-49f2-40c7-94d0-8f0307204ce4/15" => {
                    if req.query.get("alwaysAllowAdministrators").map(String::as_str) != Some("true") {
                        return Reply::Unexpected("alwaysAllowAdministrators=true missing".into());
                    }
                    Reply::Json(200, json!({"count":1,"value":[user.pca]}))
                }
                _ => Reply::Unexpected("unknown API".into()),
            };
            if s.throttle_on_200 {
                if let Reply::Json(200, v) = reply {
                    return Reply::JsonWith(200, vec![("retry-after", "7".into()), ("x-ratelimit-resource", "Core".into())], v);
                }
            }
            reply
        })
        .await;
        Self {
            base_url: format!("{}/acme", server.origin),
            server,
            state,
        }
    }

    /// Adds a PAT with the given scopes and collection-admin membership.
    pub fn add_pat(
        &self,
        pat: &str,
        id: &str,
        name: &str,
        email: &str,
        scopes: &[&'static str],
        pca: bool,
    ) {
        self.state.lock().unwrap().pats.insert(
            pat.to_owned(),
            AdoUser {
                id: id.into(),
                name: name.into(),
                email: email.into(),
                scopes: scopes.iter().copied().collect(),
                pca,
            },
        );
    }

    /// Switches the answer mode.
    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    /// Sends `Retry-After` on successful answers (Azure DevOps does before it blocks).
    pub fn set_throttle_on_200(&self, on: bool) {
        self.state.lock().unwrap().throttle_on_200 = on;
    }
}

// ------------------------------------------------------------------------------------------
// Freshdesk and Freshservice
// ------------------------------------------------------------------------------------------

struct FwAgent {
    id: u64,
    name: String,
    email: String,
    active: bool,
    api_key_permission: bool,
    tickets: bool,
}

struct FwState {
    keys: HashMap<String, FwAgent>,
    mode: Mode,
}

/// Which Freshworks product a fake plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshworks {
    /// Freshdesk: unwrapped `agents/me` with `contact`.
    Desk,
    /// Freshservice: `{"agent": {...}}`, and the role's API Key permission.
    Service,
}

/// A fake Freshdesk or Freshservice at `{origin}` (API under `/api/v2`).
#[derive(Clone)]
pub struct FakeFreshworks {
    /// `http://127.0.0.1:PORT` (what an admin registers).
    pub base_url: String,
    /// The server.
    pub server: FakeUpstream,
    state: Arc<Mutex<FwState>>,
}

impl FakeFreshworks {
    /// Starts the fake.
    pub async fn start(product: Freshworks) -> Self {
        let state = Arc::new(Mutex::new(FwState {
            keys: HashMap::new(),
            mode: Mode::Normal,
        }));
        let st = state.clone();
        let server = FakeUpstream::start(move |req| {
            let Some(rest) = req.path.strip_prefix("/api/v2/") else {
                return Reply::Unexpected("not under /api/v2".into());
            };
            let s = st.lock().unwrap();
            if let Some(r) = fault(s.mode) {
                return r;
            }
            let invalid = Reply::Json(401, json!({"code":"invalid_credentials","message":"You have to be logged in to perform this action."}));
            let agent = match req.basic() {
                Some(Ok((key, x))) => {
                    if x != "X" {
                        return Reply::Unexpected("the documented form is key:X".into());
                    }
                    match s.keys.get(&key) {
                        Some(a) => a,
                        None => return invalid,
                    }
                }
                Some(Err(())) => return Reply::Unexpected("malformed Basic header".into()),
                None => return invalid,
            };
            let access_denied = Reply::Json(403, json!({"code":"access_denied","message":"You are not authorized to perform this action."}));
            if product == Freshworks::Service && !agent.api_key_permission {
                return access_denied;
            }
            match rest {
                "agents/me" => Reply::Json(200, match product {
                    Freshworks::Desk => json!({"available": true, "occasional": false, "id": agent.id, "ticket_scope": 1,
                        "type": "support_agent", "contact": {"active": agent.active, "email": agent.email, "name": agent.name}}),
                    Freshworks::Service => {
                        let (first, last) = agent.name.split_once(' ').unwrap_or((&agent.name, ""));
                        json!({"agent": {"id": agent.id, "first_name": first, "last_name": last, "email": agent.email,
                            "active": agent.active, "occasional": false}})
                    }
                }),
                "tickets" if agent.tickets => Reply::Json(200, match product {
                    Freshworks::Desk => json!([]),
                    Freshworks::Service => json!({"tickets": []}),
                }),
                "tickets" => access_denied,
                _ => Reply::Unexpected("unknown API".into()),
            }
        })
        .await;
        Self {
            base_url: server.origin.clone(),
            server,
            state,
        }
    }

    /// Adds an agent's API key.
    pub fn add_key(&self, key: &str, id: u64, name: &str, email: &str) {
        self.state.lock().unwrap().keys.insert(
            key.to_owned(),
            FwAgent {
                id,
                name: name.into(),
                email: email.into(),
                active: true,
                api_key_permission: true,
                tickets: true,
            },
        );
    }

    /// Adjusts an agent: active, API Key role permission, ticket access.
    pub fn set_agent(&self, key: &str, active: bool, api_key_permission: bool, tickets: bool) {
        let mut s = self.state.lock().unwrap();
        let a = s.keys.get_mut(key).unwrap();
        a.active = active;
        a.api_key_permission = api_key_permission;
        a.tickets = tickets;
    }

    /// Switches the answer mode.
    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }
}

// ------------------------------------------------------------------------------------------
// ServiceNow
// ------------------------------------------------------------------------------------------

struct SnUser {
    password: String,
    sys_id: String,
    name: String,
    email: String,
    active: bool,
    roles: Vec<&'static str>,
    can_read_sys_user: bool,
    can_read_roles: bool,
    can_read_journal: bool,
}

struct SnState {
    users: HashMap<String, SnUser>,
    mode: Mode,
    basic_auth_restricted: bool,
}

/// Every role the broker asks for.
pub const SN_ALL_ROLES: &[&str] = &[
    "snc_platform_rest_api_access",
    "itil",
    "import_set_loader",
    "import_transformer",
    "import_scheduler",
];

/// A fake ServiceNow instance at `{origin}`.
#[derive(Clone)]
pub struct FakeServiceNow {
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    /// The server.
    pub server: FakeUpstream,
    state: Arc<Mutex<SnState>>,
}

impl FakeServiceNow {
    /// Starts the fake.
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(SnState {
            users: HashMap::new(),
            mode: Mode::Normal,
            basic_auth_restricted: false,
        }));
        let st = state.clone();
        let server = FakeUpstream::start(move |req| {
            let Some(table) = req.path.strip_prefix("/api/now/table/") else {
                return Reply::Unexpected("not a Table API path".into());
            };
            let s = st.lock().unwrap();
            if s.mode == Mode::Garbage {
                // A hibernating instance answers with an HTML page.
                return Reply::Raw(200, "text/html", "<html>Your instance is hibernating</html>".into());
            }
            if let Some(r) = fault(s.mode) {
                return r;
            }
            let unauth = Reply::Json(401, json!({"error":{"message":"User Not Authenticated","detail":"Required to provide Auth information"},"status":"failure"}));
            let (name, user) = match req.basic() {
                Some(Ok((name, pw))) => match s.users.get(&name) {
                    Some(u) if u.password == pw => (name, u),
                    _ => return unauth,
                },
                _ => return unauth,
            };
            if s.basic_auth_restricted {
                return Reply::Json(401, json!({"error":{"message":"Basic authentication is restricted for this user","detail":"Basic Auth Restriction"},"status":"failure"}));
            }
            let q = req.query.get("sysparm_query").cloned().unwrap_or_default();
            match table {
                "sys_user" => {
                    if q != format!("user_name={name}") {
                        return Reply::Unexpected(format!("unexpected sys_user query {q}"));
                    }
                    // ACLs filter rows: 200 with an empty result, not 403.
                    let result = if user.can_read_sys_user {
                        vec![json!({"sys_id": user.sys_id, "user_name": name, "name": user.name, "email": user.email,
                            "active": if user.active { "true" } else { "false" }})]
                    } else {
                        vec![]
                    };
                    Reply::Json(200, json!({"result": result}))
                }
                "sys_user_has_role" => {
                    if q != format!("user={}^state=active", user.sys_id) {
                        return Reply::Unexpected(format!("unexpected role query {q}"));
                    }
                    let result: Vec<Value> = if user.can_read_roles {
                        user.roles.iter().map(|r| json!({"role.name": r})).collect()
                    } else {
                        vec![]
                    };
                    Reply::Json(200, json!({"result": result}))
                }
                "sys_journal_field" => {
                    if user.can_read_journal {
                        Reply::Json(200, json!({"result": []}))
                    } else {
                        Reply::Json(403, json!({"error":{"message":"User Not Authorized","detail":"ACL restricts the record retrieval"},"status":"failure"}))
                    }
                }
                _ => Reply::Unexpected("unknown table".into()),
            }
        })
        .await;
        Self {
            base_url: server.origin.clone(),
            server,
            state,
        }
    }

    /// Adds a user with every permission a sync needs.
    pub fn add_user(&self, name: &str, password: &str, sys_id: &str, display: &str, email: &str) {
        self.state.lock().unwrap().users.insert(
            name.to_owned(),
            SnUser {
                password: password.into(),
                sys_id: sys_id.into(),
                name: display.into(),
                email: email.into(),
                active: true,
                roles: SN_ALL_ROLES.to_vec(),
                can_read_sys_user: true,
                can_read_roles: true,
                can_read_journal: true,
            },
        );
    }

    /// Changes a user's roles and ACLs.
    pub fn set_access(&self, name: &str, roles: &[&'static str], sys_user: bool, journal: bool) {
        let mut s = self.state.lock().unwrap();
        let u = s.users.get_mut(name).unwrap();
        u.roles = roles.to_vec();
        u.can_read_sys_user = sys_user;
        u.can_read_journal = journal;
    }

    /// Deactivates a user.
    pub fn deactivate(&self, name: &str) {
        self.state
            .lock()
            .unwrap()
            .users
            .get_mut(name)
            .unwrap()
            .active = false;
    }

    /// Turns on the Basic Auth Restriction for every account.
    pub fn restrict_basic_auth(&self, on: bool) {
        self.state.lock().unwrap().basic_auth_restricted = on;
    }

    /// Switches the answer mode.
    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }
}
