//! A model version's identity, `name@version`: the one place that form is spelled and parsed.

use std::fmt;

/// One version of one model.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VersionId {
    /// The model's name.
    pub name: String,
    /// The version's label.
    pub version: String,
}

impl VersionId {
    /// `name@version`.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> VersionId {
        VersionId {
            name: name.into(),
            version: version.into(),
        }
    }

    /// Reads `name@version` (split at the last `@`); `None` without an `@` or with an empty side.
    pub fn parse(s: &str) -> Option<VersionId> {
        let (name, version) = s.rsplit_once('@')?;
        (!name.is_empty() && !version.is_empty()).then(|| VersionId::new(name, version))
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_id_round_trips_through_its_text() {
        let id = VersionId::new("smollm2", "q4_1");
        assert_eq!(id.to_string(), "smollm2@q4_1");
        assert_eq!(VersionId::parse("smollm2@q4_1"), Some(id));
        assert_eq!(VersionId::parse("a@b@c"), Some(VersionId::new("a@b", "c")));
        for bad in ["plain", "@v", "n@", ""] {
            assert_eq!(VersionId::parse(bad), None, "{bad}");
        }
    }
}
