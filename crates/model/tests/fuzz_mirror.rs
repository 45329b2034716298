//! The proptest mirrors of the `detokenizer` and `gguf` fuzz targets: the same bodies. The GGUF cases are
//! the body's tiny valid model with bytes overwritten and the file cut short, as a corrupted download or
//! a hostile path would give.

#[path = "../../../fuzz/bodies/detokenizer.rs"]
mod detokenizer;
#[path = "../../../fuzz/bodies/gguf.rs"]
mod gguf;
#[path = "../../../fuzz/bodies/regressions.rs"]
mod regressions;

use std::sync::OnceLock;

use proptest::prelude::*;

fn seed() -> &'static [u8] {
    static S: OnceLock<Vec<u8>> = OnceLock::new();
    S.get_or_init(gguf::seed)
}

#[test]
fn the_seed_model_loads_and_runs() {
    // The uncorrupted seed must get all the way through, or the mutations below test nothing.
    let path = std::env::temp_dir().join(format!("ferroserve-seed-{}.gguf", std::process::id()));
    std::fs::write(&path, seed()).unwrap();
    let mut file = ferroserve_model::gguf::GgufFile::open(&path).unwrap();
    ferroserve_model::tokenizer::TextTokenizer::from_gguf(&file).unwrap();
    let model = ferroserve_model::batched::BatchedLlama::load(&mut file, &candle_core::Device::Cpu).unwrap();
    assert_eq!(model.shape().layers, 1);
    let _ = std::fs::remove_file(&path);
    gguf::check(seed());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn corrupted_gguf_files_are_refused_not_crashed_on(
        writes in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..16),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let mut bytes = seed().to_vec();
        for (at, b) in writes {
            let n = bytes.len();
            // Most corruption lands in the header and metadata, where lengths and counts live.
            let at = if at % 4 == 0 { at % n } else { at % n.min(4096) };
            bytes[at] = b;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut % (bytes.len() + 1));
        }
        gguf::check(&bytes);
    }

    #[test]
    fn streamed_text_is_a_prefix_of_the_whole(ids in proptest::collection::vec(any::<u16>(), 0..64)) {
        let ids: Vec<u32> = ids.into_iter().map(u32::from).collect();
        detokenizer::check(&ids);
    }
}

#[test]
fn saved_crashes_stay_fixed() {
    for (name, input) in regressions::inputs("gguf") {
        println!("{name}");
        gguf::run(&input);
    }
    for (name, input) in regressions::inputs("detokenizer") {
        println!("{name}");
        detokenizer::run(&input);
    }
}

/// Writes the GGUF seed where `FERROSERVE_FUZZ_SEED` says, for `scripts/fuzz.sh`.
#[test]
#[ignore = "writes the fuzzer's seed file; run by scripts/fuzz.sh"]
fn write_the_gguf_seed() {
    let path = std::env::var("FERROSERVE_FUZZ_SEED").expect("FERROSERVE_FUZZ_SEED names the file to write");
    std::fs::write(path, seed()).unwrap();
}
