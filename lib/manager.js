'use strict'
// TokenManager: sequences promises around the Rust core on the JS thread,
// because promise plumbing here is far cheaper than crossing into tokio
// (a #[napi] async call costs 40-65 µs; a bound function about 50 ns).
// Decisions (the buffer rule, single flight, what to cache, eviction) are
// the core's (src/engine, through lib/protocol.js and BindingManager):
// - the hot path is one native call on numbers (`isFresh`), then a
//   resolved promise;
// - a refresh calls the refresh function right here and reports its result
//   to the core, which says who gets what.
// The core has no clock: "now" is read here, from `options.now` (default
// `Date.now()`, looked up on every call so an app's fake timers apply), and
// passed with every call that decides something; the hot path lets the
// native side read the system clock when that is what `Date.now` is
// (src/engine/time.rs, "Clocks").

const { BindingManager, MAX_TOKEN_BYTES, MAX_USER_ID_BYTES, parseIsoTime } = require('../binding.js')

// A UTF-16 unit is at most 3 UTF-8 bytes, so strings this short (in units)
// are within their limit without measuring.
const SHORT_TOKEN = Math.floor(MAX_TOKEN_BYTES / 3)
const SHORT_USER_ID = Math.floor(MAX_USER_ID_BYTES / 3)
const coordination = require('./coordination.js')
const { TokenRefreshError, argError, callerError, fromNative, internalError, quietly } = require('./errors.js')
const observability = require('./observability.js')
const { bindProtocol } = require('./protocol.js')
const { CLIENT_CREDENTIALS, NATIVE_REFRESHER, nativeRefresh } = require('./refreshers.js')

// Date.prototype.getTime as it was when this module loaded: it reads the
// Date's own time value, so a Date whose `getTime` was replaced (or a Proxy
// of one: it throws) cannot hand back a value other than the Date's own.
const dateGetTime = Date.prototype.getTime

/**
 * `Date | number | string` to epoch ms, or a TypeError naming `name`. Only
 * the type is checked here: the range (a valid Date's) is the core's
 * (src/engine/time.rs), for every path in.
 */
function toEpochMs(value, name) {
  if (typeof value === 'number') return value
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

const ABORT = Symbol('abort')

/** What a refresh function receives. `signal` is created on first use. */
class RefreshContext {
  // Declared fields are defined on the instance, so a setter someone put on
  // Object.prototype never receives the refresh token.
  userId
  refreshToken
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

/**
 * Refresh results, type-checked here; the core checks what they mean. Each
 * field is read once (a getter may answer differently each time), and a
 * getter or Proxy that throws makes the result unusable.
 */
function refreshedFields(result) {
  try {
    return readRefreshed(result)
  } catch {
    return null
  }
}

function readRefreshed(result) {
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
  const shared = coordination.sharedToken(result)
  return { accessToken, refreshToken: refreshToken ?? null, expiresAtMs, expiresIn: expiresIn ?? null, shared }
}

/**
 * Outages, after which a caller's own unexpired token is served instead.
 * (COORDINATOR_UNAVAILABLE too: serving a token runs no refresh, which is
 * all `onError: 'fail'` forbids.)
 */
const RIDE_OUT = new Set(['REFRESH_FAILED', 'REFRESH_TIMEOUT', 'COORDINATOR_UNAVAILABLE'])

const OPTION_NAMES = ['bufferTimeMs', 'doubleCheckWindowMs', 'refreshTimeoutMs', 'idleTtlMs']

/** JavaScript's Date range: ±8.64e15 ms around the epoch. */
const MAX_DATE_MS = 8.64e15

/**
 * `Date.now` as it was when this module loaded, if it was the engine's own
 * (a native function named `now`, not bound: fake timers and spies are
 * JavaScript functions), else null. Its answer is the system clock, which
 * the native `isFresh` reads for less than a call to it costs.
 */
const SYSTEM_DATE_NOW = isEngineDateNow(Date.now) ? Date.now : null

function isEngineDateNow(fn) {
  return typeof fn === 'function' && fn.name === 'now' && /^function now\(\) \{\s*\[native code\]\s*\}$/.test(Function.prototype.toString.call(fn))
}

class TokenManager {
  #native
  // The engine's isFresh / begin / complete as functions bound to it
  // (lib/protocol.js): the calls every getValidToken makes.
  #isFresh
  #begin
  #complete
  #timeoutMs
  /** `options.now`, or null: `Date.now` as it is at each call. */
  #now
  /** The clock's name in errors. */
  #nowName
  /** Cross-instance coordination (`options.redis`), or null: in-process only. */
  #coordinator = null
  /** flightId -> promise of the core's issued token, for callers that join. */
  #flights = new Map()
  /**
   * userId -> until when (epoch ms, on the app's clock) `invalidate` marked
   * it: these users' calls go to the core's `begin`, which knows their
   * revoked tokens. `isFresh` knows no users, so everyone else keeps the
   * hot path.
   */
  #revoked = new Map()
  /** Size at which `invalidate` next drops expired marks. */
  #pruneAt = 64
  /** Channels, metrics, spans and warnings (lib/observability.js). */
  #observer

  constructor(options) {
    let o
    let redis
    try {
      ;[o, redis] = readOptions(options)
      observability.checkOptions(o)
    } catch (e) {
      throw callerError(e, 'options')
    }
    if (o.now !== undefined && typeof o.now !== 'function') throw argError('options.now', 'must be a function returning epoch milliseconds, like Date.now')
    this.#now = o.now ?? null
    this.#nowName = o.now === undefined ? 'Date.now()' : 'options.now()'
    try {
      this.#native = new BindingManager({
        bufferTimeMs: o.bufferTimeMs,
        doubleCheckWindowMs: o.doubleCheckWindowMs,
        refreshTimeoutMs: o.refreshTimeoutMs,
        idleTtlMs: o.idleTtlMs,
      })
    } catch (e) {
      throw fromNative(e, RangeError)
    }
    const protocol = bindProtocol(this.#native)
    this.#isFresh = protocol.isFresh
    this.#begin = protocol.begin
    this.#complete = protocol.complete
    this.#timeoutMs = this.#native.refreshTimeoutMs
    this.#observer = new observability.Observer(o, () => this.stats(), this.#native.bufferTimeMs)
    if (redis !== undefined && redis !== null) {
      try {
        this.#coordinator = new coordination.Coordinator(this.#native, redis, this.#observer)
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
      const exp = isDate ? dateGetTime.call(expiresAt) : toEpochMs(expiresAt, 'token.expiresAt')
      if (typeof refreshFn !== 'function') throw argError('refreshFn', 'must be a function')
      // The app's clock, looked up now: fake timers replace `Date.now`.
      const clock = this.#now ?? Date.now
      // Hot path: one native call on numbers. An empty token, a token or user
      // id that may be over its limit (`begin` refuses it, in UTF-8 bytes),
      // is never served; users `invalidate` marked go to `begin`.
      // The unreplaced `Date.now` is the system clock: the native side reads
      // that itself, for less than calling it costs.
      const length = accessToken.length
      if (
        length !== 0 &&
        (length <= SHORT_TOKEN || fitsUtf8(accessToken, MAX_TOKEN_BYTES)) &&
        (userId.length <= SHORT_USER_ID || fitsUtf8(userId, MAX_USER_ID_BYTES)) &&
        (this.#revoked.size === 0 || !this.#isRevoked(userId, clock)) &&
        (clock === SYSTEM_DATE_NOW ? this.#isFresh(exp) : this.#isFreshOn(clock, exp))
      ) {
        return { accessToken, shouldUpdate: false, expiresAt: isDate ? expiresAt : new Date(exp) }
      }
      // Marks other instances' invalidate made here wait for us to take
      // them (until then isFresh answers false to every call).
      if (this.#coordinator !== null) this.#takeRemoteMarks()
      const refreshToken = token.refreshToken
      if (refreshToken != null && typeof refreshToken !== 'string') throw argError('token.refreshToken', 'must be a string or null')
      return this.#slow(userId, accessToken, refreshToken ?? null, exp, expiresAt, refreshFn, this.#read(clock), false)
    } catch (e) {
      // A getter or Proxy of the caller's that threw is a bad argument too.
      throw callerError(e, 'token')
    }
  }

  /**
   * The API answered 401 with `accessToken` (or any token of the user's).
   * With `redis`, every instance hears it too (in the background).
   */
  invalidate(userId, accessToken) {
    if (typeof userId !== 'string' || userId.length === 0) throw argError('userId', 'must be a non-empty string')
    if (accessToken !== undefined && accessToken !== null && typeof accessToken !== 'string') {
      throw argError('accessToken', 'must be a string or undefined')
    }
    const now = this.#clock()
    let until
    try {
      until = this.#native.invalidate(userId, accessToken ?? null, now)
    } catch (e) {
      throw fromNative(e)
    }
    this.#mark(userId, until, now)
    this.#coordinator?.invalidate(userId, accessToken)
    this.#observer.invalidated(userId, accessToken == null ? 'user' : 'token')
  }

  /** Sends `userId`'s calls to `begin` until `until` (epoch ms). */
  #mark(userId, until, now) {
    if (!(this.#revoked.get(userId) >= until)) this.#revoked.set(userId, until)
    if (this.#revoked.size >= this.#pruneAt) {
      // Drops lapsed marks, amortised over the calls that grow the map.
      for (const [user, u] of this.#revoked) if (u <= now) this.#revoked.delete(user)
      this.#pruneAt = Math.max(64, 2 * this.#revoked.size)
    }
  }

  #takeRemoteMarks() {
    const marks = this.#native.takeRemoteMarks()
    if (marks === null) return
    const now = this.#clockOr(Date.now())
    for (const m of marks) this.#mark(m.userId, m.untilMs, now)
  }

  /** Whether `invalidate` marked `userId` and the mark still holds at `clock()`. */
  #isRevoked(userId, clock) {
    const until = this.#revoked.get(userId)
    if (until === undefined) return false
    if (until > this.#read(clock)) return true
    this.#revoked.delete(userId)
    return false
  }

  stats() {
    return { ...this.#native.stats(this.#clock()), redisFallbacks: this.#coordinator === null ? 0 : this.#coordinator.fallbacks }
  }

  /**
   * The metrics (README: Observability) in the Prometheus text exposition
   * format, for a `/metrics` route.
   */
  metrics() {
    return this.#observer.metrics()
  }

  /**
   * Lets a script exit cleanly: waits for pending Redis writes, then closes
   * the Redis connection. Later refreshes reject with
   * COORDINATOR_UNAVAILABLE; tokens still valid are served as before.
   * Without `redis` there is nothing to close.
   */
  close() {
    return this.#coordinator === null ? Promise.resolve() : this.#coordinator.close()
  }

  /**
   * `isFresh` on a clock JavaScript must call (a replaced `Date.now`, or
   * `options.now`). A method of its own: written out in the hot path's
   * condition, this branch cost the system-clock path ~10% more
   * instructions though it never ran (BENCHMARKS.md). The slow path reads
   * the clock again.
   */
  #isFreshOn(clock, exp) {
    return this.#isFresh(exp, this.#read(clock))
  }

  /** The caller's "now" on the app's clock (see `#read`). */
  #clock() {
    return this.#read(this.#now ?? Date.now)
  }

  /**
   * `clock()`, checked. A clock that throws or gives no epoch ms is a
   * TypeError or RangeError (`INVALID_ARGUMENT`), thrown before any state
   * is touched.
   */
  #read(clock) {
    let now
    try {
      now = clock()
    } catch (cause) {
      throw Object.assign(argError(this.#nowName, 'threw (see cause)'), { cause })
    }
    if (typeof now !== 'number') throw argError(this.#nowName, 'must return a number: epoch milliseconds, like Date.now()')
    if (!(now >= -MAX_DATE_MS && now <= MAX_DATE_MS)) throw argError(this.#nowName, 'returned a number no Date can hold', RangeError)
    return now
  }

  /**
   * The clock where its failure has no caller to go to (a refresh settling,
   * a timer): `fallback`, the reading the call began with, stands in.
   */
  #clockOr(fallback) {
    try {
      return this.#clock()
    } catch {
      return fallback
    }
  }

  #slow(userId, accessToken, refreshToken, exp, expiresAt, refreshFn, now, retried) {
    const plan = this.#begin(userId, accessToken, refreshToken, exp, now)
    switch (plan.kind) {
      case 'presented':
        return Promise.resolve({ accessToken, shouldUpdate: false, expiresAt: expiresAt instanceof Date ? expiresAt : new Date(exp) })
      case 'held':
        return Promise.resolve(validToken(plan.token, plan.token.shouldUpdate))
    }
    const leader = plan.kind === 'lead'
    const flightId = plan.flightId
    const flight = leader ? this.#startLead(userId, flightId, plan.refreshToken, refreshFn, accessToken, exp, now) : this.#flights.get(flightId)
    if (flight === undefined) {
      // The core has a flight this manager lost (a bug): close it and lead
      // a new one, rather than leave the user stuck until it is overdue.
      quietly(() => this.#native.fail(userId, flightId, false, now))
      if (retried) throw internalError('joined a refresh this manager does not know')
      return this.#slow(userId, accessToken, refreshToken, exp, expiresAt, refreshFn, now, true)
    }
    if (!leader) this.#observer.joined(flightId)
    return flight.then(
      // A leader handed a token another instance refreshed may still be told
      // not to persist it (issued.shouldUpdate: see lib/coordination.js).
      (issued) => validToken(issued, leader && issued.shouldUpdate),
      (err) => {
        // An outage need not fail a caller whose own token still works. A
        // verdict (reconnect, bad credentials, a buggy result) is not ridden
        // out: hiding it would only delay the fix.
        if (RIDE_OUT.has(err?.code) && this.#native.serveStale(userId, accessToken, exp, this.#clockOr(now))) {
          this.#observer.staleServed(userId, err.code)
          return { accessToken, shouldUpdate: false, expiresAt: new Date(exp) }
        }
        throw err
      },
    )
  }

  /**
   * `#lead`, for a flight the core just opened: whatever throws before the
   * refresh starts (a Proxy refreshFn whose property read throws) closes the
   * flight and fails this call, so the user's next call refreshes anew.
   */
  #startLead(userId, flightId, refreshToken, refreshFn, accessToken, exp, now) {
    let refresher
    try {
      // A native refresher runs in Rust with the manager's timeout as its
      // budget (the timeout drops its HTTP request).
      refresher = refreshFn[NATIVE_REFRESHER]
      return this.#lead(userId, flightId, refreshToken, refreshFn, refresher, accessToken, exp, now)
    } catch (cause) {
      quietly(() => this.#native.fail(userId, flightId, false, now))
      this.#flights.delete(flightId)
      return Promise.reject(new TokenRefreshError('REFRESH_FAILED', userId, 'the refresh could not be started', { cause }))
    }
  }

  /** Runs the refresh for `flightId` (begun at `now`); settles with the core's issued token. */
  #lead(userId, flightId, refreshToken, refreshFn, refresher, accessToken, exp, now) {
    const native = this.#native
    // The context carries the refresh token, which Redis coordination may
    // replace with a newer one.
    const ctx = new RefreshContext(userId, refreshToken)
    const trace = this.#observer.lead(flightId, userId, accessToken, exp, refreshFn, now)
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
      this.#observer.settled(trace, error)
      if (error !== undefined) rejectFlight(error)
      else resolveFlight(issued)
    }
    const timer = setTimeout(() => {
      const err = new TokenRefreshError('REFRESH_TIMEOUT', userId, `refresh did not settle within ${this.#timeoutMs} ms`)
      quietly(() => native.fail(userId, flightId, true, this.#clockOr(now)))
      ctx?.[ABORT](err)
      settle(err)
    }, this.#timeoutMs)
    // With Redis, the refresh runs only under the user's cross-instance lock,
    // or a token another instance refreshed answers instead (lib/coordination.js),
    // which says how it was coordinated: 'redis' or 'redis-fallback'.
    const refresh = (how = 'local') =>
      this.#observer.run(trace, how, () =>
        refresher === undefined ? invoke(refreshFn, ctx) : nativeRefresh(refresher, userId, ctx.refreshToken, this.#timeoutMs),
      )
    // Past this point nothing may throw: the timer is running.
    let obtained
    try {
      obtained =
        this.#coordinator === null
          ? refresh()
          : this.#coordinator.obtain(ctx, accessToken, exp, refresh, this.#timeoutMs, now, !CLIENT_CREDENTIALS.has(refreshFn))
    } catch (e) {
      obtained = Promise.reject(e)
    }
    obtained.then(
      (result) => {
        const late = settled
        // `expiresIn` is dated from when the result came.
        const at = this.#clockOr(now)
        let issued
        let error
        try {
          issued = this.#report(userId, flightId, result, late, at)
        } catch (e) {
          error = e
        }
        // With Redis: share the token the core kept (or free the lock), and
        // answer once Redis has it, so that whatever the callers do next (a
        // call in another instance, an invalidate) comes after it there. The
        // result is in: the timer no longer applies, and the wait is bounded
        // by the coordinator's command timeout.
        const sharing = this.#coordinator === null ? undefined : this.#coordinator.reported(ctx, issued, at)
        if (late) return
        if (sharing === undefined) return settle(error, issued)
        clearTimeout(timer)
        sharing.then(() => settle(error, issued))
      },
      (cause) => {
        if (settled) return
        const error = refreshError(userId, cause, refresher !== undefined)
        quietly(() => native.fail(userId, flightId, error.code === 'REFRESH_TIMEOUT', this.#clockOr(now)))
        settle(error)
      },
    )
    this.#flights.set(flightId, flight)
    return flight
  }

  /** Hands a refresh result to the core (at `now`); returns its issued token or throws. */
  #report(userId, flightId, result, late, now) {
    const fields = refreshedFields(result)
    if (fields === null) {
      if (!late) this.#native.fail(userId, flightId, false, now)
      throw new TokenRefreshError('INVALID_REFRESH_RESULT', userId, 'refresh result is not an object with a string accessToken and a valid expiresAt or expiresIn')
    }
    try {
      // A late result is still handed over: with rotating refresh tokens it
      // may hold the only live one.
      const fromShared = fields.shared
      if (fromShared !== undefined) {
        return this.#native.adopt(userId, flightId, fields.accessToken, fields.refreshToken, fields.expiresAtMs, fromShared.shouldUpdate, now)
      }
      return this.#complete(userId, flightId, fields.accessToken, fields.refreshToken, fields.expiresAtMs, fields.expiresIn, now)
    } catch (e) {
      throw e?.code === 'INVALID_REFRESH_RESULT' ? new TokenRefreshError(e.code, userId, e.message) : e
    }
  }
}

/**
 * Why a refresh failed, as the callers see it. Errors that already carry a
 * stable code keep it: a native refresher's (with `status` and the
 * provider's `error`, or a TypeError for a userId Tarabut refuses), a
 * TokenRefreshError thrown by a refresh function that wraps one, and the
 * coordinator's own (COORDINATOR_UNAVAILABLE, a wait on another instance
 * that timed out). Anything else becomes REFRESH_FAILED with the cause; a
 * cause whose properties throw when read (a Proxy) still does.
 */
function refreshError(userId, cause, native) {
  let own = null
  let status
  let error
  try {
    own = native || cause instanceof TokenRefreshError ? cause : coordination.coordinatorError(cause)
    if (own == null && cause !== null && typeof cause === 'object') {
      status = cause.status
      error = cause.error
    }
  } catch {}
  if (own != null) return own
  return new TokenRefreshError('REFRESH_FAILED', userId, 'refresh function failed', { cause, status, error })
}

/**
 * Options, each read once (types checked: TypeError; values are the
 * core's), into a plain object; and `redis` as `checkOptions` copied it.
 */
function readOptions(options) {
  if (options != null && typeof options !== 'object') throw argError('options', 'must be an object')
  const o = options ?? {}
  const { logger, openTelemetry, now } = o
  const picked = { logger, openTelemetry, now }
  for (const name of OPTION_NAMES) {
    const value = o[name]
    if (value !== undefined && typeof value !== 'number') throw argError(`options.${name}`, 'must be a number')
    picked[name] = value
  }
  const redis = o.redis
  return [picked, redis === undefined || redis === null ? redis : coordination.checkOptions(redis)]
}

// Object literals: their properties are defined, so a setter on
// Object.prototype for `refreshToken` never sees the token.
function validToken(t, shouldUpdate) {
  const expiresAt = new Date(t.expiresAtMs)
  return shouldUpdate && t.refreshToken != null
    ? { accessToken: t.accessToken, shouldUpdate, expiresAt, refreshToken: t.refreshToken }
    : { accessToken: t.accessToken, shouldUpdate, expiresAt }
}

/** Whether `s` is at most `max` bytes in UTF-8 (the units are counted first: never a long scan). */
function fitsUtf8(s, max) {
  return s.length <= max && Buffer.byteLength(s, 'utf8') <= max
}

module.exports = { TokenManager }
