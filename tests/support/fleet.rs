//! A fleet on 127.0.0.1 for the whole-system tests: a real `redis-server`, real workers and several
//! `ferroserve router` processes sharing state through Redis (`--redis-url`), with the tenants, filters
//! and admin credential the fleet tests use.

use std::path::PathBuf;
use std::time::Duration;

use ferroserve_admission::sha256_hex;
use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::admin_client::AdminClient;
use ferroserve_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;

use super::procs::{Proc, spawn};
use super::redis::Redis;
use super::{WAIT, client, model_path, wait_serving};

pub const ADMIN: &str = "fleet-admin-token";
/// 3 requests per second, burst 3, at most 2 in flight.
pub const CAPPED: &str = "fleet-key-capped";
/// Limits far above anything the test sends.
pub const ROOMY: &str = "fleet-key-roomy";
/// 1200 tokens per minute (20 a second), burst 100; no request limit to speak of.
pub const METERED: &str = "fleet-key-metered";
pub const TOKENS_PER_SECOND: f64 = 20.0;
pub const TOKEN_BURST: u32 = 100;
pub const RATE: f64 = 3.0;
pub const BURST: u32 = 3;

fn config(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("fleet.toml");
    // Two rules-only filter configs, `strict` enforcing at start.
    let filters = dir.join("filters");
    std::fs::create_dir_all(&filters).unwrap();
    for name in ["strict", "lenient"] {
        let rules = "[[rules.categories]]\nname = \"test\"\naction = \"block\"\npatterns = ['\\bforbidden\\b']\n";
        let text = format!("name = \"{name}\"\nversion = \"1\"\n\n{rules}");
        std::fs::write(filters.join(format!("{name}.toml")), text).unwrap();
    }
    let text = format!(
        r#"
[admission]
max_in_flight = 16
max_queued_requests = 64

[auth]
admin_token_sha256 = "{admin}"

[[auth.keys]]
tenant = "capped"
key_sha256 = "{capped}"
requests_per_second = {RATE}
request_burst = {BURST}
max_in_flight = 2

[[auth.keys]]
tenant = "metered"
key_sha256 = "{metered}"
requests_per_second = 1000.0
tokens_per_minute = 1200.0
token_burst = {TOKEN_BURST}

[[auth.keys]]
tenant = "roomy"
key_sha256 = "{roomy}"
requests_per_second = 1000.0
tokens_per_minute = 10000000.0
max_in_flight = 100

[filter]
dir = "{filters}"
active = "strict"
enabled = true
watch_interval_secs = 0

[cluster]
heartbeat_ms = 100
lease_ms = 1000
# Generous for a loaded 2-core test machine; production keeps the default 50 ms.
timeout_ms = 500
"#,
        admin = sha256_hex(ADMIN),
        capped = sha256_hex(CAPPED),
        roomy = sha256_hex(ROOMY),
        metered = sha256_hex(METERED),
        filters = filters.display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

pub fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

pub struct Fleet {
    dir: PathBuf,
    config: PathBuf,
    url: Option<String>,
    pub workers: Vec<Proc>,
    pub routers: Vec<Proc>,
}

impl Fleet {
    /// `replicas` routers in front of one worker, sharing `redis` (or each on its own without it).
    pub async fn start(redis: Option<&Redis>, replicas: usize) -> Fleet {
        Self::start_with(redis, replicas, &[None]).await
    }

    /// `replicas` routers in front of one worker per entry of `versions` (the same model file, served
    /// under that version label, or the default one for `None`).
    pub async fn start_with(redis: Option<&Redis>, replicas: usize, versions: &[Option<&str>]) -> Fleet {
        let tag = redis.map_or(0, |r| r.port);
        let dir = std::env::temp_dir().join(format!("ferroserve-fleet-{}-{tag}-{replicas}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = config(&dir);
        let model = model_path();
        let loopback = ["--listen", "127.0.0.1:0", "--metrics-listen", ""];
        let mut workers = Vec::new();
        for version in versions {
            let mut args = vec!["worker", "--model-path", model.to_str().unwrap()];
            if let Some(v) = version {
                args.extend(["--model-version", v]);
            }
            workers.push(spawn(&[&args[..], &loopback].concat()).await);
        }
        let mut routers = Vec::new();
        let url = redis.map(Redis::url);
        for _ in 0..replicas {
            let mut args = vec!["router", "--config", config.to_str().unwrap()];
            for w in &workers {
                args.extend(["--worker", w.url.as_str()]);
            }
            if let Some(url) = &url {
                args.extend(["--redis-url", url.as_str()]);
            }
            routers.push(spawn(&[&args[..], &loopback].concat()).await);
        }
        for r in &routers {
            wait_serving(&r.url).await;
            until_healthy_workers(&r.url, workers.len()).await;
        }
        let fleet = Fleet {
            dir,
            config,
            url,
            workers,
            routers,
        };
        if redis.is_some() {
            fleet
                .until_every(|f| f.mode == pb::FleetMode::Shared as i32 && f.replicas == replicas as u32)
                .await;
        }
        fleet
    }

    /// Starts one more router like the others; returns its index.
    pub async fn add_router(&mut self) -> usize {
        let mut args = vec!["router", "--config", self.config.to_str().unwrap()];
        for w in &self.workers {
            args.extend(["--worker", w.url.as_str()]);
        }
        if let Some(url) = &self.url {
            args.extend(["--redis-url", url.as_str()]);
        }
        let loopback = ["--listen", "127.0.0.1:0", "--metrics-listen", ""];
        let router = spawn(&[&args[..], &loopback].concat()).await;
        wait_serving(&router.url).await;
        until_healthy_workers(&router.url, self.workers.len()).await;
        self.routers.push(router);
        self.routers.len() - 1
    }

    pub async fn admin(&self, i: usize) -> AdminClient<Channel> {
        AdminClient::connect(self.routers[i].url.clone()).await.unwrap()
    }

    pub async fn clients(&self) -> Vec<InferenceClient<Channel>> {
        let mut out = Vec::new();
        for r in &self.routers {
            out.push(client(&r.url).await);
        }
        out
    }

    pub async fn fleet_state(&self, i: usize) -> pb::FleetState {
        let mut admin = AdminClient::connect(self.routers[i].url.clone()).await.unwrap();
        let limits = admin
            .get_limits(with_key(pb::GetLimitsRequest {}, ADMIN))
            .await
            .expect("GetLimits")
            .into_inner();
        limits.fleet.expect("a fleet replica reports its fleet")
    }

    /// Polls (bounded) until every replica's fleet state satisfies `done`.
    pub async fn until_every(&self, done: impl Fn(&pb::FleetState) -> bool) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut last = Vec::new();
        let reached = tokio::time::timeout(WAIT, async {
            loop {
                tick.tick().await;
                last.clear();
                for i in 0..self.routers.len() {
                    last.push(self.fleet_state(i).await);
                }
                if last.iter().all(&done) {
                    return;
                }
            }
        })
        .await;
        assert!(
            reached.is_ok(),
            "the fleet never reached the state; last seen: {last:?}"
        );
    }
}

/// Polls the router's workers (bounded) until `n` are healthy in its pool.
async fn until_healthy_workers(url: &str, n: usize) {
    let mut admin = AdminClient::connect(url.to_string()).await.unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let joined = tokio::time::timeout(WAIT, async {
        loop {
            tick.tick().await;
            let list = admin
                .list_workers(with_key(pb::ListWorkersRequest {}, ADMIN))
                .await
                .expect("ListWorkers")
                .into_inner();
            if list.workers.iter().filter(|w| w.healthy).count() >= n {
                return;
            }
        }
    })
    .await;
    assert!(joined.is_ok(), "{n} workers never joined {url}");
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
