// Benchmark rows for the Redis mode (cross-instance coordination):
// - refresh latency, Redis mode against local mode (a refresh function that
//   answers at once, so the difference is the coordination's cost), on one
//   plaintext node, over TLS and on a three-master Redis Cluster, measured
//   in interleaved rounds, beside the loopback round trip measured in the
//   same rounds (a PING on a plain socket: the floor of each of the two
//   round trips a refresh makes);
// - refreshes per second with 1,000 in flight, Redis one node against local;
// - Redis commands a refresh adds (target ≤ 2) and the hot path adds (0),
//   counted with redis-cli MONITOR (on every node of the cluster);
// - how long `invalidate` in one instance takes to reach another;
// - refreshes across 4 processes × 1,000 users all presenting an expired
//   token at once, counted at a token endpoint (target exactly 1,000).
// Starts its own servers on random loopback ports (certificates made with
// openssl). Run alone with `node benchmark/redis.mjs`, or import { redisRows }.
import net from 'node:net'
import { fileURLToPath } from 'node:url'

import { TokenManager } from '../index.mjs'
import { makeCertificates, monitor, newKey, sleep, startCluster, startProvider, startRedis, startWorker, USER_ID_KEY } from '../__test__/helpers/redis.mjs'

const expired = (u) => ({ accessToken: `old-${u}`, refreshToken: `r0-${u}`, expiresAt: Date.now() - 1_000 })
const instant = async (ctx) => ({ accessToken: `at-${ctx.userId}-${Math.random()}`, refreshToken: `rt-${Math.random()}`, expiresIn: 3600 })

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]
}

/** Sequential refreshes of `count` distinct users; latency of each call in µs. */
async function refreshLatency(manager, prefix, count, into = []) {
  for (let i = 0; i < count; i++) {
    const u = `${prefix}${i}`
    const t0 = process.hrtime.bigint()
    await manager.getValidToken(u, expired(u), instant)
    into.push(Number(process.hrtime.bigint() - t0) / 1e3)
  }
  return into
}

/** Round trips of `PING` on one plain socket to `port`, one at a time; µs each. */
export async function pingRoundTrips(port, count, into = []) {
  const socket = net.connect({ port, host: '127.0.0.1', noDelay: true })
  await new Promise((resolve, reject) => socket.once('connect', resolve).once('error', reject))
  try {
    for (let i = 0; i < count; i++) {
      const t0 = process.hrtime.bigint()
      await new Promise((resolve) => {
        socket.once('data', resolve)
        socket.write('PING\r\n')
      })
      into.push(Number(process.hrtime.bigint() - t0) / 1e3)
    }
  } finally {
    socket.destroy()
  }
  return into
}

/** `count` refreshes of distinct users all at once; refreshes per second. */
export async function refreshRate(manager, prefix, count) {
  const t0 = process.hrtime.bigint()
  await Promise.all(Array.from({ length: count }, (_, i) => manager.getValidToken(`${prefix}${i}`, expired(`${prefix}${i}`), instant)))
  return count / (Number(process.hrtime.bigint() - t0) / 1e9)
}

function median(xs) {
  return percentile([...xs].sort((a, b) => a - b), 50)
}

function summary(us) {
  us.sort((a, b) => a - b)
  return { p50: percentile(us, 50), p99: percentile(us, 99), mean: us.reduce((a, b) => a + b, 0) / us.length }
}

/** Commands clients sent to `targets` ([port, cliArgs][]) while `work` ran. */
async function commands(targets, work) {
  const mons = await Promise.all(targets.map(([port, args]) => monitor(port, args)))
  await work()
  await sleep(200) // a background write, had there been one, counts too
  const seen = await Promise.all(mons.map((m) => m.stop()))
  return { sent: seen.flatMap((s) => s.sent), names: seen.flatMap((s) => s.names), scripted: seen.reduce((n, s) => n + s.scripted, 0) }
}

export async function redisRows({ users = 2_000, rounds = 4, inFlight = 1_000, processes = 4, fleetUsers = 1_000, log = () => {} } = {}) {
  const redis = await startRedis()
  const certs = await makeCertificates()
  const tls = await startRedis(undefined, { tls: certs })
  const cluster = await startCluster({ masters: 3 })
  const key = newKey()
  const rows = []
  const row = (name, value, unit, target = '', note = '') => rows.push({ name, value, unit, target, note })
  const f = (v) => Number(v.toFixed(1))
  try {
    const modes = [
      { name: 'one node', redis: { url: redis.url }, nodes: [[redis.port, []]] },
      { name: 'TLS', redis: { url: tls.url, tls: { ca: certs.ca } }, nodes: [[tls.port, tls.cliArgs]] },
      { name: 'Cluster, 3 masters', redis: { cluster: cluster.urls }, nodes: cluster.ports.map((p) => [p, []]) },
    ]
    const local = new TokenManager()
    for (const m of modes) m.manager = new TokenManager({ redis: { ...m.redis, encryptionKey: key, userIdKey: USER_ID_KEY } })
    // 1. Latency. Warm each first (JIT; Redis: connect, subscribe, load scripts),
    // then measure in interleaved rounds so load from elsewhere lands on all alike.
    await refreshLatency(local, 'warm-l-', 200)
    for (const [i, m] of modes.entries()) await refreshLatency(m.manager, `warm-${i}-`, 200)
    log(`refresh latency over ${users} users × ${modes.length + 1} modes`)
    const samples = { local: [], modes: modes.map(() => []), ping: [] }
    const per = Math.ceil(users / rounds)
    for (let r = 0; r < rounds; r++) {
      await pingRoundTrips(redis.port, per, samples.ping)
      await refreshLatency(local, `lat-l-${r}-`, per, samples.local)
      for (const [i, m] of modes.entries()) await refreshLatency(m.manager, `lat-${i}-${r}-`, per, samples.modes[i])
    }
    const l = summary(samples.local)
    const ping = summary(samples.ping)
    row('loopback round trip, PING from Node (p50 / p99)', `${f(ping.p50)} / ${f(ping.p99)}`, 'µs', '', 'one node, measured in the same rounds')
    row('refresh latency, local mode (p50 / p99)', `${f(l.p50)} / ${f(l.p99)}`, 'µs')
    for (const [i, m] of modes.entries()) {
      const r = summary(samples.modes[i])
      row(
        `refresh latency, Redis ${m.name} (p50 / p99)`,
        `${f(r.p50)} / ${f(r.p99)}`,
        'µs',
        i === 0 ? '≤ 150 µs added p50' : '',
        `adds ${f(r.p50 - l.p50)} µs p50 (${f(r.mean - l.mean)} mean) over local, loopback round trip ${f(ping.p50)} µs p50: two awaited round trips (read-or-lock, write-publish-unlock) + a JS → tokio → JS hop each`,
      )
    }
    // Throughput with `inFlight` refreshes of distinct users at once.
    log(`${inFlight} refreshes in flight × ${rounds} rounds`)
    const rate = { local: [], redis: [] }
    for (let r = 0; r < rounds; r++) {
      rate.local.push(await refreshRate(local, `fl-l-${r}-`, inFlight))
      rate.redis.push(await refreshRate(modes[0].manager, `fl-r-${r}-`, inFlight))
    }
    const [lr, rr] = [median(rate.local), median(rate.redis)]
    row(
      `refreshes/s, ${inFlight.toLocaleString('en')} in flight, Redis one node / local`,
      `${Math.round(rr).toLocaleString('en')} / ${Math.round(lr).toLocaleString('en')}`,
      'refreshes/s',
      '',
      `ratio Redis/local ${(rr / lr).toFixed(2)} (median of ${rounds} interleaved rounds)`,
    )

    // 2. Commands per refresh and on the hot path, on every node.
    await sleep(200)
    const n = 100
    for (const [i, m] of modes.entries()) {
      let last
      const refresh = await commands(m.nodes, async () => {
        for (let j = 0; j < n; j++) last = await m.manager.getValidToken(`rt-${i}-${j}`, expired(`rt-${i}-${j}`), instant)
      })
      const names = [...new Set(refresh.names)].join(', ')
      row(`Redis commands sent per refresh, ${m.name}`, refresh.sent.length / n, 'commands', '≤ 2', `${names}; ${(refresh.scripted / n).toFixed(0)} run inside the scripts`)
      const hot = await commands(m.nodes, async () => {
        for (let j = 0; j < 10_000; j++) await m.manager.getValidToken(`rt-${i}-0`, { accessToken: last.accessToken, expiresAt: last.expiresAt }, instant)
      })
      row(`Redis commands sent on the hot path (10,000 calls), ${m.name}`, hot.sent.length, 'commands', '0')
    }
    // 3. invalidate in one instance until another stops serving the token.
    const peer = new TokenManager({ redis: { url: redis.url, encryptionKey: key, userIdKey: USER_ID_KEY } })
    const first = modes[0].manager
    await peer.getValidToken('inv-warm', expired('inv-warm'), instant)
    const reach = []
    for (let i = 0; i < 200; i++) {
      const u = `inv-${i}`
      const t = await first.getValidToken(u, expired(u), instant)
      const held = { accessToken: t.accessToken, expiresAt: t.expiresAt }
      await peer.getValidToken(u, expired(u), instant) // the peer holds it, shared
      const t0 = process.hrtime.bigint()
      first.invalidate(u, t.accessToken)
      while ((await peer.getValidToken(u, held, instant)).accessToken === t.accessToken) await new Promise((r) => setImmediate(r))
      reach.push(Number(process.hrtime.bigint() - t0) / 1e3)
    }
    const inv = summary(reach)
    row('invalidate reaches another instance (p50 / p99)', `${f(inv.p50 / 1000)} / ${f(inv.p99 / 1000)}`, 'ms', '≤ 200', 'one node; until the other stops serving the token (pub/sub)')
    await peer.close()
    await Promise.all(modes.map((m) => m.manager.close()))

    // 4. A fleet: every process asks for every user at once.
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
    await Promise.all([redis.stop(), tls.stop(), cluster.stop()])
    certs.remove()
  }
  return rows
}


if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const rows = await redisRows({ log: (m) => console.error(`… ${m}`) })
  console.table(rows)
}
