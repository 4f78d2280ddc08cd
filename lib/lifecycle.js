'use strict'
// The whole life of a user's token, for apps that let the manager keep it
// (options `store` and `refresher`; README: "Let the manager keep the
// token", docs/lifecycle.md). TokenManager's `getToken`, `fetch`, `forget`
// and `revoke` are this file's; refreshes still go through the manager's
// single flight and the core (`Hooks.plan` below), which decide.
//
// Per user it keeps one `Entry`: the token last loaded, refreshed or
// adopted, with its refresh token, and the store's row as last read or
// written (the `previous` a save compares against). Rules:
// - a refresh's token is saved by the flight that ran it, before any caller
//   is answered and (with Redis) before the lock is released
//   (`Flight`, lib/manager.js, calls `persist`);
// - a failed save keeps the token (the entry is pinned: never dropped while
//   unsaved) and retries with backoff; a save answering false reloads the
//   row and keeps whichever token expires later;
// - users who called within `activeWindowMs` are refreshed ahead of their
//   buffer, at a jittered moment (`aheadAt`); idle users are not, and their
//   entries are dropped once saved.

const { TokenRefreshError, argError, callerError, fromNative, quietly } = require('./errors.js')
const { senderConstraint } = require('./refreshers.js')
const { ownMethod, ownOptions } = require('./options.js')
const { isFresh } = require('./policy.js')
const { toEpochMs } = require('./time.js')

/** Saves retry after 250 ms, doubling up to 30 s, each ±25% so a fleet spreads them. */
const SAVE_RETRY_MIN_MS = 250
const SAVE_RETRY_MAX_MS = 30_000
/** Saves answering false in a row before the manager waits as after a failure. */
const CONFLICTS_IN_A_ROW = 3

/**
 * The refresh-ahead window, as fractions of a token's fresh period (from
 * when it came to when it enters its buffer): a refresh ahead runs at a
 * uniformly random moment between 25% and 10% of that period before the
 * buffer, so a fleet spreads its refreshes and each has time to finish
 * before a request would have to wait on it. While one runs, a token that
 * entered its buffer is still served until half the buffer is left.
 */
const AHEAD_EARLIEST = 0.25
const AHEAD_LATEST = 0.1

/** Node's longest timer (about 24.8 days): a longer one fires at once. */
const MAX_TIMER_MS = 2_147_483_647

/** One user's token as the lifecycle holds it. */
class Entry {
  // Declared fields are defined on the instance: a setter someone put on
  // Object.prototype never receives a token.
  accessToken
  /** string | null */
  refreshToken
  expiresAtMs
  /** Expiry minus when it came, when known (a refresh here); 0: unknown. */
  lifetimeMs
  /** When it came (the app's clock). */
  since
  /** When `getToken` or `fetch` last asked for it (the app's clock). */
  usedAt
  /** The store's row as last loaded or saved: `{ accessToken, expiresAt }` or null. */
  row
  /** Whether the token is the store's row (or on its way there: false). */
  saved = true
  /** Set by `forget`: nothing more is saved or refreshed for it. */
  gone = false
  /** Another instance invalidated the user: reload the row on next use. */
  stale = false
  /** A refresh ahead runs for this token. */
  refreshingAhead = false
  /**
   * `expiresAtMs` as the Date answers hand out, made once per token: a
   * `new Date` per answer was most of what `getToken` cost beyond
   * `getValidToken` (which hands back the caller's own Date). Made anew if
   * it no longer says `expiresAtMs` (a new token, or a caller's setTime).
   */
  date = null
  /** The save running now (a promise), if any. */
  saving = null
  /** Failed or conflicting save attempts in a row. */
  attempts = 0
  retryTimer = undefined
  aheadTimer = undefined

  constructor(accessToken, refreshToken, expiresAtMs, lifetimeMs, since, row) {
    this.accessToken = accessToken
    this.refreshToken = refreshToken
    this.expiresAtMs = expiresAtMs
    this.lifetimeMs = lifetimeMs
    this.since = since
    this.usedAt = since
    this.row = row
  }
}

/**
 * `options.store`, `options.refresher`, `options.refreshAhead`,
 * `options.fetch` checked (TypeError naming the option); `idleTtlMs` is the
 * effective one, `activeWindowMs`' default.
 */
function checkLifecycleOptions(o, idleTtlMs) {
  const { store, refresher, refreshAhead, fetch } = o
  let save = null
  if (store !== undefined && store !== null) {
    if (typeof store !== 'object' && typeof store !== 'function') throw argError('options.store', 'must be an object { load, save, delete? }')
    // Methods of the store or its class, read once; never Object.prototype's.
    const load = ownMethod(store, 'load')
    const write = ownMethod(store, 'save')
    const del = ownMethod(store, 'delete')
    if (load === undefined) throw argError('options.store.load', 'must be a function (userId) => StoredToken | null')
    if (write === undefined) throw argError('options.store.save', 'must be a function (userId, token, previous) => boolean | void')
    save = { load, save: write, delete: del ?? null, self: store }
  }
  if (refresher !== undefined && refresher !== null && typeof refresher !== 'function') {
    throw argError('options.refresher', 'must be a refresh function or a native refresher (tarabutRefresher, oauth2Refresher)')
  }
  if (fetch !== undefined && fetch !== null && typeof fetch !== 'function') throw argError('options.fetch', 'must be a fetch function')
  let activeWindowMs = null
  if (refreshAhead === undefined || refreshAhead === null || refreshAhead === true) {
    activeWindowMs = idleTtlMs
  } else if (refreshAhead !== false) {
    if (typeof refreshAhead !== 'object') throw argError('options.refreshAhead', 'must be a boolean or { activeWindowMs }')
    const w = ownOptions(refreshAhead, ['activeWindowMs'], 'options.refreshAhead', 'refreshAhead').activeWindowMs
    if (w === undefined) activeWindowMs = idleTtlMs
    else if (typeof w !== 'number') throw argError('options.refreshAhead.activeWindowMs', 'must be a number')
    else if (!(Number.isInteger(w) && w >= 1 && w <= MAX_TIMER_MS)) throw argError('options.refreshAhead.activeWindowMs', `must be a whole number of milliseconds from 1 to ${MAX_TIMER_MS}`, RangeError)
    else activeWindowMs = w
  }
  return { store: save, refresher: refresher ?? null, fetch: fetch ?? null, activeWindowMs }
}

/**
 * The token lifecycle of one TokenManager. `hooks` are the manager's parts
 * it uses:
 * - `plan(userId, accessToken, refreshToken, expiresAtMs, now, aheadMs, persist, newest)`:
 *   the manager's slow path, answering a promise of the token to use
 *   (`{ accessToken, refreshToken, expiresAtMs, shouldUpdate }`) or of null
 *   (the presented token stands); a led refresh calls `persist(token, healing)`
 *   before anyone is answered, and under the Redis lock `newest()` for the
 *   store's refresh token when Redis had none newer;
 * - `now()`: the app's clock (throws a TypeError for a bad one);
 * - `isRevoked(userId, now)`: `invalidate` marked the user;
 * - `invalidate(userId, accessToken)`, `forget(userId)`: the manager's;
 * - `coordinatorForget(userId)`: a promise, Redis told (or undefined);
 * - `bufferMs`, `maxLifetimeMs`, `timeoutMs`, `idleTtlMs`, `observer`.
 */
class Lifecycle {
  #hooks
  #store
  #refresher
  #fetch
  /** How requests prove they hold the token (DPoP, a client certificate): lib/refreshers.js. */
  #constraint
  /** With a client certificate: the fetch `fetch` sends with, made on first use. */
  #send = null
  /** The undici Agent presenting the client certificate, if any. */
  #dispatcher = null
  /** null: no refresh ahead. */
  #activeWindowMs
  /** userId -> Entry */
  #entries = new Map()
  /** userId -> a load of the row running now */
  #loading = new Map()
  /** userId -> a `forget` running now */
  #forgetting = new Map()
  /** Refreshes ahead running now (`flush` waits for them). */
  #running = new Set()
  #closed = false
  #hits = 0
  #saveFailures = 0
  #savesFailing = false

  constructor(options, hooks) {
    this.#hooks = hooks
    this.#store = options.store
    this.#refresher = options.refresher
    this.#fetch = options.fetch
    this.#constraint = senderConstraint(options.refresher)
    this.#activeWindowMs = options.store !== null && options.refresher !== null ? options.activeWindowMs : null
  }

  /** What `stats()` adds. */
  counts() {
    let unsaved = 0
    for (const e of this.#entries.values()) if (!e.saved) unsaved++
    return { hits: this.#hits, saveFailures: this.#saveFailures, unsavedTokens: unsaved }
  }

  /** Another instance invalidated these users: their rows are read again on next use. */
  markStale(userId) {
    const e = this.#entries.get(userId)
    if (e !== undefined) e.stale = true
  }

  getToken(userId) {
    try {
      this.#ready('getToken')
      checkUserId(userId)
      if (this.#forgetting.size !== 0) {
        const forgetting = this.#forgetting.get(userId)
        if (forgetting !== undefined) return forgetting.then(() => this.getToken(userId))
      }
      const now = this.#hooks.now()
      const e = this.#entries.get(userId)
      if (e !== undefined && !e.stale) {
        e.usedAt = now
        // While a refresh ahead runs, the token is served into its buffer.
        const buffer = e.refreshingAhead ? Math.floor(this.#bufferOf(e) / 2) : this.#bufferOf(e)
        if (isFresh(e.expiresAtMs, now, buffer, this.#hooks.maxLifetimeMs) && !this.#hooks.isRevoked(userId, now)) {
          this.#hits++
          let date = e.date
          if (date === null || date.getTime() !== e.expiresAtMs) date = e.date = new Date(e.expiresAtMs)
          return Promise.resolve({ accessToken: e.accessToken, expiresAt: date })
        }
        return this.#renew(userId, e, now, 0)
      }
      return this.#load(userId).then((loaded) => {
        const at = this.#hooks.now()
        loaded.usedAt = at
        if (isFresh(loaded.expiresAtMs, at, this.#bufferOf(loaded), this.#hooks.maxLifetimeMs) && !this.#hooks.isRevoked(userId, at)) {
          this.#scheduleAhead(userId, loaded, at)
          return { accessToken: loaded.accessToken, expiresAt: new Date(loaded.expiresAtMs) }
        }
        return this.#renew(userId, loaded, at, 0)
      })
    } catch (e) {
      return Promise.reject(callerError(e, 'userId'))
    }
  }

  /**
   * `fetch` with the user's token; on a 401 the token is invalidated (in
   * every instance) and the request sent once more with a fresh one, if
   * its body can be sent again. With a DPoP refresher each request carries
   * `Authorization: DPoP` and a fresh proof (a resource server's
   * `use_dpop_nonce` is answered once with its nonce); with a client
   * certificate, the connection presents it.
   */
  async fetch(userId, input, init) {
    this.#ready('fetch')
    const send = this.#sender()
    if (init !== undefined && init !== null && typeof init !== 'object') throw argError('init', 'must be a RequestInit object')
    const own = init?.headers ?? (input instanceof Request ? input.headers : undefined)
    // The caller's own Authorization is theirs: sent as is, never retried.
    if (own !== undefined && new Headers(own).has('authorization')) return send(input, init)
    const again = resendable(init)
    let next = input
    // The input for one send, keeping a copy of a Request's body for the next.
    const take = () => {
      const now = next
      if (again && now instanceof Request && now.body !== null) next = now.clone()
      return now
    }
    const token = await this.getToken(userId)
    const first = await this.#sendWith(send, take, again, init, token.accessToken)
    if (first.status !== 401 || !again) return first
    // The API refused the token: no instance serves it again.
    this.#hooks.invalidate(userId, token.accessToken)
    discard(first)
    const fresh = await this.getToken(userId)
    return this.#sendWith(send, take, again, init, fresh.accessToken)
  }

  /** One request with `accessToken`, and with DPoP one more if the server asks for its nonce. */
  async #sendWith(send, take, again, init, accessToken) {
    const dpop = this.#constraint.dpop
    let input = take()
    let res = await send(input, withToken(input, init, accessToken, dpop))
    if (dpop === null) return res
    keepNonce(dpop, input, res)
    if (!again || !asksForNonce(res)) return res
    discard(res)
    input = take()
    res = await send(input, withToken(input, init, accessToken, dpop))
    keepNonce(dpop, input, res)
    return res
  }

  /** The fetch to send with: the app's or the global one; over a client certificate when the token is bound to one. */
  #sender() {
    if (this.#send !== null) return this.#send
    const own = this.#fetch
    const tls = this.#constraint.tls
    if (tls === null) {
      // The global fetch is looked up at each call (an app may replace it).
      const send = own ?? globalThis.fetch
      if (typeof send !== 'function') throw argError('options.fetch', 'is needed: this runtime has no global fetch')
      return send
    }
    // undici's own fetch with its own Agent: a dispatcher from another
    // undici than the runtime's global fetch may be refused.
    const undici = require('undici')
    this.#dispatcher = new undici.Agent({ connect: { cert: tls.cert, key: tls.key, ca: tls.ca } })
    const dispatcher = this.#dispatcher
    this.#send = own !== null ? (input, init) => own(input, { ...init, dispatcher }) : (input, init) => viaUndici(undici.fetch, dispatcher, input, init)
    return this.#send
  }

  async forget(userId) {
    this.#ready('forget')
    checkUserId(userId)
    const running = this.#forgetting.get(userId)
    if (running !== undefined) return running
    const done = this.#forgetNow(userId)
    this.#forgetting.set(userId, done)
    try {
      return await done
    } finally {
      this.#forgetting.delete(userId)
    }
  }

  async revoke(userId, revokeWith) {
    this.#ready('revoke')
    checkUserId(userId)
    const e = this.#entries.get(userId) ?? (await this.#load(userId).catch((err) => (err?.code === 'NOT_CONNECTED' ? null : Promise.reject(err))))
    if (e !== null && e.refreshToken !== null) await revokeWith(this.#refresher, userId, e.refreshToken, this.#hooks.timeoutMs)
    return this.forget(userId)
  }

  /**
   * For `close()`: stops refreshing ahead, waits for the refreshes ahead
   * running (each ends within the refresh timeout), then makes one more
   * attempt at every save still due.
   */
  flush() {
    this.#closed = true
    for (const e of this.#entries.values()) {
      clearTimeout(e.aheadTimer)
      e.aheadTimer = undefined
    }
    return Promise.allSettled(this.#running).then(() => {
      const pending = []
      for (const [userId, e] of this.#entries) {
        if (e.saved || e.gone) continue
        clearTimeout(e.retryTimer)
        e.retryTimer = undefined
        pending.push(e.saving ?? this.#save(userId, e))
      }
      return Promise.allSettled(pending).then(() => {
        // Connections to resource servers end with the manager.
        if (this.#dispatcher !== null) return this.#dispatcher.close().catch(() => {})
      })
    })
  }

  /**
   * The flight that refreshed `userId`'s token calls this before answering
   * anyone (Flight, lib/manager.js). `from`: the entry the refresh started
   * from; if the user was forgotten since, nothing is saved.
   */
  persist(userId, token, healing, from) {
    if (from !== undefined && from.gone) return Promise.resolve()
    const now = this.#hooks.now()
    let e = this.#entries.get(userId)
    if (e !== undefined && e.gone) return Promise.resolve()
    if (e !== undefined && e.expiresAtMs > token.expiresAtMs && !e.saved) return Promise.resolve()
    // Already the row (a token another instance saved, handed back).
    if (e !== undefined && e.saved && e.row !== null && e.row.accessToken === token.accessToken) return Promise.resolve()
    const lifetime = healing ? 0 : token.expiresAtMs - now
    if (e === undefined) {
      e = new Entry(token.accessToken, token.refreshToken, token.expiresAtMs, lifetime, now, null)
      this.#entries.set(userId, e)
    } else {
      e.accessToken = token.accessToken
      if (token.refreshToken !== null) e.refreshToken = token.refreshToken
      e.expiresAtMs = token.expiresAtMs
      e.lifetimeMs = lifetime
      e.since = now
      e.stale = false
    }
    e.saved = false
    e.attempts = 0
    clearTimeout(e.retryTimer)
    e.retryTimer = undefined
    this.#scheduleAhead(userId, e, now)
    // Answer the flight after the first attempt, or at the refresh timeout
    // if the store hangs: the token is kept and the save goes on.
    const saving = e.saving ?? this.#save(userId, e)
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, this.#hooks.timeoutMs)
      saving.then(() => {
        clearTimeout(timer)
        resolve()
      })
    })
  }

  #ready(method) {
    if (this.#store === null || this.#refresher === null) {
      throw argError(`TokenManager.${method}()`, 'needs options.store and options.refresher', TypeError)
    }
  }

  /** The buffer for `e`: half its lifetime when that is known and shorter (as the core does, Policy::buffer_for). */
  #bufferOf(e) {
    const b = this.#hooks.bufferMs
    return e.lifetimeMs > 0 ? Math.min(b, Math.floor(e.lifetimeMs / 2)) : b
  }

  /** The user's row from the store, as an Entry (kept), one load per user at a time. */
  #load(userId) {
    let p = this.#loading.get(userId)
    if (p === undefined) {
      p = this.#read(userId).then((row) => {
        const now = this.#hooks.now()
        const held = this.#entries.get(userId)
        if (row === null) {
          if (held !== undefined) this.#drop(userId, held)
          throw new TokenRefreshError('NOT_CONNECTED', userId, 'the store holds no token for this user: they must connect their bank first')
        }
        // An unsaved or newer token here beats the row (its save is on its way).
        if (held !== undefined && !held.gone && (!held.saved || held.expiresAtMs > row.expiresAtMs)) {
          held.stale = false
          return held
        }
        const e = new Entry(row.accessToken, row.refreshToken, row.expiresAtMs, 0, now, { accessToken: row.accessToken, expiresAt: new Date(row.expiresAtMs) })
        if (held !== undefined) this.#drop(userId, held)
        this.#entries.set(userId, e)
        return e
      })
      const clear = () => this.#loading.delete(userId)
      p.then(clear, clear)
      this.#loading.set(userId, p)
    }
    return p
  }

  /** `store.load`, checked: `{ accessToken, refreshToken, expiresAtMs }` or null. */
  async #read(userId) {
    let row
    try {
      row = await this.#store.load.call(this.#store.self, userId)
    } catch (cause) {
      throw new TokenRefreshError('STORE_FAILED', userId, 'store.load failed (see cause)', { cause })
    }
    if (row === null || row === undefined) return null
    return checkRow(row)
  }

  /**
   * The core's answer for `e` (a refresh if due, or ahead with `aheadMs`),
   * as the caller's token; `e` follows what came.
   */
  #renew(userId, e, now, aheadMs) {
    const persist = (token, healing) => this.persist(userId, token, healing, e)
    // Under the Redis lock with nothing newer in Redis (it lost its data):
    // the row beats what this process knows if it is at least as new.
    const newest = () => this.#read(userId).then((row) => (row !== null && row.expiresAtMs >= e.expiresAtMs ? row.refreshToken : null))
    return this.#hooks.plan(userId, e.accessToken, e.refreshToken, e.expiresAtMs, now, aheadMs, persist, newest).then((issued) => {
      if (issued === null) return { accessToken: e.accessToken, expiresAt: new Date(e.expiresAtMs) }
      const current = this.#entries.get(userId)
      if (current !== undefined && !current.gone && issued.expiresAtMs > current.expiresAtMs) {
        // A token the core already held (no save ran for it here): it is
        // the newest, so it is kept, and saved if the core says the row is stale.
        if (issued.shouldUpdate) return this.persist(userId, { accessToken: issued.accessToken, refreshToken: issued.refreshToken ?? current.refreshToken, expiresAtMs: issued.expiresAtMs }, true, e).then(() => answer(issued))
        current.accessToken = issued.accessToken
        if (issued.refreshToken != null) current.refreshToken = issued.refreshToken
        current.expiresAtMs = issued.expiresAtMs
        current.lifetimeMs = 0
        const at = this.#hooks.now()
        current.since = at
        this.#scheduleAhead(userId, current, at)
      }
      return answer(issued)
    })
  }

  /** One save attempt for `e`'s token; retries itself on failure. Never rejects. */
  #save(userId, e) {
    const token = { accessToken: e.accessToken, refreshToken: e.refreshToken, expiresAt: new Date(e.expiresAtMs) }
    const previous = e.row
    const attempt = (async () => {
      let answered
      try {
        answered = await this.#store.save.call(this.#store.self, userId, token, previous)
      } catch (cause) {
        return this.#saveFailed(userId, e, cause)
      }
      if (e.gone) return
      if (answered === false) return this.#conflict(userId, e)
      e.row = { accessToken: token.accessToken, expiresAt: token.expiresAt }
      // A newer token may have come while this one was being written.
      if (e.accessToken === token.accessToken) {
        e.saved = true
        e.attempts = 0
        this.#savesFailing = false
      } else {
        e.saving = null
        return this.#save(userId, e)
      }
    })()
    const tracked = attempt.catch(() => {}).finally(() => {
      if (e.saving === tracked) e.saving = null
    })
    e.saving = tracked
    return tracked
  }

  /** The row changed under us: read it, keep whichever token expires later. */
  async #conflict(userId, e) {
    let row
    try {
      row = await this.#read(userId)
    } catch (cause) {
      return this.#saveFailed(userId, e, cause)
    }
    if (e.gone) return
    if (row === null) {
      // Deleted meanwhile (forgotten elsewhere): not brought back.
      this.#drop(userId, e)
      return
    }
    e.row = { accessToken: row.accessToken, expiresAt: new Date(row.expiresAtMs) }
    if (row.expiresAtMs >= e.expiresAtMs) {
      e.accessToken = row.accessToken
      e.refreshToken = row.refreshToken
      e.expiresAtMs = row.expiresAtMs
      e.lifetimeMs = 0
      e.since = this.#hooks.now()
      e.saved = true
      e.attempts = 0
      return
    }
    if (++e.attempts >= CONFLICTS_IN_A_ROW) return this.#retryLater(userId, e)
    e.saving = null
    return this.#save(userId, e)
  }

  #saveFailed(userId, e, cause) {
    this.#saveFailures++
    this.#hooks.observer.saveFailed(userId, cause, !this.#savesFailing)
    this.#savesFailing = true
    e.attempts++
    return this.#retryLater(userId, e)
  }

  #retryLater(userId, e) {
    if (e.gone) return
    const base = Math.min(SAVE_RETRY_MAX_MS, SAVE_RETRY_MIN_MS * 2 ** Math.min(e.attempts, 20))
    const delay = Math.round(base * (0.75 + Math.random() / 2))
    clearTimeout(e.retryTimer)
    e.retryTimer = setTimeout(() => {
      e.retryTimer = undefined
      if (!e.gone && !e.saved && e.saving === null) this.#save(userId, e)
    }, delay)
    e.retryTimer.unref?.()
  }

  /**
   * Arms `e`'s timer: a refresh ahead at a random moment of its window
   * (AHEAD_EARLIEST..AHEAD_LATEST), or, for an idle user, dropping the entry.
   */
  #scheduleAhead(userId, e, now) {
    clearTimeout(e.aheadTimer)
    e.aheadTimer = undefined
    if (e.gone || this.#closed) return
    const bufferStart = e.expiresAtMs - this.#bufferOf(e)
    const fresh = bufferStart - e.since
    let at
    if (this.#activeWindowMs === null || fresh <= 0) {
      // No refresh ahead: the timer only drops the entry once idle.
      at = Math.max(bufferStart, now + this.#hooks.idleTtlMs)
    } else {
      at = bufferStart - fresh * (AHEAD_LATEST + (AHEAD_EARLIEST - AHEAD_LATEST) * Math.random())
    }
    const delay = Math.min(MAX_TIMER_MS, Math.max(0, Math.round(at - now)))
    e.aheadTimer = setTimeout(() => this.#ahead(userId, e), delay)
    e.aheadTimer.unref?.()
  }

  /** `e`'s timer fired: refresh ahead if its user is active, else drop it once saved. */
  #ahead(userId, e) {
    e.aheadTimer = undefined
    if (e.gone || this.#entries.get(userId) !== e) return
    let now
    try {
      now = this.#hooks.now()
    } catch {
      return
    }
    const active = this.#activeWindowMs !== null && now - e.usedAt <= this.#activeWindowMs
    if (!active) {
      if (now - e.usedAt > this.#hooks.idleTtlMs && e.saved) this.#drop(userId, e)
      else this.#scheduleIdle(userId, e, now)
      return
    }
    const bufferStart = e.expiresAtMs - this.#bufferOf(e)
    if (now >= bufferStart) return // a foreground call refreshes it now
    const before = e.expiresAtMs
    e.refreshingAhead = true
    const running = this.#renew(userId, e, now, bufferStart - now + 1).then(
      () => {
        e.refreshingAhead = false
        // Nothing new came (the core answered with the same token): try
        // again shortly, still before the buffer.
        if (e.expiresAtMs === before && !e.gone) this.#retryAhead(userId, e, bufferStart)
      },
      () => {
        e.refreshingAhead = false
        this.#retryAhead(userId, e, bufferStart)
      },
    )
    this.#running.add(running)
    running.then(() => this.#running.delete(running))
  }

  /** A refresh ahead failed: once more halfway to the buffer, if there is time. */
  #retryAhead(userId, e, bufferStart) {
    if (e.gone || this.#closed || this.#entries.get(userId) !== e) return
    let now
    try {
      now = this.#hooks.now()
    } catch {
      return
    }
    const left = bufferStart - now
    if (left < 100) return // the foreground refreshes it
    clearTimeout(e.aheadTimer)
    e.aheadTimer = setTimeout(() => this.#ahead(userId, e), Math.round(left / 2))
    e.aheadTimer.unref?.()
  }

  #scheduleIdle(userId, e, now) {
    clearTimeout(e.aheadTimer)
    if (this.#closed) return
    const delay = Math.min(MAX_TIMER_MS, Math.max(1000, this.#hooks.idleTtlMs - (now - e.usedAt)))
    e.aheadTimer = setTimeout(() => this.#ahead(userId, e), delay)
    e.aheadTimer.unref?.()
  }

  #drop(userId, e) {
    clearTimeout(e.aheadTimer)
    clearTimeout(e.retryTimer)
    e.aheadTimer = undefined
    e.retryTimer = undefined
    if (this.#entries.get(userId) === e) this.#entries.delete(userId)
  }

  async #forgetNow(userId) {
    const e = this.#entries.get(userId)
    if (e !== undefined) {
      e.gone = true
      this.#drop(userId, e)
    }
    this.#hooks.forget(userId)
    const del = this.#store.delete
    if (del !== null) await del.call(this.#store.self, userId)
    await this.#hooks.coordinatorForget(userId)
  }
}

/** A refresh's token as `getToken` answers it. */
function answer(issued) {
  return { accessToken: issued.accessToken, expiresAt: new Date(issued.expiresAtMs) }
}

function checkUserId(userId) {
  if (typeof userId !== 'string' || userId.length === 0) throw argError('userId', 'must be a non-empty string')
}

/** A row from `store.load`, its fields read once and checked (TypeError naming the field). */
function checkRow(row) {
  if (typeof row !== 'object') throw argError('store.load()', `answered a ${typeof row} for a user, not { accessToken, refreshToken, expiresAt } or null`)
  const { accessToken, refreshToken, expiresAt } = row
  if (typeof accessToken !== 'string') throw argError('store.load().accessToken', 'must be a string')
  if (refreshToken != null && typeof refreshToken !== 'string') throw argError('store.load().refreshToken', 'must be a string or null')
  // As a presented token's: epoch seconds are refused, not taken for 1970.
  const expiresAtMs = toEpochMs(expiresAt, 'store.load().expiresAt')
  if (!Number.isFinite(expiresAtMs)) {
    throw argError('store.load().expiresAt', 'must be a valid Date, epoch milliseconds or an ISO 8601 string')
  }
  return { accessToken, refreshToken: refreshToken ?? null, expiresAtMs }
}

/** Whether a request can be sent a second time (its body is not a one-shot stream). */
function resendable(init) {
  const body = init?.body
  if (body !== undefined && body !== null) {
    if (typeof body === 'string' || body instanceof ArrayBuffer || ArrayBuffer.isView(body)) return true
    if (body instanceof URLSearchParams || body instanceof Blob || body instanceof FormData) return true
    return false
  }
  return true
}

/**
 * `init` with the token added to the caller's headers (the Request's, when
 * init has none): `Authorization: Bearer <token>`, or with `dpop`
 * `Authorization: DPoP <token>` and a proof for this method and URL.
 */
function withToken(input, init, accessToken, dpop) {
  const headers = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined))
  if (dpop === null) {
    headers.set('authorization', `Bearer ${accessToken}`)
  } else {
    const { method, url } = target(input, init)
    let proof
    try {
      proof = dpop.dpopProof(method, url, accessToken)
    } catch (e) {
      throw fromNative(e)
    }
    headers.set('authorization', `DPoP ${accessToken}`)
    headers.set('dpop', proof)
  }
  return { ...init, headers }
}

/** The methods fetch sends upper-cased whatever their case (the Fetch standard's "normalize"). */
const NORMALIZED_METHODS = new Set(['DELETE', 'GET', 'HEAD', 'OPTIONS', 'POST', 'PUT'])

/** The method and absolute URL a request goes to, as fetch will send them (a proof's `htm` and `htu`). */
function target(input, init) {
  let method = init?.method ?? (input instanceof Request ? input.method : 'GET')
  if (typeof method !== 'string') method = String(method)
  const upper = method.toUpperCase()
  if (NORMALIZED_METHODS.has(upper)) method = upper
  const url = input instanceof Request ? input.url : input instanceof URL ? input.href : String(input)
  return { method, url }
}

/** RFC 9449 section 9: the resource server wants its nonce in the proof. */
function asksForNonce(res) {
  return res.status === 401 && res.headers.has('dpop-nonce') && /\bDPoP\b[^]*use_dpop_nonce/i.test(res.headers.get('www-authenticate') ?? '')
}

/** A server may send a new nonce on any answer: kept for its origin. */
function keepNonce(dpop, input, res) {
  const nonce = res.headers.get('dpop-nonce')
  if (nonce !== null) quietly(() => dpop.keepDpopNonce(target(input, undefined).url, nonce))
}

/** An answer not handed to the caller: its body is let go. */
function discard(res) {
  quietly(() => res.body?.cancel().catch(() => {}))
}

/**
 * undici's fetch for a request as the global fetch takes it: the global
 * Request class does the reading (a Request, a FormData body, headers of
 * any form), undici sends what it read.
 */
function viaUndici(fetch, dispatcher, input, init) {
  const req = new Request(input, init)
  return fetch(req.url, {
    method: req.method,
    headers: req.headers,
    body: req.body ?? undefined,
    duplex: req.body === null ? undefined : 'half',
    signal: req.signal,
    redirect: req.redirect,
    dispatcher,
  })
}

module.exports = { Lifecycle, checkLifecycleOptions }
