//! What a filter decides about a text.

use serde::{Deserialize, Serialize};

/// What happens to text in a category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let it through.
    Allow,
    /// Let it through, but record and count it.
    Flag,
    /// Stop it.
    Block,
}

impl Action {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Flag => "flag",
            Action::Block => "block",
        }
    }
}

/// A filter's decision, with the category and the evidence behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// The strongest action any category asked for.
    pub action: Action,
    /// The category that decided it; `None` when nothing matched.
    pub category: Option<String>,
    /// Why: the rule or exemplar that matched, for logs and reviewers.
    pub evidence: String,
}

impl Verdict {
    /// Nothing matched.
    pub fn allow() -> Verdict {
        Verdict {
            action: Action::Allow,
            category: None,
            evidence: String::new(),
        }
    }
}

/// Anything that judges text. Implementations are compiled once and shared by every request.
pub trait Filter: Send + Sync {
    /// `name@version`, as in metrics and logs.
    fn id(&self) -> &str;

    /// Judges one text.
    fn check(&self, text: &str) -> Verdict;

    /// Judges streamed output in the middle of a sentence, where a cheaper check may do; the full check
    /// runs at sentence ends and at the end of the stream.
    fn check_partial(&self, text: &str) -> Verdict {
        self.check(text)
    }

    /// True when a check takes milliseconds (embeddings), so callers run it off the async threads.
    fn is_heavy(&self) -> bool {
        false
    }

    /// Checks that could not run (the embedding thread failed), and what those texts got (`allow` or
    /// `block`); `None` for a filter that cannot fail that way.
    fn failures(&self) -> Option<(u64, &'static str)> {
        None
    }
}
