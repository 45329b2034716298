//! `GET /v1/models`, `POST /v1/embeddings` (the filter's sentence encoder) and `POST /v1/moderations`
//! (the active content filter's verdict).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use ferroserve_admission::{Ask, Permit, Tenant};
use ferroserve_filter::{Action, Stage};
use serde_json::{Value, json};

use super::HttpDoor;
use super::wire::{Object, object};
use crate::HttpError;

/// The id `/v1/embeddings` answers to.
pub(crate) const EMBEDDING_MODEL: &str = "all-minilm-l6-v2";
/// Most texts in one embeddings or moderations request.
const MAX_INPUTS: usize = 256;
/// Bytes per token assumed for an embedding's reservation and usage (the encoder's own tokenizer runs
/// on its thread and does not report counts).
const BYTES_PER_TOKEN: usize = 4;

/// `input`: a string or a list of strings.
fn inputs(body: &[u8]) -> Result<(Object, Vec<String>), HttpError> {
    let o = object(body)?;
    let texts = match o.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= MAX_INPUTS => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(HttpError::invalid(
                    format!("input[{i}]"),
                    "must be a string (token ids are not supported)",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(Value::Array(items)) => {
            return Err(HttpError::invalid(
                "input",
                format!("must hold 1 to {MAX_INPUTS} strings, got {}", items.len()),
            ));
        }
        _ => {
            return Err(HttpError::invalid(
                "input",
                "is required: a string or a list of strings",
            ));
        }
    };
    Ok((o, texts))
}

pub(crate) async fn models(State(door): State<Arc<HttpDoor>>, headers: HeaderMap) -> Response {
    let tenant = match door.authenticate(&headers) {
        Ok(t) => t,
        Err(e) => return door.router_error(&e, None),
    };
    let entry = |id: String, max_len: Option<u32>| json!({"id": id, "object": "model", "created": door.started, "owned_by": "ferroserve", "max_model_len": max_len});
    let mut data = Vec::new();
    for m in door.pipeline.pool.models() {
        if !data.iter().any(|d: &Value| d["id"] == m.name.as_str()) {
            data.push(entry(m.name.clone(), Some(m.context_length)));
        }
        data.push(entry(m.qualified(), Some(m.context_length)));
    }
    if door.embeddings.is_some() {
        data.push(entry(EMBEDDING_MODEL.into(), None));
    }
    door.answer(&tenant, Ok(json!({"object": "list", "data": data})))
}

pub(crate) async fn embeddings(State(door): State<Arc<HttpDoor>>, headers: HeaderMap, body: Bytes) -> Response {
    let tenant = match door.authenticate(&headers) {
        Ok(t) => t,
        Err(e) => return door.router_error(&e, None),
    };
    door.answer(&tenant, door.embed(&tenant, &body).await)
}

pub(crate) async fn moderations(State(door): State<Arc<HttpDoor>>, headers: HeaderMap, body: Bytes) -> Response {
    let tenant = match door.authenticate(&headers) {
        Ok(t) => t,
        Err(e) => return door.router_error(&e, None),
    };
    door.answer(&tenant, door.moderate(&tenant, &body).await)
}

impl HttpDoor {
    /// A JSON answer with the tenant's rate-limit headers, or the error in OpenAI's form.
    fn answer(&self, tenant: &Tenant, result: Result<Value, HttpError>) -> Response {
        match result {
            Ok(body) => {
                let mut response = axum::Json(body).into_response();
                response.headers_mut().extend(self.rate_headers(tenant));
                response
            }
            Err(e) => self.error(e, Some(tenant)),
        }
    }

    /// Embeddings of the inputs, admitted against the tenant's limits like a generation of no tokens.
    async fn embed(&self, tenant: &Tenant, body: &[u8]) -> Result<Value, HttpError> {
        let (o, texts) = inputs(body)?;
        let model = o.get("model").and_then(Value::as_str).unwrap_or(EMBEDDING_MODEL);
        let Some(service) = self
            .embeddings
            .clone()
            .filter(|_| model == EMBEDDING_MODEL || model.is_empty())
        else {
            let message = match self.embeddings {
                Some(_) => format!("model `{model}` does not embed here; use `{EMBEDDING_MODEL}`"),
                None => "this server has no embedding model loaded (run `ferroserve fetch-model`)".into(),
            };
            return Err(HttpError::not_found("model_not_found", message, Some("model")));
        };
        let base64 = match o.get("encoding_format").and_then(Value::as_str) {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(HttpError::invalid(
                    "encoding_format",
                    format!("must be `float` or `base64`, got `{other}`"),
                ));
            }
        };
        let (tokens, mut permit) = self.admit_texts(tenant, &texts).await?;
        // The permit goes with the work: a client that leaves does not free the slot while the encoder
        // still runs its texts.
        let vectors = tokio::task::spawn_blocking(move || {
            let vectors = service.embed_many(&texts);
            permit.settle(tokens, None);
            vectors
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .map_err(|e| HttpError::from_status(&tonic::Status::unavailable(format!("embedding failed: {e}"))))?;
        let data: Vec<Value> = vectors
            .iter()
            .enumerate()
            .map(|(index, v)| {
                let embedding = if base64 { json!(base64_f32(v)) } else { json!(v) };
                json!({"object": "embedding", "index": index, "embedding": embedding})
            })
            .collect();
        Ok(json!({
            "object": "list",
            "data": data,
            "model": EMBEDDING_MODEL,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
    }

    /// Admission for texts to embed or judge, as a generation of no tokens whose prompt is their
    /// estimated tokens: the same rate limits, concurrency caps and queue as completions.
    async fn admit_texts(&self, tenant: &Tenant, texts: &[String]) -> Result<(u32, Permit), HttpError> {
        let tokens: usize = texts.iter().map(|t| t.len().div_ceil(BYTES_PER_TOKEN).max(1)).sum();
        let tokens = u32::try_from(tokens).unwrap_or(u32::MAX);
        let ask = Ask {
            tenant: tenant.clone(),
            tokens,
            max_tokens: 0,
            deadline: None,
        };
        let permit = self
            .pipeline
            .admit_ask(ask, Instant::now())
            .await
            .map_err(|e| HttpError::from_router(&e, |_| None))?;
        Ok((tokens, permit))
    }

    /// The active filter's verdict on each input, in OpenAI's moderation schema: a category the filter
    /// blocks or flags is flagged, with score 1; with filtering off, nothing is.
    async fn moderate(&self, tenant: &Tenant, body: &[u8]) -> Result<Value, HttpError> {
        let (_, texts) = inputs(body)?;
        let (tokens, mut permit) = self.admit_texts(tenant, &texts).await?;
        let filters = &self.pipeline.filters;
        let selection = filters.selection();
        let mut results = Vec::with_capacity(texts.len());
        for text in texts {
            let verdict = filters.check(&selection, Stage::Input, Arc::from(text), true).await;
            let (mut categories, mut scores) = (serde_json::Map::new(), serde_json::Map::new());
            let flagged = match verdict {
                Some(v) if v.action != Action::Allow => {
                    let category = v.category.unwrap_or_else(|| "unspecified".into());
                    categories.insert(category.clone(), json!(true));
                    scores.insert(category, json!(1.0));
                    true
                }
                _ => false,
            };
            results.push(json!({"flagged": flagged, "categories": categories, "category_scores": scores}));
        }
        permit.settle(tokens, None);
        let model = selection
            .active
            .as_ref()
            .filter(|_| selection.enabled)
            .map_or("none".to_string(), |a| a.id.clone());
        Ok(json!({"id": format!("modr-{:016x}", rand::random::<u64>()), "model": model, "results": results}))
    }
}

/// Little-endian f32s in base64, as OpenAI's `encoding_format: base64` sends them.
fn base64_f32(v: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        // 1.0f32 is 00 00 80 3f little-endian.
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[]), "");
    }

    #[test]
    fn inputs_take_a_string_or_a_list_of_strings() {
        assert_eq!(inputs(br#"{"input": "a"}"#).expect("ok").1, ["a"]);
        assert_eq!(inputs(br#"{"input": ["a", "b"]}"#).expect("ok").1, ["a", "b"]);
        assert_eq!(
            inputs(br#"{"input": [1]}"#).expect_err("ids").param.as_deref(),
            Some("input[0]")
        );
        assert_eq!(
            inputs(br#"{"input": []}"#).expect_err("empty").param.as_deref(),
            Some("input")
        );
        assert_eq!(inputs(br#"{}"#).expect_err("missing").param.as_deref(), Some("input"));
    }
}
