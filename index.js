'use strict'
// The public API. Decisions (the buffer rule, single flight, what to cache,
// eviction) live in the Rust core behind `binding.js`; this file only
// sequences promises around it, because promise plumbing on the JS thread is
// far cheaper than crossing into tokio (DEVELOPERS.md has the numbers):
// - the hot path is one native call on a number (`isFresh`), then a
//   resolved promise;
// - a refresh calls the refresh function right here and reports its result
//   to the core, which says who gets what.

const { NativeManager, NativeRefresher, parseIsoTime } = require('./binding.js')
const shared = require('./redis.js')

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

function argError(name, problem, Kind = TypeError) {
  const e = new Kind(`${name} ${problem}`)
  e.code = 'INVALID_ARGUMENT'
  return e
}

// Native errors carry `code`; argument errors become TypeErrors like ours.
function fromNative(e, Kind = TypeError) {
  if (e && e.code === 'INVALID_ARGUMENT') {
    const t = new Kind(e.message)
    t.code = 'INVALID_ARGUMENT'
    return t
  }
  return e
}

const MAX_DATE_MS = 8.64e15

/** `Date | number | string` to epoch ms, or a TypeError naming `name`. */
function toEpochMs(value, name) {
  if (typeof value === 'number') {
    if (value === value && value <= MAX_DATE_MS && value >= -MAX_DATE_MS) return value
  } else if (value instanceof Date || (value !== null && typeof value === 'object' && typeof value.getTime === 'function')) {
    const ms = value.getTime()
    if (typeof ms === 'number' && ms === ms) return ms
  } else if (typeof value === 'string') {
    try {
      return parseIsoTime(value)
    } catch {
      throw argError(name, 'is not an ISO 8601 date-time with a time zone (e.g. 2026-01-25T21:14:28Z)')
    }
  }
  throw argError(name, 'must be a valid Date, epoch milliseconds or an ISO 8601 string')
}

const ABORT = Symbol('abort')

/** What a refresh function receives. `signal` is created on first use. */
class RefreshContext {
  #controller = null
  #abortedWith = undefined
  constructor(userId, refreshToken) {
    this.userId = userId
    this.refreshToken = refreshToken
  }
  get signal() {
    if (this.#controller === null) {
      this.#controller = new AbortController()
      if (this.#abortedWith !== undefined) this.#controller.abort(this.#abortedWith)
    }
    return this.#controller.signal
  }
  [ABORT](reason) {
    this.#abortedWith = reason
    if (this.#controller !== null) this.#controller.abort(reason)
  }
}

function invoke(refreshFn, ctx) {
  try {
    return Promise.resolve(refreshFn(ctx))
  } catch (e) {
    return Promise.reject(e)
  }
}

/** Refresh results, type-checked here; the core checks what they mean. */
function refreshedFields(result) {
  if (result === null || typeof result !== 'object') return null
  const { accessToken, refreshToken, expiresAt, expiresIn } = result
  if (typeof accessToken !== 'string') return null
  if (refreshToken != null && typeof refreshToken !== 'string') return null
  if (expiresIn != null && typeof expiresIn !== 'number') return null
  let expiresAtMs = null
  if (expiresAt != null) {
    try {
      expiresAtMs = toEpochMs(expiresAt, 'expiresAt')
    } catch {
      return null
    }
  }
  return { accessToken, refreshToken: refreshToken ?? null, expiresAtMs, expiresIn: expiresIn ?? null }
}

/**
 * Outages, after which a caller's own unexpired token is served instead.
 * (COORDINATOR_UNAVAILABLE too: serving a token runs no refresh, which is
 * all `onError: 'fail'` forbids.)
 */
const RIDE_OUT = new Set(['REFRESH_FAILED', 'REFRESH_TIMEOUT', 'COORDINATOR_UNAVAILABLE'])

const OPTION_NAMES = ['bufferTimeMs', 'doubleCheckWindowMs', 'refreshTimeoutMs', 'idleTtlMs']

class TokenManager {
  #native
  // The engine's isFresh / begin / complete as functions bound to it: the
  // calls every getValidToken makes, at a fraction of a method call's cost.
  #isFresh
  #begin
  #complete
  #timeoutMs
  /** Cross-instance coordination (`options.redis`), or null: in-process only. */
  #shared = null
  /** flightId -> promise of the core's issued token, for callers that join. */
  #flights = new Map()

  constructor(options) {
    if (options != null && typeof options !== 'object') throw argError('options', 'must be an object')
    const o = options ?? {}
    for (const name of OPTION_NAMES) {
      if (o[name] !== undefined && typeof o[name] !== 'number') throw argError(`options.${name}`, 'must be a number')
    }
    try {
      this.#native = new NativeManager({
        bufferTimeMs: o.bufferTimeMs,
        doubleCheckWindowMs: o.doubleCheckWindowMs,
        refreshTimeoutMs: o.refreshTimeoutMs,
        idleTtlMs: o.idleTtlMs,
      })
    } catch (e) {
      throw fromNative(e, RangeError)
    }
    const direct = this.#native.directFunctions()
    this.#isFresh = direct.isFresh
    this.#begin = direct.begin
    this.#complete = direct.complete
    this.#timeoutMs = this.#native.refreshTimeoutMs
    if (o.redis !== undefined && o.redis !== null) {
      shared.checkOptions(o.redis, argError)
      try {
        this.#shared = new shared.SharedRefresh(this.#native, o.redis, { newError: coordinatorError })
      } catch (e) {
        throw fromNative(e, RangeError)
      }
    }
  }

  /**
   * Resolves with a token valid beyond the buffer, refreshing at most once
   * per user however many calls arrive together. Never throws: bad
   * arguments and failures reject.
   */
  async getValidToken(userId, token, refreshFn) {
    try {
      if (typeof userId !== 'string' || userId.length === 0) throw argError('userId', 'must be a non-empty string')
      if (token === null || typeof token !== 'object') throw argError('token', 'must be an object { accessToken, expiresAt }')
      const accessToken = token.accessToken
      if (typeof accessToken !== 'string') throw argError('token.accessToken', 'must be a string')
      const expiresAt = token.expiresAt
      // A Date (what the seed's callers pass) is read here, once; any other
      // form in toEpochMs.
      const isDate = expiresAt instanceof Date
      const exp = isDate ? expiresAt.getTime() : toEpochMs(expiresAt, 'token.expiresAt')
      if (typeof exp !== 'number' || exp !== exp) throw argError('token.expiresAt', 'must be a valid Date, epoch milliseconds or an ISO 8601 string')
      if (typeof refreshFn !== 'function') throw argError('refreshFn', 'must be a function')
      // Hot path: one native call on a number; an empty token is never served.
      if (accessToken.length !== 0 && this.#isFresh(exp)) {
        return { accessToken, shouldUpdate: false, expiresAt: isDate ? expiresAt : new Date(exp) }
      }
      const refreshToken = token.refreshToken
      if (refreshToken != null && typeof refreshToken !== 'string') throw argError('token.refreshToken', 'must be a string or null')
      return this.#slow(userId, accessToken, refreshToken ?? null, exp, expiresAt, refreshFn)
    } catch (e) {
      throw fromNative(e)
    }
  }

  /** The API answered 401 with `accessToken` (or any token of the user's). */
  invalidate(userId, accessToken) {
    if (typeof userId !== 'string' || userId.length === 0) throw argError('userId', 'must be a non-empty string')
    if (accessToken !== undefined && accessToken !== null && typeof accessToken !== 'string') {
      throw argError('accessToken', 'must be a string or undefined')
    }
    try {
      this.#native.invalidate(userId, accessToken ?? null)
    } catch (e) {
      throw fromNative(e)
    }
  }

  stats() {
    const s = this.#native.stats()
    s.redisFallbacks = this.#shared === null ? 0 : this.#shared.fallbacks
    return s
  }

  /**
   * Lets a script exit cleanly: waits for pending Redis writes, then closes
   * the Redis connection. Later refreshes reject with
   * COORDINATOR_UNAVAILABLE; tokens still valid are served as before.
   * Without `redis` there is nothing to close.
   */
  close() {
    return this.#shared === null ? Promise.resolve() : this.#shared.close()
  }

  #slow(userId, accessToken, refreshToken, exp, expiresAt, refreshFn) {
    // Mostly a number: lead (>= 0) or join (< 0) that flight; see direct.rs.
    const plan = this.#begin(userId, accessToken, refreshToken, exp)
    if (plan === null) {
      return Promise.resolve({ accessToken, shouldUpdate: false, expiresAt: expiresAt instanceof Date ? expiresAt : new Date(exp) })
    }
    let leader, flightId, leadWith
    if (typeof plan === 'number') {
      leader = plan >= 0
      flightId = leader ? plan : -plan - 1
      leadWith = refreshToken
    } else {
      if (plan.kind === 'held') return Promise.resolve(validToken(plan, plan.shouldUpdate))
      leader = plan.kind === 'lead'
      flightId = plan.flightId
      leadWith = plan.refreshToken ?? null
    }
    const flight = leader ? this.#lead(userId, flightId, leadWith, refreshFn, accessToken, exp) : this.#flights.get(flightId)
    if (flight === undefined) throw new Error('internal: joined a refresh this manager does not know')
    return flight.then(
      // A leader handed a token another instance refreshed may still be told
      // not to persist it (issued.shouldUpdate: see redis.js).
      (issued) => validToken(issued, leader && issued.shouldUpdate),
      (err) => {
        // An outage need not fail a caller whose own token still works. A
        // verdict (reconnect, bad credentials, a buggy result) is not ridden
        // out: hiding it would only delay the fix.
        if (RIDE_OUT.has(err?.code) && this.#native.serveStale(userId, accessToken, exp)) {
          return { accessToken, shouldUpdate: false, expiresAt: new Date(exp) }
        }
        throw err
      },
    )
  }

  /** Runs the refresh for `flightId`; settles with the core's issued token. */
  #lead(userId, flightId, refreshToken, refreshFn, accessToken, exp) {
    const native = this.#native
    // A native refresher runs in Rust with the manager's timeout as its
    // budget (the timeout drops its HTTP request). The context still carries
    // the refresh token, which Redis coordination may replace with a newer one.
    const refresher = refreshFn[NATIVE_REFRESHER]
    const ctx = new RefreshContext(userId, refreshToken)
    let resolveFlight
    let rejectFlight
    const flight = new Promise((resolve, reject) => {
      resolveFlight = resolve
      rejectFlight = reject
    })
    let settled = false
    // Ends the flight once. What comes later (a result after the timeout)
    // only feeds the core. Nothing here may throw: it runs in a timer or a
    // promise callback nobody awaits, where a throw would crash the process.
    const settle = (error, issued) => {
      settled = true
      clearTimeout(timer)
      this.#flights.delete(flightId)
      if (error !== undefined) rejectFlight(error)
      else resolveFlight(issued)
    }
    const timer = setTimeout(() => {
      const err = new TokenRefreshError('REFRESH_TIMEOUT', userId, `refresh did not settle within ${this.#timeoutMs} ms`)
      quietly(() => native.fail(userId, flightId, true))
      ctx?.[ABORT](err)
      settle(err)
    }, this.#timeoutMs)
    // With Redis, the refresh runs only under the user's cross-instance lock,
    // or a token another instance refreshed answers instead (redis.js).
    const refresh = () => (refresher === undefined ? invoke(refreshFn, ctx) : nativeRefresh(refresher, userId, ctx.refreshToken, this.#timeoutMs))
    const obtained = this.#shared === null ? refresh() : this.#shared.obtain(ctx, accessToken, exp, refresh, this.#timeoutMs)
    obtained.then(
      (result) => {
        const late = settled
        let issued
        let error
        try {
          issued = this.#report(userId, flightId, result, late)
        } catch (e) {
          error = e
        }
        // With Redis: share the token the core kept (or free the lock).
        if (this.#shared !== null) this.#shared.reported(ctx, issued)
        if (!late) settle(error, issued)
      },
      (cause) => {
        if (settled) return
        // Errors that already carry a stable code keep it: a native
        // refresher's (with `status` and the provider's `error`, or a
        // TypeError for a userId Tarabut refuses), a TokenRefreshError thrown
        // by a refresh function that wraps one, and the coordinator's own
        // (COORDINATOR_UNAVAILABLE, a wait on another instance that timed out).
        const own = refresher !== undefined || cause instanceof TokenRefreshError ? cause : shared.coordinatorError(cause)
        quietly(() => native.fail(userId, flightId, own?.code === 'REFRESH_TIMEOUT'))
        settle(own ?? new TokenRefreshError('REFRESH_FAILED', userId, 'refresh function failed', { cause, status: cause?.status, error: cause?.error }))
      },
    )
    this.#flights.set(flightId, flight)
    return flight
  }

  /** Hands a refresh result to the core; returns its issued token or throws. */
  #report(userId, flightId, result, late) {
    const fields = refreshedFields(result)
    if (fields === null) {
      if (!late) this.#native.fail(userId, flightId, false)
      throw new TokenRefreshError('INVALID_REFRESH_RESULT', userId, 'refresh result is not an object with a string accessToken and a valid expiresAt or expiresIn')
    }
    try {
      // A late result is still handed over: with rotating refresh tokens it
      // may hold the only live one.
      const fromShared = shared.sharedToken(result)
      if (fromShared !== undefined) {
        return this.#native.adopt(userId, flightId, fields.accessToken, fields.refreshToken, fields.expiresAtMs, fromShared.shouldUpdate)
      }
      // The issued token's expiry, negative when the caller is handed no
      // refresh token (none rotated); see direct.rs.
      const expiry = this.#complete(userId, flightId, fields.accessToken, fields.refreshToken, fields.expiresAtMs, fields.expiresIn)
      return { accessToken: fields.accessToken, refreshToken: expiry > 0 ? fields.refreshToken : null, expiresAtMs: Math.abs(expiry), shouldUpdate: true }
    } catch (e) {
      throw e?.code === 'INVALID_REFRESH_RESULT' ? new TokenRefreshError(e.code, userId, e.message) : e
    }
  }
}

// For bookkeeping calls that cannot fail in practice (they only throw on a
// caught Rust panic) made where an exception would be uncaught.
function quietly(fn) {
  try {
    fn()
  } catch {}
}

function coordinatorError(code, userId, message) {
  return new TokenRefreshError(code, userId, message)
}

function validToken(t, shouldUpdate) {
  const v = { accessToken: t.accessToken, shouldUpdate, expiresAt: new Date(t.expiresAtMs) }
  if (shouldUpdate && t.refreshToken != null) v.refreshToken = t.refreshToken
  return v
}

// Native refreshers: token calls made in Rust (reqwest on tokio). Each is a
// plain RefreshFn for anyone who wraps it; the manager spots the native half
// under NATIVE_REFRESHER and calls it directly: the HTTP call runs in Rust.

const NATIVE_REFRESHER = Symbol('tarabut-token-manager.nativeRefresher')

let lastAbortId = 0
function nextAbortId() {
  lastAbortId = lastAbortId >= 0xffffffff ? 1 : lastAbortId + 1
  return lastAbortId
}

/** A failed native outcome as the error a caller switches on. */
function refresherError(userId, outcome) {
  if (outcome.code === 'INVALID_ARGUMENT') {
    const e = new TypeError(outcome.message)
    e.code = 'INVALID_ARGUMENT'
    return e
  }
  return new TokenRefreshError(outcome.code, userId, outcome.message, { status: outcome.status, error: outcome.error })
}

function refreshedToken(outcome) {
  const t = { accessToken: outcome.accessToken, expiresIn: outcome.expiresIn }
  if (outcome.refreshToken != null) t.refreshToken = outcome.refreshToken
  return t
}

/** The manager's call: its refresh timeout is the whole budget. */
function nativeRefresh(refresher, userId, refreshToken, timeoutMs) {
  let pending
  try {
    pending = refresher.refresh(userId, refreshToken, timeoutMs, null)
  } catch (e) {
    return Promise.reject(e) // only a caught Rust panic (code INTERNAL)
  }
  return pending.then((outcome) => {
    if (outcome.code != null) throw refresherError(userId, outcome)
    return refreshedToken(outcome)
  })
}

function makeRefresher(refresher, name) {
  // A RefreshFn: (ctx) => Promise<{ accessToken, refreshToken?, expiresIn }>.
  // It honours ctx.signal: an abort drops the HTTP request and rejects
  // with the signal's reason.
  const refresh = (ctx) => {
    try {
      if (ctx === null || typeof ctx !== 'object') throw argError('ctx', 'must be an object { userId, refreshToken?, signal? }')
      const userId = ctx.userId
      if (typeof userId !== 'string' || userId.length === 0) throw argError('ctx.userId', 'must be a non-empty string')
      const refreshToken = ctx.refreshToken ?? null
      if (refreshToken !== null && typeof refreshToken !== 'string') throw argError('ctx.refreshToken', 'must be a string or null')
      const signal = ctx.signal
      if (signal == null) return nativeRefresh(refresher, userId, refreshToken, null)
      if (typeof signal.addEventListener !== 'function') throw argError('ctx.signal', 'must be an AbortSignal')
      if (signal.aborted) return Promise.reject(signal.reason)
      const abortId = nextAbortId()
      return new Promise((resolve, reject) => {
        const onAbort = () => {
          quietly(() => refresher.abort(abortId))
          reject(signal.reason)
        }
        signal.addEventListener('abort', onAbort, { once: true })
        refresher.refresh(userId, refreshToken, null, abortId).then(
          (outcome) => {
            signal.removeEventListener('abort', onAbort)
            if (outcome.code != null) reject(refresherError(userId, outcome))
            else resolve(refreshedToken(outcome))
          },
          (e) => {
            signal.removeEventListener('abort', onAbort)
            reject(e)
          },
        )
      })
    } catch (e) {
      return Promise.reject(e)
    }
  }
  Object.defineProperty(refresh, 'name', { value: name })
  Object.defineProperty(refresh, NATIVE_REFRESHER, { value: refresher })
  return refresh
}

/** Copies the known options, refusing unknown ones (a typo must not fall back to a default URL). */
function pickOptions(fn, options, types) {
  if (options === null || typeof options !== 'object') throw argError('options', `must be an object (${fn})`)
  for (const key of Object.keys(options)) {
    if (!Object.hasOwn(types, key)) throw argError(`options.${key}`, `is not a ${fn} option (${Object.keys(types).join(', ')})`)
  }
  const picked = {}
  for (const [key, spec] of Object.entries(types)) {
    const value = options[key]
    if (value === undefined || value === null) {
      if (spec.required) throw argError(`options.${key}`, `is required (${spec.type})`)
      continue
    }
    if (typeof value !== spec.type) throw argError(`options.${key}`, `must be a ${spec.type}`)
    picked[key] = value
  }
  return picked
}

function buildRefresher(factory, options, name) {
  let refresher
  try {
    refresher = factory(options)
  } catch (e) {
    throw fromNative(e)
  }
  return makeRefresher(refresher, name)
}

const TARABUT_OPTIONS = {
  clientId: { type: 'string', required: true },
  clientSecret: { type: 'string', required: true },
  tokenUrl: { type: 'string' },
  scope: { type: 'string' },
  timeoutMs: { type: 'number' },
  maxRetries: { type: 'number' },
}

/**
 * Tarabut Gateway's token call, made natively: a client-credentials POST
 * per user (header X-TG-CustomerUserId), retried on connection failures,
 * 429 (after Retry-After) and 5xx. Pass it to getValidToken in place of a
 * refreshFn, or call it as one.
 */
function tarabutRefresher(options) {
  return buildRefresher((o) => NativeRefresher.tarabut(o), pickOptions('tarabutRefresher', options, TARABUT_OPTIONS), 'tarabutRefresher')
}

const OAUTH2_OPTIONS = {
  tokenUrl: { type: 'string', required: true },
  clientId: { type: 'string', required: true },
  clientSecret: { type: 'string', required: true },
  authMethod: { type: 'string' },
  scope: { type: 'string' },
  timeoutMs: { type: 'number' },
}

/**
 * The RFC 6749 section 6 refresh_token grant, made natively with
 * `ctx.refreshToken`. A rotated refresh token comes back to the caller that
 * must persist it; a request that may have reached the server is never
 * resent.
 */
function oauth2Refresher(options) {
  return buildRefresher((o) => NativeRefresher.oauth2(o), pickOptions('oauth2Refresher', options, OAUTH2_OPTIONS), 'oauth2Refresher')
}

/** The process-wide manager (one per JS realm: main thread or worker). */
const tokenManager = new TokenManager()

/** `tokenManager.getValidToken`, for call sites written against the seed. */
function getValidToken(userId, token, refreshFn) {
  return tokenManager.getValidToken(userId, token, refreshFn)
}

module.exports = { TokenManager, TokenRefreshError, tokenManager, getValidToken, tarabutRefresher, oauth2Refresher }
