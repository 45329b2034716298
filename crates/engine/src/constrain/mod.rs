//! Structured output with llguidance: a request's [`Constraint`] compiled against the model's vocabulary
//! into a [`Guide`], which says at each step which tokens may come next and follows the tokens chosen.
//!
//! - Compiling happens before the request queues ([`Grammars::guide`]), on the caller's blocking thread,
//!   so that a constraint that cannot compile is refused (INVALID_ARGUMENT) before any model work. Compiled
//!   constraints are cached by their text: a schema sent with every request compiles once, and the copies
//!   share llguidance's lexer cache, which warms as they run.
//! - Each step, the engine computes the masks of the constrained sequences about to sample on a thread of
//!   their own while the forward pass runs ([`crate::run`]), so that the mask costs the step nothing it
//!   does not already wait for. Unconstrained sequences take no part.
//! - A mask allows end-of-sequence only where the output is complete; once the constraint can take no
//!   further token the sequence ends with `Stop`.
//!
//! llguidance (MIT; used by vLLM, SGLang, mistral.rs and llama.cpp) was chosen over outlines-core because
//! it computes masks lazily per step (no ahead-of-time index over the vocabulary, so a new schema costs
//! milliseconds, not seconds), takes Lark grammars as well as JSON schema and regex, and its matcher is a
//! Rust API made for servers.

mod gbnf;
mod vocab;

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferroserve_core::{BackendError, Constraint, GrammarSyntax};
use ferroserve_model::TextCodec;
use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{SimpleVob, TokEnv};
use llguidance::{Matcher, ParserFactory};

pub use gbnf::{GbnfError, to_lark};

/// Why a constraint cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    /// It does not compile: a bad schema, regex or grammar, or a feature llguidance lacks.
    #[error("the {kind} does not compile: {reason}")]
    Invalid {
        /// `json_schema`, `regex`, ...
        kind: &'static str,
        /// llguidance's reason, shortened.
        reason: String,
    },
    /// Compiling took longer than the configured bound.
    #[error("the {kind} took over {limit_ms} ms to compile (engine.constraint_compile_ms); simplify it")]
    TooSlow {
        /// `json_schema`, `regex`, ...
        kind: &'static str,
        /// The bound.
        limit_ms: u64,
    },
    /// Mid-generation: the matcher failed (a lexer or parser limit).
    #[error("the constraint failed while generating: {0}")]
    Failed(String),
}

impl From<ConstraintError> for BackendError {
    fn from(e: ConstraintError) -> BackendError {
        match e {
            ConstraintError::Invalid { .. } | ConstraintError::TooSlow { .. } => BackendError::InvalidRequest {
                field: "constraint".into(),
                message: e.to_string(),
            },
            ConstraintError::Failed(_) => BackendError::Internal(e.to_string()),
        }
    }
}

/// Longest llguidance message passed on to a client.
const MAX_REASON_CHARS: usize = 400;

fn shorten(reason: &str) -> String {
    let mut s: String = reason.chars().take(MAX_REASON_CHARS).collect();
    if reason.chars().count() > MAX_REASON_CHARS {
        s.push('…');
    }
    s
}

/// Compiled constraints most recently used, by their text: fresh matchers to clone.
struct Cache {
    entries: HashMap<u64, (Constraint, Matcher)>,
    order: VecDeque<u64>,
    capacity: usize,
}

impl Cache {
    fn key(c: &Constraint) -> u64 {
        let mut h = DefaultHasher::new();
        c.hash(&mut h);
        h.finish()
    }

    fn get(&mut self, c: &Constraint) -> Option<Matcher> {
        let key = Cache::key(c);
        let (held, matcher) = self.entries.get(&key)?;
        if held != c {
            return None;
        }
        let fresh = matcher.clone();
        self.order.retain(|k| *k != key);
        self.order.push_back(key);
        Some(fresh)
    }

    fn put(&mut self, c: Constraint, matcher: Matcher) {
        if self.capacity == 0 {
            return;
        }
        let key = Cache::key(&c);
        if self.entries.insert(key, (c, matcher)).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
    }
}

/// The constraint compiler of one engine: llguidance's factory for the model's vocabulary, and the cache.
pub struct Grammars {
    factory: ParserFactory,
    cache: Mutex<Cache>,
    /// The ids that end a generation; the mask's end-of-sequence bit allows all of them.
    stop_ids: Arc<[u32]>,
}

/// Whether a compile found its constraint in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compiled {
    Cached,
    Fresh,
}

impl Compiled {
    pub fn as_str(self) -> &'static str {
        match self {
            Compiled::Cached => "hit",
            Compiled::Fresh => "miss",
        }
    }
}

impl Grammars {
    /// The compiler for `text`'s vocabulary, caching up to `cache_entries` constraints.
    pub fn new(text: &Arc<TextCodec>, cache_entries: usize) -> Result<Grammars, String> {
        let env: TokEnv = vocab::tok_env(text);
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(Grammars {
            factory,
            cache: Mutex::new(Cache {
                entries: HashMap::new(),
                order: VecDeque::new(),
                capacity: cache_entries,
            }),
            stop_ids: text.tokenizer.stop_ids().into(),
        })
    }

    /// A guide for one request under `constraint`: a clone of the cached compile, or a new compile.
    pub fn guide(&self, constraint: &Constraint) -> Result<(Guide, Compiled), ConstraintError> {
        let cached = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(constraint);
        let (matcher, how) = match cached {
            Some(m) => (m, Compiled::Cached),
            None => {
                let m = self.compile(constraint)?;
                self.cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .put(constraint.clone(), m.clone());
                (m, Compiled::Fresh)
            }
        };
        Ok((
            Guide {
                matcher,
                mask: None,
                stop_ids: Arc::clone(&self.stop_ids),
            },
            how,
        ))
    }

    fn compile(&self, constraint: &Constraint) -> Result<Matcher, ConstraintError> {
        let kind = constraint.kind().as_str();
        let invalid = |reason: String| ConstraintError::Invalid {
            kind,
            reason: shorten(&reason),
        };
        let grammar = top_level(constraint).map_err(invalid)?;
        let mut matcher = Matcher::new(self.factory.create_parser(grammar));
        // The first mask builds the lexer's start; a constraint that cannot produce anything fails here.
        let first = matcher.compute_mask();
        if let Some(e) = matcher.get_error() {
            return Err(invalid(e));
        }
        if first.is_ok_and(|m| m.is_zero()) {
            return Err(invalid("it allows no output at all".into()));
        }
        Ok(matcher)
    }
}

/// No whitespace between JSON tokens beyond one space after `,` and `:`: a small model left free to add
/// whitespace may add it forever.
const COMPACT_JSON: &str = r#"{"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}"#;

/// The llguidance grammar for a constraint.
fn top_level(c: &Constraint) -> Result<TopLevelGrammar, String> {
    Ok(match c {
        Constraint::JsonSchema { schema, .. } => {
            let mut schema: serde_json::Value =
                serde_json::from_str(schema).map_err(|e| format!("the schema is not JSON: {e}"))?;
            if let serde_json::Value::Object(o) = &mut schema {
                o.entry("x-guidance")
                    .or_insert_with(|| serde_json::from_str(COMPACT_JSON).expect("valid"));
            }
            TopLevelGrammar::from_json_schema(schema)
        }
        Constraint::JsonObject => TopLevelGrammar::from_json_schema(serde_json::json!({
            "type": "object",
            "x-guidance": serde_json::from_str::<serde_json::Value>(COMPACT_JSON).expect("valid"),
        })),
        Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
        Constraint::Grammar {
            syntax: GrammarSyntax::Lark,
            text,
        } => TopLevelGrammar::from_lark(text.clone()),
        Constraint::Grammar {
            syntax: GrammarSyntax::Gbnf,
            text,
        } => TopLevelGrammar::from_lark(to_lark(text).map_err(|e| e.to_string())?),
        Constraint::Choice(choices) => {
            let alternatives: Vec<String> = choices
                .iter()
                .map(|c| serde_json::to_string(c).expect("a string serializes"))
                .collect();
            TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
        }
    })
}

/// One sequence's constraint as it generates.
pub struct Guide {
    matcher: Matcher,
    /// The mask for the next token, computed before it is sampled.
    mask: Option<Result<SimpleVob, String>>,
    stop_ids: Arc<[u32]>,
}

impl Guide {
    /// Computes the mask for the next token (the mask thread calls this during the forward pass).
    pub fn prepare(&mut self) {
        self.mask = Some(self.matcher.compute_mask().map_err(|e| e.to_string()));
    }

    /// Sets every token the constraint does not allow next to -inf in `logits`. The mask is the one
    /// [`Guide::prepare`] computed, or is computed now.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        if self.mask.is_none() {
            self.prepare();
        }
        let mask = self
            .mask
            .take()
            .expect("prepared")
            .map_err(|e| ConstraintError::Failed(shorten(&e)))?;
        if mask.is_zero() {
            return Err(ConstraintError::Failed("no token can continue the output".into()));
        }
        let eos_ok = self.matcher.is_accepting().unwrap_or(false);
        let stops: Vec<(usize, f32)> = self
            .stop_ids
            .iter()
            .filter_map(|&id| logits.get(id as usize).map(|l| (id as usize, *l)))
            .collect();
        // A word of the mask at a time: most are all-allowed or all-forbidden.
        for (chunk, &word) in logits.chunks_mut(32).zip(mask.as_slice()) {
            match word {
                u32::MAX => {}
                0 => chunk.fill(f32::NEG_INFINITY),
                _ => {
                    for (bit, l) in chunk.iter_mut().enumerate() {
                        if word & (1 << bit) == 0 {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
        // Tokens past the vocabulary llguidance knows are never allowed.
        if let Some(rest) = logits.get_mut(mask.len()..) {
            rest.fill(f32::NEG_INFINITY);
        }
        for (id, l) in stops {
            logits[id] = if eos_ok { l } else { f32::NEG_INFINITY };
        }
        Ok(())
    }

    /// Follows a chosen token (not end-of-sequence). Returns true when the output is complete and can
    /// take no further token.
    pub fn commit(&mut self, token: u32) -> Result<bool, ConstraintError> {
        self.mask = None;
        self.matcher
            .consume_token(token)
            .map_err(|e| ConstraintError::Failed(shorten(&e.to_string())))?;
        Ok(self.matcher.is_stopped())
    }
}

/// Mask time of one step, for the metric.
pub fn prepare_all(guides: Vec<&mut Guide>) -> std::time::Duration {
    let t = Instant::now();
    for g in guides {
        g.prepare();
    }
    t.elapsed()
}
