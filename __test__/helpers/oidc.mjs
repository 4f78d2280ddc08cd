// A real OAuth 2.0 server for tests (oidc-provider): rotating refresh
// tokens (a spent one revokes the grant), RFC 7009 revocation, and a small
// resource server that answers 401 to any access token the provider does
// not hold as valid. Everything listens on 127.0.0.1, on random ports.
import http from 'node:http'
import Provider from 'oidc-provider'

/**
 * @param {{ accessTtlS?: number }} [options] the access tokens' lifetime (changeable later through `setAccessTtl`)
 */
export async function startOidc({ accessTtlS = 2 } = {}) {
  let accessTtl = accessTtlS
  const server = http.createServer()
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  const issuer = `http://127.0.0.1:${server.address().port}`
  const provider = new Provider(issuer, {
    clients: [{ client_id: 'app', client_secret: 'app-secret', grant_types: ['authorization_code', 'refresh_token'], redirect_uris: ['https://app.example/cb'] }],
    rotateRefreshToken: true,
    ttl: { AccessToken: () => accessTtl, RefreshToken: 600, Grant: 600 },
    findAccount: (ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
    features: { devInteractions: { enabled: false }, revocation: { enabled: true } },
  })
  /** `newest`: each user's latest access token from a refresh. */
  const counts = { refreshes: 0, grantErrors: [], newest: new Map() }
  provider.on('grant.success', (ctx) => {
    if (ctx.oidc.params.grant_type !== 'refresh_token') return
    counts.refreshes++
    const user = ctx.oidc.entities.Account?.accountId
    if (user !== undefined) counts.newest.set(user, ctx.body?.access_token)
  })
  provider.on('grant.error', (ctx, err) => counts.grantErrors.push(err.error))
  server.on('request', provider.callback())

  // The bank's API: 200 for a live access token, 401 otherwise.
  const api = http.createServer(async (req, res) => {
    const auth = req.headers.authorization ?? ''
    const token = auth.startsWith('Bearer ') ? auth.slice(7) : ''
    let body = ''
    for await (const chunk of req) body += chunk
    const found = token === '' ? undefined : await provider.AccessToken.find(token)
    api.seen.push({ method: req.method, authorization: auth, body, ok: found !== undefined })
    if (found === undefined) {
      res.writeHead(401, { 'www-authenticate': 'Bearer error="invalid_token"' }).end('{"error":"invalid_token"}')
      return
    }
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ accountId: found.accountId, body }))
  })
  api.seen = []
  await new Promise((r) => api.listen(0, '127.0.0.1', r))

  return {
    provider,
    counts,
    tokenUrl: `${issuer}/token`,
    revocationUrl: `${issuer}/token/revocation`,
    apiUrl: `http://127.0.0.1:${api.address().port}`,
    api,
    setAccessTtl: (s) => {
      accessTtl = s
    },
    /** A grant and its first refresh token, as an authorization-code flow would leave them. */
    async connect(accountId) {
      const client = await provider.Client.find('app')
      const grant = new provider.Grant({ accountId, clientId: 'app' })
      grant.addOIDCScope('offline_access')
      const grantId = await grant.save()
      const refreshToken = await new provider.RefreshToken({ accountId, grantId, client, scope: 'offline_access', gty: 'authorization_code' }).save()
      return { grantId, refreshToken }
    },
    /** Whether the grant is still alive (a spent refresh token revokes it). */
    grantAlive: async (grantId) => (await provider.Grant.find(grantId)) !== undefined,
    async close() {
      for (const s of [server, api]) {
        s.closeAllConnections()
        await new Promise((r) => s.close(r))
      }
    },
  }
}

/**
 * The app's table of tokens, in memory, with the compare-and-set `save` a
 * SQL `UPDATE ... WHERE access_token = $previous` gives. `failSaves(n)`
 * makes the next n saves throw; `saves` logs each successful write.
 */
export function memoryStore() {
  const rows = new Map()
  const saves = []
  let failing = 0
  return {
    rows,
    saves,
    failSaves(n) {
      failing = n
    },
    load(userId) {
      const row = rows.get(userId)
      return row === undefined ? null : { ...row }
    },
    async save(userId, token, previous) {
      await new Promise((r) => setImmediate(r))
      if (failing > 0) {
        failing--
        throw new Error('database unavailable')
      }
      const row = rows.get(userId)
      if ((row?.accessToken ?? null) !== (previous?.accessToken ?? null)) return false
      rows.set(userId, { ...token })
      saves.push({ userId, ...token })
      return true
    },
    delete(userId) {
      rows.delete(userId)
    },
  }
}
