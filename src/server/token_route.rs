//! `GetAccessToken`'s own gRPC route. A warm call hands out cached headers, and the answer for
//! one token is the same every time: this route sends it as the bytes encoded on its first
//! hand-out instead of building and encoding a message per call. Every other method goes to
//! the generated service, which this route shadows for the one path.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

use super::broker_svc::BrokerService;
use super::convert::TokenAnswer;
use crate::pb;
use crate::pb::credential_broker_server::CredentialBrokerServer;

/// The path this route answers.
const PATH: &str = "/credbroker.v1.CredentialBroker/GetAccessToken";

/// `RestoreBackup`'s path: its chunks are larger than any other request (see
/// [`crate::broker::backup::RESTORE_MESSAGE_BYTES`]). The caller is authenticated as an admin
/// before the first chunk is read.
const RESTORE_PATH: &str = "/credbroker.v1.CredentialBroker/RestoreBackup";

/// `WatchSystems`' path: the one method besides `GetAccessToken` a worker may call.
const WATCH_PATH: &str = "/credbroker.v1.CredentialBroker/WatchSystems";

/// The largest `GetAccessToken` request read: a system id (128 bytes at most), a token id (64)
/// and a number fit many times over. The route answers before the caller is authenticated
/// (authentication is the hot path's first step, once the message is in), so anyone who
/// reaches the port may make it read this much per stream, not `max_request_bytes`.
const TOKEN_REQUEST_BYTES: usize = 1024;

/// The largest answer any of the broker's methods sends.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

/// The broker's gRPC service: `GetAccessToken` on its own route, the rest generated.
#[derive(Clone)]
pub struct BrokerRoutes {
    generated: CredentialBrokerServer<BrokerService>,
    /// The generated service again, with room for backup chunks.
    restore: CredentialBrokerServer<BrokerService>,
    service: BrokerService,
    max_request_bytes: usize,
}

impl BrokerRoutes {
    /// `service` behind both routes; requests above `max_request_bytes` are refused.
    pub fn new(service: BrokerService, max_request_bytes: usize) -> Self {
        let generated = CredentialBrokerServer::new(service.clone())
            .max_decoding_message_size(max_request_bytes)
            .max_encoding_message_size(MAX_ANSWER_BYTES);
        let chunk = crate::broker::backup::RESTORE_MESSAGE_BYTES.max(2 * max_request_bytes);
        let restore = CredentialBrokerServer::new(service.clone())
            .max_decoding_message_size(chunk)
            .max_encoding_message_size(MAX_ANSWER_BYTES);
        Self {
            generated,
            restore,
            service,
            max_request_bytes,
        }
    }
}

impl NamedService for BrokerRoutes {
    const NAME: &'static str = <CredentialBrokerServer<BrokerService> as NamedService>::NAME;
}

impl tower::Service<tonic::codegen::http::Request<tonic::body::Body>> for BrokerRoutes {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        match req.uri().path() {
            PATH => {}
            RESTORE_PATH => return self.restore.call(req),
            path if self.service.refuses_unread(&req, role_for(path)) => {
                return self.generated.call(without_message(req))
            }
            _ => return self.generated.call(req),
        }
        let call = TokenCall(self.service.clone());
        let max_request_bytes = self.max_request_bytes.min(TOKEN_REQUEST_BYTES);
        Box::pin(async move {
            // The generated route's limits; neither route compresses (tonic is built without
            // a compression feature).
            let mut grpc = Grpc::new(TokenCodec)
                .apply_max_message_size_config(Some(max_request_bytes), Some(MAX_ANSWER_BYTES));
            Ok(grpc.unary(call, req).await)
        })
    }
}

/// The role a method needs (the handler checks it again): workers may only watch systems
/// (`GetAccessToken` has its own route).
fn role_for(path: &str) -> crate::model::Role {
    if path == WATCH_PATH {
        crate::model::Role::Worker
    } else {
        crate::model::Role::Admin
    }
}

/// `req` with its message replaced by an empty one, unread: the method then refuses the caller
/// (and audits and counts the refusal) as it would have, and a caller nobody knows cannot make
/// the broker read and hold up to `max_request_bytes` per stream first.
fn without_message(
    req: tonic::codegen::http::Request<tonic::body::Body>,
) -> tonic::codegen::http::Request<tonic::body::Body> {
    /// A gRPC frame: not compressed, length 0 (every request message's defaults).
    const EMPTY_FRAME: &[u8] = &[0, 0, 0, 0, 0];
    let (mut parts, unread) = req.into_parts();
    drop(unread);
    parts
        .headers
        .remove(tonic::codegen::http::header::CONTENT_LENGTH);
    // The stand-in is not compressed: a compressed call is refused (and audited) like another.
    parts.headers.remove("grpc-encoding");
    parts.extensions.insert(super::broker_svc::Unread);
    let body = http_body_util::Full::new(tonic::codegen::Bytes::from_static(EMPTY_FRAME));
    tonic::codegen::http::Request::from_parts(parts, tonic::body::Body::new(body))
}

/// One `GetAccessToken` call.
struct TokenCall(BrokerService);

impl UnaryService<pb::GetAccessTokenRequest> for TokenCall {
    type Response = TokenAnswer;
    type Future = BoxFuture<Response<TokenAnswer>, Status>;

    fn call(&mut self, request: Request<pb::GetAccessTokenRequest>) -> Self::Future {
        // Authenticates here, before the one box per call is built (see `token_answer`).
        Box::pin(self.0.token_answer(request))
    }
}

/// Decodes the request as prost does; encodes the answer as [`TokenAnswer::encode`] does.
struct TokenCodec;

impl Codec for TokenCodec {
    type Encode = TokenAnswer;
    type Decode = pb::GetAccessTokenRequest;
    type Encoder = AnswerEncoder;
    type Decoder = tonic_prost::ProstDecoder<pb::GetAccessTokenRequest>;

    fn encoder(&mut self) -> AnswerEncoder {
        AnswerEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(codec_buffer())
    }
}

/// The largest allocation glibc serves from its small bins: up to 1000 bytes (a chunk under
/// 1024), an allocation comes from the per-thread cache or a small bin. A larger one misses the
/// cache past 1032 bytes, and from 1001 bytes on, each miss makes `malloc` consolidate its fast
/// bins first: under load, with hundreds of calls in flight, the cache is often empty.
const SMALL_ALLOCATION_BYTES: usize = 1000;

/// The buffer each call's request is read into and its answer written to. tonic's default,
/// 8 KiB for each, is set aside twice per call and took the allocator's slow path each time
/// (see [`SMALL_ALLOCATION_BYTES`]). A request is a few hundred bytes at most in practice; one
/// near [`TOKEN_REQUEST_BYTES`] makes tonic grow the buffer (it reserves a message's declared
/// length). An answer is a few hundred bytes; a longer one (a JWT access token of a few KiB)
/// grows the buffer, once in each call that hands it out: one more allocation than tonic's
/// default for those calls, against two slow-path ones fewer for the rest. This reasoning is
/// glibc's with its default tunables (musl, or `GLIBC_TUNABLES`, would place the bounds
/// elsewhere; the figures in the README are glibc's).
const CODEC_BUFFER_BYTES: usize = SMALL_ALLOCATION_BYTES;

/// The buffer settings of both directions; the yield threshold (which only a stream of
/// answers reaches) is tonic's default.
fn codec_buffer() -> BufferSettings {
    BufferSettings::new(CODEC_BUFFER_BYTES, 32 * 1024)
}

/// Writes a [`TokenAnswer`] into a [`CODEC_BUFFER_BYTES`] buffer.
struct AnswerEncoder;

impl Encoder for AnswerEncoder {
    type Item = TokenAnswer;
    type Error = Status;

    fn encode(&mut self, item: TokenAnswer, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        codec_buffer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// The stand-in: one empty, uncompressed message, no length of the one it replaces, and the
    /// mark that makes the method refuse it whoever the caller turns out to be.
    #[tokio::test]
    async fn a_message_refused_unread_is_replaced_by_a_marked_empty_one() {
        let req = tonic::codegen::http::Request::builder()
            .uri(PATH)
            .header("content-length", "204800")
            .header("grpc-encoding", "gzip")
            .body(tonic::body::Body::new(http_body_util::Full::new(
                tonic::codegen::Bytes::from(vec![7u8; 1024]),
            )))
            .unwrap();
        let (parts, body) = without_message(req).into_parts();
        assert!(parts.headers.get("content-length").is_none());
        assert!(parts.headers.get("grpc-encoding").is_none());
        assert!(parts
            .extensions
            .get::<super::super::broker_svc::Unread>()
            .is_some());
        let sent = body.collect().await.unwrap().to_bytes();
        assert_eq!(&sent[..], &[0, 0, 0, 0, 0]);
    }

    /// A call's future is allocated once per call, and a warm `GetAccessToken` makes ~40
    /// allocations: one past [`SMALL_ALLOCATION_BYTES`] takes the allocator's slow path. The
    /// rare paths' futures (a refusal's audit line, a withdrawn caller) and a lease's answer
    /// are boxed so that they do not size the common one.
    #[test]
    fn a_calls_future_is_a_small_allocation() {
        let service = BrokerService::new(Default::default(), true);
        let call = service.token_answer(Request::new(pb::GetAccessTokenRequest::default()));
        let size = std::mem::size_of_val(&call);
        assert!(size <= SMALL_ALLOCATION_BYTES, "{size} bytes");
        // Aligned past 16, the box would come from `aligned_alloc`, outside the fast path.
        assert!(std::mem::align_of_val(&call) <= 16);
    }
}
