// The Redis channel trusts only what an instance holding the encryption
// key signed: a forged notice (anyone who can PUBLISH) or a replayed one
// (anyone who can also SUBSCRIBE) changes nothing, and is counted.
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest'
import fc from 'fast-check'

import { TokenManager } from '../index.mjs'
import { captureChannel, publish } from './helpers/raw-redis.mjs'
import { USER_ID_KEY, cli, newKey, sleep, startInstance, startRedis } from './helpers/redis.mjs'

const MIN = 60_000
let seq = 0
const uid = () => `notice-user-${++seq}`
const expired = (u) => ({ accessToken: `old-${u}`, refreshToken: `r0-${u}`, expiresAt: Date.now() - 1_000 })

let redis
let key
const managers = []
function instance(prefix) {
  const m = new TokenManager({ bufferTimeMs: MIN, redis: { url: redis.url, encryptionKey: key, userIdKey: USER_ID_KEY, keyPrefix: prefix } })
  managers.push(m)
  return m
}
function refresher({ delayMs = 0 } = {}) {
  const fn = vi.fn(async (ctx) => {
    if (delayMs) await sleep(delayMs)
    return { accessToken: `at-${ctx.userId}-${fn.mock.calls.length}-${Math.random()}`, refreshToken: `rt-${ctx.userId}-${Math.random()}`, expiresIn: 3600 }
  })
  return fn
}
/** The hashed user id Redis names a user by, read from its lock key. */
async function lockedId(prefix) {
  for (let i = 0; i < 100; i++) {
    const keys = (await cli(redis.port, '--scan', '--pattern', `${prefix}lock:*`)).split('\n').filter(Boolean)
    if (keys.length === 1) return keys[0].slice(keys[0].indexOf('{') + 1, -1)
    await sleep(10)
  }
  throw new Error('no lock taken')
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

describe('channel notices are authenticated', () => {
  it('a forged failure notice (PUBLISH, no key) does not fail a caller waiting on another instance', async () => {
    const prefix = `forge${++seq}:`
    const [a, b] = [instance(prefix), instance(prefix)]
    const user = uid()
    const slow = refresher({ delayMs: 1_000 })
    const leading = a.getValidToken(user, expired(user), slow)
    const id = await lockedId(prefix)
    const waiting = b.getValidToken(user, expired(user), refresher())
    await sleep(100)
    // What a failure notice looked like unsigned, and with a made-up fence and trailer.
    const forged = [`${id}|F`, `${id}|F|1`, `${id}|F|999${'x'.repeat(48)}`, Buffer.alloc(200 * 1024, 1)]
    expect(await publish(redis.port, `${prefix}refreshed`, forged)).toEqual([2, 2, 2, 2])
    const [led, waited] = await Promise.all([leading, waiting])
    expect(waited.accessToken).toBe(led.accessToken)
    expect(waited.shouldUpdate).toBe(false)
    expect(slow).toHaveBeenCalledTimes(1)
    expect(b.stats().redisNoticesDropped).toBeGreaterThanOrEqual(forged.length)
  })

  it('a replayed invalidation causes no extra refresh', async () => {
    const prefix = `replay${++seq}:`
    const [a, b] = [instance(prefix), instance(prefix)]
    const capture = await captureChannel(redis.port, `${prefix}refreshed`)
    try {
      const user = uid()
      const refresh = refresher()
      const first = await b.getValidToken(user, expired(user), refresh)
      expect(refresh).toHaveBeenCalledTimes(1)
      // An invalidation names the user (64 hex digits), then its kind.
      const invalidations = () => capture.messages.filter((m) => m.toString('latin1', 64, 67) === '|I|')
      a.invalidate(user)
      for (let i = 0; i < 200 && invalidations().length === 0; i++) await sleep(10)
      const [invalidation] = invalidations()
      expect(invalidation).toBeDefined()
      await sleep(100)
      // The genuine invalidation reached b: its token is refreshed once.
      const token = { accessToken: first.accessToken, refreshToken: first.refreshToken, expiresAt: first.expiresAt }
      const second = await b.getValidToken(user, token, refresh)
      expect(refresh).toHaveBeenCalledTimes(2)
      // Replayed five times: dropped, no refresh.
      await publish(redis.port, `${prefix}refreshed`, Array(5).fill(invalidation))
      await sleep(200)
      const third = await b.getValidToken(user, { accessToken: second.accessToken, refreshToken: second.refreshToken, expiresAt: second.expiresAt }, refresh)
      expect(third.accessToken).toBe(second.accessToken)
      expect(refresh).toHaveBeenCalledTimes(2)
      expect(b.stats().redisNoticesDropped).toBeGreaterThanOrEqual(5)
    } finally {
      capture.close()
    }
  })
})

describe('random and mutated notices (fast-check)', () => {
  it('are all dropped and counted, and change nothing', async () => {
    const prefix = `fuzz${++seq}:`
    const [a, b] = [instance(prefix), instance(prefix)]
    const channel = `${prefix}refreshed`
    const capture = await captureChannel(redis.port, channel)
    try {
      // Genuine notices of every kind: a commit, a failure, an invalidation.
      const user = uid()
      const refresh = refresher()
      const held = await b.getValidToken(user, expired(user), refresh)
      const failing = uid()
      await a.getValidToken(failing, expired(failing), async () => Promise.reject(new Error('no'))).catch(() => {})
      a.invalidate(uid())
      for (let i = 0; i < 200 && capture.messages.length < 3; i++) await sleep(10)
      const genuine = [...capture.messages]
      expect(genuine.length).toBeGreaterThanOrEqual(3)
      const mutated = fc.oneof(
        fc.uint8Array({ maxLength: 400 }).map((x) => Buffer.from(x)),
        fc
          .tuple(fc.constantFrom(...genuine), fc.nat(), fc.integer({ min: 1, max: 255 }))
          .map(([g, at, bits]) => {
            const m = Buffer.from(g)
            m[at % m.length] ^= bits
            return m
          }),
        fc.tuple(fc.constantFrom(...genuine), fc.nat()).map(([g, n]) => g.subarray(0, n % g.length)),
        fc.tuple(fc.constantFrom(...genuine), fc.uint8Array({ minLength: 1, maxLength: 64 })).map(([g, tail]) => Buffer.concat([g, tail])),
      )
      const messages = fc.sample(mutated, { numRuns: 2_000, seed: 23 })
      const before = b.stats().redisNoticesDropped
      const heard = await publish(redis.port, channel, messages)
      expect(heard.every((n) => n >= 2)).toBe(true)
      for (let i = 0; i < 300 && b.stats().redisNoticesDropped - before < messages.length; i++) await sleep(10)
      // Every one dropped (none verifies), counted once.
      expect(b.stats().redisNoticesDropped - before).toBe(messages.length)
      // Nothing changed: b's token is still its own, no refresh ran.
      const again = await b.getValidToken(user, { accessToken: held.accessToken, refreshToken: held.refreshToken, expiresAt: held.expiresAt }, refresh)
      expect(again).toMatchObject({ accessToken: held.accessToken, shouldUpdate: false })
      expect(refresh).toHaveBeenCalledTimes(1)
    } finally {
      capture.close()
    }
  })
})

describe('a flood of notices', () => {
  it('an instance that stops reading during a flood loses its subscriber only: its next refresh is coordinated', async () => {
    const prefix = `stall${++seq}:`
    const channel = `${prefix}refreshed`
    const p = await startInstance({ name: 'p', redis: { url: redis.url, encryptionKey: key, keyPrefix: prefix, onError: 'fail' } })
    const limits = (await cli(redis.port, 'config', 'get', 'client-output-buffer-limit')).split('\n')[1]
    try {
      const first = uid()
      await p.call('get', first, expired(first))
      await cli(redis.port, 'config', 'set', 'client-output-buffer-limit', 'pubsub 256kb 128kb 1')
      // Stopped (a long GC pause, a throttled container): Redis buffers what
      // it publishes to it, past the limit, and closes that connection.
      p.child.kill('SIGSTOP')
      await publish(redis.port, channel, Array.from({ length: 2_000 }, () => Buffer.alloc(10 * 1024, 'j')))
      p.child.kill('SIGCONT')
      const next = uid()
      const got = await p.call('get', next, expired(next))
      expect(got.accessToken).toMatch(/^at-p-/)
      const stats = await p.call('stats')
      expect(stats.redisFallbacks).toBe(0)
    } finally {
      p.child.kill('SIGCONT')
      await cli(redis.port, 'config', 'set', 'client-output-buffer-limit', limits)
      await p.stop()
    }
  })

  it('100,000 junk and replayed notices during a fleet run: no caller fails, memory stays bounded', async () => {
    const prefix = `flood${++seq}:`
    const fleet = [instance(prefix), instance(prefix), instance(prefix)]
    const channel = `${prefix}refreshed`
    const capture = await captureChannel(redis.port, channel)
    // A small output buffer for subscribers (as a slow reader would hit the
    // default one): Redis closes a subscriber that falls 256 KB behind. A
    // command on that connection would fail with it.
    const limits = (await cli(redis.port, 'config', 'get', 'client-output-buffer-limit')).split('\n')[1]
    await cli(redis.port, 'config', 'set', 'client-output-buffer-limit', 'pubsub 256kb 128kb 1')
    const rssBefore = process.memoryUsage().rss
    let rssPeak = rssBefore
    const sampler = setInterval(() => (rssPeak = Math.max(rssPeak, process.memoryUsage().rss)), 50)
    try {
      // Something genuine to replay: one refresh's commit.
      const seed = uid()
      await fleet[0].getValidToken(seed, expired(seed), refresher())
      for (let i = 0; i < 100 && capture.messages.length === 0; i++) await sleep(10)
      const genuine = capture.messages[0]
      expect(genuine).toBeDefined()
      capture.close()
      // 100,000 messages: replays of the genuine one, and junk (some of 10 KB).
      const junk = Buffer.alloc(10 * 1024, 'j')
      const payloads = Array.from({ length: 100_000 }, (_, i) => (i % 2 === 0 ? genuine : junk.subarray(0, i % 50 === 1 ? junk.length : 16 + (i % 10) * 50)))
      let flooding = true
      const flood = publish(redis.port, channel, payloads).finally(() => (flooding = false))
      // Meanwhile, every instance refreshes users, several at once per user,
      // round after round until the flood is over.
      const refresh = refresher({ delayMs: 20 })
      const failures = []
      let users = 0
      for (let round = 0; flooding || round < 3; round++) {
        const batch = Array.from({ length: 10 }, () => uid())
        users += batch.length
        const results = await Promise.allSettled(batch.flatMap((u) => fleet.map((m) => m.getValidToken(u, expired(u), refresh))))
        failures.push(...results.filter((r) => r.status === 'rejected').map((r) => r.reason?.code))
      }
      await flood
      expect(failures).toEqual([])
      expect(refresh).toHaveBeenCalledTimes(users)
      await sleep(200)
      const dropped = fleet.map((m) => m.stats().redisNoticesDropped)
      // Junk is dropped by every instance that read it (a subscriber
      // overrun by the flood is closed by Redis and resubscribes: it misses some).
      expect(dropped.reduce((a, b) => a + b, 0)).toBeGreaterThan(0)
      expect(rssPeak - rssBefore).toBeLessThan(256 * 1024 * 1024)
      // Coordination still works after the flood.
      const after = uid()
      const late = refresher()
      const [x, y] = await Promise.all([fleet[1].getValidToken(after, expired(after), late), fleet[2].getValidToken(after, expired(after), late)])
      expect(x.accessToken).toBe(y.accessToken)
      expect(late).toHaveBeenCalledTimes(1)
    } finally {
      clearInterval(sampler)
      capture.close()
      await cli(redis.port, 'config', 'set', 'client-output-buffer-limit', limits)
    }
  }, 30_000)
})
