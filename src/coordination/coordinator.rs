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
//! then (refresh locally or fail) is the caller's policy.
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
use super::keys::{Keys, UserKeys};
use super::lock::{self, Acquire, Want};
use super::record::{self, Invalidation, Lease, Notice, Record};
use super::seal::{self, SealKeys, SharedToken};
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

/// The caller's clock, carried into a wait: its reading when it asked plus
/// the real time waited since. Equal to the wall clock in production; under
/// a test's fake clock it starts at the fake time. The engine has no clock
/// of its own (`engine/time.rs`, "Clocks").
#[derive(Debug, Clone, Copy)]
pub struct CallerNow {
    at: EpochMs,
    read: Instant,
}

impl CallerNow {
    /// The caller read `at` just now.
    pub fn new(at: EpochMs) -> Self {
        Self {
            at,
            read: Instant::now(),
        }
    }

    pub fn now(&self) -> EpochMs {
        let waited = self.read.elapsed().as_millis().min(i64::MAX as u128) as i64;
        self.at.saturating_add(waited)
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
}

/// Associated data of a sealed invalidation: not confusable with a token.
fn invalidation_aad(id: &str) -> Vec<u8> {
    [b"invalidate|".as_slice(), id.as_bytes()].concat()
}

impl Coordinator {
    pub fn new(conn: Connection, keys: Keys, seal: SealKeys, timing: Timing) -> Self {
        Self {
            conn: Arc::new(conn),
            keys,
            seal: Arc::new(seal),
            timing,
            watchdogs: Arc::default(),
            origin: rand::random(),
        }
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

    /// Whether Redis calls are failing fast until a background probe reconnects.
    pub fn is_down(&self) -> bool {
        self.conn.is_down()
    }

    /// Finds a usable shared token or the lock for `user_id`, waiting on other
    /// instances' refreshes until `deadline`. `usable` adds the caller's own
    /// veto (a token it knows was revoked at the given time); `clock` is the
    /// caller's, which every "is it fresh" here is decided on.
    pub async fn acquire(
        &self,
        user_id: &str,
        presented: &Presented,
        usable: impl Fn(&SharedToken, EpochMs) -> bool,
        deadline: Instant,
        clock: CallerNow,
    ) -> Acquired {
        let keys = self.keys.user(user_id);
        let t = self.timing;
        let mut undecryptable = false;
        let mut waited = false;
        let mut skip_fence = 0;
        let outcome = loop {
            let started = Instant::now();
            if started >= deadline {
                break Outcome::TimedOut;
            }
            // Registered before asking, so an announcement racing the answer is kept.
            let mut waiting = self.conn.waiters().register(&keys.id);
            let now = clock.now();
            let want = Want {
                min_expires_at: presented.expires_at,
                fresh_after: now.saturating_add(t.buffer_ms as i64),
                recent_after: now.saturating_sub(t.double_check_window_ms as i64),
                now,
                skip_fence,
            };
            let owner = lock::new_owner();
            let counter_ttl = 2 * (t.refresh_timeout_ms + t.lock_ttl_ms);
            let (k, o) = (&keys, &owner);
            let found = self
                .conn
                .run(deadline - started, |mut m| async move {
                    lock::acquire(&mut m, k, o, t.lock_ttl_ms, counter_ttl, want).await
                })
                .await;
            match found {
                Err(e) => break Outcome::Unavailable(e),
                Ok(Acquire::Cached(record)) => {
                    match self.accept(&keys, &record, presented, &usable, now, &mut undecryptable) {
                        Some(token) => break Outcome::Shared { token, waited },
                        None => skip_fence = record.fence,
                    }
                }
                Ok(Acquire::Locked { lease, stale }) => {
                    drop(waiting);
                    self.watch(keys.clone(), lease.clone(), deadline);
                    let refresh = stale
                        .and_then(|r| self.open(&keys, &r, &mut undecryptable))
                        .filter(|s| s.expires_at > presented.expires_at)
                        .and_then(|s| s.refresh);
                    break Outcome::Lead { lease, refresh };
                }
                Ok(Acquire::Busy { lock_ttl_ms }) => {
                    waited = true;
                    // A dead holder announces nothing: its lock's TTL bounds the wait.
                    let wait = Duration::from_millis(lock_ttl_ms.saturating_add(5))
                        .min(deadline - Instant::now().min(deadline));
                    match tokio::time::timeout(wait, &mut waiting.rx).await {
                        Ok(Ok(Notice::Committed(record))) => {
                            match self.accept(
                                &keys,
                                &record,
                                presented,
                                &usable,
                                clock.now(),
                                &mut undecryptable,
                            ) {
                                Some(token) => break Outcome::Shared { token, waited },
                                None => skip_fence = record.fence,
                            }
                        }
                        Ok(Ok(Notice::Failed)) => break Outcome::Failed,
                        // Released, or the lock's TTL ran out: ask again.
                        // (Invalidations go to the listener, never here.)
                        Ok(Ok(Notice::Released | Notice::Invalidated(_))) | Ok(Err(_)) | Err(_) => {
                        }
                    }
                }
            }
        };
        Acquired {
            outcome,
            undecryptable,
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
        let keys = self.keys.user(user_id);
        let Ok(sealed) = self.seal.seal(keys.id.as_bytes(), token) else {
            // Too long to share (the engine refuses such tokens first).
            return self.release(user_id, lease, true).await.map(|_| false);
        };
        self.unwatch(&lease.owner);
        let record = Record {
            fence: lease.fence,
            written_at: now,
            sealed,
        };
        let ttl = (token.expires_at.saturating_sub(now)).max(0) as u64 + self.timing.retention_ms;
        let channel = self.conn.channel();
        let fingerprint = seal::fingerprint(&keys.id, &token.access);
        self.conn
            .run(OP_TIMEOUT, |mut m| async move {
                cache::commit(
                    &mut m,
                    &keys,
                    channel,
                    lease,
                    token.expires_at,
                    &record,
                    &fingerprint,
                    ttl,
                )
                .await
            })
            .await
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
        let keys = self.keys.user(user_id);
        let fingerprint = access.map(|a| seal::fingerprint(&keys.id, a));
        let payload = record::encode_invalidation(&Invalidation {
            origin: self.origin,
            user_id: user_id.to_owned(),
            access: access.cloned(),
        });
        let notice =
            Notice::Invalidated(self.seal.seal_bytes(&invalidation_aad(&keys.id), &payload));
        let channel = self.conn.channel();
        let (k, fp, n) = (&keys, fingerprint.as_deref(), &notice);
        self.conn
            .run(OP_TIMEOUT, |mut m| async move {
                cache::invalidate(&mut m, k, channel, fp, n).await
            })
            .await
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
        self.conn
            .waiters()
            .on_invalidated(Box::new(move |id, sealed| {
                let Ok(plain) = seal.open_bytes(&invalidation_aad(id), sealed) else {
                    return;
                };
                let Some(i) = record::decode_invalidation(&plain) else {
                    return;
                };
                if i.origin != me && keys.user(&i.user_id).id == id {
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
        let keys = self.keys.user(user_id);
        let notice = if failed {
            Notice::Failed
        } else {
            Notice::Released
        };
        let channel = self.conn.channel();
        self.conn
            .run(OP_TIMEOUT, |mut m| async move {
                lock::release(&mut m, &keys, channel, lease, &notice).await
            })
            .await
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
        match self.seal.open(keys.id.as_bytes(), &record.sealed) {
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
        let fresh = token.expires_at.saturating_sub(now) > t.buffer_ms as i64;
        let recent = now.saturating_sub(record.written_at) < t.double_check_window_ms as i64
            && token.expires_at > now;
        let ok = !token.access.is_empty()
            && token.expires_at > presented.expires_at
            && token.access != presented.access
            && (fresh || recent)
            && usable(&token, now);
        ok.then_some(token)
    }

    /// Extends the lock every third of its TTL while the refresh may still
    /// run (until `deadline`). A holder that dies stops extending, so the
    /// others wait at most one TTL.
    fn watch(&self, keys: UserKeys, lease: Lease, deadline: Instant) {
        let conn = self.conn.clone();
        let ttl = self.timing.lock_ttl_ms;
        let dogs = self.watchdogs.clone();
        let mut map = self.watchdogs.lock();
        let owner = lease.owner.clone();
        let task = tokio::spawn(async move {
            let period = Duration::from_millis((ttl / 3).max(1));
            let (k, l) = (&keys, &lease);
            loop {
                tokio::time::sleep(period).await;
                if Instant::now() >= deadline {
                    break;
                }
                let extended = conn
                    .run(period, |mut m| async move {
                        lock::extend(&mut m, k, l, ttl).await
                    })
                    .await;
                if extended != Ok(true) {
                    break;
                }
            }
            dogs.lock().remove(&lease.owner);
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

#[cfg(test)]
impl Coordinator {
    pub(crate) fn conn_waiters(&self) -> usize {
        self.conn.waiters().waiting()
    }
}
