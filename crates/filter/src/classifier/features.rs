//! The head's input: the sentence embedding, followed by hashed word n-grams of the normalized text.
//!
//! The embedding carries the topic and the gist; the n-grams carry the small words that turn a topic into
//! a request or into a question about defence ("without getting caught", "so that he", "how do banks
//! detect"), which mean-pooled embeddings blur. Words and adjacent pairs are hashed (FNV-1a, so the same
//! text gives the same features on every machine) into a fixed number of buckets, and the vector is scaled
//! to unit length, like the embedding.

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
    let words: Vec<&str> = normalized
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .collect();
    let mut hit = |s: &str| v[(fnv1a(s.as_bytes()) % buckets as u64) as usize] = 1.0;
    for (i, w) in words.iter().enumerate() {
        hit(w);
        if let Some(next) = words.get(i + 1) {
            hit(&format!("{w} {next}"));
        }
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(MIN_NORM);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// The head's input for one window: its embedding, then its n-grams.
pub fn features(embedding: Vec<f32>, normalized: &str, buckets: usize) -> Vec<f32> {
    let mut x = embedding;
    x.extend(ngrams(normalized, buckets));
    x
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
        assert_eq!(features(vec![0.5; 3], "x", 4).len(), 7);
    }
}
