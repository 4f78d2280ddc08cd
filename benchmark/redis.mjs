// Benchmark rows for the Redis mode (cross-instance coordination):
// - refresh latency, Redis mode against local mode (a refresh function that
//   answers at once, so the difference is the coordination's cost);
// - Redis commands a refresh adds (target ≤ 2) and the hot path adds (0),
//   counted with redis-cli MONITOR;
// - refreshes across 4 processes × 1,000 users all presenting an expired
//   token at once, counted at a token endpoint (target exactly 1,000).
// Starts its own redis-server on a random loopback port. Run alone with
// `node benchmark/redis.mjs`, or import { redisRows }.
import { fileURLToPath } from 'node:url'

import { TokenManager } from '../index.mjs'
import { monitor, newKey, sleep, startProvider, startRedis, startWorker } from '../__test__/helpers/redis.mjs'

const expired = (u) => ({ accessToken: `old-${u}`, refreshToken: `r0-${u}`, expiresAt: Date.now() - 1_000 })
const instant = async (ctx) => ({ accessToken: `at-${ctx.userId}-${Math.random()}`, refreshToken: `rt-${Math.random()}`, expiresIn: 3600 })

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]
}

/** Sequential refreshes of `users` distinct users; latency of each call in µs. */
async function refreshLatency(manager, prefix, users) {
  const us = []
  for (let i = 0; i < users; i++) {
    const u = `${prefix}${i}`
    const t0 = process.hrtime.bigint()
    await manager.getValidToken(u, expired(u), instant)
    us.push(Number(process.hrtime.bigint() - t0) / 1e3)
  }
  us.sort((a, b) => a - b)
  return { p50: percentile(us, 50), p99: percentile(us, 99), mean: us.reduce((a, b) => a + b, 0) / us.length }
}

export async function redisRows({ users = 2_000, processes = 4, fleetUsers = 1_000, log = () => {} } = {}) {
  const redis = await startRedis()
  const key = newKey()
  const rows = []
  const row = (name, value, unit, target = '', note = '') => rows.push({ name, value, unit, target, note })
  try {
    // 1. Latency. Warm both first (JIT; Redis: connect, subscribe, load scripts).
    const local = new TokenManager()
    const shared = new TokenManager({ redis: { url: redis.url, encryptionKey: key } })
    await refreshLatency(local, 'warm-l-', 200)
    await refreshLatency(shared, 'warm-r-', 200)
    log(`refresh latency over ${users} users`)
    const l = await refreshLatency(local, 'lat-l-', users)
    const r = await refreshLatency(shared, 'lat-r-', users)
    const f = (v) => Number(v.toFixed(1))
    row('refresh latency, local mode (p50 / p99)', `${f(l.p50)} / ${f(l.p99)}`, 'µs')
    row('refresh latency, Redis mode (p50 / p99)', `${f(r.p50)} / ${f(r.p99)}`, 'µs', '', 'the write-back runs after the caller has its token')
    row('Redis mode adds per refresh (mean)', f(r.mean - l.mean), 'µs', '', 'one awaited Redis round trip + napi async hop')

    // 2. Commands per refresh and on the hot path.
    await sleep(200)
    let mon = await monitor(redis.port)
    const n = 100
    let last
    for (let i = 0; i < n; i++) last = await shared.getValidToken(`rt-${i}`, expired(`rt-${i}`), instant)
    await sleep(200)
    const refresh = await mon.stop()
    const perRefresh = refresh.sent.length / n
    const names = [...new Set(refresh.names)].join(', ')
    row('Redis commands sent per refresh', perRefresh, 'commands', '≤ 2', `${names}; ${(refresh.scripted / n).toFixed(0)} run inside the scripts`)
    mon = await monitor(redis.port)
    for (let i = 0; i < 10_000; i++) await shared.getValidToken('rt-0', { accessToken: last.accessToken, expiresAt: last.expiresAt }, instant)
    row('Redis commands sent on the hot path (10,000 calls)', (await mon.stop()).sent.length, 'commands', '0')
    await shared.close()

    // 3. A fleet: every process asks for every user at once.
    log(`${processes} processes × ${fleetUsers} users`)
    const provider = await startProvider({ delayMs: 20 })
    try {
      const workers = Array.from({ length: processes }, () =>
        startWorker({ redisUrl: redis.url, key, providerUrl: provider.url, userPrefix: 'fleet-', userCount: fleetUsers, refreshTimeoutMs: 60_000 }),
      )
      await Promise.all(workers.map((w) => w.ready))
      const t0 = performance.now()
      workers.forEach((w) => w.go())
      const done = await Promise.all(workers.map((w) => w.done))
      const wall = performance.now() - t0
      const results = done.flatMap((d) => d.results)
      const persisting = results.filter((x) => x.shouldUpdate).length
      const errors = results.filter((x) => x.error).length
      row(
        `refreshes, ${processes} processes × ${fleetUsers.toLocaleString('en')} users`,
        provider.stats.refreshes,
        'refreshes',
        `exactly ${fleetUsers}`,
        `${provider.stats.rejected} stale refresh tokens, ${errors} errors, ${persisting} callers told to persist, ${Math.round(wall)} ms wall`,
      )
      await Promise.all(workers.map((w) => w.exited))
    } finally {
      await provider.close()
    }
  } finally {
    await redis.stop()
  }
  return rows
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const rows = await redisRows({ log: (m) => console.error(`… ${m}`) })
  console.table(rows)
}
