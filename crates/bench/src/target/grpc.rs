//! Ferroserve's own API: `GenerateStream`, one token chunk per message, `usage` in the final message.
//!
//! A message whose text is empty (held back: part of a multi-byte character, or a possible stop string)
//! is not a chunk the user sees; its tokens count with the next message that has text. TTFT and ITL are
//! therefore measured on visible text, as the OpenAI target measures them, so that the two protocols
//! compare like for like.

use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::inference_client::InferenceClient;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use super::{Failed, Generation};
use crate::BenchError;
use crate::prompts::{Prompt, PromptBody};
use crate::sample::{ErrorKind, Recorder};

/// A gRPC client on one HTTP/2 connection (streams are multiplexed; tonic clones share it).
#[derive(Clone)]
pub struct GrpcClient {
    /// The generated client.
    inner: InferenceClient<Channel>,
    /// `authorization` header value, when a key is set.
    auth: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl GrpcClient {
    pub(super) async fn connect(
        endpoint: &str,
        api_key: Option<&str>,
        tls: &ferroserve_net::ClientTlsFiles,
    ) -> Result<Self, BenchError> {
        let auth = api_key
            .map(|k| {
                format!("Bearer {k}")
                    .parse()
                    .map_err(|_| BenchError::Target("the API key has characters a header cannot carry".into()))
            })
            .transpose()?;
        let channel = ferroserve_net::endpoint(endpoint, tls)
            .map_err(BenchError::Target)?
            .connect()
            .await
            .map_err(|e| BenchError::Target(format!("cannot connect to {endpoint}: {e}")))?;
        Ok(GrpcClient {
            inner: InferenceClient::new(channel).max_decoding_message_size(64 << 20),
            auth,
        })
    }

    pub(super) async fn send(&self, prompt: &Prompt, g: &Generation, rec: &mut Recorder) -> Result<(), Failed> {
        let (text, messages) = match &prompt.body {
            PromptBody::Text(t) => (t.clone(), Vec::new()),
            PromptBody::Chat(m) => (
                String::new(),
                m.iter()
                    .map(|m| pb::ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
            ),
        };
        let mut request = tonic::Request::new(pb::GenerateRequest {
            model: g.model.clone(),
            prompt: text,
            messages,
            max_tokens: g.max_tokens,
            sampling: Some(pb::SamplingParams {
                temperature: g.temperature,
                ignore_eos: g.ignore_eos,
                ..Default::default()
            }),
            stop: Vec::new(),
            request_id: String::new(),
            session: String::new(),
            constraint: g.json_schema.as_ref().map(|schema| {
                pb::generate_request::Constraint::JsonSchema(pb::JsonSchemaConstraint {
                    schema: schema.clone(),
                    strict: true,
                })
            }),
            ..Default::default()
        });
        if let Some(auth) = &self.auth {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        let status = |s: tonic::Status| {
            (
                ErrorKind::from_grpc(s.code()),
                format!("{:?}: {}", s.code(), s.message()),
            )
        };
        let mut stream = self
            .inner
            .clone()
            .generate_stream(request)
            .await
            .map_err(status)?
            .into_inner();
        let mut held = 0;
        while let Some(message) = stream.message().await.map_err(status)? {
            match message.event {
                Some(pb::generate_stream_response::Event::Token(t)) => {
                    held += t.token_ids.len() as u32;
                    if !t.text.is_empty() {
                        rec.chunk(held);
                        held = 0;
                    }
                }
                Some(pb::generate_stream_response::Event::Complete(c)) => {
                    if let Some(u) = c.usage {
                        rec.usage(Some(u.prompt_tokens), u.completion_tokens);
                    }
                    return Ok(());
                }
                None => {}
            }
        }
        Err((ErrorKind::Other, "the stream ended without a `complete` message".into()))
    }
}
