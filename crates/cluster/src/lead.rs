//! Leadership and shared logs: one replica leads a role (a rollout's judge) under a lease with a fencing
//! token, and every replica appends to, and reads, bounded logs (each version's request outcomes).

use std::sync::LazyLock;

use redis::Script;

use crate::doc::DocError;
use crate::fleet::Cluster;

/// Takes or renews the lead of a role. KEYS: the role's key, the fencing counter. ARGV: replica id, lease
/// (ms). Returns the leader's fencing token if this replica leads, else 0.
static LEAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local owner, token = string.match(cur, '^(.*) (%d+)$')
  if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(token)
  end
  return 0
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. token, 'PX', ARGV[2])
return token
",
    )
});

impl Cluster {
    /// Leads `role` if no live replica does: `Some(token)` while this replica leads, the token rising with
    /// every new leader (a fencing token: a write carrying an older one is from a deposed leader). The lease
    /// lasts `cluster.lease_ms`, renewed by each call; a leader that stops calling loses it then.
    pub async fn lead(&self, role: &str) -> Option<u64> {
        let mut conn = self.connection()?;
        let prefix = &self.config.key_prefix;
        let mut call = LEAD.prepare_invoke();
        call.key(format!("{prefix}:lead:{role}"))
            .key(format!("{prefix}:lead:fence"))
            .arg(&self.replica)
            .arg(self.config.lease.as_millis() as u64);
        let token = tokio::time::timeout(crate::doc::DOC_TIMEOUT, call.invoke_async::<u64>(&mut conn)).await;
        match token {
            Ok(Ok(t)) if t > 0 => Some(t),
            _ => None,
        }
    }

    /// Appends `entries` to the log `name`, keeping its last `keep` entries (for an hour after the last
    /// append).
    pub async fn append_log(&self, name: &str, entries: &[Vec<u8>], keep: usize) -> Result<(), DocError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut conn = self
            .connection()
            .ok_or_else(|| DocError::Unreachable("this replica is degraded".into()))?;
        let key = format!("{}:log:{name}", self.config.key_prefix);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .rpush(&key, entries)
            .ignore()
            .ltrim(&key, -(keep as isize), -1)
            .ignore()
            .pexpire(&key, 3_600_000)
            .ignore();
        match tokio::time::timeout(crate::doc::DOC_TIMEOUT, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(DocError::Unreachable(e.to_string())),
            Err(_) => Err(DocError::Unreachable("no answer in time".into())),
        }
    }

    /// Every entry of the log `name`, oldest first.
    pub async fn read_log(&self, name: &str) -> Result<Vec<Vec<u8>>, DocError> {
        let mut conn = self
            .connection()
            .ok_or_else(|| DocError::Unreachable("this replica is degraded".into()))?;
        let key = format!("{}:log:{name}", self.config.key_prefix);
        let mut cmd = redis::cmd("LRANGE");
        cmd.arg(&key).arg(0).arg(-1);
        match tokio::time::timeout(crate::doc::DOC_TIMEOUT, cmd.query_async::<Vec<Vec<u8>>>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(DocError::Unreachable(e.to_string())),
            Err(_) => Err(DocError::Unreachable("no answer in time".into())),
        }
    }
}
