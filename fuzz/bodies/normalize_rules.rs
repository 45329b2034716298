//! Fuzz body: normalization and the default rules filter on arbitrary text. Shared by the cargo-fuzz target
//! and its proptest mirror (crates/filter/tests/fuzz_mirror.rs).
//!
//! Properties: nothing panics; normalized text has no invisible characters, no whitespace but single
//! spaces between words; the rules give the same verdict twice.

use std::sync::OnceLock;

use ferroserve_filter::normalize::normalize;
use ferroserve_filter::{FilterConfig, RulesFilter};

/// The shipped default filter's rules, compiled once.
pub fn rules() -> &'static RulesFilter {
    static R: OnceLock<RulesFilter> = OnceLock::new();
    R.get_or_init(|| {
        let text = include_str!("../../configs/filters/default.toml");
        let config = FilterConfig::parse(text, "default.toml").expect("the default filter parses");
        RulesFilter::compile("default@fuzz", &config.rules).expect("its rules compile")
    })
}

/// Normalizes and judges `text`.
pub fn check(text: &str) {
    let n = normalize(text);
    assert!(!n.starts_with(' ') && !n.ends_with(' ') && !n.contains("  "), "{n:?}");
    assert!(
        !n.chars().any(|c| c != ' ' && c.is_whitespace()),
        "whitespace other than single spaces in {n:?}"
    );
    assert!(
        !n.chars().any(|c| matches!(c, '\u{200b}' | '\u{feff}' | '\u{00ad}')),
        "an invisible character survived in {n:?}"
    );
    let first = rules().check_normalized(&n);
    assert_eq!(first, rules().check_normalized(&n), "the rules are not deterministic");
}

/// Reads `data` as (lossy) UTF-8 text.
pub fn run(data: &[u8]) {
    check(&String::from_utf8_lossy(data));
}
