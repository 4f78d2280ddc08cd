// Where a Redis-mode refresh spends its time, stage by stage, one refresh at
// a time and with 1,000 in flight (one plaintext node on loopback):
// - the loopback round trip: a PING on a plain socket from this process;
// - each script's server time: Redis's SLOWLOG with every command logged;
// - each native call as JS sees it (call to callback), minus round trip and
//   server time: the JS → tokio hop, the client library and the hop back;
// - the refresh as a whole, against local mode: the rest is JS glue.
// Run alone: `node benchmark/redis-stages.mjs [--users N] [--rounds N]`.
import { createRequire } from 'node:module'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'

import { cli, newKey, sleep, startRedis, USER_ID_KEY } from '../__test__/helpers/redis.mjs'

const require = createRequire(import.meta.url)
const binding = require('../binding.js')

// Every native call lib/coordination.js makes, timed from the call to its
// answer reaching JS. Installed before lib/coordination.js reads the class,
// so it constructs this one. Either binding: calls that answer through the
// constructor's callback with a ticket, or (before) napi async methods.
const calls = { acquire: [], commit: [] }
let timing = false
const Native = binding.BindingCoordinator
const instances = []
const started = new Map()
const mine = new Map()
class TimedCoordinator extends Native {
  constructor(manager, options, answer) {
    const heard = (ticket, value) => {
      const s = started.get(ticket)
      if (s !== undefined) {
        started.delete(ticket)
        s.into.push(Number(process.hrtime.bigint() - s.t0) / 1e3)
      }
      const r = mine.get(ticket)
      if (r !== undefined) {
        mine.delete(ticket)
        return r(value)
      }
      answer(ticket, value)
    }
    super(manager, options, heard)
    this.ticketed = answer !== undefined
    instances.push(this)
  }
  acquire(...args) {
    return this.#timed(calls.acquire, () => super.acquire(...args), args[0])
  }
  commit(...args) {
    return this.#timed(calls.commit, () => super.commit(...args), args[0])
  }
  #timed(into, call, ticket) {
    if (!timing) return call()
    const t0 = process.hrtime.bigint()
    if (this.ticketed) {
      started.set(ticket, { into, t0 })
      return call()
    }
    return call().then((v) => {
      into.push(Number(process.hrtime.bigint() - t0) / 1e3)
      return v
    })
  }
  /** A call answered without Redis (a userId that is not a string): the hops alone. */
  hop() {
    if (!this.ticketed) return super.acquire(0, 'x', Date.now(), 1_000, Date.now(), 'never')
    const ticket = 0xffffffff
    return new Promise((resolve) => {
      mine.set(ticket, resolve)
      super.acquire(ticket, 0, 'x', Date.now(), 1_000, Date.now(), 'never')
    })
  }
}
binding.BindingCoordinator = TimedCoordinator
const { TokenManager } = require('../index.js')
// After the class is replaced: redis.mjs loads the package too.
const { pingRoundTrips, refreshRate: inFlight } = await import('./redis.mjs')

const expired = (u) => ({ accessToken: `old-${u}`, refreshToken: `r0-${u}`, expiresAt: Date.now() - 1_000 })
const instant = async (ctx) => ({ accessToken: `at-${ctx.userId}-${Math.random()}`, refreshToken: `rt-${Math.random()}`, expiresIn: 3600 })

export const p50 = (xs) => pct(xs, 50)
function pct(xs, p) {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]
}

/** Sequential refreshes of distinct users; µs each. */
async function oneAtATime(manager, prefix, count, into) {
  for (let i = 0; i < count; i++) {
    const u = `${prefix}${i}`
    const t0 = process.hrtime.bigint()
    await manager.getValidToken(u, expired(u), instant)
    into.push(Number(process.hrtime.bigint() - t0) / 1e3)
  }
}

/** Server µs per command name (EVALSHA split by key count: 3 acquire, 2 commit) since the last reset. */
async function slowlog(port) {
  const text = await cli(port, 'SLOWLOG', 'GET', '1000000')
  const by = {}
  // redis-cli prints each entry as: id, timestamp, µs, then the argv lines.
  const lines = text.split('\n')
  for (let i = 0; i + 3 < lines.length; i++) {
    if (!/^\d+$/.test(lines[i]) || !/^\d+$/.test(lines[i + 1]) || !/^\d+$/.test(lines[i + 2])) continue
    const name = lines[i + 3]
    if (!/^[A-Za-z]+$/.test(name)) continue
    const us = Number(lines[i + 2])
    let key = name.toUpperCase()
    if (key === 'EVALSHA') key += lines[i + 5] === '3' ? ' acquire' : lines[i + 5] === '2' ? ' commit' : ` ${lines[i + 5]} keys`
    ;(by[key] ??= []).push(us)
    i += 3
  }
  return by
}

export async function redisStages({ users = 2_000, rounds = 4, inFlightUsers = 1_000, log = () => {} } = {}) {
  const redis = await startRedis()
  const key = newKey()
  const rows = []
  const row = (name, value, unit, note = '') => rows.push({ name, value, unit, note })
  const f = (v) => Number(v.toFixed(1))
  try {
    const local = new TokenManager()
    const remote = new TokenManager({ redis: { url: redis.url, encryptionKey: key, userIdKey: USER_ID_KEY } })
    await oneAtATime(local, 'warm-l-', 300, [])
    await oneAtATime(remote, 'warm-r-', 300, [])
    await cli(redis.port, 'CONFIG', 'SET', 'slowlog-log-slower-than', '0')
    await cli(redis.port, 'CONFIG', 'SET', 'slowlog-max-len', '1000000')
    await cli(redis.port, 'SLOWLOG', 'RESET')

    log(`one at a time: ${users} users × 2 modes, ${rounds} interleaved rounds`)
    const l = []
    const r = []
    const rtt = []
    const per = Math.ceil(users / rounds)
    const glue = []
    for (let k = 0; k < rounds; k++) {
      await pingRoundTrips(redis.port, 500, rtt)
      await oneAtATime(local, `l-${k}-`, per, l)
      timing = true
      const from = r.length
      await oneAtATime(remote, `r-${k}-`, per, r)
      timing = false
      // Per refresh: what neither native call accounts for.
      for (let i = from; i < r.length; i++) glue.push(r[i] - calls.acquire[i] - calls.commit[i])
    }
    const server = await slowlog(redis.port)
    const rt = p50(rtt)
    const added = p50(r) - p50(l)
    row('loopback round trip (PING, plain socket)', f(rt), 'µs p50')
    row('refresh, local mode', f(p50(l)), 'µs p50')
    row('refresh, Redis one node', f(p50(r)), 'µs p50', `adds ${f(added)} µs p50 (${f(pct(r, 99) - pct(l, 99))} at p99) over local; round trip ${f(rt)} µs`)
    for (const [name, us] of Object.entries(server).sort()) row(`server time, ${name}`, f(p50(us)), 'µs p50', `${us.length} commands`)
    const acq = p50(calls.acquire)
    const com = p50(calls.commit)
    const sAcq = p50(server['EVALSHA acquire'] ?? [0])
    const sCom = p50(server['EVALSHA commit'] ?? [0])
    row('acquire, as JS sees it', f(acq), 'µs p50', `${f(acq - rt - sAcq)} µs beyond round trip and server time: hops and client`)
    row('commit, as JS sees it', f(com), 'µs p50', `${f(com - rt - sCom)} µs beyond round trip and server time: hops and client`)
    row('JS glue beyond local mode', f(p50(glue) - p50(l)), 'µs p50', 'per refresh: its time minus its two native calls, minus local mode p50')

    // The hop alone: a call the native side answers without Redis (a
    // userId that is not a string), JS → tokio → JS.
    const hops = []
    for (let i = 0; i < 2_000; i++) {
      const t0 = process.hrtime.bigint()
      await instances[0].hop()
      hops.push(Number(process.hrtime.bigint() - t0) / 1e3)
    }
    row('native call answered without Redis (the hops alone)', f(p50(hops)), 'µs p50', `p99 ${f(pct(hops, 99))}`)

    // INFO server alone, as the acquire script's restart guard runs it.
    await cli(redis.port, 'SLOWLOG', 'RESET')
    for (let i = 0; i < 200; i++) {
      await cli(redis.port, 'EVAL', "redis.pcall('INFO', 'server') return 1", '0')
      await cli(redis.port, 'EVAL', 'return 1', '0')
    }
    const evals = (await slowlog(redis.port)).EVAL ?? []
    const info = evals.filter((_, i) => i % 2 === 1)
    const none = evals.filter((_, i) => i % 2 === 0)
    row("INFO 'server' inside a script", f(p50(info) - p50(none)), 'µs p50', 'server time, once per lock grant')
    await cli(redis.port, 'CONFIG', 'SET', 'slowlog-log-slower-than', '10000')

    // 1,000 in flight.
    log(`${inFlightUsers} in flight × ${rounds} rounds`)
    calls.acquire.length = 0
    calls.commit.length = 0
    const rates = { local: [], redis: [] }
    for (let k = 0; k < rounds; k++) {
      rates.local.push(await inFlight(local, `fl-${k}-`, inFlightUsers))
      timing = k === rounds - 1
      rates.redis.push(await inFlight(remote, `fr-${k}-`, inFlightUsers))
      timing = false
    }
    const lr = p50(rates.local)
    const rr = p50(rates.redis)
    row(`refreshes/s, ${inFlightUsers.toLocaleString('en')} in flight, local`, Math.round(lr), '/s')
    row(`refreshes/s, ${inFlightUsers.toLocaleString('en')} in flight, Redis one node`, Math.round(rr), '/s', `ratio Redis/local ${(rr / lr).toFixed(2)}`)
    row(`acquire as JS sees it, ${inFlightUsers} in flight`, f(p50(calls.acquire)), 'µs p50')
    row(`commit as JS sees it, ${inFlightUsers} in flight`, f(p50(calls.commit)), 'µs p50')
    await sleep(50)
    await remote.close()
  } finally {
    await redis.stop()
  }
  return rows
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const { values } = parseArgs({ options: { users: { type: 'string', default: '2000' }, rounds: { type: 'string', default: '4' } } })
  const rows = await redisStages({ users: Number(values.users), rounds: Number(values.rounds), log: (m) => console.error(`… ${m}`) })
  console.table(rows)
}
