//! Chat templates: rendering a conversation into the prompt text the model was trained on.
//!
//! The template is the Jinja source stored in the GGUF (`tokenizer.chat_template`), rendered with
//! minijinja as Hugging Face's `apply_chat_template` would. Models without one get plain ChatML.

use ferroserve_core::ChatMessage;
use minijinja::{Environment, ErrorKind, Value, context};

use crate::ModelError;

/// ChatML, the format SmolLM2 and many other models use, for GGUFs that carry no template.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + \
message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A compiled chat template.
pub struct ChatTemplate {
    /// Holds the one compiled template, named "chat".
    env: Environment<'static>,
    /// The BOS text, passed to templates as `bos_token`.
    bos_token: String,
    /// The EOS text, passed to templates as `eos_token`.
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`, checking its syntax now rather than at the first request.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, ModelError> {
        let mut env = Environment::new();
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::Template(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders `messages` and, when `add_generation_prompt`, the opening of the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ModelError> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())]))
            .collect();
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| ModelError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferroserve_core::Role;

    fn msg(role: Role, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: content.into(),
        }
    }

    #[test]
    fn chatml_renders_turns_and_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let out = t
            .render(&[msg(Role::System, "Be brief."), msg(Role::User, "Hi")], true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let no_prompt = t.render(&[msg(Role::User, "Hi")], false).unwrap();
        assert!(!no_prompt.ends_with("assistant\n"));
    }

    #[test]
    fn template_errors_are_reported() {
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let err = t.render(&[], true).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }
}
