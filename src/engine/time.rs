//! Turning the caller's expiry inputs into epoch milliseconds.

use super::error::EngineError;
use super::policy::EpochMs;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// JavaScript's Date range: ±8.64e15 ms around the epoch.
const MAX_DATE_MS: f64 = 8.64e15;

/// The wall clock in epoch milliseconds, the same scale as `Date.now()`.
pub fn now_ms() -> EpochMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A number of epoch milliseconds from JavaScript (a number or `Date.getTime()`).
pub fn from_js_ms(name: &'static str, ms: f64) -> Result<EpochMs, EngineError> {
    if !ms.is_finite() || ms.abs() > MAX_DATE_MS {
        return Err(EngineError::invalid_argument(
            name,
            "must be a valid date, epoch milliseconds or ISO 8601 string",
        ));
    }
    Ok(ms.floor() as i64)
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

/// `expiresIn` seconds from now, as the provider said.
pub fn from_expires_in(
    name: &'static str,
    seconds: f64,
    now: EpochMs,
) -> Result<EpochMs, EngineError> {
    if !seconds.is_finite() || seconds <= 0.0 || seconds > 1e10 {
        return Err(EngineError::invalid_argument(
            name,
            "must be a positive number of seconds",
        ));
    }
    Ok(now + (seconds * 1000.0) as i64)
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
        assert_eq!(from_expires_in("x", 60.0, 1000).unwrap(), 61_000);
        assert!(from_expires_in("x", 0.0, 0).is_err());
        assert!(from_expires_in("x", -5.0, 0).is_err());
    }
}
