//! Where a router's workers are: fixed addresses, or a DNS name re-resolved every few seconds.
//!
//! `router.workers` takes `http://host:port` (or `https://`), a worker, and `dns://name:port`, every
//! address the name resolves to (A and AAAA records, as a Kubernetes headless Service gives one per ready
//! pod). An address that appears joins the pool once its worker answers; one that disappears leaves it,
//! its requests in flight finishing. A failed lookup changes nothing (a DNS blip must not empty the pool);
//! a name with no records at all empties its part.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ferroserve_router::Pool;
use ferroserve_worker::{RemoteWorker, WorkerClientConfig};
use hickory_resolver::config::{NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::{ResolveError, TokioResolver};
use tokio::task::JoinHandle;

/// One entry of `router.workers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerTarget {
    /// One worker at a fixed address.
    Static(String),
    /// Every address `name` resolves to, each a worker on `port`.
    Dns {
        /// The name, e.g. `ferroserve-workers.default.svc.cluster.local`.
        name: String,
        /// The workers' port.
        port: u16,
    },
}

impl WorkerTarget {
    /// Parses an entry; the message says how to write it.
    pub fn parse(entry: &str) -> Result<WorkerTarget, String> {
        if let Some(rest) = entry.strip_prefix("dns://") {
            let (name, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("`{entry}` has no port; write dns://name:port"))?;
            let port: u16 = port
                .parse()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("`{entry}`: `{port}` is not a port (1-65535)"))?;
            if name.is_empty() || name.contains('/') {
                return Err(format!("`{entry}` has no host name; write dns://name:port"));
            }
            return Ok(WorkerTarget::Dns {
                name: name.to_string(),
                port,
            });
        }
        if entry.starts_with("http://") || entry.starts_with("https://") {
            return Ok(WorkerTarget::Static(entry.to_string()));
        }
        Err(format!(
            "`{entry}` is neither a worker address (http://host:port, https://host:port) nor a DNS name \
             (dns://name:port)"
        ))
    }
}

/// How DNS names are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsSettings {
    /// How often each name is resolved again.
    pub every: Duration,
    /// The DNS server to ask; `None` for the system's (`/etc/resolv.conf`, as in a pod).
    pub server: Option<SocketAddr>,
}

/// A resolver that caches nothing (each round must see the records as they are now).
fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, ResolveError> {
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    let builder = match server {
        Some(addr) => {
            opts.use_hosts_file = ResolveHosts::Never;
            let servers = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], servers),
                TokioConnectionProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()?,
    };
    Ok(builder.with_options(opts).build())
}

/// Connects to the worker at `address` in the background, with backoff, and adds it to the pool once it
/// answers; workers may start before or after the router.
pub fn join_worker(pool: &Arc<Pool>, address: String, client: &WorkerClientConfig) -> JoinHandle<()> {
    let (pool, client) = (Arc::clone(pool), client.clone());
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match RemoteWorker::connect(&address, &client).await {
                Ok(w) => {
                    pool.add(Arc::new(w));
                    return;
                }
                Err(e) => {
                    tracing::info!(worker = %address, error = %e, retry_in = ?backoff, "worker not ready");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    })
}

/// The worker URL for an address the name resolved to.
fn worker_url(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("http://{v4}:{port}"),
        IpAddr::V6(v6) => format!("http://[{v6}]:{port}"),
    }
}

/// Keeps the pool's workers for `name` equal to what it resolves to, every `dns.every`, until the task is
/// aborted.
pub async fn follow_dns(pool: Arc<Pool>, name: String, port: u16, client: WorkerClientConfig, dns: DnsSettings) {
    let resolver = match resolver(dns.server) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(%name, error = %e, "no DNS resolver (check /etc/resolv.conf or router.dns_server); no workers from this name");
            return;
        }
    };
    // A fully qualified name: no search domains tried.
    let fqdn = if name.ends_with('.') {
        name.clone()
    } else {
        format!("{name}.")
    };
    let mut members: BTreeMap<String, JoinHandle<()>> = BTreeMap::new();
    let mut tick = tokio::time::interval(dns.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let desired: BTreeSet<String> = match resolver.lookup_ip(fqdn.as_str()).await {
            Ok(found) => found.iter().map(|ip| worker_url(ip, port)).collect(),
            Err(e) if e.is_no_records_found() => BTreeSet::new(),
            Err(e) => {
                tracing::warn!(%name, error = %e, "DNS lookup failed; keeping the workers as they are");
                continue;
            }
        };
        let gone: Vec<String> = members.keys().filter(|a| !desired.contains(*a)).cloned().collect();
        for address in gone {
            if let Some(joining) = members.remove(&address) {
                joining.abort();
            }
            pool.remove_location(&address);
            tracing::info!(%name, worker = %address, "worker left DNS; removed from the pool, its requests finish");
        }
        for address in desired {
            if let std::collections::btree_map::Entry::Vacant(slot) = members.entry(address) {
                tracing::info!(%name, worker = %slot.key(), "worker appeared in DNS");
                let joining = join_worker(&pool, slot.key().clone(), &client);
                slot.insert(joining);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_or_say_how_to_write_them() {
        assert_eq!(
            WorkerTarget::parse("dns://workers.default.svc:50061"),
            Ok(WorkerTarget::Dns {
                name: "workers.default.svc".into(),
                port: 50061
            })
        );
        assert_eq!(
            WorkerTarget::parse("http://10.0.0.1:50061"),
            Ok(WorkerTarget::Static("http://10.0.0.1:50061".into()))
        );
        for bad in [
            "dns://workers",
            "dns://:80",
            "dns://w:0",
            "dns://w:x",
            "tcp://w:1",
            "w:1",
        ] {
            let e = WorkerTarget::parse(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert_eq!(worker_url("::1".parse().unwrap(), 5), "http://[::1]:5");
    }
}
