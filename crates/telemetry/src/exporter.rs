//! The Prometheus exposition: one process-wide recorder, rendered per scrape. The `/metrics` listener
//! itself is server plumbing (ferroserve-net), so that it gets the same limits and TLS as every other.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::names;

/// How often histograms are compacted between scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle) and describes
/// every metric. Must be called inside a tokio runtime, which runs its upkeep.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new();
            for (name, buckets) in names::HISTOGRAM_BUCKETS {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full((*name).to_string()), buckets)
                    .expect("bucket lists in names.rs are non-empty");
            }
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            names::describe();
            let upkeep = handle.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(UPKEEP_INTERVAL).await;
                    upkeep.run_upkeep();
                }
            });
            handle
        })
        .clone()
}

/// The exposition text of one scrape: every metric, then the cost figures.
pub fn render() -> String {
    let mut text = install().render();
    text.push_str(&crate::cost::render());
    text
}
