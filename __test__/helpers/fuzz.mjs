// Property-based run (fast-check) over every argument of every export, in a
// process of its own so that properties.spec.mjs sees its exit status and
// everything it writes to stderr (a Rust panic prints there).
//
// For each export, `runs` arbitrary calls: wrong types, huge and empty
// strings, odd Unicode, NaN and Infinity, objects whose getters throw,
// Proxies whose every trap throws. Every call must give a valid answer or
// an error with a stable `code`; getValidToken must never throw
// synchronously. Unhandled rejections and uncaught exceptions are counted.
// Prints one JSON line: { runs, failures, unhandled }.
//
// Usage: node fuzz.mjs [runs per export]
import http from 'node:http'

import fc from 'fast-check'

import { TokenManager, getValidToken, oauth2Refresher, tarabutRefresher } from '../../index.mjs'

const RUNS = Number(process.argv[2] ?? 3000)
const CODES = new Set([
  'INVALID_ARGUMENT',
  'REFRESH_FAILED',
  'REFRESH_TIMEOUT',
  'INVALID_REFRESH_RESULT',
  'REAUTH_REQUIRED',
  'INVALID_CLIENT',
  'COORDINATOR_UNAVAILABLE',
  'INTERNAL',
])
const HOUR = 3_600_000
const failures = []
let unhandled = 0
process.on('unhandledRejection', (e) => {
  unhandled++
  failures.push(`unhandled rejection: ${describe(e)}`)
})
process.on('uncaughtException', (e) => {
  unhandled++
  failures.push(`uncaught exception: ${describe(e)}`)
})

function describe(e) {
  try {
    return e instanceof Error ? `${e.constructor.name} ${e.code ?? ''}: ${e.message}` : typeof e
  } catch {
    return 'a value that cannot be described'
  }
}

// --- Hostile values -------------------------------------------------------

const thrower = (what) => () => {
  throw new Error(`hostile ${what}`)
}
/** A Proxy whose every trap throws. */
const trapAll = (target) =>
  new Proxy(target, {
    get: thrower('get'),
    has: thrower('has'),
    ownKeys: thrower('ownKeys'),
    getPrototypeOf: thrower('getPrototypeOf'),
    getOwnPropertyDescriptor: thrower('getOwnPropertyDescriptor'),
    apply: thrower('apply'),
    construct: thrower('construct'),
  })
const revoked = () => {
  const r = Proxy.revocable({}, {})
  r.revoke()
  return r.proxy
}
const getters = (names) => Object.defineProperties({}, Object.fromEntries(names.map((n) => [n, { get: thrower(`getter ${n}`), enumerable: true }])))
/** Answers differently on every read: a check and a use must read once. */
const shifty = (values) => {
  let i = 0
  return () => values[i++ % values.length]
}
const lyingDate = (ms) => {
  const d = new Date(Number.NaN)
  d.getTime = () => ms
  return d
}

/**
 * A hostile value, made only inside a property: fast-check inspects the
 * values it generates (to clone, shrink and print them), and a Proxy whose
 * every trap throws would break fast-check before it reached the package.
 */
class Hostile {
  constructor(make) {
    this.make = make
  }
  [fc.toStringMethod]() {
    return `Hostile(${this.make.toString().slice(0, 60)})`
  }
}

/** `v` with every Hostile in it (in plain objects and arrays) made. */
function materialize(v, depth = 0) {
  if (v instanceof Hostile) return v.make()
  if (depth > 4 || v === null || typeof v !== 'object') return v
  if (Array.isArray(v)) return v.map((x) => materialize(x, depth + 1))
  const proto = Object.getPrototypeOf(v)
  if (proto !== Object.prototype && proto !== null) return v
  const out = Object.create(proto)
  for (const key of Object.keys(v)) {
    Object.defineProperty(out, key, { value: materialize(v[key], depth + 1), enumerable: true, writable: true, configurable: true })
  }
  return out
}

const huge = 'x'.repeat(70_000)
const hostileValue = fc.constantFrom(
  () => trapAll({}),
  () => trapAll(() => {}),
  () => revoked(),
  () => getters(['accessToken', 'expiresAt', 'refreshToken', 'expiresIn', 'userId', 'signal', 'then']),
  () => new Proxy(new Date(), {}),
  () => new Date(Number.NaN),
  () => lyingDate(Date.now() + HOUR),
  () => ({ getTime: () => 1e300 }),
  () => ({ getTime: thrower('getTime') }),
  () => Object.create(Date.prototype),
  () => ({
    get accessToken() {
      return shifty(['a', 42])()
    },
    expiresAt: Date.now() + HOUR,
  }),
)
const oddString = fc.oneof(
  fc.string({ unit: 'grapheme', maxLength: 40 }),
  fc.string({ unit: 'binary', maxLength: 40 }),
  fc.constantFrom('', ' ', '\uD800', '\uDFFF', 'a\u0000b', '\u202Eevil', '👩‍👩‍👧', 'x'.repeat(513), 'é'.repeat(300), huge, `${huge}€`, '2026-01-25T21:14:28Z'),
)
const oddNumber = fc.oneof(
  fc.double(),
  fc.integer(),
  fc.constantFrom(Number.NaN, Infinity, -Infinity, 1e300, -1e300, 8.64e15, 8.64e15 + 1, -0, 2 ** 53, 2 ** 31, -1),
)
/** Anything at all. */
const anything = fc.oneof(
  { arbitrary: fc.anything({ withBigInt: true, withDate: true, withMap: true, withSet: true, withTypedArray: true, withNullPrototype: true }), weight: 3 },
  { arbitrary: oddString, weight: 2 },
  { arbitrary: oddNumber, weight: 2 },
  { arbitrary: fc.constantFrom(null, undefined, true, Symbol('s'), 10n, () => {}, []), weight: 1 },
  { arbitrary: hostileValue.map((make) => new Hostile(make)), weight: 2 },
)

// --- Arguments, mostly well-formed with something wrong -------------------

const tokenString = fc.oneof({ arbitrary: fc.string({ minLength: 1, maxLength: 30 }), weight: 4 }, { arbitrary: oddString, weight: 1 })
const expiresAt = fc.oneof(
  fc.integer({ min: -2 * HOUR, max: 2 * HOUR }).map((d) => new Date(Date.now() + d)),
  fc.integer({ min: -2 * HOUR, max: 2 * HOUR }).map((d) => Date.now() + d),
  fc.integer({ min: -2 * HOUR, max: 2 * HOUR }).map((d) => new Date(Date.now() + d).toISOString()),
  fc.date({ noInvalidDate: false }),
  anything,
)
const token = fc.oneof(
  { arbitrary: fc.record({ accessToken: tokenString, refreshToken: fc.option(tokenString), expiresAt }), weight: 4 },
  { arbitrary: fc.record({ accessToken: fc.oneof(tokenString, anything), refreshToken: anything, expiresAt }, { requiredKeys: [] }), weight: 2 },
  { arbitrary: anything, weight: 1 },
)
const refreshResult = fc.oneof(
  { arbitrary: fc.record({ accessToken: tokenString, refreshToken: fc.option(tokenString), expiresIn: fc.oneof(fc.integer({ min: 1, max: 7200 }), oddNumber) }), weight: 3 },
  { arbitrary: fc.record({ accessToken: tokenString, refreshToken: fc.option(fc.oneof(tokenString, anything)), expiresAt }), weight: 3 },
  {
    arbitrary: fc.record(
      { accessToken: fc.oneof(tokenString, anything), refreshToken: anything, expiresAt: anything, expiresIn: fc.oneof(oddNumber, anything) },
      { requiredKeys: [] },
    ),
    weight: 2,
  },
  { arbitrary: anything, weight: 1 },
)
const hang = () => new Promise(() => {})
// Refresh functions as recipes, made by `makeRefreshFn` inside a property.
const anyRefreshFn = fc.oneof(
  { arbitrary: refreshResult.map((r) => ({ async: r })), weight: 4 },
  { arbitrary: refreshResult.map((r) => ({ sync: r })), weight: 2 },
  { arbitrary: anything.map((e) => ({ reject: e })), weight: 1 },
  { arbitrary: anything.map((e) => ({ throw: e })), weight: 1 },
  { arbitrary: fc.constantFrom({ hang: true }, { proxy: true }), weight: 1 },
  { arbitrary: anything.map((v) => ({ value: v })), weight: 1 },
)

/** Refresh functions that settle by themselves (no hang: the singleton waits 30 s for those). */
const settlingRefreshFn = anyRefreshFn.filter((r) => !('hang' in r))

function makeRefreshFn(recipe) {
  if ('async' in recipe) return async () => materialize(recipe.async)
  if ('sync' in recipe) return () => materialize(recipe.sync)
  if ('reject' in recipe) return () => Promise.reject(materialize(recipe.reject))
  if ('throw' in recipe)
    return () => {
      throw materialize(recipe.throw)
    }
  if ('hang' in recipe) return hang
  if ('proxy' in recipe) return trapAll(async () => ({ accessToken: 'a', expiresIn: 60 }))
  return materialize(recipe.value)
}
const userId = fc.oneof({ arbitrary: fc.string({ minLength: 1, maxLength: 20 }), weight: 3 }, { arbitrary: fc.constantFrom('u1', 'u2', 'u3'), weight: 2 }, { arbitrary: anything, weight: 1 })
const duration = fc.oneof(fc.integer({ min: 0, max: 600_000 }), oddNumber, anything)
const managerOptions = fc.oneof(
  fc.record({ bufferTimeMs: duration, doubleCheckWindowMs: duration, refreshTimeoutMs: duration, idleTtlMs: duration }, { requiredKeys: [] }),
  fc.record(
    {
      redis: fc.oneof(
        anything,
        fc.record(
          { url: fc.oneof(oddString, fc.constantFrom('redis://127.0.0.1:1', 'redis://:pw@127.0.0.1:1/0')), encryptionKey: fc.oneof(oddString, anything), keyPrefix: anything, lockTtlMs: duration, onError: anything },
          { requiredKeys: [] },
        ),
      ),
    },
    { requiredKeys: [] },
  ),
  anything,
)

// --- Checks ---------------------------------------------------------------

/** A rejection or throw must carry one of our stable codes. */
function coded(e, where) {
  let ok = false
  try {
    ok = e instanceof Error && CODES.has(e.code)
  } catch {}
  if (!ok) throw new Error(`${where}: threw without a stable code: ${describe(e)}`)
}

function validAnswer(v, where) {
  const ok =
    v !== null &&
    typeof v === 'object' &&
    Object.hasOwn(v, 'accessToken') &&
    typeof v.accessToken === 'string' &&
    v.accessToken.length > 0 &&
    typeof v.shouldUpdate === 'boolean' &&
    v.expiresAt instanceof Date &&
    Number.isFinite(Date.prototype.getTime.call(v.expiresAt)) &&
    (v.refreshToken === undefined || v.refreshToken === null || typeof v.refreshToken === 'string')
  if (!ok) throw new Error(`${where}: not a valid answer`)
}

/** `promise`'s outcome; a rejection must be coded, or be `allowed` (an abort reason). */
async function settles(promise, where, allowed = undefined) {
  if (!(promise instanceof Promise)) throw new Error(`${where}: did not return a promise`)
  try {
    return { value: await promise }
  } catch (e) {
    if (allowed === undefined || e !== allowed) coded(e, where)
    return { error: e }
  }
}

/** The reason of `ctx.signal` if it is an aborted AbortSignal: what a refresh function rejects with, as fetch does. */
function abortReason(ctx) {
  try {
    return ctx.signal instanceof AbortSignal && ctx.signal.aborted ? ctx.signal.reason : undefined
  } catch {
    return undefined
  }
}

/** A token endpoint on loopback answering each request with the next of a few shapes. */
async function tokenEndpoint() {
  const answers = [
    [200, '{"accessToken":"at","expiresIn":3600,"access_token":"at","expires_in":3600,"refresh_token":"rt2"}'],
    [400, '{"error":"invalid_grant"}'],
    [401, '{"error":"invalid_client"}'],
    [429, '{}', { 'retry-after': '10000000000000000000' }],
    [500, 'not json'],
    [200, '{"accessToken":""}'],
    [200, '<html>'],
  ]
  let n = 0
  const server = http.createServer((req, res) => {
    req.resume()
    req.on('end', () => {
      const [status, body, headers = {}] = answers[n++ % answers.length]
      res.writeHead(status, { 'content-type': 'application/json', ...headers })
      res.end(body)
    })
  })
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  return { url: `http://127.0.0.1:${server.address().port}/token`, close: () => new Promise((r) => server.close(r)) }
}

// --- Properties -----------------------------------------------------------

const timings = {}
async function check(name, property) {
  const started = performance.now()
  try {
    await fc.assert(property, { numRuns: RUNS })
  } catch (e) {
    // The counterexample can be huge (a 70 KB string): keep its head, and
    // the cause fast-check appends at the end.
    const text = `${e?.message ?? e}${e?.cause ? ` (cause: ${describe(e.cause)})` : ''}`
    failures.push(`${name}: ${text.length > 3000 ? `${text.slice(0, 1500)} … ${text.slice(-1500)}` : text}`)
  }
  timings[name] = Math.round(performance.now() - started)
}

const endpoint = await tokenEndpoint()
const fast = { refreshTimeoutMs: 50, bufferTimeMs: 60_000 }
const shared = new TokenManager(fast)

await check(
  'TokenManager.getValidToken',
  fc.asyncProperty(userId, token, anyRefreshFn, fc.boolean(), async (u0, t0, recipe, fresh) => {
    const [u, t, fn] = [materialize(u0), materialize(t0), makeRefreshFn(recipe)]
    const m = fresh ? new TokenManager(fast) : shared
    let p
    try {
      p = m.getValidToken(u, t, fn)
    } catch (e) {
      throw new Error(`getValidToken threw synchronously: ${describe(e)}`)
    }
    const r = await settles(p, 'getValidToken')
    if ('value' in r) validAnswer(r.value, 'getValidToken')
  }),
)

await check(
  'getValidToken (the singleton)',
  fc.asyncProperty(userId, token, settlingRefreshFn, async (u0, t0, recipe) => {
    const [u, t, fn] = [materialize(u0), materialize(t0), makeRefreshFn(recipe)]
    let p
    try {
      p = getValidToken(u, t, fn)
    } catch (e) {
      throw new Error(`getValidToken threw synchronously: ${describe(e)}`)
    }
    const r = await settles(p, 'getValidToken')
    if ('value' in r) validAnswer(r.value, 'getValidToken')
  }),
)

await check(
  'invalidate, then getValidToken',
  fc.asyncProperty(userId, fc.oneof(fc.constant(undefined), tokenString, anything), token, async (u0, access0, t0) => {
    const [u, access, t] = [materialize(u0), materialize(access0), materialize(t0)]
    try {
      shared.invalidate(u, access)
    } catch (e) {
      coded(e, 'invalidate')
      if (!(e instanceof TypeError)) throw new Error('invalidate: not a TypeError')
    }
    const r = await settles(shared.getValidToken(u, t, async () => ({ accessToken: 'after', expiresIn: 3600 })), 'getValidToken after invalidate')
    if ('value' in r) validAnswer(r.value, 'getValidToken after invalidate')
  }),
)

await check(
  'new TokenManager(options)',
  fc.asyncProperty(managerOptions, async (o0) => {
    const o = materialize(o0)
    let m
    try {
      m = new TokenManager(o)
    } catch (e) {
      coded(e, 'TokenManager')
      if (!(e instanceof TypeError || e instanceof RangeError)) throw new Error('TokenManager: not a TypeError or RangeError')
      return
    }
    await m.close()
  }),
)

const refresherOptions = (tokenUrl) =>
  fc.oneof(
    fc.record({
      clientId: fc.string({ minLength: 1, maxLength: 10 }),
      clientSecret: fc.string({ minLength: 1, maxLength: 10 }),
      tokenUrl: fc.constant(tokenUrl),
      maxRetries: fc.constant(0),
      authMethod: fc.constantFrom('client_secret_basic', 'client_secret_post'),
    }),
    fc.record({ clientId: anything, clientSecret: anything, tokenUrl: fc.oneof(oddString, anything), scope: anything, timeoutMs: duration, maxRetries: duration, authMethod: anything }, { requiredKeys: [] }),
    anything,
  )
const ctx = fc.oneof(
  fc.record({ userId: fc.string({ minLength: 1, maxLength: 40 }).filter((s) => /^[!-~]+$/.test(s)), refreshToken: fc.option(tokenString) }),
  fc.record({ userId: anything, refreshToken: anything, signal: fc.oneof(anything, fc.constant(new Hostile(() => AbortSignal.abort()))) }, { requiredKeys: [] }),
  anything,
)

for (const [name, make] of [
  ['tarabutRefresher', tarabutRefresher],
  ['oauth2Refresher', oauth2Refresher],
]) {
  await check(
    `${name}(options), called as a refreshFn and through getValidToken`,
    fc.asyncProperty(refresherOptions(endpoint.url), ctx, userId, async (o0, c0, u0) => {
      const [o, c, u] = [materialize(o0), materialize(c0), materialize(u0)]
      let fn
      try {
        fn = make(forRefresher(name, o))
      } catch (e) {
        coded(e, name)
        return
      }
      const direct = await settles(fn(c), `${name} called directly`, abortReason(c))
      if ('value' in direct && (typeof direct.value?.accessToken !== 'string' || typeof direct.value?.expiresIn !== 'number')) {
        throw new Error(`${name}: not a refresh result`)
      }
      const r = await settles(shared.getValidToken(u, { accessToken: 'old', refreshToken: 'rt', expiresAt: 0 }, fn), `getValidToken with ${name}`)
      if ('value' in r) validAnswer(r.value, `getValidToken with ${name}`)
    }),
  )
}

/** The well-formed options, with only the keys `name` knows. */
function forRefresher(name, o) {
  try {
    if (o === null || typeof o !== 'object' || o.tokenUrl !== endpoint.url) return o
  } catch {
    return o
  }
  const { authMethod, maxRetries, ...rest } = o
  return name === 'tarabutRefresher' ? { ...rest, maxRetries } : { ...rest, authMethod }
}

await endpoint.close()
// Stragglers (late results after a timeout) get a moment to misbehave.
await new Promise((r) => setTimeout(r, 200))
console.log(JSON.stringify({ runs: RUNS, failures, unhandled, timings }))
