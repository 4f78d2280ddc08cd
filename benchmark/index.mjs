// `npm run bench` (`-- --quick` for the CI smoke run). Compares seed / addon
// / floor side by side in one process, rounds interleaved; prints a Markdown
// table of medians and addon/seed ratios to stdout, progress to stderr.
//
// Options: --quick, --rounds N, --only 1,3,5,7,steady, --token-bytes N (access token
// length, default 1000: a JWT).
//
// Rows from other modules: each entry in HOOKS names a file and how to get
// its rows; absent files are skipped silently. See HOOKS below.
import { execFileSync } from 'node:child_process'
import dc from 'node:diagnostics_channel'
import { existsSync } from 'node:fs'
import os from 'node:os'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'

import { awaitedNsPerCall, concurrentCallsPerSec, runRows, spreadTable, table } from './harness.mjs'
import { addon, fakeToken, floorHot, floorRefresh, FloorShared, seed } from './competitors.mjs'
import { coldStartRow } from './cold-start.mjs'
import { lifecycleRows } from './lifecycle.mjs'

// Modules with rows of their own, printed in a second table when present.
// One line each: [id for --only, file, (module, ctx) => rows], rows being
// { name, value, unit, target?, note?, met? }[] (redis.mjs's shape) or, for
// competitor rows measured here, Row[] from harness.mjs under `rows`.
const HOOKS = [
  ['native', './native-refresher.mjs', async (m, c) => ratioRow(await m.benchNativeRefresher(c.quick ? { rounds: 2, refreshes: 200, concurrency: 16, log: c.log } : { log: c.log }))],
  ['fapi', './fapi-refresh.mjs', (m, c) => m.fapiRows(c.quick ? { rounds: 1, refreshes: 100, concurrency: 8, fetches: 200, log: c.log } : { log: c.log })],
  ['redis', './redis.mjs', (m, c) => m.redisRows(c.quick ? { users: 200, rounds: 2, processes: 2, fleetUsers: 100, log: c.log } : { log: c.log })],
  ['steady', './steady-state.mjs', (m, c) => m.steadyStateRows(c.quick ? { users: 1000, lifetimeS: 4, durationS: 12, bucketMs: 250, tokenBytes: c.tokenBytes, svgPath: m.QUICK_SVG_PATH, log: c.log } : { tokenBytes: c.tokenBytes, log: c.log })],
  ['evict', './eviction.mjs', (m, c) => m.evictionRows(c.quick ? { users: 20_000, idleTtlMs: 2_000, rounds: 1, tokenBytes: c.tokenBytes, log: c.log } : { tokenBytes: c.tokenBytes, log: c.log })],
]

const { values: args } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    rounds: { type: 'string' },
    only: { type: 'string' },
    'token-bytes': { type: 'string', default: '1000' },
  },
})
const quick = args.quick
const tokenBytes = Number(args['token-bytes'])
const ctx = {
  quick,
  rounds: Number(args.rounds ?? (quick ? 2 : 5)),
  // Rows 1-3 are short: many brief rounds, so that bursts of load from other
  // processes land on all competitors alike.
  microRounds: Number(args.rounds ?? (quick ? 2 : 15)),
  // Row 7: fresh processes per competitor and path (a median of at least 20).
  coldRounds: Number(args.rounds ?? (quick ? 3 : 21)),
  tokenBytes,
  // tinybench budget per competitor per round
  bench: quick ? { timeMs: 60, warmupMs: 20 } : { timeMs: 300, warmupMs: 60 },
}
const n = {
  awaited: 1000,
  inFlight: 1000,
  stormCallers: quick ? 2000 : 10_000,
  stormDelayMs: 50,
  memoryUsers: quick ? 20_000 : 200_000,
  failureCallers: quick ? 50 : 1000,
  failureDelayMs: 20,
}

const HOUR = 3_600_000
const fmt = {
  int: (v) => (Number.isFinite(v) ? Math.round(v).toLocaleString('en-US') : '—'),
  ms: (v) => (Number.isFinite(v) ? v.toFixed(1) : '—'),
}

// Hot path: a token valid for an hour, presented as a Date (as the seed's
// callers do).
const hotToken = { accessToken: fakeToken('hot', tokenBytes), refreshToken: fakeToken('rt', 64), expiresAt: new Date(Date.now() + HOUR) }
const noRefresh = () => Promise.reject(new Error('hot path must not refresh'))

function hotRow(id, title, measure, metric) {
  const instance = { seed: seed(), addon: addon() }
  const call = {
    seed: () => instance.seed.getValidToken('user-1', hotToken, noRefresh),
    addon: () => instance.addon.getValidToken('user-1', hotToken, noRefresh),
    floor: () => floorHot('user-1', hotToken, noRefresh),
  }
  const run = {}
  for (const name of Object.keys(call)) run[name] = async (c) => ({ v: await measure(call[name], c) })
  return { id, title, run, metrics: [metric], rounds: ctx.microRounds }
}

// The hot path after one invalidate() (the Next.js example calls it on every
// 401): another user's revoked token must not slow this user's calls.
// Compares the addon with itself, before and after.
function afterInvalidateRow(id) {
  const measure = (make) => async (c) => {
    const m = make()
    return { v: await awaitedNsPerCall(() => m.getValidToken('user-1', hotToken, noRefresh), n.awaited, c.bench) }
  }
  return {
    id,
    title: 'hot path after one invalidate (of another user), awaited one by one',
    // Twice the rounds of row 1: a ratio of two near-equal costs on a noisy
    // machine needs them.
    rounds: 2 * ctx.microRounds,
    ratio: ['after invalidate', 'addon'],
    run: {
      addon: measure(addon),
      'after invalidate': measure(() => {
        const m = addon()
        m.invalidate('user-401', 'a-token-the-api-refused')
        return m
      }),
    },
    metrics: [{ key: 'v', label: 'ns per call', format: fmt.int, target: '≤ 1.1×', met: ({ ratio }) => ratio <= 1.1 }],
  }
}

/** Subscribes a counter to every channel of the package; returns { events(), off() }. */
function subscribeAll() {
  let events = 0
  const count = () => events++
  const tracing = { start: count, end: count, asyncStart: count, asyncEnd: count, error: count }
  const refresh = dc.tracingChannel('tarabut-token-manager:refresh')
  const plainChannels = ['stale-served', 'redis-fallback', 'invalidate'].map((n) => `tarabut-token-manager:${n}`)
  refresh.subscribe(tracing)
  for (const n of plainChannels) dc.subscribe(n, count)
  return {
    events: () => events,
    off() {
      refresh.unsubscribe(tracing)
      for (const n of plainChannels) dc.unsubscribe(n, count)
    },
  }
}

// The hot path beside itself with a subscriber on every channel of the
// package (the refresh tracing channel and the three plain ones), rounds
// interleaved: only the refresh path publishes, so the two should match.
// A subscriber that saw an event from the hot path fails the row.
function subscribedHotRow(id, title, measure, metric) {
  const plain = addon()
  const watched = addon()
  const call = (m) => () => m.getValidToken('user-1', hotToken, noRefresh)
  return {
    id,
    title: `${title}, with a subscriber on the refresh channel`,
    ratio: ['subscribed', 'addon'],
    rounds: ctx.microRounds,
    run: {
      addon: async (c) => ({ v: await measure(call(plain), c) }),
      subscribed: async (c) => {
        const sub = subscribeAll()
        try {
          const v = await measure(call(watched), c)
          if (sub.events() !== 0) throw new Error(`the hot path published ${sub.events()} events`)
          return { v }
        } finally {
          sub.off()
        }
      },
    },
    metrics: [metric],
  }
}

// Refresh path: every call is a new user presenting an expired token;
// refreshFn resolves at once. A fresh instance per round. With `subscribed`:
// the same row without and with a subscriber on every channel (each refresh
// then publishes start, end, asyncStart and asyncEnd).
function refreshRow(id, bytes, { subscribed = false } = {}) {
  const presented = { accessToken: fakeToken('old', bytes), refreshToken: fakeToken('rt-old', 64), expiresAt: new Date(Date.now() - 1000) }
  const refreshed = { accessToken: fakeToken('new', bytes), refreshToken: fakeToken('rt-new', 64), expiresAt: new Date(Date.now() + HOUR) }
  let next = 0
  const measure = async (make, c) => {
    const m = make()
    let runs = 0
    const refreshFn = () => {
      runs++
      return Promise.resolve({ ...refreshed })
    }
    let calls = 0
    const rate = await concurrentCallsPerSec(
      () => {
        calls++
        return m.getValidToken(`user-${next++}`, presented, refreshFn)
      },
      n.inFlight,
      c.bench,
    )
    if (runs !== calls) throw new Error(`refresh row: ${runs} refreshes for ${calls} calls`)
    return { v: rate }
  }
  if (subscribed) {
    return {
      id,
      title: `refresh path, distinct users, 1,000 in flight, ${bytes} B access tokens, with a subscriber on every channel`,
      ratio: ['subscribed', 'addon'],
      rounds: ctx.microRounds,
      run: {
        addon: (c) => measure(addon, c),
        subscribed: async (c) => {
          const sub = subscribeAll()
          try {
            const r = await measure(addon, c)
            if (sub.events() === 0) throw new Error('the refresh path published nothing')
            return r
          } finally {
            sub.off()
          }
        },
      },
      metrics: [{ key: 'v', label: 'calls/s', format: fmt.int }],
    }
  }
  return {
    id,
    title: `refresh path, distinct users, 1,000 in flight, ${bytes} B access tokens`,
    rounds: ctx.microRounds,
    run: {
      seed: (c) => measure(seed, c),
      addon: (c) => measure(addon, c),
      floor: (c) => measure(() => ({ getValidToken: floorRefresh }), c),
    },
    metrics: [{ key: 'v', label: 'calls/s', format: fmt.int, target: '≥ 1.5×', met: ({ ratio }) => ratio >= 1.5 }],
  }
}

// Storms: `callers` concurrent calls for one user whose token is due.
async function storm(make, { callers, delayMs, fail, expired }) {
  const m = make()
  let runs = 0
  const stale = fakeToken('stale', tokenBytes)
  const token = { accessToken: stale, refreshToken: 'rt', expiresAt: new Date(Date.now() + (expired ? -1000 : 60_000)) }
  const fresh = { accessToken: fakeToken('fresh', tokenBytes), refreshToken: 'rt2', expiresAt: new Date(Date.now() + HOUR) }
  const refreshFn = () => {
    runs++
    return new Promise((resolve, reject) => setTimeout(() => (fail ? reject(new Error('provider down')) : resolve(fresh)), delayMs))
  }
  // oxlint-disable-next-line unicorn/no-new-array -- preallocated, filled below
  const ps = new Array(callers)
  const t0 = performance.now()
  for (let i = 0; i < callers; i++) ps[i] = m.getValidToken('storm-user', token, refreshFn)
  const settled = await Promise.allSettled(ps)
  const wallMs = performance.now() - t0
  let staleCount = 0
  let rejected = 0
  for (const s of settled) {
    if (s.status === 'rejected') rejected++
    else if (s.value.accessToken === stale) staleCount++
  }
  return { runs, stale: staleCount, rejected, wallMs }
}

function stormRow() {
  const o = { callers: n.stormCallers, delayMs: n.stormDelayMs, fail: false, expired: false }
  return {
    id: '4',
    title: `storm: ${n.stormCallers.toLocaleString('en-US')} callers, one user, refreshFn 50 ms`,
    run: { seed: () => storm(seed, o), addon: () => storm(addon, o), floor: () => storm(() => new FloorShared(), o) },
    metrics: [
      { key: 'runs', label: 'refreshFn runs', format: fmt.int, target: 'addon = 1', met: ({ values }) => values.addon === 1 },
      { key: 'stale', label: 'stale tokens handed back', format: fmt.int, target: 'addon = 0', met: ({ values }) => values.addon === 0 },
      { key: 'wallMs', label: 'wall ms, all settled', format: fmt.ms, target: 'addon ≤ 100 ms', met: ({ values }) => values.addon <= 100 },
    ],
  }
}

function failureRow() {
  const o = { callers: n.failureCallers, delayMs: n.failureDelayMs, fail: true, expired: true }
  return {
    id: '6',
    title: `failure storm: ${n.failureCallers.toLocaleString('en-US')} callers, refreshFn rejects after 20 ms`,
    run: { seed: () => storm(seed, o), addon: () => storm(addon, o), floor: () => storm(() => new FloorShared(), o) },
    metrics: [
      { key: 'runs', label: 'refreshFn runs', format: fmt.int, target: 'addon = 1', met: ({ values }) => values.addon === 1 },
      { key: 'rejected', label: 'callers rejected', format: fmt.int },
      { key: 'wallMs', label: 'wall ms, all settled', format: fmt.ms },
    ],
  }
}

// Memory: each competitor in its own child process, measured after GC.
function memoryRow(id, bytes) {
  const child = fileURLToPath(new URL('./memory-child.mjs', import.meta.url))
  const measure = (name) => async () => {
    const out = execFileSync(process.execPath, ['--expose-gc', '--import', 'tsx', child, name, String(n.memoryUsers), String(bytes)], {
      encoding: 'utf8',
    })
    return JSON.parse(out.trim().split('\n').pop())
  }
  return {
    id,
    title: `memory: ${n.memoryUsers.toLocaleString('en-US')} users refreshed once, ${bytes} B access tokens`,
    run: { seed: measure('seed'), addon: measure('addon'), floor: measure('floor') },
    metrics: [
      { key: 'rssPerUser', label: 'resident bytes per user', format: fmt.int },
      {
        key: 'overheadPerUser',
        label: 'resident bytes per user beyond the token bytes it holds',
        format: fmt.int,
        target: '≤ 0.5×',
        met: ({ ratio }) => ratio <= 0.5,
      },
      { key: 'heapPerUser', label: 'JS heap bytes per user', format: fmt.int },
    ],
  }
}

/** native-refresher.mjs's `{ name, unit, native, fetch, ratio, target, rounds }` as a row. */
function ratioRow(r) {
  return [
    {
      name: r.name,
      value: `${fmt.int(r.native)} vs ${fmt.int(r.fetch)}`,
      unit: `${r.unit} (native vs fetch)`,
      target: `≥ ${r.target}×`,
      met: r.ratio >= r.target,
      note: `ratio ${r.ratio.toFixed(2)}×, median of ${r.rounds.length} interleaved rounds`,
    },
  ]
}

function extraTable(list) {
  const lines = ['| measure | value | unit | target | met | note |', '| --- | --- | --- | --- | --- | --- |']
  for (const r of list) {
    const met = r.met === undefined ? '' : r.met ? 'yes' : '**no**'
    lines.push(`| ${r.name} | ${r.value} | ${r.unit ?? ''} | ${r.target ?? ''} | ${met} | ${r.note ?? ''} |`)
  }
  return lines.join('\n')
}

const rows = [
  hotRow('1', 'hot path, awaited one by one', (call, c) => awaitedNsPerCall(call, n.awaited, c.bench), {
    key: 'v',
    label: 'ns per call',
    format: fmt.int,
    target: '≤ 0.8× seed, ≤ 1.5× floor',
    met: ({ ratio, values }) => ratio <= 0.8 && values.addon <= 1.5 * values.floor,
  }),
  hotRow('2', 'hot path, 1,000 in flight', (call, c) => concurrentCallsPerSec(call, n.inFlight, c.bench), {
    key: 'v',
    label: 'calls/s',
    format: fmt.int,
    target: '≥ 1.2×',
    met: ({ ratio }) => ratio >= 1.2,
  }),
  afterInvalidateRow('2b'),
  subscribedHotRow('1s', 'hot path, awaited one by one', (call, c) => awaitedNsPerCall(call, n.awaited, c.bench), {
    key: 'v',
    label: 'ns per call',
    format: fmt.int,
    target: '≈ 1.0× (±10%: noise)',
    met: ({ ratio }) => ratio >= 0.9 && ratio <= 1.1,
  }),
  subscribedHotRow('2s', 'hot path, 1,000 in flight', (call, c) => concurrentCallsPerSec(call, n.inFlight, c.bench), {
    key: 'v',
    label: 'calls/s',
    format: fmt.int,
    target: '≈ 1.0× (±10%: noise)',
    met: ({ ratio }) => ratio >= 0.9 && ratio <= 1.1,
  }),
  refreshRow('3', tokenBytes),
  refreshRow('3b', 40),
  refreshRow('3s', tokenBytes, { subscribed: true }),
  stormRow(),
  memoryRow('5', tokenBytes),
  memoryRow('5b', 40),
  failureRow(),
  coldStartRow('7', { rounds: ctx.coldRounds }),
  ...lifecycleRows(ctx),
]

const only = args.only ? new Set(args.only.split(',')) : null
const selected = only ? rows.filter((r) => only.has(r.id)) : rows

const load0 = os.loadavg()[0]
const started = Date.now()
const results = await runRows(selected, ctx)

const extra = []
for (const [id, file, get] of HOOKS) {
  const url = new URL(file, import.meta.url)
  if ((only && !only.has(id)) || !existsSync(fileURLToPath(url))) continue
  process.stderr.write(`${file}:\n`)
  try {
    extra.push(...(await get(await import(url.href), { ...ctx, log: (line) => process.stderr.write(`  ${line}\n`) })))
  } catch (e) {
    // Reported, not fatal: the other rows still print. The exit code says it.
    process.exitCode = 1
    extra.push({ name: `${file} failed`, value: '—', unit: '', note: String(e?.message ?? e).split('\n')[0] })
  }
}
const load1 = os.loadavg()[0]

const cpu = os.cpus()
console.log(`# tarabut-token-manager benchmarks${quick ? ' (quick: smoke run, numbers not meaningful)' : ''}\n`)
console.log(
  `${cpu.length} × ${cpu[0]?.model ?? 'unknown CPU'}, Node ${process.version}, ${new Date(started).toISOString().slice(0, 10)}; ` +
    `medians of interleaved rounds (${ctx.microRounds} for rows 1-3s and 8-9, ${2 * ctx.microRounds} for row 2b, ${ctx.coldRounds} for row 7, ${ctx.rounds} for the rest), access tokens ${tokenBytes} B; ` +
    `load average ${load0.toFixed(2)} → ${load1.toFixed(2)}; ${((Date.now() - started) / 1000).toFixed(0)} s\n`,
)
console.log(table(results))
if (extra.length > 0) {
  console.log('\nRows from other modules (their own rounds and ratios):\n')
  console.log(extraTable(extra))
}
console.log('\nSpread over rounds:\n')
console.log(spreadTable(results))
