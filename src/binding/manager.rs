//! `BindingManager`: the native half of `TokenManager` (`lib/manager.js`).
//!
//! Rust <-> JS, as `lib/manager.js` uses it:
//! - the calls every `getValidToken` makes (`isFresh`, `begin`, `complete`)
//!   come from `bindProtocol()`: plain functions whose answers are
//!   tabulated in `protocol.rs` and decoded by `lib/protocol.js`;
//! - the rarer calls (`adopt`, `fail`, `serveStale`, `invalidate`, `stats`)
//!   are methods here, with `#[napi(object)]` values;
//! - times cross as epoch milliseconds (`number`); `lib/manager.js` turns
//!   `Date | number | string` into them and back into `Date`;
//! - every call that decides something for a caller takes `nowMs`, the
//!   caller's clock as `lib/manager.js` read it: the engine has no clock
//!   (`engine/time.rs`, "Clocks");
//! - errors are thrown with the engine's stable `code` (`errors.rs`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use napi::Env;
use napi_derive::napi;

use super::errors::{guard, to_js, Code, Result};
use super::protocol::{self, JsRaw};
use super::strings::BoundedString;
use crate::engine::{
    self, evictor, time, Engine, Failure, Issued, Policy, PolicyOptions, Presented, Refreshed,
    SecretString,
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

    /// `isFresh`, `begin` and `complete` bound to this manager's engine
    /// (`protocol.rs` has every answer): the same engine decisions at a
    /// fraction of a method call's cost.
    #[napi(
        ts_return_type = "{ isFresh(expiresAtMs: number, nowMs?: number): boolean; begin(userId: string, accessToken: string, refreshToken: string | null, expiresAtMs: number, nowMs: number): null | number | { kind: 'lead'; flightId: number; refreshToken?: string } | { kind: 'held'; accessToken: string; refreshToken?: string; expiresAtMs: number; shouldUpdate: boolean }; complete(userId: string, flightId: number, accessToken: string, refreshToken: string | null, expiresAtMs: number | null, expiresIn: number | null, nowMs: number): number }"
    )]
    pub fn bind_protocol(&self, env: Env) -> Result<JsRaw, Code> {
        guard(|| protocol::bind(env.raw(), &self.engine))
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

    /// After a failed refresh: may this caller keep its own token?
    #[napi]
    pub fn serve_stale(
        &self,
        #[napi(ts_arg_type = "string")] user_id: UserIdArg,
        #[napi(ts_arg_type = "string")] access_token: TokenArg,
        expires_at_ms: f64,
        now_ms: f64,
    ) -> Result<bool, Code> {
        guard(|| {
            let now = time::now_from_js(now_ms).map_err(to_js)?;
            let user_id = user_id.required("userId").map_err(to_js)?;
            let access_token = access_token.required("accessToken").map_err(to_js)?;
            let p = presented(access_token, None, expires_at_ms)?;
            Ok(self.engine.serve_stale(&user_id, &p, now))
        })
    }

    /// Marks `accessToken` (or, without one, whatever the user holds) bad.
    /// Returns until when (epoch ms) the user's calls must go to `begin`:
    /// `isFresh` does not know users.
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

    /// Users other instances' `invalidate` marked since the last call, and
    /// until when: the manager sends their calls to `begin` (as after its
    /// own `invalidate`). Null when there are none. While any wait here,
    /// `isFresh` answers false, so the first call that comes takes them.
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
