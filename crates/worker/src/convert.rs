//! Conversions between core types and the worker wire contract, in both directions, in one place.

use std::time::{Duration, UNIX_EPOCH};

use ferroserve_core::{
    Alternative, BackendError, ChatMessage, Completion, Constraint, Event, FinishReason, GenerationDefaults,
    GrammarSyntax, Input, ModelInfo, Role, Sampling, Timings, TokenChunk, TokenDetail, Usage, ValidRequest,
    WorkerStats,
};
use ferroserve_proto::worker as pb;
use tonic::{Code, Status};

/// Metadata key carrying the offending field of an INVALID_ARGUMENT from a worker.
const FIELD_KEY: &str = "ferroserve-field";

pub(crate) fn request_to_wire(r: &ValidRequest) -> pb::WorkRequest {
    let input = match &r.input {
        Input::Prompt(p) => pb::work_request::Input::Prompt(p.clone()),
        Input::Chat(messages) => pb::work_request::Input::Conversation(pb::Conversation {
            messages: messages
                .iter()
                .map(|m| pb::Message {
                    role: role_to_wire(m.role) as i32,
                    content: m.content.clone(),
                })
                .collect(),
        }),
    };
    pb::WorkRequest {
        request_id: r.request_id.clone(),
        input: Some(input),
        max_tokens: r.max_tokens,
        sampling: Some(sampling_to_wire(r.sampling)),
        stop: r.stop.clone(),
        arrived_unix_ms: r.arrived.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        priority: r.priority,
        continuation: r.continuation.clone(),
        top_logprobs: r.top_logprobs,
        constraint: r.constraint.as_ref().map(constraint_to_wire),
    }
}

fn constraint_to_wire(c: &Constraint) -> pb::Constraint {
    use pb::constraint::Kind;
    let kind = match c {
        Constraint::JsonSchema { schema, strict } => Kind::JsonSchema(pb::JsonSchema {
            schema: schema.clone(),
            strict: *strict,
        }),
        Constraint::JsonObject => Kind::JsonObject(true),
        Constraint::Regex(r) => Kind::Regex(r.clone()),
        Constraint::Grammar {
            syntax: GrammarSyntax::Lark,
            text,
        } => Kind::Lark(text.clone()),
        Constraint::Grammar {
            syntax: GrammarSyntax::Gbnf,
            text,
        } => Kind::Gbnf(text.clone()),
        Constraint::Choice(choices) => Kind::Choice(pb::Choices {
            choices: choices.clone(),
        }),
    };
    pb::Constraint { kind: Some(kind) }
}

fn constraint_from_wire(c: pb::Constraint) -> Result<Constraint, Status> {
    use pb::constraint::Kind;
    Ok(match c.kind {
        Some(Kind::JsonSchema(s)) => Constraint::JsonSchema {
            schema: s.schema,
            strict: s.strict,
        },
        Some(Kind::JsonObject(_)) => Constraint::JsonObject,
        Some(Kind::Regex(r)) => Constraint::Regex(r),
        Some(Kind::Lark(text)) => Constraint::Grammar {
            syntax: GrammarSyntax::Lark,
            text,
        },
        Some(Kind::Gbnf(text)) => Constraint::Grammar {
            syntax: GrammarSyntax::Gbnf,
            text,
        },
        Some(Kind::Choice(c)) => Constraint::Choice(c.choices),
        None => return Err(Status::invalid_argument("work request has a constraint of no kind")),
    })
}

/// The router validated this request; a malformed one here is a bug on the other side, not user error.
pub(crate) fn request_from_wire(r: pb::WorkRequest) -> Result<ValidRequest, Status> {
    let input = match r.input {
        Some(pb::work_request::Input::Prompt(p)) => Input::Prompt(p),
        Some(pb::work_request::Input::Conversation(c)) => Input::Chat(
            c.messages
                .into_iter()
                .map(|m| {
                    let role = role_from_wire(m.role)
                        .ok_or_else(|| Status::invalid_argument(format!("unknown role value {}", m.role)))?;
                    Ok(ChatMessage {
                        role,
                        content: m.content,
                    })
                })
                .collect::<Result<_, Status>>()?,
        ),
        None => return Err(Status::invalid_argument("work request has no input")),
    };
    let s = r
        .sampling
        .ok_or_else(|| Status::invalid_argument("work request has no sampling"))?;
    Ok(ValidRequest {
        request_id: r.request_id,
        input,
        max_tokens: r.max_tokens,
        sampling: sampling_from_wire(s),
        stop: r.stop,
        arrived: UNIX_EPOCH + Duration::from_millis(r.arrived_unix_ms),
        priority: r.priority,
        continuation: r.continuation,
        top_logprobs: r.top_logprobs,
        constraint: r.constraint.map(constraint_from_wire).transpose()?,
    })
}

fn sampling_to_wire(s: Sampling) -> pb::Sampling {
    pb::Sampling {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        seed: s.seed,
        repetition_penalty: s.repetition_penalty,
        ignore_eos: s.ignore_eos,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
    }
}

fn sampling_from_wire(s: pb::Sampling) -> Sampling {
    Sampling {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        seed: s.seed,
        repetition_penalty: s.repetition_penalty,
        ignore_eos: s.ignore_eos,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
    }
}

pub(crate) fn describe_to_wire(m: &ModelInfo) -> pb::DescribeResponse {
    pb::DescribeResponse {
        model_name: m.name.clone(),
        model_version: m.version.clone(),
        context_length: m.context_length,
        system_prompt: m.defaults.system_prompt.clone().unwrap_or_default(),
        default_sampling: m.defaults.sampling.map(sampling_to_wire),
        default_stop: m.defaults.stop.clone(),
    }
}

pub(crate) fn describe_from_wire(d: pb::DescribeResponse) -> ModelInfo {
    ModelInfo {
        name: d.model_name,
        version: d.model_version,
        context_length: d.context_length,
        defaults: GenerationDefaults {
            system_prompt: Some(d.system_prompt).filter(|s| !s.is_empty()),
            sampling: d.default_sampling.map(sampling_from_wire),
            stop: d.default_stop,
        },
    }
}

fn role_to_wire(r: Role) -> pb::Role {
    match r {
        Role::System => pb::Role::System,
        Role::User => pb::Role::User,
        Role::Assistant => pb::Role::Assistant,
    }
}

fn role_from_wire(v: i32) -> Option<Role> {
    match pb::Role::try_from(v).ok()? {
        pb::Role::System => Some(Role::System),
        pb::Role::User => Some(Role::User),
        pb::Role::Assistant => Some(Role::Assistant),
        pb::Role::Unspecified => None,
    }
}

pub(crate) fn event_to_wire(e: Event) -> pb::WorkEvent {
    let event = match e {
        Event::Token(t) => pb::work_event::Event::Token(pb::Token {
            text: t.text,
            token_ids: t.token_ids,
            logprobs: t.logprobs,
            entropies: t.entropies,
            details: t
                .details
                .into_iter()
                .map(|d| pb::TokenDetail {
                    piece: d.piece,
                    top: d
                        .top
                        .into_iter()
                        .map(|a| pb::Alternative {
                            token_id: a.token,
                            piece: a.piece,
                            logprob: a.logprob,
                        })
                        .collect(),
                })
                .collect(),
        }),
        Event::Complete(c) => pb::work_event::Event::Complete(pb::Complete {
            finish: finish_to_wire(c.finish) as i32,
            prompt_tokens: c.usage.prompt_tokens,
            completion_tokens: c.usage.completion_tokens,
            queue_ms: c.timings.queue_ms,
            time_to_first_token_ms: c.timings.time_to_first_token_ms,
            total_ms: c.timings.total_ms,
            cached_tokens: c.usage.cached_tokens,
        }),
    };
    pb::WorkEvent { event: Some(event) }
}

pub(crate) fn event_from_wire(e: pb::WorkEvent) -> Result<Event, BackendError> {
    match e.event {
        Some(pb::work_event::Event::Token(t)) => Ok(Event::Token(TokenChunk {
            text: t.text,
            token_ids: t.token_ids,
            logprobs: t.logprobs,
            entropies: t.entropies,
            details: t
                .details
                .into_iter()
                .map(|d| TokenDetail {
                    piece: d.piece,
                    top: d
                        .top
                        .into_iter()
                        .map(|a| Alternative {
                            token: a.token_id,
                            piece: a.piece,
                            logprob: a.logprob,
                        })
                        .collect(),
                })
                .collect(),
        })),
        Some(pb::work_event::Event::Complete(c)) => Ok(Event::Complete(Completion {
            finish: finish_from_wire(c.finish)
                .ok_or_else(|| BackendError::Internal(format!("worker sent unknown finish reason {}", c.finish)))?,
            usage: Usage {
                prompt_tokens: c.prompt_tokens,
                completion_tokens: c.completion_tokens,
                cached_tokens: c.cached_tokens.min(c.prompt_tokens),
            },
            timings: Timings {
                queue_ms: c.queue_ms,
                time_to_first_token_ms: c.time_to_first_token_ms,
                total_ms: c.total_ms,
            },
        })),
        None => Err(BackendError::Internal("worker sent an empty event".into())),
    }
}

fn finish_to_wire(f: FinishReason) -> pb::Finish {
    match f {
        FinishReason::Length => pb::Finish::Length,
        FinishReason::Stop => pb::Finish::Stop,
        FinishReason::Eos => pb::Finish::Eos,
        FinishReason::Filtered => pb::Finish::Filtered,
        FinishReason::Cancelled => pb::Finish::Cancelled,
    }
}

fn finish_from_wire(v: i32) -> Option<FinishReason> {
    match pb::Finish::try_from(v).ok()? {
        pb::Finish::Length => Some(FinishReason::Length),
        pb::Finish::Stop => Some(FinishReason::Stop),
        pb::Finish::Eos => Some(FinishReason::Eos),
        pb::Finish::Filtered => Some(FinishReason::Filtered),
        pb::Finish::Cancelled => Some(FinishReason::Cancelled),
        pb::Finish::Unspecified => None,
    }
}

pub(crate) fn stats_to_wire(s: WorkerStats) -> pb::WorkerStats {
    pb::WorkerStats {
        accepted: s.accepted,
        completed: s.completed,
        cancelled: s.cancelled,
        waiting: s.waiting,
        running: s.running,
        generated_tokens: s.generated_tokens,
        draining: s.draining,
    }
}

pub(crate) fn stats_from_wire(s: pb::WorkerStats) -> WorkerStats {
    WorkerStats {
        accepted: s.accepted,
        completed: s.completed,
        cancelled: s.cancelled,
        waiting: s.waiting,
        running: s.running,
        generated_tokens: s.generated_tokens,
        draining: s.draining,
    }
}

/// The worker side: a backend error as the status the router will read back with [`status_to_error`].
pub(crate) fn error_to_status(e: BackendError) -> Status {
    match e {
        BackendError::InvalidRequest { field, message } => {
            let mut status = Status::invalid_argument(message);
            if let Ok(v) = field.parse() {
                status.metadata_mut().insert(FIELD_KEY, v);
            }
            status
        }
        BackendError::Overloaded(m) => Status::resource_exhausted(m),
        BackendError::Unavailable(m) => Status::unavailable(m),
        BackendError::Internal(m) => Status::internal(m),
    }
}

/// The router side: a worker's status back into the backend error it stood for. A broken connection (a
/// worker that died, a reset stream: UNKNOWN or UNAVAILABLE, CANCELLED) is `Unavailable`, which the
/// router answers by moving the request to another worker, never with INTERNAL or UNKNOWN. Messages name
/// no internal address; the address goes to the router's log.
pub(crate) fn status_to_error(s: Status, address: &str) -> BackendError {
    match s.code() {
        Code::InvalidArgument => BackendError::InvalidRequest {
            field: s
                .metadata()
                .get(FIELD_KEY)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("request")
                .to_string(),
            message: s.message().to_string(),
        },
        Code::ResourceExhausted => BackendError::Overloaded(format!("a worker is full: {}", s.message())),
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Unknown => {
            tracing::warn!(worker = address, code = ?s.code(), message = s.message(), "worker call failed");
            BackendError::Unavailable(format!("a worker failed or went away: {}", scrub(s.message(), address)))
        }
        _ => {
            tracing::warn!(worker = address, code = ?s.code(), message = s.message(), "worker error");
            BackendError::Internal(format!("a worker failed the request: {}", scrub(s.message(), address)))
        }
    }
}

/// `message` without the worker's address (as `http://host:port` or `host:port`).
fn scrub(message: &str, address: &str) -> String {
    let host_port = address.split("://").nth(1).unwrap_or(address);
    message.replace(address, "<worker>").replace(host_port, "<worker>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let mut r = ValidRequest::greedy_prompt("id-1", "hello", 9);
        r.input = Input::Chat(vec![ChatMessage {
            role: Role::Assistant,
            content: "hi".into(),
        }]);
        r.stop = vec!["\n".into()];
        r.sampling.seed = 42;
        r.arrived = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        r.priority = -3;
        r.continuation = vec![5, 6];
        r.top_logprobs = Some(3);
        r.constraint = Some(Constraint::Grammar {
            syntax: GrammarSyntax::Gbnf,
            text: "root ::= \"a\"".into(),
        });
        assert_eq!(request_from_wire(request_to_wire(&r)).unwrap(), r);
        // Every kind of constraint travels to the worker as it was sent.
        for c in [
            Constraint::JsonSchema {
                schema: "{}".into(),
                strict: false,
            },
            Constraint::JsonObject,
            Constraint::Regex("a+".into()),
            Constraint::Grammar {
                syntax: GrammarSyntax::Lark,
                text: "start: \"a\"".into(),
            },
            Constraint::Choice(vec!["x".into(), "y".into()]),
        ] {
            r.constraint = Some(c);
            assert_eq!(request_from_wire(request_to_wire(&r)).unwrap(), r);
        }
    }

    #[test]
    fn a_versions_identity_and_defaults_round_trip() {
        let mut m = ModelInfo {
            name: "m".into(),
            version: "v2".into(),
            context_length: 2048,
            defaults: GenerationDefaults {
                system_prompt: Some("Be brief.".into()),
                sampling: Some(Sampling {
                    temperature: 0.7,
                    ..Sampling::GREEDY
                }),
                stop: vec!["###".into()],
            },
        };
        assert_eq!(describe_from_wire(describe_to_wire(&m)), m);
        m.defaults = GenerationDefaults::default();
        assert_eq!(describe_from_wire(describe_to_wire(&m)), m);
    }

    #[test]
    fn events_round_trip() {
        let t = Event::Token(TokenChunk {
            text: "a".into(),
            token_ids: vec![1],
            logprobs: vec![-0.5],
            entropies: vec![1.25],
            details: vec![TokenDetail {
                piece: b" a".to_vec(),
                top: vec![Alternative {
                    token: 7,
                    piece: vec![0xe2, 0x82],
                    logprob: -1.5,
                }],
            }],
        });
        assert_eq!(event_from_wire(event_to_wire(t.clone())).unwrap(), t);
        let c = Event::Complete(Completion {
            finish: FinishReason::Stop,
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                cached_tokens: 2,
            },
            timings: Timings {
                queue_ms: 1.0,
                time_to_first_token_ms: 2.0,
                total_ms: 3.0,
            },
        });
        assert_eq!(event_from_wire(event_to_wire(c.clone())).unwrap(), c);
    }

    #[test]
    fn a_broken_stream_is_a_worker_failure_and_names_no_address() {
        let e = status_to_error(
            Status::unknown("h2 protocol error: connection to http://10.1.2.3:50061 reset"),
            "http://10.1.2.3:50061",
        );
        assert!(
            matches!(&e, BackendError::Unavailable(m) if !m.contains("10.1.2.3")),
            "{e:?}"
        );
        let e = status_to_error(
            Status::internal("model failed at 10.1.2.3:50061"),
            "http://10.1.2.3:50061",
        );
        assert!(
            matches!(&e, BackendError::Internal(m) if !m.contains("10.1.2.3")),
            "{e:?}"
        );
    }

    #[test]
    fn errors_round_trip_through_status() {
        for e in [
            BackendError::InvalidRequest {
                field: "max_tokens".into(),
                message: "too long".into(),
            },
            BackendError::Overloaded("full".into()),
            BackendError::Unavailable("gone".into()),
            BackendError::Internal("boom".into()),
        ] {
            let back = status_to_error(error_to_status(e.clone()), "w");
            assert_eq!(
                std::mem::discriminant(&back),
                std::mem::discriminant(&e),
                "{e:?} -> {back:?}"
            );
        }
    }
}
