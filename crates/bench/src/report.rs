//! The result file, the final table, and `compare`.
//!
//! Schema `ferroserve-bench/v1` (stable: fields may be added, none renamed or removed within v1):
//!
//! ```text
//! {
//!   "schema": "ferroserve-bench/v1",
//!   "tool_version": "0.1.0",
//!   "label": "ferroserve",                  // legend in plots and compare; defaults to the target URL
//!   "started_unix_ms": 1764420000000,
//!   "target":  {"api": "grpc" | "openai_completions" | "openai_chat", "url": "...", "authenticated": false},
//!   "config":  {"generation": {"model", "max_tokens", "ignore_eos", "temperature"},
//!               "prompts": {"kind": "synthetic", "input_tokens", "chat"} | {"kind": "file", "path"},
//!               "mean_input_tokens": 128.0,
//!               "load": {"levels": [{"concurrency": 4} | {"rate": 2.0}], "bound": {"requests": 64} |
//!                        {"seconds": 30.0}, "warmup", "timeout_secs", "burstiness", "max_concurrency", "seed"},
//!               "slo": {"ttft_ms", "tpot_ms", "e2e_ms"} | null},
//!   "levels": [ one LevelResult per level: see stats::LevelResult; latency distributions in ms ],
//!   "host": {"cpu": "AMD EPYC", "features": ["avx2", "avx512_vnni", ...]},   // the measuring machine
//!   "server_build": "..." | null    // what --server-build said about the server (flags, kernel path)
//! }
//! ```
//!
//! `host` and `server_build` were added within v1 and may be missing from older files. On loopback the
//! host is also the server's machine, so its CPU features are the server's too.
//!
//! ```text
//! ```

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::BenchError;
use crate::load::LoadSettings;
use crate::prompts::PromptSource;
use crate::stats::{LevelResult, Slo};
use crate::target::{Generation, TargetSpec};

/// The schema name written in every result file.
pub const SCHEMA: &str = "ferroserve-bench/v1";

/// The whole configuration of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// What each request asks for.
    pub generation: Generation,
    /// Where prompts come from.
    pub prompts: PromptSource,
    /// Mean prompt length in tokens over the prompt pool.
    pub mean_input_tokens: f64,
    /// Load shape, levels and bounds.
    pub load: LoadSettings,
    /// Goodput objectives, if any.
    pub slo: Option<Slo>,
}

/// One run: a target, a configuration and one result per level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// The `ferroserve` version that measured.
    pub tool_version: String,
    /// Name in legends and comparisons.
    pub label: String,
    /// Wall-clock start, ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// The server measured.
    pub target: TargetSpec,
    /// How it was measured.
    pub config: RunConfig,
    /// One per level, in sweep order.
    pub levels: Vec<LevelResult>,
    /// The machine that measured (the server's too, on loopback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostInfo>,
    /// How the server was built and what it runs, as `--server-build` gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_build: Option<String>,
}

/// A machine's CPU, as Linux reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// The model name.
    pub cpu: String,
    /// The SIMD features that matter to inference kernels (AVX, AVX-512, VNNI, AMX, NEON...).
    pub features: Vec<String>,
}

impl HostInfo {
    /// This machine, from `/proc/cpuinfo` (`None` where there is none).
    pub fn this_machine() -> Option<HostInfo> {
        let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        let field = |name: &str| {
            text.lines()
                .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        let flags = field("flags").or_else(|| field("Features")).unwrap_or_default();
        let keep = |f: &&str| {
            ["avx", "fma", "f16c", "amx", "sse4", "neon", "asimd", "sve", "bmi2"]
                .iter()
                .any(|p| f.starts_with(p))
        };
        Some(HostInfo {
            cpu: field("model name").unwrap_or_else(|| "unknown".into()),
            features: flags.split_whitespace().filter(keep).map(str::to_string).collect(),
        })
    }
}

impl RunResult {
    /// Writes pretty JSON.
    pub fn write(&self, path: &Path) -> Result<(), BenchError> {
        let json = serde_json::to_string_pretty(self).expect("results serialize");
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
        }
        std::fs::write(path, json + "\n").map_err(|e| BenchError::io(path, e))
    }

    /// Reads a result file, checking its schema.
    pub fn read(path: &Path) -> Result<Self, BenchError> {
        let text = std::fs::read_to_string(path).map_err(|e| BenchError::io(path, e))?;
        let bad = |message: String| BenchError::Result {
            path: path.to_path_buf(),
            message,
        };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        match value.get("schema").and_then(|s| s.as_str()) {
            Some(SCHEMA) => {}
            Some(other) => return Err(bad(format!("schema {other:?}, this tool reads {SCHEMA:?}"))),
            None => return Err(bad("no \"schema\" field".into())),
        }
        serde_json::from_value(value).map_err(|e| bad(e.to_string()))
    }

    /// The final table: one column per level.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let g = &self.config.generation;
        let _ = writeln!(
            out,
            "{} ({:?} {}) | max_tokens {}{} | mean input {:.0} tokens",
            self.label,
            self.target.api,
            self.target.url,
            g.max_tokens,
            if g.ignore_eos { ", ignore_eos" } else { "" },
            self.config.mean_input_tokens
        );
        let row = |out: &mut String, name: &str, f: &dyn Fn(&LevelResult) -> String| {
            let _ = write!(out, "{name:<30}");
            for l in &self.levels {
                let _ = write!(out, "{:>14}", f(l));
            }
            out.push('\n');
        };
        row(&mut out, "level", &|l| l.level.label());
        row(&mut out, "duration (s)", &|l| format!("{:.1}", l.duration_s));
        row(&mut out, "completed / sent", &|l| format!("{}/{}", l.completed, l.sent));
        row(&mut out, "failed (excl. rate-limited)", &|l| l.failed.to_string());
        for kind in crate::sample::ErrorKind::ALL {
            let k = kind.label();
            if self.levels.iter().any(|l| l.errors.get(k).copied().unwrap_or(0) > 0) {
                row(&mut out, &format!("  {k}"), &|l| {
                    l.errors.get(k).copied().unwrap_or(0).to_string()
                });
            }
        }
        row(&mut out, "request throughput (req/s)", &|l| {
            format!("{:.2}", l.request_throughput)
        });
        row(&mut out, "output throughput (tok/s)", &|l| {
            format!("{:.1}", l.output_throughput)
        });
        row(&mut out, "total token throughput (tok/s)", &|l| {
            format!("{:.1}", l.total_token_throughput)
        });
        if self.levels.iter().any(|l| l.goodput.is_some()) {
            row(&mut out, "goodput (req/s)", &|l| {
                l.goodput.map_or("-".into(), |g| format!("{g:.2}"))
            });
        }
        if self
            .levels
            .iter()
            .any(|l| matches!(l.level, crate::load::Level::Rate(_)))
        {
            row(&mut out, "achieved rate (req/s)", &|l| {
                format!("{:.2}", l.achieved_rate)
            });
        }
        for (name, pick) in METRICS {
            for (stat, value) in STATS {
                row(&mut out, &format!("{name} {stat} (ms)"), &|l| {
                    format!("{:.2}", value(pick(l)))
                });
            }
        }
        row(&mut out, "output tokens counted by", &|l| l.token_count.clone());
        for l in &self.levels {
            for e in &l.error_samples {
                let _ = writeln!(out, "{}: {e}", l.level.label());
            }
        }
        out
    }
}

/// The latency metrics, in report order.
type Pick = fn(&LevelResult) -> &crate::stats::Distribution;
const METRICS: [(&str, Pick); 4] = [
    ("TTFT", |l| &l.ttft),
    ("TPOT", |l| &l.tpot),
    ("ITL", |l| &l.itl),
    ("E2E", |l| &l.e2e),
];
/// The statistics of each metric, in report order.
type Stat = fn(&crate::stats::Distribution) -> f64;
const STATS: [(&str, Stat); 5] = [
    ("mean", |d| d.mean),
    ("median", |d| d.median),
    ("p90", |d| d.p90),
    ("p99", |d| d.p99),
    ("std", |d| d.std),
];

/// `compare a b`: for each level both runs have, each figure side by side with the ratio b / a.
pub fn compare(a: &RunResult, b: &RunResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "a = {} ({})\nb = {} ({})",
        a.label, a.target.url, b.label, b.target.url
    );
    if a.config.generation != b.config.generation || a.config.prompts != b.config.prompts {
        let _ = writeln!(
            out,
            "warning: the runs differ in generation settings or prompts; ratios compare unlike work"
        );
    }
    let mut matched = 0;
    for la in &a.levels {
        let Some(lb) = b.levels.iter().find(|l| l.level == la.level) else {
            continue;
        };
        matched += 1;
        let _ = writeln!(out, "\n{:<30}{:>14}{:>14}{:>10}", la.level.label(), "a", "b", "b/a");
        let line = |out: &mut String, name: &str, x: f64, y: f64| {
            let ratio = if x != 0.0 { format!("{:.2}x", y / x) } else { "-".into() };
            let _ = writeln!(out, "{name:<30}{x:>14.2}{y:>14.2}{ratio:>10}");
        };
        line(
            &mut out,
            "request throughput (req/s)",
            la.request_throughput,
            lb.request_throughput,
        );
        line(
            &mut out,
            "output throughput (tok/s)",
            la.output_throughput,
            lb.output_throughput,
        );
        line(
            &mut out,
            "total token throughput (tok/s)",
            la.total_token_throughput,
            lb.total_token_throughput,
        );
        if let (Some(x), Some(y)) = (la.goodput, lb.goodput) {
            line(&mut out, "goodput (req/s)", x, y);
        }
        for (name, pick) in METRICS {
            for (stat, value) in [STATS[0], STATS[1], STATS[3]] {
                line(
                    &mut out,
                    &format!("{name} {stat} (ms)"),
                    value(pick(la)),
                    value(pick(lb)),
                );
            }
        }
        line(&mut out, "failed", la.failed as f64, lb.failed as f64);
        line(
            &mut out,
            "rate-limited",
            la.errors.get("rate_limited").copied().unwrap_or(0) as f64,
            lb.errors.get("rate_limited").copied().unwrap_or(0) as f64,
        );
    }
    if matched == 0 {
        let _ = writeln!(
            out,
            "\nthe runs share no level (concurrency or rate); nothing to compare"
        );
    }
    out
}
