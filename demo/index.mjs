#!/usr/bin/env node
// `npm run demo`: an API-route workload for many users whose Tarabut tokens
// keep expiring, run through this package (tarabutRefresher, the HTTP call in
// Rust) and then through the design it replaces (async-mutex per user, a JS
// refreshFn with fetch), against the same Tarabut-compatible token server on
// loopback. No external services.
//
// Every token an API route gets back is checked against the server: a token
// the server no longer considers current (superseded by a newer one, or
// expired) is counted as stale. That is what the bank API would answer 401 to.
import { parseArgs } from 'node:util'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { tsImport } from 'tsx/esm/api'

import { TokenManager, tarabutRefresher } from '../index.mjs'
import { startTarabutServer } from '../__test__/helpers/tarabut-server.mjs'

const HELP = `npm run demo -- [options]

Drives simulated API routes for many users through tarabut-token-manager
(tarabutRefresher) and then through the seed design (async-mutex + fetch),
against a Tarabut-compatible token server on 127.0.0.1, and compares them.

Options
  --users N        users (default 200; 10 with --token-url)
  --duration S     seconds per design (default 20)
  --concurrency N  API requests in flight (default 256)
  --lifetime S     token lifetime the local server issues, seconds (default 15);
                   tokens are refreshed in their last third
  --token-url URL  use a real Tarabut token endpoint (e.g. the sandbox) instead
                   of the local server; needs TARABUT_CLIENT_ID and
                   TARABUT_CLIENT_SECRET in the environment. Stale tokens
                   cannot be checked against a remote server.
  --help           this text

Each simulated request: read the user's token row (async), getValidToken,
persist the token if shouldUpdate, check it against the token server, then
wait 5-25 ms for the "bank API".`

function options() {
  let parsed
  try {
    parsed = parseArgs({
      options: {
        users: { type: 'string' },
        duration: { type: 'string' },
        concurrency: { type: 'string' },
        lifetime: { type: 'string' },
        'token-url': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
    }).values
  } catch (e) {
    console.error(`${e.message}\n\n${HELP}`)
    process.exit(2)
  }
  if (parsed.help) {
    console.log(HELP)
    process.exit(0)
  }
  const remote = parsed['token-url']
  const int = (name, fallback, min, max) => {
    if (parsed[name] === undefined) return fallback
    const v = Number(parsed[name])
    if (!Number.isInteger(v) || v < min || v > max) {
      console.error(`--${name} must be a whole number from ${min} to ${max}`)
      process.exit(2)
    }
    return v
  }
  const o = {
    users: int('users', remote ? 10 : 200, 1, 100_000),
    duration: int('duration', 20, 1, 3600),
    concurrency: int('concurrency', 256, 1, 10_000),
    lifetime: int('lifetime', 15, 3, 86_400),
    tokenUrl: remote,
  }
  if (remote) {
    o.clientId = process.env.TARABUT_CLIENT_ID
    o.clientSecret = process.env.TARABUT_CLIENT_SECRET
    if (!o.clientId || !o.clientSecret) {
      console.error('--token-url needs TARABUT_CLIENT_ID and TARABUT_CLIENT_SECRET in the environment')
      process.exit(2)
    }
  }
  return o
}

/** A small seeded PRNG: both designs start from the same token table. */
function prng(seed) {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

function percentile(sorted, p) {
  if (sorted.length === 0) return NaN
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]
}

const fmt = (n) => Math.round(n).toLocaleString('en-US')
const ms = (v) => (Number.isNaN(v) ? 'n/a' : v < 1 ? `${(v * 1000).toFixed(1)} µs` : `${v.toFixed(1)} ms`)

/**
 * Runs the workload for `seconds` through `design.get(userId, row)`.
 * Returns the counters the summary prints.
 */
async function run({ label, design, users, seconds, concurrency, server, initialRows, bufferTimeMs, onProgress }) {
  const db = new Map(initialRows)
  const m = { requests: 0, due: 0, failed: 0, stale: 0, latencies: [], startCalls: server ? server.tokenRequests : 0 }
  const started = performance.now()
  const until = started + seconds * 1000
  const random = prng(7)

  async function route() {
    while (performance.now() < until) {
      const userId = users[Math.floor(random() * users.length)]
      await new Promise((r) => setImmediate(r)) // the row read
      const row = db.get(userId)
      if (row.expiresAt.getTime() - Date.now() < bufferTimeMs) m.due++
      const t0 = performance.now()
      let v
      try {
        v = await design.get(userId, row)
      } catch {
        m.failed++
        continue
      }
      m.latencies.push(performance.now() - t0)
      m.requests++
      if (v.shouldUpdate) db.set(userId, { accessToken: v.accessToken, expiresAt: v.expiresAt })
      if (server && !server.isCurrent(userId, v.accessToken)) m.stale++
      await sleep(5 + random() * 20) // the bank API call
    }
  }

  const progress = setInterval(() => onProgress(label, m, (performance.now() - started) / 1000, seconds, server, design), 250)
  progress.unref()
  await Promise.all(Array.from({ length: concurrency }, route))
  clearInterval(progress)
  onProgress(label, m, seconds, seconds, server, design, true)
  m.elapsed = (performance.now() - started) / 1000
  m.tokenCalls = tokenCalls(m, server, design)
  m.coalesced = Math.max(0, m.due - m.tokenCalls)
  m.latencies.sort((a, b) => a - b)
  return m
}

function tokenCalls(m, server, design) {
  return server ? server.tokenRequests - m.startCalls : design.tokenCalls()
}

function progressPrinter() {
  const tty = process.stdout.isTTY
  const lastPlain = new Map()
  return (label, m, t, total, server, design, done = false) => {
    if (!done && t >= total) return // the final line says it
    const calls = tokenCalls(m, server, design)
    const line =
      `${label.padEnd(7)} ${t.toFixed(1).padStart(5)}/${total}s  requests ${fmt(m.requests).padStart(9)}` +
      `  (${fmt(m.requests / Math.max(t, 0.001)).padStart(6)}/s)  token calls ${fmt(calls).padStart(5)}` +
      `  coalesced ${fmt(Math.max(0, m.due - calls)).padStart(7)}  stale ${server ? fmt(m.stale) : 'n/a'}  failed ${fmt(m.failed)}`
    if (tty) {
      // One terminal row, or the in-place update would scroll.
      const cols = process.stdout.columns || 120
      process.stdout.write(`\r\x1b[2K${line.slice(0, cols - 1)}${done ? '\n' : ''}`)
    } else if (done || t - (lastPlain.get(label) ?? 0) >= 2) {
      lastPlain.set(label, t)
      console.log(line)
    }
  }
}

async function main() {
  const o = options()
  const users = Array.from({ length: o.users }, (_, i) => `demo-user-${String(i).padStart(5, '0')}`)
  const bufferTimeMs = Math.round((o.lifetime * 1000) / 3)

  let server = null
  let tokenUrl = o.tokenUrl
  let clientId = o.clientId
  let clientSecret = o.clientSecret
  if (!tokenUrl) {
    // Provider latency of a remote token endpoint: 30-100 ms.
    server = await startTarabutServer({ expiresIn: o.lifetime, latencyMs: () => 30 + Math.random() * 70 })
    tokenUrl = server.tokenUrl
    clientId = server.clientId
    clientSecret = server.clientSecret
  }

  const { SeedTokenManager } = await tsImport('../benchmark/seed-token-manager.ts', import.meta.url)

  console.log(`tarabut-token-manager demo: ${fmt(o.users)} users, ${o.concurrency} requests in flight, ${o.duration} s per design`)
  if (server) {
    console.log(`Tarabut-compatible token server on ${server.url} (token calls take 30-100 ms; tokens live ${o.lifetime} s, refreshed in the last ${(bufferTimeMs / 1000).toFixed(1)} s)`)
  } else {
    console.log(`token endpoint ${tokenUrl} (remote: tokens live as long as it says; stale tokens cannot be checked)`)
  }
  console.log('')

  // The same starting table for both designs: tokens issued "earlier" with
  // staggered expiries, some already due.
  const initialRows = () => {
    if (!server) return users.map((u) => [u, { accessToken: 'expired', expiresAt: new Date(Date.now() - 1000) }])
    server.reset()
    const r = prng(42)
    return users.map((u) => {
      const t = server.issue(u, 1 + r() * (o.lifetime - 1))
      return [u, { accessToken: t.accessToken, expiresAt: new Date(t.expiresAt) }]
    })
  }
  const onProgress = progressPrinter()

  // This package: the HTTP call in Rust, one refresh per user at a time.
  const manager = new TokenManager({ bufferTimeMs })
  const refresher = tarabutRefresher({ clientId, clientSecret, tokenUrl })
  const native = await run({
    label: 'native',
    design: {
      get: (userId, row) => manager.getValidToken(userId, row, refresher),
      tokenCalls: () => manager.stats().refreshes + manager.stats().failures + manager.stats().timeouts,
    },
    users,
    seconds: o.duration,
    concurrency: o.concurrency,
    server,
    initialRows: initialRows(),
    bufferTimeMs,
    onProgress,
  })

  // The seed: a mutex per user, a JS refreshFn using fetch.
  const seed = new SeedTokenManager({ bufferTimeMs })
  let seedCalls = 0
  const seedRefresh = (userId) => async () => {
    seedCalls++
    const res = await fetch(tokenUrl, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-tg-customeruserid': userId },
      body: JSON.stringify({ clientId, clientSecret, grantType: 'client_credentials' }),
    })
    if (!res.ok) throw new Error(`token endpoint answered HTTP ${res.status}`)
    const body = await res.json()
    return { accessToken: body.accessToken, expiresAt: new Date(Date.now() + body.expiresIn * 1000) }
  }
  const seedResult = await run({
    label: 'seed',
    design: {
      get: (userId, row) => seed.getValidToken(userId, row, seedRefresh(userId)),
      tokenCalls: () => seedCalls,
    },
    users,
    seconds: o.duration,
    concurrency: o.concurrency,
    server,
    initialRows: initialRows(),
    bufferTimeMs,
    onProgress,
  })

  const rows = [
    ['', 'tarabut-token-manager', 'seed (async-mutex + fetch)'],
    ['requests', fmt(native.requests), fmt(seedResult.requests)],
    ['requests/s', fmt(native.requests / native.elapsed), fmt(seedResult.requests / seedResult.elapsed)],
    ['provider token calls', fmt(native.tokenCalls), fmt(seedResult.tokenCalls)],
    ['coalesced callers', fmt(native.coalesced), fmt(seedResult.coalesced)],
    [
      'stale tokens served',
      server ? `${fmt(native.stale)} (${((100 * native.stale) / Math.max(1, native.requests)).toFixed(2)}%)` : 'n/a',
      server ? `${fmt(seedResult.stale)} (${((100 * seedResult.stale) / Math.max(1, seedResult.requests)).toFixed(2)}%)` : 'n/a',
    ],
    ['failed requests', fmt(native.failed), fmt(seedResult.failed)],
    ['getValidToken p50', ms(percentile(native.latencies, 50)), ms(percentile(seedResult.latencies, 50))],
    ['getValidToken p99', ms(percentile(native.latencies, 99)), ms(percentile(seedResult.latencies, 99))],
    ['getValidToken p99.9', ms(percentile(native.latencies, 99.9)), ms(percentile(seedResult.latencies, 99.9))],
  ]
  const widths = [0, 1, 2].map((c) => Math.max(...rows.map((r) => r[c].length)))
  console.log('')
  for (const [i, r] of rows.entries()) {
    console.log(`${r[0].padEnd(widths[0])}   ${r[1].padStart(widths[1])}   ${r[2].padStart(widths[2])}`)
    if (i === 0) console.log('-'.repeat(widths[0] + widths[1] + widths[2] + 6))
  }
  console.log('')
  console.log('coalesced: requests that presented a token due for refresh but did not cause a provider call of their own.')
  console.log('stale: tokens handed to an API route that the token server no longer accepts (superseded or expired).')
  if (server) {
    const s = manager.stats()
    console.log(`native manager: ${fmt(s.refreshes)} refreshes, ${fmt(s.failures)} failures, ${fmt(s.timeouts)} timeouts, ${fmt(s.hits)} hits`)
    await server.close()
  }
}

main().catch((e) => {
  console.error(e)
  process.exitCode = 1
})
