//! The servers the load tester can drive, and one timed request to each.
//!
//! - `grpc://host:port` (`grpcs://` with TLS): Ferroserve's `ferroserve.v1.Inference/GenerateStream`;
//! - `http://host:port/v1/completions` and `http://host:port/v1/chat/completions`: any OpenAI-compatible
//!   server (llama.cpp's llama-server, vLLM, TGI), streamed over SSE.

mod grpc;
mod openai;

use ferroserve_net::ClientTlsFiles;
use serde::{Deserialize, Serialize};

use crate::BenchError;
use crate::prompts::Prompt;
use crate::sample::{ErrorKind, Recorder};

/// What each request asks the server to generate; the same for every peer in a comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// The `model` field sent (Ferroserve: empty means the default model).
    pub model: String,
    /// Output tokens asked for.
    pub max_tokens: u32,
    /// Generate past end-of-sequence, so every request produces `max_tokens` (where the server supports it:
    /// Ferroserve, vLLM and llama-server do).
    pub ignore_eos: bool,
    /// Sampling temperature; 0 is greedy.
    pub temperature: f32,
    /// Structured output: every request's output constrained by this JSON schema (its text), sent as
    /// `response_format` (OpenAI, llama-server, vLLM) or `GenerateRequest.constraint` (gRPC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_schema: Option<String>,
}

/// Which API a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// Ferroserve gRPC, `Inference/GenerateStream`.
    Grpc,
    /// OpenAI `/v1/completions`, SSE.
    OpenaiCompletions,
    /// OpenAI `/v1/chat/completions`, SSE.
    OpenaiChat,
}

/// A server to measure, as recorded in the result file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetSpec {
    /// The API.
    pub api: Api,
    /// What was given on the command line.
    pub url: String,
    /// Whether an API key was sent (the key itself is never written down).
    pub authenticated: bool,
}

impl TargetSpec {
    /// Reads `grpc://host:port` or `http://host:port[/v1/completions | /v1/chat/completions]`. A bare HTTP
    /// base URL means chat completions when the prompts are conversations, else completions.
    pub fn parse(url: &str, chat_prompts: bool, authenticated: bool) -> Result<Self, BenchError> {
        let api = if let Some(rest) = url.strip_prefix("grpc://").or_else(|| url.strip_prefix("grpcs://")) {
            if rest.is_empty() || rest.contains('/') {
                return Err(BenchError::Target(format!(
                    "{url:?}: a gRPC target is grpc://host:port (grpcs:// for TLS), with no path"
                )));
            }
            Api::Grpc
        } else if let Some(rest) = url.strip_prefix("http://") {
            let path = rest.find('/').map_or("", |i| &rest[i..]).trim_end_matches('/');
            match path {
                "" | "/v1" if chat_prompts => Api::OpenaiChat,
                "" | "/v1" => Api::OpenaiCompletions,
                "/v1/completions" => Api::OpenaiCompletions,
                "/v1/chat/completions" => Api::OpenaiChat,
                other => {
                    return Err(BenchError::Target(format!(
                        "{url:?}: unknown path {other:?}; use /v1/completions or /v1/chat/completions"
                    )));
                }
            }
        } else if url.starts_with("https://") {
            return Err(BenchError::Target(format!(
                "{url:?}: TLS is not supported; measure over plain http:// on the server's own host"
            )));
        } else {
            return Err(BenchError::Target(format!(
                "{url:?}: expected grpc://host:port or http://host:port/v1/completions"
            )));
        };
        Ok(TargetSpec {
            api,
            url: url.to_string(),
            authenticated,
        })
    }

    /// The HTTP endpoint to send to (OpenAI targets) or connect to (gRPC).
    fn endpoint(&self) -> String {
        match self.api {
            Api::Grpc => match self.url.strip_prefix("grpcs://") {
                Some(host) => format!("https://{host}"),
                None => format!("http://{}", &self.url["grpc://".len()..]),
            },
            Api::OpenaiCompletions | Api::OpenaiChat => {
                let base = self.url.trim_end_matches('/');
                let base = base
                    .strip_suffix("/v1/completions")
                    .or_else(|| base.strip_suffix("/v1/chat/completions"))
                    .or_else(|| base.strip_suffix("/v1"))
                    .unwrap_or(base);
                match self.api {
                    Api::OpenaiChat => format!("{base}/v1/chat/completions"),
                    _ => format!("{base}/v1/completions"),
                }
            }
        }
    }
}

/// A failed request, before it is recorded.
pub type Failed = (ErrorKind, String);

/// A connected client for one target; cheap to clone, one per in-flight request.
#[derive(Clone)]
pub enum Client {
    /// Ferroserve gRPC.
    Grpc(grpc::GrpcClient),
    /// OpenAI-compatible HTTP (boxed: hyper's client is several times the size of tonic's channel).
    OpenAi(Box<openai::OpenAiClient>),
}

impl Client {
    /// Connects (gRPC) or prepares the HTTP client (a new connection per request). `api_key` is sent as
    /// `Bearer`; `tls` applies to a `grpcs://` target.
    pub async fn connect(spec: &TargetSpec, api_key: Option<&str>, tls: &ClientTlsFiles) -> Result<Self, BenchError> {
        let endpoint = spec.endpoint();
        match spec.api {
            Api::Grpc => Ok(Client::Grpc(grpc::GrpcClient::connect(&endpoint, api_key, tls).await?)),
            Api::OpenaiCompletions => Ok(Client::OpenAi(Box::new(openai::OpenAiClient::new(
                &endpoint, false, api_key,
            )?))),
            Api::OpenaiChat => Ok(Client::OpenAi(Box::new(openai::OpenAiClient::new(
                &endpoint, true, api_key,
            )?))),
        }
    }

    /// Sends one request and records its stream into `rec`. Cancelled by dropping the future.
    pub async fn send(&self, prompt: &Prompt, generation: &Generation, rec: &mut Recorder) -> Result<(), Failed> {
        match self {
            Client::Grpc(c) => c.send(prompt, generation, rec).await,
            Client::OpenAi(c) => c.send(prompt, generation, rec).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_urls() {
        let t = TargetSpec::parse("grpc://127.0.0.1:50051", false, false).unwrap();
        assert_eq!((t.api, t.endpoint()), (Api::Grpc, "http://127.0.0.1:50051".to_string()));
        let t = TargetSpec::parse("grpcs://localhost:50051", false, false).unwrap();
        assert_eq!(
            (t.api, t.endpoint()),
            (Api::Grpc, "https://localhost:50051".to_string())
        );
        let t = TargetSpec::parse("http://127.0.0.1:8080", false, false).unwrap();
        assert_eq!(
            (t.api, t.endpoint()),
            (
                Api::OpenaiCompletions,
                "http://127.0.0.1:8080/v1/completions".to_string()
            )
        );
        let t = TargetSpec::parse("http://127.0.0.1:8080/v1/", true, false).unwrap();
        assert_eq!(
            (t.api, t.endpoint()),
            (Api::OpenaiChat, "http://127.0.0.1:8080/v1/chat/completions".to_string())
        );
        let t = TargetSpec::parse("http://h:1/v1/chat/completions", false, false).unwrap();
        assert_eq!(t.api, Api::OpenaiChat);
        for bad in ["grpc://h:1/x", "https://h/v1/completions", "h:1", "http://h:1/generate"] {
            assert!(TargetSpec::parse(bad, false, false).is_err(), "{bad}");
        }
    }
}
