//! The composite filter: the parts of one config together. The rules run first: they are cheap and
//! explainable, and a rule's block stands without asking the others. What the rules let through goes to
//! the learned classifier and to the semantic filter; the strongest action any part asks for wins.

use crate::classifier::ClassifierFilter;
use crate::rules::RulesFilter;
use crate::semantic::SemanticFilter;
use crate::verdict::{Action, Filter, Verdict};

/// A config's filters, judged together.
pub struct CompositeFilter {
    id: String,
    rules: RulesFilter,
    semantic: Option<SemanticFilter>,
    classifier: Option<ClassifierFilter>,
}

impl CompositeFilter {
    /// Combines compiled parts.
    pub fn new(
        id: String,
        rules: RulesFilter,
        semantic: Option<SemanticFilter>,
        classifier: Option<ClassifierFilter>,
    ) -> CompositeFilter {
        CompositeFilter {
            id,
            rules,
            semantic,
            classifier,
        }
    }
}

impl Filter for CompositeFilter {
    fn id(&self) -> &str {
        &self.id
    }

    fn check(&self, text: &str) -> Verdict {
        let mut verdict = self.rules.check(text);
        if verdict.action == Action::Block {
            return verdict;
        }
        if let Some(c) = &self.classifier {
            let v = c.check(text);
            if v.action > verdict.action {
                verdict = v;
            }
        }
        if verdict.action == Action::Block {
            return verdict;
        }
        if let Some(s) = &self.semantic {
            let v = s.check(text);
            if v.action > verdict.action {
                verdict = v;
            }
        }
        verdict
    }

    /// Mid-stream, only the rules run: embeddings are for whole sentences (see [`Filter::check_partial`]).
    fn check_partial(&self, text: &str) -> Verdict {
        self.rules.check(text)
    }

    fn is_heavy(&self) -> bool {
        self.semantic.is_some() || self.classifier.is_some()
    }

    fn failures(&self) -> Option<(u64, &'static str)> {
        let parts = [
            self.classifier.as_ref().map(ClassifierFilter::failures),
            self.semantic.as_ref().map(|s| s.failures()),
        ];
        let mut present = parts.into_iter().flatten().peekable();
        let on_error = present.peek()?.1;
        Some((present.map(|(n, _)| n).sum(), on_error.label()))
    }
}
