// Refreshes per second of oauth2Refresher per client authentication method
// (and with DPoP) against client_secret_basic, on the same local https token
// server: it asks for client certificates and answers every refresh at once
// without checking (a bank's own cost is not what is measured here: the
// client's signing, TLS and HTTP are). The server runs in a worker thread so
// it does not share the event loop with the refresher under test.
//
// Rounds are interleaved (each method once per round, order rotated) and the
// result per method is the median of its rounds.
//
//   node benchmark/fapi-refresh.mjs [--rounds 5] [--refreshes 2000] [--concurrency 32]
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
  parentPort.on('message', () => {
    server.closeAllConnections()
    server.close(() => parentPort.close())
  })
  parentPort.postMessage(`https://127.0.0.1:${server.address().port}/token`)
}

async function main() {
  const { values } = parseArgs({ options: { rounds: { type: 'string', default: '5' }, refreshes: { type: 'string', default: '2000' }, concurrency: { type: 'string', default: '32' } } })
  const rounds = Number(values.rounds)
  const refreshes = Number(values.refreshes)
  const concurrency = Number(values.concurrency)
  const { oauth2Refresher } = await import('../index.mjs')

  const worker = new Worker(fileURLToPath(import.meta.url))
  const tokenUrl = await new Promise((resolve) => worker.once('message', resolve))
  const tls = { ca: fixture('tls/ca.pem') }
  const mtls = { ...tls, cert: fixture('tls/client.pem'), key: fixture('tls/client.key') }
  const base = { tokenUrl, clientId: 'bench-app', tls }
  const jwt = (privateKey) => ({ ...base, authMethod: 'private_key_jwt', privateKey, audience: 'https://127.0.0.1' })
  const methods = {
    client_secret_basic: { ...base, clientSecret: 'bench-secret' },
    'private_key_jwt PS256': jwt(fixture('jose/rsa.pem')),
    'private_key_jwt RS256': { ...jwt(fixture('jose/rsa.pem')), algorithm: 'RS256' },
    'private_key_jwt ES256': jwt(fixture('jose/ec.pem')),
    'private_key_jwt EdDSA': jwt(fixture('jose/ed25519.pem')),
    tls_client_auth: { ...base, authMethod: 'tls_client_auth', tls: mtls },
    'client_secret_basic + DPoP ES256': { ...base, clientSecret: 'bench-secret', dpop: { privateKey: fixture('jose/ec.pem') } },
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
  }
  const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
  const baseline = median(results.client_secret_basic)
  console.log(`${refreshes} refreshes x ${rounds} rounds, concurrency ${concurrency} (median refreshes/s; ratio to client_secret_basic)`)
  for (const name of names) {
    const m = median(results[name])
    console.log(`${name.padEnd(34)} ${m.toFixed(0).padStart(7)}/s  ${(m / baseline).toFixed(2)}x`)
  }
  worker.postMessage('close')
}

if (isMainThread) await main()
