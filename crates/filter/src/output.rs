//! Filtering streamed text. Each chunk is judged together with the text before it, over a sliding window,
//! so a phrase split across tokens is caught. Only the trailing partial word is held back: a term cannot
//! finish inside text that was already released, and multi-word phrases are judged whole before their
//! last word goes out.

use std::sync::Arc;

use crate::hub::{FilterHub, Selection, Stage};
use crate::verdict::{Action, Verdict};

/// Characters of recent output judged with each chunk: longer than any rule's span.
pub const WINDOW_CHARS: usize = 320;

/// One request's output filter.
pub struct OutputGuard {
    hub: Arc<FilterHub>,
    selection: Arc<Selection>,
    request_id: String,
    /// The active filter's id.
    filter: String,
    /// Everything generated so far.
    text: String,
    /// Bytes of `text` already released to the client.
    released: usize,
    /// The strongest non-blocking verdict seen (a flag), recorded at the end.
    worst: Verdict,
    /// Set once a verdict was recorded.
    done: bool,
}

/// The byte index where the last `chars` characters of `text` start.
fn tail_start(text: &str, chars: usize) -> usize {
    text.char_indices()
        .rev()
        .nth(chars.saturating_sub(1))
        .map_or(0, |(i, _)| i)
}

impl OutputGuard {
    /// A guard for one request, or `None` when filtering is off for it.
    pub fn new(hub: Arc<FilterHub>, selection: Arc<Selection>, request_id: &str) -> Option<OutputGuard> {
        let filter = selection.active.as_ref().filter(|_| selection.enabled)?.id.clone();
        Some(OutputGuard {
            hub,
            selection,
            request_id: request_id.to_string(),
            filter,
            text: String::new(),
            released: 0,
            worst: Verdict::allow(),
            done: false,
        })
    }

    /// The id of the filter judging this request.
    pub fn filter_id(&self) -> &str {
        &self.filter
    }

    /// Judges the output so far with `chunk` added. Returns the text that may go to the client now, or the
    /// blocking verdict (recorded): send nothing more and stop the generation.
    pub async fn push(&mut self, chunk: &str) -> Result<String, Verdict> {
        self.text.push_str(chunk);
        let window: Arc<str> = Arc::from(&self.text[tail_start(&self.text, WINDOW_CHARS)..]);
        self.judge(window).await?;
        // Release up to the last character that ends a word.
        let pending = &self.text[self.released..];
        let cut = pending
            .char_indices()
            .rev()
            .find(|(_, c)| !c.is_alphanumeric())
            .map_or(0, |(i, c)| i + c.len_utf8());
        let out = pending[..cut].to_string();
        self.released += cut;
        Ok(out)
    }

    /// The generation ended: judges the whole tail once more and releases what was held back.
    pub async fn finish(&mut self) -> Result<String, Verdict> {
        let window: Arc<str> = Arc::from(&self.text[tail_start(&self.text, WINDOW_CHARS)..]);
        self.judge(window).await?;
        let out = self.text[self.released..].to_string();
        self.released = self.text.len();
        if !self.done {
            self.done = true;
            self.hub
                .record(&self.filter, Stage::Output, &self.request_id, &self.worst, None);
        }
        Ok(out)
    }

    async fn judge(&mut self, window: Arc<str>) -> Result<(), Verdict> {
        // Generated text gets the rules only (the hub's partial check). The classifier was trained on
        // requests, not on model output: on output (a sampled JSON string, a fragment) it blocks what is
        // harmless.
        let Some(v) = self
            .hub
            .check(&self.selection, Stage::Output, Arc::clone(&window), false)
            .await
        else {
            return Ok(());
        };
        match v.action {
            Action::Block => {
                if !self.done {
                    self.done = true;
                    self.hub
                        .record(&self.filter, Stage::Output, &self.request_id, &v, Some(&window));
                }
                Err(v)
            }
            Action::Flag if self.worst.action == Action::Allow => {
                self.worst = v;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl Drop for OutputGuard {
    /// A stream that ended early (client gone, error) still has its verdict counted.
    fn drop(&mut self) {
        if !self.done {
            self.hub
                .record(&self.filter, Stage::Output, &self.request_id, &self.worst, None);
        }
    }
}
