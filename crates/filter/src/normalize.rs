//! Text as the rules see it: NFKC, lower case, invisible characters removed, and the common tricks that
//! hide a word undone ("b.o.m.b", "k1ll", "ｂｏｍｂ", a Cyrillic "о" inside a Latin word).
//!
//! Normalization never inserts spaces, so word boundaries in the normalized text are the author's.

use unicode_normalization::UnicodeNormalization;

/// Characters that render as nothing and split a word for a naive matcher.
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00ad}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}' | '\u{feff}'
    )
}

/// A digit or symbol standing in for a letter inside a word ("h4ck", "$teal", "k1ll").
fn leet(c: char) -> Option<char> {
    Some(match c {
        '0' => 'o',
        '1' | '!' | '|' => 'i',
        '3' => 'e',
        '4' | '@' => 'a',
        '5' | '$' => 's',
        '7' => 't',
        _ => return None,
    })
}

/// The Latin letter a Cyrillic or Greek look-alike stands for (lower case, after NFKC).
fn homoglyph(c: char) -> Option<char> {
    Some(match c {
        'а' | 'α' => 'a',
        'в' | 'β' => 'b',
        'с' | 'ϲ' => 'c',
        'е' | 'ε' => 'e',
        'һ' => 'h',
        'і' | 'ι' => 'i',
        'ј' => 'j',
        'к' | 'κ' => 'k',
        'м' => 'm',
        'н' | 'η' => 'n',
        'о' | 'ο' | 'σ' => 'o',
        'р' | 'ρ' => 'p',
        'ѕ' => 's',
        'т' | 'τ' => 't',
        'υ' => 'u',
        'ѵ' | 'ν' => 'v',
        'ш' | 'ω' => 'w',
        'х' | 'χ' => 'x',
        'у' | 'γ' => 'y',
        _ => return None,
    })
}

/// Folds look-alike letters into Latin in a word that mixes them with Latin letters ("bоmb" with a
/// Cyrillic о); a word wholly in another script is that language, and stays.
fn fold_homoglyphs(word: &str) -> String {
    if !word.chars().any(|c| c.is_ascii_alphabetic()) {
        return word.to_string();
    }
    word.chars().map(|c| homoglyph(c).unwrap_or(c)).collect()
}

/// Undoes leetspeak inside words ("h4ck", "k1ll", "l33t", "$teal"): a stand-in is replaced only between
/// letters (or other stand-ins), or for `$`/`@` next to a letter, so "mp3", "ipv4", "3d" and "world!" stay.
fn unleet(word: &str) -> String {
    let chars: Vec<char> = word.chars().collect();
    let wordish = |i: usize| chars.get(i).is_some_and(|c| c.is_alphabetic() || leet(*c).is_some());
    let letter = |i: usize| chars.get(i).is_some_and(|c| c.is_alphabetic());
    chars
        .iter()
        .enumerate()
        .map(|(i, &c)| match leet(c) {
            Some(l) if i > 0 && wordish(i - 1) && wordish(i + 1) && (letter(i - 1) || letter(i + 1)) => l,
            Some(l) if matches!(c, '$' | '@') && ((i > 0 && letter(i - 1)) || letter(i + 1)) => l,
            _ => c,
        })
        .collect()
}

/// Joins single letters spelled out with separators: "b.o.m.b" and "b o m b" become "bomb" (three letters
/// or more, so "a b test" is left alone).
fn join_spelled(text: &str) -> String {
    let tokens: Vec<&str> = text.split(' ').collect();
    let mut out: Vec<String> = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        // Dotted or dashed spelling inside one token: "b.o.m.b", "k-i-l-l".
        let t = tokens[i];
        let parts: Vec<&str> = t.split(['.', '-', '_', '*']).collect();
        if parts.len() >= 3
            && parts
                .iter()
                .all(|p| p.chars().count() == 1 && p.chars().all(char::is_alphabetic))
        {
            out.push(parts.concat());
            i += 1;
            continue;
        }
        // Spaced spelling across tokens: "b o m b".
        let mut j = i;
        while j < tokens.len() && tokens[j].chars().count() == 1 && tokens[j].chars().all(char::is_alphabetic) {
            j += 1;
        }
        // "a" and "i" are words of their own: "make a b o m b" keeps its article.
        if j - i >= 4 && matches!(tokens[i], "a" | "i") {
            out.push(tokens[i].to_string());
            i += 1;
        }
        if j - i >= 3 {
            out.push(tokens[i..j].concat());
            i = j;
        } else {
            out.push(t.to_string());
            i += 1;
        }
    }
    out.join(" ")
}

/// The normalized form of `text`.
pub fn normalize(text: &str) -> String {
    let folded: String = text
        .nfkc()
        .filter(|c| !invisible(*c))
        .collect::<String>()
        .to_lowercase();
    let spaced: String = folded
        .chars()
        .map(|c| if c.is_whitespace() { ' ' } else { c })
        .collect::<String>()
        .split(' ')
        .filter(|w| !w.is_empty())
        .map(|w| unleet(&fold_homoglyphs(w)))
        .collect::<Vec<_>>()
        .join(" ");
    join_spelled(&spaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn look_alike_letters_inside_latin_words_are_folded_but_other_scripts_stay() {
        assert_eq!(normalize("how to make a b\u{043e}mb"), "how to make a bomb");
        assert_eq!(
            normalize("\u{0441}\u{043e}\u{043a}"),
            "\u{0441}\u{043e}\u{043a}",
            "a Russian word stays Russian"
        );
    }

    #[test]
    fn simple_obfuscation_is_undone() {
        assert_eq!(normalize("How to build a B.O.M.B"), "how to build a bomb");
        assert_eq!(normalize("make a b o m b now"), "make a bomb now");
        assert_eq!(normalize("k1ll  my n3ighbor"), "kill my neighbor");
        assert_eq!(normalize("ｂｏｍｂ"), "bomb", "full-width letters fold under NFKC");
        assert_eq!(normalize("bo\u{200b}mb"), "bomb", "zero-width space removed");
        assert_eq!(normalize("r@ns0mware"), "ransomware");
    }

    #[test]
    fn ordinary_text_keeps_its_numbers_and_words() {
        assert_eq!(normalize("3D print 2 parts in 2024"), "3d print 2 parts in 2024");
        assert_eq!(normalize("An A B test"), "an a b test");
        assert_eq!(normalize("Hello, World!"), "hello, world!");
    }
}
