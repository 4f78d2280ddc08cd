'use strict'
// The errors this package throws. Every one carries a stable `code`
// (README: Errors): `INVALID_ARGUMENT` on a TypeError or RangeError for bad
// input, the refresh outcomes on a TokenRefreshError, `INTERNAL` for a bug.

const { errorCodes } = require('../binding.js')

/**
 * Error for a refresh that did not produce a token; `code` is stable.
 * `new TokenRefreshError(code, message?, { userId?, cause?, status?, error? })`;
 * the older `(code, userId, message, options?)` still works (a string third
 * argument, or a fourth, says which).
 */
class TokenRefreshError extends Error {
  constructor(code, ...rest) {
    const legacy = rest.length >= 3 || typeof rest[1] === 'string'
    const options = (legacy ? rest[2] : rest[1]) ?? undefined
    const message = legacy ? rest[1] : rest[0]
    super(message, options)
    this.name = 'TokenRefreshError'
    this.code = code
    this.userId = legacy ? rest[0] : (options?.userId ?? '')
    if (options && options.status !== undefined) this.status = options.status
    if (options && options.error !== undefined) this.error = options.error
  }
}

/** A bad argument: `name` starts the message, so the caller knows which. */
function argError(name, problem, Kind = TypeError, cause = undefined) {
  return Object.assign(new Kind(`${name} ${problem}`, cause === undefined ? undefined : { cause }), { code: 'INVALID_ARGUMENT' })
}

/** Codes this package puts on what it throws (README: Errors): the core's list. */
const CODES = new Set(errorCodes())

/**
 * What reading the caller's `name` argument threw, as the caller should see
 * it: our own errors (they carry a stable code) as `fromNative` has them;
 * anything else came from the caller's own getter or Proxy, and becomes a
 * TypeError (`INVALID_ARGUMENT`) naming `name`, the thrown value as its
 * cause.
 */
function callerError(e, name) {
  try {
    if (e instanceof Error && CODES.has(/** @type {{ code?: string }} */ (e).code ?? '')) return fromNative(e)
  } catch {}
  return argError(name, 'could not be read: a getter or Proxy threw (see cause)', TypeError, e)
}

/** A bug in this package, with the stable code `INTERNAL`. */
function internalError(message) {
  return Object.assign(new Error(`internal: ${message}`), { code: 'INTERNAL' })
}

/**
 * A native error as the caller should see it: native argument errors carry
 * `code: 'INVALID_ARGUMENT'` on a plain Error and become a `Kind` (TypeError,
 * or RangeError where a value, not a type, is wrong); others (and argErrors
 * made in JS) pass through.
 */
function fromNative(e, Kind = TypeError) {
  if (e && e.code === 'INVALID_ARGUMENT' && !(e instanceof TypeError || e instanceof RangeError)) {
    // A string over its length limit is a TypeError wherever it is (README:
    // Errors), as a user id or a client id is; the core says so in words.
    const kind = TOO_LONG.test(e.message) ? TypeError : Kind
    return Object.assign(new kind(e.message), { code: 'INVALID_ARGUMENT' })
  }
  return e
}
const TOO_LONG = /must be at most \d+ bytes long/

// For bookkeeping calls that cannot fail in practice (they only throw on a
// caught Rust panic) made where an exception would be uncaught.
function quietly(fn) {
  try {
    fn()
  } catch {}
}

module.exports = { TokenRefreshError, argError, callerError, fromNative, internalError, quietly }
