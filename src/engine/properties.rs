//! Properties of the policy and of time parsing over arbitrary inputs
//! (proptest): whatever a caller passes, an answer or a typed error, never a
//! panic, and the answers agree with the rules they implement.

use proptest::prelude::*;

use super::policy::{Policy, PolicyOptions, FLIGHT_GRACE_MS};
use super::time::{from_expires_in, from_js_ms, js_ms, parse_iso8601};
use super::ErrorCode;

const MAX_DATE_MS: f64 = 8.64e15;

/// Any f64, with the edges a caller might hit weighted in.
fn number() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(MAX_DATE_MS),
        Just(-MAX_DATE_MS),
        Just(MAX_DATE_MS + 1.0),
        Just(1e300),
        Just(-0.0),
        -1e16f64..1e16f64,
    ]
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        0u64..=2_147_483_647,
        0u64..=2_147_483_647,
        1u64..=2_147_483_647,
        1u64..=2_147_483_647,
        1u64..=315_360_000_000,
    )
        .prop_map(
            |(buffer_ms, double_check_window_ms, refresh_timeout_ms, idle_ttl_ms, longer)| Policy {
                buffer_ms,
                double_check_window_ms,
                refresh_timeout_ms,
                idle_ttl_ms,
                max_token_lifetime_ms: buffer_ms + longer,
            },
        )
}

proptest! {
    #[test]
    fn js_ms_accepts_exactly_what_a_date_can_hold(ms in number()) {
        let accepted = js_ms(ms);
        prop_assert_eq!(accepted.is_some(), ms.is_finite() && ms.abs() <= MAX_DATE_MS);
        if let Some(v) = accepted {
            prop_assert!(v.unsigned_abs() <= MAX_DATE_MS as u64);
        }
        if let Err(e) = from_js_ms("token.expiresAt", ms) {
            prop_assert_eq!(e.code(), ErrorCode::InvalidArgument);
            prop_assert!(e.to_string().starts_with("token.expiresAt "));
        }
    }

    #[test]
    fn expires_in_never_overflows(seconds in number(), now in any::<i64>()) {
        if let Ok(at) = from_expires_in("expiresIn", seconds, now) {
            prop_assert!(seconds > 0.0 && seconds <= 1e10);
            prop_assert!(at >= now);
        }
    }

    /// Any text, including odd Unicode: a time, or INVALID_ARGUMENT naming it.
    #[test]
    fn any_string_parses_or_is_refused(s in any::<String>()) {
        if let Err(e) = parse_iso8601("expiresAt", &s) {
            prop_assert_eq!(e.code(), ErrorCode::InvalidArgument);
        }
    }

    #[test]
    fn rfc3339_times_parse_to_their_instant(secs in 0i64..253_402_300_799, millis in 0i64..1000) {
        let t = time::OffsetDateTime::from_unix_timestamp(secs).unwrap();
        let text = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        );
        prop_assert_eq!(parse_iso8601("x", &text).unwrap(), secs * 1000 + millis);
    }

    #[test]
    fn options_are_accepted_only_as_whole_milliseconds_in_range(
        buffer in proptest::option::of(number()),
        window in proptest::option::of(number()),
        timeout in proptest::option::of(number()),
        idle in proptest::option::of(number()),
    ) {
        let o = PolicyOptions {
            buffer_time_ms: buffer,
            double_check_window_ms: window,
            refresh_timeout_ms: timeout,
            idle_ttl_ms: idle,
            max_token_lifetime_ms: None,
        };
        let ok = |v: Option<f64>, min: f64| {
            v.is_none_or(|v| v.is_finite() && v.fract() == 0.0 && v >= min && v <= 2_147_483_647.0)
        };
        let valid = ok(buffer, 0.0) && ok(window, 0.0) && ok(timeout, 1.0) && ok(idle, 1.0);
        match Policy::from_options(&o) {
            Ok(p) => {
                prop_assert!(valid);
                prop_assert_eq!(Some(p.buffer_ms as f64), buffer.or(Some(p.buffer_ms as f64)));
            }
            Err(e) => {
                prop_assert!(!valid);
                prop_assert_eq!(e.code(), ErrorCode::InvalidArgument);
            }
        }
    }

    /// The rules over the whole i64 range: no overflow, and each one is the
    /// comparison it documents.
    #[test]
    fn the_rules_hold_for_any_times(p in policy(), expires_at in any::<i64>(), now in any::<i64>(), at in any::<i64>()) {
        let left = i128::from(expires_at) - i128::from(now);
        let clamp = |v: i128| v.clamp(i128::from(i64::MIN), i128::from(i64::MAX));
        prop_assert_eq!(
            p.is_fresh(expires_at, now),
            clamp(left) > i128::from(p.buffer_ms) && clamp(left) <= i128::from(p.max_token_lifetime_ms)
        );
        prop_assert_eq!(p.is_unexpired(expires_at, now), expires_at > now);
        let since = clamp(i128::from(now) - i128::from(at));
        prop_assert_eq!(p.within_double_check(at, now), since < i128::from(p.double_check_window_ms));
        prop_assert_eq!(p.is_overdue(at, now), since > i128::from(p.refresh_timeout_ms + FLIGHT_GRACE_MS));
        // Fresh implies unexpired: a token handed out still works.
        prop_assert!(!p.is_fresh(expires_at, now) || p.is_unexpired(expires_at, now));
    }
}
