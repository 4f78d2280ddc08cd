// The eviction rows, one competitor per process: `users` users refreshed
// once, then left idle while an active set keeps calling (slow path: each
// presents a due token) past `idleTtlMs`. Prints one JSON line.
// Usage: node --expose-gc --import tsx eviction-child.mjs <seed|addon|floor> <users> <idleTtlMs> <tokenBytes>
import { PerformanceObserver, constants as perfConstants, monitorEventLoopDelay, performance } from 'node:perf_hooks'
import { setImmediate as tick, setTimeout as sleep } from 'node:timers/promises'

import { TokenManager } from '../index.mjs'
import { fakeToken, floorRefresh } from './competitors.mjs'
import { ownDelay, ownParts } from './own-time.mjs'
import { SeedTokenManager } from './seed-token-manager.ts'

const [name, usersArg, ttlArg, bytesArg] = process.argv.slice(2)
const users = Number(usersArg)
const idleTtlMs = Number(ttlArg)
const tokenBytes = Number(bytesArg)
// The floor holds nothing and calls refreshFn on every due token: what the
// machine and the runtime pause with no manager's state at all.
const make = { addon: () => new TokenManager({ idleTtlMs }), seed: () => new SeedTokenManager(), floor: () => ({ getValidToken: floorRefresh }) }[name]
if (!make || !(users > 0) || !(idleTtlMs > 0) || !(tokenBytes > 0) || typeof globalThis.gc !== 'function') {
  console.error('usage: node --expose-gc --import tsx eviction-child.mjs <seed|addon|floor> <users> <idleTtlMs> <tokenBytes>')
  process.exit(2)
}
// Users the manager holds: the addon's count, the seed's map (it never
// evicts; `mutexes` is private to TypeScript only), none for the floor.
const held = (m) => (m instanceof TokenManager ? m.stats().users : m instanceof SeedTokenManager ? m.mutexes.size : 0)

/** Users who keep calling throughout, and calls per millisecond tick. */
const ACTIVE = 1000
const CALLS_PER_TICK = 10
/** How long past idleTtlMs the idle users may take to go. */
const SLACK_MS = 2000

const later = new Date(Date.now() + 3_600_000)
const presented = { accessToken: fakeToken('old', tokenBytes), refreshToken: fakeToken('rt-old', 64), expiresAt: new Date(Date.now() - 1000) }
const refreshed = (tag) => ({ accessToken: fakeToken(`a${tag}`, tokenBytes), refreshToken: fakeToken(`r${tag}`, 64), expiresAt: later })

// Every user gets its own new tokens, as a provider would issue them, in
// batches of FILL_BATCH concurrent calls, a turn of the event loop each.
// At 200 a turn, turns with no GC in them held the JS thread 8 to 12 ms
// here (making the tokens, the refreshes and their promises): half the
// budget, spent by the benchmark's choice of turn. At 50, the run's delays
// show the manager's and the runtime's pauses rather than that choice.
const FILL_BATCH = 50
async function fill(m, prefix, from, to) {
  for (let b = from; b < to; b += FILL_BATCH) {
    const ps = []
    for (let i = b; i < Math.min(b + FILL_BATCH, to); i++) {
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
const own = ownDelay()
const m = make()
const fillStart = Date.now()
await fill(m, 'user', 0, users)
await fill(m, 'active', 0, ACTIVE)
const filledAt = Date.now()
const fillLoopMaxMs = loop.max / 1e6
const fillOwnMaxMs = own.take()
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
own.take()
const idleAt = filledAt + idleTtlMs
const dueAt = fillStart + idleTtlMs
const stopAt = idleAt + SLACK_MS
const evicting = monitorEventLoopDelay({ resolution: 1 })
// The two parts of the idle phase: the slowest call (wall and own time,
// see own-time.mjs) and the slowest stats() in each. The slowest call by own time
// also keeps what its own time was made of: running, waiting for a CPU,
// and the GC that overlapped it (matched after the phase, from the gc
// entries the observer below kept).
const part = () => ({ callMs: 0, statsMs: 0, slowest: { ownMs: 0, at: 0, ms: 0, runMs: NaN, waitMs: NaN, faults: NaN, majorFaults: NaN } })
const gcs = []
const gcObserver = new PerformanceObserver((list) => {
  for (const e of list.getEntries()) gcs.push({ start: e.startTime, end: e.startTime + e.duration, kind: e.detail?.kind })
})
gcObserver.observe({ entryTypes: ['gc'] })
const GC_KINDS = { [perfConstants.NODE_PERFORMANCE_GC_MINOR]: 'scavenge', [perfConstants.NODE_PERFORMANCE_GC_MAJOR]: 'mark-compact', [perfConstants.NODE_PERFORMANCE_GC_INCREMENTAL]: 'incremental marking', [perfConstants.NODE_PERFORMANCE_GC_WEAKCB]: 'weak callbacks' }
/** GC inside a part's slowest call: total ms and kinds. */
function gcDuring({ at, ms }) {
  const inside = gcs.filter((g) => g.start < at + ms && g.end > at)
  const total = inside.reduce((sum, g) => sum + Math.min(g.end, at + ms) - Math.max(g.start, at), 0)
  return { gcMs: total, gcKinds: [...new Set(inside.map((g) => GC_KINDS[g.kind] ?? 'other'))].join('+') || 'none' }
}
const quiet = part()
const evictingPart = part()
let phase = quiet
let quietLoopMaxMs = NaN
let quietOwnLoopMaxMs = NaN
let calls = 0
let errors = 0
let goneAfterMs = NaN
let next = 0
const noRefresh = (i) => async () => refreshed(`x${i}`)
while (Date.now() < stopAt) {
  if (phase === quiet && Date.now() >= dueAt) {
    quietLoopMaxMs = loop.max / 1e6
    quietOwnLoopMaxMs = own.take()
    evicting.enable()
    phase = evictingPart
  }
  for (let k = 0; k < CALLS_PER_TICK; k++) {
    const i = next++ % ACTIVE
    const [r0, w0, f0, mf0] = ownParts()
    const t = performance.now()
    const p = m.getValidToken(`active-${i}`, presented, noRefresh(i))
    const d = performance.now() - t
    const [r1, w1, f1, mf1] = ownParts()
    const o = Math.min(d, r1 - r0 + (w1 - w0))
    phase.callMs = Math.max(phase.callMs, d)
    if (o > phase.slowest.ownMs) phase.slowest = { ownMs: o, at: t, ms: d, runMs: r1 - r0, waitMs: w1 - w0, faults: f1 - f0, majorFaults: mf1 - mf0 }
    p.catch(() => errors++)
    calls++
  }
  if (next % 100 === 0) {
    const t = performance.now()
    const h = held(m)
    phase.statsMs = Math.max(phase.statsMs, performance.now() - t)
    if (Number.isNaN(goneAfterMs) && h <= ACTIVE) goneAfterMs = Date.now() - idleAt
  }
  await sleep(1)
}
const heldAfter = held(m)
const evictLoopMaxMs = loop.max / 1e6
const evictingLoopMaxMs = evicting.max / 1e6
const evictingOwnLoopMaxMs = own.take()
loop.disable()
evicting.disable()
own.stop()
await sleep(50)
gcObserver.disconnect()
const anatomy = ({ slowest: s }) => ({ runMs: s.runMs, waitMs: s.waitMs, faults: s.faults, majorFaults: s.majorFaults, ...gcDuring(s) })
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
    fillOwnMaxMs,
    evictLoopMaxMs,
    quietLoopMaxMs,
    evictingLoopMaxMs,
    quietOwnLoopMaxMs,
    evictingOwnLoopMaxMs,
    quietSlowestCallMs: quiet.callMs,
    evictingSlowestCallMs: evictingPart.callMs,
    quietOwnSlowestCallMs: quiet.slowest.ownMs,
    evictingOwnSlowestCallMs: evictingPart.slowest.ownMs,
    quietSlowestCallAnatomy: anatomy(quiet),
    evictingSlowestCallAnatomy: anatomy(evictingPart),
    calls,
    errors,
    statsMaxMs,
    statsMedianMs,
    statsQuietMaxMs: quiet.statsMs,
    statsDuringMaxMs: evictingPart.statsMs,
    heldFull,
    heldAfter,
    goneAfterMs,
    rssPerUser: (peak - before) / users,
    rssReturnedBusyMB: (peak - busyAfter) / 2 ** 20,
    rssReturnedMB: (peak - quietAfter) / 2 ** 20,
    rssReturnedShare: (peak - quietAfter) / (peak - before),
  }),
)
