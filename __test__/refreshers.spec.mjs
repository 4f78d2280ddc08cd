// Native refreshers through the built addon: tarabutRefresher against a
// Tarabut-compatible server that checks every request's shape, and
// oauth2Refresher against servers that misbehave on purpose. The real
// OAuth2 server (oidc-provider) is in oidc.spec.mjs.
import http from 'node:http'
import { spawnSync } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'

import { TokenManager, TokenRefreshError, getValidToken, oauth2Refresher, tarabutRefresher } from '../index.mjs'
import { startTarabutServer } from './helpers/tarabut-server.mjs'

const ROOT = fileURLToPath(new URL('..', import.meta.url))
const EXPIRED = { accessToken: 'expired-token', expiresAt: new Date(Date.now() - 60_000) }

let server
beforeAll(async () => {
  server = await startTarabutServer({ expiresIn: 3600 })
})
afterAll(() => server.close())
afterEach(() => {
  expect(server.rejected, JSON.stringify(server.rejections)).toBe(0)
  server.reset()
})

function refresher(extra = {}) {
  return tarabutRefresher({ clientId: server.clientId, clientSecret: server.clientSecret, tokenUrl: server.tokenUrl, ...extra })
}

async function rejection(promise) {
  try {
    await promise
  } catch (e) {
    return e
  }
  throw new Error('expected a rejection')
}

/** Waits (bounded) until `check()` is true. */
async function eventually(check, ms = 5000) {
  const until = Date.now() + ms
  while (!check()) {
    if (Date.now() > until) throw new Error('condition not met in time')
    await new Promise((r) => setTimeout(r, 10))
  }
}

describe('tarabutRefresher through getValidToken', () => {
  it('sends the documented request and coalesces concurrent callers into one token call', async () => {
    const manager = new TokenManager()
    const r = refresher()
    const results = await Promise.all(Array.from({ length: 50 }, () => manager.getValidToken('user-1', EXPIRED, r)))
    expect(server.requestsFor('user-1')).toBe(1)
    expect(server.issued).toBe(1)
    const current = server.currentToken('user-1')
    expect(new Set(results.map((x) => x.accessToken))).toEqual(new Set([current.accessToken]))
    expect(results.filter((x) => x.shouldUpdate)).toHaveLength(1)
    expect(results[0].expiresAt.getTime()).toBeGreaterThan(Date.now() + 3500_000)
    expect(manager.stats()).toMatchObject({ refreshes: 1, coalesced: 49 })
  })

  it('works with the process-wide getValidToken and a scope', async () => {
    const v = await getValidToken('user-scope', EXPIRED, refresher({ scope: 'accounts transactions' }))
    expect(v.shouldUpdate).toBe(true)
    expect(server.isCurrent('user-scope', v.accessToken)).toBe(true)
    expect(server.currentToken('user-scope').scope).toBe('accounts transactions')
  })

  it('refreshes users independently', async () => {
    const manager = new TokenManager()
    const r = refresher()
    const users = Array.from({ length: 20 }, (_, i) => `user-${i}`)
    const results = await Promise.all(users.flatMap((u) => [0, 1, 2].map(() => manager.getValidToken(u, EXPIRED, r).then((v) => [u, v]))))
    for (const [u, v] of results) expect(server.isCurrent(u, v.accessToken)).toBe(true)
    for (const u of users) expect(server.requestsFor(u)).toBe(1)
  })

  it('401 rejects with INVALID_CLIENT, status and provider error, without a retry', async () => {
    const r = tarabutRefresher({ clientId: server.clientId, clientSecret: 'wrong-secret-value', tokenUrl: server.tokenUrl })
    const e = await rejection(new TokenManager().getValidToken('user-401', EXPIRED, r))
    expect(e).toBeInstanceOf(TokenRefreshError)
    expect(e).toMatchObject({ code: 'INVALID_CLIENT', status: 401, error: 'invalid_client', userId: 'user-401' })
    expect(e.message).not.toContain('wrong-secret-value')
    expect(server.requestsFor('user-401')).toBe(1)
    server.reset() // the refusal above was the point of this test
  })

  it('honours Retry-After on 429, then succeeds', async () => {
    server.inject({ status: 429, retryAfter: 1 })
    const started = Date.now()
    const v = await new TokenManager().getValidToken('user-429', EXPIRED, refresher())
    expect(Date.now() - started).toBeGreaterThanOrEqual(950)
    expect(server.requestsFor('user-429')).toBe(2)
    expect(server.isCurrent('user-429', v.accessToken)).toBe(true)
  })

  it('retries 500s with backoff and gives up after maxRetries with the last status', async () => {
    server.inject({ status: 500 }, { times: 2 })
    const v = await new TokenManager().getValidToken('user-500', EXPIRED, refresher())
    expect(server.requestsFor('user-500')).toBe(3)
    expect(server.isCurrent('user-500', v.accessToken)).toBe(true)

    server.inject({ status: 503 }, { times: 10 })
    const e = await rejection(new TokenManager().getValidToken('user-503', EXPIRED, refresher({ maxRetries: 1 })))
    expect(e).toMatchObject({ code: 'REFRESH_FAILED', status: 503, error: 'server_error' })
    expect(server.requestsFor('user-503')).toBe(2)
  })

  it('malformed JSON is REFRESH_FAILED without the body in the message, and not retried', async () => {
    server.inject({ malformed: true })
    const e = await rejection(new TokenManager().getValidToken('user-bad-json', EXPIRED, refresher()))
    expect(e).toMatchObject({ code: 'REFRESH_FAILED', status: 200 })
    expect(e.message).not.toContain('tg_broken')
    expect(server.requestsFor('user-bad-json')).toBe(1)
  })

  it('a slow answer times out at the manager refreshTimeoutMs and the request is aborted', async () => {
    server.inject({ delayMs: 10_000 })
    const manager = new TokenManager({ refreshTimeoutMs: 300 })
    const e = await rejection(manager.getValidToken('user-slow', EXPIRED, refresher()))
    expect(e).toMatchObject({ code: 'REFRESH_TIMEOUT', userId: 'user-slow' })
    await eventually(() => server.aborted === 1)
    expect(server.issued).toBe(0)
    expect(manager.stats()).toMatchObject({ timeouts: 1, inFlight: 0 })
    // The next call starts a fresh refresh.
    const v = await manager.getValidToken('user-slow', EXPIRED, refresher())
    expect(server.isCurrent('user-slow', v.accessToken)).toBe(true)
  })

  it("the refresher's own timeoutMs caps the manager's", async () => {
    server.inject({ delayMs: 10_000 })
    const e = await rejection(new TokenManager({ refreshTimeoutMs: 20_000 }).getValidToken('user-own-timeout', EXPIRED, refresher({ timeoutMs: 200 })))
    expect(e.code).toBe('REFRESH_TIMEOUT')
    await eventually(() => server.aborted === 1)
  })

  it('a user id over 40 characters is a TypeError before any request', async () => {
    const e = await rejection(new TokenManager().getValidToken('u'.repeat(41), EXPIRED, refresher()))
    expect(e).toBeInstanceOf(TypeError)
    expect(e.code).toBe('INVALID_ARGUMENT')
    expect(server.tokenRequests).toBe(0)
    const ok = await new TokenManager().getValidToken('u'.repeat(40), EXPIRED, refresher())
    expect(server.isCurrent('u'.repeat(40), ok.accessToken)).toBe(true)
  })

  it('serves a caller its own still-valid token when the refresh fails (stale, counted)', async () => {
    server.inject({ status: 500 }, { times: 10 })
    const manager = new TokenManager({ bufferTimeMs: 60_000 })
    const own = { accessToken: 'still-valid', expiresAt: new Date(Date.now() + 30_000) }
    const v = await manager.getValidToken('user-stale', own, refresher({ maxRetries: 0 }))
    expect(v).toMatchObject({ accessToken: 'still-valid', shouldUpdate: false })
    expect(manager.stats()).toMatchObject({ failures: 1, staleServed: 1 })
  })
})

describe('tarabutRefresher called as a RefreshFn', () => {
  it('returns { accessToken, expiresIn } and can be wrapped', async () => {
    const r = refresher()
    const t = await r({ userId: 'direct-user' })
    expect(t).toEqual({ accessToken: server.currentToken('direct-user').accessToken, expiresIn: 3600 })
    let calls = 0
    const wrapped = async (ctx) => {
      calls++
      return r(ctx)
    }
    const v = await new TokenManager().getValidToken('wrapped-user', EXPIRED, wrapped)
    expect(calls).toBe(1)
    expect(server.isCurrent('wrapped-user', v.accessToken)).toBe(true)
  })

  it('a wrapped refresher times out through ctx.signal, which aborts the request', async () => {
    server.inject({ delayMs: 10_000 })
    const r = refresher()
    const wrapped = (ctx) => r(ctx)
    const e = await rejection(new TokenManager({ refreshTimeoutMs: 300 }).getValidToken('wrapped-slow', EXPIRED, wrapped))
    expect(e.code).toBe('REFRESH_TIMEOUT')
    await eventually(() => server.aborted === 1)
  })

  it('honours an AbortSignal: rejects with its reason and drops the request', async () => {
    server.inject({ delayMs: 10_000 })
    const controller = new AbortController()
    const pending = refresher()({ userId: 'abort-user', signal: controller.signal })
    await eventually(() => server.tokenRequests === 1)
    const reason = new Error('caller gave up')
    controller.abort(reason)
    expect(await rejection(pending)).toBe(reason)
    await eventually(() => server.aborted === 1)

    const already = AbortSignal.abort(reason)
    expect(await rejection(refresher()({ userId: 'abort-user', signal: already }))).toBe(reason)
    expect(server.tokenRequests).toBe(1)
  })

  it('rejects bad contexts with a TypeError', async () => {
    const r = refresher()
    for (const ctx of [null, 'user', {}, { userId: '' }, { userId: 'u', refreshToken: 5 }, { userId: 'u', signal: {} }]) {
      const e = await rejection(r(ctx))
      expect(e).toBeInstanceOf(TypeError)
      expect(e.code).toBe('INVALID_ARGUMENT')
    }
    expect(server.tokenRequests).toBe(0)
  })
})

describe('refresher options', () => {
  const base = { clientId: 'id', clientSecret: 'secret-value-123' }
  it.each([
    [undefined, /^options must be an object/],
    [{ clientSecret: 'x' }, /^options\.clientId is required/],
    [{ ...base, clientSecret: 42 }, /^options\.clientSecret must be a string/],
    [{ ...base, tokenURL: 'https://x' }, /^options\.tokenURL is not a tarabutRefresher option/],
    [{ ...base, tokenUrl: 'http://tarabut.example/token' }, /^tokenUrl must be an https URL/],
    [{ ...base, tokenUrl: 'not a url' }, /^tokenUrl must be an absolute URL/],
    [{ ...base, maxRetries: 11 }, /^maxRetries must be a whole number from 0 to 10/],
    [{ ...base, timeoutMs: 0 }, /^timeoutMs must be a whole number/],
    [{ ...base, clientId: '' }, /^clientId must be a non-empty string/],
  ])('tarabutRefresher(%j) throws a TypeError', (options, message) => {
    let err
    try {
      tarabutRefresher(options)
    } catch (e) {
      err = e
    }
    expect(err).toBeInstanceOf(TypeError)
    expect(err.code).toBe('INVALID_ARGUMENT')
    expect(err.message).toMatch(message)
    expect(err.message).not.toContain('secret-value-123')
  })

  it('oauth2Refresher validates its options', () => {
    const ok = { tokenUrl: 'https://idp.example/token', clientId: 'id', clientSecret: 's' }
    expect(typeof oauth2Refresher(ok)).toBe('function')
    expect(oauth2Refresher(ok).name).toBe('oauth2Refresher')
    for (const [bad, message] of [
      [{ ...ok, tokenUrl: undefined }, /^options\.tokenUrl is required/],
      [{ ...ok, authMethod: 'client_secret_jwt' }, /^authMethod must be 'client_secret_basic', 'client_secret_post'/],
      [{ ...ok, maxRetries: 2 }, /^options\.maxRetries is not a oauth2Refresher option/],
    ]) {
      expect(() => oauth2Refresher(bad)).toThrow(message)
    }
  })
})

describe('oauth2Refresher against misbehaving servers', () => {
  /** A server whose every answer is `handler(req, body, res)`; counts requests. */
  async function rawServer(handler) {
    const s = http.createServer((req, res) => {
      let body = ''
      req.on('data', (c) => (body += c))
      req.on('end', () => {
        s.requests.push({ headers: req.headers, body })
        handler(req, body, res)
      })
    })
    s.requests = []
    await new Promise((r) => s.listen(0, '127.0.0.1', r))
    s.tokenUrl = `http://127.0.0.1:${s.address().port}/token`
    s.stop = () => {
      s.closeAllConnections()
      return new Promise((r) => s.close(r))
    }
    return s
  }

  it('a connection cut after the request was sent is an error, never a resend', async () => {
    const s = await rawServer((req) => req.socket.destroy())
    try {
      const r = oauth2Refresher({ tokenUrl: s.tokenUrl, clientId: 'app', clientSecret: 'app-secret' })
      const e = await rejection(new TokenManager().getValidToken('u', { ...EXPIRED, refreshToken: 'rt-once' }, r))
      expect(e).toMatchObject({ code: 'REFRESH_FAILED' })
      expect(e.status).toBeUndefined()
      expect(s.requests).toHaveLength(1)
      expect(s.requests[0].body).toBe('grant_type=refresh_token&refresh_token=rt-once')
      expect(s.requests[0].headers.authorization).toBe(`Basic ${Buffer.from('app:app-secret').toString('base64')}`)
    } finally {
      await s.stop()
    }
  })

  it('a 503 is not resent either; invalid_grant is REAUTH_REQUIRED', async () => {
    let status = 503
    const s = await rawServer((req, body, res) => {
      res.writeHead(status, { 'content-type': 'application/json' })
      res.end(JSON.stringify(status === 400 ? { error: 'invalid_grant', error_description: 'rt-spent was used' } : { error: 'temporarily_unavailable' }))
    })
    try {
      const r = oauth2Refresher({ tokenUrl: s.tokenUrl, clientId: 'app', clientSecret: 'app-secret', authMethod: 'client_secret_post' })
      const e = await rejection(r({ userId: 'u', refreshToken: 'rt-spent' }))
      expect(e).toMatchObject({ code: 'REFRESH_FAILED', status: 503, error: 'temporarily_unavailable' })
      expect(s.requests).toHaveLength(1)
      expect(s.requests[0].body).toBe('grant_type=refresh_token&refresh_token=rt-spent&client_id=app&client_secret=app-secret')
      status = 400
      const e2 = await rejection(r({ userId: 'u', refreshToken: 'rt-spent' }))
      expect(e2).toMatchObject({ code: 'REAUTH_REQUIRED', status: 400, error: 'invalid_grant' })
      expect(e2.message).not.toContain('rt-spent')
    } finally {
      await s.stop()
    }
  })

  it('a rotated refresh token reaches the caller that must persist it', async () => {
    const s = await rawServer((req, body, res) => {
      res.writeHead(200, { 'content-type': 'application/json' })
      res.end(JSON.stringify({ access_token: 'at-new', token_type: 'Bearer', expires_in: 900, refresh_token: 'rt-rotated' }))
    })
    try {
      const r = oauth2Refresher({ tokenUrl: s.tokenUrl, clientId: 'app', clientSecret: 'app-secret' })
      const results = await Promise.all(
        Array.from({ length: 10 }, () => new TokenManager().getValidToken('u', { ...EXPIRED, refreshToken: 'rt-old' }, r)),
      )
      // Ten managers (think: ten processes), ten refreshes; each leader persists.
      for (const v of results) expect(v).toMatchObject({ accessToken: 'at-new', refreshToken: 'rt-rotated', shouldUpdate: true })
      const m = new TokenManager()
      const many = await Promise.all(Array.from({ length: 10 }, () => m.getValidToken('u', { ...EXPIRED, refreshToken: 'rt-old' }, r)))
      expect(many.filter((v) => v.shouldUpdate)).toEqual([{ accessToken: 'at-new', refreshToken: 'rt-rotated', shouldUpdate: true, expiresAt: expect.any(Date) }])
      expect(many.filter((v) => !v.shouldUpdate).every((v) => v.refreshToken === undefined)).toBe(true)
    } finally {
      await s.stop()
    }
  })
})

describe('process lifetime', () => {
  it('a script using a native refresher exits by itself', () => {
    const script = `
      const http = require('node:http')
      const { tarabutRefresher, getValidToken } = require(${JSON.stringify(ROOT + 'index.js')})
      const s = http.createServer((req, res) => { req.resume(); req.on('end', () => { res.setHeader('content-type', 'application/json'); res.end(JSON.stringify({ accessToken: 'a', tokenType: 'Bearer', expiresIn: 60 })) }) })
      s.listen(0, '127.0.0.1', async () => {
        const r = tarabutRefresher({ clientId: 'c', clientSecret: 's', tokenUrl: 'http://127.0.0.1:' + s.address().port + '/t' })
        const v = await getValidToken('u', { accessToken: 'x', expiresAt: 0 }, r)
        console.log(v.accessToken)
        s.close()
      })`
    const out = spawnSync(process.execPath, ['-e', script], { timeout: 20_000, encoding: 'utf8' })
    expect(out.error).toBeUndefined()
    expect(out.status).toBe(0)
    expect(out.stdout.trim()).toBe('a')
  })
})
