// A fleet that lets the manager keep its tokens: 3 processes, one
// redis-server, one token table (the app's database, over HTTP here) whose
// saves fail at random, oidc-provider rotating refresh tokens and revoking
// the grant on reuse. Mid-run a process is killed while it saves a token it
// just refreshed (its only copy outside Redis), and later Redis is
// restarted empty. With `store` and refresh ahead: no caller fails, no grant
// is lost, and every user's newest token ends up in the table. (Saves fail
// only in the first part of the run: a token whose save is still failing
// when Redis also loses its data is held by one process alone, the limit
// docs/lifecycle.md states.)
import { fork } from 'node:child_process'
import http from 'node:http'
import { fileURLToPath } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

import { startOidc } from './helpers/oidc.mjs'
import { newKey, sleep, startRedis } from './helpers/redis.mjs'

const WORKER = fileURLToPath(new URL('./helpers/lifecycle-worker.mjs', import.meta.url))
const USERS = 10
const CALLERS = 3
const WORKERS = 3
const ACCESS_TTL_S = 12
const ROUND_MS = 400
const RUN_MS = 26_000
const SAVE_FAILURE_RATE = 0.2

let oidc
beforeAll(async () => {
  oidc = await startOidc({ accessTtlS: ACCESS_TTL_S })
})
afterAll(() => oidc.close())

/** The app's token table over HTTP, compare-and-set on the previous access token; saves fail at random. */
async function startTable(onSave) {
  const rows = new Map()
  const server = http.createServer(async (req, res) => {
    const user = decodeURIComponent(req.url.slice('/rows/'.length))
    let body = ''
    for await (const chunk of req) body += chunk
    if (req.method === 'GET') {
      const row = rows.get(user)
      return row === undefined ? res.writeHead(404).end() : res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(row))
    }
    if (req.method === 'PUT') {
      const { token, previous } = JSON.parse(body)
      // Decides whether this write happens at all (a kill, a failure).
      if (!onSave(user, Number(req.headers['x-worker']), res)) return
      const row = rows.get(user)
      if ((row?.accessToken ?? null) !== (previous?.accessToken ?? null)) return res.writeHead(409).end()
      rows.set(user, token)
      server.saves++
      return res.writeHead(204).end()
    }
    res.writeHead(405).end()
  })
  server.saves = 0
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  return { rows, server, url: `http://127.0.0.1:${server.address().port}` }
}

/**
 * The token endpoint as each worker reaches it (`/w<n>/token`), counting
 * each worker's token requests in flight: a worker is killed only while
 * none is, nor was answered in the last 500 ms (a process killed between
 * the provider's answer and sealing it in Redis loses the rotated token
 * with it: no design can save that one), and a request from a killed
 * worker that arrives late is dropped before it reaches the server.
 */
async function startTokenProxy(target) {
  const inFlight = new Map()
  const answeredAt = new Map()
  const dead = new Set()
  const server = http.createServer((req, res) => {
    const worker = Number(req.url.split('/')[1].slice(1))
    if (dead.has(worker)) return req.socket.destroy()
    inFlight.set(worker, (inFlight.get(worker) ?? 0) + 1)
    const done = () => {
      inFlight.set(worker, inFlight.get(worker) - 1)
      answeredAt.set(worker, Date.now())
    }
    const url = new URL(target)
    const upstream = http.request({ host: url.hostname, port: url.port, path: url.pathname, method: req.method, headers: { ...req.headers, host: url.host } }, (up) => {
      res.writeHead(up.statusCode, up.headers)
      up.pipe(res)
      up.on('end', done)
    })
    upstream.on('error', () => (done(), res.destroy()))
    req.pipe(upstream)
  })
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  return { server, url: (worker) => `http://127.0.0.1:${server.address().port}/w${worker}/token`, busy: (worker) => (inFlight.get(worker) ?? 0) > 0 || Date.now() - (answeredAt.get(worker) ?? 0) < 500, kill: (worker) => dead.add(worker) }
}

function startWorker(config) {
  const child = fork(WORKER, [JSON.stringify(config)], { execArgv: [], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  const waiting = new Map()
  let ready
  const isReady = new Promise((r) => (ready = r))
  let closed
  const isClosed = new Promise((r) => (closed = r))
  child.on('message', (m) => {
    if (m.ready) ready()
    if (m.closed) closed(m.stats)
    if (m.round !== undefined) waiting.get(m.round)?.(m.results)
  })
  const exited = new Promise((r) => child.once('exit', r))
  return {
    child,
    ready: isReady,
    exited,
    alive: true,
    round(round, users) {
      return new Promise((resolve) => {
        waiting.set(round, resolve)
        // A killed worker answers nothing: its callers are gone with it.
        exited.then(() => resolve([]))
        child.send({ round, users })
      })
    },
    close() {
      child.send({ close: true })
      return isClosed
    },
  }
}

describe('a fleet with a store, refresh ahead and rotating refresh tokens', () => {
  it(`${WORKERS} processes x ${USERS} users: saves failing at random, a process killed mid-save, Redis restarted; no caller fails, no grant lost, the newest tokens stored`, { timeout: 90_000 }, async () => {
    let redis = await startRedis()
    const key = newKey()
    const workers = []
    let killAfter = Infinity
    let failSavesUntil = Infinity
    let killed = null
    const proxy = await startTokenProxy(oidc.tokenUrl)
    const table = await startTable((user, worker, res) => {
      if (killed === null && Date.now() >= killAfter && !proxy.busy(worker)) {
        // The process dies while its save is on the wire: never answered, never written.
        killed = { user, worker, at: Date.now() }
        proxy.kill(worker)
        workers[worker].child.kill('SIGKILL')
        res.destroy()
        return false
      }
      if (Date.now() < failSavesUntil && Math.random() < SAVE_FAILURE_RATE) {
        res.writeHead(500).end()
        return false
      }
      return true
    })
    const config = {
      redisUrl: redis.url,
      key,
      storeUrl: table.url,
      tokenUrl: oidc.tokenUrl,
      clientId: 'app',
      clientSecret: 'app-secret',
      callers: CALLERS,
      // 12 s tokens: refreshed ahead 5.25-6.3 s after they come; a restart's
      // hold on refresh-token locks (refreshTimeoutMs + 1.5 s = 4.5 s) is
      // ridden out on tokens that still have 5.7 s or more.
      bufferTimeMs: 5_000,
      refreshTimeoutMs: 3_000,
      lockTtlMs: 1_500,
      activeWindowMs: 5_000,
    }
    try {
      const users = Array.from({ length: USERS }, (_, i) => `fleet-user-${i}`)
      const grants = new Map()
      for (const u of users) {
        const { grantId, refreshToken } = await oidc.connect(u)
        grants.set(u, grantId)
        table.rows.set(u, { accessToken: `consent-${u}`, refreshToken, expiresAt: Date.now() - 1_000 })
      }
      // A fresh Redis holds refresh-token locks for its first 1.5 s (no
      // restart marker yet): the run starts after it, as a deploy would.
      await sleep(1_600)
      for (let i = 0; i < WORKERS; i++) workers.push(startWorker({ ...config, worker: i, tokenUrl: proxy.url(i) }))
      await Promise.all(workers.map((w) => w.ready))

      const results = []
      const started = Date.now()
      let restarted = null
      killAfter = started + 7_000
      failSavesUntil = started + 8_000
      for (let round = 0; Date.now() - started < RUN_MS; round++) {
        const t0 = Date.now()
        if (restarted === null && t0 - started > 13_000) {
          await redis.stop()
          redis = await startRedis(redis.port)
          restarted = Date.now()
        }
        // A replacement for the killed process, as an orchestrator would start.
        if (killed !== null && !workers.some((w) => w.replaces !== undefined)) {
          const w = startWorker({ ...config, worker: workers.length, tokenUrl: proxy.url(workers.length) })
          w.replaces = killed.worker
          workers.push(w)
          await w.ready
        }
        const live = workers.filter((w) => w.child.exitCode === null && w.child.signalCode === null)
        for (const r of (await Promise.all(live.map((w) => w.round(round, users)))).flat()) results.push({ ...r, round, at: t0 - started })
        await sleep(Math.max(0, t0 + ROUND_MS - Date.now()))
      }
      const stats = await Promise.all(workers.filter((w) => w.child.exitCode === null && w.child.signalCode === null).map((w) => w.close()))

      const errors = results.filter((r) => r.error !== undefined)
      const slowest = Math.max(...results.filter((r) => r.round > 0).map((r) => r.ms))
      console.log(
        `fleet: ${results.length} calls, ${errors.length} failed, slowest after the first round ${slowest} ms; ${oidc.counts.refreshes} refreshes; ${table.server.saves} saves landed; killed worker ${killed?.worker} saving ${killed?.user} at +${killed && killed.at - started} ms; Redis restarted at +${restarted - started} ms; background refreshes ${stats.map((s) => s.backgroundRefreshes).join('/')}, save failures ${stats.map((s) => s.saveFailures).join('/')}`,
      )
      if (errors.length > 0) console.log(JSON.stringify(errors.slice(0, 6).map((e) => [e.user, e.error, e.round, e.at, e.ms])))
      expect(killed).not.toBeNull()
      expect(restarted).not.toBeNull()
      expect(errors).toEqual([])
      expect(oidc.counts.grantErrors).toEqual([])
      for (const u of users) {
        expect(await oidc.grantAlive(grants.get(u)), u).toBe(true)
        // The table holds the token of the user's latest refresh.
        expect(table.rows.get(u).accessToken, u).toBe(oidc.counts.newest.get(u))
      }
      // Refreshed ahead: about one refresh per user per 5.25-6.3 s, never a storm.
      expect(oidc.counts.refreshes).toBeLessThan(USERS * (RUN_MS / 5_000 + 2))
      expect(stats.reduce((n, s) => n + s.backgroundRefreshes, 0)).toBeGreaterThan(USERS)
    } finally {
      for (const w of workers) w.child.kill('SIGKILL')
      await redis.stop()
      for (const s of [table.server, proxy.server]) {
        s.closeAllConnections()
        s.close()
      }
    }
  })
})
