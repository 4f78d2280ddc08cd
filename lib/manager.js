'use strict'
// TokenManager: the JavaScript half of the token manager. JavaScript does
// what it is fastest at; the core (src/engine, through BindingManager)
// holds the per-user state and decides:
// - the hot path (a token valid beyond the buffer) makes no native call:
//   argument checks, the buffer rule (lib/policy.js, the core's rule), a Map
//   of users `invalidate` marked, a hit counted here, a resolved promise;
// - a call whose token is due asks the core for a plan (`begin`): use a
//   token, join a flight or lead one. A led refresh runs as a `Flight`
//   (below) on this thread, and its result goes back to the core
//   (`complete`), which says who gets what.
// The core has no clock: "now" is read here, from `options.now` (default
// `Date.now()`, looked up on every call so an app's fake timers apply),
// and passed with every call that decides something (src/engine/time.rs,
// "Clocks").

const { BindingManager, MAX_TOKEN_BYTES, MAX_USER_ID_BYTES } = require('../binding.js')
const coordination = require('./coordination.js')
const { TokenRefreshError, argError, callerError, fromNative, internalError, quietly } = require('./errors.js')
const observability = require('./observability.js')
const { ownOptions } = require('./options.js')
const { isFresh, MAX_DATE_MS } = require('./policy.js')
const { CLIENT_CREDENTIALS, NATIVE_REFRESHER, canRevoke, nativeRefresh, nativeRevoke } = require('./refreshers.js')
const { Lifecycle, checkLifecycleOptions } = require('./lifecycle.js')
const { SECONDS_FROM, SECONDS_UNTIL, secondsError, toEpochMs } = require('./time.js')

// A UTF-16 unit is at most 3 UTF-8 bytes, so strings this short (in units)
// are within their limit without measuring.
const SHORT_TOKEN = Math.floor(MAX_TOKEN_BYTES / 3)
const SHORT_USER_ID = Math.floor(MAX_USER_ID_BYTES / 3)

/** The TypeError for `name` holding `value`, which is not a string (kept out of the hot path's body). */
function notAString(name, value) {
  return argError(name, `must be a string or null, not ${kindOf(value)}`)
}

/** What `value` is, for a message: its type, never its contents (it may be a token). */
function kindOf(value) {
  if (value === null || value === undefined) return String(value)
  if (Array.isArray(value)) return 'an array'
  const t = typeof value
  return t === 'object' ? 'an object' : `a ${t}`
}

// Date.prototype.getTime as it was when this module loaded: it reads the
// Date's own time value, so a Date whose `getTime` was replaced (or a Proxy
// of one: it throws) cannot hand back a value other than the Date's own.
const dateGetTime = Date.prototype.getTime

const ABORT = Symbol('abort')

/** What a refresh function receives. `signal` is created on first use. */
class RefreshContext {
  // Declared fields are defined on the instance, so a setter someone put on
  // Object.prototype never receives the refresh token.
  userId
  refreshToken
  /** An own property, so `{ ...ctx }` keeps it (read, it makes the signal). */
  signal
  #controller = null
  #abortedWith = undefined
  constructor(userId, refreshToken) {
    this.userId = userId
    this.refreshToken = refreshToken
    Object.defineProperty(this, 'signal', { enumerable: true, get: () => this.#signal() })
  }
  #signal() {
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

/**
 * One `getValidToken` call past the hot path: what it presented (read
 * once, checked), and its clock reading.
 */
class Call {
  // Declared fields are defined on the instance: a setter someone put on
  // Object.prototype never receives a token.
  userId
  accessToken
  /** string | null */
  refreshToken
  expiresAtMs
  /** As the caller passed it: handed back as is when it was a Date. */
  expiresAt
  refreshFn
  /** The caller's clock when the call came. */
  now
  /**
   * `(token, healing) => Promise<void>`: saves a token this call's flight
   * obtained before anyone is answered (lib/lifecycle.js), or undefined
   * (`getValidToken`: its caller persists on `shouldUpdate`).
   */
  persist = undefined
  /**
   * A refresh ahead of need (lib/lifecycle.js): tokens are judged as of
   * this many ms after `now`, in the core and in Redis; counted apart when
   * it runs. 0: a call that needs its token now.
   */
  aheadMs = 0
  /**
   * `() => Promise<string | null>`: the newest refresh token the app's
   * store holds, if newer than what this manager knows (lib/lifecycle.js),
   * read under the Redis lock when Redis had none newer: after Redis lost
   * its data, another instance's refresh may have spent the one held here.
   */
  newestRefreshToken = undefined
  constructor(userId, accessToken, refreshToken, expiresAtMs, expiresAt, refreshFn, now) {
    this.userId = userId
    this.accessToken = accessToken
    this.refreshToken = refreshToken
    this.expiresAtMs = expiresAtMs
    this.expiresAt = expiresAt
    this.refreshFn = refreshFn
    this.now = now
  }

  /** The caller's own token, `shouldUpdate: false`. */
  presented() {
    const expiresAt = this.expiresAt instanceof Date ? this.expiresAt : new Date(this.expiresAtMs)
    return { accessToken: this.accessToken, shouldUpdate: false, expiresAt }
  }
}

/** @typedef {{ accessToken: string, refreshToken: string | null, expiresAtMs: number, shouldUpdate: boolean }} Issued */
/**
 * @typedef {{ kind: 'presented' }
 *   | { kind: 'held', token: Issued }
 *   | { kind: 'join', flightId: number }
 *   | { kind: 'lead', flightId: number, refreshToken: string | null }} Plan
 */

/**
 * `begin`'s answer as a Plan (the table on `begin` in
 * src/binding/manager.rs). `refreshToken`: the one the caller passed.
 * @returns {Plan}
 */
function decodePlan(answer, refreshToken) {
  if (answer === null) return PRESENTED
  if (typeof answer === 'number') {
    return answer >= 0 ? { kind: 'lead', flightId: answer, refreshToken } : { kind: 'join', flightId: -answer - 1 }
  }
  if (answer.kind === 'lead') return { kind: 'lead', flightId: answer.flightId, refreshToken: answer.refreshToken }
  return {
    kind: 'held',
    token: { accessToken: answer.accessToken, refreshToken: answer.refreshToken, expiresAtMs: answer.expiresAtMs, shouldUpdate: answer.shouldUpdate },
  }
}
/** @type {Plan} */
const PRESENTED = Object.freeze({ kind: 'presented' })

/** Where a flight is. Each state names what the flight waits for. */
const LEADING = 'leading' // opened by the core; its refresh not started yet
const WAITING = 'waiting' // on Redis: another instance's token, or the user's lock
const REFRESHING = 'refreshing' // the refresh function or native refresher runs
const SAVING = 'saving' // the result is in the core; the store's save runs (lib/lifecycle.js)
const COMMITTING = 'committing' // the core kept the result; its Redis write is on its way
const SETTLED = 'settled' // callers answered; a late result still reaches the core

/**
 * One refresh this manager leads, from the core's `begin` to its callers'
 * answer: LEADING → (WAITING →) REFRESHING → (SAVING →) (COMMITTING →) SETTLED, or
 * straight to SETTLED on a failure or the timeout. `promise` settles once,
 * with the core's issued token or the error every caller of the flight
 * sees. A result that comes after the timeout (SETTLED) is still handed to
 * the core and shared: with rotating refresh tokens it may hold the only
 * live one.
 */
class Flight {
  state = LEADING
  /** Settles once: the core's issued token, or the error every caller sees. */
  promise
  /** The observer's record of this refresh (lib/observability.js). */
  trace = undefined
  /** A native refresher behind the refresh function, if any. */
  refresher = undefined
  #host
  #call
  #id
  #ctx
  /** The refresh token the core planned with (Redis may hand a newer one). */
  #planned
  #timer = undefined
  #resolve
  #reject

  /**
   * @param host the manager's parts a flight uses (`TokenManager#host`)
   * @param call the leading call
   * @param id the core's flight id
   * @param refreshToken the refresh token the core said to refresh with
   */
  constructor(host, call, id, refreshToken) {
    this.#host = host
    this.#call = call
    this.#id = id
    // Carries the refresh token, which Redis coordination may replace with
    // a newer one.
    this.#ctx = new RefreshContext(call.userId, refreshToken)
    this.#planned = refreshToken
    this.promise = new Promise((resolve, reject) => {
      this.#resolve = resolve
      this.#reject = reject
    })
  }

  /**
   * Starts the refresh. Whatever throws before it runs (a Proxy refresh
   * function whose property read throws) closes the flight in the core and
   * fails it, so the user's next call refreshes anew.
   */
  start() {
    const host = this.#host
    const call = this.#call
    try {
      // A native refresher runs in Rust with the manager's timeout as its
      // budget (the timeout drops its HTTP request).
      this.refresher = call.refreshFn[NATIVE_REFRESHER]
      this.trace = host.observer.lead(this.#id, call.userId, call.accessToken, call.expiresAtMs, call.refreshFn, call.now)
    } catch (cause) {
      quietly(() => host.native.fail(call.userId, this.#id, false, call.now))
      this.state = SETTLED
      this.#reject(new TokenRefreshError('REFRESH_FAILED', call.userId, 'the refresh could not be started', { cause }))
      return
    }
    host.flights.set(this.#id, this)
    this.#timer = setTimeout(() => this.#timedOut(), host.timeoutMs)
    // Past this point nothing may throw: the timer is running.
    let obtained
    try {
      if (host.coordinator === null) {
        obtained = this.#refresh('local')
      } else {
        // The refresh runs only under the user's cross-instance lock, or a
        // token another instance refreshed answers instead; `how` says
        // which: 'redis' or 'redis-fallback'.
        this.state = WAITING
        const mayUseRefreshToken = !CLIENT_CREDENTIALS.has(call.refreshFn)
        obtained = host.coordinator.obtain(this.#ctx, call.accessToken, call.expiresAtMs, (how) => this.#refresh(how), host.timeoutMs, call.now + call.aheadMs, mayUseRefreshToken)
      }
    } catch (e) {
      obtained = Promise.reject(e)
    }
    obtained.then(
      (result) => this.#obtained(result),
      (cause) => this.#failed(cause),
    )
  }

  #refresh(how) {
    if (this.state !== SETTLED) this.state = REFRESHING
    const call = this.#call
    if (call.aheadMs > 0) this.#host.backgroundRefreshes++
    const refresher = this.refresher
    const run = () =>
      this.#host.observer.run(this.trace, how, () =>
        refresher === undefined ? invoke(call.refreshFn, this.#ctx) : nativeRefresh(refresher, call.userId, this.#ctx.refreshToken, this.#host.timeoutMs),
      )
    const newest = call.newestRefreshToken
    if (how !== 'redis' || newest === undefined || this.#ctx.refreshToken !== this.#planned) return run()
    return newest().then(
      (refreshToken) => {
        if (typeof refreshToken === 'string') this.#ctx.refreshToken = refreshToken
        return run()
      },
      () => run(),
    )
  }

  /** The refresh gave `result` (or another instance's token came). Never throws. */
  #obtained(result) {
    const host = this.#host
    const late = this.state === SETTLED
    // `expiresIn` is dated from when the result came.
    const at = host.clockOr(this.#call.now)
    let issued
    let error
    try {
      issued = this.#report(result, late, at)
    } catch (e) {
      error = e
    }
    // A token the app's store must hold (getToken, fetch): saved before
    // anyone is answered and before Redis's lock is released, late results
    // too (with rotating refresh tokens a late one may be the only live one).
    const persist = issued !== undefined && issued.shouldUpdate ? this.#call.persist : undefined
    if (persist === undefined) return this.#share(issued, error, late, at)
    if (!late) this.state = SAVING
    clearTimeout(this.#timer)
    const token = { accessToken: issued.accessToken, refreshToken: issued.refreshToken ?? this.#ctx.refreshToken ?? null, expiresAtMs: issued.expiresAtMs }
    const healing = result !== null && typeof result === 'object' && coordination.sharedToken(result) !== undefined
    // With Redis, the token is sealed there first (the lock kept): a crash
    // mid-save leaves it for the next holder.
    const stashed = host.coordinator === null ? undefined : host.coordinator.stash(this.#ctx, issued, at)
    ;(stashed ?? Promise.resolve())
      .then(() => persist(token, healing))
      .catch(() => {})
      .then(() => this.#share(issued, error, late, at))
  }

  /**
   * With Redis: share the token the core kept (or free the lock), and
   * answer once Redis has it, so that whatever the callers do next (a call
   * in another instance, an invalidate) comes after it there. The result
   * is in: the timer no longer applies, and the wait is bounded by the
   * coordinator's command timeout. Never throws.
   */
  #share(issued, error, late, at) {
    const host = this.#host
    const sharing = host.coordinator === null ? undefined : host.coordinator.reported(this.#ctx, issued, at)
    if (late) return
    if (sharing === undefined) return this.#settle(error, issued)
    this.state = COMMITTING
    clearTimeout(this.#timer)
    sharing.then(() => this.#settle(error, issued))
  }

  /** Hands a refresh result to the core (at `now`); returns its issued token or throws. */
  #report(result, late, now) {
    const { native } = this.#host
    const { userId } = this.#call
    const fields = refreshedFields(result)
    if (typeof fields === 'string') {
      if (!late) native.fail(userId, this.#id, false, now)
      throw new TokenRefreshError('INVALID_REFRESH_RESULT', `refresh result ${fields}`, { userId })
    }
    try {
      const shared = fields.shared
      if (shared !== undefined) {
        return native.adopt(userId, this.#id, fields.accessToken, fields.refreshToken, fields.expiresAtMs, shared.shouldUpdate, now)
      }
      const expiry = this.#host.complete(userId, this.#id, fields.accessToken, fields.refreshToken, fields.expiresAtMs, fields.expiresIn, now)
      // The sign says whether the leader is handed the refresh token it passed.
      return { accessToken: fields.accessToken, refreshToken: expiry > 0 ? fields.refreshToken : null, expiresAtMs: Math.abs(expiry), shouldUpdate: true }
    } catch (e) {
      throw e?.code === 'INVALID_REFRESH_RESULT' ? new TokenRefreshError(e.code, userId, e.message) : e
    }
  }

  /** The refresh rejected (or the coordinator did). Never throws. */
  #failed(cause) {
    if (this.state === SETTLED) return
    const host = this.#host
    const { userId, now } = this.#call
    const error = refreshError(userId, cause, this.refresher !== undefined)
    quietly(() => host.native.fail(userId, this.#id, error.code === 'REFRESH_TIMEOUT', host.clockOr(now)))
    this.#settle(error)
  }

  #timedOut() {
    const host = this.#host
    const { userId, now } = this.#call
    const error = new TokenRefreshError('REFRESH_TIMEOUT', userId, `refresh did not settle within ${host.timeoutMs} ms`)
    quietly(() => host.native.fail(userId, this.#id, true, host.clockOr(now)))
    this.#ctx[ABORT](error)
    this.#settle(error)
  }

  /** Ends the flight once. Nothing here may throw: it runs in a timer or a promise callback. */
  #settle(error, issued) {
    this.state = SETTLED
    clearTimeout(this.#timer)
    this.#host.flights.delete(this.#id)
    this.#host.observer.settled(this.trace, error)
    if (error !== undefined) this.#reject(error)
    else this.#resolve(issued)
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
 * getter or Proxy that throws makes the result unusable. Returns the fields,
 * or what is wrong (a message's end, naming fields, never their values).
 */
function refreshedFields(result) {
  try {
    return readRefreshed(result)
  } catch {
    return 'could not be read: a getter or Proxy threw'
  }
}

// What most token endpoints send (RFC 6749), for the hint when a refresh
// function returns the provider's body as is.
const SNAKE_CASE_HINT =
  'has access_token/expires_in (the provider\'s snake_case body?): return { accessToken: body.access_token, refreshToken: body.refresh_token, expiresIn: body.expires_in }'

function readRefreshed(result) {
  if (result === null || typeof result !== 'object') return `must be an object { accessToken, expiresIn or expiresAt, refreshToken? }, not ${kindOf(result)}`
  const { accessToken, refreshToken, expiresAt, expiresIn } = result
  if (typeof accessToken !== 'string') {
    if (accessToken === undefined && ('access_token' in result || 'expires_in' in result)) return SNAKE_CASE_HINT
    return accessToken === undefined ? 'has no accessToken' : `has an accessToken that is ${kindOf(accessToken)}, not a string`
  }
  if (refreshToken != null && typeof refreshToken !== 'string') return `has a refreshToken that is ${kindOf(refreshToken)}, not a string or null`
  if (expiresIn != null && typeof expiresIn !== 'number') return `has an expiresIn that is ${kindOf(expiresIn)}, not a number of seconds`
  let expiresAtMs = null
  if (expiresAt != null) {
    try {
      expiresAtMs = toEpochMs(expiresAt, 'expiresAt')
    } catch (e) {
      return `has an expiresAt it cannot use: ${e.message}`
    }
  } else if (expiresIn == null && 'expires_in' in result) {
    return SNAKE_CASE_HINT
  }
  const shared = coordination.sharedToken(result)
  return { accessToken, refreshToken: refreshToken ?? null, expiresAtMs, expiresIn: expiresIn ?? null, shared }
}

/** The numeric options, which the core checks. */
const OPTION_NAMES = ['bufferTimeMs', 'doubleCheckWindowMs', 'refreshTimeoutMs', 'idleTtlMs', 'maxTokenLifetimeMs']
/** Every option the constructor takes: any other key is a TypeError naming it. */
const KNOWN_OPTIONS = [...OPTION_NAMES, 'now', 'logger', 'openTelemetry', 'redis', 'store', 'refresher', 'refreshAhead', 'fetch']

class TokenManager {
  #native
  /** The engine's `begin`, bound to it (BindingManager#bindProtocol). */
  #begin
  /** The effective buffer, for the hot path's rule. */
  #bufferMs
  /** The effective `maxTokenLifetimeMs`, for the hot path's rule. */
  #maxLifetimeMs
  /** `options.now`, or null: `Date.now` as it is at each call. */
  #now
  /** The clock's name in errors. */
  #nowName
  /**
   * What a Flight uses: { native, complete, coordinator, observer, flights,
   * timeoutMs, clockOr }. `flights`: flightId -> Flight, for callers that join.
   */
  #host
  /**
   * userId -> until when (epoch ms, on the app's clock) `invalidate` marked
   * it: these users' calls go to the core's `begin`, which knows their
   * revoked tokens. Everyone else keeps the hot path.
   */
  #revoked = new Map()
  /** Size at which `#mark` next drops expired marks. */
  #pruneAt = 64
  /** Calls the hot path answered (the core counts the rest). */
  #hits = 0
  /** Channels, metrics, spans and warnings (lib/observability.js). */
  #observer
  /** `getToken`, `fetch`, `forget`, `revoke` (lib/lifecycle.js). */
  #lifecycle

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
    let native
    try {
      native = new BindingManager({
        bufferTimeMs: o.bufferTimeMs,
        doubleCheckWindowMs: o.doubleCheckWindowMs,
        refreshTimeoutMs: o.refreshTimeoutMs,
        idleTtlMs: o.idleTtlMs,
        maxTokenLifetimeMs: o.maxTokenLifetimeMs,
      })
    } catch (e) {
      throw fromNative(e, RangeError)
    }
    this.#native = native
    const protocol = native.bindProtocol()
    this.#begin = protocol.begin
    this.#bufferMs = native.bufferTimeMs
    this.#maxLifetimeMs = native.maxTokenLifetimeMs
    this.#observer = new observability.Observer(o, () => this.stats(), this.#bufferMs)
    let coordinator = null
    if (redis !== undefined && redis !== null) {
      // Other instances' invalidations reach this manager as they arrive;
      // held weakly, so a manager nobody uses can still be collected.
      const self = new WeakRef(this)
      try {
        coordinator = new coordination.Coordinator(native, redis, this.#observer, () => {
          const manager = self.deref()
          if (manager !== undefined) manager.#takeRemoteMarks()
        })
      } catch (e) {
        throw fromNative(e, RangeError)
      }
    }
    this.#host = {
      native,
      complete: protocol.complete,
      coordinator,
      observer: this.#observer,
      flights: new Map(),
      timeoutMs: native.refreshTimeoutMs,
      clockOr: (fallback) => this.#clockOr(fallback),
      /** Refreshes ahead of need that ran here (lib/lifecycle.js). */
      backgroundRefreshes: 0,
    }
    let lifecycleOptions
    try {
      lifecycleOptions = checkLifecycleOptions(o, native.idleTtlMs)
    } catch (e) {
      throw callerError(e, 'options')
    }
    this.#lifecycle = new Lifecycle(lifecycleOptions, {
      plan: (userId, accessToken, refreshToken, expiresAtMs, now, aheadMs, persist, newestRefreshToken) => {
        const call = new Call(userId, accessToken, refreshToken, expiresAtMs, expiresAtMs, lifecycleOptions.refresher, now)
        call.persist = persist
        call.newestRefreshToken = newestRefreshToken
        call.aheadMs = aheadMs
        return this.#issue(call, aheadMs)
      },
      now: () => this.#clock(),
      isRevoked: (userId, now) => this.#revoked.size !== 0 && this.#isRevoked(userId, now),
      invalidate: (userId, accessToken) => this.invalidate(userId, accessToken),
      forget: (userId) => {
        const now = this.#clock()
        this.#mark(userId, native.forget(userId, now), now)
        this.#observer.invalidated(userId, 'user')
      },
      coordinatorForget: (userId) => coordinator?.invalidate(userId, null),
      bufferMs: this.#bufferMs,
      maxLifetimeMs: this.#maxLifetimeMs,
      timeoutMs: native.refreshTimeoutMs,
      idleTtlMs: native.idleTtlMs,
      observer: this.#observer,
    })
  }

  /**
   * A token valid beyond the buffer for `userId`, from the store when this
   * manager holds none, refreshed and saved as needed (needs `store` and
   * `refresher`). A user without a row rejects with NOT_CONNECTED.
   */
  getToken(userId) {
    return this.#lifecycle.getToken(userId)
  }

  /**
   * `fetch` with the user's token as `Authorization: Bearer`; on a 401 the
   * token is invalidated (in every instance) and the request sent once
   * more with a fresh one, unless its body is a one-shot stream.
   */
  fetch(userId, input, init) {
    return this.#lifecycle.fetch(userId, input, init)
  }

  /** Forgets the user here, in Redis and in every instance, and deletes their row (`store.delete`). */
  forget(userId) {
    return this.#lifecycle.forget(userId)
  }

  /** Revokes the user's refresh token at the provider (RFC 7009), then `forget`s them. */
  revoke(userId) {
    return this.#lifecycle.revoke(userId, revokeRefreshToken)
  }

  /**
   * Resolves with a token valid beyond the buffer, refreshing at most once
   * per user however many calls arrive together. Never throws: bad
   * arguments and failures reject.
   */
  getValidToken(userId, token, refreshFn) {
    // Not an `async` function: its promise and frame would cost the hot
    // path more than the rest of it. Nothing throws out of here: every
    // failure is a rejected promise.
    try {
      if (typeof userId !== 'string' || userId.length === 0) throw argError('userId', 'must be a non-empty string')
      if (token === null || typeof token !== 'object') throw argError('token', 'must be an object { accessToken, expiresAt }')
      const accessToken = token.accessToken
      if (typeof accessToken !== 'string') throw argError('token.accessToken', 'must be a string')
      const expiresAt = token.expiresAt
      // A Date (what the seed's callers pass) is read here, once, by its
      // own time value; any other form in toEpochMs.
      const isDate = expiresAt instanceof Date
      const exp = isDate ? dateGetTime.call(expiresAt) : toEpochMs(expiresAt, 'token.expiresAt')
      // Checked on every call, due or not: a wrong column type shows at
      // once, not at the token's first expiry.
      const refreshToken = token.refreshToken
      if (refreshToken != null && typeof refreshToken !== 'string') throw notAString('token.refreshToken', refreshToken)
      if (typeof refreshFn !== 'function') throw argError('refreshFn', 'must be a function')
      // The app's clock, looked up now: fake timers replace `Date.now`.
      const now = this.#read(this.#now ?? Date.now)
      // Hot path. An empty token, a token or user id that may be over its
      // limit (`begin` refuses it, in UTF-8 bytes), is never served; users
      // `invalidate` marked go to `begin`.
      const length = accessToken.length
      if (
        length !== 0 &&
        (length <= SHORT_TOKEN || fitsUtf8(accessToken, MAX_TOKEN_BYTES)) &&
        (userId.length <= SHORT_USER_ID || fitsUtf8(userId, MAX_USER_ID_BYTES)) &&
        (this.#revoked.size === 0 || !this.#isRevoked(userId, now)) &&
        isFresh(exp, now, this.#bufferMs, this.#maxLifetimeMs)
      ) {
        this.#hits++
        return Promise.resolve({ accessToken, shouldUpdate: false, expiresAt: isDate ? expiresAt : new Date(exp) })
      }
      return this.#slow(new Call(userId, accessToken, refreshToken ?? null, exp, expiresAt, refreshFn, now), false)
    } catch (e) {
      // A getter or Proxy of the caller's that threw is a bad argument too.
      return Promise.reject(callerError(e, 'token'))
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
    this.#host.coordinator?.invalidate(userId, accessToken)
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

  /** Marks other instances' `invalidate` made here (the binding calls this as they arrive). */
  #takeRemoteMarks() {
    try {
      const marks = this.#native.takeRemoteMarks()
      if (marks === null) return
      const now = this.#clockOr(Date.now())
      for (const m of marks) {
        this.#mark(m.userId, m.untilMs, now)
        this.#lifecycle.markStale(m.userId)
      }
    } catch {}
  }

  /** Whether `invalidate` marked `userId` and the mark still holds at `now`. */
  #isRevoked(userId, now) {
    const until = this.#revoked.get(userId)
    if (until === undefined) return false
    if (until > now) return true
    this.#revoked.delete(userId)
    return false
  }

  stats() {
    const coordinator = this.#host.coordinator
    const s = this.#native.stats(this.#clock())
    const l = this.#lifecycle.counts()
    return {
      ...s,
      hits: s.hits + this.#hits + l.hits,
      redisFallbacks: coordinator === null ? 0 : coordinator.fallbacks,
      backgroundRefreshes: this.#host.backgroundRefreshes,
      saveFailures: l.saveFailures,
      unsavedTokens: l.unsavedTokens,
      redisNoticesDropped: coordinator === null ? 0 : coordinator.noticesDropped,
    }
  }

  /**
   * The metrics (docs/observability.md) in the Prometheus text exposition
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
    const coordinator = this.#host.coordinator
    const flushed = this.#lifecycle.flush()
    return coordinator === null ? flushed : flushed.then(() => coordinator.close())
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
    if (now >= SECONDS_UNTIL && now <= MAX_DATE_MS) return now
    if (now >= SECONDS_FROM && now < SECONDS_UNTIL) throw secondsError(this.#nowName, now, 'returned')
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

  /** A call whose token is not fresh (or whose user is marked): the core's plan. */
  #slow(call, retried) {
    const plan = this.#plan(call, retried, undefined)
    switch (plan.kind) {
      case 'presented':
        return Promise.resolve(call.presented())
      case 'held':
        return Promise.resolve(validToken(plan.token, plan.token.shouldUpdate))
    }
    const leader = plan.kind === 'lead'
    return plan.flight.promise.then(
      // A leader handed a token another instance refreshed may still be told
      // not to persist it (issued.shouldUpdate: see lib/coordination.js).
      (issued) => validToken(issued, leader && issued.shouldUpdate),
      (err) => {
        if (this.#rideOut(call, err)) return { accessToken: call.accessToken, shouldUpdate: false, expiresAt: new Date(call.expiresAtMs) }
        throw err
      },
    )
  }

  /**
   * `#slow` for the lifecycle (lib/lifecycle.js): a promise of the token to
   * use (Issued, with `shouldUpdate` only for the leader) or of null when
   * the presented token stands. `aheadMs`: a refresh ahead of need.
   */
  #issue(call, aheadMs) {
    try {
      const plan = this.#plan(call, false, aheadMs === 0 ? undefined : aheadMs)
      switch (plan.kind) {
        case 'presented':
          return Promise.resolve(null)
        case 'held':
          return Promise.resolve(plan.token)
      }
      const leader = plan.kind === 'lead'
      return plan.flight.promise.then(
        (issued) => (leader ? issued : { ...issued, shouldUpdate: false }),
        (err) => {
          if (this.#rideOut(call, err)) return null
          throw err
        },
      )
    } catch (e) {
      return Promise.reject(e)
    }
  }

  /**
   * An outage need not fail a caller whose own token still works: the core
   * says whether this failure is one to ride out (Engine::serve_stale).
   */
  #rideOut(call, err) {
    const code = typeof err?.code === 'string' ? err.code : ''
    if (!this.#native.serveStale(call.userId, call.accessToken, call.expiresAtMs, code, this.#clockOr(call.now))) return false
    this.#observer.staleServed(call.userId, err.code)
    return true
  }

  /**
   * The core's plan for `call`, a led flight started: `{ kind: 'presented' }`,
   * `{ kind: 'held', token }`, or `{ kind: 'lead' | 'join', flight }`.
   */
  #plan(call, retried, aheadMs) {
    const native = this.#native
    const plan = decodePlan(this.#begin(call.userId, call.accessToken, call.refreshToken, call.expiresAtMs, call.now, aheadMs), call.refreshToken)
    if (plan.kind === 'presented' || plan.kind === 'held') return plan
    let flight
    if (plan.kind === 'lead') {
      flight = new Flight(this.#host, call, plan.flightId, plan.refreshToken)
      flight.start()
    } else {
      flight = this.#host.flights.get(plan.flightId)
      if (flight === undefined) {
        // The core has a flight this manager lost (a bug): close it and lead
        // a new one, rather than leave the user stuck until it is overdue.
        quietly(() => native.fail(call.userId, plan.flightId, false, call.now))
        if (retried) throw internalError('joined a refresh this manager does not know')
        return this.#plan(call, true, aheadMs)
      }
      this.#observer.joined(plan.flightId)
    }
    return { kind: plan.kind, flight }
  }
}

/** `revoke`'s call to the refresher's revocation endpoint (lib/refreshers.js). */
function revokeRefreshToken(refresher, userId, refreshToken, timeoutMs) {
  if (!canRevoke(refresher)) {
    return Promise.reject(argError('TokenManager.revoke()', 'needs a refresher with a revocation endpoint (oauth2Refresher with revocationUrl)'))
  }
  return nativeRevoke(refresher, userId, refreshToken, timeoutMs)
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
 * Options: own properties only, each read once (lib/options.js; an unknown
 * key is a TypeError naming it), types checked (TypeError; values are the
 * core's), into a null-prototype object; and `redis` as `checkOptions`
 * copied it. Keys this file does not use yet pass through untouched.
 */
function readOptions(options) {
  if (options != null && typeof options !== 'object') throw argError('options', 'must be an object')
  const picked = options == null ? Object.create(null) : ownOptions(options, KNOWN_OPTIONS, 'options', 'TokenManager')
  for (const name of OPTION_NAMES) {
    const value = picked[name]
    if (value !== undefined && typeof value !== 'number') throw argError(`options.${name}`, 'must be a number')
  }
  const redis = picked.redis
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
