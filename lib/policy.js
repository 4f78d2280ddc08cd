'use strict'
// The buffer rule on the hot path. The core defines it
// (`Policy::is_fresh`, src/engine/policy.rs) and applies it on every other
// path; this is the same comparison, so that a token valid beyond the buffer
// is handed back without a native call. __test__/policy.spec.mjs holds the
// two equal on any input (fast-check), boundaries included.

/** JavaScript's Date range: ±8.64e15 ms around the epoch. */
const MAX_DATE_MS = 8.64e15

/**
 * Whether a token expiring at `expiresAtMs` outlives a buffer of `bufferMs`
 * at `nowMs` (epoch ms; fractions are floored, as the core reads them). A
 * time no Date can hold (NaN, ±Infinity, out of range) is never fresh: the
 * slow path then refuses it with a clear error.
 */
function isFresh(expiresAtMs, nowMs, bufferMs) {
  return Math.floor(expiresAtMs) - Math.floor(nowMs) > bufferMs && expiresAtMs <= MAX_DATE_MS && nowMs >= -MAX_DATE_MS
}

module.exports = { isFresh, MAX_DATE_MS }
