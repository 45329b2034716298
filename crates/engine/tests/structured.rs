//! Structured output on the real SmolLM2 GGUF: every output under a JSON schema parses and validates,
//! regexes, choices and grammars (Lark and GBNF) are obeyed, a seeded constrained stream is the same alone
//! and batched with free ones, a migrated stream continues under its constraint, running out of tokens
//! mid-structure ends with LENGTH, and every kind of bad constraint is refused before any model work.

mod support;

use ferroserve_core::{
    Backend, BackendError, ChatMessage, Constraint, Event, FinishReason, GrammarSyntax, Input, Role, Sampling,
    ValidRequest,
};
use ferroserve_engine::{EngineConfig, EngineHandle};
use ferroserve_model::LoadedModel;
use futures::StreamExt;
use serde_json::Value;
use support::{spec, weights};

fn engine(config: EngineConfig) -> EngineHandle {
    EngineHandle::start(
        LoadedModel::load_sharing(&spec(), Some(weights())).expect("model loads"),
        config,
    )
}

fn ask(id: &str, question: &str, max_tokens: u32, constraint: Option<Constraint>) -> ValidRequest {
    ValidRequest {
        input: Input::Chat(vec![ChatMessage {
            role: Role::User,
            content: question.into(),
        }]),
        constraint,
        ..ValidRequest::greedy_prompt(id, "-", max_tokens)
    }
}

fn schema(s: Value) -> Option<Constraint> {
    Some(Constraint::JsonSchema {
        schema: s.to_string(),
        strict: true,
    })
}

/// Runs `requests` at once; each one's text, token ids and finish reason, in order.
async fn run_all(e: &EngineHandle, requests: Vec<ValidRequest>) -> Vec<(String, Vec<u32>, FinishReason)> {
    let mut streams = Vec::new();
    for r in requests {
        streams.push(e.generate(r).await.expect("accepted"));
    }
    let collect = streams.into_iter().map(|mut s| async move {
        let (mut text, mut ids) = (String::new(), Vec::new());
        while let Some(event) = s.next().await {
            match event.expect("no error") {
                Event::Token(t) => {
                    text.push_str(&t.text);
                    ids.extend(t.token_ids);
                }
                Event::Complete(c) => return (text, ids, c.finish),
            }
        }
        panic!("the stream ended without a completion");
    });
    futures::future::join_all(collect).await
}

async fn one(e: &EngineHandle, r: ValidRequest) -> (String, Vec<u32>, FinishReason) {
    run_all(e, vec![r]).await.remove(0)
}

fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "Describe a person called Ada, aged 36, who lives in London.",
            serde_json::json!({"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 40},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "city": {"type": "string", "maxLength": 40},
                "email": {"type": "string", "maxLength": 60}},
              "required": ["name", "age"], "additionalProperties": false}),
        ),
        (
            "Give a recipe for pancakes.",
            serde_json::json!({"type": "object", "properties": {
                "title": {"type": "string", "maxLength": 60},
                "servings": {"type": "integer", "minimum": 1, "maximum": 12},
                "ingredients": {"type": "array", "minItems": 1, "maxItems": 5, "items": {"type": "object",
                    "properties": {"item": {"type": "string", "maxLength": 30},
                                   "grams": {"type": "number", "minimum": 0, "maximum": 1000}},
                    "required": ["item", "grams"], "additionalProperties": false}}},
              "required": ["title", "servings", "ingredients"], "additionalProperties": false}),
        ),
        (
            "Classify the review 'The battery died after a day.'",
            serde_json::json!({"type": "object", "properties": {
                "sentiment": {"enum": ["positive", "neutral", "negative"]},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "topics": {"type": "array", "items": {"enum": ["battery", "screen", "price", "delivery"]},
                           "maxItems": 3}},
              "required": ["sentiment", "confidence"], "additionalProperties": false}),
        ),
        (
            "Where is the Eiffel Tower? Answer with coordinates.",
            serde_json::json!({"type": "object", "properties": {
                "place": {"type": "object", "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "location": {"type": "object", "properties": {
                        "lat": {"type": "number", "minimum": -90, "maximum": 90},
                        "lon": {"type": "number", "minimum": -180, "maximum": 180}},
                      "required": ["lat", "lon"], "additionalProperties": false}},
                  "required": ["name", "location"], "additionalProperties": false},
                "visited": {"type": "boolean"}},
              "required": ["place"], "additionalProperties": false}),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_output_under_a_schema_parses_and_validates() {
    let e = engine(EngineConfig::default());
    let mut requests = Vec::new();
    for (i, (question, s)) in schemas().into_iter().enumerate() {
        requests.push(ask(&format!("greedy-{i}"), question, 200, schema(s.clone())));
        let mut sampled = ask(&format!("sampled-{i}"), question, 200, schema(s));
        sampled.sampling = Sampling {
            temperature: 0.9,
            top_p: 0.95,
            top_k: 50,
            seed: 7 + i as u64,
            ..Sampling::GREEDY
        };
        requests.push(sampled);
    }
    requests.push(ask(
        "object",
        "Give the name and age of a person as JSON.",
        200,
        Some(Constraint::JsonObject),
    ));
    let done = run_all(&e, requests).await;
    for (k, (text, _, finish)) in done.iter().enumerate() {
        assert_ne!(*finish, FinishReason::Length, "request {k} ran out of tokens: {text}");
        let value: Value = serde_json::from_str(text).unwrap_or_else(|err| panic!("request {k}: {err}: {text}"));
        if k < 2 * schemas().len() {
            let s = &schemas()[k / 2].1;
            let validator = jsonschema::validator_for(s).expect("a valid schema");
            let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "request {k}: {text} breaks its schema: {errors:?}");
        } else {
            assert!(value.is_object(), "json_object gives an object: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regexes_choices_and_grammars_are_obeyed() {
    let e = engine(EngineConfig::default());
    let date = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])";
    let phone = r"\(\d{3}\) \d{3}-\d{4}";
    let arithmetic_lark = "start: expr\nexpr: term ((\"+\" | \"-\") term)*\nterm: /[0-9]{1,3}/\n";
    let arithmetic_gbnf = "root ::= term ((\"+\" | \"-\") term)*\nterm ::= [0-9] [0-9]? [0-9]?\n";
    let cases: Vec<(&str, Constraint, &str)> = vec![
        (
            "When did the Apollo 11 landing happen?",
            Constraint::Regex(date.into()),
            date,
        ),
        ("Make up a US phone number.", Constraint::Regex(phone.into()), phone),
        (
            "Is the sky green?",
            Constraint::Choice(vec!["yes".into(), "no".into(), "it depends".into()]),
            "yes|no|it depends",
        ),
        (
            "Write a sum of three numbers.",
            Constraint::Grammar {
                syntax: GrammarSyntax::Lark,
                text: arithmetic_lark.into(),
            },
            r"[0-9]{1,3}([+-][0-9]{1,3})*",
        ),
        (
            "Write a sum of three numbers.",
            Constraint::Grammar {
                syntax: GrammarSyntax::Gbnf,
                text: arithmetic_gbnf.into(),
            },
            r"[0-9]{1,3}([+-][0-9]{1,3})*",
        ),
    ];
    let requests = cases
        .iter()
        .enumerate()
        .map(|(i, (q, c, _))| ask(&format!("c{i}"), q, 40, Some(c.clone())))
        .collect();
    let done = run_all(&e, requests).await;
    for ((_, c, pattern), (text, _, finish)) in cases.iter().zip(&done) {
        let whole = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
        assert!(whole.is_match(text), "{c:?} gave {text:?} ({finish:?})");
        assert_ne!(*finish, FinishReason::Length, "{c:?}: {text:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_constrained_stream_is_the_same_alone_and_batched() {
    let e = engine(EngineConfig::default());
    let (question, s) = schemas().remove(1);
    let mut constrained = ask("c", question, 120, schema(s));
    constrained.sampling = Sampling {
        temperature: 0.8,
        seed: 42,
        ..Sampling::GREEDY
    };
    let alone = one(&e, constrained.clone()).await;
    let mut batch = vec![constrained.clone()];
    for i in 0..3 {
        let mut free = ask(&format!("free-{i}"), "Tell me a story about a fox.", 60, None);
        free.sampling = Sampling {
            temperature: 1.0,
            seed: i,
            ..Sampling::GREEDY
        };
        batch.push(free);
    }
    let batched = run_all(&e, batch).await;
    assert_eq!(alone.1, batched[0].1, "the same tokens beside unconstrained streams");
    assert!(serde_json::from_str::<Value>(&alone.0).is_ok(), "{}", alone.0);
    assert!(
        batched[1..]
            .iter()
            .any(|(t, _, _)| serde_json::from_str::<Value>(t).is_err()),
        "the free streams are not constrained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_stream_continues_under_its_constraint() {
    let e = engine(EngineConfig::default());
    let (question, s) = schemas().remove(0);
    let mut r = ask("whole", question, 150, schema(s));
    r.sampling = Sampling {
        temperature: 0.7,
        seed: 3,
        ..Sampling::GREEDY
    };
    let whole = one(&e, r.clone()).await;
    let cut = whole.1.len() / 2;
    let mut resumed = r.clone();
    resumed.continuation = whole.1[..cut].to_vec();
    let rest = one(&e, resumed).await;
    assert_eq!(rest.1, whole.1[cut..], "the other worker goes on with the same tokens");
    assert_eq!(rest.2, whole.2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_tokens_mid_structure_ends_with_length() {
    let e = engine(EngineConfig::default());
    let (question, s) = schemas().remove(1);
    let (text, _, finish) = one(&e, ask("short", question, 6, schema(s))).await;
    assert_eq!(finish, FinishReason::Length);
    assert!(serde_json::from_str::<Value>(&text).is_err(), "cut short: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_constraint_is_refused_before_model_work() {
    let e = engine(EngineConfig::default());
    let bad = [
        (
            Constraint::JsonSchema {
                schema: r#"{"type": "object", "properties": {"a": {"type": "strng"}}}"#.into(),
                strict: true,
            },
            "json_schema",
        ),
        (
            Constraint::JsonSchema {
                schema: r#"{"type": "string", "format": "no-such-format"}"#.into(),
                strict: false,
            },
            "json_schema",
        ),
        (Constraint::Regex("(unclosed".into()), "regex"),
        (
            Constraint::Grammar {
                syntax: GrammarSyntax::Lark,
                text: "start: missing_rule".into(),
            },
            "grammar",
        ),
        (
            Constraint::Grammar {
                syntax: GrammarSyntax::Gbnf,
                text: "root ::= \"a\" undefined-rule".into(),
            },
            "grammar",
        ),
    ];
    for (c, kind) in bad {
        match e.generate(ask("bad", "hi", 8, Some(c.clone()))).await {
            Err(BackendError::InvalidRequest { field, message }) => {
                assert_eq!(field, "constraint", "{c:?}");
                assert!(
                    message.contains(kind) && message.contains("does not compile"),
                    "{c:?}: {message}"
                );
            }
            Err(other) => panic!("{c:?}: {other:?}"),
            Ok(_) => panic!("{c:?} was accepted"),
        }
    }
    assert_eq!(e.stats().accepted, 0, "nothing reached the queue");
    // A schema too big to compile within the bound is refused as such; the engine serves on.
    let slow = engine(EngineConfig {
        constraint_compile_ms: 1,
        ..EngineConfig::default()
    });
    let props: serde_json::Map<String, Value> = (0..300)
        .map(|i| {
            let field =
                serde_json::json!({"type": "string", "pattern": format!("[a-z]{{{i}}}x[0-9]+"), "maxLength": 500});
            (format!("field_{i}"), field)
        })
        .collect();
    let huge = serde_json::json!({"type": "object", "properties": props, "required": props.keys().collect::<Vec<_>>()});
    match slow.generate(ask("slow", "hi", 8, schema(huge))).await {
        Err(BackendError::InvalidRequest { message, .. }) => {
            assert!(message.contains("to compile"), "{message}")
        }
        other => panic!("expected a refusal: {:?}", other.map(|_| ())),
    }
    let (text, _, _) = one(
        &e,
        ask("fine", "Say yes.", 4, Some(Constraint::Choice(vec!["yes".into()]))),
    )
    .await;
    assert_eq!(text, "yes");
}
