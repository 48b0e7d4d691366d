//! The `CredentialBroker` gRPC service: authenticate the caller, decode, call the core, encode,
//! and write one audit event per call. Policy (who may see what, header or lease) is the
//! domain's: handlers map its answers and errors.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use tonic::{Code, Request, Response, Status};

use super::convert;
use crate::broker::proxy::HandOut;
use crate::broker::watch::WatchFilter;
use crate::broker::{Broker, Caller, CallerScope, CheckTarget, Presented, RegisterInput};
use crate::error::BrokerError;
use crate::model::Role;
use crate::pb;
use crate::pb::credential_broker_server::CredentialBroker;

/// Marks an in-process call as made by a console session: the caller whose token hashes to
/// this. Request extensions never come from the network, so only the console can set it.
#[derive(Clone, Copy)]
pub struct ConsoleCaller(pub [u8; 32]);

/// Marks a request whose message was replaced, unread, by an empty one (see
/// `token_route::without_message`): its method refuses it whoever the caller turns out to be.
#[derive(Debug, Clone, Copy)]
pub(super) struct Unread;

impl std::fmt::Debug for ConsoleCaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsoleCaller(<redacted>)")
    }
}

/// The service; the core is set once the store is open and the key verified.
#[derive(Clone)]
pub struct BrokerService {
    core: Arc<OnceLock<Arc<Broker>>>,
    bearer_tokens: bool,
}

/// What a call adds to its audit event.
#[derive(Default)]
struct Audited {
    /// The system concerned, when the request did not name it (a generated id).
    system_id: Option<String>,
    /// The token handed out.
    token_id: Option<AuditedToken>,
    /// What an administrative call changed (see [`crate::audit::AuditEvent::detail`]).
    detail: Option<String>,
    /// A caller the call created: withdrawn if its token cannot be handed out (the audit line
    /// failed, fail-closed), so that no active caller is left whose token nobody holds.
    created_caller: Option<String>,
}

impl Audited {
    fn detail(detail: String) -> Self {
        Self {
            detail: Some(detail),
            ..Self::default()
        }
    }
}

/// A token handed out, as the audit trail records it (by HMAC).
enum AuditedToken {
    /// A one-off id (a lease, a caller token).
    Id(String),
    /// Cached headers, whose HMAC is computed once per mint, not once per hand-out.
    Issued(Arc<crate::broker::tokens::IssuedToken>),
}

impl BrokerService {
    /// A service whose core is filled in later through the shared cell.
    pub fn new(core: Arc<OnceLock<Arc<Broker>>>, bearer_tokens: bool) -> Self {
        Self {
            core,
            bearer_tokens,
        }
    }

    /// Authenticates the call (bearer token, or a verified client certificate's name under
    /// mTLS) and checks its role; on refusal returns the status and, when known, the caller's
    /// name.
    fn authn<T>(
        &self,
        broker: &Broker,
        req: &Request<T>,
        need: Role,
    ) -> Result<Arc<Caller>, (BrokerError, Option<String>)> {
        let authorization = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let ext = req.extensions();
        let (tls, console) = (ext.get::<super::tls::TlsConnectInfo>(), ext.get());
        let caller = self.authn_with(broker, authorization, tls, console, need)?;
        if ext.get::<Unread>().is_some() {
            // Refused before its message was read, known now (a caller created meanwhile): the
            // message it carries is a stand-in, never acted on.
            let retry = "the caller was not known when the call arrived; send it again";
            return Err((
                BrokerError::Unauthenticated(retry.to_owned()),
                Some(caller.name.clone()),
            ));
        }
        Ok(caller)
    }

    /// [`Self::authn`] on what a request presents: its `authorization` header, its connection's
    /// verified client certificate, a console session.
    fn authn_with(
        &self,
        broker: &Broker,
        authorization: Option<&str>,
        tls: Option<&super::tls::TlsConnectInfo>,
        console: Option<&ConsoleCaller>,
        need: Role,
    ) -> Result<Arc<Caller>, (BrokerError, Option<String>)> {
        let token = authorization
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let cert_names = tls
            .map(|i| i.client_names.as_slice())
            .filter(|n| !n.is_empty());
        let presented = match (token, cert_names) {
            (Some(token), _) => Presented::Token(token),
            (None, Some(names)) => Presented::Certificate(names),
            // Looked for last: the console's in-process calls carry neither.
            (None, None) => match console {
                Some(s) => Presented::Session(&s.0),
                None => Presented::Nothing,
            },
        };
        broker.callers.authn(presented, self.bearer_tokens, need)
    }

    /// True when a request to the service is refused whatever its message says: the broker is
    /// starting (UNAVAILABLE), or the request presents no caller the broker knows (no token, an
    /// unknown, revoked or expired one) or one without the role `need`.
    pub(super) fn refuses_unread<B>(
        &self,
        req: &tonic::codegen::http::Request<B>,
        need: Role,
    ) -> bool {
        let Some(broker) = self.core.get() else {
            return true;
        };
        let authorization = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let ext = req.extensions();
        let (tls, console) = (ext.get::<super::tls::TlsConnectInfo>(), ext.get());
        self.authn_with(broker, authorization, tls, console, need)
            .is_err()
    }

    /// Runs one RPC: authenticate, call, audit. `secret` RPCs hand out secrets and fail closed
    /// when the audit event cannot be written.
    ///
    /// The whole call, its audit event included, runs as a tracked task of its own: a caller
    /// that gives up (deadline, disconnect) after the change was committed cannot leave it
    /// half-applied (stored but still served from memory) or unaudited, and shutdown waits for
    /// it. (`GetAccessToken` does not come through here: its mint is detached on its own.)
    async fn run<Req, Resp, F, Fut>(
        &self,
        rpc: &'static str,
        need: Role,
        secret: bool,
        request: Request<Req>,
        system_of: fn(&Req) -> Option<String>,
        f: F,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Send + 'static,
        Resp: Send + 'static,
        F: FnOnce(Arc<Broker>, Arc<Caller>, Req) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(Resp, Audited), BrokerError>> + Send + 'static,
    {
        let me = self.clone();
        let call = async move {
            me.run_quiet(
                rpc,
                need,
                secret,
                request,
                system_of,
                |_, _| None::<()>,
                |b, c, r, _| f(b, c, r),
            )
            .await
        };
        match self.core.get() {
            // Starting: nothing can change yet.
            None => call.await,
            Some(broker) => broker
                .run_detached(call)
                .await
                .unwrap_or_else(|| Err(BrokerError::Internal("the call was interrupted").into())),
        }
    }

    /// `GetAccessToken`, answered as a [`convert::TokenAnswer`]: the route in
    /// [`super::token_route`] sends cached headers as the bytes encoded once per token. The
    /// authentication and request unwrapping in `run_quiet` happen before the future is built,
    /// so the future holds only what the call still needs.
    pub(super) fn token_answer(
        &self,
        request: Request<pb::GetAccessTokenRequest>,
    ) -> impl Future<Output = Result<Response<convert::TokenAnswer>, Status>> + Send + 'static {
        self.run_quiet(
            "GetAccessToken",
            Role::Worker,
            true,
            request,
            |r| Some(r.system_id.clone()),
            |b, r| b.answers_from_cache(&r.system_id, r.min_valid_seconds, &r.rejected_token_id),
            |broker, caller, r, warm| async move {
                let warm = warm.and_then(|t| broker.warm_for(&caller, &r.system_id, t));
                let token = match warm {
                    // Found in the cache a moment ago (no await since): the same answer
                    // `access_token_for` would give, without a second lookup.
                    Some(t) => t,
                    // Boxed: minting (an upstream call, maybe) is a future of a few KiB, and
                    // held inline it would make every warm call's future too big for the
                    // allocator's fast path.
                    _ => {
                        Box::pin(broker.access_token_for(
                            &caller,
                            &r.system_id,
                            r.min_valid_seconds,
                            Some(&r.rejected_token_id),
                        ))
                        .await?
                    }
                };
                let token = match broker.hand_out(&caller, &r.system_id, token)? {
                    HandOut::Headers(token) => token,
                    HandOut::Lease(lease) => {
                        let resp = pb::GetAccessTokenResponse {
                            headers: vec![pb::HttpHeader {
                                name: "authorization".to_owned(),
                                value: format!("Bearer {}", lease.authorization.expose_secret()),
                            }],
                            expires_at: Some(convert::ts_from(lease.expires_at)),
                            api_base_url: lease.api_base_url,
                            credential_version: lease.credential_version,
                            token_id: lease.lease_id.clone(),
                        };
                        let audited = Audited {
                            system_id: None,
                            token_id: Some(AuditedToken::Id(lease.lease_id)),
                            detail: None,
                            created_caller: None,
                        };
                        return Ok((convert::TokenAnswer::Message(Box::new(resp)), audited));
                    }
                };
                Ok((
                    convert::TokenAnswer::Issued(token.clone()),
                    Audited {
                        system_id: None,
                        token_id: Some(AuditedToken::Issued(token)),
                        detail: None,
                        created_caller: None,
                    },
                ))
            },
        )
    }

    /// [`Self::run`], without the request's tracing span when `quiet` finds the answer ready in
    /// memory (a warm `GetAccessToken`, which logs nothing): building a span costs about as much
    /// as the rest of the broker's own work on that path, and a span nothing is logged in shows
    /// up nowhere. What `quiet` found is handed to `f`, so the answer is looked up once.
    ///
    /// Authentication and unwrapping the request happen before the returned future is built, so
    /// the future (allocated once per call by the gRPC layer) holds the message, not the whole
    /// request, and stays small enough for the allocator's fast path.
    #[allow(clippy::too_many_arguments)]
    fn run_quiet<Req, Resp, Q, F, Fut>(
        &self,
        rpc: &'static str,
        need: Role,
        secret: bool,
        request: Request<Req>,
        system_of: fn(&Req) -> Option<String>,
        quiet: fn(&Broker, &Req) -> Option<Q>,
        f: F,
    ) -> impl Future<Output = Result<Response<Resp>, Status>>
    where
        F: FnOnce(Arc<Broker>, Arc<Caller>, Req, Option<Q>) -> Fut,
        Fut: Future<Output = Result<(Resp, Audited), BrokerError>>,
    {
        let started = std::time::Instant::now();
        let request_id = request_id(&request);
        let broker = self.core.get().cloned();
        let ready = broker.as_ref().and_then(|b| quiet(b, request.get_ref()));
        let span = if ready.is_some() {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                "rpc",
                rpc,
                request_id = request_id.to_str().unwrap_or_default()
            )
        };
        let mut system_id = system_of(request.get_ref()).filter(|s| !s.is_empty());
        let bad_id = system_id
            .as_deref()
            .and_then(|id| crate::broker::validate_system_id(id).err())
            .map(Box::new);
        if bad_id.is_some() {
            system_id = None;
        }
        let authorized = broker.map(|broker| {
            // A refusal is rare: boxed, it keeps the call's future small.
            let caller = span
                .in_scope(|| self.authn(&broker, &request, need))
                .map_err(Box::new);
            (broker, caller)
        });
        let call = Call {
            rpc,
            secret,
            system_id,
            bad_id,
            authorized,
        };
        tracing::Instrument::instrument(
            call.serve(started, request_id, request.into_inner(), ready, f),
            span,
        )
    }
}

/// One RPC past its synchronous start (request id, authentication).
struct Call {
    rpc: &'static str,
    secret: bool,
    system_id: Option<String>,
    /// Why the request's system id is outside the id grammar, if it is (boxed: rare, keeps the
    /// future small).
    bad_id: Option<Box<BrokerError>>,
    /// `None` while the broker is starting.
    authorized: Option<(Arc<Broker>, AuthResult)>,
}

type AuthResult = Result<Arc<Caller>, Box<(BrokerError, Option<String>)>>;

impl Call {
    /// Calls `f` if the caller was let in, writes the audit event either way, counts the outcome
    /// and echoes the request id on the answer. The one place a call's [`BrokerError`] becomes
    /// a gRPC status.
    async fn serve<Req, Resp, Q, F, Fut>(
        self,
        started: std::time::Instant,
        request_id: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
        message: Req,
        ready: Option<Q>,
        f: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(Arc<Broker>, Arc<Caller>, Req, Option<Q>) -> Fut,
        Fut: Future<Output = Result<(Resp, Audited), BrokerError>>,
    {
        let rpc = self.rpc;
        let result = 'call: {
            let Some((broker, caller)) = self.authorized else {
                break 'call Err(BrokerError::Unavailable(
                    "credbroker is starting; retry shortly".to_owned(),
                ));
            };
            let caller = match caller {
                Ok(c) => c,
                Err(refused) => {
                    let (s, name) = *refused;
                    // Boxed, as every rare await here: inline, its future would size every
                    // call's, past the allocator's per-thread cache (see token_route's test).
                    Box::pin(audit_refusal(
                        &broker,
                        rpc,
                        name.as_deref(),
                        self.system_id.as_deref(),
                        &s,
                    ))
                    .await;
                    break 'call Err(s);
                }
            };
            if let Some(e) = self.bad_id {
                // Checked before the id touches the trail, a map or the store.
                Box::pin(audit_refusal(&broker, rpc, Some(&caller.name), None, &e)).await;
                break 'call Err(*e);
            }
            let mut result = f(broker.clone(), caller.clone(), message, ready).await;
            let (code, generated, token, detail, created) = match &mut result {
                Ok((_, a)) => {
                    let created = a.created_caller.take();
                    (
                        Code::Ok,
                        a.system_id.take(),
                        a.token_id.take(),
                        a.detail.take(),
                        created,
                    )
                }
                Err(e) => (e.code(), None, None, None, None),
            };
            let hmac = match &token {
                Some(AuditedToken::Id(id)) => Some(std::borrow::Cow::Owned(broker.audit.hmac(id))),
                Some(AuditedToken::Issued(t)) => {
                    Some(std::borrow::Cow::Borrowed(t.audit_hmac(&broker.audit)))
                }
                None => None,
            };
            let written = broker
                .audit_record_with(
                    rpc,
                    Some(&caller.name),
                    generated.as_deref().or(self.system_id.as_deref()),
                    (
                        crate::error::code_name(code),
                        hmac.as_deref(),
                        detail.as_deref(),
                    ),
                )
                .await;
            if written.is_err() && self.secret && code == Code::Ok && broker.audit.fail_closed() {
                if let Some(name) = created {
                    Box::pin(broker.withdraw_caller(&name)).await;
                }
                break 'call Err(BrokerError::Unavailable(
                    "the audit trail cannot be written; refusing to hand out secrets until it recovers"
                        .to_owned(),
                ));
            }
            result.map(|(r, _)| Response::new(r))
        };
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(e) => e.code(),
        };
        crate::metrics::METRICS.rpc(rpc, code, started.elapsed());
        let mut result = result.map_err(Status::from);
        // Echo the id so a caller can quote it when asking about a failure.
        let metadata = match &mut result {
            Ok(r) => r.metadata_mut(),
            Err(s) => s.metadata_mut(),
        };
        metadata.insert(REQUEST_ID_KEY.clone(), request_id);
        result
    }
}

/// Audits a call refused before its handler ran: always when an authenticated caller made it
/// (a worker calling an admin RPC; the line names it, so a flood of anonymous refusals cannot
/// hide it, and it could write lines by its successful calls anyway), else within the refusal
/// rate limit (an expired token's refusal names its caller too, but whoever holds an old token
/// has no right to write the trail at will).
async fn audit_refusal(
    broker: &Broker,
    rpc: &str,
    caller: Option<&str>,
    system_id: Option<&str>,
    refused: &BrokerError,
) {
    let authenticated = caller.is_some() && refused.code() != tonic::Code::Unauthenticated;
    if authenticated || broker.audit.admit_refusal() {
        let code = crate::error::code_name(refused.code());
        let _ = broker
            .audit_record(rpc, caller, system_id, code, None)
            .await;
    }
}

/// The metadata key carrying a request id, in and out.
pub const REQUEST_ID: &str = "x-request-id";

/// [`REQUEST_ID`], parsed once.
static REQUEST_ID_KEY: std::sync::LazyLock<tonic::metadata::AsciiMetadataKey> =
    std::sync::LazyLock::new(|| tonic::metadata::AsciiMetadataKey::from_static(REQUEST_ID));

/// The caller's `x-request-id` when it is a sane token (1–64 of `[A-Za-z0-9._-]`), else a fresh
/// random one (16 hex digits). It tags every log line of the RPC, its upstream calls included.
fn request_id<T>(request: &Request<T>) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
    let given = request.metadata().get(&*REQUEST_ID_KEY).filter(|v| {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= 64
            && b.iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    });
    let mut id = match given {
        // A cheap clone: the bytes are shared.
        Some(v) => v.clone(),
        // Unique, not secret: the thread's generator, without a system call per call.
        None => tonic::metadata::MetadataValue::try_from(crate::util::random::cheap_hex_id::<8>())
            .unwrap_or_else(|_| tonic::metadata::MetadataValue::from_static("0000000000000000")),
    };
    // Sent as an HPACK "never indexed" literal: an id is new on every answer, so indexing it
    // only churns the connection's header table, and h2 compares each new value against every
    // indexed one of the same name (a few per cent of a warm GetAccessToken's CPU).
    id.set_sensitive(true);
    id
}

#[tonic::async_trait]
impl CredentialBroker for BrokerService {
    async fn register_system(
        &self,
        request: Request<pb::RegisterSystemRequest>,
    ) -> Result<Response<pb::RegisterSystemResponse>, Status> {
        self.run(
            "RegisterSystem",
            Role::Admin,
            false,
            request,
            |r| Some(r.system_id.clone()),
            |broker, _, r| async move {
                let input = RegisterInput {
                    system_id: r.system_id.trim().to_owned(),
                    display_name: r.display_name,
                    description: r.description,
                    kind: convert::kind(r.kind, "kind")?,
                    base_url: r.base_url,
                    credential: convert::credential(r.credential, "credential")?,
                    check: r.check,
                    delivery: convert::delivery(r.delivery)?,
                };
                // Detached: a password grant or login exchanged here must be stored even if
                // the admin's client gives up.
                let b = broker.clone();
                let (record, check) = broker
                    .run_detached(async move { b.register(input).await })
                    .await
                    .unwrap_or(Err(BrokerError::Internal("registration was interrupted")))?;
                let audited = Audited {
                    system_id: Some(record.system_id.clone()),
                    token_id: None,
                    detail: None,
                    created_caller: None,
                };
                Ok((
                    pb::RegisterSystemResponse {
                        system: Some(convert::system(&record)),
                        check: check.as_ref().map(convert::check),
                    },
                    audited,
                ))
            },
        )
        .await
    }

    async fn check_authentication(
        &self,
        request: Request<pb::CheckAuthenticationRequest>,
    ) -> Result<Response<pb::CheckAuthenticationResponse>, Status> {
        use pb::check_authentication_request::Target;
        let system_of = |r: &pb::CheckAuthenticationRequest| match &r.target {
            Some(Target::SystemId(id)) => Some(id.clone()),
            _ => None,
        };
        self.run(
            "CheckAuthentication",
            Role::Admin,
            false,
            request,
            system_of,
            |broker, _, r| async move {
                let target = match r.target {
                    Some(Target::SystemId(id)) => CheckTarget::Stored(id),
                    Some(Target::Candidate(c)) => CheckTarget::Candidate {
                        kind: convert::kind(c.kind, "candidate.kind")?,
                        base_url: c.base_url,
                        credential: convert::credential(c.credential, "candidate.credential")?,
                    },
                    None => {
                        return Err(BrokerError::invalid("target", "set system_id or candidate"))
                    }
                };
                let check = broker.check(target).await?;
                Ok((
                    pb::CheckAuthenticationResponse {
                        check: Some(convert::check(&check)),
                    },
                    Audited::default(),
                ))
            },
        )
        .await
    }

    // Over the network `GetAccessToken` is served by `token_route`, which shadows the generated
    // route; this is the same call, answered as a message, for callers of the trait. Written
    // out instead of `async fn` so that `token_answer` authenticates before the box is built.
    fn get_access_token<'life0, 'async_trait>(
        &'life0 self,
        request: Request<pb::GetAccessTokenRequest>,
    ) -> std::pin::Pin<
        Box<
            dyn Future<Output = Result<Response<pb::GetAccessTokenResponse>, Status>>
                + Send
                + 'async_trait,
        >,
    >
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let answer = self.token_answer(request);
        Box::pin(async move {
            answer
                .await
                .map(|r| r.map(convert::TokenAnswer::into_message))
        })
    }

    async fn rotate_credential(
        &self,
        request: Request<pb::RotateCredentialRequest>,
    ) -> Result<Response<pb::RotateCredentialResponse>, Status> {
        self.run(
            "RotateCredential",
            Role::Admin,
            false,
            request,
            |r| Some(r.system_id.clone()),
            |broker, _, r| async move {
                let credential = convert::credential(r.credential, "credential")?;
                let b = broker.clone();
                let id = r.system_id.trim().to_owned();
                let (record, check) = broker
                    .run_detached(async move { b.rotate(&id, credential, r.skip_check).await })
                    .await
                    .unwrap_or(Err(BrokerError::Internal("the rotation was interrupted")))?;
                Ok((
                    pb::RotateCredentialResponse {
                        system: Some(convert::system(&record)),
                        check: check.as_ref().map(convert::check),
                    },
                    Audited::default(),
                ))
            },
        )
        .await
    }

    async fn get_system(
        &self,
        request: Request<pb::GetSystemRequest>,
    ) -> Result<Response<pb::GetSystemResponse>, Status> {
        self.run(
            "GetSystem",
            Role::Admin,
            false,
            request,
            |r| Some(r.system_id.clone()),
            |broker, _, r| async move {
                let mut record = broker.get_system(r.system_id.trim()).await?;
                broker.add_live_state(&mut record);
                let quota = broker.quotas.view(&record.system_id);
                Ok((
                    pb::GetSystemResponse {
                        system: Some(convert::system_with_quota(&record, quota)),
                    },
                    Audited::default(),
                ))
            },
        )
        .await
    }

    async fn list_systems(
        &self,
        request: Request<pb::ListSystemsRequest>,
    ) -> Result<Response<pb::ListSystemsResponse>, Status> {
        self.run(
            "ListSystems",
            Role::Admin,
            false,
            request,
            |_| None,
            |broker, _, r| async move {
                let after = if r.page_token.is_empty() {
                    None
                } else {
                    Some(
                        URL_SAFE_NO_PAD
                            .decode(&r.page_token)
                            .ok()
                            .and_then(|b| String::from_utf8(b).ok())
                            .ok_or_else(|| {
                                BrokerError::invalid(
                                    "page_token",
                                    "is not a token this server issued",
                                )
                            })?,
                    )
                };
                let (mut page, more) = broker
                    .list_systems(after.as_deref(), r.page_size as usize)
                    .await?;
                page.iter_mut().for_each(|s| broker.add_live_state(s));
                let next_page_token = match (more, page.last()) {
                    (true, Some(last)) => URL_SAFE_NO_PAD.encode(last.system_id.as_bytes()),
                    _ => String::new(),
                };
                Ok((
                    pb::ListSystemsResponse {
                        systems: page
                            .iter()
                            .map(|r| {
                                convert::system_with_quota(r, broker.quotas.view(&r.system_id))
                            })
                            .collect(),
                        next_page_token,
                    },
                    Audited::default(),
                ))
            },
        )
        .await
    }

    async fn delete_system(
        &self,
        request: Request<pb::DeleteSystemRequest>,
    ) -> Result<Response<pb::DeleteSystemResponse>, Status> {
        self.run(
            "DeleteSystem",
            Role::Admin,
            false,
            request,
            |r| Some(r.system_id.clone()),
            |broker, _, r| async move {
                broker.delete_system(r.system_id.trim()).await?;
                Ok((pb::DeleteSystemResponse {}, Audited::default()))
            },
        )
        .await
    }

    async fn create_caller(
        &self,
        request: Request<pb::CreateCallerRequest>,
    ) -> Result<Response<pb::CreateCallerResponse>, Status> {
        self.run("CreateCaller", Role::Admin, true, request, |_| None, |broker, caller, r| async move {
            let role = convert::role(r.role)?;
            let kinds = r
                .kinds
                .iter()
                .map(|k| convert::kind(*k, "kinds"))
                .collect::<Result<Vec<_>, _>>()
                ?;
            let scope = CallerScope {
                system_patterns: r.system_patterns.iter().map(|p| p.trim().to_owned()).collect(),
                kinds,
                expires_at: r.expires_at.map(|t| t.seconds.max(0) as u64),
            };
            let (record, token) = broker.create_caller(r.name.trim(), role, scope).await?;
            tracing::info!(message = "Caller created.", caller = %record.name, role = %record.role, by = %caller.name);
            let mut detail = format!("caller={} role={}", record.name, record.role);
            if !record.kinds.is_empty() {
                let kinds: Vec<&str> = record.kinds.iter().map(|k| k.slug()).collect();
                detail.push_str(&format!(" kinds={}", kinds.join(",")));
            }
            if !record.system_patterns.is_empty() {
                detail.push_str(&format!(" patterns={}", record.system_patterns.len()));
            }
            if let Some(at) = record.expires_at {
                detail.push_str(&format!(" expires_at={at}"));
            }
            let audited = Audited {
                created_caller: Some(record.name.clone()),
                ..Audited::detail(detail)
            };
            Ok((
                pb::CreateCallerResponse { caller: Some(convert::caller(&record)), token: token.expose_secret().to_owned() },
                audited,
            ))
        })
        .await
    }

    async fn list_callers(
        &self,
        request: Request<pb::ListCallersRequest>,
    ) -> Result<Response<pb::ListCallersResponse>, Status> {
        self.run(
            "ListCallers",
            Role::Admin,
            false,
            request,
            |_| None,
            |broker, _, _| async move {
                let callers = broker.list_callers().await?;
                Ok((
                    pb::ListCallersResponse {
                        callers: callers.iter().map(convert::caller).collect(),
                    },
                    Audited::default(),
                ))
            },
        )
        .await
    }

    async fn revoke_caller(
        &self,
        request: Request<pb::RevokeCallerRequest>,
    ) -> Result<Response<pb::RevokeCallerResponse>, Status> {
        self.run("RevokeCaller", Role::Admin, false, request, |_| None, |broker, caller, r| async move {
            let record = broker.revoke_caller(r.name.trim()).await?;
            tracing::info!(message = "Caller revoked.", caller = %record.name, by = %caller.name);
            let detail = Audited::detail(format!("caller={}", record.name));
            Ok((pb::RevokeCallerResponse { caller: Some(convert::caller(&record)) }, detail))
        })
        .await
    }

    async fn start_authorization(
        &self,
        request: Request<pb::StartAuthorizationRequest>,
    ) -> Result<Response<pb::StartAuthorizationResponse>, Status> {
        self.run(
            "StartAuthorization",
            Role::Admin,
            false,
            request,
            |r| Some(r.system_id.clone()),
            |broker, _, r| async move {
                let (url, expires, redirect) =
                    broker.start_authorization(r.system_id.trim()).await?;
                Ok((
                    pb::StartAuthorizationResponse {
                        authorize_url: url,
                        expires_at: Some(convert::ts_from(expires)),
                        redirect_uri: redirect,
                    },
                    Audited::default(),
                ))
            },
        )
        .await
    }

    async fn rotate_master_key(
        &self,
        request: Request<pb::RotateMasterKeyRequest>,
    ) -> Result<Response<pb::RotateMasterKeyResponse>, Status> {
        self.run(
            "RotateMasterKey",
            Role::Admin,
            false,
            request,
            |_| None,
            |broker, _, _| async move {
                // Detached: a rotation that has begun writing keys finishes.
                let b = broker.clone();
                let id = broker
                    .run_detached(async move { b.rotate_master_key().await })
                    .await
                    .unwrap_or(Err(BrokerError::Internal(
                        "the key rotation was interrupted",
                    )))?;
                Ok((
                    pb::RotateMasterKeyResponse {
                        key_id: format!("{id:08x}"),
                    },
                    Audited::detail(format!("key={id:08x}")),
                ))
            },
        )
        .await
    }

    async fn get_key_status(
        &self,
        request: Request<pb::GetKeyStatusRequest>,
    ) -> Result<Response<pb::GetKeyStatusResponse>, Status> {
        self.run(
            "GetKeyStatus",
            Role::Admin,
            false,
            request,
            |_| None,
            |broker, _, _| async move {
                let st = broker.key_status().await?;
                let on_primary = st
                    .keys
                    .iter()
                    .find(|k| k.primary)
                    .map(|k| k.records)
                    .unwrap_or(0);
                Ok((
                    pb::GetKeyStatusResponse {
                        primary_key_id: format!("{:08x}", st.primary),
                        keys: st
                            .keys
                            .iter()
                            .map(|k| pb::KeyInfo {
                                key_id: format!("{:08x}", k.id),
                                primary: k.primary,
                                root: k.root,
                                records: k.records,
                            })
                            .collect(),
                        rewrap_running: st.rewrap_running,
                        records_total: st.total,
                        records_on_primary: on_primary,
                    },
                    Audited::default(),
                ))
            },
        )
        .await
    }

    async fn retire_key(
        &self,
        request: Request<pb::RetireKeyRequest>,
    ) -> Result<Response<pb::RetireKeyResponse>, Status> {
        self.run(
            "RetireKey",
            Role::Admin,
            false,
            request,
            |_| None,
            |broker, _, r| async move {
                // The id as the retirement parsed it (the request's text may be padded).
                let id = broker.retire_key(&r.key_id).await?;
                let detail = Audited::detail(format!("key={id:08x}"));
                Ok((pb::RetireKeyResponse {}, detail))
            },
        )
        .await
    }

    type WatchSystemsStream = EventStream;

    async fn watch_systems(
        &self,
        request: Request<pb::WatchSystemsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.run(
            "WatchSystems",
            Role::Worker,
            false,
            request,
            |_| None,
            |broker, caller, r| async move {
                let after = Some(r.after.trim()).filter(|a| !a.is_empty());
                let filter = WatchFilter {
                    system_ids: r.system_ids.iter().map(|s| s.trim().to_owned()).collect(),
                    kinds: r
                        .kinds
                        .iter()
                        .map(|k| convert::kind(*k, "kinds"))
                        .collect::<Result<_, _>>()?,
                };
                let start = broker.watch(&caller, &filter, after).await?;
                Ok((
                    event_stream(broker, caller, filter, start),
                    Audited::default(),
                ))
            },
        )
        .await
    }

    async fn set_delivery(
        &self,
        request: Request<pb::SetDeliveryRequest>,
    ) -> Result<Response<pb::SetDeliveryResponse>, Status> {
        self.run(
            "SetDelivery",
            Role::Admin,
            false,
            request,
            |r| Some(r.system_id.clone()),
            |broker, _, r| async move {
                let delivery = convert::delivery(r.delivery)?;
                let record = broker.set_delivery(r.system_id.trim(), delivery).await?;
                let detail = format!("delivery={}", record.delivery.as_str());
                Ok((
                    pb::SetDeliveryResponse {
                        system: Some(convert::system(&record)),
                    },
                    Audited::detail(detail),
                ))
            },
        )
        .await
    }

    type ExportBackupStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::BackupChunk, Status>> + Send + 'static>,
    >;

    async fn export_backup(
        &self,
        request: Request<pb::ExportBackupRequest>,
    ) -> Result<Response<Self::ExportBackupStream>, Status> {
        self.run(
            "ExportBackup",
            Role::Admin,
            true,
            request,
            |_| None,
            |broker, _, _| async move {
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                tokio::spawn(async move { broker.export_backup(tx).await });
                let stream = tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                    |item| {
                        item.map(|chunk| pb::BackupChunk { chunk })
                            .map_err(Status::from)
                    },
                );
                Ok((
                    Box::pin(stream) as Self::ExportBackupStream,
                    Audited::default(),
                ))
            },
        )
        .await
    }

    async fn restore_backup(
        &self,
        request: Request<tonic::Streaming<pb::BackupChunk>>,
    ) -> Result<Response<pb::RestoreBackupResponse>, Status> {
        self.run(
            "RestoreBackup",
            Role::Admin,
            false,
            request,
            |_| None,
            |broker, _, mut stream| async move {
                let mut chunks = Vec::new();
                let mut total = 0usize;
                // A stream the server cannot read (too large, undecodable, cut short) is bad
                // input; a transport that failed is retryable. (A client that cancels usually
                // just ends the stream: the restore then refuses the truncated backup.)
                let broke_off = |s: Status| {
                    let why = format!("the backup stream broke off: {}", s.message());
                    match s.code() {
                        Code::Cancelled | Code::DeadlineExceeded => BrokerError::Cancelled(why),
                        Code::Unavailable => BrokerError::Unavailable(why),
                        _ => BrokerError::invalid("chunk", why),
                    }
                };
                while let Some(msg) = stream.message().await.map_err(broke_off)? {
                    total += msg.chunk.len();
                    if total > MAX_RESTORE_BYTES {
                        return Err(BrokerError::invalid(
                            "chunk",
                            format!("the backup is larger than {MAX_RESTORE_BYTES} bytes"),
                        ));
                    }
                    chunks.push(msg.chunk);
                }
                let s = broker.restore_backup(&chunks).await?;
                Ok((
                    pb::RestoreBackupResponse {
                        systems_restored: s.systems_restored,
                        systems_skipped: s.systems_skipped,
                        callers_restored: s.callers_restored,
                        callers_skipped: s.callers_skipped,
                    },
                    Audited::default(),
                ))
            },
        )
        .await
    }
}

/// The largest backup `RestoreBackup` accepts (about a million systems).
const MAX_RESTORE_BYTES: usize = 1024 * 1024 * 1024;

/// True when `caller` is no longer the active caller of that name with that scope.
fn caller_changed(broker: &Broker, caller: &Caller) -> bool {
    match broker.callers.by_name(&caller.name) {
        Some(now) => {
            now.role != caller.role
                || now.system_patterns != caller.system_patterns
                || now.kinds != caller.kinds
        }
        None => true,
    }
}

/// The events of one watch, as gRPC messages.
pub type EventStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::SystemEvent, Status>> + Send>>;

/// The opening events (a snapshot read page by page as the client takes it, or the events
/// after its cursor), then every matching live event until shutdown. A watcher that falls
/// behind the live feed is ended with UNAVAILABLE and resumes from its last cursor.
fn event_stream(
    broker: Arc<Broker>,
    caller: Arc<Caller>,
    filter: WatchFilter,
    start: crate::broker::watch::WatchStart,
) -> EventStream {
    use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
    use tokio_stream::StreamExt;
    let admin = caller.role == Role::Admin;
    let at = start.at;
    let b = broker.clone();
    let head = tokio_stream::iter(start.missed)
        .map(move |e| Ok(convert::event(&e, b.events.cursor(e.seq), admin)));
    let (b, c, f) = (broker.clone(), caller.clone(), filter.clone());
    let live = tokio_stream::wrappers::BroadcastStream::new(start.live).filter_map(move |item| {
        match item {
            // A cursor ahead of this replica's log starts the feed after it.
            Ok(e) if e.seq > at && f.admits(&c, &e.system) => {
                Some(Ok(convert::event(&e, b.events.cursor(e.seq), admin)))
            }
            Ok(_) => None,
            Err(BroadcastStreamRecvError::Lagged(_)) => Some(Err(Status::unavailable(
                "this watch fell behind the event feed; watch again with `after` set to the last \
                 cursor received",
            ))),
        }
    });
    // Forwarded by a task that also watches for shutdown, for the client going away, and for
    // the caller being revoked, expiring or re-scoped (checked every few seconds).
    let (tx, out) = tokio::sync::mpsc::channel(64);
    let snapshot = start.snapshot;
    let backlog = start.backlog;
    let slot = start.slot;
    tokio::spawn(async move {
        let _slot = slot;
        let closed = broker.events.closed();
        let mut closed = std::pin::pin!(closed);
        // The snapshot and the backlog may read every system or event without sending one (a
        // narrow filter): a client that went away meanwhile ends them, and frees its slot.
        if snapshot {
            let sent = send_snapshot(&broker, &caller, &filter, at, &tx, admin);
            tokio::select! {
                _ = &mut closed => return,
                _ = tx.closed() => return,
                ok = sent => if !ok { return },
            }
        }
        if let Some(range) = backlog {
            let sent = send_backlog(&broker, &caller, &filter, range, &tx, admin);
            tokio::select! {
                _ = &mut closed => return,
                _ = tx.closed() => return,
                ok = sent => if !ok { return },
            }
        }
        let mut events = std::pin::pin!(head.chain(live));
        let mut recheck = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            let item = tokio::select! {
                _ = &mut closed => break,
                _ = tx.closed() => break,
                _ = recheck.tick() => {
                    if caller_changed(&broker, &caller) {
                        let _ = tx.try_send(Err(Status::permission_denied(
                            "the caller was revoked, expired or re-scoped; watch again",
                        )));
                        break;
                    }
                    continue;
                }
                item = events.next() => match item {
                    Some(item) => item,
                    None => break,
                },
            };
            let last = item.is_err();
            tokio::select! {
                _ = &mut closed => break,
                sent = tx.send(item) => if sent.is_err() || last { break },
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))
}

/// False (after telling the client) when the caller was revoked, expired or re-scoped since
/// the watch opened.
async fn still_allowed(
    broker: &Broker,
    caller: &Caller,
    tx: &tokio::sync::mpsc::Sender<Result<pb::SystemEvent, Status>>,
) -> bool {
    if !caller_changed(broker, caller) {
        return true;
    }
    let _ = tx
        .send(Err(Status::permission_denied(
            "the caller was revoked, expired or re-scoped; watch again",
        )))
        .await;
    false
}

/// Sends the matching events of the store's log in `(after, upto]`, a page at a time (a resume
/// from further back than memory holds). False when the watch ended.
async fn send_backlog(
    broker: &Broker,
    caller: &Caller,
    filter: &WatchFilter,
    (mut after, upto): (u64, u64),
    tx: &tokio::sync::mpsc::Sender<Result<pb::SystemEvent, Status>>,
    admin: bool,
) -> bool {
    while after < upto {
        if !still_allowed(broker, caller, tx).await {
            return false;
        }
        let page = match broker.store.events_after(after, 256).await {
            // The store trims its log while a slow reader pages through it: a gap is said.
            Ok(page) if page.first().is_some_and(|e| e.seq != after + 1) => {
                let _ = tx
                    .send(Err(Status::out_of_range(
                        "the store's event log moved past this watch while it was catching up; \
                         watch again without `after` for a fresh snapshot",
                    )))
                    .await;
                return false;
            }
            Ok(page) if !page.is_empty() => page,
            Ok(_) => return true,
            Err(e) => {
                let _ = tx.send(Err(BrokerError::from(e).into())).await;
                return false;
            }
        };
        for stored in page.iter().take_while(|e| e.seq <= upto) {
            after = stored.seq;
            let Some(e) = crate::broker::events::Event::decode(stored) else {
                continue;
            };
            if filter.admits(caller, &e.system) {
                let item = Ok(convert::event(&e, broker.events.cursor(e.seq), admin));
                if tx.send(item).await.is_err() {
                    return false;
                }
            }
        }
        if page.last().is_some_and(|e| e.seq >= upto) {
            return true;
        }
    }
    true
}

/// Sends one snapshot event per matching system, a page at a time (at most one page and the
/// channel's 64 events in memory, however many systems there are). False when the watch ended.
async fn send_snapshot(
    broker: &Broker,
    caller: &Caller,
    filter: &WatchFilter,
    at: u64,
    tx: &tokio::sync::mpsc::Sender<Result<pb::SystemEvent, Status>>,
    admin: bool,
) -> bool {
    let mut pages = broker.system_pages(crate::broker::SCAN_PAGE);
    loop {
        if !still_allowed(broker, caller, tx).await {
            return false;
        }
        let page = match pages.next().await {
            Ok(Some(page)) => page,
            Ok(None) => return true,
            Err(e) => {
                let _ = tx.send(Err(BrokerError::from(e).into())).await;
                return false;
            }
        };
        for r in page.iter().filter(|r| filter.admits(caller, r)) {
            let e = broker.events.snapshot(r, at);
            let item = Ok(convert::event(&e, broker.events.cursor(at), admin));
            if tx.send(item).await.is_err() {
                return false;
            }
        }
    }
}
