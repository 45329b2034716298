//! The proptest mirror of the `work_request` fuzz target: the same body, fed structured work requests.

#[path = "../../../fuzz/bodies/work_request.rs"]
mod body;
#[path = "../../../fuzz/bodies/regressions.rs"]
mod regressions;

use ferroserve_proto::worker as pb;
use proptest::prelude::*;
use prost::Message;

fn request() -> impl Strategy<Value = pb::WorkRequest> {
    let message = (0i32..6, "\\PC{0,30}").prop_map(|(role, content)| pb::Message { role, content });
    let input = prop_oneof![
        Just(None),
        "\\PC{0,60}".prop_map(|p| Some(pb::work_request::Input::Prompt(p))),
        proptest::collection::vec(message, 0..20)
            .prop_map(|messages| Some(pb::work_request::Input::Conversation(pb::Conversation { messages }))),
    ];
    let sampling = (
        any::<f32>(),
        any::<f32>(),
        any::<u32>(),
        any::<f32>(),
        any::<f32>(),
        any::<f32>(),
    )
        .prop_map(
            |(temperature, top_p, top_k, repetition_penalty, presence_penalty, frequency_penalty)| pb::Sampling {
                temperature,
                top_p,
                top_k,
                seed: 3,
                repetition_penalty,
                ignore_eos: false,
                presence_penalty,
                frequency_penalty,
            },
        );
    (
        "[a-z0-9\\n -]{0,40}",
        input,
        any::<u32>(),
        proptest::option::of(sampling),
        proptest::collection::vec("\\PC{0,20}", 0..20),
        any::<i32>(),
        proptest::collection::vec(any::<u32>(), 0..8),
        proptest::option::of(any::<u32>()),
        proptest::option::of(("\\PC{0,20}", any::<bool>())),
    )
        .prop_map(
            |(request_id, input, max_tokens, sampling, stop, priority, continuation, top_logprobs, constraint)| {
                pb::WorkRequest {
                    request_id,
                    input,
                    max_tokens,
                    sampling,
                    stop,
                    arrived_unix_ms: 0,
                    priority,
                    continuation,
                    top_logprobs,
                    constraint: constraint.map(|(text, regex)| pb::Constraint {
                        kind: Some(if regex {
                            pb::constraint::Kind::Regex(text)
                        } else {
                            pb::constraint::Kind::JsonSchema(pb::JsonSchema {
                                schema: text,
                                strict: true,
                            })
                        }),
                    }),
                }
            },
        )
}

proptest! {
    #[test]
    fn structured_work_requests(r in request()) {
        body::run(&r.encode_to_vec());
    }

    #[test]
    fn arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        body::run(&data);
    }
}

#[test]
fn saved_crashes_stay_fixed() {
    for (name, input) in regressions::inputs("work_request") {
        println!("{name}");
        body::run(&input);
    }
}
