//! The proptest mirrors of the `stop_matcher` and `sampler` fuzz targets: the same bodies.

#[path = "../../../fuzz/bodies/regressions.rs"]
mod regressions;
#[path = "../../../fuzz/bodies/sampler.rs"]
mod sampler;
#[path = "../../../fuzz/bodies/stop_matcher.rs"]
mod stop_matcher;

use ferroserve_core::Sampling;
use proptest::prelude::*;

/// Floats a sampler must survive: ordinary logits, and NaN, infinities, extremes and subnormals.
fn logit() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -20.0f32..20.0,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(f32::MAX),
        1 => Just(f32::MIN),
        1 => Just(f32::MIN_POSITIVE / 8.0),
        1 => any::<f32>(),
    ]
}

proptest! {
    #[test]
    fn stops_over_any_split(
        stops in proptest::collection::vec("[ab\\n]{0,4}", 0..4),
        pieces in proptest::collection::vec("[abc\\n]{0,5}", 0..12),
    ) {
        stop_matcher::check(&stops, &pieces);
    }

    #[test]
    fn stop_bytes(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        stop_matcher::run(&data);
    }

    #[test]
    fn sampling_any_logits(
        logits in proptest::collection::vec(logit(), 1..64),
        temperature in prop_oneof![Just(0.0f32), Just(1e-38), 1e-5f32..100.0, any::<f32>()],
        top_p in prop_oneof![Just(1.0f32), 0.0f32..1.0, any::<f32>()],
        top_k in 0u32..80,
        repetition_penalty in prop_oneof![Just(1.0f32), 1e-30f32..100.0, any::<f32>()],
        seed in any::<u64>(),
        presence_penalty in prop_oneof![Just(0.0f32), -2.0f32..2.0, any::<f32>()],
        frequency_penalty in prop_oneof![Just(0.0f32), -2.0f32..2.0, any::<f32>()],
    ) {
        let params = Sampling {
            temperature,
            top_p,
            top_k,
            seed,
            repetition_penalty,
            ignore_eos: false,
            presence_penalty,
            frequency_penalty,
        };
        sampler::check(params, &logits, &[0, 3, 7]);
    }

    #[test]
    fn sampler_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        sampler::run(&data);
    }
}

#[test]
fn saved_crashes_stay_fixed() {
    for (name, input) in regressions::inputs("stop_matcher") {
        println!("{name}");
        stop_matcher::run(&input);
    }
    for (name, input) in regressions::inputs("sampler") {
        println!("{name}");
        sampler::run(&input);
    }
}
