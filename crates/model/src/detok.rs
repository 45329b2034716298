//! Streaming detokenization: turning ids into text one token at a time without splitting a UTF-8
//! character across two chunks.
//!
//! Byte-level BPE tokens are bytes, not characters: an emoji can take several tokens, and decoding only the
//! first gives U+FFFD. We decode a small window of recent ids and release only text that is complete.

use crate::ModelError;
use crate::tokenizer::TextTokenizer;

/// Per-sequence detokenizer state.
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    /// Every id pushed so far.
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix: usize,
    /// End of the text already released.
    read: usize,
}

impl IncrementalDecoder {
    /// Adds one id and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<String, ModelError> {
        self.ids.push(id);
        let released = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let window = tokenizer.decode(&self.ids[self.prefix..])?;
        if window.len() <= released.len() || window.ends_with('\u{FFFD}') || !window.is_char_boundary(released.len()) {
            return Ok(String::new());
        }
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(window[released.len()..].to_string())
    }
}
