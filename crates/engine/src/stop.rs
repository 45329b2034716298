//! Stop strings over streamed text. A stop string can span token boundaries, so text that could be the
//! start of one is held back until the next token settles it.

/// Finds stop strings in a growing text and decides what is safe to release.
#[derive(Debug, Default)]
pub struct StopMatcher {
    /// The request's stop strings, all non-empty.
    stops: Vec<String>,
    /// Generated text not yet released: a possible prefix of a stop string.
    held: String,
}

/// What to do after a piece of text arrives.
#[derive(Debug, PartialEq, Eq)]
pub struct StopCheck {
    /// Text safe to send now.
    pub release: String,
    /// True when a stop string appeared; generation ends and nothing after `release` is sent.
    pub stopped: bool,
}

impl StopMatcher {
    /// A matcher for these stop strings (empty strings are ignored).
    pub fn new(stops: &[String]) -> StopMatcher {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Adds newly decoded text.
    pub fn push(&mut self, piece: &str) -> StopCheck {
        self.held.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let release = self.held[..at].to_string();
            self.held.clear();
            return StopCheck { release, stopped: true };
        }
        let keep = self.longest_partial_suffix();
        let cut = self.held.len() - keep;
        let release = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopCheck {
            release,
            stopped: false,
        }
    }

    /// Releases whatever is still held, at the end of a generation that did not stop on a string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of some stop string.
    fn longest_partial_suffix(&self) -> usize {
        let max = self
            .stops
            .iter()
            .map(|s| s.len() - 1)
            .max()
            .unwrap_or(0)
            .min(self.held.len());
        (1..=max)
            .rev()
            .filter(|&n| self.held.is_char_boundary(self.held.len() - n))
            .find(|&n| {
                let suffix = &self.held[self.held.len() - n..];
                self.stops.iter().any(|s| s.starts_with(suffix))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let c = m.push(p);
            out.push_str(&c.release);
            if c.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_inside_one_piece() {
        assert_eq!(feed(&["END"], &["hello END world"]), ("hello ".into(), true));
    }

    #[test]
    fn stop_spanning_pieces_is_caught_and_not_leaked() {
        let stops = vec!["\n\nUser:".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("Paris.\n").release, "Paris.");
        assert_eq!(m.push("\nUs").release, "");
        let c = m.push("er: next");
        assert!(c.stopped);
        assert_eq!(c.release, "");
    }

    #[test]
    fn false_start_is_released() {
        assert_eq!(
            feed(&["STOP"], &["ST", "ART and more"]),
            ("START and more".into(), false)
        );
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(feed(&["b", "a"], &["xxab"]), ("xx".into(), true));
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        assert_eq!(feed(&["é!"], &["caf", "é", "é!"]), ("café".into(), true));
        assert_eq!(feed(&["日本"], &["今日", "は"]), ("今日は".into(), false));
    }

    #[test]
    fn no_stops_releases_everything_at_once() {
        let mut m = StopMatcher::new(&[]);
        assert_eq!(m.push("abc").release, "abc");
        assert_eq!(m.finish(), "");
    }
}
