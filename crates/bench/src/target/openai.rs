//! OpenAI-compatible servers: `POST /v1/completions` or `/v1/chat/completions` with `"stream": true`,
//! read as server-sent events until `data: [DONE]`.
//!
//! Token counting: `stream_options.include_usage` asks for a final chunk with `usage`, which vLLM, TGI
//! and llama-server send; when a server does not, each chunk with text counts as one token. Either way
//! the sample records which method was used. ITL is the gap between chunks with text.

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use super::{Failed, Generation};
use crate::BenchError;
use crate::prompts::{Prompt, PromptBody};
use crate::sample::{ErrorKind, Recorder};

/// Most of an error body kept for the report.
const ERROR_BODY_CHARS: usize = 300;

/// An HTTP/1.1 client: one connection per request.
#[derive(Clone)]
pub struct OpenAiClient {
    /// hyper's client, with idle connections never kept (see `new`).
    http: HyperClient<HttpConnector, Full<Bytes>>,
    /// The full endpoint URL.
    uri: hyper::Uri,
    /// `/v1/chat/completions` (messages) rather than `/v1/completions` (prompt).
    chat: bool,
    /// `Authorization: Bearer ...`, when a key is set.
    auth: Option<String>,
}

impl OpenAiClient {
    pub(super) fn new(endpoint: &str, chat: bool, api_key: Option<&str>) -> Result<Self, BenchError> {
        let uri = endpoint
            .parse()
            .map_err(|e| BenchError::Target(format!("{endpoint}: {e}")))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // A fresh connection per request, no pool: reusing an idle keep-alive connection races with the
        // server closing it (seen with llama-server as "SendRequest" errors), and a new loopback
        // connection costs tens of microseconds against requests that last seconds.
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        Ok(OpenAiClient {
            http,
            uri,
            chat,
            auth: api_key.map(|k| format!("Bearer {k}")),
        })
    }

    /// The JSON body for one request.
    fn body(&self, prompt: &Prompt, g: &Generation) -> Result<Value, Failed> {
        let mut body = json!({
            "model": g.model,
            "max_tokens": g.max_tokens,
            "temperature": g.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if g.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        if let Some(schema) = &g.json_schema {
            let schema: Value = serde_json::from_str(schema)
                .map_err(|e| (ErrorKind::Invalid, format!("the JSON schema is not JSON: {e}")))?;
            body["response_format"] = json!({"type": "json_schema",
                "json_schema": {"name": "bench", "schema": schema, "strict": true}});
        }
        match (&prompt.body, self.chat) {
            (PromptBody::Text(t), false) => body["prompt"] = json!(t),
            (PromptBody::Text(t), true) => body["messages"] = json!([{"role": "user", "content": t}]),
            (PromptBody::Chat(m), true) => body["messages"] = json!(m),
            (PromptBody::Chat(_), false) => {
                return Err((
                    ErrorKind::Invalid,
                    "chat prompts need a /v1/chat/completions target".into(),
                ));
            }
        }
        Ok(body)
    }

    pub(super) async fn send(&self, prompt: &Prompt, g: &Generation, rec: &mut Recorder) -> Result<(), Failed> {
        let body = self.body(prompt, g)?;
        let mut request = Request::post(self.uri.clone()).header(CONTENT_TYPE, "application/json");
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| (ErrorKind::Other, e.to_string()))?;
        let response = self.http.request(request).await.map_err(|e| {
            let kind = if e.is_connect() {
                ErrorKind::Unavailable
            } else {
                ErrorKind::Other
            };
            (kind, format!("request failed: {e}"))
        })?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let text: String = String::from_utf8_lossy(&bytes).chars().take(ERROR_BODY_CHARS).collect();
            return Err((ErrorKind::from_http(status.as_u16()), format!("HTTP {status}: {text}")));
        }
        let mut events = SseBuffer::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| (ErrorKind::Other, format!("stream broke: {e}")))?;
            let Ok(data) = frame.into_data() else { continue };
            for event in events.push(&data) {
                if event == "[DONE]" {
                    return Ok(());
                }
                on_event(&event, self.chat, rec)?;
            }
        }
        Err((ErrorKind::Other, "the stream ended before `data: [DONE]`".into()))
    }
}

/// Applies one SSE `data:` payload to the recorder.
fn on_event(data: &str, chat: bool, rec: &mut Recorder) -> Result<(), Failed> {
    let v: Value = serde_json::from_str(data).map_err(|e| (ErrorKind::Other, format!("bad chunk {data:?}: {e}")))?;
    if let Some(err) = v.get("error") {
        return Err((ErrorKind::Other, format!("error in stream: {err}")));
    }
    let choice = v.get("choices").and_then(|c| c.get(0));
    let text = choice.and_then(|c| {
        if chat {
            c.get("delta").and_then(|d| d.get("content"))
        } else {
            c.get("text")
        }
    });
    if text.and_then(Value::as_str).is_some_and(|t| !t.is_empty()) {
        rec.chunk(1);
    }
    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
        let n = |k: &str| u.get(k).and_then(Value::as_u64).map(|n| n as u32);
        if let Some(c) = n("completion_tokens") {
            rec.usage(n("prompt_tokens"), c);
        }
    }
    Ok(())
}

/// Splits a byte stream into SSE events' `data:` payloads (events end with a blank line; multi-line
/// data is joined with newlines, as the SSE spec says).
#[derive(Default)]
struct SseBuffer {
    /// Bytes of an event not yet complete.
    pending: BytesMut,
}

impl SseBuffer {
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some((end, sep)) = find_blank_line(&self.pending) {
            let event = self.pending.split_to(end + sep);
            let text = String::from_utf8_lossy(&event[..end]);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                out.push(data.join("\n"));
            }
        }
        out
    }
}

/// The end of the first event: (index of the blank line, length of the separator).
fn find_blank_line(b: &[u8]) -> Option<(usize, usize)> {
    let lf = b.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(c)) => Some(if a.0 <= c.0 { a } else { c }),
        (a, c) => a.or(c),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn sse_events_split_across_reads() {
        let mut b = SseBuffer::default();
        assert!(b.push(b"data: {\"a\"").is_empty());
        assert_eq!(
            b.push(b":1}\n\ndata: x\r\n\r\n: comment\n\ndata: [DO"),
            vec!["{\"a\":1}", "x"]
        );
        assert_eq!(b.push(b"NE]\n\n"), vec!["[DONE]"]);
    }

    #[test]
    fn chunks_and_usage() {
        let mut rec = Recorder::start(Duration::ZERO, 3);
        on_event(r#"{"choices":[{"delta":{"role":"assistant"}}]}"#, true, &mut rec).unwrap();
        on_event(r#"{"choices":[{"delta":{"content":"Hi"}}]}"#, true, &mut rec).unwrap();
        on_event(
            r#"{"choices":[{"delta":{"content":" there"}}],"usage":null}"#,
            true,
            &mut rec,
        )
        .unwrap();
        let s = rec.finish();
        assert_eq!((s.output_tokens, s.itl.len()), (2, 1));
        let mut rec = Recorder::start(Duration::ZERO, 3);
        on_event(r#"{"choices":[{"text":"a"}]}"#, false, &mut rec).unwrap();
        on_event(
            r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5}}"#,
            false,
            &mut rec,
        )
        .unwrap();
        let s = rec.finish();
        assert_eq!((s.input_tokens, s.output_tokens), (12, 5));
        let mut rec = Recorder::start(Duration::ZERO, 3);
        assert!(on_event(r#"{"error":{"message":"boom"}}"#, false, &mut rec).is_err());
        assert!(on_event("not json", false, &mut rec).is_err());
    }
}
