'use strict'
// Native refreshers: token calls made in Rust (reqwest on tokio), through
// BindingRefresher (src/binding/refreshers.rs). Each is a plain RefreshFn
// for anyone who wraps it; the manager spots the native half under
// NATIVE_REFRESHER and calls it directly (`nativeRefresh`), so the HTTP call
// runs in Rust with the manager's timeout as its budget.

const { BindingRefresher } = require('../binding.js')
const { TokenRefreshError, argError, callerError, fromNative, quietly } = require('./errors.js')
const { REFRESHER_KIND } = require('./observability.js')
const { ownOptions } = require('./options.js')

const NATIVE_REFRESHER = Symbol('tarabut-token-manager.nativeRefresher')
/** The `tls` a refresher presents a client certificate with (cert + key, maybe ca). */
const CLIENT_TLS = Symbol('tarabut-token-manager.clientTls')
/**
 * Refresh functions that never send a refresh token (client credentials):
 * with Redis, they may still refresh in-process while Redis is unavailable,
 * and need no restart guard (lib/coordination.js).
 */
const CLIENT_CREDENTIALS = new WeakSet()

let lastAbortId = 0
function nextAbortId() {
  lastAbortId = lastAbortId >= 0xffffffff ? 1 : lastAbortId + 1
  return lastAbortId
}

/** A failed native outcome as the error a caller switches on. */
function refresherError(userId, outcome) {
  if (outcome.code === 'INVALID_ARGUMENT') return Object.assign(new TypeError(outcome.message), { code: 'INVALID_ARGUMENT' })
  return new TokenRefreshError(outcome.code, userId, outcome.message, { status: outcome.status ?? undefined, error: outcome.error ?? undefined })
}

// Object literals: their properties are defined, so a setter on
// Object.prototype for `refreshToken` never sees the token.
function refreshedToken(outcome) {
  return outcome.refreshToken != null
    ? { accessToken: outcome.accessToken, expiresIn: outcome.expiresIn, refreshToken: outcome.refreshToken }
    : { accessToken: outcome.accessToken, expiresIn: outcome.expiresIn }
}

/** The manager's call: its refresh timeout is the whole budget. */
function nativeRefresh(refresher, userId, refreshToken, timeoutMs) {
  let pending
  try {
    pending = refresher.refresh(userId, refreshToken, timeoutMs, null)
  } catch (e) {
    // An argument over its length limit (INVALID_ARGUMENT), or a caught
    // Rust panic (INTERNAL).
    return Promise.reject(fromNative(e))
  }
  return pending.then((outcome) => {
    if (outcome.code != null) throw refresherError(userId, outcome)
    return refreshedToken(outcome)
  })
}

/** The native half of `refreshFn`, if it is one of ours. */
function nativeOf(refreshFn) {
  return typeof refreshFn === 'function' ? (refreshFn[NATIVE_REFRESHER] ?? null) : null
}

/** Whether `refreshFn` can revoke: a native refresher with a revocation endpoint. */
function canRevoke(refreshFn) {
  const native = nativeOf(refreshFn)
  return native !== null && native.canRevoke()
}

/**
 * RFC 7009: revokes `refreshToken` at the provider of `refreshFn` (see
 * `canRevoke`), within `timeoutMs` (null: the refresher's own). Resolves
 * once the provider answered 2xx (also for a token it no longer knows);
 * else rejects with a TokenRefreshError `REVOKE_FAILED` (with `status` and
 * `error` when it answered). A refresher that cannot revoke, or a bad
 * argument, rejects with a TypeError.
 */
function nativeRevoke(refreshFn, userId, refreshToken, timeoutMs) {
  let pending
  try {
    if (!canRevoke(refreshFn)) throw argError('refresher', 'cannot revoke: only oauth2Refresher with a revocationUrl can')
    if (typeof userId !== 'string' || userId.length === 0) throw argError('userId', 'must be a non-empty string')
    if (typeof refreshToken !== 'string' || refreshToken.length === 0) throw argError('refreshToken', 'must be a non-empty string')
    if (timeoutMs != null && typeof timeoutMs !== 'number') throw argError('timeoutMs', 'must be a number')
    pending = nativeOf(refreshFn).revoke(refreshToken, timeoutMs ?? null)
  } catch (e) {
    return Promise.reject(fromNative(e))
  }
  return pending.then((outcome) => {
    if (outcome.code != null) throw refresherError(userId, outcome)
  })
}

function makeRefresher(refresher, name, kind) {
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
      if (!(signal instanceof AbortSignal)) throw argError('ctx.signal', 'must be an AbortSignal')
      if (signal.aborted) return Promise.reject(signal.reason)
      const abortId = nextAbortId()
      const pending = refresher.refresh(userId, refreshToken, null, abortId)
      return new Promise((resolve, reject) => {
        const onAbort = () => {
          quietly(() => refresher.abort(abortId))
          reject(signal.reason)
        }
        signal.addEventListener('abort', onAbort, { once: true })
        pending.then(
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
      // A getter or Proxy on ctx that threw is a bad argument too.
      return Promise.reject(callerError(e, 'ctx'))
    }
  }
  Object.defineProperty(refresh, 'name', { value: name })
  Object.defineProperty(refresh, NATIVE_REFRESHER, { value: refresher })
  Object.defineProperty(refresh, REFRESHER_KIND, { value: kind })
  return refresh
}

/**
 * Copies the known options, refusing unknown ones (a typo must not fall back
 * to a default URL): own properties only, into a null-prototype object
 * (lib/options.js), so a `tokenUrl` put on Object.prototype is no option
 * and a setter there never sees the client secret. `path`: the options'
 * name in messages (nested ones: `options.tls`).
 */
function pickOptions(fn, options, types, path = 'options') {
  if (options === null || typeof options !== 'object') throw argError(path, `must be an object (${fn})`)
  const own = ownOptions(options, Object.keys(types), path, fn)
  const picked = Object.create(null)
  for (const [key, spec] of Object.entries(types)) {
    const value = own[key]
    if (value === undefined || value === null) {
      if (spec.required) throw argError(`${path}.${key}`, `is required (${spec.type})`)
      continue
    }
    if (spec.type === 'key') {
      picked[key] = keyText(`${path}.${key}`, value)
      continue
    }
    if (typeof value !== spec.type || (spec.type === 'object' && Array.isArray(value))) throw argError(`${path}.${key}`, `must be ${spec.type === 'object' ? 'an' : 'a'} ${spec.type}`)
    picked[key] = spec.fields ? pickOptions(fn, value, spec.fields, `${path}.${key}`) : value
  }
  return picked
}

/** A private key option: PEM text as is, a JWK object as its JSON (the core parses both). */
function keyText(name, value) {
  if (typeof value === 'string') return value
  if (typeof value === 'object' && !Array.isArray(value)) return JSON.stringify(value)
  throw argError(name, 'must be a PEM string or a JWK object')
}

function buildRefresher(factory, fn, options, types, kind) {
  let picked
  try {
    picked = pickOptions(fn, options, types)
  } catch (e) {
    throw callerError(e, 'options')
  }
  let refresher
  try {
    refresher = factory(picked)
  } catch (e) {
    throw fromNative(e)
  }
  const refresh = makeRefresher(refresher, fn, kind)
  // Certificate-bound tokens (RFC 8705) work only over a connection that
  // presents the same certificate: manager.fetch takes it from here.
  const tls = picked.tls
  if (tls !== undefined && tls.cert !== undefined && tls.key !== undefined) {
    Object.defineProperty(refresh, CLIENT_TLS, { value: Object.freeze({ cert: tls.cert, key: tls.key, ca: tls.ca }) })
  }
  return refresh
}

/**
 * How a request to a resource server proves it holds the token, for
 * `manager.fetch`: `dpop`, the native refresher that signs DPoP proofs
 * (RFC 9449) with its key, or null (Bearer); `tls`, the client
 * certificate the token is bound to (RFC 8705), or null.
 */
function senderConstraint(refreshFn) {
  const native = nativeOf(refreshFn)
  return {
    dpop: native !== null && native.usesDpop() ? native : null,
    tls: (typeof refreshFn === 'function' && refreshFn[CLIENT_TLS]) || null,
  }
}

/** The `tls` option of both refreshers: PEM strings. */
const TLS_OPTIONS = {
  cert: { type: 'string' },
  key: { type: 'string' },
  ca: { type: 'string' },
}

/** The `dpop` option of oauth2Refresher. */
const DPOP_OPTIONS = {
  privateKey: { type: 'key', required: true },
  algorithm: { type: 'string' },
}

const TARABUT_OPTIONS = {
  clientId: { type: 'string', required: true },
  clientSecret: { type: 'string', required: true },
  tokenUrl: { type: 'string' },
  scope: { type: 'string' },
  timeoutMs: { type: 'number' },
  maxRetries: { type: 'number' },
  tls: { type: 'object', fields: TLS_OPTIONS },
}

/**
 * Tarabut Gateway's token call, made natively: a client-credentials POST
 * per user (header X-TG-CustomerUserId), retried on connection failures,
 * 429 (after Retry-After) and 5xx. Pass it to getValidToken in place of a
 * refreshFn, or call it as one.
 */
function tarabutRefresher(options) {
  const refresh = buildRefresher((o) => BindingRefresher.tarabut(o), 'tarabutRefresher', options, TARABUT_OPTIONS, 'tarabut')
  CLIENT_CREDENTIALS.add(refresh)
  return refresh
}

const OAUTH2_OPTIONS = {
  tokenUrl: { type: 'string', required: true },
  clientId: { type: 'string', required: true },
  // Required by the client_secret_* methods (the core checks per method).
  clientSecret: { type: 'string' },
  authMethod: { type: 'string' },
  privateKey: { type: 'key' },
  keyId: { type: 'string' },
  algorithm: { type: 'string' },
  audience: { type: 'string' },
  scope: { type: 'string' },
  timeoutMs: { type: 'number' },
  revocationUrl: { type: 'string' },
  tls: { type: 'object', fields: TLS_OPTIONS },
  dpop: { type: 'object', fields: DPOP_OPTIONS },
}

/**
 * The RFC 6749 section 6 refresh_token grant, made natively with
 * `ctx.refreshToken`. A rotated refresh token comes back to the caller that
 * must persist it; a request that may have reached the server is never
 * resent.
 */
function oauth2Refresher(options) {
  return buildRefresher((o) => BindingRefresher.oauth2(o), 'oauth2Refresher', options, OAUTH2_OPTIONS, 'oauth2')
}

module.exports = { NATIVE_REFRESHER, CLIENT_CREDENTIALS, nativeRefresh, canRevoke, nativeRevoke, senderConstraint, tarabutRefresher, oauth2Refresher }
