//! `ferroserve generate`: a client that sends one request and prints tokens as they stream.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::inference_client::InferenceClient;
use serde_json::json;

/// Flags for every field of `GenerateRequest`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The text to send: a user message by default, the raw prompt with --raw.
    pub text: Option<String>,
    /// Send TEXT as the raw `prompt`, with no chat template.
    #[arg(long)]
    pub raw: bool,
    /// A system message placed before TEXT.
    #[arg(long)]
    pub system: Option<String>,
    /// A conversation turn as ROLE:CONTENT (roles: system, user, assistant); repeat for more. Used instead
    /// of TEXT.
    #[arg(long = "message", value_name = "ROLE:CONTENT")]
    pub messages: Vec<String>,
    /// Model to use: empty for the default, `name` or `name@version`.
    #[arg(long, default_value = "")]
    pub model: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    /// Sampling. Without any sampling flag the serving version's default sampling applies (greedy unless
    /// the version sets one).
    #[command(flatten)]
    pub sampling: crate::config::SamplingSettings,
    /// Sampler seed, for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep generating past the end-of-sequence token, up to --max-tokens (for benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Stop before this string; repeat for more.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Request id to send (the server makes one if omitted).
    #[arg(long, default_value = "")]
    pub request_id: String,
    /// Admission priority in the worker's queue: higher goes first, ties first come first served. Clamped
    /// to the range the API key allows (`request_priorities`; default 0 only).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub priority: i32,
    /// Sticky key (user or session id): the same key gets the same model version of a split.
    #[arg(long)]
    pub session: Option<String>,
    /// API key, sent as `authorization: Bearer <key>`.
    #[arg(long, env = "FERROSERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Server address (`https://` for TLS).
    #[arg(long, env = "FERROSERVE_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// CA certificate (PEM) to trust for an https:// address [default: the system's roots].
    #[arg(long, env = "FERROSERVE_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Print machine-readable JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
    /// Use the unary Generate call instead of streaming.
    #[arg(long)]
    pub unary: bool,
    /// gRPC deadline in seconds.
    #[arg(long)]
    pub timeout_secs: Option<f64>,
}

impl GenerateArgs {
    /// The sampling settings the flags ask for; `None` without any flag, so that the version's apply.
    fn sampling(&self) -> Option<pb::SamplingParams> {
        let any = self.sampling.any() || self.seed.is_some() || self.ignore_eos;
        any.then(|| pb::SamplingParams {
            seed: self.seed,
            ignore_eos: self.ignore_eos,
            ..self.sampling.to_wire()
        })
    }

    fn request(&self) -> anyhow::Result<pb::GenerateRequest> {
        let mut messages = Vec::new();
        let mut prompt = String::new();
        if self.messages.is_empty() {
            let text = self
                .text
                .clone()
                .context("give TEXT or at least one --message ROLE:CONTENT")?;
            if self.raw {
                anyhow::ensure!(self.system.is_none(), "--system cannot be used with --raw");
                prompt = text;
            } else {
                if let Some(system) = &self.system {
                    messages.push(message("system", system));
                }
                messages.push(message("user", &text));
            }
        } else {
            anyhow::ensure!(
                self.text.is_none() && !self.raw,
                "use either TEXT or --message, not both"
            );
            for m in &self.messages {
                let (role, content) = m
                    .split_once(':')
                    .with_context(|| format!("--message `{m}` is not ROLE:CONTENT"))?;
                messages.push(message(role, content));
            }
        }
        Ok(pb::GenerateRequest {
            model: self.model.clone(),
            prompt,
            messages,
            max_tokens: self.max_tokens,
            sampling: self.sampling(),
            stop: self.stop.clone(),
            request_id: self.request_id.clone(),
            priority: self.priority,
            session: self.session.clone().unwrap_or_default(),
            ..Default::default()
        })
    }
}

fn message(role: &str, content: &str) -> pb::ChatMessage {
    pb::ChatMessage {
        role: role.to_string(),
        content: content.to_string(),
    }
}

fn finish_name(v: i32) -> &'static str {
    pb::FinishReason::try_from(v).map_or("UNKNOWN", |f| f.as_str_name().trim_start_matches("FINISH_REASON_"))
}

fn complete_json(c: &pb::GenerationComplete) -> serde_json::Value {
    let usage = c.usage.unwrap_or_default();
    let t = c.timings.unwrap_or_default();
    json!({
        "type": "complete",
        "finish_reason": finish_name(c.finish_reason),
        "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
        "model_version": c.model_version,
        "request_id": c.request_id,
        "timings": {"queue_ms": t.queue_ms, "time_to_first_token_ms": t.time_to_first_token_ms, "total_ms": t.total_ms},
        "filtered": c.filtered.as_ref().map(|f| json!({"filter": f.filter, "stage": f.stage, "category": f.category})),
    })
}

fn summary(c: &pb::GenerationComplete, elapsed: Duration) -> String {
    let usage = c.usage.unwrap_or_default();
    let t = c.timings.unwrap_or_default();
    let decode_s = (t.total_ms - t.time_to_first_token_ms) / 1e3;
    let rate = if usage.completion_tokens > 1 && decode_s > 0.0 {
        f64::from(usage.completion_tokens - 1) / decode_s
    } else {
        0.0
    };
    let filtered = c
        .filtered
        .as_ref()
        .map(|f| format!(" by {} ({} {})", f.filter, f.stage, f.category))
        .unwrap_or_default();
    format!(
        "[{}{filtered}] {} prompt + {} completion tokens | ttft {:.0} ms | total {:.0} ms ({:.0} ms at client) | \
         decode {:.1} tok/s | {} | {}",
        finish_name(c.finish_reason),
        usage.prompt_tokens,
        usage.completion_tokens,
        t.time_to_first_token_ms,
        t.total_ms,
        elapsed.as_secs_f64() * 1e3,
        rate,
        c.model_version,
        c.request_id
    )
}

/// Runs the command.
pub async fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let request = args.request()?;
    let mut client = InferenceClient::new(super::channel(&args.addr, &args.tls_ca).await?);
    let mut request = tonic::Request::new(request);
    if let Some(t) = args.timeout_secs {
        request.set_timeout(Duration::from_secs_f64(t));
    }
    if let Some(key) = &args.api_key {
        let value = format!("Bearer {key}")
            .parse()
            .context("the API key must be printable ASCII")?;
        request.metadata_mut().insert("authorization", value);
    }
    let started = Instant::now();
    let status_err = |s: tonic::Status| {
        let retry = s
            .metadata()
            .get(ferroserve_router::RETRY_AFTER_MS)
            .and_then(|v| v.to_str().ok())
            .map(|ms| format!(" (retry after {ms} ms)"))
            .unwrap_or_default();
        anyhow::anyhow!("{:?}: {}{retry}", s.code(), s.message())
    };
    let mut out = std::io::stdout().lock();
    if args.unary {
        let r = client.generate(request).await.map_err(status_err)?.into_inner();
        let c = pb::GenerationComplete {
            finish_reason: r.finish_reason,
            usage: r.usage,
            model_version: r.model_version,
            request_id: r.request_id,
            timings: r.timings,
            filtered: r.filtered,
        };
        if args.json {
            let mut v = complete_json(&c);
            v["text"] = json!(r.text);
            writeln!(out, "{v}")?;
        } else {
            writeln!(out, "{}", r.text)?;
            eprintln!("{}", summary(&c, started.elapsed()));
        }
        return Ok(());
    }
    let mut stream = client.generate_stream(request).await.map_err(status_err)?.into_inner();
    while let Some(msg) = stream.message().await.map_err(status_err)? {
        match msg.event {
            Some(pb::generate_stream_response::Event::Token(t)) => {
                if args.json {
                    writeln!(
                        out,
                        "{}",
                        json!({"type": "token", "text": t.text, "token_ids": t.token_ids})
                    )?;
                } else {
                    write!(out, "{}", t.text)?;
                }
                out.flush()?;
            }
            Some(pb::generate_stream_response::Event::Complete(c)) => {
                if args.json {
                    writeln!(out, "{}", complete_json(&c))?;
                } else {
                    writeln!(out)?;
                    eprintln!("{}", summary(&c, started.elapsed()));
                }
            }
            None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GenerateArgs,
    }

    fn request(flags: &[&str]) -> pb::GenerateRequest {
        let mut argv = vec!["generate"];
        argv.extend_from_slice(flags);
        argv.push("Hi");
        Cli::try_parse_from(argv).unwrap().args.request().unwrap()
    }

    #[test]
    fn without_sampling_flags_the_versions_defaults_apply() {
        assert_eq!(request(&[]).sampling, None);
        let s = request(&["--temperature", "0.8", "--top-k", "40"]).sampling.unwrap();
        assert_eq!((s.temperature, s.top_k, s.top_p), (0.8, 40, None));
        let greedy = request(&["--temperature", "0"]).sampling.unwrap();
        assert_eq!(
            greedy.temperature, 0.0,
            "explicitly greedy, whatever the version's default"
        );
        assert!(request(&["--seed", "7"]).sampling.is_some());
    }
}
