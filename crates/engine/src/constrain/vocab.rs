//! The model's vocabulary as llguidance sees it: a token trie over every token's bytes, and the model's
//! own tokenizer for text that llguidance needs tokenized.

use std::sync::Arc;

use ferroserve_model::TextCodec;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

struct Vocab {
    trie: TokTrie,
    text: Arc<TextCodec>,
}

impl TokenizerEnv for Vocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie
            .tokenize_with_greedy_fallback(s, |text| self.text.tokenizer.encode_literal(text).unwrap_or_default())
    }
}

/// The tokenizer environment for `text`'s model.
pub(super) fn tok_env(text: &Arc<TextCodec>) -> TokEnv {
    let words = text.tokenizer.token_bytes();
    let eos = text.tokenizer.stop_ids().first().copied().unwrap_or(0);
    let info = TokRxInfo::new(words.len() as u32, eos);
    Arc::new(Vocab {
        trie: TokTrie::from(&info, &words),
        text: Arc::clone(text),
    })
}
