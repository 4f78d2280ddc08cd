// One app instance of the fleet test (redis-outage.spec.mjs): its own
// TokenManager on the shared Redis (default onError), refreshing at the
// test's OAuth server with oauth2Refresher. Config: argv[2] JSON. Over IPC:
// { round, rows } -> { round, results }: `callers` concurrent calls per
// user, each presenting the row the parent's table holds; { close } ends it.
import { TokenManager, oauth2Refresher } from '../../index.mjs'
import { USER_ID_KEY } from './redis.mjs'

const c = JSON.parse(process.argv[2])
const manager = new TokenManager({
  bufferTimeMs: c.bufferTimeMs,
  doubleCheckWindowMs: c.doubleCheckWindowMs,
  refreshTimeoutMs: c.refreshTimeoutMs,
  redis: { url: c.redisUrl, encryptionKey: c.key, userIdKey: USER_ID_KEY, lockTtlMs: c.lockTtlMs },
})
const refresh = oauth2Refresher({ tokenUrl: c.tokenUrl, clientId: c.clientId, clientSecret: c.clientSecret })

function call(user, row) {
  return manager.getValidToken(user, row, refresh).then(
    (t) => ({ user, at: Date.now(), accessToken: t.accessToken, shouldUpdate: t.shouldUpdate, refreshToken: t.refreshToken ?? null, expiresAt: t.expiresAt.getTime() }),
    (e) => ({ user, at: Date.now(), error: e.code ?? String(e) }),
  )
}

process.on('message', async (m) => {
  if (m.close) {
    await manager.close()
    process.disconnect()
    return
  }
  const calls = Object.entries(m.rows).flatMap(([user, row]) => Array.from({ length: c.callers }, () => call(user, row)))
  process.send({ round: m.round, results: await Promise.all(calls), stats: manager.stats() })
})
process.send({ ready: true })
