//! Rollouts judged for a fleet. The rollouts are one replicated document (`rollouts`); each version's
//! request outcomes are a shared log that every replica appends its own to at each heartbeat; and of the
//! replicas, the one that leads `judge:<model>` (a Redis lease with a fencing token) judges the rollout
//! over the whole fleet's outcomes. If it dies, its lease ends and another replica continues from the
//! recorded step. Every decision is a compare-and-set on the document that a deposed judge's older token
//! cannot pass.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferroserve_cluster::{Cluster, Replicated};
use serde::{Deserialize, Serialize};

use super::{Judging, Rollouts, Run, Status};
use crate::observe::{Observations, Sample, Summary, summarize};
use crate::pool::Pool;
use crate::traffic::Traffic;

/// Outcomes kept per version in the shared log (as each replica keeps in its own window).
const KEEP: usize = 4096;

/// The fleet side of [`Rollouts`].
pub(super) struct Shared {
    pub(super) cluster: Arc<Cluster>,
    judging: Judging,
    revision: Mutex<u64>,
    /// Runs with a judge task on this replica.
    judges: Mutex<HashSet<u64>>,
    rollouts: Weak<Rollouts>,
}

pub(super) fn parse(bytes: Option<&[u8]>) -> HashMap<String, Run> {
    bytes
        .and_then(|b| {
            serde_json::from_slice(b)
                .map_err(|e| tracing::error!(error = %e, "the fleet's rollouts do not parse; treating them as none"))
                .ok()
        })
        .unwrap_or_default()
}

pub(super) fn encode(runs: &HashMap<String, Run>) -> Vec<u8> {
    serde_json::to_vec(runs).expect("rollouts serialize")
}

impl Replicated for Rollouts {
    fn doc(&self) -> &'static str {
        "rollouts"
    }

    fn revision(&self) -> u64 {
        self.fleet
            .get()
            .map_or(0, |s| *s.revision.lock().expect("rollout lock"))
    }

    fn seed(&self) -> Option<Vec<u8>> {
        // After Redis lost its data, the running rollouts continue from this replica's copy.
        let runs = self.runs.lock().expect("rollout lock");
        (!runs.is_empty()).then(|| encode(&runs))
    }

    fn install(&self, revision: u64, bytes: &[u8]) {
        let Some(shared) = self.fleet.get() else { return };
        let runs = parse(Some(bytes));
        let running: Vec<(String, u64)> = runs
            .values()
            .filter(|r| r.status == Status::Running)
            .map(|r| (r.plan.model.clone(), r.id))
            .collect();
        *self.runs.lock().expect("rollout lock") = runs;
        *shared.revision.lock().expect("rollout lock") = revision;
        // Every replica runs a judge for every running rollout; only the leader of its model acts.
        let Some(me) = shared.rollouts.upgrade() else { return };
        let mut judges = shared.judges.lock().expect("rollout lock");
        for (model, id) in running {
            if judges.insert(id) {
                let (me, judging, cluster) = (Arc::clone(&me), shared.judging.clone(), Arc::clone(&shared.cluster));
                tokio::spawn(async move { me.control(model, id, judging, Some(cluster)).await });
            }
        }
    }
}

impl Rollouts {
    /// Judges rollouts with the fleet from now on (loading the running ones, whose judging this replica
    /// joins); keep them current with `cluster.follow_doc`.
    pub async fn join(
        self: &Arc<Self>,
        cluster: Arc<Cluster>,
        traffic: Arc<Traffic>,
        observations: Arc<Observations>,
        pool: Arc<Pool>,
    ) {
        let shared = Shared {
            cluster: Arc::clone(&cluster),
            judging: Judging {
                traffic,
                observations,
                pool,
            },
            revision: Mutex::new(0),
            judges: Mutex::default(),
            rollouts: Arc::downgrade(self),
        };
        let _ = self.fleet.set(shared);
        if let Err(e) = cluster.sync_doc(&**self).await {
            tracing::warn!(error = %e, "could not load the fleet's rollouts yet; following them from now on");
        }
    }
}

/// One request outcome as the shared log holds it.
#[derive(Serialize, Deserialize)]
struct Wire {
    /// Unix milliseconds.
    t: u64,
    f: bool,
    ttft_us: Option<u64>,
    itl_us: Option<u64>,
    b: bool,
    lp: Option<f64>,
    en: Option<f64>,
    n: u32,
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn to_wire(s: &Sample) -> Wire {
    let ago = s.at.elapsed();
    Wire {
        t: unix_ms(SystemTime::now()).saturating_sub(ago.as_millis() as u64),
        f: s.failed,
        ttft_us: s.ttft.map(|d| d.as_micros() as u64),
        itl_us: s.itl.map(|d| d.as_micros() as u64),
        b: s.filtered,
        lp: s.mean_logprob,
        en: s.mean_entropy,
        n: s.tokens,
    }
}

fn from_wire(w: Wire) -> Sample {
    Sample {
        at: super::instant_of(UNIX_EPOCH + Duration::from_millis(w.t)),
        failed: w.f,
        ttft: w.ttft_us.map(Duration::from_micros),
        itl: w.itl_us.map(Duration::from_micros),
        filtered: w.b,
        mean_logprob: w.lp,
        mean_entropy: w.en,
        tokens: w.n,
    }
}

/// The fleet's outcomes of `qualified` since `since`.
pub(super) async fn summary(cluster: &Cluster, qualified: &str, since: Instant) -> Summary {
    let entries = cluster.read_log(&format!("obs:{qualified}")).await.unwrap_or_default();
    let samples: Vec<Sample> = entries
        .iter()
        .filter_map(|e| serde_json::from_slice::<Wire>(e).ok())
        .map(from_wire)
        .filter(|s| s.at >= since)
        .collect();
    summarize(&samples)
}

/// Appends this replica's new outcomes to the fleet's logs every heartbeat, until the task is aborted.
pub async fn share_observations(observations: Arc<Observations>, cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(cluster.heartbeat_interval());
    loop {
        tick.tick().await;
        for (version, samples) in observations.take_new() {
            let entries: Vec<Vec<u8>> = samples
                .iter()
                .map(|s| serde_json::to_vec(&to_wire(s)).expect("a sample serializes"))
                .collect();
            if let Err(e) = cluster.append_log(&format!("obs:{version}"), &entries, KEEP).await {
                tracing::debug!(%version, error = %e, "outcomes not shared this time");
            }
        }
    }
}

/// `RolloutThresholds` (a protobuf message) inside the JSON document, as its encoded bytes.
pub(super) mod thresholds {
    use ferroserve_proto::v1 as pb;
    use prost::Message;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &pb::RolloutThresholds, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&t.encode_to_vec())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<pb::RolloutThresholds, D::Error> {
        let bytes = Vec::<u8>::deserialize(d)?;
        pb::RolloutThresholds::decode(bytes.as_slice()).map_err(serde::de::Error::custom)
    }
}
