// Open-banking transport and client authentication in the native
// refreshers, against servers that check what a bank checks: TLS to a token
// endpoint behind a private CA, with and without a client certificate
// (mutual TLS), and oidc-provider as a FAPI 2.0 server (private_key_jwt,
// tls_client_auth, self_signed_tls_client_auth).
import https from 'node:https'
import { X509Certificate, createHash, createPrivateKey, createPublicKey, generateKeyPairSync } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import Provider from 'oidc-provider'
import { EmbeddedJWK, SignJWT, calculateJwkThumbprint, decodeProtectedHeader, jwtVerify } from 'jose'

import { TokenManager, TokenRefreshError, oauth2Refresher, tarabutRefresher } from '../index.mjs'
import { memoryStore } from './helpers/oidc.mjs'

const pem = (name) => readFileSync(new URL(`./fixtures/tls/${name}`, import.meta.url), 'utf8')
const CA = pem('ca.pem')
const CLIENT = { cert: pem('client.pem'), key: pem('client.key') }
const SELF_SIGNED = { cert: pem('self-signed.pem'), key: pem('self-signed.key') }
const jose = (name) => readFileSync(new URL(`./fixtures/jose/${name}`, import.meta.url), 'utf8')
const KEYS = {
  rsa: jose('rsa.pem'),
  ec: JSON.parse(jose('ec.jwk.json')),
  ed25519: jose('ed25519.pem'),
}
/** The claims of a compact JWS (not verified: the server does that). */
const claimsOf = (jws) => JSON.parse(Buffer.from(jws.split('.')[1], 'base64url').toString())
const headerOf = (jws) => JSON.parse(Buffer.from(jws.split('.')[0], 'base64url').toString())

/**
 * An https server on 127.0.0.1 with a certificate from the private CA. It
 * asks every client for a certificate (and lets one without through, so
 * the handler can say what it saw); `handler` answers.
 */
async function httpsServer(handler = undefined) {
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
/** The form bodies it received. */
const bodies = []
let tokens

beforeAll(async () => {
  tokens = await httpsServer((req, res) => {
    const peer = req.socket.getPeerCertificate()
    seen.push({ path: req.url, subject: peer?.subject?.CN ?? null, authorized: req.socket.authorized })
    let form = ''
    req.on('data', (c) => (form += c))
    req.on('end', () => {
      bodies.push(new URLSearchParams(form))
      res.setHeader('content-type', 'application/json')
      const body = req.url === '/tarabut' ? { accessToken: 'tarabut-at', tokenType: 'Bearer', expiresIn: 3600 } : { access_token: 'oauth2-at', token_type: 'Bearer', expires_in: 300 }
      res.end(JSON.stringify(body))
    })
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

describe('private_key_jwt: the client assertion', () => {
  it('is fresh per request: iss = sub = clientId, aud (default tokenUrl), a new jti, exp at most 60 s ahead', async () => {
    bodies.length = 0
    const tokenUrl = `${tokens.url}/token`
    const r = oauth2Refresher({ tokenUrl, clientId: 'fapi-app', authMethod: 'private_key_jwt', privateKey: KEYS.ec, tls: { ca: CA } })
    await r({ userId: 'u', refreshToken: 'rt-1' })
    await r({ userId: 'u', refreshToken: 'rt-2' })
    expect(bodies).toHaveLength(2)
    const [a, b] = bodies.map((f) => {
      expect(f.get('client_assertion_type')).toBe('urn:ietf:params:oauth:client-assertion-type:jwt-bearer')
      expect(f.get('client_secret')).toBeNull()
      return f.get('client_assertion')
    })
    for (const jws of [a, b]) {
      expect(headerOf(jws)).toEqual({ alg: 'ES256', typ: 'JWT', kid: 'ec-key' })
      const c = claimsOf(jws)
      expect(c).toMatchObject({ iss: 'fapi-app', sub: 'fapi-app', aud: tokenUrl })
      expect(c.exp - c.iat).toBeLessThanOrEqual(60)
      expect(c.exp).toBeGreaterThan(Date.now() / 1000)
      expect(Math.abs(c.iat - Date.now() / 1000)).toBeLessThan(5)
    }
    expect(claimsOf(a).jti).not.toBe(claimsOf(b).jti)
    expect(a).not.toBe(b)
  })

  it('bad keys and options are a TypeError naming the option, the key in no message', () => {
    const base = { tokenUrl: 'https://idp.example/token', clientId: 'c', authMethod: 'private_key_jwt' }
    const cases = [
      [{ ...base }, /^privateKey is required by authMethod 'private_key_jwt'/],
      [{ ...base, privateKey: jose('rsa.pub.pem') }, /^privateKey is a public key/],
      [{ ...base, privateKey: { ...KEYS.ec, d: undefined } }, /^privateKey is a public JWK/],
      [{ ...base, privateKey: jose('ec.sec1.pem') }, /^privateKey must be PKCS#8 PEM/],
      [{ ...base, privateKey: jose('rsa-1024.pem') }, /^privateKey is an RSA key of fewer than 2048 bits/],
      [{ ...base, privateKey: KEYS.rsa, algorithm: 'ES256' }, /^privateKey is not a key for ES256/],
      [{ ...base, privateKey: KEYS.rsa, algorithm: 'HS256' }, /^algorithm must be 'PS256', 'ES256', 'EdDSA', 'RS256'/],
      [{ ...base, privateKey: 'not a key' }, /^privateKey must be a PKCS#8 PEM private key or a private JWK/],
      [{ ...base, privateKey: KEYS.rsa, clientSecret: 's' }, /^clientSecret is only for client_secret_basic and client_secret_post/],
      [{ tokenUrl: base.tokenUrl, clientId: 'c', clientSecret: 's', privateKey: KEYS.rsa }, /^privateKey is only for private_key_jwt/],
      [{ ...base, privateKey: 42 }, /^options\.privateKey must be a PEM string or a JWK object/],
    ]
    for (const [options, message] of cases) {
      let e
      try {
        oauth2Refresher(options)
      } catch (err) {
        e = err
      }
      expect(e, String(message)).toBeInstanceOf(TypeError)
      expect(e.code).toBe('INVALID_ARGUMENT')
      expect(e.message).toMatch(message)
      expect(e.message).not.toMatch(/MII|MC4C|MIGH|MHc/)
    }
  })
})

describe('oidc-provider as a FAPI 2.0 server, behind TLS that asks for client certificates', () => {
  let fapi
  let provider
  let issuer
  const grantErrors = []
  const refreshGrants = { count: 0 }
  const publicJwk = (name, kid) => ({ ...createPublicKey(jose(name)).export({ format: 'jwk' }), kid })

  beforeAll(async () => {
    fapi = await httpsServer()
    issuer = fapi.url
    provider = new Provider(issuer, {
      clients: [
        {
          client_id: 'fapi-jwt',
          token_endpoint_auth_method: 'private_key_jwt',
          jwks: { keys: [publicJwk('rsa.pub.pem', 'rsa-key'), publicJwk('ec.pub.pem', 'ec-key'), publicJwk('ed25519.pub.pem', 'ed25519-key')] },
          grant_types: ['authorization_code', 'refresh_token'],
          redirect_uris: ['https://app.example/cb'],
        },
        {
          client_id: 'fapi-mtls',
          token_endpoint_auth_method: 'tls_client_auth',
          tls_client_auth_subject_dn: 'CN=fapi-app',
          tls_client_certificate_bound_access_tokens: true,
          grant_types: ['authorization_code', 'refresh_token'],
          redirect_uris: ['https://app.example/cb'],
        },
        {
          client_id: 'fapi-self-signed',
          token_endpoint_auth_method: 'self_signed_tls_client_auth',
          jwks: { keys: [{ ...new X509Certificate(SELF_SIGNED.cert).publicKey.export({ format: 'jwk' }), x5c: [new X509Certificate(SELF_SIGNED.cert).raw.toString('base64')] }] },
          grant_types: ['authorization_code', 'refresh_token'],
          redirect_uris: ['https://app.example/cb'],
        },
      ],
      clientAuthMethods: ['private_key_jwt', 'tls_client_auth', 'self_signed_tls_client_auth'],
      rotateRefreshToken: true,
      ttl: { AccessToken: 60, RefreshToken: 300, Grant: 300 },
      findAccount: (ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
      features: {
        devInteractions: { enabled: false },
        fapi: { enabled: true, profile: '2.0' },
        revocation: { enabled: true },
        introspection: { enabled: true },
        mTLS: {
          enabled: true,
          certificateBoundAccessTokens: true,
          tlsClientAuth: true,
          selfSignedTlsClientAuth: true,
          getCertificate: (ctx) => {
            const peer = ctx.socket.getPeerCertificate()
            return peer?.raw ? new X509Certificate(peer.raw) : undefined
          },
          certificateAuthorized: (ctx) => ctx.socket.authorized,
          certificateSubjectMatches: (ctx, property, expected) =>
            property === 'tls_client_auth_subject_dn' && `CN=${ctx.socket.getPeerCertificate().subject.CN}` === expected,
        },
      },
    })
    provider.on('grant.success', (ctx) => {
      if (ctx.oidc.params.grant_type === 'refresh_token') refreshGrants.count++
    })
    provider.on('grant.error', (ctx, err) => grantErrors.push(err.error))
    fapi.server.on('request', provider.callback())
  })
  afterAll(() => fapi.close())

  async function connect(accountId, clientId) {
    const client = await provider.Client.find(clientId)
    const grant = new provider.Grant({ accountId, clientId })
    grant.addOIDCScope('offline_access')
    const grantId = await grant.save()
    const refreshToken = await new provider.RefreshToken({ accountId, grantId, client, scope: 'offline_access', gty: 'authorization_code' }).save()
    return { grantId, refreshToken }
  }

  /** 5 users x 20 concurrent callers, twice (rotating refresh tokens): one refresh per user per round, no grant error. */
  async function storm(refresher, clientId) {
    const users = Array.from({ length: 5 }, (_, i) => `${clientId}-${refresher.name}-${Math.random()}-${i}`)
    const db = new Map()
    for (const u of users) db.set(u, { accessToken: 'none', refreshToken: (await connect(u, clientId)).refreshToken, expiresAt: new Date(Date.now() - 1000) })
    const errorsBefore = grantErrors.length
    for (let round = 0; round < 2; round++) {
      const before = refreshGrants.count
      const manager = new TokenManager()
      const results = await Promise.all(users.flatMap((u) => Array.from({ length: 20 }, () => manager.getValidToken(u, db.get(u), refresher).then((v) => [u, v]))))
      expect(refreshGrants.count - before).toBe(users.length)
      for (const u of users) {
        const leader = results.filter(([user, v]) => user === u && v.shouldUpdate)
        expect(leader).toHaveLength(1)
        // Expired on purpose, so the next round refreshes with the rotated token.
        db.set(u, { accessToken: leader[0][1].accessToken, refreshToken: leader[0][1].refreshToken, expiresAt: new Date(Date.now() - 1000) })
      }
    }
    expect(grantErrors.slice(errorsBefore)).toEqual([])
    return [...db.values()]
  }

  it('private_key_jwt with PS256 (PEM), ES256 (JWK) and EdDSA (PEM): storms refresh once per user, no grant lost', async () => {
    for (const privateKey of [KEYS.rsa, KEYS.ec, KEYS.ed25519]) {
      const keyId = typeof privateKey === 'string' ? (privateKey === KEYS.rsa ? 'rsa-key' : 'ed25519-key') : undefined
      const r = oauth2Refresher({ tokenUrl: `${issuer}/token`, clientId: 'fapi-jwt', authMethod: 'private_key_jwt', privateKey, keyId, audience: issuer, tls: { ca: CA } })
      await storm(r, 'fapi-jwt')
    }
  })

  it('private_key_jwt: a key the client did not register, or the default aud (FAPI 2.0 wants the issuer), is INVALID_CLIENT', async () => {
    const { refreshToken } = await connect('jwt-wrong', 'fapi-jwt')
    const stranger = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ type: 'pkcs8', format: 'pem' })
    const base = { tokenUrl: `${issuer}/token`, clientId: 'fapi-jwt', authMethod: 'private_key_jwt', tls: { ca: CA } }
    for (const options of [
      { ...base, privateKey: stranger, keyId: 'ec-key', audience: issuer },
      { ...base, privateKey: KEYS.ec },
    ]) {
      const e = await oauth2Refresher(options)({ userId: 'jwt-wrong', refreshToken }).catch((err) => err)
      expect(e).toBeInstanceOf(TokenRefreshError)
      expect(e).toMatchObject({ code: 'INVALID_CLIENT', error: 'invalid_client' })
    }
    // The refused calls spent nothing: RS256 on request still refreshes.
    const rs = oauth2Refresher({ ...base, privateKey: KEYS.rsa, keyId: 'rsa-key', algorithm: 'RS256', audience: issuer })
    expect((await rs({ userId: 'jwt-wrong', refreshToken })).refreshToken).toEqual(expect.any(String))
  })

  it('revocation and introspection with private_key_jwt: manager.revoke ends the grant at the bank', async () => {
    const store = memoryStore()
    const refresher = oauth2Refresher({ tokenUrl: `${issuer}/token`, revocationUrl: `${issuer}/token/revocation`, clientId: 'fapi-jwt', authMethod: 'private_key_jwt', privateKey: KEYS.ec, audience: issuer, tls: { ca: CA } })
    const manager = new TokenManager({ store, refresher, refreshAhead: false })
    const { refreshToken, grantId } = await connect('jwt-revoke', 'fapi-jwt')
    store.rows.set('jwt-revoke', { accessToken: 'none', refreshToken, expiresAt: new Date(Date.now() - 1000) })
    const { accessToken } = await manager.getToken('jwt-revoke')
    const introspect = async (token) => {
      const assertion = await new SignJWT({ jti: String(Math.random()) })
        .setProtectedHeader({ alg: 'ES256', kid: 'ec-key' })
        .setIssuer('fapi-jwt')
        .setSubject('fapi-jwt')
        .setAudience(issuer)
        .setIssuedAt()
        .setExpirationTime('60s')
        .sign(createPrivateKey({ key: KEYS.ec, format: 'jwk' }))
      const body = new URLSearchParams({ token, client_id: 'fapi-jwt', client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer', client_assertion: assertion })
      return new Promise((resolve, reject) => {
        const req = https.request(`${issuer}/token/introspection`, { method: 'POST', ca: CA, headers: { 'content-type': 'application/x-www-form-urlencoded' } }, (res) => {
          let text = ''
          res.on('data', (c) => (text += c))
          res.on('end', () => resolve(JSON.parse(text)))
        })
        req.on('error', reject)
        req.end(body.toString())
      })
    }
    expect(await introspect(accessToken)).toMatchObject({ active: true, client_id: 'fapi-jwt' })
    await manager.revoke('jwt-revoke')
    expect(store.rows.has('jwt-revoke')).toBe(false)
    // The provider dropped the whole grant: its tokens are no longer active.
    expect(await introspect(accessToken)).toEqual({ active: false })
    expect(await provider.Grant.find(grantId)).toBeUndefined()
    await manager.close()
  })

  it('tls_client_auth: the CA-issued certificate authenticates and binds the access token to it (cnf x5t#S256)', async () => {
    const r = oauth2Refresher({ tokenUrl: `${issuer}/token`, clientId: 'fapi-mtls', authMethod: 'tls_client_auth', tls: { ca: CA, ...CLIENT } })
    const rows = await storm(r, 'fapi-mtls')
    const at = await provider.AccessToken.find(rows[0].accessToken)
    expect(at['x5t#S256']).toBe(createHash('sha256').update(new X509Certificate(CLIENT.cert).raw).digest('base64url'))

    const { refreshToken } = await connect('mtls-wrong', 'fapi-mtls')
    const wrong = oauth2Refresher({ tokenUrl: `${issuer}/token`, clientId: 'fapi-mtls', authMethod: 'tls_client_auth', tls: { ca: CA, ...SELF_SIGNED } })
    const e = await wrong({ userId: 'mtls-wrong', refreshToken }).catch((err) => err)
    expect(e).toMatchObject({ code: 'INVALID_CLIENT', error: 'invalid_client' })
  })

  it('self_signed_tls_client_auth: the registered self-signed certificate authenticates; another does not', async () => {
    const r = oauth2Refresher({ tokenUrl: `${issuer}/token`, clientId: 'fapi-self-signed', authMethod: 'self_signed_tls_client_auth', tls: { ca: CA, ...SELF_SIGNED } })
    await storm(r, 'fapi-self-signed')
    const { refreshToken } = await connect('self-wrong', 'fapi-self-signed')
    const wrong = oauth2Refresher({ tokenUrl: `${issuer}/token`, clientId: 'fapi-self-signed', authMethod: 'self_signed_tls_client_auth', tls: { ca: CA, ...CLIENT } })
    expect(await wrong({ userId: 'self-wrong', refreshToken }).catch((err) => err)).toMatchObject({ code: 'INVALID_CLIENT' })
  })

  it('manager.fetch presents the client certificate a token is bound to; the resource server checks cnf x5t#S256', async () => {
    // A bank API: the token must be live and bound to the certificate on this connection.
    const api = await httpsServer(async (req, res) => {
      const token = /^Bearer (.+)$/.exec(req.headers.authorization ?? '')?.[1]
      const at = token === undefined ? undefined : await provider.AccessToken.find(token)
      const peer = req.socket.getPeerCertificate()
      const x5t = peer?.raw ? createHash('sha256').update(peer.raw).digest('base64url') : null
      const ok = at !== undefined && x5t !== null && at['x5t#S256'] === x5t
      res.statusCode = ok ? 200 : 401
      if (!ok) res.setHeader('www-authenticate', 'Bearer error="invalid_token"')
      res.end(ok ? JSON.stringify({ sub: at.accountId, method: req.method }) : '')
    })
    try {
      const store = memoryStore()
      const refresher = oauth2Refresher({ tokenUrl: `${issuer}/token`, clientId: 'fapi-mtls', authMethod: 'tls_client_auth', tls: { ca: CA, ...CLIENT } })
      const manager = new TokenManager({ store, refresher, refreshAhead: false })
      const users = Array.from({ length: 5 }, (_, i) => `mtls-fetch-${i}`)
      for (const u of users) store.rows.set(u, { accessToken: 'none', refreshToken: (await connect(u, 'fapi-mtls')).refreshToken, expiresAt: new Date(Date.now() - 1000) })
      const errorsBefore = grantErrors.length
      const before = refreshGrants.count
      const fd = new FormData()
      fd.append('amount', '10')
      const answers = await Promise.all(
        users.flatMap((u) => Array.from({ length: 20 }, (_, i) => manager.fetch(u, `${api.url}/accounts`, i % 2 ? { method: 'POST', body: fd } : undefined).then(async (r) => [u, r.status, await r.json()]))),
      )
      for (const [u, status, body] of answers) expect([status, body.sub]).toEqual([200, u])
      expect(refreshGrants.count - before).toBe(users.length)
      expect(grantErrors.slice(errorsBefore)).toEqual([])

      // The same token without the certificate is refused: the binding is real.
      const { accessToken } = await manager.getToken(users[0])
      const bare = await new Promise((resolve, reject) => {
        https.get(`${api.url}/accounts`, { ca: CA, headers: { authorization: `Bearer ${accessToken}` } }, (r) => resolve(r.statusCode)).on('error', reject)
      })
      expect(bare).toBe(401)
      await manager.close()
    } finally {
      await api.close()
    }
  })

  it('the tls_* methods need tls.cert and tls.key', () => {
    for (const authMethod of ['tls_client_auth', 'self_signed_tls_client_auth']) {
      expect(() => oauth2Refresher({ tokenUrl: `${issuer}/token`, clientId: 'fapi-mtls', authMethod, tls: { ca: CA } })).toThrow(/^tls needs cert and key/)
    }
  })
})

describe('DPoP (RFC 9449) against oidc-provider with features.dPoP and nonces', () => {
  let server
  let provider
  let tokenUrl
  const grantErrors = []
  const tokenRequests = { count: 0 }

  beforeAll(async () => {
    server = (await import('node:http')).createServer()
    await new Promise((r) => server.listen(0, '127.0.0.1', r))
    const issuer = `http://127.0.0.1:${server.address().port}`
    provider = new Provider(issuer, {
      clients: [
        {
          client_id: 'dpop-app',
          client_secret: 'dpop-secret',
          dpop_bound_access_tokens: true,
          grant_types: ['authorization_code', 'refresh_token'],
          redirect_uris: ['https://app.example/cb'],
        },
      ],
      rotateRefreshToken: true,
      ttl: { AccessToken: 60, RefreshToken: 300, Grant: 300 },
      findAccount: (ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
      features: { devInteractions: { enabled: false }, dPoP: { enabled: true, nonceSecret: Buffer.alloc(32, 7), requireNonce: () => true } },
    })
    provider.on('grant.error', (ctx, err) => grantErrors.push(err.error))
    const callback = provider.callback()
    server.on('request', (req, res) => {
      if (req.url === '/token') tokenRequests.count++
      callback(req, res)
    })
    tokenUrl = `${issuer}/token`
  })
  afterAll(() => {
    server.closeAllConnections()
    return new Promise((r) => server.close(r))
  })

  async function connect(accountId) {
    const client = await provider.Client.find('dpop-app')
    const grant = new provider.Grant({ accountId, clientId: 'dpop-app' })
    grant.addOIDCScope('offline_access')
    const grantId = await grant.save()
    return new provider.RefreshToken({ accountId, grantId, client, scope: 'offline_access', gty: 'authorization_code' }).save()
  }

  /** RFC 7638 thumbprint of a P-256 public JWK (the members it names, in order). */
  const thumbprint = ({ crv, kty, x, y }) => createHash('sha256').update(JSON.stringify({ crv, kty, x, y })).digest('base64url')

  it('binds every token to the key (cnf.jkt); the first use_dpop_nonce is retried once, then the nonce is kept', async () => {
    const r = oauth2Refresher({ tokenUrl, clientId: 'dpop-app', clientSecret: 'dpop-secret', dpop: { privateKey: KEYS.ec } })
    const users = Array.from({ length: 5 }, (_, i) => `dpop-user-${i}`)
    const db = new Map()
    for (const u of users) db.set(u, { accessToken: 'none', refreshToken: await connect(u), expiresAt: new Date(Date.now() - 1000) })
    for (let round = 0; round < 2; round++) {
      const before = tokenRequests.count
      const manager = new TokenManager()
      const results = await Promise.all(users.flatMap((u) => Array.from({ length: 20 }, () => manager.getValidToken(u, db.get(u), r).then((v) => [u, v]))))
      for (const u of users) {
        const [[, leader]] = results.filter(([user, v]) => user === u && v.shouldUpdate)
        const at = await provider.AccessToken.find(leader.accessToken)
        expect(at.jkt).toBe(thumbprint(KEYS.ec))
        db.set(u, { accessToken: leader.accessToken, refreshToken: leader.refreshToken, expiresAt: new Date(Date.now() - 1000) })
      }
      // Round 1: the first requests learn the nonce (one retry each, at
      // most); round 2 sends it from the start.
      if (round === 0) expect(tokenRequests.count - before).toBeLessThanOrEqual(2 * users.length)
      else expect(tokenRequests.count - before).toBe(users.length)
    }
    expect(grantErrors.filter((e) => e !== 'use_dpop_nonce')).toEqual([])
  })

  /**
   * A bank API that checks what RFC 9449 section 7 asks of a resource
   * server: the proof's signature, typ, htm, htu, iat, a jti never seen
   * before, ath, its own nonce, and the token's cnf.jkt against the
   * proof's key. `nonce` is what it currently wants.
   */
  async function dpopApi() {
    const api = { nonce: 'rs-nonce-1', jtis: new Set(), refused: [], challenges: 0 }
    api.server = (await import('node:http')).createServer(async (req, res) => {
      const refuse = (status, error) => {
        api.refused.push(error)
        res.statusCode = status
        res.setHeader('www-authenticate', `DPoP error="${error}", algs="ES256 PS256 EdDSA"`)
        if (error === 'use_dpop_nonce') {
          api.challenges++
          res.setHeader('dpop-nonce', api.nonce)
        }
        res.end()
      }
      for await (const _ of req);
      const token = /^DPoP (.+)$/.exec(req.headers.authorization ?? '')?.[1]
      const proof = req.headers.dpop
      if (token === undefined || typeof proof !== 'string') return refuse(401, 'invalid_token')
      let claims
      try {
        ;({ payload: claims } = await jwtVerify(proof, EmbeddedJWK, { typ: 'dpop+jwt', algorithms: ['ES256', 'PS256', 'EdDSA'] }))
      } catch {
        return refuse(401, 'invalid_dpop_proof')
      }
      const htu = `${api.url}${req.url.split('?')[0]}`
      const ath = createHash('sha256').update(token).digest('base64url')
      if (claims.htm !== req.method || claims.htu !== htu || claims.ath !== ath || Math.abs(Date.now() / 1000 - claims.iat) > 60) return refuse(401, 'invalid_dpop_proof')
      if (api.jtis.has(claims.jti)) return refuse(401, 'invalid_dpop_proof')
      api.jtis.add(claims.jti)
      if (claims.nonce !== api.nonce) return refuse(401, 'use_dpop_nonce')
      const at = await provider.AccessToken.find(token)
      if (at === undefined || at.jkt !== (await calculateJwkThumbprint(decodeProtectedHeader(proof).jwk))) return refuse(401, 'invalid_token')
      res.end(JSON.stringify({ sub: at.accountId, method: req.method }))
    })
    await new Promise((r) => api.server.listen(0, '127.0.0.1', r))
    api.url = `http://127.0.0.1:${api.server.address().port}`
    api.close = () => {
      api.server.closeAllConnections()
      return new Promise((r) => api.server.close(r))
    }
    return api
  }

  it('manager.fetch sends Authorization: DPoP with a fresh proof per request (ath, htm, htu), answers the API\'s use_dpop_nonce once, and keeps its nonce', async () => {
    const api = await dpopApi()
    try {
      const store = memoryStore()
      const refresher = oauth2Refresher({ tokenUrl, clientId: 'dpop-app', clientSecret: 'dpop-secret', dpop: { privateKey: KEYS.ec } })
      const manager = new TokenManager({ store, refresher, refreshAhead: false })
      const users = Array.from({ length: 5 }, (_, i) => `dpop-fetch-${i}`)
      for (const u of users) store.rows.set(u, { accessToken: 'none', refreshToken: await connect(u), expiresAt: new Date(Date.now() - 1000) })
      const errorsBefore = grantErrors.length
      const before = tokenRequests.count
      // Lower-case methods are sent upper-case by fetch: the proof says what is sent.
      const init = (i) => [undefined, { method: 'post', body: 'x=1' }, { method: 'PATCH', body: new Blob(['y']) }][i % 3]
      const answers = await Promise.all(users.flatMap((u) => Array.from({ length: 20 }, (_, i) => manager.fetch(u, `${api.url}/accounts?page=${i}`, init(i)).then(async (r) => [u, r.status, r.status === 200 ? await r.json() : null]))))
      for (const [u, status, body] of answers) expect([status, body?.sub]).toEqual([200, u])
      // One refresh per user (each at most one nonce retry at the token endpoint).
      expect(tokenRequests.count - before).toBeLessThanOrEqual(2 * users.length)
      expect(grantErrors.slice(errorsBefore).filter((e) => e !== 'use_dpop_nonce')).toEqual([])
      expect(new Set(store.saves.map((s) => s.userId)).size).toBe(users.length)
      expect(api.refused.filter((e) => e !== 'use_dpop_nonce')).toEqual([])
      // The nonce is learnt once (the first requests race for it), then sent from the start.
      const learnt = api.challenges
      expect(learnt).toBeGreaterThan(0)
      expect(learnt).toBeLessThanOrEqual(answers.length)
      const again = await manager.fetch(users[0], `${api.url}/accounts`)
      expect(again.status).toBe(200)
      expect(api.challenges).toBe(learnt)

      // The API moves to a new nonce: one challenge, one retry, answered.
      api.nonce = 'rs-nonce-2'
      const moved = await manager.fetch(users[1], `${api.url}/accounts`, { method: 'DELETE' })
      expect([moved.status, (await moved.json()).method]).toEqual([200, 'DELETE'])
      expect(api.challenges).toBe(learnt + 1)
      // Every proof the manager made was new: none refused as replayed.
      expect(api.refused.filter((e) => e === 'invalid_dpop_proof')).toEqual([])

      // A proof replayed by someone who captured a request is refused.
      let captured
      const spy = new TokenManager({ store, refresher, refreshAhead: false, fetch: (input, i) => ((captured = new Headers(i.headers)), fetch(input, i)) })
      expect((await spy.fetch(users[2], `${api.url}/accounts`)).status).toBe(200)
      const replay = await fetch(`${api.url}/accounts`, { headers: { authorization: captured.get('authorization'), dpop: captured.get('dpop') } })
      expect(replay.status).toBe(401)
      expect(api.refused.at(-1)).toBe('invalid_dpop_proof')

      // A token the provider no longer honours: refreshed once, the request sent again.
      const { accessToken } = await manager.getToken(users[3])
      await (await provider.AccessToken.find(accessToken)).destroy()
      const beforeRevoked = tokenRequests.count
      const healed = await manager.fetch(users[3], `${api.url}/accounts`)
      expect(healed.status).toBe(200)
      expect(tokenRequests.count - beforeRevoked).toBe(1)
      await manager.close()
      await spy.close()
    } finally {
      await api.close()
    }
  })

  it('manager.fetch with a bad URL for a DPoP proof rejects with a TypeError, sending nothing', async () => {
    const store = memoryStore()
    const refresher = oauth2Refresher({ tokenUrl, clientId: 'dpop-app', clientSecret: 'dpop-secret', dpop: { privateKey: KEYS.ec } })
    let sent = 0
    const manager = new TokenManager({ store, refresher, refreshAhead: false, fetch: () => (sent++, new Response('')) })
    store.rows.set('dpop-bad-url', { accessToken: 'at', refreshToken: 'rt', expiresAt: new Date(Date.now() + 3_600_000) })
    const e = await manager.fetch('dpop-bad-url', '/relative/path').catch((err) => err)
    expect(e).toBeInstanceOf(TypeError)
    expect(e).toMatchObject({ code: 'INVALID_ARGUMENT' })
    expect(e.message).toMatch(/^url must be an absolute http\(s\) URL/)
    expect(sent).toBe(0)
    await manager.close()
  })

  it('a bad DPoP key is a TypeError naming dpop.privateKey', () => {
    const base = { tokenUrl, clientId: 'dpop-app', clientSecret: 'dpop-secret' }
    expect(() => oauth2Refresher({ ...base, dpop: { privateKey: jose('ec.pub.pem') } })).toThrow(/^dpop\.privateKey is a public key/)
    expect(() => oauth2Refresher({ ...base, dpop: { privateKey: KEYS.ec, algorithm: 'RS256' } })).toThrow(/^dpop\.algorithm must be 'ES256', 'PS256', 'EdDSA'/)
    expect(() => oauth2Refresher({ ...base, dpop: {} })).toThrow(/^options\.dpop\.privateKey is required/)
  })
})
