// Refreshes per second of oauth2Refresher per client authentication method
// (and with DPoP) against client_secret_basic, on the same local https token
// server: it asks for client certificates and answers every refresh at once
// without checking (a bank's own cost is not what is measured here: the
// client's signing, TLS and HTTP are). And what a DPoP proof adds to each
// `manager.fetch`: the same requests to a local API that answers at once,
// with a Bearer token and with a DPoP-bound one (ES256), one at a time. The
// servers run in a worker thread so they do not share the event loop with
// the code under test.
//
// Rounds are interleaved (each method once per round, order rotated) and the
// result per method is the median of its rounds. `npm run bench` prints
// fapiRows(); alone:
//
//   node benchmark/fapi-refresh.mjs [--rounds 5] [--refreshes 2000] [--concurrency 32] [--fetches 2000]
import { Worker, isMainThread, parentPort } from 'node:worker_threads'
import { readFileSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { performance } from 'node:perf_hooks'

const fixture = (path) => readFileSync(new URL(`../__test__/fixtures/${path}`, import.meta.url), 'utf8')

if (!isMainThread) {
  const https = await import('node:https')
  const server = https.createServer(
    { cert: fixture('tls/server.pem'), key: fixture('tls/server.key'), ca: fixture('tls/ca.pem'), requestCert: true, rejectUnauthorized: false },
    (req, res) => {
      req.resume()
      req.on('end', () => {
        const dpop = req.headers.dpop !== undefined
        res.setHeader('content-type', 'application/json')
        res.end(JSON.stringify({ access_token: 'at', token_type: dpop ? 'DPoP' : 'Bearer', expires_in: 300, refresh_token: 'rt' }))
      })
    },
  )
  server.keepAliveTimeout = 5000
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  const http = await import('node:http')
  const api = http.createServer((req, res) => {
    req.resume()
    req.on('end', () => res.end('{"ok":true}'))
  })
  api.keepAliveTimeout = 5000
  await new Promise((r) => api.listen(0, '127.0.0.1', r))
  parentPort.on('message', () => {
    server.closeAllConnections()
    api.closeAllConnections()
    api.close()
    server.close(() => parentPort.close())
  })
  parentPort.postMessage({ tokenUrl: `https://127.0.0.1:${server.address().port}/token`, apiUrl: `http://127.0.0.1:${api.address().port}/accounts` })
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

/**
 * `{ refresh: { [method]: refreshes/s }, fetch: { inProcess, localApi }, rounds }`,
 * medians of interleaved rounds.
 */
export async function benchFapi({ rounds = 5, refreshes = 2000, concurrency = 32, fetches = 2000, log = () => {} } = {}) {
  const { TokenManager, oauth2Refresher } = await import('../index.mjs')

  const worker = new Worker(fileURLToPath(import.meta.url))
  const { tokenUrl, apiUrl } = await new Promise((resolve) => worker.once('message', resolve))
  try {
    const tls = { ca: fixture('tls/ca.pem') }
    const mtls = { ...tls, cert: fixture('tls/client.pem'), key: fixture('tls/client.key') }
    const base = { tokenUrl, clientId: 'bench-app', tls }
    const jwt = (privateKey) => ({ ...base, authMethod: 'private_key_jwt', privateKey, audience: 'https://127.0.0.1' })
    const dpop = { privateKey: fixture('jose/ec.pem') }
    const methods = {
      client_secret_basic: { ...base, clientSecret: 'bench-secret' },
      'private_key_jwt PS256': jwt(fixture('jose/rsa.pem')),
      'private_key_jwt RS256': { ...jwt(fixture('jose/rsa.pem')), algorithm: 'RS256' },
      'private_key_jwt ES256': jwt(fixture('jose/ec.pem')),
      'private_key_jwt EdDSA': jwt(fixture('jose/ed25519.pem')),
      tls_client_auth: { ...base, authMethod: 'tls_client_auth', tls: mtls },
      'client_secret_basic + DPoP ES256': { ...base, clientSecret: 'bench-secret', dpop },
    }
    const refreshers = Object.fromEntries(Object.entries(methods).map(([name, options]) => [name, oauth2Refresher(options)]))

    async function run(refresh) {
      let next = 0
      const started = performance.now()
      await Promise.all(
        Array.from({ length: concurrency }, async () => {
          while (next < refreshes) {
            const i = next++
            await refresh({ userId: `u${i}`, refreshToken: `rt-${i}` })
          }
        }),
      )
      return refreshes / ((performance.now() - started) / 1000)
    }

    const names = Object.keys(refreshers)
    for (const name of names) await run(refreshers[name]) // warm: connections, pools
    const results = Object.fromEntries(names.map((n) => [n, []]))
    for (let round = 0; round < rounds; round++) {
      const order = names.map((_, i) => names[(i + round) % names.length])
      for (const name of order) results[name].push(await run(refreshers[name]))
      log(`refresh round ${round + 1}/${rounds}`)
    }

    // manager.fetch, Bearer against DPoP, with a held token (no refresh),
    // one request at a time, the two alternating (so drift in the
    // machine's speed lands on both): per-request medians. In process: a
    // fetch that answers at once (the manager's own work only); and to a
    // local API (what a caller waits).
    const row = { accessToken: 'a'.repeat(1000), refreshToken: 'rt', expiresAt: new Date(Date.now() + 3_600_000) }
    const store = { load: () => ({ ...row }), save: () => true, delete: () => {} }
    const answer = () => Promise.resolve(new Response(null, { status: 200 }))
    const make = (refresher, fetch) => new TokenManager({ store, refresher, refreshAhead: false, fetch })
    const bearer = refreshers.client_secret_basic
    const bound = refreshers['client_secret_basic + DPoP ES256']
    const pairs = {
      inProcess: [make(bearer, answer), make(bound, answer)],
      localApi: [make(bearer, null), make(bound, null)],
    }
    async function once(manager) {
      const started = performance.now()
      const res = await manager.fetch('bench-user', apiUrl)
      if (res.body !== null) await res.arrayBuffer()
      return (performance.now() - started) * 1000
    }
    async function alternate([b, d], n) {
      const times = { bearer: [], dpop: [] }
      for (let i = 0; i < n; i++) {
        if (i % 2 === 0) {
          times.bearer.push(await once(b))
          times.dpop.push(await once(d))
        } else {
          times.dpop.push(await once(d))
          times.bearer.push(await once(b))
        }
      }
      return { bearer: median(times.bearer), dpop: median(times.dpop) }
    }
    const fetchResults = { inProcess: [], localApi: [] }
    for (const pair of Object.values(pairs)) await alternate(pair, 200) // warm
    for (let round = 0; round < rounds; round++) {
      for (const [name, pair] of Object.entries(pairs)) fetchResults[name].push(await alternate(pair, fetches))
      log(`fetch round ${round + 1}/${rounds}`)
    }
    for (const pair of Object.values(pairs)) for (const m of pair) await m.close()
    const summary = (name) => ({
      bearerUs: median(fetchResults[name].map((r) => r.bearer)),
      dpopUs: median(fetchResults[name].map((r) => r.dpop)),
      addedUs: median(fetchResults[name].map((r) => r.dpop - r.bearer)),
    })
    return {
      refresh: Object.fromEntries(names.map((n) => [n, median(results[n])])),
      fetch: { inProcess: summary('inProcess'), localApi: summary('localApi') },
      rounds,
    }
  } finally {
    worker.postMessage('close')
  }
}

/** benchFapi's results as `npm run bench` rows. */
export async function fapiRows(options) {
  const r = await benchFapi(options)
  const basic = r.refresh.client_secret_basic
  const rows = Object.entries(r.refresh).map(([name, perSec]) => ({
    name: `refresh: ${name}`,
    value: Math.round(perSec).toLocaleString('en-US'),
    unit: 'refreshes/s',
    note: `${(perSec / basic).toFixed(2)}× client_secret_basic, median of ${r.rounds} interleaved rounds`,
  }))
  const { inProcess, localApi } = r.fetch
  rows.push({
    name: 'manager.fetch: a DPoP proof added (ES256), in process',
    value: inProcess.addedUs.toFixed(0),
    unit: 'µs per fetch',
    target: '< 100 µs',
    met: inProcess.addedUs < 100,
    note: `the manager's own work per fetch, to a fetch that answers at once: ${inProcess.dpopUs.toFixed(0)} µs DPoP vs ${inProcess.bearerUs.toFixed(0)} µs Bearer (medians, alternating)`,
  })
  rows.push({
    name: 'manager.fetch: a DPoP proof added (ES256), to a local API',
    value: localApi.addedUs.toFixed(0),
    unit: 'µs per fetch',
    note: `what a caller waits: ${localApi.dpopUs.toFixed(0)} µs DPoP vs ${localApi.bearerUs.toFixed(0)} µs Bearer per request to an http API on 127.0.0.1 (medians, alternating)`,
  })
  return rows
}

async function main() {
  const { values } = parseArgs({
    options: { rounds: { type: 'string', default: '5' }, refreshes: { type: 'string', default: '2000' }, concurrency: { type: 'string', default: '32' }, fetches: { type: 'string', default: '2000' } },
  })
  const rows = await fapiRows({ rounds: Number(values.rounds), refreshes: Number(values.refreshes), concurrency: Number(values.concurrency), fetches: Number(values.fetches), log: (l) => process.stderr.write(`${l}\n`) })
  for (const r of rows) console.log(`${r.name.padEnd(46)} ${String(r.value).padStart(7)} ${r.unit}  ${r.note}`)
}

if (isMainThread && process.argv[1] === fileURLToPath(import.meta.url)) await main()
