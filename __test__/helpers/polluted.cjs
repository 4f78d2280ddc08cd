'use strict'
// Run as a child process (a polluted Object.prototype must not leak into
// other tests): pollutes Object.prototype the ways an application bug
// would, *before* the package loads (its singleton is built at require
// time), then uses the package and prints what the pollution reached, as JSON.
const http = require('node:http')
const net = require('node:net')
const { randomBytes } = require('node:crypto')

async function main() {
  const hits = { http: 0, tcp: 0, setter: [], logger: 0 }
  const server = http.createServer((req, res) => {
    hits.http++
    req.resume()
    res.end('{}')
  })
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  const fakeRedis = net.createServer((socket) => {
    hits.tcp++
    socket.destroy()
  })
  await new Promise((r) => fakeRedis.listen(0, '127.0.0.1', r))

  Object.prototype.tokenUrl = `http://127.0.0.1:${server.address().port}/token`
  Object.prototype.redis = { url: `redis://127.0.0.1:${fakeRedis.address().port}`, encryptionKey: randomBytes(32).toString('base64') }
  Object.prototype.now = () => 0
  Object.prototype.logger = { warn: () => hits.logger++, error: () => hits.logger++ }
  Object.defineProperty(Object.prototype, 'clientSecret', {
    configurable: true,
    get() {
      return undefined
    },
    set(v) {
      hits.setter.push(v)
    },
  })

  const { TokenManager, tokenManager, tarabutRefresher } = require('../../index.js')
  const outcomes = {}
  // An expired token: `now` from the prototype would call it fresh.
  const expired = () => ({ accessToken: 'old', refreshToken: 'rt', expiresAt: Date.now() - 1_000 })
  let refreshed = 0
  const refreshFn = async () => {
    refreshed++
    return { accessToken: 'new', expiresIn: 3600 }
  }
  for (const [name, manager] of [['singleton', tokenManager], ['constructed', new TokenManager({})]]) {
    const r = await manager.getValidToken('user-1', expired(), refreshFn)
    outcomes[name] = r.accessToken
    await manager.close()
  }
  // No tokenUrl given: the default endpoint (unreachable here), never the prototype's.
  const refresh = tarabutRefresher({ clientId: 'client', clientSecret: 'TOP-SECRET', timeoutMs: 1_000, maxRetries: 0 })
  try {
    await refresh({ userId: 'user-1', refreshToken: null })
    outcomes.tarabut = 'ok'
  } catch (e) {
    outcomes.tarabut = e.code
  }
  await new Promise((r) => setTimeout(r, 200))
  server.close()
  fakeRedis.close()
  process.stdout.write(JSON.stringify({ hits, outcomes, refreshed }))
}

main().then(
  () => process.exit(0),
  (e) => {
    process.stderr.write(String(e?.stack ?? e))
    process.exit(1)
  },
)
