'use strict'
// Cross-instance coordination for TokenManager's `redis` option: the JS
// half of src/coordination (through BindingCoordinator,
// src/binding/coordination.rs). lib/manager.js calls `obtain` where it would
// call the refresh function; the native coordinator answers with a token
// another instance produced, or with the user's lock, in which case the
// refresh runs here on the JS thread; once the manager has handed the result
// to the core, the token the core kept is written back (fenced), announced
// and unlocked (`reported`), and only then does the manager answer its
// callers: a call that comes after the answer, in any instance, finds the
// token stored (or the lock free), and an `invalidate` sent after it cannot
// reach Redis before the write it would undo. Only the slow path (a refresh
// is due) comes here: the hot path never touches Redis.
//
// shouldUpdate across instances (the rule the manager applies to a shared token):
// - the caller whose call ran the refresh gets true;
// - a call that found the lock held and took the token that holder then
//   published (or wrote) gets false: that holder's caller persists it;
// - a call that found a newer token already cached when it asked gets true:
//   its copy is stale (a lost write heals), as with the in-process engine's
//   held tokens.
//
// When Redis cannot coordinate (down, or a new server that may have lost
// the locks: src/coordination/health.rs), the core applies `onError`
// (`OnError` in src/coordination/coordinator.rs) and `acquire` answers
// 'fallback' (refresh in this process only) or 'refused'
// (COORDINATOR_UNAVAILABLE); this file carries that out. A refused caller
// whose own token has not expired gets it back (the core decides that too:
// Engine::serve_stale).

const { BindingCoordinator } = require('../binding.js')
const { TokenRefreshError, argError, fromNative } = require('./errors.js')
const { ownOptions } = require('./options.js')

const SHARED = Symbol('sharedToken')
const FROM_COORDINATOR = Symbol('fromCoordinator')
/** The native wait outlasts the manager's timer, so the timer decides timeouts. */
const WAIT_SLACK_MS = 25

/** What `options.redis` takes: any other key is a TypeError naming it. */
const REDIS_OPTIONS = ['url', 'cluster', 'tls', 'keyPrefix', 'lockTtlMs', 'encryptionKey', 'userIdKey', 'onError', 'upgrading']

/** TTM_REDIS_UNKEYED_USER_IDS is said once per process, whatever the managers. */
let warnedUnkeyed = false

/**
 * `options.redis`: types and presence are checked here (TypeError); values
 * (URLs, keys, CA, prefix length, lock TTL) by the native side (RangeError).
 * Returns the options as read: own properties only, each once (a getter may
 * answer differently each time), into null-prototype objects and arrays
 * (lib/options.js).
 */
function checkOptions(options) {
  if (options === null || typeof options !== 'object') throw argError('options.redis', 'must be an object { url, encryptionKey, ... }')
  const o = ownOptions(options, REDIS_OPTIONS, 'options.redis', 'redis')
  const copy = (v) => (Array.isArray(v) ? [...v] : v)
  o.cluster = copy(o.cluster)
  o.encryptionKey = copy(o.encryptionKey)
  if (o.url !== undefined && o.cluster !== undefined) throw argError('options.redis', 'takes url (one node) or cluster (node URLs), not both')
  if (o.cluster !== undefined) {
    if (!Array.isArray(o.cluster) || o.cluster.length === 0 || !o.cluster.every((u) => typeof u === 'string' && u.length > 0)) {
      throw argError('options.redis.cluster', "must be a non-empty array of node URLs (e.g. ['redis://10.0.0.1:6379'])")
    }
  } else if (typeof o.url !== 'string' || o.url.length === 0) {
    throw argError('options.redis.url', 'must be a non-empty string (e.g. redis://127.0.0.1:6379), or give options.redis.cluster')
  }
  if (o.encryptionKey === undefined || o.encryptionKey === null) {
    throw argError('options.redis.encryptionKey', 'is required with redis: 32 random bytes, base64 (e.g. `openssl rand -base64 32`)')
  }
  const keys = Array.isArray(o.encryptionKey) ? o.encryptionKey : [o.encryptionKey]
  if (keys.length === 0 || !keys.every((k) => typeof k === 'string')) {
    throw argError('options.redis.encryptionKey', 'must be a base64 string, or a non-empty array of them (the first seals)')
  }
  if (o.userIdKey !== undefined && typeof o.userIdKey !== 'string') {
    throw argError('options.redis.userIdKey', 'must be a base64 string: 32 random bytes (e.g. `openssl rand -base64 32`), not one of encryptionKey')
  }
  if (o.tls !== undefined && o.tls !== null) {
    if (typeof o.tls !== 'object') throw argError('options.redis.tls', 'must be an object { ca }')
    // Anything else (a client certificate, turning verification off) is not done: say so.
    const unknown = Object.keys(o.tls).filter((k) => k !== 'ca')
    if (unknown.length > 0) throw argError('options.redis.tls', `takes only { ca } (got ${unknown.join(', ')})`)
    const { ca } = ownOptions(o.tls, ['ca'], 'options.redis.tls', 'redis.tls')
    if (ca !== undefined && typeof ca !== 'string' && !(ca instanceof Uint8Array)) {
      throw argError('options.redis.tls.ca', 'must be PEM certificates, as a string or a Buffer')
    }
    o.tls = { __proto__: null, ca }
  }
  if (o.keyPrefix !== undefined && typeof o.keyPrefix !== 'string') throw argError('options.redis.keyPrefix', 'must be a string')
  if (o.lockTtlMs !== undefined && typeof o.lockTtlMs !== 'number') throw argError('options.redis.lockTtlMs', 'must be a number')
  // Which strings are valid is the core's (OnError in src/coordination).
  if (o.onError !== undefined && typeof o.onError !== 'string') throw argError('options.redis.onError', "must be 'auto', 'local' or 'fail'")
  if (o.upgrading !== undefined && typeof o.upgrading !== 'boolean') throw argError('options.redis.upgrading', 'must be a boolean')
  return o
}

/** Whether `url` is `redis://` (no TLS) to a host that is not loopback. The URL itself is never shown (it may hold a password). */
function plaintextToAnotherHost(url) {
  let u
  try {
    u = new URL(url)
  } catch {
    return false // the native side refuses it
  }
  if (u.protocol !== 'redis:') return false
  const host = u.hostname.replace(/^\[|\]$/g, '')
  return !(host === 'localhost' || host === '::1' || /^127\.\d+\.\d+\.\d+$/.test(host))
}

/** `tls.ca` as the Buffer the native side takes, or undefined. */
function caBuffer(tls) {
  const ca = tls?.ca
  if (ca === undefined) return undefined
  return typeof ca === 'string' ? Buffer.from(ca, 'utf8') : Buffer.from(ca.buffer, ca.byteOffset, ca.byteLength)
}

class Coordinator {
  #native
  /** `onError`, for the warning's words only: the core decides (OnError in src/coordination). */
  #onError
  /** Warnings and fallback events (lib/observability.js). */
  #observer
  #closed = false
  #fallbacks = 0
  #warnedDown = false
  #warnedUndecryptable = false
  #warnedDropped = false
  /** Commits and releases still running: `close()` waits for them. */
  #pending = new Set()
  /** userId -> its commit still running: an invalidate waits for it. */
  #committing = new Map()
  /** RefreshContext -> the lease its refresh ran under, until `reported`. */
  #leases = new WeakMap()
  /** Ticket -> the resolve of a native call whose answer is due (`#ask`). */
  #due = new Map()
  #ticket = 0

  /**
   * @param bindingManager the manager's BindingManager (its engine checks revocations)
   * @param options `options.redis` as `checkOptions` returned it
   * @param observer the manager's Observer (lib/observability.js)
   * @param onRemoteMarks called (on this thread) when other instances'
   *   invalidations wait to be taken (`bindingManager.takeRemoteMarks()`)
   */
  constructor(bindingManager, options, observer, onRemoteMarks) {
    // The native side holds its callbacks for as long as it lives: held
    // weakly here, so a manager nobody uses can still be collected.
    const self = new WeakRef(this)
    // Every field is defined here: the native side finds none on Object.prototype.
    this.#native = new BindingCoordinator(bindingManager, {
      url: options.url,
      cluster: options.cluster,
      tlsCa: caBuffer(options.tls),
      keyPrefix: options.keyPrefix,
      lockTtlMs: options.lockTtlMs,
      encryptionKeys: Array.isArray(options.encryptionKey) ? options.encryptionKey : [options.encryptionKey],
      userIdKey: options.userIdKey,
      onError: options.onError,
      upgrading: options.upgrading,
    }, (ticket, answer) => {
      const coordinator = self.deref()
      if (coordinator !== undefined) coordinator.#answered(ticket, answer)
    }, onRemoteMarks)
    this.#onError = options.onError ?? 'auto'
    this.#observer = observer
    if ((options.cluster ?? [options.url]).some(plaintextToAnotherHost)) {
      observer.warn(
        'TTM_REDIS_PLAINTEXT',
        'tarabut-token-manager: options.redis connects with redis:// (no TLS) to a host other than this one: the Redis password and the sealed tokens cross the network in clear; use rediss://',
      )
    }
    if (options.userIdKey === undefined && !warnedUnkeyed) {
      warnedUnkeyed = true
      observer.warn(
        'TTM_REDIS_UNKEYED_USER_IDS',
        'tarabut-token-manager: Redis key names and channel messages name each user by an unkeyed SHA-256 of the user id, which anyone reading Redis can check a guessed id (an email, a phone number) against; set options.redis.userIdKey (openssl rand -base64 32, the same on every instance; see docs/redis.md for the upgrade of a running fleet)',
      )
    }
  }

  /** Refreshes coordinated in-process only because Redis was unavailable. */
  get fallbacks() {
    return this.#fallbacks
  }

  /**
   * Channel notices dropped (src/coordination/pubsub.rs): the count, read
   * when stats or metrics are; the first time it is not zero, one warning.
   */
  get noticesDropped() {
    let n = 0
    try {
      n = this.#native.noticesDropped
    } catch {}
    if (n > 0 && !this.#warnedDropped) {
      this.#warnedDropped = true
      this.#observer.warn(
        'TTM_REDIS_NOTICE_DROPPED',
        'tarabut-token-manager: a message on the Redis channel was dropped: not signed with any of options.redis.encryptionKey (an instance on another key, or someone publishing there), older than a minute or replayed, or oversized; counted in stats().redisNoticesDropped',
      )
    }
    return n
  }

  /**
   * Resolves like the refresh function would (a refresh result), either by
   * running `refresh` while holding the user's lock, or with a token another
   * instance produced (marked; see `sharedToken`). Rejects with a coordinator
   * error (`coordinatorError`) or with the refresh function's own rejection.
   * `nowMs`: the caller's clock, which decides whether a shared token will do.
   * `mayUseRefreshToken`: false for refresh functions that never send one
   * (client credentials).
   */
  obtain(ctx, accessToken, expiresAtMs, refresh, waitMs, nowMs, mayUseRefreshToken) {
    const userId = ctx.userId
    if (this.#closed) return Promise.reject(this.#error('COORDINATOR_UNAVAILABLE', userId, 'the token manager is closed'))
    // The core weighs these with `onError` (OnError in src/coordination):
    // whether the restart guard applies, and what happens if Redis is down.
    const presents = ctx.refreshToken != null
    const acquiring = this.#ask((t) => this.#native.acquire(t, userId, accessToken, expiresAtMs, waitMs + WAIT_SLACK_MS, nowMs, mayUseRefreshToken, presents))
    return acquiring.then((a) => {
      if (a.undecryptable) this.#warnUndecryptable()
      if (!this.#warnedDropped) void this.noticesDropped
      if (a.kind !== 'fallback' && a.kind !== 'refused') this.#warnedDown = false
      switch (a.kind) {
        case 'shared': {
          const token = { accessToken: a.accessToken, refreshToken: a.refreshToken ?? null, expiresAt: a.expiresAtMs }
          token[SHARED] = { shouldUpdate: !a.waited }
          return token
        }
        case 'lead':
          return this.#refreshHolding(ctx, a, refresh)
        case 'failed':
          // Like an in-process joiner: the refresh it waited on failed.
          throw new Error('the refresh this call waited on failed in another instance')
        case 'timeout':
          throw this.#error('REFRESH_TIMEOUT', userId, 'another instance was still refreshing at the refresh timeout')
        case 'fallback':
          return this.#fallback(userId, a.reason, refresh)
        default:
          // 'refused': `onError` forbids running this refresh uncoordinated.
          if (this.#closed) throw this.#error('COORDINATOR_UNAVAILABLE', userId, 'the token manager is closed')
          this.#warnDown(a.reason)
          throw this.#error('COORDINATOR_UNAVAILABLE', userId, a.message)
      }
    })
  }

  /**
   * The manager's `invalidate`, for the other instances: marks the stored
   * token bad (so none adopts it later) and announces it (so each marks it
   * as this one did). In the background, after this instance's commit
   * for the user if one is running: a caller served from the engine while
   * that write was on its way must not have its invalidate overtake it.
   * Never throws; the promise (never rejecting) fulfils once Redis has it
   * or the attempt ended (`forget` waits for it).
   */
  invalidate(userId, accessToken) {
    if (this.#closed) return Promise.resolve()
    try {
      const send = () => this.#ask((t) => this.#native.invalidate(t, userId, accessToken ?? null))
      const committing = this.#committing.get(userId)
      return this.#track(committing === undefined ? send() : committing.then(send), userId, false)
    } catch {
      return Promise.resolve()
    }
  }

  /** Waits for pending writes, then drops the connection. Idempotent. */
  close() {
    if (this.#closed) return Promise.resolve()
    this.#closed = true
    return Promise.allSettled(this.#pending).then(() => this.#native.close())
  }

  #refreshHolding(ctx, a, refresh) {
    const userId = ctx.userId
    const lease = a.lease
    if (ctx.signal.aborted) {
      // The manager gave up (timeout) before the lock came: let others go now.
      this.#track(this.#ask((t) => this.#native.release(t, userId, lease, false)), userId)
      throw ctx.signal.reason
    }
    // The cache had a newer refresh token than the caller's (rotated by a
    // refresh elsewhere whose caller's write was lost): refresh with it.
    if (a.refreshToken != null) ctx.refreshToken = a.refreshToken
    return refresh('redis').then(
      (result) => {
        // The manager validates the result; `reported` writes what the core kept.
        this.#leases.set(ctx, lease)
        return result
      },
      (err) => {
        this.#track(this.#ask((t) => this.#native.release(t, userId, lease, true)), userId)
        throw err
      },
    )
  }

  /**
   * The manager handed the refresh result of `ctx` to the core: `issued` is the
   * token it kept (undefined: the result was unusable), at `nowMs` on the
   * caller's clock. Stores exactly that token for the other instances
   * (fenced), announces it, unlocks. Returns a promise that fulfils once
   * Redis answered or the attempt ended (at most one command timeout, about a
   * second; a transient failure is retried in the background after that), or
   * undefined for a flight that held no lease. Never throws or rejects.
   */
  reported(ctx, issued, nowMs) {
    try {
      const lease = this.#leases.get(ctx)
      if (lease === undefined) return undefined
      this.#leases.delete(ctx)
      if (issued === undefined) return this.#track(this.#ask((t) => this.#native.release(t, ctx.userId, lease, true)), ctx.userId)
      // Not rotated: the refresh token it ran with stays the one to use.
      const refreshToken = issued.refreshToken ?? ctx.refreshToken ?? null
      const userId = ctx.userId
      const committed = this.#track(
        this.#ask((t) => this.#native.commit(t, userId, lease, issued.accessToken, refreshToken, issued.expiresAtMs, null, nowMs)),
        userId,
      )
      this.#committing.set(userId, committed)
      committed.then(() => {
        if (this.#committing.get(userId) === committed) this.#committing.delete(userId)
      })
      return committed
    } catch {
      return undefined
    }
  }

  /**
   * Before `reported`, for a token the app's store must save: writes it to
   * Redis (sealed, fenced) keeping the lock, so that if this process dies
   * while saving, the next lock holder finds it rather than spending a
   * refresh token already spent. A promise that never rejects, or undefined
   * for a flight that holds no lease.
   */
  stash(ctx, issued, nowMs) {
    try {
      const lease = this.#leases.get(ctx)
      if (lease === undefined) return undefined
      const refreshToken = issued.refreshToken ?? ctx.refreshToken ?? null
      const userId = ctx.userId
      return this.#track(
        this.#ask((t) => this.#native.commit(t, userId, lease, issued.accessToken, refreshToken, issued.expiresAtMs, null, nowMs, true)),
        userId,
        false,
      )
    } catch {
      return undefined
    }
  }

  /**
   * A promise of the answer to the native call `send(ticket)` makes (it
   * answers through the constructor's callback, `#answered`). Node is kept
   * alive while any answer is due. Never throws (the manager has a timer
   * running): rejects with what `send` throws.
   */
  #ask(send) {
    const ticket = (this.#ticket = (this.#ticket + 1) >>> 0)
    return new Promise((resolve, reject) => {
      try {
        send(ticket)
      } catch (e) {
        // A bad argument (INVALID_ARGUMENT) or a caught panic (INTERNAL):
        // the caller sees it with its code, never as an outage.
        const error = fromNative(e)
        if (error !== null && typeof error === 'object') error[FROM_COORDINATOR] = true
        return reject(error)
      }
      this.#due.set(ticket, resolve)
      if (this.#due.size === 1) this.#native.hold(true)
    })
  }

  /** The native side's answer to `#ask`'s call `ticket`. Never throws. */
  #answered(ticket, answer) {
    const resolve = this.#due.get(ticket)
    if (resolve === undefined) return
    this.#due.delete(ticket)
    if (this.#due.size === 0) {
      try {
        this.#native.hold(false)
      } catch {}
    }
    resolve(answer)
  }

  /** Redis could not coordinate the refresh, and `onError` lets it run here alone. */
  #fallback(userId, reason, refresh) {
    if (this.#closed) throw this.#error('COORDINATOR_UNAVAILABLE', userId, 'the token manager is closed')
    this.#warnDown(reason)
    this.#fallbacks++
    this.#observer.redisFallback(userId, reason, 'refresh')
    return refresh('redis-fallback')
  }

  /**
   * Redis work for `userId` that `close()` waits for; returns a promise
   * that never rejects, fulfilled once the work is over. `afterRefresh`: it
   * shares a refresh that already ran, so failing to counts as a fallback.
   */
  #track(settling, userId, afterRefresh = true) {
    const p = settling
      .then((s) => {
        // The refresh already ran: its token is the caller's, but the other
        // instances did not get it and may refresh again.
        if (s.unavailable != null && !this.#closed) {
          if (afterRefresh) {
            this.#fallbacks++
            this.#observer.redisFallback(userId, s.unavailable, 'share')
          }
          this.#warnDown(s.unavailable)
        }
      })
      .catch(() => {})
      .finally(() => this.#pending.delete(p))
    this.#pending.add(p)
    return p
  }

  #error(code, userId, message) {
    const e = new TokenRefreshError(code, userId, message)
    e[FROM_COORDINATOR] = true
    return e
  }

  #warnDown(reason) {
    if (this.#warnedDown) return
    this.#warnedDown = true
    const then = {
      auto: 'refreshes that would spend a refresh token fail with COORDINATOR_UNAVAILABLE (callers whose token has not expired keep it), others are coordinated in-process only',
      local: 'refreshes are coordinated in-process only',
      fail: 'refreshes fail with COORDINATOR_UNAVAILABLE (callers whose token has not expired keep it)',
    }[this.#onError]
    this.#observer.warn('TTM_REDIS_UNAVAILABLE', `tarabut-token-manager: ${reason}. Until coordination resumes, ${then}.`)
  }

  #warnUndecryptable() {
    if (this.#warnedUndecryptable) return
    this.#warnedUndecryptable = true
    this.#observer.warn(
      'TTM_REDIS_UNDECRYPTABLE',
      'tarabut-token-manager: a token cached in Redis did not decrypt with options.redis.encryptionKey (rotated key, or another app on the same keyPrefix?); treated as a cache miss',
    )
  }
}

/** The `{ shouldUpdate }` of a token `obtain` took from the shared cache, else undefined. */
function sharedToken(result) {
  return result[SHARED]
}

/** `e` if the coordinator made it (a TokenRefreshError with its own code), else null. */
function coordinatorError(e) {
  return e !== null && typeof e === 'object' && e[FROM_COORDINATOR] === true ? e : null
}

module.exports = { Coordinator, checkOptions, sharedToken, coordinatorError }
