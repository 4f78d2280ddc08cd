'use strict'
// The errors this package throws. Every one carries a stable `code`
// (README: Errors): `INVALID_ARGUMENT` on a TypeError or RangeError for bad
// input, the refresh outcomes on a TokenRefreshError, `INTERNAL` for a bug.

/** Error for a refresh that did not produce a token; `code` is stable. */
class TokenRefreshError extends Error {
  constructor(code, userId, message, options) {
    super(message, options)
    this.name = 'TokenRefreshError'
    this.code = code
    this.userId = userId
    if (options && options.status !== undefined) this.status = options.status
    if (options && options.error !== undefined) this.error = options.error
  }
}

/** A bad argument: `name` starts the message, so the caller knows which. */
function argError(name, problem, Kind = TypeError) {
  return Object.assign(new Kind(`${name} ${problem}`), { code: 'INVALID_ARGUMENT' })
}

/**
 * A native error as the caller should see it: native argument errors carry
 * `code: 'INVALID_ARGUMENT'` on a plain Error and become a `Kind` (TypeError,
 * or RangeError where a value, not a type, is wrong); others (and argErrors
 * made in JS) pass through.
 */
function fromNative(e, Kind = TypeError) {
  if (e && e.code === 'INVALID_ARGUMENT' && !(e instanceof TypeError || e instanceof RangeError)) {
    return Object.assign(new Kind(e.message), { code: 'INVALID_ARGUMENT' })
  }
  return e
}

// For bookkeeping calls that cannot fail in practice (they only throw on a
// caught Rust panic) made where an exception would be uncaught.
function quietly(fn) {
  try {
    fn()
  } catch {}
}

module.exports = { TokenRefreshError, argError, fromNative, quietly }
