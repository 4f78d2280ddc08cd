// Users named in Redis by an HMAC under `redis.userIdKey`: what a reader of
// Redis sees (no SHA-256 of a user id to check a guess against), what an
// instance without it says, and the rolling upgrade from unkeyed names that
// never lets two instances refresh one user (with rotating refresh tokens
// and reuse detection, the second refresh would revoke the grant).
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { createHash } from 'node:crypto'

import { TokenManager } from '../index.mjs'
import { captureChannel } from './helpers/raw-redis.mjs'
import { USER_ID_KEY, cli, newKey, sleep, startCluster, startProvider, startRedis, startWorker, userName } from './helpers/redis.mjs'

const sha256 = (s) => createHash('sha256').update(s).digest('hex')
const key = newKey()
let redis
let seq = 0

beforeAll(async () => {
  redis = await startRedis()
})
afterAll(() => redis?.stop())

/**
 * Refreshes, shares and invalidates three guessable user ids on a manager
 * with `redisOptions`, recording the channel; returns every key name in
 * the prefix and every message published.
 */
async function footprint(redisOptions) {
  const keyPrefix = `fp${++seq}:`
  const channel = await captureChannel(redis.port, `${keyPrefix}refreshed`)
  const options = { url: redis.url, encryptionKey: key, keyPrefix, ...redisOptions }
  const a = new TokenManager({ bufferTimeMs: 60_000, logger: { warn() {}, error() {} }, redis: options })
  const b = new TokenManager({ bufferTimeMs: 60_000, logger: { warn() {}, error() {} }, redis: options })
  const users = ['alice@example.com', '+97317000001', '1042']
  const fn = async (ctx) => ({ accessToken: `at-${ctx.userId}-${Math.random()}`, refreshToken: `rt-${Math.random()}`, expiresIn: 3600 })
  try {
    for (const u of users) {
      const expired = { accessToken: `old-${u}`, refreshToken: `r0-${u}`, expiresAt: Date.now() - 1_000 }
      const [t] = await Promise.all([a.getValidToken(u, expired, fn), b.getValidToken(u, expired, fn)])
      await a.invalidate(u, t.accessToken)
    }
    await sleep(100)
    const keys = (await cli(redis.port, '--scan', '--pattern', `${keyPrefix}*`)).split('\n').filter(Boolean)
    return { users, keys, messages: channel.messages.map((m) => m.toString('latin1')) }
  } finally {
    channel.close()
    await Promise.all([a.close(), b.close()])
  }
}

describe('redis.userIdKey', () => {
  it('a SCAN of the keyspace and the channel carry no SHA-256 of a user id, nor the id', async () => {
    // The probe works: unkeyed, every user's SHA-256 is there to be guessed.
    const plain = await footprint({})
    for (const u of plain.users) expect(plain.keys.some((k) => k.includes(sha256(u)))).toBe(true)

    const { users, keys, messages } = await footprint({ userIdKey: newKey() })
    expect(keys.length).toBeGreaterThanOrEqual(users.length)
    expect(messages.length).toBeGreaterThanOrEqual(2 * users.length)
    for (const u of users) {
      for (const text of [...keys, ...messages]) {
        expect(text).not.toContain(sha256(u))
        expect(text).not.toContain(u)
      }
    }
  })

  it('names users by the HMAC: every instance with the same userIdKey shares the record', async () => {
    const { users, keys } = await footprint({ userIdKey: USER_ID_KEY })
    for (const u of users) expect(keys).toContain(`fp${seq}:tok:{${userName(u)}}`)
  })

  it('is checked like an encryptionKey, and may not be one of them', () => {
    const k = newKey()
    for (const [userIdKey, message] of [
      [Buffer.alloc(32).toString('base64'), /^options\.redis\.userIdKey is all zero bytes/],
      ['c2hvcnQ=', /^options\.redis\.userIdKey must decode to exactly 32 bytes/],
      [Buffer.alloc(32, 7).toString('hex'), /^options\.redis\.userIdKey looks like hex/],
      [k, /^options\.redis\.userIdKey must not be one of encryptionKey/],
    ]) {
      let error
      try {
        new TokenManager({ redis: { url: 'redis://127.0.0.1:1', encryptionKey: [newKey(), k], userIdKey } })
      } catch (e) {
        error = e
      }
      expect(error).toMatchObject({ name: 'RangeError', code: 'INVALID_ARGUMENT' })
      expect(error.message).toMatch(message)
      expect(error.message).not.toContain(userIdKey)
    }
    expect(() => new TokenManager({ redis: { url: 'redis://127.0.0.1:1', encryptionKey: k, userIdKey: 42 } })).toThrow(
      expect.objectContaining({ name: 'TypeError', code: 'INVALID_ARGUMENT' }),
    )
  })

  it('without it: one TTM_REDIS_UNKEYED_USER_IDS warning per process, saying how to set it', async () => {
    const script = `
      const { TokenManager } = require('./index.js')
      const warned = []
      const logger = { warn: (fields, message) => warned.push({ ...fields, message }), error: () => {} }
      const redis = { url: 'redis://127.0.0.1:1', encryptionKey: ${JSON.stringify(key)} }
      const keyed = new TokenManager({ logger, redis: { ...redis, userIdKey: ${JSON.stringify(newKey())} } })
      const first = warned.length
      const managers = [keyed, new TokenManager({ logger, redis }), new TokenManager({ logger, redis })]
      Promise.all(managers.map((m) => m.close())).then(() => console.log(JSON.stringify({ first, warned })))`
    const { runNode } = await import('./helpers/node.mjs')
    const r = await runNode(['-e', script])
    expect(r.err).toBe('')
    const { first, warned } = JSON.parse(r.out)
    expect(first).toBe(0)
    expect(warned.map((w) => w.code)).toEqual(['TTM_REDIS_UNKEYED_USER_IDS'])
    expect(warned[0].message).toMatch(/unkeyed SHA-256.*options\.redis\.userIdKey/)
    expect(warned[0].message).not.toContain(key)
  })
})

/**
 * One round: every worker (its redis options from `fleet`) asks for the same
 * `users` users at once, `callsPerUser` times each, all with an expired
 * token and the same refresh token, against a provider that rotates
 * refresh tokens and revokes the grant on reuse. Returns the provider's
 * counts and every caller's result.
 */
async function round(fleet, { users = 12, callsPerUser = 3, where = { redisUrl: redis.url } } = {}) {
  // A refresh long enough that every caller, on a loaded machine too,
  // arrives while it runs (a later one is handed the token with
  // shouldUpdate, as the contract says, and the count below would be off).
  const provider = await startProvider({ delayMs: 1_500, revokeOnReuse: true })
  try {
    const userPrefix = `round${++seq}-`
    const workers = fleet.map((config) =>
      startWorker({ ...where, key, providerUrl: provider.url, userPrefix, userCount: users, callsPerUser, ...config, redis: { ...where.redis, ...config.redis } }),
    )
    await Promise.all(workers.map((w) => w.ready))
    workers.forEach((w) => w.go())
    const done = await Promise.all(workers.map((w) => w.done))
    return { stats: { ...provider.stats }, results: done.flatMap((d) => d.results), users, userPrefix }
  } finally {
    await provider.close()
  }
}

/** One refresh per user, no grant error, every caller in every instance holding the one new token. */
function oneRefreshPerUser({ stats, results, users, userPrefix }) {
  expect(results.filter((r) => r.error)).toEqual([])
  expect(stats).toEqual({ requests: users, refreshes: users, rejected: 0 })
  for (let i = 0; i < users; i++) {
    const mine = results.filter((r) => r.user === `${userPrefix}${i}`)
    expect(new Set(mine.map((r) => r.accessToken)).size).toBe(1)
    expect(mine.filter((r) => r.shouldUpdate)).toHaveLength(1)
  }
}

describe('upgrading to userIdKey in a running fleet', () => {
  const old = { unkeyed: true }
  const migrating = { redis: { upgrading: true } }
  const keyed = {}

  it('the hazard is real: an instance with userIdKey beside an unkeyed one, without upgrading, refreshes users twice and gets grants revoked', async () => {
    const { stats, results, users } = await round([old, keyed])
    expect(stats.requests).toBe(2 * users)
    expect(stats.rejected).toBe(users)
    expect(results.filter((r) => r.error).length).toBeGreaterThan(0)
  }, 30_000)

  it('step 1: unkeyed instances beside instances with userIdKey and upgrading: one refresh per user, no grant lost', async () => {
    for (let i = 0; i < 3; i++) oneRefreshPerUser(await round([old, migrating, old, migrating]))
  }, 60_000)

  it('step 2: instances still upgrading beside instances without it: one refresh per user, no grant lost', async () => {
    for (let i = 0; i < 3; i++) oneRefreshPerUser(await round([migrating, keyed, migrating, keyed]))
  }, 60_000)

  it('on a Redis Cluster (the two names of a user in different slots, each with its restart marker): both steps hold', async () => {
    const cluster = await startCluster()
    try {
      const where = { redis: { cluster: cluster.urls } }
      oneRefreshPerUser(await round([old, migrating, old, migrating], { where }))
      oneRefreshPerUser(await round([migrating, keyed, migrating, keyed], { where }))
    } finally {
      await cluster.stop()
    }
  }, 90_000)

  it('a token an unkeyed instance refreshed is shared by an upgrading one, and the other way round', async () => {
    const provider = await startProvider({ revokeOnReuse: true })
    const one = async (config, user) => {
      const w = startWorker({ redisUrl: redis.url, key, providerUrl: provider.url, users: [user], callsPerUser: 1, waitForGo: false, ...config })
      return (await w.done).results[0]
    }
    try {
      for (const [first, then] of [
        [old, migrating],
        [migrating, old],
        [migrating, keyed],
      ]) {
        const user = `shared${++seq}`
        const a = await one(first, user)
        const b = await one(then, user)
        expect(b.accessToken).toBe(a.accessToken)
        expect(a.error ?? b.error).toBeUndefined()
      }
      expect(provider.stats).toEqual({ requests: 3, refreshes: 3, rejected: 0 })
    } finally {
      await provider.close()
    }
  }, 30_000)
})
