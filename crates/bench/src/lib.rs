//! `ferroserve bench`: the load tester behind every performance figure in the project.
//!
//! It measures a server the way `vllm bench serve` and NVIDIA's genai-perf do, and it speaks to Ferroserve
//! (gRPC `Inference/GenerateStream`) and to any OpenAI-compatible server (`/v1/completions`,
//! `/v1/chat/completions`, SSE), so that a comparison between peers is two runs on the same prompts.
//!
//! The pieces, in the order a run uses them:
//! - [`prompts`]: synthetic prompts of a set length in tokens, or a JSONL file, chosen with a seed;
//! - [`target`]: one request to one server, timed chunk by chunk ([`sample::Sample`]);
//! - [`load`]: closed loop (fixed concurrency) or open loop (Poisson / gamma arrivals), with warm-up,
//!   bounds and a hard timeout per request; a sweep is one run per level;
//! - [`stats`]: hdrhistogram summaries with vLLM's definitions (TTFT, ITL, TPOT, e2e), goodput, errors;
//! - [`report`]: the JSON result file (schema `ferroserve-bench/v1`), the final table and `compare`;
//! - [`plot`]: CDFs and load curves as PNG and SVG;
//! - [`mock`]: mock servers (no model) for the tool's own tests and for measuring its overhead.
#![forbid(unsafe_code)]

pub mod error;
pub mod load;
pub mod mock;
pub mod plot;
pub mod prompts;
pub mod report;
pub mod run;
pub mod sample;
pub mod stats;
pub mod target;

pub use error::BenchError;
pub use run::{Bench, run};
