//! `ferroserve bench`: the load tester (`run` by default), `compare` and `plot`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use ferroserve_bench::load::{Bound, Level, LoadSettings};
use ferroserve_bench::prompts::{PromptSource, Prompts, TokenCounter};
use ferroserve_bench::report::{RunConfig, RunResult, compare};
use ferroserve_bench::stats::Slo;
use ferroserve_bench::target::{Generation, TargetSpec};
use ferroserve_bench::{Bench, plot};
use ferroserve_model::fetch;
use ferroserve_model::gguf::GgufFile;
use ferroserve_model::tokenizer::TextTokenizer;

/// `ferroserve bench [OPTIONS]` runs a benchmark; `bench compare` and `bench plot` read result files.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// `compare` or `plot`; without one, a benchmark runs.
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    /// The benchmark's settings.
    #[command(flatten)]
    pub run: RunArgs,
}

/// The result-file subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prints two runs side by side with the ratio b / a for each level they share.
    Compare {
        /// The baseline result file.
        a: PathBuf,
        /// The result file compared with it.
        b: PathBuf,
    },
    /// Draws latency CDFs, throughput and TTFT against load, as PNG and SVG; runs are overlaid.
    Plot {
        /// Result files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Folder for the charts.
        #[arg(long, default_value = "bench-plots")]
        out: PathBuf,
    },
}

/// `ferroserve bench`: measure a server.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// grpc://host:port (Ferroserve; grpcs:// for TLS) or http://host:port[/v1/completions |
    /// /v1/chat/completions].
    #[arg(long, default_value = "grpc://127.0.0.1:50051")]
    pub target: String,
    /// CA certificate (PEM) to trust for a grpcs:// target [default: the system's roots].
    #[arg(long, env = "FERROSERVE_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// API key, sent as `authorization: Bearer`.
    #[arg(long, env = "FERROSERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Name of this run in tables and plots [default: the target URL].
    #[arg(long, default_value = "")]
    pub label: String,
    /// A note on how the server was built and what it runs (compiler flags, kernel path), recorded in
    /// the result file beside this machine's CPU features.
    #[arg(long)]
    pub server_build: Option<String>,
    /// The `model` field (Ferroserve: empty is the default model; "name@version" pins one).
    #[arg(long, default_value = "")]
    pub model: String,
    /// Closed loop: requests kept in flight; a comma list is a sweep (e.g. 1,4,8,16).
    #[arg(long, value_delimiter = ',', conflicts_with = "rate")]
    pub concurrency: Vec<u32>,
    /// Open loop: arrivals per second; a comma list is a sweep; `inf` sends all at once.
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<f64>,
    /// Open loop: gamma shape of inter-arrival times (1 = Poisson, <1 burstier, >1 smoother).
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Open loop: cap on requests in flight (arrivals beyond it wait).
    #[arg(long)]
    pub max_concurrency: Option<u32>,
    /// Measured requests per level [default: 64 unless --duration is given].
    #[arg(long, conflicts_with = "duration")]
    pub requests: Option<u32>,
    /// Seconds per level (no new request after it; those in flight finish and count).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Requests per level sent before measuring, not counted.
    #[arg(long, default_value_t = 2)]
    pub warmup: u32,
    /// Hard limit on one request, in seconds.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    /// Synthetic prompts of this many tokens.
    #[arg(long, default_value_t = 128, conflicts_with = "prompts")]
    pub input_tokens: u32,
    /// Send synthetic prompts as one-message chats (chat template; /v1/chat/completions).
    #[arg(long)]
    pub chat: bool,
    /// JSONL prompts instead: {"prompt": "..."} or {"messages": [{"role", "content"}, ...]} per line.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// What synthetic prompts look like: `random` (none shares anything), `shared-prefix` (groups of
    /// prompts with one prefix: --prefix-tokens, --groups, then --input-tokens of their own) or
    /// `multi-turn` (--conversations of --turns, each turn resending the history; sent in order).
    #[arg(long, value_enum, default_value = "random", conflicts_with = "prompts")]
    pub workload: Workload,
    /// shared-prefix: tokens of each shared prefix (as the system message with --chat).
    #[arg(long, default_value_t = 1024)]
    pub prefix_tokens: u32,
    /// shared-prefix: distinct prefixes.
    #[arg(long, default_value_t = 1)]
    pub groups: u32,
    /// multi-turn: conversations (their turns are interleaved: every first turn, then every second...).
    #[arg(long, default_value_t = 16)]
    pub conversations: u32,
    /// multi-turn: turns per conversation.
    #[arg(long, default_value_t = 4)]
    pub turns: u32,
    /// multi-turn: tokens of each conversation's system prompt.
    #[arg(long, default_value_t = 256)]
    pub system_tokens: u32,
    /// multi-turn: tokens of each earlier reply resent as history (--input-tokens sizes each question).
    #[arg(long, default_value_t = 64)]
    pub reply_tokens: u32,
    /// GGUF whose tokenizer sizes synthetic prompts exactly [default: the cached default model, if any].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Output tokens per request.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// Generate past end-of-sequence, so every request produces --max-tokens (fair comparisons).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Structured output: constrain every request's output by the JSON schema in this file.
    #[arg(long)]
    pub json_schema: Option<PathBuf>,
    /// Seed for prompt choice and arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Goodput objectives, e.g. ttft=500ms,tpot=50ms,e2e=10s.
    #[arg(long)]
    pub slo: Option<String>,
    /// Write the result JSON (schema ferroserve-bench/v1) here.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// The shape of synthetic prompts (`--workload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Random words; no two prompts share a prefix.
    Random,
    /// Groups of prompts sharing a long prefix.
    SharedPrefix,
    /// Conversations that resend their history.
    MultiTurn,
}

/// Dispatches `ferroserve bench ...`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        Some(BenchCommand::Compare { a, b }) => {
            print!("{}", compare(&RunResult::read(&a)?, &RunResult::read(&b)?));
            Ok(())
        }
        Some(BenchCommand::Plot { files, out }) => {
            let runs = files
                .iter()
                .map(|f| RunResult::read(f))
                .collect::<Result<Vec<_>, _>>()?;
            for f in plot::plot(&runs, &out)? {
                println!("{}", f.display());
            }
            Ok(())
        }
        None => measure(args.run).await,
    }
}

/// The tokenizer that sizes synthetic prompts, if one can be had without fetching anything.
fn token_counter(explicit: Option<&Path>) -> anyhow::Result<Option<Box<TokenCounter>>> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            let cached = fetch::default_cache_dir().join(fetch::DEFAULT_MODEL.file_name);
            if !cached.exists() {
                eprintln!(
                    "note: no tokenizer (run `ferroserve fetch-model` or pass --tokenizer); prompt lengths are word counts"
                );
                return Ok(None);
            }
            cached
        }
    };
    let gguf = GgufFile::open(&path).with_context(|| format!("reading the tokenizer from {}", path.display()))?;
    let tokenizer = TextTokenizer::from_gguf(&gguf)?;
    Ok(Some(Box::new(move |s: &str| {
        tokenizer.encode(s).map_or(0, |ids| ids.len())
    })))
}

async fn measure(a: RunArgs) -> anyhow::Result<()> {
    let levels: Vec<Level> = match (a.concurrency.is_empty(), a.rate.is_empty()) {
        (_, false) => a.rate.iter().map(|&r| Level::Rate(r)).collect(),
        (false, true) => a.concurrency.iter().map(|&c| Level::Concurrency(c)).collect(),
        (true, true) => vec![Level::Concurrency(1)],
    };
    let bound = match (a.requests, a.duration) {
        (_, Some(s)) => Bound::Seconds(s),
        (n, None) => Bound::Requests(n.unwrap_or(64)),
    };
    let load = LoadSettings {
        levels,
        bound,
        warmup: a.warmup,
        timeout_secs: a.timeout,
        burstiness: a.burstiness,
        max_concurrency: a.max_concurrency,
        seed: a.seed,
    };
    load.validate()?;
    let source = match (&a.prompts, a.workload) {
        (Some(path), _) => PromptSource::File { path: path.clone() },
        (None, Workload::Random) => PromptSource::Synthetic {
            input_tokens: a.input_tokens,
            chat: a.chat,
        },
        (None, Workload::SharedPrefix) => PromptSource::SharedPrefix {
            prefix_tokens: a.prefix_tokens,
            suffix_tokens: a.input_tokens,
            groups: a.groups,
            chat: a.chat,
        },
        (None, Workload::MultiTurn) => PromptSource::MultiTurn {
            conversations: a.conversations,
            turns: a.turns,
            system_tokens: a.system_tokens,
            user_tokens: a.input_tokens,
            reply_tokens: a.reply_tokens,
        },
    };
    // Enough synthetic prompts that none repeats within a run (a repeat could hit a prefix cache).
    let pool = match bound {
        Bound::Requests(n) => (n as usize + a.warmup as usize) * load.levels.len(),
        Bound::Seconds(_) => 2048,
    };
    let counter = token_counter(a.tokenizer.as_deref())?;
    let prompts = Prompts::load(&source, a.seed, pool, counter.as_deref())?;
    let json_schema = a
        .json_schema
        .as_deref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading the JSON schema {}", p.display())))
        .transpose()?;
    let target = TargetSpec::parse(&a.target, prompts.has_chat(), a.api_key.is_some())?;
    let bench = Bench {
        label: a.label,
        server_build: a.server_build,
        target,
        api_key: a.api_key,
        tls: ferroserve_net::ClientTlsFiles {
            ca: a.tls_ca,
            ..Default::default()
        },
        config: RunConfig {
            generation: Generation {
                model: a.model,
                max_tokens: a.max_tokens,
                ignore_eos: a.ignore_eos,
                temperature: a.temperature,
                json_schema,
            },
            prompts: source,
            mean_input_tokens: prompts.mean_tokens(),
            load,
            slo: a.slo.as_deref().map(Slo::parse).transpose()?,
        },
        show_progress: !a.quiet,
    };
    let result = ferroserve_bench::run(&bench, prompts, |l| {
        eprintln!(
            "{}: {}/{} ok, {:.2} req/s, {:.1} output tok/s, TTFT p50 {:.1} ms, TPOT p50 {:.2} ms",
            l.level.label(),
            l.completed,
            l.sent,
            l.request_throughput,
            l.output_throughput,
            l.ttft.median,
            l.tpot.median
        );
    })
    .await?;
    print!("{}", result.table());
    if let Some(path) = &a.output {
        result.write(path)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
