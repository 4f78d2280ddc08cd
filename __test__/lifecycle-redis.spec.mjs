// The token lifecycle across instances: two managers on one Redis and one
// token table, against oidc-provider rotating refresh tokens.
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { TokenManager, oauth2Refresher } from '../index.mjs'
import { memoryStore, startOidc } from './helpers/oidc.mjs'
import { USER_ID_KEY, newKey, sleep, startRedis } from './helpers/redis.mjs'

let oidc
let redis
let refresher
const key = newKey()

beforeAll(async () => {
  oidc = await startOidc({ accessTtlS: 2 })
  redis = await startRedis()
  refresher = oauth2Refresher({ tokenUrl: oidc.tokenUrl, clientId: 'app', clientSecret: 'app-secret' })
  // A fresh Redis holds refresh-token locks for its first 1.5 s.
  const warm = new TokenManager({ redis: { url: redis.url, encryptionKey: key, userIdKey: USER_ID_KEY } })
  await warm.getValidToken('warm-up', { accessToken: 'a', expiresAt: 0 }, async () => ({ accessToken: 'b', expiresIn: 60 }))
  await warm.close()
})

afterAll(async () => {
  await redis.stop()
  await oidc.close()
})

const instance = (store, options = {}) => new TokenManager({ store, refresher, refreshAhead: false, redis: { url: redis.url, encryptionKey: key, userIdKey: USER_ID_KEY }, ...options })

async function connected(store, userId) {
  const { grantId, refreshToken } = await oidc.connect(userId)
  store.rows.set(userId, { accessToken: 'from-consent', refreshToken, expiresAt: new Date(Date.now() - 1000) })
  return grantId
}

describe('getToken on two instances', () => {
  it('one refresh and one save fleet-wide for a storm on both', async () => {
    const store = memoryStore()
    const [a, b] = [instance(store), instance(store)]
    const grantId = await connected(store, 'both')
    for (let round = 0; round < 3; round++) {
      const before = oidc.counts.refreshes
      const saves = store.saves.length
      const got = await Promise.all(Array.from({ length: 40 }, (_, i) => (i % 2 ? a : b).getToken('both')))
      expect(new Set(got.map((t) => t.accessToken)).size).toBe(1)
      expect(oidc.counts.refreshes - before).toBe(1)
      expect(store.saves.length - saves).toBe(1)
      expect(store.rows.get('both').accessToken).toBe(got[0].accessToken)
      await sleep(2100)
    }
    expect(oidc.counts.grantErrors).toEqual([])
    expect(await oidc.grantAlive(grantId)).toBe(true)
    await Promise.all([a.close(), b.close()])
  })

  it('a token in Redis newer than the row (its save was lost) wins: no refresh with a spent refresh token, and the row heals', async () => {
    const store = memoryStore()
    const grantId = await connected(store, 'lost-save')
    // Instance A refreshes but its database write never lands (it crashed
    // before a retry could): the row keeps the spent refresh token.
    const broken = { load: (u) => store.load(u), save: () => Promise.reject(new Error('disk full')) }
    const a = instance(broken, { logger: { warn() {}, error() {} } })
    const fromA = await a.getToken('lost-save')
    expect(store.rows.get('lost-save').accessToken).toBe('from-consent')
    // Instance B starts from the stale row; its token is due.
    const b = instance(store)
    const before = oidc.counts.refreshes
    expect(await b.getToken('lost-save')).toEqual(fromA)
    expect(oidc.counts.refreshes - before).toBe(0)
    expect(store.rows.get('lost-save').accessToken).toBe(fromA.accessToken)
    await sleep(2100)
    await b.getToken('lost-save')
    expect(oidc.counts.grantErrors).toEqual([])
    expect(await oidc.grantAlive(grantId)).toBe(true)
    await b.close()
  })

  it('forget on one instance: the other stops serving the token and rejects NOT_CONNECTED', async () => {
    const store = memoryStore()
    const [a, b] = [instance(store), instance(store)]
    await connected(store, 'gone')
    await a.getToken('gone')
    await b.getToken('gone')
    await a.forget('gone')
    let seen
    for (let i = 0; i < 100; i++) {
      seen = await b.getToken('gone').catch((e) => e)
      if (seen?.code === 'NOT_CONNECTED') break
      await sleep(10)
    }
    expect(seen).toMatchObject({ code: 'NOT_CONNECTED' })
    await Promise.all([a.close(), b.close()])
  })

  it("fetch's 401 on one instance invalidates the token for the other", async () => {
    const store = memoryStore()
    const [a, b] = [instance(store), instance(store)]
    await connected(store, 'refused')
    const t = await a.getToken('refused')
    expect((await b.getToken('refused')).accessToken).toBe(t.accessToken)
    await (await oidc.provider.AccessToken.find(t.accessToken)).destroy()
    expect((await a.fetch('refused', `${oidc.apiUrl}/accounts`)).status).toBe(200)
    const fresh = store.rows.get('refused').accessToken
    expect(fresh).not.toBe(t.accessToken)
    let seen
    for (let i = 0; i < 100; i++) {
      seen = (await b.getToken('refused')).accessToken
      if (seen === fresh) break
      await sleep(10)
    }
    if (seen !== fresh) console.log({ t: t.accessToken, fresh, seen, row: store.rows.get('refused').accessToken, saves: store.saves.map((x) => x.accessToken), a: a.stats(), b: b.stats() })
    expect(seen).toBe(fresh)
    await Promise.all([a.close(), b.close()])
  })
})
