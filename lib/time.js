'use strict'
// A time the app hands over (a presented token's or a store row's
// `expiresAt`, a refresh result's, the clock's reading) as epoch ms: one
// conversion, so every path in refuses the same mistakes with the same
// words. The range (a valid Date's) is the core's (src/engine/time.rs).

const { parseIsoTime } = require('../binding.js')
const { argError } = require('./errors.js')

// Numbers from 1e9 to 1e11 are January 1970 to March 1973 in epoch ms, no
// expiry or clock reading a live app has, and 2001 to 5138 in epoch seconds,
// the usual mistake (a seconds column, `exp` from a JWT): refused, not taken
// as a 1970 date that refreshes on every call.
const SECONDS_FROM = 1e9
const SECONDS_UNTIL = 1e11

/** The TypeError for a number in epoch seconds where epoch ms belong. */
function secondsError(name, value, verb = 'is') {
  return argError(name, `${verb} ${value}, which looks like epoch seconds: epoch milliseconds are expected (multiply by 1000, or pass a Date)`)
}

/**
 * `Date | number | string` to epoch ms, or a TypeError naming `name`. Only
 * the type (and a number that can only be seconds) is checked here: the
 * range (a valid Date's) is the core's (src/engine/time.rs), for every path
 * in.
 */
function toEpochMs(value, name) {
  if (typeof value === 'number') {
    if (value >= SECONDS_FROM && value < SECONDS_UNTIL) throw secondsError(name, value)
    return value
  }
  if (value instanceof Date || (value !== null && typeof value === 'object' && typeof value.getTime === 'function')) {
    const ms = value.getTime()
    if (typeof ms === 'number') return ms
  } else if (typeof value === 'string') {
    try {
      return parseIsoTime(value)
    } catch {
      throw argError(name, 'is not an ISO 8601 date-time with a time zone (e.g. 2026-01-25T21:14:28Z)')
    }
  }
  throw argError(name, 'must be a valid Date, epoch milliseconds or an ISO 8601 string')
}

module.exports = { SECONDS_FROM, SECONDS_UNTIL, secondsError, toEpochMs }
