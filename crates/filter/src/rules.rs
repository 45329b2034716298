//! The rule filter: per category, terms (aho-corasick) that count when the text also asks for
//! instructions, patterns (regex) that count on their own, and exceptions (regex) that veto the category
//! for defensive, educational or fictional framing. Everything is compiled once, and matched on the
//! normalized text (see [`crate::normalize`]).

use aho_corasick::{AhoCorasick, MatchKind};
use regex::RegexSet;

use crate::config::{CategoryConfig, RulesConfig};
use crate::normalize::normalize;
use crate::verdict::{Action, Filter, Verdict};

/// One category, compiled.
struct Category {
    name: String,
    action: Action,
    /// Terms that name the harm.
    terms: Vec<String>,
    terms_ac: Option<AhoCorasick>,
    /// Patterns that are enough on their own.
    patterns: RegexSet,
    /// Patterns that veto this category.
    except: RegexSet,
}

/// The compiled rule filter.
pub struct RulesFilter {
    id: String,
    /// Phrases that ask for instructions or content ("how do i", "write a script").
    intents: RegexSet,
    categories: Vec<Category>,
}

/// A rule that does not compile; names the category and the rule.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {message}")]
pub struct CompileError {
    /// E.g. `category weapons, patterns[2]`.
    pub location: String,
    /// What is wrong.
    pub message: String,
}

fn regex_set(rules: &[String], location: &str) -> Result<RegexSet, CompileError> {
    for (i, r) in rules.iter().enumerate() {
        if let Err(e) = regex::Regex::new(r) {
            return Err(CompileError {
                location: format!("{location}[{i}]"),
                message: e.to_string(),
            });
        }
    }
    RegexSet::new(rules).map_err(|e| CompileError {
        location: location.to_string(),
        message: e.to_string(),
    })
}

/// True when the match `start..end` stands as whole words in `text`.
fn whole_word(text: &str, start: usize, end: usize) -> bool {
    let before = text[..start].chars().next_back().is_none_or(|c| !c.is_alphanumeric());
    let after = text[end..].chars().next().is_none_or(|c| !c.is_alphanumeric());
    before && after
}

impl Category {
    fn compile(c: &CategoryConfig) -> Result<Category, CompileError> {
        let at = |what: &str| format!("category {}, {what}", c.name);
        let terms: Vec<String> = c.terms.iter().map(|t| normalize(t)).collect();
        let terms_ac = if terms.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&terms)
                    .map_err(|e| CompileError {
                        location: at("terms"),
                        message: e.to_string(),
                    })?,
            )
        };
        Ok(Category {
            name: c.name.clone(),
            action: c.action,
            terms,
            terms_ac,
            patterns: regex_set(&c.patterns, &at("patterns"))?,
            except: regex_set(&c.except, &at("except"))?,
        })
    }

    /// The evidence if this category matches `text` (normalized); `asks` says whether it asks for
    /// instructions.
    fn matches(&self, text: &str, asks: bool) -> Option<String> {
        let term = || {
            self.terms_ac.as_ref().and_then(|ac| {
                ac.find_iter(text)
                    .find(|m| whole_word(text, m.start(), m.end()))
                    .map(|m| self.terms[m.pattern().as_usize()].clone())
            })
        };
        let evidence = if let Some(i) = self.patterns.matches(text).iter().next() {
            format!("pattern {i}")
        } else if asks && let Some(t) = term() {
            format!("term `{t}` with a request for instructions")
        } else {
            return None;
        };
        if self.except.is_match(text) {
            return None;
        }
        Some(evidence)
    }
}

impl RulesFilter {
    /// Compiles a rule config; an error names the rule that does not compile.
    pub fn compile(id: &str, config: &RulesConfig) -> Result<RulesFilter, CompileError> {
        Ok(RulesFilter {
            id: id.to_string(),
            intents: regex_set(&config.intents, "intents")?,
            categories: config
                .categories
                .iter()
                .map(Category::compile)
                .collect::<Result<_, _>>()?,
        })
    }

    /// Judges already-normalized text.
    pub fn check_normalized(&self, text: &str) -> Verdict {
        let asks = self.intents.is_match(text);
        let mut best = Verdict::allow();
        for c in &self.categories {
            if c.action <= best.action {
                continue;
            }
            if let Some(evidence) = c.matches(text, asks) {
                best = Verdict {
                    action: c.action,
                    category: Some(c.name.clone()),
                    evidence: format!("rules: {}: {evidence}", c.name),
                };
            }
        }
        best
    }
}

impl Filter for RulesFilter {
    fn id(&self) -> &str {
        &self.id
    }

    fn check(&self, text: &str) -> Verdict {
        self.check_normalized(&normalize(text))
    }
}
