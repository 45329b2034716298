//! `POST /v1/responses`, stateless: one turn from `input` (a string, or messages) and `instructions`,
//! answered as one `response` object or as the Responses API's typed server-sent events. Nothing is
//! stored, so `previous_response_id` and `store: true` are refused rather than ignored; tools are not
//! supported. The request runs through the same pipeline as the other endpoints (complete.rs).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ferroserve_proto::v1 as pb;
use futures::StreamExt;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::complete::{Copy, finish_reason};
use super::wire::{self, Parsed};
use super::{HttpDoor, REQUEST_ID_HEADER, unix_now};
use crate::HttpError;
use crate::inference::COHORT_HEADER;

use pb::generate_stream_response::Event as Out;

/// Events waiting for a slow client.
const SSE_BUFFER: usize = 32;

pub(crate) async fn responses(State(door): State<Arc<HttpDoor>>, headers: HeaderMap, body: Bytes) -> Response {
    let tenant = match door.authenticate(&headers) {
        Ok(t) => t,
        Err(e) => return door.router_error(&e, None),
    };
    let mut parsed = match parse(&body, door.limits.default_max_tokens) {
        Ok(p) => p,
        Err(e) => return door.refused(e, &tenant),
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    parsed.body.request_id = header(REQUEST_ID_HEADER).unwrap_or_default();
    let mut copies = match door.start_copies(&parsed, &tenant, header(COHORT_HEADER)).await {
        Ok(c) => c,
        Err(e) => return door.router_error(&e, Some(&tenant)),
    };
    let copy = copies.remove(0);
    let shell = Shell {
        id: format!("resp_{}", copy.request_id),
        created_at: unix_now(),
        model: copy.model.clone().unwrap_or_else(|| parsed.body.model.clone()),
    };
    let mut response = if parsed.stream {
        stream(copy, shell)
    } else {
        match copy.collect().await {
            Ok(c) => axum::Json(shell.response(&c.text, Some(&c.done))).into_response(),
            Err(status) => return door.error(HttpError::from_status(&status), Some(&tenant)),
        }
    };
    response.headers_mut().extend(door.rate_headers(&tenant));
    response
}

/// The Responses API's body, read into the pipeline's request. Sampling fields and `user` are read as on
/// chat completions.
fn parse(bytes: &[u8], default_max_tokens: u32) -> Result<Parsed, HttpError> {
    let mut o = wire::object(bytes)?;
    if o.get("previous_response_id").is_some_and(|v| !v.is_null()) {
        return Err(HttpError::invalid(
            "previous_response_id",
            "this server keeps no responses (stateless); send the whole conversation in `input`",
        ));
    }
    if o.get("store").and_then(Value::as_bool) == Some(true) {
        return Err(HttpError::invalid(
            "store",
            "this server keeps no responses; leave `store` false",
        ));
    }
    let mut messages = Vec::new();
    if let Some(instructions) = o.get("instructions").filter(|v| !v.is_null()) {
        let text = instructions
            .as_str()
            .ok_or_else(|| HttpError::invalid("instructions", "must be a string"))?;
        messages.push(json!({"role": "system", "content": text}));
    }
    match o.remove("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => messages.extend(items.into_iter().map(input_item)),
        _ => {
            return Err(HttpError::invalid(
                "input",
                "is required: a string or a list of messages",
            ));
        }
    }
    // Structured output: `text.format` is chat's `response_format` with the schema's fields flattened.
    if let Some(format) = o
        .get("text")
        .and_then(|t| t.get("format"))
        .filter(|f| !f.is_null())
        .cloned()
    {
        let format = match format.get("type").and_then(Value::as_str) {
            Some("json_schema") => json!({"type": "json_schema", "json_schema": format}),
            _ => format,
        };
        o.insert("response_format".into(), format);
    }
    if let Some(max) = o.remove("max_output_tokens") {
        o.insert("max_completion_tokens".into(), max);
    }
    o.insert("messages".into(), Value::Array(messages));
    let limits = wire::HttpLimits {
        max_n: 1,
        default_max_tokens,
    };
    let mut parsed = wire::parse_object(&o, wire::Endpoint::Chat, &limits).map_err(|mut e| {
        // The chat reader names `messages`; here they came from `input`.
        if let Some(p) = e.param.as_mut().filter(|p| p.starts_with("messages")) {
            *p = p.replacen("messages", "input", 1);
        }
        e
    })?;
    parsed.logprobs = None;
    Ok(parsed)
}

/// An input item: a message whose content is a string or a list of `input_text` parts, as chat's
/// reader takes them (`text` parts).
fn input_item(item: Value) -> Value {
    let Value::Object(mut m) = item else { return item };
    if let Some(Value::Array(parts)) = m.get_mut("content") {
        for part in parts.iter_mut() {
            if let Some(kind) = part
                .get_mut("type")
                .filter(|t| *t == "input_text" || *t == "output_text")
            {
                *kind = json!("text");
            }
        }
    }
    Value::Object(m)
}

/// What every form of one response repeats.
struct Shell {
    id: String,
    created_at: u64,
    model: String,
}

impl Shell {
    /// The `response` object: in progress while `done` is `None`.
    fn response(&self, text: &str, done: Option<&pb::GenerationComplete>) -> Value {
        let (status, output, usage, incomplete) = match done {
            None => ("in_progress", json!([]), Value::Null, Value::Null),
            Some(c) => {
                let u = c.usage.unwrap_or_default();
                let (status, incomplete) = match finish_reason(c) {
                    "length" => ("incomplete", json!({"reason": "max_output_tokens"})),
                    "content_filter" => ("incomplete", json!({"reason": "content_filter"})),
                    _ => ("completed", Value::Null),
                };
                let usage = json!({
                    "input_tokens": u.prompt_tokens,
                    "output_tokens": u.completion_tokens,
                    "total_tokens": u.prompt_tokens + u.completion_tokens,
                    "input_tokens_details": {"cached_tokens": u.cached_tokens},
                    "output_tokens_details": {"reasoning_tokens": 0},
                });
                (status, json!([self.message(text, "completed")]), usage, incomplete)
            }
        };
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": output,
            "usage": usage,
            "incomplete_details": incomplete,
            "error": null,
            "parallel_tool_calls": false,
            "tool_choice": "none",
            "tools": [],
        })
    }

    fn message(&self, text: &str, status: &str) -> Value {
        json!({
            "type": "message",
            "id": format!("msg_{}", self.id.trim_start_matches("resp_")),
            "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        })
    }
}

/// The copy's messages as the Responses API's events: created, the message and its text part added,
/// text deltas, the part and message done, completed.
fn stream(copy: Copy, shell: Shell) -> Response {
    let (tx, rx) = mpsc::channel(SSE_BUFFER);
    tokio::spawn(write_events(copy, shell, tx));
    Sse::new(ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Sends typed events until the copy ends or the client leaves (dropping the copy cancels it).
async fn write_events(mut copy: Copy, shell: Shell, tx: mpsc::Sender<SseEvent>) {
    let mut sequence = 0u64;
    let mut send = async |kind: &str, mut data: Map<String, Value>| {
        data.insert("type".into(), json!(kind));
        data.insert("sequence_number".into(), json!(sequence));
        sequence += 1;
        tx.send(SseEvent::default().event(kind).data(Value::Object(data).to_string()))
            .await
            .is_ok()
    };
    let obj = |v: Value| match v {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let item_id = format!("msg_{}", shell.id.trim_start_matches("resp_"));
    let part = || json!({"type": "output_text", "text": "", "annotations": []});
    let opening = [
        ("response.created", obj(json!({"response": shell.response("", None)}))),
        (
            "response.in_progress",
            obj(json!({"response": shell.response("", None)})),
        ),
        (
            "response.output_item.added",
            obj(json!({"output_index": 0, "item": shell.message("", "in_progress")})),
        ),
        (
            "response.content_part.added",
            obj(json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part()})),
        ),
    ];
    for (kind, data) in opening {
        if !send(kind, data).await {
            return;
        }
    }
    let mut text = String::new();
    let done = loop {
        let next = tokio::select! {
            () = tx.closed() => return,
            next = copy.messages.next() => next,
        };
        let event = match next {
            Some(Ok(pb::GenerateStreamResponse { event: Some(e) })) => e,
            Some(Ok(_)) => continue,
            Some(Err(status)) => break Err(status),
            None => break Err(Status::internal("the request ended without a completion")),
        };
        match event {
            Out::Token(t) if !t.text.is_empty() => {
                text.push_str(&t.text);
                let delta = json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": t.text});
                if !send("response.output_text.delta", obj(delta)).await {
                    return;
                }
            }
            Out::Token(_) => {}
            Out::Complete(c) => break Ok(c),
        }
    };
    let done = match done {
        Ok(c) => c,
        Err(status) => {
            let e = HttpError::from_status(&status);
            let error = json!({"code": e.code, "message": e.message, "param": e.param});
            let _ = send("error", obj(error)).await;
            return;
        }
    };
    let closing = [
        (
            "response.output_text.done",
            obj(json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": text})),
        ),
        (
            "response.content_part.done",
            obj(json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                       "part": {"type": "output_text", "text": text, "annotations": []}})),
        ),
        (
            "response.output_item.done",
            obj(json!({"output_index": 0, "item": shell.message(&text, "completed")})),
        ),
        (
            "response.completed",
            obj(json!({"response": shell.response(&text, Some(&done))})),
        ),
    ];
    for (kind, data) in closing {
        if !send(kind, data).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_and_instructions_become_a_conversation() {
        let p = parse(
            br#"{"model": "m", "instructions": "be brief", "max_output_tokens": 9,
                 "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}"#,
            16,
        )
        .expect("valid");
        let roles: Vec<&str> = p.body.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user"]);
        assert_eq!(p.body.messages[1].content, "hi");
        assert_eq!(p.body.max_tokens, 9);
        let p = parse(br#"{"input": "hello"}"#, 16).expect("valid");
        assert_eq!((p.body.messages[0].content.as_str(), p.body.max_tokens), ("hello", 16));
    }

    #[test]
    fn state_and_bad_input_are_refused_by_name() {
        let param = |body: &str| parse(body.as_bytes(), 16).expect_err("refused").param.unwrap();
        assert_eq!(
            param(r#"{"input": "x", "previous_response_id": "resp_1"}"#),
            "previous_response_id"
        );
        assert_eq!(param(r#"{"input": "x", "store": true}"#), "store");
        assert_eq!(param(r#"{"input": 3}"#), "input");
        assert_eq!(param(r#"{"input": [{"content": "x"}]}"#), "input[0].role");
        assert_eq!(param(r#"{"input": "x", "temperature": "hot"}"#), "temperature");
    }
}
