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

use std::hash::{BuildHasher, RandomState};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use parking_lot::{Mutex, MutexGuard};

pub use error::{EngineError, ErrorCode};
pub use flight::{Failure, Plan};
pub use policy::{EpochMs, Policy, PolicyOptions};
pub use secret::SecretString;
pub use token::{Issued, IssuedBrief, Presented, Refreshed};

use marks::RemoteMarks;
pub use table::Eviction;
use table::Table;

/// Shards of the per-user table, each behind its own lock. A shard that
/// grows rehashes only its share of the users (at most about 5,500 at a
/// million: a few ms, not a whole-table pause; shares are unequal on
/// purpose, see [`Engine::shard_of`]), and the background evictor holds
/// one shard at a time.
const SHARDS: usize = 256;

/// Entries a `stats()` call evicts at most, over the shards with eviction
/// due (at most [`EVICT_PER_SHARD_ON_STATS`] in each): a small table is
/// brought up to date on the caller's clock at once, a big backlog is left
/// to the background task.
const EVICT_ON_STATS: usize = 64;
const EVICT_PER_SHARD_ON_STATS: usize = 8;

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
    /// Calls the core answered without a refresh (a held or presented
    /// token, a token another instance shared); the binding adds the hot
    /// path's, which never reach the core.
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
/// non-blocking apart from one shard's lock, rarely contended.
#[derive(Debug)]
pub struct Engine {
    policy: Policy,
    shards: Box<[Mutex<Table>]>,
    /// When each shard next has eviction work (`i64::MAX`: none), kept on
    /// every unlock: `stats()` and the evictor lock only shards that do.
    due: Box<[AtomicI64]>,
    /// The shard the next `stats()` starts evicting at.
    stats_cursor: AtomicUsize,
    /// Keyed, so caller-chosen user ids cannot crowd one shard.
    route: RandomState,
    /// The shards' counts summed, so `stats()` never waits: written only
    /// by [`LockedTable`]'s drop, with what the shard it held changed.
    totals: Totals,
    seen: Seen,
    /// When a call last used an entry (`i64::MIN`: never).
    last_use: AtomicI64,
    next_flight: AtomicU32,
    counters: Counters,
    /// Marks other instances made, until the binding takes them.
    remote: RemoteMarks,
}

#[derive(Debug, Default)]
struct Totals {
    users: AtomicUsize,
    in_flight: AtomicUsize,
}

/// The latest clock reading a call passed in, kept as its offset from the
/// engine's monotonic clock so one atomic holds it (`time.rs`, "Clocks":
/// [`time::CallerNow`] with the reading and the instant folded together).
#[derive(Debug)]
struct Seen {
    born: Instant,
    /// The reading last stored, to skip storing it again.
    at: AtomicI64,
    /// The reading minus the monotonic milliseconds when it was read;
    /// `i64::MIN` before any call.
    offset: AtomicI64,
}

impl Seen {
    fn new() -> Self {
        Self {
            born: Instant::now(),
            at: AtomicI64::new(i64::MIN),
            offset: AtomicI64::new(i64::MIN),
        }
    }

    fn since_born(&self) -> i64 {
        self.born.elapsed().as_millis().min(i64::MAX as u128) as i64
    }

    /// A call passed `now`. The monotonic clock is read only when the
    /// reading changes: at most once a millisecond under traffic.
    fn saw(&self, now: EpochMs) {
        if self.at.load(Relaxed) != now {
            self.offset.store(
                now.saturating_sub(self.since_born()).max(i64::MIN + 1),
                Relaxed,
            );
            self.at.store(now, Relaxed);
        }
    }

    /// The latest reading advanced by the real time since, if any.
    fn now(&self) -> Option<EpochMs> {
        let offset = self.offset.load(Relaxed);
        (offset != i64::MIN).then(|| offset.saturating_add(self.since_born()))
    }
}

impl Engine {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            shards: (0..SHARDS).map(|_| Mutex::new(Table::default())).collect(),
            due: (0..SHARDS).map(|_| AtomicI64::new(i64::MAX)).collect(),
            stats_cursor: AtomicUsize::new(0),
            route: RandomState::new(),
            totals: Totals::default(),
            seen: Seen::new(),
            last_use: AtomicI64::new(i64::MIN),
            next_flight: AtomicU32::new(1),
            counters: Counters::default(),
            remote: RemoteMarks::default(),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The API answered 401 with `access_token` (or, without one, with
    /// whatever the user holds): the next call presenting it refreshes even
    /// though it has not expired. The mark lasts one idle TTL: returns when
    /// it ends, until which the caller sends `user`'s calls to
    /// [`Engine::begin`] rather than deciding them on the buffer rule alone.
    pub fn invalidate(
        &self,
        user: &str,
        access_token: Option<&SecretString>,
        now: EpochMs,
    ) -> Result<EpochMs, EngineError> {
        validate_user(user)?;
        let until = now.saturating_add(self.policy.idle_ttl_ms as i64);
        let fp = access_token.map(SecretString::fingerprint);
        let mut t = self.table(user, now);
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

    /// The user signed out or disconnected their bank: drops the token
    /// this engine holds for `user` (its bytes are wiped) and marks every
    /// token of the user's as [`Engine::invalidate`] does, so a call still
    /// presenting one refreshes rather than is served. A refresh in flight
    /// is left to finish: its caller decides what to do with the result.
    pub fn forget(&self, user: &str, now: EpochMs) -> Result<EpochMs, EngineError> {
        let until = self.invalidate(user, None, now)?;
        let mut t = self.table(user, now);
        t.with_existing(user, now, |e, _| e.held = None);
        Ok(until)
    }

    /// [`Engine::invalidate`] made by another instance (Redis pub/sub): the
    /// mark also waits for the binding ([`Engine::take_remote_marks`]).
    /// True when nothing waited before it: the binding then tells its
    /// manager to take them (once for a burst).
    pub fn invalidate_from_elsewhere(
        &self,
        user: &str,
        access_token: Option<&SecretString>,
        now: EpochMs,
    ) -> Result<bool, EngineError> {
        let until = self.invalidate(user, access_token, now)?;
        Ok(self.remote.push(user, until, now))
    }

    /// The marks other instances made since the last call: users whose
    /// calls the binding must send to [`Engine::begin`], until when.
    pub fn take_remote_marks(&self) -> Vec<(Box<str>, EpochMs)> {
        self.remote.take()
    }

    /// Reads the kept totals; never scans a map nor waits for a lock.
    /// First it evicts up to [`EVICT_ON_STATS`] entries on the caller's
    /// clock from shards with eviction due, starting where the last call
    /// stopped and skipping a shard another thread holds (the evictor will
    /// get to it).
    pub fn stats(&self, now: EpochMs) -> Stats {
        self.seen.saw(now);
        let n = self.shards.len();
        let start = self.stats_cursor.load(Relaxed);
        let mut budget = EVICT_ON_STATS;
        for i in (start..start + n).map(|i| i % n) {
            if budget == 0 {
                self.stats_cursor.store(i, Relaxed);
                break;
            }
            if self.due[i].load(Relaxed) > now {
                continue;
            }
            if let Some(table) = self.shards[i].try_lock() {
                let mut t = self.locked(i, table);
                let slice = budget.min(EVICT_PER_SHARD_ON_STATS);
                budget -= t.evict(&self.policy, now, slice, |_, _| {}).visited;
            }
        }
        let c = &self.counters;
        Stats {
            users: self.totals.users.load(Relaxed),
            in_flight: self.totals.in_flight.load(Relaxed),
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
    /// How many shards there are; [`Engine::evict`] takes one by index.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// When shard `shard` next has eviction work, as of its last unlock;
    /// `None` when it has none (empty).
    pub fn due(&self, shard: usize) -> Option<EpochMs> {
        let due = self.due[shard].load(Relaxed);
        (due != i64::MAX).then_some(due)
    }

    /// One slice of eviction on shard `shard` at `now`, visiting at most
    /// `budget` entries (see `table.rs`). What it evicts is freed after the
    /// lock is released, so a slice holds the lock only to unlink entries.
    pub fn evict(&self, shard: usize, now: EpochMs, budget: usize) -> Eviction {
        let mut evicted = Vec::new();
        let mut t = self.locked(shard, self.shards[shard].lock());
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
        self.seen.now().unwrap_or_else(time::now_ms)
    }

    /// When a call last used an entry, for the background task (the hot
    /// path never reaches the core, and allocates nothing here).
    pub fn last_use(&self) -> Option<EpochMs> {
        let last_use = self.last_use.load(Relaxed);
        (last_use != i64::MIN).then_some(last_use)
    }

    /// Which shard holds `user`. Shards take unequal shares on purpose:
    /// shard `i` takes a share in proportion to 2^(i/n), so the shares
    /// span a factor of two. Equal shards would reach their map's next
    /// size together, and their rehashes would land on the same few calls;
    /// these reach it one after another across each doubling of the users.
    pub(crate) fn shard_of(&self, user: &str) -> usize {
        let n = self.shards.len();
        // A uniform x in [0, 1) from the hash's top 53 bits; the inverse
        // of the shares' cumulative sum, (2^(i/n) - 1), picks the shard.
        let x = (self.route.hash_one(user) >> 11) as f64 / (1u64 << 53) as f64;
        (((1.0 + x).log2() * n as f64) as usize).min(n - 1)
    }

    /// `user`'s shard, locked, for a call at `now`. Every access goes
    /// through [`LockedTable`], so the totals are brought up to date on
    /// every unlock and cannot drift from the shards' counts.
    fn table(&self, user: &str, now: EpochMs) -> LockedTable<'_> {
        self.seen.saw(now);
        self.last_use.store(now, Relaxed);
        let shard = self.shard_of(user);
        self.locked(shard, self.shards[shard].lock())
    }

    fn locked<'a>(&'a self, shard: usize, table: MutexGuard<'a, Table>) -> LockedTable<'a> {
        let before = Counts::of(&table);
        LockedTable {
            table,
            totals: &self.totals,
            before,
            due: &self.due[shard],
            policy: &self.policy,
        }
    }
}

/// A shard's counts, as the totals last saw them.
#[derive(Clone, Copy)]
struct Counts {
    users: usize,
    in_flight: usize,
}

impl Counts {
    fn of(t: &Table) -> Self {
        Self {
            users: t.len(),
            in_flight: t.in_flight,
        }
    }
}

/// Moves `total` by what one shard's count did, from `was` to `is`.
fn shift(total: &AtomicUsize, was: usize, is: usize) {
    if is > was {
        total.fetch_add(is - was, Relaxed);
    } else if was > is {
        total.fetch_sub(was - is, Relaxed);
    }
}

struct LockedTable<'a> {
    table: MutexGuard<'a, Table>,
    totals: &'a Totals,
    before: Counts,
    due: &'a AtomicI64,
    policy: &'a Policy,
}

impl Deref for LockedTable<'_> {
    type Target = Table;
    fn deref(&self) -> &Table {
        &self.table
    }
}

impl DerefMut for LockedTable<'_> {
    fn deref_mut(&mut self) -> &mut Table {
        &mut self.table
    }
}

impl Drop for LockedTable<'_> {
    // Runs before the guard is released: the shard's change reaches the
    // totals and its due time before anyone else can change that shard.
    fn drop(&mut self) {
        let (was, is) = (self.before, Counts::of(&self.table));
        shift(&self.totals.users, was.users, is.users);
        shift(&self.totals.in_flight, was.in_flight, is.in_flight);
        let due = self.table.next_due(self.policy).unwrap_or(i64::MAX);
        self.due.store(due, Relaxed);
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
