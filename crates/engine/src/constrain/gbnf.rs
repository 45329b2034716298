//! llama.cpp's GBNF, rewritten into llguidance's Lark so that one grammar engine serves both notations.
//! Only the notation changes: `name ::= ...` becomes `name: ...`, `root` becomes `start`, character classes
//! and `.` become regex terminals, strings are re-quoted. Repetition (`* + ? {m,n}`), grouping and
//! alternation are the same in both.

use std::collections::HashMap;
use std::fmt::Write;

/// What GBNF text cannot be read, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("GBNF at byte {at}: {what}")]
pub struct GbnfError {
    /// Byte offset in the grammar.
    pub at: usize,
    /// What is wrong.
    pub what: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Name(String),
    Defines,
    /// A string literal, unescaped.
    Str(String),
    /// A character class's inside, as Rust regex syntax.
    Class(String),
    Dot,
    /// `( ) | * + ?` or a `{m,n}` repeat, copied as written.
    Op(String),
}

/// The Lark grammar for `gbnf`.
pub fn to_lark(gbnf: &str) -> Result<String, GbnfError> {
    let toks = tokenize(gbnf)?;
    // Rules start at `name ::=`; each runs to the next.
    let starts: Vec<usize> = (0..toks.len())
        .filter(|&i| matches!(toks[i].1, Tok::Name(_)) && matches!(toks.get(i + 1), Some((_, Tok::Defines))))
        .collect();
    match starts.first() {
        None => return err(0, "no rule; write rules as `root ::= ...`"),
        Some(&first) if first != 0 => return err(toks[0].0, "expected a rule name followed by `::=`"),
        _ => {}
    }
    let mut names = HashMap::new();
    for &s in &starts {
        let Tok::Name(n) = &toks[s].1 else { unreachable!() };
        let next = names.len();
        names.entry(n.clone()).or_insert_with(|| lark_name(n, next));
    }
    if !names.contains_key("root") {
        return err(0, "the grammar has no `root` rule");
    }
    let mut out = String::new();
    for (k, &s) in starts.iter().enumerate() {
        let end = starts.get(k + 1).copied().unwrap_or(toks.len());
        let Tok::Name(n) = &toks[s].1 else { unreachable!() };
        let _ = write!(out, "{}:", names[n]);
        let body = &toks[s + 2..end];
        if body.is_empty() {
            return err(toks[s].0, format!("rule `{n}` is empty"));
        }
        let mut prev_opens = true;
        for (at, t) in body {
            let piece = match t {
                Tok::Name(r) => names.get(r).cloned().ok_or_else(|| GbnfError {
                    at: *at,
                    what: format!("rule `{r}` is used but never defined"),
                })?,
                Tok::Defines => return err(*at, "`::=` without a rule name before it"),
                Tok::Str(s) => serde_json::to_string(s).expect("a string serializes"),
                Tok::Class(c) => format!("/[{c}]/"),
                Tok::Dot => "/(?s:.)/".to_string(),
                Tok::Op(o) => o.clone(),
            };
            // An empty alternative (`a | | b`, `( | x)`, a trailing `|`) is the empty string.
            let opens = matches!(t, Tok::Op(o) if o == "|" || o == "(");
            let closes = matches!(t, Tok::Op(o) if o == "|" || o == ")");
            if prev_opens && closes {
                out.push_str(" \"\"");
            }
            prev_opens = opens;
            out.push(' ');
            out.push_str(&piece);
        }
        if prev_opens {
            out.push_str(" \"\"");
        }
        out.push('\n');
    }
    Ok(out)
}

fn err<T>(at: usize, what: impl Into<String>) -> Result<T, GbnfError> {
    Err(GbnfError { at, what: what.into() })
}

/// Lark rule names are lower case: `root` is `start`, others are numbered so that `Foo` and `foo` stay apart.
fn lark_name(gbnf: &str, index: usize) -> String {
    if gbnf == "root" {
        return "start".into();
    }
    let clean: String = gbnf
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("r{index}_{clean}")
}

fn tokenize(src: &str) -> Result<Vec<(usize, Tok)>, GbnfError> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        match c {
            b' ' | b'\t' | b'\r' | b'\n' => i += 1,
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b':' if src[i..].starts_with("::=") => {
                out.push((start, Tok::Defines));
                i += 3;
            }
            b'(' | b')' | b'|' | b'*' | b'+' | b'?' => {
                out.push((start, Tok::Op((c as char).to_string())));
                i += 1;
            }
            b'{' => {
                let close = src[i..].find('}').ok_or(GbnfError {
                    at: i,
                    what: "`{` without `}`".into(),
                })?;
                let inner = &src[i + 1..i + close];
                if inner.is_empty() || !inner.chars().all(|c| c.is_ascii_digit() || c == ',' || c == ' ') {
                    return err(i, format!("`{{{inner}}}` is not a repeat count like {{2}} or {{1,3}}"));
                }
                out.push((start, Tok::Op(format!("{{{}}}", inner.replace(' ', "")))));
                i += close + 1;
            }
            b'.' => {
                out.push((start, Tok::Dot));
                i += 1;
            }
            b'"' => {
                let (s, next) = string(src, i + 1)?;
                out.push((start, Tok::Str(s)));
                i = next;
            }
            b'[' => {
                let (class, next) = class(src, i + 1)?;
                out.push((start, Tok::Class(class)));
                i = next;
            }
            c if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'-' || b[i] == b'_') {
                    i += 1;
                }
                out.push((start, Tok::Name(src[start..i].to_string())));
            }
            _ => {
                let ch = src[i..].chars().next().unwrap_or('?');
                return err(i, format!("unexpected `{}`", ch.escape_debug()));
            }
        }
    }
    Ok(out)
}

/// A GBNF escape after the backslash at `i`: the character and where the text goes on.
fn escape(src: &str, i: usize) -> Result<(char, usize), GbnfError> {
    let rest = &src[i + 1..];
    let hex = |n: usize| -> Result<(char, usize), GbnfError> {
        rest.get(1..1 + n)
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .and_then(char::from_u32)
            .map(|c| (c, i + 2 + n))
            .ok_or(GbnfError {
                at: i,
                what: format!("a \\{} escape needs {n} hex digits", &rest[..1]),
            })
    };
    match rest.chars().next() {
        Some('n') => Ok(('\n', i + 2)),
        Some('t') => Ok(('\t', i + 2)),
        Some('r') => Ok(('\r', i + 2)),
        Some('x') => hex(2),
        Some('u') => hex(4),
        Some('U') => hex(8),
        Some(c) => Ok((c, i + 1 + c.len_utf8())),
        None => err(i, "a backslash at the end"),
    }
}

/// A string literal's text, from just after its opening quote.
fn string(src: &str, mut i: usize) -> Result<(String, usize), GbnfError> {
    let mut s = String::new();
    loop {
        let Some(c) = src[i..].chars().next() else {
            return err(i, "a string without its closing quote");
        };
        match c {
            '"' => return Ok((s, i + 1)),
            '\\' => {
                let (e, next) = escape(src, i)?;
                s.push(e);
                i = next;
            }
            c => {
                s.push(c);
                i += c.len_utf8();
            }
        }
    }
}

/// A character class's inside as Rust regex syntax, from just after its `[`.
fn class(src: &str, mut i: usize) -> Result<(String, usize), GbnfError> {
    let mut out = String::new();
    if src[i..].starts_with('^') {
        out.push('^');
        i += 1;
    }
    loop {
        let Some(c) = src[i..].chars().next() else {
            return err(i, "a character class without its closing `]`");
        };
        let (ch, next) = match c {
            ']' => return Ok((out, i + 1)),
            '\\' => escape(src, i)?,
            c => (c, i + c.len_utf8()),
        };
        // A range's dash stays a range; every other character is written so that no regex syntax
        // (`[`, `&&`, `~~`, a delimiting `/`) can come of it.
        if c == '-' && !out.is_empty() && out != "^" && !src[next..].starts_with(']') {
            out.push('-');
        } else if ch.is_ascii_alphanumeric() {
            out.push(ch);
        } else {
            let _ = write!(out, "\\x{{{:x}}}", ch as u32);
        }
        i = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_strings_classes_and_repeats_become_lark() {
        let lark = to_lark(
            "# a date\nroot ::= year \"-\" two-digit \"-\" two-digit\nyear ::= [0-9]{4}\ntwo-digit ::= [0-9] [0-9]\n",
        )
        .unwrap();
        assert_eq!(
            lark,
            "start: r1_year \"-\" r2_two_digit \"-\" r2_two_digit\nr1_year: /[0-9]/ {4}\nr2_two_digit: /[0-9]/ /[0-9]/\n"
        );
        let lark = to_lark("root ::= (\"a\\n\" | [^\\]/x] | .)* |").unwrap();
        assert_eq!(lark, "start: ( \"a\\n\" | /[^\\x{5d}\\x{2f}x]/ | /(?s:.)/ ) * | \"\"\n");
    }

    #[test]
    fn unreadable_grammars_say_where() {
        for (g, words) in [
            ("", "no rule"),
            ("x ::= \"a\"", "no `root`"),
            ("root ::= y", "never defined"),
            ("root ::= \"a", "closing quote"),
            ("root ::= [a-", "closing `]`"),
            ("root ::= \"a\" ; ", "unexpected"),
            ("root ::= \"\\u12\"", "hex digits"),
            ("junk root ::= \"a\"", "expected a rule name"),
        ] {
            let e = to_lark(g).expect_err(g);
            assert!(e.to_string().contains(words), "{g}: {e}");
        }
    }
}
