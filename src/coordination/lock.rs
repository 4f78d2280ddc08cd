//! The per-user refresh lock: `SET NX PX` with a random owner, extended only
//! by its owner, released by compare-and-delete. Each grant also draws the
//! next fence from the user's record, so a holder whose lock expired cannot
//! overwrite the token of a holder that came after it (see `cache.rs`).
//!
//! Taking the lock is folded into one script with reading the cache: a
//! fresh token there is returned instead, so "read the cache, else lock"
//! costs one round trip, and no token can land between the read and the lock.

use once_cell::sync::Lazy;
use redis::aio::ConnectionLike;
use redis::{RedisResult, Script, Value};

use super::keys::UserKeys;
use super::record::{self, Lease, Notice, Record};
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
    /// Someone else holds the lock for this many more ms.
    Busy { lock_ttl_ms: u64 },
}

/// Which cached token the script may return rather than lock: newer than
/// `min_expires_at`, not the one fenced `skip_fence` (found unusable) nor
/// one `invalidate` marked, and
/// either fresh (`expires_at > fresh_after`) or written after `recent_after`
/// and unexpired at `now` (the engine's double-check rule).
#[derive(Debug, Clone, Copy)]
pub struct Want {
    pub min_expires_at: EpochMs,
    pub fresh_after: EpochMs,
    pub recent_after: EpochMs,
    pub now: EpochMs,
    pub skip_fence: u64,
}

static ACQUIRE: Lazy<Script> = Lazy::new(|| {
    Script::new(
        r"
local r = redis.call('HMGET', KEYS[1], 'f', 'e', 'w', 't', 'x')
local f, e, w = tonumber(r[1]), tonumber(r[2]), tonumber(r[3])
if r[4] and e and f ~= tonumber(ARGV[7]) and f ~= tonumber(r[5]) and e > tonumber(ARGV[3])
  and (e > tonumber(ARGV[4]) or (w and w > tonumber(ARGV[5]) and e > tonumber(ARGV[6]))) then
  return {1, f, w or 0, r[4]}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
  -- The fence counter must outlive every holder still refreshing.
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[8]) then redis.call('PEXPIRE', KEYS[1], ARGV[8]) end
  if r[4] and f then return {2, n, f, w or 0, r[4]} end
  return {2, n}
end
return {3, redis.call('PTTL', KEYS[2])}
",
    )
});

static EXTEND: Lazy<Script> = Lazy::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
",
    )
});

static RELEASE: Lazy<Script> = Lazy::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
",
    )
});

/// Returns a usable cached token, or takes the lock, or says who has it.
/// `counter_ttl_ms` keeps the fence counter alive at least that long.
pub async fn acquire(
    con: &mut impl ConnectionLike,
    keys: &UserKeys,
    owner: &str,
    lock_ttl_ms: u64,
    counter_ttl_ms: u64,
    want: Want,
) -> RedisResult<Acquire> {
    let v: Vec<Value> = ACQUIRE
        .key(&keys.record)
        .key(&keys.lock)
        .arg(owner)
        .arg(lock_ttl_ms)
        .arg(want.min_expires_at)
        .arg(want.fresh_after)
        .arg(want.recent_after)
        .arg(want.now)
        .arg(want.skip_fence)
        .arg(counter_ttl_ms)
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
                sealed: sealed.clone(),
            }),
            _ => Err(bad()),
        }
    };
    match int(0)? {
        1 => Ok(Acquire::Cached(record(1)?)),
        2 => Ok(Acquire::Locked {
            lease: Lease {
                owner: owner.to_owned(),
                fence: int(1)?.max(0) as u64,
            },
            stale: if v.len() > 2 { Some(record(2)?) } else { None },
        }),
        3 => Ok(Acquire::Busy {
            lock_ttl_ms: int(1)?.max(0) as u64,
        }),
        _ => Err(bad()),
    }
}

/// Pushes the lock's expiry out by `ttl_ms` if `lease` still holds it.
pub async fn extend(
    con: &mut impl ConnectionLike,
    keys: &UserKeys,
    lease: &Lease,
    ttl_ms: u64,
) -> RedisResult<bool> {
    let n: i64 = EXTEND
        .key(&keys.lock)
        .arg(&lease.owner)
        .arg(ttl_ms)
        .invoke_async(con)
        .await?;
    Ok(n == 1)
}

/// Gives the lock up if `lease` still holds it, and tells the waiters why
/// (`Notice::Failed` or `Notice::Released`). Returns whether it was held.
pub async fn release(
    con: &mut impl ConnectionLike,
    keys: &UserKeys,
    channel: &str,
    lease: &Lease,
    notice: &Notice,
) -> RedisResult<bool> {
    debug_assert!(
        !matches!(notice, Notice::Committed(_)),
        "a commit goes through cache::commit"
    );
    let n: i64 = RELEASE
        .key(&keys.lock)
        .arg(&lease.owner)
        .arg(channel)
        .arg(record::encode_notice(&keys.id, notice))
        .invoke_async(con)
        .await?;
    Ok(n == 1)
}
