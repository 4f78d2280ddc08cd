//! The per-user refresh lock: `SET NX PX` with a random owner, extended only
//! by its owner, released by compare-and-delete. Each grant also draws the
//! next fence from the user's record, so a holder whose lock expired cannot
//! overwrite the token of a holder that came after it (see `cache.rs`).
//!
//! Taking the lock is folded into one script with reading the cache: a
//! fresh token there is returned instead, so "read the cache, else lock"
//! costs one round trip, and no token can land between the read and the lock.
//! The same script applies the restart guard (`health.rs`) before granting.

use once_cell::sync::Lazy;
use redis::aio::ConnectionLike;
use redis::{RedisResult, Script, Value};

use super::health;
use super::keys::UserKeys;
use super::record::{Lease, Record};
use super::seal;
use crate::engine::EpochMs;

/// A random owner id: 128 bits, hex. Not a secret, only unguessable enough
/// that no other holder ever has the same one.
pub fn new_owner() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// What the cache-or-lock script found.
#[derive(Debug, PartialEq, Eq)]
pub enum Acquire {
    /// A usable token is cached (by the rule in [`Want`]).
    Cached(Record),
    /// The lock is ours; `stale` is what the cache held (a token too old to
    /// hand out, whose refresh token may still be the newest one).
    Locked { lease: Lease, stale: Option<Record> },
    /// Someone else holds the lock for this many more ms, with this fence
    /// (the last one granted; 0 if unknown): a failure notice for an
    /// older fence is not that holder's.
    Busy { lock_ttl_ms: u64, fence: u64 },
    /// The restart guard (`health.rs`) holds refresh-token locks back on
    /// this server for [`Answer::guard_ms`] more, longer than the caller
    /// can wait.
    Guarded,
    /// The guard ends within what the caller can wait: the lock is held
    /// for it meanwhile (so callers after it queue behind it, as for any
    /// lock). Ask again with [`Guard::reclaim`] after [`Answer::guard_ms`].
    HeldThroughGuard,
}

/// The script's answer, with what it learnt about the server.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub found: Acquire,
    /// The restart marker's identity (`health::Epoch::saw`), when the
    /// script checked it (only before a grant); else empty.
    pub server: String,
    /// How long the restart guard still holds refresh-token locks back (ms);
    /// 0 when it does not, or when the call asked for no guard.
    pub guard_ms: u64,
}

/// Which cached token the script may return rather than lock: newer than
/// `min_expires_at`, not the one fenced `skip_fence` (found unusable) nor
/// one `invalidate` marked, and
/// either fresh (`expires_at > fresh_after`, or beyond half its lifetime
/// from when it was written when that is less: the engine's buffer rule) or
/// written after `recent_after` and unexpired at `now` (the engine's
/// double-check rule).
#[derive(Debug, Clone, Copy)]
pub struct Want<'a> {
    /// The presented token's fingerprint (`seal::fingerprint`), or "": the
    /// cached token may be that same token, and do if it is fresh by its
    /// lifetime (the caller did not know it).
    pub presented: &'a str,
    pub min_expires_at: EpochMs,
    pub fresh_after: EpochMs,
    pub recent_after: EpochMs,
    pub now: EpochMs,
    pub skip_fence: u64,
}

/// The restart guard's part of a lock request (`health.rs`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Guard<'a> {
    /// The marker key.
    pub marker: &'a str,
    /// The marker identity this instance saw last (`health::Epoch::known`), or "".
    pub known: &'a str,
    /// The grace and settle this refresh observes (0, 0: none).
    pub grace_ms: u64,
    pub settle_ms: u64,
    /// The refresh sends the caller's refresh token: no lock while guarded
    /// (held through the guard, if it ends within `can_wait_ms`). Otherwise
    /// the lock is granted and `guard_ms` tells the caller not to hand a
    /// cached refresh token over.
    pub sends_refresh_token: bool,
    pub can_wait_ms: u64,
    /// The owner already holds the lock through a guard: asking again.
    pub reclaim: bool,
}

/// Every field read defensively: a record garbled by hand, by another
/// program or by an older version (a field missing or not a number, the key
/// not a hash) is a miss for that user, never a script error, which would
/// read as "Redis failed" for every user.
static ACQUIRE: Lazy<Script> = Lazy::new(|| {
    Script::new(&format!(
        "{}{}",
        health::EPOCH_LUA,
        r"
-- The lock is already ours: held through the restart guard, asked again.
local mine = ARGV[14] == '1' and redis.pcall('GET', KEYS[2]) == ARGV[1]
local function letgo()
  if mine then
    redis.call('DEL', KEYS[2])
    redis.call('PUBLISH', ARGV[15], ARGV[16])
  end
end
local r = redis.pcall('HMGET', KEYS[1], 'f', 'e', 'w', 't', 'n', 'x', 'h')
if r.err then redis.call('DEL', KEYS[1]) r = {} end
local f, e, w, t, n = tonumber(r[1]), tonumber(r[2]), tonumber(r[3]), r[4], tonumber(r[5])
-- A fence is a whole number an integer reply carries as it is; any other
-- (negative, fractional, NaN, past 2^53) is garbage, so no cached token:
-- it would come back changed, and skipping it would skip another fence.
if f and not (f >= 0 and f < 2^53 and f == math.floor(f)) then f = nil end
-- Longer than any sealed token: garbage (or an attack on the readers), a
-- miss, and never sent back.
if type(t) ~= 'string' or #t > tonumber(ARGV[17]) then t = nil end
-- Fresh: beyond the buffer, or beyond half its lifetime (expiry minus when
-- it was written) when that is shorter (Policy::buffer_for).
local now = tonumber(ARGV[6])
local function fresh()
  if e > tonumber(ARGV[4]) then return true end
  return w ~= nil and e - now > math.min(tonumber(ARGV[4]) - now, math.floor((e - w) / 2))
end
local same = ARGV[18] ~= '' and r[7] == ARGV[18]
if t and f and e and f ~= tonumber(ARGV[7]) and f ~= tonumber(r[6])
  and ((e > tonumber(ARGV[3]) and (fresh() or (w and w > tonumber(ARGV[5]) and e > now)))
    or (same and fresh())) then
  letgo()
  return {1, '', 0, f, w or 0, t, e}
end
if not mine then
  local held = redis.call('PTTL', KEYS[2])
  -- A lock without an expiry was not set by a holder (ours always have
  -- one): it lapses like theirs would, rather than block the user for good.
  if held == -1 then
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
    held = tonumber(ARGV[2])
  end
  if held >= 0 then return {3, '', 0, held, n or 0} end
end
-- Only a grant needs the restart guard (and pays for its INFO).
local server, left = epoch(KEYS[3], ARGV[9], tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[6])
if left > 0 and ARGV[12] == '1' then
  if left <= tonumber(ARGV[13]) then
    redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
    return {5, server, left}
  end
  letgo()
  return {4, server, left}
end
if mine then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
elseif not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {3, server, left, 0}
end
-- The next fence: above the counter and above the record's own fence (a
-- counter lost with a restart, or garbled, must not hand out an old one).
if not n or not (n >= 0 and n < 2^53 and n == math.floor(n)) then n = 0 end
if f and f > n then n = math.floor(f) end
n = n + 1
redis.call('HSET', KEYS[1], 'n', n)
-- The fence counter must outlive every holder still refreshing.
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[8]) then redis.call('PEXPIRE', KEYS[1], ARGV[8]) end
if t then return {2, server, left, n, f or 0, w or 0, t, e or 0} end
return {2, server, left, n}
"
    ))
});

/// Extends the lock if it is still ours. If it is gone (lost with a
/// restart, or lapsed while Redis was unreachable) and nobody took it, it
/// is taken back, and the fence counter raised to ours so that later grants
/// still draw newer fences.
static EXTEND: Lazy<Script> = Lazy::new(|| {
    Script::new(
        r"
local cur = redis.pcall('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('PTTL', KEYS[1]) ~= -2 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local n = redis.pcall('HGET', KEYS[2], 'n')
if type(n) ~= 'table' and (tonumber(n) or 0) < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[2], 'n', ARGV[3])
  if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
end
return 2
",
    )
});

const RELEASE_LUA: &str = r"
if redis.pcall('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
";

static RELEASE: Lazy<Script> = Lazy::new(|| Script::new(RELEASE_LUA));

/// Returns a usable cached token, or takes the lock, or says who has it, or
/// that the restart guard holds the lock back. `counter_ttl_ms` keeps the
/// fence counter alive at least that long. `released`: the signed
/// `Notice::Released` published if a lock held through a guard is let go.
#[allow(clippy::too_many_arguments)]
pub async fn acquire(
    con: &mut impl ConnectionLike,
    keys: &UserKeys,
    channel: &str,
    owner: &str,
    lock_ttl_ms: u64,
    counter_ttl_ms: u64,
    want: Want<'_>,
    guard: Guard<'_>,
    released: &[u8],
) -> RedisResult<Answer> {
    let v: Vec<Value> = ACQUIRE
        .key(&keys.record)
        .key(&keys.lock)
        .key(guard.marker)
        .arg(owner)
        .arg(lock_ttl_ms)
        .arg(want.min_expires_at)
        .arg(want.fresh_after)
        .arg(want.recent_after)
        .arg(want.now)
        .arg(want.skip_fence)
        .arg(counter_ttl_ms)
        .arg(guard.known)
        .arg(guard.grace_ms)
        .arg(guard.settle_ms)
        .arg(if guard.sends_refresh_token { "1" } else { "0" })
        .arg(guard.can_wait_ms)
        .arg(if guard.reclaim { "1" } else { "0" })
        .arg(channel)
        .arg(released)
        .arg(seal::MAX_SEALED_BYTES)
        .arg(want.presented)
        .invoke_async(con)
        .await?;
    let bad = || {
        redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "unexpected acquire script reply",
        ))
    };
    let int = |i: usize| match v.get(i) {
        Some(Value::Int(n)) => Ok(*n),
        _ => Err(bad()),
    };
    let record = |at: usize| -> RedisResult<Record> {
        match v.get(at + 2) {
            Some(Value::BulkString(sealed)) => Ok(Record {
                fence: int(at)?.max(0) as u64,
                written_at: int(at + 1)?,
                expires_at: int(at + 3)?,
                sealed: sealed.clone(),
            }),
            _ => Err(bad()),
        }
    };
    let server = match v.get(1) {
        Some(Value::BulkString(identity)) => String::from_utf8_lossy(identity).into_owned(),
        _ => return Err(bad()),
    };
    let guard_ms = int(2)?.max(0) as u64;
    let found = match int(0)? {
        1 => Acquire::Cached(record(3)?),
        2 => Acquire::Locked {
            lease: Lease {
                owner: owner.to_owned(),
                fence: int(3)?.max(0) as u64,
                unkeyed_fence: None,
            },
            stale: if v.len() > 4 { Some(record(4)?) } else { None },
        },
        3 => Acquire::Busy {
            lock_ttl_ms: int(3)?.max(0) as u64,
            fence: int(4).unwrap_or(0).max(0) as u64,
        },
        4 => Acquire::Guarded,
        5 => Acquire::HeldThroughGuard,
        _ => return Err(bad()),
    };
    Ok(Answer {
        found,
        server,
        guard_ms,
    })
}

/// What an extension found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extended {
    /// Still ours: its expiry was pushed out.
    Held,
    /// It was gone and nobody had it: ours again.
    Retaken,
    /// Someone else holds it.
    Lost,
}

/// Pushes the lock's expiry out by `ttl_ms` if `lease` still holds it, or
/// takes it back if it is free (see [`EXTEND`]). `counter_ttl_ms` as for
/// [`acquire`].
pub async fn extend(
    con: &mut impl ConnectionLike,
    keys: &UserKeys,
    lease: &Lease,
    ttl_ms: u64,
    counter_ttl_ms: u64,
) -> RedisResult<Extended> {
    let n: i64 = EXTEND
        .key(&keys.lock)
        .key(&keys.record)
        .arg(&lease.owner)
        .arg(ttl_ms)
        .arg(lease.fence)
        .arg(counter_ttl_ms)
        .invoke_async(con)
        .await?;
    Ok(match n {
        1 => Extended::Held,
        2 => Extended::Retaken,
        _ => Extended::Lost,
    })
}

/// Gives up a lock a call that gave up on Redis (a stall) may still be
/// granted: sent right behind that call, so a stalled server runs it right
/// after the grant. The script is loaded in the same pipeline: a bare
/// `EVALSHA` that meets a server without it needs a second round trip,
/// which a stalled server would not answer before the caller stopped
/// waiting. (`SCRIPT LOAD` has no key: on a cluster the pipeline goes where
/// the lock's key does.)
pub async fn abandon(
    con: &mut impl ConnectionLike,
    keys: &UserKeys,
    channel: &str,
    owner: &str,
    released: &[u8],
) -> RedisResult<bool> {
    let (n,): (i64,) = redis::pipe()
        .cmd("SCRIPT")
        .arg("LOAD")
        .arg(RELEASE_LUA)
        .ignore()
        .cmd("EVALSHA")
        .arg(RELEASE.get_hash())
        .arg(1)
        .arg(&keys.lock)
        .arg(owner)
        .arg(channel)
        .arg(released)
        .query_async(con)
        .await?;
    Ok(n == 1)
}

/// Gives the lock up if `lease` still holds it, and tells the waiters why
/// (`notice`: a signed `Notice::Failed` or `Notice::Released`). Returns
/// whether it was held.
pub async fn release(
    con: &mut impl ConnectionLike,
    keys: &UserKeys,
    channel: &str,
    lease: &Lease,
    notice: &[u8],
) -> RedisResult<bool> {
    let n: i64 = RELEASE
        .key(&keys.lock)
        .arg(&lease.owner)
        .arg(channel)
        .arg(notice)
        .invoke_async(con)
        .await?;
    Ok(n == 1)
}
