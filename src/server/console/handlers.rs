//! The console's handlers: each reads the session, makes the RPC, and renders a page.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use super::pages::{self, Notice};
use super::{forms, page, same_site, Console, Signed};
use crate::model::{Role, SystemKind};
use crate::pb;
use crate::pb::credential_broker_server::CredentialBroker;
use crate::server::tls::ClientNames;

type St = State<Arc<Console>>;
type Fields = Form<HashMap<String, String>>;

/// The console's routes (state: [`Console`]).
pub(super) fn routes() -> Router<Arc<Console>> {
    Router::new()
        .route("/console", get(home))
        .route("/console/", get(home))
        .route("/console/assets/console.css", get(css))
        .route("/console/sign-in", get(sign_in_page).post(sign_in))
        .route("/console/sign-out", post(sign_out))
        .route("/console/systems", get(systems))
        .route("/console/systems/{id}", get(system))
        .route("/console/systems/{id}/check", post(check))
        .route("/console/systems/{id}/rotate", post(rotate))
        .route("/console/systems/{id}/delivery", post(delivery))
        .route("/console/systems/{id}/delete", post(delete))
        .route("/console/systems/{id}/connect", post(connect))
        .route("/console/register", get(register_page).post(register))
        .route("/console/callers", get(callers).post(create_caller))
        .route("/console/callers/{name}/revoke", post(revoke_caller))
        .route("/console/keys", get(keys))
        .route("/console/events", get(events))
        .route("/console/events/stream", get(events_stream))
        .route("/console/assets/console.js", get(js))
        .route("/console/keys/rotate", post(rotate_key))
}

/// Either the page, or where the request must go instead (sign-in, a refusal).
type Page = Result<Response, Response>;

fn ok(markup: maud::Markup) -> Response {
    page(StatusCode::OK, markup)
}

fn status_code(s: &tonic::Status) -> StatusCode {
    use tonic::Code as C;
    match s.code() {
        C::InvalidArgument | C::FailedPrecondition | C::OutOfRange => StatusCode::BAD_REQUEST,
        C::NotFound => StatusCode::NOT_FOUND,
        C::AlreadyExists | C::Aborted => StatusCode::CONFLICT,
        C::PermissionDenied => StatusCode::FORBIDDEN,
        C::Unauthenticated => StatusCode::UNAUTHORIZED,
        C::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn home(State(c): St, headers: HeaderMap) -> Response {
    match c.signed(&headers) {
        Ok(_) => Redirect::to("/console/systems").into_response(),
        Err(r) => r,
    }
}

async fn css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("console.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("console.js"),
    )
        .into_response()
}

async fn events(State(c): St, headers: HeaderMap) -> Page {
    let s = c.signed(&headers)?;
    Ok(ok(pages::events(&s.ctx())))
}

/// How often an open events feed checks its session while no event comes.
const STREAM_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// `WatchSystems` itself (called in process as the signed-in caller, so its limits, filters,
/// audit and its end at revocation or shutdown apply), from now on, as server-sent events:
/// metadata only, and only while the session lasts (checked at each event and every second).
async fn events_stream(State(c): St, headers: HeaderMap) -> Page {
    use tokio_stream::StreamExt;
    let s = c.signed(&headers)?;
    let after = c.broker()?.events.now_cursor();
    let req = pb::WatchSystemsRequest {
        after,
        ..Default::default()
    };
    let watch = match c
        .call(&s, req, |svc, r| async move { svc.watch_systems(r).await })
        .await
    {
        Ok(w) => w,
        Err(e) => return Err(failed(&s, &e)),
    };
    let (id, hash) = (s.id.clone(), s.session.caller_hash);
    let stream = until_watch_ends(watch, STREAM_RECHECK)
        .take_while(move |_| c.still_signed(&id, &hash))
        .filter_map(|e| e)
        .map(|e| {
            let system = e.system.unwrap_or_default();
            let at = e.at.map_or(0, |t| u64::try_from(t.seconds).unwrap_or(0));
            let data = serde_json::json!({
                "at": crate::util::time::date_time(at),
                "type": e.r#type,
                "system_id": system.system_id,
                "health": pages::health_name(system.health),
                "detail": e.detail,
            });
            Ok::<_, std::convert::Infallible>(
                axum::response::sse::Event::default().data(data.to_string()),
            )
        });
    let sse =
        axum::response::sse::Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::default());
    Ok(sse.into_response())
}

/// The watch's events (`Some`), with a `None` every `recheck` while nothing happens, so that a
/// quiet feed still ends with its session; ended as soon as the watch ends or fails (it fell
/// behind, the caller changed, shutdown), so the browser sees the feed close and reconnects
/// instead of showing a feed that receives nothing as live.
fn until_watch_ends<T, E>(
    watch: impl tokio_stream::Stream<Item = Result<T, E>> + Send + 'static,
    recheck: std::time::Duration,
) -> impl tokio_stream::Stream<Item = Option<T>> + Send
where
    T: Send + 'static,
    E: Send + 'static,
{
    use tokio_stream::StreamExt;
    let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(recheck))
        .map(|_| Some(None));
    watch
        .map_while(|e| e.ok().map(|e| Some(Some(e))))
        .chain(tokio_stream::once(None))
        .merge(ticks)
        .map_while(|item| item)
}

type Names = Option<axum::Extension<ClientNames>>;

fn names_of(n: &Names) -> &[String] {
    n.as_ref()
        .map_or(&[], |axum::Extension(ClientNames(v))| v.as_slice())
}

/// The admin the connection's verified client certificate names, if any.
fn certificate_admin(c: &Console, names: &[String]) -> Option<String> {
    let broker = c.core.get()?;
    let presented = crate::broker::callers::Presented::Certificate(names);
    (!names.is_empty())
        .then(|| broker.callers.authn(presented, false, Role::Admin).ok())
        .flatten()
        .map(|caller| caller.name.clone())
}

async fn sign_in_page(State(c): St, headers: HeaderMap, names: Names) -> Response {
    if c.signed(&headers).is_ok() {
        return Redirect::to("/console/systems").into_response();
    }
    let admin = certificate_admin(&c, names_of(&names));
    ok(pages::sign_in(None, admin.as_deref()))
}

async fn sign_in(State(c): St, headers: HeaderMap, names: Names, Form(f): Fields) -> Page {
    same_site(&headers)?;
    let broker = c.broker()?;
    let token = f.get("token").map_or("", |t| t.trim());
    let presented = if f.contains_key("certificate") {
        crate::broker::callers::Presented::Certificate(names_of(&names))
    } else {
        crate::broker::callers::Presented::Token(token)
    };
    match broker
        .callers
        .authn(presented, c.settings.bearer_tokens, Role::Admin)
    {
        Ok(caller) => {
            let id = c.sessions.start(caller.token_hash(), &caller.name);
            let _ = broker
                .audit_record("ConsoleSignIn", Some(&caller.name), None, "OK", None)
                .await;
            let mut r = Redirect::to("/console/systems").into_response();
            if let Ok(v) = c.session_cookie_value(&id).parse() {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            Ok(r)
        }
        Err((e, name)) => {
            // Refusals are rate-limited in the trail, as every other refusal is.
            if broker.audit.admit_refusal() {
                let code = crate::error::code_name(e.code());
                let _ = broker
                    .audit_record("ConsoleSignIn", name.as_deref(), None, code, None)
                    .await;
            }
            let why = if e.code() == tonic::Code::PermissionDenied {
                "worker callers cannot sign in to the console; use an admin caller token".to_owned()
            } else {
                e.to_string()
            };
            let admin = certificate_admin(&c, names_of(&names));
            Ok(page(
                StatusCode::UNAUTHORIZED,
                pages::sign_in(Some(&Notice::Failed(why)), admin.as_deref()),
            ))
        }
    }
}

async fn sign_out(State(c): St, headers: HeaderMap, Form(f): Fields) -> Page {
    let s = c.signed_post(&headers, &f)?;
    c.sessions.end(&s.id);
    let broker = c.broker()?;
    let name = Some(s.session.caller_name.as_str());
    let _ = broker
        .audit_record("ConsoleSignOut", name, None, "OK", None)
        .await;
    let mut r = Redirect::to("/console/sign-in").into_response();
    let gone = format!("{}=; Path=/console; Max-Age=0", super::session::COOKIE);
    if let Ok(v) = gone.parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

/// Systems shown at most on one page of the table.
const MAX_LISTED: usize = 500;
/// `ListSystems` pages one view reads at most (each call audited): a filter that
/// matches little among many systems looks at the first `PAGE_SIZE` × this.
const MAX_PAGES: usize = 20;
/// Systems per `ListSystems` page the view asks for.
const PAGE_SIZE: usize = 500;

async fn systems(
    State(c): St,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Page {
    let s = c.signed(&headers)?;
    let kind = q.get("kind").map_or("", String::as_str);
    let state = q.get("state").map_or("", String::as_str);
    let want_kind =
        SystemKind::from_slug(kind).map(|k| crate::server::convert::kind_to_proto(k) as i32);
    let want_state = match state {
        "active" => Some(pb::SystemState::Active as i32),
        "pending" => Some(pb::SystemState::AuthorizationPending as i32),
        "reauth" => Some(pb::SystemState::ReauthorizationRequired as i32),
        _ => None,
    };
    let mut shown = Vec::new();
    let mut page_token = String::new();
    let mut more = false;
    for _ in 0..MAX_PAGES {
        let req = pb::ListSystemsRequest {
            page_size: PAGE_SIZE as u32,
            page_token,
        };
        let r = match c
            .call(&s, req, |svc, r| async move { svc.list_systems(r).await })
            .await
        {
            Ok(r) => r,
            Err(e) => return Ok(failed(&s, &e)),
        };
        shown.extend(r.systems.into_iter().filter(|x| {
            want_kind.is_none_or(|k| x.kind == k) && want_state.is_none_or(|st| x.state == st)
        }));
        more = !r.next_page_token.is_empty();
        if !more || shown.len() >= MAX_LISTED {
            break;
        }
        page_token = r.next_page_token;
    }
    more |= shown.len() > MAX_LISTED;
    shown.truncate(MAX_LISTED);
    let cut = more.then_some((MAX_LISTED, PAGE_SIZE * MAX_PAGES));
    Ok(ok(pages::systems(&s.ctx(), &shown, kind, state, cut)))
}

fn failed(s: &Signed, e: &tonic::Status) -> Response {
    page(
        status_code(e),
        pages::message("Could not load", Some(&s.ctx()), e.message()),
    )
}

/// The system's page with `note`, answered with `status`.
async fn system_page(
    c: &Console,
    s: &Signed,
    id: &str,
    note: Option<Notice>,
    status: StatusCode,
) -> Response {
    let req = pb::GetSystemRequest {
        system_id: id.to_owned(),
    };
    let sys = match c
        .call(s, req, |svc, r| async move { svc.get_system(r).await })
        .await
    {
        Ok(r) => r.system,
        Err(e) => return failed(s, &e),
    };
    let Some(sys) = sys else {
        return failed(s, &tonic::Status::not_found("no such system"));
    };
    let (events, audit) = match c.broker() {
        Ok(b) => {
            let file = b.audit.file_path().map(std::path::Path::to_path_buf);
            let tail = super::history::audit_tail(file, id.to_owned(), 20).await;
            (b.events.recent_for(id, 20), tail)
        }
        Err(_) => (Vec::new(), None),
    };
    let past = pages::Past {
        events: &events,
        audit: audit.as_deref(),
    };
    page(status, pages::system(&s.ctx(), &sys, note.as_ref(), &past))
}

async fn system(State(c): St, headers: HeaderMap, Path(id): Path<String>) -> Page {
    let s = c.signed(&headers)?;
    let note = c.take_outcome(&id);
    Ok(system_page(&c, &s, &id, note, StatusCode::OK).await)
}

/// The system's page after an action: its outcome as the notice.
async fn after(c: &Console, s: &Signed, id: &str, done: Result<String, tonic::Status>) -> Response {
    match done {
        Ok(m) => system_page(c, s, id, Some(Notice::Done(m)), StatusCode::OK).await,
        Err(e) => {
            let status = status_code(&e);
            system_page(
                c,
                s,
                id,
                Some(Notice::Failed(e.message().to_owned())),
                status,
            )
            .await
        }
    }
}

async fn check(State(c): St, headers: HeaderMap, Path(id): Path<String>, Form(f): Fields) -> Page {
    let s = c.signed_post(&headers, &f)?;
    let req = pb::CheckAuthenticationRequest {
        target: Some(pb::check_authentication_request::Target::SystemId(
            id.clone(),
        )),
    };
    let done = c
        .call(&s, req, |svc, r| async move {
            svc.check_authentication(r).await
        })
        .await
        .map(|r| match r.check {
            Some(ch) if ch.ok => format!("the check passed: {}", ch.message),
            Some(ch) => format!("the check ran and failed: {}", ch.message),
            None => "the check ran".to_owned(),
        });
    Ok(after(&c, &s, &id, done).await)
}

async fn rotate(State(c): St, headers: HeaderMap, Path(id): Path<String>, Form(f): Fields) -> Page {
    let s = c.signed_post(&headers, &f)?;
    let t = f.get("type").and_then(|t| forms::credential_type(t));
    let current = c
        .call(
            &s,
            pb::GetSystemRequest {
                system_id: id.clone(),
            },
            |svc, r| async move { svc.get_system(r).await },
        )
        .await
        .ok()
        .and_then(|r| r.system)
        .and_then(|x| crate::server::convert::credential_type(x.credential_type));
    let Some(t) = t.or(current) else {
        return Ok(after(&c, &s, &id, Err(tonic::Status::not_found("no such system"))).await);
    };
    let req = pb::RotateCredentialRequest {
        system_id: id.clone(),
        credential: Some(forms::credential(t, &f)),
        skip_check: f.contains_key("skip_check"),
    };
    let done = c
        .call(
            &s,
            req,
            |svc, r| async move { svc.rotate_credential(r).await },
        )
        .await
        .map(|r| {
            let v = r.system.map_or(0, |x| x.credential_version);
            format!("the credential was rotated (now version {v})")
        });
    Ok(after(&c, &s, &id, done).await)
}

async fn delivery(
    State(c): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Fields,
) -> Page {
    let s = c.signed_post(&headers, &f)?;
    let d = match f.get("delivery").map(String::as_str) {
        Some("proxy") => pb::Delivery::Proxy,
        _ => pb::Delivery::Header,
    };
    let req = pb::SetDeliveryRequest {
        system_id: id.clone(),
        delivery: d as i32,
    };
    let done = c
        .call(&s, req, |svc, r| async move { svc.set_delivery(r).await })
        .await
        .map(|_| {
            format!(
                "delivery is now {}",
                if d == pb::Delivery::Proxy {
                    "proxy"
                } else {
                    "header"
                }
            )
        });
    Ok(after(&c, &s, &id, done).await)
}

async fn delete(State(c): St, headers: HeaderMap, Path(id): Path<String>, Form(f): Fields) -> Page {
    let s = c.signed_post(&headers, &f)?;
    if f.get("confirm").map(|x| x.trim()) != Some(id.as_str()) {
        let e = tonic::Status::invalid_argument(
            "type the system id exactly to delete it; nothing was deleted",
        );
        return Ok(after(&c, &s, &id, Err(e)).await);
    }
    let req = pb::DeleteSystemRequest {
        system_id: id.clone(),
    };
    match c
        .call(&s, req, |svc, r| async move { svc.delete_system(r).await })
        .await
    {
        Ok(_) => Ok(ok(pages::message(
            "System deleted",
            Some(&s.ctx()),
            &format!("{id} was deleted."),
        ))),
        Err(e) => Ok(after(&c, &s, &id, Err(e)).await),
    }
}

async fn connect(
    State(c): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Fields,
) -> Page {
    let s = c.signed_post(&headers, &f)?;
    let req = pb::StartAuthorizationRequest {
        system_id: id.clone(),
    };
    match c
        .call(
            &s,
            req,
            |svc, r| async move { svc.start_authorization(r).await },
        )
        .await
    {
        Ok(r) => {
            let state = url::Url::parse(&r.authorize_url).ok().and_then(|u| {
                u.query_pairs()
                    .find(|(k, _)| k == "state")
                    .map(|(_, v)| v.into_owned())
            });
            if let Some(state) = state {
                c.remember_connect(state, &id);
            }
            Ok(Redirect::to(&r.authorize_url).into_response())
        }
        Err(e) => Ok(after(&c, &s, &id, Err(e)).await),
    }
}

fn chosen(
    q: &HashMap<String, String>,
) -> (Option<SystemKind>, Option<crate::model::CredentialType>) {
    let kind = q.get("kind").and_then(|k| SystemKind::from_slug(k));
    let t = q
        .get("type")
        .and_then(|t| forms::credential_type(t))
        .filter(|t| kind.is_some_and(|k| k.accepted_credentials().contains(t)));
    (kind, t)
}

async fn register_page(
    State(c): St,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Page {
    let s = c.signed(&headers)?;
    let (kind, t) = chosen(&q);
    Ok(ok(pages::register(
        &s.ctx(),
        kind,
        t,
        &pages::Kept::default(),
        None,
    )))
}

async fn register(State(c): St, headers: HeaderMap, Form(f): Fields) -> Page {
    let s = c.signed_post(&headers, &f)?;
    let (Some(kind), Some(t)) = chosen(&f) else {
        return Ok(ok(pages::register(
            &s.ctx(),
            None,
            None,
            &pages::Kept::default(),
            None,
        )));
    };
    let text = |k: &str| f.get(k).map_or("", |v| v.trim()).to_owned();
    let delivery = match f.get("delivery").map(String::as_str) {
        Some("proxy") => pb::Delivery::Proxy,
        Some("header") => pb::Delivery::Header,
        _ => pb::Delivery::Unspecified,
    };
    let req = pb::RegisterSystemRequest {
        system_id: text("system_id"),
        display_name: text("display_name"),
        description: text("description"),
        kind: crate::server::convert::kind_to_proto(kind) as i32,
        base_url: text("base_url"),
        credential: Some(forms::credential(t, &f)),
        check: f.contains_key("check"),
        delivery: delivery as i32,
    };
    match c
        .call(
            &s,
            req,
            |svc, r| async move { svc.register_system(r).await },
        )
        .await
    {
        Ok(r) => {
            let id = r.system.map(|x| x.system_id).unwrap_or_default();
            let m = match r.check {
                Some(ch) if ch.ok => format!("registered {id}; the check passed: {}", ch.message),
                Some(ch) => format!("registered {id}; the check failed: {}", ch.message),
                None => format!("registered {id} (not checked)"),
            };
            Ok(system_page(&c, &s, &id, Some(Notice::Done(m)), StatusCode::OK).await)
        }
        Err(e) => {
            let kept = pages::Kept {
                system_id: text("system_id"),
                display_name: text("display_name"),
                base_url: text("base_url"),
                description: text("description"),
            };
            let note = Notice::Failed(format!("not registered: {}", e.message()));
            Ok(page(
                status_code(&e),
                pages::register(&s.ctx(), Some(kind), Some(t), &kept, Some(&note)),
            ))
        }
    }
}

async fn callers_page(
    c: &Console,
    s: &Signed,
    created: Option<(&str, &str)>,
    note: Option<Notice>,
    status: StatusCode,
) -> Response {
    match c
        .call(s, pb::ListCallersRequest {}, |svc, r| async move {
            svc.list_callers(r).await
        })
        .await
    {
        Ok(r) => page(
            status,
            pages::callers(&s.ctx(), &r.callers, created, note.as_ref()),
        ),
        Err(e) => failed(s, &e),
    }
}

async fn callers(State(c): St, headers: HeaderMap) -> Page {
    let s = c.signed(&headers)?;
    Ok(callers_page(&c, &s, None, None, StatusCode::OK).await)
}

async fn create_caller(State(c): St, headers: HeaderMap, Form(f): Fields) -> Page {
    let s = c.signed_post(&headers, &f)?;
    let role = match f.get("role").map(String::as_str) {
        Some("admin") => pb::CallerRole::Admin,
        _ => pb::CallerRole::Worker,
    };
    let name = f.get("name").map_or("", |n| n.trim()).to_owned();
    let req = pb::CreateCallerRequest {
        name: name.clone(),
        role: role as i32,
        system_patterns: f
            .get("patterns")
            .map(|p| p.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
        ..Default::default()
    };
    match c
        .call(&s, req, |svc, r| async move { svc.create_caller(r).await })
        .await
    {
        Ok(r) => {
            let note = Notice::Done(format!("created caller {name}"));
            Ok(callers_page(&c, &s, Some((&name, &r.token)), Some(note), StatusCode::OK).await)
        }
        Err(e) => Ok(callers_page(
            &c,
            &s,
            None,
            Some(Notice::Failed(e.message().to_owned())),
            status_code(&e),
        )
        .await),
    }
}

async fn revoke_caller(
    State(c): St,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(f): Fields,
) -> Page {
    let s = c.signed_post(&headers, &f)?;
    let req = pb::RevokeCallerRequest { name: name.clone() };
    let (note, status) = match c
        .call(&s, req, |svc, r| async move { svc.revoke_caller(r).await })
        .await
    {
        Ok(_) => (
            Notice::Done(format!("revoked caller {name}")),
            StatusCode::OK,
        ),
        Err(e) => (Notice::Failed(e.message().to_owned()), status_code(&e)),
    };
    if name == s.session.caller_name && status == StatusCode::OK {
        // Revoking oneself ends this session too.
        return Ok(Redirect::to("/console/sign-in").into_response());
    }
    Ok(callers_page(&c, &s, None, Some(note), status).await)
}

async fn keys_page(c: &Console, s: &Signed, note: Option<Notice>, status: StatusCode) -> Response {
    match c
        .call(s, pb::GetKeyStatusRequest {}, |svc, r| async move {
            svc.get_key_status(r).await
        })
        .await
    {
        Ok(k) => page(status, pages::keys(&s.ctx(), &k, note.as_ref())),
        Err(e) => failed(s, &e),
    }
}

async fn keys(State(c): St, headers: HeaderMap) -> Page {
    let s = c.signed(&headers)?;
    Ok(keys_page(&c, &s, None, StatusCode::OK).await)
}

async fn rotate_key(State(c): St, headers: HeaderMap, Form(f): Fields) -> Page {
    let s = c.signed_post(&headers, &f)?;
    let (note, status) = match c
        .call(&s, pb::RotateMasterKeyRequest {}, |svc, r| async move {
            svc.rotate_master_key(r).await
        })
        .await
    {
        Ok(r) => (
            Notice::Done(format!(
                "the new primary key is {}; records are re-wrapped in the background",
                r.key_id
            )),
            StatusCode::OK,
        ),
        Err(e) => (Notice::Failed(e.message().to_owned()), status_code(&e)),
    };
    Ok(keys_page(&c, &s, Some(note), status).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A watch that fails (it fell behind the feed) or ends closes the console's feed at once,
    /// though the recheck ticks would go on for ever.
    #[tokio::test]
    async fn the_feed_ends_with_its_watch() {
        use tokio_stream::StreamExt;
        for watch in [vec![Ok(1), Err("fell behind"), Ok(2)], vec![Ok(1)]] {
            let feed = until_watch_ends(
                tokio_stream::iter(watch),
                std::time::Duration::from_millis(1),
            );
            let got: Vec<Option<i32>> =
                tokio::time::timeout(std::time::Duration::from_secs(5), feed.collect())
                    .await
                    .expect("the feed outlived its watch");
            assert!(got.contains(&Some(1)) && !got.contains(&Some(2)), "{got:?}");
        }
    }
}
