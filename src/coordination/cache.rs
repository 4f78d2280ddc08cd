//! The shared token record, one Redis hash per user:
//!
//! | field | holds |
//! |---|---|
//! | `t` | the token, sealed (`seal.rs`): access, refresh, expiry |
//! | `e` | its expiry, epoch ms, in clear so a script can judge freshness |
//! | `w` | when it was written, epoch ms (writer's clock) |
//! | `f` | the fence of the lease that wrote it |
//! | `n` | the fence counter: the last fence a lock grant drew |
//! | `h` | a fingerprint of the access token (`seal::fingerprint`) |
//! | `x` | the fence of a token `invalidate` marked bad: never handed out |
//!
//! A write is fenced: it lands only if its fence is above the record's, so
//! a holder whose lock expired mid-refresh cannot overwrite the token of the
//! holder after it. The write, the announcement and the unlock are one script.
//! A holder may also write first and keep the lock (`keep_lock`: the token
//! is safe in Redis while its app saves it), then commit with the same
//! fence: an equal fence is its own write.
//! So are marking a token bad and announcing it (`invalidate`).

use once_cell::sync::Lazy;
use redis::aio::ConnectionLike;
use redis::{RedisResult, Script};

use super::keys::UserKeys;
use super::record::{Lease, Record};
use crate::engine::EpochMs;

/// A record that is not a hash (garbled) is replaced, not a script error;
/// a write fenced out still frees the lock and says so (`Released`), so the
/// waiters ask again at once and find the newer token.
static COMMIT: Lazy<Script> = Lazy::new(|| {
    Script::new(
        r"
local cur = redis.pcall('HGET', KEYS[1], 'f')
if type(cur) == 'table' then
  redis.call('DEL', KEYS[1])
  cur = false
end
cur = tonumber(cur)
local fence = tonumber(ARGV[2])
local written = 0
local keep = ARGV[11] == '1'
if not cur or fence >= cur then
  redis.call('HSET', KEYS[1], 'f', ARGV[2], 'e', ARGV[3], 'w', ARGV[4], 't', ARGV[5], 'h', ARGV[9])
  -- Later grants draw newer fences, also on a server that lost the counter.
  local n = tonumber(redis.call('HGET', KEYS[1], 'n'))
  if not n or n < fence then redis.call('HSET', KEYS[1], 'n', ARGV[2]) end
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[6]) then redis.call('PEXPIRE', KEYS[1], ARGV[6]) end
  if not keep then redis.call('PUBLISH', ARGV[7], ARGV[8]) end
  written = 1
end
if not keep and redis.pcall('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  if written == 0 then redis.call('PUBLISH', ARGV[7], ARGV[10]) end
end
return written
",
    )
});

static INVALIDATE: Lazy<Script> = Lazy::new(|| {
    Script::new(
        r"
local r = redis.pcall('HMGET', KEYS[1], 'f', 'h')
if r.err then r = {} end
local marked = 0
if r[1] and (ARGV[1] == '' or r[2] == ARGV[1]) then
  redis.call('HSET', KEYS[1], 'x', r[1])
  marked = 1
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return marked
",
    )
});

/// Writes `record` (a token expiring at `expires_at`, whose access token
/// has `fingerprint`) if `lease`'s fence is the newest, announces it
/// (`notices`: the signed `Notice::Committed` and, if the write lost to a
/// newer one, `Notice::Released`), and releases the lock if `lease` still
/// holds it; with `keep_lock`, only writes. The record lives `ttl_ms` (at
/// least). Returns whether it was
/// written.
#[allow(clippy::too_many_arguments)]
pub async fn commit(
    con: &mut impl ConnectionLike,
    keys: &UserKeys,
    channel: &str,
    lease: &Lease,
    expires_at: EpochMs,
    record: &Record,
    fingerprint: &str,
    ttl_ms: u64,
    notices: (&[u8], &[u8]),
    keep_lock: bool,
) -> RedisResult<bool> {
    debug_assert_eq!(record.fence, lease.fence);
    let n: i64 = COMMIT
        .key(&keys.record)
        .key(&keys.lock)
        .arg(&lease.owner)
        .arg(lease.fence)
        .arg(expires_at)
        .arg(record.written_at)
        .arg(&record.sealed)
        .arg(ttl_ms.max(1))
        .arg(channel)
        .arg(notices.0)
        .arg(fingerprint)
        .arg(notices.1)
        .arg(if keep_lock { "1" } else { "0" })
        .invoke_async(con)
        .await?;
    Ok(n == 1)
}

/// Marks the stored token bad if its access token has `fingerprint` (any
/// stored token: `None`), so no instance hands it out again, and announces
/// `notice` (a signed `Notice::Invalidated`). Returns whether a token was marked.
pub async fn invalidate(
    con: &mut impl ConnectionLike,
    keys: &UserKeys,
    channel: &str,
    fingerprint: Option<&str>,
    notice: &[u8],
) -> RedisResult<bool> {
    let n: i64 = INVALIDATE
        .key(&keys.record)
        .arg(fingerprint.unwrap_or(""))
        .arg(channel)
        .arg(notice)
        .invoke_async(con)
        .await?;
    Ok(n == 1)
}
