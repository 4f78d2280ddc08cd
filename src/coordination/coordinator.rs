//! The cross-instance refresh flow. An instance's in-process leader (the
//! engine's single flight picked it) calls [`Coordinator::acquire`]:
//!
//! 1. one script reads the shared cache and, when it holds no usable token,
//!    takes the user's lock (`lock.rs`): one round trip;
//! 2. a usable cached token comes back as [`Outcome::Shared`], no refresh;
//! 3. the lock comes back as [`Outcome::Lead`]: the caller refreshes, then
//!    [`Coordinator::commit`]s (fenced write + announce + unlock: one round
//!    trip) or [`Coordinator::release`]s; a watchdog extends the lock while
//!    the refresh runs, up to the caller's deadline;
//! 4. a lock held elsewhere means waiting for its announcement on pub/sub,
//!    or for the lock's remaining TTL if none comes (a holder that died),
//!    then asking again. Nothing waits past the caller's deadline.
//!
//! Redis failing at any step yields [`Outcome::Unavailable`]; what to do
//! then (refresh locally or fail) is the caller's policy. A refresh that
//! spends a refresh token is also held back by the restart guard
//! (`health.rs`) on a server that may have lost the fleet's locks: if the
//! guard ends in time ([`health::can_wait`]), it waits, holding the lock
//! meanwhile (callers after it queue behind it), then asks again; else it
//! is `Unavailable` (`NewServer`) too. A result that could not be
//! written is written again in the background as soon as Redis answers,
//! within the guard's grace.
//!
//! [`Coordinator::invalidate`] marks a stored token bad and tells the other
//! instances, whose [`Coordinator::on_invalidated`] listener hears it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::cache;
use super::connection::{Connection, Unavailable, OP_TIMEOUT};
use super::health;
use super::keys::{Keys, UserKeys};
use super::lock::{self, Acquire, Answer, Extended, Guard, Want};
use super::pubsub;
use super::record::{self, Invalidation, Lease, Notice, Record};
use super::seal::{self, SealKeys, SharedToken};
use crate::engine::time::CallerNow;
use crate::engine::{EpochMs, Presented, SecretString};

/// Timing the coordinator shares with the engine's policy.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The per-user lock's TTL (extended while its holder refreshes).
    pub lock_ttl_ms: u64,
    /// A cached token is fresh when more than this remains (the buffer).
    pub buffer_ms: u64,
    /// A token written this recently is used while unexpired, fresh or not.
    pub double_check_window_ms: u64,
    /// A record outlives its token by this much, so a caller presenting an
    /// older token is still handed the newest (and its refresh token).
    pub retention_ms: u64,
    /// Longest a refresh may run: the fence counter outlives it.
    pub refresh_timeout_ms: u64,
}

/// Whether the refresh a lock is asked for would send a refresh token,
/// which decides whether the restart guard (`health.rs`) applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshTokenUse {
    /// Never (client credentials), or the caller's policy accepts the risk
    /// (`onError: 'local'`): no guard.
    Never,
    /// Only one the cache hands over: while guarded, none is.
    IfHandedOver,
    /// The caller's own: no lock while guarded.
    Sends,
}

/// What to do when Redis cannot coordinate a refresh: the `onError`
/// option. The one place its rules live; `lib/coordination.js` carries out
/// the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Refuse a refresh that would send the caller's refresh token (an
    /// uncoordinated one may spend a token another instance is spending:
    /// with rotation, the provider then revokes the grant); run the others
    /// in-process.
    #[default]
    Auto,
    /// Run every refresh in-process: the application accepts the risk.
    Local,
    /// Run none.
    Fail,
}

/// What a refresh Redis could not coordinate does instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenUnavailable {
    /// Runs in this process only.
    Fallback,
    /// Does not run: the caller gets `COORDINATOR_UNAVAILABLE` (or keeps
    /// its own unexpired token), with this reason.
    Refuse(&'static str),
}

impl OnError {
    /// `'auto' | 'local' | 'fail'`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "local" => Some(Self::Local),
            "fail" => Some(Self::Fail),
            _ => None,
        }
    }

    /// Whether a refresh would send a refresh token, as the restart guard
    /// weighs it: never for refresh functions that send none (client
    /// credentials, `may_use` false) or when the application accepts the
    /// risk (`Local`); else the caller's own if it presented one, or only
    /// one the shared cache hands over.
    pub fn refresh_token_use(self, may_use: bool, presented: bool) -> RefreshTokenUse {
        match (self, may_use, presented) {
            (OnError::Local, _, _) | (_, false, _) => RefreshTokenUse::Never,
            (_, true, true) => RefreshTokenUse::Sends,
            (_, true, false) => RefreshTokenUse::IfHandedOver,
        }
    }

    /// What a refresh that would use refresh tokens as `uses` says does
    /// when Redis cannot coordinate it.
    pub fn when_unavailable(self, uses: RefreshTokenUse) -> WhenUnavailable {
        match (self, uses) {
            (OnError::Fail, _) => WhenUnavailable::Refuse("cannot coordinate the refresh"),
            (OnError::Auto, RefreshTokenUse::Sends) => WhenUnavailable::Refuse(
                "a refresh that spends a refresh token runs only under a Redis lock",
            ),
            _ => WhenUnavailable::Fallback,
        }
    }
}

#[derive(Debug)]
pub enum Outcome {
    /// Use this token without refreshing. `waited`: it was written while this
    /// call waited on another instance's refresh (so that refresh's caller
    /// persists it); otherwise it was already there when this call asked.
    Shared {
        token: SharedToken,
        waited: bool,
    },
    /// The lock is ours: refresh, then commit or release `lease`. `refresh`
    /// is a newer refresh token than the caller's, from the cache.
    Lead {
        lease: Lease,
        refresh: Option<SecretString>,
    },
    /// The refresh this call waited on failed in another instance.
    Failed,
    /// The deadline passed while another instance held the lock.
    TimedOut,
    Unavailable(Unavailable),
}

#[derive(Debug)]
pub struct Acquired {
    pub outcome: Outcome,
    /// A cached value did not open with our key (rotated?): treated as a miss.
    pub undecryptable: bool,
}

#[derive(Debug)]
pub struct Coordinator {
    conn: Arc<Connection>,
    keys: Keys,
    seal: Arc<SealKeys>,
    timing: Timing,
    watchdogs: Arc<Mutex<HashMap<String, AbortHandle>>>,
    /// Names this instance in its `invalidate` announcements.
    origin: u128,
    /// `redis.upgrading`: write records earlier releases can open (sealed
    /// version 1, bound to the user only) while they share the Redis.
    upgrading: bool,
    /// `redis.upgrading` with `userIdKey`: instances naming users by the
    /// unkeyed hash share the Redis, so every refresh takes the unkeyed lock
    /// (theirs) first, then the keyed one, and every write and notice goes
    /// under both names (see [`Coordinator::acquire`]).
    unkeyed_too: bool,
}

/// What asking for the keyed lock under the unkeyed one found.
enum Keyed {
    Locked {
        fence: u64,
        stale: Option<Record>,
        guard_ms: u64,
    },
    Shared(SharedToken),
    Busy {
        waiting: pubsub::Waiting,
        lock_ttl_ms: u64,
        fence: u64,
    },
    /// Its restart guard holds locks back for this many more ms.
    Guarded(u64),
    TimedOut,
    Unavailable(Unavailable),
}

/// What a wait on another holder's announcement ended with.
enum Woken {
    Shared(SharedToken),
    Failed,
    /// Ask again (skipping this fence's record, if one: found unusable).
    Again(Option<u64>),
}

/// `notice` about user `id`, for `channel`, signed with the first key, sent now (system
/// clock) with a fresh random id: what the scripts publish.
fn signed(seal: &SealKeys, channel: &str, id: &str, notice: &Notice) -> Vec<u8> {
    seal.sign_notice(
        channel,
        &record::encode_notice(id, notice),
        pubsub::system_now(),
        rand::random(),
    )
}

/// The first error of two steps, else the later step's answer.
fn either_failed(
    before: Result<bool, Unavailable>,
    now: Result<bool, Unavailable>,
) -> Result<bool, Unavailable> {
    match before {
        Err(e) => Err(e),
        Ok(_) => now,
    }
}

/// Associated data of a sealed invalidation: not confusable with a token.
fn invalidation_aad(id: &str) -> Vec<u8> {
    [b"invalidate|".as_slice(), id.as_bytes()].concat()
}

impl Coordinator {
    pub fn new(
        conn: Connection,
        keys: Keys,
        seal: SealKeys,
        timing: Timing,
        upgrading: bool,
    ) -> Self {
        conn.epoch()
            .configure(health::memory_ms(timing.refresh_timeout_ms));
        let seal = Arc::new(seal);
        conn.waiters()
            .authenticate_with(seal.clone(), conn.channel());
        let conn = Arc::new(conn);
        conn.started();
        let unkeyed_too = upgrading && keys.keyed();
        Self {
            conn,
            keys,
            seal,
            timing,
            watchdogs: Arc::default(),
            origin: rand::random(),
            upgrading,
            unkeyed_too,
        }
    }

    /// `user_id`'s locks for `lease`, each with its own fence: the unkeyed
    /// one first (while unkeyed instances share the Redis), then the keyed
    /// one. Without `userIdKey`, the one.
    fn locks(&self, user_id: &str, lease: &Lease) -> Vec<(UserKeys, Lease)> {
        let fences = lease.unkeyed_fence.filter(|_| self.unkeyed_too);
        let one = |keys, fence| {
            let lease = Lease {
                owner: lease.owner.clone(),
                fence,
                unkeyed_fence: None,
            };
            (keys, lease)
        };
        let mut locks = Vec::with_capacity(2);
        if let Some(fence) = fences {
            locks.push(one(self.keys.unkeyed_user(user_id), fence));
        }
        locks.push(one(self.keys.user(user_id), lease.fence));
        locks
    }

    /// The names `user_id` goes by in Redis, in the order of `locks`.
    fn names(&self, user_id: &str) -> Vec<UserKeys> {
        let mut names = Vec::with_capacity(2);
        if self.unkeyed_too {
            names.push(self.keys.unkeyed_user(user_id));
        }
        names.push(self.keys.user(user_id));
        names
    }

    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    /// Connects and subscribes now rather than on the first refresh, so
    /// this instance hears other instances' `invalidate` from the start.
    pub async fn connect(&self) -> Result<(), Unavailable> {
        self.conn
            .run(OP_TIMEOUT, |mut m| async move {
                redis::cmd("PING").query_async::<()>(&mut m).await
            })
            .await
    }

    /// Channel notices dropped so far (`pubsub.rs`): forged, signed with a
    /// key this instance does not hold, stale, replayed, oversized or garbled.
    pub fn notices_dropped(&self) -> u64 {
        self.conn.waiters().dropped()
    }

    /// Whether Redis calls are failing fast until a background probe reconnects.
    pub fn is_down(&self) -> bool {
        self.conn.is_down()
    }

    /// Finds a usable shared token or the lock for `user_id`, waiting on other
    /// instances' refreshes until `deadline`. `usable` adds the caller's own
    /// veto (a token it knows was revoked at the given time); `clock` is the
    /// caller's, which every "is it fresh" here is decided on;
    /// `refresh_token` says whether the restart guard applies.
    pub async fn acquire(
        &self,
        user_id: &str,
        presented: &Presented,
        usable: impl Fn(&SharedToken, EpochMs) -> bool,
        deadline: Instant,
        clock: CallerNow,
        refresh_token: RefreshTokenUse,
    ) -> Acquired {
        // While unkeyed instances share the Redis, the lock they all take
        // (the unkeyed name) decides; the keyed one is taken under it.
        let keyed = self.keys.user(user_id);
        let keys = if self.unkeyed_too {
            self.keys.unkeyed_user(user_id)
        } else {
            keyed.clone()
        };
        let marker = self.keys.epoch_marker(&keys);
        let t = self.timing;
        let (grace_ms, settle_ms) = match refresh_token {
            RefreshTokenUse::Never => (0, 0),
            _ => (health::grace_ms(t.refresh_timeout_ms), health::SETTLE_MS),
        };
        let budget = deadline.saturating_duration_since(Instant::now());
        let mut undecryptable = false;
        let mut waited = false;
        let mut skip_fence = 0;
        // The owner holding the lock through a restart guard, if any.
        let mut held: Option<String> = None;
        // The cached token may be the one presented: fresh by its lifetime
        // when this caller, not knowing it, took it for due.
        let presented_fp = if presented.access.is_empty() {
            String::new()
        } else {
            seal::fingerprint(&keys.id, &presented.access)
        };
        let outcome = loop {
            let started = Instant::now();
            if started >= deadline {
                break Outcome::TimedOut;
            }
            // Registered before asking, so an announcement racing the answer is kept.
            let mut waiting = self.conn.waiters().register(&keys.id);
            let now = clock.now();
            let want = Want {
                presented: &presented_fp,
                min_expires_at: presented.expires_at,
                fresh_after: now.saturating_add(t.buffer_ms as i64),
                recent_after: now.saturating_sub(t.double_check_window_ms as i64),
                now,
                skip_fence,
            };
            let owner = held.clone().unwrap_or_else(lock::new_owner);
            let counter_ttl = self.counter_ttl_ms();
            let known = self.conn.epoch().known(&marker);
            // Waiting out a restart guard must leave the refresh itself time
            // to run (one cut short by its timeout may have spent its refresh
            // token): half the budget, or, for a guard no longer than a
            // settle (a fresh stack's), `health::SETTLE_FLOOR_MS`. So a short
            // `refreshTimeoutMs` still waits out a fresh stack's settle.
            let can_wait = health::can_wait(deadline - started, budget);
            let guard = Guard {
                marker: &marker,
                known: &known,
                grace_ms,
                settle_ms,
                sends_refresh_token: refresh_token == RefreshTokenUse::Sends,
                can_wait_ms: can_wait.as_millis() as u64,
                reclaim: held.is_some(),
            };
            let released = signed(&self.seal, self.conn.channel(), &keys.id, &Notice::Released);
            let (k, o, c, r) = (&keys, &owner, self.conn.channel(), released.as_slice());
            let answer = self
                .conn
                .run(deadline - started, |mut m| async move {
                    lock::acquire(&mut m, k, c, o, t.lock_ttl_ms, counter_ttl, want, guard, r).await
                })
                .await;
            // The lock held through a guard is ours only if this answer
            // says so again (the script let it go otherwise).
            let was_held = held.is_some();
            if was_held
                && !matches!(
                    answer,
                    Ok(Answer {
                        found: Acquire::HeldThroughGuard | Acquire::Locked { .. },
                        ..
                    })
                )
            {
                held = None;
                self.unwatch(&owner);
            }
            let found = match answer {
                Ok(Answer {
                    found,
                    server,
                    guard_ms,
                }) => {
                    if !server.is_empty() {
                        self.conn.epoch().saw(&marker, &server);
                    }
                    Ok((found, guard_ms))
                }
                Err(e) => {
                    // The script may still run (a stalled server answers
                    // later): give the lock back if it granted it, so nobody
                    // waits out its TTL for a refresh that will not happen.
                    // (A lock held through a guard is given back either way.)
                    if !matches!(e, Unavailable::Closed)
                        && (was_held || !matches!(e, Unavailable::Down(_)))
                    {
                        self.abandon(keys.clone(), owner.clone());
                    }
                    Err(e)
                }
            };
            match found {
                Err(e) => break Outcome::Unavailable(e),
                Ok((Acquire::Guarded, left_ms)) => {
                    break Outcome::Unavailable(Unavailable::NewServer {
                        resumes_in_ms: left_ms,
                    });
                }
                Ok((Acquire::HeldThroughGuard, left_ms)) => {
                    // Ours while the guard lasts, so callers after this one
                    // queue behind it; then ask again (a token the old
                    // server's holder wrote meanwhile answers instead).
                    drop(waiting);
                    if held.is_none() {
                        let lease = Lease {
                            owner: owner.clone(),
                            fence: 0,
                            unkeyed_fence: None,
                        };
                        self.watch(vec![(keys.clone(), lease)], deadline);
                        held = Some(owner);
                    }
                    // The script grants this only for a guard that ends in
                    // time; the deadline bounds an odd reply all the same.
                    let wait = Duration::from_millis(left_ms.saturating_add(5))
                        .min(deadline.saturating_duration_since(Instant::now()));
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Ok((Acquire::Cached(record), _)) => {
                    match self.accept(&keys, &record, presented, &usable, now, &mut undecryptable) {
                        Some(token) => break Outcome::Shared { token, waited },
                        None => skip_fence = record.fence,
                    }
                }
                Ok((Acquire::Locked { lease, stale }, guard_ms)) => {
                    drop(waiting);
                    if held.take().is_some() {
                        self.unwatch(&lease.owner);
                    }
                    let mut guard_ms = guard_ms;
                    let mut stale: Vec<_> = stale.map(|r| (&keys, r)).into_iter().collect();
                    let mut lease = lease;
                    if self.unkeyed_too {
                        // The unkeyed lock is ours: now the keyed one.
                        let asked = self
                            .lock_keyed(
                                &keyed,
                                &lease.owner,
                                presented,
                                &usable,
                                deadline,
                                clock,
                                refresh_token,
                                &mut undecryptable,
                            )
                            .await;
                        match asked {
                            Keyed::Locked {
                                fence,
                                stale: keyed_stale,
                                guard_ms: g,
                            } => {
                                guard_ms = guard_ms.max(g);
                                stale.extend(keyed_stale.map(|r| (&keyed, r)));
                                lease = Lease {
                                    owner: lease.owner,
                                    fence,
                                    unkeyed_fence: Some(lease.fence),
                                };
                            }
                            Keyed::Shared(token) => {
                                self.let_go(&keys, &lease).await;
                                break Outcome::Shared { token, waited };
                            }
                            Keyed::TimedOut => {
                                self.let_go(&keys, &lease).await;
                                break Outcome::TimedOut;
                            }
                            Keyed::Unavailable(e) => {
                                self.let_go(&keys, &lease).await;
                                break Outcome::Unavailable(e);
                            }
                            Keyed::Guarded(left_ms) => {
                                // The keyed name's slot restarted: wait it
                                // out holding nothing if it ends in time
                                // (as for the first lock), then start over.
                                self.let_go(&keys, &lease).await;
                                let now = Instant::now();
                                let can_wait =
                                    health::can_wait(deadline - now.min(deadline), budget);
                                if Duration::from_millis(left_ms) > can_wait {
                                    break Outcome::Unavailable(Unavailable::NewServer {
                                        resumes_in_ms: left_ms,
                                    });
                                }
                                tokio::time::sleep(Duration::from_millis(
                                    left_ms.saturating_add(5),
                                ))
                                .await;
                                continue;
                            }
                            Keyed::Busy {
                                mut waiting,
                                lock_ttl_ms,
                                fence,
                            } => {
                                // Held by an instance naming users by the
                                // keyed hash alone: wait for it holding
                                // nothing, then start over.
                                self.let_go(&keys, &lease).await;
                                waited = true;
                                let woken = self
                                    .await_holder(
                                        &keyed,
                                        &mut waiting,
                                        lock_ttl_ms,
                                        fence,
                                        deadline,
                                        presented,
                                        &usable,
                                        clock,
                                        &mut undecryptable,
                                    )
                                    .await;
                                match woken {
                                    Woken::Shared(token) => {
                                        break Outcome::Shared { token, waited }
                                    }
                                    Woken::Failed => break Outcome::Failed,
                                    Woken::Again(_) => continue,
                                }
                            }
                        }
                    }
                    self.watch(self.locks(user_id, &lease), deadline);
                    // While guarded, no cached refresh token is handed over:
                    // the refresh that last spent it may still be running.
                    // Of two records (an upgrade), the newer token's.
                    let refresh = stale
                        .into_iter()
                        .filter(|_| guard_ms == 0)
                        .filter_map(|(k, r)| self.open(k, &r, &mut undecryptable))
                        .filter(|s| s.expires_at > presented.expires_at)
                        .max_by_key(|s| s.expires_at)
                        .and_then(|s| s.refresh);
                    break Outcome::Lead { lease, refresh };
                }
                Ok((Acquire::Busy { lock_ttl_ms, fence }, _)) => {
                    waited = true;
                    let woken = self
                        .await_holder(
                            &keys,
                            &mut waiting,
                            lock_ttl_ms,
                            fence,
                            deadline,
                            presented,
                            &usable,
                            clock,
                            &mut undecryptable,
                        )
                        .await;
                    match woken {
                        Woken::Shared(token) => break Outcome::Shared { token, waited },
                        Woken::Failed => break Outcome::Failed,
                        Woken::Again(skip) => skip_fence = skip.unwrap_or(skip_fence),
                    }
                }
            }
        };
        Acquired {
            outcome,
            undecryptable,
        }
    }

    /// Under the unkeyed lock (`owner`'s), the keyed one, by the same
    /// script and rules as the first (its own record, fence counter and, on
    /// a cluster, restart marker: another slot). Its restart guard is never
    /// waited out holding the lock (`Keyed::Guarded`: the caller lets the
    /// unkeyed lock go too, and waits or gives up as for the first); on a
    /// single node the first lock already waited it out (one marker). An
    /// error gives back whatever the script may have granted.
    #[allow(clippy::too_many_arguments)]
    async fn lock_keyed(
        &self,
        keys: &UserKeys,
        owner: &str,
        presented: &Presented,
        usable: &impl Fn(&SharedToken, EpochMs) -> bool,
        deadline: Instant,
        clock: CallerNow,
        refresh_token: RefreshTokenUse,
        undecryptable: &mut bool,
    ) -> Keyed {
        let t = self.timing;
        let marker = self.keys.epoch_marker(keys);
        let (grace_ms, settle_ms) = match refresh_token {
            RefreshTokenUse::Never => (0, 0),
            _ => (health::grace_ms(t.refresh_timeout_ms), health::SETTLE_MS),
        };
        let presented_fp = if presented.access.is_empty() {
            String::new()
        } else {
            seal::fingerprint(&keys.id, &presented.access)
        };
        let mut skip_fence = 0;
        loop {
            let started = Instant::now();
            if started >= deadline {
                return Keyed::TimedOut;
            }
            let waiting = self.conn.waiters().register(&keys.id);
            let now = clock.now();
            let want = Want {
                presented: &presented_fp,
                min_expires_at: presented.expires_at,
                fresh_after: now.saturating_add(t.buffer_ms as i64),
                recent_after: now.saturating_sub(t.double_check_window_ms as i64),
                now,
                skip_fence,
            };
            let counter_ttl = self.counter_ttl_ms();
            let known = self.conn.epoch().known(&marker);
            let guard = Guard {
                marker: &marker,
                known: &known,
                grace_ms,
                settle_ms,
                sends_refresh_token: refresh_token == RefreshTokenUse::Sends,
                can_wait_ms: 0,
                reclaim: false,
            };
            let released = signed(&self.seal, self.conn.channel(), &keys.id, &Notice::Released);
            let (k, c, r) = (keys, self.conn.channel(), released.as_slice());
            let answer = self
                .conn
                .run(deadline - started, |mut m| async move {
                    lock::acquire(
                        &mut m,
                        k,
                        c,
                        owner,
                        t.lock_ttl_ms,
                        counter_ttl,
                        want,
                        guard,
                        r,
                    )
                    .await
                })
                .await;
            let answer = match answer {
                Ok(a) => a,
                Err(e) => {
                    if !matches!(e, Unavailable::Closed | Unavailable::Down(_)) {
                        self.abandon(keys.clone(), owner.to_owned());
                    }
                    return Keyed::Unavailable(e);
                }
            };
            if !answer.server.is_empty() {
                self.conn.epoch().saw(&marker, &answer.server);
            }
            match answer.found {
                Acquire::Locked { lease, stale } => {
                    return Keyed::Locked {
                        fence: lease.fence,
                        stale,
                        guard_ms: answer.guard_ms,
                    }
                }
                Acquire::Cached(record) => {
                    match self.accept(keys, &record, presented, usable, now, undecryptable) {
                        Some(token) => return Keyed::Shared(token),
                        None => skip_fence = record.fence,
                    }
                }
                Acquire::Busy { lock_ttl_ms, fence } => {
                    return Keyed::Busy {
                        waiting,
                        lock_ttl_ms,
                        fence,
                    }
                }
                Acquire::Guarded | Acquire::HeldThroughGuard => {
                    return Keyed::Guarded(answer.guard_ms)
                }
            }
        }
    }

    /// Gives back the lock `keys` names, taken by `lease` (a plain one)
    /// when the next step found it need not refresh, so its waiters ask
    /// again at once. Best effort: else it lapses with its TTL.
    async fn let_go(&self, keys: &UserKeys, lease: &Lease) {
        let channel = self.conn.channel();
        let notice = signed(&self.seal, channel, &keys.id, &Notice::Released);
        let (k, l, n) = (keys, lease, notice.as_slice());
        let let_go = self
            .conn
            .run(OP_TIMEOUT, |mut m| async move {
                lock::release(&mut m, k, channel, l, n).await
            })
            .await;
        if matches!(let_go, Err(ref e) if !matches!(e, Unavailable::Closed)) {
            self.abandon(keys.clone(), lease.owner.clone());
        }
    }

    /// Waits for the holder of the lock `keys` names (`fence`, for at most
    /// its remaining `lock_ttl_ms`: a dead holder announces nothing) to
    /// announce its outcome on `waiting`.
    #[allow(clippy::too_many_arguments)]
    async fn await_holder(
        &self,
        keys: &UserKeys,
        waiting: &mut pubsub::Waiting,
        lock_ttl_ms: u64,
        fence: u64,
        deadline: Instant,
        presented: &Presented,
        usable: &impl Fn(&SharedToken, EpochMs) -> bool,
        clock: CallerNow,
        undecryptable: &mut bool,
    ) -> Woken {
        let wait = Duration::from_millis(lock_ttl_ms.saturating_add(5))
            .min(deadline - Instant::now().min(deadline));
        match tokio::time::timeout(wait, &mut waiting.rx).await {
            // Only the write of the holder this call saw (or a later one):
            // an older one is a replay, and the token it carries may have
            // been superseded (its refresh token spent). Asking again finds
            // the newest.
            Ok(Ok(Notice::Committed(record))) if record.fence >= fence => {
                match self.accept(keys, &record, presented, usable, clock.now(), undecryptable) {
                    Some(token) => Woken::Shared(token),
                    None => Woken::Again(Some(record.fence)),
                }
            }
            // Only the failure of the holder this call saw (or a later
            // one): an older one is a replay.
            Ok(Ok(Notice::Failed { fence: failed })) if failed >= fence => Woken::Failed,
            // Released, or the lock's TTL ran out: ask again.
            // (Invalidations go to the listener, never here.)
            _ => Woken::Again(None),
        }
    }

    /// Stores the token `lease`'s refresh produced, if no later holder wrote
    /// one, announces it and releases the lock. Returns whether it was written.
    /// `now` is the caller's clock: the record's write time, and Redis keeps
    /// it for the token's remaining life by that clock (plus retention).
    pub async fn commit(
        &self,
        user_id: &str,
        lease: &Lease,
        token: &SharedToken,
        now: EpochMs,
    ) -> Result<bool, Unavailable> {
        self.write(user_id, lease, token, now, false).await
    }

    /// Stores the token like [`Coordinator::commit`] but keeps the lock and
    /// announces nothing: the app saves the token meanwhile (a store), and
    /// if this process dies before it commits, the next lock holder finds
    /// the token in Redis instead of spending a refresh token already
    /// spent. A commit with the same lease follows.
    pub async fn stash(
        &self,
        user_id: &str,
        lease: &Lease,
        token: &SharedToken,
        now: EpochMs,
    ) -> Result<bool, Unavailable> {
        self.write(user_id, lease, token, now, true).await
    }

    async fn write(
        &self,
        user_id: &str,
        lease: &Lease,
        token: &SharedToken,
        now: EpochMs,
        keep_lock: bool,
    ) -> Result<bool, Unavailable> {
        let ttl = (token.expires_at.saturating_sub(now)).max(0) as u64 + self.timing.retention_ms;
        let mut writes = Vec::with_capacity(2);
        for (keys, lease) in self.locks(user_id, lease) {
            let binding = seal::Binding {
                id: &keys.id,
                fence: lease.fence,
                written_at: now,
                expires_at: token.expires_at,
            };
            let Ok(sealed) = self.seal.seal_record(&binding, token, self.upgrading) else {
                break;
            };
            let record = Record {
                fence: lease.fence,
                written_at: now,
                expires_at: token.expires_at,
                sealed,
            };
            let fingerprint = seal::fingerprint(&keys.id, &token.access);
            writes.push(Write {
                seal: self.seal.clone(),
                keys,
                lease,
                expires_at: token.expires_at,
                record,
                fingerprint,
                ttl_ms: ttl,
                keep_lock,
            });
        }
        if writes.is_empty() {
            // Too long to share (the engine refuses such tokens first).
            if keep_lock {
                return Ok(false);
            }
            return self.release(user_id, lease, true).await.map(|_| false);
        }
        if !keep_lock {
            self.unwatch(&lease.owner);
        }
        // In the order of `locks`: the unkeyed record, which every instance
        // of a mixed fleet reads, first.
        let mut written = Ok(false);
        for write in writes {
            let once = write.once(&self.conn).await;
            if let Err(e) = &once {
                // The commit after a kept lock writes it again.
                if e.is_transient() && !keep_lock {
                    self.rewrite(write);
                }
            }
            written = either_failed(written, once);
        }
        written
    }

    /// Writes again, in the background, until Redis takes it or the
    /// restart guard's grace is over: the token this refresh got is known
    /// only here (and to its caller) until it is in Redis, and after a
    /// restart the next lock holder must find it there. The grace is long
    /// enough for it to land (`health.rs`).
    fn rewrite(&self, write: Write) {
        let conn = self.conn.clone();
        let until = Instant::now()
            + Duration::from_millis(health::grace_ms(self.timing.refresh_timeout_ms));
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            for n in 0.. {
                tokio::time::sleep(health::retry_pause(n)).await;
                if Instant::now() >= until {
                    return;
                }
                match write.once(&conn).await {
                    Err(e) if e.is_transient() => {}
                    _ => return,
                }
            }
        });
    }

    /// Best effort: frees `owner`'s lock if a call that gave up on Redis
    /// took it after all (`lock::abandon`).
    fn abandon(&self, keys: UserKeys, owner: String) {
        let conn = self.conn.clone();
        let released = signed(&self.seal, self.conn.channel(), &keys.id, &Notice::Released);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let channel = conn.channel().to_owned();
            let (k, o, c, r) = (&keys, &owner, &channel, released.as_slice());
            let _ = conn
                .run_anyway(OP_TIMEOUT, |mut m| async move {
                    lock::abandon(&mut m, k, c, o, r).await
                })
                .await;
        });
    }

    fn counter_ttl_ms(&self) -> u64 {
        2 * (self.timing.refresh_timeout_ms + self.timing.lock_ttl_ms)
    }

    /// `invalidate` for every instance: marks the stored token bad when it
    /// is `access` (any stored token: `None`), so none hands it out again,
    /// even one that misses the announcement, and announces it (sealed) to
    /// the others' [`Coordinator::on_invalidated`]. One round trip. Returns
    /// whether a stored token was marked.
    pub async fn invalidate(
        &self,
        user_id: &str,
        access: Option<&SecretString>,
    ) -> Result<bool, Unavailable> {
        let payload = record::encode_invalidation(&Invalidation {
            origin: self.origin,
            user_id: user_id.to_owned(),
            access: access.cloned(),
        });
        let channel = self.conn.channel();
        // Under each name a user goes by (an upgrade: both), so every
        // instance hears it under the one it knows.
        let mut marked = Ok(false);
        for keys in self.names(user_id) {
            let fingerprint = access.map(|a| seal::fingerprint(&keys.id, a));
            let sealed = self.seal.seal_bytes(&invalidation_aad(&keys.id), &payload);
            let notice = signed(&self.seal, channel, &keys.id, &Notice::Invalidated(sealed));
            let (k, fp, n) = (&keys, fingerprint.as_deref(), notice.as_slice());
            let once = self
                .conn
                .run(OP_TIMEOUT, |mut m| async move {
                    cache::invalidate(&mut m, k, channel, fp, n).await
                })
                .await;
            marked = match (marked, once) {
                (Ok(a), Ok(b)) => Ok(a || b),
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
        }
        marked
    }

    /// Hands `listener` the user id and access token (if one was named) of
    /// every other instance's `invalidate`. Announcements that do not open
    /// with these keys (another app on the prefix) are dropped.
    pub fn on_invalidated(
        &self,
        listener: impl Fn(&str, Option<&SecretString>) + Send + Sync + 'static,
    ) {
        let seal = self.seal.clone();
        let keys = self.keys.clone();
        let me = self.origin;
        let unkeyed_too = self.unkeyed_too;
        self.conn
            .waiters()
            .on_invalidated(Box::new(move |id, sealed| {
                let Ok(plain) = seal.open_bytes(&invalidation_aad(id), sealed) else {
                    return;
                };
                let Some(i) = record::decode_invalidation(&plain) else {
                    return;
                };
                // An upgrade: instances naming users either way announce.
                let named = keys.user(&i.user_id).id == id
                    || (unkeyed_too && keys.unkeyed_user(&i.user_id).id == id);
                if i.origin != me && named {
                    listener(&i.user_id, i.access.as_ref());
                }
            }));
    }

    /// Gives the lock up without a token: `failed` tells waiters the refresh
    /// failed (they fail too); otherwise they try again at once.
    pub async fn release(
        &self,
        user_id: &str,
        lease: &Lease,
        failed: bool,
    ) -> Result<bool, Unavailable> {
        self.unwatch(&lease.owner);
        let channel = self.conn.channel();
        let mut released = Ok(false);
        for (keys, lease) in self.locks(user_id, lease) {
            let notice = if failed {
                Notice::Failed { fence: lease.fence }
            } else {
                Notice::Released
            };
            let notice = signed(&self.seal, channel, &keys.id, &notice);
            let once = self
                .conn
                .run(OP_TIMEOUT, |mut m| async move {
                    lock::release(&mut m, &keys, channel, &lease, &notice).await
                })
                .await;
            released = either_failed(released, once);
        }
        released
    }

    /// Stops watchdogs and drops the connection; later calls are `Closed`.
    pub fn close(&self) {
        for (_, dog) in self.watchdogs.lock().drain() {
            dog.abort();
        }
        self.conn.close();
    }

    fn open(
        &self,
        keys: &UserKeys,
        record: &Record,
        undecryptable: &mut bool,
    ) -> Option<SharedToken> {
        let binding = seal::Binding {
            id: &keys.id,
            fence: record.fence,
            written_at: record.written_at,
            expires_at: record.expires_at,
        };
        match self.seal.open_record(&binding, &record.sealed) {
            Ok(t) => Some(t),
            Err(_) => {
                *undecryptable = true;
                None
            }
        }
    }

    /// The rule for handing out a shared token instead of refreshing: it
    /// opens, is newer than (and not) the caller's, is fresh or was written
    /// within the double-check window and is unexpired, and `usable` agrees;
    /// all at `now`, the caller's clock.
    fn accept(
        &self,
        keys: &UserKeys,
        record: &Record,
        presented: &Presented,
        usable: &impl Fn(&SharedToken, EpochMs) -> bool,
        now: EpochMs,
        undecryptable: &mut bool,
    ) -> Option<SharedToken> {
        let token = self.open(keys, record, undecryptable)?;
        let t = self.timing;
        // The engine's buffer rule (Policy::buffer_for): half the token's
        // lifetime, from when it was written, when that is shorter.
        let lifetime = token.expires_at.saturating_sub(record.written_at);
        let buffer = (t.buffer_ms as i64).min(lifetime.max(0) / 2);
        let fresh = token.expires_at.saturating_sub(now) > buffer;
        let recent = now.saturating_sub(record.written_at) < t.double_check_window_ms as i64
            && token.expires_at > now;
        // A newer token, or the presented one itself when the caller took
        // it for due without knowing its lifetime.
        let newer = token.expires_at > presented.expires_at && token.access != presented.access;
        let same = token.access == presented.access && token.expires_at == presented.expires_at;
        let ok = !token.access.is_empty()
            && ((newer && (fresh || recent)) || (same && fresh))
            && usable(&token, now);
        ok.then_some(token)
    }

    /// Extends the lock every third of its TTL for as long as the refresh
    /// may still run (until `deadline`). A failed extension (Redis slow or
    /// away) is retried soon, not taken as the end: giving up would let the
    /// lock lapse under a refresh still in flight, and a second instance run
    /// the same user's refresh. Only another holder having the lock stops
    /// it. A holder that dies stops extending, so the others wait at most
    /// one TTL.
    fn watch(&self, locks: Vec<(UserKeys, Lease)>, deadline: Instant) {
        let conn = self.conn.clone();
        let ttl = self.timing.lock_ttl_ms;
        let counter_ttl = self.counter_ttl_ms();
        let dogs = self.watchdogs.clone();
        let mut map = self.watchdogs.lock();
        let Some(owner) = locks.first().map(|(_, l)| l.owner.clone()) else {
            return;
        };
        let mine = owner.clone();
        let task = tokio::spawn(async move {
            let period = Duration::from_millis((ttl / 3).max(1));
            let mut pause = period;
            let mut failed = 0;
            // Each lock (an upgrade holds two) until another holder has it.
            let mut held = vec![true; locks.len()];
            'watch: loop {
                tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now())))
                    .await;
                if Instant::now() >= deadline {
                    break;
                }
                let mut trouble = false;
                for ((k, l), held) in locks.iter().zip(held.iter_mut()) {
                    if !*held {
                        continue;
                    }
                    let extended = conn
                        .run(period, |mut m| async move {
                            lock::extend(&mut m, k, l, ttl, counter_ttl).await
                        })
                        .await;
                    match extended {
                        Ok(Extended::Held | Extended::Retaken) => {}
                        Ok(Extended::Lost) => *held = false,
                        Err(Unavailable::Closed) => break 'watch,
                        Err(_) => trouble = true,
                    }
                }
                if !held.contains(&true) {
                    break;
                }
                if trouble {
                    pause = health::retry_pause(failed).min(period);
                    failed += 1;
                } else {
                    failed = 0;
                    pause = period;
                }
            }
            dogs.lock().remove(&mine);
        });
        map.insert(owner, task.abort_handle());
    }

    fn unwatch(&self, owner: &str) {
        if let Some(dog) = self.watchdogs.lock().remove(owner) {
            dog.abort();
        }
    }

    #[cfg(test)]
    pub(crate) fn watchdogs(&self) -> usize {
        self.watchdogs.lock().len()
    }
}

/// A token write (`cache::commit`), kept for retries.
struct Write {
    /// Each attempt signs its notices anew: a retry may come late in their lifetime.
    seal: Arc<SealKeys>,
    keys: UserKeys,
    lease: Lease,
    expires_at: i64,
    record: Record,
    fingerprint: String,
    ttl_ms: u64,
    keep_lock: bool,
}

impl Write {
    async fn once(&self, conn: &Arc<Connection>) -> Result<bool, Unavailable> {
        let channel = conn.channel();
        let committed = signed(
            &self.seal,
            channel,
            &self.keys.id,
            &Notice::Committed(self.record.clone()),
        );
        let released = signed(&self.seal, channel, &self.keys.id, &Notice::Released);
        let notices = (committed.as_slice(), released.as_slice());
        conn.run(OP_TIMEOUT, |mut m| async move {
            cache::commit(
                &mut m,
                &self.keys,
                channel,
                &self.lease,
                self.expires_at,
                &self.record,
                &self.fingerprint,
                self.ttl_ms,
                notices,
                self.keep_lock,
            )
            .await
        })
        .await
    }
}

#[cfg(test)]
impl Coordinator {
    pub(crate) fn conn_waiters(&self) -> usize {
        self.conn.waiters().waiting()
    }
}
