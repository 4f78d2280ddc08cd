// A Tarabut-compatible token server for tests, the demo and benchmarks.
//
// It answers `POST <path>` the way Tarabut Gateway's token endpoint is
// documented: `Content-Type: application/json`, header
// `X-TG-CustomerUserId` (1 to 40 characters), body exactly
// `{ clientId, clientSecret, grantType: 'client_credentials', scope? }`,
// answer `{ accessToken, tokenType: 'Bearer', expiresIn }`. A request of any
// other shape is refused (400/404/405/415) and counted in `rejected`, so a
// test passing against it proves the request shape.
//
// It keeps each user's current token (the newest it issued, until it
// expires): `isCurrent(userId, token)` is what an API would accept. Later
// endpoints (e.g. accounts, which must answer 401 to expired or superseded
// tokens) plug in with `route()` and `authorize()`.
//
// Faults on demand: `inject({ status, retryAfter, body })`,
// `inject({ delayMs })`, `inject({ malformed: true })`,
// `inject({ destroy: true })`, each for `times` requests (optionally only
// one user's).
//
// Loopback only, random port, no timers left behind: `close()` ends it.
import http from 'node:http'
import { randomBytes } from 'node:crypto'

export const USER_HEADER = 'x-tg-customeruserid'
export const MAX_USER_ID_CHARS = 40

const BODY_LIMIT = 16 * 1024

/**
 * @param {object} [options]
 * @param {string} [options.clientId]
 * @param {string} [options.clientSecret]
 * @param {number} [options.expiresIn] seconds, for every token issued (settable later)
 * @param {number | (() => number)} [options.latencyMs] added before each answer, to model a remote provider
 * @param {string} [options.path] the token path, default '/sandbox/token'
 */
export async function startTarabutServer(options = {}) {
  const config = {
    clientId: options.clientId ?? 'test-client-id',
    clientSecret: options.clientSecret ?? 'test-client-secret',
    path: options.path ?? '/sandbox/token',
  }
  let expiresIn = options.expiresIn ?? 3600
  let latencyMs = options.latencyMs ?? 0

  /** userId -> { accessToken, expiresAt, issued } */
  const users = new Map()
  /** userId -> token requests that reached the handler */
  const perUser = new Map()
  const faults = []
  const routes = new Map()
  const sockets = new Set()
  const counters = { tokenRequests: 0, issued: 0, rejected: 0, aborted: 0, faulted: 0 }
  const rejections = []

  const server = http.createServer((req, res) => {
    const route = routes.get(`${req.method} ${new URL(req.url, 'http://x').pathname}`)
    if (route !== undefined) return route(req, res)
    if (new URL(req.url, 'http://x').pathname === config.path) return refuse(res, 405, 'method_not_allowed', 'use POST')
    refuse(res, 404, 'not_found', 'no such endpoint')
  })
  server.on('connection', (s) => {
    sockets.add(s)
    s.on('close', () => sockets.delete(s))
  })

  function refuse(res, status, error, message) {
    counters.rejected++
    rejections.push({ status, error, message })
    send(res, status, { error, message })
  }

  function send(res, status, body, headers = {}) {
    if (res.destroyed) return
    const text = typeof body === 'string' ? body : JSON.stringify(body)
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), ...headers })
    res.end(text)
  }

  function readBody(req) {
    return new Promise((resolve, reject) => {
      const chunks = []
      let size = 0
      req.on('data', (c) => {
        size += c.length
        if (size > BODY_LIMIT) reject(new Error('body too large'))
        else chunks.push(c)
      })
      req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')))
      req.on('error', reject)
    })
  }

  function takeFault(userId) {
    const i = faults.findIndex((f) => f.userId === undefined || f.userId === userId)
    if (i === -1) return null
    const f = faults[i]
    if (--f.times <= 0) faults.splice(i, 1)
    counters.faulted++
    return f
  }

  function delay(ms, res) {
    if (!(ms > 0)) return Promise.resolve()
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(t)
        res.off('close', done)
        resolve()
      }
      const t = setTimeout(done, ms)
      // The client went away: stop waiting (and do not answer).
      res.on('close', done)
    })
  }

  async function tokenEndpoint(req, res) {
    counters.tokenRequests++
    let answered = false
    res.on('finish', () => (answered = true))
    res.on('close', () => {
      if (!answered) counters.aborted++
    })

    const userId = req.headers[USER_HEADER]
    if (typeof userId === 'string') perUser.set(userId, (perUser.get(userId) ?? 0) + 1)
    let raw
    try {
      raw = await readBody(req)
    } catch {
      return refuse(res, 413, 'invalid_request', 'body too large')
    }
    const fault = takeFault(typeof userId === 'string' ? userId : undefined)
    await delay((typeof latencyMs === 'function' ? latencyMs() : latencyMs) + (fault?.delayMs ?? 0), res)
    if (res.destroyed || req.socket.destroyed) return
    if (fault?.destroy) {
      answered = true // cut on purpose: not the client's abort
      return req.socket.destroy()
    }
    if (fault?.status !== undefined) {
      const headers = fault.retryAfter !== undefined ? { 'retry-after': String(fault.retryAfter) } : {}
      return send(res, fault.status, fault.body ?? { error: defaultError(fault.status), message: 'injected fault' }, headers)
    }

    const type = (req.headers['content-type'] ?? '').split(';')[0].trim().toLowerCase()
    if (type !== 'application/json') return refuse(res, 415, 'invalid_request', 'Content-Type must be application/json')
    if (typeof userId !== 'string' || userId.length === 0 || [...userId].length > MAX_USER_ID_CHARS) {
      return refuse(res, 400, 'invalid_request', `${USER_HEADER} must be 1 to ${MAX_USER_ID_CHARS} characters`)
    }
    let body
    try {
      body = JSON.parse(raw)
    } catch {
      return refuse(res, 400, 'invalid_request', 'body is not JSON')
    }
    if (body === null || typeof body !== 'object' || Array.isArray(body)) return refuse(res, 400, 'invalid_request', 'body must be an object')
    const allowed = new Set(['clientId', 'clientSecret', 'grantType', 'scope'])
    const unknown = Object.keys(body).filter((k) => !allowed.has(k))
    if (unknown.length) return refuse(res, 400, 'invalid_request', `unknown fields: ${unknown.join(', ')}`)
    for (const k of ['clientId', 'clientSecret', 'grantType']) {
      if (typeof body[k] !== 'string' || body[k].length === 0) return refuse(res, 400, 'invalid_request', `${k} is required`)
    }
    if (body.scope !== undefined && typeof body.scope !== 'string') return refuse(res, 400, 'invalid_request', 'scope must be a string')
    if (body.grantType !== 'client_credentials') return refuse(res, 400, 'unsupported_grant_type', 'grantType must be client_credentials')
    if (body.clientId !== config.clientId || body.clientSecret !== config.clientSecret) {
      return refuse(res, 401, 'invalid_client', 'unknown client or wrong secret')
    }

    if (fault?.malformed) return send(res, 200, '{"accessToken": "tg_broken", "tokenType": "Bearer", "expiresIn": ')
    const { accessToken } = issue(userId, expiresIn, body.scope)
    counters.issued++
    send(res, 200, { accessToken, tokenType: 'Bearer', expiresIn })
  }

  /** Makes a new current token for `userId`, superseding the previous one. */
  function issue(userId, lifetimeSeconds, scope) {
    const accessToken = `tg_${randomBytes(24).toString('base64url')}`
    const previous = users.get(userId)
    const record = { accessToken, expiresAt: Date.now() + lifetimeSeconds * 1000, issued: (previous?.issued ?? 0) + 1, scope }
    users.set(userId, record)
    return { accessToken, expiresAt: record.expiresAt }
  }

  routes.set(`POST ${config.path}`, tokenEndpoint)

  await new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(0, '127.0.0.1', resolve)
  })
  const url = `http://127.0.0.1:${server.address().port}`

  /** The token `userId` may use now: the newest issued, unexpired. */
  function isCurrent(userId, accessToken) {
    const u = users.get(userId)
    return u !== undefined && u.accessToken === accessToken && u.expiresAt > Date.now()
  }

  return {
    url,
    tokenUrl: url + config.path,
    clientId: config.clientId,
    clientSecret: config.clientSecret,
    get expiresIn() {
      return expiresIn
    },
    set expiresIn(v) {
      expiresIn = v
    },
    get latencyMs() {
      return latencyMs
    },
    set latencyMs(v) {
      latencyMs = v
    },
    /** Token requests that reached the endpoint (any outcome). */
    get tokenRequests() {
      return counters.tokenRequests
    },
    /** Tokens issued. */
    get issued() {
      return counters.issued
    },
    /** Requests refused for their shape or credentials; see `rejections`. */
    get rejected() {
      return counters.rejected
    },
    rejections,
    /** Requests whose client went away before the answer (e.g. a timeout aborted them). */
    get aborted() {
      return counters.aborted
    },
    /** Token requests for `userId`. */
    requestsFor(userId) {
      return perUser.get(userId) ?? 0
    },
    /** `{ accessToken, expiresAt, issued }` of the user's current token, if any. */
    currentToken(userId) {
      const u = users.get(userId)
      return u === undefined ? undefined : { ...u }
    },
    isCurrent,
    /**
     * Issues a token out of band (as if the user had connected earlier):
     * `{ accessToken, expiresAt }` in epoch ms. Not counted as a request.
     */
    issue(userId, lifetimeSeconds = expiresIn) {
      return issue(userId, lifetimeSeconds)
    },
    /**
     * The user an API request is for, if its `Authorization: Bearer` token
     * is that user's current one; else null (the API answers 401).
     */
    authorize(req) {
      const userId = req.headers[USER_HEADER]
      const m = /^Bearer (.+)$/.exec(req.headers.authorization ?? '')
      return typeof userId === 'string' && m !== null && isCurrent(userId, m[1]) ? userId : null
    },
    /** Adds an endpoint: `handler(req, res)`. */
    route(method, path, handler) {
      routes.set(`${method.toUpperCase()} ${path}`, handler)
    },
    /**
     * The next `times` token requests (of `userId`, if given) get `fault`:
     * `{ status, retryAfter?, body? }`, `{ delayMs }`, `{ malformed: true }`
     * or `{ destroy: true }` (the connection is cut without an answer).
     */
    inject(fault, { times = 1, userId } = {}) {
      faults.push({ ...fault, times, userId })
    },
    /** Forgets tokens, counters and pending faults. */
    reset() {
      users.clear()
      perUser.clear()
      faults.length = 0
      rejections.length = 0
      for (const k of Object.keys(counters)) counters[k] = 0
    },
    close() {
      for (const s of sockets) s.destroy()
      return new Promise((resolve) => server.close(() => resolve()))
    },
  }
}

function defaultError(status) {
  if (status === 401) return 'invalid_client'
  if (status === 429) return 'too_many_requests'
  if (status >= 500) return 'server_error'
  return 'invalid_request'
}
