// Cross-instance coordination on Redis (docs/redis.md), with a real
// redis-server on a random loopback port, started and stopped here.
// "Instances" are worker processes (helpers/redis-worker.mjs) or, where a
// process boundary adds nothing, separate TokenManagers in this process:
// each has its own engine and its own Redis connection.
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest'
import { randomBytes } from 'node:crypto'
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'

import { TokenManager, TokenRefreshError, tarabutRefresher } from '../index.mjs'
import { USER_ID_KEY, cli, monitor, newKey, sleep, startProvider, startRedis, startWorker } from './helpers/redis.mjs'

const pkg = fileURLToPath(new URL('..', import.meta.url))
const MIN = 60_000
let seq = 0
const uid = (name = 'user') => `${name}-${++seq}`
const expired = (u) => ({ accessToken: `old-${u}`, refreshToken: `r0-${u}`, expiresAt: Date.now() - 1_000 })

/** Collects this process's warnings with a given code. */
function warnings(code) {
  const seen = []
  const on = (w) => w.code === code && seen.push(w.message)
  process.on('warning', on)
  return { seen, off: () => process.off('warning', on) }
}

let redis
let key
const managers = []
/** A manager ("instance") on the shared Redis; closed after each test. */
function instance(redisOptions = {}, options = {}) {
  const m = new TokenManager({ bufferTimeMs: MIN, ...options, redis: { url: redis.url, encryptionKey: key, userIdKey: USER_ID_KEY, ...redisOptions } })
  managers.push(m)
  return m
}
/** A refresh function counting its runs; tokens unique per run. */
function refresher({ delayMs = 0, fail } = {}) {
  const fn = vi.fn(async (ctx) => {
    if (delayMs) await sleep(delayMs)
    if (fail) throw fail
    return { accessToken: `at-${ctx.userId}-${fn.mock.calls.length}-${Math.random()}`, refreshToken: `rt-${ctx.userId}-${Math.random()}`, expiresIn: 3600 }
  })
  return fn
}

/**
 * A refresh function that has Redis hold `mode` commands ('WRITE' or 'ALL')
 * for `ms` from the moment it returns (CLIENT PAUSE), then calls `returning`.
 */
function holdingRedis(ms, mode, returning = () => {}) {
  return vi.fn(async (ctx) => {
    await cli(redis.port, 'client', 'pause', String(ms), mode)
    returning()
    return { accessToken: `at-${ctx.userId}`, refreshToken: `rt-${ctx.userId}`, expiresIn: 3600 }
  })
}
/** Keys under `keyPrefix` of one kind ('tok' or 'lock'). */
async function keysOf(keyPrefix, kind) {
  return (await cli(redis.port, '--scan', '--pattern', `${keyPrefix}${kind}:*`)).split('\n').filter(Boolean)
}

beforeAll(async () => {
  redis = await startRedis()
  key = newKey()
})
afterEach(async () => {
  await Promise.all(managers.splice(0).map((m) => m.close()))
})
afterAll(async () => {
  await redis?.stop()
})

describe('one refresh per user across every instance', () => {
  it('4 processes × 30 users, each calling twice at once: exactly 30 refreshes, one caller per user persists', async () => {
    const N = 4
    const M = 30
    // Slow enough that every instance asks while the refresh runs, even on
    // a loaded machine (one asking after it would rightly get shouldUpdate).
    const provider = await startProvider({ delayMs: 1_500 })
    try {
      const userPrefix = `${uid('fleet')}-`
      const workers = Array.from({ length: N }, () =>
        startWorker({ redisUrl: redis.url, key, providerUrl: provider.url, userPrefix, userCount: M, callsPerUser: 2 }),
      )
      await Promise.all(workers.map((w) => w.ready))
      workers.forEach((w) => w.go())
      const done = await Promise.all(workers.map((w) => w.done))

      expect(provider.stats).toEqual({ requests: M, refreshes: M, rejected: 0 })
      expect(done.reduce((n, d) => n + d.stats.refreshes, 0)).toBe(M)
      expect(done.every((d) => d.stats.redisFallbacks === 0)).toBe(true)
      const results = done.flatMap((d) => d.results)
      expect(results.filter((r) => r.error)).toEqual([])
      for (let i = 0; i < M; i++) {
        const user = `${userPrefix}${i}`
        const mine = results.filter((r) => r.user === user)
        expect(mine).toHaveLength(N * 2)
        expect(new Set(mine.map((r) => r.accessToken)).size).toBe(1)
        const persisting = mine.filter((r) => r.shouldUpdate)
        expect(persisting).toHaveLength(1)
        // The one told to persist also gets the rotated refresh token.
        expect(persisting[0].refreshToken).toBe(provider.user(user).current)
      }
      expect((await Promise.all(workers.map((w) => w.exited))).every((e) => e.code === 0)).toBe(true)
    } finally {
      await provider.close()
    }
  })

  it('a lock holder killed mid-refresh delays the others by at most lockTtlMs, then one of them refreshes', async () => {
    const lockTtlMs = 1_000
    const provider = await startProvider()
    try {
      const user = uid('victim')
      provider.hold(user) // the first refresh request never gets an answer
      const config = { redisUrl: redis.url, key, providerUrl: provider.url, users: [user], lockTtlMs, refreshTimeoutMs: 20_000 }
      const holder = startWorker(config)
      await holder.ready
      holder.go()
      while (provider.user(user).requests === 0) await sleep(10)
      const other = startWorker(config)
      await other.ready
      other.go()
      await sleep(300) // the other instance is now waiting on the lock
      const killedAt = Date.now()
      holder.kill()
      expect((await holder.exited).signal).toBe('SIGKILL')

      const { results } = await other.done
      expect(results).toEqual([{ user, accessToken: expect.stringMatching(/^at-1-/), shouldUpdate: true, refreshToken: provider.user(user).current }])
      expect(provider.user(user)).toMatchObject({ requests: 2, refreshes: 1 })
      // It refreshed once the dead holder's lock ran out (the holder had
      // extended it at most lockTtlMs/3 before dying), not at refreshTimeoutMs.
      const retriedAfter = provider.seen.filter((s) => s.user === user)[1].at - killedAt
      expect(retriedAfter).toBeLessThan(lockTtlMs + 4_000)
    } finally {
      await provider.close()
    }
  })

  it('a caller presenting an older token than the shared one gets it with shouldUpdate (a lost write heals), no refresh', async () => {
    const a = instance()
    const b = instance()
    const user = uid()
    const first = refresher()
    const t1 = await a.getValidToken(user, expired(user), first)
    expect(t1.shouldUpdate).toBe(true)

    const second = refresher()
    const t2 = await b.getValidToken(user, expired(user), second)
    expect(second).not.toHaveBeenCalled()
    expect(t2).toEqual({ accessToken: t1.accessToken, shouldUpdate: true, expiresAt: t1.expiresAt, refreshToken: t1.refreshToken })
    expect(b.stats()).toMatchObject({ refreshes: 0, hits: 1 })
    // Its engine now holds it too: the next stale caller there needs no Redis.
    const t3 = await b.getValidToken(user, expired(user), second)
    expect(t3).toMatchObject({ accessToken: t1.accessToken, shouldUpdate: true })
    expect(first).toHaveBeenCalledTimes(1)
  })

  it('the refreshing caller is answered only once Redis holds the token and the lock is free', async () => {
    // Redis holds writes for 500 ms from the moment the refresh returns: an
    // answer before the write would leave the next caller elsewhere (or an
    // invalidate) racing it.
    const keyPrefix = `answered-${uid()}:`
    const a = instance({ keyPrefix })
    const user = uid()
    const pausing = holdingRedis(500, 'WRITE')
    const t = await a.getValidToken(user, expired(user), pausing)
    expect(await keysOf(keyPrefix, 'tok')).toHaveLength(1)
    expect(await keysOf(keyPrefix, 'lock')).toEqual([])
    expect(t).toMatchObject({ accessToken: `at-${user}`, shouldUpdate: true })
    const unused = refresher()
    const b = instance({ keyPrefix })
    expect(await b.getValidToken(user, expired(user), unused)).toMatchObject({ accessToken: t.accessToken, shouldUpdate: true })
    expect(unused).not.toHaveBeenCalled()
    expect(pausing).toHaveBeenCalledTimes(1)
  })

  it('an invalidate from a caller served while the write was on its way comes after the write: no instance adopts the token', async () => {
    const keyPrefix = `served-${uid()}:`
    const a = instance({ keyPrefix })
    const user = uid()
    let refreshed
    const inside = new Promise((resolve) => (refreshed = resolve))
    const leading = a.getValidToken(user, expired(user), holdingRedis(500, 'WRITE', () => setTimeout(refreshed, 50)))
    await inside // the engine holds the token; its write waits on Redis
    const served = await a.getValidToken(user, expired(user), refresher())
    expect(served.accessToken).toBe(`at-${user}`)
    a.invalidate(user, served.accessToken) // its API answered 401
    await leading
    await a.close() // waits for its Redis work
    const fresh = refresher()
    const later = instance({ keyPrefix })
    expect((await later.getValidToken(user, expired(user), fresh)).accessToken).not.toBe(served.accessToken)
    expect(fresh).toHaveBeenCalledTimes(1)
  })

  it('a Redis that holds every command still answers the refreshing caller within about a second; the token reaches Redis once it is back', async () => {
    const keyPrefix = `stalled-${uid()}:`
    const w = warnings('TTM_REDIS_UNAVAILABLE')
    try {
      const a = instance({ keyPrefix })
      await a.getValidToken(uid(), expired('warm'), refresher()) // connected
      const user = uid()
      let refreshedAt
      const t = await a.getValidToken(user, expired(user), holdingRedis(4000, 'ALL', () => (refreshedAt = Date.now())))
      const waited = Date.now() - refreshedAt
      expect(t).toMatchObject({ accessToken: `at-${user}`, shouldUpdate: true, refreshToken: `rt-${user}` })
      expect(waited).toBeLessThan(3_000) // the command timeout (1 s), not the pause (4 s)
      while ((await keysOf(keyPrefix, 'tok')).length === 0) await sleep(100)
      const unused = refresher()
      const b = instance({ keyPrefix })
      expect(await b.getValidToken(user, expired(user), unused)).toMatchObject({ accessToken: t.accessToken, shouldUpdate: true })
      expect(unused).not.toHaveBeenCalled()
    } finally {
      w.off()
    }
  })

  it('callers waiting on another instance get its token with shouldUpdate false, or its failure', async () => {
    const a = instance()
    const b = instance()
    const user = uid()
    const slow = refresher({ delayMs: 1_000 })
    const leading = a.getValidToken(user, expired(user), slow)
    await sleep(100)
    const unused = refresher()
    const waiting = await b.getValidToken(user, expired(user), unused)
    expect(waiting.shouldUpdate).toBe(false)
    expect(waiting.accessToken).toBe((await leading).accessToken)
    expect(unused).not.toHaveBeenCalled()
    expect(b.stats()).toMatchObject({ refreshes: 0, coalesced: 1 })

    const other = uid()
    const failing = a.getValidToken(other, expired(other), refresher({ delayMs: 1_000, fail: new Error('provider down') }))
    await sleep(100)
    const waited = b.getValidToken(other, expired(other), unused)
    await expect(failing).rejects.toMatchObject({ code: 'REFRESH_FAILED' })
    await expect(waited).rejects.toMatchObject({ name: 'TokenRefreshError', code: 'REFRESH_FAILED' })
    expect(unused).not.toHaveBeenCalled()
    // The lock was released with the failure: the next call refreshes at once.
    const retry = refresher()
    await expect(b.getValidToken(other, expired(other), retry)).resolves.toMatchObject({ shouldUpdate: true })
    expect(retry).toHaveBeenCalledTimes(1)
  })

  it('a token marked bad with invalidate() is not taken from the shared cache', async () => {
    const a = instance()
    const user = uid()
    const t1 = await a.getValidToken(user, expired(user), refresher())
    a.invalidate(user, t1.accessToken) // the API answered 401
    const again = refresher()
    const t2 = await a.getValidToken(user, { accessToken: t1.accessToken, expiresAt: t1.expiresAt }, again)
    expect(again).toHaveBeenCalledTimes(1)
    expect(t2.accessToken).not.toBe(t1.accessToken)
    expect(t2.shouldUpdate).toBe(true)
  })

  it('the hot path sends Redis nothing; a refresh sends two commands', async () => {
    const m = instance()
    await m.getValidToken(uid(), expired('warm'), refresher()) // connect, subscribe, load scripts
    await sleep(100)
    const user = uid()
    let mon = await monitor(redis.port)
    const t = await m.getValidToken(user, expired(user), refresher())
    await sleep(100) // MONITOR output arrives on its own socket
    const refresh = await mon.stop()
    expect(refresh.names).toEqual(['evalsha', 'evalsha']) // read-or-lock, then write+publish+unlock

    mon = await monitor(redis.port)
    for (let i = 0; i < 1_000; i++) await m.getValidToken(user, { accessToken: t.accessToken, expiresAt: t.expiresAt }, refresher())
    expect((await mon.stop()).sent).toEqual([])
  })

  it('a value sealed with another key is a cache miss: refreshed, warned once, never a crash', async () => {
    const w = warnings('TTM_REDIS_UNDECRYPTABLE')
    try {
      const user = uid()
      const a = instance()
      await a.getValidToken(user, expired(user), refresher())
      const otherKey = newKey()
      const b = instance({ encryptionKey: otherKey })
      const refreshB = refresher()
      const tb = await b.getValidToken(user, expired(user), refreshB)
      expect(refreshB).toHaveBeenCalledTimes(1)
      expect(tb.shouldUpdate).toBe(true)
      const user2 = uid()
      await a.getValidToken(user2, expired(user2), refresher())
      await b.getValidToken(user2, expired(user2), refreshB)
      expect(w.seen).toHaveLength(1)
      expect(w.seen[0]).not.toContain(key)
      // b's write replaced a's (a newer fence): b's key reads it now.
      const c = instance({ encryptionKey: otherKey })
      const refreshC = refresher()
      await expect(c.getValidToken(user, expired(user), refreshC)).resolves.toMatchObject({ accessToken: tb.accessToken })
      expect(refreshC).not.toHaveBeenCalled()
    } finally {
      w.off()
    }
  })

  it('keys and values hold no token and no user id in clear, nor does the channel', async () => {
    const provider = await startProvider()
    const sub = spawn('redis-cli', ['-p', String(redis.port), 'subscribe', 'clear:refreshed'], { stdio: ['ignore', 'pipe', 'ignore'] })
    let published = ''
    sub.stdout.on('data', (d) => (published += d.toString('latin1')))
    try {
      while (!published.includes('subscribe')) await sleep(10)
      const m = instance({ keyPrefix: 'clear:' })
      const users = [uid('alice@example.com'), uid('bob'), uid('carol')]
      const refresh = async (ctx) => {
        const res = await fetch(provider.url, { method: 'POST', body: JSON.stringify({ user: ctx.userId, refreshToken: ctx.refreshToken }) })
        return res.json()
      }
      for (const u of users) await m.getValidToken(u, expired(u), refresh)
      const failing = uid('dave')
      await m.getValidToken(failing, expired(failing), async () => Promise.reject(new Error('no'))).catch(() => {})
      await sleep(200)

      const keys = (await cli(redis.port, '--scan')).split('\n').filter(Boolean)
      expect(keys.length).toBeGreaterThan(0)
      let dump = keys.join('\n')
      for (const k of keys) {
        const type = (await cli(redis.port, 'type', k)).trim()
        dump += await cli(redis.port, type === 'hash' ? 'hgetall' : 'get', k)
      }
      const secrets = [...provider.issued(), ...users, failing, ...users.map((u) => `r0-${u}`), 'alice', 'example.com']
      expect(provider.issued().length).toBe(6)
      for (const s of secrets) {
        expect(dump.includes(s), `${s} in Redis`).toBe(false)
        expect(published.includes(s), `${s} published`).toBe(false)
      }
      expect(published.split('clear:refreshed').length - 1).toBeGreaterThanOrEqual(users.length + 1)
    } finally {
      sub.kill()
      await provider.close()
    }
  })
})

describe('options and lifetime', () => {
  it('rejects bad options at construction with typed errors that do not echo secrets', () => {
    const url = 'redis://:hunter2@127.0.0.1:1'
    const bad = [
      [{ url }, TypeError, /encryptionKey is required/],
      [{ url, encryptionKey: 42 }, TypeError, /encryptionKey must be a base64 string/],
      [{ url, encryptionKey: 'c2hvcnQ=' }, RangeError, /encryptionKey must decode to exactly 32 bytes/],
      [{ url, encryptionKey: 'not base64!' }, RangeError, /encryptionKey is not base64/],
      [{ encryptionKey: key }, TypeError, /url must be a non-empty string/],
      [{ url: 'http://:hunter2@h', encryptionKey: key }, RangeError, /url is not a valid Redis URL/],
      [{ url, encryptionKey: key, onError: 'retry' }, RangeError, /onError must be 'auto', 'local' or 'fail'/],
      [{ url, encryptionKey: key, lockTtlMs: 10 }, RangeError, /lockTtlMs must be a whole number/],
      [{ url, encryptionKey: key, keyPrefix: 5 }, TypeError, /keyPrefix must be a string/],
    ]
    for (const [redisOptions, Kind, message] of bad) {
      let error
      try {
        new TokenManager({ redis: redisOptions })
      } catch (e) {
        error = e
      }
      expect(error).toBeInstanceOf(Kind)
      expect(error.code).toBe('INVALID_ARGUMENT')
      expect(error.message).toMatch(message)
      expect(error.message).not.toMatch(/hunter2/)
      expect(error.message).not.toContain(key)
    }
    expect(() => new TokenManager({ redis: 'redis://h' })).toThrow(TypeError)
  })

  it('names the usual mistakes: a hex key, a password that breaks the URL, a keyPrefix too long', () => {
    const thrown = (redisOptions) => {
      try {
        new TokenManager({ redis: redisOptions })
      } catch (e) {
        return e
      }
      throw new Error('constructed')
    }
    const url = 'redis://127.0.0.1:1'
    // openssl rand -hex 32: the right 32 bytes, in hex.
    const hex = randomBytes(32).toString('hex')
    const e1 = thrown({ url, encryptionKey: hex })
    expect(e1).toMatchObject({ code: 'INVALID_ARGUMENT', message: expect.stringMatching(/encryptionKey looks like hex \(64 hex digits\), not base64: convert it with Buffer\.from\(key, 'hex'\)\.toString\('base64'\)/) })
    expect(e1.message).not.toContain(hex)
    // A password with @ and / not URL-encoded.
    const e2 = thrown({ url: 'redis://:hunter@2/x@127.0.0.1:6379', encryptionKey: key })
    expect(e2).toMatchObject({ code: 'INVALID_ARGUMENT', message: expect.stringMatching(/url is not a valid Redis URL .*must be URL-encoded \(encodeURIComponent\)/) })
    expect(e2.message).not.toMatch(/hunter/)
    // A string over its length limit is a TypeError, as a client id over 8192 bytes is.
    for (const keyPrefix of ['p'.repeat(129), 'p'.repeat(9_000)]) {
      expect(thrown({ url, encryptionKey: key, keyPrefix })).toMatchObject({ name: 'TypeError', code: 'INVALID_ARGUMENT', message: expect.stringMatching(/^options\.redis\.keyPrefix must be at most \d+ bytes long/) })
    }
    expect(() => tarabutRefresher({ clientId: 'c'.repeat(9_000), clientSecret: 's' })).toThrow(expect.objectContaining({ name: 'TypeError', code: 'INVALID_ARGUMENT' }))
  })

  it('after close(), refreshes reject with COORDINATOR_UNAVAILABLE and fresh tokens are still served', async () => {
    const m = new TokenManager({ redis: { url: redis.url, encryptionKey: key } })
    const user = uid()
    const t = await m.getValidToken(user, expired(user), refresher())
    await m.close()
    await m.close()
    await expect(m.getValidToken(user, { accessToken: t.accessToken, expiresAt: t.expiresAt }, refresher())).resolves.toMatchObject({ shouldUpdate: false })
    const other = uid()
    await expect(m.getValidToken(other, expired(other), refresher())).rejects.toMatchObject({ code: 'COORDINATOR_UNAVAILABLE' })
    expect(m.stats().redisFallbacks).toBe(0)
  })

  it('a script that used a Redis-backed manager exits by itself, with or without close()', async () => {
    for (const close of [true, false]) {
      const script = `
        const { TokenManager } = require(${JSON.stringify(pkg)})
        const m = new TokenManager({ redis: { url: ${JSON.stringify(redis.url)}, encryptionKey: ${JSON.stringify(key)} } })
        m.getValidToken('exit-${close}', { accessToken: 'a', expiresAt: 0 }, async () => ({ accessToken: 'b', expiresIn: 60 }))
          .then(async (t) => { ${close ? 'await m.close();' : ''} console.log(t.accessToken) })`
      const started = Date.now()
      const r = await new Promise((resolve) => {
        const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'pipe'] })
        let out = ''
        child.stdout.on('data', (d) => (out += d))
        child.on('exit', (code, signal) => resolve({ code, signal, out }))
      })
      expect(r).toEqual({ code: 0, signal: null, out: 'b\n' })
      expect(Date.now() - started).toBeLessThan(15_000)
    }
  })
})

describe('Redis restarted mid-run', () => {
  let own
  beforeAll(async () => {
    own = await startRedis()
  })
  afterAll(async () => {
    await own?.stop()
  })

  it("onError 'local' keeps refreshing in-process and counts it; 'fail' rejects with COORDINATOR_UNAVAILABLE; both recover", async () => {
    const w = warnings('TTM_REDIS_UNAVAILABLE')
    const local = new TokenManager({ bufferTimeMs: MIN, refreshTimeoutMs: 5_000, redis: { url: own.url, encryptionKey: key, userIdKey: USER_ID_KEY, onError: 'local' } })
    const strict = new TokenManager({ bufferTimeMs: MIN, refreshTimeoutMs: 5_000, redis: { url: own.url, encryptionKey: key, userIdKey: USER_ID_KEY, onError: 'fail' } })
    managers.push(local, strict)
    try {
      const before = uid()
      await local.getValidToken(before, expired(before), refresher())
      await strict.getValidToken(uid(), expired('x'), refresher())
      expect(local.stats().redisFallbacks).toBe(0)

      await own.stop()
      for (let i = 1; i <= 3; i++) {
        const user = uid()
        const refreshFn = refresher()
        await expect(local.getValidToken(user, expired(user), refreshFn)).resolves.toMatchObject({ shouldUpdate: true })
        expect(refreshFn).toHaveBeenCalledTimes(1)
        expect(local.stats().redisFallbacks).toBe(i)
      }
      const user = uid()
      const started = Date.now()
      const error = await strict.getValidToken(user, expired(user), refresher()).catch((e) => e)
      expect(error).toBeInstanceOf(TokenRefreshError)
      expect(error.code).toBe('COORDINATOR_UNAVAILABLE')
      expect(Date.now() - started).toBeLessThan(5_000)
      // As after any failed refresh, a caller whose token still works keeps it.
      const due = { accessToken: 'due', expiresAt: Date.now() + 30_000 }
      await expect(strict.getValidToken(uid(), due, refresher())).resolves.toEqual({ accessToken: 'due', shouldUpdate: false, expiresAt: new Date(due.expiresAt) })
      expect(w.seen).toHaveLength(2) // once per manager for this outage
      expect(w.seen.join()).not.toContain(own.url)

      own = await startRedis(own.port)
      // Reconnects in the background: coordination resumes by itself.
      let resumed = null
      const until = Date.now() + 15_000
      while (resumed === null && Date.now() < until) {
        const u = uid()
        const fallbacks = local.stats().redisFallbacks
        await local.getValidToken(u, expired(u), refresher())
        if (local.stats().redisFallbacks === fallbacks) resumed = u
        else await sleep(200)
      }
      expect(resumed).not.toBeNull()
      const peer = instance({ url: own.url }, { refreshTimeoutMs: 5_000 })
      const unused = refresher()
      await peer.getValidToken(resumed, expired(resumed), unused)
      expect(unused).not.toHaveBeenCalled()
      // A refresh that spends no refresh token resumes at once; one that
      // does waits out the restart guard (redis-outage.spec.mjs).
      const back = uid()
      await expect(strict.getValidToken(back, { accessToken: 'cc', expiresAt: 0 }, refresher())).resolves.toMatchObject({ shouldUpdate: true })
    } finally {
      w.off()
    }
  })
})
