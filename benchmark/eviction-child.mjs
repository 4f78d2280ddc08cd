// The eviction rows, one competitor per process: `users` users refreshed
// once, then left idle while an active set keeps calling (slow path: each
// presents a due token) past `idleTtlMs`. Prints one JSON line.
// Usage: node --expose-gc --import tsx eviction-child.mjs <seed|addon> <users> <idleTtlMs> <tokenBytes>
import { monitorEventLoopDelay, performance } from 'node:perf_hooks'
import { setImmediate as tick, setTimeout as sleep } from 'node:timers/promises'

import { TokenManager } from '../index.mjs'
import { fakeToken } from './competitors.mjs'
import { SeedTokenManager } from './seed-token-manager.ts'

const [name, usersArg, ttlArg, bytesArg] = process.argv.slice(2)
const users = Number(usersArg)
const idleTtlMs = Number(ttlArg)
const tokenBytes = Number(bytesArg)
const make = { addon: () => new TokenManager({ idleTtlMs }), seed: () => new SeedTokenManager() }[name]
if (!make || !(users > 0) || !(idleTtlMs > 0) || !(tokenBytes > 0) || typeof globalThis.gc !== 'function') {
  console.error('usage: node --expose-gc --import tsx eviction-child.mjs <seed|addon> <users> <idleTtlMs> <tokenBytes>')
  process.exit(2)
}
// Users the manager holds: the addon's count, the seed's map (it never
// evicts; `mutexes` is private to TypeScript only).
const held = (m) => (m instanceof TokenManager ? m.stats().users : m.mutexes.size)

/** Users who keep calling throughout, and calls per millisecond tick. */
const ACTIVE = 1000
const CALLS_PER_TICK = 10
/** How long past idleTtlMs the idle users may take to go. */
const SLACK_MS = 2000

const later = new Date(Date.now() + 3_600_000)
const presented = { accessToken: fakeToken('old', tokenBytes), refreshToken: fakeToken('rt-old', 64), expiresAt: new Date(Date.now() - 1000) }
const refreshed = (tag) => ({ accessToken: fakeToken(`a${tag}`, tokenBytes), refreshToken: fakeToken(`r${tag}`, 64), expiresAt: later })

// Every user gets its own new tokens, as a provider would issue them, in
// batches of 200 concurrent calls: small enough that a batch itself does
// not hold the event loop for long.
async function fill(m, prefix, from, to) {
  for (let b = from; b < to; b += 200) {
    const ps = []
    for (let i = b; i < Math.min(b + 200, to); i++) {
      const r = refreshed(i)
      ps.push(m.getValidToken(`${prefix}-${i}`, presented, async () => r))
    }
    await Promise.all(ps)
    await tick()
  }
}

async function settle() {
  for (let i = 0; i < 4; i++) {
    globalThis.gc()
    await tick()
  }
}

const rss = () => process.memoryUsage().rss

// Warm-up on a throwaway instance: JIT code and heap headroom belong in the baseline.
await fill(make(), 'warm', 0, 20_000)
await settle()
const before = rss()

const loop = monitorEventLoopDelay({ resolution: 1 })
loop.enable()
const m = make()
const fillStart = Date.now()
await fill(m, 'user', 0, users)
await fill(m, 'active', 0, ACTIVE)
const filledAt = Date.now()
const fillLoopMaxMs = loop.max / 1e6
await settle()
const peak = rss()
const heldFull = held(m)

// stats() with the table full (the addon's only).
let statsMaxMs = NaN
let statsMedianMs = NaN
if (m instanceof TokenManager) {
  const xs = []
  for (let i = 0; i < 200; i++) {
    const t = performance.now()
    m.stats()
    xs.push(performance.now() - t)
  }
  xs.sort((a, b) => a - b)
  statsMaxMs = xs.at(-1)
  statsMedianMs = xs[xs.length >> 1]
}

// The million go idle; the active set keeps calling, each call timed.
// Then traffic stops, and resident memory is read again. The phase is also
// split where the first users fall due: before it nothing is evicted, so
// its delays are the machine's and the runtime's, not eviction's.
loop.reset()
const idleAt = filledAt + idleTtlMs
const dueAt = fillStart + idleTtlMs
const stopAt = idleAt + SLACK_MS
const evicting = monitorEventLoopDelay({ resolution: 1 })
let quietLoopMaxMs = NaN
let quietSlowestCallMs = NaN
let evictingSlowestCallMs = 0
let slowestCallMs = 0
let statsDuringMaxMs = 0
let statsQuietMaxMs = NaN
let calls = 0
let errors = 0
let goneAfterMs = NaN
let next = 0
const noRefresh = (i) => async () => refreshed(`x${i}`)
while (Date.now() < stopAt) {
  if (Number.isNaN(quietLoopMaxMs) && Date.now() >= dueAt) {
    quietLoopMaxMs = loop.max / 1e6
    quietSlowestCallMs = slowestCallMs
    statsQuietMaxMs = statsDuringMaxMs
    statsDuringMaxMs = 0
    evicting.enable()
  }
  for (let k = 0; k < CALLS_PER_TICK; k++) {
    const i = next++ % ACTIVE
    const t = performance.now()
    const p = m.getValidToken(`active-${i}`, presented, noRefresh(i))
    const d = performance.now() - t
    if (d > slowestCallMs) slowestCallMs = d
    if (!Number.isNaN(quietLoopMaxMs) && d > evictingSlowestCallMs) evictingSlowestCallMs = d
    p.catch(() => errors++)
    calls++
  }
  if (next % 100 === 0) {
    const t = performance.now()
    const h = held(m)
    statsDuringMaxMs = Math.max(statsDuringMaxMs, performance.now() - t)
    if (Number.isNaN(goneAfterMs) && h <= ACTIVE) goneAfterMs = Date.now() - idleAt
  }
  await sleep(1)
}
const heldAfter = held(m)
const evictLoopMaxMs = loop.max / 1e6
const evictingLoopMaxMs = evicting.max / 1e6
loop.disable()
evicting.disable()
await sleep(50)
await settle()
const busyAfter = rss()
// Then no calls at all for a while: the addon returns free pages once
// nothing has called for a second.
await sleep(3000)
await settle()
const quietAfter = rss()
globalThis.keepAlive = m

console.log(
  JSON.stringify({
    users,
    active: ACTIVE,
    idleTtlMs,
    fillSeconds: (filledAt - fillStart) / 1000,
    fillLoopMaxMs,
    evictLoopMaxMs,
    quietLoopMaxMs,
    evictingLoopMaxMs,
    slowestCallMs,
    quietSlowestCallMs,
    evictingSlowestCallMs,
    calls,
    errors,
    statsMaxMs,
    statsMedianMs,
    statsQuietMaxMs,
    statsDuringMaxMs,
    heldFull,
    heldAfter,
    goneAfterMs,
    rssPerUser: (peak - before) / users,
    rssReturnedBusyMB: (peak - busyAfter) / 2 ** 20,
    rssReturnedMB: (peak - quietAfter) / 2 ** 20,
    rssReturnedShare: (peak - quietAfter) / (peak - before),
  }),
)
