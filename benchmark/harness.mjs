// The benchmark runner's machinery: rows, interleaved rounds, medians,
// ratios and the table. Row definitions live in index.mjs and in optional
// modules (native-refresher.mjs, redis.mjs) that export `rows(ctx)`.
//
// A row is one scenario; each competitor's `run` does one measurement and
// returns { [metricKey]: number }. Rounds are interleaved: in round r every
// competitor runs once, in an order rotated by r, so drift in machine load
// (other jobs share the cores) hits all competitors alike. The table shows
// each competitor's median over rounds and the median of the per-round
// ratios (numerator / denominator, by default addon / seed).
//
// /**
//  * @typedef {object} Metric
//  * @property {string} key       key in the objects `run` returns
//  * @property {string} label     e.g. 'ns per call'
//  * @property {(v: number) => string} [format]
//  * @property {string} [target]  e.g. '≤ 1.0× seed'
//  * @property {(m: { ratio: number, values: Record<string, number> }) => boolean} [met]
//  *
//  * @typedef {object} Row
//  * @property {string} id
//  * @property {string} title
//  * @property {Metric[]} metrics              one table line each
//  * @property {Record<string, (ctx: object) => Promise<Record<string, number>>>} run
//  *           competitor name -> one measurement; names are table columns
//  * @property {[string, string]} [ratio]      default ['addon', 'seed']
//  * @property {number} [rounds]               default ctx.rounds
//  * @property {() => Promise<void>} [setup]   once before the rounds
//  * @property {() => Promise<void>} [teardown] once after them, even on failure
//  */

import { setImmediate as tick } from 'node:timers/promises'

import { Bench } from 'tinybench'

export const COLUMNS = ['seed', 'addon', 'floor']

export function median(xs) {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b)
  if (s.length === 0) return NaN
  const m = s.length >> 1
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2
}

/** Milliseconds per iteration of `fn` (mean over tinybench samples). */
export async function msPerIteration(fn, { timeMs, warmupMs }) {
  const bench = new Bench({ time: timeMs, warmupTime: warmupMs, iterations: 5, warmupIterations: 2, throws: true })
  bench.add('task', fn)
  await bench.run()
  const r = bench.tasks[0].result
  if (r.state !== 'completed') throw new Error(`benchmark task ${r.state}: ${r.error?.message ?? ''}`)
  // The mean, not the median: throughput must include the garbage collections
  // the calls cause, which land on a few iterations.
  return r.latency.mean
}

// The measuring loops are compiled afresh for every use (new Function), so
// V8 keeps separate type feedback per competitor: a loop shared by all of
// them goes polymorphic and times whoever ran first differently.
const AWAITED = 'return async () => { for (let i = 0; i < n; i++) await call() }'
const CONCURRENT = 'return async () => { for (let i = 0; i < n; i++) ps[i] = call(i); await Promise.all(ps) }'

/** `n` calls of `call()`, each awaited before the next: ns per call. */
export async function awaitedNsPerCall(call, n, opts) {
  const loop = new Function('call', 'n', AWAITED)(call, n)
  const ms = await msPerIteration(loop, opts)
  return (ms * 1e6) / n
}

/** Batches of `n` concurrent calls (`call(i)`), all awaited: calls per second. */
export async function concurrentCallsPerSec(call, n, opts) {
  // A preallocated array of n holes, as the loop fills it.
  // oxlint-disable-next-line unicorn/no-new-array
  const loop = new Function('call', 'n', 'ps', CONCURRENT)(call, n, new Array(n))
  const ms = await msPerIteration(loop, opts)
  return (n * 1000) / ms
}

/** With --expose-gc: the last competitor's garbage (and the native memory
 * its finalizers free) is collected before the next one is timed. */
async function collectGarbage() {
  if (typeof globalThis.gc !== 'function') return
  globalThis.gc()
  await tick()
  globalThis.gc()
  await tick()
}

export async function runRows(rows, ctx, log = (s) => process.stderr.write(s)) {
  const results = []
  for (const row of rows) {
    const names = Object.keys(row.run)
    const rounds = row.rounds ?? ctx.rounds
    const samples = Object.fromEntries(names.map((n) => [n, []]))
    const [num, den] = row.ratio ?? ['addon', 'seed']
    log(`row ${row.id} ${row.title}: `)
    if (row.setup) await row.setup()
    try {
      for (let r = 0; r < rounds; r++) {
        for (let k = 0; k < names.length; k++) {
          const name = names[(k + r) % names.length]
          await collectGarbage()
          samples[name].push(await row.run[name](ctx))
          log('.')
        }
      }
    } finally {
      if (row.teardown) await row.teardown()
    }
    log('\n')
    for (const metric of row.metrics) {
      const values = {}
      const spread = {}
      for (const n of names) {
        const xs = samples[n].map((s) => s[metric.key])
        values[n] = median(xs)
        spread[n] = [Math.min(...xs), Math.max(...xs)]
      }
      const ratios = samples[num] && samples[den] ? samples[num].map((s, i) => s[metric.key] / samples[den][i][metric.key]) : []
      const ratio = median(ratios)
      const met = metric.met ? metric.met({ ratio, values }) : undefined
      results.push({ row, metric, names, values, spread, ratio, num, den, met, rounds })
    }
  }
  return results
}

const fmtDefault = (v) => (Number.isFinite(v) ? (Math.abs(v) >= 100 ? Math.round(v).toLocaleString('en-US') : v.toPrecision(3)) : '—')

/** A Markdown table (readable as plain text too). */
export function table(results) {
  const cols = [...COLUMNS]
  for (const r of results) for (const n of r.names) if (!cols.includes(n)) cols.push(n)
  const head = ['#', 'measure', ...cols, 'ratio', 'target', 'met']
  const lines = [head, head.map(() => '---')]
  for (const r of results) {
    const f = r.metric.format ?? fmtDefault
    const label = r.row.labels ? `${r.row.title} (${r.row.labels})` : r.row.title
    lines.push([
      r.row.id,
      `${label}: ${r.metric.label}`,
      ...cols.map((c) => (c in r.values ? f(r.values[c]) : '')),
      Number.isFinite(r.ratio) ? `${r.ratio.toFixed(2)}× (${r.num}/${r.den})` : '—',
      r.metric.target ?? '',
      r.met === undefined ? '' : r.met ? 'yes' : '**no**',
    ])
  }
  return lines.map((l) => `| ${l.join(' | ')} |`).join('\n')
}

/** Min–max over rounds, so a reader can judge the noise. */
export function spreadTable(results) {
  const lines = ['| # | measure | competitor | median | min | max |', '| --- | --- | --- | --- | --- | --- |']
  for (const r of results) {
    const f = r.metric.format ?? fmtDefault
    for (const n of r.names) {
      const [lo, hi] = r.spread[n]
      lines.push(`| ${r.row.id} | ${r.metric.label} | ${n} | ${f(r.values[n])} | ${f(lo)} | ${f(hi)} |`)
    }
  }
  return lines.join('\n')
}
