//! The inputs the fuzzers found crashes with, kept in `fuzz/regressions/<target>/` once fixed: every mirror
//! runs them again on each test run.

use std::path::Path;

/// The saved inputs of `target`, in file-name order.
pub fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read(&p).expect("read a regression input"),
            )
        })
        .collect()
}
