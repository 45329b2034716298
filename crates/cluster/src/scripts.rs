//! The Lua scripts that make each shared decision one atomic round trip. Time is Redis's own (`TIME`), so
//! replicas with skewed clocks still agree; every key expires once it carries no state.
//!
//! Every script's first argument is a clock override in microseconds, for tests on a fake clock; 0 (always,
//! in production) means Redis's `TIME`.
//!
//! Keys, for tenant `t` under the prefix `p`:
//! - `p:{t}:rq` and `p:{t}:tk`: the theoretical arrival time (GCRA) of the request and token buckets, in
//!   microseconds since the epoch;
//! - `p:{t}:inflight`: a hash from replica id to the requests that replica holds for the tenant;
//! - `p:replicas`: a sorted set from replica id to the end of its lease, in milliseconds.

use std::sync::LazyLock;

use redis::Script;

/// Shared helpers: the clock and one GCRA bucket.
const PRELUDE: &str = r"
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function tat_of(key)
  local v = redis.call('GET', key)
  if v then return tonumber(v) end
  return 0
end
local function store(key, tat)
  if tat <= now then
    redis.call('DEL', key)
  else
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  end
end
";

/// Admits one request, all or nothing: the in-flight cap, then a request cell, then the token reservation.
///
/// KEYS: requests bucket, tokens bucket, in-flight hash, replicas set.
/// ARGV: clock, request interval (µs, fractional; 0 = no limit), request burst, token interval (µs, 0 =
/// none), token burst, tokens to reserve, in-flight cap (0 = none), replica id. The in-flight count goes up
/// by one (HINCRBY: writes from one replica's concurrent requests commute; the heartbeat restates the
/// total).
/// Returns `{code, wait µs}`: 0 admitted, 1 requests, 2 tokens, 3 concurrency, 4 more tokens than the
/// bucket holds.
const RESERVE: &str = r"
local function over(key, interval, burst, n)
  if interval <= 0 or n <= 0 then return nil, 0 end
  local tat = math.max(tat_of(key), now)
  local next = tat + n * interval
  local wait = next - now - burst * interval
  if wait > 0 then return wait, 0 end
  return nil, next
end
local cap = tonumber(ARGV[7])
if cap > 0 then
  local held = 0
  local ms = math.floor(now / 1000)
  local h = redis.call('HGETALL', KEYS[3])
  for i = 1, #h, 2 do
    local lease = tonumber(redis.call('ZSCORE', KEYS[4], h[i]) or '0')
    if h[i] == ARGV[8] or lease >= ms then
      held = held + tonumber(h[i + 1])
    else
      redis.call('HDEL', KEYS[3], h[i])
    end
  end
  if held >= cap then return {3, 0} end
end
local tokens = tonumber(ARGV[6])
if tonumber(ARGV[4]) > 0 and tokens > tonumber(ARGV[5]) then return {4, 0} end
local rwait, rnext = over(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3]), 1)
if rwait then return {1, math.ceil(rwait)} end
local twait, tnext = over(KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[5]), tokens)
if twait then return {2, math.ceil(twait)} end
if rnext > 0 then store(KEYS[1], rnext) end
if tnext > 0 then store(KEYS[2], tnext) end
if cap > 0 then redis.call('HINCRBY', KEYS[3], ARGV[8], 1) end
return {0, 0}
";

/// Settles a reservation: moves the token bucket by the unused (refund) or overdrawn (charge) tokens,
/// gives back the request cell of a request that never ran, and records the replica's holdings.
///
/// KEYS: requests bucket, tokens bucket, in-flight hash.
/// ARGV: clock, request interval (µs, 0 = none), cells to refund, token interval (µs, 0 = none), tokens to
/// move (positive: refund; negative: charge), replica id, 1 if the reservation counted an in-flight slot.
const SETTLE: &str = r"
local rint = tonumber(ARGV[2])
if rint > 0 and tonumber(ARGV[3]) > 0 then
  local tat = tat_of(KEYS[1])
  if tat > 0 then store(KEYS[1], tat - tonumber(ARGV[3]) * rint) end
end
local tint = tonumber(ARGV[4])
local delta = tonumber(ARGV[5])
if tint > 0 and delta > 0 then
  local tat = tat_of(KEYS[2])
  if tat > 0 then store(KEYS[2], tat - delta * tint) end
elseif tint > 0 and delta < 0 then
  store(KEYS[2], math.max(tat_of(KEYS[2]), now) - delta * tint)
end
if ARGV[7] == '1' then
  local left = redis.call('HINCRBY', KEYS[3], ARGV[6], -1)
  if left <= 0 then redis.call('HDEL', KEYS[3], ARGV[6]) end
end
return 0
";

/// Renews the replica's lease, drops expired ones, restates the replica's holdings per tenant (so that they
/// converge after Redis lost them), and counts the live replicas.
///
/// KEYS: replicas set, then one in-flight hash per tenant. ARGV: clock, replica id, lease (ms), then one
/// holding per in-flight hash.
const HEARTBEAT: &str = r"
local ms = math.floor(now / 1000)
redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[3]), ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms - 1)
for i = 2, #KEYS do
  local n = tonumber(ARGV[i + 2])
  if n > 0 then redis.call('HSET', KEYS[i], ARGV[2], n) else redis.call('HDEL', KEYS[i], ARGV[2]) end
end
return redis.call('ZCARD', KEYS[1])
";

/// Takes the replica out of the fleet at shutdown: its lease and its holdings.
///
/// KEYS: replicas set, then the in-flight hashes. ARGV: clock (unused), replica id.
const LEAVE: &str = r"
redis.call('ZREM', KEYS[1], ARGV[2])
for i = 2, #KEYS do redis.call('HDEL', KEYS[i], ARGV[2]) end
return 0
";

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

pub(crate) static RESERVE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(RESERVE));
pub(crate) static SETTLE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(SETTLE));
pub(crate) static HEARTBEAT_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(HEARTBEAT));
pub(crate) static LEAVE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(LEAVE));
