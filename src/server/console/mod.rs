//! The admin console: pages under `/console` on the HTTP listener, for the admins who set up a
//! sync. Every action is the same call as its RPC: the console calls the gRPC service in
//! process, as the signed-in caller (a `ConsoleCaller` in the request's extensions, which only
//! this process can set), so validation, authorization, auditing and error mapping are the
//! RPC's own.
//!
//! - **Sign-in** with an admin caller token; the session ([`session`]) is a random id in an
//!   HttpOnly, SameSite=Strict cookie (Secure under TLS), idle and absolute expiry, and ends
//!   when the caller is revoked (each request looks the caller up again). Worker tokens are
//!   refused.
//! - **Forms**: every state-changing form carries the session's CSRF token; a cross-site POST
//!   (by `Sec-Fetch-Site` or `Origin`) is refused before the session is even read.
//! - **Headers**: a Content-Security-Policy allowing only the console's own script file (the
//!   live events view; no inline script, no eval), `frame-ancestors 'none'`,
//!   `no-store` caching, `nosniff`, no referrer beyond the origin. Every asset is in the binary.
//! - **Secrets** are write-only: credential inputs are password fields that start empty, and
//!   no page, error or redirect renders one.

// A handler's `Err` is the response to send instead (the sign-in redirect, a refusal): built
// at most once per request, so its size costs nothing worth a box.
#![allow(clippy::result_large_err)]

mod forms;
mod handlers;
mod history;
mod pages;
pub mod session;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use tonic::Request;

use crate::broker::Broker;
use crate::server::broker_svc::{BrokerService, ConsoleCaller};
use crate::util::sync::lock;
use session::{Session, Sessions};

/// How the console runs.
#[derive(Debug, Clone)]
pub struct ConsoleSettings {
    /// A session unused this long is over.
    pub idle: Duration,
    /// A session is over this long after sign-in.
    pub absolute: Duration,
    /// The listener has TLS, or the public URL is `https` (TLS in front): the cookie is
    /// `Secure`.
    pub secure_cookie: bool,
    /// Caller tokens are accepted (off: client certificates only, and no token sign-in).
    pub bearer_tokens: bool,
}

/// Authorizations started from the console are remembered this long (the callback sends the
/// admin back to the system's page).
const CONNECT_TTL: Duration = Duration::from_secs(15 * 60);
/// Connects remembered at most.
const MAX_CONNECTS: usize = 256;

/// Finished connects' outcomes not yet shown, per system: the newest per system, each for
/// [`CONNECT_TTL`], at most [`MAX_CONNECTS`] at once.
#[derive(Default)]
struct Outcomes(HashMap<String, (bool, String, Instant)>);

impl Outcomes {
    fn keep(&mut self, system_id: &str, ok: bool, message: &str, now: Instant) {
        self.0
            .retain(|_, (_, _, at)| now.duration_since(*at) < CONNECT_TTL);
        if self.0.len() < MAX_CONNECTS || self.0.contains_key(system_id) {
            self.0
                .insert(system_id.to_owned(), (ok, message.to_owned(), now));
        }
    }

    fn take(&mut self, system_id: &str, now: Instant) -> Option<(bool, String)> {
        let (ok, m, at) = self.0.remove(system_id)?;
        (now.duration_since(at) < CONNECT_TTL).then_some((ok, m))
    }
}

/// The console's state.
pub struct Console {
    svc: BrokerService,
    core: Arc<OnceLock<Arc<Broker>>>,
    sessions: Sessions,
    settings: ConsoleSettings,
    /// The OAuth `state` of each authorization the console started: its system, and when.
    connects: Mutex<HashMap<String, (String, Instant)>>,
    /// A finished connect's outcome, per system, shown once on its page (for a while).
    outcomes: Mutex<Outcomes>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

/// A request's signed-in session.
pub(crate) struct Signed {
    id: String,
    session: Session,
}

impl Signed {
    fn ctx(&self) -> pages::Ctx<'_> {
        pages::Ctx {
            name: &self.session.caller_name,
            csrf: &self.session.csrf,
        }
    }
}

impl Console {
    /// The console over the broker in `core`.
    pub fn new(core: Arc<OnceLock<Arc<Broker>>>, settings: ConsoleSettings) -> Arc<Self> {
        Arc::new(Self {
            svc: BrokerService::new(core.clone(), settings.bearer_tokens),
            core,
            sessions: Sessions::new(settings.idle, settings.absolute),
            settings,
            connects: Mutex::default(),
            outcomes: Mutex::default(),
        })
    }

    fn broker(&self) -> Result<&Arc<Broker>, Response> {
        self.core.get().ok_or_else(|| {
            page(
                StatusCode::SERVICE_UNAVAILABLE,
                pages::message(
                    "Starting",
                    None,
                    "credbroker is starting; reload in a moment.",
                ),
            )
        })
    }

    /// The request's session, if it is live and its caller still an active admin; else the
    /// way to the sign-in page.
    fn signed(&self, headers: &HeaderMap) -> Result<Signed, Response> {
        let to_sign_in = || Redirect::to("/console/sign-in").into_response();
        // Another host of the same site can plant a cookie of the same name that the browser
        // sends first: the first few are tried, not only the first.
        let (id, session) = session_cookies(headers)
            .take(MAX_SESSION_COOKIES)
            .find_map(|id| self.sessions.get(id).map(|s| (id, s)))
            .ok_or_else(to_sign_in)?;
        let broker = self.broker()?;
        let presented = crate::broker::callers::Presented::Session(&session.caller_hash);
        if broker
            .callers
            .authn(presented, true, crate::model::Role::Admin)
            .is_err()
        {
            self.sessions.end(id);
            return Err(to_sign_in());
        }
        Ok(Signed {
            id: id.to_owned(),
            session,
        })
    }

    /// [`Self::signed`] for a state-changing form: same-site, with the session's CSRF token.
    fn signed_post(
        &self,
        headers: &HeaderMap,
        form: &HashMap<String, String>,
    ) -> Result<Signed, Response> {
        same_site(headers)?;
        let s = self.signed(headers)?;
        let presented = form.get("csrf").map_or("", String::as_str);
        if !s.session.csrf_ok(presented) {
            return Err(refused_form());
        }
        Ok(s)
    }

    /// Calls the RPC `f` in process as the session's caller.
    async fn call<Req, Resp, F, Fut>(
        &self,
        s: &Signed,
        message: Req,
        f: F,
    ) -> Result<Resp, tonic::Status>
    where
        F: FnOnce(BrokerService, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let mut r = Request::new(message);
        r.extensions_mut()
            .insert(ConsoleCaller(s.session.caller_hash));
        f(self.svc.clone(), r)
            .await
            .map(tonic::Response::into_inner)
    }

    /// True while the session `id` is live and its caller still an active admin.
    fn still_signed(&self, id: &str, caller_hash: &[u8; 32]) -> bool {
        let presented = crate::broker::callers::Presented::Session(caller_hash);
        self.sessions.is_live(id)
            && self.core.get().is_some_and(|b| {
                !b.draining.load(std::sync::atomic::Ordering::Relaxed)
                    && b.callers
                        .authn(presented, true, crate::model::Role::Admin)
                        .is_ok()
            })
    }

    fn remember_connect(&self, state: String, system_id: &str) {
        let now = Instant::now();
        let mut c = lock(&self.connects);
        c.retain(|_, (_, at)| now.duration_since(*at) < CONNECT_TTL);
        if c.len() < MAX_CONNECTS {
            c.insert(state, (system_id.to_owned(), now));
        }
    }

    /// When the console started the authorization `state` belongs to: the outcome is kept for
    /// the system's page, whose path is returned (the callback page leads the browser there:
    /// a navigation from the broker's own page, so the SameSite=Strict cookie goes along,
    /// which a redirect at the end of the vendor's chain would not take).
    pub fn connect_finished(&self, state: &str, ok: bool, message: &str) -> Option<String> {
        let (system_id, _) = lock(&self.connects).remove(state)?;
        lock(&self.outcomes).keep(&system_id, ok, message, Instant::now());
        Some(format!("/console/systems/{system_id}"))
    }

    fn take_outcome(&self, system_id: &str) -> Option<pages::Notice> {
        let (ok, m) = lock(&self.outcomes).take(system_id, Instant::now())?;
        Some(if ok {
            pages::Notice::Done(format!("connected. {m}"))
        } else {
            pages::Notice::Failed(format!("the connection failed. {m}"))
        })
    }

    fn session_cookie_value(&self, id: &str) -> String {
        let secure = if self.settings.secure_cookie {
            "; Secure"
        } else {
            ""
        };
        format!(
            "{}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            session::COOKIE,
            self.settings.absolute.as_secs()
        )
    }
}

/// The values of the request's session cookies, in the order sent.
fn session_cookies(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .filter(|(k, v)| *k == session::COOKIE && !v.is_empty())
        .map(|(_, v)| v)
}

/// Session cookies of the console's name tried per request.
const MAX_SESSION_COOKIES: usize = 4;

/// Refuses a POST another site made the browser send.
fn same_site(headers: &HeaderMap) -> Result<(), Response> {
    let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if matches!(fetch_site, Some("cross-site" | "same-site")) {
        return Err(refused_form());
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    match (origin, host) {
        (Some(o), Some(h)) if o != "null" => {
            let authority = o.split_once("://").map_or("", |(_, a)| a);
            if authority.eq_ignore_ascii_case(h) {
                Ok(())
            } else {
                Err(refused_form())
            }
        }
        (Some("null"), _) if fetch_site == Some("same-origin") => Ok(()),
        (Some(_), _) => Err(refused_form()),
        (None, _) => Ok(()),
    }
}

fn refused_form() -> Response {
    page(
        StatusCode::FORBIDDEN,
        pages::message(
            "Form refused",
            None,
            "This form was stale or came from another site, so nothing was changed. Reload \
             the page and try again.",
        ),
    )
}

/// A rendered page with a status.
fn page(status: StatusCode, markup: maud::Markup) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response()
}

/// The headers every console response carries.
async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    let set = [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; \
             img-src 'self'; base-uri 'none'; frame-ancestors 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        // Not `no-referrer`: under it a browser sends `Origin: null` with same-origin forms.
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    for (k, v) in set {
        h.insert(k, HeaderValue::from_static(v));
    }
    r
}

/// The console's routes.
pub fn router(console: Arc<Console>) -> axum::Router {
    handlers::routes()
        .layer(axum::middleware::map_response(security_headers))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(console)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outcome nobody looked at goes after a while, so a full book of them does not keep
    /// new ones out for ever; a system's newest outcome replaces its older one.
    #[test]
    fn unseen_outcomes_expire_and_the_newest_wins() {
        let mut book = Outcomes::default();
        let t0 = Instant::now();
        for i in 0..MAX_CONNECTS {
            book.keep(&format!("s{i}"), true, "old", t0);
        }
        book.keep("late", true, "kept?", t0);
        book.keep("s1", false, "newer", t0);
        assert_eq!(book.0.len(), MAX_CONNECTS);
        assert!(!book.0.contains_key("late"), "the book is full");
        assert_eq!(
            book.0["s1"].1, "newer",
            "a full book still takes a system's newest"
        );
        let later = t0 + CONNECT_TTL;
        book.keep("fresh", true, "fresh", later);
        assert_eq!(book.take("fresh", later), Some((true, "fresh".to_owned())));
        assert_eq!(book.take("s2", later), None, "expired");

        let mut book = Outcomes::default();
        book.keep("s1", true, "old", t0);
        book.keep("s1", false, "newer", t0);
        assert_eq!(book.take("s1", t0), Some((false, "newer".to_owned())));
    }
}
