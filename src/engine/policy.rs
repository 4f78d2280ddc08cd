//! When a token is good enough to hand out, and the knobs that decide it.
//! This is where the buffer rule is defined. The JavaScript hot path runs
//! the same comparison (`lib/policy.js`) without a native call; a property
//! test (`__test__/policy.spec.mjs`) holds the two equal on any input.

use super::error::EngineError;

/// Epoch milliseconds, as JavaScript's `Date.getTime()` gives them.
pub type EpochMs = i64;

pub const DEFAULT_BUFFER_MS: u64 = 300_000;
pub const DEFAULT_DOUBLE_CHECK_WINDOW_MS: u64 = 10_000;
pub const DEFAULT_REFRESH_TIMEOUT_MS: u64 = 30_000;
/// Twice the default buffer: long enough that a caller still presenting the
/// token a refresh replaced (its write was lost) is handed the new one, short
/// enough that 200k idle users do not pin memory for an hour.
pub const DEFAULT_IDLE_TTL_MS: u64 = 600_000;

/// 30 days: no token is taken to live longer (`maxTokenLifetimeMs`), so a
/// provider that answers `expires_in: 1e10` cannot make a token that is
/// never refreshed, nor a Redis record that never expires.
pub const DEFAULT_MAX_TOKEN_LIFETIME_MS: u64 = 30 * 24 * 3_600_000;
/// Longest `maxTokenLifetimeMs` accepted: ten years (not a timer's delay).
const MAX_LIFETIME_OPTION_MS: u64 = 3_650 * 24 * 3_600_000;

/// How long past the refresh timeout a flight may stay open before the
/// engine closes it itself. The binding's own timer closes it at the
/// timeout; this only catches a flight its caller lost (a bug, or a throw
/// between opening it and starting the refresh), so no user stays stuck.
/// The margin covers a timer delayed by a busy event loop.
pub const FLIGHT_GRACE_MS: u64 = 1_000;

/// Largest duration option accepted: 2^31-1 ms (24.8 days), the longest
/// timer Node can set; a longer `setTimeout` would fire at once.
const MAX_OPTION_MS: u64 = 2_147_483_647;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Refresh when fewer than this many ms remain.
    pub buffer_ms: u64,
    /// No second refresh for a user within this many ms of the last one.
    pub double_check_window_ms: u64,
    /// A refresh not settled after this many ms fails with `REFRESH_TIMEOUT`.
    pub refresh_timeout_ms: u64,
    /// Per-user state with nothing in flight is dropped after this long unused.
    pub idle_ttl_ms: u64,
    /// No token is taken to outlive this: a refresh result's expiry is
    /// capped to it, and a presented token expiring later is due.
    pub max_token_lifetime_ms: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            buffer_ms: DEFAULT_BUFFER_MS,
            double_check_window_ms: DEFAULT_DOUBLE_CHECK_WINDOW_MS,
            refresh_timeout_ms: DEFAULT_REFRESH_TIMEOUT_MS,
            idle_ttl_ms: DEFAULT_IDLE_TTL_MS,
            max_token_lifetime_ms: DEFAULT_MAX_TOKEN_LIFETIME_MS,
        }
    }
}

/// Options as they arrive from JavaScript: numbers that may be anything.
#[derive(Debug, Clone, Copy, Default)]
pub struct PolicyOptions {
    pub buffer_time_ms: Option<f64>,
    pub double_check_window_ms: Option<f64>,
    pub refresh_timeout_ms: Option<f64>,
    pub idle_ttl_ms: Option<f64>,
    pub max_token_lifetime_ms: Option<f64>,
}

impl Policy {
    pub fn from_options(o: &PolicyOptions) -> Result<Self, EngineError> {
        let d = Policy::default();
        Ok(Self {
            buffer_ms: duration("bufferTimeMs", o.buffer_time_ms, d.buffer_ms, 0)?,
            double_check_window_ms: duration(
                "doubleCheckWindowMs",
                o.double_check_window_ms,
                d.double_check_window_ms,
                0,
            )?,
            refresh_timeout_ms: duration(
                "refreshTimeoutMs",
                o.refresh_timeout_ms,
                d.refresh_timeout_ms,
                1,
            )?,
            idle_ttl_ms: duration("idleTtlMs", o.idle_ttl_ms, d.idle_ttl_ms, 1)?,
            max_token_lifetime_ms: o
                .max_token_lifetime_ms
                .map_or(Ok(d.max_token_lifetime_ms), |v| {
                    whole_ms("maxTokenLifetimeMs", v, 1, MAX_LIFETIME_OPTION_MS)
                })?,
        })
        .and_then(|p: Self| {
            if p.max_token_lifetime_ms <= p.buffer_ms {
                return Err(EngineError::invalid_argument(
                    "maxTokenLifetimeMs",
                    "must be longer than bufferTimeMs",
                ));
            }
            Ok(p)
        })
    }

    /// `expires_at` capped to [`Policy::max_token_lifetime_ms`] from `now`:
    /// what a refresh result's expiry is taken to be.
    #[inline]
    pub fn capped(&self, expires_at: EpochMs, now: EpochMs) -> EpochMs {
        expires_at.min(now.saturating_add(self.max_token_lifetime_ms as i64))
    }

    /// The token may be handed out without a refresh: it outlives the
    /// buffer, and claims no longer a life than `max_token_lifetime_ms`.
    #[inline]
    pub fn is_fresh(&self, expires_at: EpochMs, now: EpochMs) -> bool {
        let left = expires_at.saturating_sub(now);
        left > self.buffer_ms as i64 && left <= self.max_token_lifetime_ms as i64
    }

    /// The buffer for a token whose lifetime (expiry minus when it was
    /// issued) is known: at most half of it, so a token living two minutes
    /// under a five-minute buffer is not due the moment it arrives.
    #[inline]
    pub fn buffer_for(&self, lifetime_ms: i64) -> i64 {
        (self.buffer_ms as i64).min(lifetime_ms.max(0) / 2)
    }

    /// [`Policy::is_fresh`] with the buffer [`Policy::buffer_for`] gives a
    /// token of `lifetime_ms`.
    #[inline]
    pub fn is_fresh_for(&self, expires_at: EpochMs, lifetime_ms: i64, now: EpochMs) -> bool {
        expires_at.saturating_sub(now) > self.buffer_for(lifetime_ms)
    }

    /// The token still works, even if a refresh is due. Used to serve a
    /// caller's own token when a refresh fails.
    #[inline]
    pub fn is_unexpired(&self, expires_at: EpochMs, now: EpochMs) -> bool {
        expires_at > now
    }

    /// A refresh started at `started` is overdue: nobody will report on it
    /// any more (see [`FLIGHT_GRACE_MS`]).
    #[inline]
    pub fn is_overdue(&self, started: EpochMs, now: EpochMs) -> bool {
        now.saturating_sub(started) > (self.refresh_timeout_ms + FLIGHT_GRACE_MS) as i64
    }

    /// A refresh ran recently enough that another one would be redundant.
    #[inline]
    pub fn within_double_check(&self, last_refresh: EpochMs, now: EpochMs) -> bool {
        now.saturating_sub(last_refresh) < self.double_check_window_ms as i64
    }
}

fn duration(
    name: &'static str,
    value: Option<f64>,
    default: u64,
    min: u64,
) -> Result<u64, EngineError> {
    value.map_or(Ok(default), |v| whole_ms(name, v, min, MAX_OPTION_MS))
}

/// `v` (a JavaScript number) as a whole number from `min` to `max`: the one
/// check every numeric option passes (durations here, in `coordination` and
/// `refreshers`, and counts).
pub fn whole(v: f64, min: u64, max: u64) -> Option<u64> {
    (v.is_finite() && v.fract() == 0.0 && v >= min as f64 && v <= max as f64).then_some(v as u64)
}

/// [`whole`] for a duration option: otherwise `INVALID_ARGUMENT` naming it.
pub fn whole_ms(name: &'static str, v: f64, min: u64, max: u64) -> Result<u64, EngineError> {
    whole(v, min, max).ok_or_else(|| {
        EngineError::invalid_argument(
            name,
            format!("must be a whole number of milliseconds from {min} to {max}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_means_beyond_the_buffer() {
        let p = Policy {
            buffer_ms: 300_000,
            ..Policy::default()
        };
        let now = 1_000_000_000;
        assert!(p.is_fresh(now + 300_001, now));
        assert!(
            !p.is_fresh(now + 300_000, now),
            "exactly at the buffer edge is due"
        );
        assert!(!p.is_fresh(now - 1, now));
        assert!(p.is_unexpired(now + 1, now));
        assert!(!p.is_unexpired(now, now));
    }

    #[test]
    fn a_short_lived_token_gets_half_its_lifetime_as_buffer() {
        let p = Policy::default();
        assert_eq!(p.buffer_for(120_000), 60_000);
        assert_eq!(
            p.buffer_for(3_600_000),
            300_000,
            "long lives keep the buffer"
        );
        assert_eq!(p.buffer_for(-5), 0);
        let now = 1_000_000_000;
        assert!(p.is_fresh_for(now + 60_001, 120_000, now));
        assert!(!p.is_fresh_for(now + 60_000, 120_000, now));
        assert!(
            !p.is_fresh(now + 60_001, now),
            "the plain rule would refresh it"
        );
    }

    #[test]
    fn extreme_expiries_do_not_overflow() {
        let p = Policy::default();
        assert!(!p.is_fresh(i64::MIN, i64::MAX));
        // Past the longest lifetime: due.
        assert!(!p.is_fresh(i64::MAX, i64::MIN));
        let now = 1_700_000_000_000;
        assert!(p.is_fresh(now + DEFAULT_MAX_TOKEN_LIFETIME_MS as i64, now));
        assert!(!p.is_fresh(now + DEFAULT_MAX_TOKEN_LIFETIME_MS as i64 + 1, now));
        assert_eq!(
            p.capped(i64::MAX, now),
            now + DEFAULT_MAX_TOKEN_LIFETIME_MS as i64
        );
        assert_eq!(p.capped(now + 5, now), now + 5);
    }

    #[test]
    fn options_default_and_validate() {
        assert_eq!(
            Policy::from_options(&PolicyOptions::default()).unwrap(),
            Policy::default()
        );
        let p = Policy::from_options(&PolicyOptions {
            buffer_time_ms: Some(0.0),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.buffer_ms, 0);
        for bad in [f64::NAN, -1.0, 1.5, f64::INFINITY, 1e300] {
            let e = Policy::from_options(&PolicyOptions {
                buffer_time_ms: Some(bad),
                ..Default::default()
            })
            .unwrap_err();
            assert!(e.to_string().starts_with("bufferTimeMs"), "{e}");
        }
        assert!(Policy::from_options(&PolicyOptions {
            refresh_timeout_ms: Some(0.0),
            ..Default::default()
        })
        .is_err());
    }
}
