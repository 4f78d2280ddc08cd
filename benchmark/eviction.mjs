// Rows "evict": a million users refreshed once, then left idle past
// `idleTtlMs` while an active set keeps calling. Each competitor runs in its
// own child process (eviction-child.mjs), so the main bench stays lean, in
// `rounds` rounds taken in turn (a round takes the fill plus idleTtlMs plus
// 5 s). A row's value is the median of the rounds: each is a maximum over a
// minute, which a single pause of the shared machine decides.
import { execFile } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'

import { median } from './harness.mjs'

const run = promisify(execFile)
const child = fileURLToPath(new URL('./eviction-child.mjs', import.meta.url))

async function measure(name, { users, idleTtlMs, tokenBytes }) {
  const { stdout } = await run(process.execPath, ['--expose-gc', '--import', 'tsx', child, name, String(users), String(idleTtlMs), String(tokenBytes)], {
    encoding: 'utf8',
    maxBuffer: 1 << 20,
  })
  const r = JSON.parse(stdout.trim().split('\n').pop())
  // Over the whole run: the fill and the idle phase.
  r.runLoopMaxMs = Math.max(r.fillLoopMaxMs, r.evictLoopMaxMs)
  r.runOwnMaxMs = Math.max(r.fillOwnMaxMs, r.quietOwnLoopMaxMs, r.evictingOwnLoopMaxMs)
  return r
}

/** Per numeric field, the median of the rounds. */
const medianOfRounds = (rounds) =>
  Object.fromEntries(
    Object.keys(rounds[0])
      .filter((key) => typeof rounds[0][key] === 'number')
      .map((key) => [key, median(rounds.map((r) => r[key]))]),
  )

const ms = (v) => (Number.isFinite(v) ? v.toFixed(v < 10 ? 2 : 1) : '—')
const int = (v) => (Number.isFinite(v) ? Math.round(v).toLocaleString('en-US') : '—')

/**
 * @param {{ users?: number, idleTtlMs?: number, tokenBytes?: number, rounds?: number, log?: (line: string) => void }} [o]
 * @returns {Promise<{ name: string, value: string, unit: string, target?: string, met?: boolean, note?: string }[]>}
 */
export async function evictionRows({ users = 1_000_000, idleTtlMs = 60_000, tokenBytes = 1000, rounds = 3, log = () => {} } = {}) {
  const o = { users, idleTtlMs, tokenBytes }
  const runs = { addon: [], seed: [], floor: [] }
  for (let i = 1; i <= rounds; i++) {
    for (const name of ['addon', 'seed', 'floor']) {
      log(`eviction: ${users.toLocaleString('en-US')} users, idleTtlMs ${idleTtlMs}, round ${i} of ${rounds}: ${name}...`)
      const r = await measure(name, o)
      if (r.errors !== 0) throw new Error(`eviction run: ${r.errors} calls rejected`)
      runs[name].push(r)
    }
  }
  const addon = medianOfRounds(runs.addon)
  const seed = medianOfRounds(runs.seed)
  const floor = medianOfRounds(runs.floor)
  /** Each round's value of `key` for competitor `name`, for the notes. */
  const each = (name, key) => runs[name].map((r) => ms(r[key])).join(', ')
  const n = users.toLocaleString('en-US')
  const vs = (f, key) => `${f(addon[key])} vs ${f(seed[key])}`
  const note = `median of ${rounds} rounds; fill ${addon.fillSeconds.toFixed(1)} / ${seed.fillSeconds.toFixed(1)} / ${floor.fillSeconds.toFixed(1)} s (addon / seed / floor), ${int(addon.calls)} timed calls by ${addon.active} active users`
  // Two figures per delay: the wall clock, which on a shared VM also holds
  // the hypervisor's pauses (steal time), and the process's own part (the
  // JS thread's run and run-queue time, which leave steal out; see
  // eviction-child.mjs). The targets are on the own part: it is what the
  // process can cause and fix. The floor (no state, a refreshFn call per
  // due token) shows what the machine and the runtime pause by themselves.
  const both = (r, wall, own) => `${ms(r[wall])} / ${ms(r[own])}`
  const pair = (wall, own) => `${both(addon, wall, own)} vs ${both(seed, wall, own)} vs ${both(floor, wall, own)}`
  /** What each round's slowest call (by own time) in `part` was made of. */
  const anatomy = (part) =>
    runs.addon
      .map((r) => r[part])
      .map((a) => `ran ${ms(a.runMs)} + waited for a CPU ${ms(a.waitMs)}, GC inside ${ms(a.gcMs)} (${a.gcKinds}), page faults ${a.faults} (major ${a.majorFaults})`)
      .join('; ')
  return [
    {
      name: `eviction, ${n} users refreshed then left idle: max event-loop delay over the whole run`,
      value: pair('runLoopMaxMs', 'runOwnMaxMs'),
      unit: 'ms, wall / own (addon vs seed vs floor)',
      target: '≤ 20 ms own',
      met: addon.runOwnMaxMs <= 20,
      note:
        `wall: monitorEventLoopDelay, 1 ms resolution; own: the most the JS thread ran or waited for a CPU between two turns of a 1 ms timer (schedstat, which leaves the hypervisor's steal out); ` +
        `filling (batches of 50 concurrent refreshes, each user its own 1 KB tokens): ${pair('fillLoopMaxMs', 'fillOwnMaxMs')}; ` +
        `idle, before any user was due (nothing evicted yet): ${pair('quietLoopMaxMs', 'quietOwnLoopMaxMs')}; while evicting: ${pair('evictingLoopMaxMs', 'evictingOwnLoopMaxMs')}; ` +
        `the addon's rounds, wall: ${each('addon', 'runLoopMaxMs')}, own: ${each('addon', 'runOwnMaxMs')}; the floor's rounds, own: ${each('floor', 'runOwnMaxMs')}; ${note}`,
    },
    {
      name: `eviction, ${n} users: slowest single getValidToken while they are evicted`,
      value: pair('evictingSlowestCallMs', 'evictingOwnSlowestCallMs'),
      unit: 'ms, wall / own (addon vs seed vs floor)',
      target: '≤ 5 ms own',
      met: addon.evictingOwnSlowestCallMs <= 5,
      note: `the synchronous part of each call (where it could wait for the table); own: the JS thread's run and run-queue time during the call; before any user was due (nothing evicted yet): ${pair('quietSlowestCallMs', 'quietOwnSlowestCallMs')}; the addon's rounds, wall: ${each('addon', 'evictingSlowestCallMs')}, own: ${each('addon', 'evictingOwnSlowestCallMs')}; the floor's rounds, own: ${each('floor', 'evictingOwnSlowestCallMs')}; the addon's slowest calls by own time, per round, while evicting: ${anatomy('evictingSlowestCallAnatomy')}; before any user was due: ${anatomy('quietSlowestCallAnatomy')}; ${note}`,
    },
    {
      name: `stats() with ${n} users held (max / median of 200)`,
      value: `${ms(addon.statsMaxMs)} / ${ms(addon.statsMedianMs)}`,
      unit: 'ms',
      target: '≤ 1 ms',
      met: addon.statsMaxMs <= 1,
      note: `max of the calls every 100 slow-path calls in the idle phase, before any user was due: ${ms(addon.statsQuietMaxMs)} ms; while evicting: ${ms(addon.statsDuringMaxMs)} ms; the seed has no stats()`,
    },
    {
      name: `users held ${idleTtlMs / 1000 + 2} s after the last of ${n} went idle (idleTtlMs + 2 s)`,
      value: vs(int, 'heldAfter'),
      unit: 'users (addon vs seed)',
      target: `= active set (${addon.active})`,
      met: addon.heldAfter === addon.active,
      note: `addon down to the active set ${int(addon.goneAfterMs)} ms after idleTtlMs; the seed never evicts`,
    },
    {
      name: `resident memory per user with ${n} users, ${tokenBytes} B access tokens`,
      value: vs(int, 'rssPerUser'),
      unit: 'bytes (addon vs seed)',
      note: `after GC; ratio ${(addon.rssPerUser / seed.rssPerUser).toFixed(2)}×`,
    },
    {
      name: `resident memory returned once the ${n} were evicted and calls stopped`,
      value: `${int(addon.rssReturnedMB)} MB (${(addon.rssReturnedShare * 100).toFixed(0)}%) vs ${int(seed.rssReturnedMB)} MB`,
      unit: 'MB (share of what they took; addon vs seed)',
      note: `resident set after GC, 3 s after the last call; while the active set was still calling: ${int(addon.rssReturnedBusyMB)} MB (freed memory kept for reuse)`,
    },
  ]
}
