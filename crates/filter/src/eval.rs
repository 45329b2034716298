//! Measuring a filter's mistakes on labeled prompts: precision, recall, false-positive and false-negative
//! rates overall and per category, the confusion matrix, and the filter's latency.

use std::collections::BTreeMap;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::verdict::{Action, Filter};

/// One labeled prompt, as in `filter-eval-dev.jsonl`.
#[derive(Debug, Clone, Deserialize)]
pub struct Example {
    /// The prompt.
    pub text: String,
    /// `block` or `allow`.
    pub label: String,
    /// The harm category of a `block` example, or the kind of an `allow` one.
    pub category: String,
}

impl Example {
    fn should_block(&self) -> bool {
        self.label == "block"
    }
}

/// Reads JSONL examples; an error names the line.
pub fn read_examples(text: &str) -> Result<Vec<Example>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let e: Example = serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1))?;
            if e.label != "block" && e.label != "allow" {
                return Err(format!(
                    "line {}: label must be `block` or `allow`, not `{}`",
                    i + 1,
                    e.label
                ));
            }
            Ok(e)
        })
        .collect()
}

/// Counts of one binary decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Confusion {
    /// Should block, blocked.
    pub tp: u32,
    /// Should allow, blocked.
    pub fp: u32,
    /// Should allow, allowed.
    pub tn: u32,
    /// Should block, allowed.
    pub r#fn: u32,
}

fn ratio(a: u32, b: u32) -> f64 {
    if b == 0 { 0.0 } else { f64::from(a) / f64::from(b) }
}

/// The rates derived from a confusion matrix.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rates {
    /// Of what was blocked, the share that should have been.
    pub precision: f64,
    /// Of what should be blocked, the share that was.
    pub recall: f64,
    /// Of what should be allowed, the share that was blocked.
    pub fpr: f64,
    /// Of what should be blocked, the share that was allowed.
    pub fnr: f64,
    /// The counts.
    pub confusion: Confusion,
}

impl Confusion {
    fn add(&mut self, should: bool, did: bool) {
        match (should, did) {
            (true, true) => self.tp += 1,
            (false, true) => self.fp += 1,
            (false, false) => self.tn += 1,
            (true, false) => self.r#fn += 1,
        }
    }

    fn rates(self) -> Rates {
        Rates {
            precision: ratio(self.tp, self.tp + self.fp),
            recall: ratio(self.tp, self.tp + self.r#fn),
            fpr: ratio(self.fp, self.fp + self.tn),
            fnr: ratio(self.r#fn, self.tp + self.r#fn),
            confusion: self,
        }
    }
}

/// A mistake, for the reader of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Mistake {
    /// The prompt.
    pub text: String,
    /// Its label and category.
    pub expected: String,
    /// What the filter said.
    pub got: String,
}

/// The evaluation of one filter on one data set.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `name@version`.
    pub filter: String,
    /// Examples evaluated.
    pub examples: usize,
    /// Block versus allow, over everything.
    pub overall: Rates,
    /// Per category, the share of its harmful examples blocked, whatever category the filter named.
    pub caught: BTreeMap<String, f64>,
    /// Per harm category: blocked with that category versus not.
    pub categories: BTreeMap<String, Rates>,
    /// Rows: the example's category (allow kinds as `allow`); columns: the filter's category or `allow`.
    pub matrix: BTreeMap<String, BTreeMap<String, u32>>,
    /// Filter latency per prompt, microseconds.
    pub latency_p50_us: f64,
    /// Filter latency per prompt, microseconds.
    pub latency_p99_us: f64,
    /// Every wrong decision.
    pub mistakes: Vec<Mistake>,
}

/// Runs `filter` over `examples`. Each prompt is judged `repeats` times for the latency figures.
pub fn evaluate(filter: &dyn Filter, examples: &[Example], repeats: usize) -> Report {
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds");
    let mut overall = Confusion::default();
    let mut categories: BTreeMap<String, Confusion> = BTreeMap::new();
    let mut matrix: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
    let mut mistakes = Vec::new();
    for e in examples.iter().filter(|e| e.should_block()) {
        categories.entry(e.category.clone()).or_default();
    }
    for e in examples {
        let mut verdict = None;
        for _ in 0..repeats.max(1) {
            let start = Instant::now();
            let v = filter.check(&e.text);
            latency
                .record((start.elapsed().as_nanos() as u64).max(1))
                .expect("in bounds");
            verdict = Some(v);
        }
        let v = verdict.expect("at least one run");
        let blocked = v.action == Action::Block;
        let got = if blocked {
            v.category.clone().unwrap_or_default()
        } else {
            "allow".into()
        };
        overall.add(e.should_block(), blocked);
        for (name, c) in categories.iter_mut() {
            c.add(e.should_block() && &e.category == name, blocked && got == *name);
        }
        let row = if e.should_block() {
            e.category.clone()
        } else {
            "allow".into()
        };
        *matrix.entry(row.clone()).or_default().entry(got.clone()).or_default() += 1;
        if e.should_block() != blocked || (blocked && got != e.category && e.should_block()) {
            mistakes.push(Mistake {
                text: e.text.clone(),
                expected: format!("{} ({})", e.label, e.category),
                got: format!("{} ({})", v.action.label(), v.category.unwrap_or_default()),
            });
        }
    }
    let caught = matrix
        .iter()
        .filter(|(row, _)| categories.contains_key(*row))
        .map(|(row, cells)| {
            let total: u32 = cells.values().sum();
            let allowed = cells.get("allow").copied().unwrap_or(0);
            (row.clone(), f64::from(total - allowed) / f64::from(total.max(1)))
        })
        .collect();
    Report {
        caught,
        filter: filter.id().to_string(),
        examples: examples.len(),
        overall: overall.rates(),
        categories: categories.into_iter().map(|(k, c)| (k, c.rates())).collect(),
        matrix,
        latency_p50_us: latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency_p99_us: latency.value_at_quantile(0.99) as f64 / 1000.0,
        mistakes,
    }
}

impl Report {
    /// The report as a table for a terminal.
    pub fn table(&self) -> String {
        let mut out = format!("filter {} on {} examples\n\n", self.filter, self.examples);
        // `recall` counts a block in the right category; `caught` any block of the category's harmful texts.
        out.push_str("category          precision  recall    fpr     fnr    tp  fp  tn  fn  caught\n");
        let mut line = |name: &str, r: &Rates, caught: f64| {
            let c = r.confusion;
            out.push_str(&format!(
                "{name:<16} {:>9.3} {:>7.3} {:>7.3} {:>7.3} {:>5} {:>3} {:>3} {:>3} {caught:>7.3}\n",
                r.precision, r.recall, r.fpr, r.fnr, c.tp, c.fp, c.tn, c.r#fn
            ));
        };
        for (name, r) in &self.categories {
            line(name, r, self.caught.get(name).copied().unwrap_or(0.0));
        }
        line("OVERALL", &self.overall, self.overall.recall);
        out.push_str("\nconfusion matrix (rows: expected, columns: decided)\n");
        let columns: std::collections::BTreeSet<&String> = self.matrix.values().flat_map(|r| r.keys()).collect();
        out.push_str(&format!("{:<16}", ""));
        for c in &columns {
            out.push_str(&format!(" {:>9}", truncate(c)));
        }
        out.push('\n');
        for (row, cells) in &self.matrix {
            out.push_str(&format!("{row:<16}"));
            for c in &columns {
                out.push_str(&format!(" {:>9}", cells.get(*c).copied().unwrap_or(0)));
            }
            out.push('\n');
        }
        out.push_str(&format!(
            "\nlatency per prompt: p50 {:.1} us, p99 {:.1} us\n",
            self.latency_p50_us, self.latency_p99_us
        ));
        if !self.mistakes.is_empty() {
            out.push_str("\nmistakes:\n");
            for m in &self.mistakes {
                out.push_str(&format!("  expected {}, got {}: {}\n", m.expected, m.got, m.text));
            }
        }
        out
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(9).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::Verdict;

    /// A mock filter that blocks any text containing "bad" as category `harm`.
    struct Mock;

    impl Filter for Mock {
        fn id(&self) -> &str {
            "mock@1"
        }

        fn check(&self, text: &str) -> Verdict {
            if text.contains("bad") {
                Verdict {
                    action: Action::Block,
                    category: Some("harm".into()),
                    evidence: "mock".into(),
                }
            } else {
                Verdict::allow()
            }
        }
    }

    #[test]
    fn rates_come_from_the_confusion_matrix() {
        let data = r#"{"text": "bad one", "label": "block", "category": "harm"}
{"text": "fine", "label": "block", "category": "harm"}
{"text": "bad but fine", "label": "allow", "category": "everyday"}
{"text": "good", "label": "allow", "category": "everyday"}
{"text": "nice", "label": "allow", "category": "everyday"}"#;
        let examples = read_examples(data).unwrap();
        let r = evaluate(&Mock, &examples, 1);
        assert_eq!(
            r.overall.confusion,
            Confusion {
                tp: 1,
                fp: 1,
                tn: 2,
                r#fn: 1
            }
        );
        assert_eq!(r.overall.precision, 0.5);
        assert_eq!(r.overall.recall, 0.5);
        assert!((r.overall.fpr - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(r.overall.fnr, 0.5);
        assert_eq!(r.matrix["allow"]["harm"], 1);
        assert_eq!(r.mistakes.len(), 2);
        assert!(
            read_examples("{\"text\":\"x\",\"label\":\"maybe\",\"category\":\"c\"}")
                .unwrap_err()
                .contains("line 1")
        );
    }
}
