// oauth2Refresher against a real, certified OAuth 2.0 server (oidc-provider)
// that rotates refresh tokens and revokes the whole grant when a spent one is
// presented again. If any caller ever resent a refresh token, a grant would
// die here and later refreshes would fail with invalid_grant.
import http from 'node:http'
import { createRequire } from 'node:module'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import Provider from 'oidc-provider'

import { TokenManager, TokenRefreshError, oauth2Refresher, tarabutRefresher } from '../index.mjs'

// What TokenManager.revoke calls: not public API of their own.
const { canRevoke, nativeRevoke } = createRequire(import.meta.url)('../lib/refreshers.js')

const USERS = 20
const CALLERS = 100
const ROUNDS = 3
const ACCESS_TTL_S = 2

let server
let provider
let tokenUrl
let revocationUrl
const refreshGrants = { count: 0 }
const grantErrors = []

beforeAll(async () => {
  server = http.createServer()
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  const issuer = `http://127.0.0.1:${server.address().port}`
  provider = new Provider(issuer, {
    clients: [
      { client_id: 'basic-app', client_secret: 'basic-secret', grant_types: ['authorization_code', 'refresh_token'], redirect_uris: ['https://app.example/cb'] },
      {
        client_id: 'post-app',
        client_secret: 'post-secret',
        grant_types: ['authorization_code', 'refresh_token'],
        redirect_uris: ['https://app.example/cb'],
        token_endpoint_auth_method: 'client_secret_post',
      },
    ],
    rotateRefreshToken: true,
    ttl: { AccessToken: ACCESS_TTL_S, RefreshToken: 300, Grant: 300 },
    findAccount: (ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
    features: { devInteractions: { enabled: false }, revocation: { enabled: true } },
  })
  provider.on('grant.success', (ctx) => {
    if (ctx.oidc.params.grant_type === 'refresh_token') refreshGrants.count++
  })
  provider.on('grant.error', (ctx, err) => grantErrors.push(err.error))
  server.on('request', provider.callback())
  tokenUrl = `${issuer}/token`
  revocationUrl = `${issuer}/token/revocation`
})

afterAll(async () => {
  server.closeAllConnections()
  await new Promise((r) => server.close(r))
})

/** A grant and its first refresh token, as an authorization-code flow would leave them. */
async function connect(accountId, clientId) {
  const client = await provider.Client.find(clientId)
  const grant = new provider.Grant({ accountId, clientId })
  grant.addOIDCScope('offline_access')
  const grantId = await grant.save()
  const refreshToken = await new provider.RefreshToken({ accountId, grantId, client, scope: 'offline_access', gty: 'authorization_code' }).save()
  return { grantId, refreshToken }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

describe('oauth2Refresher with oidc-provider (rotateRefreshToken: true)', () => {
  it(`${USERS} users x ${CALLERS} concurrent callers x ${ROUNDS} rounds: one refresh per user per round, no grant lost`, async () => {
    const refresher = oauth2Refresher({ tokenUrl, clientId: 'basic-app', clientSecret: 'basic-secret' })
    const users = Array.from({ length: USERS }, (_, i) => `oidc-user-${i}`)
    // The app's database: what each user's row holds.
    const db = new Map()
    const grants = new Map()
    const firstRefreshTokens = new Map()
    for (const u of users) {
      const { grantId, refreshToken } = await connect(u, 'basic-app')
      grants.set(u, grantId)
      firstRefreshTokens.set(u, refreshToken)
      db.set(u, { accessToken: 'never-issued', refreshToken, expiresAt: new Date(Date.now() - 1000) })
    }

    for (let round = 1; round <= ROUNDS; round++) {
      // Every stored token has expired (the server's TTL is short).
      const latest = Math.max(...[...db.values()].map((r) => r.expiresAt.getTime()))
      if (latest >= Date.now()) await sleep(latest - Date.now() + 50)
      const before = refreshGrants.count
      const errorsBefore = grantErrors.length
      // A new manager per round: a restarted process, which knows nothing
      // but what the database holds.
      const manager = new TokenManager()
      const calls = users.flatMap((u) => Array.from({ length: CALLERS }, () => manager.getValidToken(u, db.get(u), refresher).then((v) => [u, v])))
      const results = await Promise.all(calls)

      expect(grantErrors.slice(errorsBefore)).toEqual([])
      expect(refreshGrants.count - before).toBe(USERS)
      for (const u of users) {
        const mine = results.filter(([user]) => user === u).map(([, v]) => v)
        expect(mine).toHaveLength(CALLERS)
        expect(new Set(mine.map((v) => v.accessToken)).size).toBe(1)
        const leaders = mine.filter((v) => v.shouldUpdate)
        expect(leaders).toHaveLength(1)
        expect(leaders[0].refreshToken).toEqual(expect.any(String))
        expect(leaders[0].refreshToken).not.toBe(db.get(u).refreshToken)
        // Persist only what shouldUpdate says to.
        db.set(u, { accessToken: leaders[0].accessToken, refreshToken: leaders[0].refreshToken, expiresAt: leaders[0].expiresAt })
      }
    }

    expect(grantErrors.filter((e) => e === 'invalid_grant')).toEqual([])
    for (const u of users) expect(await provider.Grant.find(grants.get(u)), u).toBeDefined()

    // A spent refresh token, on purpose: the user must reconnect, and the
    // server has revoked the grant (which is why we never resend).
    const victim = users[0]
    const e = await new TokenManager()
      .getValidToken(victim, { accessToken: 'x', refreshToken: firstRefreshTokens.get(victim), expiresAt: 0 }, refresher)
      .catch((err) => err)
    expect(e).toBeInstanceOf(TokenRefreshError)
    expect(e).toMatchObject({ code: 'REAUTH_REQUIRED', status: 400, error: 'invalid_grant', userId: victim })
    expect(e.message).not.toContain(firstRefreshTokens.get(victim))
    expect(await provider.Grant.find(grants.get(victim))).toBeUndefined()
    for (const u of users.slice(1)) expect(await provider.Grant.find(grants.get(u))).toBeDefined()
  })

  it('client_secret_post works, and a wrong secret is INVALID_CLIENT', async () => {
    const { refreshToken } = await connect('post-user', 'post-app')
    const good = oauth2Refresher({ tokenUrl, clientId: 'post-app', clientSecret: 'post-secret', authMethod: 'client_secret_post' })
    const t = await good({ userId: 'post-user', refreshToken })
    expect(t).toMatchObject({ accessToken: expect.any(String), refreshToken: expect.any(String), expiresIn: ACCESS_TTL_S })

    const bad = oauth2Refresher({ tokenUrl, clientId: 'post-app', clientSecret: 'not-the-secret', authMethod: 'client_secret_post' })
    const e = await bad({ userId: 'post-user', refreshToken: t.refreshToken }).catch((err) => err)
    expect(e).toMatchObject({ code: 'INVALID_CLIENT', status: 401, error: 'invalid_client' })
    // The refresh token was not spent by the rejected call.
    const again = await good({ userId: 'post-user', refreshToken: t.refreshToken })
    expect(again.accessToken).not.toBe(t.accessToken)
  })
})

describe('oauth2Refresher revocation (RFC 7009) with oidc-provider', () => {
  it('a revoked refresh token is refused afterwards (REAUTH_REQUIRED), and so is its grant', async () => {
    const refresher = oauth2Refresher({ tokenUrl, revocationUrl, clientId: 'basic-app', clientSecret: 'basic-secret' })
    expect(canRevoke(refresher)).toBe(true)
    const { grantId, refreshToken } = await connect('revoke-user', 'basic-app')
    const t = await refresher({ userId: 'revoke-user', refreshToken })

    await expect(nativeRevoke(refresher, 'revoke-user', t.refreshToken, 5000)).resolves.toBeUndefined()
    expect(await provider.Grant.find(grantId)).toBeUndefined()
    const e = await refresher({ userId: 'revoke-user', refreshToken: t.refreshToken }).catch((err) => err)
    expect(e).toBeInstanceOf(TokenRefreshError)
    expect(e).toMatchObject({ code: 'REAUTH_REQUIRED', status: 400, error: 'invalid_grant' })

    // RFC 7009 section 2.2: a token the server does not know (already
    // revoked, or never issued) is answered 200, which is success.
    await expect(nativeRevoke(refresher, 'revoke-user', t.refreshToken, null)).resolves.toBeUndefined()
    await expect(nativeRevoke(refresher, 'revoke-user', 'never-issued', null)).resolves.toBeUndefined()
  })

  it('client_secret_post authenticates the revocation too; a wrong secret is REVOKE_FAILED and revokes nothing', async () => {
    const options = { tokenUrl, revocationUrl, clientId: 'post-app', authMethod: 'client_secret_post' }
    const good = oauth2Refresher({ ...options, clientSecret: 'post-secret' })
    const bad = oauth2Refresher({ ...options, clientSecret: 'not-the-secret' })
    const { grantId, refreshToken } = await connect('revoke-post-user', 'post-app')

    const e = await nativeRevoke(bad, 'revoke-post-user', refreshToken, null).catch((err) => err)
    expect(e).toBeInstanceOf(TokenRefreshError)
    expect(e).toMatchObject({ code: 'REVOKE_FAILED', status: 401, error: 'invalid_client', userId: 'revoke-post-user' })
    expect(e.message).not.toContain(refreshToken)
    expect(await provider.Grant.find(grantId)).toBeDefined()

    await nativeRevoke(good, 'revoke-post-user', refreshToken, null)
    expect(await provider.Grant.find(grantId)).toBeUndefined()
  })

  it('only an oauth2Refresher with a revocationUrl revokes; anything else is a TypeError before any request', async () => {
    const plain = oauth2Refresher({ tokenUrl, clientId: 'basic-app', clientSecret: 'basic-secret' })
    const tarabut = tarabutRefresher({ clientId: 'c', clientSecret: 's', tokenUrl })
    const custom = async () => ({ accessToken: 'a', expiresIn: 60 })
    for (const r of [plain, tarabut, custom, null]) {
      expect(canRevoke(r)).toBe(false)
      await expect(nativeRevoke(r, 'u', 'rt', null)).rejects.toMatchObject({ name: 'TypeError', code: 'INVALID_ARGUMENT' })
    }
    const r = oauth2Refresher({ tokenUrl, revocationUrl, clientId: 'basic-app', clientSecret: 'basic-secret' })
    await expect(nativeRevoke(r, 'u', '', null)).rejects.toMatchObject({ name: 'TypeError', message: expect.stringMatching(/^refreshToken /) })
    expect(() => oauth2Refresher({ tokenUrl, revocationUrl: 'http://idp.example/revoke', clientId: 'c', clientSecret: 's' })).toThrow(
      expect.objectContaining({ name: 'TypeError', code: 'INVALID_ARGUMENT', message: expect.stringMatching(/^revocationUrl /) }),
    )
  })
})
