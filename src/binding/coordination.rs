//! `BindingCoordinator`: the native half of the `redis` option
//! (`lib/coordination.js`).
//!
//! Methods that talk to Redis take a ticket, run on napi's tokio runtime and
//! hand `(ticket, answer)` to the one callback given to the constructor,
//! through one threadsafe function made once. A napi `async fn` makes a
//! promise, a threadsafe function and an error object (a stack trace) per
//! call and spawns twice; this way a call costs little beyond its two thread
//! hops (`benchmark/redis-stages.mjs` times them). `hold` keeps Node alive
//! while answers are due, as a pending promise of an `async fn` would.
//! Answers never carry an error: outcomes, including "Redis is
//! unavailable", come back as values and `lib/coordination.js` applies the
//! `onError` policy. The refresh function itself still runs on the JS
//! thread: `acquire` answers "use this token" or "you hold the lock", and JS
//! reports back with `commit` or `release`.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use napi::bindgen_prelude::{Buffer, Either, FnArgs, Function};
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::{Env, Status};
use napi_derive::napi;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::errors::{guard, to_js, Code, Result, INTERNAL};
use super::manager::{BindingManager, TokenArg, UserIdArg};
use super::strings::{BoundedString, MAX_OPTION_BYTES};
use crate::coordination::{
    self, Coordinator, Endpoint, OnError, Outcome, SharedToken, Unavailable, WhenUnavailable,
};
use crate::engine::flight::validate_refreshed;
use crate::engine::{time, Engine, ErrorCode, Presented, Refreshed, SecretString};

/// `TokenManager`'s `redis` option, types already checked (and one
/// encryption key made a list of one, `tls.ca` a Buffer) by
/// `lib/coordination.js`.
#[napi(object, object_to_js = false)]
pub struct BindingCoordinationOptions {
    /// Exactly one of `url` and `cluster`.
    #[napi(ts_type = "string")]
    pub url: Option<OptionArg>,
    #[napi(ts_type = "Array<string>")]
    pub cluster: Option<Vec<OptionArg>>,
    pub tls_ca: Option<Buffer>,
    #[napi(ts_type = "string")]
    pub key_prefix: Option<OptionArg>,
    pub lock_ttl_ms: Option<f64>,
    #[napi(ts_type = "Array<string>")]
    pub encryption_keys: Vec<OptionArg>,
    /// What a refresh Redis cannot coordinate does ([`OnError`]); default `'auto'`.
    #[napi(ts_type = "'auto' | 'local' | 'fail'")]
    pub on_error: Option<OptionArg>,
    /// The secret users are named by in Redis (32 bytes, base64).
    #[napi(ts_type = "string")]
    pub user_id_key: Option<OptionArg>,
    /// Earlier releases share the Redis: write records they can open (and,
    /// with `userIdKey`, lock and write under the unkeyed names too).
    pub upgrading: Option<bool>,
}

/// A string option, refused over [`MAX_OPTION_BYTES`] before any copy.
type OptionArg = BoundedString<MAX_OPTION_BYTES>;

/// A held lock, handed back to `commit` or `release`.
#[napi(object)]
pub struct BindingLease {
    pub owner: String,
    pub fence: f64,
    /// The fence of the same owner's lock under the user's unkeyed name
    /// (`upgrading` with `userIdKey`).
    pub unkeyed_fence: Option<f64>,
}

/// What `acquire` found. Fields are defined, never assigned (absent ones
/// are `null`): a setter on `Object.prototype` never sees a token.
#[napi(object, use_nullable = true)]
#[derive(Default)]
pub struct BindingAcquired {
    /// `'shared'`: use the token below; `'lead'`: refresh, then commit or
    /// release `lease`; `'failed'`: the refresh waited on failed elsewhere;
    /// `'timeout'`: still held elsewhere at the deadline. Redis could not be
    /// used (`reason`): `'fallback'`, refresh in this process only, or
    /// `'refused'`, do not refresh (`message` says why: `onError`).
    #[napi(ts_type = "'shared' | 'lead' | 'failed' | 'timeout' | 'fallback' | 'refused'")]
    pub kind: String,
    pub access_token: Option<String>,
    /// `'shared'`: the token's refresh token; `'lead'`: a newer refresh
    /// token than the caller's, to refresh with.
    pub refresh_token: Option<String>,
    pub expires_at_ms: Option<f64>,
    /// `'shared'`: written while this call waited (another instance's caller
    /// persists it) rather than found already there.
    pub waited: bool,
    pub lease: Option<BindingLease>,
    pub reason: Option<String>,
    /// `'refused'`: the error message for the caller.
    pub message: Option<String>,
    /// A cached value did not open with this key (rotated?): it was a miss.
    pub undecryptable: bool,
}

/// What `commit` and `release` did.
#[napi(object, use_nullable = true)]
pub struct BindingSettled {
    /// `commit`: the token was stored (false: a later holder's is newer, or
    /// the result was unusable). `release`: the lock was still ours.
    pub done: bool,
    /// Set when Redis could not be used.
    pub unavailable: Option<String>,
}

/// What a call answers: `acquire` a `BindingAcquired`, the others a `BindingSettled`.
type Answer = Either<BindingAcquired, BindingSettled>;
type Answered = FnArgs<(u32, Answer)>;
/// Weak (it does not keep Node alive) but while `hold` says answers are due.
type Answers = ThreadsafeFunction<Answered, (), Answered, Status, false, true>;

#[napi]
pub struct BindingCoordinator {
    inner: Arc<Coordinator>,
    engine: Arc<Engine>,
    answers: Arc<Mutex<Answers>>,
    on_error: OnError,
}

#[napi]
impl BindingCoordinator {
    /// Validates the options (`INVALID_ARGUMENT`); connects in the
    /// background. `answer(ticket, answer)` hears every call's answer, on
    /// the JS thread; it must not throw. `onRemoteMarks()` is called, on the
    /// JS thread, when other instances' invalidations wait for the manager
    /// (`BindingManager::take_remote_marks`).
    #[napi(constructor)]
    pub fn new(
        manager: &BindingManager,
        options: BindingCoordinationOptions,
        #[napi(ts_arg_type = "(ticket: number, answer: BindingAcquired | BindingSettled) => void")]
        answer: Function<Answered, ()>,
        #[napi(ts_arg_type = "() => void")] on_remote_marks: Function<(), ()>,
    ) -> Result<Self, Code> {
        guard(|| {
            let answers = answer
                .build_threadsafe_function::<Answered>()
                .callee_handled::<false>()
                .weak::<true>()
                .build()
                .map_err(|e| {
                    napi::Error::new(Code(crate::engine::ErrorCode::Internal), e.reason)
                })?;
            let engine = manager.engine.clone();
            // Weak: a manager waiting for marks keeps neither the event loop
            // nor the process alive.
            let notify = on_remote_marks
                .build_threadsafe_function::<()>()
                .weak::<true>()
                .build()
                .map_err(|_| {
                    napi::Error::new(Code(ErrorCode::Internal), "could not create a callback")
                })?;
            let on_error = match options
                .on_error
                .map(|o| o.required("options.redis.onError"))
            {
                None => OnError::default(),
                Some(o) => o.ok().as_deref().and_then(OnError::parse).ok_or_else(|| {
                    to_js(crate::engine::EngineError::invalid_argument(
                        "options.redis.onError",
                        "must be 'auto', 'local' or 'fail'",
                    ))
                })?,
            };
            let secret =
                |s: OptionArg, name| s.required(name).map(SecretString::new).map_err(to_js);
            let endpoint = match (options.url, options.cluster) {
                (Some(url), None) => Endpoint::Node(secret(url, "options.redis.url")?),
                (None, Some(nodes)) => Endpoint::Cluster(
                    nodes
                        .into_iter()
                        .map(|n| secret(n, "options.redis.cluster"))
                        .collect::<Result<_, _>>()?,
                ),
                _ => {
                    return Err(to_js(crate::engine::EngineError::invalid_argument(
                        "options.redis",
                        "needs exactly one of url and cluster",
                    )))
                }
            };
            let inner = coordination::coordinator(
                coordination::CoordinationOptions {
                    endpoint,
                    tls_ca: options.tls_ca.map(|b| b.to_vec()),
                    key_prefix: options
                        .key_prefix
                        .map(|p| p.required("options.redis.keyPrefix"))
                        .transpose()
                        .map_err(to_js)?,
                    lock_ttl_ms: options.lock_ttl_ms,
                    encryption_keys: options
                        .encryption_keys
                        .into_iter()
                        .map(|k| secret(k, "options.redis.encryptionKey"))
                        .collect::<Result<_, _>>()?,
                    user_id_key: options
                        .user_id_key
                        .map(|k| secret(k, "options.redis.userIdKey"))
                        .transpose()?,
                    upgrading: options.upgrading.unwrap_or(false),
                },
                engine.policy(),
            )
            .map_err(to_js)?;
            // Another instance's invalidate: as if called here, on the
            // callers' clock as last seen (no caller asks for this one). The
            // manager's hot path never asks the core, so the first mark of a
            // burst calls it back to take them (`takeRemoteMarks`).
            let hears = engine.clone();
            inner.on_invalidated(move |user, token| {
                if let Ok(true) = hears.invalidate_from_elsewhere(user, token, hears.app_now()) {
                    notify.call((), ThreadsafeFunctionCallMode::NonBlocking);
                }
            });
            let inner = Arc::new(inner);
            // In the background: construction never waits on Redis.
            let connecting = inner.clone();
            napi::bindgen_prelude::spawn(async move {
                let _ = connecting.connect().await;
            });
            Ok(Self {
                inner,
                engine,
                answers: Arc::new(Mutex::new(answers)),
                on_error,
            })
        })
    }

    /// Whether answers are due (`true` from the first call pending, `false`
    /// once none is): keeps Node alive meanwhile, as pending promises would.
    #[napi]
    #[allow(deprecated)] // the one way to ref a threadsafe function that lives on
    pub fn hold(&self, env: Env, due: bool) -> Result<(), Code> {
        guard(|| {
            let mut answers = self.answers.lock();
            let held = if due {
                answers.refer(&env)
            } else {
                answers.unref(&env)
            };
            held.map_err(|e| napi::Error::new(Code(crate::engine::ErrorCode::Internal), e.reason))
        })
    }

    /// Runs `work` on tokio and hands its answer (or `fallback`'s, if it
    /// panicked) to JS with `ticket`.
    fn answer(
        &self,
        ticket: u32,
        work: impl Future<Output = Answer> + Send + 'static,
        fallback: fn() -> Answer,
    ) -> Result<(), Code> {
        guard(|| {
            let answers = self.answers.clone();
            napi::bindgen_prelude::spawn(async move {
                let answer = unwinding(work, fallback).await;
                // Fails only once Node is tearing down: nobody is listening.
                let _ = answers.lock().call(
                    FnArgs::from((ticket, answer)),
                    ThreadsafeFunctionCallMode::NonBlocking,
                );
            });
            Ok(())
        })
    }

    /// Channel notices dropped so far: forged, signed with a key this
    /// instance does not hold, stale, replayed, oversized or garbled.
    #[napi(getter)]
    pub fn notices_dropped(&self) -> Result<f64, Code> {
        guard(|| Ok(self.inner.notices_dropped() as f64))
    }

    /// Whether Redis calls fail fast until the background probe reconnects.
    #[napi(getter)]
    pub fn is_down(&self) -> Result<bool, Code> {
        guard(|| Ok(self.inner.is_down()))
    }

    /// For the leader of a due refresh: a shared token, or the lock, waiting
    /// on other instances for at most `waitMs` (real time). `nowMs`: the
    /// caller's clock when it asked, which decides whether a shared token
    /// will do. `mayUseRefreshToken`: the refresh function may send a
    /// refresh token (false for client credentials); `presentsRefreshToken`:
    /// the caller has one. From these and `onError` the core decides whether
    /// the restart guard applies and, should Redis be unavailable, whether
    /// the refresh runs in-process (`'fallback'`) or not at all
    /// (`'refused'`). A bad argument throws `INVALID_ARGUMENT`: it is not an
    /// outage. Answers `ticket` with a `BindingAcquired`.
    #[napi]
    #[allow(clippy::too_many_arguments)] // one per value JS hands over
    pub fn acquire(
        &self,
        ticket: u32,
        #[napi(ts_arg_type = "string")] user_id: UserIdArg,
        #[napi(ts_arg_type = "string")] access_token: TokenArg,
        expires_at_ms: f64,
        wait_ms: f64,
        now_ms: f64,
        may_use_refresh_token: bool,
        presents_refresh_token: bool,
    ) -> Result<(), Code> {
        let (user_id, access_token, expires_at, now) = guard(|| {
            Ok((
                user_id.required("userId").map_err(to_js)?,
                access_token.required("accessToken").map_err(to_js)?,
                time::from_js_ms("expiresAtMs", expires_at_ms).map_err(to_js)?,
                time::CallerNow::new(time::now_from_js(now_ms).map_err(to_js)?),
            ))
        })?;
        let refresh_token_use = self
            .on_error
            .refresh_token_use(may_use_refresh_token, presents_refresh_token);
        let on_error = self.on_error;
        let (inner, engine) = (self.inner.clone(), self.engine.clone());
        let work = async move {
            let deadline =
                Instant::now() + Duration::from_millis(wait_ms.clamp(0.0, 86_400_000.0) as u64);
            let presented = Presented {
                access: SecretString::new(access_token),
                refresh: None,
                expires_at,
            };
            let usable = |t: &SharedToken, now| !engine.is_revoked(&user_id, &t.access, now);
            let got = inner
                .acquire(
                    &user_id,
                    &presented,
                    usable,
                    deadline,
                    now,
                    refresh_token_use,
                )
                .await;
            let mut a = BindingAcquired {
                undecryptable: got.undecryptable,
                ..BindingAcquired::default()
            };
            a.kind = match got.outcome {
                Outcome::Shared { token, waited } => {
                    a.access_token = Some(token.access.expose().to_owned());
                    a.refresh_token = token.refresh.as_ref().map(|r| r.expose().to_owned());
                    a.expires_at_ms = Some(token.expires_at as f64);
                    a.waited = waited;
                    "shared"
                }
                Outcome::Lead { lease, refresh } => {
                    a.refresh_token = refresh.as_ref().map(|r| r.expose().to_owned());
                    a.lease = Some(BindingLease {
                        owner: lease.owner,
                        fence: lease.fence as f64,
                        unkeyed_fence: lease.unkeyed_fence.map(|f| f as f64),
                    });
                    "lead"
                }
                Outcome::Failed => "failed",
                Outcome::TimedOut => "timeout",
                Outcome::Unavailable(e) => {
                    let reason = e.to_string();
                    match on_error.when_unavailable(refresh_token_use) {
                        WhenUnavailable::Fallback => {
                            a.reason = Some(reason);
                            "fallback"
                        }
                        WhenUnavailable::Refuse(why) => {
                            a.message = Some(format!("{why}: {reason}"));
                            a.reason = Some(reason);
                            "refused"
                        }
                    }
                }
            }
            .into();
            Either::A(a)
        };
        self.answer(ticket, work, || {
            Either::A(BindingAcquired {
                kind: "refused".into(),
                reason: Some(INTERNAL.into()),
                message: Some(INTERNAL.into()),
                ..BindingAcquired::default()
            })
        })
    }

    /// The lock holder's refresh returned this (JS types already checked):
    /// store it fenced, announce it, unlock. An unusable result (as of
    /// `nowMs`, the caller's clock when the result came) releases the lock
    /// as failed instead. With `keepLock` (`Coordinator::stash`) it only
    /// stores the token, keeping the lock, and an unusable result leaves
    /// the lock alone; the commit follows. Answers `ticket` with a
    /// `BindingSettled`, as do `release` and `invalidate`.
    #[napi]
    #[allow(clippy::too_many_arguments)] // one per value JS hands over
    pub fn commit(
        &self,
        ticket: u32,
        #[napi(ts_arg_type = "string")] user_id: UserIdArg,
        lease: BindingLease,
        #[napi(ts_arg_type = "string | undefined | null")] access_token: Option<TokenArg>,
        #[napi(ts_arg_type = "string | undefined | null")] refresh_token: Option<TokenArg>,
        expires_at_ms: Option<f64>,
        expires_in: Option<f64>,
        now_ms: f64,
        keep_lock: Option<bool>,
    ) -> Result<(), Code> {
        let keep_lock = keep_lock.unwrap_or(false);
        let inner = self.inner.clone();
        let policy = *self.engine.policy();
        let work = async move {
            let lease = core_lease(lease);
            let Ok(user_id) = user_id.required("userId") else {
                return settled(Ok(false));
            };
            // An unreadable or oversized token is an unusable result: the
            // lock is released as failed below.
            let token = |t: Option<TokenArg>| t.and_then(|t| t.required("token").ok());
            let refreshed = Refreshed {
                access: token(access_token).map(SecretString::new),
                refresh: token(refresh_token).map(SecretString::new),
                expires_at: expires_at_ms,
                expires_in,
            };
            let checked = time::now_from_js(now_ms)
                .and_then(|now| Ok((validate_refreshed(refreshed, now, &policy)?, now)));
            let result = match checked {
                Ok(((access, refresh, expires_at), now)) => {
                    let token = SharedToken {
                        access,
                        refresh,
                        expires_at,
                    };
                    if keep_lock {
                        inner.stash(&user_id, &lease, &token, now).await
                    } else {
                        inner.commit(&user_id, &lease, &token, now).await
                    }
                }
                Err(_) if keep_lock => Ok(false),
                Err(_) => inner.release(&user_id, &lease, true).await.map(|_| false),
            };
            settled(result)
        };
        self.answer(ticket, work, internal)
    }

    /// The lock holder gives up: `failed` (its refresh failed: waiters fail
    /// too) or not (it will not refresh: waiters retry at once).
    #[napi]
    pub fn release(
        &self,
        ticket: u32,
        #[napi(ts_arg_type = "string")] user_id: UserIdArg,
        lease: BindingLease,
        failed: bool,
    ) -> Result<(), Code> {
        let inner = self.inner.clone();
        let work = async move {
            let Ok(user_id) = user_id.required("userId") else {
                return settled(Ok(false));
            };
            settled(inner.release(&user_id, &core_lease(lease), failed).await)
        };
        self.answer(ticket, work, internal)
    }

    /// `invalidate` for the other instances (the engine's own mark is the
    /// manager's): marks the stored token bad if it is `accessToken` (any
    /// stored token: null) and announces it. `done`: a stored token was marked.
    #[napi]
    pub fn invalidate(
        &self,
        ticket: u32,
        #[napi(ts_arg_type = "string")] user_id: UserIdArg,
        #[napi(ts_arg_type = "string | undefined | null")] access_token: Option<TokenArg>,
    ) -> Result<(), Code> {
        let inner = self.inner.clone();
        let work = async move {
            let (Ok(user_id), Ok(token)) = (
                user_id.required("userId"),
                access_token.map(|t| t.required("accessToken")).transpose(),
            ) else {
                return settled(Ok(false));
            };
            let token = token.map(SecretString::new);
            settled(inner.invalidate(&user_id, token.as_ref()).await)
        };
        self.answer(ticket, work, internal)
    }

    /// Drops the connection and stops lock watchdogs. Later calls answer
    /// `'unavailable'`.
    #[napi]
    pub fn close(&self) -> Result<(), Code> {
        guard(|| {
            self.inner.close();
            Ok(())
        })
    }
}

/// The async twin of `guard`: a panic in `work` becomes the `fallback`
/// value instead of unwinding through the runtime.
async fn unwinding<T>(work: impl Future<Output = T>, fallback: impl FnOnce() -> T) -> T {
    AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .unwrap_or_else(|_| fallback())
}

fn core_lease(l: BindingLease) -> coordination::record::Lease {
    coordination::record::Lease {
        owner: l.owner,
        fence: l.fence.max(0.0) as u64,
        unkeyed_fence: l.unkeyed_fence.map(|f| f.max(0.0) as u64),
    }
}

fn settled(r: std::result::Result<bool, Unavailable>) -> Answer {
    Either::B(match r {
        Ok(done) => BindingSettled {
            done,
            unavailable: None,
        },
        Err(e) => BindingSettled {
            done: false,
            unavailable: Some(e.to_string()),
        },
    })
}

fn internal() -> Answer {
    settled(Err(Unavailable::Failed(INTERNAL.into())))
}
