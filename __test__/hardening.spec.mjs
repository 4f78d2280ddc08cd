// A hostile caller's and an operator's view: out-of-range expiries, a user
// wedged by a throw, strings too long to copy, a polluted Object.prototype,
// one invalidate() slowing everyone, a Retry-After no Instant can hold.
// Each case failed before the hardening that made it pass.
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest'
import { createRequire } from 'node:module'

import { TokenManager, TokenRefreshError, tarabutRefresher } from '../index.mjs'
import { PKG, runNode } from './helpers/node.mjs'
import { USER_ID_KEY, newKey, sleep, startRedis } from './helpers/redis.mjs'
import { startTarabutServer } from './helpers/tarabut-server.mjs'

const require = createRequire(import.meta.url)
const { MAX_TOKEN_BYTES, MAX_USER_ID_BYTES } = require('../binding.js')

const MIN = 60_000
const HOUR = 60 * MIN
const later = (ms) => new Date(Date.now() + ms)
let seq = 0
const uid = (name = 'user') => `${name}-${++seq}`
const expired = () => ({ accessToken: 'old', refreshToken: 'rt-0', expiresAt: Date.now() - 1_000 })
const good = () => vi.fn(async () => ({ accessToken: `fresh-${++seq}`, refreshToken: `rt-${seq}`, expiresIn: 3600 }))
/** An object that says it is a time, with whatever value. */
const claims = (ms) => ({ getTime: () => ms })

const outOfRange = [
  ['getTime() 1e300', () => claims(1e300)],
  ['getTime() -1e300', () => claims(-1e300)],
  ['1e300', () => 1e300],
  ['-1e300', () => -1e300],
  ['8.64e15 + 1', () => 8.64e15 + 1],
  ['NaN', () => Number.NaN],
  ['Infinity', () => Infinity],
]

describe('1. expiries a Date cannot hold', () => {
  it.each(outOfRange)('a refresh result expiring at %s is INVALID_REFRESH_RESULT and is not cached', async (_name, at) => {
    const m = new TokenManager()
    const user = uid()
    const err = await m.getValidToken(user, expired(), async () => ({ accessToken: 'forever', expiresAt: at() })).catch((e) => e)
    expect(err).toBeInstanceOf(TokenRefreshError)
    expect(err.code).toBe('INVALID_REFRESH_RESULT')
    const next = good()
    const r = await m.getValidToken(user, expired(), next)
    expect(next).toHaveBeenCalledTimes(1)
    expect(r.expiresAt).toBeInstanceOf(Date)
    expect(Number.isNaN(r.expiresAt.getTime())).toBe(false)
    expect(m.stats()).toMatchObject({ failures: 1, refreshes: 1 })
  })

  it.each(outOfRange)('a presented token expiring at %s is a TypeError naming token.expiresAt, and leaves nothing', async (_name, at) => {
    const m = new TokenManager()
    const refreshFn = good()
    const err = await m.getValidToken(uid(), { accessToken: 'a', expiresAt: at() }, refreshFn).catch((e) => e)
    expect(err).toBeInstanceOf(TypeError)
    expect(err.code).toBe('INVALID_ARGUMENT')
    expect(err.message).toMatch(/^token\.expiresAt /)
    expect(refreshFn).not.toHaveBeenCalled()
    expect(m.stats()).toMatchObject({ users: 0, inFlight: 0, hits: 0 })
  })

  it("a Date is read by its own time value: one whose getTime lies is not served as an Invalid Date", async () => {
    const m = new TokenManager()
    const invalid = new Date(Number.NaN)
    invalid.getTime = () => Date.now() + HOUR
    const err = await m.getValidToken(uid(), { accessToken: 'a', expiresAt: invalid }, good()).catch((e) => e)
    expect(err).toMatchObject({ code: 'INVALID_ARGUMENT' })
    // A Proxy of a Date has no time value of its own: a TypeError too, not a raw one.
    const proxied = new Proxy(later(HOUR), {})
    const err2 = await m.getValidToken(uid(), { accessToken: 'a', expiresAt: proxied }, good()).catch((e) => e)
    expect(err2).toBeInstanceOf(TypeError)
    expect(err2).toMatchObject({ code: 'INVALID_ARGUMENT' })
  })
})

describe('2. a user is never wedged', () => {
  it('a refreshFn whose property read throws fails that call (REFRESH_FAILED, with the cause); the next call refreshes', async () => {
    const m = new TokenManager()
    const user = uid()
    const trap = new Error('proxy trap')
    const proxy = new Proxy(async () => ({ accessToken: 'never', expiresIn: 3600 }), {
      get() {
        throw trap
      },
    })
    let promise
    expect(() => {
      promise = m.getValidToken(user, expired(), proxy)
    }).not.toThrow()
    const err = await promise.catch((e) => e)
    expect(err).toBeInstanceOf(TokenRefreshError)
    expect(err).toMatchObject({ code: 'REFRESH_FAILED', userId: user })
    expect(err.cause).toBe(trap)
    expect(m.stats()).toMatchObject({ inFlight: 0, failures: 1 })
    const next = good()
    await expect(m.getValidToken(user, expired(), next)).resolves.toMatchObject({ shouldUpdate: true })
    expect(next).toHaveBeenCalledTimes(1)
  })

  it('a refreshFn that rejects with a Proxy whose every read throws still fails with REFRESH_FAILED', async () => {
    const m = new TokenManager()
    const hostile = new Proxy(
      {},
      {
        get() {
          throw new Error('get')
        },
        getPrototypeOf() {
          throw new Error('getPrototypeOf')
        },
      },
    )
    const err = await m.getValidToken(uid(), expired(), () => Promise.reject(hostile)).catch((e) => e)
    expect(err).toMatchObject({ code: 'REFRESH_FAILED' })
    expect(err.cause).toBe(hostile)
    // Resolving with it reads its `then`, which throws: a failed refresh.
    const err2 = await m.getValidToken(uid(), expired(), async () => hostile).catch((e) => e)
    expect(err2).toMatchObject({ code: 'REFRESH_FAILED' })
    // A result that is no thenable but throws on every other read is unusable.
    const result = new Proxy(
      {},
      {
        get(_t, k) {
          if (k === 'then') return undefined
          throw new Error('get')
        },
      },
    )
    const err3 = await m.getValidToken(uid(), expired(), async () => result).catch((e) => e)
    expect(err3).toMatchObject({ code: 'INVALID_REFRESH_RESULT' })
    expect(m.stats().inFlight).toBe(0)
  })

  it('getters on the token that throw reject with a TypeError naming the token, the thrown value as cause', async () => {
    const m = new TokenManager()
    const thrown = new Error('getter')
    const token = {
      get accessToken() {
        throw thrown
      },
      expiresAt: later(HOUR),
    }
    const err = await m.getValidToken(uid(), token, good()).catch((e) => e)
    expect(err).toBeInstanceOf(TypeError)
    expect(err).toMatchObject({ code: 'INVALID_ARGUMENT' })
    expect(err.message).toMatch(/^token /)
    expect(err.cause).toBe(thrown)
  })
})

describe('3. strings are measured before they are copied', () => {
  it(`a user id, an access token or a refresh token far over its limit is refused without being copied`, async () => {
    // A child process, so the peak resident memory (VmHWM) is ours alone:
    // copying the 64 MB string into Rust would raise it by 64 MB.
    const script = `
      const fs = require('node:fs')
      const { TokenManager } = require(${JSON.stringify(PKG)})
      const peak = () => Number(/VmHWM:\\s+(\\d+)/.exec(fs.readFileSync('/proc/self/status', 'utf8'))[1]) * 1024
      // Flat (not a rope), as a string read from a request is.
      const huge = Buffer.alloc(64 * 1024 * 1024, 'x').toString('latin1')
      const m = new TokenManager()
      const fn = async () => ({ accessToken: 'n', expiresIn: 60 })
      ;(async () => {
        const before = peak()
        const seen = []
        const note = (e) => seen.push([e.constructor.name, e.code, e.message.slice(0, 80)])
        await m.getValidToken(huge, { accessToken: 'a', expiresAt: 0 }, fn).catch(note)
        await m.getValidToken('u', { accessToken: huge, expiresAt: 0 }, fn).catch(note)
        await m.getValidToken('u', { accessToken: 'a', refreshToken: huge, expiresAt: 0 }, fn).catch(note)
        try { m.invalidate(huge) } catch (e) { note(e) }
        try { m.invalidate('u', huge) } catch (e) { note(e) }
        console.log(JSON.stringify({ grewMb: (peak() - before) / 1048576, seen, users: m.stats().users }))
      })()`
    const r = await runNode(['-e', script])
    expect(r.err).toBe('')
    const { grewMb, seen, users } = JSON.parse(r.out)
    expect(seen).toEqual([
      ['TypeError', 'INVALID_ARGUMENT', `userId must be at most ${MAX_USER_ID_BYTES} bytes long (UTF-8)`],
      ['TypeError', 'INVALID_ARGUMENT', `token.accessToken must be at most ${MAX_TOKEN_BYTES} bytes long (UTF-8)`],
      ['TypeError', 'INVALID_ARGUMENT', `token.refreshToken must be at most ${MAX_TOKEN_BYTES} bytes long (UTF-8)`],
      ['TypeError', 'INVALID_ARGUMENT', `userId must be at most ${MAX_USER_ID_BYTES} bytes long (UTF-8)`],
      ['TypeError', 'INVALID_ARGUMENT', `accessToken must be at most ${MAX_TOKEN_BYTES} bytes long (UTF-8)`],
    ])
    expect(users).toBe(0)
    expect(grewMb).toBeLessThan(16)
  })

  it('tokens: 64 KiB is the limit, in UTF-8 bytes, for presented tokens and refresh results alike', async () => {
    expect(MAX_TOKEN_BYTES).toBe(65_536)
    const m = new TokenManager()
    const atLimit = 'a'.repeat(MAX_TOKEN_BYTES)
    const over = 'a'.repeat(MAX_TOKEN_BYTES + 1)
    // 21,846 three-byte characters: under the limit in UTF-16 units, over it in bytes.
    const overInBytes = '€'.repeat(21_846)
    const ok = await m.getValidToken(uid(), { accessToken: 'old', expiresAt: 0 }, async () => ({ accessToken: atLimit, refreshToken: atLimit, expiresIn: 60 }))
    expect(ok.accessToken).toBe(atLimit)
    expect((await m.getValidToken(uid(), { accessToken: atLimit, expiresAt: later(HOUR) }, good())).accessToken).toBe(atLimit)
    for (const bad of [over, overInBytes]) {
      for (const result of [{ accessToken: bad, expiresIn: 60 }, { accessToken: 'a', refreshToken: bad, expiresIn: 60 }]) {
        const err = await m.getValidToken(uid(), { accessToken: 'old', expiresAt: 0 }, async () => result).catch((e) => e)
        expect(err).toMatchObject({ code: 'INVALID_REFRESH_RESULT' })
        expect(err.message).toContain('65536 bytes')
      }
      const err = await m.getValidToken(uid(), { accessToken: bad, expiresAt: 0 }, good()).catch((e) => e)
      expect(err).toBeInstanceOf(TypeError)
      expect(err.message).toBe('token.accessToken must be at most 65536 bytes long (UTF-8)')
    }
    // Over the limit is never served, not even from the hot path, in units
    // or only in bytes.
    for (const bad of [over, overInBytes]) {
      const err = await m.getValidToken(uid(), { accessToken: bad, expiresAt: later(HOUR) }, good()).catch((e) => e)
      expect(err).toMatchObject({ code: 'INVALID_ARGUMENT', message: 'token.accessToken must be at most 65536 bytes long (UTF-8)' })
    }
  })

  it('user ids: 512 bytes is the limit, in UTF-8 bytes, on the hot path as on every other', async () => {
    expect(MAX_USER_ID_BYTES).toBe(512)
    const m = new TokenManager()
    const fresh = () => ({ accessToken: 'valid', expiresAt: later(HOUR) })
    // 512 one-byte, 256 two-byte and 170 three-byte characters (+ 2 bytes) fit.
    for (const id of ['a'.repeat(512), 'é'.repeat(256), '€'.repeat(170) + 'aa']) {
      expect(await m.getValidToken(id, fresh(), good())).toMatchObject({ accessToken: 'valid', shouldUpdate: false })
    }
    // 513 units; 200 three-byte characters (under the limit in units, 600 bytes); 10^6 units.
    for (const id of ['a'.repeat(513), '€'.repeat(200), 'x'.repeat(1_000_000)]) {
      const err = await m.getValidToken(id, fresh(), good()).catch((e) => e)
      expect(err).toBeInstanceOf(TypeError)
      expect(err).toMatchObject({ code: 'INVALID_ARGUMENT', message: 'userId must be at most 512 bytes long (UTF-8)' })
    }
    expect(m.stats().users).toBe(0)
  })
})

/** Setters (and getters) on Object.prototype for the answer fields: what a polluted realm looks like. */
function pollute() {
  const leaked = []
  const names = ['accessToken', 'expiresAt', 'refreshToken', 'shouldUpdate']
  for (const name of names) {
    Object.defineProperty(Object.prototype, name, {
      configurable: true,
      get() {
        return undefined
      },
      set(v) {
        leaked.push([name, v])
      },
    })
  }
  return {
    leaked,
    restore: () => names.forEach((name) => delete Object.prototype[name]),
  }
}

describe('4. a polluted Object.prototype sees no token, and answers keep their own fields', () => {
  let server
  beforeAll(async () => {
    server = await startTarabutServer({ expiresIn: 3600 })
  })
  afterAll(() => server?.close())

  it('hot path, refresh (leader and joiner), held token, native refresher', async () => {
    const m = new TokenManager({ doubleCheckWindowMs: 0 })
    const user = uid()
    const native = tarabutRefresher({ clientId: server.clientId, clientSecret: server.clientSecret, tokenUrl: server.tokenUrl })
    const refreshFn = async (ctx) => {
      await sleep(10)
      return { accessToken: `new-for-${ctx.refreshToken}`, refreshToken: 'rt-2', expiresAt: later(HOUR) }
    }
    const p = pollute()
    let answers
    try {
      const hot = await m.getValidToken(uid(), { accessToken: 'hot', expiresAt: later(HOUR) }, refreshFn)
      const [leader, joiner] = await Promise.all([
        m.getValidToken(user, { accessToken: 'old', refreshToken: 'rt-1', expiresAt: later(MIN) }, refreshFn),
        m.getValidToken(user, { accessToken: 'old', refreshToken: 'rt-1', expiresAt: later(MIN) }, refreshFn),
      ])
      const held = await m.getValidToken(user, { accessToken: 'old', refreshToken: 'rt-1', expiresAt: later(MIN) }, refreshFn)
      const nativeUser = uid('n')
      const fromNative = await m.getValidToken(nativeUser, { accessToken: 'old', expiresAt: 0 }, native)
      answers = { hot, leader, joiner, held, fromNative, nativeUser }
    } finally {
      p.restore()
    }
    expect(p.leaked).toEqual([])
    const { hot, leader, joiner, held, fromNative, nativeUser } = answers
    expect(Object.keys(hot).sort()).toEqual(['accessToken', 'expiresAt', 'shouldUpdate'])
    expect(hot).toMatchObject({ accessToken: 'hot', shouldUpdate: false })
    expect(leader).toMatchObject({ accessToken: 'new-for-rt-1', refreshToken: 'rt-2', shouldUpdate: true })
    expect(Object.hasOwn(leader, 'refreshToken')).toBe(true)
    expect(joiner).toMatchObject({ accessToken: 'new-for-rt-1', shouldUpdate: false })
    expect(held).toMatchObject({ accessToken: 'new-for-rt-1', refreshToken: 'rt-2', shouldUpdate: true })
    for (const a of [leader, joiner, held, fromNative]) {
      expect(Object.hasOwn(a, 'accessToken') && Object.hasOwn(a, 'expiresAt') && Object.hasOwn(a, 'shouldUpdate')).toBe(true)
      expect(a.expiresAt).toBeInstanceOf(Date)
    }
    expect(server.isCurrent(nativeUser, fromNative.accessToken)).toBe(true)
  })
})

describe('5. one invalidate() does not slow everyone else', () => {
  it("other users keep the hot path: no lookup, no per-user state; the invalidated token is still refused", async () => {
    const m = new TokenManager()
    const refreshFn = good()
    m.invalidate('invalidated', 'bad-token')
    expect(m.stats().users).toBe(1)
    // Before, every user's call after an invalidate was looked up in the
    // core (and so got an entry there).
    for (let i = 0; i < 50; i++) await m.getValidToken(`other-${i}`, { accessToken: 'ok', expiresAt: later(HOUR) }, refreshFn)
    expect(m.stats()).toMatchObject({ users: 1, hits: 50 })
    // The marked user's other tokens are still served, looked up.
    await expect(m.getValidToken('invalidated', { accessToken: 'another', expiresAt: later(HOUR) }, refreshFn)).resolves.toMatchObject({
      accessToken: 'another',
    })
    expect(refreshFn).not.toHaveBeenCalled()
    const r = await m.getValidToken('invalidated', { accessToken: 'bad-token', expiresAt: later(HOUR) }, refreshFn)
    expect(refreshFn).toHaveBeenCalledTimes(1)
    expect(r).toMatchObject({ shouldUpdate: true })
    expect(r.accessToken).not.toBe('bad-token')
  })

  it('the mark ends after idleTtlMs, as the core says', async () => {
    const m = new TokenManager({ idleTtlMs: 100 })
    const refreshFn = good()
    m.invalidate('u', 'bad-token')
    await sleep(150)
    await expect(m.getValidToken('u', { accessToken: 'bad-token', expiresAt: later(HOUR) }, refreshFn)).resolves.toMatchObject({
      accessToken: 'bad-token',
    })
    expect(refreshFn).not.toHaveBeenCalled()
  })
})

describe('6. a Retry-After no clock can hold', () => {
  let server
  beforeAll(async () => {
    server = await startTarabutServer({ expiresIn: 3600 })
  })
  afterAll(() => server?.close())

  it('Retry-After: 10000000000000000000 fails the refresh (REFRESH_FAILED, 429) without a panic; a still-valid token is served', async () => {
    server.inject({ status: 429, retryAfter: '10000000000000000000' }, { times: 2 })
    const script = `
      const { TokenManager, tarabutRefresher } = require(${JSON.stringify(PKG)})
      const r = tarabutRefresher(${JSON.stringify({ clientId: server.clientId, clientSecret: server.clientSecret, tokenUrl: server.tokenUrl })})
      const m = new TokenManager({ refreshTimeoutMs: 5000 })
      ;(async () => {
        const expired = await m.getValidToken('u1', { accessToken: 'old', expiresAt: Date.now() - 1000 }, r)
          .then(() => 'resolved', (e) => ({ code: e.code, status: e.status }))
        const stillValid = await m.getValidToken('u2', { accessToken: 'still-valid', expiresAt: Date.now() + 60000 }, r)
          .then((t) => t.accessToken, (e) => e.code)
        console.log(JSON.stringify({ expired, stillValid, staleServed: m.stats().staleServed }))
      })()`
    const r = await runNode(['-e', script])
    expect(r.err).not.toMatch(/panic/i)
    expect(r.err).toBe('')
    expect(JSON.parse(r.out)).toEqual({ expired: { code: 'REFRESH_FAILED', status: 429 }, stillValid: 'still-valid', staleServed: 1 })
  })
})

describe('with Redis', () => {
  let redis
  let key
  const managers = []
  const instance = (options = {}) => {
    const m = new TokenManager({ refreshTimeoutMs: 5_000, ...options, redis: { url: redis.url, encryptionKey: key, userIdKey: USER_ID_KEY, lockTtlMs: 60_000 } })
    managers.push(m)
    return m
  }
  beforeAll(async () => {
    redis = await startRedis()
    key = newKey()
  })
  afterAll(async () => {
    await Promise.all(managers.map((m) => m.close()))
    await redis?.stop()
  })

  it('1. an out-of-range expiry never reaches a script: the lock is freed at once and Redis stays up', async () => {
    const warned = []
    const onWarning = (w) => warned.push(w.code)
    process.on('warning', onWarning)
    try {
      const a = instance()
      const b = instance()
      const users = outOfRange.map(() => uid('redis'))
      for (const [i, [, at]] of outOfRange.entries()) {
        const err = await a.getValidToken(users[i], expired(), async () => ({ accessToken: 'forever', expiresAt: at() })).catch((e) => e)
        expect(err.code).toBe('INVALID_REFRESH_RESULT')
      }
      // The locks are released in the background: close() waits for that.
      const fallbacks = a.stats().redisFallbacks
      await a.close()
      // With a lock left held, b would wait out its 60 s TTL.
      const next = good()
      const started = Date.now()
      for (const user of users) await expect(b.getValidToken(user, expired(), next)).resolves.toMatchObject({ shouldUpdate: true })
      expect(next).toHaveBeenCalledTimes(users.length)
      expect(Date.now() - started).toBeLessThan(3_000)
      expect(fallbacks + b.stats().redisFallbacks).toBe(0)
      await sleep(50)
      expect(warned.filter((c) => String(c).startsWith('TTM_REDIS'))).toEqual([])
    } finally {
      process.off('warning', onWarning)
    }
  })

  it('3. a token at the 64 KiB limit is shared; one over it is refused, not silently kept local', async () => {
    const a = instance()
    const b = instance()
    const user = uid('redis')
    const big = 't'.repeat(MAX_TOKEN_BYTES)
    const r = await a.getValidToken(user, expired(), async () => ({ accessToken: big, refreshToken: 'rt-big', expiresIn: 3600 }))
    expect(r.accessToken).toBe(big)
    const other = good()
    await expect(b.getValidToken(user, expired(), other)).resolves.toMatchObject({ accessToken: big })
    expect(other).not.toHaveBeenCalled()
    const err = await a.getValidToken(uid('redis'), expired(), async () => ({ accessToken: `${big}x`, expiresIn: 3600 })).catch((e) => e)
    expect(err.code).toBe('INVALID_REFRESH_RESULT')
  })

  it('4. a token adopted from another instance reaches no setter on Object.prototype', async () => {
    const a = instance()
    const b = instance()
    const user = uid('redis')
    await a.getValidToken(user, expired(), async () => ({ accessToken: 'shared-token', refreshToken: 'shared-rt', expiresIn: 3600 }))
    await sleep(100)
    const p = pollute()
    let adopted
    try {
      adopted = await b.getValidToken(user, expired(), good())
    } finally {
      p.restore()
    }
    expect(p.leaked).toEqual([])
    expect(adopted).toMatchObject({ accessToken: 'shared-token', refreshToken: 'shared-rt', shouldUpdate: true })
  })
})
