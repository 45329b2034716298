//! A model ready to generate: weights, tokenizer and chat template from one GGUF.

use std::path::PathBuf;
use std::sync::Arc;

use ferroserve_core::{ChatMessage, GenerationDefaults, Input, ModelInfo, Role};

use crate::ModelError;
use crate::batched::BatchedLlama;
use crate::chat::{CHATML, ChatTemplate};
use crate::device::DeviceSpec;
use crate::gguf::GgufFile;
use crate::tokenizer::TextTokenizer;

/// What to load.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Name clients ask for.
    pub name: String,
    /// Version label.
    pub version: String,
    /// The GGUF file.
    pub path: PathBuf,
    /// Where to run it.
    pub device: DeviceSpec,
    /// The version's system prompt, sampling and stop strings.
    pub defaults: GenerationDefaults,
}

/// The text side of a model: tokenizer and chat template. Shared (`Arc`) between the tasks that validate
/// requests and the engine thread that detokenizes output.
pub struct TextCodec {
    /// Text to ids and back.
    pub tokenizer: TextTokenizer,
    /// Conversation to prompt text.
    pub chat: ChatTemplate,
    /// Prepended to conversations without a system message (a generation default of the version).
    pub system_prompt: Option<String>,
}

impl TextCodec {
    /// The prompt token ids for an input: raw text as-is (control tokens in it are the caller's own
    /// formatting), or a conversation through the chat template, where what a message says is only ever
    /// text: a `<|im_start|>` inside a message cannot open a forged turn.
    pub fn prompt_ids(&self, input: &Input) -> Result<Vec<u32>, ModelError> {
        match input {
            Input::Prompt(text) => self.tokenizer.encode(text),
            Input::Chat(messages) => {
                let with_system;
                let messages = match &self.system_prompt {
                    Some(system) if messages.iter().all(|m| m.role != Role::System) => {
                        with_system = std::iter::once(ChatMessage {
                            role: Role::System,
                            content: system.clone(),
                        })
                        .chain(messages.iter().cloned())
                        .collect::<Vec<_>>();
                        &with_system[..]
                    }
                    _ => messages,
                };
                if messages.iter().all(|m| self.tokenizer.special_in(&m.content).is_none()) {
                    // The common case: nothing in the contents can become a control token.
                    return self.tokenizer.encode(&self.chat.render(messages, true)?);
                }
                self.encode_chat_literal(messages)
            }
        }
    }

    /// Renders `messages` with a placeholder for each content, then encodes the template's own text with
    /// its control tokens and each content as plain text. A template that changes or drops a placeholder
    /// cannot be rendered this way, so the request is refused rather than let a control token through.
    fn encode_chat_literal(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ModelError> {
        // A fresh random nonce (std's hasher keys are random per instance), so no content can spell it.
        let random = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), messages.len());
        let nonce = format!("@@ferroserve-content-{random:016x}-");
        let marked: Vec<ChatMessage> = (0..messages.len())
            .map(|i| ChatMessage {
                role: messages[i].role,
                content: format!("{nonce}{i}@@"),
            })
            .collect();
        let rendered = self.chat.render(&marked, true)?;
        let mut ids = Vec::new();
        let mut seen = vec![false; messages.len()];
        let mut rest = rendered.as_str();
        while let Some(at) = rest.find(&nonce) {
            ids.extend(self.tokenizer.encode(&rest[..at])?);
            let after = &rest[at + nonce.len()..];
            let digits = after.find("@@").map(|end| &after[..end]);
            let i = digits
                .and_then(|d| d.parse::<usize>().ok())
                .filter(|i| *i < messages.len());
            let (Some(i), Some(digits)) = (i, digits) else {
                return Err(ModelError::Template(
                    "the chat template changed a message placeholder".into(),
                ));
            };
            seen[i] = true;
            ids.extend(self.tokenizer.encode_literal(&messages[i].content)?);
            rest = &after[digits.len() + 2..];
        }
        ids.extend(self.tokenizer.encode(rest)?);
        if let Some(i) = (0..messages.len()).find(|&i| !seen[i] && !messages[i].content.is_empty()) {
            let special = self
                .tokenizer
                .special_in(&messages[i].content)
                .unwrap_or("a control token");
            return Err(ModelError::Template(format!(
                "message {i} contains `{special}`, and this model's chat template cannot carry it as plain text; \
                 remove it from the message"
            )));
        }
        Ok(ids)
    }
}

/// Everything needed to turn a request into tokens and back.
pub struct LoadedModel {
    /// Name, version and context length.
    pub info: ModelInfo,
    /// Tokenizer and chat template.
    pub text: Arc<TextCodec>,
    /// The forward pass; shared by versions loaded from the same file (they differ only in their
    /// generation defaults).
    pub model: Arc<BatchedLlama>,
}

impl LoadedModel {
    /// Loads `spec`; fails with a message naming the file and the problem.
    pub fn load(spec: &ModelSpec) -> Result<LoadedModel, ModelError> {
        LoadedModel::load_sharing(spec, None)
    }

    /// As [`LoadedModel::load`], but with `weights` (loaded earlier from the same file) instead of reading
    /// them again: only the tokenizer and template are read.
    pub fn load_sharing(spec: &ModelSpec, weights: Option<Arc<BatchedLlama>>) -> Result<LoadedModel, ModelError> {
        LoadedModel::load_reporting(spec, weights, &|_| {})
    }

    /// As [`LoadedModel::load_sharing`], calling `progress` with the fraction of the weights read.
    pub fn load_reporting(
        spec: &ModelSpec,
        weights: Option<Arc<BatchedLlama>>,
        progress: &dyn Fn(f32),
    ) -> Result<LoadedModel, ModelError> {
        let device = spec.device.open()?;
        let mut gguf = GgufFile::open(&spec.path)?;
        let tokenizer = TextTokenizer::from_gguf(&gguf)?;
        let template = gguf.string("tokenizer.chat_template").unwrap_or(CHATML);
        let chat = ChatTemplate::new(template, tokenizer.bos_token(), tokenizer.eos_token())?;
        let declared = gguf.u32("llama.context_length")?;
        // Positions past the RoPE tables cannot be computed: a longer declared context is served shorter.
        let context_length = declared.min(crate::batched::MAX_POSITIONS as u32);
        if context_length < declared {
            tracing::warn!(
                declared,
                context_length,
                "the model's declared context is longer than the engine's"
            );
        }
        let model = match weights {
            Some(shared) => shared,
            None => Arc::new(BatchedLlama::load_reporting(&mut gguf, &device, progress)?),
        };
        if tokenizer.vocab_size() > model.shape().vocab {
            return Err(ModelError::Format {
                path: spec.path.clone(),
                message: format!(
                    "the tokenizer has {} tokens but the embedding only {} rows",
                    tokenizer.vocab_size(),
                    model.shape().vocab
                ),
            });
        }
        tracing::info!(path = %spec.path.display(), %spec.device, context_length, "model loaded");
        Ok(LoadedModel {
            info: ModelInfo {
                name: spec.name.clone(),
                version: spec.version.clone(),
                context_length,
                defaults: spec.defaults.clone(),
            },
            text: Arc::new(TextCodec {
                tokenizer,
                chat,
                system_prompt: spec.defaults.system_prompt.clone(),
            }),
            model,
        })
    }
}
