//! Progress bars for model fetching, on stderr.

use std::sync::Mutex;

use ferroserve_model::fetch::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// Draws one bar (or spinner) per fetch phase.
#[derive(Default)]
pub struct Bars {
    /// The current phase's bar.
    current: Mutex<Option<ProgressBar>>,
}

impl Progress for Bars {
    fn begin(&self, phase: &str, total: Option<u64>) {
        let bar = match total {
            Some(n) => ProgressBar::new(n).with_style(
                ProgressStyle::with_template("{msg:40} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            ),
            None => ProgressBar::new_spinner(),
        };
        bar.set_message(phase.to_string());
        eprintln!("{phase}...");
        if let Some(old) = self.current.lock().expect("progress lock").replace(bar) {
            old.finish_and_clear();
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(bar) = &*self.current.lock().expect("progress lock") {
            bar.inc(bytes);
        }
    }

    fn end(&self, message: &str) {
        if let Some(bar) = self.current.lock().expect("progress lock").take() {
            bar.finish_and_clear();
        }
        eprintln!("{message}");
    }
}
