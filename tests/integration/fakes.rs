//! Fake upstream vendors on loopback. Each answers as the vendor's documentation (summarised in
//! `docs/systems/`) says the real system does (traps included) and records every request it did
//! not expect (wrong path, wrong header format); tests assert that list is empty.

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
    /// Body.
    pub body: Vec<u8>,
}

impl Req {
    /// The form-encoded body as pairs.
    pub fn form(&self) -> HashMap<String, String> {
        url::form_urlencoded::parse(&self.body)
            .into_owned()
            .collect()
    }

    /// The bearer token, if any.
    pub fn bearer(&self) -> Option<&str> {
        self.header("authorization").strip_prefix("Bearer ")
    }

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
    /// A body sent in chunks (no `Content-Length`) with a status and headers.
    Chunked(u16, Vec<(&'static str, String)>, Vec<u8>),
    /// Never answers.
    Hang,
    /// Answers after a delay.
    Delay(std::time::Duration, Box<Reply>),
    /// 302 to this location.
    Redirect(String),
    /// Not a request the real system would get from a correct client: recorded, answered 404.
    Unexpected(String),
}

type Handler = dyn Fn(&Req) -> Reply + Send + Sync;

/// Requests being answered now, and the most there ever were at once.
type Flight = Arc<(
    std::sync::atomic::AtomicUsize,
    std::sync::atomic::AtomicUsize,
)>;

/// Leaves the in-flight count when a request is answered (or dropped).
struct Done(Flight);

impl Drop for Done {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A scripted HTTP server on 127.0.0.1:0.
#[derive(Clone)]
pub struct FakeUpstream {
    /// `http://127.0.0.1:PORT`.
    pub origin: String,
    log: Arc<Mutex<Vec<Req>>>,
    unexpected: Arc<Mutex<Vec<String>>>,
    in_flight: Flight,
    /// The addresses requests came from.
    peers: Arc<Mutex<HashSet<std::net::IpAddr>>>,
}

impl FakeUpstream {
    /// Starts a fake answering every request through `handler`.
    pub async fn start(handler: impl Fn(&Req) -> Reply + Send + Sync + 'static) -> Self {
        let handler: Arc<Handler> = Arc::new(handler);
        let log = Arc::new(Mutex::new(Vec::new()));
        let unexpected = Arc::new(Mutex::new(Vec::new()));
        let (l2, u2) = (log.clone(), unexpected.clone());
        let in_flight: Flight = Arc::default();
        let peers: Arc<Mutex<HashSet<std::net::IpAddr>>> = Arc::default();
        let (f2, p2) = (in_flight.clone(), peers.clone());
        let app = Router::new().fallback(
            move |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<
                std::net::SocketAddr,
            >,
                  method: Method,
                  uri: Uri,
                  headers: HeaderMap,
                  body: axum::body::Bytes| {
                let handler = handler.clone();
                let (log, unexpected) = (l2.clone(), u2.clone());
                let flight = f2.clone();
                p2.lock().unwrap().insert(peer.ip());
                async move {
                    use std::sync::atomic::Ordering::SeqCst;
                    let now = flight.0.fetch_add(1, SeqCst) + 1;
                    flight.1.fetch_max(now, SeqCst);
                    let _done = Done(flight);
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
                        body: body.to_vec(),
                    };
                    log.lock().unwrap().push(req.clone());
                    let mut reply = handler(&req);
                    if let Reply::Delay(d, inner) = reply {
                        tokio::time::sleep(d).await;
                        reply = *inner;
                    }
                    respond(reply, &req, &unexpected).await
                }
            },
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            origin: format!("http://{addr}"),
            log,
            unexpected,
            in_flight,
            peers,
        }
    }

    /// The addresses requests came from.
    pub fn peers(&self) -> HashSet<std::net::IpAddr> {
        self.peers.lock().unwrap().clone()
    }

    /// The most requests this fake was answering at once.
    pub fn max_in_flight(&self) -> usize {
        self.in_flight.1.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Requests with `method` whose path starts with `prefix`.
    pub fn count_method(&self, method: &str, prefix: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.method == method && r.path.starts_with(prefix))
            .count()
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

async fn respond(
    reply: Reply,
    req: &Req,
    unexpected: &Mutex<Vec<String>>,
) -> axum::response::Response {
    match reply {
        Reply::Json(s, v) => (StatusCode::from_u16(s).unwrap(), axum::Json(v)).into_response(),
        Reply::JsonWith(s, hs, v) => {
            let mut r = (StatusCode::from_u16(s).unwrap(), axum::Json(v)).into_response();
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
        Reply::Chunked(s, hs, body) => {
            let parts: Vec<Result<axum::body::Bytes, std::io::Error>> = body
                .chunks(16)
                .map(|c| Ok(axum::body::Bytes::copy_from_slice(c)))
                .collect();
            let mut r = axum::response::Response::new(axum::body::Body::from_stream(
                tokio_stream::iter(parts),
            ));
            *r.status_mut() = StatusCode::from_u16(s).unwrap();
            for (k, val) in hs {
                r.headers_mut().insert(k, val.parse().unwrap());
            }
            r
        }
        Reply::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Reply::Delay(..) => (StatusCode::INTERNAL_SERVER_ERROR, "nested delay").into_response(),
        Reply::Redirect(to) => (StatusCode::FOUND, [("location", to)], "").into_response(),
        Reply::Unexpected(why) => {
            unexpected
                .lock()
                .unwrap()
                .push(format!("{} {}: {why}", req.method, req.path));
            (StatusCode::NOT_FOUND, "unexpected request").into_response()
        }
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
    /// A CDN or firewall in front of the vendor: 403 with an HTML challenge page.
    Challenge,
    /// 401 with JSON that is no OAuth error (ServiceNow's REST error shape).
    JsonRefusal,
    /// A gateway's JSON refusal with no `error` member (AWS API Gateway, a WAF).
    GatewayJson,
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
        Mode::GatewayJson => Some(Reply::Json(403, json!({"message": "Forbidden"}))),
        Mode::JsonRefusal => Some(Reply::Json(
            401,
            json!({"error": {"message": "User is not authenticated", "detail": "Required to provide Auth information"}, "status": "failure"}),
        )),
        Mode::Challenge => Some(Reply::Raw(
            403,
            "text/html",
            "<html><title>Just a moment...</title>Checking your browser</html>".into(),
        )),
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
            let accept = req.header("accept");
            let json_ok = accept.is_empty() || accept.contains("json") || accept.contains("*/*");
            if !auth.starts_with("Bearer ") || !json_ok {
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
    /// Service principals by Entra client id, and whether they were added to the organization.
    principals: HashMap<String, (AdoUser, bool)>,
    /// Bearer tokens Entra issued: token → client id (shared with a `FakeEntra`).
    entra_tokens: Arc<Mutex<HashMap<String, String>>>,
    mode: Mode,
    throttle_on_200: bool,
    hang_probes: bool,
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
            principals: HashMap::new(),
            entra_tokens: Arc::new(Mutex::new(HashMap::new())),
            mode: Mode::Normal,
            throttle_on_200: false,
            hang_probes: false,
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
            // upstreams.md §1.2: without these two, connectionData answers as to an anonymous
            // caller, whatever the credential.
            if rest == "connectionData"
                && (req.header("accept-encoding").is_empty() || req.header("cache-control").is_empty())
            {
                return Reply::Json(200, anonymous_connection);
            }
            let principal = req.bearer().map(|t| s.entra_tokens.lock().unwrap().get(t).cloned());
            let user = match (principal, req.basic()) {
                (Some(Some(client)), _) => match s.principals.get(&client) {
                    Some((u, true)) => u,
                    Some((u, false)) => {
                        return ado_401(&format!("TF401444: Sign-in at least once as tenant\\tenant\\{} in a web browser to enable access to the service.", u.id))
                    }
                    None => return ado_401(&format!("TF400813: The user '{client}' is not authorized to access this resource.")),
                },
                // An expired or unknown bearer token.
                (Some(None), _) => return ado_401(TF400813_ANON),
                (None, basic) => match basic {
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
                },
            };
            if s.hang_probes && rest != "connectionData" {
                return Reply::Hang;
            }
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

    /// Accepts the bearer tokens `entra` issues (the organization's connected tenant).
    pub fn trust(&self, entra: &crate::fake_entra::FakeEntra) {
        self.state.lock().unwrap().entra_tokens = entra.tokens();
    }

    /// A service principal (by its Entra client id) with every permission a sync needs;
    /// `added` = it was added to the organization.
    pub fn add_principal(&self, client_id: &str, id: &str, name: &str, added: bool) {
        self.state.lock().unwrap().principals.insert(
            client_id.to_owned(),
            (
                AdoUser {
                    id: id.into(),
                    name: name.into(),
                    email: String::new(),
                    scopes: ADO_ALL_SCOPES.iter().copied().collect(),
                    pca: true,
                },
                added,
            ),
        );
    }

    /// connectionData answers, every permission probe hangs.
    pub fn set_hang_probes(&self, on: bool) {
        self.state.lock().unwrap().hang_probes = on;
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
    oauth: OAuthServer,
    /// `glide.oauth.inbound.client.credential.grant_type.enabled` (off by default).
    cc_enabled: bool,
    /// Client id → the OAuth Application User set on its OAuth entity.
    app_users: HashMap<String, Option<String>>,
    /// Inbound REST API keys: key → (user, expired, an access policy applies its profile).
    api_keys: HashMap<String, (String, bool, bool)>,
}

/// A token endpoint's state: clients, live access and refresh tokens, rotation and reuse
/// detection (a rotated-out refresh token presented again revokes its whole family, as RFC 9700
/// allows).
pub struct OAuthServer {
    clients: HashMap<String, String>,
    codes: HashMap<String, CodeGrant>,
    access: HashMap<String, (String, std::time::Instant)>,
    refresh: HashMap<String, (String, u64, bool)>,
    /// Seconds an access token lives.
    pub access_lifetime: u64,
    /// Issue a new refresh token on every refresh.
    pub rotate: bool,
    /// Faults on the token endpoint only.
    pub token_mode: Mode,
    /// Delay before every token answer.
    pub token_delay: std::time::Duration,
    reuse_detected: usize,
    token_calls: usize,
    seq: u64,
    newest_refresh: HashMap<String, String>,
    /// Atlassian-style leeway: the refresh token rotated out last may be presented once more
    /// (a client that crashed before saving the new one), counted in `leeway_reuses`.
    pub leeway: bool,
    leeway_reuses: usize,
    rotated_out_last: HashMap<String, String>,
    call_times: Vec<std::time::Instant>,
    /// Lifetimes written as strings, as Entra's v1 token endpoint answers (`"expires_in":
    /// "3599"`, MicrosoftDocs/azure-docs#54997).
    pub numbers_as_strings: bool,
    /// Appended to every access token minted (a hostile or broken vendor's CR/LF).
    pub access_token_tail: &'static str,
    /// The status of a successful token answer (200; a gateway may turn it into 201 or 203).
    pub success_status: u16,
}

impl OAuthServer {
    fn new() -> Self {
        Self {
            clients: HashMap::new(),
            codes: HashMap::new(),
            access: HashMap::new(),
            refresh: HashMap::new(),
            access_lifetime: 1800,
            rotate: false,
            token_mode: Mode::Normal,
            token_delay: std::time::Duration::ZERO,
            reuse_detected: 0,
            leeway: false,
            leeway_reuses: 0,
            rotated_out_last: HashMap::new(),
            call_times: Vec::new(),
            numbers_as_strings: false,
            access_token_tail: "",
            success_status: 200,
            token_calls: 0,
            seq: 0,
            newest_refresh: HashMap::new(),
        }
    }

    fn mint_access(&mut self, user: &str) -> String {
        self.seq += 1;
        let t = format!(
            "at-{}-{}{}",
            self.seq,
            rand_suffix(),
            self.access_token_tail
        );
        let until =
            std::time::Instant::now() + std::time::Duration::from_secs(self.access_lifetime);
        self.access.insert(t.clone(), (user.to_owned(), until));
        t
    }

    fn mint_refresh(&mut self, user: &str, family: u64) -> String {
        self.seq += 1;
        let t = format!("rt-{}-{}", self.seq, rand_suffix());
        self.refresh
            .insert(t.clone(), (user.to_owned(), family, true));
        self.newest_refresh.insert(user.to_owned(), t.clone());
        t
    }

    /// The user an unexpired access token belongs to.
    fn user_of(&self, token: &str) -> Option<String> {
        self.access
            .get(token)
            .filter(|(_, until)| *until > std::time::Instant::now())
            .map(|(u, _)| u.clone())
    }

    /// Issues an authorization code (the user clicked Allow).
    fn issue_code(
        &mut self,
        user: &str,
        client_id: &str,
        redirect_uri: &str,
        challenge: Option<String>,
        scopes: &str,
    ) -> String {
        self.seq += 1;
        let code = format!("code-{}-{}", self.seq, rand_suffix());
        self.codes.insert(
            code.clone(),
            CodeGrant {
                user: user.into(),
                client_id: client_id.into(),
                redirect_uri: redirect_uri.into(),
                challenge,
                scopes: scopes.into(),
            },
        );
        code
    }

    /// Exchanges a code: single use, bound to the client, the redirect URI and (PKCE) the verifier.
    fn exchange_code(
        &mut self,
        f: &HashMap<String, String>,
    ) -> Result<(String, String, String, String), Reply> {
        let invalid = Reply::Json(
            400,
            json!({"error": "invalid_grant", "error_description": "The authorization code is invalid or expired."}),
        );
        let code = f.get("code").cloned().unwrap_or_default();
        let Some(g) = self.codes.remove(&code) else {
            return Err(invalid);
        };
        if f.get("client_id") != Some(&g.client_id)
            || f.get("redirect_uri") != Some(&g.redirect_uri)
        {
            return Err(invalid);
        }
        if let Some(challenge) = &g.challenge {
            use sha2::Digest;
            let verifier = f.get("code_verifier").cloned().unwrap_or_default();
            let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(sha2::Sha256::digest(verifier.as_bytes()));
            if &computed != challenge {
                return Err(invalid);
            }
        }
        self.seq += 1;
        let family = self.seq;
        let access = self.mint_access(&g.user);
        let refresh = self.mint_refresh(&g.user, family);
        Ok((g.user, access, refresh, g.scopes))
    }

    fn client_ok(&self, f: &HashMap<String, String>) -> bool {
        matches!((f.get("client_id"), f.get("client_secret")), (Some(id), Some(secret)) if self.clients.get(id) == Some(secret))
    }

    /// Revokes every token (as when consent is withdrawn).
    pub fn revoke_all(&mut self) {
        self.access.clear();
        for v in self.refresh.values_mut() {
            v.2 = false;
        }
    }

    /// Handles a refresh grant: rotation, reuse detection.
    fn refresh_grant(&mut self, rt: &str) -> Result<(String, Option<String>), Reply> {
        let invalid = Reply::Json(
            400,
            json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
        );
        let Some((user, family, active)) = self.refresh.get(rt).cloned() else {
            return Err(invalid);
        };
        let in_leeway =
            self.leeway && self.rotated_out_last.get(&user).map(String::as_str) == Some(rt);
        if !active && in_leeway {
            self.leeway_reuses += 1;
            self.rotated_out_last.remove(&user);
            let access = self.mint_access(&user);
            // The token issued after it (never saved by the client) is superseded.
            if let Some(newest) = self.newest_refresh.get(&user).cloned() {
                if let Some(v) = self.refresh.get_mut(&newest) {
                    v.2 = false;
                }
            }
            let new = self.mint_refresh(&user, family);
            return Ok((access, Some(new)));
        }
        if !active {
            // Reuse of a rotated-out token: revoke the whole family.
            self.reuse_detected += 1;
            for v in self.refresh.values_mut() {
                if v.1 == family {
                    v.2 = false;
                }
            }
            return Err(invalid);
        }
        let access = self.mint_access(&user);
        if self.rotate {
            if let Some(v) = self.refresh.get_mut(rt) {
                v.2 = false;
            }
            self.rotated_out_last.insert(user.clone(), rt.to_owned());
            let new = self.mint_refresh(&user, family);
            Ok((access, Some(new)))
        } else {
            Ok((access, Some(rt.to_owned())))
        }
    }
}

struct CodeGrant {
    user: String,
    client_id: String,
    redirect_uri: String,
    challenge: Option<String>,
    scopes: String,
}

/// A JSON token request's fields as strings.
fn json_form(req: &Req) -> Option<HashMap<String, String>> {
    if !req.header("content-type").starts_with("application/json") {
        return None;
    }
    let v: Value = serde_json::from_slice(&req.body).ok()?;
    Some(
        v.as_object()?
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string()),
                )
            })
            .collect(),
    )
}

/// What the person at the consent page does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consent {
    /// Signs in as this user and clicks Allow.
    Allow(String),
    /// Clicks Deny.
    Deny,
}

/// Zendesk's consent page: the same request again with `approved=1` behind an "Allow" button.
fn consent_page(q: &HashMap<String, String>) -> Reply {
    let mut again = url::Url::parse("http://x/oauth/authorizations/new").unwrap();
    for (k, v) in q {
        again.query_pairs_mut().append_pair(k, v);
    }
    again.query_pairs_mut().append_pair("approved", "1");
    let href =
        format!("{}?{}", again.path(), again.query().unwrap_or_default()).replace('&', "&amp;");
    Reply::Raw(
        200,
        "text/html; charset=utf-8",
        format!("<!doctype html><title>Allow access</title><h1>credbroker wants to access your account</h1><a id=\"allow\" href=\"{href}\">Allow</a>"),
    )
}

/// A 302 back to the client's redirect URI.
fn redirect_back(redirect_uri: &str, params: &[(&str, &str)]) -> Reply {
    let mut url = url::Url::parse(redirect_uri).unwrap();
    for (k, v) in params {
        url.query_pairs_mut().append_pair(k, v);
    }
    Reply::Redirect(url.to_string())
}

fn rand_suffix() -> String {
    use rand::Rng;
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

fn token_fault(o: &OAuthServer) -> Option<Reply> {
    let r = match o.token_mode {
        Mode::ServerError => {
            Reply::Raw(503, "text/html", "<html>Service Unavailable</html>".into())
        }
        m => fault(m)?,
    };
    Some(if o.token_delay.is_zero() {
        r
    } else {
        Reply::Delay(o.token_delay, Box::new(r))
    })
}

fn delayed(o: &OAuthServer, r: Reply) -> Reply {
    let r = match r {
        Reply::Json(200, mut body) if o.numbers_as_strings => {
            for key in ["expires_in", "refresh_token_expires_in"] {
                if let Some(v) = body.get_mut(key).filter(|v| v.is_number()) {
                    *v = Value::String(v.to_string());
                }
            }
            Reply::Json(200, body)
        }
        r => r,
    };
    let r = match r {
        Reply::Json(200, body) => Reply::Json(o.success_status, body),
        r => r,
    };
    if o.token_delay.is_zero() {
        r
    } else {
        Reply::Delay(o.token_delay, Box::new(r))
    }
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
            oauth: OAuthServer::new(),
            cc_enabled: false,
            app_users: HashMap::new(),
            api_keys: HashMap::new(),
        }));
        let st = state.clone();
        let server = FakeUpstream::start(move |req| {
            if req.path == "/oauth_token.do" {
                return sn_token(&mut st.lock().unwrap(), req);
            }
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
            let api_key = req.header("x-sn-apikey");
            let auth = req.header("authorization");
            if !auth.is_empty() && !auth.starts_with("Basic ") && !auth.starts_with("Bearer ") {
                return Reply::Unexpected("an Authorization header that is neither Basic nor Bearer".into());
            }
            if !api_key.is_empty() && !auth.is_empty() {
                // Which of the two ServiceNow would honour is not documented: a correct client
                // never sends both.
                return Reply::Unexpected("both x-sn-apikey and Authorization".into());
            }
            let (name, user) = if !api_key.is_empty() {
                match s.api_keys.get(api_key) {
                    Some((n, false, true)) => match s.users.get(n) {
                        Some(u) => (n.clone(), u),
                        None => return unauth,
                    },
                    _ => return unauth,
                }
            } else if let Some(token) = req.bearer() {
                match s.oauth.user_of(token).and_then(|n| s.users.get(&n).map(|u| (n, u))) {
                    Some(x) => x,
                    None => return unauth,
                }
            } else {
                match req.basic() {
                    Some(Ok((name, pw))) => match s.users.get(&name) {
                        Some(u) if u.password == pw => (name, u),
                        _ => return unauth,
                    },
                    _ => return unauth,
                }
            };
            if s.basic_auth_restricted {
                return Reply::Json(401, json!({"error":{"message":"Basic authentication is restricted for this user","detail":"Basic Auth Restriction"},"status":"failure"}));
            }
            let q = req.query.get("sysparm_query").cloned().unwrap_or_default();
            match table {
                "sys_user" => {
                    if q != format!("user_name={name}") && q != "sys_id=javascript:gs.getUserID()" {
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

    /// Switches the inbound client-credentials grant (the system property) on or off.
    pub fn enable_client_credentials(&self, on: bool) {
        self.state.lock().unwrap().cc_enabled = on;
    }

    /// An OAuth entity for the client-credentials grant, with its OAuth Application User.
    pub fn add_service_client(&self, id: &str, secret: &str, app_user: Option<&str>) {
        self.add_client(id, secret);
        self.state
            .lock()
            .unwrap()
            .app_users
            .insert(id.into(), app_user.map(str::to_owned));
    }

    /// An inbound REST API key for `user`: expired or not, and whether an API Access Policy
    /// applies its authentication profile to the Table API.
    pub fn add_api_key(&self, key: &str, user: &str, expired: bool, policy: bool) {
        self.state
            .lock()
            .unwrap()
            .api_keys
            .insert(key.into(), (user.into(), expired, policy));
    }

    /// Registers an OAuth client (Application Registry entry).
    pub fn add_client(&self, id: &str, secret: &str) {
        self.state
            .lock()
            .unwrap()
            .oauth
            .clients
            .insert(id.into(), secret.into());
    }

    /// Changes the token endpoint's behaviour.
    pub fn oauth(&self, f: impl FnOnce(&mut OAuthServer)) {
        f(&mut self.state.lock().unwrap().oauth);
    }

    /// Issues a refresh token for `user` as a manual password grant would.
    pub fn issue_refresh_token(&self, user: &str) -> String {
        let mut s = self.state.lock().unwrap();
        s.oauth.seq += 1;
        let family = s.oauth.seq;
        s.oauth.mint_refresh(user, family)
    }

    /// Token endpoint calls so far.
    pub fn token_calls(&self) -> usize {
        self.state.lock().unwrap().oauth.token_calls
    }

    /// How often a rotated-out refresh token was presented again.
    pub fn reuse_detected(&self) -> usize {
        self.state.lock().unwrap().oauth.reuse_detected
    }

    /// When each token-endpoint call arrived.
    pub fn token_call_times(&self) -> Vec<std::time::Instant> {
        self.state.lock().unwrap().oauth.call_times.clone()
    }

    /// How often the leeway admitted the last rotated-out refresh token.
    pub fn leeway_reuses(&self) -> usize {
        self.state.lock().unwrap().oauth.leeway_reuses
    }

    /// The newest refresh token issued for `user`.
    pub fn newest_refresh_token(&self, user: &str) -> Option<String> {
        self.state
            .lock()
            .unwrap()
            .oauth
            .newest_refresh
            .get(user)
            .cloned()
    }

    /// Revokes every token (consent withdrawn).
    pub fn revoke_all(&self) {
        self.state.lock().unwrap().oauth.revoke_all();
    }
}

fn sn_token(s: &mut SnState, req: &Req) -> Reply {
    if req.method != Method::POST
        || !req
            .header("content-type")
            .starts_with("application/x-www-form-urlencoded")
    {
        return Reply::Unexpected(
            "ServiceNow's token endpoint takes form-encoded POSTs only".into(),
        );
    }
    s.oauth.token_calls += 1;
    s.oauth.call_times.push(std::time::Instant::now());
    if let Some(r) = token_fault(&s.oauth) {
        return r;
    }
    let form = req.form();
    let bad_auth = Reply::Json(
        401,
        json!({"error": "server_error", "error_description": "access_denied"}),
    );
    let client_ok = matches!((form.get("client_id"), form.get("client_secret")),
        (Some(id), Some(secret)) if s.oauth.clients.get(id) == Some(secret));
    if !client_ok {
        return delayed(&s.oauth, bad_auth);
    }
    let lifetime = s.oauth.access_lifetime;
    let reply = match form.get("grant_type").map(String::as_str) {
        Some("password") => {
            let user = form.get("username").cloned().unwrap_or_default();
            match s.users.get(&user) {
                Some(u) if Some(&u.password) == form.get("password") && u.active => {
                    s.oauth.seq += 1;
                    let family = s.oauth.seq;
                    let access = s.oauth.mint_access(&user);
                    let refresh = s.oauth.mint_refresh(&user, family);
                    Reply::Json(
                        200,
                        json!({"access_token": access, "refresh_token": refresh, "scope": "useraccount", "token_type": "Bearer", "expires_in": lifetime}),
                    )
                }
                _ => bad_auth,
            }
        }
        Some("refresh_token") => match s
            .oauth
            .refresh_grant(form.get("refresh_token").map(String::as_str).unwrap_or(""))
        {
            Ok((access, refresh)) => Reply::Json(
                200,
                json!({"access_token": access, "refresh_token": refresh, "scope": "useraccount", "token_type": "Bearer", "expires_in": lifetime}),
            ),
            Err(r) => r,
        },
        Some("client_credentials") => {
            let id = form.get("client_id").cloned().unwrap_or_default();
            match (s.cc_enabled, s.app_users.get(&id).cloned().flatten()) {
                // The grant switched off answers as a wrong secret does.
                (false, _) => bad_auth,
                (true, None) => Reply::Json(
                    401,
                    json!({"error": "unauthorized_client", "error_description": "integration user is not configured"}),
                ),
                (true, Some(user)) => {
                    let access = s.oauth.mint_access(&user);
                    Reply::Json(
                        200,
                        json!({"access_token": access, "scope": "useraccount", "token_type": "Bearer", "expires_in": lifetime}),
                    )
                }
            }
        }
        _ => return Reply::Unexpected("unknown grant_type".into()),
    };
    delayed(&s.oauth, reply)
}

// ------------------------------------------------------------------------------------------
// Salesforce
// ------------------------------------------------------------------------------------------

struct SfState {
    client: (String, String),
    users: HashMap<String, (String, String)>,
    sessions: HashMap<String, std::time::Instant>,
    lifetime: u64,
    introspection: bool,
    userinfo: bool,
    token_calls: usize,
    token_mode: Mode,
    seq: u64,
    login_delay: std::time::Duration,
    /// The org's 24-hour API allocation is used up (REST answers 403 REQUEST_LIMIT_EXCEEDED).
    api_limit_exhausted: bool,
    /// The org's API allocation as (used, limit): sObject calls count against it and report it
    /// in `Sforce-Limit-Info`; past it they get 403 REQUEST_LIMIT_EXCEEDED.
    api_usage: Option<(i64, i64)>,
    /// How long an sObject call takes.
    api_delay: std::time::Duration,
    /// Faults of the APIs (UserInfo, introspection, REST; not of the logins).
    api_mode: Mode,
    /// JWT bearer: consumer key → the uploaded certificate's RSA public key (PKCS#1 DER).
    jwt_apps: HashMap<String, Vec<u8>>,
    /// JWT bearer: users pre-authorized for the app.
    preauthorized: HashSet<String>,
    /// "Connect with Salesforce": codes, rotating refresh tokens, reuse detection.
    oauth: OAuthServer,
    /// Who signs in at the consent page.
    consent: Consent,
}

/// A fake Salesforce org: My Domain token endpoint (client credentials, password flow),
/// introspection, UserInfo, REST, and SOAP `login()`. Its instance URL is its own origin.
#[derive(Clone)]
pub struct FakeSalesforce {
    /// `http://127.0.0.1:PORT` (stands in for https://acme.my.salesforce.com).
    pub base_url: String,
    /// The server.
    pub server: FakeUpstream,
    state: Arc<Mutex<SfState>>,
}

const SF_USER_ID: &str = "005000000000001AAA";
/// The REST resource the quota tests call (GET reads, POST creates).
pub const SF_SOBJECTS: &str = "/services/data/v62.0/sobjects";
const SF_ORG_ID: &str = "00D000000000001EAA";

impl FakeSalesforce {
    /// Starts the fake with one External Client App (`client_id`, `client_secret`).
    pub async fn start(client_id: &str, client_secret: &str) -> Self {
        let state = Arc::new(Mutex::new(SfState {
            client: (client_id.into(), client_secret.into()),
            users: HashMap::new(),
            sessions: HashMap::new(),
            lifetime: 7200,
            introspection: true,
            userinfo: true,
            token_calls: 0,
            token_mode: Mode::Normal,
            seq: 0,
            login_delay: std::time::Duration::ZERO,
            api_limit_exhausted: false,
            api_usage: None,
            api_delay: std::time::Duration::ZERO,
            api_mode: Mode::Normal,
            jwt_apps: HashMap::new(),
            preauthorized: HashSet::new(),
            oauth: {
                let mut o = OAuthServer::new();
                o.clients.insert(client_id.into(), client_secret.into());
                o
            },
            consent: Consent::Allow("integration".into()),
        }));
        let st = state.clone();
        let origin_cell: Arc<Mutex<String>> = Arc::new(Mutex::new(String::new()));
        let oc = origin_cell.clone();
        let server = FakeUpstream::start(move |req| {
            let mut s = st.lock().unwrap();
            let origin = oc.lock().unwrap().clone();
            let reply = sf_handle(&mut s, req, &origin);
            if req.path.starts_with(SF_SOBJECTS) && !s.api_delay.is_zero() {
                return Reply::Delay(s.api_delay, Box::new(reply));
            }
            // A login is made (the session exists) on receipt; the answer comes late.
            let login = matches!(
                req.path.as_str(),
                "/services/oauth2/token" | "/services/Soap/u/64.0"
            );
            if login && !s.login_delay.is_zero() {
                return Reply::Delay(s.login_delay, Box::new(reply));
            }
            reply
        })
        .await;
        *origin_cell.lock().unwrap() = server.origin.clone();
        Self {
            base_url: server.origin.clone(),
            server,
            state,
        }
    }

    /// A user for the legacy flows: password and security token.
    pub fn add_user(&self, username: &str, password: &str, security_token: &str) {
        self.state
            .lock()
            .unwrap()
            .users
            .insert(username.into(), (password.into(), security_token.into()));
    }

    /// The org's API allocation: `used` of `limit` calls.
    pub fn set_api_usage(&self, used: i64, limit: i64) {
        self.state.lock().unwrap().api_usage = Some((used, limit));
    }

    /// The org's API calls used so far.
    pub fn api_used(&self) -> Option<i64> {
        self.state.lock().unwrap().api_usage.map(|(u, _)| u)
    }

    /// How long each sObject call takes.
    pub fn set_api_delay(&self, d: std::time::Duration) {
        self.state.lock().unwrap().api_delay = d;
    }

    /// Session lifetime in seconds (what introspection reports as `exp`).
    pub fn set_lifetime(&self, secs: u64) {
        self.state.lock().unwrap().lifetime = secs;
    }

    /// Whether the app may introspect its tokens.
    pub fn set_introspection(&self, on: bool) {
        self.state.lock().unwrap().introspection = on;
    }

    /// Whether the app has identity scopes (UserInfo answers).
    pub fn set_userinfo(&self, on: bool) {
        self.state.lock().unwrap().userinfo = on;
    }

    /// Ends every session (as an admin's "revoke" or a session timeout does).
    pub fn revoke_sessions(&self) {
        self.state.lock().unwrap().sessions.clear();
    }

    /// Faults of the APIs (UserInfo, introspection, REST); logins answer normally.
    pub fn set_api_mode(&self, mode: Mode) {
        self.state.lock().unwrap().api_mode = mode;
    }

    /// Uses up (or restores) the org's 24-hour API allocation.
    pub fn set_api_limit_exhausted(&self, on: bool) {
        self.state.lock().unwrap().api_limit_exhausted = on;
    }

    /// How long logins (OAuth token and SOAP) take to answer.
    pub fn set_login_delay(&self, delay: std::time::Duration) {
        self.state.lock().unwrap().login_delay = delay;
    }

    /// JWT bearer: the External Client App `consumer_key` with this certificate key uploaded.
    pub fn add_jwt_app(&self, consumer_key: &str, public_key: Vec<u8>) {
        self.state
            .lock()
            .unwrap()
            .jwt_apps
            .insert(consumer_key.into(), public_key);
    }

    /// JWT bearer: pre-authorizes `username` for the apps (Permitted Users = admin approved).
    pub fn preauthorize(&self, username: &str, on: bool) {
        let mut s = self.state.lock().unwrap();
        if on {
            s.preauthorized.insert(username.into());
        } else {
            s.preauthorized.remove(username);
        }
    }

    /// "Connect with Salesforce": the refresh-token endpoint's behaviour (rotation, leeway).
    pub fn oauth(&self, f: impl FnOnce(&mut OAuthServer)) {
        f(&mut self.state.lock().unwrap().oauth);
    }

    /// Reuses of rotated-out refresh tokens (each revokes the grant).
    pub fn reuse_detected(&self) -> usize {
        self.state.lock().unwrap().oauth.reuse_detected
    }

    /// The newest refresh token of the consenting user.
    pub fn newest_refresh_token(&self) -> Option<String> {
        self.state
            .lock()
            .unwrap()
            .oauth
            .newest_refresh
            .get("integration")
            .cloned()
    }

    /// What the person at the consent page does.
    pub fn set_consent(&self, c: Consent) {
        self.state.lock().unwrap().consent = c;
    }

    /// Token requests (OAuth and SOAP) so far.
    pub fn token_calls(&self) -> usize {
        self.state.lock().unwrap().token_calls
    }

    /// Calls a Salesforce REST URL with the given headers, as a worker would.
    pub async fn call_api(&self, api_base: &str, headers: &[(String, String)]) -> u16 {
        let client = reqwest::Client::new();
        let mut req = client.get(format!("{api_base}/services/data/v62.0/"));
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.send().await.unwrap().status().as_u16()
    }
}

fn sf_token_answer(s: &mut SfState, origin: &str, refresh: Option<String>) -> Reply {
    let (token, _) = sf_session(s);
    let mut v = json!({"access_token": token, "signature": "c2ln", "scope": "api refresh_token",
        "instance_url": origin, "id": format!("https://login.salesforce.com/id/{SF_ORG_ID}/{SF_USER_ID}"),
        "token_type": "Bearer", "issued_at": "1700000000000"});
    if let Some(r) = refresh {
        v["refresh_token"] = json!(r);
    }
    Reply::Json(200, v)
}

/// The JWT bearer flow: RS256 signed by a key whose certificate is on the app, `aud` this host,
/// `exp` at most 3 minutes ahead, the user pre-authorized. No refresh token, no `expires_in`.
fn sf_jwt_bearer(s: &mut SfState, f: &HashMap<String, String>, origin: &str) -> Reply {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let refuse = |error: &str, description: &str| {
        Reply::Json(
            400,
            json!({"error": error, "error_description": description}),
        )
    };
    let jwt = f.get("assertion").cloned().unwrap_or_default();
    let parts: Vec<&str> = jwt.split('.').collect();
    if parts.len() != 3 {
        return refuse("invalid_grant", "invalid assertion");
    }
    let decode = |p: &str| -> Option<Value> {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).ok()?).ok()
    };
    let (Some(header), Some(claims), Ok(sig)) = (
        decode(parts[0]),
        decode(parts[1]),
        URL_SAFE_NO_PAD.decode(parts[2]),
    ) else {
        return refuse("invalid_grant", "invalid assertion");
    };
    let iss = claims["iss"].as_str().unwrap_or_default().to_owned();
    let Some(key) = s.jwt_apps.get(&iss).cloned() else {
        return refuse("invalid_client_id", "client identifier invalid");
    };
    let signed = format!("{}.{}", parts[0], parts[1]);
    let ok = header["alg"] == "RS256"
        && ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            &key,
        )
        .verify(signed.as_bytes(), &sig)
        .is_ok();
    if !ok {
        return refuse("invalid_grant", "invalid assertion");
    }
    if claims["aud"] != origin {
        return refuse("invalid_grant", "audience is invalid");
    }
    let now = credbroker::model::unix_now() as i64;
    let exp = claims["exp"].as_i64().unwrap_or(0);
    if exp < now {
        return refuse("invalid_grant", "expired authorization code");
    }
    if exp - now > 185 {
        return Reply::Unexpected(format!("exp {} s ahead; at most 3 minutes", exp - now));
    }
    if !s
        .preauthorized
        .contains(claims["sub"].as_str().unwrap_or_default())
    {
        return refuse("invalid_grant", "user hasn't approved this consumer");
    }
    sf_token_answer(s, origin, None)
}

/// "Connect with Salesforce": the consent page (PKCE S256 required).
fn sf_authorize(s: &mut SfState, req: &Req) -> Reply {
    let q = &req.query;
    if q.get("client_id") != Some(&s.client.0)
        || q.get("response_type").map(String::as_str) != Some("code")
        || q.get("code_challenge_method").map(String::as_str) != Some("S256")
    {
        return Reply::Unexpected("authorize needs the app's client_id, code and PKCE S256".into());
    }
    let redirect = q.get("redirect_uri").cloned().unwrap_or_default();
    let state = q.get("state").cloned().unwrap_or_default();
    match s.consent.clone() {
        Consent::Deny => redirect_back(&redirect, &[("error", "access_denied"), ("state", &state)]),
        Consent::Allow(user) => {
            let code = s.oauth.issue_code(
                &user,
                &q["client_id"],
                &redirect,
                q.get("code_challenge").cloned(),
                q.get("scope")
                    .map(String::as_str)
                    .unwrap_or("api refresh_token"),
            );
            redirect_back(&redirect, &[("code", &code), ("state", &state)])
        }
    }
}

/// Code exchange and refresh: rotation (when on) returns a new refresh token each time, and a
/// rotated-out one presented again revokes the grant.
fn sf_code_flow(s: &mut SfState, f: &HashMap<String, String>, origin: &str) -> Reply {
    if !s.oauth.client_ok(f) {
        return Reply::Json(
            400,
            json!({"error": "invalid_client", "error_description": "invalid client credentials"}),
        );
    }
    let refresh = if f.get("grant_type").map(String::as_str) == Some("authorization_code") {
        match s.oauth.exchange_code(f) {
            Ok((_, _, r, _)) => r,
            Err(e) => return e,
        }
    } else {
        let rt = f.get("refresh_token").cloned().unwrap_or_default();
        match s.oauth.refresh_grant(&rt) {
            // Without rotation Salesforce sends no refresh token back.
            Ok((_, r)) => match r.filter(|r| *r != rt) {
                Some(new) => new,
                None => return sf_token_answer(s, origin, None),
            },
            Err(_) => {
                return Reply::Json(
                    400,
                    json!({"error": "invalid_grant", "error_description": "expired access/refresh token"}),
                )
            }
        }
    };
    sf_token_answer(s, origin, Some(refresh))
}

fn sf_session(s: &mut SfState) -> (String, u64) {
    s.seq += 1;
    let token = format!("00D!sess{}{}", s.seq, rand_suffix());
    s.sessions.insert(
        token.clone(),
        std::time::Instant::now() + std::time::Duration::from_secs(s.lifetime),
    );
    (token, s.lifetime)
}

fn sf_handle(s: &mut SfState, req: &Req, origin: &str) -> Reply {
    let invalid_session = Reply::Json(
        401,
        json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]),
    );
    let valid = |s: &SfState| {
        req.bearer()
            .and_then(|t| s.sessions.get(t))
            .is_some_and(|until| *until > std::time::Instant::now())
    };
    let login = matches!(
        req.path.as_str(),
        "/services/oauth2/token" | "/services/Soap/u/64.0"
    );
    if !login {
        if let Some(r) = fault(s.api_mode) {
            return r;
        }
    }
    match req.path.as_str() {
        "/services/oauth2/token" => {
            if req.method != Method::POST {
                return Reply::Unexpected("token endpoint takes POST".into());
            }
            s.token_calls += 1;
            if let Some(r) = fault(s.token_mode) {
                return r;
            }
            let f = req.form();
            match f.get("grant_type").map(String::as_str) {
                Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => {
                    return sf_jwt_bearer(s, &f, origin)
                }
                Some("authorization_code" | "refresh_token") => return sf_code_flow(s, &f, origin),
                _ => {}
            }
            if f.get("client_id") != Some(&s.client.0)
                || f.get("client_secret") != Some(&s.client.1)
            {
                return Reply::Json(
                    400,
                    json!({"error": "invalid_client", "error_description": "invalid client credentials"}),
                );
            }
            match f.get("grant_type").map(String::as_str) {
                Some("client_credentials") => {}
                Some("password") => {
                    let ok = f
                        .get("username")
                        .and_then(|u| s.users.get(u))
                        .is_some_and(|(pw, tok)| f.get("password") == Some(&format!("{pw}{tok}")));
                    if !ok {
                        return Reply::Json(
                            400,
                            json!({"error": "invalid_grant", "error_description": "authentication failure"}),
                        );
                    }
                }
                _ => return Reply::Unexpected("unknown grant_type".into()),
            }
            let (token, _) = sf_session(s);
            // No expires_in, no refresh_token: as Salesforce answers.
            Reply::Json(
                200,
                json!({"access_token": token, "signature": "c2ln", "scope": "api id",
                "instance_url": origin, "id": format!("https://login.salesforce.com/id/{SF_ORG_ID}/{SF_USER_ID}"),
                "token_type": "Bearer", "issued_at": "1700000000000"}),
            )
        }
        "/services/oauth2/authorize" => sf_authorize(s, req),
        "/services/oauth2/introspect" => {
            let f = req.form();
            if !s.introspection || f.get("client_id") != Some(&s.client.0) {
                return Reply::Json(
                    401,
                    json!({"error": "invalid_client", "error_description": "introspection not allowed"}),
                );
            }
            let token = f.get("token").cloned().unwrap_or_default();
            match s.sessions.get(&token) {
                Some(until) => {
                    let left = until
                        .saturating_duration_since(std::time::Instant::now())
                        .as_secs();
                    let exp = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs()
                        + left;
                    Reply::Json(
                        200,
                        json!({"active": true, "exp": exp, "client_id": s.client.0, "token_type": "access_token"}),
                    )
                }
                None => Reply::Json(200, json!({"active": false})),
            }
        }
        "/services/oauth2/userinfo" => {
            if !valid(s) {
                return Reply::Raw(403, "text/plain", "Bad_OAuth_Token".into());
            }
            if !s.userinfo {
                return Reply::Raw(403, "text/plain", "Insufficient_Scope".into());
            }
            Reply::Json(
                200,
                json!({"user_id": SF_USER_ID, "organization_id": SF_ORG_ID, "name": "Integration User",
                "preferred_username": "integration@acme.example", "email": "integration@acme.example"}),
            )
        }
        "/services/data/v62.0/" => {
            if !valid(s) {
                return invalid_session;
            }
            if s.api_limit_exhausted {
                // As Salesforce answers past the allocation: a 403, no Retry-After; compressed
                // (and chunked) when the caller asks for gzip, as Salesforce does.
                let gzip = req
                    .headers
                    .get("accept-encoding")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("gzip"));
                if gzip {
                    use std::io::Write;
                    let refusal = br#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#;
                    let mut e = flate2::write::GzEncoder::new(Vec::new(), Default::default());
                    e.write_all(refusal).unwrap();
                    let headers = vec![
                        ("content-type", "application/json".to_owned()),
                        ("content-encoding", "gzip".to_owned()),
                    ];
                    return Reply::Chunked(403, headers, e.finish().unwrap());
                }
                return Reply::Json(
                    403,
                    json!([{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]),
                );
            }
            Reply::Json(
                200,
                json!({"sobjects": "/services/data/v62.0/sobjects", "limits": "/services/data/v62.0/limits"}),
            )
        }
        "/services/Soap/u/64.0" => {
            s.token_calls += 1;
            let body = String::from_utf8_lossy(&req.body).to_string();
            let tag = |t: &str| {
                body.split(&format!("<n1:{t}>"))
                    .nth(1)
                    .and_then(|r| r.split("</").next())
                    .map(str::to_owned)
            };
            let ok = tag("username")
                .and_then(|u| s.users.get(&u).cloned())
                .is_some_and(|(pw, tok)| tag("password") == Some(format!("{pw}{tok}")));
            if !ok {
                return Reply::Raw(500, "text/xml", "<soapenv:Envelope><soapenv:Body><soapenv:Fault><faultcode>sf:INVALID_LOGIN</faultcode><faultstring>INVALID_LOGIN: Invalid username, password, security token; or user locked out.</faultstring></soapenv:Fault></soapenv:Body></soapenv:Envelope>".into());
            }
            let (token, secs) = sf_session(s);
            Reply::Raw(200, "text/xml", format!("<soapenv:Envelope><soapenv:Body><loginResponse><result><metadataServerUrl>{origin}/services/Soap/m/64.0/{SF_ORG_ID}</metadataServerUrl><passwordExpired>false</passwordExpired><sandbox>false</sandbox><serverUrl>{origin}/services/Soap/u/64.0/{SF_ORG_ID}</serverUrl><sessionId>{token}</sessionId><userId>{SF_USER_ID}</userId><userInfo><sessionSecondsValid>{secs}</sessionSecondsValid></userInfo></result></loginResponse></soapenv:Body></soapenv:Envelope>"))
        }
        "/services/data/" => {
            Reply::Unexpected("the versions list needs no auth and proves nothing".into())
        }
        p if p.starts_with(SF_SOBJECTS) => {
            if !valid(s) {
                return invalid_session;
            }
            let Some((used, limit)) = s.api_usage else {
                return Reply::Json(200, json!({"sobjects": []}));
            };
            if used >= limit {
                return Reply::JsonWith(
                    403,
                    vec![("sforce-limit-info", format!("api-usage={used}/{limit}"))],
                    json!([{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]),
                );
            }
            s.api_usage = Some((used + 1, limit));
            Reply::JsonWith(
                if req.method == "POST" { 201 } else { 200 },
                vec![(
                    "sforce-limit-info",
                    format!("api-usage={}/{limit}", used + 1),
                )],
                json!({"id": "001000000000001AAA", "success": true}),
            )
        }
        _ => Reply::Unexpected("unknown path".into()),
    }
}

// ------------------------------------------------------------------------------------------
// Zendesk
// ------------------------------------------------------------------------------------------

struct ZdState {
    oauth: OAuthServer,
    users: HashMap<String, (u64, String, String, String)>,
    consent: Consent,
    /// Overrides the lifetime the client asks for (tests use seconds).
    access_lifetime: Option<u64>,
    /// Faults of the API (not of the consent page or the token endpoint).
    mode: Mode,
    /// Confidential clients allowed the client-credentials grant → the admin who created them.
    service_clients: HashMap<String, String>,
    /// Show the consent page (an "Allow" button) before acting on `consent`, as a browser sees it.
    consent_page: bool,
    /// Refreshes answered without a refresh token (the old one stays valid) and with this
    /// `refresh_token_expires_in`: an answer real Zendesk does not give.
    omit_refresh_token: Option<u64>,
    /// Token answers (code exchanges and refreshes) without `scope` (real Zendesk sends it;
    /// RFC 6749 lets a server leave it out when it granted what was asked).
    omit_scope: bool,
}

/// A fake Zendesk account: consent page, JSON token endpoint with rotating refresh tokens (the
/// previous pair dies at once; reuse revokes the family), and `users/me` that answers 200 to
/// anonymous callers.
#[derive(Clone)]
pub struct FakeZendesk {
    /// `http://127.0.0.1:PORT` (stands in for https://acme.zendesk.com).
    pub base_url: String,
    /// The server.
    pub server: FakeUpstream,
    state: Arc<Mutex<ZdState>>,
}

impl FakeZendesk {
    /// Starts the fake with one OAuth client.
    pub async fn start(client_id: &str, client_secret: &str) -> Self {
        let mut oauth = OAuthServer::new();
        oauth.rotate = true;
        oauth.clients.insert(client_id.into(), client_secret.into());
        let state = Arc::new(Mutex::new(ZdState {
            oauth,
            users: HashMap::new(),
            consent: Consent::Deny,
            access_lifetime: None,
            mode: Mode::Normal,
            service_clients: HashMap::new(),
            consent_page: false,
            omit_refresh_token: None,
            omit_scope: false,
        }));
        let st = state.clone();
        let server = FakeUpstream::start(move |req| zd_handle(&mut st.lock().unwrap(), req)).await;
        Self {
            base_url: server.origin.clone(),
            server,
            state,
        }
    }

    /// A user who can sign in: (id, name, email, role).
    pub fn add_user(&self, login: &str, id: u64, name: &str, email: &str, role: &str) {
        self.state
            .lock()
            .unwrap()
            .users
            .insert(login.into(), (id, name.into(), email.into(), role.into()));
    }

    /// Faults of the API; the consent page and the token endpoint answer normally.
    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    /// A confidential OAuth client created by `admin_login`; its client-credentials tokens act
    /// as that user.
    pub fn add_service_client(&self, id: &str, secret: &str, admin_login: &str) {
        let mut s = self.state.lock().unwrap();
        s.oauth.clients.insert(id.into(), secret.into());
        s.service_clients.insert(id.into(), admin_login.into());
    }

    /// The OAuth client's secret at the vendor (rotated there: the stored one stops working).
    pub fn set_client_secret(&self, id: &str, secret: &str) {
        self.state
            .lock()
            .unwrap()
            .oauth
            .clients
            .insert(id.into(), secret.into());
    }

    /// What the person at the consent page does.
    pub fn set_consent(&self, c: Consent) {
        self.state.lock().unwrap().consent = c;
    }

    /// Shows the consent page (a browser must click "Allow") before acting on the consent.
    pub fn show_consent_page(&self) {
        self.state.lock().unwrap().consent_page = true;
    }

    /// Changes the token endpoint's behaviour.
    pub fn oauth(&self, f: impl FnOnce(&mut OAuthServer)) {
        f(&mut self.state.lock().unwrap().oauth);
    }

    /// Forces the access-token lifetime (seconds).
    pub fn set_access_lifetime(&self, secs: u64) {
        self.state.lock().unwrap().access_lifetime = Some(secs);
    }

    /// Answers code exchanges and refreshes without `scope`.
    pub fn omit_scope(&self) {
        self.state.lock().unwrap().omit_scope = true;
    }

    /// Answers refreshes without a refresh token, saying `refresh_token_expires_in`.
    pub fn omit_refresh_tokens(&self, refresh_token_expires_in: u64) {
        self.state.lock().unwrap().omit_refresh_token = Some(refresh_token_expires_in);
    }

    /// Token endpoint calls.
    pub fn token_calls(&self) -> usize {
        self.state.lock().unwrap().oauth.token_calls
    }

    /// Reuses of rotated-out refresh tokens.
    pub fn reuse_detected(&self) -> usize {
        self.state.lock().unwrap().oauth.reuse_detected
    }

    /// The newest refresh token of `login`.
    pub fn newest_refresh_token(&self, login: &str) -> Option<String> {
        self.state
            .lock()
            .unwrap()
            .oauth
            .newest_refresh
            .get(login)
            .cloned()
    }
}

/// The client-credentials grant: confidential clients only; the answer is the documented
/// `{access_token, token_type, scope}` (no `expires_in`, no refresh token), so the client must
/// know the lifetime it asked for.
fn zd_client_credentials(s: &mut ZdState, f: &HashMap<String, String>) -> Reply {
    let id = f.get("client_id").cloned().unwrap_or_default();
    let Some(login) = s.service_clients.get(&id).cloned() else {
        return Reply::Json(
            400,
            json!({"error": "unauthorized_client", "error_description": "The client is not authorized to use this grant type."}),
        );
    };
    let Some(asked) = f.get("expires_in").and_then(|v| v.parse::<u64>().ok()) else {
        return Reply::Unexpected("the broker always asks for an explicit expires_in".into());
    };
    if !(301..172_800).contains(&asked) {
        return Reply::Unexpected(format!("expires_in {asked} is outside Zendesk's limits"));
    }
    s.oauth.access_lifetime = s.access_lifetime.unwrap_or(asked);
    let access = s.oauth.mint_access(&login);
    let scope = f.get("scope").cloned().unwrap_or_default();
    delayed(
        &s.oauth,
        Reply::Json(
            200,
            json!({"access_token": access, "token_type": "bearer", "scope": scope}),
        ),
    )
}

fn zd_handle(s: &mut ZdState, req: &Req) -> Reply {
    if !req.path.starts_with("/oauth/") {
        if let Some(r) = fault(s.mode) {
            return r;
        }
    }
    match req.path.as_str() {
        "/oauth/authorizations/new" => {
            let q = &req.query;
            let client_ok = q
                .get("client_id")
                .is_some_and(|c| s.oauth.clients.contains_key(c));
            if !client_ok || q.get("response_type").map(String::as_str) != Some("code") {
                return Reply::Unexpected("bad authorize request".into());
            }
            if q.get("code_challenge_method").map(String::as_str) != Some("S256")
                || !q.contains_key("code_challenge")
            {
                return Reply::Unexpected("PKCE S256 expected".into());
            }
            let redirect = q.get("redirect_uri").cloned().unwrap_or_default();
            let state = q.get("state").cloned().unwrap_or_default();
            if s.consent_page && !q.contains_key("approved") {
                return consent_page(q);
            }
            match s.consent.clone() {
                Consent::Deny => redirect_back(
                    &redirect,
                    &[
                        ("error", "access_denied"),
                        (
                            "error_description",
                            "The end-user or authorization server denied the request.",
                        ),
                        ("state", &state),
                    ],
                ),
                Consent::Allow(user) => {
                    let code = s.oauth.issue_code(
                        &user,
                        &q["client_id"],
                        &redirect,
                        q.get("code_challenge").cloned(),
                        q.get("scope").map(String::as_str).unwrap_or("read write"),
                    );
                    redirect_back(&redirect, &[("code", &code), ("state", &state)])
                }
            }
        }
        "/oauth/tokens" => {
            let Some(f) = json_form(req) else {
                return Reply::Unexpected("Zendesk's token endpoint takes a JSON body".into());
            };
            s.oauth.token_calls += 1;
            s.oauth.call_times.push(std::time::Instant::now());
            if let Some(r) = token_fault(&s.oauth) {
                return r;
            }
            if !s.oauth.client_ok(&f) {
                return Reply::Json(
                    401,
                    json!({"error": "invalid_client", "error_description": "Client authentication failed due to unknown client"}),
                );
            }
            if f.get("grant_type").map(String::as_str) == Some("client_credentials") {
                return zd_client_credentials(s, &f);
            }
            let asked: u64 = f
                .get("expires_in")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1800);
            let lifetime = s.access_lifetime.unwrap_or(asked);
            let refresh_ttl: u64 = f
                .get("refresh_token_expires_in")
                .and_then(|v| v.parse().ok())
                .unwrap_or(2_592_000);
            s.oauth.access_lifetime = lifetime;
            let (access, refresh, scope) = match f.get("grant_type").map(String::as_str) {
                Some("authorization_code") => match s.oauth.exchange_code(&f) {
                    Ok((_, a, r, scope)) => (a, r, scope),
                    Err(e) => return e,
                },
                Some("refresh_token") if s.omit_refresh_token.is_some() => {
                    let rotate = std::mem::replace(&mut s.oauth.rotate, false);
                    let rt = f.get("refresh_token").map(String::as_str).unwrap_or("");
                    let answer = s.oauth.refresh_grant(rt);
                    s.oauth.rotate = rotate;
                    let said = s.omit_refresh_token.unwrap_or_default();
                    return match answer {
                        Ok((a, _)) => Reply::Json(
                            200,
                            json!({"access_token": a, "token_type": "bearer", "scope": "read write",
                            "expires_in": lifetime, "refresh_token_expires_in": said}),
                        ),
                        Err(e) => e,
                    };
                }
                Some("refresh_token") => match s
                    .oauth
                    .refresh_grant(f.get("refresh_token").map(String::as_str).unwrap_or(""))
                {
                    Ok((a, r)) => (a, r.unwrap_or_default(), "read write".to_owned()),
                    Err(e) => return e,
                },
                _ => return Reply::Unexpected("unknown grant_type".into()),
            };
            let mut answer = json!({"access_token": access, "token_type": "bearer", "scope": scope, "refresh_token": refresh,
                    "expires_in": lifetime, "refresh_token_expires_in": refresh_ttl});
            if s.omit_scope {
                answer.as_object_mut().unwrap().remove("scope");
            }
            delayed(&s.oauth, Reply::Json(200, answer))
        }
        "/api/v2/users/me.json" => {
            // Allowed for anonymous users: 200 with a null id, never 401.
            let anonymous = json!({"user": {"id": null, "name": "Anonymous user", "email": "invalid@example.com", "role": "end-user"}});
            let user = req
                .bearer()
                .and_then(|t| s.oauth.user_of(t))
                .and_then(|u| s.users.get(&u).cloned());
            match user {
                Some((id, name, email, role)) => Reply::Json(
                    200,
                    json!({"user": {"id": id, "name": name, "email": email, "role": role, "active": true}}),
                ),
                None => Reply::Json(200, anonymous),
            }
        }
        _ => Reply::Unexpected("unknown path".into()),
    }
}

// ------------------------------------------------------------------------------------------
// Atlassian (auth.atlassian.com and api.atlassian.com on one origin)
// ------------------------------------------------------------------------------------------

struct AtlState {
    oauth: OAuthServer,
    users: HashMap<String, (String, String, String)>,
    sites: Vec<(String, String, String)>,
    consent: Consent,
    granted_scopes: Option<String>,
    /// Faults of the API gateway (not of the consent page or the token endpoint).
    mode: Mode,
    /// Service accounts' OAuth 2.0 credentials: client id → the account's login.
    service_clients: HashMap<String, String>,
    /// The cloud id the site's `/_edge/tenant_info` names (`None`: no site at this address).
    site_cloud_id: Option<String>,
    /// API tokens: token → (e-mail, login, scoped, expired).
    api_tokens: HashMap<String, (String, String, bool, bool)>,
    /// Logins (service accounts) without Jira product access.
    no_product_access: HashSet<String>,
    /// Logins whose credential lacks `read:jira-user`.
    missing_user_scope: HashSet<String>,
    /// Jira's API (other than `myself`) answers 429 until then.
    throttled_until: Option<std::time::Instant>,
    /// Those 429s say `Retry-After: 0` (a vendor that means "soon").
    zero_retry_after: bool,
    /// accessible-resources answers this status this many more times.
    resources_failures: (u32, u16),
    /// Writes to this issue (`PUT …/issue/{key}`) are over Jira's per-issue write limit.
    issue_write_limited: Option<String>,
}

/// A fake Atlassian: consent page, JSON token endpoint with rotating refresh tokens and reuse
/// detection, accessible-resources and Jira's `myself` through the API gateway.
#[derive(Clone)]
pub struct FakeAtlassian {
    /// Origin for both `CREDBROKER_JIRA_AUTH_URL` and `CREDBROKER_JIRA_API_URL`.
    pub origin: String,
    /// The server.
    pub server: FakeUpstream,
    state: Arc<Mutex<AtlState>>,
}

impl FakeAtlassian {
    /// Starts the fake.
    pub async fn start() -> Self {
        let mut oauth = OAuthServer::new();
        oauth.rotate = true;
        let state = Arc::new(Mutex::new(AtlState {
            oauth,
            users: HashMap::new(),
            sites: Vec::new(),
            consent: Consent::Deny,
            granted_scopes: None,
            mode: Mode::Normal,
            service_clients: HashMap::new(),
            site_cloud_id: None,
            api_tokens: HashMap::new(),
            no_product_access: HashSet::new(),
            missing_user_scope: HashSet::new(),
            throttled_until: None,
            zero_retry_after: false,
            resources_failures: (0, 503),
            issue_write_limited: None,
        }));
        let st = state.clone();
        let server = FakeUpstream::start(move |req| atl_handle(&mut st.lock().unwrap(), req)).await;
        Self {
            origin: server.origin.clone(),
            server,
            state,
        }
    }

    /// accessible-resources answers `status` (Atlassian's JSON error) the next `n` times.
    pub fn fail_site_list(&self, n: u32, status: u16) {
        self.state.lock().unwrap().resources_failures = (n, status);
    }

    /// Jira's API (other than `myself`) answers 429 with `Retry-After` for the next `secs`.
    pub fn throttle_for(&self, secs: u64) {
        let mut s = self.state.lock().unwrap();
        s.throttled_until = Some(std::time::Instant::now() + std::time::Duration::from_secs(secs));
        s.zero_retry_after = false;
    }

    /// Writes to issue `key` answer 429 as Jira's per-issue write limit does (`RateLimit-Reason:
    /// jira-per-issue-on-write`, `Retry-After: 30`, that limit's own counts); others pass.
    pub fn limit_issue_writes(&self, key: &str) {
        self.state.lock().unwrap().issue_write_limited = Some(key.to_owned());
    }

    /// Jira's API answers 429 with `Retry-After: 0` for the next `millis`.
    pub fn throttle_saying_zero(&self, millis: u64) {
        let mut s = self.state.lock().unwrap();
        s.throttled_until =
            Some(std::time::Instant::now() + std::time::Duration::from_millis(millis));
        s.zero_retry_after = true;
    }

    /// An OAuth 2.0 (3LO) app.
    pub fn add_client(&self, id: &str, secret: &str) {
        self.state
            .lock()
            .unwrap()
            .oauth
            .clients
            .insert(id.into(), secret.into());
    }

    /// A user: (account id, name, email).
    pub fn add_user(&self, login: &str, account_id: &str, name: &str, email: &str) {
        self.state
            .lock()
            .unwrap()
            .users
            .insert(login.into(), (account_id.into(), name.into(), email.into()));
    }

    /// The sites every grant covers: (cloud id, name, url).
    pub fn set_sites(&self, sites: &[(&str, &str, &str)]) {
        self.state.lock().unwrap().sites = sites
            .iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect();
    }

    /// Faults of the API; the consent page and the token endpoint answer normally.
    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    /// What the person at the consent page does.
    pub fn set_consent(&self, c: Consent) {
        self.state.lock().unwrap().consent = c;
    }

    /// A service account's OAuth 2.0 credential (client credentials) acting as `login`.
    pub fn add_service_client(&self, id: &str, secret: &str, login: &str) {
        let mut s = self.state.lock().unwrap();
        s.oauth.clients.insert(id.into(), secret.into());
        s.service_clients.insert(id.into(), login.into());
    }

    /// This origin plays a Jira site whose tenant info names `cloud_id` (`None`: no site).
    pub fn set_site_cloud_id(&self, cloud_id: Option<&str>) {
        self.state.lock().unwrap().site_cloud_id = cloud_id.map(str::to_owned);
    }

    /// An API token of `login` (e-mail `email`); a scoped one only works through the gateway.
    pub fn add_api_token(&self, token: &str, email: &str, login: &str, scoped: bool) {
        self.state
            .lock()
            .unwrap()
            .api_tokens
            .insert(token.into(), (email.into(), login.into(), scoped, false));
    }

    /// Lets an API token expire (Atlassian then answers 401 "Client must be authenticated").
    pub fn expire_api_token(&self, token: &str) {
        if let Some(t) = self.state.lock().unwrap().api_tokens.get_mut(token) {
            t.3 = true;
        }
    }

    /// Takes Jira product access from (or gives it back to) `login`.
    pub fn set_product_access(&self, login: &str, on: bool) {
        let mut s = self.state.lock().unwrap();
        if on {
            s.no_product_access.remove(login);
        } else {
            s.no_product_access.insert(login.into());
        }
    }

    /// `login`'s credential lacks (or has) `read:jira-user`.
    pub fn set_missing_user_scope(&self, login: &str, missing: bool) {
        let mut s = self.state.lock().unwrap();
        if missing {
            s.missing_user_scope.insert(login.into());
        } else {
            s.missing_user_scope.remove(login);
        }
    }

    /// Grants fewer scopes than asked (space-separated).
    pub fn set_granted_scopes(&self, scopes: &str) {
        self.state.lock().unwrap().granted_scopes = Some(scopes.into());
    }

    /// Token endpoint calls.
    pub fn token_calls(&self) -> usize {
        self.state.lock().unwrap().oauth.token_calls
    }

    /// Reuses of rotated-out refresh tokens.
    pub fn reuse_detected(&self) -> usize {
        self.state.lock().unwrap().oauth.reuse_detected
    }

    /// How often the leeway admitted the last rotated-out refresh token.
    pub fn leeway_reuses(&self) -> usize {
        self.state.lock().unwrap().oauth.leeway_reuses
    }

    /// Changes the token endpoint's behaviour.
    pub fn oauth(&self, f: impl FnOnce(&mut OAuthServer)) {
        f(&mut self.state.lock().unwrap().oauth);
    }
}

const ATL_NOT_AUTHENTICATED: &str = "Client must be authenticated to access this resource.";

/// The login behind `Basic email:token`; a scoped token works only through the gateway, a
/// classic one only at the site; expired and unknown tokens get the same 401.
fn atl_api_token_user(s: &AtlState, req: &Req, via_gateway: bool) -> Result<String, Reply> {
    let refused = Reply::Json(
        401,
        json!({"message": ATL_NOT_AUTHENTICATED, "status-code": 401}),
    );
    let Some(Ok((email, token))) = req.basic() else {
        return Err(refused);
    };
    match s.api_tokens.get(&token) {
        Some((e, login, scoped, false)) if *e == email && *scoped == via_gateway => {
            Ok(login.clone())
        }
        _ => Err(refused),
    }
}

/// `myself` for `login`: 403 without product access.
fn atl_myself(s: &AtlState, login: &str) -> Reply {
    if s.no_product_access.contains(login) {
        return Reply::Json(
            403,
            json!({"errorMessages": ["You do not have access to this product."]}),
        );
    }
    let (id, name, email) = s.users.get(login).cloned().unwrap_or_default();
    let account_type = if s.service_clients.values().any(|l| l == login) {
        "app"
    } else {
        "atlassian"
    };
    Reply::Json(
        200,
        json!({"accountId": id, "accountType": account_type, "active": true, "displayName": name, "emailAddress": email}),
    )
}

/// A service account's client-credentials grant: a 60-minute token, no refresh token.
fn atl_client_credentials(s: &mut AtlState, f: &HashMap<String, String>) -> Reply {
    let id = f.get("client_id").cloned().unwrap_or_default();
    let Some(login) = s.service_clients.get(&id).cloned() else {
        return Reply::Json(
            403,
            json!({"error": "unauthorized_client", "error_description": "Grant type 'client_credentials' is not allowed for this client"}),
        );
    };
    if let Some(k) = f
        .keys()
        .find(|k| !["grant_type", "client_id", "client_secret", "scope"].contains(&k.as_str()))
    {
        return Reply::Unexpected(format!(
            "'{k}' is not a documented client-credentials parameter"
        ));
    }
    let lifetime = s.oauth.access_lifetime;
    let access = s.oauth.mint_access(&login);
    delayed(
        &s.oauth,
        Reply::Json(
            200,
            json!({"access_token": access, "expires_in": lifetime, "token_type": "Bearer", "scope": "read:jira-work write:jira-work read:jira-user"}),
        ),
    )
}

fn atl_handle(s: &mut AtlState, req: &Req) -> Reply {
    let path = req.path.as_str();
    if path != "/authorize" && path != "/oauth/token" {
        if let Some(r) = fault(s.mode) {
            return r;
        }
    }
    if path == "/authorize" {
        let q = &req.query;
        let ok = q.get("audience").map(String::as_str) == Some("api.atlassian.com")
            && q.get("prompt").map(String::as_str) == Some("consent")
            && q.get("response_type").map(String::as_str) == Some("code")
            && q.get("scope")
                .is_some_and(|sc| sc.split(' ').any(|x| x == "offline_access"))
            && q.get("client_id")
                .is_some_and(|c| s.oauth.clients.contains_key(c));
        if !ok {
            return Reply::Unexpected(
                "authorize needs audience, prompt=consent, offline_access and a known client"
                    .into(),
            );
        }
        let redirect = q.get("redirect_uri").cloned().unwrap_or_default();
        let state = q.get("state").cloned().unwrap_or_default();
        return match s.consent.clone() {
            Consent::Deny => {
                redirect_back(&redirect, &[("error", "access_denied"), ("state", &state)])
            }
            Consent::Allow(user) => {
                let scopes = s
                    .granted_scopes
                    .clone()
                    .unwrap_or_else(|| q["scope"].clone());
                let code = s
                    .oauth
                    .issue_code(&user, &q["client_id"], &redirect, None, &scopes);
                redirect_back(&redirect, &[("code", &code), ("state", &state)])
            }
        };
    }
    if path == "/oauth/token" {
        let form_post = req
            .header("content-type")
            .starts_with("application/x-www-form-urlencoded");
        let f = match json_form(req) {
            Some(f) => f,
            // Client credentials are posted as a form in the wild; the 3LO grants take JSON.
            None if form_post
                && req.form().get("grant_type").map(String::as_str)
                    == Some("client_credentials") =>
            {
                req.form()
            }
            None => {
                return Reply::Unexpected("Atlassian's token endpoint takes a JSON body".into())
            }
        };
        s.oauth.token_calls += 1;
        s.oauth.call_times.push(std::time::Instant::now());
        if let Some(r) = token_fault(&s.oauth) {
            return r;
        }
        if !s.oauth.client_ok(&f) {
            return Reply::Json(
                401,
                json!({"error": "access_denied", "error_description": "Unauthorized"}),
            );
        }
        let lifetime = s.oauth.access_lifetime;
        if f.get("grant_type").map(String::as_str) == Some("client_credentials") {
            return atl_client_credentials(s, &f);
        }
        let (access, refresh, scope) = match f.get("grant_type").map(String::as_str) {
            Some("authorization_code") => match s.oauth.exchange_code(&f) {
                Ok((_, a, r, scope)) => (a, r, scope),
                Err(e) => return e,
            },
            Some("refresh_token") => match s
                .oauth
                .refresh_grant(f.get("refresh_token").map(String::as_str).unwrap_or(""))
            {
                Ok((a, r)) => (
                    a,
                    r.unwrap_or_default(),
                    s.granted_scopes.clone().unwrap_or_else(|| {
                        "read:jira-work write:jira-work read:jira-user offline_access".into()
                    }),
                ),
                Err(_) => {
                    return Reply::Json(
                        403,
                        json!({"error": "invalid_grant", "error_description": "Unknown or invalid refresh token."}),
                    )
                }
            },
            _ => return Reply::Unexpected("unknown grant_type".into()),
        };
        // The grant rotated on receipt; the answer may be slow to come back.
        return delayed(
            &s.oauth,
            Reply::Json(
                200,
                json!({"access_token": access, "refresh_token": refresh, "expires_in": lifetime, "token_type": "Bearer", "scope": scope}),
            ),
        );
    }
    if path == "/_edge/tenant_info" {
        // Unauthenticated: any caller learns a site's cloud id.
        return match &s.site_cloud_id {
            Some(id) => Reply::Json(200, json!({"cloudId": id})),
            None => Reply::Raw(404, "text/html", "<html>Site not found</html>".into()),
        };
    }
    if path == "/rest/api/3/myself" {
        // The site itself: classic (unscoped) API tokens only.
        return match atl_api_token_user(s, req, false) {
            Ok(login) => atl_myself(s, &login),
            Err(r) => r,
        };
    }
    let user = if req.header("authorization").starts_with("Basic ") {
        match atl_api_token_user(s, req, true) {
            Ok(login) => login,
            Err(r) => return r,
        }
    } else {
        match req.bearer().and_then(|t| s.oauth.user_of(t)) {
            Some(u) => u,
            None => return Reply::Json(401, json!({"code": 401, "message": "Unauthorized"})),
        }
    };
    if path == "/oauth/token/accessible-resources" {
        if let (n @ 1.., status) = s.resources_failures {
            s.resources_failures.0 = n - 1;
            return Reply::Json(status, json!({"code": status, "message": "refused"}));
        }
        let sites: Vec<Value> = s.sites.iter().map(|(id, name, url)| json!({"id": id, "name": name, "url": url, "scopes": ["read:jira-work"], "avatarUrl": ""})).collect();
        return Reply::Json(200, Value::Array(sites));
    }
    if let Some(rest) = path.strip_prefix("/ex/jira/") {
        let (cloud, api) = rest.split_once('/').unwrap_or((rest, ""));
        if !s.sites.iter().any(|(id, _, _)| id == cloud) {
            return Reply::Json(404, json!({"errorMessages": ["site not found"]}));
        }
        if api == "rest/api/3/myself" {
            if s.missing_user_scope.contains(&user)
                || s.granted_scopes
                    .as_deref()
                    .is_some_and(|g| !g.contains("read:jira-user"))
            {
                return Reply::Json(
                    401,
                    json!({"code": 401, "message": "Unauthorized; scope does not match"}),
                );
            }
            return atl_myself(s, &user);
        }
        let limited_issue = s
            .issue_write_limited
            .as_deref()
            .is_some_and(|key| api == format!("rest/api/3/issue/{key}"));
        if limited_issue && req.method == Method::PUT {
            return Reply::JsonWith(
                429,
                vec![
                    ("retry-after", "30".into()),
                    ("x-ratelimit-limit", "20".into()),
                    ("x-ratelimit-remaining", "0".into()),
                    ("ratelimit-reason", "jira-per-issue-on-write".into()),
                ],
                json!({"errorMessages": ["Rate limit exceeded."]}),
            );
        }
        let left = s
            .throttled_until
            .map(|u| u.saturating_duration_since(std::time::Instant::now()))
            .filter(|d| !d.is_zero());
        if let Some(left) = left {
            // As Jira answers over its points budget: 429, Retry-After and the RateLimit set.
            return Reply::JsonWith(
                429,
                vec![
                    (
                        "retry-after",
                        if s.zero_retry_after {
                            "0".to_owned()
                        } else {
                            left.as_secs_f64().ceil().to_string()
                        },
                    ),
                    ("x-ratelimit-limit", "65000".into()),
                    ("x-ratelimit-remaining", "0".into()),
                    ("ratelimit-reason", "jira-quota-tenant-based".into()),
                ],
                json!({"errorMessages": ["Rate limit exceeded."]}),
            );
        }
        return Reply::Json(200, json!({"ok": true}));
    }
    Reply::Unexpected("unknown path".into())
}
