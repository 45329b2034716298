//! Versions loaded and unloaded while serving. The router does not know how to build an engine (that is the
//! binary's business, and the dependencies point the other way), so a server that can load models hands it
//! a [`VersionLoader`]. The registry remembers each load's state for `ListVersions`/`GetTraffic`.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferroserve_core::{Backend, GenerationDefaults, VersionId};
use ferroserve_proto::v1 as pb;
use futures::future::BoxFuture;

/// What to load.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadSpec {
    /// Model name.
    pub name: String,
    /// The new version's label.
    pub version: String,
    /// The GGUF file.
    pub path: PathBuf,
    /// Its system prompt, sampling and stop strings; each one left empty keeps the server's.
    pub defaults: GenerationDefaults,
}

/// Where a load reports the fraction of its weights read (0 to 1).
pub type Progress = Arc<dyn Fn(f32) + Send + Sync>;

/// Builds a worker for a version (an in-process engine, in `ferroserve serve`).
pub trait VersionLoader: Send + Sync {
    /// Loads `spec` (off the async threads), reporting progress; the error says what to fix.
    fn load(&self, spec: LoadSpec, progress: Progress) -> BoxFuture<'static, Result<Arc<dyn Backend>, String>>;
}

/// Where a version stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Its weights are being read: `percent` done.
    Loading {
        /// 0 to 100.
        percent: u8,
    },
    /// A worker serves it.
    Ready,
    /// Disabled, with requests in flight finishing.
    Draining,
    /// Disabled (the kill switch), nothing in flight.
    Disabled,
    /// Its load failed; nothing else changed.
    Failed(String),
    /// Unloaded, or never served.
    Unloaded,
}

impl Phase {
    /// The wire enum, the load progress and the failure.
    pub fn to_wire(&self) -> (pb::VersionPhase, u32, String) {
        match self {
            Phase::Loading { percent } => (pb::VersionPhase::Loading, u32::from(*percent), String::new()),
            Phase::Ready => (pb::VersionPhase::Ready, 100, String::new()),
            Phase::Draining => (pb::VersionPhase::Draining, 100, String::new()),
            Phase::Disabled => (pb::VersionPhase::Disabled, 100, String::new()),
            Phase::Failed(why) => (pb::VersionPhase::Failed, 0, why.clone()),
            Phase::Unloaded => (pb::VersionPhase::Unloaded, 0, String::new()),
        }
    }
}

/// The words of `VersionState.state`: `loading 37 %`, `ready`, `draining`, `disabled`, `failed: why`,
/// `unloaded`.
impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Loading { percent } => write!(f, "loading {percent} %"),
            Phase::Ready => f.write_str("ready"),
            Phase::Draining => f.write_str("draining"),
            Phase::Disabled => f.write_str("disabled"),
            Phase::Failed(why) => write!(f, "failed: {why}"),
            Phase::Unloaded => f.write_str("unloaded"),
        }
    }
}

/// Load phases by version.
#[derive(Default)]
pub struct Registry {
    states: Mutex<HashMap<VersionId, Phase>>,
}

impl Registry {
    /// Records `phase` for `version`.
    pub fn set(&self, version: &VersionId, phase: Phase) {
        self.states
            .lock()
            .expect("registry lock")
            .insert(version.clone(), phase);
    }

    /// The recorded phase of `version`, if it was ever loaded or unloaded here.
    pub fn get(&self, version: &VersionId) -> Option<Phase> {
        self.states.lock().expect("registry lock").get(version).cloned()
    }

    /// Versions of `name` with a recorded phase.
    pub fn versions(&self, name: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .states
            .lock()
            .expect("registry lock")
            .keys()
            .filter(|k| k.name == name)
            .map(|k| k.version.clone())
            .collect();
        v.sort();
        v
    }
}
