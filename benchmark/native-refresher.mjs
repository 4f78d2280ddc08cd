// Benchmark row: refreshes per second through TokenManager with the native
// tarabutRefresher (HTTP in Rust) against a JS refreshFn using fetch, both
// against the same Tarabut-compatible token server. The server runs in a
// worker thread, so it does not share the main thread's event loop with the
// client under test (a real provider is remote too).
//
// Rounds are interleaved (native/fetch, then fetch/native, ...) so drift in
// machine load hits both; the result is the median of per-round ratios.
//
//   node benchmark/native-refresher.mjs [--rounds 7] [--refreshes 2000] [--concurrency 64]
//
// or `import { benchNativeRefresher } from './native-refresher.mjs'`.
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { performance } from 'node:perf_hooks'

const SERVER_ROLE = 'tarabut-token-server'

// In the worker: run the token server until told to close.
if (!isMainThread && workerData?.role === SERVER_ROLE) {
  const { startTarabutServer } = await import('../__test__/helpers/tarabut-server.mjs')
  const server = await startTarabutServer({ expiresIn: 3600 })
  parentPort.on('message', async (msg) => {
    if (msg === 'stats') parentPort.postMessage({ issued: server.issued, rejected: server.rejected, tokenRequests: server.tokenRequests })
    if (msg === 'close') {
      await server.close()
      parentPort.close()
    }
  })
  parentPort.postMessage({ tokenUrl: server.tokenUrl, clientId: server.clientId, clientSecret: server.clientSecret })
}

async function startServerWorker() {
  const worker = new Worker(fileURLToPath(import.meta.url), { workerData: { role: SERVER_ROLE } })
  const info = await new Promise((resolve, reject) => {
    worker.once('message', resolve)
    worker.once('error', reject)
  })
  const ask = (msg) =>
    new Promise((resolve) => {
      worker.once('message', resolve)
      worker.postMessage(msg)
    })
  return {
    ...info,
    stats: () => ask('stats'),
    close: async () => {
      worker.postMessage('close')
      await new Promise((r) => worker.once('exit', r))
    },
  }
}

/** `refreshes` refreshes (one per distinct user) with `concurrency` in flight; refreshes/s. */
async function measure(TokenManager, refreshFn, { refreshes, concurrency, tag }) {
  const manager = new TokenManager()
  const expired = { accessToken: 'expired', expiresAt: 0 }
  let next = 0
  const started = performance.now()
  async function lane() {
    while (next < refreshes) {
      const i = next++
      await manager.getValidToken(`${tag}-${i}`, expired, refreshFn)
    }
  }
  await Promise.all(Array.from({ length: concurrency }, lane))
  const seconds = (performance.now() - started) / 1000
  const s = manager.stats()
  if (s.refreshes !== refreshes) throw new Error(`expected ${refreshes} refreshes, the manager counted ${s.refreshes}`)
  return refreshes / seconds
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b)
  const m = Math.floor(s.length / 2)
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2
}

/**
 * Native tarabutRefresher vs a fetch refreshFn. Returns
 * `{ name, unit, native, fetch, ratio, target, rounds }` where `native` and
 * `fetch` are median refreshes/s and `ratio` is the median per-round ratio.
 */
export async function benchNativeRefresher({ rounds = 7, refreshes = 2000, concurrency = 64, log = () => {} } = {}) {
  const { TokenManager, tarabutRefresher } = await import('../index.mjs')
  const server = await startServerWorker()
  try {
    const { tokenUrl, clientId, clientSecret } = server
    const native = tarabutRefresher({ clientId, clientSecret, tokenUrl })
    const body = JSON.stringify({ clientId, clientSecret, grantType: 'client_credentials' })
    // What a careful user writes by hand: the documented call, aborted on timeout.
    const viaFetch = async (ctx) => {
      const res = await fetch(tokenUrl, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'x-tg-customeruserid': ctx.userId },
        body,
        signal: ctx.signal,
      })
      if (!res.ok) throw Object.assign(new Error(`token endpoint answered HTTP ${res.status}`), { status: res.status })
      const t = await res.json()
      return { accessToken: t.accessToken, expiresIn: t.expiresIn }
    }
    const opts = { refreshes, concurrency }
    // Warm-up: JIT, connection pools.
    await measure(TokenManager, native, { ...opts, refreshes: Math.min(500, refreshes), tag: 'warm-n' })
    await measure(TokenManager, viaFetch, { ...opts, refreshes: Math.min(500, refreshes), tag: 'warm-f' })
    const perRound = []
    for (let r = 0; r < rounds; r++) {
      const order = r % 2 === 0 ? ['native', 'fetch'] : ['fetch', 'native']
      const row = {}
      for (const which of order) {
        row[which] = await measure(TokenManager, which === 'native' ? native : viaFetch, { ...opts, tag: `${which}-${r}` })
      }
      row.ratio = row.native / row.fetch
      perRound.push(row)
      log(`round ${r + 1}/${rounds}: native ${Math.round(row.native)}/s, fetch ${Math.round(row.fetch)}/s, ratio ${row.ratio.toFixed(2)}x`)
    }
    const stats = await server.stats()
    if (stats.rejected !== 0) throw new Error(`the token server refused ${stats.rejected} requests`)
    return {
      name: 'native tarabutRefresher vs fetch refreshFn',
      unit: 'refreshes/s',
      native: median(perRound.map((r) => r.native)),
      fetch: median(perRound.map((r) => r.fetch)),
      ratio: median(perRound.map((r) => r.ratio)),
      target: 1.5,
      rounds: perRound,
      config: { refreshes, concurrency, serverRequests: stats.tokenRequests },
    }
  } finally {
    await server.close()
  }
}

export default benchNativeRefresher

if (isMainThread && process.argv[1] === fileURLToPath(import.meta.url)) {
  const { values } = parseArgs({ options: { rounds: { type: 'string' }, refreshes: { type: 'string' }, concurrency: { type: 'string' } } })
  const num = (v, d) => (v === undefined ? d : Number(v))
  const result = await benchNativeRefresher({
    rounds: num(values.rounds, 7),
    refreshes: num(values.refreshes, 2000),
    concurrency: num(values.concurrency, 64),
    log: (line) => console.log(line),
  })
  console.log('')
  console.log(`${result.name} (${result.config.refreshes} refreshes x ${result.rounds.length} rounds, ${result.config.concurrency} in flight)`)
  console.log(`  native: ${Math.round(result.native).toLocaleString('en-US')} refreshes/s (median)`)
  console.log(`  fetch:  ${Math.round(result.fetch).toLocaleString('en-US')} refreshes/s (median)`)
  console.log(`  ratio:  ${result.ratio.toFixed(2)}x (median of rounds; target >= ${result.target}x: ${result.ratio >= result.target ? 'met' : 'NOT met'})`)
}
