//! Whether Redis can be trusted right now, kept apart from the connection
//! plumbing (`connection.rs`) and the flow (`coordinator.rs`):
//!
//! - the **breaker**: which failures make every call fail fast (the
//!   connection failed, or a ping went unanswered), which stay with the one
//!   call that met them (an odd reply, one slow answer), and how recovery is
//!   probed;
//! - the **restart guard**: how a Redis server that may have lost the locks
//!   the fleet held is recognised (a restart, a failover), and how long a
//!   refresh that would spend a refresh token waits before it may lock.
//!
//! # The restart guard
//!
//! A lock lives only in the server that granted it. When that server is
//! replaced (restarted empty or from a stale dump, or a replica promoted
//! before it had the newest writes) or its keys are lost (a flush), a holder
//! elsewhere may still be refreshing while the server grants the same
//! user's lock to someone else; with rotating refresh tokens the second
//! refresh spends a token the first one already spent, and the provider
//! revokes the grant.
//!
//! So every lock grant first checks a marker key: `r`, the `run_id` of the
//! server that wrote it (`INFO server`: new for every server process), `c`,
//! when it was created, `s` and `g`, when a grace (or a settle) started.
//! The marker's **identity** is `r:c`: it changes when the server changes
//! and when the marker was lost with the rest of the keys. The check runs
//! inside the acquire script rather than once per (re)connection, which
//! ties it to the very grant it protects: no window between "this is a new
//! server" and "here is a lock", and no reliance on noticing a reconnect the
//! connection manager made on its own. Only a grant runs it (a cached token
//! or a held lock returns before): one `INFO server`, `TIME` and marker read,
//! about 20 µs of server time per lock grant, never on the hot path.
//!
//! - marker present, another `run_id`: a failover, or a restart that kept
//!   data. **Grace**: no lock for a refresh that would spend the caller's
//!   refresh token until [`grace_ms`] after the change was seen.
//! - marker missing (or of another identity than the caller last saw): a
//!   server restarted empty, a flush, or simply a prefix new to this server
//!   (first use). The server cannot tell these apart; the instances can: one
//!   that saw another identity recently enough to still have a refresh or a
//!   write of its own pending there ([`memory_ms`]) says so (`known`), and
//!   its first call turns the marker into a grace. A marker written by an
//!   instance that knew none starts a short **settle** ([`SETTLE_MS`])
//!   instead, long enough for every live instance that used the old server
//!   to reach the new one (their reconnect probe touches the marker within
//!   [`PROBE_MAX`] of the server answering) and convert it. A server up for
//!   longer than the grace needs no settle (whatever was pending before it
//!   started is over), so a fresh stack waits at most the settle once, and
//!   a new prefix on a long-running Redis not at all.
//!
//! Why [`grace_ms`] is the refresh timeout plus a margin: a lock the old
//! server granted was granted before that server went away, to a refresh
//! whose deadline (`refreshTimeoutMs` from its start, when the manager
//! aborts it) is therefore less than `refreshTimeoutMs` after the server went
//! away, hence after the new one was first seen. Its result is then written
//! (`cache.rs`, fenced) as soon as the new server answers: the writer retries
//! every [`PROBE_MAX`] at most, each try within [`OP_TIMEOUT`]. Once the grace
//! is over, every refresh the old server could have locked has ended and its
//! token is in the new server, where the next lock holder finds it.
//!
//! Refreshes that spend no refresh token (client credentials) need no grace:
//! a duplicate of those costs one extra token, nothing more.
//!
//! The marker is one key per key prefix on a single node. On a Redis
//! Cluster, where a script may only touch keys of one hash slot, it is one
//! per slot (`Keys::epoch_marker`: a hash tag of the user's slot), and
//! [`Epoch`] remembers identities per marker; a node's restart or failover
//! then guards exactly the slots it serves. Nothing else changes. (There,
//! a call's own wait is the cluster client's response timeout, one second,
//! rather than a ping's verdict.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Duration;

use once_cell::sync::Lazy;
use parking_lot::Mutex;
use redis::aio::ConnectionLike;
use redis::{ErrorKind, RedisError, RedisResult, Script, ServerErrorKind};
use tokio::sync::futures::Notified;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a call may go unanswered before a ping decides whether Redis is
/// away (`Connection::run`). Every call is in-memory work on the server.
pub const OP_TIMEOUT: Duration = Duration::from_millis(1_000);
/// First pause of the reconnect probe; it doubles up to [`PROBE_MAX`].
pub const PROBE_FIRST: Duration = Duration::from_millis(50);
/// Longest pause between probes: Redis answering again is noticed within
/// this (plus one connect), so coordination resumes well within a second.
pub const PROBE_MAX: Duration = Duration::from_millis(250);
/// How long a marker written by an instance that knew no other server holds
/// back refresh-token locks: long enough for the instances that used the
/// old server to reconnect (one probe pause) and touch it (one call).
pub const SETTLE_MS: u64 = (PROBE_MAX.as_millis() + OP_TIMEOUT.as_millis() + 250) as u64;

/// What a refresh must have left of its budget after waiting out a guard no
/// longer than a settle (see [`can_wait`]).
pub const SETTLE_FLOOR_MS: u64 = 250;

/// How long a caller with `left` of its `budget` may wait for a guard to
/// end. The rule (docs/redis.md, "When Redis fails"): it waits when the guard ends
/// with at least half the budget left, or, for a guard of at most
/// [`SETTLE_MS`] (a fresh stack's), with at least [`SETTLE_FLOOR_MS`] left;
/// else its refresh is refused at once.
pub fn can_wait(left: Duration, budget: Duration) -> Duration {
    let half = left.saturating_sub(budget / 2);
    let settle = left
        .saturating_sub(Duration::from_millis(SETTLE_FLOOR_MS))
        .min(Duration::from_millis(SETTLE_MS));
    half.max(settle)
}

/// How long after a new server is seen no lock is granted to a refresh that
/// would spend the caller's refresh token (see the module docs for why).
pub fn grace_ms(refresh_timeout_ms: u64) -> u64 {
    refresh_timeout_ms.saturating_add(SETTLE_MS)
}

/// The pause before the `n`-th retry of a probe or of a write that could
/// not reach Redis: 50, 100, 200, then 250 ms.
pub fn retry_pause(n: u32) -> Duration {
    PROBE_FIRST.saturating_mul(1 << n.min(8)).min(PROBE_MAX)
}

/// What a failed call says about Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The connection failed (refused, reset, closed), or the server cannot
    /// serve anyone (loading, read-only after a failover, cluster down):
    /// every call would fail, so the breaker opens.
    Connection,
    /// No answer in time, or the server busy with a script: maybe a stall,
    /// maybe one slow reply. A ping decides.
    Slow,
    /// An odd reply to this one call (a script error, an unexpected shape):
    /// that call's problem, not everyone's.
    Reply,
}

pub fn classify(e: &RedisError) -> Fault {
    if e.is_timeout() || e.code() == Some("BUSY") {
        return Fault::Slow;
    }
    // Credentials refused: every call would be.
    if matches!(e.code(), Some("WRONGPASS" | "NOAUTH")) {
        return Fault::Connection;
    }
    match e.kind() {
        ErrorKind::Io
        | ErrorKind::Parse
        | ErrorKind::AuthenticationFailed
        | ErrorKind::ClusterConnectionNotFound => Fault::Connection,
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::TryAgain,
        ) => Fault::Connection,
        _ => Fault::Reply,
    }
}

/// The breaker's state. Open: calls fail fast while a probe pings; it
/// closes on the first answer. A real call is not let through as the probe:
/// while Redis is still down it would make its caller wait out a connect
/// timeout, where the ping costs no caller anything.
#[derive(Debug, Default)]
pub struct Breaker {
    open: AtomicBool,
    checking: AtomicBool,
    tripped: Notify,
}

impl Breaker {
    pub fn is_open(&self) -> bool {
        self.open.load(Relaxed)
    }

    /// Opens; true if it was closed (the caller starts the probe). Calls
    /// still waiting on Redis give up (`opened`).
    pub fn trip(&self) -> bool {
        let was_closed = !self.open.swap(true, Relaxed);
        if was_closed {
            self.tripped.notify_waiters();
        }
        was_closed
    }

    /// Resolves when the breaker next opens.
    pub fn opened(&self) -> Notified<'_> {
        self.tripped.notified()
    }

    pub fn reset(&self) {
        self.open.store(false, Relaxed);
    }

    /// A call went unanswered, or the connection dropped: true if no check
    /// runs yet (the caller starts one, which trips the breaker only if a
    /// ping goes unanswered too).
    pub fn begin_check(&self) -> bool {
        !self.is_open() && !self.checking.swap(true, Relaxed)
    }

    pub fn end_check(&self) {
        self.checking.store(false, Relaxed);
    }
}

/// How long this instance remembers the server it used: as long as a
/// refresh it locked there may still run (`refreshTimeoutMs` after the
/// grant, its last contact) and the write of its result be retried (the
/// grace). Past that, nothing of its own can be lost with that server.
pub fn memory_ms(refresh_timeout_ms: u64) -> u64 {
    refresh_timeout_ms.saturating_add(grace_ms(refresh_timeout_ms))
}

/// Which marker identities this instance saw, and when: one marker on a
/// single node, one per hash slot on a cluster (`Keys::epoch_marker`).
#[derive(Debug, Default)]
pub struct Epoch {
    known: Mutex<HashMap<String, (String, Instant)>>,
    memory_ms: OnceLock<u64>,
}

impl Epoch {
    /// Set once, by the coordinator: [`memory_ms`].
    pub fn configure(&self, memory_ms: u64) {
        let _ = self.memory_ms.set(memory_ms);
    }

    fn memory(&self) -> Duration {
        Duration::from_millis(*self.memory_ms.get().unwrap_or(&0))
    }

    /// The identity of `marker` this instance saw within [`memory_ms`] (a
    /// refresh it locked then may still run, or its write be pending), else
    /// empty.
    pub fn known(&self, marker: &str) -> String {
        match self.known.lock().get(marker) {
            Some((identity, at)) if at.elapsed() < self.memory() => identity.clone(),
            _ => String::new(),
        }
    }

    /// A script just reported `marker`'s identity.
    pub fn saw(&self, marker: &str, identity: &str) {
        let mut known = self.known.lock();
        if known.len() >= 1_024 {
            let memory = self.memory();
            known.retain(|_, (_, at)| at.elapsed() < memory);
        }
        known.insert(marker.to_owned(), (identity.to_owned(), Instant::now()));
    }

    /// The markers seen within [`memory_ms`], with their identities: what
    /// the reconnect probe touches.
    pub fn recent(&self) -> Vec<(String, String)> {
        let memory = self.memory();
        self.known
            .lock()
            .iter()
            .filter(|(_, (_, at))| at.elapsed() < memory)
            .map(|(m, (i, _))| (m.clone(), i.clone()))
            .collect()
    }
}

/// The marker check, as a Lua function for scripts that grant locks (the
/// acquire script calls it first) and for the probe's [`touch`]. Returns the
/// marker's identity and how many ms a refresh-token lock must still wait
/// (0: none). `known` is the identity the caller saw last (or empty);
/// `grace` and `settle` are the caller's (0: it needs none); `now` its
/// clock, used only if the server's `TIME` is refused. A server up longer
/// than the grace needs no settle: nothing an instance did before it started
/// can still be pending. Without the right to call INFO (an ACL), the run id
/// reads as `unknown` and the uptime as none: failovers then go unseen,
/// restarts and flushes (which lose the marker) do not.
pub const EPOCH_LUA: &str = r"
local function epoch(marker, known, grace, settle, now)
  local info = redis.pcall('INFO', 'server')
  local run, up = 'unknown', nil
  if type(info) == 'string' then
    run = string.match(info, 'run_id:(%x+)') or 'unknown'
    up = tonumber(string.match(info, 'uptime_in_seconds:(%d+)'))
  end
  now = tonumber(now)
  local t = redis.pcall('TIME')
  if t[1] then now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) end
  local m = redis.pcall('HMGET', marker, 'r', 'c', 's', 'g')
  if m.err then
    redis.call('DEL', marker)
    m = {}
  end
  local r, c, s, g = m[1], m[2], tonumber(m[3]), m[4]
  if r ~= run or not c or not s then
    g = ((r and r ~= run) or known ~= '') and '1' or '0'
    c = tostring(now)
    s = now
    redis.call('DEL', marker)
    redis.call('HSET', marker, 'r', run, 'c', c, 's', s, 'g', g)
  elseif g ~= '1' and known ~= '' and known ~= run .. ':' .. c then
    g = '1'
    s = now
    redis.call('HSET', marker, 's', s, 'g', g)
  end
  local wait = 0
  if g == '1' then
    wait = grace
  elseif not up or up * 1000 < grace then
    wait = settle
  end
  local left = s + wait - now
  if left < 0 then left = 0 end
  return run .. ':' .. c, left
end
";

static TOUCH: Lazy<Script> = Lazy::new(|| {
    Script::new(&format!(
        "{EPOCH_LUA}\nlocal identity = epoch(KEYS[1], ARGV[1], 0, 0, ARGV[2])\nreturn identity"
    ))
});

/// Records the server in the marker (starting a grace if `known` names
/// another identity) and returns the marker's identity. The reconnect probe
/// calls it, so a grace starts as soon as any instance that used the old
/// server is back.
pub async fn touch(
    con: &mut impl ConnectionLike,
    marker: &str,
    known: &str,
) -> RedisResult<String> {
    TOUCH
        .key(marker)
        .arg(known)
        .arg(crate::engine::time::now_ms())
        .invoke_async(con)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_the_probe_cap() {
        let pauses: Vec<u128> = (0..6).map(|n| retry_pause(n).as_millis()).collect();
        assert_eq!(pauses, [50, 100, 200, 250, 250, 250]);
        assert_eq!(retry_pause(u32::MAX), PROBE_MAX);
    }

    #[test]
    fn a_short_budget_waits_out_a_settle_but_not_a_grace() {
        let ms = Duration::from_millis;
        // refreshTimeoutMs 2000 on a fresh stack: the whole settle fits.
        assert!(can_wait(ms(1_990), ms(2_000)) >= ms(SETTLE_MS));
        // ...but never past the budget less the floor.
        assert_eq!(can_wait(ms(1_000), ms(2_000)), ms(750));
        // The default budget: half of it, as before (a grace is longer).
        assert_eq!(can_wait(ms(30_000), ms(30_000)), ms(15_000));
        assert_eq!(can_wait(ms(100), ms(30_000)), ms(0));
    }

    #[test]
    fn the_grace_outlasts_every_refresh_the_old_server_locked() {
        assert!(
            grace_ms(30_000)
                > 30_000 + PROBE_MAX.as_millis() as u64 + OP_TIMEOUT.as_millis() as u64
        );
        assert_eq!(grace_ms(u64::MAX), u64::MAX);
    }

    #[test]
    fn only_connection_failures_trip_the_breaker() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(classify(&io), Fault::Connection);
        let slow = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(classify(&slow), Fault::Slow);
        let shape = RedisError::from((ErrorKind::UnexpectedReturnType, "odd"));
        assert_eq!(classify(&shape), Fault::Reply);
        let b = Breaker::default();
        assert!(b.begin_check() && !b.begin_check());
        b.end_check();
        assert!(b.trip() && !b.trip() && b.is_open());
        assert!(!b.begin_check(), "no check while open: the probe runs");
        b.reset();
        assert!(!b.is_open());
    }
}
