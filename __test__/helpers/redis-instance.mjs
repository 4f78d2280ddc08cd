// One app instance with its own TokenManager on a shared Redis, driven over
// IPC call by call (see startInstance in redis.mjs). Its refresh function
// answers at once with tokens naming the instance, and counts its runs.
// Config: argv[2] JSON { name, redis, bufferTimeMs?, unkeyed? } (`unkeyed`:
// no userIdKey, as an instance of an earlier setup).
import { TokenManager } from '../../index.mjs'
import { USER_ID_KEY } from './redis.mjs'

const c = JSON.parse(process.argv[2])
const manager = new TokenManager({ bufferTimeMs: c.bufferTimeMs ?? 60_000, redis: { ...(c.unkeyed ? {} : { userIdKey: USER_ID_KEY }), ...c.redis } })
let refreshes = 0
const refresh = async (ctx) => {
  refreshes++
  const tag = `${c.name}-${ctx.userId}-${refreshes}-${Math.random().toString(36).slice(2)}`
  return { accessToken: `at-${tag}`, refreshToken: `rt-${tag}`, expiresIn: 3600 }
}
const warnings = []
process.on('warning', (w) => warnings.push({ code: w.code, message: w.message }))

const ops = {
  async get(user, token) {
    const t = await manager.getValidToken(user, { ...token, expiresAt: token.expiresAt }, refresh)
    return { ...t, expiresAt: t.expiresAt.getTime() }
  },
  invalidate: (user, accessToken) => manager.invalidate(user, accessToken),
  stats: () => ({ ...manager.stats(), refreshFnCalls: refreshes, warnings }),
  close: () => manager.close(),
}

process.on('message', async ({ id, op, args }) => {
  try {
    process.send({ id, result: (await ops[op](...args)) ?? null })
  } catch (e) {
    process.send({ id, error: { code: e.code, message: e.message } })
  }
  if (op === 'close') process.disconnect()
})
process.send({ ready: true })
