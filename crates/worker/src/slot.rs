//! A backend that arrives after the server is up: servers bind first and report NOT_SERVING while the
//! model loads, so health checks and load balancers see the truth during a slow start.

use std::sync::{Arc, OnceLock};

use ferroserve_core::Backend;

/// Holds the backend once it is ready. Cheap to clone; all clones see the same backend.
#[derive(Clone, Default)]
pub struct BackendSlot {
    /// Set once, when loading finishes.
    inner: Arc<OnceLock<Arc<dyn Backend>>>,
}

impl BackendSlot {
    /// An empty slot.
    pub fn new() -> BackendSlot {
        BackendSlot::default()
    }

    /// Installs the backend. Returns false if one was already installed.
    pub fn fill(&self, backend: Arc<dyn Backend>) -> bool {
        self.inner.set(backend).is_ok()
    }

    /// The backend, if it is ready.
    pub fn get(&self) -> Option<&Arc<dyn Backend>> {
        self.inner.get()
    }
}
