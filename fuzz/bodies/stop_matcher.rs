//! Fuzz body: the stop matcher over arbitrary stop strings and arbitrary splits of the text. Shared by
//! the cargo-fuzz target and its proptest mirror (crates/engine/tests/fuzz_mirror.rs).
//!
//! Property: whatever the pieces, the released text is exactly the text before the earliest stop string,
//! or all of it when none occurs, and nothing after a stop is released.

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
    let text: String = pieces.concat();
    let first = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min();
    match first {
        Some(at) => {
            assert!(stopped, "a stop string occurs at {at} but generation did not stop");
            assert_eq!(out, text[..at], "released text past or short of the stop");
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
