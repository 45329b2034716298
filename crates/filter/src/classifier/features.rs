//! The head's input: the sentence embedding, followed by hashed word n-grams of the normalized text, then
//! (where the config asks for them) hashed character n-grams of its words.
//!
//! The embedding carries the topic and the gist; the word n-grams carry the small words that turn a topic
//! into a request or into a question about defence ("without getting caught", "so that he", "how do banks
//! detect"), which mean-pooled embeddings blur. The character n-grams (3 to 5 characters of each word,
//! with its edges marked) carry what words share across spellings, typos and the languages the English
//! encoder does not know ("explosif", "explosivo", "Sprengstoff" share little with each other, but
//! "veneno" and "venenoso", or "bomba" and "bombe", share their stems). Everything is hashed (FNV-1a, so
//! the same text gives the same features on every machine) into fixed numbers of buckets, and each part
//! is scaled to unit length, like the embedding.

/// Hashes a byte string (FNV-1a, 64-bit).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A text's n-gram vector is scaled to unit length, but never by less than this: a text of one or two
/// words must not put all its weight on one or two (collision-prone) buckets.
const MIN_NORM: f32 = 2.828_427; // sqrt(8): as if the text had at least 8 distinct n-grams

/// The n-gram part of the features: `buckets` values, unit length for a text of 8 or more distinct
/// n-grams, shorter for fewer (all zero for a text with no words).
pub fn ngrams(normalized: &str, buckets: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; buckets];
    if buckets == 0 {
        return v;
    }
    let words: Vec<&str> = words(normalized).collect();
    let mut hit = |s: &str| v[(fnv1a(s.as_bytes()) % buckets as u64) as usize] = 1.0;
    for (i, w) in words.iter().enumerate() {
        hit(w);
        if let Some(next) = words.get(i + 1) {
            hit(&format!("{w} {next}"));
        }
    }
    scale(v)
}

/// The words of a normalized text, as the n-grams see them.
fn words(normalized: &str) -> impl Iterator<Item = &str> {
    normalized
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
}

/// Scales `v` to unit length, but never by less than [`MIN_NORM`].
fn scale(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(MIN_NORM);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// Shortest and longest character n-gram.
const CHAR_GRAMS: std::ops::RangeInclusive<usize> = 3..=5;

/// The character n-gram part: every 3- to 5-character piece of every word written `<word>` (so a piece
/// at a word's edge differs from the same letters inside one), hashed into `buckets`, scaled as
/// [`ngrams`] is.
pub fn char_ngrams(normalized: &str, buckets: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; buckets];
    if buckets == 0 {
        return v;
    }
    for word in words(normalized) {
        let marked = format!("<{word}>");
        let bounds: Vec<usize> = marked.char_indices().map(|(i, _)| i).chain([marked.len()]).collect();
        for n in CHAR_GRAMS {
            for w in bounds.windows(n + 1) {
                v[(fnv1a(&marked.as_bytes()[w[0]..w[n]]) % buckets as u64) as usize] = 1.0;
            }
        }
    }
    scale(v)
}

/// The head's input layout after the embedding: how many buckets the word and the character n-grams
/// take (0 leaves a part out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Layout {
    /// Hashed words and word pairs.
    pub word_buckets: usize,
    /// Hashed character n-grams of the words.
    pub char_buckets: usize,
}

impl Layout {
    /// The head's input for one window: its embedding, then its word n-grams, then its character
    /// n-grams.
    pub fn features(&self, embedding: Vec<f32>, normalized: &str) -> Vec<f32> {
        let mut x = embedding;
        x.extend(ngrams(normalized, self.word_buckets));
        if self.char_buckets > 0 {
            x.extend(char_ngrams(normalized, self.char_buckets));
        }
        x
    }

    /// Inputs after the embedding.
    pub fn width(&self) -> usize {
        self.word_buckets + self.char_buckets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngrams_are_stable_unit_length_and_see_word_pairs() {
        let a = ngrams("how do i get caught without a trace", 4096);
        assert_eq!(a, ngrams("how do i get caught without a trace", 4096), "deterministic");
        assert!(
            (a.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5,
            "8+ n-grams: unit length"
        );
        let hi = ngrams("hi", 4096);
        assert!(
            (hi.iter().map(|x| x * x).sum::<f32>().sqrt() - 1.0 / MIN_NORM).abs() < 1e-5,
            "one word is not amplified"
        );
        assert_ne!(
            ngrams("without getting caught", 4096),
            ngrams("caught without getting", 4096),
            "order matters"
        );
        assert!(ngrams("", 8).iter().all(|&x| x == 0.0));
        let layout = Layout {
            word_buckets: 4,
            char_buckets: 0,
        };
        assert_eq!(layout.features(vec![0.5; 3], "x").len(), 7);
    }

    #[test]
    fn char_ngrams_share_stems_across_spellings_and_mark_word_edges() {
        let a = char_ngrams("explosivo", 4096);
        let b = char_ngrams("explosive", 4096);
        let shared: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!(shared > 0.5, "a shared stem: cosine {shared}");
        assert!((a.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5, "unit length");
        assert_ne!(
            char_ngrams("cat", 4096),
            char_ngrams("cats", 4096),
            "the edge is marked"
        );
        assert_eq!(
            char_ngrams("naïve café", 64),
            char_ngrams("naïve café", 64),
            "multi-byte words"
        );
        let layout = Layout {
            word_buckets: 8,
            char_buckets: 16,
        };
        assert_eq!(layout.features(vec![0.5; 3], "some words").len(), 3 + 24);
        assert_eq!(layout.width(), 24);
    }
}
