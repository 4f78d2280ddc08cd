// The steady-state row, one mode per process (steady-state.mjs runs it):
// `users` users, each calling `getToken` once a second (phases spread over
// the second), tokens living `lifetimeS` from an in-process refresh function
// that answers after `delayMinMs`..`delayMaxMs`, for `durationS`. Prints one
// JSON line: the counts over the measured period (after the first token
// lifetime) and a series of time buckets for the picture.
// Usage: node --expose-gc steady-state-child.mjs '<json: { refreshAhead, users, lifetimeS, durationS, bucketMs, delayMinMs, delayMaxMs, tokenBytes }>'
import { PerformanceObserver, monitorEventLoopDelay, performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'

import { TokenManager } from '../index.mjs'
import { ownDelay } from './own-time.mjs'

const o = JSON.parse(process.argv[2] ?? '{}')
const { refreshAhead, users, lifetimeS, durationS, bucketMs, delayMinMs, delayMaxMs, tokenBytes } = o
if (typeof refreshAhead !== 'boolean' || !(users > 0) || !(lifetimeS > 0) || !(durationS > lifetimeS) || !(bucketMs > 0) || !(delayMaxMs >= delayMinMs) || !(tokenBytes > 16)) {
  console.error("usage: node steady-state-child.mjs '{ refreshAhead, users, lifetimeS, durationS, bucketMs, delayMinMs, delayMaxMs, tokenBytes }'")
  process.exit(2)
}
const lifetimeMs = lifetimeS * 1000
const durationMs = durationS * 1000
/** How often the driver wakes to send the calls that fell due. */
const DRIVER_MS = 2

// Tokens carry their serial number first (`parseInt` reads it back), padded
// to a JWT's length; refresh tokens are `rt.<serial>`, so the refresh
// function sees which token it replaces.
const padding = 'x'.repeat(tokenBytes)
const tokenOf = (serial) => `${serial}.${padding}`.slice(0, tokenBytes)
let serials = 0
/** Per serial: when the refresh that issued it answered (performance.now()); NaN for rows the store started with. */
const issuedAt = []
/** Per serial: refreshes that presented its refresh token (1 at most: a second is a spent token sent again). */
const uses = []
/** Start of every refresh, ms since the run began. */
const refreshStarts = []
/** Per refresh of a token this run issued: its age when the refresh started, ms. */
const ages = []

let t0 = 0
async function refresher({ refreshToken }) {
  const start = performance.now()
  const previous = Number.parseInt(refreshToken.slice(3), 10)
  uses[previous] = (uses[previous] ?? 0) + 1
  refreshStarts.push(start - t0)
  if (Number.isFinite(issuedAt[previous])) ages.push(start - issuedAt[previous])
  await sleep(delayMinMs + Math.random() * (delayMaxMs - delayMinMs))
  const serial = serials++
  issuedAt[serial] = performance.now()
  return { accessToken: tokenOf(serial), refreshToken: `rt.${serial}`, expiresIn: lifetimeS }
}

// The app's table, in memory. Rows start with a token of unknown age that
// expires within a lifetime: the manager does not know its lifetime, so the
// default 5-minute buffer makes each user's first call refresh it (the
// first lifetime is the warm-up, left out of the counts).
const rows = new Map()
let saves = 0
const store = {
  load: (userId) => rows.get(userId) ?? null,
  save(userId, token, previous) {
    const row = rows.get(userId)
    if ((row?.accessToken ?? null) !== (previous?.accessToken ?? null)) return false
    rows.set(userId, { accessToken: token.accessToken, refreshToken: token.refreshToken, expiresAt: token.expiresAt })
    saves++
    return true
  },
}
const ids = Array.from({ length: users }, (_, i) => `user-${i}`)
const started = Date.now()
for (const id of ids) {
  const serial = serials++
  issuedAt[serial] = NaN
  rows.set(id, { accessToken: tokenOf(serial), refreshToken: `rt.${serial}`, expiresAt: new Date(started + Math.random() * lifetimeMs) })
}

// doubleCheckWindowMs (10 s by default) scales with the lifetime, as the
// rest of a short run does: a refresh within it hands back the token it
// produced even inside its buffer, so with tokens shorter than twice the
// window a call would be answered from the buffer until the token expired.
const manager = new TokenManager({ store, refresher, refreshAhead, doubleCheckWindowMs: Math.round((10_000 * lifetimeS) / 60) })

// One call per user per second, user i at i/users of each second.
const total = users * durationS
const sentAt = new Float64Array(total)
const latency = new Float32Array(total).fill(Number.NaN)
/** 1: the answer's token came from a refresh that ended after the call was made (the call waited on it). */
const waited = new Uint8Array(total)
let settled = 0
let errors = 0
let firstError = null
let allSettled = () => {}
const done = new Promise((resolve) => {
  allSettled = resolve
})

function send(i) {
  const t = performance.now()
  sentAt[i] = t - t0
  manager.getToken(ids[i % users]).then(
    (token) => {
      latency[i] = performance.now() - t
      if (issuedAt[Number.parseInt(token.accessToken, 10)] > t) waited[i] = 1
      if (++settled === total) allSettled()
    },
    (e) => {
      errors++
      firstError ??= String(e?.code ?? e?.message ?? e)
      if (++settled === total) allSettled()
    },
  )
}

const loop = monitorEventLoopDelay({ resolution: 1 })
// Garbage collections in the measured period: what a loop delay may be made of.
const gc = { count: 0, totalMs: 0, maxMs: 0, maxKind: 0 }
const gcObserver = new PerformanceObserver((list) => {
  for (const e of list.getEntries()) {
    if (e.startTime - t0 < lifetimeMs) continue
    gc.count++
    gc.totalMs += e.duration
    if (e.duration > gc.maxMs) {
      gc.maxMs = e.duration
      gc.maxKind = e.detail?.kind ?? 0
    }
  }
})
gcObserver.observe({ entryTypes: ['gc'] })
const own = ownDelay()
let measuredOwnMaxMs = NaN
t0 = performance.now()
// The measured period starts after the first lifetime.
setTimeout(() => {
  loop.enable()
  own.take()
}, lifetimeMs)
let next = 0
await new Promise((resolve) => {
  const drive = () => {
    const now = performance.now() - t0
    while (next < total && (next * 1000) / users <= now) send(next++)
    if (next < total) setTimeout(drive, DRIVER_MS)
    else resolve()
  }
  drive()
})
// Calls still unanswered 30 s after the last was sent are reported as such.
await Promise.race([done, new Promise((resolve) => setTimeout(resolve, 30_000).unref())])
loop.disable()
measuredOwnMaxMs = own.take()
own.stop()
gcObserver.disconnect()
const stats = manager.stats()
await manager.close()

// Counts over the measured period.
const measured = []
for (let i = 0; i < total; i++) if (sentAt[i] >= lifetimeMs) measured.push(i)
const quantile = (sorted, q) => (sorted.length === 0 ? NaN : sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))])
const sortedOf = (xs) => Float64Array.from(xs.filter((x) => Number.isFinite(x))).sort()
const lat = sortedOf(measured.map((i) => latency[i]))
let waitedCount = 0
let slowCount = 0
for (const i of measured) {
  waitedCount += waited[i]
  if (latency[i] >= delayMinMs) slowCount++
}
const ageSorted = sortedOf(ages.map((a) => a / lifetimeMs))
// The earliest a refresh ahead may start (lib/lifecycle.js: AHEAD_EARLIEST
// of the fresh period before the buffer; the buffer is min(bufferTimeMs,
// lifetime / 2), bufferTimeMs 5 min by default). A token's age here counts
// from when the refresh function answered, a little before the manager's
// own start of its life, so 5 ms of slack cover that and timer rounding.
const AHEAD_EARLIEST = 0.25
const freshMs = lifetimeMs - Math.min(300_000, lifetimeMs / 2)
const earliestAgeMs = freshMs * (1 - AHEAD_EARLIEST)
const earlier = ages.filter((a) => a < earliestAgeMs - 5).length
let spentTwice = 0
for (const n of uses) if (n > 1) spentTwice++
const refreshesMeasured = refreshStarts.filter((t) => t >= lifetimeMs).length

// The picture's series: per bucket, latency p50 / p99 / max, calls that
// waited (and the slowest of them), refreshes started.
const buckets = Math.ceil(durationMs / bucketMs) + 1
const series = Array.from({ length: buckets }, () => ({ lat: [], waited: 0, waitedMaxMs: 0, refreshes: 0 }))
for (let i = 0; i < total; i++) {
  const b = series[Math.floor(sentAt[i] / bucketMs)]
  if (b === undefined || !Number.isFinite(latency[i])) continue
  b.lat.push(latency[i])
  if (waited[i]) {
    b.waited++
    b.waitedMaxMs = Math.max(b.waitedMaxMs, latency[i])
  }
}
for (const t of refreshStarts) {
  const b = series[Math.floor(t / bucketMs)]
  if (b !== undefined) b.refreshes++
}
const round = (x) => (Number.isFinite(x) ? Math.round(x * 1000) / 1000 : null)
const points = series.map((b, k) => {
  const s = Float64Array.from(b.lat).sort()
  return {
    t: (k * bucketMs) / 1000,
    p50: round(quantile(s, 0.5)),
    p99: round(quantile(s, 0.99)),
    max: round(s.length === 0 ? NaN : s[s.length - 1]),
    waited: b.waited,
    waitedMax: round(b.waitedMaxMs),
    refreshes: b.refreshes,
  }
})

console.log(
  JSON.stringify({
    refreshAhead,
    users,
    lifetimeS,
    durationS,
    calls: measured.length,
    errors,
    firstError,
    unanswered: total - settled,
    waited: waitedCount,
    slowerThanRefresh: slowCount,
    latencyP50Ms: quantile(lat, 0.5),
    latencyP99Ms: quantile(lat, 0.99),
    latencyMaxMs: lat.length === 0 ? NaN : lat[lat.length - 1],
    refreshes: refreshStarts.length,
    refreshesMeasured,
    backgroundRefreshes: stats.backgroundRefreshes,
    saves,
    spentTwice,
    ageMin: quantile(ageSorted, 0),
    ageMedian: quantile(ageSorted, 0.5),
    ageMax: ageSorted.length === 0 ? NaN : ageSorted[ageSorted.length - 1],
    agesCounted: ageSorted.length,
    earliestAge: earliestAgeMs / lifetimeMs,
    earlier,
    loopMaxMs: loop.max / 1e6,
    loopP99Ms: loop.percentile(99) / 1e6,
    ownMaxMs: measuredOwnMaxMs,
    gcCount: gc.count,
    gcTotalMs: gc.totalMs,
    gcMaxMs: gc.maxMs,
    // perf_hooks.constants.NODE_PERFORMANCE_GC_*: 1 minor (scavenge), 2 major (mark-compact), 4 incremental, 8 weak callbacks.
    gcMaxKind: gc.maxKind,
    points,
  }),
)
