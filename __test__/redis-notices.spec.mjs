// The Redis channel trusts only what an instance holding the encryption
// key signed: a forged notice (anyone who can PUBLISH) or a replayed one
// (anyone who can also SUBSCRIBE) changes nothing, and is counted.
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest'

import { TokenManager } from '../index.mjs'
import { captureChannel, publish } from './helpers/raw-redis.mjs'
import { cli, newKey, sleep, startRedis } from './helpers/redis.mjs'

const MIN = 60_000
let seq = 0
const uid = () => `notice-user-${++seq}`
const expired = (u) => ({ accessToken: `old-${u}`, refreshToken: `r0-${u}`, expiresAt: Date.now() - 1_000 })

let redis
let key
const managers = []
function instance(prefix) {
  const m = new TokenManager({ bufferTimeMs: MIN, redis: { url: redis.url, encryptionKey: key, keyPrefix: prefix } })
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
