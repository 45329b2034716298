//! The proptest mirror of the `generate_request` fuzz target: the same body, fed structured requests.

#[path = "../../../fuzz/bodies/generate_request.rs"]
mod body;
#[path = "../../../fuzz/bodies/regressions.rs"]
mod regressions;

use ferroserve_proto::v1 as pb;
use proptest::prelude::*;
use prost::Message;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z ]{1,12}",
        "\\PC{0,40}",
        ".{0,8}<\\|im_start\\|>.{0,8}",
        "[\\x00-\\x1f]{1,3}",
    ]
}

fn request() -> impl Strategy<Value = pb::GenerateRequest> {
    let message = (
        prop_oneof![Just("user".to_string()), Just("system".into()), text()],
        text(),
    )
        .prop_map(|(role, content)| pb::ChatMessage { role, content });
    let sampling = (
        prop_oneof![Just(0.0f32), any::<f32>(), 0.0f32..3.0],
        proptest::option::of(any::<f32>()),
        0u32..64,
        proptest::option::of(any::<f32>()),
    )
        .prop_map(|(temperature, top_p, top_k, repetition_penalty)| pb::SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: Some(1),
            repetition_penalty,
            ignore_eos: false,
            presence_penalty: repetition_penalty.map(|p| p - 1.0),
            frequency_penalty: temperature.is_sign_negative().then_some(-temperature),
        });
    (
        (text(), text(), proptest::collection::vec(message, 0..20), 0u32..10_000),
        (
            proptest::option::of(sampling),
            proptest::collection::vec(text(), 0..6),
            text(),
            any::<i32>(),
            text(),
            (any::<bool>(), 0u32..40),
            proptest::option::of((text(), 0u8..5)),
        ),
    )
        .prop_map(
            |(
                (model, prompt, messages, max_tokens),
                (sampling, stop, request_id, priority, session, top, constraint),
            )| {
                use pb::generate_request::Constraint as C;
                let constraint = constraint.map(|(text, kind)| match kind {
                    0 => C::JsonSchema(pb::JsonSchemaConstraint {
                        schema: text,
                        strict: true,
                    }),
                    1 => C::JsonObject(pb::JsonObjectConstraint {}),
                    2 => C::Regex(text),
                    3 => C::Grammar(pb::GrammarConstraint {
                        syntax: i32::from(kind),
                        text,
                    }),
                    _ => C::Choice(pb::ChoiceConstraint { choices: vec![text] }),
                });
                pb::GenerateRequest {
                    model,
                    prompt,
                    messages,
                    max_tokens,
                    sampling,
                    stop,
                    request_id,
                    priority,
                    session,
                    logprobs: top.0,
                    top_logprobs: top.1,
                    constraint,
                }
            },
        )
}

proptest! {
    #[test]
    fn structured_requests(r in request()) {
        body::run(&r.encode_to_vec());
    }

    #[test]
    fn arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        body::run(&data);
    }
}

#[test]
fn saved_crashes_stay_fixed() {
    for (name, input) in regressions::inputs("generate_request") {
        println!("{name}");
        body::run(&input);
    }
}
