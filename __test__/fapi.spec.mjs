// Open-banking transport and client authentication in the native
// refreshers, against servers that check what a bank checks: TLS to a token
// endpoint behind a private CA, with and without a client certificate
// (mutual TLS).
import https from 'node:https'
import { readFileSync } from 'node:fs'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { TokenRefreshError, oauth2Refresher, tarabutRefresher } from '../index.mjs'

const pem = (name) => readFileSync(new URL(`./fixtures/tls/${name}`, import.meta.url), 'utf8')
const CA = pem('ca.pem')
const CLIENT = { cert: pem('client.pem'), key: pem('client.key') }
const SELF_SIGNED = { cert: pem('self-signed.pem'), key: pem('self-signed.key') }

/**
 * An https server on 127.0.0.1 with a certificate from the private CA. It
 * asks every client for a certificate (and lets one without through, so
 * the handler can say what it saw); `handler` answers.
 */
async function httpsServer(handler) {
  const server = https.createServer({ cert: pem('server.pem'), key: pem('server.key'), ca: CA, requestCert: true, rejectUnauthorized: false }, handler)
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  const url = `https://127.0.0.1:${server.address().port}`
  return {
    server,
    url,
    close: () => {
      server.closeAllConnections()
      return new Promise((r) => server.close(r))
    },
  }
}

/** What the server saw of the client's certificate on each request. */
const seen = []
let tokens

beforeAll(async () => {
  tokens = await httpsServer((req, res) => {
    const peer = req.socket.getPeerCertificate()
    seen.push({ path: req.url, subject: peer?.subject?.CN ?? null, authorized: req.socket.authorized })
    res.setHeader('content-type', 'application/json')
    const body = req.url === '/tarabut' ? { accessToken: 'tarabut-at', tokenType: 'Bearer', expiresIn: 3600 } : { access_token: 'oauth2-at', token_type: 'Bearer', expires_in: 300 }
    res.end(JSON.stringify(body))
  })
})
afterAll(() => tokens.close())

describe('tls: a private CA and mutual TLS, for both refreshers', () => {
  it('tls.ca trusts a token endpoint behind a private CA; without it the call never reaches the server', async () => {
    const options = { tokenUrl: `${tokens.url}/token`, clientId: 'c', clientSecret: 's' }
    seen.length = 0
    const e = await oauth2Refresher(options)({ userId: 'u', refreshToken: 'rt' }).catch((err) => err)
    expect(e).toBeInstanceOf(TokenRefreshError)
    expect(e.code).toBe('REFRESH_FAILED')
    expect(e.message).toMatch(/^could not connect to the token endpoint/)
    expect(seen).toEqual([])

    const t = await oauth2Refresher({ ...options, tls: { ca: CA } })({ userId: 'u', refreshToken: 'rt' })
    expect(t.accessToken).toBe('oauth2-at')
    expect(seen).toEqual([{ path: '/token', subject: null, authorized: false }])

    // Another CA's certificate as the only root: the server is not trusted.
    const other = await oauth2Refresher({ ...options, tls: { ca: SELF_SIGNED.cert } })({ userId: 'u', refreshToken: 'rt' }).catch((err) => err)
    expect(other).toMatchObject({ code: 'REFRESH_FAILED' })
    expect(seen).toHaveLength(1)
  })

  it('tls.cert + tls.key present the client certificate (oauth2Refresher and tarabutRefresher)', async () => {
    seen.length = 0
    const o = oauth2Refresher({ tokenUrl: `${tokens.url}/token`, clientId: 'c', clientSecret: 's', tls: { ca: CA, ...CLIENT } })
    expect((await o({ userId: 'u', refreshToken: 'rt' })).accessToken).toBe('oauth2-at')
    const t = tarabutRefresher({ tokenUrl: `${tokens.url}/tarabut`, clientId: 'c', clientSecret: 's', tls: { ca: CA, ...CLIENT } })
    expect((await t({ userId: 'u' })).accessToken).toBe('tarabut-at')
    const s = oauth2Refresher({ tokenUrl: `${tokens.url}/token`, clientId: 'c', clientSecret: 's', tls: { ca: CA, ...SELF_SIGNED } })
    await s({ userId: 'u', refreshToken: 'rt' })
    expect(seen).toEqual([
      { path: '/token', subject: 'fapi-app', authorized: true },
      { path: '/tarabut', subject: 'fapi-app', authorized: true },
      // Presented, but not issued by the CA the server trusts.
      { path: '/token', subject: 'fapi-self-signed-app', authorized: false },
    ])
  })

  it('bad tls options are a TypeError naming the option, with no key in the message', () => {
    const base = { tokenUrl: `${tokens.url}/token`, clientId: 'c', clientSecret: 's' }
    for (const [tls, name] of [
      [{ cert: CLIENT.cert }, 'tls.key '],
      [{ key: CLIENT.key }, 'tls.cert '],
      [{ ca: 'not a certificate' }, 'tls.ca '],
      [{ cert: CLIENT.cert, key: SELF_SIGNED.key }, 'tls.key '],
      [{ cert: CLIENT.key, key: CLIENT.key }, 'tls.cert '],
    ]) {
      for (const make of [oauth2Refresher, tarabutRefresher]) {
        let e
        try {
          make({ ...base, tls })
        } catch (err) {
          e = err
        }
        expect(e, name).toBeInstanceOf(TypeError)
        expect(e.code).toBe('INVALID_ARGUMENT')
        expect(e.message.startsWith(name), e.message).toBe(true)
        expect(e.message).not.toContain('PRIVATE KEY')
      }
    }
    expect(() => oauth2Refresher({ ...base, tls: { ...CLIENT, password: 'x' } })).toThrow(/^options\.tls\.password is not a oauth2Refresher option/)
    expect(() => oauth2Refresher({ ...base, tls: { ca: 42 } })).toThrow(/^options\.tls\.ca must be a string/)
    expect(() => oauth2Refresher({ ...base, tls: 'ca.pem' })).toThrow(/^options\.tls must be an object/)
  })
})
