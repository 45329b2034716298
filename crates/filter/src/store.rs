//! The durable feedback store: one JSONL file, appended to and never rewritten. It holds what the filter
//! got wrong and what was done about it:
//! - findings: reviewers' false-positive and false-negative reports, the shadow filter's disagreements
//!   with the active one, and the red-team's successful attacks;
//! - labels a reviewer gave a finding (the latest one counts);
//! - steps: a filter trained, gated, run in shadow, promoted, switched on or off, and who did it.
//!
//! Prompt text is kept only when the store is opened with `keep_text` (a config opt-in); otherwise a finding
//! holds the text's SHA-256 and the verdict. `ferroserve filter review` lists, labels and exports it, and
//! `ferroserve filter train --store` learns from its labelled findings.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::classifier::sha256_hex;
use crate::eval::Example;
use crate::verdict::{Action, Verdict};

/// Where a finding came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A reviewer: blocked or flagged, but harmless.
    FalsePositive,
    /// A reviewer: allowed, but harmful.
    FalseNegative,
    /// The shadow filter decided otherwise than the active one.
    ShadowDisagreement,
    /// A red-team attack the filter let through.
    RedTeam,
}

/// What a text should have got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "label", rename_all = "snake_case")]
pub enum Label {
    /// Harmless.
    Allow,
    /// Harmful, in this category.
    Block {
        /// The harm category.
        category: String,
    },
}

impl Label {
    /// Reads `allow` or `block:<category>`.
    pub fn parse(s: &str) -> Result<Label, String> {
        match s.split_once(':') {
            None if s == "allow" => Ok(Label::Allow),
            Some(("block", c)) if !c.is_empty() => Ok(Label::Block {
                category: c.to_string(),
            }),
            _ => Err(format!("a label is `allow` or `block:<category>`, not `{s}`")),
        }
    }
}

/// Something the filter got wrong, or may have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// Short id for `filter review` (a hash of the rest).
    pub id: String,
    /// Unix seconds.
    pub at: u64,
    /// Where it came from.
    pub source: Source,
    /// The filter that judged the text (`name@version`).
    pub filter: String,
    /// The request, for reviewers' and shadow findings.
    pub request_id: Option<String>,
    /// The text's SHA-256.
    pub text_sha256: String,
    /// The text itself, only where the store keeps text.
    pub text: Option<String>,
    /// What the filter decided.
    pub action: Action,
    /// The category it named, if any.
    pub category: Option<String>,
    /// What the text should have got, where the source says (a red-team attack is harmful by
    /// construction; a false positive is harmless by the reviewer's word).
    pub label: Option<Label>,
    /// Who reported it: an operator, `shadow` or `redteam`.
    pub by: String,
}

/// A step in a filter's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// `filter train` wrote a candidate.
    Train,
    /// The gate passed a candidate.
    GatePassed,
    /// The gate refused a candidate.
    GateRefused,
    /// A filter started running in shadow (or the shadow stopped: `filter` is empty).
    Shadow,
    /// A filter became the enforcing one.
    Promote,
    /// Filtering switched on.
    Enable,
    /// Filtering switched off.
    Disable,
}

/// One line of the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "snake_case")]
pub enum Entry {
    /// Something the filter got wrong.
    Finding(Finding),
    /// A reviewer's label for a finding.
    Label {
        /// The finding.
        id: String,
        /// The label.
        #[serde(flatten)]
        label: Label,
        /// The reviewer.
        by: String,
        /// Unix seconds.
        at: u64,
    },
    /// A step in a filter's life.
    Step {
        /// Which.
        step: Step,
        /// The filter it concerns (`name@version`).
        filter: String,
        /// Who.
        by: String,
        /// Unix seconds.
        at: u64,
        /// Figures or reasons, for the reader.
        detail: String,
    },
}

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file.
    #[error("feedback store {path}: {message}")]
    Io {
        /// The store.
        path: String,
        /// What failed.
        message: String,
    },
    /// A line is not an entry.
    #[error("feedback store {path}, line {line}: {message}")]
    Parse {
        /// The store.
        path: String,
        /// 1-based.
        line: usize,
        /// What the parser said.
        message: String,
    },
}

/// A judged text as the store may hold it: the text itself where the store keeps text, else its SHA-256
/// (computed once, when the text is judged, so the text need not be held).
#[derive(Debug, Clone)]
pub enum Kept {
    /// The text (the store keeps text).
    Text(Arc<str>),
    /// Its SHA-256 only.
    Hash(String),
}

impl Kept {
    fn sha256(&self) -> String {
        match self {
            Kept::Text(t) => sha256_hex(t.as_bytes()),
            Kept::Hash(h) => h.clone(),
        }
    }
}

/// Unix seconds now.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The open store, shared by the router's threads.
pub struct Store {
    path: PathBuf,
    /// Whether findings keep their text.
    keep_text: bool,
    /// Appends are whole lines under this lock, so concurrent writers never interleave.
    file: Mutex<File>,
}

impl Store {
    /// Opens (or creates) the store for appending.
    pub fn open(path: &Path, keep_text: bool) -> Result<Store, StoreError> {
        let io = |e: std::io::Error| StoreError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
        Ok(Store {
            path: path.to_path_buf(),
            keep_text,
            file: Mutex::new(file),
        })
    }

    /// Appends one entry as one line, flushed to the file before returning.
    pub fn append(&self, entry: &Entry) -> Result<(), StoreError> {
        let mut line = serde_json::to_vec(entry).expect("store entries serialize");
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(&line)
            .and_then(|()| file.flush())
            .map_err(|e| StoreError::Io {
                path: self.path.display().to_string(),
                message: e.to_string(),
            })
    }

    /// What of `text` this store may hold: the text where it keeps text, else its hash.
    pub fn keep(&self, text: &Arc<str>) -> Kept {
        if self.keep_text {
            Kept::Text(Arc::clone(text))
        } else {
            Kept::Hash(sha256_hex(text.as_bytes()))
        }
    }

    /// A finding about a judged text, as [`Store::keep`] kept it.
    #[allow(clippy::too_many_arguments)]
    pub fn finding(
        &self,
        source: Source,
        filter: &str,
        request_id: Option<&str>,
        text: &Kept,
        verdict: &Verdict,
        label: Option<Label>,
        by: &str,
    ) -> Finding {
        let text_sha256 = text.sha256();
        let at = now();
        let id =
            sha256_hex(format!("{source:?}|{filter}|{request_id:?}|{text_sha256}|{at}").as_bytes())[..12].to_string();
        Finding {
            id,
            at,
            source,
            filter: filter.to_string(),
            request_id: request_id.map(str::to_string),
            text_sha256,
            text: match text {
                Kept::Text(t) => Some(t.to_string()),
                Kept::Hash(_) => None,
            },
            action: verdict.action,
            category: verdict.category.clone(),
            label,
            by: by.to_string(),
        }
    }

    /// Records a step, logging (not failing) if the file cannot be written: a step must never stop the
    /// action it records.
    pub fn step(&self, step: Step, filter: &str, by: &str, detail: &str) {
        let entry = Entry::Step {
            step,
            filter: filter.to_string(),
            by: by.to_string(),
            at: now(),
            detail: detail.to_string(),
        };
        if let Err(e) = self.append(&entry) {
            tracing::error!(error = %e, ?step, "could not record a filter step");
        }
    }

    /// Reads every entry of a store file.
    pub fn read(path: &Path) -> Result<Entries, StoreError> {
        let text = std::fs::read_to_string(path).map_err(|e| StoreError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let entries = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| StoreError::Parse {
                    path: path.display().to_string(),
                    line: i + 1,
                    message: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Entries(entries))
    }
}

/// A store's entries, read back.
#[derive(Debug, Clone, Default)]
pub struct Entries(pub Vec<Entry>);

impl Entries {
    /// Every finding with its current label: the latest reviewer label, else the one it came with.
    pub fn findings(&self) -> Vec<(Finding, Option<Label>)> {
        let mut labels: HashMap<&str, &Label> = HashMap::new();
        for e in &self.0 {
            if let Entry::Label { id, label, .. } = e {
                labels.insert(id, label);
            }
        }
        self.0
            .iter()
            .filter_map(|e| match e {
                Entry::Finding(f) => {
                    let label = labels
                        .get(f.id.as_str())
                        .map(|l| (*l).clone())
                        .or_else(|| f.label.clone());
                    Some((f.clone(), label))
                }
                _ => None,
            })
            .collect()
    }

    /// The labelled findings that kept their text, as training examples.
    pub fn training_examples(&self) -> Vec<Example> {
        self.findings()
            .into_iter()
            .filter_map(|(f, label)| {
                let text = f.text?;
                let (label, category) = match label? {
                    Label::Allow => ("allow".to_string(), format!("feedback:{:?}", f.source)),
                    Label::Block { category } => ("block".to_string(), category),
                };
                Some(Example { text, label, category })
            })
            .collect()
    }

    /// The steps, in order.
    pub fn steps(&self) -> impl Iterator<Item = &Entry> {
        self.0.iter().filter(|e| matches!(e, Entry::Step { .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_survive_the_file_and_the_latest_label_counts() {
        let dir = std::env::temp_dir().join(format!("ferroserve-store-{}", std::process::id()));
        let path = dir.join("feedback.jsonl");
        let _ = std::fs::remove_file(&path);
        let blocked = Verdict {
            action: Action::Block,
            category: Some("violence".into()),
            evidence: String::new(),
        };
        let (kept, hashed) = (Store::open(&path, true).unwrap(), Store::open(&path, false).unwrap());
        let fp = kept.finding(
            Source::FalsePositive,
            "f@1",
            Some("r1"),
            &kept.keep(&Arc::from("kill the process")),
            &blocked,
            Some(Label::Allow),
            "ops",
        );
        let fnr = hashed.finding(
            Source::FalseNegative,
            "f@1",
            Some("r2"),
            &hashed.keep(&Arc::from("secret text")),
            &Verdict::allow(),
            None,
            "ops",
        );
        assert!(
            fnr.text.is_none() && fnr.text_sha256 == sha256_hex(b"secret text"),
            "no text without the opt-in"
        );
        assert_eq!(
            (fp.text.as_deref(), fp.text_sha256.as_str()),
            (Some("kill the process"), sha256_hex(b"kill the process").as_str()),
            "kept text and its hash"
        );
        kept.append(&Entry::Finding(fp.clone())).unwrap();
        hashed.append(&Entry::Finding(fnr.clone())).unwrap();
        let relabel = Entry::Label {
            id: fp.id.clone(),
            label: Label::parse("block:violence").unwrap(),
            by: "lead".into(),
            at: now(),
        };
        kept.append(&relabel).unwrap();
        kept.step(Step::Promote, "f@2", "ops", "");
        let read = Store::read(&path).unwrap();
        let findings = read.findings();
        assert_eq!(findings.len(), 2);
        assert_eq!(
            findings[0].1,
            Some(Label::Block {
                category: "violence".into()
            }),
            "the latest label"
        );
        assert_eq!(findings[1].1, None);
        let examples = read.training_examples();
        assert_eq!(examples.len(), 1, "only labelled findings with text train");
        assert_eq!(
            (examples[0].label.as_str(), examples[0].category.as_str()),
            ("block", "violence")
        );
        assert_eq!(read.steps().count(), 1);
        assert!(Label::parse("block").is_err() && Label::parse("maybe").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
