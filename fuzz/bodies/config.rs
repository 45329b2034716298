//! Fuzz body: config parsing and validation on arbitrary text. Shared by the cargo-fuzz target and its
//! proptest mirror (crates/cli/src/config/tests.rs).
//!
//! Property: any text is either refused with an error naming a key, or becomes settings; nothing panics.

use ferroserve::config::FileConfig;

/// Parses and validates `text` as a config file.
pub fn check(text: &str) {
    match toml::from_str::<FileConfig>(text) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(file) => {
            if let Err(e) = file.validate() {
                assert!(!e.key.is_empty(), "an error without a key: {e}");
            }
        }
    }
}

/// Reads `data` as (lossy) UTF-8 text.
pub fn run(data: &[u8]) {
    check(&String::from_utf8_lossy(data));
}
