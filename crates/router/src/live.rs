//! What an operator can change while the router serves: the credentials and the admission limits.
//!
//! The key store is swapped atomically (arc-swap): a request authenticates against one whole store, old or
//! new. Limits change inside the admission gate, which keeps every bucket's level across the change.

use std::sync::Arc;

use arc_swap::ArcSwap;
use ferroserve_admission::{Admission, AdmissionLimits, KeyStore};
use ferroserve_cluster::Cluster;

/// The settings a reload may change, validated.
pub struct LiveSettings {
    /// Data-plane keys and the admin credential.
    pub keys: KeyStore,
    /// Every admission limit.
    pub limits: AdmissionLimits,
}

/// Re-reads the configuration; an error names the key to fix.
pub type Reloader = Box<dyn Fn() -> Result<LiveSettings, String> + Send + Sync>;

/// The router's live-changeable state.
pub struct Live {
    /// The credentials requests are checked against now.
    keys: ArcSwap<KeyStore>,
    /// The admission gate.
    admission: Arc<Admission>,
    /// How to re-read the config; `None` when the router was built without a file.
    reload: Option<Reloader>,
    /// The fleet this replica shares tenant limits with, if any.
    cluster: Option<Arc<Cluster>>,
}

impl Live {
    /// Live state starting from these keys and this gate.
    pub fn new(keys: KeyStore, admission: Arc<Admission>, reload: Option<Reloader>) -> Arc<Live> {
        Self::in_fleet(keys, admission, reload, None)
    }

    /// [`Live::new`] for a replica of a fleet: tenant limits are decided with the others through `cluster`.
    pub fn in_fleet(
        keys: KeyStore,
        admission: Arc<Admission>,
        reload: Option<Reloader>,
        cluster: Option<Arc<Cluster>>,
    ) -> Arc<Live> {
        Arc::new(Live {
            keys: ArcSwap::from_pointee(keys),
            admission,
            reload,
            cluster,
        })
    }

    /// The fleet, when this router is one of several replicas.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// The credentials in force now.
    pub fn keys(&self) -> Arc<KeyStore> {
        self.keys.load_full()
    }

    /// The admission gate.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// Re-reads the config and applies its keys and limits. An invalid config changes nothing.
    pub fn reload(&self) -> Result<String, String> {
        let reload = self
            .reload
            .as_ref()
            .ok_or_else(|| "this router was started without a config file to reload".to_string())?;
        let settings = reload()?;
        let summary = format!(
            "{} API keys, {} tenants with limits",
            settings.keys.key_count(),
            settings.limits.tenants.len()
        );
        self.keys.store(Arc::new(settings.keys));
        self.admission.set_limits(settings.limits);
        tracing::info!(%summary, "configuration reloaded");
        Ok(summary)
    }
}
