//! The composite filter: the rules and the semantic filter of one config together. Each category has its
//! own action; the strongest action any part asks for wins.

use crate::rules::RulesFilter;
use crate::semantic::SemanticFilter;
use crate::verdict::{Filter, Verdict};

/// A config's filters, judged together.
pub struct CompositeFilter {
    id: String,
    rules: RulesFilter,
    semantic: Option<SemanticFilter>,
}

impl CompositeFilter {
    /// Combines compiled parts.
    pub fn new(id: String, rules: RulesFilter, semantic: Option<SemanticFilter>) -> CompositeFilter {
        CompositeFilter { id, rules, semantic }
    }
}

impl Filter for CompositeFilter {
    fn id(&self) -> &str {
        &self.id
    }

    fn check(&self, text: &str) -> Verdict {
        let rules = self.rules.check(text);
        match &self.semantic {
            Some(s) if rules.action < crate::Action::Block => {
                let semantic = s.check(text);
                if semantic.action > rules.action {
                    semantic
                } else {
                    rules
                }
            }
            _ => rules,
        }
    }

    /// Mid-stream, only the rules run: embeddings are for whole sentences (see [`Filter::check_partial`]).
    fn check_partial(&self, text: &str) -> Verdict {
        self.rules.check(text)
    }

    fn is_heavy(&self) -> bool {
        self.semantic.is_some()
    }

    fn failures(&self) -> Option<(u64, &'static str)> {
        self.semantic.as_ref().map(|s| {
            let (n, on_error) = s.failures();
            (n, on_error.label())
        })
    }
}
