//! The proptest mirror of the `config` fuzz target: the same body, fed config-shaped TOML.

#[path = "../../../fuzz/bodies/config.rs"]
mod body;
#[path = "../../../fuzz/bodies/regressions.rs"]
mod regressions;

use proptest::prelude::*;

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "-?[0-9]{1,12}",
        "-?[0-9]{1,3}\\.[0-9]{0,3}(e[+-]?[0-9]{1,3})?",
        Just("nan".to_string()),
        Just("inf".to_string()),
        "\"[a-z0-9:./@]{0,20}\"",
        Just("true".to_string()),
        Just("[]".to_string()),
        Just("[1, 2]".to_string()),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("listen"),
        Just("metrics_listen"),
        Just("drain_timeout_secs"),
        Just("max_batch_seqs"),
        Just("queue_capacity"),
        Just("kv_budget_tokens"),
        Just("requests_per_second"),
        Just("max_in_flight"),
        Just("max_prompt_bytes"),
        Just("max_request_bytes"),
        Just("token_sha256"),
        Just("workers"),
        Just("keepalive_interval_secs"),
        Just("handshake_timeout_secs"),
        Just("usd_per_hour"),
        Just("version"),
    ]
    .prop_map(str::to_string)
}

fn section() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("server"),
        Just("model"),
        Just("engine"),
        Just("router"),
        Just("worker"),
        Just("admission"),
        Just("connections"),
        Just("cost"),
        Just("filter"),
        Just("auth"),
    ]
    .prop_map(str::to_string)
}

proptest! {
    #[test]
    fn config_shaped_text(entries in proptest::collection::vec((section(), key(), value()), 0..8)) {
        let text: String = entries.iter().map(|(s, k, v)| format!("[{s}]\n{k} = {v}\n")).collect();
        body::check(&text);
    }

    #[test]
    fn any_text(text in "\\PC{0,120}") {
        body::check(&text);
    }
}

#[test]
fn saved_crashes_stay_fixed() {
    for (name, input) in regressions::inputs("config") {
        println!("{name}");
        body::run(&input);
    }
}
