//! Fuzz body: the GGUF reader and everything built from a file's metadata and tensors (the tokenizer and
//! the batched model) on corrupted files. Shared by the cargo-fuzz target and its proptest mirror
//! (crates/model/tests/fuzz_mirror.rs). The seed is a tiny valid llama made here: a byte-level tokenizer
//! with two control tokens, one block, 32-wide, f32 weights.
//!
//! Property: a corrupted file is refused with an error, never a panic, an abort or an allocation the
//! file's size does not justify.

use std::io::Cursor;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use ferroserve_model::batched::BatchedLlama;
use ferroserve_model::gguf::GgufFile;
use ferroserve_model::tokenizer::TextTokenizer;

const DIM: usize = 32;
const FF: usize = 64;

fn tensor(rows: usize, cols: Option<usize>) -> QTensor {
    let n = rows * cols.unwrap_or(1);
    let data: Vec<f32> = (0..n).map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5).collect();
    let t = match cols {
        Some(c) => Tensor::from_vec(data, (rows, c), &Device::Cpu),
        None => Tensor::from_vec(data, rows, &Device::Cpu),
    }
    .expect("tensor");
    QTensor::quantize(&t, GgmlDType::F32).expect("f32 qtensor")
}

/// A tiny valid GGUF file.
pub fn seed() -> Vec<u8> {
    let mut tokens: Vec<String> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .map(String::from)
        .collect();
    tokens.sort();
    tokens.push("Ġt".into());
    tokens.push("<|im_start|>".into());
    tokens.push("<|im_end|>".into());
    let vocab = tokens.len();
    let mut types = vec![1u32; vocab];
    types[vocab - 2] = 3;
    types[vocab - 1] = 3;
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("llama.block_count", Value::U32(1)),
        ("llama.embedding_length", Value::U32(DIM as u32)),
        ("llama.feed_forward_length", Value::U32(FF as u32)),
        ("llama.context_length", Value::U32(64)),
        ("llama.rope.dimension_count", Value::U32((DIM / 2) as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(tokens)),
        ("tokenizer.ggml.merges", strings(vec!["Ġ t".into()])),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::U32).collect()),
        ),
        ("tokenizer.ggml.eos_token_id", Value::U32((vocab - 1) as u32)),
        ("tokenizer.ggml.bos_token_id", Value::U32((vocab - 2) as u32)),
    ];
    let head = DIM / 2;
    let tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), tensor(vocab, Some(DIM))),
        ("output_norm.weight".into(), tensor(DIM, None)),
        ("blk.0.attn_q.weight".into(), tensor(DIM, Some(DIM))),
        ("blk.0.attn_k.weight".into(), tensor(head, Some(DIM))),
        ("blk.0.attn_v.weight".into(), tensor(head, Some(DIM))),
        ("blk.0.attn_output.weight".into(), tensor(DIM, Some(DIM))),
        ("blk.0.ffn_gate.weight".into(), tensor(FF, Some(DIM))),
        ("blk.0.ffn_up.weight".into(), tensor(FF, Some(DIM))),
        ("blk.0.ffn_down.weight".into(), tensor(DIM, Some(FF))),
        ("blk.0.attn_norm.weight".into(), tensor(DIM, None)),
        ("blk.0.ffn_norm.weight".into(), tensor(DIM, None)),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md, &ts).expect("write the seed");
    out.into_inner()
}

/// Opens `bytes` as a GGUF file (through a file in the temp directory, as the server opens models) and
/// builds what the server builds from it; a model that loads also runs one step.
pub fn check(bytes: &[u8]) {
    let path = std::env::temp_dir().join(format!(
        "ferroserve-fuzz-{}-{:?}.gguf",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&path, bytes).expect("write the case");
    let opened = GgufFile::open(&path);
    if let Ok(gguf) = &opened
        && let Ok(t) = TextTokenizer::from_gguf(gguf)
    {
        let ids = t.encode("hi <|im_start|> there").unwrap_or_default();
        let _ = t.decode(&ids);
    }
    if let Ok(mut gguf) = opened
        && let Ok(model) = BatchedLlama::load(&mut gguf, &Device::Cpu)
        && let Ok(mut cache) = model.new_cache(4)
    {
        let tokens = [0u32, 1];
        let mut chunks = [ferroserve_model::batched::Chunk {
            cache: &mut cache,
            tokens: &tokens,
        }];
        if let Ok(logits) = model.forward(&mut chunks) {
            assert_eq!(logits.len(), 1);
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// The whole input is the file.
pub fn run(data: &[u8]) {
    check(data);
}
