//! The gRPC door: `ferroserve.v1.Inference`. The caller was authenticated by the interceptor in
//! server.rs ([`Pipeline::authenticate`]) before its body was decoded; each call becomes an [`Arrival`]
//! and goes through the shared [`Pipeline`], and what it relays becomes gRPC messages.

use std::sync::Arc;
use std::time::Instant;

use ferroserve_admission::{AuthError, Tenant};
use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::inference_server::Inference;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::pipeline::{Arrival, Pipeline, Protocol, Start};
use crate::relay::{Relay, Relayed};
use crate::{RouterError, deadline};

/// The request header that puts a request in an A/B cohort of the traffic policy (gRPC metadata or an
/// HTTP header).
pub(crate) const COHORT_HEADER: &str = "x-ferroserve-cohort";

/// The gRPC inference service: the shared pipeline behind tonic.
pub(crate) struct InferenceService {
    /// The request path both doors share.
    pub pipeline: Arc<Pipeline>,
}

/// The `authorization` metadata value, if present and ASCII.
pub(crate) fn authorization(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata.get("authorization").and_then(|v| v.to_str().ok())
}

impl InferenceService {
    /// What the transport tells about a call, and its body, through the pipeline.
    async fn start(&self, request: Request<pb::GenerateRequest>) -> Result<Start, Status> {
        let (metadata, extensions, body) = request.into_parts();
        let tenant = extensions.get::<Tenant>().cloned().ok_or_else(|| {
            RouterError::from(AuthError::Unauthenticated(
                "the request reached the service without authentication".into(),
            ))
        })?;
        let arrival = Arrival {
            at: Instant::now(),
            tenant,
            budget: deadline::from_metadata(&metadata),
            cohort: metadata
                .get(COHORT_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            protocol: Protocol::Grpc,
        };
        Ok(self.pipeline.start(arrival, body).await?)
    }
}

/// The unary response: the whole text and the completion's fields.
fn unary(text: String, c: pb::GenerationComplete) -> pb::GenerateResponse {
    pb::GenerateResponse {
        text,
        finish_reason: c.finish_reason,
        usage: c.usage,
        model_version: c.model_version,
        request_id: c.request_id,
        timings: c.timings,
        filtered: c.filtered,
    }
}

type ResponseStream = std::pin::Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStreamStream = ResponseStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        let mut relay = match self.start(request).await? {
            Start::Filtered(c) => return Ok(Response::new(unary(String::new(), c))),
            Start::Dispatched(d) => Relay::new(*d),
        };
        let mut text = String::new();
        while let Some(item) = relay.next().await {
            match item {
                Relayed::Token(t) => text.push_str(&t.text),
                Relayed::Done(done) => return Ok(Response::new(unary(text, done?))),
            }
        }
        Err(Status::internal("the request ended without a completion"))
    }

    async fn generate_stream(&self, request: Request<pb::GenerateRequest>) -> Result<Response<ResponseStream>, Status> {
        use pb::generate_stream_response::Event as Out;
        let d = match self.start(request).await? {
            Start::Filtered(c) => {
                let done = pb::GenerateStreamResponse {
                    event: Some(Out::Complete(c)),
                };
                return Ok(Response::new(futures::stream::once(async { Ok(done) }).boxed()));
            }
            Start::Dispatched(d) => d,
        };
        // Tokens go out as soon as they arrive (see `stream.rs`): one message per token, a flush of held
        // text and the end bound what may wait for the client.
        let max_messages = d.handoff.request.max_tokens as usize + 2;
        let out = crate::stream::relay_to_client(Relay::new(*d), max_messages, self.pipeline.client_stall);
        Ok(Response::new(out.boxed()))
    }

    async fn list_models(&self, _: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
        let pool = &self.pipeline.pool;
        let default = pool.default_name();
        let models = pool
            .models()
            .into_iter()
            .map(|m| pb::ModelInfo {
                is_default: default.as_deref() == Some(m.name.as_str()),
                name: m.name,
                version: m.version,
                context_length: m.context_length,
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}
