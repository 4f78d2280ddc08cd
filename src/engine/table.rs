//! Per-user state: the token a refresh produced, the refresh in flight,
//! revoked tokens, and eviction of users nobody has asked about lately.
//!
//! A [`Table`] is one shard of the engine's users (`mod.rs` picks a user's
//! shard by a keyed hash of the id), behind its own lock: growing one
//! rehashes only its share of the users, and eviction holds one shard at a
//! time, so a caller rarely meets a busy lock.
//!
//! Eviction. Entries live in least-recently-used order (`lru::LruCache`,
//! unbounded: a hash map whose nodes are also a linked list), and every use
//! moves an entry to the new end in O(1). The idle ones are therefore all
//! at the old end, and [`Table::evict`] removes them from there, visiting at
//! most a given number of entries a call: it stops at the first entry used
//! within `idleTtlMs`, never scans, and never evicts an entry with a refresh
//! in flight (that one moves to the new end instead). Each slow-path call
//! (`begin`, `invalidate`) runs one slice of [`EVICT_PER_CALL`] entries on
//! its user's shard with the caller's `now`: more than the one entry a call
//! can add, so calls alone bound each shard. A background task
//! (`evictor.rs`) does the bulk, a small slice per shard in turn under that
//! shard's lock alone, so memory is returned soon after `idleTtlMs` even
//! when no call comes; it frees what it evicts after unlocking.
//! Revocations lapse on their own schedule (a user may stay active after
//! its mark expires), so a small heap per shard ordered by lapse time lets
//! the same slices prune them in order and keep the hot path's revocation
//! count exact. Counts (`len`, `in_flight`, `revoking`) change as entries
//! come and go; the engine sums them into global counters as each shard is
//! unlocked, so `stats()` reads totals without visiting the shards' maps.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::RandomState;
use std::num::NonZeroUsize;

use lru::LruCache;

use super::policy::{EpochMs, Policy};
use super::secret::{Fingerprint, SecretString};
use super::token::Held;

/// Entries a caller's slice of eviction visits at most: above the one entry
/// a call can add, so a stream of new users alone drains an idle backlog,
/// and small enough that the call barely notices.
pub const EVICT_PER_CALL: usize = 2;

/// A shard emptied down to at most this many entries gives its hash map's
/// spare room back (rehashing what is left under its lock: kept small so
/// a caller waiting on that shard waits well under a millisecond).
const SHRINK_MAX_LEN: usize = 2_048;

/// A shard gives room back once it held more than 4× this many entries
/// (or 4× what is left): with 256 shards, what a burst leaves behind in
/// spare room stays under about 2 MB in all.
const SHRINK_MIN_PEAK: usize = 64;

/// A user id as a map key: inline when short (most ids, UUIDs included),
/// so hashing an entry's key reads only its node. When a shard's map grows
/// it rehashes every key: one memory access per entry instead of two.
#[derive(Debug, Clone)]
pub(crate) enum UserKey {
    Inline { len: u8, bytes: [u8; INLINE_ID] },
    Heap(Box<str>),
}

/// Longest id kept inline: the key is 40 bytes either way.
const INLINE_ID: usize = 38;

impl UserKey {
    fn new(user: &str) -> Self {
        match user.len() {
            len @ 0..=INLINE_ID => {
                let mut bytes = [0; INLINE_ID];
                bytes[..len].copy_from_slice(user.as_bytes());
                Self::Inline {
                    len: len as u8,
                    bytes,
                }
            }
            _ => Self::Heap(user.into()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            // SAFETY: the bytes were copied whole from a `&str` (`new`),
            // so they are UTF-8; checking again would cost every hash.
            Self::Inline { len, bytes } => unsafe {
                std::str::from_utf8_unchecked(&bytes[..*len as usize])
            },
            Self::Heap(s) => s,
        }
    }
}

// Hashes and compares as the `str` it holds, so maps keyed by it are
// looked up with a plain `&str` (the contract `Borrow` asks for).
impl std::borrow::Borrow<str> for UserKey {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl std::hash::Hash for UserKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl PartialEq for UserKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for UserKey {}

impl PartialOrd for UserKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for UserKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

/// The refresh currently running for a user.
#[derive(Debug)]
pub(crate) struct Flight {
    pub id: u32,
    /// The refresh token the refresh was started with: kept when the
    /// provider does not rotate it.
    pub refresh_token: Option<SecretString>,
    /// When it started: one running far past the refresh timeout was lost
    /// by its caller (see `Policy::is_overdue`).
    pub started: EpochMs,
}

#[derive(Debug)]
struct Revocation {
    fingerprint: Fingerprint,
    until: EpochMs,
}

/// An entry's revocations.
#[derive(Debug, Default)]
struct Revocations {
    tokens: Vec<Revocation>,
    /// `invalidate(userId)` without a token: the next call refreshes whatever
    /// it presents, until a refresh completes.
    all_until: Option<EpochMs>,
    /// When this entry is due in [`Table`]'s lapse heap: one live item per
    /// revoking entry (an item that does not match is left over from an
    /// earlier revocation and is skipped). `None` while nothing is revoked.
    queued: Option<EpochMs>,
}

impl Revocations {
    fn is_empty(&self) -> bool {
        self.tokens.is_empty() && self.all_until.is_none()
    }
}

/// What few entries have at a time: a refresh in flight, revocations.
#[derive(Debug, Default)]
struct Rare {
    flight: Option<Flight>,
    revocations: Revocations,
}

/// One user's state. Every user has one, in its own node of the shard's
/// list, so it is kept to 64 bytes: with the 40-byte key and the list's
/// two pointers a node is 120 bytes, one 128-byte malloc chunk. The rarely
/// used parts share one box, absent (never empty) when neither is there.
#[derive(Debug)]
pub(crate) struct Entry {
    pub held: Option<Held>,
    rare: Option<Box<Rare>>,
    last_used: EpochMs,
}

impl Entry {
    fn new(now: EpochMs) -> Self {
        Self {
            held: None,
            rare: None,
            last_used: now,
        }
    }

    pub fn flight(&self) -> Option<&Flight> {
        self.rare.as_ref()?.flight.as_ref()
    }

    pub fn start_flight(&mut self, flight: Flight) {
        self.rare.get_or_insert_with(Box::default).flight = Some(flight);
    }

    pub fn take_flight(&mut self) -> Option<Flight> {
        let flight = self.rare.as_mut()?.flight.take();
        self.drop_empty_rare();
        flight
    }

    fn revocations(&self) -> Option<&Revocations> {
        self.rare.as_ref().map(|r| &r.revocations)
    }

    fn revocations_mut(&mut self) -> Option<&mut Revocations> {
        self.rare.as_mut().map(|r| &mut r.revocations)
    }

    pub fn is_revoked(&self, fp: Fingerprint, now: EpochMs) -> bool {
        self.revocations().is_some_and(|r| {
            r.all_until.is_some_and(|u| u > now)
                || r.tokens
                    .iter()
                    .any(|t| t.fingerprint == fp && t.until > now)
        })
    }

    /// Whether this entry holds any revocation.
    pub fn is_revoking(&self) -> bool {
        self.revocations().is_some_and(|r| !r.is_empty())
    }

    /// When the last of this entry's revocations lapses.
    fn revoked_until(&self) -> Option<EpochMs> {
        let r = self.revocations()?;
        r.tokens.iter().map(|t| t.until).chain(r.all_until).max()
    }

    fn prune(&mut self, now: EpochMs) {
        if let Some(r) = self.revocations_mut() {
            r.tokens.retain(|t| t.until > now);
            if r.all_until.is_some_and(|u| u <= now) {
                r.all_until = None;
            }
            self.drop_empty_rare();
        }
    }

    /// Forgets revocations that are all gone (and their lapse item), and
    /// the box once nothing is left in it.
    fn drop_empty_rare(&mut self) {
        if let Some(r) = &mut self.rare {
            if r.revocations.is_empty() {
                r.revocations = Revocations::default();
                if r.flight.is_none() {
                    self.rare = None;
                }
            }
        }
    }
}

/// One shard of the users' entries. Callers hold the shard's lock while
/// using it.
#[derive(Debug)]
pub(crate) struct Table {
    /// Least recently used first. Nodes are allocated one by one and the
    /// map holds pointers to them, so growing it moves little; the std
    /// hasher keeps caller-chosen user ids from steering collisions.
    entries: LruCache<UserKey, Entry, RandomState>,
    pub in_flight: usize,
    /// Entries holding a revocation. (The hot path does not read it: the
    /// binding sends only the users `invalidate` marked to `begin`.)
    pub revoking: usize,
    /// Revoking entries by the time their last revocation lapses, soonest
    /// first: lets a bounded slice prune them in order, never by a scan.
    lapses: BinaryHeap<Reverse<(EpochMs, UserKey)>>,
    /// The most entries held since the map last gave room back.
    peak: usize,
    /// Entries and lapses every slice so far visited, for tests to bound.
    #[cfg(test)]
    pub visits: usize,
}

impl Default for Table {
    fn default() -> Self {
        Self {
            entries: LruCache::unbounded_with_hasher(RandomState::new()),
            in_flight: 0,
            revoking: 0,
            lapses: BinaryHeap::new(),
            peak: 0,
            #[cfg(test)]
            visits: 0,
        }
    }
}

/// What one slice of [`Table::evict`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eviction {
    /// Entries and revocation lapses looked at: at most the slice's budget.
    pub visited: usize,
    /// Entries dropped.
    pub evicted: usize,
    /// When there is more to do: `now` if the budget ran out first,
    /// otherwise when the oldest entry goes idle or the next revocation
    /// lapses. `None`: nothing to wait for (an empty table).
    pub next_due: Option<EpochMs>,
}

impl Table {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Runs `f` on the user's entry, creating it if needed, moves it to the
    /// new end, and keeps the revocation count true whatever `f` changes.
    pub fn with_entry<R>(
        &mut self,
        user: &str,
        now: EpochMs,
        f: impl FnOnce(&mut Entry, &mut usize) -> R,
    ) -> R {
        if let Some(e) = self.entries.get_mut(user) {
            return Books::of(&mut self.in_flight, &mut self.revoking, &mut self.lapses)
                .apply(user, e, now, f);
        }
        let mut e = Entry::new(now);
        let r = Books::of(&mut self.in_flight, &mut self.revoking, &mut self.lapses)
            .apply(user, &mut e, now, f);
        self.entries.push(UserKey::new(user), e);
        self.peak = self.peak.max(self.entries.len());
        r
    }

    /// Runs `f` on the user's entry only if there is one.
    pub fn with_existing<R>(
        &mut self,
        user: &str,
        now: EpochMs,
        f: impl FnOnce(&mut Entry, &mut usize) -> R,
    ) -> Option<R> {
        let e = self.entries.get_mut(user)?;
        Some(
            Books::of(&mut self.in_flight, &mut self.revoking, &mut self.lapses)
                .apply(user, e, now, f),
        )
    }

    /// A caller's slice of eviction: [`EVICT_PER_CALL`] entries at most,
    /// dropped in place.
    pub fn evict_on_call(&mut self, policy: &Policy, now: EpochMs) {
        self.evict(policy, now, EVICT_PER_CALL, |_, _| {});
    }

    /// One bounded slice of eviction at `now`: looks at no more than
    /// `budget` revocation lapses and entries, oldest first, pruning lapsed
    /// revocations and handing each entry idle for `idle_ttl_ms` (with no
    /// refresh in flight) to `evicted`. Never scans: it stops at the first
    /// entry still in use.
    pub fn evict(
        &mut self,
        policy: &Policy,
        now: EpochMs,
        budget: usize,
        mut evicted: impl FnMut(UserKey, Entry),
    ) -> Eviction {
        let mut visited = 0;
        let mut dropped = 0;
        let mut next_due = None;
        // Revocations first: while one is counted, every hot-path call
        // takes the slow path.
        while visited < budget {
            match self.lapses.peek() {
                None => break,
                Some(Reverse((due, _))) if *due > now => {
                    next_due = Some(*due);
                    break;
                }
                Some(_) => {}
            }
            let Some(Reverse((due, user))) = self.lapses.pop() else {
                break;
            };
            visited += 1;
            self.lapse(due, user, now);
        }
        let ttl = policy.idle_ttl_ms as i64;
        while visited < budget {
            let Some((_, e)) = self.entries.peek_lru() else {
                break;
            };
            let idle_at = e.last_used.saturating_add(ttl);
            if idle_at > now {
                next_due = Some(next_due.map_or(idle_at, |d: EpochMs| d.min(idle_at)));
                break;
            }
            visited += 1;
            let Some((user, mut e)) = self.entries.pop_lru() else {
                break;
            };
            if e.flight().is_some() {
                // Never evicted mid-refresh. A refresh running counts as a
                // use: the entry moves to the new end, out of the way of
                // the idle ones behind it, and is not looked at again for
                // another TTL.
                e.last_used = now;
                self.entries.push(user, e);
                continue;
            }
            self.revoking -= e.is_revoking() as usize;
            dropped += 1;
            evicted(user, e);
        }
        if visited == budget {
            next_due = Some(now);
        }
        #[cfg(test)]
        {
            self.visits += visited;
        }
        Eviction {
            visited,
            evicted: dropped,
            next_due,
        }
    }

    /// A revocation heap item fell due: prunes the entry it names (if it is
    /// still there and the item is its live one) and queues it again if a
    /// later revocation remains.
    fn lapse(&mut self, due: EpochMs, user: UserKey, now: EpochMs) {
        // Looked up without touching: a lapse is not a use.
        let Some(e) = self.entries.peek_mut(user.as_str()) else {
            return;
        };
        let Some(r) = e.revocations_mut() else {
            return;
        };
        if r.queued != Some(due) {
            return;
        }
        r.queued = None;
        e.prune(now);
        match e.revoked_until() {
            None => self.revoking -= 1,
            Some(until) => {
                if let Some(r) = e.revocations_mut() {
                    r.queued = Some(until);
                }
                self.lapses.push(Reverse((until, user)));
            }
        }
    }

    /// When this shard next has eviction work: its oldest entry goes idle
    /// or its next revocation lapses. `None` when it is empty.
    pub fn next_due(&self, policy: &Policy) -> Option<EpochMs> {
        let idle = self
            .entries
            .peek_lru()
            .map(|(_, e)| e.last_used.saturating_add(policy.idle_ttl_ms as i64));
        let lapse = self.lapses.peek().map(|Reverse((due, _))| *due);
        // The earlier of the two that exist.
        idle.into_iter().chain(lapse).min()
    }

    /// Gives the map's spare room back once a burst of users is gone and
    /// what is left is small enough to rehash quickly.
    pub fn shrink_if_sparse(&mut self) {
        let len = self.entries.len();
        if len <= SHRINK_MAX_LEN && self.peak > 4 * len.max(SHRINK_MIN_PEAK) {
            // lru shrinks its map only when the capacity changes: toggle
            // between two capacities no table reaches.
            let cap = if self.entries.cap().get() == usize::MAX {
                usize::MAX - 1
            } else {
                usize::MAX
            };
            self.entries
                .resize(NonZeroUsize::new(cap).expect("non-zero"));
            self.peak = len;
        }
        if self.lapses.is_empty() {
            self.lapses.shrink_to_fit();
        }
    }
}

#[cfg(test)]
impl Table {
    /// The revocation count the hard way, for tests to check the kept one.
    pub fn count_revoking(&self) -> usize {
        self.entries.iter().filter(|(_, e)| e.is_revoking()).count()
    }
}

/// The table's bookkeeping, borrowed beside one entry.
struct Books<'a> {
    in_flight: &'a mut usize,
    revoking: &'a mut usize,
    lapses: &'a mut BinaryHeap<Reverse<(EpochMs, UserKey)>>,
}

impl<'a> Books<'a> {
    fn of(
        in_flight: &'a mut usize,
        revoking: &'a mut usize,
        lapses: &'a mut BinaryHeap<Reverse<(EpochMs, UserKey)>>,
    ) -> Self {
        Self {
            in_flight,
            revoking,
            lapses,
        }
    }

    /// A use of `entry`: runs `f` and brings the counts and the lapse heap
    /// up to date with what it changed.
    fn apply<R>(
        self,
        user: &str,
        entry: &mut Entry,
        now: EpochMs,
        f: impl FnOnce(&mut Entry, &mut usize) -> R,
    ) -> R {
        entry.last_used = now;
        let was = entry.is_revoking();
        entry.prune(now);
        let r = f(entry, self.in_flight);
        let is = entry.is_revoking();
        *self.revoking = *self.revoking + is as usize - was as usize;
        if let Some(until) = entry.revoked_until() {
            if let Some(rv) = entry.revocations_mut().filter(|r| r.queued.is_none()) {
                rv.queued = Some(until);
                self.lapses.push(Reverse((until, UserKey::new(user))));
            }
        }
        r
    }
}

impl Entry {
    /// Marks a token bad until `until`, or every token when `fp` is `None`.
    pub fn revoke(&mut self, fp: Option<Fingerprint>, until: EpochMs) {
        let r = &mut self.rare.get_or_insert_with(Box::default).revocations;
        match fp {
            Some(fp) => {
                if let Some(t) = r.tokens.iter_mut().find(|t| t.fingerprint == fp) {
                    t.until = t.until.max(until);
                } else {
                    r.tokens.push(Revocation {
                        fingerprint: fp,
                        until,
                    });
                }
            }
            None => r.all_until = Some(until),
        }
    }

    /// A refresh completed: a blanket revocation has done its job.
    pub fn clear_revoke_all(&mut self) {
        if let Some(r) = self.revocations_mut() {
            r.all_until = None;
            self.drop_empty_rare();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_stay_small() {
        // Every user has one and the table moves them all when it grows.
        // 64 bytes keeps a node (key, entry, two list pointers) in one
        // 128-byte malloc chunk; 8 more would take a 144-byte one.
        let size = std::mem::size_of::<Entry>();
        assert!(size <= 64, "Entry is {size} bytes");
        assert_eq!(std::mem::size_of::<UserKey>(), 40);
    }

    #[test]
    fn the_rare_box_lasts_while_a_flight_or_a_revocation_does() {
        let flight = |id| Flight {
            id,
            refresh_token: None,
            started: 0,
        };
        let mut e = Entry::new(0);
        e.start_flight(flight(1));
        assert_eq!(e.flight().map(|f| f.id), Some(1));
        assert!(!e.is_revoking());
        assert_eq!(e.take_flight().map(|f| f.id), Some(1));
        assert!(e.rare.is_none(), "no flight, no revocation: no box");
        e.start_flight(flight(2));
        e.revoke(None, 100);
        e.take_flight();
        assert!(
            e.is_revoking() && e.flight().is_none(),
            "the revocation stays"
        );
        e.start_flight(flight(3));
        e.clear_revoke_all();
        assert!(!e.is_revoking() && e.flight().is_some(), "the flight stays");
        e.take_flight();
        assert!(e.rare.is_none());
    }

    #[test]
    fn revocations_live_out_of_line_only_while_they_last() {
        let (a, b) = (Fingerprint::of("a"), Fingerprint::of("b"));
        let mut e = Entry::new(0);
        assert!(!e.is_revoking() && !e.is_revoked(a, 0));
        e.revoke(Some(a), 100);
        assert!(e.is_revoked(a, 50) && !e.is_revoked(b, 50) && e.is_revoking());
        e.revoke(None, 80);
        assert!(e.is_revoked(b, 50));
        e.clear_revoke_all();
        assert!(!e.is_revoked(b, 50) && e.is_revoked(a, 50));
        e.prune(100);
        assert!(
            !e.is_revoked(a, 100) && !e.is_revoking(),
            "expired marks are dropped"
        );
        e.revoke(None, 10);
        e.clear_revoke_all();
        assert!(!e.is_revoking());
    }
}
