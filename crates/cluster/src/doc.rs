//! Shared control documents: a replicated value (the traffic policy, for one) stored whole in Redis with a
//! revision number, changed only by compare-and-set, announced by pub/sub, and acknowledged by every
//! replica that applied it.
//!
//! Keys for document `d` under the prefix `p`: `p:doc:d` (the bytes), `p:doc:d:rev` (its revision, 0 when
//! never written), `p:doc:d:acks` (replica id -> the revision it applied), and the channel `p:doc:d`.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use redis::Script;

use crate::fleet::Cluster;

/// Sets the document if its revision is still the expected one; announces the new revision.
///
/// KEYS: doc, rev. ARGV: expected revision, bytes, channel. Returns `{1, new}` or `{0, current}`.
static CAS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if cur ~= tonumber(ARGV[1]) then return {0, cur} end
redis.call('SET', KEYS[1], ARGV[2])
local new = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[3], new)
return {1, new}
",
    )
});

/// The live replicas that have not yet acknowledged a revision.
///
/// KEYS: replicas set, acks hash. ARGV: revision. Returns the lagging replica ids.
static LAGGING: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], ms, '+inf')
local out = {}
for _, r in ipairs(live) do
  local a = tonumber(redis.call('HGET', KEYS[2], r) or '0')
  if a < tonumber(ARGV[1]) then table.insert(out, r) end
end
return out
",
    )
});

/// The longest one read or write of a document waits: these are operators' changes and background
/// syncs, not the request path, so they can wait out a busy Redis.
pub(crate) const DOC_TIMEOUT: Duration = Duration::from_secs(2);
/// Compare-and-set attempts before a change gives up under contention.
const ATTEMPTS: usize = 16;
/// How long a change waits for every live replica to apply it.
const APPLY_WITHIN: Duration = Duration::from_secs(2);

/// A value every replica keeps a copy of, replicated through one document.
pub trait Replicated: Send + Sync + 'static {
    /// The document's name.
    fn doc(&self) -> &'static str;
    /// The revision this replica's copy is at (0: never shared).
    fn revision(&self) -> u64;
    /// This replica's copy, to seed a fleet that has none (a first start, or a Redis that lost its data);
    /// `None` when there is nothing worth seeding.
    fn seed(&self) -> Option<Vec<u8>>;
    /// Takes `bytes` at `revision` as this replica's copy.
    fn install(&self, revision: u64, bytes: &[u8]);
}

/// Why a shared document could not be read or written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DocError {
    /// Redis did not answer: the change was not made, anywhere.
    #[error("the fleet's shared store (Redis) is unreachable ({0}); nothing was changed, retry when it is back")]
    Unreachable(String),
}

/// The outcome of a compare-and-set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cas {
    /// Written: the new revision.
    Written(u64),
    /// Someone else wrote first: the revision now.
    Conflict(u64),
}

impl Cluster {
    fn doc_key(&self, doc: &str) -> String {
        format!("{}:doc:{doc}", self.config.key_prefix)
    }

    /// The pub/sub channel a document's new revisions are announced on.
    pub fn doc_channel(&self, doc: &str) -> String {
        self.doc_key(doc)
    }

    fn shared_connection(&self) -> Result<redis::aio::MultiplexedConnection, DocError> {
        self.connection()
            .ok_or_else(|| DocError::Unreachable("this replica is degraded".into()))
    }

    /// The document's revision and bytes (`None` when never written).
    pub async fn load_doc(&self, doc: &str) -> Result<(u64, Option<Vec<u8>>), DocError> {
        let mut conn = self.shared_connection()?;
        let key = self.doc_key(doc);
        let mut cmd = redis::cmd("MGET");
        cmd.arg(format!("{key}:rev")).arg(&key);
        let read = cmd.query_async::<(Option<u64>, Option<Vec<u8>>)>(&mut conn);
        match tokio::time::timeout(DOC_TIMEOUT, read).await {
            Ok(Ok((rev, bytes))) => Ok((rev.unwrap_or(0), bytes)),
            Ok(Err(e)) => Err(DocError::Unreachable(e.to_string())),
            Err(_) => Err(DocError::Unreachable("no answer in time".into())),
        }
    }

    /// The document's revision alone (0 when never written).
    pub async fn doc_revision(&self, doc: &str) -> Result<u64, DocError> {
        let mut conn = self.shared_connection()?;
        let mut cmd = redis::cmd("GET");
        cmd.arg(format!("{}:rev", self.doc_key(doc)));
        let read = cmd.query_async::<Option<u64>>(&mut conn);
        match tokio::time::timeout(DOC_TIMEOUT, read).await {
            Ok(Ok(rev)) => Ok(rev.unwrap_or(0)),
            Ok(Err(e)) => Err(DocError::Unreachable(e.to_string())),
            Err(_) => Err(DocError::Unreachable("no answer in time".into())),
        }
    }

    /// Writes `bytes` if the document is still at `expected`.
    pub async fn compare_and_set(&self, doc: &str, expected: u64, bytes: &[u8]) -> Result<Cas, DocError> {
        let mut conn = self.shared_connection()?;
        let key = self.doc_key(doc);
        let mut call = CAS.prepare_invoke();
        call.key(&key)
            .key(format!("{key}:rev"))
            .arg(expected)
            .arg(bytes)
            .arg(&key);
        match tokio::time::timeout(DOC_TIMEOUT, call.invoke_async::<(i64, u64)>(&mut conn)).await {
            Ok(Ok((1, new))) => Ok(Cas::Written(new)),
            Ok(Ok((_, now))) => Ok(Cas::Conflict(now)),
            Ok(Err(e)) => Err(DocError::Unreachable(e.to_string())),
            Err(_) => Err(DocError::Unreachable("no answer in time".into())),
        }
    }

    /// Records that this replica applied `revision` of the document.
    pub async fn ack_doc(&self, doc: &str, revision: u64) {
        let Ok(mut conn) = self.shared_connection() else { return };
        let mut cmd = redis::cmd("HSET");
        cmd.arg(format!("{}:acks", self.doc_key(doc)))
            .arg(&self.replica)
            .arg(revision);
        let write = cmd.query_async::<i64>(&mut conn);
        let _ = tokio::time::timeout(DOC_TIMEOUT, write).await;
    }

    /// Waits (polling, at most `within`) until every live replica has applied `revision`; returns the
    /// replicas still lagging when the time ran out (empty: all applied).
    pub async fn wait_applied(&self, doc: &str, revision: u64, within: Duration) -> Vec<String> {
        let until = Instant::now() + within;
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        let mut lagging = Vec::new();
        while Instant::now() < until {
            tick.tick().await;
            let Ok(mut conn) = self.shared_connection() else {
                continue;
            };
            let mut call = LAGGING.prepare_invoke();
            call.key(format!("{}:replicas", self.config.key_prefix))
                .key(format!("{}:acks", self.doc_key(doc)))
                .arg(revision);
            let read = call.invoke_async::<Vec<String>>(&mut conn);
            if let Ok(Ok(l)) = tokio::time::timeout(DOC_TIMEOUT, read).await {
                if l.is_empty() {
                    return l;
                }
                lagging = l;
            }
        }
        lagging
    }

    /// A connection that receives the document's announcements (a new one: pub/sub holds its connection).
    pub async fn subscribe_doc(&self, doc: &str) -> Result<redis::aio::PubSub, DocError> {
        let connect = self.client().get_async_pubsub();
        let mut pubsub = match tokio::time::timeout(self.config.heartbeat, connect).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Err(DocError::Unreachable(e.to_string())),
            Err(_) => return Err(DocError::Unreachable("connecting timed out".into())),
        };
        match tokio::time::timeout(DOC_TIMEOUT, pubsub.subscribe(self.doc_channel(doc))).await {
            Ok(Ok(())) => Ok(pubsub),
            Ok(Err(e)) => Err(DocError::Unreachable(e.to_string())),
            Err(_) => Err(DocError::Unreachable("subscribing timed out".into())),
        }
    }
}

impl Cluster {
    /// Changes a replicated value for the whole fleet: `edit` turns the latest document (`None`: never
    /// written) into the new one, or `None` to change nothing; on a conflict it is applied again to the newer
    /// revision. The new revision is installed here, then waited on (bounded) until every live replica has
    /// applied it. Returns what `edit` returned.
    pub async fn commit_doc<D: Replicated, R>(
        &self,
        value: &D,
        edit: impl Fn(Option<&[u8]>) -> Option<(Vec<u8>, R)>,
    ) -> Result<Option<R>, DocError> {
        let doc = value.doc();
        for _ in 0..ATTEMPTS {
            let (revision, bytes) = self.load_doc(doc).await?;
            let Some((next, out)) = edit(bytes.as_deref()) else {
                return Ok(None);
            };
            if let Cas::Written(new) = self.compare_and_set(doc, revision, &next).await? {
                value.install(new, &next);
                self.ack_doc(doc, new).await;
                let lagging = self.wait_applied(doc, new, APPLY_WITHIN).await;
                if !lagging.is_empty() {
                    tracing::warn!(
                        doc,
                        revision = new,
                        ?lagging,
                        "change committed, but these replicas have not applied it yet"
                    );
                }
                return Ok(Some(out));
            }
        }
        Err(DocError::Unreachable(format!(
            "{ATTEMPTS} attempts lost to concurrent changes"
        )))
    }

    /// Brings `value` up to the fleet's revision (seeding the fleet from it when the fleet has none), and
    /// acknowledges the revision applied.
    pub async fn sync_doc<D: Replicated>(&self, value: &D) -> Result<(), DocError> {
        let doc = value.doc();
        let revision = self.doc_revision(doc).await?;
        if revision == 0
            && let Some(seed) = value.seed()
            && let Cas::Written(new) = self.compare_and_set(doc, 0, &seed).await?
        {
            tracing::info!(
                doc,
                revision = new,
                "the fleet had no copy: seeded it with this replica's"
            );
            value.install(new, &seed);
            self.ack_doc(doc, new).await;
            return Ok(());
        }
        // Revisions only rise, unless Redis lost the document (then the fleet's revision is below ours).
        let lost = revision < value.revision();
        if revision != value.revision() {
            let (revision, bytes) = self.load_doc(doc).await?;
            // A commit of ours may have installed a newer revision since the read: never go back to an
            // older one, save after a loss.
            if let Some(b) = bytes
                && (revision > value.revision() || lost)
            {
                value.install(revision, &b);
            }
        }
        self.ack_doc(doc, value.revision()).await;
        Ok(())
    }

    /// Keeps `value` at the fleet's revision until the task is aborted: follows the announcements, and
    /// checks the revision every heartbeat whether or not one came.
    pub async fn follow_doc<D: Replicated>(self: Arc<Self>, value: Arc<D>) {
        use futures::StreamExt;
        let doc = value.doc();
        let mut tick = tokio::time::interval(self.heartbeat_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let _ = self.sync_doc(&*value).await;
            let mut messages = self
                .subscribe_doc(doc)
                .await
                .ok()
                .map(redis::aio::PubSub::into_on_message);
            loop {
                let message = async {
                    match messages.as_mut() {
                        Some(m) => m.next().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    m = message => {
                        if m.is_none() {
                            break; // the subscription dropped: resubscribe
                        }
                        let _ = self.sync_doc(&*value).await;
                    }
                    _ = tick.tick() => {
                        if self.sync_doc(&*value).await.is_err() || messages.is_none() {
                            break;
                        }
                    }
                }
            }
            // Before resubscribing, wait a heartbeat, so that an unreachable Redis is not hammered.
            tick.tick().await;
        }
    }
}
