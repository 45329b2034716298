//! How long a tenant-limit decision takes: the local gate alone against the fleet's Redis script plus the
//! gate, one request at a time and with 64 at once, against a real `redis-server` on 127.0.0.1.
//!
//! `cargo bench -p ferroserve-cluster --bench decision` prints a Markdown table (µs).

#[path = "../../../tests/support/redis.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroserve_admission::{
    Admission, AdmissionLimits, Admitted, Ask, Priority, ServerLimits, Tenant, TenantLimits, rate,
};
use ferroserve_cluster::{Cluster, ClusterConfig};
use hdrhistogram::Histogram;

const DECISIONS: usize = 20_000;

fn gate() -> Arc<Admission> {
    let mut limits = AdmissionLimits {
        server: ServerLimits {
            shared: TenantLimits {
                max_in_flight: Some(100_000),
                ..TenantLimits::default()
            },
            ..ServerLimits::default()
        },
        ..AdmissionLimits::default()
    };
    let tenant = TenantLimits {
        requests: Some(rate(1e6, Duration::from_secs(1), Some(1_000_000), "r").unwrap()),
        tokens: Some(rate(1e9, Duration::from_secs(60), Some(1_000_000_000), "t").unwrap()),
        max_in_flight: Some(100_000),
    };
    limits.tenants.insert("bench".into(), tenant);
    Admission::new(limits)
}

fn ask() -> Ask {
    Ask {
        tenant: Tenant::new("bench", Priority::Interactive),
        tokens: 300,
        max_tokens: 200,
        deadline: None,
    }
}

/// One decision: the fleet's reservation (when there is a fleet), then the gate; the permit is settled
/// and dropped at once, as a request that ends would be.
async fn decide(gate: &Arc<Admission>, cluster: Option<&Arc<Cluster>>) -> Duration {
    let started = Instant::now();
    let (scope, ticket) = match cluster {
        Some(c) => {
            let r = c.reserve("bench", 300).await.expect("admitted");
            (r.scope, r.ticket)
        }
        None => (ferroserve_admission::Scope::Local, None),
    };
    let Ok(Admitted::Now(mut permit)) = gate.admit_in(ask(), scope) else {
        panic!("admitted")
    };
    let took = started.elapsed();
    if let Some(t) = ticket {
        permit.on_finish(t.into_hook());
    }
    permit.settle(250, None);
    took
}

async fn measure(gate: &Arc<Admission>, cluster: Option<&Arc<Cluster>>, concurrency: usize) -> Histogram<u64> {
    let mut hist = Histogram::<u64>::new(3).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let gate = Arc::clone(gate);
        let cluster = cluster.cloned();
        tasks.push(tokio::spawn(async move {
            let mut took = Vec::with_capacity(DECISIONS / concurrency);
            for _ in 0..DECISIONS / concurrency {
                took.push(decide(&gate, cluster.as_ref()).await);
            }
            took
        }));
    }
    for t in tasks {
        for d in t.await.unwrap() {
            hist.record(d.as_nanos() as u64).unwrap();
        }
    }
    hist
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let redis = redis_server::Redis::start().await;
        let local = gate();
        let shared = gate();
        let cluster = Cluster::start(ClusterConfig::new(redis.url()), Arc::clone(&shared))
            .await
            .unwrap();
        println!("| decision | concurrent | p50 µs | p99 µs | p99.9 µs |");
        println!("|---|---|---|---|---|");
        for concurrency in [1, 64] {
            // Warm up both paths (script cache, connection, allocator).
            measure(&local, None, concurrency).await;
            measure(&shared, Some(&cluster), concurrency).await;
            for (name, gate, cluster) in [("local gate", &local, None), ("Redis + gate", &shared, Some(&cluster))] {
                let h = measure(gate, cluster, concurrency).await;
                let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
                println!(
                    "| {name} | {concurrency} | {:.1} | {:.1} | {:.1} |",
                    us(0.5),
                    us(0.99),
                    us(0.999)
                );
            }
        }
        drop(cluster);
        redis.kill().await;
    });
}
