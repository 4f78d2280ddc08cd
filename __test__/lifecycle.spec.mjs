// The token's whole life (options `store` and `refresher`): getToken loads,
// refreshes and saves; fetch attaches the token and survives a 401; forget
// and revoke end it. Against a real OAuth 2.0 server (oidc-provider) that
// rotates refresh tokens and revokes the grant when a spent one comes back,
// so a refresh token used twice, or one never saved, shows as a dead grant.
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { TokenManager, TokenRefreshError, oauth2Refresher } from '../index.mjs'
import { memoryStore, startOidc } from './helpers/oidc.mjs'

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

let oidc
let refresher

beforeAll(async () => {
  oidc = await startOidc({ accessTtlS: 2 })
  refresher = oauth2Refresher({ tokenUrl: oidc.tokenUrl, clientId: 'app', clientSecret: 'app-secret' })
})

afterAll(() => oidc.close())

/** A user connected at the provider, with an expired row in `store` (as after the consent flow and a while). */
async function connected(store, userId) {
  const { grantId, refreshToken } = await oidc.connect(userId)
  store.rows.set(userId, { accessToken: 'from-consent', refreshToken, expiresAt: new Date(Date.now() - 1000) })
  return grantId
}

describe('getToken', () => {
  it('loads the row, refreshes once for a storm of callers, saves the rotated refresh token before anyone is answered', async () => {
    const store = memoryStore()
    const manager = new TokenManager({ store, refresher, refreshAhead: false })
    const grantId = await connected(store, 'storm')
    const firstRefresh = store.rows.get('storm').refreshToken
    const before = oidc.counts.refreshes
    const answered = await Promise.all(
      Array.from({ length: 50 }, () =>
        manager.getToken('storm').then((t) => {
          // Whoever is answered finds the token already in the store.
          expect(store.rows.get('storm').accessToken).toBe(t.accessToken)
          return t
        }),
      ),
    )
    expect(oidc.counts.refreshes - before).toBe(1)
    expect(new Set(answered.map((t) => t.accessToken)).size).toBe(1)
    expect(store.saves).toHaveLength(1)
    const row = store.rows.get('storm')
    expect(row.refreshToken).toEqual(expect.any(String))
    expect(row.refreshToken).not.toBe(firstRefresh)
    expect(row.expiresAt).toBeInstanceOf(Date)
    expect(answered[0].expiresAt.getTime()).toBe(row.expiresAt.getTime())
    expect(Object.keys(answered[0]).sort()).toEqual(['accessToken', 'expiresAt'])
    // A caller that changes the Date it was handed changes no later answer.
    answered[0].expiresAt.setTime(0)
    expect((await manager.getToken('storm')).expiresAt.getTime()).toBe(row.expiresAt.getTime())
    // A later round (the token expired) refreshes with the saved refresh token.
    await sleep(2100)
    await manager.getToken('storm')
    expect(oidc.counts.refreshes - before).toBe(2)
    expect(store.saves).toHaveLength(2)
    expect(oidc.counts.grantErrors).toEqual([])
    expect(await oidc.grantAlive(grantId)).toBe(true)
  })

  it('a new process (another manager) starts from the store and never reuses a spent refresh token', async () => {
    const store = memoryStore()
    const grantId = await connected(store, 'restart')
    for (let i = 0; i < 3; i++) {
      const manager = new TokenManager({ store, refresher, refreshAhead: false })
      await manager.getToken('restart')
      await manager.close()
      await sleep(2100)
    }
    expect(store.saves).toHaveLength(3)
    expect(await oidc.grantAlive(grantId)).toBe(true)
  })

  it('rejects NOT_CONNECTED for a user with no row, STORE_FAILED when load fails, TypeError without store and refresher', async () => {
    const store = memoryStore()
    const manager = new TokenManager({ store, refresher })
    const e = await manager.getToken('nobody').catch((x) => x)
    expect(e).toBeInstanceOf(TokenRefreshError)
    expect(e).toMatchObject({ code: 'NOT_CONNECTED', userId: 'nobody' })

    const broken = new TokenManager({ store: { load: () => Promise.reject(new Error('db down')), save() {} }, refresher })
    const f = await broken.getToken('u').catch((x) => x)
    expect(f).toMatchObject({ code: 'STORE_FAILED', name: 'TokenRefreshError' })
    expect(f.cause.message).toBe('db down')

    for (const options of [{}, { store }, { refresher }]) {
      const m = new TokenManager(options)
      for (const call of [() => m.getToken('u'), () => m.fetch('u', 'http://127.0.0.1:9/'), () => m.forget('u'), () => m.revoke('u')]) {
        const err = await call().catch((x) => x)
        expect(err).toBeInstanceOf(TypeError)
        expect(err.message).toMatch(/needs options\.store and options\.refresher/)
      }
    }
    expect(() => new TokenManager({ store: { load() {} } })).toThrow(/options\.store\.save/)
    expect(() => new TokenManager({ refresher: 'x' })).toThrow(TypeError)
    expect(() => new TokenManager({ refreshAhead: { activeWindowMs: -1 } })).toThrow(RangeError)
    const bad = await manager.getToken('').catch((x) => x)
    expect(bad).toBeInstanceOf(TypeError)
  })

  it('a row of the wrong shape is a TypeError naming the field', async () => {
    const manager = new TokenManager({ store: { load: () => ({ accessToken: 5, expiresAt: new Date() }), save() {} }, refresher })
    const e = await manager.getToken('u').catch((x) => x)
    expect(e).toBeInstanceOf(TypeError)
    expect(e.message).toMatch(/store\.load\(\)\.accessToken/)
  })

  it('a row with expiresAt in epoch seconds is the same TypeError as a presented token in seconds, and nothing is refreshed', async () => {
    let refreshed = 0
    const seconds = Math.floor(Date.now() / 1000) + 3600
    const manager = new TokenManager({ store: { load: () => ({ accessToken: 'a', refreshToken: 'r', expiresAt: seconds }), save() {} }, refresher: async () => (refreshed++, { accessToken: 'b', expiresIn: 3600 }) })
    const e = await manager.getToken('u').catch((x) => x)
    expect(e).toBeInstanceOf(TypeError)
    expect(e.code).toBe('INVALID_ARGUMENT')
    expect(e.message).toBe(`store.load().expiresAt is ${seconds}, which looks like epoch seconds: epoch milliseconds are expected (multiply by 1000, or pass a Date)`)
    const presented = await manager.getValidToken('v', { accessToken: 'a', expiresAt: seconds }, async () => ({ accessToken: 'b', expiresIn: 3600 })).catch((x) => x)
    expect(presented.message.replace('token.expiresAt', 'store.load().expiresAt')).toBe(e.message)
    expect(refreshed).toBe(0)
    await manager.close()
  })

  it('a failed save loses nothing: the token is served, kept, retried, and reported once', async () => {
    const store = memoryStore()
    const warnings = []
    const logger = { warn: (f, m) => warnings.push([f.code, m]), error: () => {} }
    const manager = new TokenManager({ store, refresher, refreshAhead: false, logger })
    const grantId = await connected(store, 'flaky')
    store.failSaves(3)
    const t = await manager.getToken('flaky')
    // Answered although the save failed; held, not dropped.
    expect(manager.stats()).toMatchObject({ saveFailures: 1, unsavedTokens: 1 })
    expect((await manager.getToken('flaky')).accessToken).toBe(t.accessToken)
    expect(warnings.filter(([c]) => c === 'TTM_STORE_SAVE_FAILED')).toHaveLength(1)
    // Retried with backoff (250 ms, 500 ms, ...) until it lands.
    for (let i = 0; i < 60 && store.rows.get('flaky').accessToken !== t.accessToken; i++) await sleep(100)
    expect(store.rows.get('flaky').accessToken).toBe(t.accessToken)
    expect(manager.stats()).toMatchObject({ saveFailures: 3, unsavedTokens: 0 })
    expect(warnings.filter(([c]) => c === 'TTM_STORE_SAVE_FAILED')).toHaveLength(1)
    // The saved refresh token is the live one.
    await sleep(2100)
    await new TokenManager({ store, refresher, refreshAhead: false }).getToken('flaky')
    expect(await oidc.grantAlive(grantId)).toBe(true)
  })

  it('close() makes one last attempt at a token still unsaved', async () => {
    const store = memoryStore()
    const manager = new TokenManager({ store, refresher, refreshAhead: false, logger: { warn() {}, error() {} } })
    await connected(store, 'closing')
    store.failSaves(1)
    const t = await manager.getToken('closing')
    expect(store.rows.get('closing').accessToken).not.toBe(t.accessToken)
    await manager.close()
    expect(store.rows.get('closing').accessToken).toBe(t.accessToken)
  })

  it('a save answering false (someone else wrote the row) keeps whichever token expires later', async () => {
    const store = memoryStore()
    const realSave = store.save
    const later = new Date(Date.now() + 3_600_000)
    let raced = false
    // The manager reads the store's methods once, when it is made.
    store.save = async (userId, token, previous) => {
      if (!raced) {
        // Another process saved a token that lives longer, just before us.
        raced = true
        store.rows.set(userId, { accessToken: 'written-elsewhere', refreshToken: 'rt-elsewhere', expiresAt: later })
      }
      return realSave(userId, token, previous)
    }
    const manager = new TokenManager({ store, refresher, refreshAhead: false })
    await connected(store, 'raced')
    await manager.getToken('raced')
    expect(store.rows.get('raced').accessToken).toBe('written-elsewhere')
    // The manager took the row's token rather than overwrite it.
    expect(await manager.getToken('raced')).toEqual({ accessToken: 'written-elsewhere', expiresAt: later })
  })

  it('short-lived tokens get half their lifetime as buffer: two-minute tokens under the 5-minute default refresh once', async () => {
    oidc.setAccessTtl(120)
    try {
      const store = memoryStore()
      const manager = new TokenManager({ store, refresher, refreshAhead: false })
      await connected(store, 'short-lived')
      const before = oidc.counts.refreshes
      const first = await manager.getToken('short-lived')
      for (let i = 0; i < 20; i++) expect(await manager.getToken('short-lived')).toEqual(first)
      expect(oidc.counts.refreshes - before).toBe(1)
      // getValidToken too: the core knows the lifetime of the token it issued.
      const row = store.rows.get('short-lived')
      for (let i = 0; i < 5; i++) expect((await manager.getValidToken('short-lived', row, refresher)).shouldUpdate).toBe(false)
      expect(oidc.counts.refreshes - before).toBe(1)
      // Still due at half its lifetime.
      const late = new TokenManager({ store, refresher, refreshAhead: false, now: () => row.expiresAt.getTime() - 59_000 })
      await late.getToken('short-lived')
      expect(oidc.counts.refreshes - before).toBe(2)
    } finally {
      oidc.setAccessTtl(2)
    }
  })
})

describe('refresh ahead', () => {
  it('active users are refreshed before their buffer: no call waits on a refresh; idle users are left alone', async () => {
    oidc.setAccessTtl(4)
    try {
      const store = memoryStore()
      // A bank whose token call takes 300 ms: a call that waits on one shows.
      let refreshing = 0
      const slowBank = async (ctx) => {
        refreshing++
        await sleep(300)
        return refresher(ctx)
      }
      // 4 s tokens, 1 s buffer: fresh for 3 s, refreshed ahead 2.25-2.7 s after they came.
      const manager = new TokenManager({ store, refresher: slowBank, bufferTimeMs: 1000, refreshAhead: { activeWindowMs: 1500 } })
      await connected(store, 'active')
      await connected(store, 'idle')
      await manager.getToken('idle')
      await manager.getToken('active')
      const refreshesBefore = oidc.counts.refreshes
      const savesBefore = store.saves.length
      let slowest = 0
      const until = Date.now() + 9_000
      while (Date.now() < until) {
        const started = performance.now()
        await manager.getToken('active')
        slowest = Math.max(slowest, performance.now() - started)
        await sleep(50)
      }
      // A call that waited on a refresh took 300 ms or more.
      expect(refreshing).toBeGreaterThan(3)
      expect(slowest).toBeLessThan(150)
      const activeSaves = store.saves.slice(savesBefore).filter((s) => s.userId === 'active')
      expect(activeSaves.length).toBeGreaterThanOrEqual(3)
      expect(activeSaves.length).toBeLessThanOrEqual(4)
      expect(store.saves.slice(savesBefore).filter((s) => s.userId === 'idle')).toEqual([])
      expect(manager.stats().backgroundRefreshes).toBe(activeSaves.length)
      expect(oidc.counts.refreshes - refreshesBefore).toBe(activeSaves.length)
      expect(oidc.counts.grantErrors).toEqual([])
    } finally {
      oidc.setAccessTtl(2)
    }
  })
})

describe('fetch', () => {
  it('attaches the token; on a 401 invalidates it and retries once with a fresh one', async () => {
    const store = memoryStore()
    const manager = new TokenManager({ store, refresher, refreshAhead: false })
    const grantId = await connected(store, 'fetcher')
    const ok = await manager.fetch('fetcher', `${oidc.apiUrl}/accounts`)
    expect(ok.status).toBe(200)
    expect(await ok.json()).toMatchObject({ accountId: 'fetcher' })
    const first = store.rows.get('fetcher').accessToken
    expect(oidc.api.seen.at(-1).authorization).toBe(`Bearer ${first}`)

    // The bank revokes the access token (still unexpired here).
    await (await oidc.provider.AccessToken.find(first)).destroy()
    oidc.api.seen.length = 0
    const retried = await manager.fetch('fetcher', `${oidc.apiUrl}/payments`, { method: 'POST', body: JSON.stringify({ amount: 5 }), headers: { 'content-type': 'application/json' } })
    expect(retried.status).toBe(200)
    expect(oidc.api.seen.map((s) => s.ok)).toEqual([false, true])
    expect(oidc.api.seen[1].body).toBe('{"amount":5}')
    const second = store.rows.get('fetcher').accessToken
    expect(second).not.toBe(first)
    expect(oidc.api.seen[1].authorization).toBe(`Bearer ${second}`)
    expect(await oidc.grantAlive(grantId)).toBe(true)

    // A Request with a body is sent again too (cloned before the first try).
    await (await oidc.provider.AccessToken.find(second)).destroy()
    oidc.api.seen.length = 0
    const viaRequest = await manager.fetch('fetcher', new Request(`${oidc.apiUrl}/payments`, { method: 'POST', body: 'req-body' }))
    expect(viaRequest.status).toBe(200)
    expect(oidc.api.seen.map((s) => [s.ok, s.body])).toEqual([
      [false, 'req-body'],
      [true, 'req-body'],
    ])
  })

  it('returns the 401 when the body is a stream it cannot send again, and any other status as is', async () => {
    const store = memoryStore()
    const manager = new TokenManager({ store, refresher, refreshAhead: false })
    await connected(store, 'streamer')
    await manager.getToken('streamer')
    await (await oidc.provider.AccessToken.find(store.rows.get('streamer').accessToken)).destroy()
    oidc.api.seen.length = 0
    const body = new ReadableStream({
      start(c) {
        c.enqueue(new TextEncoder().encode('once'))
        c.close()
      },
    })
    const res = await manager.fetch('streamer', `${oidc.apiUrl}/upload`, { method: 'POST', body, duplex: 'half' })
    expect(res.status).toBe(401)
    expect(oidc.api.seen).toHaveLength(1)

    // Another status: returned, no retry.
    let calls = 0
    const teapot = new TokenManager({
      store,
      refresher,
      refreshAhead: false,
      fetch: async () => {
        calls++
        return new Response('no', { status: 403 })
      },
    })
    expect((await teapot.fetch('streamer', 'https://api.example/x')).status).toBe(403)
    expect(calls).toBe(1)
  })

  it("leaves a caller's own Authorization alone, and uses the fetch option", async () => {
    const store = memoryStore()
    await connected(store, 'own-auth')
    const sent = []
    const manager = new TokenManager({
      store,
      refresher,
      refreshAhead: false,
      fetch: async (input, init) => {
        sent.push(new Headers(init?.headers).get('authorization'))
        return new Response('{}', { status: 401 })
      },
    })
    const res = await manager.fetch('own-auth', 'https://api.example/x', { headers: { Authorization: 'Basic abc' } })
    expect(res.status).toBe(401)
    expect(sent).toEqual(['Basic abc'])
    expect(store.saves).toEqual([])
  })

  it('rejects with NOT_CONNECTED for a user with no row, sending nothing', async () => {
    let sent = 0
    const manager = new TokenManager({ store: memoryStore(), refresher, fetch: async () => (sent++, new Response()) })
    await expect(manager.fetch('nobody', 'https://api.example/')).rejects.toMatchObject({ code: 'NOT_CONNECTED' })
    expect(sent).toBe(0)
  })
})

describe('forget', () => {
  it('deletes the row and drops the token: getToken rejects NOT_CONNECTED until a new row', async () => {
    const store = memoryStore()
    const manager = new TokenManager({ store, refresher, refreshAhead: false })
    await connected(store, 'leaver')
    const t = await manager.getToken('leaver')
    await manager.forget('leaver')
    expect(store.rows.has('leaver')).toBe(false)
    await expect(manager.getToken('leaver')).rejects.toMatchObject({ code: 'NOT_CONNECTED' })
    // Its old token is not served through getValidToken either.
    const old = { accessToken: t.accessToken, expiresAt: t.expiresAt }
    let called = 0
    await manager.getValidToken('leaver', old, async () => (called++, { accessToken: 'new', expiresIn: 60 }))
    expect(called).toBe(1)
    // Connecting again works.
    await connected(store, 'leaver')
    expect((await manager.getToken('leaver')).accessToken).not.toBe(t.accessToken)
  })

  it('a refresh in flight when the user is forgotten does not bring the row back', async () => {
    const store = memoryStore()
    let release
    const slow = async (ctx) => {
      await new Promise((r) => (release = r))
      return refresher(ctx)
    }
    const manager = new TokenManager({ store, refresher: slow, refreshAhead: false })
    await connected(store, 'mid-flight')
    const pending = manager.getToken('mid-flight').catch((e) => e)
    while (release === undefined) await sleep(5)
    await manager.forget('mid-flight')
    release()
    await pending
    await sleep(50)
    expect(store.rows.has('mid-flight')).toBe(false)
    await expect(manager.getToken('mid-flight')).rejects.toMatchObject({ code: 'NOT_CONNECTED' })
  })
})

describe('revoke', () => {
  it('revokes the refresh token at the provider (RFC 7009), then forgets the user', async () => {
    const revoking = oauth2Refresher({ tokenUrl: oidc.tokenUrl, revocationUrl: oidc.revocationUrl, clientId: 'app', clientSecret: 'app-secret' })
    const store = memoryStore()
    const manager = new TokenManager({ store, refresher: revoking, refreshAhead: false })
    await connected(store, 'revoker')
    await manager.getToken('revoker')
    const saved = store.rows.get('revoker').refreshToken
    await manager.revoke('revoker')
    expect(store.rows.has('revoker')).toBe(false)
    await expect(manager.getToken('revoker')).rejects.toMatchObject({ code: 'NOT_CONNECTED' })
    // The provider no longer honours the refresh token.
    await expect(revoking({ userId: 'revoker', refreshToken: saved })).rejects.toMatchObject({ code: 'REAUTH_REQUIRED' })
  })

  it('needs a refresher with a revocation endpoint', async () => {
    const store = memoryStore()
    await connected(store, 'no-revocation')
    const manager = new TokenManager({ store, refresher, refreshAhead: false })
    const e = await manager.revoke('no-revocation').catch((x) => x)
    expect(e).toBeInstanceOf(TypeError)
    expect(e.message).toMatch(/revocation/)
    // Nothing was forgotten.
    expect(store.rows.has('no-revocation')).toBe(true)
  })
})
