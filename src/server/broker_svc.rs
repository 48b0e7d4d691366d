//! The `CredentialBroker` gRPC service: authenticate the caller, decode, call the core, encode.
//! No business logic lives here.

use std::sync::{Arc, OnceLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use tonic::{Request, Response, Status};

use super::convert;
use crate::broker::{AuthRefusal, Broker, Caller, CallerScope, CheckTarget, RegisterInput};
use crate::error::BrokerError;
use crate::model::Role;
use crate::pb;
use crate::pb::credential_broker_server::CredentialBroker;

/// The service; the core is set once the store is open and the key verified.
#[derive(Clone)]
pub struct BrokerService {
    core: Arc<OnceLock<Arc<Broker>>>,
}

impl BrokerService {
    /// A service whose core is filled in later through the shared cell.
    pub fn new(core: Arc<OnceLock<Arc<Broker>>>) -> Self {
        Self { core }
    }

    fn authorize<T>(
        &self,
        req: &Request<T>,
        need: Role,
    ) -> Result<(&Arc<Broker>, Arc<Caller>), Status> {
        let broker = self
            .core
            .get()
            .ok_or_else(|| Status::unavailable("credbroker is starting; retry shortly"))?;
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated(
                    "missing caller token: send 'authorization: Bearer <token>'",
                )
            })?;
        let caller = broker.authenticate(token).map_err(|r| match r {
            AuthRefusal::Unknown => Status::unauthenticated("invalid or revoked caller token"),
            AuthRefusal::Expired => Status::unauthenticated("the caller token has expired"),
        })?;
        if need == Role::Admin && caller.role != Role::Admin {
            return Err(Status::permission_denied(format!(
                "caller '{}' has role {}, which may only call GetAccessToken",
                caller.name, caller.role
            )));
        }
        Ok((broker, caller))
    }
}

fn status(e: BrokerError) -> Status {
    e.into()
}

#[tonic::async_trait]
impl CredentialBroker for BrokerService {
    async fn register_system(
        &self,
        request: Request<pb::RegisterSystemRequest>,
    ) -> Result<Response<pb::RegisterSystemResponse>, Status> {
        let (broker, _) = self.authorize(&request, Role::Admin)?;
        let r = request.into_inner();
        let input = RegisterInput {
            system_id: r.system_id.trim().to_owned(),
            display_name: r.display_name,
            description: r.description,
            kind: convert::kind(r.kind, "kind").map_err(status)?,
            base_url: r.base_url,
            credential: convert::credential(r.credential, "credential").map_err(status)?,
            check: r.check,
        };
        let (record, check) = broker.register(input).await.map_err(status)?;
        Ok(Response::new(pb::RegisterSystemResponse {
            system: Some(convert::system(&record)),
            check: check.as_ref().map(convert::check),
        }))
    }

    async fn check_authentication(
        &self,
        request: Request<pb::CheckAuthenticationRequest>,
    ) -> Result<Response<pb::CheckAuthenticationResponse>, Status> {
        let (broker, _) = self.authorize(&request, Role::Admin)?;
        use pb::check_authentication_request::Target;
        let target = match request.into_inner().target {
            Some(Target::SystemId(id)) => CheckTarget::Stored(id),
            Some(Target::Candidate(c)) => CheckTarget::Candidate {
                kind: convert::kind(c.kind, "candidate.kind").map_err(status)?,
                base_url: c.base_url,
                credential: convert::credential(c.credential, "candidate.credential")
                    .map_err(status)?,
            },
            None => {
                return Err(status(BrokerError::invalid(
                    "target",
                    "set system_id or candidate",
                )))
            }
        };
        let check = broker.check(target).await.map_err(status)?;
        Ok(Response::new(pb::CheckAuthenticationResponse {
            check: Some(convert::check(&check)),
        }))
    }

    async fn get_access_token(
        &self,
        request: Request<pb::GetAccessTokenRequest>,
    ) -> Result<Response<pb::GetAccessTokenResponse>, Status> {
        let (broker, caller) = self.authorize(&request, Role::Worker)?;
        let r = request.into_inner();
        // Out-of-scope requests look the same whether or not the system exists.
        let denied = || {
            Status::permission_denied(format!(
                "caller '{}' may not access system '{}'",
                caller.name, r.system_id
            ))
        };
        if !caller.may_use_id(&r.system_id) {
            return Err(denied());
        }
        let token = match broker
            .access_token(
                &r.system_id,
                r.min_valid_seconds,
                Some(&r.rejected_token_id),
            )
            .await
        {
            Ok(t) => t,
            Err(BrokerError::NotFound(_)) if caller.is_kind_scoped() => return Err(denied()),
            Err(e) => return Err(status(e)),
        };
        if !caller.may_use_kind(token.kind) {
            return Err(denied());
        }
        Ok(Response::new(pb::GetAccessTokenResponse {
            headers: token
                .headers
                .iter()
                .map(|h| pb::HttpHeader {
                    name: h.name.to_owned(),
                    value: h.value.expose_secret().to_owned(),
                })
                .collect(),
            expires_at: Some(convert::ts_from(token.expires_at)),
            api_base_url: token.api_base_url.clone(),
            credential_version: token.credential_version,
            token_id: token.token_id.clone(),
        }))
    }

    async fn rotate_credential(
        &self,
        request: Request<pb::RotateCredentialRequest>,
    ) -> Result<Response<pb::RotateCredentialResponse>, Status> {
        let (broker, _) = self.authorize(&request, Role::Admin)?;
        let r = request.into_inner();
        let credential = convert::credential(r.credential, "credential").map_err(status)?;
        let (record, check) = broker
            .rotate(r.system_id.trim(), credential, r.skip_check)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RotateCredentialResponse {
            system: Some(convert::system(&record)),
            check: check.as_ref().map(convert::check),
        }))
    }

    async fn get_system(
        &self,
        request: Request<pb::GetSystemRequest>,
    ) -> Result<Response<pb::GetSystemResponse>, Status> {
        let (broker, _) = self.authorize(&request, Role::Admin)?;
        let record = broker
            .get_system(request.get_ref().system_id.trim())
            .await
            .map_err(status)?;
        Ok(Response::new(pb::GetSystemResponse {
            system: Some(convert::system(&record)),
        }))
    }

    async fn list_systems(
        &self,
        request: Request<pb::ListSystemsRequest>,
    ) -> Result<Response<pb::ListSystemsResponse>, Status> {
        let (broker, _) = self.authorize(&request, Role::Admin)?;
        let r = request.into_inner();
        let after = if r.page_token.is_empty() {
            None
        } else {
            Some(
                URL_SAFE_NO_PAD
                    .decode(&r.page_token)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| {
                        status(BrokerError::invalid(
                            "page_token",
                            "is not a token this server issued",
                        ))
                    })?,
            )
        };
        let (page, more) = broker
            .list_systems(after.as_deref(), r.page_size as usize)
            .await
            .map_err(status)?;
        let next_page_token = match (more, page.last()) {
            (true, Some(last)) => URL_SAFE_NO_PAD.encode(last.system_id.as_bytes()),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListSystemsResponse {
            systems: page.iter().map(convert::system).collect(),
            next_page_token,
        }))
    }

    async fn delete_system(
        &self,
        request: Request<pb::DeleteSystemRequest>,
    ) -> Result<Response<pb::DeleteSystemResponse>, Status> {
        let (broker, _) = self.authorize(&request, Role::Admin)?;
        broker
            .delete_system(request.get_ref().system_id.trim())
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteSystemResponse {}))
    }

    async fn create_caller(
        &self,
        request: Request<pb::CreateCallerRequest>,
    ) -> Result<Response<pb::CreateCallerResponse>, Status> {
        let (broker, caller) = self.authorize(&request, Role::Admin)?;
        let r = request.into_inner();
        let role = convert::role(r.role).map_err(status)?;
        let kinds = r
            .kinds
            .iter()
            .map(|k| convert::kind(*k, "kinds"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(status)?;
        let scope = CallerScope {
            system_patterns: r
                .system_patterns
                .iter()
                .map(|p| p.trim().to_owned())
                .collect(),
            kinds,
            expires_at: r.expires_at.map(|t| t.seconds.max(0) as u64),
        };
        let (record, token) = broker
            .create_caller(r.name.trim(), role, scope)
            .await
            .map_err(status)?;
        tracing::info!(message = "Caller created.", caller = %record.name, role = %record.role, by = %caller.name);
        Ok(Response::new(pb::CreateCallerResponse {
            caller: Some(convert::caller(&record)),
            token: token.expose_secret().to_owned(),
        }))
    }

    async fn list_callers(
        &self,
        request: Request<pb::ListCallersRequest>,
    ) -> Result<Response<pb::ListCallersResponse>, Status> {
        let (broker, _) = self.authorize(&request, Role::Admin)?;
        let callers = broker.list_callers().await.map_err(status)?;
        Ok(Response::new(pb::ListCallersResponse {
            callers: callers.iter().map(convert::caller).collect(),
        }))
    }

    async fn revoke_caller(
        &self,
        request: Request<pb::RevokeCallerRequest>,
    ) -> Result<Response<pb::RevokeCallerResponse>, Status> {
        let (broker, caller) = self.authorize(&request, Role::Admin)?;
        let record = broker
            .revoke_caller(request.get_ref().name.trim())
            .await
            .map_err(status)?;
        tracing::info!(message = "Caller revoked.", caller = %record.name, by = %caller.name);
        Ok(Response::new(pb::RevokeCallerResponse {
            caller: Some(convert::caller(&record)),
        }))
    }

    async fn start_authorization(
        &self,
        request: Request<pb::StartAuthorizationRequest>,
    ) -> Result<Response<pb::StartAuthorizationResponse>, Status> {
        let (broker, _) = self.authorize(&request, Role::Admin)?;
        let (url, expires, redirect) = broker
            .start_authorization(request.get_ref().system_id.trim())
            .await
            .map_err(status)?;
        Ok(Response::new(pb::StartAuthorizationResponse {
            authorize_url: url,
            expires_at: Some(convert::ts_from(expires)),
            redirect_uri: redirect,
        }))
    }
}
