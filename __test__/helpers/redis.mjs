// Test and benchmark helpers for the Redis mode: a real redis-server on a
// random loopback port, redis-cli, a token provider that counts refreshes
// (and rejects a rotated-out refresh token, like a real OAuth server), and
// worker processes that each run their own TokenManager.
import { execFile, fork, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { createServer } from 'node:http'
import { createServer as createNetServer, connect } from 'node:net'
import { fileURLToPath } from 'node:url'

export const WORKER = fileURLToPath(new URL('./redis-worker.mjs', import.meta.url))
export const newKey = () => randomBytes(32).toString('base64')
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createNetServer()
    s.once('error', reject)
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => resolve(port))
    })
  })
}

async function waitForPort(port, ms = 10_000) {
  const until = Date.now() + ms
  for (;;) {
    const ok = await new Promise((resolve) => {
      const c = connect(port, '127.0.0.1')
      c.once('connect', () => (c.destroy(), resolve(true)))
      c.once('error', () => resolve(false))
    })
    if (ok) return
    if (Date.now() > until) throw new Error(`redis-server did not listen on ${port}`)
    await sleep(20)
  }
}

/** Starts redis-server on `port` (default: a free one). `stop()` kills it (like a crash). */
export async function startRedis(port) {
  port ??= await freePort()
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
    stdio: 'ignore',
  })
  const exited = new Promise((resolve) => child.once('exit', resolve))
  child.once('error', (e) => {
    throw new Error(`cannot start redis-server (apt-get install redis-server): ${e.message}`)
  })
  await waitForPort(port)
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    async stop() {
      child.kill('SIGKILL')
      await exited
    },
  }
}

export function cli(port, ...args) {
  return new Promise((resolve, reject) => {
    execFile('redis-cli', ['-p', String(port), ...args], { maxBuffer: 64 << 20 }, (err, stdout) => (err ? reject(err) : resolve(stdout)))
  })
}

/**
 * Records the commands clients send (redis-cli MONITOR). `stop()` returns
 * them, split into what clients sent (round trips) and what scripts ran.
 */
export async function monitor(port) {
  const child = spawn('redis-cli', ['-p', String(port), 'monitor'], { stdio: ['ignore', 'pipe', 'ignore'] })
  let out = ''
  await new Promise((resolve) => {
    child.stdout.on('data', (d) => {
      out += d
      if (out.startsWith('OK')) resolve()
    })
  })
  return {
    async stop() {
      await sleep(50) // let the last commands arrive
      child.kill()
      const lines = out.split('\n').slice(1).filter(Boolean)
      const sent = lines.filter((l) => !/\[\d+ lua\]/.test(l))
      return { sent, scripted: lines.length - sent.length, names: sent.map((l) => (l.match(/\] "([^"]+)"/) ?? [])[1]?.toLowerCase()) }
    },
  }
}

/**
 * An OAuth-ish token endpoint: POST { user, refreshToken } answers a new
 * access token and a rotated refresh token; an old refresh token gets 400
 * invalid_grant. Every user starts with refresh token `r0-<user>`.
 * `hold(user)` makes the next request for that user hang until `close()`.
 */
export async function startProvider({ delayMs = 0, expiresIn = 3600 } = {}) {
  const users = new Map()
  const held = new Set()
  const hanging = []
  const seen = []
  const stats = { requests: 0, refreshes: 0, rejected: 0 }
  const state = (u) => {
    if (!users.has(u)) users.set(u, { current: `r0-${u}`, refreshes: 0, requests: 0, issued: [] })
    return users.get(u)
  }
  const server = createServer((req, res) => {
    let body = ''
    req.on('data', (d) => (body += d))
    req.on('end', async () => {
      const { user, refreshToken } = JSON.parse(body)
      const s = state(user)
      s.requests++
      stats.requests++
      seen.push({ user, at: Date.now() })
      if (held.delete(user)) {
        hanging.push(res)
        return
      }
      if (delayMs) await sleep(delayMs)
      if (refreshToken !== s.current) {
        stats.rejected++
        res.writeHead(400, { 'content-type': 'application/json' }).end(JSON.stringify({ error: 'invalid_grant' }))
        return
      }
      s.refreshes++
      stats.refreshes++
      const nonce = randomBytes(6).toString('hex')
      s.current = `rt-${s.refreshes}-${user}-${nonce}`
      const accessToken = `at-${s.refreshes}-${user}-${nonce}`
      s.issued.push(accessToken, s.current)
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ accessToken, refreshToken: s.current, expiresIn }))
    })
  })
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  return {
    url: `http://127.0.0.1:${server.address().port}/token`,
    stats,
    seen,
    user: (u) => state(u),
    /** Every token it ever issued. */
    issued: () => [...users.values()].flatMap((s) => s.issued),
    hold: (u) => held.add(u),
    close() {
      for (const res of hanging) res.destroy()
      server.closeAllConnections()
      return new Promise((r) => server.close(r))
    },
  }
}

/**
 * A worker process with its own TokenManager (see fixtures/redis-worker.mjs).
 * `ready` resolves once it is connected; `go()` starts its calls; `done`
 * resolves with its results and stats.
 */
export function startWorker(config) {
  const child = fork(WORKER, [JSON.stringify(config)], { execArgv: [], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  let readyResolve
  let doneResolve
  const ready = new Promise((r) => (readyResolve = r))
  const done = new Promise((r) => (doneResolve = r))
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })))
  child.on('message', (m) => {
    if (m.ready) readyResolve()
    if (m.results) doneResolve(m)
  })
  return { child, ready, done, exited, go: () => child.send({ go: true }), kill: () => child.kill('SIGKILL') }
}
