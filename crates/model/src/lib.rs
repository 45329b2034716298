//! Everything about the model itself: where its file comes from ([`fetch`]), how its GGUF is read
//! ([`gguf`]), its tokenizer ([`tokenizer`]) and chat template ([`chat`]), streaming detokenization
//! ([`detok`]) and the forward pass ([`llama`]). Nothing here is async or knows about gRPC.
#![forbid(unsafe_code)]

pub mod batched;
pub mod chat;
pub mod derive;
pub mod detok;
pub mod device;
pub mod embed;
pub mod fetch;
pub mod gguf;
pub mod kv;
pub mod llama;
pub mod minilm;
pub mod pool;
mod seq_cache;
pub mod tokenizer;
pub mod validate;

mod error;
mod loaded;

pub use error::ModelError;

/// The CPU kernel path this process runs (`avx512-vnni`, `avx-vnni`, `avx2` or `portable`): chosen at
/// run time from the CPU's features, or forced with `FERROSERVE_KERNELS`.
pub fn cpu_kernels() -> &'static str {
    ferroserve_kernels::Isa::active().name()
}
pub use loaded::{LoadedModel, ModelSpec, TextCodec};
