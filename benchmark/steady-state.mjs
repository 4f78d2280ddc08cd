// Row "steady": `getToken` in steady state, refresh ahead on and off side by
// side. Each mode runs in its own process (steady-state-child.mjs), one after
// the other: `users` users calling once a second, tokens living `lifetimeS`
// from a refresh function that answers after 2-20 ms, for `durationS`.
// Counted after the first lifetime (every user's first call refreshes the
// row the store started with). Writes the run as a picture (steady-state-svg.mjs).
//
// A call "waited on a refresh" when the token it was answered with came
// from a refresh that ended after the call was made: it joined (or led) a
// flight. That is exact, whatever the machine's pauses; calls slower than
// the quickest refresh (2 ms) are counted too, beside it, as a check.
import { execFile } from 'node:child_process'
import { writeFileSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'

import { steadyStateSvg } from './steady-state-svg.mjs'

const run = promisify(execFile)
const child = fileURLToPath(new URL('./steady-state-child.mjs', import.meta.url))

/** The picture a full run writes (BENCHMARKS.md shows it). */
export const SVG_PATH = fileURLToPath(new URL('./steady-state.svg', import.meta.url))
/** A quick run's picture, kept out of the checkout (CI runs it). */
export const QUICK_SVG_PATH = path.join(os.tmpdir(), 'tarabut-steady-state-quick.svg')

async function measure(o) {
  const { stdout } = await run(process.execPath, ['--expose-gc', child, JSON.stringify(o)], { encoding: 'utf8', maxBuffer: 64 << 20 })
  return JSON.parse(stdout.trim().split('\n').pop())
}

const int = (v) => (Number.isFinite(v) ? Math.round(v).toLocaleString('en-US') : '—')
const ms = (v) => (Number.isFinite(v) ? v.toFixed(v < 10 ? 2 : 1) : '—')
const frac = (v) => (Number.isFinite(v) ? v.toFixed(3) : '—')

/**
 * @param {{ users?: number, lifetimeS?: number, durationS?: number, bucketMs?: number, tokenBytes?: number, svgPath?: string, log?: (line: string) => void }} [o]
 * @returns {Promise<{ name: string, value: string, unit: string, target?: string, met?: boolean, note?: string }[]>}
 */
export async function steadyStateRows({ users = 10_000, lifetimeS = 60, durationS = 300, bucketMs = 1000, tokenBytes = 1000, svgPath = SVG_PATH, log = () => {} } = {}) {
  const base = { users, lifetimeS, durationS, bucketMs, delayMinMs: 2, delayMaxMs: 20, tokenBytes }
  const runs = []
  for (const refreshAhead of [true, false]) {
    log(`steady state: ${users.toLocaleString('en-US')} users, ${lifetimeS} s tokens, ${durationS} s, refresh ahead ${refreshAhead ? 'on' : 'off'}...`)
    const r = await measure({ ...base, refreshAhead })
    if (r.errors !== 0 || r.unanswered !== 0) throw new Error(`steady state: ${r.errors} calls rejected (${r.firstError}), ${r.unanswered} unanswered`)
    runs.push(r)
  }
  const [on, off] = runs
  writeFileSync(
    svgPath,
    steadyStateSvg(runs, {
      bucketMs,
      delayMinMs: base.delayMinMs,
      delayMaxMs: base.delayMaxMs,
      title: `getToken in steady state: request latency over time, refresh ahead on and off`,
    }),
  )
  log(`steady state: picture written to ${svgPath}`)
  const n = users.toLocaleString('en-US')
  const title = `steady state, ${n} users calling getToken every second, ${lifetimeS} s tokens, refresh 2-20 ms, ${durationS} s`
  const vs = (f, key) => `${f(on[key])} vs ${f(off[key])}`
  const lifetimes = (durationS - lifetimeS) / lifetimeS
  const perUser = (r) => r.refreshesMeasured / users / lifetimes
  return [
    {
      name: `${title}: calls that waited on a refresh after the first lifetime`,
      value: vs(int, 'waited'),
      unit: 'calls (refresh ahead on vs off)',
      target: 'on = 0',
      met: on.waited === 0,
      note: `a call waited when its token came from a refresh that ended after it was made; of ${int(on.calls)} and ${int(off.calls)} calls; calls slower than 2 ms (the quickest refresh): ${vs(int, 'slowerThanRefresh')}`,
    },
    {
      name: `${title}: refresh tokens sent twice (a token refreshed twice)`,
      value: vs(int, 'spentTwice'),
      unit: 'tokens (on vs off)',
      target: '0',
      met: on.spentTwice === 0 && off.spentTwice === 0,
      note: `refreshes after the first lifetime ${vs(int, 'refreshesMeasured')}, per user per token lifetime ${frac(perUser(on))} vs ${frac(perUser(off))}; background refreshes (stats) ${vs(int, 'backgroundRefreshes')}; saves ${vs(int, 'saves')}`,
    },
    {
      name: `${title}: a token's age when its refresh started, as a share of its lifetime (min / median / max)`,
      value: `${frac(on.ageMin)} / ${frac(on.ageMedian)} / ${frac(on.ageMax)} vs ${frac(off.ageMin)} / ${frac(off.ageMedian)} / ${frac(off.ageMax)}`,
      unit: 'lifetime (on vs off)',
      target: `on ≥ ${frac(on.earliestAge)} (the jitter window's earliest)`,
      met: on.earlier === 0,
      note: `refreshes that started earlier than the window allows (5 ms slack): ${vs(int, 'earlier')}, of ${vs(int, 'agesCounted')}; the buffer is half the lifetime, so refresh ahead runs between ${frac(on.earliestAge)} and 0.450 of it and without it a token is refreshed by the first call after 0.5`,
    },
    {
      name: `${title}: request latency after the first lifetime (p50 / p99 / max)`,
      value: `${ms(on.latencyP50Ms)} / ${ms(on.latencyP99Ms)} / ${ms(on.latencyMaxMs)} vs ${ms(off.latencyP50Ms)} / ${ms(off.latencyP99Ms)} / ${ms(off.latencyMaxMs)}`,
      unit: 'ms (on vs off)',
    },
    {
      name: `${title}: max event-loop delay after the first lifetime`,
      value: `${ms(on.loopMaxMs)} / ${ms(on.ownMaxMs)} vs ${ms(off.loopMaxMs)} / ${ms(off.ownMaxMs)}`,
      unit: 'ms, wall / own (on vs off)',
      target: '≤ 20 ms own',
      met: on.ownMaxMs <= 20,
      note: `monitorEventLoopDelay (1 ms resolution), p99 ${vs(ms, 'loopP99Ms')} ms; longest GC pause ${vs(ms, 'gcMaxMs')} ms (kind ${on.gcMaxKind} vs ${off.gcMaxKind}: 1 scavenge, 2 mark-compact), GC ${vs(ms, 'gcTotalMs')} ms in all; own: the JS thread's run and run-queue time between two turns of a 1 ms timer (own-time.mjs), the eviction rows' measure and target`,
    },
  ]
}
