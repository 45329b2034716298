//! Structured output on the HTTP door: OpenAI's `response_format` (`text`, `json_object`, `json_schema`
//! with `strict`), vLLM's `structured_outputs` object (`json`, `regex`, `choice`, `grammar`,
//! `json_object`) and its older top-level `guided_json`, `guided_regex`, `guided_choice` and
//! `guided_grammar`. At most one of them may constrain a request. The result is the pipeline's
//! `GenerateRequest.constraint`, its shape checked here so that an error names the parameter the client
//! sent; whether it compiles is the worker's check.

use ferroserve_core::{Constraint, GrammarSyntax};
use ferroserve_proto::v1 as pb;
use serde_json::Value;

use super::wire::{Object, field, wrong};
use crate::HttpError;

/// The request's constraint, if it sets one, as the pipeline's oneof.
pub(crate) fn constraint(o: &Object) -> Result<Option<pb::generate_request::Constraint>, HttpError> {
    let mut found: Vec<(String, Constraint)> = Vec::new();
    if let Some(c) = response_format(o, "response_format")? {
        found.push(("response_format".into(), c));
    }
    if let Some(v) = field(o, "structured_outputs") {
        let Value::Object(so) = v else {
            return Err(wrong("structured_outputs", "an object", v));
        };
        for (key, value) in so.iter().filter(|(_, v)| !v.is_null()) {
            let param = format!("structured_outputs.{key}");
            if let Some(c) = vllm(&param, key, value)? {
                found.push((param, c));
            }
        }
    }
    for key in ["guided_json", "guided_regex", "guided_choice", "guided_grammar"] {
        if let Some(value) = field(o, key)
            && let Some(c) = vllm(key, &key["guided_".len()..], value)?
        {
            found.push((key.to_string(), c));
        }
    }
    match found.len() {
        0 => Ok(None),
        1 => {
            let (param, c) = found.pop().expect("one");
            c.check(&param).map_err(|v| HttpError::invalid(v.field, v.message))?;
            Ok(Some(to_wire(c)))
        }
        _ => Err(HttpError::invalid(
            found[1].0.clone(),
            format!(
                "a request takes one constraint; {} and {} were both given",
                found[0].0, found[1].0
            ),
        )),
    }
}

/// OpenAI's `response_format`; `text` is no constraint.
fn response_format(o: &Object, param: &str) -> Result<Option<Constraint>, HttpError> {
    let Some(v) = field(o, param) else {
        return Ok(None);
    };
    let Value::Object(format) = v else {
        return Err(wrong(param, "an object such as {\"type\": \"json_object\"}", v));
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonObject)),
        Some("json_schema") => {
            let inner = format!("{param}.json_schema");
            let Some(Value::Object(js)) = field(format, "json_schema") else {
                return Err(HttpError::invalid(
                    inner,
                    "is required with type json_schema: {\"name\": ..., \"schema\": {...}, \"strict\": true}",
                ));
            };
            let strict = match field(js, "strict") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => return Err(wrong(&format!("{inner}.strict"), "true or false", v)),
            };
            match field(js, "schema") {
                Some(schema @ (Value::Object(_) | Value::Bool(true))) => Ok(Some(Constraint::JsonSchema {
                    schema: schema.to_string(),
                    strict,
                })),
                Some(v) => Err(wrong(&format!("{inner}.schema"), "a JSON schema object", v)),
                None => Err(HttpError::invalid(format!("{inner}.schema"), "is required")),
            }
        }
        Some(other) => Err(HttpError::invalid(
            format!("{param}.type"),
            format!("`{other}` is not supported; use text, json_object or json_schema"),
        )),
        None => Err(HttpError::invalid(
            format!("{param}.type"),
            "is required: text, json_object or json_schema",
        )),
    }
}

/// One of vLLM's keys (`json`, `regex`, `choice`, `grammar`, `json_object`), sent as `param`.
fn vllm(param: &str, key: &str, value: &Value) -> Result<Option<Constraint>, HttpError> {
    let text = |what: &str| match value {
        Value::String(s) => Ok(s.clone()),
        v => Err(wrong(param, what, v)),
    };
    Ok(Some(match key {
        "json" => match value {
            // vLLM takes the schema as an object or as its JSON text.
            Value::String(s) => Constraint::JsonSchema {
                schema: s.clone(),
                strict: true,
            },
            Value::Object(_) => Constraint::JsonSchema {
                schema: value.to_string(),
                strict: true,
            },
            v => return Err(wrong(param, "a JSON schema object", v)),
        },
        "json_object" => match value {
            Value::Bool(true) => Constraint::JsonObject,
            Value::Bool(false) => return Ok(None),
            v => return Err(wrong(param, "true or false", v)),
        },
        "regex" => Constraint::Regex(text("a regular expression string")?),
        "grammar" => {
            let grammar = text("a grammar string (GBNF or Lark)")?;
            Constraint::Grammar {
                syntax: syntax_of(&grammar),
                text: grammar,
            }
        }
        "choice" => match value {
            Value::Array(items) => Constraint::Choice(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::String(s) => Ok(s.clone()),
                        v => Err(wrong(&format!("{param}[{i}]"), "a string", v)),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            v => return Err(wrong(param, "a list of strings", v)),
        },
        // vLLM's other keys: options of its own that change nothing here, or kinds this server lacks.
        "disable_fallback" | "disable_any_whitespace" | "disable_additional_properties" | "whitespace_pattern" => {
            return Ok(None);
        }
        other => {
            return Err(HttpError::invalid(
                param,
                format!("`{other}` is not supported; use json, json_object, regex, choice or grammar"),
            ));
        }
    }))
}

/// GBNF defines rules with `::=`; Lark with `:`.
fn syntax_of(grammar: &str) -> GrammarSyntax {
    if grammar.contains("::=") {
        GrammarSyntax::Gbnf
    } else {
        GrammarSyntax::Lark
    }
}

fn to_wire(c: Constraint) -> pb::generate_request::Constraint {
    use pb::generate_request::Constraint as C;
    match c {
        Constraint::JsonSchema { schema, strict } => C::JsonSchema(pb::JsonSchemaConstraint { schema, strict }),
        Constraint::JsonObject => C::JsonObject(pb::JsonObjectConstraint {}),
        Constraint::Regex(r) => C::Regex(r),
        Constraint::Grammar { syntax, text } => C::Grammar(pb::GrammarConstraint {
            syntax: match syntax {
                GrammarSyntax::Lark => pb::GrammarSyntax::Lark,
                GrammarSyntax::Gbnf => pb::GrammarSyntax::Gbnf,
            } as i32,
            text,
        }),
        Constraint::Choice(choices) => C::Choice(pb::ChoiceConstraint { choices }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::generate_request::Constraint as C;

    fn parse(json: &str) -> Result<Option<C>, HttpError> {
        constraint(json.parse::<Value>().unwrap().as_object().unwrap())
    }

    fn param_of(json: &str) -> (String, String) {
        let e = parse(json).expect_err("refused");
        assert_eq!(e.status, 400);
        (e.param.expect("names the parameter"), e.message)
    }

    #[test]
    fn every_door_reads_into_its_kind() {
        assert_eq!(parse(r#"{"response_format": {"type": "text"}}"#).unwrap(), None);
        assert_eq!(
            parse(r#"{"response_format": {"type": "json_object"}}"#).unwrap(),
            Some(C::JsonObject(pb::JsonObjectConstraint {}))
        );
        let Some(C::JsonSchema(s)) = parse(
            r#"{"response_format": {"type": "json_schema",
                "json_schema": {"name": "p", "strict": true, "schema": {"type": "object"}}}}"#,
        )
        .unwrap() else {
            panic!("a schema")
        };
        assert!(s.strict);
        assert_eq!(s.schema, r#"{"type":"object"}"#);
        assert_eq!(
            parse(r#"{"guided_regex": "\\d+"}"#).unwrap(),
            Some(C::Regex("\\d+".into()))
        );
        assert_eq!(
            parse(r#"{"structured_outputs": {"choice": ["yes", "no"]}}"#).unwrap(),
            Some(C::Choice(pb::ChoiceConstraint {
                choices: vec!["yes".into(), "no".into()]
            }))
        );
        let Some(C::Grammar(g)) = parse(r#"{"guided_grammar": "root ::= \"a\""}"#).unwrap() else {
            panic!("a grammar")
        };
        assert_eq!(g.syntax, pb::GrammarSyntax::Gbnf as i32);
        let Some(C::Grammar(g)) = parse(r#"{"structured_outputs": {"grammar": "start: \"a\""}}"#).unwrap() else {
            panic!("a grammar")
        };
        assert_eq!(g.syntax, pb::GrammarSyntax::Lark as i32);
        let Some(C::JsonSchema(s)) = parse(r#"{"guided_json": "{\"type\": \"integer\"}"}"#).unwrap() else {
            panic!("a schema")
        };
        assert_eq!(s.schema, r#"{"type": "integer"}"#);
    }

    #[test]
    fn bad_constraints_name_their_parameter() {
        let cases = [
            (r#"{"response_format": "json"}"#, "response_format"),
            (r#"{"response_format": {"type": "xml"}}"#, "response_format.type"),
            (
                r#"{"response_format": {"type": "json_schema"}}"#,
                "response_format.json_schema",
            ),
            (
                r#"{"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}"#,
                "response_format.json_schema.schema",
            ),
            (
                r#"{"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}}"#,
                "response_format.json_schema.strict",
            ),
            (r#"{"guided_choice": []}"#, "guided_choice"),
            (r#"{"guided_choice": ["a", 1]}"#, "guided_choice[1]"),
            (r#"{"guided_regex": ""}"#, "guided_regex"),
            (
                r#"{"structured_outputs": {"structural_tag": "x"}}"#,
                "structured_outputs.structural_tag",
            ),
            (r#"{"guided_json": "{oops"}"#, "guided_json"),
            (
                r#"{"guided_regex": "a", "response_format": {"type": "json_object"}}"#,
                "guided_regex",
            ),
        ];
        for (json, param) in cases {
            assert_eq!(param_of(json).0, param, "{json}");
        }
        assert!(
            param_of(r#"{"guided_regex": "a", "guided_choice": ["b"]}"#)
                .1
                .contains("one constraint")
        );
    }
}
