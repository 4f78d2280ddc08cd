// `npm run test:e2e`: the addon inside a real Next.js server, deployed the way
// most Next.js apps ship (`output: 'standalone'`: no node_modules, only the
// files Next traced).
//
// Builds and packs the addon (`npm run package`: the main package and this
// platform's package), installs both tarballs into the example, runs `next
// build`, copies `.next/standalone` and `.next/static` into a new empty
// directory outside the repo and checks that copy carries the files of both
// packages. Then for each pass it starts a Tarabut-compatible API
// (token endpoint + an accounts endpoint that answers 401 to any expired or
// superseded token), seeds 50 users' rows whose tokens fall due during the
// run, starts `node server.js` in the copy (its manager keeps the tokens in
// that table: options `store` and `refresher`, the route calls the API
// through `manager.fetch`), fires 2,000 requests with 100 in flight, each
// user's calls spread over every instance, and checks: every response is
// 200, the provider saw exactly one token request per user (one expiry
// each), and the database holds each user's newest token.
// Pass 1: one server. Pass 2: two servers sharing a real Redis.
// After each pass's run, `observabilityChecks` has the provider refuse one
// user's refresh, then scrapes both metrics endpoints of every instance;
// `disconnectChecks` disconnects another user (`manager.forget`) and checks
// every instance answers 409 NOT_CONNECTED for them and their row is gone.
import { execFileSync, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { cpSync, existsSync, lstatSync, mkdtempSync, readdirSync, realpathSync, rmSync } from 'node:fs'
import { createRequire } from 'node:module'
import net from 'node:net'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

import parsePrometheusTextFormat from 'parse-prometheus-text-format'

import { startTarabutServer } from '../../../__test__/helpers/tarabut-server.mjs'
import { pack } from '../../../scripts/package.mjs'

const app = fileURLToPath(new URL('..', import.meta.url))
const USERS = 50
const REQUESTS = 2_000
const IN_FLIGHT = 100
const BUFFER_S = 300 // the addon's default bufferTimeMs
const DUE_AFTER_MS = 1_500 // seeded tokens fall due this long into the run
const RUN_MS = 4_000 // requests are spread over at least this long

const results = []
const sh = (cmd, args, cwd) => execFileSync(cmd, args, { cwd, stdio: 'inherit', env: { ...process.env, NEXT_TELEMETRY_DISABLED: '1' } })

function check(name, ok, detail = '') {
  results.push(ok)
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${name}${detail ? ` (${detail})` : ''}`)
}

async function freePort() {
  const srv = net.createServer()
  await new Promise((r) => srv.listen(0, '127.0.0.1', r))
  const { port } = srv.address()
  await new Promise((r) => srv.close(r))
  return port
}

async function waitFor(url, child, what) {
  const deadline = Date.now() + 60_000
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`${what} exited with ${child.exitCode}`)
    try {
      const res = await fetch(url)
      if (res.status < 500) return
    } catch {}
    await new Promise((r) => setTimeout(r, 100))
  }
  throw new Error(`${what} did not start within 60 s`)
}

function start(cmd, args, { cwd, env, name }) {
  const child = spawn(cmd, args, { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] })
  let log = ''
  child.stdout.on('data', (d) => (log += d))
  child.stderr.on('data', (d) => (log += d))
  child.log = () => log
  child.name = name
  return child
}

async function stop(child) {
  if (child.exitCode !== null) return
  child.kill('SIGTERM')
  await new Promise((r) => {
    const t = setTimeout(() => {
      child.kill('SIGKILL')
      r()
    }, 5_000)
    child.once('exit', () => {
      clearTimeout(t)
      r()
    })
  })
}

/** Files under `dir`, relative, not following symlinks. */
function walk(dir, rel = '') {
  const out = []
  for (const e of readdirSync(path.join(dir, rel), { withFileTypes: true })) {
    const f = path.join(rel, e.name)
    if (e.isDirectory()) out.push(...walk(dir, f))
    else out.push(f)
  }
  return out
}

const inside = (dir, p) => p === dir || p.startsWith(dir + path.sep)

// The deploy, as a container image's COPY steps would make it: the standalone
// tree and the static assets in a new directory that no node_modules above
// can serve (so a file Next failed to trace fails the run).
function deployStandalone() {
  const built = path.join(app, '.next/standalone')
  // With a lockfile above the app (this repo's), Next traces from that
  // directory and nests the app under its relative path: find server.js.
  const server = walk(built)
    .filter((f) => path.basename(f) === 'server.js' && !f.split(path.sep).includes('node_modules'))
    .sort((a, b) => a.length - b.length)[0]
  if (!server) throw new Error('next build wrote no .next/standalone/**/server.js')
  const dir = realpathSync(mkdtempSync(path.join(tmpdir(), 'ttm-standalone-')))
  for (let up = path.dirname(dir); ; up = path.dirname(up)) {
    if (existsSync(path.join(up, 'node_modules'))) throw new Error(`${up}/node_modules would serve the deploy: pick another TMPDIR`)
    if (up === path.dirname(up)) break
  }
  cpSync(built, dir, { recursive: true, verbatimSymlinks: true })
  const serverDir = path.join(dir, path.dirname(server))
  cpSync(path.join(app, '.next/static'), path.join(serverDir, '.next/static'), { recursive: true })
  if (existsSync(path.join(app, 'public'))) cpSync(path.join(app, 'public'), path.join(serverDir, 'public'), { recursive: true })
  return { dir, serverDir }
}

/** The deploy needs nothing outside itself, and carries the package's runtime files. */
function checkDeploy({ dir }) {
  const files = walk(dir)
  const escaping = files.filter((f) => {
    const p = path.join(dir, f)
    if (!lstatSync(p).isSymbolicLink()) return false
    try {
      return !inside(dir, realpathSync(p))
    } catch {
      return true // dangling
    }
  })
  check('the standalone copy points at nothing outside itself', escaping.length === 0, escaping.slice(0, 3).join(', '))

  // The installed package, and its platform package if npm installed one
  // (npm copied the published files), against what Next traced into the
  // deploy: every runtime file must be there.
  const packages = readdirSync(path.join(app, 'node_modules')).filter((n) => /^tarabut-token-manager(-|$)/.test(n))
  const needed = []
  const missing = []
  for (const name of packages) {
    const marker = `node_modules${path.sep}${name}${path.sep}`
    const traced = new Set(files.filter((f) => f.includes(marker)).map((f) => f.slice(f.lastIndexOf(marker) + marker.length)))
    for (const f of walk(path.join(app, 'node_modules', name))) {
      if (!/\.([cm]?js|node)$/.test(f) && f !== 'package.json') continue
      needed.push(`${name}/${f}`)
      if (!traced.has(f)) missing.push(`${name}/${f}`)
    }
  }
  check(
    "the standalone copy carries the package's runtime files",
    needed.some((f) => f.endsWith('.node')) && missing.length === 0,
    missing.length > 0 ? `missing: ${missing.join(', ')}` : needed.join(', '),
  )
}

async function startStandalone(serverDir, env) {
  const port = await freePort()
  // The OpenTelemetry Prometheus exporter's own server (instrumentation.ts).
  const otelPort = await freePort()
  // A container's environment: no npm, no NODE_PATH, only what the app reads.
  const child = start(process.execPath, ['server.js'], {
    cwd: serverDir,
    env: {
      PATH: process.env.PATH,
      NEXT_TELEMETRY_DISABLED: '1',
      PORT: String(port),
      HOSTNAME: '127.0.0.1',
      OTEL_EXPORTER_PROMETHEUS_HOST: '127.0.0.1',
      OTEL_EXPORTER_PROMETHEUS_PORT: String(otelPort),
      ...env,
    },
    name: `server.js:${port}`,
  })
  await waitFor(`http://127.0.0.1:${port}/`, child, child.name)
  return { child, base: `http://127.0.0.1:${port}`, otelMetrics: `http://127.0.0.1:${otelPort}/metrics` }
}

async function startRedis() {
  const port = await freePort()
  const child = start('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { cwd: tmpdir(), env: process.env, name: 'redis' })
  const deadline = Date.now() + 10_000
  for (;;) {
    const ok = await new Promise((r) => {
      const s = net.connect(port, '127.0.0.1', () => {
        s.end()
        r(true)
      })
      s.on('error', () => r(false))
    })
    if (ok) break
    if (Date.now() > deadline || child.exitCode !== null) throw new Error(`redis-server did not start: ${child.log()}`)
    await new Promise((r) => setTimeout(r, 50))
  }
  return { child, url: `redis://127.0.0.1:${port}` }
}

async function pass(label, { instances, redis, serverDir }) {
  console.log(`\n# ${label}`)
  const api = await startTarabutServer()
  api.route('GET', '/accounts', accountsRoute(api))
  const dir = mkdtempSync(path.join(tmpdir(), 'ttm-e2e-'))
  const dbPath = path.join(dir, 'tokens.db')
  const require = createRequire(path.join(app, 'package.json'))
  const Database = require('better-sqlite3')
  const db = new Database(dbPath)
  db.pragma('journal_mode = WAL')
  db.exec('CREATE TABLE tarabut_tokens (user_id TEXT PRIMARY KEY, access_token TEXT NOT NULL, refresh_token TEXT, expires_at INTEGER NOT NULL)')
  const users = Array.from({ length: USERS }, (_, i) => `user-${i}`)
  const insert = db.prepare('INSERT INTO tarabut_tokens VALUES (?, ?, NULL, ?)')
  for (const u of users) {
    // Issued earlier by the provider; falls due (enters the buffer) mid-run.
    const t = api.issue(u, BUFFER_S + DUE_AFTER_MS / 1000)
    insert.run(u, t.accessToken, t.expiresAt)
  }
  api.expiresIn = 3600

  const env = {
    DATABASE_PATH: dbPath,
    TARABUT_API_URL: api.url,
    TARABUT_TOKEN_URL: api.tokenUrl,
    TARABUT_CLIENT_ID: api.clientId,
    TARABUT_CLIENT_SECRET: api.clientSecret,
  }
  const servers = []
  let redisServer
  try {
    if (redis) {
      redisServer = await startRedis()
      env.REDIS_URL = redisServer.url
      env.TOKEN_CACHE_KEY = randomBytes(32).toString('base64')
      env.TOKEN_USER_ID_KEY = randomBytes(32).toString('base64')
    }
    for (let i = 0; i < instances; i++) servers.push(await startStandalone(serverDir, env))

    const statuses = new Map()
    const t0 = Date.now()
    let next = 0
    const worker = async () => {
      while (next < REQUESTS) {
        const i = next++
        const wait = t0 + (i * RUN_MS) / REQUESTS - Date.now()
        if (wait > 0) await new Promise((r) => setTimeout(r, wait))
        // Round r of the users goes to instance r: every user is served by
        // every instance, so with Redis they share each user's refresh.
        const server = servers[Math.floor(i / USERS) % servers.length]
        const res = await fetch(`${server.base}/api/accounts?userId=${users[i % USERS]}`).catch((e) => ({ status: `error ${e.message}` }))
        const text = res.text ? await res.text() : ''
        // A failure is counted with its code (the route's JSON), so the detail says why.
        let key = res.status
        if (res.status !== 200) key = `${res.status} ${/"code":"(\w+)"/.exec(text)?.[1] ?? ''}`.trim()
        statuses.set(key, (statuses.get(key) ?? 0) + 1)
      }
    }
    await Promise.all(Array.from({ length: IN_FLIGHT }, worker))
    const took = Date.now() - t0

    const ok = statuses.get(200) ?? 0
    check(`${REQUESTS} requests, every response 200`, ok === REQUESTS, `${JSON.stringify(Object.fromEntries(statuses))} in ${took} ms`)
    const perUser = users.map((u) => api.requestsFor(u))
    check(
      'one token request per user per expiry',
      perUser.every((n) => n === 1),
      `${api.tokenRequests} token requests for ${USERS} users; per user min ${Math.min(...perUser)} max ${Math.max(...perUser)}`,
    )
    // The manager saved each refresh (store.save): the provider's current
    // token, with its expiry (the manager dates `expiresIn` from when its
    // refresh began, the provider from when it answered: on a loaded
    // machine, seconds apart; the seeded tokens' expiry is an hour off) and
    // no refresh token (Tarabut issues none).
    const rowOf = (u) => db.prepare('SELECT access_token, refresh_token, expires_at FROM tarabut_tokens WHERE user_id = ?').get(u)
    const stale = []
    for (const u of users) {
      const row = rowOf(u)
      const current = api.currentToken(u)
      if (row?.access_token !== current?.accessToken) stale.push(`${u}: ${row ? 'an older token' : 'no row'}`)
      else if (Math.abs(row.expires_at - current.expiresAt) > 60_000) stale.push(`${u}: expiry ${row.expires_at - current.expiresAt} ms off`)
      else if (row.refresh_token !== null) stale.push(`${u}: a refresh token`)
    }
    check('the database holds the newest token for every user', stale.length === 0, `${stale.length} stale rows${stale.length ? `: ${stale.slice(0, 3).join('; ')}` : ''}`)
    check('the provider saw only well-formed token requests', api.rejected === 0, `${api.rejected} refused`)
    await observabilityChecks(api, servers, users)
    await disconnectChecks(api, servers, users[1], rowOf)
  } catch (e) {
    check(`${label} ran`, false, e.message)
    for (const s of servers) console.error(s.child.log().slice(-4000))
  } finally {
    for (const s of servers) await stop(s.child)
    if (redisServer) await stop(redisServer.child)
    db.close()
    await api.close()
    rmSync(dir, { recursive: true, force: true })
  }
}

// The accounts API of the Tarabut-compatible server: 200 for a user's
// current token, else 401. Users in `refuseOnce` get one 401 regardless.
function accountsRoute(api, refuseOnce = new Set()) {
  return (req, res) => {
    let user = api.authorize(req)
    if (user !== null && refuseOnce.delete(user)) user = null
    const body = user === null ? { error: 'invalid_token' } : { accounts: [{ id: `acc-${user}`, currency: 'BHD' }] }
    // No keep-alive: on a loaded machine a server stalled past the API's
    // keep-alive timeout reuses a socket the API has closed meanwhile
    // (undici: "other side closed"), a race of HTTP, not of the addon.
    res.writeHead(user === null ? 401 : 200, { 'content-type': 'application/json', connection: 'close' })
    res.end(JSON.stringify(body))
  }
}

/** Sums of `name`'s samples over every scrape in `texts`, by the value of `label`. */
function sumBy(texts, name, label) {
  const sums = {}
  for (const text of texts) {
    const family = parsePrometheusTextFormat(text).find((f) => f.name === name)
    for (const s of family?.metrics ?? []) {
      const key = label === undefined ? 'all' : s.labels?.[label]
      sums[key] = (sums[key] ?? 0) + Number(s.value)
    }
  }
  return sums
}

// Observability: the provider refuses one user's refresh (401, after the
// accounts API refused the user's token, so the route invalidates it and
// refreshes); the caller sees INVALID_CLIENT. Then every instance's
// /api/metrics (manager.metrics()) and OpenTelemetry exporter
// (instrumentation.ts) are scraped: summed over instances, refreshes by
// outcome must equal the token requests the provider saw.
async function observabilityChecks(api, servers, users) {
  const user = users[0]
  api.route('GET', '/accounts', accountsRoute(api, new Set([user])))
  api.inject({ status: 401 }, { userId: user })
  const res = await fetch(`${servers[0].base}/api/accounts?userId=${user}`)
  const body = await res.json().catch(() => null)
  check('a refresh the provider refuses reaches the caller with its code', res.status === 503 && body?.code === 'INVALID_CLIENT', `${res.status} ${JSON.stringify(body)}`)
  const expected = { ok: api.issued, INVALID_CLIENT: 1 }
  const scrape = (url) => fetch(url).then((r) => (r.ok ? r.text() : Promise.reject(new Error(`${url} answered ${r.status}`))))
  for (const [what, url] of [
    ['/api/metrics (manager.metrics())', (s) => `${s.base}/api/metrics`],
    ['OpenTelemetry Prometheus exporter', (s) => s.otelMetrics],
  ]) {
    const texts = await Promise.all(servers.map((s) => scrape(url(s))))
    const refreshes = sumBy(texts, 'tarabut_token_manager_refreshes_total', 'outcome')
    const same = Object.keys({ ...refreshes, ...expected }).every((k) => refreshes[k] === expected[k])
    const total = Object.values(refreshes).reduce((a, b) => a + b, 0)
    check(
      `${what}: refreshes by outcome = token requests the provider saw`,
      same && total === api.tokenRequests,
      `${JSON.stringify(refreshes)}; provider: ${api.tokenRequests} token requests, ${api.issued} tokens issued, 1 refused`,
    )
    const inFlight = sumBy(texts, 'tarabut_token_manager_in_flight').all
    check(`${what}: nothing left in flight`, inFlight === 0, `in_flight ${inFlight}`)
  }
}

// A user disconnects their bank on one instance (DELETE /api/connection:
// `manager.forget`). Then every instance, including one that held their
// token, answers 409 NOT_CONNECTED without asking the provider for a token,
// and their row is gone.
async function disconnectChecks(api, servers, user, rowOf) {
  const before = api.requestsFor(user)
  const del = await fetch(`${servers[0].base}/api/connection?userId=${user}`, { method: 'DELETE' })
  check('disconnecting a user answers 204', del.status === 204, String(del.status))
  check("the disconnected user's row is gone", rowOf(user) === undefined)
  for (const s of servers) {
    const res = await fetch(`${s.base}/api/accounts?userId=${user}`)
    const body = await res.json().catch(() => null)
    check(`${s.child.name}: a disconnected user gets 409 NOT_CONNECTED`, res.status === 409 && body?.code === 'NOT_CONNECTED', `${res.status} ${JSON.stringify(body)}`)
  }
  check('no token was requested for the disconnected user', api.requestsFor(user) === before, `${api.requestsFor(user) - before} requests`)
}

const skipBuild = process.argv.includes('--no-build')
// Install the example; then always replace the addon with this build, packed
// as it is published: the main package and this platform's binary package.
if (!existsSync(path.join(app, 'node_modules/next'))) sh('npm', ['ci', '--no-audit', '--no-fund'], app)
const packed = await pack({ build: !skipBuild })
for (const name of ['tarabut-token-manager', packed.platformPackage]) {
  rmSync(path.join(app, 'node_modules', name), { recursive: true, force: true })
}
sh('npm', ['install', '--no-audit', '--no-fund', '--no-save', packed.main, packed.platform], app)
sh('npx', ['next', 'build'], app)
sh('npx', ['tsc', '--noEmit'], app) // after next build, which writes next-env.d.ts

// The standalone server replaces `next start` here: it is the same Next
// server on the same build, but it sees only the files Next traced.
const deploy = deployStandalone()
try {
  checkDeploy(deploy)
  await pass('one standalone server.js', { instances: 1, redis: false, serverDir: deploy.serverDir })
  await pass('two standalone server.js instances sharing Redis', { instances: 2, redis: true, serverDir: deploy.serverDir })
} finally {
  rmSync(deploy.dir, { recursive: true, force: true })
}

const failed = results.filter((r) => !r).length
console.log(`\ne2e: ${results.length - failed} passed, ${failed} failed`)
process.exit(failed === 0 ? 0 : 1)
