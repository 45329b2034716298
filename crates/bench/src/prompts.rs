//! What the load tester sends, chosen with a seed so that two runs (two peers) send the same prompts in
//! the same order:
//! - synthetic prompts of a set length in tokens, none repeated;
//! - groups of prompts sharing a prefix (vLLM's prefix-repetition dataset): a long system prompt, or
//!   tool descriptions, shared by many requests;
//! - multi-turn conversations that resend their history, turn after turn;
//! - prompts from a JSONL file.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::BenchError;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// "system", "user" or "assistant".
    pub role: String,
    /// The text.
    pub content: String,
}

/// A prompt: raw text (completions) or a conversation (chat).
#[derive(Debug, Clone, PartialEq)]
pub enum PromptBody {
    /// Sent as `prompt` (gRPC) or to `/v1/completions`.
    Text(String),
    /// Sent as `messages` (gRPC) or to `/v1/chat/completions`.
    Chat(Vec<Message>),
}

/// One prompt with its own token count.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// What is sent.
    pub body: PromptBody,
    /// Its length in tokens: exact with a tokenizer, else an estimate; replaced by the server's count
    /// where the server reports one.
    pub tokens: u32,
}

/// Counts the tokens of a text (the model's tokenizer, supplied by the caller).
pub type TokenCounter = dyn Fn(&str) -> usize + Send + Sync;

/// Where prompts come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PromptSource {
    /// Random common English words, `input_tokens` long (exactly, given a tokenizer).
    Synthetic {
        /// Target prompt length in tokens.
        input_tokens: u32,
        /// Send each as a one-message conversation rather than raw text.
        chat: bool,
    },
    /// `groups` random prefixes of `prefix_tokens`; prompt `i` is prefix `i % groups` followed by its own
    /// `suffix_tokens` (as a chat: the prefix is the system message, the suffix the user's).
    SharedPrefix {
        /// Tokens of each shared prefix.
        prefix_tokens: u32,
        /// Tokens after it, different for every prompt.
        suffix_tokens: u32,
        /// Distinct prefixes.
        groups: u32,
        /// Send each as a conversation rather than raw text.
        chat: bool,
    },
    /// `conversations` chats of `turns` turns; turn `t` resends the system prompt and every earlier turn
    /// (the user's message and a fixed reply of `reply_tokens`) with a new question. Sent in order, turn
    /// by turn across the conversations, so that a turn follows the one before it.
    MultiTurn {
        /// Conversations.
        conversations: u32,
        /// Turns per conversation.
        turns: u32,
        /// Tokens of each conversation's system prompt.
        system_tokens: u32,
        /// Tokens of each user message.
        user_tokens: u32,
        /// Tokens of each earlier reply resent as history.
        reply_tokens: u32,
    },
    /// One JSON object per line: `{"prompt": "..."}` or `{"messages": [{"role", "content"}, ...]}`.
    File {
        /// The JSONL file.
        path: PathBuf,
    },
}

/// Common words that byte-level BPE vocabularies (GPT-2 style, SmolLM2, Llama 3) keep as one token each
/// when preceded by a space, so a synthetic prompt's length is close to its word count even without a
/// tokenizer.
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "his", "her",
    "they", "this", "which", "or", "be", "are", "were", "an", "had", "not", "but", "first", "one", "new", "also",
    "after", "time", "year", "city", "world", "people", "school", "water", "house", "music", "game", "family", "river",
    "story", "light", "small", "great", "long", "early", "later", "night", "road", "field", "party", "power", "line",
    "place", "group", "work", "state", "part", "name", "best", "high", "life", "book", "film", "team", "home", "king",
    "war", "north", "south", "east", "west", "old", "young",
];

/// Builds one synthetic prompt from `rng`: as many words as tokens asked for, then words added or
/// removed until the tokenizer (when there is one) agrees. Each word is one or two tokens, so the result
/// is exact or one token long.
fn synthetic(rng: &mut StdRng, tokens: u32, count: Option<&TokenCounter>) -> (String, u32) {
    let mut words: Vec<&str> = (0..tokens)
        .map(|_| *WORDS.choose(rng).expect("non-empty word list"))
        .collect();
    let Some(count) = count else {
        return (words.join(" "), tokens);
    };
    let mut n = count(&words.join(" ")) as u32;
    while n < tokens {
        words.push(WORDS.choose(rng).expect("non-empty word list"));
        n = count(&words.join(" ")) as u32;
    }
    while n > tokens && words.len() > 1 {
        let shorter = count(&words[..words.len() - 1].join(" ")) as u32;
        if shorter < tokens {
            break;
        }
        words.pop();
        n = shorter;
    }
    (words.join(" "), n)
}

/// A pool of prompts sent in a seeded order: each pass over the pool is a fresh shuffle, so no prompt
/// repeats before every other has been sent once.
#[derive(Debug, Clone)]
pub struct Prompts {
    /// The pool to draw from.
    pool: Vec<Prompt>,
    /// The current pass's order.
    order: Vec<usize>,
    /// Next position in `order`.
    cursor: usize,
    /// Shuffles each pass; seeded so that the order repeats run to run.
    rng: StdRng,
    /// Sent in the pool's order, every pass (conversations, whose turns must follow each other).
    ordered: bool,
}

impl Prompts {
    /// Loads or generates the pool. `count` sizes a synthetic pool (a file gives its own lines): make it
    /// at least the number of requests, so that no synthetic prompt is sent twice.
    pub fn load(
        source: &PromptSource,
        seed: u64,
        count: usize,
        tokens: Option<&TokenCounter>,
    ) -> Result<Self, BenchError> {
        let mut rng = StdRng::seed_from_u64(seed);
        let pool = match source {
            PromptSource::Synthetic { input_tokens, chat } => {
                if *input_tokens == 0 {
                    return Err(BenchError::setting("input-tokens", "must be at least 1"));
                }
                (0..count.max(1))
                    .map(|_| {
                        let (text, n) = synthetic(&mut rng, *input_tokens, tokens);
                        let body = if *chat {
                            PromptBody::Chat(vec![Message {
                                role: "user".into(),
                                content: text,
                            }])
                        } else {
                            PromptBody::Text(text)
                        };
                        Prompt { body, tokens: n }
                    })
                    .collect()
            }
            PromptSource::SharedPrefix {
                prefix_tokens,
                suffix_tokens,
                groups,
                chat,
            } => {
                if *prefix_tokens == 0 || *suffix_tokens == 0 || *groups == 0 {
                    return Err(BenchError::setting(
                        "prefix-tokens, suffix-tokens, groups",
                        "must each be at least 1",
                    ));
                }
                let prefixes: Vec<(String, u32)> = (0..*groups)
                    .map(|_| synthetic(&mut rng, *prefix_tokens, tokens))
                    .collect();
                (0..count.max(1))
                    .map(|i| {
                        let (prefix, p) = &prefixes[i % prefixes.len()];
                        let (suffix, s) = synthetic(&mut rng, *suffix_tokens, tokens);
                        let body = match chat {
                            true => PromptBody::Chat(vec![message("system", prefix), message("user", &suffix)]),
                            false => PromptBody::Text(format!("{prefix} {suffix}")),
                        };
                        Prompt { body, tokens: p + s }
                    })
                    .collect()
            }
            PromptSource::MultiTurn { .. } => conversations(source, &mut rng, tokens)?,
            PromptSource::File { path } => read_jsonl(path, tokens)?,
        };
        let mut prompts = Prompts {
            order: Vec::new(),
            cursor: 0,
            pool,
            rng,
            ordered: matches!(source, PromptSource::MultiTurn { .. }),
        };
        prompts.shuffle();
        Ok(prompts)
    }

    fn shuffle(&mut self) {
        self.order = (0..self.pool.len()).collect();
        if !self.ordered {
            self.order.shuffle(&mut self.rng);
        }
        self.cursor = 0;
    }

    /// Prompts in the pool: for conversations, every turn of every one.
    pub fn len(&self) -> usize {
        self.pool.len()
    }

    /// Whether the pool is empty (never, once loaded).
    pub fn is_empty(&self) -> bool {
        self.pool.is_empty()
    }

    /// The next prompt in the seeded order.
    pub fn next_prompt(&mut self) -> Prompt {
        if self.cursor == self.order.len() {
            self.shuffle();
        }
        self.cursor += 1;
        self.pool[self.order[self.cursor - 1]].clone()
    }

    /// The same pool in another order, for warm-up requests: they then do not warm a server's prefix
    /// cache with the measured phase's first prompts, and the measured order stays the same.
    pub fn for_warmup(&self) -> Prompts {
        let mut p = self.clone();
        p.rng = StdRng::seed_from_u64(self.rng.clone().random());
        p.shuffle();
        p
    }

    /// Whether any prompt is a conversation.
    pub fn has_chat(&self) -> bool {
        self.pool.iter().any(|p| matches!(p.body, PromptBody::Chat(_)))
    }

    /// Mean prompt length in tokens.
    pub fn mean_tokens(&self) -> f64 {
        self.pool.iter().map(|p| f64::from(p.tokens)).sum::<f64>() / self.pool.len() as f64
    }
}

fn message(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

/// The turns of a [`PromptSource::MultiTurn`] workload, turn-major: every conversation's first turn,
/// then every second turn, and so on.
fn conversations(
    source: &PromptSource,
    rng: &mut StdRng,
    tokens: Option<&TokenCounter>,
) -> Result<Vec<Prompt>, BenchError> {
    let PromptSource::MultiTurn {
        conversations,
        turns,
        system_tokens,
        user_tokens,
        reply_tokens,
    } = *source
    else {
        unreachable!("called for multi-turn sources only");
    };
    if conversations == 0 || turns == 0 || system_tokens == 0 || user_tokens == 0 || reply_tokens == 0 {
        return Err(BenchError::setting(
            "conversations, turns, system-tokens, user-tokens, reply-tokens",
            "must each be at least 1",
        ));
    }
    /// A message and its tokens.
    type Said = (Message, u32);
    /// A conversation: its system prompt, then (question, reply) per turn.
    struct Chat {
        system: Said,
        turns: Vec<(Said, Said)>,
    }
    let mut said = |role: &str, n: u32| {
        let (text, tokens) = synthetic(rng, n, tokens);
        (message(role, &text), tokens)
    };
    let chats: Vec<Chat> = (0..conversations)
        .map(|_| Chat {
            system: said("system", system_tokens),
            turns: (0..turns)
                .map(|_| (said("user", user_tokens), said("assistant", reply_tokens)))
                .collect(),
        })
        .collect();
    let mut pool = Vec::with_capacity((conversations * turns) as usize);
    for t in 0..turns as usize {
        for chat in &chats {
            let mut messages = vec![chat.system.0.clone()];
            let mut n = chat.system.1;
            for ((q, qn), (a, an)) in &chat.turns[..t] {
                messages.extend([q.clone(), a.clone()]);
                n += qn + an;
            }
            let (question, qn) = &chat.turns[t].0;
            messages.push(question.clone());
            pool.push(Prompt {
                body: PromptBody::Chat(messages),
                tokens: n + qn,
            });
        }
    }
    Ok(pool)
}

/// One line of a prompt file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    /// Raw text.
    prompt: Option<String>,
    /// A conversation.
    messages: Option<Vec<Message>>,
}

fn read_jsonl(path: &Path, tokens: Option<&TokenCounter>) -> Result<Vec<Prompt>, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|e| BenchError::io(path, e))?;
    let bad = |line: usize, message: String| BenchError::PromptFile {
        path: path.to_path_buf(),
        line,
        message,
    };
    let count = |s: &str| tokens.map_or_else(|| s.len().div_ceil(4), |c| c(s)) as u32;
    let mut pool = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(raw).map_err(|e| bad(i + 1, e.to_string()))?;
        let prompt = match (line.prompt, line.messages) {
            (Some(p), None) if !p.is_empty() => Prompt {
                tokens: count(&p),
                body: PromptBody::Text(p),
            },
            (None, Some(m)) if !m.is_empty() => Prompt {
                tokens: m.iter().map(|m| count(&m.content)).sum(),
                body: PromptBody::Chat(m),
            },
            _ => {
                return Err(bad(
                    i + 1,
                    "needs exactly one of a non-empty \"prompt\" string or a non-empty \"messages\" list".into(),
                ));
            }
        };
        pool.push(prompt);
    }
    if pool.is_empty() {
        return Err(bad(0, "no prompts in the file".into()));
    }
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    #[test]
    fn synthetic_prompts_have_the_length_asked_for_and_repeat_with_the_seed() {
        let source = PromptSource::Synthetic {
            input_tokens: 37,
            chat: false,
        };
        let counter: &TokenCounter = &|s: &str| words(s) + s.matches("people").count();
        let mut a = Prompts::load(&source, 7, 8, Some(counter)).unwrap();
        let mut b = Prompts::load(&source, 7, 8, Some(counter)).unwrap();
        for _ in 0..20 {
            let (pa, pb) = (a.next_prompt(), b.next_prompt());
            assert_eq!(pa, pb);
            let PromptBody::Text(t) = &pa.body else {
                panic!("text expected")
            };
            assert!((37..=38).contains(&pa.tokens), "{}", pa.tokens);
            assert_eq!(pa.tokens as usize, counter(t));
        }
        let mut c = Prompts::load(&source, 8, 8, Some(counter)).unwrap();
        assert_ne!(
            (0..5).map(|_| a.next_prompt()).collect::<Vec<_>>(),
            (0..5).map(|_| c.next_prompt()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn no_prompt_repeats_within_a_pass() {
        let source = PromptSource::Synthetic {
            input_tokens: 12,
            chat: true,
        };
        let mut p = Prompts::load(&source, 3, 20, None).unwrap();
        let pass: Vec<Prompt> = (0..20).map(|_| p.next_prompt()).collect();
        let distinct: std::collections::HashSet<String> = pass.iter().map(|x| format!("{:?}", x.body)).collect();
        assert_eq!(distinct.len(), 20);
        assert!(matches!(pass[0].body, PromptBody::Chat(_)));
        let warm = p.for_warmup().next_prompt();
        assert!(pass.contains(&warm), "warm-up draws from the same pool");
    }

    #[test]
    fn shared_prefix_prompts_share_their_group_prefix_only() {
        let source = PromptSource::SharedPrefix {
            prefix_tokens: 30,
            suffix_tokens: 5,
            groups: 2,
            chat: true,
        };
        let p = Prompts::load(&source, 1, 6, None).unwrap();
        let system = |i: usize| match &p.pool[i].body {
            PromptBody::Chat(m) => (m[0].content.clone(), m[1].content.clone()),
            PromptBody::Text(_) => panic!("chat expected"),
        };
        assert_eq!(system(0).0, system(2).0, "the same group shares its prefix");
        assert_ne!(system(0).0, system(1).0, "groups differ");
        assert_ne!(system(0).1, system(2).1, "each has its own question");
        assert_eq!(p.pool[0].tokens, 35);
    }

    #[test]
    fn multi_turn_prompts_resend_the_history_in_turn_order() {
        let source = PromptSource::MultiTurn {
            conversations: 3,
            turns: 4,
            system_tokens: 20,
            user_tokens: 5,
            reply_tokens: 8,
        };
        let mut p = Prompts::load(&source, 2, 0, None).unwrap();
        assert_eq!(p.len(), 12);
        let sent: Vec<Vec<Message>> = (0..12)
            .map(|_| match p.next_prompt().body {
                PromptBody::Chat(m) => m,
                PromptBody::Text(_) => panic!("chat expected"),
            })
            .collect();
        // Turn-major: conversation c's turn t is request t * 3 + c, and it extends turn t - 1.
        for t in 1..4 {
            for c in 0..3 {
                let (now, before) = (&sent[t * 3 + c], &sent[(t - 1) * 3 + c]);
                assert_eq!(now.len(), 2 * t + 2, "system, {t} earlier turns, a question");
                assert_eq!(&now[..before.len()], &before[..], "the history is resent as it was");
                assert_eq!(now[now.len() - 2].role, "assistant");
            }
        }
        assert_eq!(
            p.next_prompt().body,
            PromptBody::Chat(sent[0].clone()),
            "the next pass keeps the order"
        );
    }

    #[test]
    fn prompt_files_take_text_and_chat_and_name_bad_lines() {
        let dir = std::env::temp_dir().join(format!("ferroserve-bench-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.jsonl");
        std::fs::write(
            &good,
            "{\"prompt\": \"hello there\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
        )
        .unwrap();
        let p = Prompts::load(&PromptSource::File { path: good }, 1, 0, None).unwrap();
        assert_eq!(p.pool.len(), 2);
        assert!(p.has_chat());
        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, "{\"prompt\": \"ok\"}\n{\"prompt\": \"a\", \"messages\": []}\n").unwrap();
        let err = Prompts::load(&PromptSource::File { path: bad }, 1, 0, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.jsonl:2") && err.contains("exactly one"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
