'use strict'
// The buffer rule on the hot path. The core defines it
// (`Policy::is_fresh`, src/engine/policy.rs) and applies it on every other
// path; this is the same comparison, so that a token valid beyond the buffer
// is handed back without a native call. __test__/policy.spec.mjs holds the
// two equal on any input (fast-check), boundaries included.

/** JavaScript's Date range: ±8.64e15 ms around the epoch. */
const MAX_DATE_MS = 8.64e15
/** `maxTokenLifetimeMs`'s default: 30 days (`DEFAULT_MAX_TOKEN_LIFETIME_MS`). */
const DEFAULT_MAX_TOKEN_LIFETIME_MS = 30 * 24 * 3_600_000

/**
 * Whether a token expiring at `expiresAtMs` outlives a buffer of `bufferMs`
 * at `nowMs` (epoch ms; fractions are floored, as the core reads them) and
 * claims no longer a life than `maxLifetimeMs`. A time no Date can hold
 * (NaN, ±Infinity, out of range) is never fresh: the slow path then
 * refuses it with a clear error.
 */
function isFresh(expiresAtMs, nowMs, bufferMs, maxLifetimeMs = DEFAULT_MAX_TOKEN_LIFETIME_MS) {
  const left = Math.floor(expiresAtMs) - Math.floor(nowMs)
  return left > bufferMs && left <= maxLifetimeMs && expiresAtMs <= MAX_DATE_MS && nowMs >= -MAX_DATE_MS
}

module.exports = { isFresh, MAX_DATE_MS, DEFAULT_MAX_TOKEN_LIFETIME_MS }
