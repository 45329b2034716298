//! The tokenizer, rebuilt from GGUF metadata with the `tokenizers` crate.
//!
//! SmolLM2 uses GPT-2-style byte-level BPE. Candle's `TokenizerFromGguf` guesses the pre-tokenizer from
//! `tokenizer.ggml.pre` and gets this model wrong, so we build the same pipeline as the model's own
//! `tokenizer.json`: split digits individually, then byte-level pre-tokenization without a prefix space.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::ModelError;
use crate::gguf::GgufFile;

/// GGUF `token_type` of control tokens (`<|im_start|>` and friends), which must never be split.
const TOKEN_TYPE_CONTROL: u32 = 3;

/// Text to ids and back, plus the ids that end a generation.
pub struct TextTokenizer {
    /// The assembled BPE pipeline.
    inner: Tokenizer,
    /// The same pipeline with control-token strings read as plain text: for what a client wrote.
    literal: Tokenizer,
    /// The control tokens' strings (`<|im_start|>` and friends).
    specials: Vec<String>,
    /// Ids that end generation: the GGUF's EOS and, for chat models, the end-of-turn token.
    stop_ids: Vec<u32>,
    /// The EOS token's text, for chat templates that mention it.
    eos_token: String,
    /// The BOS token's text, for chat templates that mention it.
    bos_token: String,
}

impl TextTokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.*` metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<TextTokenizer, ModelError> {
        let model = gguf.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer.ggml.model is `{model}`; only byte-level BPE (`gpt2`) is supported"
            )));
        }
        let tokens = gguf.strings("tokenizer.ggml.tokens")?;
        let merges = gguf
            .strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| ModelError::Tokenizer(format!("merge `{m}` is not two tokens")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let types = gguf.u32s("tokenizer.ggml.token_type")?;
        let eos_id = gguf.u32("tokenizer.ggml.eos_token_id")?;
        let bos_id = gguf.u32("tokenizer.ggml.bos_token_id").unwrap_or(eos_id);

        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<String> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, ty)| **ty == TOKEN_TYPE_CONTROL)
            .map(|(t, _)| t.clone())
            .collect();
        let added: Vec<AddedToken> = specials.iter().map(|t| AddedToken::from(t.clone(), true)).collect();
        inner
            .add_special_tokens(added)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut literal = inner.clone();
        literal.set_encode_special_tokens(true);

        let token_text = |id: u32| tokens.get(id as usize).cloned().unwrap_or_default();
        let mut stop_ids = vec![eos_id];
        if let Some(im_end) = inner.token_to_id("<|im_end|>")
            && im_end != eos_id
        {
            stop_ids.push(im_end);
        }
        Ok(TextTokenizer {
            eos_token: token_text(eos_id),
            bos_token: token_text(bos_id),
            inner,
            literal,
            specials,
            stop_ids,
        })
    }

    /// Token ids for `text`. Special-token strings in the text become their single ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Token ids for `text` read as plain text: a control-token string in it is spelled out in ordinary
    /// tokens, never turned into the control token. For text a client wrote.
    pub fn encode_literal(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.literal
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The first control-token string that occurs in `text`, if any.
    pub fn special_in(&self, text: &str) -> Option<&str> {
        self.specials.iter().map(String::as_str).find(|s| text.contains(s))
    }

    /// Text for `ids`, with special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// True when generating `id` ends the sequence.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// The id of a token given its text, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Every token's bytes, by id, as grammar engines take a vocabulary: byte-level BPE's characters mapped
    /// back to the bytes they stand for, and a control token's text behind a 0xFF byte (no UTF-8 text holds
    /// one), which marks it special (llguidance's convention).
    pub fn token_bytes(&self) -> Vec<Vec<u8>> {
        let unbyte = byte_level_bytes();
        (0..self.vocab_size() as u32)
            .map(|id| {
                let Some(token) = self.inner.id_to_token(id) else {
                    return Vec::new();
                };
                if self.specials.contains(&token) {
                    return [&[0xFF][..], token.as_bytes()].concat();
                }
                token
                    .chars()
                    .map(|c| unbyte.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| token.into_bytes())
            })
            .collect()
    }

    /// The ids that end a generation.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The EOS token's text.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// The BOS token's text.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }
}

/// Byte-level BPE's alphabet, character to byte: printable Latin-1 bytes stand for themselves, and the
/// rest (controls, space, 0x7F-0xA0, 0xAD) for the characters from U+0100 on, in byte order (GPT-2's
/// `bytes_to_unicode`).
fn byte_level_bytes() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (char::from(b), b)
            } else {
                let c = char::from_u32(next).expect("below the surrogates");
                next += 1;
                (c, b)
            }
        })
        .collect()
}
