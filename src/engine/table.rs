//! Per-user state: the token a refresh produced, the refresh in flight,
//! revoked tokens, and eviction of users nobody has asked about lately.

use std::collections::HashMap;

use super::policy::{EpochMs, Policy};
use super::secret::{Fingerprint, SecretString};
use super::token::Held;

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

/// An entry's revocations; rare, so kept out of line.
#[derive(Debug, Default)]
struct Revocations {
    tokens: Vec<Revocation>,
    /// `invalidate(userId)` without a token: the next call refreshes whatever
    /// it presents, until a refresh completes.
    all_until: Option<EpochMs>,
}

/// One user's state. Rarely used parts (a refresh in flight, revocations)
/// are boxed: every user has an entry, and the table moves all of them
/// when it grows.
#[derive(Debug)]
pub(crate) struct Entry {
    pub held: Option<Held>,
    pub flight: Option<Box<Flight>>,
    pub last_refresh: Option<EpochMs>,
    /// `None` when nothing is revoked (never an empty box).
    revocations: Option<Box<Revocations>>,
    last_used: EpochMs,
}

impl Entry {
    fn new(now: EpochMs) -> Self {
        Self {
            held: None,
            flight: None,
            last_refresh: None,
            revocations: None,
            last_used: now,
        }
    }

    pub fn is_revoked(&self, fp: Fingerprint, now: EpochMs) -> bool {
        self.revocations.as_ref().is_some_and(|r| {
            r.all_until.is_some_and(|u| u > now)
                || r.tokens
                    .iter()
                    .any(|t| t.fingerprint == fp && t.until > now)
        })
    }

    /// Whether this entry holds any revocation.
    pub fn is_revoking(&self) -> bool {
        self.revocations.is_some()
    }

    fn prune(&mut self, now: EpochMs) {
        if let Some(r) = &mut self.revocations {
            r.tokens.retain(|t| t.until > now);
            if r.all_until.is_some_and(|u| u <= now) {
                r.all_until = None;
            }
            self.drop_empty_revocations();
        }
    }

    fn drop_empty_revocations(&mut self) {
        if self
            .revocations
            .as_ref()
            .is_some_and(|r| r.tokens.is_empty() && r.all_until.is_none())
        {
            self.revocations = None;
        }
    }
}

/// All users' entries. Callers hold the engine's lock while using it.
#[derive(Debug, Default)]
pub(crate) struct Table {
    /// Boxed: the map's slots stay small (24 bytes), so growing it moves
    /// little, and a new user's entry is written where the allocator puts
    /// it rather than into a random slot of a large table.
    entries: HashMap<Box<str>, Box<Entry>>,
    last_sweep: EpochMs,
    pub in_flight: usize,
}

impl Table {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Runs `f` on the user's entry, creating it if needed.
    pub fn with_entry<R>(
        &mut self,
        user: &str,
        now: EpochMs,
        f: impl FnOnce(&mut Entry, &mut usize) -> R,
    ) -> R {
        let entry = match self.entries.get_mut(user) {
            Some(e) => e,
            None => self
                .entries
                .entry(user.into())
                .or_insert_with(|| Box::new(Entry::new(now))),
        };
        entry.last_used = now;
        entry.prune(now);
        f(entry, &mut self.in_flight)
    }

    /// Runs `f` on the user's entry only if there is one.
    pub fn with_existing<R>(
        &mut self,
        user: &str,
        now: EpochMs,
        f: impl FnOnce(&mut Entry, &mut usize) -> R,
    ) -> Option<R> {
        if self.entries.contains_key(user) {
            Some(self.with_entry(user, now, f))
        } else {
            None
        }
    }

    /// Drops entries idle for `idle_ttl_ms` with no refresh in flight. Runs at
    /// most every half TTL, so its cost is spread over many calls.
    pub fn maybe_sweep(&mut self, policy: &Policy, now: EpochMs) {
        let interval = (policy.idle_ttl_ms / 2).max(1) as i64;
        if now.saturating_sub(self.last_sweep) >= interval {
            self.sweep(policy, now);
        }
    }

    pub fn sweep(&mut self, policy: &Policy, now: EpochMs) {
        self.last_sweep = now;
        let ttl = policy.idle_ttl_ms as i64;
        self.entries.retain(|_, e| {
            e.prune(now);
            e.flight.is_some() || now.saturating_sub(e.last_used) < ttl
        });
        // A burst of users can leave a large, mostly empty map behind.
        if self.entries.capacity() > 64 && self.entries.len() < self.entries.capacity() / 4 {
            self.entries.shrink_to_fit();
        }
    }
}

impl Entry {
    /// Marks a token bad until `until`, or every token when `fp` is `None`.
    pub fn revoke(&mut self, fp: Option<Fingerprint>, until: EpochMs) {
        let r = self.revocations.get_or_insert_with(Box::default);
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
        if let Some(r) = &mut self.revocations {
            r.all_until = None;
            self.drop_empty_revocations();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_stay_small() {
        // Every user has one and the table moves them all when it grows.
        let size = std::mem::size_of::<Entry>();
        assert!(size <= 112, "Entry is {size} bytes");
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
