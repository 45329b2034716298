//! Telemetry as a side channel: every metric name and histogram bucket set is a constant here
//! ([`names`]), described once at start-up; the Prometheus exposition ([`exporter`]); token drift
//! ([`drift`]) and cost ([`cost`]); and logging set-up. Crates record through the `metrics` facade and
//! never spell a metric name at the call site.
#![forbid(unsafe_code)]

pub mod cost;
pub mod drift;
pub mod exporter;
pub mod names;

pub use names::describe;

/// Sets up `tracing` logs on stderr, filtered by `RUST_LOG` (default `info`). Safe to call twice.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
