//! `BindingManager`: the native half of `TokenManager` (`lib/manager.js`).
//!
//! Rust <-> JS, as `lib/manager.js` uses it:
//! - the hot path (a token valid beyond the buffer) never comes here: the
//!   buffer rule is one comparison in `lib/policy.js`, held equal to
//!   [`Policy::is_fresh`] by a property test through [`BindingManager::is_fresh`];
//! - a call whose token is due asks `begin` for a plan and its leader reports
//!   with `complete`: functions bound to the engine (`bindProtocol()`), which
//!   answer with a number where one will do (the table on [`begin`]),
//!   decoded in `lib/manager.js`;
//! - the rarer calls (`adopt`, `fail`, `serveStale`, `invalidate`, `stats`)
//!   answer with `#[napi(object)]` values;
//! - times cross as epoch milliseconds (`number`); `lib/manager.js` turns
//!   `Date | number | string` into them and back into `Date`;
//! - every call that decides something for a caller takes `nowMs`, the
//!   caller's clock as `lib/manager.js` read it: the engine has no clock
//!   (`engine/time.rs`, "Clocks");
//! - errors are thrown with the engine's stable `code` (`errors.rs`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use napi::bindgen_prelude::{Either, FunctionCallContext, Object};
use napi::{Env, JsString};
use napi_derive::napi;

use super::errors::{guard, to_js, Code, Result, INTERNAL};
use super::strings::{self, BoundedString, Text};
use crate::engine::{
    self, evictor, time, Engine, EngineError, ErrorCode, Failure, Issued, IssuedBrief, Plan,
    Policy, PolicyOptions, Presented, Refreshed, SecretString,
};

/// A user id argument, refused over [`engine::MAX_USER_ID_BYTES`] before
/// any copy.
pub type UserIdArg = BoundedString<{ engine::MAX_USER_ID_BYTES }>;
/// A token argument, refused over [`engine::MAX_TOKEN_BYTES`] before any
/// copy.
pub type TokenArg = BoundedString<{ engine::MAX_TOKEN_BYTES }>;

/// Options for a token manager. All in milliseconds.
#[napi(object)]
#[derive(Default)]
pub struct BindingManagerOptions {
    /// Refresh when fewer than this many ms remain. Default 300000.
    pub buffer_time_ms: Option<f64>,
    /// No second refresh for a user within this window. Default 10000.
    pub double_check_window_ms: Option<f64>,
    /// A refresh not settled by then fails with REFRESH_TIMEOUT. Default 30000.
    pub refresh_timeout_ms: Option<f64>,
    /// Per-user state unused for this long is dropped. Default 600000.
    pub idle_ttl_ms: Option<f64>,
    /// No token is taken to live longer. Default 2592000000 (30 days).
    pub max_token_lifetime_ms: Option<f64>,
}

/// A token as the core issued it. Every field is defined on the object
/// (`use_nullable`: an absent one is `null`), none assigned, so a setter on
/// `Object.prototype` never sees a token.
#[napi(object, use_nullable = true)]
pub struct BindingIssuedToken {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_at_ms: f64,
    pub should_update: bool,
}

/// A plan `begin` cannot say with a number (the table on
/// [`BindingManager::begin`]). Every field is defined (absent ones are
/// `null`), none assigned.
#[napi(object, use_nullable = true)]
pub struct BindingPlan {
    #[napi(ts_type = "'lead' | 'held'")]
    pub kind: String,
    /// `'lead'`: the flight to lead.
    pub flight_id: Option<u32>,
    /// `'held'`: the token a refresh produced.
    pub access_token: Option<String>,
    /// `'lead'`: the newer refresh token to refresh with; `'held'`: the
    /// refresh token the caller is handed (rotated), if any.
    pub refresh_token: Option<String>,
    pub expires_at_ms: Option<f64>,
    pub should_update: Option<bool>,
}

/// A user marked by another instance's `invalidate`, until `untilMs`.
#[napi(object)]
pub struct BindingMark {
    pub user_id: String,
    pub until_ms: f64,
}

/// Counters and sizes, as `TokenManager.stats()` reports them.
#[napi(object)]
pub struct BindingStats {
    pub users: u32,
    pub in_flight: u32,
    pub hits: f64,
    pub refreshes: f64,
    pub coalesced: f64,
    pub failures: f64,
    pub timeouts: f64,
    pub stale_served: f64,
}

#[napi]
pub struct BindingManager {
    pub(super) engine: Arc<Engine>,
}

#[napi]
impl BindingManager {
    #[napi(constructor)]
    pub fn new(options: Option<BindingManagerOptions>) -> Result<Self, Code> {
        guard(|| {
            let o = options.unwrap_or_default();
            let policy = Policy::from_options(&PolicyOptions {
                buffer_time_ms: o.buffer_time_ms,
                double_check_window_ms: o.double_check_window_ms,
                refresh_timeout_ms: o.refresh_timeout_ms,
                idle_ttl_ms: o.idle_ttl_ms,
                max_token_lifetime_ms: o.max_token_lifetime_ms,
            })
            .map_err(to_js)?;
            let engine = Arc::new(Engine::new(policy));
            evict_in_background(&engine);
            Ok(Self { engine })
        })
    }

    /// The effective refresh timeout, for `lib/manager.js`'s timer.
    #[napi(getter)]
    pub fn refresh_timeout_ms(&self) -> Result<f64, Code> {
        guard(|| Ok(self.engine.policy().refresh_timeout_ms as f64))
    }

    /// The effective buffer, for `lib/observability.js` to say why a
    /// refresh ran (a presented token outside it was invalidated).
    #[napi(getter)]
    pub fn buffer_time_ms(&self) -> Result<f64, Code> {
        guard(|| Ok(self.engine.policy().buffer_ms as f64))
    }

    /// The effective idle TTL: `lib/lifecycle.js` drops users idle this long
    /// and refreshes ahead those active within it (by default).
    #[napi(getter)]
    pub fn idle_ttl_ms(&self) -> Result<f64, Code> {
        guard(|| Ok(self.engine.policy().idle_ttl_ms as f64))
    }

    /// The effective `maxTokenLifetimeMs`, for the hot path's rule.
    #[napi(getter)]
    pub fn max_token_lifetime_ms(&self) -> Result<f64, Code> {
        guard(|| Ok(self.engine.policy().max_token_lifetime_ms as f64))
    }

    /// The core's buffer rule ([`Policy::is_fresh`]) on `expiresAtMs` at
    /// `nowMs`; a value no `Date` can hold is not fresh. The hot path runs
    /// the same rule in `lib/policy.js` without a native call; a property
    /// test holds the two equal. Counts nothing.
    #[napi]
    pub fn is_fresh(&self, expires_at_ms: f64, now_ms: f64) -> Result<bool, Code> {
        guard(|| {
            Ok(match (time::js_ms(expires_at_ms), time::js_ms(now_ms)) {
                (Some(expires_at), Some(now)) => self.engine.policy().is_fresh(expires_at, now),
                _ => false,
            })
        })
    }

    /// `{ begin, complete }`, each a function bound to this manager's
    /// engine (the table on [`begin`] has their answers). Bound functions,
    /// not methods: a napi-rs method pays for its `&self` borrow bookkeeping
    /// (a process-wide lock and map) on every call, several times what
    /// these calls do, and these run on every refresh.
    #[napi(
        ts_return_type = "{ begin(userId: string, accessToken: string, refreshToken: string | null, expiresAtMs: number, nowMs: number, aheadMs?: number): null | number | BindingPlan; complete(userId: string, flightId: number, accessToken: string, refreshToken: string | null, expiresAtMs: number | null, expiresIn: number | null, nowMs: number): number }"
    )]
    pub fn bind_protocol<'env>(&self, env: &'env Env) -> Result<Object<'env>, Code> {
        let engine = self.engine.clone();
        let begin = env.create_function_from_closure::<(), _, _>("begin", move |ctx| {
            Ok(answer(ctx.env, || begin(&engine, &ctx)))
        });
        let engine = self.engine.clone();
        let complete = env.create_function_from_closure::<(), _, _>("complete", move |ctx| {
            Ok(answer(ctx.env, || complete(&engine, &ctx)))
        });
        let bound = (|| {
            let mut o = Object::new(env)?;
            o.set("begin", begin?)?;
            o.set("complete", complete?)?;
            Ok::<_, napi::Error>(o)
        })();
        bound.map_err(|_| napi::Error::new(Code(ErrorCode::Internal), "could not bind the engine"))
    }

    /// Flight `flightId` was answered by a token another instance's refresh
    /// produced (the shared Redis cache): kept like a refresh result, but
    /// counted as a hit or coalesced call, and issued with `shouldUpdate`.
    #[napi]
    #[allow(clippy::too_many_arguments)] // one per value JS hands over
    pub fn adopt(
        &self,
        #[napi(ts_arg_type = "string")] user_id: UserIdArg,
        flight_id: u32,
        #[napi(ts_arg_type = "string")] access_token: TokenArg,
        #[napi(ts_arg_type = "string | undefined | null")] refresh_token: Option<TokenArg>,
        expires_at_ms: f64,
        should_update: bool,
        now_ms: f64,
    ) -> Result<BindingIssuedToken, Code> {
        guard(|| {
            let now = time::now_from_js(now_ms).map_err(to_js)?;
            let user_id = user_id.required("userId").map_err(to_js)?;
            let shared = Refreshed {
                access: Some(SecretString::new(
                    access_token.required("accessToken").map_err(to_js)?,
                )),
                refresh: refresh_token
                    .map(|r| r.required("refreshToken"))
                    .transpose()
                    .map_err(to_js)?
                    .map(SecretString::new),
                expires_at: Some(expires_at_ms),
                expires_in: None,
            };
            let issued = self
                .engine
                .adopt(&user_id, flight_id, shared, should_update, now)
                .map_err(to_js)?;
            Ok(issued_to_js(issued))
        })
    }

    /// The refresh for `flightId` failed (`timedOut`: it did not settle).
    #[napi]
    pub fn fail(
        &self,
        #[napi(ts_arg_type = "string")] user_id: UserIdArg,
        flight_id: u32,
        timed_out: bool,
        now_ms: f64,
    ) -> Result<(), Code> {
        let failure = if timed_out {
            Failure::TimedOut
        } else {
            Failure::Rejected
        };
        guard(|| {
            let now = time::now_from_js(now_ms).map_err(to_js)?;
            let user_id = user_id.required("userId").map_err(to_js)?;
            self.engine.fail(&user_id, flight_id, failure, now);
            Ok(())
        })
    }

    /// After a refresh failed with `code` (the error's stable code; any
    /// other string is not ours): may this caller keep its own token? The
    /// engine decides ([`Engine::serve_stale`]).
    #[napi]
    pub fn serve_stale(
        &self,
        #[napi(ts_arg_type = "string")] user_id: UserIdArg,
        #[napi(ts_arg_type = "string")] access_token: TokenArg,
        expires_at_ms: f64,
        #[napi(ts_arg_type = "string")] code: BoundedString<32>,
        now_ms: f64,
    ) -> Result<bool, Code> {
        guard(|| {
            let Some(code) = code
                .optional("code")
                .ok()
                .flatten()
                .and_then(|c| ErrorCode::parse(&c))
            else {
                return Ok(false);
            };
            let now = time::now_from_js(now_ms).map_err(to_js)?;
            let user_id = user_id.required("userId").map_err(to_js)?;
            let access_token = access_token.required("accessToken").map_err(to_js)?;
            let p = presented(access_token, None, expires_at_ms)?;
            Ok(self.engine.serve_stale(&user_id, &p, code, now))
        })
    }

    /// Marks `accessToken` (or, without one, whatever the user holds) bad.
    /// Returns until when (epoch ms) the user's calls must go to `begin`:
    /// the hot path decides on the expiry alone.
    #[napi]
    pub fn invalidate(
        &self,
        #[napi(ts_arg_type = "string")] user_id: UserIdArg,
        #[napi(ts_arg_type = "string | undefined | null")] access_token: Option<TokenArg>,
        now_ms: f64,
    ) -> Result<f64, Code> {
        guard(|| {
            let user_id = user_id.required("userId").map_err(to_js)?;
            let token = access_token
                .map(|t| t.required("accessToken"))
                .transpose()
                .map_err(to_js)?
                .map(SecretString::new);
            let now = time::now_from_js(now_ms).map_err(to_js)?;
            self.engine
                .invalidate(&user_id, token.as_ref(), now)
                .map(|until| until as f64)
                .map_err(to_js)
        })
    }

    /// Drops what the engine holds for the user and marks their tokens bad
    /// (`Engine::forget`). Returns until when the user's calls must go to
    /// `begin`, as `invalidate` does.
    #[napi]
    pub fn forget(
        &self,
        #[napi(ts_arg_type = "string")] user_id: UserIdArg,
        now_ms: f64,
    ) -> Result<f64, Code> {
        guard(|| {
            let user_id = user_id.required("userId").map_err(to_js)?;
            let now = time::now_from_js(now_ms).map_err(to_js)?;
            self.engine
                .forget(&user_id, now)
                .map(|until| until as f64)
                .map_err(to_js)
        })
    }

    /// Users other instances' `invalidate` marked since the last call, and
    /// until when: the manager sends their calls to `begin` (as after its
    /// own `invalidate`). Null when there are none. The coordinator calls
    /// the manager back when the first of a burst arrives.
    #[napi]
    pub fn take_remote_marks(&self) -> Result<Option<Vec<BindingMark>>, Code> {
        guard(|| {
            let marks = self.engine.take_remote_marks();
            Ok((!marks.is_empty()).then(|| {
                marks
                    .into_iter()
                    .map(|(user, until)| BindingMark {
                        user_id: user.into(),
                        until_ms: until as f64,
                    })
                    .collect()
            }))
        })
    }

    /// Counters and sizes; up to 64 idle users (as of `nowMs`) are dropped
    /// first, the background task drops the rest.
    #[napi]
    pub fn stats(&self, now_ms: f64) -> Result<BindingStats, Code> {
        guard(|| {
            let now = time::now_from_js(now_ms).map_err(to_js)?;
            Ok(self.stats_inner(now))
        })
    }

    fn stats_inner(&self, now: engine::EpochMs) -> BindingStats {
        let s = self.engine.stats(now);
        BindingStats {
            users: s.users as u32,
            in_flight: s.in_flight as u32,
            hits: s.hits as f64,
            refreshes: s.refreshes as f64,
            coalesced: s.coalesced as f64,
            failures: s.failures as f64,
            timeouts: s.timeouts as f64,
            stale_served: s.stale_served as f64,
        }
    }
}

/// Starts the engine's background eviction (`engine/evictor.rs`, on its
/// own low-priority thread). It holds the engine weakly, so it ends once
/// the manager is collected, and keeps neither the event loop nor the
/// process alive. Should it not start, callers' slices of eviction still
/// bound the table.
fn evict_in_background(engine: &Arc<Engine>) {
    let _ = catch_unwind(AssertUnwindSafe(|| evictor::start(engine)));
}

/// Longest ISO 8601 string read: `2026-01-25T21:14:28.123456789+01:00` is
/// 35 bytes; the margin allows surrounding whitespace.
const ISO_TIME_MAX_BYTES: usize = 128;

/// Parses an ISO 8601 date-time (with zone) into epoch milliseconds.
// Free #[napi] items are only referenced by the registration napi-derive
// generates outside `cargo test`.
#[cfg_attr(test, allow(dead_code))]
#[napi]
pub fn parse_iso_time(
    #[napi(ts_arg_type = "string")] value: BoundedString<ISO_TIME_MAX_BYTES>,
) -> Result<f64, Code> {
    guard(|| {
        let value = value.required("expiresAt").map_err(to_js)?;
        time::parse_iso8601("expiresAt", &value)
            .map(|v| v as f64)
            .map_err(to_js)
    })
}

/// The longest user id accepted, in UTF-8 bytes.
#[cfg_attr(test, allow(dead_code))]
#[napi]
pub const MAX_USER_ID_BYTES: u32 = engine::MAX_USER_ID_BYTES as u32;

/// The longest access or refresh token accepted, in UTF-8 bytes.
#[cfg_attr(test, allow(dead_code))]
#[napi]
pub const MAX_TOKEN_BYTES: u32 = engine::MAX_TOKEN_BYTES as u32;

fn presented(
    access_token: String,
    refresh_token: Option<String>,
    expires_at_ms: f64,
) -> Result<Presented, Code> {
    Ok(Presented {
        access: SecretString::new(access_token),
        refresh: refresh_token.map(SecretString::new),
        expires_at: time::from_js_ms("token.expiresAt", expires_at_ms).map_err(to_js)?,
    })
}

fn issued_to_js(t: Issued) -> BindingIssuedToken {
    BindingIssuedToken {
        access_token: t.access.expose().to_owned(),
        refresh_token: t.refresh.as_ref().map(|s| s.expose().to_owned()),
        expires_at_ms: t.expires_at as f64,
        should_update: t.should_update,
    }
}

/// `begin(userId, accessToken, refreshToken, expiresAtMs, nowMs, aheadMs?)`:
/// the engine's plan for a call whose token is not fresh ([`Engine::begin`]),
/// or, with `aheadMs`, for a refresh ahead of need ([`Engine::begin_ahead`]).
/// The common plans cross as a number, so JS builds the caller's object:
///
/// | answer | plan |
/// |---|---|
/// | `null` | [`Plan::UsePresented`]: hand the presented token back |
/// | `n >= 0` | [`Plan::Lead`] flight `n` with the presented refresh token |
/// | `n < 0` | [`Plan::Join`] flight `-n - 1` |
/// | `BindingPlan { kind: 'lead', flightId, refreshToken }` | lead with a newer refresh token the engine holds |
/// | `BindingPlan { kind: 'held', accessToken, refreshToken, expiresAtMs, shouldUpdate }` | [`Plan::UseHeld`] |
///
/// The access token is measured, and copied only if the engine must
/// compare it (a held token, revocations): rarely on a refresh.
fn begin(engine: &Engine, ctx: &FunctionCallContext) -> Answer<Option<Either<f64, BindingPlan>>> {
    let user = user_arg(ctx, 0)?;
    let access_token = ctx
        .get::<JsString>(1)
        .map_err(unreadable("token.accessToken"))?;
    let access_is_empty =
        strings::measure(&access_token, engine::MAX_TOKEN_BYTES).map_err(|t| {
            t.required("token.accessToken")
                .err()
                .unwrap_or_else(|| unreadable("token.accessToken")(()))
        })? == 0;
    let refresh = ctx
        .get::<TokenArg>(2)
        .map_err(unreadable("token.refreshToken"))?
        .optional("token.refreshToken")?
        .map(SecretString::new);
    let expires_at = time::from_js_ms("token.expiresAt", number(ctx, 3, "token.expiresAt")?)?;
    let now = time::now_from_js(number(ctx, 4, "nowMs")?)?;
    let fingerprint = || {
        strings::bounded(access_token, engine::MAX_TOKEN_BYTES)
            .required("token.accessToken")
            .map(|t| SecretString::new(t).fingerprint())
    };
    // Optional: absent (fewer arguments) reads as undefined.
    let ahead = match (ctx.length() > 5).then(|| ctx.get::<Option<f64>>(5)) {
        None | Some(Ok(None)) => 0,
        Some(Ok(Some(ms))) => {
            crate::engine::policy::whole(ms, 0, i64::MAX as u64).ok_or_else(|| {
                EngineError::invalid_argument("aheadMs", "must be whole milliseconds, 0 or more")
            })? as i64
        }
        Some(Err(_)) => return Err(EngineError::invalid_argument("aheadMs", "must be a number")),
    };
    let plan = engine.begin_ahead(
        &user,
        access_is_empty,
        refresh.as_ref(),
        expires_at,
        fingerprint,
        now,
        ahead,
    )?;
    Ok(encode_plan(plan, refresh.as_ref()))
}

/// `complete(userId, flightId, accessToken, refreshToken, expiresAtMs,
/// expiresIn, nowMs)`: the leader's refresh result ([`Engine::complete`]).
/// Answers the issued expiry, positive when the leader is handed the
/// refresh token it passed (it rotated), negative when not (an issued
/// expiry is after `now`, so never 0). An unusable result throws
/// `INVALID_REFRESH_RESULT`.
fn complete(engine: &Engine, ctx: &FunctionCallContext) -> Answer<f64> {
    let user = user_arg(ctx, 0)?;
    let flight_id = ctx
        .get::<u32>(1)
        .map_err(|_| EngineError::invalid_argument("flightId", "must be a number"))?;
    let token = |i, name| {
        ctx.get::<TokenArg>(i)
            .map_err(unreadable(name))
            .and_then(|t| refreshed_token(t, name))
    };
    let refreshed = Refreshed {
        access: token(2, "accessToken")?,
        refresh: token(3, "refreshToken")?,
        expires_at: ctx
            .get::<Option<f64>>(4)
            .map_err(unreadable("expiresAtMs"))?,
        expires_in: ctx.get::<Option<f64>>(5).map_err(unreadable("expiresIn"))?,
    };
    let now = time::now_from_js(number(ctx, 6, "nowMs")?)?;
    Ok(encode_brief(
        engine.complete(&user, flight_id, refreshed, now)?,
    ))
}

/// What a bound function's body gives: its answer, or the error it throws.
type Answer<T> = std::result::Result<T, EngineError>;

/// Runs a bound function's body: its error is thrown with its stable code,
/// a panic as `INTERNAL` (never unwinding into Node).
fn answer<T>(env: &Env, f: impl FnOnce() -> Answer<T>) -> Option<T> {
    // A failed throw leaves nothing better to do: the call answers null.
    let _ = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => return Some(v),
        Ok(Err(e)) => env.throw_error(&e.to_string(), Some(e.code().as_str())),
        Err(_) => env.throw_error(INTERNAL, Some(ErrorCode::Internal.as_str())),
    };
    None
}

/// Argument `i`, the user id, read only if it fits its limit.
fn user_arg(ctx: &FunctionCallContext, i: usize) -> Answer<String> {
    ctx.get::<UserIdArg>(i)
        .map_err(unreadable("userId"))?
        .required("userId")
}

fn number(ctx: &FunctionCallContext, i: usize, name: &'static str) -> Answer<f64> {
    ctx.get::<f64>(i)
        .map_err(|_| EngineError::invalid_argument(name, "must be a number"))
}

fn unreadable<T>(name: &'static str) -> impl Fn(T) -> EngineError {
    move |_| EngineError::invalid_argument(name, "could not be read")
}

/// A [`Plan`] as `begin` answers it. `presented_refresh`: the refresh token
/// the caller passed; a lead with that one needs no object.
fn encode_plan(
    plan: Plan,
    presented_refresh: Option<&SecretString>,
) -> Option<Either<f64, BindingPlan>> {
    let plan = match plan {
        Plan::UsePresented => return None,
        Plan::Join(id) => Either::A(-f64::from(id) - 1.0),
        Plan::Lead { id, refresh_token } if refresh_token.as_ref() == presented_refresh => {
            Either::A(f64::from(id))
        }
        Plan::Lead { id, refresh_token } => Either::B(BindingPlan {
            kind: "lead".into(),
            flight_id: Some(id),
            access_token: None,
            refresh_token: refresh_token.map(|r| r.expose().to_owned()),
            expires_at_ms: None,
            should_update: None,
        }),
        Plan::UseHeld(t) => {
            let t = issued_to_js(t);
            Either::B(BindingPlan {
                kind: "held".into(),
                flight_id: None,
                access_token: Some(t.access_token),
                refresh_token: t.refresh_token,
                expires_at_ms: Some(t.expires_at_ms),
                should_update: Some(t.should_update),
            })
        }
    };
    Some(plan)
}

/// `complete`'s answer: the issued expiry, its sign saying whether the
/// leader is handed the refresh token it passed.
fn encode_brief(issued: IssuedBrief) -> f64 {
    let expires = issued.expires_at as f64;
    if issued.hands_refresh {
        expires
    } else {
        -expires
    }
}

/// A token of a refresh result: one over the limit makes the result unusable.
fn refreshed_token(t: TokenArg, name: &'static str) -> Answer<Option<SecretString>> {
    match t.into_text() {
        Text::TooLong { .. } => Err(EngineError::InvalidRefreshResult(
            "has a token longer than 65536 bytes",
        )),
        t => Ok(t.optional(name)?.map(SecretString::new)),
    }
}
