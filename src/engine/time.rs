//! Turning the caller's expiry inputs into epoch milliseconds, and the
//! system clock for the one place that may read it.
//!
//! # Clocks
//!
//! Every decision made for a caller is made on the caller's clock: `Date.now()`
//! as the app sees it when the call comes in or its refresh settles (or the
//! manager's `now` option). `lib/manager.js` reads it and passes it in; the
//! engine's entry points take `now` as an argument and keep no clock of their
//! own. That covers the buffer rule, the double-check window, `expiresIn` to
//! `expiresAt`, revocation marks and their expiry, idle eviction, serving a
//! caller's own token after a failed refresh, and with Redis the rule for
//! taking a shared token, the check of a result before it is shared, its
//! write time and how long Redis keeps it (the token's remaining life on the
//! caller's clock). So fake timers in an app's tests (vitest, jest and sinon
//! replace `Date`) move all of them, as they moved the TypeScript module this
//! package replaces, and the app's expiry times and ours agree on "now".
//!
//! The hot path (a token valid beyond the buffer) decides in JavaScript
//! (`lib/policy.js`, the same rule as [`Policy::is_fresh`](super::Policy::is_fresh))
//! on that same reading, and never comes here.
//!
//! Durations that run without a caller keep real time, because something
//! outside JavaScript enforces them: Redis lock TTLs, lock extensions and
//! waits on other instances (tokio's monotonic clock; Redis expires keys in
//! real time, which no fake clock stops), the background evictor's naps,
//! and the native refreshers' HTTP timeouts, retry backoff and
//! `Retry-After` dates (the last against the system clock, as the server
//! wrote it). The refresh timeout is a JavaScript `setTimeout`, so fake
//! timers drive it like any timer of the app's.
//!
//! Where a decision outlives its call or has no caller, it is made on a
//! caller's reading advanced by the real time since ([`CallerNow`]): a Redis
//! wait decides on its caller's clock plus the time waited; the background
//! evictor and invalidations announced by other instances use the callers'
//! clock as last seen ([`Engine::app_now`](super::Engine::app_now): the
//! latest reading any call passed in, plus the real time since; the system
//! clock before the first). That is the wall clock in production; under a
//! fake clock it is the fake time moving at real speed from the last call,
//! so a user stamped at a fake date is evicted after `idleTtlMs` on that
//! clock (or of real time with no call at all), never at once because the
//! machine's date is years away.

use super::error::EngineError;
use super::policy::EpochMs;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// JavaScript's Date range: ±8.64e15 ms around the epoch.
const MAX_DATE_MS: f64 = 8.64e15;

/// The system's real-time clock in epoch milliseconds: what an unreplaced
/// `Date.now()` returns. Read only where no caller's clock is at hand
/// (see "Clocks" above).
pub fn now_ms() -> EpochMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A caller's clock reading carried past its call: the reading plus the
/// real (monotonic) time since it was taken. Equal to the wall clock in
/// production; under a test's fake clock it starts at the fake time. For
/// work that outlives a call (a wait on another instance) or that no caller
/// asks for ([`Engine::app_now`](super::Engine::app_now)).
#[derive(Debug, Clone, Copy)]
pub struct CallerNow {
    at: EpochMs,
    read: std::time::Instant,
}

impl CallerNow {
    /// The caller read `at` just now.
    pub fn new(at: EpochMs) -> Self {
        Self {
            at,
            read: std::time::Instant::now(),
        }
    }

    /// The reading as the caller gave it.
    pub fn at(&self) -> EpochMs {
        self.at
    }

    /// The reading, advanced by the real time since.
    pub fn now(&self) -> EpochMs {
        let since = self.read.elapsed().as_millis().min(i64::MAX as u128) as i64;
        self.at.saturating_add(since)
    }
}

/// A number of epoch milliseconds from JavaScript (a number or
/// `Date.getTime()`), if it is one a `Date` can hold: finite and within
/// ±8.64e15. The one range check every expiry coming in passes.
#[inline]
pub fn js_ms(ms: f64) -> Option<EpochMs> {
    (ms.is_finite() && ms.abs() <= MAX_DATE_MS).then(|| ms.floor() as i64)
}

/// [`js_ms`] for an argument: out of range is `INVALID_ARGUMENT` naming it.
pub fn from_js_ms(name: &'static str, ms: f64) -> Result<EpochMs, EngineError> {
    js_ms(ms).ok_or_else(|| {
        EngineError::invalid_argument(
            name,
            "must be a valid Date, epoch milliseconds or an ISO 8601 string",
        )
    })
}

/// The caller's clock reading (`nowMs`, what `Date.now()` returned): epoch
/// milliseconds a `Date` can hold, or `INVALID_ARGUMENT`.
pub fn now_from_js(ms: f64) -> Result<EpochMs, EngineError> {
    js_ms(ms).ok_or_else(|| {
        EngineError::invalid_argument("nowMs", "must be epoch milliseconds a Date can hold")
    })
}

/// An ISO 8601 date-time with an offset (RFC 3339, what `toISOString()`
/// writes). Looser formats are refused: `Date.parse` guesses, we do not.
pub fn parse_iso8601(name: &'static str, s: &str) -> Result<EpochMs, EngineError> {
    let t = OffsetDateTime::parse(s.trim(), &Rfc3339).map_err(|_| {
        EngineError::invalid_argument(
            name,
            "is not an ISO 8601 date-time with a time zone (e.g. 2026-01-25T21:14:28Z)",
        )
    })?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// Longest `expiresIn` taken, in seconds (about 317 years).
pub const MAX_EXPIRES_IN_S: f64 = 1e10;

/// `expiresIn` seconds from now, as the provider said.
pub fn from_expires_in(
    name: &'static str,
    seconds: f64,
    now: EpochMs,
) -> Result<EpochMs, EngineError> {
    if !seconds.is_finite() || seconds <= 0.0 || seconds > MAX_EXPIRES_IN_S {
        return Err(EngineError::invalid_argument(
            name,
            "must be a positive number of seconds",
        ));
    }
    Ok(now.saturating_add((seconds * 1000.0) as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iso_strings_like_to_iso_string() {
        assert_eq!(
            parse_iso8601("x", "1970-01-01T00:00:01.500Z").unwrap(),
            1500
        );
        assert_eq!(
            parse_iso8601("x", "2026-01-25T21:14:28+01:00").unwrap(),
            1_769_372_068_000
        );
        for bad in [
            "",
            "tomorrow",
            "2026-01-25",
            "1700000000000",
            "2026-13-01T00:00:00Z",
        ] {
            let e = parse_iso8601("token.expiresAt", bad).unwrap_err();
            assert!(e.to_string().starts_with("token.expiresAt"), "{e}");
        }
    }

    #[test]
    fn js_numbers_are_checked() {
        assert_eq!(from_js_ms("x", 12.9).unwrap(), 12);
        assert!(from_js_ms("x", f64::NAN).is_err());
        assert!(from_js_ms("x", 9e15).is_err());
        assert_eq!(js_ms(8.64e15), Some(8_640_000_000_000_000));
        for bad in [1e300, -1e300, -8.64e15 - 1.0, f64::INFINITY, f64::NAN] {
            assert_eq!(js_ms(bad), None, "{bad}");
        }
        assert_eq!(now_from_js(1_893_456_000_000.5).unwrap(), 1_893_456_000_000);
        assert!(now_from_js(f64::NAN).is_err());
        assert_eq!(from_expires_in("x", 60.0, 1000).unwrap(), 61_000);
        assert!(from_expires_in("x", 0.0, 0).is_err());
        assert!(from_expires_in("x", -5.0, 0).is_err());
    }
}
