//! The learned classifier: a small trained head (see [`head`]) on all-MiniLM-L6-v2 sentence embeddings.
//!
//! Keyword rules and nearest-exemplar similarity only know the words they were given; a head trained on
//! hundreds of varied requests per category, and on benign requests in the same vocabulary, learns where
//! the boundary lies between them. It outputs a calibrated probability per class (`allow` first, then the
//! harm categories); a text is blocked when the probability of harm, `1 - P(allow)`, reaches the config's
//! threshold.
//!
//! Text longer than the encoder takes whole (about 256 tokens) is judged in overlapping windows of
//! `window_chars`: the head, the tail and evenly spaced windows between them, spanning at most
//! [`MAX_JUDGED_CHARS`] in all; the text's score is its most harmful window's. Smaller windows dilute a
//! request buried in a long harmless text less (each window's embedding and n-grams are mostly the
//! request's), at the same cost.

pub mod features;
pub mod head;
pub mod train;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use ferroserve_model::embed::Budget;

use crate::config::{ClassifierConfig, OnError};
use crate::normalize::normalize;
use crate::semantic::{EmbedService, embedding_failed};
use crate::verdict::{Action, Verdict};
use head::{Head, softmax};

/// The largest window: about 220 tokens of English, under the encoder's 256.
pub const MAX_WINDOW_CHARS: usize = 1000;
/// Characters of one text the encoder judges at most, all windows together: this bounds a text's cost
/// (past it the windows spread out, head and tail always among them).
pub const MAX_JUDGED_CHARS: usize = 6000;

/// The windows of a normalized text: the whole text when the encoder takes it whole (up to
/// [`MAX_WINDOW_CHARS`]), else windows of `size` characters: the head, the tail and evenly spaced windows
/// between, overlapping.
pub fn windows(text: &str, size: usize) -> Vec<String> {
    let size = size.clamp(1, MAX_WINDOW_CHARS);
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= MAX_WINDOW_CHARS {
        return vec![text.to_string()];
    }
    let last = chars.len() - size;
    // Enough windows that neighbours overlap by at least a quarter, within the cap.
    let stride = (size * 3 / 4).max(1);
    let count = (last.div_ceil(stride) + 1).min((MAX_JUDGED_CHARS / size).max(2));
    (0..count)
        .map(|i| {
            let start = last * i / (count - 1);
            chars[start..start + size].iter().collect()
        })
        .collect()
}

/// What the head says about one text.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// The probability of harm of the most harmful window.
    pub harm: f32,
    /// That window's most probable harm category.
    pub category: String,
    /// Which window (0-based) of how many.
    pub window: (usize, usize),
}

/// The compiled classifier.
pub struct ClassifierFilter {
    service: Arc<EmbedService>,
    head: Head,
    classes: Vec<String>,
    threshold: f32,
    temperature: f32,
    /// The n-gram features after the embedding.
    layout: features::Layout,
    /// Characters per window of a long text.
    window_chars: usize,
    /// How much of the encoder each window gets.
    budget: Budget,
    /// What a text that cannot be embedded gets.
    on_error: OnError,
    /// Texts that could not be embedded.
    failures: AtomicU64,
}

/// The hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

impl ClassifierFilter {
    /// Loads the head named by `config` (relative to `dir`), checking its hash, classes and shapes.
    pub fn load(config: &ClassifierConfig, dir: Option<&Path>, service: Arc<EmbedService>) -> Result<Self, String> {
        if config.classes.first().map(String::as_str) != Some("allow") || config.classes.len() < 2 {
            return Err("[classifier] classes must start with `allow` and name at least one category".into());
        }
        if !(100..=MAX_WINDOW_CHARS).contains(&config.window_chars) {
            return Err(format!(
                "[classifier] window_chars is {}; it must be between 100 and {MAX_WINDOW_CHARS}",
                config.window_chars
            ));
        }
        let budget = config.budget();
        budget.check(service.depth()).map_err(|e| format!("[classifier] {e}"))?;
        if !(0.0..=1.0).contains(&config.threshold) || config.temperature <= 0.0 {
            return Err("[classifier] threshold must be in [0, 1] and temperature above 0".into());
        }
        let path = dir.map_or_else(|| config.weights.clone(), |d| d.join(&config.weights));
        let bytes = std::fs::read(&path).map_err(|e| format!("[classifier] cannot read {}: {e}", path.display()))?;
        let actual = sha256_hex(&bytes);
        if actual != config.sha256 {
            return Err(format!(
                "[classifier] {} has SHA-256 {actual}, but the config was trained with {}; retrain with \
                 `ferroserve filter train` or restore the weights",
                path.display(),
                config.sha256
            ));
        }
        let head = Head::load(&path, config.classes.len())?;
        let layout = config.layout();
        if head.inputs <= layout.width() {
            return Err(format!(
                "[classifier] the head takes {} inputs, too few for {} n-gram buckets after the embedding",
                head.inputs,
                layout.width()
            ));
        }
        Ok(ClassifierFilter {
            service,
            head,
            classes: config.classes.clone(),
            threshold: config.threshold,
            temperature: config.temperature,
            layout,
            window_chars: config.window_chars,
            budget,
            on_error: config.on_error,
            failures: AtomicU64::new(0),
        })
    }

    /// Texts that could not be embedded, and what they got.
    pub fn failures(&self) -> (u64, OnError) {
        (self.failures.load(Ordering::Relaxed), self.on_error)
    }

    /// The probability of harm of each embedding, and its most probable category.
    fn judge_vector(&self, v: &[f32]) -> (f32, usize) {
        let p = softmax(&self.head.logits(v), self.temperature);
        let category = (1..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap_or(1);
        (1.0 - p[0], category)
    }

    /// Scores a text: its windows, embedded in one batch.
    pub fn score(&self, text: &str) -> Result<Score, String> {
        let windows = windows(&normalize(text), self.window_chars);
        let vectors = self.service.embed_many_with(&windows, self.budget)?;
        let count = vectors.len();
        vectors
            .into_iter()
            .zip(&windows)
            .map(|(v, w)| self.layout.features(v, w))
            .enumerate()
            .map(|(i, x)| (i, self.judge_vector(&x)))
            .max_by(|a, b| a.1.0.total_cmp(&b.1.0))
            .map(|(i, (harm, c))| Score {
                harm,
                category: self.classes[c].clone(),
                window: (i, count),
            })
            .ok_or_else(|| "no windows to judge".to_string())
    }

    /// Judges a text. One that cannot be embedded gets `on_error` (the rules still judged it), counted.
    pub fn check(&self, text: &str) -> Verdict {
        match self.score(text) {
            Err(e) => embedding_failed("classifier", self.on_error, &self.failures, &e),
            Ok(s) if s.harm >= self.threshold => Verdict {
                action: Action::Block,
                evidence: format!(
                    "classifier: P(harm) {:.2} >= {:.2}, most likely {} (window {} of {})",
                    s.harm,
                    self.threshold,
                    s.category,
                    s.window.0 + 1,
                    s.window.1
                ),
                category: Some(s.category),
            },
            Ok(_) => Verdict::allow(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_judged_in_overlapping_windows_from_head_to_tail() {
        assert_eq!(windows("short", 1000), vec!["short".to_string()]);
        let text: String = (0..5000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
        assert_eq!(windows(&text[..900], 300).len(), 1, "the encoder takes it whole");
        for size in [1000, 400] {
            let w = windows(&text, size);
            assert_eq!(
                w.len(),
                ((5000 - size).div_ceil(size * 3 / 4) + 1).min(MAX_JUDGED_CHARS / size)
            );
            assert!(w.iter().all(|x| x.chars().count() == size));
            assert_eq!(w[0], text[..size], "the head");
            assert_eq!(w[w.len() - 1], text[5000 - size..], "the tail");
            let huge = "x".repeat(100_000);
            let judged: usize = windows(&huge, size).iter().map(|w| w.len()).sum();
            assert!(judged <= MAX_JUDGED_CHARS, "bounded however long the text: {judged}");
        }
        assert_eq!(
            windows(&text, 5000),
            windows(&text, MAX_WINDOW_CHARS),
            "no window is larger than the encoder takes"
        );
    }
}
