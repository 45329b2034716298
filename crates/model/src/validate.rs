//! The validation gate for a model version: a candidate GGUF against a baseline, in one run on this machine.
//! Three checks:
//! - **golden prompts**: greedy answers to chat prompts must contain an expected substring. The candidate
//!   must pass every prompt the baseline passes, so a weak baseline's misses are not held against it;
//! - **perplexity** on a reference text must stay within a tolerance of the baseline's;
//! - **latency**: the median time per generated token may be at most a ratio of the baseline's. Both are
//!   measured in the same run, so the ratio holds on a noisy machine.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;
use ferroserve_core::{ChatMessage, Role};

use crate::ModelError;
use crate::batched::{BatchedLlama, Chunk, argmax};
use crate::chat::{CHATML, ChatTemplate};
use crate::gguf::GgufFile;
use crate::tokenizer::TextTokenizer;

/// Tokens a golden answer may run to.
const ANSWER_TOKENS: usize = 48;

/// One golden prompt: a user message and substrings of which the answer must contain one (any case).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct Golden {
    /// The user's message.
    pub prompt: String,
    /// Accepted answers; one must appear.
    pub expect: Vec<String>,
}

/// What the models are asked and how far the candidate may fall behind.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Settings {
    /// The system prompt before each golden prompt (the version's generation default).
    pub system_prompt: String,
    /// The tolerances.
    pub tolerances: Tolerances,
}

/// How far the candidate may fall behind.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Tolerances {
    /// Candidate perplexity at most `baseline × (1 + this)`.
    pub perplexity: f64,
    /// Candidate ms per token at most `baseline × this`.
    pub latency_ratio: f64,
}

/// One golden prompt's outcome on both models.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GoldenResult {
    /// The prompt.
    pub prompt: String,
    /// Accepted answers.
    pub expect: Vec<String>,
    /// The candidate's answer.
    pub candidate_answer: String,
    /// Whether it contains an accepted answer.
    pub candidate_passed: bool,
    /// Whether the baseline's answer does.
    pub baseline_passed: bool,
}

/// A check's numbers and verdict.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measured {
    /// The candidate's figure.
    pub candidate: f64,
    /// The baseline's figure.
    pub baseline: f64,
    /// The largest candidate figure that passes.
    pub limit: f64,
    /// `candidate <= limit`.
    pub passed: bool,
}

/// The whole validation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// The candidate file.
    pub candidate: PathBuf,
    /// The baseline file.
    pub baseline: PathBuf,
    /// Per golden prompt.
    pub golden: Vec<GoldenResult>,
    /// Golden prompts the baseline passes and the candidate fails.
    pub golden_regressions: usize,
    /// Perplexity on the reference text.
    pub perplexity: Measured,
    /// Median ms per generated token.
    pub ms_per_token: Measured,
    /// Every check passed.
    pub passed: bool,
    /// The system prompt and tolerances applied.
    pub settings: Settings,
}

/// A model with its tokenizer and chat template.
struct Subject {
    model: BatchedLlama,
    tokenizer: TextTokenizer,
    chat: ChatTemplate,
}

impl Subject {
    fn load(path: &Path) -> Result<Subject, ModelError> {
        let mut gguf = GgufFile::open(path)?;
        let tokenizer = TextTokenizer::from_gguf(&gguf)?;
        let chat = ChatTemplate::new(
            gguf.string("tokenizer.chat_template").unwrap_or(CHATML),
            tokenizer.bos_token(),
            tokenizer.eos_token(),
        )?;
        let model = BatchedLlama::load(&mut gguf, &Device::Cpu)?;
        Ok(Subject { model, tokenizer, chat })
    }

    /// The greedy answer to `prompt` (after `system`, if any), and the time of each generated token after
    /// the first.
    fn answer(&self, system: &str, prompt: &str) -> Result<(String, Vec<Duration>), ModelError> {
        let mut messages = Vec::new();
        if !system.is_empty() {
            messages.push(ChatMessage {
                role: Role::System,
                content: system.to_string(),
            });
        }
        messages.push(ChatMessage {
            role: Role::User,
            content: prompt.to_string(),
        });
        let ids = self.tokenizer.encode(&self.chat.render(&messages, true)?)?;
        let mut cache = self.model.new_cache(ids.len() + ANSWER_TOKENS)?;
        let mut logits = self.model.forward(&mut [Chunk {
            cache: &mut cache,
            tokens: &ids,
        }])?;
        let (mut out, mut times) = (Vec::new(), Vec::new());
        for _ in 0..ANSWER_TOKENS {
            let next = argmax(&logits[0]) as u32;
            if self.tokenizer.is_stop(next) {
                break;
            }
            out.push(next);
            let start = Instant::now();
            logits = self.model.forward(&mut [Chunk {
                cache: &mut cache,
                tokens: &[next],
            }])?;
            times.push(start.elapsed());
        }
        Ok((self.tokenizer.decode(&out)?, times))
    }

    /// exp(mean negative log-likelihood) of `text`'s tokens after the first, fed one token at a time.
    fn perplexity(&self, text: &str) -> Result<f64, ModelError> {
        let ids = self.tokenizer.encode(text)?;
        if ids.len() < 2 {
            return Err(ModelError::Format {
                path: PathBuf::from("reference text"),
                message: "it needs at least two tokens".into(),
            });
        }
        let mut cache = self.model.new_cache(ids.len())?;
        let mut nll = 0.0f64;
        for pair in ids.windows(2) {
            let logits = self.model.forward(&mut [Chunk {
                cache: &mut cache,
                tokens: &pair[..1],
            }])?;
            let row = &logits[0];
            let max = row.iter().fold(f32::MIN, |m, v| m.max(*v));
            let log_sum = row.iter().map(|v| f64::from(v - max).exp()).sum::<f64>().ln() + f64::from(max);
            nll += log_sum - f64::from(row[pair[1] as usize]);
        }
        Ok((nll / (ids.len() - 1) as f64).exp())
    }
}

fn median_ms(mut times: Vec<Duration>) -> f64 {
    if times.is_empty() {
        return 0.0;
    }
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1e3
}

fn passes(answer: &str, expect: &[String]) -> bool {
    let answer = answer.to_lowercase();
    expect.iter().any(|e| answer.contains(&e.to_lowercase()))
}

/// Validates `candidate` against `baseline`.
pub fn validate(
    candidate: &Path,
    baseline: &Path,
    golden: &[Golden],
    reference: &str,
    settings: Settings,
) -> Result<Report, ModelError> {
    let tolerances = settings.tolerances;
    let subjects = [Subject::load(candidate)?, Subject::load(baseline)?];
    let mut results = Vec::new();
    let mut times = [Vec::new(), Vec::new()];
    for g in golden {
        // The two models answer in turn, so that both see the same machine conditions.
        let mut answers = Vec::new();
        for (s, t) in subjects.iter().zip(times.iter_mut()) {
            let (answer, step_times) = s.answer(&settings.system_prompt, &g.prompt)?;
            t.extend(step_times);
            answers.push(answer);
        }
        results.push(GoldenResult {
            prompt: g.prompt.clone(),
            expect: g.expect.clone(),
            candidate_passed: passes(&answers[0], &g.expect),
            baseline_passed: passes(&answers[1], &g.expect),
            candidate_answer: answers.swap_remove(0),
        });
    }
    let golden_regressions = results
        .iter()
        .filter(|r| r.baseline_passed && !r.candidate_passed)
        .count();
    let [pc, pb] = [subjects[0].perplexity(reference)?, subjects[1].perplexity(reference)?];
    let perplexity = Measured {
        candidate: pc,
        baseline: pb,
        limit: pb * (1.0 + tolerances.perplexity),
        passed: pc <= pb * (1.0 + tolerances.perplexity),
    };
    let [lc, lb] = times.map(median_ms);
    let ms_per_token = Measured {
        candidate: lc,
        baseline: lb,
        limit: lb * tolerances.latency_ratio,
        passed: lc <= lb * tolerances.latency_ratio,
    };
    Ok(Report {
        candidate: candidate.to_path_buf(),
        baseline: baseline.to_path_buf(),
        passed: golden_regressions == 0 && perplexity.passed && ms_per_token.passed,
        golden: results,
        golden_regressions,
        perplexity,
        ms_per_token,
        settings,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_answer_passes_on_any_expected_substring_in_any_case() {
        let expect = vec!["Paris".to_string(), "paree".to_string()];
        assert!(super::passes("The capital is PARIS.", &expect));
        assert!(!super::passes("The capital is Lyon.", &expect));
        assert!(!super::passes("anything", &[]));
    }
}
