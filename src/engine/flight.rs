//! Single flight: per user, one refresh at a time, and everyone who asked
//! while it ran gets its result. Also the rules for handing out a token a
//! refresh already produced (lost writes heal) and for failures.

use std::sync::atomic::Ordering::Relaxed;

use super::error::{EngineError, ErrorCode};
use super::policy::{EpochMs, Policy};
use super::secret::{Fingerprint, SecretString};
use super::table::Flight;
use super::token::{Held, HeldTokens, Issued, IssuedBrief, Presented, Refreshed};
use super::{time, validate_user, Engine, MAX_TOKEN_BYTES};

/// What the caller of [`Engine::begin`] should do.
#[derive(Debug)]
pub enum Plan {
    /// The presented token is good: hand it back, `shouldUpdate: false`.
    UsePresented,
    /// A token a refresh already produced is better than the presented one.
    UseHeld(Issued),
    /// Another call is refreshing: wait for flight `id`, `shouldUpdate: false`.
    Join(u32),
    /// Run the refresh (with this refresh token) and report back with
    /// [`Engine::complete`], [`Engine::adopt`] or [`Engine::fail`] for
    /// flight `id`.
    Lead {
        id: u32,
        refresh_token: Option<SecretString>,
    },
}

/// Where a token handed to `Engine::settle` came from.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// A refresh this process ran.
    Refresh,
    /// Another instance's refresh, through the shared cache.
    Shared { should_update: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The refresh rejected or threw.
    Rejected,
    /// The refresh did not settle within the refresh timeout.
    TimedOut,
}

impl Engine {
    /// Decides what a call presenting a token for `user` should do: the
    /// access token's emptiness, its refresh token and expiry are given;
    /// `fingerprint` (of the access token) runs at most once, under the
    /// table lock, and only when the user holds a token to compare it with
    /// or has revocations. A user with neither (a new one, or one evicted
    /// since its last refresh) is decided on the expiry alone, so the
    /// binding need not copy and hash a 1 KB JWT.
    pub fn begin(
        &self,
        user: &str,
        access_is_empty: bool,
        refresh: Option<&SecretString>,
        expires_at: EpochMs,
        fingerprint: impl FnOnce() -> Result<Fingerprint, EngineError>,
        now: EpochMs,
    ) -> Result<Plan, EngineError> {
        self.begin_ahead(
            user,
            access_is_empty,
            refresh,
            expires_at,
            fingerprint,
            now,
            0,
        )
    }

    /// [`Engine::begin`] for a refresh ahead of need: tokens are judged
    /// fresh or not as of `ahead_ms` after `now` (the moment the caller's
    /// token enters its buffer), so a token still fresh now can be
    /// refreshed early, once, under the same single flight. A held token
    /// is used only if it is fresh then; the double-check window does not
    /// apply (the refresh is not redundant, it is early on purpose).
    #[allow(clippy::too_many_arguments)]
    pub fn begin_ahead(
        &self,
        user: &str,
        access_is_empty: bool,
        refresh: Option<&SecretString>,
        expires_at: EpochMs,
        fingerprint: impl FnOnce() -> Result<Fingerprint, EngineError>,
        now: EpochMs,
        ahead_ms: EpochMs,
    ) -> Result<Plan, EngineError> {
        validate_user(user)?;
        let policy = self.policy;
        let at = now.saturating_add(ahead_ms.max(0));
        let mut fp = OnceFingerprint::Pending(fingerprint);
        let mut t = self.table(user, now);
        t.evict_on_call(&policy, now);
        let plan = t.with_entry(user, now, |e, in_flight| {
            let presented_revoked = e.is_revoking() && e.is_revoked(fp.get()?, now);
            if !access_is_empty && !presented_revoked {
                if policy.is_fresh(expires_at, at) {
                    return Ok(Plan::UsePresented);
                }
                // The token this engine issued, whose lifetime it knows:
                // measured against its own buffer (Policy::buffer_for).
                if let Some(h) = &e.held {
                    if h.expires_at == expires_at
                        && policy.is_fresh_for(expires_at, h.lifetime(), at)
                        && h.fingerprint == fp.get()?
                    {
                        return Ok(Plan::UsePresented);
                    }
                }
            }
            // The presented token is due, expired or revoked. A token a
            // refresh already produced may do: it is fresh, or the refresh
            // was so recent that another would be redundant.
            if let Some(h) = &e.held {
                let recent = ahead_ms <= 0 && policy.within_double_check(h.refreshed_at, now);
                let usable = !e.is_revoked(h.fingerprint, now)
                    && (policy.is_fresh_for(h.expires_at, h.lifetime(), at)
                        || (recent && policy.is_unexpired(h.expires_at, now)));
                if usable {
                    return Ok(Plan::UseHeld(h.issue(h.fingerprint != fp.get()?)));
                }
            }
            if let Some((id, started)) = e.flight().map(|f| (f.id, f.started)) {
                if !policy.is_overdue(started, now) {
                    return Ok(Plan::Join(id));
                }
                // Its caller lost it: close it, as a timeout, and lead anew.
                e.take_flight();
                *in_flight -= 1;
                self.counters.timeouts.fetch_add(1, Relaxed);
            }
            // Refresh with the newest refresh token known: a rotated one we
            // hold beats the caller's unless the caller's token is newer.
            let refresh_token = match &e.held {
                Some(h) if h.expires_at >= expires_at && h.tokens.refresh().is_some() => {
                    h.tokens.refresh().map(SecretString::from)
                }
                _ => refresh.cloned(),
            };
            let id = self.next_flight.fetch_add(1, Relaxed);
            e.start_flight(Flight {
                id,
                refresh_token: refresh_token.clone(),
                started: now,
            });
            *in_flight += 1;
            Ok(Plan::Lead { id, refresh_token })
        });
        drop(t);
        let plan = plan?;
        match &plan {
            Plan::UsePresented | Plan::UseHeld(_) => self.counters.hits.fetch_add(1, Relaxed),
            Plan::Join(_) => self.counters.coalesced.fetch_add(1, Relaxed),
            Plan::Lead { .. } => 0,
        };
        Ok(plan)
    }

    /// The refresh for flight `id` produced `refreshed`. Validates it, keeps
    /// it for the user and tells the leader, who still has the tokens it
    /// handed in, what it lacks: the issued expiry, and whether it is handed
    /// the refresh token (only a rotated one is news). The leader's token
    /// always has `shouldUpdate`. A late result (its flight timed out) is
    /// still kept if it is the newest: with rotating refresh tokens it may
    /// hold the only live one.
    pub fn complete(
        &self,
        user: &str,
        id: u32,
        refreshed: Refreshed,
        now: EpochMs,
    ) -> Result<IssuedBrief, EngineError> {
        self.settle(
            user,
            id,
            refreshed,
            Source::Refresh,
            now,
            |h, should_update| IssuedBrief {
                expires_at: h.expires_at,
                hands_refresh: h.hands_refresh(should_update),
            },
        )
    }

    /// Flight `id` was answered by a token another instance's refresh
    /// produced (the shared cache): kept like [`Engine::complete`] keeps a
    /// refresh result, but counted as a hit (`should_update`: it was there
    /// before this call asked) or as coalesced (this call waited on that
    /// refresh), never as a refresh of ours.
    pub fn adopt(
        &self,
        user: &str,
        id: u32,
        shared: Refreshed,
        should_update: bool,
        now: EpochMs,
    ) -> Result<Issued, EngineError> {
        self.settle(
            user,
            id,
            shared,
            Source::Shared { should_update },
            now,
            Held::issue,
        )
    }

    fn settle<T>(
        &self,
        user: &str,
        id: u32,
        refreshed: Refreshed,
        source: Source,
        now: EpochMs,
        issue: impl FnOnce(&Held, bool) -> T,
    ) -> Result<T, EngineError> {
        validate_user(user)?;
        let checked = validate_refreshed(refreshed, now, self.policy());
        let mut t = self.table(user, now);
        let result = t.with_entry(user, now, |e, in_flight| {
            let ours = e.flight().is_some_and(|f| f.id == id);
            let used = if ours {
                *in_flight -= 1;
                e.take_flight().and_then(|f| f.refresh_token)
            } else {
                None
            };
            let (access, refresh, expires_at) = checked?;
            let refresh_is_new = refresh.is_some();
            let refresh = refresh.or(used);
            // Copied into one buffer; `access` and `refresh` wipe
            // themselves as they drop.
            let tokens = HeldTokens::new(
                access.expose(),
                refresh.as_ref().map(SecretString::expose),
                refresh_is_new,
            )
            .ok_or(EngineError::InvalidRefreshResult(
                "has a token longer than 65536 bytes",
            ))?;
            let held = Held {
                fingerprint: access.fingerprint(),
                tokens,
                expires_at,
                refreshed_at: now,
            };
            let issued = issue(
                &held,
                match source {
                    Source::Refresh => true,
                    Source::Shared { should_update } => should_update,
                },
            );
            let newer = e
                .held
                .as_ref()
                .is_none_or(|h| h.expires_at <= held.expires_at);
            if ours || newer {
                e.held = Some(held);
                e.clear_revoke_all();
            }
            Ok(issued)
        });
        drop(t);
        let c = &self.counters;
        match (&result, source) {
            (Ok(_), Source::Refresh) => c.refreshes.fetch_add(1, Relaxed),
            (
                Ok(_),
                Source::Shared {
                    should_update: true,
                },
            ) => c.hits.fetch_add(1, Relaxed),
            (
                Ok(_),
                Source::Shared {
                    should_update: false,
                },
            ) => c.coalesced.fetch_add(1, Relaxed),
            (Err(_), _) => c.failures.fetch_add(1, Relaxed),
        };
        result
    }

    /// Whether `token` was marked bad for `user` by [`Engine::invalidate`].
    /// Looks only; never creates an entry.
    pub fn is_revoked(&self, user: &str, token: &SecretString, now: EpochMs) -> bool {
        let fp = token.fingerprint();
        self.table(user, now)
            .with_existing(user, now, |e, _| e.is_revoked(fp, now))
            .unwrap_or(false)
    }

    /// The refresh for flight `id` failed. Nothing is cached; the next call
    /// tries again.
    pub fn fail(&self, user: &str, id: u32, failure: Failure, now: EpochMs) {
        let mut t = self.table(user, now);
        t.with_existing(user, now, |e, in_flight| {
            if e.flight().is_some_and(|f| f.id == id) {
                e.take_flight();
                *in_flight -= 1;
            }
        });
        drop(t);
        match failure {
            Failure::Rejected => self.counters.failures.fetch_add(1, Relaxed),
            Failure::TimedOut => self.counters.timeouts.fetch_add(1, Relaxed),
        };
    }

    /// After a refresh failed with `code`: may this caller keep using its
    /// own token? Only after an outage (the refresh failed or timed out, or
    /// Redis could not coordinate it: serving a token runs no refresh), and
    /// only while the token has not expired and was not revoked. A verdict
    /// (reconnect, bad credentials, a buggy result) is never ridden out:
    /// hiding it would only delay the fix. Counts `staleServed`.
    pub fn serve_stale(
        &self,
        user: &str,
        presented: &Presented,
        code: ErrorCode,
        now: EpochMs,
    ) -> bool {
        let outage = matches!(
            code,
            ErrorCode::RefreshFailed
                | ErrorCode::RefreshTimeout
                | ErrorCode::CoordinatorUnavailable
        );
        if !outage
            || presented.access.is_empty()
            || !self.policy.is_unexpired(presented.expires_at, now)
        {
            return false;
        }
        let fp = presented.access.fingerprint();
        let revoked = self
            .table(user, now)
            .with_existing(user, now, |e, _| e.is_revoked(fp, now))
            .unwrap_or(false);
        if !revoked {
            self.counters.stale_served.fetch_add(1, Relaxed);
        }
        !revoked
    }
}

/// The presented access token's fingerprint, computed on first use, at
/// most once.
enum OnceFingerprint<F> {
    Pending(F),
    Ready(Fingerprint),
    Spent,
}

impl<F: FnOnce() -> Result<Fingerprint, EngineError>> OnceFingerprint<F> {
    fn get(&mut self) -> Result<Fingerprint, EngineError> {
        if let OnceFingerprint::Ready(fp) = self {
            return Ok(*fp);
        }
        let OnceFingerprint::Pending(f) = std::mem::replace(self, OnceFingerprint::Spent) else {
            unreachable!("a failed fingerprint is not asked for again");
        };
        let fp = f()?;
        *self = OnceFingerprint::Ready(fp);
        Ok(fp)
    }
}

// The message above names the limit.
const _: () = assert!(MAX_TOKEN_BYTES == 65_536);

pub(crate) fn validate_refreshed(
    r: Refreshed,
    now: EpochMs,
    policy: &Policy,
) -> Result<(SecretString, Option<SecretString>, EpochMs), EngineError> {
    let access = match r.access {
        Some(a) if !a.is_empty() => a,
        _ => {
            return Err(EngineError::InvalidRefreshResult(
                "has no non-empty string accessToken",
            ))
        }
    };
    let expires_at = match (r.expires_at, r.expires_in) {
        (Some(at), _) => time::js_ms(at).ok_or(EngineError::InvalidRefreshResult(
            "has an expiresAt that is not a valid Date",
        ))?,
        (None, Some(secs)) => time::from_expires_in("expiresIn", secs, now).map_err(|_| {
            EngineError::InvalidRefreshResult(if secs > time::MAX_EXPIRES_IN_S {
                // 1e12 is a date in epoch ms, not a lifetime.
                "has an expiresIn too large (over 1e10 seconds): expiresIn is the token's lifetime in seconds (e.g. 3600); a date goes in expiresAt"
            } else {
                "has an expiresIn that is not a positive number of seconds"
            })
        })?,
        (None, None) => {
            return Err(EngineError::InvalidRefreshResult(
                "has neither expiresAt nor expiresIn",
            ))
        }
    };
    if expires_at <= now {
        return Err(EngineError::InvalidRefreshResult("expires in the past"));
    }
    let expires_at = policy.capped(expires_at, now);
    let refresh = r.refresh.filter(|s| !s.is_empty());
    let too_long = |t: &SecretString| t.expose().len() > MAX_TOKEN_BYTES;
    if too_long(&access) || refresh.as_ref().is_some_and(too_long) {
        return Err(EngineError::InvalidRefreshResult(
            "has a token longer than 65536 bytes",
        ));
    }
    Ok((access, refresh, expires_at))
}

#[cfg(test)]
mod single_flight {
    use super::*;
    use crate::engine::tests::AsTheBindingCalls;
    use crate::engine::Policy;

    fn presented(access: &str, expires_at: EpochMs) -> Presented {
        Presented {
            access: access.into(),
            refresh: Some("r0".into()),
            expires_at,
        }
    }

    fn token(access: &str, expires_at: EpochMs) -> Refreshed {
        Refreshed {
            access: Some(access.into()),
            refresh: Some("r1".into()),
            expires_at: Some(expires_at as f64),
            expires_in: None,
        }
    }

    #[test]
    fn begin_reads_the_access_token_only_when_needed() {
        use std::cell::Cell;
        let engine = Engine::new(Policy::default());
        let now = 1_000_000;
        let reads = Cell::new(0);
        let read = |t: &'static str| {
            let reads = &reads;
            move || {
                reads.set(reads.get() + 1);
                Ok(Fingerprint::of(t))
            }
        };
        let r0 = SecretString::from("r0");
        // A new user: the expiry decides.
        let Plan::Lead { id, refresh_token } = engine
            .begin("u", false, Some(&r0), now, read("t0"), now)
            .unwrap()
        else {
            panic!("lead")
        };
        assert_eq!((reads.get(), refresh_token), (0, Some(r0.clone())));
        engine
            .complete_with("u", id, token("t1", now + 3_600_000), now)
            .unwrap();
        // A held token: the presented one is compared with it.
        let plan = engine
            .begin("u", false, Some(&r0), now, read("t0"), now)
            .unwrap();
        assert!(matches!(plan, Plan::UseHeld(ref t) if t.should_update));
        let plan = engine
            .begin("u", false, Some(&r0), now, read("t1"), now)
            .unwrap();
        assert!(matches!(plan, Plan::UseHeld(ref t) if !t.should_update));
        assert_eq!(reads.get(), 2);
        // A token that cannot be read fails the call and starts nothing.
        engine.invalidate("u", Some(&"t1".into()), now).unwrap();
        let unreadable = || {
            Err(EngineError::invalid_argument(
                "token.accessToken",
                "could not be read",
            ))
        };
        assert!(engine
            .begin("u", false, Some(&r0), now, unreadable, now)
            .is_err());
        assert_eq!(engine.stats(now).in_flight, 0);
    }

    #[test]
    fn adopted_tokens_are_held_and_counted_as_hits_or_coalesced() {
        let engine = Engine::new(Policy {
            buffer_ms: 1_000,
            ..Policy::default()
        });
        let now = 1_000_000;
        let Plan::Lead { id, .. } = engine.begin_with("u", &presented("t0", now), now).unwrap()
        else {
            panic!("lead")
        };
        let issued = engine
            .adopt("u", id, token("t1", now + 60_000), false, now)
            .unwrap();
        assert!(!issued.should_update);
        assert_eq!(issued.access.expose(), "t1");
        // A later caller still presenting the old token is told to update.
        let Plan::UseHeld(held) = engine
            .begin_with("u", &presented("t0", now), now + 1)
            .unwrap()
        else {
            panic!("held")
        };
        assert!(held.should_update);
        assert_eq!(held.refresh.as_ref().map(SecretString::expose), Some("r1"));

        let Plan::Lead { id, .. } = engine.begin_with("v", &presented("t0", now), now).unwrap()
        else {
            panic!("lead")
        };
        assert!(
            engine
                .adopt("v", id, token("t1", now + 60_000), true, now)
                .unwrap()
                .should_update
        );
        let s = engine.stats(now);
        assert_eq!((s.refreshes, s.coalesced, s.in_flight), (0, 1, 0));
        assert_eq!(s.hits, 2, "the held hand-out and the adopted cached token");
    }

    #[test]
    fn revocation_is_looked_up_without_creating_entries() {
        let engine = Engine::new(Policy::default());
        let now = 1_000_000;
        assert!(!engine.is_revoked("u", &"t".into(), now));
        assert_eq!(engine.stats(now).users, 0);
        engine.invalidate("u", Some(&"t".into()), now).unwrap();
        assert!(engine.is_revoked("u", &"t".into(), now));
        assert!(!engine.is_revoked("u", &"other".into(), now));
    }
}
