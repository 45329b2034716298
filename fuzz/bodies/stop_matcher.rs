//! Fuzz body: the stop matcher over arbitrary stop strings and arbitrary splits of the text. Shared by
//! the cargo-fuzz target and its proptest mirror (crates/engine/tests/fuzz_mirror.rs).
//!
//! Property: generation stops at the first piece after which the text holds a stop string, and what was
//! released is exactly the text before the earliest occurrence in it (or all of the text when no stop ever
//! occurs); nothing after a stop is released. (A stop that would only complete in a later piece does not
//! count: the generation never produces that piece. The fuzzer found the first version of this property
//! wrong on exactly that: stops "\u{FFFD}" and "D\u{FFFD}\u{FFFD}\u{FFFD}", text "D\u{FFFD}\u{FFFD}" then more.)

use ferroserve_engine::stop::StopMatcher;

/// Feeds `pieces` through a matcher for `stops` and compares with the whole text.
pub fn check(stops: &[String], pieces: &[String]) {
    let mut matcher = StopMatcher::new(stops);
    let mut out = String::new();
    let mut stopped = false;
    for p in pieces {
        let c = matcher.push(p);
        out.push_str(&c.release);
        if c.stopped {
            stopped = true;
            break;
        }
    }
    if !stopped {
        out.push_str(&matcher.finish());
    }
    // The reference: the text piece by piece, stopping at the first piece after which a stop occurs.
    let mut text = String::new();
    let mut expected = None;
    for p in pieces {
        text.push_str(p);
        let first = stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min();
        if let Some(at) = first {
            expected = Some(text[..at].to_string());
            break;
        }
    }
    match expected {
        Some(before) => {
            assert!(stopped, "a stop string occurs but generation did not stop");
            assert_eq!(out, before, "released text past or short of the stop");
        }
        None => {
            assert!(!stopped);
            assert_eq!(out, text, "text was lost or invented");
        }
    }
}

/// Reads `data` as text: the first byte says how many stop strings (0..4), then fields split at 0x01.
pub fn run(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    let mut fields = text.split('\u{1}').map(str::to_string);
    let stops: Vec<String> = fields.by_ref().take(usize::from(n % 5)).collect();
    let pieces: Vec<String> = fields.collect();
    check(&stops, &pieces);
}
