// Test and benchmark helpers for the Redis mode: a real redis-server on a
// random loopback port (plaintext, TLS with certificates made here by
// openssl, with ACL users, or three of them as a Redis Cluster), redis-cli,
// a token provider that counts refreshes (and rejects a rotated-out refresh
// token, like a real OAuth server), and worker processes that each run
// their own TokenManager.
import { execFile, fork, spawn } from 'node:child_process'
import { createHmac, randomBytes } from 'node:crypto'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:http'
import { createServer as createNetServer, connect } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

export const WORKER = fileURLToPath(new URL('./redis-worker.mjs', import.meta.url))
export const newKey = () => randomBytes(32).toString('base64')
/**
 * The `redis.userIdKey` the helpers' workers and instances name users by
 * (unless started with `unkeyed: true`, as an instance of an earlier setup).
 */
export const USER_ID_KEY = '58kI/sBYkzfm+Y/73pATLZ5pmQlb8kX+50Oa8fq9pSg='
/** A user's hash in Redis names under USER_ID_KEY (HMAC-SHA256, hex). */
export const userName = (user) => createHmac('sha256', Buffer.from(USER_ID_KEY, 'base64')).update(user).digest('hex')
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

const run = (cmd, args) =>
  new Promise((resolve, reject) => {
    execFile(cmd, args, { maxBuffer: 64 << 20 }, (err, stdout, stderr) => (err ? reject(new Error(`${cmd} ${args.join(' ')}: ${stderr || err.message}`)) : resolve(stdout)))
  })

/**
 * A throwaway CA, a server certificate it signed for 127.0.0.1 and
 * localhost, and an unrelated CA (for "wrong CA" tests), made with openssl
 * in a temporary directory. PEM strings and file paths; `remove()` deletes them.
 */
export async function makeCertificates() {
  const dir = mkdtempSync(join(tmpdir(), 'ttm-tls-'))
  const f = (name) => join(dir, name)
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes']
  for (const ca of ['ca', 'other-ca']) {
    await run('openssl', ['req', '-x509', ...ec, '-keyout', f(`${ca}.key`), '-out', f(`${ca}.crt`), '-days', '2', '-subj', `/CN=ttm test ${ca}`,
      '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'])
  }
  await run('openssl', ['req', ...ec, '-keyout', f('server.key'), '-out', f('server.csr'), '-subj', '/CN=localhost'])
  writeFileSync(f('server.ext'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n')
  await run('openssl', ['x509', '-req', '-in', f('server.csr'), '-CA', f('ca.crt'), '-CAkey', f('ca.key'), '-CAcreateserial', '-out', f('server.crt'), '-days', '2', '-extfile', f('server.ext')])
  return {
    dir,
    caFile: f('ca.crt'),
    certFile: f('server.crt'),
    keyFile: f('server.key'),
    ca: readFileSync(f('ca.crt'), 'utf8'),
    otherCa: readFileSync(f('other-ca.crt'), 'utf8'),
    remove: () => rmSync(dir, { recursive: true, force: true }),
  }
}

/**
 * A server certificate made as a newcomer makes one: `openssl req -x509`
 * (self-signed, and marked CA:TRUE by openssl's defaults), for `san`
 * (default 127.0.0.1 and localhost). `expired`: valid in 2020 only (made
 * with `openssl ca -selfsign`, the only way openssl 3.0 backdates).
 * `issuer`: signed by that `makeCertificates()` CA instead, still CA:TRUE
 * (a CA used as the server's own certificate). Returns the files for
 * startRedis's `tls` and the PEM.
 */
export async function makeServerCertificate({ san = 'IP:127.0.0.1,DNS:localhost', expired = false, issuer } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'ttm-cert-'))
  const f = (name) => join(dir, name)
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', f('server.key')]
  if (!expired && issuer === undefined) {
    await run('openssl', ['req', '-x509', ...ec, '-out', f('server.crt'), '-days', '2', '-subj', '/CN=redis', '-addext', `subjectAltName=${san}`])
  } else {
    await run('openssl', ['req', '-new', ...ec, '-out', f('server.csr'), '-subj', '/CN=redis'])
    writeFileSync(f('ext.cnf'), `basicConstraints=critical,CA:TRUE\nsubjectAltName=${san}\n`)
    if (issuer !== undefined) {
      await run('openssl', ['x509', '-req', '-in', f('server.csr'), '-CA', issuer.caFile, '-CAkey', join(issuer.dir, 'ca.key'), '-CAcreateserial', '-out', f('server.crt'), '-days', '2', '-extfile', f('ext.cnf')])
    } else {
      writeFileSync(f('index.txt'), '')
      writeFileSync(f('serial'), '01\n')
      writeFileSync(f('ca.cnf'), `[ca]\ndefault_ca=d\n[d]\ndatabase=${f('index.txt')}\nnew_certs_dir=${dir}\nserial=${f('serial')}\ndefault_md=sha256\npolicy=p\n[p]\ncommonName=supplied\n`)
      await run('openssl', ['ca', '-batch', '-config', f('ca.cnf'), '-selfsign', '-keyfile', f('server.key'), '-in', f('server.csr'), '-out', f('server.crt'),
        '-startdate', '20200101000000Z', '-enddate', '20200102000000Z', '-extfile', f('ext.cnf'), '-notext'])
    }
  }
  const pem = readFileSync(f('server.crt'), 'utf8')
  return { dir, certFile: f('server.crt'), keyFile: f('server.key'), caFile: f('server.crt'), pem, remove: () => rmSync(dir, { recursive: true, force: true }) }
}

/**
 * Starts redis-server on `port` (default: a free one). `stop()` kills it
 * (like a crash). Options: `tls` (from makeCertificates: the port speaks
 * TLS only), `args` (more redis-server arguments, e.g. ACL users),
 * `password` (for redis-cli and `url`: the default user's, set with
 * --requirepass).
 */
export async function startRedis(port, { tls, args = [], password } = {}) {
  port ??= await freePort()
  const listen = tls
    ? ['--port', '0', '--tls-port', String(port), '--tls-cert-file', tls.certFile, '--tls-key-file', tls.keyFile, '--tls-ca-cert-file', tls.caFile, '--tls-auth-clients', 'no']
    : ['--port', String(port)]
  const auth = password === undefined ? [] : ['--requirepass', password]
  const child = spawn('redis-server', [...listen, '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', ...auth, ...args], {
    stdio: 'ignore',
  })
  const exited = new Promise((resolve) => child.once('exit', resolve))
  child.once('error', (e) => {
    throw new Error(`cannot start redis-server (apt-get install redis-server): ${e.message}`)
  })
  await waitForPort(port)
  const creds = password === undefined ? '' : `:${encodeURIComponent(password)}@`
  return {
    port,
    url: `${tls ? 'rediss' : 'redis'}://${creds}127.0.0.1:${port}`,
    /** redis-cli arguments reaching this server (TLS, password). */
    cliArgs: [...(tls ? ['--tls', '--cacert', tls.caFile] : []), ...(password === undefined ? [] : ['--no-auth-warning', '-a', password])],
    async stop() {
      child.kill('SIGKILL')
      await exited
    },
  }
}

/** The hash slot of a key (CRC16/XMODEM of its {tag}, mod 16384), as Redis Cluster computes it. */
export function keySlot(key) {
  const open = key.indexOf('{')
  if (open !== -1) {
    const close = key.indexOf('}', open + 1)
    if (close > open + 1) key = key.slice(open + 1, close)
  }
  let crc = 0
  for (const b of Buffer.from(key)) {
    crc ^= b << 8
    for (let i = 0; i < 8; i++) crc = crc & 0x8000 ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff
  }
  return crc % 16384
}

/** The slot holding a user's keys, named under USER_ID_KEY (their tag is the hex HMAC of the user id). */
export const userSlot = (user) => keySlot(`{${userName(user)}}`)

/**
 * A Redis Cluster of `masters` nodes (no replicas) on free loopback ports,
 * created with redis-cli --cluster create; with `tls` (from
 * makeCertificates), TLS only, the cluster bus included. `moveSlot(slot, to)` migrates a
 * slot, keys and all, to node `to` (CLUSTER SETSLOT IMPORTING/MIGRATING,
 * MIGRATE, SETSLOT NODE), as `redis-cli --cluster reshard` does.
 */
export async function startCluster({ masters = 3, tls } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'ttm-cluster-'))
  const nodes = []
  for (let i = 0; i < masters; i++) {
    const port = await freePort()
    const bus = await freePort()
    // With `tls`, clients and the cluster bus speak TLS only.
    const listen = tls
      ? ['--port', '0', '--tls-port', String(port), '--tls-cluster', 'yes', '--tls-cert-file', tls.certFile, '--tls-key-file', tls.keyFile,
          '--tls-ca-cert-file', tls.caFile, '--tls-auth-clients', 'no']
      : ['--port', String(port)]
    const child = spawn(
      'redis-server',
      [...listen, '--cluster-port', String(bus), '--cluster-enabled', 'yes', '--cluster-config-file', `nodes-${port}.conf`,
        '--cluster-node-timeout', '2000', '--dir', dir, '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'],
      { stdio: 'ignore' },
    )
    nodes.push({ port, child, exited: new Promise((resolve) => child.once('exit', resolve)) })
  }
  const tlsArgs = tls ? ['--tls', '--cacert', tls.caFile] : []
  const at = (port, ...args) => cli([...tlsArgs, '-p', String(port)], ...args)
  const stop = async () => {
    for (const n of nodes) n.child.kill('SIGKILL')
    await Promise.all(nodes.map((n) => n.exited))
    rmSync(dir, { recursive: true, force: true })
  }
  try {
    await Promise.all(nodes.map((n) => waitForPort(n.port)))
    await run('redis-cli', [...tlsArgs, '--cluster', 'create', ...nodes.map((n) => `127.0.0.1:${n.port}`), '--cluster-replicas', '0', '--cluster-yes'])
    for (const n of nodes) n.id = (await at(n.port, 'cluster', 'myid')).trim()
    const until = Date.now() + 20_000
    for (const n of nodes) {
      while (!(await at(n.port, 'cluster', 'info')).includes('cluster_state:ok')) {
        if (Date.now() > until) throw new Error('the cluster did not come up')
        await sleep(50)
      }
    }
  } catch (e) {
    await stop()
    throw e
  }
  return {
    ports: nodes.map((n) => n.port),
    urls: nodes.map((n) => `${tls ? 'rediss' : 'redis'}://127.0.0.1:${n.port}`),
    /** redis-cli arguments reaching these nodes (TLS). */
    cliArgs: tlsArgs,
    /** Index of the node serving `slot`. */
    async ownerOf(slot) {
      const out = await at(nodes[0].port, 'cluster', 'nodes')
      for (const line of out.split('\n')) {
        const [id, , flags, , , , , , ...ranges] = line.split(' ')
        if (!flags?.includes('master')) continue
        for (const r of ranges) {
          const [a, b = a] = r.split('-').map(Number)
          if (slot >= a && slot <= b) return nodes.findIndex((n) => n.id === id)
        }
      }
      return -1
    },
    async moveSlot(slot, to) {
      const from = await this.ownerOf(slot)
      if (from === to) return
      const [src, dst] = [nodes[from], nodes[to]]
      await at(dst.port, 'cluster', 'setslot', String(slot), 'importing', src.id)
      await at(src.port, 'cluster', 'setslot', String(slot), 'migrating', dst.id)
      for (;;) {
        const keys = (await at(src.port, 'cluster', 'getkeysinslot', String(slot), '100')).split('\n').filter(Boolean)
        if (keys.length === 0) break
        await at(src.port, 'migrate', '127.0.0.1', String(dst.port), '', '0', '5000', 'keys', ...keys)
      }
      for (const n of [dst, src, ...nodes.filter((n) => n !== src && n !== dst)]) await at(n.port, 'cluster', 'setslot', String(slot), 'node', dst.id)
    },
    stop,
  }
}

export function cli(port, ...args) {
  const pre = Array.isArray(port) ? port : ['-p', String(port)]
  return run('redis-cli', [...pre, ...args])
}

/**
 * Records the commands clients send (redis-cli MONITOR). `stop()` returns
 * them, split into what clients sent (round trips) and what scripts ran.
 */
export async function monitor(port, cliArgs = []) {
  const child = spawn('redis-cli', ['-p', String(port), ...cliArgs, 'monitor'], { stdio: ['ignore', 'pipe', 'ignore'] })
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
 * `revokeOnReuse`: an old refresh token also revokes the user's grant (as
 * OAuth 2.1 servers do on refresh token reuse): every later request for
 * that user gets invalid_grant too.
 */
export async function startProvider({ delayMs = 0, expiresIn = 3600, revokeOnReuse = false } = {}) {
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
      if (refreshToken !== s.current || s.revoked) {
        if (revokeOnReuse) s.revoked = true
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
 * A worker process with its own TokenManager (see helpers/redis-worker.mjs).
 * `ready` resolves once it is connected; `go()` starts its calls; `done`
 * resolves with its results and stats. `env`: added to its environment.
 */
export function startWorker(config, { env } = {}) {
  const child = fork(WORKER, [JSON.stringify(config)], { execArgv: [], env: { ...process.env, ...env }, stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
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

export const INSTANCE = fileURLToPath(new URL('./redis-instance.mjs', import.meta.url))

/**
 * An app instance in its own process (helpers/redis-instance.mjs), driven
 * call by call: `call('get', user, token)`, `call('invalidate', user,
 * accessToken)`, `call('stats')`. Tokens cross as { accessToken,
 * refreshToken, expiresAt: epoch ms }. `stop()` closes it and waits for exit;
 * `child` is its process (to stop and continue it).
 */
export async function startInstance(config) {
  const child = fork(INSTANCE, [JSON.stringify(config)], { execArgv: [], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  const exited = new Promise((resolve) => child.once('exit', resolve))
  const pending = new Map()
  let next = 0
  let readyResolve
  const ready = new Promise((r) => (readyResolve = r))
  child.on('message', (m) => {
    if (m.ready) return readyResolve()
    const p = pending.get(m.id)
    pending.delete(m.id)
    if (m.error) p.reject(Object.assign(new Error(m.error.message), { code: m.error.code }))
    else p.resolve(m.result)
  })
  await ready
  return {
    child,
    call(op, ...args) {
      const id = ++next
      return new Promise((resolve, reject) => {
        pending.set(id, { resolve, reject })
        child.send({ id, op, args })
      })
    },
    async stop() {
      if (child.connected) await this.call('close').catch(() => {})
      child.kill()
      await exited
    },
  }
}
