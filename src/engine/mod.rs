//! The pure Rust core: per-user token state, the refresh policy and single
//! flight. No napi types live here; `cargo test` covers it without Node.
//!
//! The engine decides, the caller acts: [`Engine::begin`] says whether to
//! use the presented token, a held one, join a refresh or lead one; the
//! leader reports back with [`Engine::complete`] (or [`Engine::adopt`] for a
//! token another instance produced) or [`Engine::fail`]. These are the
//! entry points production calls, and the ones the tests drive. Who
//! runs the refresh (a JS function, a native HTTP refresher) and how waiters
//! are woken is the binding's business.

pub mod error;
pub mod evictor;
pub mod flight;
mod marks;
pub mod policy;
pub mod secret;
pub mod table;
pub mod time;
pub mod token;

#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use parking_lot::{Mutex, MutexGuard};

pub use error::{EngineError, ErrorCode};
pub use flight::{Failure, Plan};
pub use policy::{EpochMs, Policy, PolicyOptions};
pub use secret::SecretString;
pub use token::{Issued, IssuedBrief, Presented, Refreshed};

use marks::RemoteMarks;
pub use table::Eviction;
use table::Table;

/// Longest user id accepted, in UTF-8 bytes. Ids are map keys: an unbounded
/// one would let one bad caller pin arbitrary memory.
pub const MAX_USER_ID_BYTES: usize = 512;

/// Longest access or refresh token accepted, in UTF-8 bytes: 64 KiB. Four
/// times what fits in a default Node HTTP header (16 KiB), so a JWT with
/// many claims passes; the same bound as a token endpoint's answer
/// (`refreshers::http::MAX_BODY_BYTES`) and the Redis record
/// (`coordination::seal`), so a token accepted here is one every instance
/// can share.
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    refreshes: AtomicU64,
    coalesced: AtomicU64,
    failures: AtomicU64,
    timeouts: AtomicU64,
    stale_served: AtomicU64,
}

/// What `stats()` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Live per-user entries.
    pub users: usize,
    /// Refreshes running now.
    pub in_flight: usize,
    /// Calls answered without a refresh.
    pub hits: u64,
    /// Refreshes that produced a token.
    pub refreshes: u64,
    /// Calls that waited on another call's refresh.
    pub coalesced: u64,
    /// Refreshes that failed (rejected, threw, or gave an invalid result).
    pub failures: u64,
    /// Refreshes that did not settle in time.
    pub timeouts: u64,
    /// Still-valid tokens served after a failed refresh.
    pub stale_served: u64,
}

/// One token manager's state. Thread-safe; every method is short and
/// non-blocking apart from one uncontended lock.
#[derive(Debug)]
pub struct Engine {
    policy: Policy,
    table: Mutex<Table>,
    next_flight: AtomicU32,
    counters: Counters,
    /// Marks other instances made, until the binding takes them.
    remote: RemoteMarks,
}

impl Engine {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            table: Mutex::new(Table::default()),
            next_flight: AtomicU32::new(1),
            counters: Counters::default(),
            remote: RemoteMarks::default(),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The hot path: can a token expiring at `expires_at` be handed back
    /// as it is at `now` (the caller's clock), without looking the user up?
    /// True when it outlives the buffer. Counts a hit. Revocations are per
    /// user and this call has none: a caller must send the users
    /// [`Engine::invalidate`] marked (until the time it returned) to
    /// [`Engine::begin`], which checks them.
    #[inline]
    pub fn is_fresh(&self, expires_at: EpochMs, now: EpochMs) -> bool {
        self.count_hit(self.fresh_at(expires_at, now))
    }

    /// [`Engine::is_fresh`] on the system clock, read as cheaply as the
    /// answer allows (see [`time::at_now`]): for a caller whose clock is
    /// that one (an unreplaced `Date.now`; `time.rs`, "Clocks").
    #[inline]
    pub fn is_fresh_now(&self, expires_at: EpochMs) -> bool {
        self.count_hit(time::at_now(|now| self.fresh_at(expires_at, now)))
    }

    #[inline]
    fn fresh_at(&self, expires_at: EpochMs, now: EpochMs) -> bool {
        !self.remote.pending() && self.policy.is_fresh(expires_at, now)
    }

    #[inline]
    fn count_hit(&self, fresh: bool) -> bool {
        if fresh {
            self.counters.hits.fetch_add(1, Relaxed);
        }
        fresh
    }

    /// The API answered 401 with `access_token` (or, without one, with
    /// whatever the user holds): the next call presenting it refreshes even
    /// though it has not expired. The mark lasts one idle TTL: returns when
    /// it ends, until which the caller sends `user`'s calls to
    /// [`Engine::begin`] rather than deciding them with [`Engine::is_fresh`].
    pub fn invalidate(
        &self,
        user: &str,
        access_token: Option<&SecretString>,
        now: EpochMs,
    ) -> Result<EpochMs, EngineError> {
        validate_user(user)?;
        let until = now.saturating_add(self.policy.idle_ttl_ms as i64);
        let fp = access_token.map(SecretString::fingerprint);
        let mut t = self.table();
        t.evict_on_call(&self.policy, now);
        t.with_entry(user, now, |e, _| {
            e.revoke(fp, until);
            if fp.is_none() {
                if let Some(h) = &e.held {
                    let held_fp = h.fingerprint;
                    e.revoke(Some(held_fp), until);
                }
            }
        });
        Ok(until)
    }

    /// [`Engine::invalidate`] made by another instance (Redis pub/sub): the
    /// mark also waits for the binding ([`Engine::take_remote_marks`]), and
    /// until taken the hot path answers "not fresh" to everyone.
    pub fn invalidate_from_elsewhere(
        &self,
        user: &str,
        access_token: Option<&SecretString>,
        now: EpochMs,
    ) -> Result<EpochMs, EngineError> {
        let until = self.invalidate(user, access_token, now)?;
        self.remote.push(user, until, now);
        Ok(until)
    }

    /// The marks other instances made since the last call: users whose
    /// calls the binding must send to [`Engine::begin`], until when.
    pub fn take_remote_marks(&self) -> Vec<(Box<str>, EpochMs)> {
        self.remote.take()
    }

    /// O(1): the table keeps its counts as entries come and go. Like any
    /// call, it also runs one bounded slice of eviction at `now`.
    pub fn stats(&self, now: EpochMs) -> Stats {
        let mut t = self.table();
        t.evict_on_call(&self.policy, now);
        let (users, in_flight) = (t.len(), t.in_flight);
        drop(t);
        let c = &self.counters;
        Stats {
            users,
            in_flight,
            hits: c.hits.load(Relaxed),
            refreshes: c.refreshes.load(Relaxed),
            coalesced: c.coalesced.load(Relaxed),
            failures: c.failures.load(Relaxed),
            timeouts: c.timeouts.load(Relaxed),
            stale_served: c.stale_served.load(Relaxed),
        }
    }
}

impl Engine {
    /// One slice of eviction at `now`, visiting at most `budget` entries
    /// (see `table.rs`). What it evicts is freed after the lock is released,
    /// so a slice holds the lock only to unlink entries.
    pub fn evict(&self, now: EpochMs, budget: usize) -> Eviction {
        let mut evicted = Vec::new();
        let mut t = self.table();
        let done = t.evict(&self.policy, now, budget, |user, entry| {
            evicted.push((user, entry))
        });
        if done.next_due.is_none_or(|due| due > now) {
            t.shrink_if_sparse();
        }
        drop(t);
        drop(evicted);
        done
    }

    /// "Now" for work no caller asks for (the background evictor, another
    /// instance's invalidation): the callers' clock as last seen, advanced
    /// by the real time since; the system clock before any call passed one
    /// (`time.rs`, "Clocks").
    pub fn app_now(&self) -> EpochMs {
        self.table()
            .seen()
            .map_or_else(time::now_ms, |seen| seen.now())
    }

    /// Signs of callers for the background task: calls answered on the hot
    /// path so far, and when the table was last used by a call.
    pub fn activity(&self) -> (u64, Option<EpochMs>) {
        let last_use = self.table().last_use();
        (self.counters.hits.load(Relaxed), last_use)
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock()
    }
}

pub fn validate_user(user: &str) -> Result<(), EngineError> {
    if user.is_empty() {
        return Err(EngineError::invalid_argument(
            "userId",
            "must be a non-empty string",
        ));
    }
    if user.len() > MAX_USER_ID_BYTES {
        return Err(EngineError::invalid_argument(
            "userId",
            format!("must be at most {MAX_USER_ID_BYTES} bytes long"),
        ));
    }
    Ok(())
}
