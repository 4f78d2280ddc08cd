// One app instance of the lifecycle fleet test (lifecycle-fleet.spec.mjs):
// its own TokenManager on the shared Redis, with a store that is the
// test's HTTP token table and oauth2Refresher at the test's OAuth server.
// Config: argv[2] JSON. Over IPC: { round, users } -> { round, results }
// (`callers` concurrent getToken calls per user); { close } flushes and ends.
import { TokenManager, oauth2Refresher } from '../../index.mjs'
import { USER_ID_KEY } from './redis.mjs'

const c = JSON.parse(process.argv[2])
const table = `${c.storeUrl}/rows/`
const headers = { 'content-type': 'application/json', 'x-worker': String(c.worker) }

/** The app's database, over HTTP: answers 500 when it fails, 409 when the row moved on. */
const store = {
  async load(userId) {
    const res = await fetch(table + encodeURIComponent(userId), { headers })
    if (res.status === 404) return null
    if (!res.ok) throw new Error(`load answered ${res.status}`)
    return res.json()
  },
  async save(userId, token, previous) {
    const res = await fetch(table + encodeURIComponent(userId), {
      method: 'PUT',
      headers,
      body: JSON.stringify({ token: { ...token, expiresAt: token.expiresAt.getTime() }, previous: previous && { ...previous, expiresAt: previous.expiresAt.getTime() } }),
    })
    if (res.status === 409) return false
    if (!res.ok) throw new Error(`save answered ${res.status}`)
    return true
  },
}

const manager = new TokenManager({
  bufferTimeMs: c.bufferTimeMs,
  refreshTimeoutMs: c.refreshTimeoutMs,
  store,
  refresher: oauth2Refresher({ tokenUrl: c.tokenUrl, clientId: c.clientId, clientSecret: c.clientSecret }),
  refreshAhead: { activeWindowMs: c.activeWindowMs },
  redis: { url: c.redisUrl, encryptionKey: c.key, userIdKey: USER_ID_KEY, lockTtlMs: c.lockTtlMs },
  logger: { warn() {}, error() {} },
})

function call(user) {
  const started = Date.now()
  return manager.getToken(user).then(
    (t) => ({ user, ms: Date.now() - started, accessToken: t.accessToken }),
    (e) => ({ user, ms: Date.now() - started, error: e.code ?? String(e) }),
  )
}

process.on('message', async (m) => {
  if (m.close) {
    await manager.close()
    process.send({ closed: true, stats: manager.stats() })
    process.disconnect()
    return
  }
  const calls = m.users.flatMap((u) => Array.from({ length: c.callers }, () => call(u)))
  process.send({ round: m.round, results: await Promise.all(calls) })
})
process.send({ ready: true })
