//! Per-user state: the token a refresh produced, the refresh in flight,
//! revoked tokens, and eviction of users nobody has asked about lately.

use std::collections::HashMap;

use super::policy::{EpochMs, Policy};
use super::secret::{Fingerprint, SecretString};

/// A token a refresh in this process produced.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub access: SecretString,
    pub refresh: Option<SecretString>,
    pub expires_at: EpochMs,
    pub fingerprint: Fingerprint,
    /// Whether the refresh itself returned `refresh` (rotation), as opposed
    /// to keeping the one it was called with.
    pub refresh_is_new: bool,
}

/// The refresh currently running for a user.
#[derive(Debug)]
pub(crate) struct Flight {
    pub id: u32,
    /// The refresh token the refresh was started with: kept when the
    /// provider does not rotate it.
    pub refresh_token: Option<SecretString>,
}

#[derive(Debug)]
struct Revocation {
    fingerprint: Fingerprint,
    until: EpochMs,
}

#[derive(Debug)]
pub(crate) struct Entry {
    pub held: Option<Held>,
    pub flight: Option<Flight>,
    pub last_refresh: Option<EpochMs>,
    revoked: Vec<Revocation>,
    /// `invalidate(userId)` without a token: the next call refreshes whatever
    /// it presents, until a refresh completes.
    revoke_all_until: Option<EpochMs>,
    last_used: EpochMs,
}

impl Entry {
    fn new(now: EpochMs) -> Self {
        Self {
            held: None,
            flight: None,
            last_refresh: None,
            revoked: Vec::new(),
            revoke_all_until: None,
            last_used: now,
        }
    }

    pub fn is_revoked(&self, fp: Fingerprint, now: EpochMs) -> bool {
        self.revoke_all_until.is_some_and(|u| u > now)
            || self
                .revoked
                .iter()
                .any(|r| r.fingerprint == fp && r.until > now)
    }

    /// Whether this entry makes the hot path look users up.
    fn is_revoking(&self) -> bool {
        self.revoke_all_until.is_some() || !self.revoked.is_empty()
    }

    fn prune(&mut self, now: EpochMs) {
        self.revoked.retain(|r| r.until > now);
        if self.revoke_all_until.is_some_and(|u| u <= now) {
            self.revoke_all_until = None;
        }
    }
}

/// All users' entries. Callers hold the engine's lock while using it.
#[derive(Debug, Default)]
pub(crate) struct Table {
    entries: HashMap<Box<str>, Entry>,
    last_sweep: EpochMs,
    pub in_flight: usize,
    /// Entries holding a revocation. While non-zero the hot path cannot
    /// decide on the expiry alone.
    pub revoking: usize,
}

impl Table {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Runs `f` on the user's entry, creating it if needed, and keeps the
    /// revocation count true whatever `f` changes.
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
                .or_insert_with(|| Entry::new(now)),
        };
        entry.last_used = now;
        let was = entry.is_revoking();
        entry.prune(now);
        let r = f(entry, &mut self.in_flight);
        let is = entry.is_revoking();
        self.revoking = self.revoking + is as usize - was as usize;
        r
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
        let mut revoking = 0;
        self.entries.retain(|_, e| {
            e.prune(now);
            let keep = e.flight.is_some() || now.saturating_sub(e.last_used) < ttl;
            revoking += (keep && e.is_revoking()) as usize;
            keep
        });
        self.revoking = revoking;
        // A burst of users can leave a large, mostly empty map behind.
        if self.entries.capacity() > 64 && self.entries.len() < self.entries.capacity() / 4 {
            self.entries.shrink_to_fit();
        }
    }
}

impl Entry {
    /// Marks a token bad until `until`, or every token when `fp` is `None`.
    pub fn revoke(&mut self, fp: Option<Fingerprint>, until: EpochMs) {
        match fp {
            Some(fp) => {
                if let Some(r) = self.revoked.iter_mut().find(|r| r.fingerprint == fp) {
                    r.until = r.until.max(until);
                } else {
                    self.revoked.push(Revocation {
                        fingerprint: fp,
                        until,
                    });
                }
            }
            None => self.revoke_all_until = Some(until),
        }
    }

    /// A refresh completed: a blanket revocation has done its job.
    pub fn clear_revoke_all(&mut self) {
        self.revoke_all_until = None;
    }
}
