//! Versions loaded and unloaded while serving. The router does not know how to build an engine (that is the
//! binary's business, and the dependencies point the other way), so a server that can load models hands it
//! a [`VersionLoader`]. The registry remembers each load's state for `ListVersions`/`GetTraffic`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferroserve_core::{Backend, GenerationDefaults};
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

/// Load states by `name@version`.
#[derive(Default)]
pub struct Registry {
    states: Mutex<HashMap<String, String>>,
}

impl Registry {
    /// Records `state` for `qualified`.
    pub fn set(&self, qualified: &str, state: impl Into<String>) {
        self.states
            .lock()
            .expect("registry lock")
            .insert(qualified.to_string(), state.into());
    }

    /// The recorded state of `qualified`, if it was ever loaded or unloaded here.
    pub fn get(&self, qualified: &str) -> Option<String> {
        self.states.lock().expect("registry lock").get(qualified).cloned()
    }

    /// Versions of `name` with a recorded state.
    pub fn versions(&self, name: &str) -> Vec<String> {
        let prefix = format!("{name}@");
        let mut v: Vec<String> = self
            .states
            .lock()
            .expect("registry lock")
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
            .collect();
        v.sort();
        v
    }
}
