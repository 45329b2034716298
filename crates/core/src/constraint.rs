//! Structured output: what a request may constrain its output to. The router reads one from either front
//! door and checks its shape ([`Constraint::check`]); the engine compiles it against the model's
//! vocabulary and masks every step's logits to what it allows.

use crate::limits::{Violation, echo, violation};

/// Longest constraint text (schema, regex, grammar, or all choices together), in bytes.
pub const MAX_CONSTRAINT_BYTES: usize = 64 << 10;
/// Most strings in a choice.
pub const MAX_CHOICES: usize = 1024;

/// One request's constraint on its output.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Constraint {
    /// A JSON value valid against this JSON schema (its text). `strict` is OpenAI's flag; the schema is
    /// enforced either way.
    JsonSchema {
        /// The schema, as JSON text.
        schema: String,
        /// OpenAI's `strict`.
        strict: bool,
    },
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// Text matching this regular expression, whole (Rust `regex` syntax).
    Regex(String),
    /// Text derived from the start rule of a context-free grammar.
    Grammar {
        /// How the grammar is written.
        syntax: GrammarSyntax,
        /// Its text.
        text: String,
    },
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

/// The notations a grammar may be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrammarSyntax {
    /// llguidance's Lark variant (`start: ...`), as vLLM and SGLang take it.
    Lark,
    /// llama.cpp's GBNF (`root ::= ...`).
    Gbnf,
}

/// The kinds of constraint, for metric labels and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConstraintKind {
    JsonSchema,
    JsonObject,
    Regex,
    Grammar,
    Choice,
}

impl ConstraintKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConstraintKind::JsonSchema => "json_schema",
            ConstraintKind::JsonObject => "json_object",
            ConstraintKind::Regex => "regex",
            ConstraintKind::Grammar => "grammar",
            ConstraintKind::Choice => "choice",
        }
    }
}

impl Constraint {
    /// Which kind it is.
    pub fn kind(&self) -> ConstraintKind {
        match self {
            Constraint::JsonSchema { .. } => ConstraintKind::JsonSchema,
            Constraint::JsonObject => ConstraintKind::JsonObject,
            Constraint::Regex(_) => ConstraintKind::Regex,
            Constraint::Grammar { .. } => ConstraintKind::Grammar,
            Constraint::Choice(_) => ConstraintKind::Choice,
        }
    }

    /// The shape rules a constraint meets before it costs any compilation: not empty, within the size
    /// limits. Whether it compiles is the engine's check, against the model's vocabulary. `field` names the
    /// request field it came from, for the message.
    pub fn check(&self, field: &str) -> Result<(), Violation> {
        let size = match self {
            Constraint::JsonSchema { schema: t, .. } | Constraint::Regex(t) | Constraint::Grammar { text: t, .. } => {
                if t.trim().is_empty() {
                    return Err(violation(field, format!("the {} is empty", self.kind().as_str())));
                }
                t.len()
            }
            Constraint::JsonObject => 0,
            Constraint::Choice(choices) => {
                if choices.is_empty() {
                    return Err(violation(field, "give at least one choice"));
                }
                if choices.len() > MAX_CHOICES {
                    return Err(violation(
                        field,
                        format!("{} choices given; at most {MAX_CHOICES}", choices.len()),
                    ));
                }
                if let Some(i) = choices.iter().position(String::is_empty) {
                    return Err(violation(format!("{field}[{i}]"), "a choice must not be empty"));
                }
                choices.iter().map(String::len).sum()
            }
        };
        if size > MAX_CONSTRAINT_BYTES {
            return Err(violation(
                field,
                format!(
                    "the {} is {size} bytes; at most {MAX_CONSTRAINT_BYTES}",
                    self.kind().as_str()
                ),
            ));
        }
        if let Constraint::JsonSchema { schema, .. } = self {
            match serde_json::from_str::<serde_json::Value>(schema) {
                Ok(serde_json::Value::Object(_) | serde_json::Value::Bool(true)) => {}
                Ok(_) => return Err(violation(field, "a JSON schema must be a JSON object")),
                Err(e) => {
                    return Err(violation(
                        field,
                        format!("the schema is not valid JSON ({e}): `{}`", echo(schema)),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_checks_name_the_field_and_the_fix() {
        let ok = Constraint::JsonSchema {
            schema: r#"{"type":"object"}"#.into(),
            strict: true,
        };
        assert!(ok.check("response_format").is_ok());
        assert!(Constraint::JsonObject.check("f").is_ok());
        let bad = [
            (Constraint::Regex("  ".into()), "f", "empty"),
            (Constraint::Choice(vec![]), "f", "at least one"),
            (Constraint::Choice(vec!["a".into(), String::new()]), "f[1]", "empty"),
            (
                Constraint::JsonSchema {
                    schema: "{not json".into(),
                    strict: false,
                },
                "f",
                "not valid JSON",
            ),
            (
                Constraint::JsonSchema {
                    schema: "[1]".into(),
                    strict: false,
                },
                "f",
                "JSON object",
            ),
            (Constraint::Regex("a".repeat(MAX_CONSTRAINT_BYTES + 1)), "f", "at most"),
            (Constraint::Choice(vec!["x".into(); MAX_CHOICES + 1]), "f", "at most"),
        ];
        for (c, field, words) in bad {
            let v = c.check("f").expect_err("refused");
            assert_eq!(v.field, field, "{c:?}");
            assert!(v.message.contains(words), "{c:?}: {}", v.message);
        }
    }
}
